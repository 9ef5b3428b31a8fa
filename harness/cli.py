"""`harness`: the Hydra entry point. Compose, validate, dispatch on `mode`; everything else lives elsewhere.

Around every command it keeps three promises: a user error prints one or two lines naming the value and the fix
(the traceback with HYDRA_FULL_ERROR=1); a command that fails before doing work, or that writes nothing of its own
(plan, report, infer), leaves no run folder behind; and a folder that holds a run is only written again by a resume
of the same config. The run's `.hydra/` files are written here (Hydra's own copy is off: `hydra.output_subdir`),
after that check and with secrets redacted.
"""
from __future__ import annotations

import gc
import logging
import os
import shutil
import sys
import traceback
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from harness.config import CONF_DIR, register_configs, validate
from harness.errors import CheckFailed, RunDiverged, StageFailed, UserError
from harness.run_files import is_main_process

log = logging.getLogger("harness")

register_configs()


def register_launcher() -> None:
    """`hydra/launcher=gpus` (hydra_plugins/harness_launcher): Hydra finds plugins by walking the `hydra_plugins`
    folders, which misses one installed in editable mode; add ours to its registry by name."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.harness_launcher.gpu_launcher import GpuLauncher  # registers its config schema

    Plugins.instance().class_name_to_class[f"{GpuLauncher.__module__}.{GpuLauncher.__name__}"] = GpuLauncher


register_launcher()

# A library notice a user cannot act on: PEFT reads transformers' deprecated `is_gradient_checkpointing`
# (transformers >= 5.2x).
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

NO_OUTPUT_MODES = ("plan", "report", "infer")  # their results go to stdout or into `path`, not a run folder
SAME_ON_RESUME_EXCEPT = ("train.resume",)  # keys a resume may change


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def dispatch(cfg: DictConfig, out: Path):
    run = validate(cfg)  # before any model is built
    from harness.hub_guard import import_bitsandbytes

    import_bitsandbytes(allow_hub_kernels=run.model.trust_remote_code)  # before transformers can import it
    if run.mode == "plan":
        from harness.pipeline import plan_run

        return plan_run(run).trainable_params
    if run.mode == "train":
        from harness.config import check_optim
        from harness.pipeline import train_run
        from harness.secrets import redact

        check_optim(run.train.optim)
        config_dict = redact(OmegaConf.to_container(cfg, resolve=True))
        if _is_multirun():  # one W&B run per job, grouped by sweep, named from the job's overrides
            from hydra.core.hydra_config import HydraConfig

            hc = HydraConfig.get()
            run.logger.group = run.logger.group or Path(hc.sweep.dir).name
            run.logger.name = run.logger.name or (" ".join(hc.overrides.task) or f"job{hc.job.num}")
        save_hydra_files(cfg, out)
        return train_run(run, config_dict, out).get("eval_exact_match")
    if run.mode == "replay":
        from harness.replay import replay

        save_hydra_files(cfg, out)
        return replay(run.path, out)["identical"]
    if run.mode == "eval":
        from harness.inference import eval_run

        save_hydra_files(cfg, out)
        return eval_run(run.path, out, run.device)["exact_match"]
    if run.mode == "infer":
        from harness.inference import infer

        infer(run.path, run.images, run.prompt, run.device)
        return None
    if run.mode == "bench":
        from harness.bench import bench_mode

        save_hydra_files(cfg, out)
        rows = bench_mode(run.bench, out)
        return max((r.get("tokens_per_s", 0) for r in rows), default=0)
    if run.mode == "report":
        from harness.report import print_report, write_report

        result = write_report(Path(run.path))
        print_report(result)
        return len(result["failed"])
    raise UserError(f"mode={run.mode} is not implemented yet")


# ----------------------------------------------------------------------------------------------
# the run folder: what Hydra made for this command, what an earlier run left there


def is_fresh(d: Path) -> bool:
    """Whether `d` holds nothing but Hydra's job log: made for this command, no earlier run inside."""
    return not d.exists() or all(p.is_file() and p.suffix == ".log" for p in d.iterdir())


def check_earlier_run(cfg: DictConfig, d: Path) -> None:
    """A folder holding a run is written again only by `train.resume=auto` with the same config."""
    saved = d / ".hydra" / "config.yaml"
    if not saved.exists():
        if not is_fresh(d) and any(d.glob("metrics.json")):
            raise UserError(f"hydra.run.dir={d} holds a finished run without its .hydra/config.yaml; "
                            "choose a new hydra.run.dir")
        return
    if cfg.get("mode") != "train" or OmegaConf.select(cfg, "train.resume") != "auto":
        raise UserError(f"hydra.run.dir={d} already holds a run; continue it with train.resume=auto (same config) "
                        "or choose a new hydra.run.dir")
    from harness.secrets import redact

    before = _flat(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    now = _flat(redact(OmegaConf.to_container(cfg, resolve=False)))
    # keys on one side only come from another harness version's schema (a key added since): not a change
    changed = sorted(k for k in before.keys() & now.keys() if before[k] != now[k] and k not in SAME_ON_RESUME_EXCEPT)
    if changed:
        shown = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise UserError(f"train.resume=auto: the config differs from the run in {d} ({shown}{more}); resume with "
                        "the saved values or start a new run in another hydra.run.dir")


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out if obj or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


def save_hydra_files(cfg: DictConfig, d: Path) -> None:
    """`.hydra/config.yaml`, `overrides.yaml`, `hydra.yaml` (what Hydra would write), secrets redacted."""
    from hydra.core.hydra_config import HydraConfig

    from harness.secrets import redact, values_in

    if not is_main_process():  # torchrun: rank 0 writes them
        return
    hc = HydraConfig.get()
    task = OmegaConf.to_container(cfg, resolve=False)
    overrides = list(hc.overrides.task)
    values = values_in(task, [*overrides, *sys.argv])
    out = d / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    for name, obj in (("config.yaml", task), ("overrides.yaml", overrides),
                      ("hydra.yaml", {"hydra": OmegaConf.to_container(hc, resolve=False)})):
        (out / name).write_text(OmegaConf.to_yaml(OmegaConf.create(redact(obj, values))))


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _record_failure(e: BaseException, d: Path) -> None:
    """status.json + traceback.txt in this job's own directory (never anywhere else)."""
    from harness.run_files import write_json

    d.mkdir(parents=True, exist_ok=True)
    (d / "traceback.txt").write_text(traceback.format_exc())
    status = {"status": "diverged" if isinstance(e, RunDiverged) else "failed", "error": f"{type(e).__name__}: {e}"}
    if isinstance(e, StageFailed):
        status["failed_stage"] = e.stage
    write_json(d / "status.json", status)


def _remove_folder(d: Path) -> None:
    """This command's own run folder (and its date folder, if now empty)."""
    logging.shutdown()  # Hydra's job log is open inside it
    shutil.rmtree(d, ignore_errors=True)
    try:
        d.parent.rmdir()
    except OSError:
        pass


def _release_memory() -> None:
    """Jobs of a sweep share one process: drop what a job left behind before the next starts."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig):
    d, multirun = run_dir(), _is_multirun()
    first = is_main_process()  # under torchrun every rank runs this; rank 0 owns the folder
    fresh, keep = is_fresh(d), True
    try:
        if first:
            check_earlier_run(cfg, d)
        if multirun:  # a sweep job records what it tried, also when it fails validation (the report lists it)
            save_hydra_files(cfg, d)
        result = dispatch(cfg, d)
        keep = cfg.get("mode") not in NO_OUTPUT_MODES
        return result
    except Exception as e:
        worked = isinstance(e, (CheckFailed, RunDiverged, StageFailed)) or not isinstance(e, UserError)
        if multirun:  # record the failure and let the sweep go on; the report exits non-zero
            if fresh or worked:
                _record_failure(e, d)
            log.error("job failed: %s: %s (traceback in %s)", type(e).__name__, e, d / "traceback.txt")
            return None
        keep = worked
        if worked and first:
            _record_failure(e, d)
        if isinstance(e, UserError) and os.environ.get("HYDRA_FULL_ERROR") != "1":
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        raise
    finally:
        try:
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=1)
        except ImportError:
            pass
        _release_memory()
        if fresh and not keep and not multirun and first:
            _remove_folder(d)


def main() -> None:
    from harness.secrets import guard_output

    guard_output(sys.argv[1:])  # Hydra echoes overrides (secrets typed on the command line) in errors and logs
    _main()


if __name__ == "__main__":
    main()

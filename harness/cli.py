"""`harness`: the Hydra entry point. Compose, validate, dispatch on `mode`; everything else lives elsewhere."""
from __future__ import annotations

import gc
import json
import logging
import sys
import traceback
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from harness.config import CONF_DIR, ConfigError, register_configs, validate

log = logging.getLogger("harness")

register_configs()

# A library notice a user cannot act on: PEFT reads transformers' deprecated `is_gradient_checkpointing`
# (transformers >= 5.2x).
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def dispatch(cfg: DictConfig):
    run = validate(cfg)  # before any model is built
    from harness.hub_guard import import_bitsandbytes

    import_bitsandbytes(allow_hub_kernels=run.model.trust_remote_code)  # before transformers can import it
    if run.mode == "plan":
        from harness.pipeline import plan_run

        return plan_run(run).trainable_params
    if run.mode == "train":
        from harness.config import check_optim
        from harness.pipeline import train_run

        check_optim(run.train.optim)
        from harness.secrets import redact

        config_dict = redact(OmegaConf.to_container(cfg, resolve=True))
        if _is_multirun():  # one W&B run per job, grouped by sweep, named from the job's overrides
            from hydra.core.hydra_config import HydraConfig

            hc = HydraConfig.get()
            run.logger.group = run.logger.group or Path(hc.sweep.dir).name
            run.logger.name = run.logger.name or (" ".join(hc.overrides.task) or f"job{hc.job.num}")
        return train_run(run, config_dict, run_dir()).get("eval_exact_match")
    if run.mode == "replay":
        from harness.replay import replay

        return replay(run.path, run_dir())["identical"]
    if run.mode == "eval":
        from harness.inference import eval_run

        return eval_run(run.path, run_dir(), run.device)["exact_match"]
    if run.mode == "infer":
        from harness.inference import infer

        infer(run.path, run.images, run.prompt, run.device)
        return None
    if run.mode == "bench":
        from harness.bench import bench_mode

        rows = bench_mode(run.bench, run_dir())
        return max((r.get("tokens_per_s", 0) for r in rows), default=0)
    if run.mode == "report":
        from harness.report import print_report, write_report

        result = write_report(Path(run.path))
        print_report(result)
        return len(result["failed"])
    raise ConfigError(f"mode={run.mode} is not implemented yet")


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _record_failure(e: BaseException) -> None:
    """status.json + traceback.txt in this job's own directory (never anywhere else)."""
    d = run_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / "traceback.txt").write_text(traceback.format_exc())
    (d / "status.json").write_text(json.dumps({"status": "failed", "error": f"{type(e).__name__}: {e}"}))


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
    try:
        return dispatch(cfg)
    except Exception as e:
        if _is_multirun():  # record the failure and let the sweep go on; the report exits non-zero
            _record_failure(e)
            log.error("job failed: %s: %s (traceback in %s)", type(e).__name__, e, run_dir() / "traceback.txt")
            return None
        if isinstance(e, ConfigError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        _record_failure(e)
        raise
    finally:
        try:
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=1)
        except ImportError:
            pass
        _release_memory()


def main() -> None:
    _main()


if __name__ == "__main__":
    main()

"""One run, top to bottom: plan -> load -> LoRA -> data -> train -> evaluate -> save -> summary."""
from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path

import torch

from harness import modeling
from harness.collator import ChatCollator
from harness.config import RunConfig
from harness.data import build_datasets
from harness.errors import RunDiverged, StageFailed, UserError
from harness.lora import apply_lora, setup_full_finetuning
from harness.registry import get_architecture
from harness.run_files import is_main_process, write_json
from harness.targets import TargetPlan, resolve_targets

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def make_plan(run: RunConfig, model=None) -> TargetPlan:
    """Resolve LoRA targets on the meta device (or on `model` when given): the module tree of the checkpoint
    being trained (its own config.json) when model.name_or_path names one, else of model.config."""
    arch = get_architecture(run.model.arch)
    notes: list[str] = []
    tree = model if model is not None else modeling.build_meta_model(run.model, notes)
    plan = resolve_targets(tree, arch, run.lora, run.model.name, run.model.modules_to_save)
    plan.warnings += notes
    return plan


def host_rss_gib() -> float | None:
    """Current resident memory of this process (Linux), to see growth across in-process sweep jobs."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        return None


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "GPU allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host max RSS"


def prepare(run: RunConfig):
    """Device, dtype, processor and plan: everything before a weight is loaded (plan errors surface here)."""
    device = modeling.resolve_device(run.device)
    dtype = modeling.resolve_dtype(run.quant.dtype, device)
    processor = modeling.load_processor_for(run.model)
    plan = None if run.train.full_finetuning else make_plan(run)
    return device, dtype, processor, plan


def load(run: RunConfig, device, processor, plan):
    """The model with LoRA on the plan's modules (or every weight trainable for full fine-tuning)."""
    model = modeling.load_model(run.model, run.quant, device, processor, seed=run.seed)
    if plan is None:
        return setup_full_finetuning(model)
    return apply_lora(model, plan, run.lora, run.seed, quantized=run.quant.mode != "none")


def build(run: RunConfig):
    """Processor, plan, model with LoRA; errors in the plan surface before any weight is loaded."""
    device, dtype, processor, plan = prepare(run)
    return device, dtype, processor, plan, load(run, device, processor, plan)


def accelerate(run: RunConfig, model) -> dict:
    """Swap in the Triton kernels where eligible (kernels.enabled: auto = on CUDA only)."""
    if run.kernels.enabled == "false":
        return {}
    from harness.kernels import accelerate_model

    from harness.checkpointing import checkpointing_mode

    k = run.kernels
    # the trainer leaves the loss to the model (harness.train.trainer_class): the fused linear cross-entropy
    # computes it without the full logits (vocab 151,936 x 4,096 tokens in fp32: 2.3 GiB)
    cfg = dict(enabled={"auto": "auto", "true": True}[k.enabled], lora=k.lora, rms_norm=k.rms_norm, rope=k.rope,
               swiglu=k.swiglu, cross_entropy=k.cross_entropy, compile=k.compile != "false",
               compile_mode=k.compile_mode, combo_kernels=k.combo_kernels, lora_op=k.lora_op,
               lora_paths=k.lora_paths,
               # tiling saves memory by recomputing the MLP in backward: free under checkpointing (the
               # recompute skips it), a cost without
               tiled_mlp=k.tiled_mlp and checkpointing_mode(run.train.gradient_checkpointing,
                                                                 modeling.resolve_device(run.device)) != "false")
    report = {name: len(mods) for name, mods in accelerate_model(model, cfg).items() if mods}
    if k.host_prep:
        from harness import host_prep

        if host_prep.install(model) is not None:
            report["host_prep"] = 1
    return report


def train_run(run: RunConfig, config_dict: dict, run_dir: Path) -> dict:
    from harness import wandb_logger
    from harness.provenance import environment
    from harness.summary import format_summary
    from harness.train import train

    t0 = time.perf_counter()
    rss_start = host_rss_gib()  # in a sweep: what earlier jobs of this process left behind
    main = is_main_process()  # under torchrun only rank 0 writes, logs and evaluates
    check_writable(run_dir)  # before anything is built: a run must not fail after training for this
    seed_everything(run.seed)
    if main:
        write_json(run_dir / "env.json", environment(REPO))
    device, dtype, processor, plan = prepare(run)
    collator = ChatCollator(processor, run.data.train_on_responses_only, run.data.max_length)
    # every sample measured before a weight is loaded (data.on_too_long), images present for a VLM
    # (harness/data/lengths.py)
    from harness.data.lengths import check_data

    train_samples, eval_samples = data = check_data(build_datasets(run.data, run.seed), collator, run.data)
    model = load(run, device, processor, plan)
    if plan is not None and main:
        plan.save(run_dir / "plan.json")
        print(plan.format())
    trainable, total = modeling.count_params(model)
    if plan is not None and trainable != plan.trainable_params:
        log.warning("trainable params %d differ from the plan's %d", trainable, plan.trainable_params)
    accelerated = accelerate(run, model)
    collator = fast_path_collator(collator, model, accelerated)
    tags = [run.model.name, run.lora.strategy, f"quant={run.quant.mode}"]
    wb = wandb_logger.start(run.logger, run_dir, config_dict, name=run_dir.name, tags=tags) if main else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.config.use_cache = False  # training mode: no KV cache, right padding
    known = dict(run=run, plan=plan, data=data, trainable=trainable, total=total, accelerated=accelerated,
                 device=device, dtype=dtype, model=model, t0=t0, rss_start=rss_start, run_dir=run_dir)
    try:
        res = train(run, model, processor, collator, train_samples, run_dir, device, dtype, wb)
    except RunDiverged as e:
        if main:
            finish_diverged(e, _train_metrics(res=e.result, **known), run, model, processor, plan, run_dir, wb)
        raise
    if not main:
        return {"status": "ok", "rank": int(os.environ.get("RANK", 0)), "losses": res.losses}

    metrics = _train_metrics(res=res, **known)
    # each stage after training: a failure writes metrics.json (status failed, the stage) and raises StageFailed
    stage = StageRunner(metrics, run_dir, wb)
    metrics.update(stage("evaluate", _evaluate, run, model, collator, eval_samples, device, dtype, accelerated))
    save_outputs(stage, run, model, processor, plan, run_dir, device, dtype, wb)
    peak, peak_kind = peak_memory(device)
    metrics.update(peak_memory_gib=peak, peak_memory_kind=peak_kind, wall_s=time.perf_counter() - t0)
    from harness.report import plot_run

    plot = stage("plot", plot_run, metrics, run_dir)
    metrics["plot"] = str(plot) if plot else None
    write_json(run_dir / "metrics.json", metrics)
    wandb_logger.finish(wb, {f"final/{k}": v for k, v in metrics.items()})
    print(format_summary(metrics))
    return metrics


def fast_path_collator(collator, model, accelerated: dict):
    """What the accelerated model reads from the host: Qwen2-VL family positions and slots (harness/host_prep.py),
    else the fused loss's labelled rows (harness/loss_rows.py); the plain collator without either."""
    if accelerated.get("host_prep"):
        from harness import host_prep

        return host_prep.PreparingCollator(collator, host_prep.installed_spec(model))
    if accelerated.get("cross_entropy"):
        from harness.loss_rows import LossRowsCollator

        return LossRowsCollator(collator)
    return collator


def save_outputs(stage: "StageRunner", run: RunConfig, model, processor, plan, run_dir: Path, device, dtype, wb):
    """The adapter (full fine-tuning: the model), the merged checkpoint, the W&B artifact, the hub push: each a
    stage (a failure keeps what the earlier ones wrote)."""
    from harness import wandb_logger

    saved = None
    if run.save.adapter:
        saved = stage("save_adapter", save_adapter, model, processor, plan, run_dir)
    stage.metrics["adapter_dir"] = str(saved) if saved else None
    if run.save.merged and plan is not None:
        from harness.export import save_merged

        merged_dtype = dtype if run.save.merged_dtype == "auto" else modeling.resolve_dtype(run.save.merged_dtype,
                                                                                             device)
        stage("merged_export", save_merged, model, processor, run_dir / "merged", merged_dtype)
    if run.logger.log_adapter and saved is not None:
        stage("wandb_artifact", wandb_logger.log_adapter, wb, saved,
              f"{run.model.name}-{run.lora.strategy}-{run_dir.name}")
    if run.save.push_to_hub and saved is not None:
        stage("push_to_hub", push_to_hub, saved, run.save.push_to_hub)


def _train_metrics(run: RunConfig, res, plan, data, trainable, total, accelerated, device, dtype, model, t0,
                   rss_start, run_dir: Path) -> dict:
    """What is known once training has ended (status ok; the stages after it add to it)."""
    from harness.checkpointing import graphs_summary

    losses, tokens, train_s = res.losses, res.tokens, res.train_s
    peak, peak_kind = peak_memory(device)
    return dict(
        model=run.model.name, strategy=run.lora.strategy if plan is not None else "full_finetuning",
        quant=run.quant.mode, seed=run.seed, steps=res.steps or run.train.max_steps, losses=losses,
        loss_first=losses[0][1] if losses else None, loss_last=losses[-1][1] if losses else None,
        skipped_steps=res.skipped_steps,
        data_skipped=data.stats["skipped"], data_skip_reasons=data.stats["reasons"],
        **{f"data_{k}": data.stats.get(k) for k in ("too_long", "train_with_images", "train_without_images")},
        trainable_params=trainable, total_params=total,
        trainable_by_component=plan.per_component() if plan is not None else None,
        train_tokens=tokens, tokens_per_s=tokens / train_s if train_s else None,
        peak_memory_gib=peak, peak_memory_kind=peak_kind, accelerated=accelerated,
        # what `auto` settings became on this device (the saved config keeps `auto`)
        **_resolved(run, device),

        cuda_graphs=graphs_summary(model),
        train_s=train_s, wall_s=time.perf_counter() - t0, run_dir=str(run_dir),
        host_rss_start_gib=rss_start, device=str(device), dtype=str(dtype).replace("torch.", ""),
        world_size=int(os.environ.get("WORLD_SIZE", 1)), status="ok",
    )


def _evaluate(run: RunConfig, model, collator, eval_samples, device, dtype, accelerated) -> dict:
    """Exact match / CER by generation on the held-out split."""
    from harness.evaluate import evaluate

    t_eval = time.perf_counter()
    if accelerated.get("compiled_layers"):
        from harness.kernels.compiled import uncompile_layers

        uncompile_layers(model)  # generation: growing KV cache, one token at a time: eager is the better fit
    result = evaluate(model, collator, eval_samples, run.train.eval_batch_size, run.train.max_new_tokens, device,
                      dtype)
    return dict(eval_exact_match=result["exact_match"], n_eval=result["n_eval"], eval_examples=result["examples"],
                eval_cer=result["cer"], eval_s=time.perf_counter() - t_eval)


def save_adapter(model, processor, plan, run_dir: Path) -> Path:
    """LoRA: <run dir>/adapter; full fine-tuning: <run dir>/model (weights + processor)."""
    return write_model(model, processor, run_dir / ("adapter" if plan is not None else "model"))


def write_model(model, processor, folder: Path) -> Path:
    """The model's own save (a PEFT model: the adapter) as safetensors, with the processor beside it."""
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


class StageRunner:
    """Runs the stages after training. A failing stage writes metrics.json with status failed, the stage, the
    error and every metric known so far, closes W&B and raises StageFailed; what earlier stages wrote (the
    adapter before a failing merged export) stays on disk."""

    def __init__(self, metrics: dict, run_dir: Path, wb):
        self.metrics, self.run_dir, self.wb = metrics, run_dir, wb

    def __call__(self, name: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            self.metrics.update(status="failed", failed_stage=name, error=f"{type(e).__name__}: {e}")
            write_json(self.run_dir / "metrics.json", self.metrics)
            _finish_wandb(self.wb, self.metrics)
            raise StageFailed(name, e) from e


def finish_diverged(e: RunDiverged, metrics: dict, run: RunConfig, model, processor, plan, run_dir: Path, wb):
    """metrics.json with status diverged; the adapter only from the restored last finite checkpoint."""
    saved = None
    if run.save.adapter and e.restored_from is not None:
        saved = save_adapter(model, processor, plan, run_dir)
    metrics.update(status="diverged", diverged_at_step=e.step, error=str(e), adapter_dir=str(saved) if saved else None,
                   restored_from=str(e.restored_from) if e.restored_from is not None else None)
    write_json(run_dir / "metrics.json", metrics)
    _finish_wandb(wb, metrics)


def _finish_wandb(wb, metrics: dict) -> None:
    """Close the W&B run of a run that did not end ok; a W&B error here must not hide the run's own error."""
    from harness import wandb_logger

    try:
        wandb_logger.finish(wb, {f"final/{k}": v for k, v in metrics.items() if k != "eval_examples"})
    except Exception as e:  # noqa: BLE001 - best effort, the run already failed
        log.warning("closing the W&B run failed: %s", e)


def check_writable(run_dir: Path) -> None:
    """Fail before any model is built if the run directory cannot be created or written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run directory {run_dir} is not writable ({type(e).__name__}: {e.strerror or e}); fix: "
                        "set hydra.run.dir (hydra.sweep.dir for --multirun) to a writable folder") from e


def _resolved(run: RunConfig, device: torch.device) -> dict:
    from harness.checkpointing import checkpointing_mode
    from harness.train import resolve_optim

    return {"resolved": dict(optim=resolve_optim(run.train.optim, device),
                             gradient_checkpointing=checkpointing_mode(run.train.gradient_checkpointing, device))}


def push_to_hub(folder: Path, repo_id: str, token: str | None = None, private: bool = True,
                commit_message: str | None = None) -> None:
    """Upload a saved folder to `repo_id` (created if missing); the token (given, else from the environment) is
    passed to HfApi, never stored."""
    from huggingface_hub import HfApi

    from harness.secrets import hub_token

    api = HfApi(token=token or hub_token())
    api.create_repo(repo_id, exist_ok=True, private=private)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    print(f"pushed {folder} to https://huggingface.co/{repo_id}")


def plan_run(run: RunConfig) -> TargetPlan:
    plan = make_plan(run)
    print(plan.format())
    for w in plan.warnings:
        print(f"warning: {w}")
    return plan

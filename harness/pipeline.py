"""One run, top to bottom: plan -> load -> LoRA -> data -> train -> evaluate -> save -> summary."""
from __future__ import annotations

import json
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
from harness.lora import apply_lora, setup_full_finetuning
from harness.registry import get_architecture
from harness.targets import TargetPlan, resolve_targets

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def make_plan(run: RunConfig, model=None) -> TargetPlan:
    """Resolve LoRA targets on the meta device (or on `model` when given)."""
    arch = get_architecture(run.model.arch)
    tree = model if model is not None else modeling.build_meta_model(run.model)
    return resolve_targets(tree, arch, run.lora, run.model.name, run.model.modules_to_save)


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


def build(run: RunConfig):
    """Processor, plan, model with LoRA; errors in the plan surface before any weight is loaded."""
    device = modeling.resolve_device(run.device)
    dtype = modeling.resolve_dtype(run.quant.dtype, device)
    processor = modeling.load_processor_for(run.model)
    plan = None if run.train.full_finetuning else make_plan(run)
    model = modeling.load_model(run.model, run.quant, device, processor, seed=run.seed)
    if plan is None:
        model = setup_full_finetuning(model)
    else:
        model = apply_lora(model, plan, run.lora, run.seed, quantized=run.quant.mode != "none")
    return device, dtype, processor, plan, model


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
    from harness.checkpointing import graphs_summary
    from harness.evaluate import evaluate
    from harness.provenance import environment
    from harness.summary import format_summary
    from harness.train import train

    t0 = time.perf_counter()
    rss_start = host_rss_gib()  # in a sweep: what earlier jobs of this process left behind
    main = is_main_process()  # under torchrun only rank 0 writes, logs and evaluates
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(run.seed)
    if main:
        (run_dir / "env.json").write_text(json.dumps(environment(REPO), indent=1))
    train_samples, eval_samples = data = build_datasets(run.data, run.seed)
    device, dtype, processor, plan, model = build(run)
    if plan is not None and main:
        plan.save(run_dir / "plan.json")
        print(plan.format())
    trainable, total = modeling.count_params(model)
    if plan is not None and trainable != plan.trainable_params:
        log.warning("trainable params %d differ from the plan's %d", trainable, plan.trainable_params)
    accelerated = accelerate(run, model)
    collator = ChatCollator(processor, run.data.train_on_responses_only, run.data.max_length)
    if accelerated.get("host_prep"):
        from harness import host_prep

        collator = host_prep.PreparingCollator(collator, host_prep.installed_spec(model))
    elif accelerated.get("cross_entropy"):  # the fused loss's labelled rows from the host (harness/loss_rows.py)
        from harness.loss_rows import LossRowsCollator

        collator = LossRowsCollator(collator)

    tags = [run.model.name, run.lora.strategy, f"quant={run.quant.mode}"]
    wb = wandb_logger.start(run.logger, run_dir, config_dict, name=run_dir.name, tags=tags) if main else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.config.use_cache = False  # training mode: no KV cache, right padding
    losses, tokens, train_s = train(run, model, processor, collator, train_samples, run_dir, device, dtype, wb)
    if not main:
        return {"status": "ok", "rank": int(os.environ.get("RANK", 0)), "losses": losses}

    t_eval = time.perf_counter()
    if accelerated.get("compiled_layers"):
        from harness.kernels.compiled import uncompile_layers

        uncompile_layers(model)  # generation: growing KV cache, one token at a time: eager is the better fit
    result = evaluate(model, collator, eval_samples, run.train.eval_batch_size, run.train.max_new_tokens, device,
                      dtype)
    eval_s = time.perf_counter() - t_eval

    saved = None
    if run.save.adapter:  # LoRA: the adapter; full fine-tuning: the whole model
        saved = run_dir / ("adapter" if plan is not None else "model")
        model.save_pretrained(saved, safe_serialization=True)
        processor.save_pretrained(saved)
    if run.save.merged and plan is not None:
        from harness.export import save_merged

        merged_dtype = dtype if run.save.merged_dtype == "auto" else modeling.resolve_dtype(run.save.merged_dtype,
                                                                                             device)
        save_merged(model, processor, run_dir / "merged", merged_dtype)
    if run.logger.log_adapter and saved is not None:
        wandb_logger.log_adapter(wb, saved, f"{run.model.name}-{run.lora.strategy}-{run_dir.name}")
    if run.save.push_to_hub and saved is not None:
        push_to_hub(saved, run.save.push_to_hub)
    peak, peak_kind = peak_memory(device)
    metrics = dict(
        model=run.model.name, strategy=run.lora.strategy if plan is not None else "full_finetuning",
        quant=run.quant.mode, seed=run.seed, steps=run.train.max_steps, losses=losses,
        loss_first=losses[0][1] if losses else None, loss_last=losses[-1][1] if losses else None,
        eval_exact_match=result["exact_match"], n_eval=result["n_eval"], eval_examples=result["examples"],
        eval_cer=result["cer"], data_skipped=data.stats["skipped"], data_skip_reasons=data.stats["reasons"],
        trainable_params=trainable, total_params=total,
        trainable_by_component=plan.per_component() if plan is not None else None,
        train_tokens=tokens, tokens_per_s=tokens / train_s if train_s else None,
        peak_memory_gib=peak, peak_memory_kind=peak_kind, accelerated=accelerated,
        # what `auto` settings became on this device (the saved config keeps `auto`)
        **_resolved(run, device),

        cuda_graphs=graphs_summary(model),
        train_s=train_s, eval_s=eval_s, wall_s=time.perf_counter() - t0, run_dir=str(run_dir),
        host_rss_start_gib=rss_start, device=str(device), dtype=str(dtype).replace("torch.", ""),
        world_size=int(os.environ.get("WORLD_SIZE", 1)), status="ok",
    )
    from harness.report import plot_run

    plot = plot_run(metrics, run_dir)
    metrics["plot"] = str(plot) if plot else None
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    wandb_logger.finish(wb, {f"final/{k}": v for k, v in metrics.items()})
    print(format_summary(metrics))
    return metrics


def _resolved(run: RunConfig, device: torch.device) -> dict:
    from harness.checkpointing import checkpointing_mode
    from harness.train import resolve_optim

    return {"resolved": dict(optim=resolve_optim(run.train.optim, device),
                             gradient_checkpointing=checkpointing_mode(run.train.gradient_checkpointing, device))}


def push_to_hub(folder: Path, repo_id: str) -> None:
    """Upload a saved folder; the token comes from the environment and is passed, never stored."""
    from huggingface_hub import HfApi

    from harness.secrets import hub_token

    api = HfApi(token=hub_token())
    api.create_repo(repo_id, exist_ok=True, private=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder))
    print(f"pushed {folder} to https://huggingface.co/{repo_id}")


def plan_run(run: RunConfig) -> TargetPlan:
    plan = make_plan(run)
    print(plan.format())
    for w in plan.warnings:
        print(f"warning: {w}")
    return plan

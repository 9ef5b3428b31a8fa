"""Training with TRL's SFTTrainer: SFTConfig from conf/train, our collator, metrics callback."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import TrainerCallback

from harness.checkpointing import enable_checkpointing
from harness.layer_graphs import graphs_wanted
from harness.config import RunConfig
from harness.errors import RunDiverged

log = logging.getLogger(__name__)


def index_dataset(n: int):
    """A datasets.Dataset of sample indices: samples (with PIL images) stay in memory, undecoded."""
    import datasets

    return datasets.Dataset.from_dict({"index": list(range(n))})


class IndexedCollator:
    """Maps a batch of {"index": i} rows to the samples and hands them to the chat collator."""

    def __init__(self, collator, samples: list[dict]):
        self.collator, self.samples = collator, samples

    def __call__(self, rows: list[dict]) -> dict:
        return self.collator([self.samples[r["index"]] for r in rows])


class MetricsCallback(TrainerCallback):
    """Times training and forwards the trainer's logs to W&B (if a run is active)."""

    def __init__(self, wandb_run=None):
        self.wandb_run = wandb_run
        self.t0 = None
        self.train_seconds = 0.0

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_train_end(self, args, state, control, **kw):
        self.train_seconds = time.perf_counter() - self.t0

    def on_log(self, args, state, control, logs=None, **kw):
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in (logs or {}).items() if isinstance(v, (int, float))},
                               step=state.global_step)


MAX_SKIPPED_IN_A_ROW = 5  # train.on_nonfinite=skip_step: this many skipped optimizer steps in a row = diverged


class NonFiniteGuard(TrainerCallback):
    """train.on_nonfinite: what a non-finite loss or gradient norm does to the run.

    Where it is detected: in ``on_log``, from the loss and grad norm the Trainer has already read on the host at
    each logging step, so the granularity is ``train.logging_steps`` and no host sync is added per step. Before a
    checkpoint is written (``on_step_end`` at save steps only) the trainable weights are checked for NaN / inf (one
    device read per save): a non-finite checkpoint is never written, so the save_total_limit rotation cannot delete
    the last finite one. Either finding stops the run and sets ``diverged_at``.

    stop: the run stops at that logging (or save) step; ``train`` then restores the last finite checkpoint.
    skip_step: before every optimizer step the gradients are zeroed on the device when their norm is not finite
    (no host sync; with Adam the step still applies the decayed momentum, the gradient itself is dropped). Skipped
    steps are counted on the device and read at logging steps; MAX_SKIPPED_IN_A_ROW in a row stop the run as
    diverged. The logged loss of a window holding a skipped step is NaN (and not a reason to stop); the Trainer's
    running loss sum is cleared of it after that log, else every later logged loss would stay NaN.
    """

    def __init__(self, mode: str):
        self.mode = mode
        self.diverged_at: int | None = None
        self.reason = ""
        self.params: list[torch.Tensor] = []
        self.skipped = self.in_a_row = self.max_in_a_row = None  # device counters (skip_step)
        self.skipped_total = 0
        self.trainer = None  # set by train(): skip_step clears the NaN out of its running loss sum

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if self.mode != "skip_step":
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        ok = torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads)]).sum())
        for g in grads:  # NaN * 0 is NaN: clear non-finite entries first, then zero all of them unless ok
            g.nan_to_num_(0.0, 0.0, 0.0).mul_(ok)
        bad = (~ok).long()
        if self.skipped is None:
            self.skipped, self.in_a_row, self.max_in_a_row = (torch.zeros((), dtype=torch.long, device=ok.device)
                                                              for _ in range(3))
        self.skipped += bad
        self.in_a_row.add_(1).mul_(bad)
        torch.maximum(self.max_in_a_row, self.in_a_row, out=self.max_in_a_row)

    def on_step_end(self, args, state, control, **kw):
        if control.should_save and not weights_finite(self.params):
            control.should_save = False  # never a NaN checkpoint: the rotation would delete the last good one
            self._stop(state, control, "non-finite weights before a checkpoint")

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if self.mode == "skip_step":
            loss_sum = getattr(self.trainer, "_tr_loss", None)  # reset after each log by `-= itself`: NaN stays
            if torch.is_tensor(loss_sum):
                loss_sum.nan_to_num_(0.0, 0.0, 0.0)
            if self.skipped is not None:
                self.skipped_total, worst = int(self.skipped), int(self.max_in_a_row)
                self.max_in_a_row.copy_(self.in_a_row)
                if worst >= MAX_SKIPPED_IN_A_ROW:
                    self._stop(state, control, f"{worst} optimizer steps in a row skipped (non-finite gradients)")
            return
        bad = {k: logs[k] for k in ("loss", "grad_norm") if isinstance(logs.get(k), float)
               and not math.isfinite(logs[k])}
        if bad:
            self._stop(state, control, "non-finite " + ", ".join(f"{k}={v}" for k, v in bad.items()))

    def _stop(self, state, control, reason: str) -> None:
        if self.diverged_at is None:
            self.diverged_at, self.reason = state.global_step, reason
            log.error("training diverged at step %d: %s", state.global_step, reason)
        control.should_training_stop = True
        control.should_save = False


def weights_finite(params) -> bool:
    """Whether every tensor in `params` is free of NaN / inf (one host read)."""
    return not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def trainer_class():
    """TRL's SFTTrainer with the loss left to the model.

    TRL (>= 1.x) patches the model's forward with its own chunked LM head and computes the loss, entropy and
    token accuracy from it in ``compute_loss``. On a GPU that costs about five host syncs per step (the labelled
    rows picked with a boolean mask, ``.item()`` on entropy, accuracy, the label count and the token count), which
    stall the host-runs-ahead pipeline that the CUDA graphs and ``harness.host_prep`` build (removing the
    forward's device reads gained 7% on the anchor workload), and it bypasses ``harness.kernels``' fused linear
    cross-entropy. Here the
    model's own forward computes the loss (transformers' loss, or the fused kernel when ``kernels`` swapped it
    in), reduced over ``num_items_in_batch`` like ``transformers.Trainer.compute_loss``; TRL's patch of the
    forward is undone after TRL has set up. The logs keep loss, grad norm, learning rate and the mean token
    accuracy (:class:`TokenAccuracy`, read only when logging); TRL's entropy and token count are not computed."""
    from transformers import Trainer
    from trl import SFTTrainer

    class HarnessSFTTrainer(SFTTrainer):
        def __init__(self, *args, model, **kwargs):
            before = {id(m): m.__dict__.get("forward", _NONE) for m in model.modules()}
            super().__init__(*args, model=model, **kwargs)
            self.restored_forwards = 0
            for m in model.modules():
                was, now = before.get(id(m), _NONE), m.__dict__.get("forward", _NONE)
                if now is not was and _from_trl(now):  # TRL's fused LM head, nothing else (e.g. accelerate's)
                    if was is _NONE:
                        del m.__dict__["forward"]
                    else:
                        m.__dict__["forward"] = was
                    self.restored_forwards += 1

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {**inputs, "use_cache": False}
            loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if model.training:
                self.accuracy.add(model, inputs, outputs)
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, start_time=None):
            if "loss" in logs:  # a training log: the token accuracy since the last one (read here only)
                acc = self.accuracy.read()
                if acc is not None:
                    logs["mean_token_accuracy"] = acc
            super().log(logs, start_time)

        @property
        def accuracy(self):
            if "_accuracy" not in self.__dict__:
                self._accuracy = TokenAccuracy()
            return self._accuracy

    return HarnessSFTTrainer


_NONE = object()


class TokenAccuracy:
    """Share of labelled tokens whose label is the model's top-1 prediction, summed on the device step by step
    and read on the host only when the trainer logs (TRL's own metric reads it back every step). From the
    fused loss's counts (harness.kernels) when it ran, else from the logits the model returned."""

    def __init__(self):
        self.hits = self.n_dev = None
        self.n_host = 0
        self._lm = _NONE

    def add(self, model, inputs, outputs) -> None:
        from harness.kernels.patch import TOP1_STATS, _find_lm_model

        if self._lm is _NONE:
            self._lm = _find_lm_model(model)[1]
        stats = self._lm.__dict__.pop(TOP1_STATS, None) if self._lm is not None else None
        if stats is not None:
            hits, n = stats
        else:
            logits, labels = getattr(outputs, "logits", None), inputs.get("labels")
            if logits is None or labels is None or logits.dim() != 3 or logits.shape[:2] != labels.shape:
                return
            with torch.no_grad():
                lab = labels[:, 1:]
                mask = lab != -100
                hits = ((logits[:, :-1].argmax(-1) == lab) & mask).sum().float()
                n = mask.sum()
        self.hits = hits if self.hits is None else self.hits + hits
        if torch.is_tensor(n):
            self.n_dev = n if self.n_dev is None else self.n_dev + n
        else:
            self.n_host += int(n)

    def read(self) -> float | None:
        if self.hits is None:
            return None
        n = self.n_host + (int(self.n_dev) if self.n_dev is not None else 0)
        acc = round(float(self.hits) / max(n, 1), 4)
        self.hits = self.n_dev = None
        self.n_host = 0
        return acc


def _from_trl(forward) -> bool:
    """Whether ``forward`` (a bound method or function) is defined in the trl package."""
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    return code is not None and "trl" in Path(code.co_filename).parts


def resolve_optim(name: str, device: torch.device) -> str:
    """``train.optim=auto``: fused AdamW on CUDA (one kernel updates every LoRA weight; the foreach version
    launches several per weight group), plain AdamW elsewhere."""
    if name != "auto":
        return name
    return "adamw_torch_fused" if device.type == "cuda" else "adamw_torch"


def sft_config(run: RunConfig, output_dir: Path, device: torch.device, dtype: torch.dtype):
    from trl import SFTConfig

    t = run.train
    # checkpointing is ours (harness.checkpointing.enable_checkpointing, before the trainer exists): TRL's
    # SFTConfig turns it on by default, and the Trainer would then re-enable torch's checkpoint on every layer
    # at train() time, overriding `false` and replacing the offloaded function of `unsloth`.
    # transformers >= 5.2x renamed the argument (activation_checkpointing); older ones know only the old name.
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    no_trainer_checkpointing = {"activation_checkpointing" if "activation_checkpointing" in names
                                else "gradient_checkpointing": False}
    return SFTConfig(
        **no_trainer_checkpointing,
        output_dir=str(output_dir),
        max_steps=-1 if t.num_train_epochs else t.max_steps,  # -1: the Trainer counts steps from the epochs
        num_train_epochs=t.num_train_epochs or 1.0,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler_type,
        optim=resolve_optim(t.optim, device),
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=2,
        report_to=[],
        seed=run.seed,
        data_seed=run.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device.type == "cpu",
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        dataloader_num_workers=t.num_workers,
        dataloader_pin_memory=device.type == "cuda",
        max_length=None,
        disable_tqdm=False,
        # batches are pinned (DataLoader) and copied to the GPU without waiting: the host queues the step
        # instead of waiting for the previous one to drain
        accelerator_config={"non_blocking": device.type == "cuda"},
        # the NaN/inf filter reads the loss on the host every step (a sync); a non-finite loss is logged as it
        # is instead, and train() warns about it
        logging_nan_inf_filter=False,
    )


def newest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint-N directory with the largest N that holds a complete trainer state."""
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


class TrainResult(NamedTuple):
    losses: list  # [(step, loss)], the whole history (also before a resume)
    tokens: int  # tokens seen in this process
    train_s: float
    skipped_steps: int  # optimizer steps skipped by train.on_nonfinite=skip_step
    steps: int = 0  # optimizer steps taken in all (train.max_steps, or what train.num_train_epochs made of it)


def train(run: RunConfig, model, processor, collator, train_samples, run_dir: Path, device, dtype,
          wandb_run=None) -> TrainResult:
    """Train; return a TrainResult. On divergence (see NonFiniteGuard) the model holds the weights of the last
    finite checkpoint if there is one, and RunDiverged is raised carrying the result (`e.result`), the step
    (`e.step`) and the checkpoint restored (`e.restored_from`, None: the weights in memory are not usable)."""
    args = sft_config(run, run_dir / "checkpoints", device, dtype)
    cb = MetricsCallback(wandb_run)
    guard = NonFiniteGuard(run.train.on_nonfinite)
    k = run.kernels
    graphs = graphs_wanted(k.enabled != "false", k.cuda_graphs != "false", k.compile_mode)
    checkpointing = enable_checkpointing(model, run.train.gradient_checkpointing, device, graphs=graphs)
    log.info("gradient checkpointing: %s", checkpointing)
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    trainer = trainer_class()(model=model, args=args, train_dataset=index_dataset(len(train_samples)),
                              data_collator=IndexedCollator(collator, train_samples), processing_class=processor,
                              callbacks=[cb, guard])
    guard.trainer = trainer
    # TRL casts every trainable parameter of a quantized model to bf16; keep ours as set up
    # (LoRA as PEFT made it, modules_to_save in fp32).
    for n, p in model.named_parameters():
        if n in dtypes and p.dtype != dtypes[n]:
            p.data = p.data.to(dtypes[n])
    tokens_before = collator.tokens_seen
    resume = newest_checkpoint(run_dir / "checkpoints") if run.train.resume == "auto" else None
    if resume is not None:
        print(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # the whole history, also the part before a resume (restored from the checkpoint's trainer state)
    losses = [(h["step"], float(h["loss"])) for h in trainer.state.log_history if "loss" in h and "step" in h]
    if any(not math.isfinite(l) for _, l in losses):
        log.warning("non-finite loss during training: %s", [l for _, l in losses if not math.isfinite(l)][:3])
    result = TrainResult(losses, collator.tokens_seen - tokens_before, cb.train_seconds, guard.skipped_total,
                         trainer.state.global_step)
    if guard.diverged_at is not None:
        raise diverged(run, guard, result, restore_last_finite(trainer, guard.params, run_dir / "checkpoints"))
    return result


def restore_last_finite(trainer, params, folder: Path) -> Path | None:
    """Load the newest checkpoint into the model if its weights are finite; the checkpoint, or None."""
    ckpt = newest_checkpoint(folder)
    if ckpt is None:
        return None
    trainer._load_from_checkpoint(str(ckpt))
    return ckpt if weights_finite(params) else None


def diverged(run: RunConfig, guard: NonFiniteGuard, result: TrainResult, restored: Path | None) -> RunDiverged:
    kept = (f"the weights of {restored.name} are restored" if restored is not None
            else "no finite checkpoint to restore (set train.save_steps to keep one), no adapter is saved")
    return RunDiverged(f"training diverged at step {guard.diverged_at}: {guard.reason} "
                       f"(train.on_nonfinite={run.train.on_nonfinite}); {kept}. Fix: lower train.learning_rate "
                       f"(now {run.train.learning_rate:g}), add train.warmup_steps, or keep train.max_grad_norm > 0",
                       step=guard.diverged_at, restored_from=restored, result=result)

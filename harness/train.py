"""Training with TRL's SFTTrainer: SFTConfig from conf/train, our collator, metrics callback."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from harness.checkpointing import enable_checkpointing
from harness.layer_graphs import graphs_wanted
from harness.config import RunConfig

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
        max_steps=t.max_steps,
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


def train(run: RunConfig, model, processor, collator, train_samples, run_dir: Path, device, dtype, wandb_run=None):
    """Train; return (losses [(step, loss)], tokens seen, train seconds)."""
    args = sft_config(run, run_dir / "checkpoints", device, dtype)
    cb = MetricsCallback(wandb_run)
    k = run.kernels
    graphs = graphs_wanted(k.enabled != "false", k.cuda_graphs != "false", k.compile_mode)
    checkpointing = enable_checkpointing(model, run.train.gradient_checkpointing, device, graphs=graphs)
    log.info("gradient checkpointing: %s", checkpointing)
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    trainer = trainer_class()(model=model, args=args, train_dataset=index_dataset(len(train_samples)),
                              data_collator=IndexedCollator(collator, train_samples), processing_class=processor,
                              callbacks=[cb])
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
    return losses, collator.tokens_seen - tokens_before, cb.train_seconds

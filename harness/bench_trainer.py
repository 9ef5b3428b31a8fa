"""The bench workload through the training loop a `harness` run uses (``--trainer``).

`harness.bench`'s own loop calls ``model(**batch).loss``, ``backward()`` and a fused AdamW step, and reads the
loss back after every step. A `harness` training run instead drives TRL's SFTTrainer (harness.train): a
DataLoader with the collator (here: the bench's fixed batch, plus harness.host_prep's host-side inputs computed
afresh per step, as the real collator does), pinned non-blocking copies, gradient clipping, the fused AdamW of
``train.optim=auto``, the LR scheduler and the Trainer's bookkeeping. This runs the same model, batch and step
count through that loop, so the two rows of a table tell how much the Trainer costs.

Timing: no per-step synchronisation (the Trainer does none), so the row's step time is the mean over the timed
steps: the GPU is synchronised once after the warm-up steps and once after the last timed step. One more,
untimed, step follows, logged alone, so that ``loss_last`` is one step's loss like the loop's.

``--trainer --profile``: the first two timed steps also run under torch.profiler, and the report says where the
Trainer's step goes (GPU-busy fraction, kernel families, host time per operator, the collator's host time),
to set beside ``--profile``'s report of the bench loop.
"""
from __future__ import annotations

import tempfile
import time

import torch


class TimedCollator:
    """Wraps a collator and adds up the host seconds spent in it (the DataLoader calls it on the main process)."""

    def __init__(self, inner):
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def __call__(self, rows) -> dict:
        t = time.perf_counter()
        try:
            return self.inner(rows)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1


def print_profile(p, wall: float, steps: int, collator: TimedCollator) -> None:
    """The --trainer --profile report, in the bench loop's --profile terms (harness.bench)."""
    from torch.autograd import DeviceType

    from harness.bench import category_table, family_top, kernel_categories

    busy = sum(e.self_device_time_total for e in p.key_averages() if e.device_type == DeviceType.CUDA) / 1e6
    print(f"trainer: wall {wall:.3f}s for {steps} steps (profiled); GPU kernel time {busy:.3f}s ({busy / wall:.0%} busy)")
    print(f"trainer: collator {1e3 * collator.seconds / max(collator.calls, 1):.2f} ms host time per call "
          f"({collator.calls} calls)")
    kernels = [(e.key, e.count, e.self_device_time_total / 1e3) for e in p.key_averages()
               if e.device_type == DeviceType.CUDA]
    print(category_table(kernel_categories(kernels, steps=steps), wall_ms=wall * 1e3 / steps))
    print(family_top(kernels, steps=steps))
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    print(p.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=70))


class FixedBatch:
    """A collator that returns the same (CPU) batch for any rows: the bench's synthetic workload."""

    def __init__(self, batch: dict):
        self.batch = batch
        self.tokens_seen = 0

    def __call__(self, rows) -> dict:
        self.tokens_seen += int(self.batch["attention_mask"].sum())
        return dict(self.batch)


def _tokenizer():
    """TRL wants a processing class with eos and pad tokens; the batches are made already, so any will do."""
    from harness.processors import build_byte_tokenizer

    return build_byte_tokenizer({"eos": "<|eos|>", "pad": "<|pad|>", "extra": []}, "")


def run_trainer(a, build, make_batch, flops_per_step, matmul_rate) -> dict:
    """One bench row (same keys as ``harness.bench.run``) for a harness stack trained by harness.train's trainer."""
    from transformers import TrainerCallback
    from trl import SFTConfig

    from harness import host_prep
    from harness.train import IndexedCollator, index_dataset, resolve_optim, trainer_class

    torch.manual_seed(0)
    cuda = a.device == "cuda"
    device = torch.device(a.device)
    model, accelerated, ckpt = build(a)
    mem_load = torch.cuda.memory_allocated() if cuda else 0
    batch = make_batch(a, "cpu")
    if cuda and "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)  # as the loop's batch (and a processor's)
    collator = FixedBatch(batch)
    spec = host_prep.installed_spec(model)
    if spec is not None:
        collator = host_prep.PreparingCollator(collator, spec)
    elif accelerated.get("cross_entropy"):
        from harness.loss_rows import LossRowsCollator

        collator = LossRowsCollator(collator)
    collator = TimedCollator(collator)
    timed_from, timed_to = a.warmup, a.warmup + a.steps  # global steps after which the clock starts / stops
    profiled = 2 if getattr(a, "profile", False) else 0  # steps after timed_from run under torch.profiler

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class Clock(TrainerCallback):
        t0 = t1 = first = None
        start = None
        prof = prof_t0 = None

        def on_train_begin(self, args, state, control, **kw):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                sync()
                self.first = time.perf_counter() - self.start  # includes compilation and the first capture
            if state.global_step == timed_from:
                sync()
                self.t0 = time.perf_counter()
                if profiled:
                    from torch.profiler import ProfilerActivity, profile

                    collator.seconds, collator.calls = 0.0, 0
                    self.prof = profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda)
                    self.prof.__enter__()
                    self.prof_t0 = time.perf_counter()
            if self.prof is not None and state.global_step == timed_from + profiled:
                sync()
                t = time.perf_counter()
                self.prof.__exit__(None, None, None)
                print_profile(self.prof, t - self.prof_t0, profiled, collator)
                self.prof = None
                self.t0 += time.perf_counter() - t  # the report's own time stays out of the row's step time
            if state.global_step == timed_to:
                sync()
                self.t1 = time.perf_counter()
                control.should_log = True  # flush the running loss, so the extra step is logged alone
            if state.global_step == timed_to + 1:
                control.should_log = True

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, max_steps=timed_to + 1, per_device_train_batch_size=a.batch, learning_rate=2e-4,
            warmup_steps=0, lr_scheduler_type="constant", optim=resolve_optim("auto", device), max_grad_norm=1.0,
            logging_steps=10**9, logging_first_step=True, save_strategy="no", report_to=[], seed=0,
            bf16=cuda, use_cpu=not cuda, remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
            dataloader_pin_memory=cuda, accelerator_config={"non_blocking": cuda}, max_length=None,
            logging_nan_inf_filter=False, disable_tqdm=True,
            **{("activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__
                else "gradient_checkpointing"): False},
        )
        trainer = trainer_class()(model=model, args=args, train_dataset=index_dataset(a.batch * (timed_to + 1)),
                                  data_collator=IndexedCollator(collator, list(range(a.batch * (timed_to + 1)))),
                                  processing_class=_tokenizer(), callbacks=[clock])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    step_s = (clock.t1 - clock.t0) / a.steps
    rate = matmul_rate() if cuda else None
    return dict(stack=a.stack, loop="trainer", model=a.model, gc=ckpt, batch=a.batch, tokens=a.tokens, r=a.r,
                gpu=torch.cuda.get_device_name() if cuda else "cpu",
                median_step_s=round(step_s, 4), step_time="mean (no per-step sync)",
                first_step_s=round(clock.first, 2), tokens_per_s=round(a.batch * a.tokens / step_s),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                after_load_gib=round(mem_load / 2**30, 2) if cuda else None,
                trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                mfu=round(flops_per_step(a) / step_s / rate, 3) if rate else None,
                matmul_tflops=round(rate / 1e12) if rate else None,
                loss_first=round(losses[0], 3), loss_last=round(losses[-1], 3), accelerated=accelerated,
                optim=args.optim if isinstance(args.optim, str) else args.optim.value,
                **({"profiled_steps": profiled} if profiled else {}))  # their profiler overhead is in the step time

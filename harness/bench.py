"""`harness mode=bench`: training-step benchmark on the GPU, this harness vs HF+PEFT, one table, one run.

Workload (../shared/anchors/README.md): Qwen2-VL-2B's real architecture with random weights, LoRA r=16,
alpha=16, dropout 0 on every vision + language attention/MLP linear (324 modules; not the merger, not
lm_head), AdamW (fused), batch 4 x 1024 tokens, one 448x448 image per sample (1024 patches -> 256 merged
tokens, masked from the loss), 3 warm-up + 10 timed steps; MFU with the anchors' FLOP count and the
bf16 matmul rate measured in the same process.

Stacks (each in its own process):
  hf16        HF + PEFT, bf16, sdpa, standard non-reentrant checkpointing (the anchors' baseline)
  harness16   PEFT LoRA + harness.kernels: every decoder layer / vision block compiled (regional
              torch.compile, compiler-friendly LoRA, batched per-image vision attention), fused linear CE,
              offloaded ("unsloth") checkpointing; --no-compile: the eager Triton kernels instead
  harness4    the same on an nf4 (double-quant) base
  liger16 / liger4 / unsloth16 / unsloth4   the peers (harness/bench_peers.py; wheels from
              benchmarks/fetch_peer_wheels.sh): HF+PEFT+Liger-Kernel, Unsloth FastVisionModel
Options vary the workload: --batch --tokens --grid --r --gc (false|true|unsloth) --no-kernels.

    harness mode=bench                                   # conf/bench/anchor.yaml: every stack, then a table
    harness mode=bench bench.stacks=[hf16,harness16] bench.tokens=2048 bench.gc=unsloth
    python -m harness.bench --all [--out results.jsonl]  # the same without Hydra
    python -m harness.bench --stack harness16 --gc unsloth  # one stack, one JSON line
    python -m harness.bench --stack harness16 --profile     # top kernels, GPU-busy fraction
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from harness.bench_workload import ANCHOR_TARGETS as TARGETS  # noqa: F401  (re-exported)
from harness.bench_peers import SAVE_DIR
from harness.bench_workload import (baseline_checkpointing, load_nf4, load_workload, longest_fitting,  # noqa: F401
                                    qwen2_vl_2b_config, save_random_model)


def matmul_rate():
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn_like(x)
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        x @ y
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def build(a):
    wl = load_workload(a.model)
    if a.stack.startswith(("liger", "unsloth")):  # first: Unsloth must be imported before transformers/peft
        if wl.name != "anchor":
            raise ValueError(f"invalid config: bench.model={a.model} with stack {a.stack} (allowed: the peer "
                             "stacks run the anchor workload only)")
        from harness.bench_peers import build_peer

        return build_peer(a, qwen2_vl_2b_config, TARGETS, save_dir=SAVE_DIR)
    cls = wl.model_cls()
    dev = a.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    four = a.stack.endswith("4")
    if four:
        save_dir = SAVE_DIR if wl.name == "anchor" else f"/tmp/bench_{wl.name}"
        if not os.path.exists(os.path.join(save_dir, "config.json")):
            save_random_model(cls, wl.config_fn(), save_dir, dev, dtype)
        model = load_nf4(cls, save_dir, dev, dtype)
    else:
        model = wl.random_model(dev, dtype)
    model = wl.add_lora(model, a.r)
    model.config.use_cache = False
    accelerated = {}
    if a.stack.startswith("harness"):
        from harness.checkpointing import enable_checkpointing

        if not a.no_kernels:
            from harness.kernels import accelerate_model

            cfg = {"enabled": True, "compile": not a.no_compile, "compile_mode": a.compile_mode,
                   # the kernels config's default, unless --inductor combo_kernels=... chose
                   "combo_kernels": bool((getattr(a, "inductor", None) or {}).get("combo_kernels", True)),
                   "tiled_mlp": not getattr(a, "no_tiled_mlp", False) and a.gc != "false",
                   "lora_op": bool(getattr(a, "lora_op", True)),
                   # None: the paths as they are (the library default, or HARNESS_LORA_PATHS)
                   "lora_paths": getattr(a, "lora_paths", None)}
            accelerated = {k: len(v) for k, v in accelerate_model(model, cfg).items() if v}
            if not getattr(a, "no_host_prep", False):
                from harness import host_prep

                if host_prep.install(model) is not None:
                    accelerated["host_prep"] = 1
        from harness.layer_graphs import graphs_wanted

        graphs = graphs_wanted(not a.no_kernels, not a.no_graphs, a.compile_mode)
        ckpt = enable_checkpointing(model, a.gc, torch.device(dev), graphs=graphs)
    else:
        ckpt = baseline_checkpointing(model, a.gc)
    model.train()
    return model, accelerated, ckpt


def make_batch(a, device):
    return load_workload(a.model).make_batch(a, device)


class step_inputs:
    """What each step feeds the model: the fixed batch, plus, for a model with harness.host_prep installed,
    that batch's host-side inputs computed afresh for every step. ``prefetch()`` computes the next step's
    while the GPU works on this one (the loop calls it once the step's work is queued), as the collator does
    in a DataLoader; its host time is inside the timed step."""

    def __init__(self, a, model):
        from harness import host_prep
        from harness.kernels.patch import fused_loss_module

        self.prepare = host_prep.prepare
        self.data = make_batch(a, a.device)
        self.spec = host_prep.installed_spec(model)
        # other models with the fused loss: its labelled rows from the host (harness/loss_rows.py), as the
        # training collator gives them
        self.rows = self.spec is None and fused_loss_module(model) is not None
        keys = ("input_ids", "attention_mask", "image_grid_thw", "labels")
        self.cpu = ({k: v for k, v in make_batch(a, "cpu").items() if k in keys}
                    if self.spec or self.rows else None)
        self.next = None
        self.prefetch()

    def prefetch(self) -> None:
        if self.spec is not None:
            self.next = {**self.data, "host_prep": self.prepare(self.cpu, self.spec)}
        elif self.rows:
            from harness.loss_rows import LossRows

            self.next = {**self.data, "loss_rows": LossRows.of(self.cpu["labels"])}

    def __call__(self) -> dict:
        return self.next if self.next is not None else self.data


def flops_per_step(a):
    return load_workload(a.model).flops_fn(a)


def _step(model, opt, data):
    loss = model(**data).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def run(a):
    torch.manual_seed(0)
    cuda = a.device == "cuda"
    model, accelerated, ckpt = build(a)
    mem_load = torch.cuda.memory_allocated() if cuda else 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=cuda)
    inputs = step_inputs(a, model)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    from harness.memtrace import StepMemory

    mem = StepMemory(a.device)
    times, losses, first = [], [], None
    for i in range(a.warmup + a.steps):
        trace = getattr(a, "mem_trace", False) and cuda and i == a.warmup
        if trace:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        _sync(a.device)
        mem.begin()
        t = time.perf_counter()
        loss = _step(model, opt, inputs())
        inputs.prefetch()
        _sync(a.device)
        mem.end()
        losses.append(loss.item())
        if i == 0:
            first = time.perf_counter() - t  # includes compilation when layers are compiled
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
        if trace:
            from harness.memtrace import format_breakdown, peak_breakdown

            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            print(format_breakdown(peak_breakdown(snap)), file=sys.stderr, flush=True)
    med = statistics.median(times)
    rate = matmul_rate() if cuda else None
    row = dict(stack=a.stack, model=a.model, gc=ckpt, batch=a.batch, tokens=a.tokens, r=a.r,
               gpu=torch.cuda.get_device_name() if cuda else "cpu",
               median_step_s=round(med, 4), first_step_s=round(first, 2), tokens_per_s=round(a.batch * a.tokens / med),
               peak_gib=None,
               peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
               after_load_gib=round(mem_load / 2**30, 2) if cuda else None,
               trainable=sum(p.numel() for p in params),
               mfu=round(flops_per_step(a) / med / rate, 3) if rate else None,
               matmul_tflops=round(rate / 1e12) if rate else None, loss_first=round(losses[0], 3),
               loss_last=round(losses[-1], 3), accelerated=accelerated)
    row.update(mem.summary(timed_from=a.warmup))  # peak_gib, activation_peak_gib, graph_pool_gib
    from harness.checkpointing import graphs_summary

    graphs = graphs_summary(model)
    if graphs is not None:
        row["cuda_graphs"] = graphs
    return row


def run_trainer(a) -> dict:
    if not a.stack.startswith("harness"):
        raise ValueError(f"invalid config: --trainer with stack {a.stack} (allowed: harness16, harness4; the peers "
                         "run the bench's loop)")
    from harness.bench_trainer import run_trainer as through_trainer

    return through_trainer(a, build, make_batch, flops_per_step, matmul_rate)


def cap_memory(gib: float, device: str) -> float | None:
    """Limit this process's CUDA caching allocator to ``gib`` GiB (an out-of-memory error past it, as on a
    smaller card); the fraction set, or None when uncapped or not on CUDA."""
    if not gib or device != "cuda" or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    frac = min(1.0, gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(frac)
    return frac


def longest(a):
    """The longest sequence (batch 1, one image for VLMs) that trains one step without running out of
    GPU memory: doubling from --tokens, then bisection to --granularity tokens, all in this process."""
    import gc

    model, accelerated, ckpt = build(a)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=a.device == "cuda")
    tried, peaks = {}, {}

    def fits(n):
        b = argparse.Namespace(**{**vars(a), "batch": 1, "tokens": n})
        if a.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            _step(model, opt, step_inputs(b, model)())
            _sync(a.device)
            ok = True
            if a.device == "cuda":
                peaks[n] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except torch.OutOfMemoryError:
            ok = False
        opt.zero_grad(set_to_none=True)
        gc.collect()
        if a.device == "cuda":
            torch.cuda.empty_cache()
        tried[n] = ok
        peak = f" (peak {peaks[n]:.2f} GiB)" if n in peaks else ""
        print(f"  {a.stack} {n} tokens: {'fits' if ok else 'out of memory'}{peak}", file=sys.stderr, flush=True)
        return ok

    best = longest_fitting(fits, a.tokens, a.max_tokens, a.granularity)
    return dict(stack=a.stack, model=a.model, gc=ckpt, longest_tokens=best, cap=a.max_tokens,
                granularity=a.granularity, memory_gib=a.memory_gib or None, tried=dict(sorted(tried.items())),
                peak_gib=peaks.get(best),  # the step's peak at the longest length (CUDA only)
                gpu=torch.cuda.get_device_name() if a.device == "cuda" else "cpu")


def profile(a):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    model, _, _ = build(a)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    inputs = step_inputs(a, model)

    def step():
        _step(model, opt, inputs())
        inputs.prefetch()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    # where the host waits: issue time (CPU returns) vs completion time (after a sync), per phase
    ph = {}
    for _ in range(3):
        t0 = time.perf_counter()
        loss = model(**inputs()).loss
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t5 = time.perf_counter()
        for k, v in dict(fwd_issue=t1 - t0, fwd_done=t2 - t0, bwd_issue=t3 - t2, bwd_done=t4 - t2,
                         opt_done=t5 - t4).items():
            ph.setdefault(k, []).append(v)
    print("phases (s, median of 3): " + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in ph.items()))
    print_host_syncs(step)
    t = time.perf_counter()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    # kernel-level events only: operator rows (aten::mm ...) carry their kernels' time as well, so a sum
    # over every row counts each kernel twice
    from torch.autograd import DeviceType

    busy = sum(e.self_device_time_total for e in p.key_averages() if e.device_type == DeviceType.CUDA) / 1e6
    print(f"wall {wall:.3f}s for 2 steps (profiled); GPU kernel time {busy:.3f}s ({busy / wall:.0%} busy)")
    kernels = [(e.key, e.count, e.self_device_time_total / 1e3) for e in p.key_averages()
               if e.device_type == DeviceType.CUDA]
    print(category_table(kernel_categories(kernels, steps=2), wall_ms=wall * 1e3 / 2))
    print(family_top(kernels, steps=2))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        p.export_chrome_trace(trace)
        print(copy_sizes(trace, steps=2))
    print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
    print(p.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=70))


# Kernel families, first match wins: where a step's GPU time goes, by what could be done about it.
KERNEL_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("host<->device copies (offload)", r"Memcpy (HtoD|DtoH)|Memcpy.*(Host|Pinned)"),
    ("device copies (graph buffers, clones)", r"Memcpy DtoD|memcpy|copy_kernel|CatArrayBatchedCopy"),
    ("memsets", r"[Mm]emset"),
    ("attention", r"flash|fmha|sdpa|cudnn|attention"),
    ("matmuls (cuBLAS/CUTLASS)", r"nvjet|gemm|xmma|cutlass|sm90_|sm80_|cublas|splitKreduce"),
    ("Inductor-generated (fused pointwise, norms)", r"^triton_"),
    ("harness Triton kernels", r"^_"),
    ("optimizer", r"multi_tensor|[Aa]dam"),
    ("ATen elementwise / reductions", r"elementwise|reduce_kernel|vectorized|unrolled|index|scatter|gather"),
)


def kernel_categories(kernels, steps: int = 1) -> list[tuple[str, float, float]]:
    """(category, kernels per step, ms per step) from (name, count, total ms) rows, largest first."""
    import re

    acc: dict[str, list[float]] = {}
    for name, count, ms in kernels:
        cat = next((c for c, pat in KERNEL_CATEGORIES if re.search(pat, name)), "other")
        slot = acc.setdefault(cat, [0.0, 0.0])
        slot[0] += count / steps
        slot[1] += ms / steps
    return sorted(((c, n, t) for c, (n, t) in acc.items()), key=lambda r: -r[2])


def family_top(kernels, steps: int = 1, n: int = 5,
               families: tuple[str, ...] = ("device copies (graph buffers, clones)",
                                            "Inductor-generated (fused pointwise, norms)", "matmuls (cuBLAS/CUTLASS)",
                                            "other")) -> str:
    """The ``n`` costliest kernels of each named family (kernel_categories' patterns): count and ms per step,
    mean us per launch; the kernel-level view behind a family's total in category_table."""
    import re

    by: dict[str, list[tuple[str, int, float]]] = {}
    for name, count, ms in kernels:
        cat = next((c for c, pat in KERNEL_CATEGORIES if re.search(pat, name)), "other")
        by.setdefault(cat, []).append((name, count, ms))
    lines = []
    for fam in families:
        rows = sorted(by.get(fam, []), key=lambda r: -r[2])[:n]
        if not rows:
            continue
        lines += [f"{fam}: top {len(rows)}", "| kernel | per step | ms / step | us each |", "|---|---:|---:|---:|"]
        for name, count, ms in rows:
            short = name if len(name) <= 90 else name[:87] + "..."
            lines.append(f"| {short} | {count / steps:,.0f} | {ms / steps:.2f} | {1e3 * ms / max(count, 1):.1f} |")
    return "\n".join(lines)


def copy_sizes(trace_path: str, steps: int = 1, n: int = 8) -> str:
    """Device-to-device copies in a chrome trace by size: bytes (memcpy events) or launch shape (copy kernels,
    e.g. the ``memcpy128`` a CUDA graph's memcpy nodes run as), with count and ms per step: which tensors
    the copies move."""
    import json

    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    acc: dict[str, list[float]] = {}
    for e in events:
        name, args = e.get("name", ""), e.get("args") or {}
        if e.get("cat") == "gpu_memcpy" and "DtoD" in name:
            key = f"{name} {args.get('bytes', '?')} B"
        elif e.get("cat") == "kernel" and ("memcpy" in name or "copy_kernel" in name):
            key = f"{name[:60]} grid {args.get('grid')} block {args.get('block')}"
        else:
            continue
        slot = acc.setdefault(key, [0, 0.0])
        slot[0] += 1
        slot[1] += float(e.get("dur", 0.0)) / 1e3
    rows = sorted(acc.items(), key=lambda kv: -kv[1][1])[:n]
    lines = ["| device copy (size or launch shape) | per step | ms / step | us each |", "|---|---:|---:|---:|"]
    for key, (count, ms) in rows:
        lines.append(f"| {key} | {count / steps:,.0f} | {ms / steps:.2f} | {1e3 * ms / max(count, 1):.1f} |")
    return "\n".join(lines)


def category_table(cats, wall_ms: float | None = None) -> str:
    """Markdown table of kernel_categories(); the share column is of the step's wall time when given."""
    total = sum(t for _, _, t in cats)
    lines = ["| kernel family | kernels / step | ms / step | share |", "|---|---:|---:|---:|"]
    for c, n, t in cats:
        share = t / (wall_ms or total) if (wall_ms or total) else 0.0
        lines.append(f"| {c} | {n:,.0f} | {t:.2f} | {share:.0%} |")
    lines.append(f"| **all kernels** | {sum(n for _, n, _ in cats):,.0f} | {total:.2f} | "
                 f"{total / (wall_ms or total) if (wall_ms or total) else 0:.0%} |")
    return "\n".join(lines)


def print_host_syncs(step) -> int:
    """Run one step with CUDA's sync debug mode on and print where the host waited for the GPU (the Python
    line of each synchronizing call: .item(), .tolist(), a pageable copy, a data-dependent shape, ...)."""
    import warnings
    from collections import Counter

    sites: Counter = Counter()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            sites[f"{w.filename.split('site-packages/')[-1]}:{w.lineno}"] += 1
    total = sum(sites.values())
    print(f"host syncs in one step: {total}")
    for site, n in sites.most_common(25):
        print(f"  {n:4d}  {site}")
    return total


def _label(r):
    m = r.get("model", "anchor")
    name = r["stack"] + (" via Trainer" if r.get("loop") == "trainer" else "")
    if r.get("inductor"):
        name += " (inductor " + ", ".join(f"{k}={v}" for k, v in r["inductor"].items()) + ")"
    if r.get("lora_op") is False:  # kernels.lora_op is the default: label the rows without it
        name += " (no lora_op)"
    if r.get("lora_paths") not in (None, "auto"):  # kernels.lora_paths: label the rows off the default
        name += f" (lora_paths {r['lora_paths']})"
    if r.get("lora_op_da_stream") is False:  # the lora_op's dA beside the dx GEMM is the default
        name += " (dA after dx)"
    return name if m == "anchor" else f"{name} [{m}]"


def _lora_paths_label() -> str:
    """harness.kernels.lora_linear.PATHS as one word: "cublas", "auto", or "fwd=...,dx=...,dy=..."."""
    paths = importlib.import_module("harness.kernels.lora_linear").PATHS
    values = set(paths.values())
    return values.pop() if len(values) == 1 else ",".join(f"{k}={v}" for k, v in paths.items())


def _last_line(text: str, width: int = 120) -> str:
    """The last non-empty line of an error (where the exception or the time-out is), fit for a table cell."""
    lines = [l.strip() for l in str(text).splitlines() if l.strip()]
    return (lines[-1] if lines else "")[:width].replace("|", "/")


def table(rows):
    head = "| stack | checkpointing | batch x tokens | tokens/s | median step | peak GiB | after load GiB | MFU | loss first -> last |"
    out = [head, "|" + "---|" * 9]
    longest_rows = [r for r in rows if "longest_tokens" in r]
    for r in rows:
        if "longest_tokens" in r:
            continue
        if "error" in r:
            out.append(f"| {_label(r)} {r.get('args', '')} | error: {_last_line(r['error'])} |||||||| ")
            continue
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        load = "-" if r.get("after_load_gib") is None else f"{r['after_load_gib']:.2f}"
        step = f"{r['median_step_s']:.3f} s" + (" (mean)" if str(r.get("step_time", "")).startswith("mean") else "")
        out.append(f"| {_label(r)} | {r['gc']} | {r['batch']} x {r['tokens']} | {r['tokens_per_s']:,} | "
                   f"{step} | {peak} | {load} | {mfu} | {r['loss_first']} -> {r['loss_last']} |")
    out += ratios(rows)
    if longest_rows:
        out += ["", "| stack | checkpointing | longest sequence at batch 1 (tokens) | peak GiB there | search cap "
                "| GPU memory |", "|---|---|---|---|---|---|"]
        for r in longest_rows:
            mem = f"capped at {r['memory_gib']:g} GiB" if r.get("memory_gib") else "whole GPU"
            peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
            out.append(f"| {_label(r)} | {r['gc']} | {r['longest_tokens']:,} | {peak} | {r['cap']:,} | {mem} |")
    return "\n".join(out)


def ratios(rows) -> list[str]:
    """Lines under the table: each harness stack's tokens/s and peak memory against every peer in the same
    table (the in-call comparison the issue's bars are stated in), same model and shape only."""
    ok = [r for r in rows if "error" not in r and "longest_tokens" not in r and r.get("tokens_per_s")]
    lines = []
    for h in (r for r in ok if r["stack"].startswith("harness")):
        peers = [p for p in ok if not p["stack"].startswith("harness") and p.get("model") == h.get("model")
                 and (p["batch"], p["tokens"]) == (h["batch"], h["tokens"])]
        parts = []
        for p in peers:
            mem = ""
            if h.get("peak_gib") and p.get("peak_gib"):
                mem = f" at {h['peak_gib'] / p['peak_gib']:.2f}x its peak memory"
            parts.append(f"{h['tokens_per_s'] / p['tokens_per_s']:.2f}x {p['stack']}{mem}")
        if parts:
            lines.append(f"- {_label(h)} tokens/s: " + "; ".join(parts))
    return [""] + lines if lines else []


PLAN = [  # (stack, extra args): the anchor workload, every stack, one table
    ("hf16", ["--gc", "true"]),
    ("liger16", ["--gc", "true"]),
    ("unsloth16", ["--gc", "unsloth"]),
    ("unsloth4", ["--gc", "unsloth"]),
    ("harness16", ["--gc", "unsloth"]),
    ("harness4", ["--gc", "unsloth"]),
]


def run_stacks(plan, out=None, timeout_s: float | None = None) -> list[dict]:
    """Each (stack, extra args) in its own process; one JSON row each. ``timeout_s``: a stack that runs
    longer is stopped (its process killed, its GPU memory freed with it) and gets an error row."""
    rows = []
    for stack, extra in plan:
        cmd = [sys.executable, "-m", "harness.bench", "--stack", stack, *extra]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s or None)
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            p = subprocess.CompletedProcess(cmd, -9, "", err + f"\ntimed out after {timeout_s:g} s")
        lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
        row = json.loads(lines[-1]) if lines else dict(stack=stack, error=(p.stderr or "no output")[-300:])
        row["args"] = " ".join(extra)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if p.returncode != 0 or "error" in row:
            print(p.stderr[-2000:], file=sys.stderr)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r and "tokens_per_s" in r and r.get("peak_gib") is not None]
    if not ok:
        return
    names = [f"{_label(r)} ({r['gc']})" for r in ok]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.barh(names, [r["tokens_per_s"] for r in ok])
    a1.set(xlabel="tokens/s", title="Throughput")
    a2.barh(names, [r["peak_gib"] for r in ok], color="tab:orange")
    a2.set(xlabel="peak GiB", title="Peak GPU memory")
    a2.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_mode(bench, out_dir) -> list[dict]:
    """mode=bench: the stacks of conf/bench, each in its own process, then table + json + plot in the run dir."""
    from pathlib import Path

    if not torch.cuda.is_available():
        from harness.config import ConfigError

        raise ConfigError("invalid config: mode=bench needs a CUDA GPU (allowed here: train, plan, eval, infer, "
                          "replay, report)")
    common = ["--batch", str(bench.batch), "--tokens", str(bench.tokens), "--grid", str(bench.grid), "--r",
              str(bench.r), "--steps", str(bench.steps), "--warmup", str(bench.warmup), "--model", bench.model]
    if not bench.compile:
        common.append("--no-compile")
    common += ["--compile-mode", bench.compile_mode]
    if not bench.cuda_graphs:
        common.append("--no-graphs")
    if bench.memory_gib:
        common += ["--memory-gib", str(bench.memory_gib)]
    harness_only = []  # the harness stacks' compiler and kernel settings: the peers compile their own way
    for key, value in (getattr(bench, "inductor", None) or {}).items():
        harness_only += ["--inductor", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    if not getattr(bench, "lora_op", True):
        harness_only.append("--no-lora-op")
    harness_only += ["--lora-paths", getattr(bench, "lora_paths", "auto")]  # always: a stack's paths as configured
    common_of = {s: common + (harness_only if s.startswith("harness") else []) for s in bench.stacks}
    plan = [(s, common_of[s] + ["--gc", bench.gc]) for s in bench.stacks]
    if bench.trainer:  # the harness stacks again, through the training loop a `harness` run uses
        plan += [(s, common_of[s] + ["--gc", bench.gc, "--trainer"]) for s in bench.stacks if s.startswith("harness")]
    if bench.longest:  # then the longest sequence per stack at batch 1
        plan += [(s, common_of[s] + ["--gc", bench.gc, "--longest", "--max-tokens", str(bench.max_tokens)])
                 for s in bench.stacks]
    out_dir = Path(out_dir)
    rows = run_stacks(plan, out_dir / "bench.jsonl", timeout_s=bench.timeout_s)
    md = table(rows)
    (out_dir / "bench.md").write_text(md + "\n")
    plot(rows, out_dir / "bench.png")
    print(md)
    return rows


def set_inductor_options(items: list[str]) -> dict:
    """Apply ``KEY=VALUE`` settings to ``torch._inductor.config`` (values parsed as bool / int / float / str
    after the option's current type); an unknown key is an error that names the key."""
    if not items:
        return {}
    from torch._inductor import config as ic

    done = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--inductor wants KEY=VALUE, got {item!r}")
        try:
            current = getattr(ic, key)
        except AttributeError:
            raise SystemExit(f"--inductor: torch._inductor.config has no option {key!r}") from None
        if isinstance(current, bool):
            if raw.lower() not in ("1", "0", "true", "false"):
                raise SystemExit(f"--inductor {key}: expected true/false, got {raw!r}")
            value = raw.lower() in ("1", "true")
        elif isinstance(current, (int, float)) and not isinstance(current, bool):
            value = type(current)(raw)
        else:
            value = raw
        setattr(ic, key, value)
        done[key] = value
    return done


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stack", default="harness16")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="where a step goes (with --trainer: the first two timed steps of the Trainer's loop)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--gc", default="unsloth", choices=["false", "true", "unsloth"])
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="eager kernels, no regional torch.compile")
    ap.add_argument("--no-graphs", action="store_true", help="no per-layer CUDA graphs (harness stacks)")
    ap.add_argument("--no-tiled-mlp", action="store_true", help="harness stacks: the compiled MLP untiled")
    ap.add_argument("--lora-op", action=argparse.BooleanOptionalAction, default=True,
                    help="harness stacks: LoRA sums in the harness::lora_mm op (kernels.lora_op, the default; "
                         "kernels/lora_op.py); --no-lora-op: traced addmm")
    ap.add_argument("--lora-paths", choices=["cublas", "auto"], default=None,
                    help="harness stacks: the LoRA GEMMs' kernel paths (kernels.lora_paths; default: as they are, i.e. "
                         "auto unless HARNESS_LORA_PATHS says otherwise)")
    ap.add_argument("--no-host-prep", action="store_true",
                    help="harness stacks: positions and vision segments computed in the forward (harness/host_prep.py)")
    ap.add_argument("--compile-mode", default="default",
                    choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default="anchor", help="anchor (the anchors' Qwen2-VL-2B workload) or a conf/model name")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run (tiny models)")
    ap.add_argument("--longest", action="store_true", help="search the longest sequence that fits at batch 1")
    ap.add_argument("--max-tokens", type=int, default=65536, help="--longest: upper end of the search")
    ap.add_argument("--granularity", type=int, default=256,
                    help="--longest: bisection stops when the bracket is this narrow (tokens)")
    ap.add_argument("--memory-gib", type=float, default=0.0,
                    help="cap this process's GPU memory (torch's per-process fraction); 0: the whole GPU")
    ap.add_argument("--mem-trace", action="store_true",
                    help="record the first timed step's allocations and print what is alive at its peak")
    ap.add_argument("--only", default=None, help="comma-separated indices of PLAN to run with --all")
    ap.add_argument("--trainer", action="store_true",
                    help="harness stacks: train through harness.train's SFTTrainer, as a `harness` run does "
                         "(harness/bench_trainer.py), not the bench's own loop")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="set torch._inductor.config.KEY for the compiled layers (repeatable), e.g. "
                         "combo_kernels=true: an experiment switch; the row records what was set")
    a = ap.parse_args()
    a.inductor = set_inductor_options(a.inductor)
    if a.profile and not a.trainer:
        return profile(a)
    if not a.all:
        from harness.hub_guard import import_bitsandbytes

        import_bitsandbytes()  # peer stacks import it too: no kernel fetched from the Hub (harness.hub_guard)
        cap_memory(a.memory_gib, a.device)
        try:
            res = longest(a) if a.longest else run_trainer(a) if a.trainer else run(a)
            if a.inductor:
                res["inductor"] = a.inductor
            if a.stack.startswith("harness") and not a.lora_op:
                res["lora_op"] = False
            if a.stack.startswith("harness") and not a.no_kernels:  # the LoRA kernel paths this run took
                res["lora_paths"] = _lora_paths_label()
                # dA beside the dx GEMM in the compiled layers (HARNESS_LORA_OP_DA_STREAM, kernels/lora_op.py)
                res["lora_op_da_stream"] = bool(importlib.import_module("harness.kernels.lora_op").OP_DA_STREAM)
            print(json.dumps(res), flush=True)
        except Exception as e:
            import traceback

            traceback.print_exc()
            print(json.dumps(dict(stack=a.stack, error=f"{type(e).__name__}: {e}"[:300])), flush=True)
        return
    plan = [PLAN[int(i)] for i in a.only.split(",")] if a.only else PLAN
    print(table(run_stacks(plan, a.out)))


if __name__ == "__main__":
    main()

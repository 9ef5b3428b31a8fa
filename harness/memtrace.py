"""Where a training step's GPU memory goes: per-step activation peaks and a breakdown of the peak.

``StepMemory`` measures, for each step, the peak allocated memory above what was allocated when the
step started (weights, optimizer state, persistent buffers): the step's *activation* memory (it also
holds the LoRA gradients, which live until ``zero_grad``). Memory that CUDA graphs replay in (their
private pool) is reserved, not allocated, between captures; ``graph_pool_bytes`` reads it from the
allocator's segments so that a comparison can add it back.

``peak_breakdown`` reads a ``torch.cuda.memory._snapshot()`` recorded with
``torch.cuda.memory._record_memory_history()``: it replays the allocation trace, finds the moment of
the highest allocated total, and groups the blocks alive then by the source line that allocated them.
"""
from __future__ import annotations

from collections import defaultdict

import torch

__all__ = ["StepMemory", "graph_pool_bytes", "peak_breakdown", "format_breakdown"]

GiB = 2**30


class StepMemory:
    """Per-step activation peaks (CUDA); on other devices every figure stays None."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.start = 0
        self.overall = 0
        self.activation_peaks: list[int] = []

    def begin(self) -> None:
        if not self.cuda:
            return
        self.overall = max(self.overall, torch.cuda.max_memory_allocated())
        self.start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def end(self) -> None:
        if not self.cuda:
            return
        peak = torch.cuda.max_memory_allocated()
        self.overall = max(self.overall, peak)
        self.activation_peaks.append(peak - self.start)

    def summary(self, timed_from: int = 0) -> dict:
        if not self.cuda or not self.activation_peaks:
            return {}
        timed = self.activation_peaks[timed_from:] or self.activation_peaks
        pool = graph_pool_bytes()
        return dict(peak_gib=round(self.overall / GiB, 2),
                    activation_peak_gib=round(max(timed) / GiB, 3),
                    activation_peak_all_steps_gib=round(max(self.activation_peaks) / GiB, 3),
                    graph_pool_gib=round(pool / GiB, 3))


def graph_pool_bytes(snapshot: dict | None = None) -> int:
    """Bytes of the allocator's segments that belong to private pools (CUDA graphs)."""
    if snapshot is None:
        if not torch.cuda.is_available():
            return 0
        snapshot = torch.cuda.memory._snapshot()
    total = 0
    for seg in snapshot.get("segments", []):
        pool = seg.get("segment_pool_id", (0, 0))
        if tuple(pool) != (0, 0):
            total += int(seg.get("total_size", 0))
    return total


def _site(frames, prefer=("harness", "kernels", "transformers", "peft", "torch/_inductor", "torch/optim")) -> str:
    """The allocating source line worth naming: the innermost frame in one of the preferred packages."""
    for f in frames or []:
        name = f.get("filename", "")
        if any(p in name for p in prefer) and "memtrace" not in name and "torch/utils" not in name:
            short = name.split("site-packages/")[-1]
            return f"{short}:{f.get('line', '?')} {f.get('name', '')}"
    if frames:
        f = frames[0]
        return f"{f.get('filename', '?').split('site-packages/')[-1]}:{f.get('line', '?')} {f.get('name', '')}"
    return "?"


def peak_breakdown(snapshot: dict, device: int = 0, top: int = 12) -> dict:
    """Replay the device trace; return the peak (bytes above the trace's start) and the top allocation
    sites alive at that moment: ``{"peak": int, "sites": [(site, bytes, count), ...]}``."""
    traces = snapshot.get("device_traces", [])
    trace = traces[device] if device < len(traces) else []
    live: dict[int, tuple[int, str]] = {}
    cur = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for ev in trace:
        action, addr, size = ev.get("action"), ev.get("addr"), int(ev.get("size", 0))
        if action == "alloc":
            live[addr] = (size, _site(ev.get("frames")))
            cur += size
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif action == "free_completed" and addr in live:
            cur -= live.pop(addr)[0]
    sites: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, site in at_peak.values():
        sites[site][0] += size
        sites[site][1] += 1
    ranked = sorted(((s, b, n) for s, (b, n) in sites.items()), key=lambda t: -t[1])
    return {"peak": peak, "sites": ranked[:top]}


def format_breakdown(b: dict) -> str:
    lines = [f"peak of the traced step: {b['peak'] / GiB:.3f} GiB above its start; alive then, by allocating line:"]
    for site, nbytes, n in b["sites"]:
        lines.append(f"  {nbytes / 2**20:9.1f} MiB  x{n:<4} {site}")
    return "\n".join(lines)

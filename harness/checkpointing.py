"""Gradient checkpointing: none, standard (non-reentrant), or offloaded ("unsloth").

`unsloth`: every checkpointed layer (decoder layers and vision blocks: transformers'
GradientCheckpointingLayer) keeps only its input, and keeps it in pinned CPU memory instead of
on the GPU. The device-to-host copy runs on a side stream while the next layers compute; in
backward, the input of the layer before is copied back on the side stream while this layer is
recomputed, so transfer overlaps compute. Activation memory is then one layer's worth plus
the in-flight copies, instead of one hidden state per layer.

On CPU there is nothing to offload to: `unsloth` runs as standard checkpointing with a notice
(`force=True` exercises the offloading code path on CPU, for tests).
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint


class _Saved:
    """One layer input living in (pinned) host memory, and its copy back to the device."""

    __slots__ = ("host", "device", "dtype", "ready", "back", "back_ready", "prev", "requires_grad")

    def __init__(self, prev):
        self.prev = prev
        self.back = None
        self.back_ready = None


class ActivationOffloader:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.last: _Saved | None = None

    def offload(self, t: torch.Tensor) -> _Saved:
        s = _Saved(self.last)
        self.last = s
        s.device, s.dtype, s.requires_grad = t.device, t.dtype, t.requires_grad
        if not self.cuda:
            s.host, s.ready = t.detach().clone(), None
            return s
        s.host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            s.host.copy_(t.detach(), non_blocking=True)
            s.ready = torch.cuda.Event()
            s.ready.record(self.stream)
        t.record_stream(self.stream)  # keep t's memory from reuse until the copy is done
        return s

    def prefetch(self, s: _Saved | None) -> None:
        """Start copying a saved input back to the device on the side stream."""
        if s is None or s.back is not None or s.host is None or not self.cuda:
            return
        with torch.cuda.stream(self.stream):
            s.back = s.host.to(self.device, non_blocking=True)
            s.back_ready = torch.cuda.Event()
            s.back_ready.record(self.stream)

    def fetch(self, s: _Saved) -> torch.Tensor:
        if not self.cuda:
            t, s.host = s.host, None
            return t
        self.prefetch(s)
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(s.back_ready)
        t = s.back
        t.record_stream(cur)
        s.back, s.host = None, None
        self.prefetch(s.prev)  # the layer before is next in backward: bring it in while this one recomputes
        return t


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, offloader, hidden, *rest):
        ctx.fn, ctx.offloader = fn, offloader
        ctx.dev = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.dev), torch.get_autocast_dtype(ctx.dev))
        ctx.rng_cpu = torch.get_rng_state()
        ctx.rng_cuda = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.tensor_idx = [i for i, r in enumerate(rest) if torch.is_tensor(r)]
        ctx.others = [None if torch.is_tensor(r) else r for r in rest]
        ctx.save_for_backward(*[rest[i] for i in ctx.tensor_idx])
        with torch.no_grad():
            out = fn(hidden, *rest)
        ctx.saved = offloader.offload(hidden)
        ctx.tuple_out = isinstance(out, tuple)
        return out

    @staticmethod
    def backward(ctx, *grads):
        hidden = ctx.offloader.fetch(ctx.saved).detach().requires_grad_(ctx.saved.requires_grad)
        rest = list(ctx.others)
        for i, t in zip(ctx.tensor_idx, ctx.saved_tensors):
            rest[i] = t.detach().requires_grad_(t.requires_grad)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=[hidden.device] if hidden.is_cuda else []))
            torch.set_rng_state(ctx.rng_cpu)
            if ctx.rng_cuda is not None:
                torch.cuda.set_rng_state(ctx.rng_cuda, hidden.device)
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast(ctx.dev, dtype=ctx.autocast[1], enabled=ctx.autocast[0]))
            out = ctx.fn(hidden, *rest)
        outs = out if ctx.tuple_out else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        rest_grads = [r.grad if torch.is_tensor(r) and r.requires_grad else None for r in rest]
        return (None, None, hidden.grad if hidden.requires_grad else None, *rest_grads)


def offloaded_checkpoint(offloader: ActivationOffloader, fn, *args):
    """The checkpoint function transformers' GradientCheckpointingLayer calls: fn(hidden, *rest)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    if not args or not torch.is_tensor(args[0]):  # no positional hidden state to offload
        return checkpoint(fn, *args, use_reentrant=False)
    return _OffloadedCheckpoint.apply(fn, offloader, *args)


def enable_checkpointing(model, mode: str, device: torch.device, force: bool = False) -> str:
    """Set up checkpointing on every GradientCheckpointingLayer; return what was actually enabled."""
    if mode == "false":
        return "off"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if mode != "unsloth":
        return "standard"
    if device.type != "cuda" and not force:
        print("note: train.gradient_checkpointing=unsloth offloads to pinned CPU memory on CUDA only; "
              "using standard checkpointing on CPU")
        return "standard"
    from transformers.modeling_layers import GradientCheckpointingLayer

    fn = functools.partial(offloaded_checkpoint, ActivationOffloader(device))
    n = 0
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
            m._gradient_checkpointing_func = fn
            n += isinstance(m, GradientCheckpointingLayer)
    return f"offloaded ({n} layers)"


__all__ = ["enable_checkpointing", "ActivationOffloader", "offloaded_checkpoint", "checkpoint"]

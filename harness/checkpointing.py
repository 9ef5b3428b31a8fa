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
import inspect

import torch
from torch.utils.checkpoint import checkpoint

from harness.kernels.tiled_mlp import recomputing
from harness.layer_graphs import MISS, autocast_no_cache, autocast_state, uses_rng


class _Saved:
    """One layer input living in (pinned) host memory, and its copy back to the device."""

    __slots__ = ("host", "device", "dtype", "ready", "back", "back_ready", "prev", "requires_grad")

    def __init__(self, prev):
        self.prev = prev
        self.back = None
        self.back_ready = None


class ActivationOffloader:
    def __init__(self, device: torch.device, graphs=None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.last: _Saved | None = None
        self.graphs = graphs  # harness.layer_graphs.LayerGraphs: replay layers as CUDA graphs

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
        ctx.autocast = autocast_state(ctx.dev)
        ctx.call = call = layer_call(fn)
        # the RNG state is for the recompute's dropout masks: layers without dropout skip the (host) work
        ctx.rng = call is None or uses_rng(call[0])
        if ctx.rng:
            ctx.rng_cpu = torch.get_rng_state()
            ctx.rng_cuda = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.tensor_idx = [i for i, r in enumerate(rest) if torch.is_tensor(r)]
        ctx.others = [None if torch.is_tensor(r) else r for r in rest]
        ctx.save_for_backward(*[rest[i] for i in ctx.tensor_idx])
        out = MISS
        with torch.no_grad(), autocast_no_cache(ctx.dev, ctx.autocast):
            # detached: the compiled forward's guards see the same requires_grad as in a graph capture
            h = hidden.detach()
            if offloader.graphs is not None and call is not None:
                out = offloader.graphs.forward(call, h, rest)
            if out is MISS:
                out = fn(h, *rest) if call is None else call[1](call[0], h, *rest, **call[2])
        ctx.saved = offloader.offload(hidden)
        ctx.tuple_out = isinstance(out, tuple)
        return out

    @staticmethod
    def backward(ctx, *grads):
        hidden = ctx.offloader.fetch(ctx.saved).detach().requires_grad_(ctx.saved.requires_grad)
        rest = list(ctx.others)
        for i, t in zip(ctx.tensor_idx, ctx.saved_tensors):
            rest[i] = t.detach().requires_grad_(t.requires_grad)
        call = ctx.call
        if ctx.offloader.graphs is not None and call is not None:
            g = ctx.offloader.graphs.backward(call, hidden, rest, grads, ctx.autocast)
            if g is not MISS:
                return (None, None, g, *[None] * len(rest))
        with contextlib.ExitStack() as stack:
            if ctx.rng:
                stack.enter_context(torch.random.fork_rng(devices=[hidden.device] if hidden.is_cuda else []))
                torch.set_rng_state(ctx.rng_cpu)
                if ctx.rng_cuda is not None:
                    torch.cuda.set_rng_state(ctx.rng_cuda, hidden.device)
            stack.enter_context(torch.enable_grad())
            stack.enter_context(autocast_no_cache(ctx.dev, ctx.autocast))
            stack.enter_context(recomputing())
            if call is None:
                out = ctx.fn(hidden, *rest)
            else:
                out = call[1](call[0], hidden, *rest, **call[2])
        outs = out if ctx.tuple_out else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        rest_grads = [r.grad if torch.is_tensor(r) and r.requires_grad else None for r in rest]
        return (None, None, hidden.grad if hidden.requires_grad else None, *rest_grads)


def layer_call(fn):
    """``(layer, f, kwargs)`` such that ``f(layer, hidden, *rest, **kwargs)`` runs what ``fn(hidden, *rest)``
    runs, or None when ``fn`` is not a transformers layer call.

    transformers >= 5.2x checkpoints ``partial(forward, layer, **kwargs)``, earlier 5.x
    ``partial(layer.__call__ of nn.Module, **kwargs)``. When the layer is compiled (kernels.compiled), ``f``
    is its compiled forward, called explicitly: this checkpoint function is kept out of the compiler,
    and backward runs on the autograd engine's thread, where no compiler frame hook is installed:
    ``fn`` itself would run eagerly there."""
    if not isinstance(fn, functools.partial):
        return None
    func, args = fn.func, fn.args
    new_style = len(args) == 1 and isinstance(args[0], torch.nn.Module) and not inspect.ismethod(func)
    old_style = not args and inspect.ismethod(func) and isinstance(func.__self__, torch.nn.Module)
    if not (new_style or old_style):
        return None
    layer = args[0] if new_style else func.__self__
    compiled = layer.__dict__.get("_harness_compiled_forward")
    if compiled is not None and getattr(layer, "_compiled_call_impl", None) is not None:
        return layer, compiled, fn.keywords
    if new_style:
        return layer, func, fn.keywords
    return layer, (lambda _layer, *a, **k: func(*a, **k)), fn.keywords


@torch.compiler.disable
def offloaded_checkpoint(offloader: ActivationOffloader, fn, *args):
    """The checkpoint function transformers' GradientCheckpointingLayer calls: fn(hidden, *rest).

    Kept out of the compiler (a compiled layer's frame calls it): the bookkeeping here is host work
    by design, and the layer itself runs through its own compiled forward (``layer_call``)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    if not args or not torch.is_tensor(args[0]):  # no positional hidden state to offload
        return checkpoint(fn, *args, use_reentrant=False)
    return _OffloadedCheckpoint.apply(fn, offloader, *args)


def checkpointing_mode(mode: str, device: torch.device) -> str:
    """``train.gradient_checkpointing=auto``: offloaded ("unsloth", with CUDA graphs when on) on CUDA, where it
    is the fast path and saves activation memory; off elsewhere (small CPU runs gain nothing from recomputing)."""
    if mode != "auto":
        return mode
    return "unsloth" if device.type == "cuda" else "false"


def enable_checkpointing(model, mode: str, device: torch.device, force: bool = False, graphs: bool = False) -> str:
    """Set up checkpointing on every GradientCheckpointingLayer; return what was actually enabled.

    ``graphs``: with offloading on CUDA, replay each layer's forward and its recompute + backward as
    CUDA graphs (harness.layer_graphs)."""
    mode = checkpointing_mode(mode, device)
    if mode == "false":
        return "off"
    # torch's checkpoint here: its recompute must save exactly what the first forward saved, so it runs
    # unmarked (a compiled layer's graph without the MLP's forward would save fewer tensors); only the
    # offloaded path's own recompute skips the MLP forward (harness.kernels.tiled_mlp.recomputing)
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

    from harness.layer_graphs import LayerGraphs, graphs_supported

    layer_graphs = LayerGraphs(device) if graphs and (graphs_supported(device) or force) else None
    offloader = ActivationOffloader(device, layer_graphs)
    model.__dict__["_harness_offloader"] = offloader
    fn = functools.partial(offloaded_checkpoint, offloader)
    n = 0
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
            m._gradient_checkpointing_func = fn
            n += isinstance(m, GradientCheckpointingLayer)
    return f"offloaded ({n} layers{', CUDA graphs' if layer_graphs is not None else ''})"


def graphs_summary(model) -> dict | None:
    """What the per-layer CUDA graphs did (harness.layer_graphs), when enable_checkpointing turned them on."""
    for m in (model, getattr(model, "base_model", None)):
        off = getattr(m, "__dict__", {}).get("_harness_offloader")
        if off is not None and off.graphs is not None:
            return off.graphs.summary()
    return None


__all__ = ["checkpointing_mode", "enable_checkpointing", "graphs_summary", "ActivationOffloader", "offloaded_checkpoint", "checkpoint"]

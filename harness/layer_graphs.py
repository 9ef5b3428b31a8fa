"""CUDA-graph replay of the offloaded-checkpointed layers.

Why: with compiled layers the GPU still waits on the host about half of a training step
(docs/benchmarks.md: ~0.2 s of kernels in a ~0.37 s step). Every layer call pays for Dynamo's
guards, the AOTAutograd and Inductor wrappers, one launch per kernel, and in backward the
eager autograd engine around the recompute. A CUDA graph replays a whole layer with one launch.

What is graphed: for each checkpointed layer (decoder layer or vision block) and each input
signature (shapes, strides, dtypes, the non-tensor arguments, autocast state), two graphs:

* ``F``: the no-grad forward that offloaded checkpointing runs in the forward pass;
* ``B``: the backward pass's recompute *and* its backward, one graph: from the layer input and
  the gradient of its output to the gradient of its input and of its trainable (LoRA) weights.

The layer's input, its other tensor arguments, the output gradient and the results live in
static buffers outside the graphs' memory pool, shared by the layers of a stack (their shapes
are the same): a replay is "copy in, replay, copy out". Everything a graph allocates inside is
dead when it ends, so one private pool serves all graphs whatever order they run in, and the
pool's size is about one layer's activations: the memory checkpointing already needs.

Copies a stack does not need are skipped: the forward graph writes the layer's output into the
stack's input buffer (the input is dead by then), and the backward graph the input's gradient into
the output-gradient buffer, so when the next layer (the previous one, in backward) is called with
the clone just handed out, its copy in finds the buffer already holding it (same memory, layout and
version counter, the clone still alive) and skips it: per layer and step 5 hidden-size copies, not 7.

A layer signature runs normally (compiled, not graphed) ``warmup`` times first, so the compiler
has compiled and tuned before capture. Right before capture the graph's body runs once more with
synchronizing CUDA calls turned into errors: a layer that reads device values on the host (Qwen2.5-VL's
windowed vision attention) is found there, not half-way through a capture, which would leave CUDA
state behind. That, and an argument that is not a tensor or a plain value (a cache object, a tensor
subclass), makes the layer and signature run normally from then on, with one log line; a capture
that fails anyway stops all further captures in the run. Gradients of trainable weights are
accumulated into ``.grad`` like autograd does; module hooks on gradient accumulation do not run,
which is why graphs are off under torch.distributed (DDP reduces gradients in those hooks).
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field

import torch

from harness.kernels.tiled_mlp import recomputing

log = logging.getLogger(__name__)

MISS = object()  # "not graphed: run the layer normally"
_SEG = "_harness_seg_len"  # kernels.compiled: patches per image, read by the vision attention forward
_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


class _Ungraphable(Exception):
    pass


def _grouped_copy(dst: list, src: list) -> None:
    """``dst[i].copy_(src[i])`` for all i: one multi-tensor launch for the pairs with equal strides, a copy each
    for the rest. (``_foreach_copy_`` copies tensor by tensor when any pair's strides differ, e.g. a LoRA
    B gradient that comes out of its matmul transposed: that would be two copy launches per LoRA layer.)"""
    same = [(d, s) for d, s in zip(dst, src) if d.stride() == s.stride()]
    if same:
        torch._foreach_copy_([d for d, _ in same], [s for _, s in same])
    for d, s in zip(dst, src):
        if d.stride() != s.stride():
            d.copy_(s)


def flatten(x, leaves: list) -> tuple:
    """A hashable description of ``x`` (tuples, lists, dicts, plain tensors, plain values) with its
    tensors appended to ``leaves``; raises _Ungraphable for anything else."""
    if type(x) is torch.Tensor or type(x) is torch.nn.Parameter:
        leaves.append(x)
        return ("T", tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad)
    if type(x) in (tuple, list):
        return (type(x) is list, tuple(flatten(v, leaves) for v in x))
    if type(x) is dict:
        return ("d", tuple((k, flatten(v, leaves)) for k, v in x.items()))
    if isinstance(x, _PLAIN):
        return ("v", x)
    raise _Ungraphable(type(x).__name__)


def unflatten(desc, leaves):
    """Rebuild the structure ``desc`` describes, taking its tensors in order from the iterator ``leaves``."""
    tag = desc[0]
    if tag == "T":
        return next(leaves)
    if tag == "v":
        return desc[1]
    if tag == "d":
        return {k: unflatten(v, leaves) for k, v in desc[1]}
    items = [unflatten(v, leaves) for v in desc[1]]
    return items if tag else tuple(items)


def _layout(leaves) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.dtype) for t in leaves)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


class _Held:
    """What a static buffer holds: a copy of ``src`` as it was (its memory, layout and version counter).
    ``src`` is referenced weakly: while it is alive no other tensor has its memory, so a tensor with the
    same data pointer, layout and version is ``src`` or a view of it (``detach()``) with the same values."""

    __slots__ = ("ref", "ptr", "layout", "version")

    def __init__(self, src: torch.Tensor):
        self.ref = weakref.ref(src)
        self.ptr = src.data_ptr()
        self.layout = (tuple(src.shape), src.stride(), src.dtype, src.device)
        self.version = src._version

    def matches(self, t: torch.Tensor) -> bool:
        return (self.ref() is not None and t.data_ptr() == self.ptr and t._version == self.version
                and (tuple(t.shape), t.stride(), t.dtype, t.device) == self.layout)


@dataclass
class _Statics:
    """Static buffers of one stack and input layout: inputs, outputs, output grads, input grad.

    ``outputs[0]`` is ``inputs[0]`` and ``grad_in`` a ``grad_outs`` buffer where the layouts allow (see the
    module docstring); ``held`` records, per buffer, the tensor it holds a copy of, so repeated copies are
    skipped (the rotary cos/sin every layer of a stack receives; the clone of the previous layer's result)."""
    inputs: list
    held: dict = field(default_factory=dict)  # id(buffer) -> _Held
    outputs: list | None = None
    grad_outs: dict = field(default_factory=dict)  # output-gradient description -> buffers
    grad_in: torch.Tensor | None = None
    copies: int = 0  # copies into buffers made
    skipped: int = 0  # and skipped: the buffer held the source already

    def copy_in(self, leaves):
        self.copy_into(self.inputs, leaves)

    def copy_into(self, buffers, sources):
        for dst, src in zip(buffers, sources):
            held = self.held.get(id(dst))
            if held is not None and held.matches(src):
                self.skipped += 1
                continue
            dst.copy_(src)
            self.copies += 1
            self.held[id(dst)] = _Held(src)

    def handed_out(self, buffer: torch.Tensor, clone: torch.Tensor | None):
        """A replay wrote ``buffer``; ``clone`` (or None) is the copy of it handed to the caller."""
        if clone is None:
            self.held.pop(id(buffer), None)
        else:
            self.held[id(buffer)] = _Held(clone)


@dataclass
class _Entry:
    graph: object
    statics: _Statics
    out_desc: tuple = ()
    flats: list = field(default_factory=list)  # per dtype: (flat grad buffer, [(param, offset)])
    grad_outs: list = field(default_factory=list)


class LayerGraphs:
    """Per-layer CUDA graphs for :mod:`harness.checkpointing`'s offloaded path."""

    def __init__(self, device: torch.device, warmup: int = 1, max_signatures: int = 4, graph_factory=None):
        self.device = device
        self.warmup = warmup
        self.max_signatures = max_signatures  # per layer: variable-length batches would capture forever
        self._factory = graph_factory or _CudaGraph  # tests replace the CUDA graph with a recording double
        self._pool = None
        self.entries: dict = {}  # (id(layer), kind, signature) -> _Entry, or None when it failed
        self.seen: dict = {}  # same key -> normal runs so far
        self.statics: dict = {}  # (layer class, input layout) -> _Statics
        self.out_meta: dict = {}  # (id(layer), signature) -> (out desc, [output tensors' metadata])
        self.signatures: dict = {}  # id(layer) -> input layouts captured (at most max_signatures)
        self._host_mods: dict = {}  # id(layer) -> its submodules with host state
        self.flat_bufs: dict = {}  # (layer class, trainable shapes) -> {dtype: flat gradient buffer}
        self.captured = 0
        self.replays = 0
        self.failures: list[str] = []
        self.misses: dict = {}  # why a call ran without graphs -> count
        self.stopped = False  # after a failed capture: no new captures
        self._sync_guard = sync_errors if device.type == "cuda" else contextlib.nullcontext

    # ------------------------------------------------------------------ helpers
    def _key(self, layer, kwargs, hidden, rest, autocast):
        if uses_rng(layer):
            return self._miss("dropout")
        leaves: list = []
        try:
            desc = flatten(((hidden, *rest), dict(kwargs)), leaves)
        except _Ungraphable as err:
            return self._miss(f"argument of type {err}")
        if any(t.device.type != self.device.type for t in leaves):
            return self._miss("tensor on another device")
        return (desc, autocast, self._host_state(layer)), leaves

    def _host_state(self, layer) -> tuple:
        """Host-side values the layer's forward reads besides its arguments: the patches-per-image that
        kernels.compiled's batched vision attention reads (set per tower call by a pre-hook)."""
        mods = self._host_mods.get(id(layer))
        if mods is None:
            mods = self._host_mods[id(layer)] = [m for m in layer.modules() if _SEG in m.__dict__]
        return tuple(m.__dict__[_SEG] for m in mods)

    def _miss(self, why: str):
        self.misses[why] = self.misses.get(why, 0) + 1
        return None

    def _pool_handle(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else object()
        return self._pool

    def _statics_for(self, layer, leaves) -> _Statics:
        k = (type(layer), _layout(leaves))  # forward and backward graphs of a stack share them
        st = self.statics.get(k)
        if st is None:
            st = self.statics[k] = _Statics([_empty_like(t) for t in leaves])
        return st

    def _ready(self, key, layout) -> bool:
        """Count a normal run of ``key``; true once it has run ``warmup`` times and may be captured
        (at most ``max_signatures`` input layouts per layer)."""
        if self.stopped:
            self._miss("graphs stopped after a failed capture")
            return False
        n = self.seen.get(key, 0)
        if n < self.warmup:
            self.seen[key] = n + 1
            self._miss("warm-up")
            return False
        sigs = self.signatures.setdefault(key[0], set())
        if layout not in sigs and len(sigs) >= self.max_signatures:
            self._miss("signature limit")
            return False
        sigs.add(layout)
        return True

    def _fail(self, key, layer, kind, err, captured=False):
        self.entries[key] = None
        msg = f"{type(layer).__name__} {kind}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if captured:
            # a capture that failed half-way can leave CUDA state behind (the pool, the RNG's capture
            # flag): capture nothing more in this run; graphs captured before keep replaying
            self.stopped = True
            msg += " (no further captures in this run)"
        if msg not in self.failures:
            self.failures.append(msg)
            log.warning("CUDA graph capture failed, running this layer without graphs: %s", msg)

    def _capture(self, key, layer, kind, body):
        """Probe ``body``, then capture it; the graph, or None (logged) when the layer cannot be captured.

        The probe runs ``body`` once, normally, with synchronizing CUDA calls turned into errors (torch's
        sync debug mode): a layer that reads device values on the host (``.item()``, ``.tolist()``, copies
        from pageable memory) or would compile again cannot be captured, and finding that out in a real
        capture would leave the capture half-done."""
        try:
            with self._sync_guard():
                body()
        except Exception as err:  # noqa: BLE001 - the layer cannot be captured: it runs normally
            self._fail(key, layer, kind, err)
            return None
        try:
            graph = self._factory(self._pool_handle())
            graph.capture(body)
        except Exception as err:  # noqa: BLE001
            self._fail(key, layer, kind, err, captured=True)
            return None
        self.captured += 1
        return graph

    # ------------------------------------------------------------------ forward (no grad)
    def forward(self, layer_call, hidden, rest):
        """The layer's no-grad forward by graph replay, or MISS (then the caller runs it).
        ``layer_call``: (layer, f, kwargs) with f(layer, hidden, *rest, **kwargs) the layer's forward."""
        layer, call, kwargs = layer_call
        autocast = autocast_state(self.device.type)
        found = self._key(layer, kwargs, hidden, rest, autocast)
        if found is None:
            return MISS
        sig, leaves = found
        key = (id(layer), "F", sig)
        entry = self.entries.get(key, MISS)
        if entry is None:
            return MISS
        if entry is MISS:
            if not self._ready(key, _layout(leaves)) or (id(layer), sig) not in self.out_meta:  # the output's shapes come from a run
                out = call(layer, hidden, *rest, **kwargs)
                self._record_out(layer, sig, out)
                return out
            entry = self._capture_forward(key, layer, call, sig, leaves, autocast)
            if entry is None:
                return MISS
        st = entry.statics
        st.copy_in(leaves)
        entry.graph.replay()
        self.replays += 1
        outs = [o.clone() for o in st.outputs]
        for buf, o in zip(st.outputs, outs):
            st.handed_out(buf, o)  # outputs[0] is inputs[0]: the next layer's copy in is skipped
        return unflatten(entry.out_desc, iter(outs))

    def _record_out(self, layer, sig, out):
        leaves: list = []
        try:
            desc = flatten(out, leaves)
        except _Ungraphable:
            return
        # metadata only: holding the tensors would keep every layer's output alive until capture
        self.out_meta[(id(layer), sig)] = (desc, _layout(leaves))

    def _capture_forward(self, key, layer, call, sig, leaves, autocast):
        out_desc, out_examples = self.out_meta[(id(layer), sig)]
        st = self._statics_for(layer, leaves)
        if st.outputs is None:
            st.outputs = [torch.empty_strided(shape, stride, dtype=dt, device=self.device)
                          for shape, stride, dt in out_examples[1:]]
            shape, stride, dt = out_examples[0] if out_examples else (None, None, None)
            h0 = st.inputs[0]
            if len(out_examples) == 1 and _layout([h0]) == ((shape, stride, dt),):
                # the input buffer takes the output: the forward no longer needs its input when it
                # writes the output, and the next layer of the stack is called with that output (one
                # output only: a second one could be a view of the input, overwritten by the first)
                st.outputs.insert(0, h0)
            elif out_examples:
                st.outputs.insert(0, torch.empty_strided(shape, stride, dtype=dt, device=self.device))
        st.copy_in(leaves)
        desc = sig[0]

        def body():
            with torch.no_grad(), autocast_no_cache(self.device.type, autocast):
                args, kwargs = unflatten(desc, iter(st.inputs))
                out = call(layer, *args, **kwargs)
                got: list = []
                if flatten(out, got) != out_desc:
                    raise _Ungraphable("output structure changed")
                for dst, t in zip(st.outputs, got):
                    dst.copy_(t)

        graph = self._capture(key, layer, "forward", body)
        st.held.clear()  # the probe (and, off the GPU, the capture) ran the body: the buffers changed
        if graph is None:
            return None
        self.out_meta.pop((id(layer), sig), None)
        entry = self.entries[key] = _Entry(graph, st, out_desc)
        return entry

    # ------------------------------------------------------------------ backward (recompute + backward)
    def backward(self, layer_call, hidden, rest, grads, autocast):
        """Recompute the layer and backpropagate ``grads`` by graph replay: returns the gradient of
        ``hidden`` (None when it needs none) after adding the weights' gradients to their ``.grad``;
        MISS when not graphed (then the caller recomputes normally)."""
        if any(torch.is_tensor(r) and r.requires_grad for r in rest):
            self._miss("another argument needs a gradient")
            return MISS  # only the hidden state's and the weights' gradients are graphed
        layer, recompute, kwargs = layer_call
        found = self._key(layer, kwargs, hidden, rest, autocast)
        if found is None:
            return MISS
        sig, leaves = found
        mask = tuple(g is not None for g in grads)
        gleaves: list = []
        try:
            gdesc = flatten([g for g in grads if g is not None], gleaves)
        except _Ungraphable:
            return MISS
        key = (id(layer), "B", (sig, mask, gdesc))
        entry = self.entries.get(key, MISS)
        if entry is None:
            return MISS
        if entry is MISS:
            if not self._ready(key, _layout(leaves)):
                return MISS
            entry = self._capture_backward(key, layer, recompute, sig, leaves, hidden.requires_grad, mask,
                                           gdesc, gleaves, autocast)
            if entry is None:
                return MISS
        st = entry.statics
        st.copy_in(leaves)
        st.copy_into(entry.grad_outs, gleaves)  # skipped when grad_in holds it: the next layer's result
        entry.graph.replay()
        self.replays += 1
        acc, new = [], []
        for flat, members in entry.flats:
            fresh = flat.clone()  # the graph overwrites flat next time: hand autograd its own copy
            for p, off in members:
                g = fresh[off:off + p.numel()].view(p.shape)
                if p.grad is None:
                    p.grad = g
                else:
                    acc.append(p.grad)
                    new.append(g)
        if acc:  # gradient accumulation: one multi-tensor add
            torch._foreach_add_(acc, new)
        if not hidden.requires_grad:
            if st.grad_in is not None:
                st.handed_out(st.grad_in, None)
            return None
        grad = st.grad_in.clone()
        st.handed_out(st.grad_in, grad)
        return grad

    def _capture_backward(self, key, layer, recompute, sig, leaves, needs_h, mask, gdesc, gleaves, autocast):
        st = self._statics_for(layer, leaves)
        st.copy_in(leaves)
        grad_outs = st.grad_outs.get(gdesc)
        if grad_outs is None:
            grad_outs = st.grad_outs[gdesc] = [_empty_like(g) for g in gleaves]
        st.copy_into(grad_outs, gleaves)
        if needs_h and st.grad_in is None:
            h0 = st.inputs[0]
            same = bool(grad_outs) and _layout(grad_outs[:1]) == _layout([h0])
            # the output-gradient buffer: the backward no longer needs the output's gradient when it writes
            # the input's, and the previous layer's backward is called with that gradient
            st.grad_in = grad_outs[0] if same else _empty_like(h0)
        params = [p for p in layer.parameters() if p.requires_grad]
        flats = []
        # one set of flat gradient buffers per stack (its layers' trainable weights have the same shapes):
        # each replay's gradients are cloned out before the next replay
        shared = self.flat_bufs.setdefault((type(layer), tuple((p.shape, p.dtype) for p in params)), {})
        for dt in sorted({p.dtype for p in params}, key=str):
            members, off = [], 0
            for p in params:
                if p.dtype == dt:
                    members.append((p, off))
                    off += p.numel()
            if dt not in shared:
                shared[dt] = torch.empty(off, dtype=dt, device=self.device)
            flats.append((shared[dt], members))
        views = {id(p): flat[off:off + p.numel()].view(p.shape) for flat, ms in flats for p, off in ms}
        desc = sig[0]

        def body():
            with torch.enable_grad(), autocast_no_cache(self.device.type, autocast), recomputing():
                args, kwargs = unflatten(desc, iter(st.inputs))
                h = args[0].detach().requires_grad_(needs_h)
                out = recompute(layer, h, *args[1:], **kwargs)
                outs = out if isinstance(out, tuple) else (out,)
                sel = [o for o, m in zip(outs, mask) if m]
                if len(sel) != len(grad_outs) or not all(torch.is_tensor(o) and o.requires_grad for o in sel):
                    raise _Ungraphable("outputs with gradients do not match")
                targets = ([h] if needs_h else []) + params
                got = torch.autograd.grad(sel, targets, grad_outputs=grad_outs, allow_unused=True)
                if needs_h:
                    st.grad_in.copy_(got[0])
                dst, src = [], []
                for p, g in zip(params, got[1:] if needs_h else got):
                    if g is None:
                        views[id(p)].zero_()
                    else:
                        dst.append(views[id(p)])
                        src.append(g)
                _grouped_copy(dst, src)

        graph = self._capture(key, layer, "backward", body)
        st.held.clear()
        if graph is None:
            return None
        entry = self.entries[key] = _Entry(graph, st, flats=flats, grad_outs=grad_outs)
        return entry

    def copy_counts(self) -> tuple[int, int]:
        """(copies into static buffers made, copies skipped because the buffer held the source)."""
        sts = list(self.statics.values())
        return sum(s.copies for s in sts), sum(s.skipped for s in sts)

    def summary(self) -> dict:
        made, skipped = self.copy_counts()
        return {"captured": self.captured, "replays": self.replays, "failures": list(self.failures),
                "ran without graphs": dict(self.misses), "buffer copies": {"made": made, "skipped": skipped}}


class _CudaGraph:
    """torch.cuda.CUDAGraph sharing one memory pool: ``g.capture(body)`` records what ``body`` launches,
    ``g.replay()`` launches it again."""

    def __init__(self, pool):
        self.pool = pool
        self.g = torch.cuda.CUDAGraph()

    def capture(self, body):
        with torch.cuda.graph(self.g, pool=self.pool):
            body()

    def replay(self):
        self.g.replay()


def autocast_state(device_type: str) -> tuple:
    return (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))


def autocast_no_cache(device_type: str, state: tuple):
    """The autocast ``state`` (enabled, dtype) with its weight-cast cache off. Off inside a capture (cached
    casts would outlive the graph), and therefore off in the runs before it: the compiler guards on the
    flag, and a compile during a capture would fail."""
    return torch.autocast(device_type, dtype=state[1], enabled=state[0], cache_enabled=False)


@contextlib.contextmanager
def sync_errors():
    """Synchronizing CUDA calls raise inside this block."""
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def uses_rng(layer) -> bool:
    """Whether the layer draws random numbers in training (dropout): a replayed graph would draw new ones,
    so the recompute would not match the forward; such layers are not graphed, and only they need the
    checkpoint to save and restore the RNG state. Cached on the layer."""
    r = layer.__dict__.get("_harness_uses_rng")
    if r is None:
        r = layer.__dict__["_harness_uses_rng"] = any(
            (isinstance(m, torch.nn.Dropout) and m.p > 0)
            or any(isinstance(v, float) and v > 0 for k, v in vars(m).items() if k.endswith("dropout"))
            for m in layer.modules())
    return r


def graphs_wanted(kernels: bool, switch: bool, compile_mode: str) -> bool:
    """Per-layer graphs come with the kernels and their switch; not with torch's own CUDA graphs
    (``compile_mode=reduce-overhead``), which a capture cannot contain."""
    return kernels and switch and compile_mode != "reduce-overhead"


def graphs_supported(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


__all__ = ["LayerGraphs", "MISS", "graphs_supported", "graphs_wanted", "uses_rng", "flatten", "unflatten", "autocast_state",
           "autocast_no_cache"]

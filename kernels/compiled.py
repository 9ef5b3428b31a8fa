"""Regional compilation: every decoder layer and vision block through ``torch.compile``.

Why: with LoRA on all 324 linears of a 2B VLM, an eager training step issues thousands of small
kernels (casts, scale, add, norms, rope pieces) and the GPU waits on the host most of the time
(docs/benchmarks.md: 30% busy). Compiling one layer turns its forward and backward into a few
large generated Triton kernels around the cuBLAS matmuls, launched from a flat wrapper with no
per-op Python or autograd overhead. Every layer of a stack shares the same code, so a stack is
compiled once (Dynamo lifts the layer's parameters to graph inputs), not once per layer.

What runs inside a compiled layer (``compile_layers`` after :func:`prepare_for_compile`):

* LoRA linears (PEFT, one adapter, dropout 0, no DoRA): the same eligibility as the fused kernel;
  the forward is written for the compiler: the rank-r update and the bias in one ``addmm``
  (scale folded into alpha), the base matmul added into it by a second ``addmm`` (beta=1; traced, that
  add costs Inductor a copy of the output: ``kernels.lora_op`` runs the three GEMMs inside one opaque op,
  ``harness::lora_mm`` in kernels/lora_op.py, with the add in place), adapters
  cast to the activation dtype inside the graph (fp32 master weights stay fp32 for the
  optimizer). nf4 bases go through the registered ``harness::dequantize_nf4`` op (the Triton
  dequant kernel, opaque to the compiler).
* Norms, rotary embeddings and activations: the models' own PyTorch code, fused by Inductor with
  their neighbours (residual adds, casts): the hand-written kernels of this package stay for
  eager mode.
* Per-image / per-window vision attention (Qwen2-VL and Qwen2.5-VL style towers: packed patches,
  ``cu_seqlens``): when every segment a block attends within has the same length (every image the
  same number of patches; for Qwen2.5-VL's windowed blocks, every image a whole number of windows),
  one batched SDPA call over ``[segments, heads, length, dim]`` instead of a host-synchronised split
  and one call per segment. The lengths are read once per tower call, on the host, from ``grid_thw``,
  so the blocks themselves never synchronise (and can run as CUDA graphs).

Layers are found as transformers' ``GradientCheckpointingLayer`` instances, so checkpointing
(standard or offloaded) wraps the compiled layer unchanged.
"""

from __future__ import annotations

import inspect
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora_linear import _compute_dtype
from .lora_op import lowrank_addmm
from .nf4_dequant import dequantize_nf4_op, quant_state_tensors
from .patch import _lora_call_args, _mlp_act, _original_forward, _swap_forward, swap_lora_forward
from .tiled_mlp import _STATE as tiled_mlp_state
from .tiled_mlp import mlp_ends_layer, tiled_gated_mlp

__all__ = ["prepare_for_compile", "compile_layers", "uncompile_layers", "lean_lora_forward", "tiled_mlp_forward"]

_SEG = "_harness_seg_len"  # attention-module attribute: patches per attended segment (frame or window), or None
_LORA_OP = "_harness_lora_op"  # LoRA-linear / tiled-MLP attribute: kernels.lora_op (the sums in harness::lora_mm)


# --------------------------------------------------------------------------- LoRA
def lean_lora_forward(self, x, *args, **kwargs):
    """``base(x) + s * B(A(x))``: the rank-r update and the bias in one ``addmm`` (scale folded into alpha),
    the base matmul added by a second (beta=1); with ``kernels.lora_op`` the same three GEMMs inside the
    ``harness::lora_mm`` op. The adapters' casts stay traced. No fp32 round trip.

    The GEMMs run in autocast's dtype when autocast is on (as ``F.linear`` would: the Trainer's ``bf16=True``
    wraps the forward in autocast, and a LayerNorm there hands fp32 activations to the vision tower's qkv and
    fc1), else in the activation's dtype. The op is opaque to autocast, so without this an fp32 ``x`` made it
    cast the bf16 weight to fp32 and run fp32 SIMT GEMMs (seen on an H100: ~300 ms of them per anchor Trainer
    step, 9 per vision block)."""
    call = None if (args or kwargs) else _lora_call_args(self)
    if call is None:
        return _original_forward(self)(x, *args, **kwargs)
    w, b, A, B, s, nf4 = call
    dt = _compute_dtype(x)
    if x.dtype != dt:
        x = x.to(dt)
    if nf4 is not None:
        # plain tensors captured by prepare_for_compile: bitsandbytes' Params4bit subclass and the
        # QuantState's device scalar (.item()) stay out of the traced graph
        packed, absmax, bs, absmax2, code2, bs2, offset, wshape = self.__dict__["_harness_nf4_plain"]
        w = dequantize_nf4_op(packed, absmax, bs, absmax2, code2, bs2, offset, wshape, dt)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if self.__dict__.get(_LORA_OP):
        # one opaque op (kernels/lora_op.py): the base GEMM adds into the rank-r product in place; traced, that
        # add becomes an out-of-place addmm, which Inductor runs as a copy of the output plus the GEMM
        y = lowrank_addmm(x2, w.to(dt), A.to(dt), B.to(dt), s, None if b is None else b.to(dt))
    else:
        xa = F.linear(x2, A.to(dt))
        if b is not None:
            y = torch.addmm(b.to(dt), xa, B.to(dt).t(), alpha=s)
        else:
            y = torch.mm(xa, B.to(dt).t()) * s
        y = torch.addmm(y, x2, w.to(dt).t())
    return y.reshape(*shape[:-1], B.shape[0])


# --------------------------------------------------------------------------- vision attention
def _packed_patch_tower(m: nn.Module) -> bool:
    """A packed-patch vision tower whose blocks attend within each image or, for windowed towers
    (Qwen2.5-VL: ``fullatt_block_indexes``, ``window_size``), within fixed windows of each image."""
    blocks = getattr(m, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return False
    if hasattr(m, "fullatt_block_indexes") or hasattr(m, "window_size"):  # windowed: all of these or none
        if not isinstance(getattr(m, "fullatt_block_indexes", None), (list, tuple)) or not all(
                isinstance(getattr(m, n, None), int) for n in ("window_size", "patch_size", "spatial_merge_size")):
            return False
    try:
        params = inspect.signature(m.forward).parameters
    except (TypeError, ValueError):
        return False
    if "grid_thw" not in params:
        return False
    return all(_attention_patchable(getattr(b, "attn", None)) for b in blocks)


def _window_len(tower, grid_rows) -> int | None:
    """Patches per window when every window of every image is full, else None.

    Windows are squares of ``window_size // spatial_merge_size // patch_size`` merged units (each unit
    ``spatial_merge_size**2`` patches), laid out per frame; an image whose merged grid is not a whole
    number of windows gets partial windows at its edges (unequal lengths: the original split runs)."""
    merge = tower.spatial_merge_size
    vws = tower.window_size // merge // tower.patch_size
    if vws <= 0:
        return None
    for _t, h, w in grid_rows:
        if h % merge or w % merge or (h // merge) % vws or (w // merge) % vws:
            return None
    return vws * vws * merge * merge


def _attention_patchable(a) -> bool:
    if a is None or not all(hasattr(a, n) for n in ("qkv", "proj", "num_heads")):
        return False
    pymod = sys.modules.get(type(a).__module__)
    rope = getattr(pymod, "apply_rotary_pos_emb_vision", None)
    try:
        return rope is not None and "cu_seqlens" in inspect.signature(type(a).forward).parameters
    except (TypeError, ValueError):
        return False


def _standard(segments) -> bool:
    return segments is None or getattr(segments, "_harness_standard_segments", False)


def _set_segments(tower, args, kwargs):
    grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
    full = getattr(tower, "fullatt_block_indexes", None)  # windowed towers (Qwen2.5-VL): the full-attention blocks
    image_len = window_len = None
    if torch.is_tensor(grid) and grid.ndim == 2 and grid.shape[0] > 0:
        rows = [(int(t), int(h), int(w)) for t, h, w in grid.tolist()]  # a host sync per tower call, unless the grid is on the host (host_prep)
        sizes = {h * w for _t, h, w in rows}  # attention is per frame (cu_seqlens repeats h*w t times)
        # caller-given segments (transformers >= 5.1x accepts them as kwargs) are not ours to assume, unless
        # harness.host_prep built them from this grid (it marks them)
        if len(sizes) == 1 and _standard(kwargs.get("cu_seqlens")):
            image_len = sizes.pop()
        if full is not None and _standard(kwargs.get("cu_window_seqlens")):
            window_len = _window_len(tower, rows)
    for i, blk in enumerate(tower.blocks):
        windowed = full is not None and i not in full
        blk.attn.__dict__[_SEG] = window_len if windowed else image_len


def _batched_vision_attention(self, hidden_states, *args, **kwargs):
    seg = self.__dict__.get(_SEG)
    n = hidden_states.shape[0]
    position_embeddings = kwargs.get("position_embeddings")
    if args or seg is None or position_embeddings is None or n % seg or kwargs.get("output_attentions"):
        return _original_forward(self)(hidden_states, *args, **kwargs)
    rope = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rope(q, k, cos, sin)
    segs = n // seg

    def heads(t):  # [n, H, d] -> [segments, H, seg, d]
        return t.reshape(segs, seg, self.num_heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    return self.proj(out.transpose(1, 2).reshape(n, -1))


# --------------------------------------------------------------------------- entry points
def prepare_for_compile(model: nn.Module, want_lora: bool = True, tiled_mlp: bool = True,
                        lora_op: bool = True) -> dict:
    """Swap the compiler-friendly forwards in; return ``{what: [module names]}``.

    ``lora_op`` (default, as ``kernels.lora_op``): LoRA sums through the opaque ``harness::lora_mm`` op
    (kernels/lora_op.py), which adds the base GEMM in place; off, they are traced ``addmm`` calls, for which
    Inductor copies the output first (8% fewer tokens/s on the anchor workload, H100 2026-12-06).

    ``tiled_mlp``: gated MLPs whose projections are fused LoRA layers on 16-bit bases (or frozen plain
    linears) run as :func:`harness.kernels.tiled_mlp.tiled_gated_mlp`."""
    report: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        kind = swap_lora_forward(m, lean_lora_forward) if want_lora else None
        if kind is not None:
            if kind == "lora_linear_nf4":
                _capture_nf4(m)
            m.__dict__[_LORA_OP] = bool(lora_op)
            report.setdefault(kind, []).append(name)
            continue
        if _packed_patch_tower(m) and "_harness_seg_hook" not in m.__dict__:
            m.__dict__["_harness_seg_hook"] = m.register_forward_pre_hook(_set_segments, with_kwargs=True)
            for i, blk in enumerate(m.blocks):
                _swap_forward(blk.attn, _batched_vision_attention)
                report.setdefault("vision_attention_batched", []).append(f"{name}.blocks.{i}.attn")
    if tiled_mlp and want_lora:  # after the LoRA swaps above: it reads them
        for name, m in model.named_modules():
            if _tiled_mlp_eligible(m):
                _swap_forward(m, tiled_mlp_forward)
                m.__dict__[_LORA_OP] = bool(lora_op)
                report.setdefault("tiled_mlp", []).append(name)
        for m in model.modules():  # layers whose MLP output only feeds the final residual add
            mlp = getattr(m, "mlp", None)
            if isinstance(mlp, nn.Module) and "_harness_tiled_act" in mlp.__dict__ and mlp_ends_layer(type(m)):
                mlp.__dict__["_harness_mlp_ends_layer"] = True
    return report


# --------------------------------------------------------------------------- tiled gated MLP
def _proj_args(p: nn.Module):
    """(W, A, B, s) of a projection the tiled MLP can run, or None."""
    if "_harness_kernels_lora" in p.__dict__:
        call = _lora_call_args(p)
        if call is None or call[1] is not None or call[5] is not None:  # no bias, no nf4 (dequant stays per call)
            return None
        return call[0], call[2], call[3], call[4]
    if type(p) is nn.Linear and p.bias is None and not p.weight.requires_grad:
        return p.weight, None, None, 1.0
    return None


def _tiled_mlp_eligible(m: nn.Module) -> bool:
    act = _mlp_act(m)
    if act is None or not all(_proj_args(getattr(m, n)) is not None for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    m.__dict__["_harness_tiled_act"] = act
    return True


def tiled_mlp_forward(self, x):
    args = [_proj_args(getattr(self, n)) for n in ("gate_proj", "up_proj", "down_proj")]
    if any(a is None for a in args):  # adapters disabled / merged since the swap: the module's own forward
        return _original_forward(self)(x)
    (Wg, Ag, Bg, sg), (Wu, Au, Bu, su), (Wd, Ad, Bd, sd) = args
    skip = bool(self.__dict__.get("_harness_mlp_ends_layer")) and tiled_mlp_state["recompute"]
    dt = _compute_dtype(x)  # autocast's dtype when on, as for lean_lora_forward
    if x.dtype != dt:
        x = x.to(dt)
    return tiled_gated_mlp(x, Wg, Wu, Wd, Ag, Bg, Au, Bu, Ad, Bd, sg, su, sd, self.__dict__["_harness_tiled_act"], skip,
                           op=bool(self.__dict__.get(_LORA_OP)))


def _capture_nf4(m: nn.Module) -> None:
    """The nf4 base weight as plain tensors (packed bytes, absmax levels, offset) plus its block sizes
    and shape, read by :func:`lean_lora_forward` inside the compiled graph."""
    w = m.get_base_layer().weight
    absmax, bs, absmax2, code2, bs2, offset, wshape, _ = quant_state_tensors(w.quant_state)
    m.__dict__["_harness_nf4_plain"] = (w.data.as_subclass(torch.Tensor), absmax, bs, absmax2, code2, bs2,
                                        offset, list(wshape))


def compile_layers(model: nn.Module, backend: str = "inductor", mode: str | None = None,
                   combo_kernels: bool = True) -> list[str]:
    """``torch.compile`` every GradientCheckpointingLayer in place; return their names.

    ``combo_kernels``: with the model on CUDA, Inductor's combo kernels (``torch._inductor.config.combo_kernels``,
    process-wide): a layer's independent small kernels (adapter casts, gradient casts) become one launch.
    Measured +1.1% tokens/s on the anchor workload (H100) at +0.2 GiB peak; more kernels to compile. False leaves
    the setting as it is."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: no common layer class
        warnings.warn("compile_layers: transformers has no GradientCheckpointingLayer; nothing compiled")
        return []
    # one compiled graph per layer *stack* is the point; grad on/off, checkpoint recompute and a
    # second sequence length each add an entry, so leave room before Dynamo falls back to eager
    dyn = torch._dynamo.config
    dyn.cache_size_limit = max(dyn.cache_size_limit, 64)
    if hasattr(dyn, "accumulated_cache_size_limit"):
        dyn.accumulated_cache_size_limit = max(dyn.accumulated_cache_size_limit, 512)
    # a layer the compiler cannot handle (an unusual architecture, a new transformers) runs eager with the
    # compiler's error in the log, instead of ending the run
    dyn.suppress_errors = True
    if combo_kernels and backend == "inductor" and any(p.is_cuda for p in model.parameters()):
        import torch._inductor.config as inductor_config

        inductor_config.combo_kernels = True
    names = []
    recompute: dict = {}  # one compiled forward per layer class, for checkpointing's recompute
    for name, m in model.named_modules():
        if isinstance(m, GradientCheckpointingLayer) and m._compiled_call_impl is None:
            m.compile(backend=backend, mode=mode)
            fwd = _plain_forward(type(m))
            if fwd not in recompute:
                recompute[fwd] = torch.compile(fwd, backend=backend, mode=mode)
            m.__dict__["_harness_compiled_forward"] = recompute[fwd]
            names.append(name)
    return names


def _plain_forward(cls):
    """The layer class's forward without transformers' checkpointing wrapper (>= 5.2x wraps ``forward``;
    earlier versions checkpoint in ``__call__`` and leave ``forward`` alone)."""
    f = cls.forward
    if getattr(getattr(f, "__code__", None), "co_name", "") == "forward_with_checkpointing":
        return f.__wrapped__
    return f


def uncompile_layers(model: nn.Module) -> None:
    """Back to eager layers (the compiler-friendly forwards stay: they are plain PyTorch)."""
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
        m.__dict__.pop("_harness_compiled_forward", None)


def remove_segment_hooks(model: nn.Module) -> None:
    for m in model.modules():
        hook = m.__dict__.pop("_harness_seg_hook", None)
        if hook is not None:
            hook.remove()

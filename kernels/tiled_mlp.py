"""Gated MLP with LoRA (``down(act(gate(x)) * up(x))``), tiled over tokens, with an explicit backward.

Why: at 8k tokens per step the MLP's ``[tokens, intermediate]`` tensors (gate, up, act, their
gradients: 140 MiB each for Qwen2-VL-2B) are most of a checkpointed layer's recompute-and-backward
working set. Here forward and backward run over tiles of rows, the forward saves only the MLP's
input, and backward recomputes gate/up per tile: the transient is one tile's worth.

In a checkpoint's recompute the layer's output value is never read (only its autograd graph and
saved tensors are), so in decoder layers whose MLP output goes straight into the final residual add
(``hidden = residual + mlp(norm(hidden)); return hidden``: checked on the layer class's source, see
:func:`mlp_ends_layer`) the forward returns zeros while :func:`recomputing` is active. The backward
then does the MLP's forward work once, and the down projection's forward is not run at all.

Math per projection ``p`` (base ``W_p`` frozen, LoRA ``A_p [r, in]``, ``B_p [out, r]``, scale ``s_p``):
``y = x W^T + s (x A^T) B^T``; ``dx = dy W + s (dy B) A``; ``dA = s (dy B)^T x``; ``dB = s dy^T (x A^T)``.
The PyTorch reference is the unfused module (``gated_mlp_reference``); tests compare the two.
"""
from __future__ import annotations

import contextlib
import inspect
import re

import torch
import torch.nn.functional as F

from .lora_op import lora_mm, lora_mm_backward

__all__ = ["tiled_gated_mlp", "gated_mlp_reference", "TiledGatedMLPFunction", "recomputing", "mlp_ends_layer",
           "TILE_ROWS"]

TILE_ROWS = 2048  # rows per tile (tokens); the tile count is rounded up to a power of two
_STATE = {"recompute": False}


@contextlib.contextmanager
def recomputing():
    """Mark a checkpoint recompute: MLPs that end their layer skip their forward value."""
    prev = _STATE["recompute"]
    _STATE["recompute"] = True
    try:
        yield
    finally:
        _STATE["recompute"] = prev


_ENDS_LAYER = re.compile(r"self\.mlp\((\w+)\)\s*\n\s*(\w+)\s*=\s*residual\s*\+\s*\2\s*\n\s*return\s+\2\s*$")
_ENDS_CACHE: dict[type, bool] = {}


def mlp_ends_layer(layer_cls: type) -> bool:
    """True if ``layer_cls.forward`` ends with ``h = self.mlp(h); h = residual + h; return h`` (Llama, Qwen2,
    Qwen2-VL, Qwen2.5-VL, Mistral, Mllama self-attention layers; not Gemma 3, whose MLP output goes through
    a norm first). Read from the source, so a transformers version that changes the layer is caught."""
    if layer_cls not in _ENDS_CACHE:
        try:
            src = inspect.getsource(inspect.unwrap(layer_cls.forward)).rstrip()  # through decorator wrappers
            _ENDS_CACHE[layer_cls] = bool(_ENDS_LAYER.search(src)) and src.count("self.mlp(") == 1
        except (OSError, TypeError):
            _ENDS_CACHE[layer_cls] = False
    return _ENDS_CACHE[layer_cls]


def _act_fwd(g: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(g.float())
    return F.gelu(g.float(), approximate="tanh")


def _act_grad(g: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(g), act'(g)) in fp32."""
    g = g.float()
    if act == "silu":
        sig = torch.sigmoid(g)
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    c = 0.7978845608028654  # sqrt(2 / pi)
    inner = c * (g + 0.044715 * g * g * g)
    t = torch.tanh(inner)
    return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * g * g)


# ``op=True`` (kernels.lora_op): the sums go through ``harness::lora_mm`` (kernels/lora_op.py). Compiled, an
# out-of-place ``addmm(y, a, b)`` copies ``y`` first, here a [tile rows, intermediate] tensor; inside the op the
# add is in place. ``op=False``: the traced addmm (the path the 2026-12-05 GPU numbers were measured with).
def _proj(x, W, A, B, s, op=False):
    return _proj_xa(x, W, A, B, s, op)[0]


def _proj_xa(x, W, A, B, s, op=False):
    """``(x W^T + s (x A^T) B^T, x A^T)`` (``(x W^T, None)`` without LoRA). The recompute in backward keeps the
    rank-r product for dB."""
    if A is None:
        return x @ W.t(), None
    Ax, Bx = A.to(x.dtype), B.to(x.dtype)
    if op:
        return lora_mm(x, W, None, Ax, Bx, float(s))
    xa = x @ Ax.t()
    return torch.addmm(x @ W.t(), xa, Bx.t(), alpha=s), xa


def _proj_bwd(dy, x, W, A, B, s, grads, ia, ib, op=False, xa=None):
    """dx of one projection; LoRA grads accumulated into grads[ia] / grads[ib] (fp32). ``xa``: ``x A^T`` when the
    caller has it (else computed here)."""
    if A is None:
        return dy @ W.to(dy.dtype)
    Ad, Bd = A.to(dy.dtype), B.to(dy.dtype)
    if op:
        # the LoRA linear's backward op: dx = dy W + s (dy B) A in place, dA, dB (g and dB from one read of dy on a
        # GPU, see kernels/lora_op.py)
        dx, dA, dB = lora_mm_backward(dy, x, W.to(dy.dtype), Ad, Bd, x @ Ad.t() if xa is None else xa, float(s),
                                      True, True, True)
        grads[ia] += dA.float()
        grads[ib] += dB.float()
        return dx
    gB = dy @ Bd                                   # [n, r]
    dx = torch.addmm(dy @ W.to(dy.dtype), gB, Ad, alpha=s)
    grads[ia] += s * (gB.t() @ x).float()          # [r, in]
    grads[ib] += s * (dy.t() @ (x @ Ad.t() if xa is None else xa)).float()  # [out, r]
    return dx


def _tiles(n: int) -> int:
    t = max(1, -(-n // TILE_ROWS))
    return 1 << (t - 1).bit_length()


class TiledGatedMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, Wg, Wu, Wd, Ag, Bg, Au, Bu, Ad, Bd, sg, su, sd, act, skip, op):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out = (x2.new_zeros if skip else x2.new_empty)(x2.shape[0], Wd.shape[0])
        if not skip:
            for xt, ot in zip(x2.tensor_split(_tiles(x2.shape[0])), out.tensor_split(_tiles(x2.shape[0]))):
                g, u = _proj(xt, Wg, Ag, Bg, sg, op), _proj(xt, Wu, Au, Bu, su, op)
                h = (_act_fwd(g, act) * u.float()).to(xt.dtype)
                ot.copy_(_proj(h, Wd, Ad, Bd, sd, op))
        ctx.save_for_backward(x2, Wg, Wu, Wd, Ag, Bg, Au, Bu, Ad, Bd)
        ctx.scales, ctx.act, ctx.shape, ctx.op = (sg, su, sd), act, shape, op
        return out.view(*shape[:-1], Wd.shape[0])

    @staticmethod
    def backward(ctx, dout):
        x2, Wg, Wu, Wd, Ag, Bg, Au, Bu, Ad, Bd = ctx.saved_tensors
        sg, su, sd = ctx.scales
        act, op = ctx.act, ctx.op
        adapters = (Ag, Bg, Au, Bu, Ad, Bd)
        grads = [None if t is None else torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in adapters]
        dout2 = dout.reshape(-1, dout.shape[-1]).to(x2.dtype)
        dx = torch.empty_like(x2)
        n = _tiles(x2.shape[0])
        for xt, dyt, dxt in zip(x2.tensor_split(n), dout2.tensor_split(n), dx.tensor_split(n)):
            (g, xag), (u, xau) = _proj_xa(xt, Wg, Ag, Bg, sg, op), _proj_xa(xt, Wu, Au, Bu, su, op)
            a, da = _act_grad(g, act)
            h = (a * u.float()).to(xt.dtype)
            dh = _proj_bwd(dyt, h, Wd, Ad, Bd, sd, grads, 4, 5, op).float()
            dg = (dh * u.float() * da).to(xt.dtype)
            du = (dh * a).to(xt.dtype)
            dxt.copy_(_proj_bwd(dg, xt, Wg, Ag, Bg, sg, grads, 0, 1, op, xag)
                      + _proj_bwd(du, xt, Wu, Au, Bu, su, grads, 2, 3, op, xau))
        out = [None if gr is None else gr.to(t.dtype) for gr, t in zip(grads, adapters)]
        return (dx.view(ctx.shape), None, None, None, *out, None, None, None, None, None, None)


def tiled_gated_mlp(x, Wg, Wu, Wd, Ag=None, Bg=None, Au=None, Bu=None, Ad=None, Bd=None,
                    sg=1.0, su=1.0, sd=1.0, act: str = "silu", skip: bool | None = None, op: bool = False):
    """``down(act(gate(x)) * up(x))`` with LoRA on any of the three projections (``A=B=None``: none).
    ``skip=None`` reads :func:`recomputing` (the caller must know that the output value is unused).
    ``op``: the LoRA sums through ``harness::lora_mm`` (kernels/lora_op.py) instead of traced addmm."""
    if act not in ("silu", "gelu_tanh"):
        raise ValueError(f"tiled_gated_mlp: act={act!r} (allowed: silu, gelu_tanh)")
    if skip is None:
        skip = _STATE["recompute"]
    return TiledGatedMLPFunction.apply(x, Wg, Wu, Wd, Ag, Bg, Au, Bu, Ad, Bd, float(sg), float(su), float(sd),
                                       act, bool(skip), bool(op))


def gated_mlp_reference(x, Wg, Wu, Wd, Ag=None, Bg=None, Au=None, Bu=None, Ad=None, Bd=None,
                        sg=1.0, su=1.0, sd=1.0, act: str = "silu"):
    def proj(t, W, A, B, s):
        y = F.linear(t, W)
        return y if A is None else y + s * F.linear(F.linear(t, A.to(t.dtype)), B.to(t.dtype))

    g, u = proj(x, Wg, Ag, Bg, sg), proj(x, Wu, Au, Bu, su)
    h = (_act_fwd(g, act) * u.float()).to(x.dtype)
    return proj(h, Wd, Ad, Bd, sd)

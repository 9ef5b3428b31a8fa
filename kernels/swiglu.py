"""Gated activations: ``silu(gate) * up`` (SwiGLU) and ``gelu_tanh(gate) * up`` (GeGLU).

Forward reads gate and up once and writes h once; backward reads dh, gate, up and writes dgate,
dup (gate/up are saved, the activation is recomputed in registers, in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton_utils import jit, tl, triton, use_triton

__all__ = ["swiglu", "geglu", "gated_act", "gated_act_reference", "GatedActFunction"]

_ACTS = ("silu", "gelu_tanh")


def gated_act_reference(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    if act == "silu":
        return F.silu(gate) * up
    if act == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown activation {act!r}; expected one of {_ACTS}")


@jit
def _act_fwd(g, ACT: tl.constexpr):
    if ACT == 0:
        a = g * tl.sigmoid(g)
    else:
        # 0.5 * g * (1 + tanh(u)) == g * sigmoid(2u): no cancellation for negative g
        k0: tl.constexpr = 0.7978845608028654  # sqrt(2/pi)
        inner = k0 * (g + 0.044715 * g * g * g)
        a = g * tl.sigmoid(2.0 * inner)
    return a


@jit
def _act_fwd_bwd(g, ACT: tl.constexpr):
    # returns act(g), act'(g)
    if ACT == 0:
        sg = tl.sigmoid(g)
        a = g * sg
        da = sg * (1.0 + g * (1.0 - sg))
    else:
        k0: tl.constexpr = 0.7978845608028654
        inner = k0 * (g + 0.044715 * g * g * g)
        s = tl.sigmoid(2.0 * inner)  # = 0.5 * (1 + tanh(inner)); 1 - tanh^2 = 4 s (1 - s)
        a = g * s
        da = s + 2.0 * g * s * (1.0 - s) * k0 * (1.0 + 3.0 * 0.044715 * g * g)
    return a, da


@jit
def _gated_fwd_kernel(G, U, H, n_rows, n_cols, sg, su, sh, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * sg + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * su + cols, mask=mask, other=0.0).to(tl.float32)
    h = _act_fwd(g, ACT) * u
    tl.store(H + row * sh + cols, h.to(H.dtype.element_ty), mask=mask)


@jit
def _gated_bwd_kernel(
    DH, G, U, DG, DU, n_rows, n_cols, sdh, sg, su, sdg, sdu, ACT: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dh = tl.load(DH + row * sdh + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * sg + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * su + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_fwd_bwd(g, ACT)
    tl.store(DG + row * sdg + cols, (dh * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * sdu + cols, (dh * a).to(DU.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """2D [rows, cols] view with unit column stride (copies only if that is impossible)."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


_BLOCK = 1024


class GatedActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act):
        assert gate.shape == up.shape, "gate and up must have the same shape"
        act_id = _ACTS.index(act)
        g2, u2 = _rows(gate), _rows(up)
        n_rows, n_cols = g2.shape
        out_dtype = torch.result_type(gate, up)
        h = torch.empty((n_rows, n_cols), dtype=out_dtype, device=gate.device)
        if h.numel():
            grid = (n_rows, triton.cdiv(n_cols, _BLOCK))
            _gated_fwd_kernel[grid](
                g2, u2, h, n_rows, n_cols, g2.stride(0), u2.stride(0), h.stride(0),
                ACT=act_id, BLOCK=_BLOCK, num_warps=4,
            )
        ctx.save_for_backward(g2, u2)
        ctx.act_id = act_id
        ctx.shape = gate.shape
        ctx.dtypes = (gate.dtype, up.dtype)
        return h.view(gate.shape)

    @staticmethod
    def backward(ctx, dh):
        g2, u2 = ctx.saved_tensors
        dh2 = _rows(dh)
        n_rows, n_cols = g2.shape
        dg = torch.empty((n_rows, n_cols), dtype=ctx.dtypes[0], device=g2.device)
        du = torch.empty((n_rows, n_cols), dtype=ctx.dtypes[1], device=g2.device)
        if dg.numel():
            grid = (n_rows, triton.cdiv(n_cols, _BLOCK))
            _gated_bwd_kernel[grid](
                dh2, g2, u2, dg, du, n_rows, n_cols,
                dh2.stride(0), g2.stride(0), u2.stride(0), dg.stride(0), du.stride(0),
                ACT=ctx.act_id, BLOCK=_BLOCK, num_warps=4,
            )
        return dg.view(ctx.shape), du.view(ctx.shape), None


def gated_act(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` with act in {'silu', 'gelu_tanh'}."""
    if act not in _ACTS:
        raise ValueError(f"unknown activation {act!r}; expected one of {_ACTS}")
    if use_triton(gate, up) and gate.shape == up.shape:
        return GatedActFunction.apply(gate, up, act)
    return gated_act_reference(gate, up, act)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gated_act(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gated_act(gate, up, "gelu_tanh")

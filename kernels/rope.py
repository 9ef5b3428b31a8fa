"""Rotary position embedding (rotate_half convention) for q and k, forward and backward.

``cos``/``sin`` are what transformers' rotary modules return: ``[batch, seq, head_dim]`` with the
two halves equal (``cat((freqs, freqs), -1)``). Qwen2-VL's M-RoPE is covered by passing the
section-merged cos/sin (as ``Qwen2VLRotaryEmbedding`` returns them, or as built by
:func:`mrope_cos_sin` from 3D position ids).

Layouts: ``q``/``k`` are ``[batch, heads, seq, head_dim]`` (``unsqueeze_dim=1``, the HF attention
layout) or ``[batch, seq, heads, head_dim]`` (``unsqueeze_dim=2``). Any strides are accepted as
long as the last dim is contiguous. The kernel computes in fp32 and rounds once (the reference
rounds after each op in the input dtype, so 16-bit results differ by rounding only).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._triton_utils import jit, next_pow2, tl, use_triton

__all__ = [
    "apply_rotary_pos_emb",
    "apply_rotary_pos_emb_reference",
    "apply_multimodal_rotary_pos_emb_reference",
    "mrope_cos_sin",
    "RoPEFunction",
    "rotate_half",
]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Same math as transformers' ``apply_rotary_pos_emb`` (llama / qwen2 / qwen2_vl text)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def apply_multimodal_rotary_pos_emb_reference(q, k, cos, sin, mrope_section: Sequence[int], unsqueeze_dim: int = 1):
    """Qwen2-VL M-RoPE as in older transformers' ``apply_multimodal_rotary_pos_emb``.

    ``cos``/``sin`` are per-axis ``[3, batch, seq, head_dim]`` (temporal, height, width); the
    head dim is split by ``mrope_section * 2`` and section ``i`` takes axis ``i % 3``.
    """
    mrope_section = list(mrope_section) * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(mrope_section, dim=-1))], dim=-1)
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(mrope_section, dim=-1))], dim=-1)
    return apply_rotary_pos_emb_reference(q, k, cos, sin, unsqueeze_dim)


def mrope_cos_sin(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: Sequence[int],
    attention_scaling: float = 1.0,
    dtype: torch.dtype | None = None,
):
    """Section-merged M-RoPE cos/sin ``[batch, seq, head_dim]`` from 3D position ids.

    ``position_ids`` is ``[3, batch, seq]`` (or ``[batch, seq]``, broadcast to the 3 axes);
    ``inv_freq`` is ``[head_dim // 2]``; ``sum(mrope_section) == head_dim // 2``. Matches
    ``Qwen2VLRotaryEmbedding.forward`` (transformers 5.x), i.e. the cos/sin that the older
    ``apply_multimodal_rotary_pos_emb`` built inside attention.
    """
    if position_ids.dim() == 2:
        position_ids = position_ids[None]
    position_ids = position_ids.expand(3, -1, -1)
    freqs = position_ids[..., None].float() * inv_freq.to(device=position_ids.device, dtype=torch.float32)
    # pick axis i % 3 for frequency section i, then duplicate the halves
    freqs = torch.cat([m[i % 3] for i, m in enumerate(freqs.split(list(mrope_section), dim=-1))], dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * attention_scaling
    sin = emb.sin() * attention_scaling
    if dtype is not None:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos, sin


@jit
def _rope_kernel(
    X, COS, SIN, Y,
    seq_len, n_heads,
    sx_b, sx_h, sx_s,
    sy_b, sy_h, sy_s,
    sc_b, sc_s,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # one program per (batch, position); all heads of that position in one tile
    pid = tl.program_id(0)
    b = (pid // seq_len).to(tl.int64)
    s = (pid % seq_len).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    c_base = b * sc_b + s * sc_s
    cos1 = tl.load(COS + c_base + d, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + c_base + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + c_base + d, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + c_base + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h[:, None] < n_heads) & dmask[None, :]
        x_off = b * sx_b + s * sx_s + h[:, None].to(tl.int64) * sx_h + d[None, :]
        y_off = b * sy_b + s * sy_s + h[:, None].to(tl.int64) * sy_h + d[None, :]
        x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            # transpose of y = x*cos + rotate_half(x)*sin
            y1 = x1 * cos1[None, :] + x2 * sin2[None, :]
            y2 = x2 * cos2[None, :] - x1 * sin1[None, :]
        else:
            y1 = x1 * cos1[None, :] - x2 * sin1[None, :]
            y2 = x2 * cos2[None, :] + x1 * sin2[None, :]
        tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(Y + y_off + HALF, y2.to(Y.dtype.element_ty), mask=mask)


def _as_bhsd(x: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """View [b, s, h, d] input as [b, h, s, d] (strides only, no copy)."""
    return x if unsqueeze_dim == 1 else x.transpose(1, 2)


def _rope_launch(x, cos, sin, unsqueeze_dim: int, backward: bool, out_dtype: torch.dtype):
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    xv, yv = _as_bhsd(x, unsqueeze_dim), _as_bhsd(y, unsqueeze_dim)
    bsz, n_heads, seq, dim = xv.shape
    half = dim // 2
    cos = cos.expand(bsz, seq, dim)
    sin = sin.expand(bsz, seq, dim)
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    block_d = next_pow2(half)
    block_h = min(next_pow2(n_heads), max(1, 4096 // block_d))
    if bsz * seq > 0:
        _rope_kernel[(bsz * seq,)](
            xv, cos, sin, yv, seq, n_heads,
            xv.stride(0), xv.stride(1), xv.stride(2),
            yv.stride(0), yv.stride(1), yv.stride(2),
            cos.stride(0), cos.stride(1),
            HALF=half, BLOCK_H=block_h, BLOCK_D=block_d, BACKWARD=backward,
            num_warps=4,
        )
    return y


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):
        qo = _rope_launch(q, cos, sin, unsqueeze_dim, False, torch.result_type(q, cos))
        ko = _rope_launch(k, cos, sin, unsqueeze_dim, False, torch.result_type(k, cos))
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        ctx.dtypes = (q.dtype, k.dtype)
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        u = ctx.unsqueeze_dim
        dq = _rope_launch(dq, cos, sin, u, True, ctx.dtypes[0]) if dq is not None else None
        dk = _rope_launch(dk, cos, sin, u, True, ctx.dtypes[1]) if dk is not None else None
        return dq, dk, None, None, None


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Drop-in for transformers' ``apply_rotary_pos_emb`` (no grad flows to cos/sin)."""
    if (
        unsqueeze_dim in (1, 2)
        and q.dim() == 4
        and k.dim() == 4
        and cos.dim() == 3
        and q.shape[-1] % 2 == 0
        and use_triton(q, k, cos, sin)
        and not (cos.requires_grad or sin.requires_grad)
    ):
        return RoPEFunction.apply(q, k, cos, sin, unsqueeze_dim)
    return apply_rotary_pos_emb_reference(q, k, cos, sin, unsqueeze_dim)

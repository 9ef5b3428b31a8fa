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

from ._triton_utils import jit, next_pow2, tl, triton, use_triton

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
def _rope_tile(
    X, Y, COS, SIN, pid, n_pos, seq_len, n_heads,
    sx_b, sx_h, sx_s, sy_b, sy_h, sy_s, sc_b, sc_s,
    HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # rows of the tile = (position, head) pairs: BLOCK_S positions x BLOCK_H (padded) heads
    r = tl.arange(0, BLOCK_S * BLOCK_H)
    p = pid * BLOCK_S + r // BLOCK_H
    h = (r % BLOCK_H).to(tl.int64)
    rmask = (p < n_pos) & (h < n_heads)
    b = (p // seq_len).to(tl.int64)
    s = (p % seq_len).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (d < HALF)[None, :]
    c_off = (b * sc_b + s * sc_s)[:, None] + d[None, :]
    cos1 = tl.load(COS + c_off, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + c_off + HALF, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + c_off, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + c_off + HALF, mask=mask, other=0.0).to(tl.float32)
    x_off = (b * sx_b + s * sx_s + h * sx_h)[:, None] + d[None, :]
    y_off = (b * sy_b + s * sy_s + h * sy_h)[:, None] + d[None, :]
    x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # transpose of y = x*cos + rotate_half(x)*sin
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_off + HALF, y2.to(Y.dtype.element_ty), mask=mask)


@jit
def _rope_qk_kernel(
    Q, K, COS, SIN, QO, KO,
    n_pos, seq_len, n_q, n_k,
    sq_b, sq_h, sq_s, sqo_b, sqo_h, sqo_s,
    sk_b, sk_h, sk_s, sko_b, sko_h, sko_s,
    sc_b, sc_s,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # One launch for q and k; each program takes BLOCK_S positions, all heads of both. (One
    # program per position and tensor was launch- and latency-bound at 12 + 2 heads: 74% of copy.)
    pid = tl.program_id(0)
    _rope_tile(Q, QO, COS, SIN, pid, n_pos, seq_len, n_q, sq_b, sq_h, sq_s, sqo_b, sqo_h, sqo_s, sc_b, sc_s,
               HALF, BLOCK_D, BLOCK_HQ, BLOCK_S, BACKWARD)
    _rope_tile(K, KO, COS, SIN, pid, n_pos, seq_len, n_k, sk_b, sk_h, sk_s, sko_b, sko_h, sko_s, sc_b, sc_s,
               HALF, BLOCK_D, BLOCK_HK, BLOCK_S, BACKWARD)


@jit
def _rope_heads(
    X, Y, b, s, pmask, d, dmask, c1, c2, s1, s2, n_heads,
    sx_b, sx_h, sx_s, sy_b, sy_h, sy_s,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr,
):
    # a [BLOCK_S, BLOCK_H, BLOCK_D] tile: every head of BLOCK_S positions against their cos/sin rows
    h = tl.arange(0, BLOCK_H).to(tl.int64)
    mask = pmask[:, None, None] & (h < n_heads)[None, :, None] & dmask[None, None, :]
    x_off = (b * sx_b + s * sx_s)[:, None, None] + (h * sx_h)[None, :, None] + d[None, None, :]
    y_off = (b * sy_b + s * sy_s)[:, None, None] + (h * sy_h)[None, :, None] + d[None, None, :]
    x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_off + HALF, y2.to(Y.dtype.element_ty), mask=mask)


@jit
def _rope_qk3_kernel(
    Q, K, COS, SIN, QO, KO,
    n_pos, seq_len, n_q, n_k,
    sq_b, sq_h, sq_s, sqo_b, sqo_h, sqo_s,
    sk_b, sk_h, sk_s, sko_b, sko_h, sko_s,
    sc_b, sc_s,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # As _rope_qk_kernel, but cos/sin are loaded once per position and broadcast over the heads of q
    # and of k ([BLOCK_S, 1, BLOCK_D]), where the 2-D tiles load them once per (position, head) row:
    # at 12 + 2 heads, 4 cos/sin loads per position instead of 4 x (16 + 2).
    pid = tl.program_id(0)
    p = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    pmask = p < n_pos
    b = (p // seq_len).to(tl.int64)
    s = (p % seq_len).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    cmask = pmask[:, None] & dmask[None, :]
    c_off = (b * sc_b + s * sc_s)[:, None] + d[None, :]
    c1 = tl.load(COS + c_off, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
    c2 = tl.load(COS + c_off + HALF, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
    s1 = tl.load(SIN + c_off, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
    s2 = tl.load(SIN + c_off + HALF, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
    _rope_heads(Q, QO, b, s, pmask, d, dmask, c1, c2, s1, s2, n_q, sq_b, sq_h, sq_s, sqo_b, sqo_h, sqo_s,
                HALF, BLOCK_HQ, BACKWARD)
    _rope_heads(K, KO, b, s, pmask, d, dmask, c1, c2, s1, s2, n_k, sk_b, sk_h, sk_s, sko_b, sko_h, sko_s,
                HALF, BLOCK_HK, BACKWARD)


def _qk_compatible(q: torch.Tensor, k: torch.Tensor, unsqueeze_dim: int) -> bool:
    qv, kv = _as_bhsd(q, unsqueeze_dim), _as_bhsd(k, unsqueeze_dim)
    return qv.shape[0] == kv.shape[0] and qv.shape[2:] == kv.shape[2:]


def _as_bhsd(x: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """View [b, s, h, d] input as [b, h, s, d] (strides only, no copy)."""
    return x if unsqueeze_dim == 1 else x.transpose(1, 2)


# elements of q per program (positions x padded heads x head_dim) and the kernel, from
# `benchmarks/kernels_bench.py --tune-only --only rope` on an H100 (2026-12-05, 8,192 positions, bf16):
# "3d" ([positions, heads, dim] tiles, cos/sin loaded once per position for q and k) at 1-2K elements runs
# 88-89% of copy bandwidth forward and forward+backward at Qwen2-VL-2B's 12 + 2 heads and 95% at 28 + 4;
# "2d" ((position, head) rows, cos/sin loaded per row) peaks at 82-85% and 91-92%. The 3d kernel drops to
# 65-76% from 4K elements up, hence 2048.
ELEMS_PER_PROGRAM = 2048
KERNEL = "3d"


def _rope_launch(q, k, cos, sin, unsqueeze_dim: int, backward: bool, dtypes):
    """RoPE (or its transpose) of q and k in one kernel launch; returns new tensors."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    qo = torch.empty(q.shape, dtype=dtypes[0], device=q.device)
    ko = torch.empty(k.shape, dtype=dtypes[1], device=k.device)
    qv, kv = _as_bhsd(q, unsqueeze_dim), _as_bhsd(k, unsqueeze_dim)
    qov, kov = _as_bhsd(qo, unsqueeze_dim), _as_bhsd(ko, unsqueeze_dim)
    bsz, n_q, seq, dim = qv.shape
    n_k = kv.shape[1]
    if kv.shape[0] != bsz or kv.shape[2] != seq or kv.shape[3] != dim:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, seq or head_dim")
    half = dim // 2
    cos = cos.expand(bsz, seq, dim)
    sin = sin.expand(bsz, seq, dim)
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    block_d = next_pow2(half)
    block_hq, block_hk = next_pow2(n_q), next_pow2(n_k)
    per_pos = block_hq * 2 * block_d
    block_s = 1 << max(0, min(6, (ELEMS_PER_PROGRAM // per_pos).bit_length() - 1))  # a power of two
    n_pos = bsz * seq
    if n_pos > 0:
        kernel = _rope_qk3_kernel if KERNEL == "3d" else _rope_qk_kernel
        kernel[(triton.cdiv(n_pos, block_s),)](
            qv, kv, cos, sin, qov, kov, n_pos, seq, n_q, n_k,
            qv.stride(0), qv.stride(1), qv.stride(2), qov.stride(0), qov.stride(1), qov.stride(2),
            kv.stride(0), kv.stride(1), kv.stride(2), kov.stride(0), kov.stride(1), kov.stride(2),
            cos.stride(0), cos.stride(1),
            HALF=half, BLOCK_D=block_d, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_S=block_s,
            BACKWARD=backward, num_warps=4 if block_s * block_hq * block_d <= 4096 else 8,
        )
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):
        qo, ko = _rope_launch(q, k, cos, sin, unsqueeze_dim, False,
                              (torch.result_type(q, cos), torch.result_type(k, cos)))
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        ctx.dtypes = (q.dtype, k.dtype)
        ctx.shapes = (q.shape, k.shape)
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        u = ctx.unsqueeze_dim
        if dq is None and dk is None:
            return None, None, None, None, None
        # a missing gradient (q or k unused downstream) is a zero gradient
        dq_in = dq if dq is not None else torch.zeros(ctx.shapes[0], dtype=ctx.dtypes[0], device=cos.device)
        dk_in = dk if dk is not None else torch.zeros(ctx.shapes[1], dtype=ctx.dtypes[1], device=cos.device)
        dq_out, dk_out = _rope_launch(dq_in, dk_in, cos, sin, u, True, ctx.dtypes)
        return (dq_out if dq is not None else None), (dk_out if dk is not None else None), None, None, None


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Drop-in for transformers' ``apply_rotary_pos_emb`` (no grad flows to cos/sin)."""
    if (
        unsqueeze_dim in (1, 2)
        and q.dim() == 4
        and k.dim() == 4
        and cos.dim() == 3
        and q.shape[-1] % 2 == 0
        and _qk_compatible(q, k, unsqueeze_dim)
        and use_triton(q, k, cos, sin)
        and not (cos.requires_grad or sin.requires_grad)
    ):
        return RoPEFunction.apply(q, k, cos, sin, unsqueeze_dim)
    return apply_rotary_pos_emb_reference(q, k, cos, sin, unsqueeze_dim)

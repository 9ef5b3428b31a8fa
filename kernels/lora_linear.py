"""Fused LoRA linear: ``y = x W^T (+ b) + s * (x A^T) B^T`` with W frozen.

Forward, "cublas" path (3 cuBLAS calls, no separate scale/add kernels, no fp32 round trips)::

    xa = x @ A^T                           # [N, r], kept for backward
    y  = addmm(b, xa, B^T, alpha=s)        # the rank-r term (and bias) written once
    y += x @ W^T                           # big GEMM, beta=1 folds the add into its epilogue

Backward, "cublas" path (dX, dA, dB; dW / db only if they require grad)::

    gs = s * dy @ B                        # [N, r], s folded into the GEMM
    dx = gs @ A;  dx += dy @ W             # beta=1 again
    dA = gs^T @ x;  dB = s * dy^T @ xa     # one cuBLAS GEMM each (RANK_GRADS; "splitk": a split-K Triton kernel,
                                           # fp32 partials summed in a fixed order, no atomics)

Beside cuBLAS every rank-r product is a full pass over an activation, and the beta=1 adds cost two more (the
rank-r term written as an [N, out] or [N, in] tensor, then read back as the GEMM's C). So on a GPU (and in the
interpreter) :data:`PATHS` can take instead (``"auto"``, the default, picks per shape, :func:`_paths`; ``"cublas"``
keeps the cuBLAS path above everywhere):

* forward "epilogue": ``xa`` by cuBLAS, then one Triton GEMM (:func:`harness.kernels.lora_gemm.gemm_rank_epilogue`)
  adding ``(s xa) B^T`` and the bias in its epilogue: y written once, never re-read;
* dx "epilogue": one Triton GEMM ``dy W`` adding ``(s g) A`` in its epilogue;
* dy "fused": ``g = dy B`` and ``dB = dy^T xa`` from one read of dy (:func:`_dy_pass`; fp32 partials summed in a
  fixed order).

Adapters stored in fp32 (PEFT's ``autocast_adapter_dtype``) are cast to the activation dtype
for the matmuls (tiny ``[r, K]`` casts), and their grads are returned in their own dtype.

nf4 base weights (bitsandbytes ``Params4bit`` + ``QuantState``) are dequantised on the fly with
the Triton kernel of :mod:`nf4_dequant` in forward and again in backward (never saved).

:func:`lora_linear_grouped` handles several LoRA projections that share one input (Q/K/V, or
gate/up): one concatenated ``x @ [A_1; A_2; ...]^T`` in forward, one ``dx`` accumulation and one
``[g_1 s_1, g_2 s_2, ...]^T @ x`` for all dA in backward, so x is read twice instead of 2*n times.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F

from ._triton_utils import jit, next_pow2, num_sms, tl, triton, use_triton
from .nf4_dequant import dequantize_nf4

__all__ = [
    "lora_linear",
    "lora_linear_reference",
    "lora_linear_grouped",
    "lora_linear_grouped_reference",
    "LoRALinearFunction",
    "LoRAGroupedFunction",
]


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scale: float):
    """PEFT's math: ``base(x) + lora_B(lora_A(x)) * scale``."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_A), lora_B) * scale


def lora_linear_grouped_reference(x, weights, biases, As, Bs, scales):
    return [lora_linear_reference(x, w, b, a, bb, s) for w, b, a, bb, s in zip(weights, biases, As, Bs, scales)]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, AttributeError, RuntimeError):  # older torch signatures
        pass
    return x.dtype


def _cast(t, dtype):
    return None if t is None else (t if t.dtype == dtype else t.to(dtype))


def _materialize_weight(weight, nf4, dtype):
    if nf4 is not None:
        packed, quant_state = nf4
        return dequantize_nf4(packed, quant_state, dtype=dtype)
    return _cast(weight, dtype)


def _triton_ok(x2: torch.Tensor, W: torch.Tensor) -> bool:
    """The Triton GEMM paths apply: Triton can run on these tensors, in a dtype tl.dot takes (16-bit or fp32; bf16
    only on a GPU: the CPU interpreter's bf16 ``tl.dot`` returns garbage)."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if x2.is_cuda else (torch.float16, torch.float32)
    return use_triton(x2, W) and x2.dtype in dtypes and W.dtype == x2.dtype


def _mm_scaled(a, b, alpha: float, out_dtype=None):
    """``alpha * a @ b`` in one GEMM (alpha folded into cuBLAS)."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype or a.dtype, device=a.device)
    if alpha == 1.0:
        return torch.mm(a, b, out=out)
    return torch.addmm(out, a, b, beta=0, alpha=alpha, out=out)


def _sum_parts(parts: torch.Tensor, scale: float, dtype: torch.dtype, rows: int, cols: int,
               t: bool = False) -> torch.Tensor:
    """``scale * parts.sum(0)[:rows, :cols]`` (``parts`` [P, >=rows, >=cols] fp32) cast to ``dtype``, transposed to
    ``[cols, rows]`` (contiguous) if ``t``. Two fully parallel kernels: torch's sum over the leading dim (a fixed
    reduction order, so bitwise repeatable) and one multiply that scales, casts and (for ``t``) transposes on its
    store. (A single Triton kernel looping over the parts ran on a few dozen programs at these shapes, [P, N, 16]:
    4x slower than the dy pass itself on an H200, docs/kernels.md run 8.)"""
    assert parts.dtype == torch.float32 and rows <= parts.shape[1] and cols <= parts.shape[2]
    total = (parts[0] if parts.shape[0] == 1 else parts.sum(0))[:rows, :cols]
    if t:
        out = torch.empty((cols, rows), dtype=dtype, device=parts.device)
        torch.mul(total, scale, out=out.t())
        return out
    if scale == 1.0 and dtype == torch.float32:
        return total.contiguous()
    out = torch.empty((rows, cols), dtype=dtype, device=parts.device)
    return torch.mul(total, scale, out=out)


@jit
def _skinny_tn_kernel(
    G, X, C, N, R, K,
    sg_n, sg_r, sx_n, sx_k,
    ROWS_PER_SPLIT,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    # C[split, :, k-tile] = G[n0:n1, :R]^T @ X[n0:n1, k-tile]   (split-K over the token dim: one fp32 partial per
    # split, summed afterwards by _sum_parts in a fixed order: deterministic, no atomics, no zero fill)
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_start = pid_s * ROWS_PER_SPLIT
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for n0 in range(n_start, n_start + ROWS_PER_SPLIT, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = (offs_n < N) & (offs_n < n_start + ROWS_PER_SPLIT)
        g = tl.load(G + offs_n[:, None].to(tl.int64) * sg_n + offs_r[None, :] * sg_r,
                    mask=nmask[:, None] & (offs_r[None, :] < R), other=0.0)
        x = tl.load(X + offs_n[:, None].to(tl.int64) * sx_n + offs_k[None, :] * sx_k,
                    mask=nmask[:, None] & (offs_k[None, :] < K), other=0.0)
        if IEEE:
            acc = tl.dot(tl.trans(g), x, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(g), x, acc)
    tl.store(C + (pid_s * BLOCK_R + offs_r[:, None]).to(tl.int64) * K + offs_k[None, :], acc,
             mask=offs_k[None, :] < K)


def _skinny_tn(g: torch.Tensor, x: torch.Tensor, alpha: float, out_dtype: torch.dtype, t: bool = False) -> torch.Tensor:
    """``alpha * g^T @ x`` for tall g ``[N, r]`` and x ``[N, K]`` (r small, N large): the
    weight-gradient shape of LoRA (dA, dB). cuBLAS runs it on a handful of tiles (output is only
    ``[r, K]``); this Triton kernel splits the long N reduction over many programs instead (fp32 partials, summed
    in a fixed order, then scaled and cast: :func:`_sum_parts`). ``t``: return the transpose ``[K, r]``, contiguous."""
    N, R = g.shape
    K = x.shape[1]
    if not (use_triton(g, x) and g.dtype == x.dtype and R <= 64 and N >= 1):
        c = _mm_scaled(g.t(), x, alpha).to(out_dtype)
        return c.t().contiguous() if t else c
    block_r = max(16, next_pow2(R))
    block_k = 128 if x.is_cuda else 32
    block_n = 64 if x.is_cuda else 16
    k_tiles = triton.cdiv(K, block_k)
    target = (4 * torch.cuda.get_device_properties(x.device).multi_processor_count) if x.is_cuda else 4
    n_splits = max(1, min(triton.cdiv(N, block_n), triton.cdiv(target, k_tiles)))
    rows_per_split = triton.cdiv(triton.cdiv(N, n_splits), block_n) * block_n
    n_splits = triton.cdiv(N, rows_per_split)
    c = torch.empty((n_splits, block_r, K), dtype=torch.float32, device=x.device)
    _skinny_tn_kernel[(k_tiles, n_splits)](
        g, x, c, N, R, K, g.stride(0), g.stride(1), x.stride(0), x.stride(1), rows_per_split,
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
        num_warps=4, num_stages=3 if x.is_cuda else 1,
    )
    return _sum_parts(c, alpha, out_dtype, R, K, t=t)


@jit
def _dy_pass_kernel(
    DY, B, XA, GP, DBP, M, N, R, COLS_PER_GROUP,
    sdm, sdn, sbn, sbr, sxm, sxr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
):
    # One read of dy for both rank-r products of the backward. Program (i, j) owns rows [i BLOCK_M, +BLOCK_M) and
    # the j-th group of COLS_PER_GROUP columns; per BLOCK_N-column step of its dy tile:
    #   g_acc += dy[rows, cols] @ B[cols]           -> GP[j, rows]      (g = dy B: summed over the column groups)
    #   DBP[i, cols] = dy[rows, cols]^T @ xa[rows]   (dB = dy^T xa: summed over the row blocks)
    # Both partials are fp32 and summed afterwards in a fixed order (deterministic, no atomics).
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    orr = tl.arange(0, BLOCK_R)
    rrmask = orr < R
    xa = tl.load(XA + rows64[:, None] * sxm + orr[None, :] * sxr, mask=rmask[:, None] & rrmask[None, :], other=0.0)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    c0 = pid_c * COLS_PER_GROUP
    c1 = tl.minimum(c0 + COLS_PER_GROUP, N)
    for n0 in range(c0, c1, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < c1
        dy = tl.load(DY + rows64[:, None] * sdm + cols[None, :] * sdn, mask=rmask[:, None] & cmask[None, :], other=0.0)
        b = tl.load(B + cols[:, None] * sbn + orr[None, :] * sbr, mask=cmask[:, None] & rrmask[None, :], other=0.0)
        if IEEE:
            g = tl.dot(dy, b, g, input_precision="ieee")
            db = tl.dot(tl.trans(dy), xa, input_precision="ieee")
        else:
            g = tl.dot(dy, b, g)
            db = tl.dot(tl.trans(dy), xa)
        tl.store(DBP + (pid_m * N + cols[:, None]).to(tl.int64) * BLOCK_R + orr[None, :], db, mask=cmask[:, None])
    tl.store(GP + (pid_c * M + rows64[:, None]) * BLOCK_R + orr[None, :], g, mask=rmask[:, None])


# dA = g^T x and dB = dy^T xa (outside the fused dy pass) in the backward of lora_linear, lora_linear_grouped and the
# lora_op: "cublas", one GEMM each (alpha folded), or "splitk", :func:`_skinny_tn` (fp32 partials: an fp32 result).
# H100, docs/kernels.md run 9: the split-K dB is 2.8-10.5 us slower than cuBLAS's at each of 10 dy shapes (with its
# partial sums), so cuBLAS by default.
RANK_GRADS = "cublas"


def _rank_grad(g: torch.Tensor, x: torch.Tensor, alpha: float, out_dtype: torch.dtype, t: bool = False) -> torch.Tensor:
    """``alpha * g^T @ x`` (``[r, K]``; ``t``: its transpose ``[K, r]``, contiguous) in ``out_dtype``, by
    :data:`RANK_GRADS`."""
    if RANK_GRADS == "splitk":
        return _skinny_tn(g, x, alpha, out_dtype, t=t)
    c = _mm_scaled(x.t(), g, alpha) if t else _mm_scaled(g.t(), x, alpha)
    return c if c.dtype == out_dtype else c.to(out_dtype)


def _rank_dy(dy2: torch.Tensor, B: torch.Tensor, xa: torch.Tensor, s: float, path: str, need_g: bool, need_db: bool,
             db_dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The two rank-r products of a LoRA backward that read dy2: ``(s dy2 B`` [M, r] in dy2's dtype, ``s dy2^T xa``
    [N, r] in ``db_dtype``), each None unless asked for. dy ``path`` "fused" (both asked for): one read of dy
    (:func:`_dy_pass`); else one GEMM each (:func:`_mm_scaled`, :func:`_rank_grad`)."""
    if path == "fused" and need_g and need_db:
        return _dy_pass(dy2, B, xa, s, dy2.dtype, db_dtype)
    gs = _mm_scaled(dy2, B, s) if need_g else None
    dB = _rank_grad(xa, dy2, s, db_dtype, t=True) if need_db else None  # (xa^T dy)^T = dy^T xa
    return gs, dB


# The dy pass's launch on a GPU (kernels_bench.py --tune-dy sweeps it): row block, column step, programs per SM
# the column groups aim for, warps.
# H100, 10 dy shapes (docs/kernels.md run 9): this launch is within 3.5% of each shape's best (geometric mean);
# the previous one (block_n 64, 2 programs per SM) 14.6%.
DY_LAUNCH: dict[str, int] = {"block_m": 256, "block_n": 128, "programs_per_sm": 1, "warps": 8}


def _dy_pass_launch(M: int, N: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, column groups, warps) for the dy pass, from :data:`DY_LAUNCH`. Each row block adds one
    fp32 [N, r] partial of dB (``block_m`` 256: 1/8 of dy's bytes per 16 of rank, bf16); the columns are split into
    groups until there are ``programs_per_sm`` programs per SM (each group adds one fp32 [M, r] partial of g)."""
    if device.type != "cuda":
        return 16, 16, min(2, triton.cdiv(N, 16)), 4  # interpreter: several blocks and groups on small shapes
    block_m, block_n = DY_LAUNCH["block_m"], DY_LAUNCH["block_n"]
    target = DY_LAUNCH["programs_per_sm"] * torch.cuda.get_device_properties(device).multi_processor_count
    groups = max(1, min(triton.cdiv(N, block_n), triton.cdiv(target, triton.cdiv(M, block_m))))
    return block_m, block_n, groups, DY_LAUNCH["warps"]


def _dy_pass(dy2: torch.Tensor, B: torch.Tensor, xa: torch.Tensor, scale: float = 1.0,
             g_dtype: torch.dtype = torch.float32, db_dtype: torch.dtype = torch.float32,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale dy2 @ B, scale dy2^T @ xa)`` from one read of dy2 ([M, N]; B [N, r], xa [M, r]): the two rank-r
    products of a LoRA backward that read dy, which cuBLAS runs as two full passes over it. Accumulated in fp32,
    each summed over its partials, scaled and cast to ``g_dtype`` / ``db_dtype`` (:func:`_sum_parts`)."""
    M, N = dy2.shape
    R = B.shape[1]
    block_r = max(16, next_pow2(R))
    block_m, block_n, groups, warps = _dy_pass_launch(M, N, dy2.device)
    cols = triton.cdiv(triton.cdiv(N, groups), block_n) * block_n
    groups = triton.cdiv(N, cols)
    row_blocks = triton.cdiv(M, block_m)
    gp = torch.empty((groups, M, block_r), dtype=torch.float32, device=dy2.device)
    dbp = torch.empty((row_blocks, N, block_r), dtype=torch.float32, device=dy2.device)
    _dy_pass_kernel[(row_blocks, groups)](
        dy2, B, xa, gp, dbp, M, N, R, cols,
        dy2.stride(0), dy2.stride(1), B.stride(0), B.stride(1), xa.stride(0), xa.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, IEEE=dy2.dtype == torch.float32,
        num_warps=warps, num_stages=3 if dy2.is_cuda else 1,
    )
    return _sum_parts(gp, scale, g_dtype, M, R), _sum_parts(dbp, scale, db_dtype, N, R)


# Which kernels run a 16-bit LoRA linear on a GPU (or the interpreter), per direction:
#   fwd "epilogue": xa = x A^T (cuBLAS), then one Triton GEMM adding (s xa) B^T in its epilogue (lora_gemm);
#       "cublas": the rank-r term written as y, then y += x W^T by cuBLAS (beta=1).
#   dx  "epilogue": one Triton GEMM dy W adding (s g) A in its epilogue; "cublas": s g A, then += dy W (beta=1).
#   dy  "fused": g = dy B and dB = dy^T xa from one read of dy (_dy_pass); "cublas": two cuBLAS GEMMs (RANK_GRADS).
# "auto" picks per shape (see _paths); the benchmark (benchmarks/kernels_bench.py) sets each to time it.
# Default: auto (kernels.lora_paths, HARNESS_LORA_PATHS or set_paths; "cublas" keeps cuBLAS everywhere): +4.6% and
# +5.1% tokens/s on the anchor workload over cublas (H100, two rounds), LoRA gradients as close to an fp32 truth as
# cuBLAS's or closer at every module kind (benchmarks/lora_paths_precision.py; docs/kernels.md run 9).
PATHS: dict[str, str] = {"fwd": "auto", "dx": "auto", "dy": "auto"}
_CHOICES = {"fwd": ("auto", "epilogue", "cublas"), "dx": ("auto", "epilogue", "cublas"),
            "dy": ("auto", "fused", "cublas")}


def set_paths(spec: str) -> dict[str, str]:
    """Set :data:`PATHS` from ``"cublas"`` / ``"auto"`` (all three) or ``"fwd=epilogue,dx=cublas,dy=fused"``; a bad
    name or value raises, naming the choices. The environment variable ``HARNESS_LORA_PATHS`` is read at import
    (benchmark A/Bs in separate processes)."""
    spec = spec.strip()
    if spec in ("auto", "cublas"):
        PATHS.update(fwd=spec, dx=spec, dy=spec)
        return PATHS
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key not in _CHOICES or value not in _CHOICES[key]:
            raise ValueError(f"lora paths: {item!r} (allowed: auto, cublas, or comma-separated "
                             + "; ".join(f"{k}={'|'.join(v)}" for k, v in _CHOICES.items()) + ")")
        PATHS[key] = value
    return PATHS


if os.environ.get("HARNESS_LORA_PATHS"):
    set_paths(os.environ["HARNESS_LORA_PATHS"])


# dy "auto" beside two plain cuBLAS GEMMs (RANK_GRADS "cublas"): the fused pass from this many dy elements up, in
# lora_linear, the grouped form and the lora_op alike. H100, run 9: fused 150.8 us vs cuBLAS 215.6 us at
# [8192, 18944] timed alone, a tie at [8192, 1536] / [8192, 3584], cuBLAS ahead at the seven smaller shapes (the
# anchor's all); the anchor A/B agrees (+1.7% tokens/s over fused everywhere). Inside whole eager lora_linear calls
# (run 11: 5 interleaved rounds, median of the per-round ratios to the base, two calls) cuBLAS is ahead or tied at
# 10 of 12 shapes in each, by up to 36 points at the 4,096-row ones; fused leads at 3584^2 in kernel time only.
DY_FUSED_MIN_ELEMENTS = 1 << 26


def _paths(M: int, N: int, K: int, triton_ok: bool, sms: int) -> tuple[str, str, str]:
    """The (fwd, dx, dy) paths for x [M, K] -> y [M, N] on a GPU of ``sms`` multiprocessors. auto, per direction:
    the Triton epilogue GEMM where the tensor it spares (the [M, N] rank-r term forward, [M, K] backward) is at
    least as large as the GEMM's other side (N >= K forward, K >= N backward), or where its output fills the GPU
    at least twice over in 128 x 256 tiles. Measured on an H200 (docs/kernels.md, run 7): the epilogue GEMMs win at
    every M = 8,192 shape and lose only where a 2,048-row output is 96 tiles (under one wave: cuBLAS splits K there,
    our GEMM does not). The fused dy pass: for dy of at least :data:`DY_FUSED_MIN_ELEMENTS` elements (measured in
    isolation, inside eager calls and end to end: runs 9 and 11), and beside the split-K dB of
    ``RANK_GRADS = "splitk"`` always."""
    if not triton_ok:
        return "cublas", "cublas", "cublas"
    fwd, dx, dy = PATHS["fwd"], PATHS["dx"], PATHS["dy"]

    def fills(cols: int) -> bool:
        return triton.cdiv(M, 128) * triton.cdiv(cols, 256) >= 2 * sms

    if fwd == "auto":
        fwd = "epilogue" if N >= K or fills(N) else "cublas"
    if dx == "auto":
        dx = "epilogue" if K >= N or fills(K) else "cublas"
    if dy == "auto":
        dy = "fused" if RANK_GRADS != "cublas" or M * N >= DY_FUSED_MIN_ELEMENTS else "cublas"
    return fwd, dx, dy


# dA on a side CUDA stream, beside the dx GEMM: dA reads x2 and gs, which exist before the dx GEMM starts, and
# nothing in the backward reads dA, so its memory-bound pass over x can run on the multiprocessors the
# compute-bound GEMM leaves idle (under CUDA-graph capture too: the wait_stream pair forks and joins the graph).
# Here, for eager lora_linear: off (HARNESS_LORA_DA_STREAM=1 turns it on). Replayed as CUDA graphs it was ahead at 10
# of 12 shapes by 0.4-4 points of the base, but eager it costs ~57 us of host time per call, and eager calls at
# these shapes are host-bound (docs/kernels.md run 11). The lora_op (compiled layers) has its own switch,
# kernels/lora_op.py OP_DA_STREAM, on.
DA_STREAM: bool = os.environ.get("HARNESS_LORA_DA_STREAM", "0") == "1"
_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """One side stream per device, made once (a new stream per call would cost a CUDA call each time)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


def _dx_and_da(dx_fn, gs: torch.Tensor, x2: torch.Tensor, da_dtype: torch.dtype, need_a: bool, beside: bool):
    """``(dx_fn(), dA)`` with dA = ``gs^T x2`` ([r, K], None unless ``need_a``): dA after dx, or, with ``beside`` on
    CUDA, on the side stream while dx_fn's GEMM runs. There dA is allocated on the current stream and the side
    stream only writes it; gs and x2 are freed after the join, on the current stream. So no allocation crosses
    streams and no ``record_stream`` is needed (which graph capture would not allow)."""
    if not need_a:
        return dx_fn(), None
    if not (beside and gs.is_cuda):
        dx = dx_fn()
        return dx, _rank_grad(gs, x2, 1.0, da_dtype)
    main = torch.cuda.current_stream(gs.device)
    side = _side_stream(gs.device)
    dA = torch.empty((gs.shape[1], x2.shape[1]), dtype=da_dtype, device=gs.device)
    side.wait_stream(main)  # gs (and x2) are ready on main
    with torch.cuda.stream(side):
        if RANK_GRADS == "cublas" and da_dtype == gs.dtype:
            torch.mm(gs.t(), x2, out=dA)
        else:  # (a side-stream temporary, freed on the side stream: reused only by later side-stream work)
            dA.copy_(_rank_grad(gs, x2, 1.0, da_dtype))
    dx = dx_fn()
    main.wait_stream(side)  # the join: dA is ready on main
    return dx, dA


def _rank_forward(x2, W, xa, B, b, scale: float, path: str) -> torch.Tensor:
    """``x2 W^T (+ b) + scale xa B^T`` by the forward ``path`` of :func:`_paths` (shared with kernels/lora_op.py)."""
    if path == "epilogue":
        from .lora_gemm import gemm_rank_epilogue

        return gemm_rank_epilogue(x2, W, xa, B, b, scale)
    y = torch.addmm(b, xa, B.t(), alpha=scale) if b is not None else _mm_scaled(xa, B.t(), scale)
    y.addmm_(x2, W.t())
    return y


def _rank_dx(dy2, W, A, gs, path: str) -> torch.Tensor:
    """``dy2 W + gs A`` (``gs`` = s dy B, scaled already) by the dx ``path`` of :func:`_paths` (shared with
    kernels/lora_op.py)."""
    if path == "epilogue":
        from .lora_gemm import gemm_dx_rank_epilogue

        return gemm_dx_rank_epilogue(dy2, W, gs, A)
    dx = torch.mm(gs, A)
    dx.addmm_(dy2, W)
    return dx


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, nf4):
        cdt = _compute_dtype(x)
        in_shape = x.shape
        K = in_shape[-1]
        x2 = _cast(x.reshape(-1, K), cdt)
        W = _materialize_weight(weight, nf4, cdt)
        A = _cast(lora_A, cdt)
        B = _cast(lora_B, cdt)
        b = _cast(bias, cdt)
        paths = _paths(x2.shape[0], W.shape[0], K, _triton_ok(x2, W), num_sms(x2.device))
        with torch.autocast(device_type=x.device.type, enabled=False):
            xa = torch.mm(x2, A.t())
            y = _rank_forward(x2, W, xa, B, b, scale, paths[0])
        ctx.save_for_backward(x2, xa, weight, A, B, bias)  # A, B as cast here: the backward casts nothing again
        ctx.ab_dtypes = (lora_A.dtype, lora_B.dtype)
        ctx.paths = paths
        ctx.nf4 = nf4
        ctx.scale = scale
        ctx.cdt = cdt
        ctx.in_shape = in_shape
        ctx.x_dtype = x.dtype
        return y.view(*in_shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, weight, A, B, bias = ctx.saved_tensors
        cdt, s = ctx.cdt, ctx.scale
        a_dtype, b_dtype = ctx.ab_dtypes
        M = dy.shape[-1]
        dy2 = _cast(dy.reshape(-1, M), cdt)
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dx = dw = db = dA = dB = None
        _, dx_path, dy_path = ctx.paths
        with torch.autocast(device_type=dy.device.type, enabled=False):
            gs, dB = _rank_dy(dy2, B, xa, s, dy_path, need_x or need_a, need_bb, b_dtype)  # s dy B, s dy^T xa

            def dx_fn():
                if not need_x:
                    return None
                W = _materialize_weight(weight, ctx.nf4, cdt)
                dx = _rank_dx(dy2, W, A, gs, dx_path).view(ctx.in_shape)
                return dx if dx.dtype == ctx.x_dtype else dx.to(ctx.x_dtype)

            dx, dA = _dx_and_da(dx_fn, gs, x2, a_dtype, need_a, DA_STREAM)  # g^T x: [r, K], beside dx if DA_STREAM
            if need_w and weight is not None:
                dw = torch.mm(dy2.t(), x2).to(weight.dtype)
            if need_b and bias is not None:
                db = dy2.sum(0).to(bias.dtype)
        return dx, dw, db, dA, dB, None, None


def lora_linear(x, weight, bias, lora_A, lora_B, scale: float, nf4=None):
    """Fused LoRA linear.

    Args:
        x: ``[..., in]`` (any strides).
        weight: frozen base weight ``[out, in]`` (16-bit or fp32), or ``None`` when ``nf4`` is given.
        bias: optional ``[out]``.
        lora_A: ``[r, in]``; lora_B: ``[out, r]``; scale: ``lora_alpha / r`` (PEFT's ``scaling``).
        nf4: optional ``(packed_uint8, QuantState)`` of a bitsandbytes ``Params4bit`` base weight.
    """
    if nf4 is not None and weight is not None:
        raise ValueError("pass either weight or nf4, not both")
    if nf4 is None and weight is None:
        raise ValueError("weight or nf4 is required")
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scale), nf4)


class LoRAGroupedFunction(torch.autograd.Function):
    """n LoRA projections sharing x. Inputs: x, then n weights, n biases, n As, n Bs (flat). Each projection takes
    the kernel paths :func:`_paths` picks for its shape (as :func:`lora_linear` would alone); x is read once for all
    ``xa`` and once for all ``dA``, and dx is one GEMM with every projection's rank-r term plus one beta=1 GEMM per
    further projection."""

    @staticmethod
    def forward(ctx, x, scales, nf4s, *params):
        n = len(scales)
        weights, biases, As, Bs = params[:n], params[n : 2 * n], params[2 * n : 3 * n], params[3 * n :]
        cdt = _compute_dtype(x)
        K = x.shape[-1]
        x2 = _cast(x.reshape(-1, K), cdt)
        ranks = [a.shape[0] for a in As]
        A_cat = torch.cat([_cast(a, cdt) for a in As], 0)
        Bc = [_cast(bb, cdt) for bb in Bs]
        outs, paths = [], []
        sms = num_sms(x2.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xa = torch.mm(x2, A_cat.t())  # one read of x for all projections
            xas = xa.split(ranks, dim=1)
            for i in range(n):
                W = _materialize_weight(weights[i], nf4s[i], cdt)
                paths.append(_paths(x2.shape[0], W.shape[0], K, _triton_ok(x2, W), sms))
                y = _rank_forward(x2, W, xas[i], Bc[i], _cast(biases[i], cdt), scales[i], paths[-1][0])
                outs.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.save_for_backward(x2, xa, A_cat, *Bc, *params)
        ctx.scales, ctx.nf4s, ctx.ranks, ctx.paths = scales, nf4s, ranks, paths
        ctx.cdt, ctx.in_shape, ctx.x_dtype = cdt, x.shape, x.dtype
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        scales, ranks, cdt = ctx.scales, ctx.ranks, ctx.cdt
        n = len(scales)
        x2, xa, A_cat, *rest = ctx.saved_tensors
        Bc, params = rest[:n], rest[n:]
        weights, biases, As, Bs = params[:n], params[n : 2 * n], params[2 * n : 3 * n], params[3 * n :]
        need = ctx.needs_input_grad
        N = x2.shape[0]
        xas = xa.split(ranks, dim=1)
        dweights, dbiases, dAs, dBs = [None] * n, [None] * n, [None] * n, [None] * n
        dx = None
        with torch.autocast(device_type=x2.device.type, enabled=False):
            dy2s = []
            gs = []  # s_i dy_i B_i
            for i in range(n):
                dy = dys[i]
                if dy is None:
                    dy2s.append(None)
                    gs.append(torch.zeros((N, ranks[i]), dtype=cdt, device=x2.device))
                    continue
                dy2 = _cast(dy.reshape(-1, dy.shape[-1]), cdt)
                dy2s.append(dy2)
                g, dBs[i] = _rank_dy(dy2, Bc[i], xas[i], scales[i], ctx.paths[i][2], True, need[3 + 3 * n + i],
                                     Bs[i].dtype)
                gs.append(g)
            g = torch.cat(gs, 1)  # [N, sum r]
            live = [i for i in range(n) if dy2s[i] is not None]
            if need[0] and live:
                first = live[0]  # its GEMM adds every projection's rank-r term (g A_cat); the others add in place
                W = _materialize_weight(weights[first], ctx.nf4s[first], cdt)
                dx = _rank_dx(dy2s[first], W, A_cat, g, ctx.paths[first][1])
                for i in live[1:]:
                    dx.addmm_(dy2s[i], _materialize_weight(weights[i], ctx.nf4s[i], cdt))
                dx = dx.view(ctx.in_shape).to(ctx.x_dtype)
            if any(need[3 + 2 * n + i] for i in range(n)):
                dA_cat = _rank_grad(g, x2, 1.0, As[0].dtype)  # one read of x for all dA
                for i, dA in enumerate(dA_cat.split(ranks, 0)):
                    if need[3 + 2 * n + i]:
                        dAs[i] = dA.to(As[i].dtype)
            for i in live:
                if need[3 + i] and weights[i] is not None:
                    dweights[i] = torch.mm(dy2s[i].t(), x2).to(weights[i].dtype)
                if need[3 + n + i] and biases[i] is not None:
                    dbiases[i] = dy2s[i].sum(0).to(biases[i].dtype)
        return (dx, None, None, *dweights, *dbiases, *dAs, *dBs)


def lora_linear_grouped(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor | None],
    biases: Sequence[torch.Tensor | None],
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    nf4s: Sequence | None = None,
):
    """Several LoRA linears on the same x (e.g. q/k/v or gate/up). Returns a tuple of outputs."""
    n = len(As)
    nf4s = tuple(nf4s) if nf4s is not None else (None,) * n
    if not (len(weights) == len(biases) == len(Bs) == len(scales) == len(nf4s) == n):
        raise ValueError("weights, biases, As, Bs, scales (and nf4s) must have the same length")
    return LoRAGroupedFunction.apply(
        x, tuple(float(s) for s in scales), nf4s, *weights, *biases, *As, *Bs
    )

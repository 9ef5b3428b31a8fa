"""RMSNorm forward/backward (Llama/Qwen2 style, and Gemma's ``(1 + weight)`` offset).

Llama/Qwen2 (``offset=False``), matching ``LlamaRMSNorm``::

    y = weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)

Gemma (``offset=True``), matching ``Gemma3RMSNorm``::

    y = ((x.float() * rsqrt(mean(x.float()**2) + eps)) * (1 + weight.float())).to(x.dtype)

The backward returns dX and dW; dW is reduced per program in fp32 and the per-program partial rows
are summed by a second small kernel that stores straight into the weight's dtype. When the weight does not
require grad (LoRA training leaves the norms frozen) the backward computes dX alone: one kernel, no dW work.
"""

from __future__ import annotations

import torch

from ._triton_utils import jit, next_pow2, num_sms, tl, triton, use_triton

__all__ = ["rms_norm", "rms_norm_reference", "RMSNormFunction"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: bool = False) -> torch.Tensor:
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (h * (1.0 + weight.float())).to(input_dtype)
    return weight * h.to(input_dtype)


@jit
def _rms_fwd_kernel(
    X, W, Y, RSTD,
    stride_x, stride_y,
    n_cols, eps,
    OFFSET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    h = x * rstd
    if OFFSET:
        y = h * (1.0 + w)
    else:
        # Llama: cast the normalised value to the input dtype first, then multiply.
        y = w * h.to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@jit
def _rms_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    stride_dy, stride_x, stride_dx,
    n_rows, n_cols, blocks_per_program,
    OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
    DW_ROWS: tl.constexpr,
    HAS_DW: tl.constexpr,
):
    # Each program owns ``blocks_per_program`` consecutive tiles of BLOCK_M rows: a [BLOCK_M, BLOCK]
    # tile per step keeps BLOCK_M rows of loads in flight (one row at a time was latency-bound:
    # 56-63% of copy bandwidth on an H100); dW is accumulated per program in fp32.
    # STAGES > 1 lets Triton's software pipeliner issue the next tiles' loads while this tile
    # computes (the plain loop waits for each tile's loads); STAGES == 1 is the plain loop (the same
    # PTX as ``range``, compared offline with triton 3.9 for sm_90a).
    # DW_ROWS keeps a [BLOCK_M, BLOCK] dW accumulator summed over rows once at the end; without
    # it the rows are summed every tile into a [BLOCK] accumulator, BLOCK_M times fewer registers.
    # HAS_DW=False (a frozen weight, as in LoRA training): no dW work at all, dX only (the accumulator is then
    # dead code, which the compiler drops).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if OFFSET:
        w = w + 1.0
    if DW_ROWS:
        dw_acc = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)
    else:
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid * blocks_per_program * BLOCK_M
    for i in tl.range(0, blocks_per_program, num_stages=STAGES):
        rows = first + i * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows64, mask=rmask, other=0.0)
        h = x * rstd[:, None]
        if HAS_DW:
            if OFFSET:
                contrib = dy * h
            else:
                contrib = dy * h.to(X.dtype.element_ty).to(tl.float32)
            if DW_ROWS:
                dw_acc += contrib
            else:
                dw_acc += tl.sum(contrib, axis=0)
        dh = dy * w[None, :]
        c = tl.sum(dh * h, axis=1) / n_cols
        dx = rstd[:, None] * (dh - h * c[:, None])
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_DW:
        if DW_ROWS:
            tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=cmask)
        else:
            tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=cmask)


@jit
def _dw_sum_kernel(
    DW_PARTIAL, DW,
    n_prog, n_cols,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # dW = the fp32 partial rows summed over rows, stored in the weight's dtype: one launch where
    # torch needed two (a sum, then a cast). Each program owns BLOCK_N columns and walks all rows in
    # chunks of BLOCK_P; a fixed order and no atomics keep dW bit-for-bit deterministic. With BLOCK_P
    # >= n_prog (the default) the loop runs once: every row's load is in flight together, where a
    # 64-row chunk per trip made 5 dependent round trips to memory (4.2 us for 264 x 1536 on an H100,
    # 13% of the backward).
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, n_prog, BLOCK_P):
        rows = r0 + tl.arange(0, BLOCK_P)
        mask = (rows < n_prog)[:, None] & cmask[None, :]
        acc += tl.load(DW_PARTIAL + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(acc, axis=0).to(DW.dtype.element_ty), mask=cmask)


# The row sum's launch: (columns per program BLOCK_N, at most this many partial rows per load, warps).
# DW_SUM_CONFIG None: DW_SUM_DEFAULT; benchmarks/kernels_bench.py --tune-only --only rms sweeps it on a GPU.
DW_SUM_DEFAULT: tuple[int, int, int] = (16, 512, 4)
DW_SUM_CONFIG: tuple[int, int, int] | None = None


def _sum_config(n_prog: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_P, warps) for summing ``n_prog`` partial rows. Default: 16 columns per program (64 bytes,
    two 32-byte sectors per row; 96 programs at hidden 1536) and every row in one load up to 512 rows, 4 warps:
    the sweep's best at hidden 1536 (1.83 us for 264 rows, was 3.51 us) and second at 3584 (2.19 us, best
    2.15; was 3.57), H100, 2026-12-06."""
    block_n, max_p, warps = DW_SUM_CONFIG or DW_SUM_DEFAULT
    return block_n, min(next_pow2(n_prog), max_p), warps


def _sum_dw_partials(dw_partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum the backward's [n_prog, n_cols] fp32 dW partials over rows into a [n_cols] ``dtype`` tensor."""
    n_prog, n_cols = dw_partial.shape
    dw = torch.empty(n_cols, dtype=dtype, device=dw_partial.device)
    block_n, block_p, warps = _sum_config(n_prog)
    _dw_sum_kernel[(triton.cdiv(n_cols, block_n),)](
        dw_partial, dw, n_prog, n_cols, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps,
    )
    return dw


# Backward launch config per padded row width: (rows per tile BLOCK_M, programs per SM, warps,
# pipeline stages, dW accumulator per row). Tiles of ~4K elements keep x, dy, h and dx in registers;
# several programs per SM hide load latency; the fp32 dW partials (one row per program) stay a few
# MB. STAGES > 1 prefetches the next tiles through shared memory (more of it per program: large
# tiles times many stages may not fit, and such a config fails to launch, e.g. [8, 4096] bf16 tiles
# at 3 stages want 262 KB); DW_ROWS=False trades a row sum per tile for BLOCK_M times fewer dW
# accumulator registers (the [4, 2048] accumulator at 4 warps is 64 fp32 registers per thread:
# ptxas gives that default 255 registers and 120 bytes of spills, 253 and none without it; triton
# 3.9 for sm_90a, compiled offline, not timed). benchmarks/kernels_bench.py --tune (or --tune-only)
# sweeps these on a GPU and prints the best; set BWD_CONFIG[block] to try others.
BWD_CONFIG: dict[int, tuple[int, int, int, int, bool]] = {}


def _bwd_config(block: int) -> tuple[int, int, int, int, bool]:
    if block in BWD_CONFIG:
        return BWD_CONFIG[block]
    # the sweep's best on an H100 (benchmarks/kernels_bench.py --tune-only --only rms, 2026-12-05, 8,192 rows,
    # bf16): hidden 1536 (block 2048): 2-row tiles, 3 pipeline stages, per-row dW: 0.0320 ms, 78.7% of copy
    # bandwidth (was 4-row, 1 stage: 0.0344 ms, 73.2%); hidden 3584 (block 4096): 2-row tiles, 8 warps, plain
    # loop, per-column dW: 0.0681 ms, 86.2% (was 4-row, 16 warps: 0.0727 ms, 80.8%). Wider rows: not swept; the
    # plain loop with the per-column accumulator (no shared-memory pipeline to outgrow).
    if block <= 2048:
        return 2, 2, 4, 3, True
    return 2, 2, 8 if block <= 4096 else 16, 1, False


def _warps(block: int) -> int:
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        shape = x.shape
        n_cols = shape[-1]
        x2 = x.reshape(-1, n_cols)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_rows = x2.shape[0]
        out_dtype = x.dtype if offset else torch.result_type(weight, x)
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = next_pow2(n_cols)
        w = weight if weight.is_contiguous() else weight.contiguous()
        if n_rows > 0:
            _rms_fwd_kernel[(n_rows,)](
                x2, w, y, rstd, x2.stride(0), y.stride(0), n_cols, eps,
                OFFSET=offset, BLOCK=block, num_warps=_warps(block),
            )
        ctx.save_for_backward(x2, w, rstd)
        ctx.offset = offset
        ctx.shape = shape
        ctx.x_dtype = x.dtype
        return y.view(*shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty((n_rows, n_cols), dtype=ctx.x_dtype, device=x2.device)
        block = next_pow2(n_cols)
        block_m, per_sm, warps, stages, dw_rows = _bwd_config(block)
        n_blocks = triton.cdiv(max(n_rows, 1), block_m)
        n_prog = max(1, min(n_blocks, num_sms(x2.device) * per_sm))
        blocks_per_program = triton.cdiv(n_blocks, n_prog)
        n_prog = triton.cdiv(n_blocks, blocks_per_program)
        # a frozen weight (LoRA training: the norms are not adapted) gets no dW: no partials, no second kernel
        has_dw = bool(ctx.needs_input_grad[1])
        dw_partial = torch.empty((n_prog if has_dw else 1, n_cols), dtype=torch.float32, device=x2.device)
        if n_rows > 0:
            _rms_bwd_kernel[(n_prog,)](
                dy2, x2, w, rstd, dx, dw_partial,
                dy2.stride(0), x2.stride(0), dx.stride(0),
                n_rows, n_cols, blocks_per_program,
                OFFSET=ctx.offset, BLOCK_M=block_m, BLOCK=block, STAGES=stages, DW_ROWS=bool(dw_rows),
                HAS_DW=has_dw, num_warps=warps,
            )
        if not has_dw:
            dw = None
        elif n_rows > 0:
            dw = _sum_dw_partials(dw_partial, w.dtype)
        else:
            dw = torch.zeros_like(w)
        return dx.view(ctx.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim. Triton on CUDA (or under TRITON_INTERPRET=1), else the reference."""
    if use_triton(x, weight):
        return RMSNormFunction.apply(x, weight, float(eps), bool(offset))
    return rms_norm_reference(x, weight, eps, offset)

"""RMSNorm forward/backward (Llama/Qwen2 style, and Gemma's ``(1 + weight)`` offset).

Llama/Qwen2 (``offset=False``), matching ``LlamaRMSNorm``::

    y = weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)

Gemma (``offset=True``), matching ``Gemma3RMSNorm``::

    y = ((x.float() * rsqrt(mean(x.float()**2) + eps)) * (1 + weight.float())).to(x.dtype)

The backward returns dX and dW; dW is reduced per program in fp32 and summed once at the end.
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
):
    # Each program owns ``blocks_per_program`` consecutive tiles of BLOCK_M rows: a [BLOCK_M, BLOCK]
    # tile per step keeps BLOCK_M rows of loads in flight (one row at a time was latency-bound:
    # 56-63% of copy bandwidth on an H100); dW is accumulated per program in fp32.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if OFFSET:
        w = w + 1.0
    dw_acc = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)
    first = pid * blocks_per_program * BLOCK_M
    for i in range(0, blocks_per_program):
        rows = first + i * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows64, mask=rmask, other=0.0)
        h = x * rstd[:, None]
        if OFFSET:
            dw_acc += dy * h
        else:
            dw_acc += dy * h.to(X.dtype.element_ty).to(tl.float32)
        dh = dy * w[None, :]
        c = tl.sum(dh * h, axis=1) / n_cols
        dx = rstd[:, None] * (dh - h * c[:, None])
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=cmask)


# Backward launch shape per padded row width: (rows per tile, programs per SM, warps). Tiles of
# ~4K elements keep x, dy, h and dx in registers; several programs per SM hide load latency; the
# fp32 dW partials (one row per program) stay a few MB. benchmarks/kernels_bench.py --tune-rms
# sweeps these on a GPU and prints the best; set BWD_CONFIG[block] to try others.
BWD_CONFIG: dict[int, tuple[int, int, int]] = {}


def _bwd_config(block: int) -> tuple[int, int, int]:
    if block in BWD_CONFIG:
        return BWD_CONFIG[block]
    # measured on an H100 (benchmarks/kernels_bench.py --tune): 4-row tiles, 2 programs per SM
    return 4, 2, 4 if block <= 2048 else 16


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
        block_m, per_sm, warps = _bwd_config(block)
        n_blocks = triton.cdiv(max(n_rows, 1), block_m)
        n_prog = max(1, min(n_blocks, num_sms(x2.device) * per_sm))
        blocks_per_program = triton.cdiv(n_blocks, n_prog)
        n_prog = triton.cdiv(n_blocks, blocks_per_program)
        dw_partial = torch.empty((n_prog, n_cols), dtype=torch.float32, device=x2.device)
        if n_rows > 0:
            _rms_bwd_kernel[(n_prog,)](
                dy2, x2, w, rstd, dx, dw_partial,
                dy2.stride(0), x2.stride(0), dx.stride(0),
                n_rows, n_cols, blocks_per_program,
                OFFSET=ctx.offset, BLOCK_M=block_m, BLOCK=block, num_warps=warps,
            )
            dw = dw_partial.sum(0).to(w.dtype)
        else:
            dw = torch.zeros_like(w)
        return dx.view(ctx.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim. Triton on CUDA (or under TRITON_INTERPRET=1), else the reference."""
    if use_triton(x, weight):
        return RMSNormFunction.apply(x, weight, float(eps), bool(offset))
    return rms_norm_reference(x, weight, eps, offset)

"""The LoRA linear ``y = x W^T (+ b) + s (x A^T) B^T`` as two ``torch.library`` custom ops, for compiled layers.

Why ops and not traced code: the sum of the base and the low-rank product is cheapest as one GEMM that adds
into the other's output in place (cuBLAS ``beta=1``). Traced by torch.compile, an in-place ``addmm_`` is
functionalized into an out-of-place ``addmm(y, a, b)``, and Inductor's extern ``addmm`` copies ``y`` into a
new buffer before the GEMM. On the anchor workload that was 1,108 copies and 12.75 ms of a 172 ms step
(docs/benchmarks.md, 2026-12-05 profile: 280 of them [2048, 8960] MLP tiles). Inside an opaque op the
in-place add stays in place:

* ``harness::lora_mm(x, w, b, A, B, s) -> (y, xa)``: ``xa = x A^T``; ``y = b + s xa B^T`` (or ``s xa B^T``);
  ``y += x W^T`` in place. ``xa`` is returned for the backward (``dB = s dy^T xa``) and is not differentiable
  (call :func:`lowrank_addmm`, which returns ``y`` alone).
* ``harness::lora_mm_backward(dy, x, w, A, B, xa, s, ...) -> (dx, dA, dB)``: ``gs = s dy B``;
  ``dx = gs A``, ``dx += dy W`` in place; ``dA = gs^T x``; ``dB = s dy^T xa``. ``W`` frozen; bias and
  weight gradients, when asked for, come from the autograd wrapper.

On a GPU (and under the interpreter) they take the kernel paths chosen in :data:`harness.kernels.lora_linear.PATHS`
(``kernels.lora_paths``): with ``auto`` (the default), the Triton GEMMs with the rank-r product in their epilogue
where they win (:func:`harness.kernels.lora_linear._paths`; only for a contiguous ``w``) and the fused dy pass (``g``
and ``dB`` from one read of dy) where it beats this op's two cuBLAS GEMMs (large dy only); ``cublas``: cuBLAS
everywhere. Deterministic for a given launch config: no atomics, partial sums in a fixed order.
In the inputs' dtype, for 2-D ``x``. The reference is
:func:`harness.kernels.lora_linear.lora_linear_reference`; tests compare the two, eager and compiled.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ._triton_utils import num_sms
from .lora_linear import _dx_and_da, _paths, _rank_dx, _rank_dy, _rank_forward, _triton_ok

__all__ = ["lora_mm", "lora_mm_backward", "lowrank_addmm"]


@torch.library.custom_op("harness::lora_mm", mutates_args=())
def lora_mm(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor,
            s: float) -> tuple[torch.Tensor, torch.Tensor]:
    xa = torch.mm(x, A.t())
    return _rank_forward(x, w, xa, B, b, s, _op_paths(x, w)[0]), xa


def _op_paths(x: torch.Tensor, w: torch.Tensor) -> tuple[str, str, str]:
    """lora_linear's (fwd, dx, dy) kernel paths for ``x [M, K] -> [M, N]``; the Triton GEMMs only for a contiguous
    ``w`` (the tiled MLP's backward passes ``W^T`` views, which would take the slower pointer-load kernels)."""
    return _paths(x.shape[0], w.shape[0], w.shape[1], _triton_ok(x, w) and w.is_contiguous(), num_sms(x.device))


@lora_mm.register_fake
def _(x, w, b, A, B, s):
    return x.new_empty((x.shape[0], w.shape[0])), x.new_empty((x.shape[0], A.shape[0]))


# dA on a side stream beside the dx GEMM in the compiled layers' backward (lora_linear.DA_STREAM says how; here the
# layers replay CUDA graphs, so its host cost is paid once): +1.5% and +0.7% tokens/s on the anchor workload, two
# interleaved rounds (27,693 / 27,583 vs 27,292 / 27,379), peak +0.03 GiB, same loss (H100, 2026-12-07,
# docs/kernels.md run 11). HARNESS_LORA_OP_DA_STREAM=0 turns it off.
OP_DA_STREAM: bool = os.environ.get("HARNESS_LORA_OP_DA_STREAM", "1") == "1"


@torch.library.custom_op("harness::lora_mm_backward", mutates_args=())
def lora_mm_backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     xa: torch.Tensor, s: float, need_x: bool, need_a: bool,
                     need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, dx_path, dy_path = _op_paths(x, w)
    gs, dB = _rank_dy(dy, B, xa, s, dy_path, need_x or need_a, need_b, B.dtype)  # s dy B, s dy^T xa
    if dB is None:
        dB = B.new_empty((0,))
    dx, dA = _dx_and_da(lambda: _rank_dx(dy, w, A, gs, dx_path) if need_x else x.new_empty((0,)), gs, x, A.dtype,
                        need_a, OP_DA_STREAM)  # gs^T x: [r, K], beside the dx GEMM if OP_DA_STREAM
    return dx, dA if dA is not None else A.new_empty((0,)), dB


@lora_mm_backward.register_fake
def _(dy, x, w, A, B, xa, s, need_x, need_a, need_b):
    return (x.new_empty(x.shape) if need_x else x.new_empty((0,)),
            A.new_empty(A.shape) if need_a else A.new_empty((0,)),
            B.new_empty(B.shape) if need_b else B.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, w, b, A, B, s = inputs
    ctx.save_for_backward(x, w, A, B, output[1])
    ctx.s = s
    ctx.has_bias = b is not None


def _backward(ctx, dy, _dxa):
    # ``xa`` is an auxiliary output, saved for this backward: only lowrank_addmm calls lora_mm and it never
    # hands xa out, so its incoming gradient is autograd's materialized zeros and is ignored (the compiler
    # drops them as dead code)
    x, w, A, B, xa = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    dx, dA, dB = lora_mm_backward(dy, x, w, A, B, xa, ctx.s, need_x, need_a, need_b)
    dw = dy.t() @ x if need_w else None
    db = dy.sum(0) if need_bias and ctx.has_bias else None
    return (dx if need_x else None, dw, db, dA if need_a else None, dB if need_b else None, None)


lora_mm.register_autograd(_backward, setup_context=_setup_context)


def lowrank_addmm(x: torch.Tensor, w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float,
                  b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w^T (+ b) + s (x @ A^T) @ B^T`` for 2-D ``x``, the sum written once (see module docstring)."""
    return lora_mm(x, w, b, A, B, float(s))[0]

"""NF4 -> bf16/fp16/fp32 dequantisation in the bitsandbytes layout.

Layout (``bitsandbytes.functional.quantize_4bit``): the weight ``[out, in]`` is flattened
row-major; element ``i`` lives in byte ``i // 2`` (high nibble for even ``i``, low nibble for odd
``i``); its scale is ``absmax[i // blocksize]``. With double quantisation
(``compress_statistics=True``, ``quant_state.nested``), ``absmax`` is itself uint8 codes into the
8-bit dynamic map ``state2.code`` with fp32 scales ``state2.absmax`` per ``state2.blocksize``
(256) entries, plus a scalar ``offset``: ``absmax[j] = code2[q[j]] * absmax2[j // 256] + offset``.

The kernel decodes both levels in one pass on a 2D tile (absmax blocks x bytes), so each
scale is decoded once per block rather than once per element. The reference is bitsandbytes' own
``dequantize_4bit``; a pure-PyTorch reference (:func:`dequantize_nf4_torch`) is provided for
machines without bitsandbytes.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._triton_utils import jit, tl, triton, use_triton

__all__ = [
    "NF4_CODE",
    "dequantize_nf4",
    "dequantize_nf4_reference",
    "dequantize_nf4_torch",
    "quant_state_tensors",
]

# bitsandbytes.functional.get_4bit_type("nf4")
NF4_CODE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]

_code_cache: dict = {}


def _nf4_code(device) -> torch.Tensor:
    key = str(device)
    if key not in _code_cache:
        _code_cache[key] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return _code_cache[key]


def dequantize_nf4_reference(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """bitsandbytes' own dequantisation (needs bitsandbytes; CPU works with bnb >= 0.48)."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(packed, quant_state, quant_type="nf4")


def quant_state_tensors(quant_state):
    """(absmax, blocksize, nested_absmax, nested_code, nested_blocksize, offset, shape, dtype)."""
    qs = quant_state
    if getattr(qs, "quant_type", "nf4") != "nf4":
        raise ValueError(f"only nf4 is supported, got {qs.quant_type!r}")
    if qs.nested:
        s2 = qs.state2
        off = qs.__dict__.get("_harness_offset")
        if off is None:  # kept on the device as a 1-element tensor: never read on the host (no sync),
            # and compiled graphs take it as an input instead of baking a per-layer constant
            off = torch.as_tensor(qs.offset, dtype=torch.float32).to(qs.absmax.device).reshape(1)
            qs.__dict__["_harness_offset"] = off
        return qs.absmax, qs.blocksize, s2.absmax, s2.code, s2.blocksize, off, tuple(qs.shape), qs.dtype
    return qs.absmax, qs.blocksize, None, None, 0, None, tuple(qs.shape), qs.dtype


def dequantize_nf4_torch(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-PyTorch dequantisation with the same arithmetic as the kernel."""
    absmax, bs, absmax2, code2, bs2, offset, shape, qdtype = quant_state_tensors(quant_state)
    return _dequantize_torch(packed, absmax, bs, absmax2, code2, bs2, offset, shape, dtype or qdtype)


def _dequantize_torch(packed, absmax, bs, absmax2, code2, bs2, offset, shape, dtype) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    a = packed.reshape(-1).view(torch.uint8)
    idx = torch.stack(((a >> 4).long(), (a & 0xF).long()), dim=1).reshape(-1)[:n]
    vals = _nf4_code(a.device)[idx]
    if absmax2 is not None:
        j = torch.arange(absmax.numel(), device=a.device)
        am = code2.to(a.device, torch.float32)[absmax.long()] * absmax2.float()[j // bs2] + offset
    else:
        am = absmax.float()
    blk = torch.arange(n, device=a.device) // bs
    return (vals * am[blk]).to(dtype).reshape(shape)


@jit
def _nf4_kernel(
    A, ABSMAX, ABSMAX2, CODE2, OFFSET, OUT, CODE,
    n_bytes, n_out, n_blocks,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    ROWS: tl.constexpr,
):
    # 2D tile: ROWS absmax-blocks x BLOCKSIZE/2 bytes; the (nested) scale is decoded once per row
    HALF: tl.constexpr = BLOCKSIZE // 2
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_blocks
    if NESTED:
        q = tl.load(ABSMAX + rows, mask=rmask, other=0).to(tl.int32)
        s = tl.load(CODE2 + q, mask=rmask, other=0.0) * tl.load(ABSMAX2 + rows // BLOCKSIZE2, mask=rmask, other=0.0)
        scale = s + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + rows, mask=rmask, other=0.0).to(tl.float32)
    byte_idx = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    packed = tl.load(A + byte_idx, mask=byte_idx < n_bytes, other=0).to(tl.int32)
    v_hi = tl.load(CODE + ((packed >> 4) & 0xF)) * scale[:, None]
    v_lo = tl.load(CODE + (packed & 0xF)) * scale[:, None]
    vals = tl.interleave(v_hi, v_lo)  # [ROWS, BLOCKSIZE]: element 2i from the high nibble
    out_idx = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(OUT + out_idx, vals.to(OUT.dtype.element_ty), mask=out_idx < n_out)


def dequantize_nf4(
    packed: torch.Tensor,
    quant_state,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantise a bitsandbytes nf4 tensor (``Params4bit`` data + its ``QuantState``).

    Returns ``quant_state.shape`` in ``dtype`` (default ``quant_state.dtype``). Uses the Triton
    kernel on CUDA / under TRITON_INTERPRET=1, else the PyTorch implementation of the same arithmetic.
    """
    absmax, bs, absmax2, code2, bs2, offset, shape, qdtype = quant_state_tensors(quant_state)
    dtype = dtype or qdtype
    if not use_triton(packed):
        # by the layout's definition, not bitsandbytes' CPU op: bitsandbytes 0.50.2 on CPU is wrong when a row
        # is not a whole number of blocks (tests/kernels/test_nf4_dequant.py)
        res = dequantize_nf4_torch(packed, quant_state, dtype)
        if out is not None:
            out.copy_(res)
            return out
        return res
    return _dequantize_triton(packed, absmax, bs, absmax2, code2, bs2, offset, shape, dtype, out)


def _dequantize_triton(packed, absmax, bs, absmax2, code2, bs2, offset, shape, dtype, out=None) -> torch.Tensor:
    n_out = 1
    for s in shape:
        n_out *= s
    a = packed.reshape(-1)
    if a.dtype != torch.uint8:
        a = a.view(torch.uint8)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    assert out.is_contiguous() and out.numel() == n_out
    n_bytes = (n_out + 1) // 2
    n_blocks = (n_out + bs - 1) // bs
    rows = max(1, (4096 if packed.is_cuda else 256) // bs)
    code = _nf4_code(packed.device)
    nested = absmax2 is not None
    if nested:
        absmax2 = absmax2.float().contiguous()
        code2 = code2.to(device=packed.device, dtype=torch.float32).contiguous()
    else:
        absmax2 = code2 = offset = absmax  # unused
    grid = (triton.cdiv(n_blocks, rows),)
    _nf4_kernel[grid](
        a, absmax, absmax2, code2, offset, out, code,
        n_bytes, n_out, n_blocks,
        BLOCKSIZE=bs, BLOCKSIZE2=bs2 if nested else 1, NESTED=nested, ROWS=rows,
        num_warps=4,
    )
    return out


# torch.compile sees the dequantisation as one opaque op (the Triton launch, or the torch formula
# off-GPU): compiled layers on an nf4 base call this instead of tracing into the launcher.
@torch.library.custom_op("harness::dequantize_nf4", mutates_args=())
def dequantize_nf4_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    absmax2: Optional[torch.Tensor],
    code2: Optional[torch.Tensor],
    blocksize2: int,
    offset: Optional[torch.Tensor],
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    args = (packed, absmax, blocksize, absmax2, code2, blocksize2, offset, tuple(shape), dtype)
    if use_triton(packed):
        return _dequantize_triton(*args)
    return _dequantize_torch(*args)


@dequantize_nf4_op.register_fake
def _(packed, absmax, blocksize, absmax2, code2, blocksize2, offset, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)

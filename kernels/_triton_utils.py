"""Shared helpers: guarded Triton import and the dispatch rule (Triton vs PyTorch reference).

Triton kernels run when the tensor lives on CUDA, or on CPU when ``TRITON_INTERPRET=1`` is set
(the interpreter runs kernels on CPU tensors; used by the tests). Everywhere else the plain
PyTorch references run, so importing this package never requires Triton or a GPU.
"""

from __future__ import annotations

import os

import torch

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install (no compiler, wrong platform)
    import types as _types

    triton = None
    # Stub so that kernel signatures (``BLOCK: tl.constexpr``) still evaluate at import time.
    tl = _types.SimpleNamespace(constexpr=object)
    HAS_TRITON = False


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels can run on these tensors."""
    if not HAS_TRITON:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpret_mode() and all(t.device.type == "cpu" for t in tensors)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def jit(fn):
    """``triton.jit`` when Triton is importable, otherwise the function itself (never launched)."""
    if HAS_TRITON:
        return triton.jit(fn)
    return fn

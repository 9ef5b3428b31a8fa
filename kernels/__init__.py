"""Triton kernels, each beside its PyTorch reference and autograd wiring.

Installed as ``harness.kernels`` (see pyproject.toml) so that it never shadows Hugging Face's
top-level ``kernels`` package.
"""

# Imported as a top-level `kernels` (the repo root first on sys.path: `python -m harness.bench` or
# `python -c` from the checkout), this folder must not stand in for Hugging Face's `kernels` package, which
# transformers (>= 5.2x requires it) and bitsandbytes import with `from kernels import ...`: where that
# package is installed, it is loaded from the rest of sys.path and takes this module's place in
# sys.modules; where it is not, this module stays empty, exactly as if no `kernels` were installed.
# Installed, this folder is `harness.kernels` (pyproject.toml) with the API below.
if __name__ != "harness.kernels":

    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    __all__: list = []
    _here = _os.path.realpath(_os.path.dirname(_os.path.dirname(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        __name__, [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != _here])
    if _spec is not None and _spec.loader is not None:
        _this, _real = _sys.modules[__name__], _util.module_from_spec(_spec)
        _sys.modules[__name__] = _real  # the import statement hands out what sys.modules holds
        try:
            _spec.loader.exec_module(_real)
        except BaseException:
            _sys.modules[__name__] = _this
            raise
else:
    # Triton is imported lazily and guarded in ``_triton_utils``: without it (or without a GPU and
    # without TRITON_INTERPRET=1) every public function below runs its PyTorch reference.
    from ._triton_utils import HAS_TRITON, use_triton
    from .cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
    from .lora_linear import (
        lora_linear,
        lora_linear_grouped,
        lora_linear_grouped_reference,
        lora_linear_reference,
    )
    from .nf4_dequant import dequantize_nf4, dequantize_nf4_reference, dequantize_nf4_torch
    from .patch import KernelConfig, accelerate_model, revert_model
    from .rms_norm import rms_norm, rms_norm_reference
    from .rope import (
        apply_multimodal_rotary_pos_emb_reference,
        apply_rotary_pos_emb,
        apply_rotary_pos_emb_reference,
        mrope_cos_sin,
    )
    from .swiglu import gated_act, gated_act_reference, geglu, swiglu

    __all__ = [
        "HAS_TRITON",
        "use_triton",
        "rms_norm",
        "rms_norm_reference",
        "apply_rotary_pos_emb",
        "apply_rotary_pos_emb_reference",
        "apply_multimodal_rotary_pos_emb_reference",
        "mrope_cos_sin",
        "swiglu",
        "geglu",
        "gated_act",
        "gated_act_reference",
        "lora_linear",
        "lora_linear_reference",
        "lora_linear_grouped",
        "lora_linear_grouped_reference",
        "dequantize_nf4",
        "dequantize_nf4_reference",
        "dequantize_nf4_torch",
        "fused_linear_cross_entropy",
        "fused_linear_cross_entropy_reference",
        "accelerate_model",
        "revert_model",
        "KernelConfig",
    ]

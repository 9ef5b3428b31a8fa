"""Triton kernels, each beside its PyTorch reference and autograd wiring.

Installed as ``harness.kernels`` (see pyproject.toml) so that it never shadows Hugging Face's
top-level ``kernels`` package.
"""

# Imported as a top-level `kernels` (the repo root on sys.path, e.g. `python -c` from the checkout),
# this package stays empty: probes for Hugging Face's `kernels` (transformers' is_kernels_available,
# bitsandbytes' `from kernels import get_kernel`) then see no version and no API, exactly as when that
# package is not installed. Installed, it is `harness.kernels` (pyproject.toml) with the API below.
if __name__ != "harness.kernels":
    __all__: list = []
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

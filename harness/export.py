"""Merged checkpoints: fold LoRA into the base and save a plain HF checkpoint (safetensors) + processor.

From a 4-bit or 8-bit base the weights are dequantized first, then merged, so the result is a standard
16-bit (or fp32) checkpoint that `AutoModelForImageTextToText` / `AutoModelForCausalLM` load without
bitsandbytes.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def dequantize_linear(module) -> torch.nn.Linear | None:
    """A plain nn.Linear with the dequantized weight of a bitsandbytes layer (None if not one)."""
    kind = type(module).__name__
    if kind not in ("Linear4bit", "Linear8bitLt"):
        return None
    w = module.weight
    if kind == "Linear4bit":
        if getattr(w.quant_state, "quant_type", None) == "nf4":
            from harness.kernels import dequantize_nf4  # right on every device (bitsandbytes' CPU op is not)

            dense = dequantize_nf4(w.data, w.quant_state)
        else:
            import bitsandbytes.functional as F

            dense = F.dequantize_4bit(w.data, w.quant_state)
    else:
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = module.state.SCB
        dense = w.data.float() * scb.float().unsqueeze(1) / 127.0
    dtype = getattr(module, "compute_dtype", None) or torch.float32
    lin = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=dense.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(dense.to(dtype))
        if module.bias is not None:
            lin.bias.copy_(module.bias.to(dtype))
    lin.requires_grad_(False)
    return lin


def dequantize_model(model) -> int:
    """Replace every bitsandbytes linear (also PEFT base layers) with its dequantized nn.Linear, in place."""
    n = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            lin = dequantize_linear(child)
            if lin is not None:
                setattr(module, child_name, lin)
                n += 1
    return n


def _replace(root, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def merged_model(peft_model, dtype: torch.dtype | None = None):
    """The base with LoRA folded in (a plain transformers model): W' = dequant(W) + s * B @ A.

    Done here rather than with PEFT's merge_and_unload, whose bitsandbytes layers re-quantize the
    merged weight (lossy) instead of returning a dense one.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    base = peft_model.get_base_model()
    for name, module in list(base.named_modules()):
        if isinstance(module, LoraLayer):
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            layer = module.get_base_layer()
            dense = dequantize_linear(layer)
            if dense is None:
                dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                        device=layer.weight.device, dtype=layer.weight.dtype)
                dense.load_state_dict(layer.state_dict())
            with torch.no_grad():
                for a in adapters:
                    dense.weight += module.get_delta_weight(a).to(dense.weight.dtype)
                    if getattr(module, "lora_bias", {}).get(a, False):
                        dense.bias += (module.lora_B[a].bias * module.scaling[a]).to(dense.bias.dtype)
            dense.requires_grad_(False)
            _replace(base, name, dense)
        elif isinstance(module, ModulesToSaveWrapper):
            _replace(base, name, module.modules_to_save[module.active_adapter])
    n = dequantize_model(base)
    if n or getattr(base, "hf_quantizer", None) is not None:
        log.info("dequantized %d bitsandbytes layers", n)
        forget_quantization(base)
    if dtype is not None:
        base = base.to(dtype)
    return base


def forget_quantization(model) -> None:
    """Clear what marks a model as bitsandbytes-quantized once its layers are dense: the config entry (a saved
    checkpoint would ask for bitsandbytes) and `quantization_method`, which makes transformers refuse `.to(dtype)`."""
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    if "quantization_method" in model.__dict__:
        del model.quantization_method
    model.hf_quantizer = None


def save_merged(peft_model, processor, out_dir: Path, dtype: torch.dtype | None = None) -> Path:
    merged = merged_model(peft_model, dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir

"""Inject LoRA with PEFT from a TargetPlan (exact module names), or set up full fine-tuning."""
from __future__ import annotations

import logging

import torch

from harness.config import LoraConfig
from harness.targets import TargetPlan

log = logging.getLogger(__name__)


def peft_config(plan: TargetPlan, lo: LoraConfig):
    import peft

    init = lo.init_lora_weights
    kwargs = dict(
        r=lo.r, lora_alpha=lo.lora_alpha, lora_dropout=lo.lora_dropout, bias=lo.bias, use_rslora=lo.use_rslora,
        init_lora_weights=init, target_modules=plan.names, modules_to_save=plan.modules_to_save or None,
        rank_pattern=plan.rank_pattern(lo.r), alpha_pattern=plan.alpha_pattern(lo.lora_alpha),
    )
    if init == "loftq":
        kwargs["loftq_config"] = peft.LoftQConfig(**(lo.loftq_config or {}))
    return peft.LoraConfig(**kwargs)


def apply_lora(model, plan: TargetPlan, lo: LoraConfig, seed: int, quantized: bool):
    """Wrap `model` with PEFT LoRA on exactly plan.names; modules_to_save are trained fully in fp32."""
    import peft

    if quantized:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(lo.random_state if lo.random_state is not None else seed)
    model = peft.get_peft_model(model, peft_config(plan, lo))
    for name, module in model.named_modules():
        if isinstance(module, peft.utils.other.ModulesToSaveWrapper):
            for p in module.modules_to_save.parameters():
                p.data = p.data.float()
    return model


def setup_full_finetuning(model):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state(model) -> dict[str, torch.Tensor]:
    """A copy of every trainable tensor (LoRA weights and modules_to_save), for before/after checks."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

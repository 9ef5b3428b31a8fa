"""get_peft_model, for_training, for_inference: the CLI's stages after loading, called on the user's model.

get_peft_model runs what a CLI run runs after load_model: pipeline.make_plan (the TargetPlan), lora.apply_lora,
pipeline.accelerate (kernels on CUDA, references on CPU), then checkpointing.enable_checkpointing as train.train
does before it builds the trainer.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import types

from harness import modeling
from harness.api.errors import api_error, reject_unknown
from harness.api.state import ApiState, attach, find_state, state_of
from harness.config import ConfigError, LoraConfig, validate

log = logging.getLogger(__name__)

# (vision, language, attention, mlp) flags -> the conf/lora_strategy preset that sets them
STRATEGIES = {(True, True, True, True): "full", (False, True, True, True): "language_only",
              (True, False, True, True): "vision_only", (True, True, True, False): "attention_only",
              (True, True, False, True): "mlp_only"}


def get_peft_model(where: str, model, r=16, target_modules=None, lora_alpha=16, lora_dropout=0.0, bias="none",
                   finetune_vision_layers=True, finetune_language_layers=True, finetune_attention_modules=True,
                   finetune_mlp_modules=True, layers_to_transform=None, layers_pattern=None,
                   use_gradient_checkpointing="unsloth", random_state=3407, use_rslora=False, modules_to_save=None,
                   init_lora_weights=True, loftq_config=None, **kwargs):
    """The PEFT model with LoRA on the plan's modules; see harness.api.FastVisionModel.get_peft_model."""
    from harness.api.loading import checkpointing_mode

    reject_unknown(kwargs, where, ("finetune_projector",))
    state = state_of(model, where)
    _check_model(where, model, state)
    flags = dict(finetune_vision_layers=finetune_vision_layers, finetune_language_layers=finetune_language_layers,
                 finetune_attention_modules=finetune_attention_modules, finetune_mlp_modules=finetune_mlp_modules,
                 finetune_projector=kwargs.get("finetune_projector", False), use_rslora=use_rslora)
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {key}={value!r} (allowed: True or False)")
    lora = LoraConfig(
        strategy=strategy_name(target_modules, flags), target_modules=_target_modules(where, target_modules),
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
        layers_to_transform=None if layers_to_transform is None else list(layers_to_transform),
        layers_pattern=layers_pattern, random_state=_int_or_none(where, "random_state", random_state),
        modules_to_save=_names(where, "modules_to_save", modules_to_save),
        init_lora_weights=init_lora_weights, loftq_config=dict(loftq_config or {}), **flags)
    run = copy.deepcopy(state.run)
    run.lora = lora
    run.train.gradient_checkpointing = checkpointing_mode(where, use_gradient_checkpointing)
    try:
        run = validate(run)
        plan = _plan(run)
    except ConfigError as e:
        raise api_error(where, e) from None
    print(plan.format())
    for w in plan.warnings:
        print(f"warning: {w}")
    return _build(model, state, run, plan)


def _build(model, state: ApiState, run, plan):
    """apply_lora -> accelerate -> enable_checkpointing, the CLI's order; the state moves to the PEFT model."""
    from harness.checkpointing import enable_checkpointing
    from harness.layer_graphs import graphs_wanted
    from harness.lora import apply_lora
    from harness.pipeline import accelerate

    peft_model = apply_lora(model, plan, run.lora, run.seed, quantized=run.quant.mode != "none")
    trainable, _ = modeling.count_params(peft_model)
    if trainable != plan.trainable_params:  # as the CLI: PEFT must have received exactly the plan
        log.warning("trainable params %d differ from the plan's %d", trainable, plan.trainable_params)
    accelerated = accelerate(run, peft_model)
    k = run.kernels
    graphs = graphs_wanted(k.enabled != "false", k.cuda_graphs != "false", k.compile_mode)
    checkpointing = enable_checkpointing(peft_model, run.train.gradient_checkpointing, state.device, graphs=graphs)
    new = dataclasses.replace(state, run=run, plan=plan, accelerated=accelerated, checkpointing=checkpointing)
    attach(peft_model, new)
    attach(model, new)  # the base model (get_base_model()) answers harness_run_config too
    bind_methods(peft_model)
    keep_checkpointing(peft_model, checkpointing)
    return peft_model


def _plan(run):
    """pipeline.make_plan: the module tree of the checkpoint (its config.json) on the meta device, as a CLI run
    plans; the plan's module names are what PEFT receives."""
    from harness.pipeline import make_plan

    return make_plan(run)


def _check_model(where: str, model, state: ApiState) -> None:
    if state.run.train.full_finetuning:
        raise ValueError(f"{where}: model was loaded with full_finetuning=True: every weight already trains "
                         "(allowed: from_pretrained(..., full_finetuning=False) to train LoRA adapters)")
    if state.plan is not None or hasattr(model, "peft_config"):
        raise ValueError(f"{where}: model already has LoRA adapters (allowed: the model returned by from_pretrained, "
                         "before get_peft_model)")


def strategy_name(target_modules, flags: dict) -> str:
    """The conf/lora_strategy preset these flags are, or custom (also for explicit target_modules)."""
    if target_modules is not None or flags["finetune_projector"]:
        return "custom"
    key = tuple(flags[k] for k in ("finetune_vision_layers", "finetune_language_layers",
                                   "finetune_attention_modules", "finetune_mlp_modules"))
    return STRATEGIES.get(key, "custom")


def _target_modules(where: str, value):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{where}: target_modules={value!r} (allowed: None (the finetune_* flags), a list of module "
                     "names, a regex string, or 'all-linear')")


def _names(where: str, key: str, value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{where}: {key}={value!r} (allowed: None or a list of module names)")


def _int_or_none(where: str, key: str, value):
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError(f"{where}: {key}={value!r} (allowed: an integer or None)")


def keep_checkpointing(model, mode: str) -> None:
    """Keep what get_peft_model(use_gradient_checkpointing=...) set when a Trainer later calls
    activation_checkpointing_enable (TRL's SFTConfig turns it on by default): the CLI passes it off to the trainer
    for the same reason; the trainer's call would replace the offloaded checkpoint function of "unsloth"."""

    def enable(self, *args, **kwargs):
        log.info("checkpointing stays as get_peft_model(use_gradient_checkpointing=...) set it: %s", mode)

    for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        model.__dict__[name] = types.MethodType(enable, model)


def bind_methods(model) -> None:
    """The Unsloth-style methods on the model object: save_pretrained_merged, push_to_hub_merged (harness.api.saving)."""
    from harness.api.saving import push_to_hub_merged, save_pretrained_merged

    model.__dict__["save_pretrained_merged"] = types.MethodType(save_pretrained_merged, model)
    model.__dict__["push_to_hub_merged"] = types.MethodType(push_to_hub_merged, model)


def for_training(model):
    """Training mode: dropout on, no KV cache, right padding; gradient checkpointing as get_peft_model set it."""
    model.train()
    _use_cache(model, False)
    _padding_side(model, "right")
    return model


def for_inference(model):
    """Inference mode: eval, KV cache on, left-padded prompts (what batched generate() needs), eager layers."""
    model.eval()
    _use_cache(model, True)
    _padding_side(model, "left")
    state = find_state(model)
    if state is not None and state.accelerated.get("compiled_layers"):
        from harness.kernels.compiled import uncompile_layers

        uncompile_layers(model)  # as the CLI's evaluate: generation runs eager
    return model


def _use_cache(model, on: bool) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for c in {id(cfg): cfg, id(text): text}.values():
        c.use_cache = on


def _padding_side(model, side: str) -> None:
    from harness.processors import tokenizer_of

    state = find_state(model)
    if state is not None:
        tokenizer_of(state.processor).padding_side = side

"""Python API in the style of Unsloth's FastVisionModel / FastLanguageModel, over the CLI's own stages.

    from harness import FastVisionModel, VisionDataCollator
    model, processor = FastVisionModel.from_pretrained("path/or/hub-id", max_seq_length=2048)
    model = FastVisionModel.get_peft_model(model, r=16, finetune_vision_layers=False)

from_pretrained builds a RunConfig (harness/config.py) from its arguments, validates it and loads through
harness.modeling; get_peft_model plans (pipeline.make_plan), applies LoRA (lora.apply_lora), accelerates
(pipeline.accelerate) and sets up checkpointing (checkpointing.enable_checkpointing), as a CLI run does. What the
API knows about a model (RunConfig, TargetPlan, processor) is its ApiState (harness/api/state.py);
harness_run_config / harness_plan / cli_overrides read it, e.g. to run the same plan with the CLI:
`harness <cli_overrides(model)> data=...`.

The returned models carry two bound methods: model.save_pretrained_merged(dir, processor, save_method=
"merged_16bit" | "lora") and model.push_to_hub_merged(repo_id, processor, token=None, save_method=...)
(harness/api/saving.py).
"""
from __future__ import annotations

from harness.api import loading, peft
from harness.api.collator import UnslothVisionDataCollator, VisionDataCollator
from harness.api.state import ApiState, find_state, state_of
from harness.config import RunConfig
from harness.targets import TargetPlan

__all__ = ["FastVisionModel", "FastLanguageModel", "VisionDataCollator", "UnslothVisionDataCollator",
           "harness_run_config", "harness_plan", "cli_overrides", "ApiState"]


class FastVisionModel:
    """Vision-language models: from_pretrained -> (model, processor)."""

    @classmethod
    def from_pretrained(cls, model_name, max_seq_length=None, load_in_4bit=False, load_in_8bit=False,
                        load_in_16bit=None, dtype=None, full_finetuning=False, use_gradient_checkpointing="unsloth",
                        trust_remote_code=False, device_map=None, token=None, revision=None, **kwargs):
        """Load `model_name` (a local checkpoint directory or a hub id) and its processor.

        load_in_4bit / load_in_8bit: bitsandbytes nf4 / LLM.int8 base (at most one); dtype: None (bf16 / fp16 on
        GPU, fp32 on CPU), torch.bfloat16, torch.float16, torch.float32; full_finetuning: every weight trains (no
        get_peft_model); device_map: None / "auto" or one device. token and revision are refused (not passed through
        by harness.modeling). Extras: attn_implementation, min_pixels, max_pixels (ModelConfig). Unknown keyword
        arguments raise TypeError; bad values ValueError naming the parameter and the allowed values."""
        return loading.from_pretrained(f"{cls.__name__}.from_pretrained", model_name, max_seq_length, load_in_4bit,
                                       load_in_8bit, load_in_16bit, dtype, full_finetuning,
                                       use_gradient_checkpointing, trust_remote_code, device_map, token, revision,
                                       **kwargs)

    @classmethod
    def get_peft_model(cls, model, r=16, target_modules=None, lora_alpha=16, lora_dropout=0.0, bias="none",
                       finetune_vision_layers=True, finetune_language_layers=True, finetune_attention_modules=True,
                       finetune_mlp_modules=True, layers_to_transform=None, layers_pattern=None,
                       use_gradient_checkpointing="unsloth", random_state=3407, use_rslora=False,
                       modules_to_save=None, init_lora_weights=True, loftq_config={}, **kwargs):  # noqa: B006
        """LoRA on the modules the CLI's plan selects for these flags (printed as `harness mode=plan` prints it).

        target_modules: None (the finetune_* flags), a list of module names, a regex or "all-linear" (overrides the
        flags). use_gradient_checkpointing: "unsloth" (offloaded on CUDA; on CPU the CLI's auto: off), True, False.
        Extra: finetune_projector=True. Returns the PEFT model."""
        return peft.get_peft_model(
            f"{cls.__name__}.get_peft_model", model, r=r, target_modules=target_modules, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, bias=bias, finetune_vision_layers=finetune_vision_layers,
            finetune_language_layers=finetune_language_layers, finetune_attention_modules=finetune_attention_modules,
            finetune_mlp_modules=finetune_mlp_modules, layers_to_transform=layers_to_transform,
            layers_pattern=layers_pattern, use_gradient_checkpointing=use_gradient_checkpointing,
            random_state=random_state, use_rslora=use_rslora, modules_to_save=modules_to_save,
            init_lora_weights=init_lora_weights, loftq_config=loftq_config, **kwargs)

    @staticmethod
    def for_training(model):
        """Train mode, no KV cache, right padding; checkpointing stays as get_peft_model set it."""
        return peft.for_training(model)

    @staticmethod
    def for_inference(model):
        """Eval mode, KV cache on, left padding on the processor's tokenizer: ready for model.generate()."""
        return peft.for_inference(model)


class FastLanguageModel(FastVisionModel):
    """Text models: from_pretrained -> (model, tokenizer); the same stages as FastVisionModel."""


def harness_run_config(model) -> RunConfig:
    """The validated RunConfig behind `model` (its lora.* keys filled by get_peft_model)."""
    return state_of(model, "harness_run_config").run


def harness_plan(model) -> TargetPlan | None:
    """The TargetPlan get_peft_model applied (None before it, or with full fine-tuning)."""
    return state_of(model, "harness_plan").plan


def cli_overrides(model) -> list[str]:
    """Hydra overrides that make a CLI run (`harness ...` on top of conf/config.yaml) plan and load what this
    model holds: the checkpoint, quantization, LoRA keys, checkpointing. Add data=... / train.* of your own."""
    run = harness_run_config(model)
    m, lo, q = run.model, run.lora, run.quant
    preset = lo.strategy if lo.strategy in peft.STRATEGIES.values() else "custom"
    out = [f"model.name_or_path={_hydra(m.name_or_path)}", f"model.arch={m.arch}", "model.config=null",
           "model.random_init=false", f"model.name={_hydra(m.name)}"]
    out += [f"model.{k}={_hydra(getattr(m, k))}" for k in ("modules_to_save", "trust_remote_code",
                                                           "attn_implementation", "min_pixels", "max_pixels")]
    out += [f"quant.{k}={_hydra(getattr(q, k))}" for k in ("mode", "dtype", "quant_type", "double_quant",
                                                          "compute_dtype")]
    out += [f"lora_strategy={preset}"] + [f"lora.{k}={_hydra(v)}" for k, v in vars(lo).items()]
    out += [f"train.gradient_checkpointing={run.train.gradient_checkpointing}",
            f"train.full_finetuning={_hydra(run.train.full_finetuning)}", f"data.max_length={run.data.max_length}",
            f"device={run.device}"]
    return out


def _hydra(value) -> str:
    """A value in Hydra's override grammar (strings quoted, so paths and regexes pass unchanged)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra(v)}" for k, v in value.items()) + "}"
    return "'" + str(value).replace("'", "\\'") + "'"

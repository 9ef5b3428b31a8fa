"""from_pretrained: the Unsloth-style arguments -> a validated RunConfig -> harness.modeling's loaders.

The architecture comes from the checkpoint's own config.json (its model_type looked up in harness/registry.py);
processor and model load through harness.modeling.load_processor_for / load_model, as a CLI run loads them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from harness import modeling
from harness.api.errors import api_error, reject_unknown
from harness.api.state import ApiState, attach
from harness.config import (ConfigError, DataConfig, LoggerConfig, LoraConfig, ModelConfig, QuantConfig, RunConfig,
                            TrainConfig, validate)
from harness.registry import ARCHITECTURES, Architecture, architecture_of_model_type, transformers_class

log = logging.getLogger(__name__)

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# keyword arguments beyond Unsloth's signature: ModelConfig fields a caller may set (harness extras)
MODEL_EXTRAS = ("attn_implementation", "min_pixels", "max_pixels")
# Unsloth arguments accepted only at the value that means "off" here (vLLM is not part of the harness)
OFF_ONLY = {"fast_inference": False}


def from_pretrained(where: str, model_name, max_seq_length=None, load_in_4bit=False, load_in_8bit=False,
                    load_in_16bit=None, dtype=None, full_finetuning=False, use_gradient_checkpointing="unsloth",
                    trust_remote_code=False, device_map=None, token=None, revision=None, **kwargs):
    """(model, processor or tokenizer); see harness.api.FastVisionModel.from_pretrained."""
    reject_unknown(kwargs, where, (*MODEL_EXTRAS, *OFF_ONLY))
    for key, off in OFF_ONLY.items():
        if key in kwargs and kwargs.pop(key) != off:
            raise ValueError(f"{where}: {key} is not supported by the harness (allowed: {off!r})")
    _check_hub_args(where, token, revision)
    device = parse_device_map(where, device_map)
    run = build_run_config(where, model_name, max_seq_length, quant_config(where, load_in_4bit, load_in_8bit,
                                                                           load_in_16bit, dtype),
                           full_finetuning, checkpointing_mode(where, use_gradient_checkpointing),
                           trust_remote_code, device, kwargs)
    processor = modeling.load_processor_for(run.model)
    model = modeling.load_model(run.model, run.quant, device, processor, seed=run.seed)
    state = ApiState(run=run, processor=processor, device=device)
    if full_finetuning:  # as pipeline.build: every weight trainable, no plan
        from harness.checkpointing import enable_checkpointing
        from harness.lora import setup_full_finetuning

        model = setup_full_finetuning(model)
        state.checkpointing = enable_checkpointing(model, run.train.gradient_checkpointing, device)
    attach(model, state)
    from harness.api.peft import bind_methods

    bind_methods(model)
    return model, processor


def _check_hub_args(where: str, token, revision) -> None:
    """harness.modeling.load_model reads a checkpoint without token / revision: refuse them rather than drop them."""
    if token is not None:
        raise ValueError(f"{where}: token is not passed through by harness.modeling.load_model (allowed: None; for "
                         "a gated hub checkpoint log in with `huggingface-cli login` or download it and pass its "
                         "local directory as model_name)")
    if revision is not None:
        raise ValueError(f"{where}: revision={revision!r} is not passed through by harness.modeling.load_model "
                         "(allowed: None, the default branch; for another revision download it and pass its local "
                         "directory as model_name)")


def parse_device_map(where: str, device_map) -> torch.device:
    """None / "auto" -> the CLI's device=auto; a single device ("cpu", "cuda", "cuda:1", 0, torch.device, or
    {"": one of those}) -> that device. Splitting a model over devices is not supported."""
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if device_map is None or device_map == "auto":
        return modeling.resolve_device("auto")
    try:
        device = torch.device(f"cuda:{device_map}" if isinstance(device_map, int) and not isinstance(device_map, bool)
                              else device_map)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{where}: device_map={device_map!r} is not supported (allowed: None, 'auto', or one "
                         "device: 'cpu', 'cuda', 'cuda:N', N, torch.device, {'': device}); the harness does not "
                         "split a model over devices")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where}: device_map={device_map!r} but no CUDA device is available (allowed here: None, "
                         "'auto', 'cpu')")
    if device.type == "cuda" and device.index is None:
        device = modeling.resolve_device("cuda")
    return device


def quant_config(where: str, load_in_4bit, load_in_8bit, load_in_16bit, dtype) -> QuantConfig:
    """load_in_4bit / load_in_8bit / load_in_16bit and dtype -> quant.mode and quant.dtype."""
    chosen = [k for k, v in (("load_in_4bit", load_in_4bit), ("load_in_8bit", load_in_8bit),
                             ("load_in_16bit", load_in_16bit)) if v]
    if len(chosen) > 1:
        raise ValueError(f"{where}: {' and '.join(chosen)} are all true (allowed: at most one of load_in_4bit, "
                         "load_in_8bit, load_in_16bit)")
    name = dtype_name(where, dtype)
    if load_in_16bit and name == "float32":
        raise ValueError(f"{where}: dtype=float32 with load_in_16bit=True (allowed: dtype None, torch.bfloat16 or "
                         "torch.float16)")
    if load_in_16bit and name == "auto" and not torch.cuda.is_available():
        name = "bfloat16"  # auto would be fp32 on CPU; 16-bit was asked for
    mode = "4bit" if load_in_4bit else "8bit" if load_in_8bit else "none"
    return QuantConfig(mode=mode, dtype=name)


def dtype_name(where: str, dtype) -> str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, str) and dtype in DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise ValueError(f"{where}: dtype={dtype!r} is not supported (allowed: None (auto: bf16 / fp16 on GPU, fp32 on "
                     "CPU), torch.bfloat16, torch.float16, torch.float32)")


def checkpointing_mode(where: str, value) -> str:
    """use_gradient_checkpointing -> train.gradient_checkpointing. "unsloth" is the CLI's auto: offloaded on CUDA,
    off on CPU (nothing to offload to; small CPU runs gain nothing from recomputing)."""
    modes = {"unsloth": "auto", True: "true", False: "false", "true": "true", "false": "false"}
    if isinstance(value, (bool, str)) and value in modes:
        return modes[value]
    raise ValueError(f"{where}: use_gradient_checkpointing={value!r} is not supported (allowed: 'unsloth', True, "
                     "False)")


def architecture_of(where: str, model_name: str, trust_remote_code: bool) -> Architecture:
    """The registry entry whose config class has the checkpoint's model_type (architectures are data)."""
    from transformers import AutoConfig

    local = Path(model_name).expanduser()
    try:
        cfg = AutoConfig.from_pretrained(str(local) if local.is_dir() else model_name,
                                         trust_remote_code=trust_remote_code, local_files_only=local.is_dir())
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: model_name={model_name!r}: its config.json cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]}); allowed: a directory written by save_pretrained, or a hub id "
                         "reachable now or in the HF cache") from None
    arch = architecture_of_model_type(cfg.model_type)
    if arch is None:
        types = sorted(transformers_class(a.config_class).model_type for a in ARCHITECTURES.values())
        raise ValueError(f"{where}: model_name={model_name!r} is a {cfg.model_type!r} checkpoint, which "
                         f"harness/registry.py does not describe (allowed model types: {', '.join(types)})")
    return arch


def build_run_config(where: str, model_name, max_seq_length, quant: QuantConfig, full_finetuning: bool,
                     checkpointing: str, trust_remote_code: bool, device: torch.device, extras: dict) -> RunConfig:
    """The RunConfig a CLI run with the same choices would compose, validated by harness.config.validate."""
    if not isinstance(model_name, (str, Path)) or not str(model_name):
        raise ValueError(f"{where}: model_name={model_name!r} (allowed: a local checkpoint directory or a hub id)")
    model_name = str(model_name)
    if max_seq_length is not None and (isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int)
                                       or max_seq_length <= 0):
        raise ValueError(f"{where}: max_seq_length={max_seq_length!r} (allowed: None or an integer > 0)")
    if full_finetuning and quant.mode != "none":
        raise ValueError(f"{where}: full_finetuning=True with load_in_{quant.mode}=True (allowed: full fine-tuning "
                         "of a 16/32-bit base: load_in_4bit=False, load_in_8bit=False)")
    try:
        local = ModelConfig(name="api", arch="qwen2", name_or_path=model_name).checkpoint_dir()
    except ConfigError as e:
        raise api_error(where, e) from None
    arch = architecture_of(where, model_name, trust_remote_code)
    label = local.resolve().name if local is not None else model_name.rsplit("/", 1)[-1]
    mc = ModelConfig(name=label, arch=arch.name, name_or_path=model_name, config={},
                     trust_remote_code=trust_remote_code, modules_to_save=[], **extras)
    data = DataConfig(name="python_api", **({"max_length": max_seq_length} if max_seq_length else {}))
    run = RunConfig(model=mc, lora=LoraConfig(strategy="none"), quant=quant, data=data,
                    train=TrainConfig(gradient_checkpointing=checkpointing, full_finetuning=full_finetuning),
                    logger=LoggerConfig(backend="none"), device=device.type)
    try:
        return validate(run)
    except ConfigError as e:
        raise api_error(where, e) from None

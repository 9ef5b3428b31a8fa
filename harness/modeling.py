"""Load the model and its processor: a hub id, a local checkpoint, or a random-init architecture.

One code path for all three: `model.name_or_path` names a checkpoint (hub id or directory); with
none (or `model.random_init=true`) the architecture's config class is built from `model.config`
and the weights are random (offline default, tests, benchmarks).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile

import torch

from harness.config import ConfigError, ModelConfig, QuantConfig
from harness.processors import build_local_processor, load_processor, tokenizer_of
from harness.registry import Architecture, get_architecture, transformers_class

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun: one GPU per process
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("invalid config: device='cuda' but no CUDA device is available (allowed here: auto, cpu)")
    return torch.device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def is_random_init(mc: ModelConfig) -> bool:
    return mc.name_or_path is None or mc.random_init


def build_config(mc: ModelConfig, arch: Architecture, tokenizer=None):
    """The transformers config: from `model.config` (random init / plan) or from the checkpoint."""
    if mc.config:
        kwargs = _plain(mc.config)
        if tokenizer is not None:  # the tokenizer's special ids from the start: a config checks them against its vocab
            ids = _special_ids(tokenizer)
            kwargs = {**ids, **kwargs}
            if isinstance(kwargs.get("text_config"), dict):
                kwargs["text_config"] = {**ids, **kwargs["text_config"]}
        cfg = transformers_class(arch.config_class)(**kwargs)
    else:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(mc.name_or_path, trust_remote_code=mc.trust_remote_code)
    if tokenizer is not None:
        _sync_token_ids(cfg, arch, tokenizer)
    return cfg


def _plain(obj):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(obj, resolve=True) if isinstance(obj, (DictConfig, ListConfig)) else obj


def _special_ids(tokenizer) -> dict:
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def _sync_token_ids(cfg, arch: Architecture, tokenizer) -> None:
    """Point a random-init config's special token ids at the locally built tokenizer's."""
    for key, special in arch.config_tokens.items():
        setattr(cfg, key, tokenizer.convert_tokens_to_ids(arch.special_tokens[special]))
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for c in {id(cfg): cfg, id(text_cfg): text_cfg}.values():
        for key, value in _special_ids(tokenizer).items():
            setattr(c, key, value)
    if text_cfg.vocab_size < len(tokenizer):
        raise ConfigError(f"model.config vocab_size={text_cfg.vocab_size} is smaller than the tokenizer "
                          f"({len(tokenizer)} tokens); allowed: >= {len(tokenizer)}")


def local_tokenizer(mc: ModelConfig):
    """The locally built tokenizer of a model built from `model.config` alone (its special token ids go into
    the config, as in load_model), else None."""
    return tokenizer_of(load_processor_for(mc)) if mc.name_or_path is None and mc.config else None


def build_meta_model(mc: ModelConfig):
    """The model's module tree on the meta device: no memory, no weights (plan mode)."""
    arch = get_architecture(mc.arch)
    cfg = build_config(mc, arch, local_tokenizer(mc))
    with torch.device("meta"):
        return transformers_class(arch.model_class)._from_config(cfg)


def load_processor_for(mc: ModelConfig):
    arch = get_architecture(mc.arch)
    if mc.name_or_path is None:
        return build_local_processor(arch, mc.min_pixels, mc.max_pixels)
    return load_processor(mc.name_or_path, arch, mc.min_pixels, mc.max_pixels, mc.trust_remote_code)


def quantization_config(q: QuantConfig, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if q.mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                  bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=compute_dtype)
    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(mc: ModelConfig, q: QuantConfig, device: torch.device, processor=None, seed: int = 0):
    """Build or load the model on `device`, in the configured dtype / quantization."""
    arch = get_architecture(mc.arch)
    dtype = resolve_dtype(q.dtype, device)
    compute = dtype if q.compute_dtype == "auto" else _DTYPES[q.compute_dtype]
    cls = transformers_class(arch.model_class)
    common = dict(attn_implementation=mc.attn_implementation)
    tok = tokenizer_of(processor) if processor is not None and is_random_init(mc) else None

    with contextlib.ExitStack() as stack:
        path = mc.name_or_path
        if is_random_init(mc):
            cfg = build_config(mc, arch, tok)
            torch.manual_seed(seed)
            with torch.device(device):
                model = cls._from_config(cfg, dtype=dtype, **common)
            if arch.random_init_open_gates:
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if n.endswith(arch.random_init_open_gates):
                            p.fill_(1.0)
            if q.mode == "none":
                return _finish(model, tok)
            # bitsandbytes quantizes while loading: round-trip the random weights through a temp dir
            path = stack.enter_context(tempfile.TemporaryDirectory(prefix="harness-randinit-"))
            model.save_pretrained(path)
            del model
        kwargs = dict(dtype=dtype, trust_remote_code=mc.trust_remote_code, **common)
        qc = quantization_config(q, compute)
        if qc is not None:
            kwargs.update(quantization_config=qc, device_map={"": device.index or 0} if device.type == "cuda"
                          else {"": "cpu"})
        model = cls.from_pretrained(path, **kwargs)
        if qc is None:
            model.to(device)
        return _finish(model, tok)


def _finish(model, tok):
    if tok is not None and getattr(model, "generation_config", None) is not None:
        gc = model.generation_config
        gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    return model


def count_params(model) -> tuple[int, int]:
    """(trainable, total), each parameter counted once (tied weights)."""
    seen = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

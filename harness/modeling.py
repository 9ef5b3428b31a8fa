"""Load the model and its processor: a hub id, a local checkpoint, or a random-init architecture.

One code path for all three: `model.name_or_path` names a checkpoint (hub id or directory), and the model and
its LoRA plan are built from that checkpoint's own config.json; with none (or `model.random_init=true`) the
architecture's config class is built from `model.config` and the weights are random (offline default, tests,
benchmarks).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile

import torch

from harness.config import ConfigError, ModelConfig, QuantConfig
from harness.processors import build_local_processor, load_processor, tokenizer_of
from harness.registry import (ARCHITECTURES, Architecture, architecture_of_model_type, get_architecture,
                              transformers_class)

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


def build_meta_model(mc: ModelConfig, notes: list | None = None):
    """The module tree of the model a run trains, on the meta device: no memory, no weights (plan mode).
    A line for the plan's warnings goes into `notes` when a hub checkpoint had to be planned from model.config."""
    arch = get_architecture(mc.arch)
    cfg = build_config(mc, arch, local_tokenizer(mc)) if is_random_init(mc) else _planned_config(mc, arch, notes)
    with torch.device("meta"):
        return transformers_class(arch.model_class)._from_config(cfg)


def _planned_config(mc: ModelConfig, arch: Architecture, notes: list | None):
    """The checkpoint's config; for a hub id the hub cannot serve (offline, not cached), the preset's copy of it
    in model.config, said in `notes` (a local checkpoint never falls back)."""
    try:
        return checkpoint_config(mc, arch)
    except OSError as e:
        if not mc.config:
            raise ConfigError(f"invalid config: model.name_or_path={mc.name_or_path!r}: its config.json cannot be "
                              f"read ({type(e).__name__}: {str(e).splitlines()[0]}); allowed: a hub id reachable "
                              "now or in the HF cache, or a local checkpoint directory") from None
        if notes is not None:
            notes.append(f"planned from model.config: the config.json of {mc.name_or_path} is not reachable "
                         "(hub offline, not in the HF cache); training loads the checkpoint's own")
        return build_config(mc, arch)


def checkpoint_config(mc: ModelConfig, arch: Architecture):
    """The checkpoint's own config.json, checked against model.arch and against model.config (which may only
    repeat it). A local directory is read offline; a hub id from the HF cache or the hub (OSError if neither)."""
    from transformers import AutoConfig

    local = mc.checkpoint_dir()
    try:
        cfg = AutoConfig.from_pretrained(str(local or mc.name_or_path), trust_remote_code=mc.trust_remote_code,
                                         local_files_only=local is not None)
    except OSError as e:
        if local is None:
            raise
        raise ConfigError(f"invalid config: model.name_or_path={mc.name_or_path!r} has no readable config.json "
                          f"({str(e).splitlines()[0]}); allowed: a directory written by save_pretrained") from None
    _check_arch(mc, arch, cfg)
    _check_repeats(mc, cfg)
    return cfg


def _check_arch(mc: ModelConfig, arch: Architecture, cfg) -> None:
    """The checkpoint's model_type must be the one model.arch's config class builds."""
    want = transformers_class(arch.config_class).model_type
    if cfg.model_type == want:
        return
    fit = architecture_of_model_type(cfg.model_type)
    fix = (f"model.arch={fit.name} (presets of that architecture: "
           + (", ".join(f"model={p}" for p in presets_of(fit.name)) or "none") + ")") if fit else \
        f"an architecture of harness/registry.py ({', '.join(sorted(ARCHITECTURES))})"
    raise ConfigError(f"invalid config: model.name_or_path={mc.name_or_path!r} is a {cfg.model_type!r} checkpoint "
                      f"but model.arch={mc.arch} builds {want!r} models; allowed: {fix}")


def presets_of(arch_name: str) -> list[str]:
    """conf/model presets (file stems) of one architecture."""
    from omegaconf import OmegaConf

    from harness.config import CONF_DIR

    return [p.stem for p in sorted((CONF_DIR / "model").glob("*.yaml")) if OmegaConf.load(p).get("arch") == arch_name]


def _check_repeats(mc: ModelConfig, cfg) -> None:
    """model.config given with a checkpoint is never applied: each of its values must equal the checkpoint's."""
    bad = _disagreements(_plain(mc.config) or {}, cfg, "")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ConfigError(
            f"invalid config: model.config disagrees with the checkpoint model.name_or_path={mc.name_or_path!r}: "
            f"{'; '.join(bad[:3])}{more}. A checkpoint is built from its own config.json (model.config, e.g. a "
            "random-init preset's, is not applied to it); allowed: model.config=null, or model.random_init=true "
            "to build model.config with random weights")


def _disagreements(want: dict, cfg, prefix: str) -> list[str]:
    """'key=wanted (checkpoint: value)' for each scalar or list in `want` that differs from the config `cfg`.
    Sub-configs are compared key by key; plain dicts (rope_scaling: transformers normalises them) are skipped."""
    out = []
    for key, value in want.items():
        have = getattr(cfg, key, None)
        if isinstance(value, dict):
            if hasattr(have, "to_dict"):
                out += _disagreements(value, have, f"{prefix}{key}.")
        elif have is not None and _listify(have) != _listify(value):
            out.append(f"{prefix}{key}={value!r} (checkpoint: {have!r})")
    return out


def _listify(v):
    return list(v) if isinstance(v, tuple) else v


def load_processor_for(mc: ModelConfig):
    arch = get_architecture(mc.arch)
    if mc.name_or_path is None:
        return build_local_processor(arch, mc.min_pixels, mc.max_pixels)
    path = str(mc.checkpoint_dir() or mc.name_or_path)  # ~ expanded
    return load_processor(path, arch, mc.min_pixels, mc.max_pixels, mc.trust_remote_code)


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
        else:  # the checked config: the plan's module tree is the loaded one
            path = str(mc.checkpoint_dir() or mc.name_or_path)  # ~ expanded
            common["config"] = checkpoint_config(mc, arch)
            check_prequantized(mc, q, common["config"])
        kwargs = dict(dtype=dtype, trust_remote_code=mc.trust_remote_code, **common)
        qc = quantization_config(q, compute)
        if qc is not None:
            kwargs.update(quantization_config=qc, device_map={"": device.index or 0} if device.type == "cuda"
                          else {"": "cpu"})
        model = cls.from_pretrained(path, **kwargs)
        if qc is None:
            model.to(device)
        return _finish(model, tok)


def check_prequantized(mc: ModelConfig, q: QuantConfig, cfg) -> None:
    """A checkpoint saved quantized (e.g. a *-bnb-4bit repo) loads quantized whatever quant.mode says: make the
    run say so, so it is recorded and prepared (k-bit training) as what it is."""
    qc = getattr(cfg, "quantization_config", None)
    if qc is None:
        return
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    mode = "4bit" if qc.get("load_in_4bit") else "8bit" if qc.get("load_in_8bit") else None
    if mode is None:
        raise ConfigError(f"invalid config: model.name_or_path={mc.name_or_path!r} is quantized with "
                          f"{qc.get('quant_method', 'an unknown method')!r}; allowed: a 16/32-bit checkpoint or a "
                          "bitsandbytes 4-bit / 8-bit one")
    if q.mode != mode:
        raise ConfigError(f"invalid config: quant.mode={q.mode} but model.name_or_path={mc.name_or_path!r} is saved "
                          f"in bitsandbytes {mode}; allowed: quant={mode} (or a 16-bit checkpoint)")


def _finish(model, tok):
    if tok is not None and getattr(model, "generation_config", None) is not None:
        gc = model.generation_config
        gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    return model


def count_params(model) -> tuple[int, int]:
    """(trainable, total), each parameter counted once (tied weights), as the plan counts them (TargetPlan.total_params:
    base + LoRA + modules_to_save copies)."""
    seen = {id(p): p for p in model.parameters()}
    total = sum(_numel(p) for p in seen.values())
    trainable = sum(_numel(p) for p in seen.values() if p.requires_grad)
    return trainable, total


def _numel(p) -> int:
    """Elements of the weight a parameter stands for: a bitsandbytes 4-bit weight stores two per byte."""
    qs = getattr(p, "quant_state", None)
    return int(torch.Size(qs.shape).numel()) if qs is not None and getattr(qs, "shape", None) is not None else p.numel()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

"""Typed run configuration: dataclasses registered with Hydra's ConfigStore, plus range checks.

Hydra composes conf/ on top of the `RunConfig` schema, so a misspelled key or a wrong type fails
at composition time. `validate()` then checks values and choices, before any model is built, and
raises `ConfigError` naming the key, the bad value and what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from harness.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # the Hydra config tree
MODES = ("train", "plan", "eval", "infer", "report", "replay", "bench")
QUANT_MODES = ("none", "8bit", "4bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BIAS_CHOICES = ("none", "all", "lora_only")
# PEFT's init_lora_weights that need no extra step (plus "pissa_niter_<k>"). eva / corda / mica need a data-driven
# initialisation pass after get_peft_model that the harness does not run: rejected rather than silently skipped.
INIT_CHOICES = (True, False, "gaussian", "pissa", "olora", "orthogonal", "loftq")
INIT_NEEDS_DATA = ("eva", "corda", "mica")
CHECKPOINTING = ("unsloth", "true", "false")
LOGGER_BACKENDS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")
KERNEL_SWITCH = ("auto", "true", "false")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
BENCH_STACKS = ("hf16", "liger16", "liger4", "unsloth16", "unsloth4", "harness16", "harness4")
DATA_ON_BAD = ("skip", "error")
TEXT_KINDS = ("word", "number", "formula")


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names key, value and what is allowed."""


@dataclass
class ModelConfig:
    name: str = MISSING
    arch: str = MISSING  # key of harness.registry.ARCHITECTURES
    # Hub id or local checkpoint directory (a path starting with / . ~ must exist). None: build `config` with random
    # weights (offline default). A checkpoint is built, and its LoRA plan made, from its own config.json; the run is
    # labelled by its folder / repo name when model.name is still the name of a preset made for another checkpoint.
    name_or_path: Optional[str] = None
    # Build from `config` with random weights even when name_or_path is set (benchmarks).
    random_init: bool = False
    # Keyword arguments for the architecture's transformers config class: the whole config of a random-init model.
    # With a checkpoint (and random_init false) it is never applied: it may only repeat the checkpoint's config.json
    # (the real-size presets carry such a copy, planned from when the hub is offline), and a value that differs is
    # an error. Clear it with model.config=null (model.config={} merges into the preset's dict: it clears nothing).
    config: Optional[dict] = field(default_factory=dict)
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    # Image size range for the processor, in pixels (height * width).
    min_pixels: int = 3136
    max_pixels: int = 200704
    # Modules trained fully in addition to the strategy's modules_to_save (random-init tiny models
    # need their head trained: a frozen random lm_head is too weak for LoRA alone).
    modules_to_save: list = field(default_factory=list)

    def checkpoint_dir(self) -> Optional[Path]:
        """name_or_path as a local directory, or None for a hub id (or no checkpoint). A name that looks like a
        path (starts with / . ~, or is no hub id `org/name`) must be an existing directory: ConfigError if not."""
        import re

        if self.name_or_path is None:
            return None
        path = Path(self.name_or_path).expanduser()
        if path.is_dir():
            return path
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", self.name_or_path) and ".." not in path.parts:
            return None  # a hub id
        raise ConfigError(f"invalid config: model.name_or_path={self.name_or_path!r} does not exist (allowed: a "
                          "checkpoint directory written by save_pretrained, or a hub id like "
                          "Qwen/Qwen2-VL-2B-Instruct)")

    def run_label(self) -> str:
        """model.name, or the checkpoint's folder / repo name when model.name is a conf/model preset's and
        name_or_path is not that preset's (e.g. model.name_or_path=DIR on the tiny default)."""
        preset = CONF_DIR / "model" / f"{self.name}.yaml"
        if self.name_or_path is None or not preset.exists():
            return self.name
        if OmegaConf.load(preset).get("name_or_path") == self.name_or_path:
            return self.name
        local = self.checkpoint_dir()
        return local.resolve().name if local is not None else self.name_or_path.rsplit("/", 1)[-1]


@dataclass
class LoraConfig:
    strategy: str = MISSING
    finetune_vision_layers: bool = True
    finetune_language_layers: bool = True
    finetune_attention_modules: bool = True
    finetune_mlp_modules: bool = True
    finetune_projector: bool = False
    # None (use the flags), a list of module names / leaf names, a regex string, or "all-linear".
    target_modules: Any = None
    # true (Unsloth's behaviour): target_modules selects only inside the components and kinds the finetune_* flags
    # select (all-linear leaves the projector out unless finetune_projector); false: target_modules alone decides
    narrow_targets_by_flags: bool = True
    r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Any = True
    loftq_config: dict = field(default_factory=dict)
    layers_to_transform: Optional[list] = None
    layers_pattern: Optional[str] = None
    modules_to_save: list = field(default_factory=list)
    random_state: Optional[int] = None  # None: the run's seed
    # Per-component rank / alpha (None: r / lora_alpha).
    vision_r: Optional[int] = None
    vision_alpha: Optional[int] = None
    language_r: Optional[int] = None
    language_alpha: Optional[int] = None


@dataclass
class QuantConfig:
    mode: str = "none"
    dtype: str = "auto"  # auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"


@dataclass
class DataColumns:
    """hf: which column holds what. "auto": image -> image|images (else the one datasets.Image column),
    prompt -> prompt|question, answer -> answer, messages -> messages (used when there is no answer column).
    prompt: null gives every sample data.prompt; image: null means text-only."""
    image: Optional[str] = "auto"
    prompt: Optional[str] = "auto"
    answer: Optional[str] = "auto"
    messages: Optional[str] = "auto"


@dataclass
class DataConfig:
    name: str = MISSING
    eval_fraction: float = 0.1
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    image_size: int = 56
    prompt: str = "What digit is this?"
    train_on_responses_only: bool = True
    max_length: int = 2048
    # Bad samples (missing / corrupt image file, malformed row): skip and count them, or raise.
    on_bad_sample: str = "skip"
    # Samples over data.max_length tokens (measured with the run's processor before training): skip + count, or raise.
    on_too_long: str = "skip"
    # A vision-language model whose train samples carry no image at all is an error unless this is true.
    allow_text_only: bool = False
    # synthetic_ocr: how many samples, string lengths, kinds of text, noise level.
    n_train: int = 2000
    n_eval: int = 100
    min_chars: int = 1
    max_chars: int = 4
    text_kinds: list = field(default_factory=lambda: ["word", "number", "formula"])
    noise: float = 0.1
    # jsonl: the .jsonl file; hf: a hub id / loader name or a local save_to_disk directory.
    path: Optional[str] = None
    subset: Optional[str] = None  # hf: the dataset's config name (load_dataset(path, subset))
    split: str = "train"
    eval_split: Optional[str] = None  # hf: a split to evaluate on (None: a seeded data.eval_fraction split)
    # hf: column mapping (DataColumns)
    columns: DataColumns = field(default_factory=lambda: DataColumns())


@dataclass
class TrainConfig:
    max_steps: int = 100
    num_train_epochs: Optional[float] = None  # set: passes over the train split decide the length, not max_steps
    learning_rate: float = 2e-4
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    optim: str = "auto"  # auto: adamw_torch_fused on CUDA (one kernel for all LoRA weights), adamw_torch elsewhere
    max_grad_norm: float = 1.0
    logging_steps: int = 1
    gradient_checkpointing: str = "auto"  # auto: unsloth (offloaded, CUDA graphs) on CUDA, false elsewhere
    full_finetuning: bool = False
    eval_batch_size: int = 64
    max_new_tokens: int = 4
    num_workers: int = 0
    save_steps: int = 0  # checkpoint every N steps into <run dir>/checkpoints (0: none)
    resume: str = "none"  # auto: continue from the newest checkpoint in the run dir
    # non-finite loss / grad norm: stop (keep the last finite checkpoint, status diverged) or skip_step
    # (zero that step's gradients; 5 skipped in a row stop the run as diverged); see harness.train.NonFiniteGuard
    on_nonfinite: str = "stop"


@dataclass
class LoggerConfig:
    backend: str = "wandb"
    mode: str = "offline"
    project: str = "vlm-lora-harness"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list = field(default_factory=list)
    log_adapter: bool = False  # also log the saved adapter as a W&B artifact


@dataclass
class KernelsConfig:
    enabled: str = "auto"
    lora: bool = True
    rms_norm: bool = True
    rope: bool = True
    swiglu: bool = True
    cross_entropy: bool = True
    # auto: on with the kernels (CUDA): every decoder layer / vision block through torch.compile
    compile: str = "auto"
    # torch.compile mode for those layers: default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    # auto: with offloaded checkpointing on CUDA, replay every layer's forward and recompute+backward as
    # CUDA graphs (harness/layer_graphs.py); not with compile_mode=reduce-overhead (its own graphs)
    cuda_graphs: str = "auto"
    # with compile and checkpointing: gated MLPs (16-bit base) tiled over tokens, saving only their input;
    # in a checkpoint's recompute, an MLP that ends its layer skips its forward (kernels/tiled_mlp.py)
    tiled_mlp: bool = True
    # compiled layers on CUDA: Inductor's combo kernels (independent small kernels of a layer launched as one,
    # e.g. the adapters' casts and gradient casts around the LoRA matmuls): +1.1% tokens/s on the anchor
    # workload (H100, 2026-12-05) at 0.2 GiB more peak (the CUDA-graph pool); its own kernels to compile (first
    # step 23 s, against 8.6 s for the plain layers, whose kernels Inductor's cache held from an earlier run)
    combo_kernels: bool = True
    # compiled layers: each LoRA sum (base GEMM + rank-r GEMMs) inside one opaque op, harness::lora_mm
    # (kernels/lora_op.py), so the base GEMM adds in place; traced, Inductor copies the output before each
    # addmm (1,108 copies, 12.75 ms of a 172 ms step in the 2026-12-05 H100 profile). On: +8.3% tokens/s on the
    # anchor workload, same loss and peak (H100, 2026-12-06, docs/benchmarks.md); false: traced addmm
    lora_op: bool = True
    # the LoRA linears' kernels on a GPU (kernels/lora_linear.py PATHS): auto (Triton GEMMs with the rank-r product in
    # their epilogue, and one read of dy for g and dB, where each wins: +4.6% / +5.1% tokens/s on the anchor workload
    # over cublas, H100, 2026-12-07, gradients as close to fp32 or closer; docs/kernels.md run 9) | cublas (cuBLAS only)
    lora_paths: str = "auto"
    # Qwen2-VL family: M-RoPE positions, vision segments and image-token slots computed by the collator on the
    # host, so the forward never waits on the GPU (harness/host_prep.py); on any device unless enabled=false
    host_prep: bool = True


@dataclass
class SaveConfig:
    adapter: bool = True
    merged: bool = False  # also write a merged checkpoint (LoRA folded in; dequantized from 4/8-bit)
    merged_dtype: str = "auto"  # auto: the run's compute dtype (bf16 / fp16 on GPU, fp32 on CPU)
    # Opt-in: a hub repo id to push the adapter (and merged model) to; the token is read from HF_TOKEN
    # at push time and never written anywhere.
    push_to_hub: Optional[str] = None


@dataclass
class BenchConfig:
    stacks: list = field(default_factory=lambda: ["hf16", "liger16", "unsloth16", "unsloth4", "harness16", "harness4"])
    batch: int = 4
    tokens: int = 1024
    grid: int = 32
    r: int = 16
    steps: int = 10
    warmup: int = 3
    gc: str = "unsloth"
    compile: bool = True  # harness stacks: regional torch.compile (false: the eager Triton kernels)
    compile_mode: str = "default"  # see kernels.compile_mode
    cuda_graphs: bool = True  # harness stacks: see kernels.cuda_graphs
    model: str = "anchor"  # anchor (the anchors' Qwen2-VL-2B workload) or a conf/model name (random weights)
    longest: bool = False  # also search the longest sequence that fits at batch 1, per stack
    max_tokens: int = 65536  # upper end of that search
    timeout_s: float = 0.0  # stop a stack that runs longer (an error row in the table); 0: no limit
    memory_gib: float = 0.0  # cap each stack's GPU memory (e.g. 80 to compare a 141 GB card with an 80 GB one); 0: all
    trainer: bool = False  # also run the harness stacks through harness.train's SFTTrainer (a `harness` run's loop)
    inductor: dict = field(default_factory=dict)  # harness stacks: torch._inductor.config overrides, e.g. +bench.inductor.combo_kernels=true
    lora_op: bool = True  # harness stacks: kernels.lora_op (LoRA sums in the harness::lora_mm op); false for an A/B
    lora_paths: str = "auto"  # harness stacks: kernels.lora_paths (auto | cublas) for an A/B


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    mode: str = "train"
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    # mode=eval / infer: a finished run directory; mode=infer: image files and the question.
    path: Optional[str] = None
    images: list = field(default_factory=list)
    prompt: Optional[str] = None


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)


# ----------------------------------------------------------------------------------------------
# validation


def _fail(key: str, value: Any, allowed: str) -> None:
    from harness.secrets import REDACTED, is_secret_name

    value = REDACTED if is_secret_name(key) else value  # an error message is printed and logged
    raise ConfigError(f"invalid config: {key}={value!r} (allowed: {allowed})")


def check_optim(name: str) -> None:
    """``train.optim``: auto or one of the installed transformers' optimizer names (imports transformers, so it
    runs after the config is validated and bitsandbytes imported; still before any model is built)."""
    if name == "auto":
        return
    from transformers.training_args import OptimizerNames

    _choice("train.optim", name, ("auto", *(o.value for o in OptimizerNames)))


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(key, value, "one of " + ", ".join(repr(c) if not isinstance(c, str) else c for c in choices))


def _positive(key: str, value: Any, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        _fail(key, value, f"{'an integer' if integer else 'a number'} > 0")


def _check_init(run: "RunConfig") -> None:
    """lora.init_lora_weights and, for LoftQ, what PEFT needs (here: PEFT fails only after the model is built)."""
    import re

    init = run.lora.init_lora_weights
    if init in INIT_NEEDS_DATA:
        _fail("lora.init_lora_weights", init, "one of " + ", ".join(map(str, INIT_CHOICES)) + ", pissa_niter_<k>; "
              f"{init} needs a data-driven initialisation pass the harness does not run")
    if not (isinstance(init, str) and re.fullmatch(r"pissa_niter_[1-9]\d*", init)):
        _choice("lora.init_lora_weights", init, (*INIT_CHOICES, "pissa_niter_<k>"))
    lq = dict(run.lora.loftq_config or {})
    if init != "loftq":
        if lq:
            _fail("lora.loftq_config", lq, "{} unless lora.init_lora_weights=loftq")
        return
    for key in lq:
        _choice("lora.loftq_config key", key, ("loftq_bits", "loftq_iter"))
    _choice("lora.loftq_config.loftq_bits", lq.get("loftq_bits", 4), (4, 8))
    _positive("lora.loftq_config.loftq_iter", lq.get("loftq_iter", 1), integer=True)
    if run.quant.mode != "none":
        _fail("lora.init_lora_weights", "loftq", f"another init with quant.mode={run.quant.mode} (LoftQ quantizes "
              "a 16-bit base itself: use quant=none)")
    if run.device == "cpu" or run.device == "auto" and not _cuda_available():
        _fail("lora.init_lora_weights", "loftq", "another init on a machine without CUDA (PEFT's LoftQ runs its "
              "quantization on a GPU)")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _reject_unknown_keys(cfg: DictConfig) -> None:
    """`+lora.rank=8` bypasses Hydra's struct mode; catch such typos here, with the nearest valid key."""
    import dataclasses
    import difflib

    def check(node, schema, prefix):
        fields = {f.name: f for f in dataclasses.fields(schema)}
        for key in node.keys():
            if key not in fields:
                near = difflib.get_close_matches(str(key), list(fields), n=3)
                _fail(prefix + str(key), node[key], f"known keys of {prefix.rstrip('.') or 'the root'}: "
                      + (f"did you mean {', '.join(near)}? " if near else "") + ", ".join(fields))
            sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
            if sub is not None and dataclasses.is_dataclass(sub) and isinstance(node[key], DictConfig):
                check(node[key], sub, f"{prefix}{key}.")

    check(cfg, RunConfig, "")


def validate(cfg: DictConfig | RunConfig) -> RunConfig:
    """Check values and choices; return the config as a typed RunConfig object."""
    if isinstance(cfg, DictConfig):
        _reject_unknown_keys(cfg)
        run: RunConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), cfg))
    else:
        run = cfg
    from harness.registry import ARCHITECTURES  # local: registry imports transformers lazily

    _choice("mode", run.mode, MODES)
    _choice("device", run.device, ("auto", "cpu", "cuda"))
    _choice("model.arch", run.model.arch, tuple(sorted(ARCHITECTURES)))
    _positive("model.min_pixels", run.model.min_pixels, integer=True)
    if run.model.max_pixels < run.model.min_pixels:
        _fail("model.max_pixels", run.model.max_pixels, f"an integer >= model.min_pixels ({run.model.min_pixels})")
    if run.model.config is None:  # model.config=null: empty (a checkpoint brings its own config)
        run.model.config = {}
    if run.model.name_or_path is None and not run.model.config:
        _fail("model.name_or_path", None, "a hub id or local path, or a non-empty model.config for random init")
    if run.model.name_or_path is not None and not run.model.random_init:
        run.model.checkpoint_dir()  # a missing local path fails here, before any run folder or model
        run.model.name = run.model.run_label()

    lo = run.lora
    _positive("lora.r", lo.r, integer=True)
    _positive("lora.lora_alpha", lo.lora_alpha)
    for key in ("vision_r", "language_r"):
        if getattr(lo, key) is not None:
            _positive(f"lora.{key}", getattr(lo, key), integer=True)
    for key in ("vision_alpha", "language_alpha"):
        if getattr(lo, key) is not None:
            _positive(f"lora.{key}", getattr(lo, key))
    if not 0.0 <= lo.lora_dropout < 1.0:
        _fail("lora.lora_dropout", lo.lora_dropout, "a number in [0, 1)")
    _choice("lora.bias", lo.bias, BIAS_CHOICES)
    _check_init(run)
    tm = lo.target_modules
    if tm is not None and not isinstance(tm, (str, list)):
        _fail("lora.target_modules", tm, "null, a list of module names, a regex string, or 'all-linear'")
    if lo.layers_to_transform is not None:
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in lo.layers_to_transform):
            _fail("lora.layers_to_transform", lo.layers_to_transform, "null or a list of layer indices >= 0")

    _choice("quant.mode", run.quant.mode, QUANT_MODES)
    _choice("quant.dtype", run.quant.dtype, DTYPES)
    _choice("quant.compute_dtype", run.quant.compute_dtype, DTYPES)
    _choice("quant.quant_type", run.quant.quant_type, ("nf4", "fp4"))

    d = run.data
    if not (isinstance(d.eval_fraction, (int, float)) and 0.0 < d.eval_fraction < 1.0):
        _fail("data.eval_fraction", d.eval_fraction, "a number strictly between 0 and 1")
    _positive("data.image_size", d.image_size, integer=True)
    _positive("data.max_length", d.max_length, integer=True)
    for key in ("max_train_samples", "max_eval_samples"):
        if getattr(d, key) is not None:
            _positive(f"data.{key}", getattr(d, key), integer=True)
    _choice("data.on_bad_sample", d.on_bad_sample, DATA_ON_BAD)
    _choice("data.on_too_long", d.on_too_long, DATA_ON_BAD)
    _positive("data.n_train", d.n_train, integer=True)
    _positive("data.n_eval", d.n_eval, integer=True)
    _positive("data.min_chars", d.min_chars, integer=True)
    if not isinstance(d.max_chars, int) or isinstance(d.max_chars, bool) or d.max_chars < d.min_chars:
        _fail("data.max_chars", d.max_chars, f"an integer >= data.min_chars ({d.min_chars})")
    if not d.text_kinds or any(k not in TEXT_KINDS for k in d.text_kinds):
        _fail("data.text_kinds", d.text_kinds, "a non-empty list of " + ", ".join(TEXT_KINDS))
    if isinstance(d.noise, bool) or not isinstance(d.noise, (int, float)) or not 0.0 <= d.noise <= 1.0:
        _fail("data.noise", d.noise, "a number in [0, 1]")
    if d.name in ("jsonl", "hf") and not d.path:
        _fail("data.path", d.path, "a .jsonl file" if d.name == "jsonl"
              else "a hub dataset id / loader name or a local directory saved with save_to_disk")
    if d.columns.answer is None and d.columns.messages in (None, "auto"):
        _fail("data.columns.answer", None, "a column name or auto (or set data.columns.messages)")

    t = run.train
    _positive("train.max_steps", t.max_steps, integer=True)
    if t.num_train_epochs is not None:
        _positive("train.num_train_epochs", t.num_train_epochs)
    _positive("train.learning_rate", t.learning_rate)
    _positive("train.per_device_train_batch_size", t.per_device_train_batch_size, integer=True)
    _positive("train.gradient_accumulation_steps", t.gradient_accumulation_steps, integer=True)
    _positive("train.eval_batch_size", t.eval_batch_size, integer=True)
    _positive("train.logging_steps", t.logging_steps, integer=True)
    _positive("train.max_new_tokens", t.max_new_tokens, integer=True)
    if t.save_steps < 0:
        _fail("train.save_steps", t.save_steps, "an integer >= 0 (0: no checkpoints)")
    if t.warmup_steps < 0:
        _fail("train.warmup_steps", t.warmup_steps, "an integer >= 0")
    if t.weight_decay < 0:
        _fail("train.weight_decay", t.weight_decay, "a number >= 0")
    t.gradient_checkpointing = str(t.gradient_checkpointing).lower()
    _choice("train.gradient_checkpointing", t.gradient_checkpointing, ("auto", *CHECKPOINTING))
    _choice("train.resume", t.resume, ("none", "auto"))
    _choice("train.on_nonfinite", t.on_nonfinite, ("stop", "skip_step"))
    if t.full_finetuning and run.quant.mode != "none":
        _fail("train.full_finetuning", True,
              f"false when quant.mode={run.quant.mode} (full fine-tuning needs a 16/32-bit base; use quant=none)")
    if t.full_finetuning and run.save.merged:  # nothing to merge: would be skipped silently after training
        _fail("save.merged", True, "false with train.full_finetuning=true (model/ already holds the full model)")

    _choice("save.merged_dtype", run.save.merged_dtype, DTYPES)
    if run.save.push_to_hub and run.mode == "train":
        from harness.secrets import hub_token

        if not hub_token():
            _fail("save.push_to_hub", run.save.push_to_hub, "null, or a repo id with HF_TOKEN set in the environment")
    if run.mode == "bench":
        for s in run.bench.stacks:
            _choice("bench.stacks[]", s, BENCH_STACKS)
        _choice("bench.gc", str(run.bench.gc).lower(), CHECKPOINTING)
        for key in ("batch", "tokens", "grid", "r", "steps", "max_tokens"):
            _positive(f"bench.{key}", getattr(run.bench, key), integer=True)
        models = ["anchor"] + sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        _choice("bench.model", run.bench.model, tuple(models))
        _choice("bench.compile_mode", run.bench.compile_mode, COMPILE_MODES)
        _choice("bench.lora_paths", run.bench.lora_paths, ("cublas", "auto"))
        if not float(run.bench.timeout_s) >= 0:
            _fail("bench.timeout_s", run.bench.timeout_s, "0 (no limit) or a positive number of seconds")
        if not float(run.bench.memory_gib) >= 0:
            _fail("bench.memory_gib", run.bench.memory_gib, "0 (the whole GPU) or a positive number of GiB")
        if run.bench.tokens <= run.bench.grid * run.bench.grid // 4 + 2:
            _fail("bench.tokens", run.bench.tokens, f"more than the {run.bench.grid ** 2 // 4 + 2} image tokens")
    _choice("logger.backend", run.logger.backend, LOGGER_BACKENDS)
    _choice("logger.mode", run.logger.mode, WANDB_MODES)
    run.kernels.enabled = str(run.kernels.enabled).lower()
    _choice("kernels.enabled", run.kernels.enabled, KERNEL_SWITCH)
    run.kernels.compile = str(run.kernels.compile).lower()
    _choice("kernels.compile", run.kernels.compile, KERNEL_SWITCH)
    _choice("kernels.compile_mode", run.kernels.compile_mode, COMPILE_MODES)
    _choice("kernels.lora_paths", run.kernels.lora_paths, ("cublas", "auto"))
    run.kernels.cuda_graphs = str(run.kernels.cuda_graphs).lower()
    _choice("kernels.cuda_graphs", run.kernels.cuda_graphs, KERNEL_SWITCH)
    if run.mode in ("eval", "infer", "report", "replay") and not run.path:
        _fail("path", run.path, f"a run directory (mode={run.mode} needs the run to evaluate)")
    if run.mode == "infer" and not run.images:
        _fail("images", run.images, "a list of image files, e.g. images=[a.png,b.png]")
    return run


def load_saved_run(path, *required: str):
    """The composed config saved in a finished run directory (.hydra/config.yaml), checking that the
    files named in `required` (relative to the run dir) exist. Returns (DictConfig, run dir Path)."""
    path = Path(path)
    missing = [r for r in (".hydra/config.yaml", *required) if not (path / r).exists()]
    if missing:
        raise ConfigError(f"invalid config: path={str(path)!r} is not a finished training run "
                          f"(allowed: a run directory with {', '.join(['.hydra/config.yaml', *required])}; "
                          f"missing: {', '.join(missing)})")
    return OmegaConf.load(path / ".hydra" / "config.yaml"), path

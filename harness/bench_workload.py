"""What `mode=bench` trains: a model (its config from conf/model/, random weights), its LoRA targets, a batch
and the FLOP count of one step (the anchors' definition).

`anchor` is the exact workload of ../shared/anchors (Qwen2-VL-2B, the anchors' target regex and FLOP
formula), so its numbers compare with theirs. Any other name is a file of conf/model/ (real-size configs
such as qwen2_5_vl_7b or llama3_2_1b, or the tiny ones for a CPU smoke run): the harness's own target
resolution with the `full` strategy (every vision + language attention / MLP linear, not the projector
and not the head), and a batch of one image per sample for Qwen2-VL-style models or text for LLMs.
"""
from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

QWEN_VISION_ARCHS = ("qwen2_vl", "qwen2_5_vl")  # packed patches + image_grid_thw: the batch below


@dataclass
class Workload:
    name: str
    config_fn: Callable[[], Any]  # a fresh transformers config
    model_class: str  # transformers class name
    targets: Any  # PEFT target_modules: a regex or exact names
    vision: bool
    flops_fn: Callable[[Any], float]  # bench args -> model FLOPs per step

    def model_cls(self):
        import transformers

        return getattr(transformers, self.model_class)

    def random_model(self, device, dtype):
        """The workload's model from its config, random weights, 16-bit base, SDPA attention (the peers' choice)."""
        with torch.device(device):
            return self.model_cls()._from_config(self.config_fn(), dtype=dtype, attn_implementation="sdpa")

    def add_lora(self, model, r: int):
        """PEFT LoRA on the workload's targets as every stack gets it: r, alpha = r, no dropout, no bias."""
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="none",
                                                target_modules=self.targets))

    def make_batch(self, a, device) -> dict:
        cfg = self.config_fn()
        g = torch.Generator().manual_seed(0)
        if not self.vision:
            vocab = cfg.vocab_size
            ids = torch.randint(0, vocab - 1, (a.batch, a.tokens), generator=g)
            out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())
            return {k: v.to(device) for k, v in out.items()}
        vc = cfg.vision_config
        merge = vc.spatial_merge_size
        n_img = a.grid * a.grid // (merge * merge)
        vocab = cfg.get_text_config().vocab_size
        text = torch.randint(0, min(vocab, cfg.image_token_id) - 1, (a.batch, a.tokens - n_img - 2), generator=g)
        ids = torch.cat([torch.full((a.batch, 1), cfg.vision_start_token_id),
                         torch.full((a.batch, n_img), cfg.image_token_id),
                         torch.full((a.batch, 1), cfg.vision_end_token_id), text], 1)
        labels = ids.clone()
        labels[:, : n_img + 2] = -100
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size
        pix = torch.randn(a.batch * a.grid * a.grid, patch_dim, generator=g)
        out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                   pixel_values=pix.to(torch.bfloat16 if device != "cpu" else torch.float32),
                   image_grid_thw=torch.tensor([[1, a.grid, a.grid]] * a.batch))
        if "mm_token_type_ids" in inspect.signature(self.model_cls().forward).parameters:
            out["mm_token_type_ids"] = (ids == cfg.image_token_id).long()
        return {k: v.to(device) for k, v in out.items()}


# --------------------------------------------------------------------------- the anchors' workload
IMG, VS, VE = 151655, 151652, 151653
ANCHOR_TARGETS = (r".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
                  r"|visual\.blocks.*\.(qkv|attn\.proj|fc1|fc2))$")


def qwen2_vl_2b_config():
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                         tie_word_embeddings=True, rms_norm_eps=1e-6, hidden_act="silu"),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=IMG, video_token_id=151656, vision_start_token_id=VS, vision_end_token_id=VE,
        tie_word_embeddings=True)


def anchor_flops(a) -> float:
    """The anchors' definition: forward + input-gradient backward of every linear, 3x forward attention."""
    v_lin = 32 * (4 * 1280 * 1280 + 2 * 1280 * 5120)
    l_lin = 28 * (2 * 1536 * 1536 + 2 * 1536 * 256 + 3 * 1536 * 8960)
    head = 1536 * 151936
    tok = a.batch * a.tokens
    patches = a.grid * a.grid
    dense = 4 * (v_lin + l_lin + head) * tok
    attn = 3 * (32 * 4 * patches * patches * 1280 * a.batch + 28 * 4 * a.tokens * a.tokens * 1536 * a.batch)
    return dense + attn


ANCHOR = Workload("anchor", qwen2_vl_2b_config, "Qwen2VLForConditionalGeneration", ANCHOR_TARGETS, True, anchor_flops)


# --------------------------------------------------------------------------- conf/model workloads
@functools.lru_cache(maxsize=None)
def load_workload(name: str) -> Workload:
    """`anchor`, or a conf/model/<name>.yaml with a `config` block (random weights)."""
    if name == "anchor":
        return ANCHOR
    from omegaconf import OmegaConf

    from harness import modeling
    from harness.config import CONF_DIR, LoraConfig, ModelConfig
    from harness.registry import get_architecture
    from harness.targets import resolve_targets

    conf_model = CONF_DIR / "model"
    path = conf_model / f"{name}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in conf_model.glob("*.yaml"))
        raise ValueError(f"invalid config: bench.model={name} (allowed: anchor, {', '.join(names)})")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    known = set(ModelConfig.__dataclass_fields__)
    mc = ModelConfig(**{k: v for k, v in raw.items() if k in known})
    if not mc.config:
        raise ValueError(f"invalid config: bench.model={name} (allowed: a conf/model file with a `config` block)")
    arch = get_architecture(mc.arch)
    vision = arch.is_multimodal
    if vision and mc.arch not in QWEN_VISION_ARCHS:
        raise ValueError(f"invalid config: bench.model={name} (allowed: text-only models or "
                         f"{', '.join(QWEN_VISION_ARCHS)} architectures; the bench batch of {mc.arch} is not built yet)")

    tok = modeling.local_tokenizer(mc)  # tiny configs: special-token ids from the local tokenizer (as in training)

    def config_fn():
        return modeling.build_config(mc, arch, tok)

    meta = modeling.build_meta_model(mc)
    lora = LoraConfig(strategy="full", finetune_vision_layers=vision)
    plan = resolve_targets(meta, arch, lora, name, [])
    targets = plan.names
    linears = {n: m.weight.numel() for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear)}
    vis_lin = sum(v for n, v in linears.items() if arch.component(n) == "vision")
    lang_lin = sum(v for n, v in linears.items() if arch.component(n) != "vision")  # + projector + head
    cfg = config_fn()
    tc = cfg.get_text_config()
    n_layers, hidden = tc.num_hidden_layers, tc.hidden_size
    vc = getattr(cfg, "vision_config", None)
    v_dim = getattr(vc, "embed_dim", None) or getattr(vc, "hidden_size", 0)  # Qwen2-VL: embed_dim; 2.5: hidden_size
    del meta

    def flops(a) -> float:
        tok = a.batch * a.tokens
        f = 4 * lang_lin * tok + 3 * n_layers * 4 * a.tokens * a.tokens * hidden * a.batch
        if vision:
            patches = a.grid * a.grid
            f += 4 * vis_lin * patches * a.batch + 3 * vc.depth * 4 * patches * patches * v_dim * a.batch
        return f

    return Workload(name, config_fn, arch.model_class, targets, vision, flops)


def save_random_model(cls, config, save_dir: str, device: str = "cuda", dtype=torch.bfloat16) -> None:
    """``cls`` with random weights (seed 0) saved as a checkpoint: written beside, then moved into place."""
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    tmp = save_dir.rstrip("/") + ".partial"
    model.save_pretrained(tmp)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    if os.path.exists(save_dir):  # e.g. a processor written there first
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(save_dir, name))
        os.rmdir(tmp)
    else:
        os.replace(tmp, save_dir)


def load_nf4(cls, save_dir: str, device: str = "cuda", dtype=torch.bfloat16):
    """The saved model on an nf4 (double quant) base computing in ``dtype``, every parameter frozen."""
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    model = cls.from_pretrained(save_dir, quantization_config=q, dtype=dtype,
                                device_map={"": 0 if device == "cuda" else device}, attn_implementation="sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def baseline_checkpointing(model, gc: str) -> str:
    """The peers' checkpointing (no offloading): standard non-reentrant for gc=true and gc=unsloth."""
    if gc == "false":
        return "off"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return "standard"


def longest_fitting(fits: Callable[[int], bool], start: int, cap: int, granularity: int) -> int:
    """Largest n (a multiple of `granularity`, start <= n <= cap) with fits(n), assuming fits is monotone:
    doubling from `start`, then bisection. 0 if even `start` does not fit."""
    if not fits(start):
        return 0
    ok, bad = start, None
    n = start
    while bad is None:
        n = min(n * 2, cap)
        if n == ok:
            return ok  # reached the cap
        if fits(n):
            ok = n
        else:
            bad = n
    while bad - ok > granularity:
        mid = (ok + bad) // 2 // granularity * granularity
        if mid <= ok:
            break
        if fits(mid):
            ok = mid
        else:
            bad = mid
    return ok

"""Peer stacks for `harness mode=bench`: the anchor workload built the way Liger-Kernel and Unsloth users build it.

Same workload as `harness.bench.build()`: Qwen2-VL-2B's architecture (config from `config_fn`) with random
weights, bf16, sdpa attention, LoRA r=a.r, alpha=a.r, dropout 0 on the modules that `targets` (a regex,
`harness.bench.TARGETS`: the 324 vision + language attention/MLP linears) selects, gradient checkpointing
per `a.gc`. The peers' own choices are kept where they are the point of the comparison (what each stack
fuses, how it quantizes, how it checkpoints).

  liger16    HF + PEFT + Liger-Kernel: `apply_liger_kernel_to_qwen2_vl()` before the model is built (RMSNorm,
             LayerNorm, SwiGLU MLP, fused linear cross-entropy; its M-RoPE patch has no call site in
             transformers 5), random bf16 weights built in place like hf16, standard non-reentrant
             checkpointing for --gc true and unsloth (Liger has no offloading), none for --gc false.
  liger4     the same on an nf4 (double quant, bf16 compute) base loaded from the saved random model,
             frozen like harness4 (no fp32 upcast of the norms).
  unsloth16  Unsloth's FastVisionModel: the saved random model loaded in 16 bit (bf16),
             FastVisionModel.get_peft_model with the same `targets` regex, use_gradient_checkpointing
             "unsloth" (Unsloth's offloaded checkpointing; True / False for --gc true / false).
  unsloth4   the same with load_in_4bit=True: Unsloth's own nf4 (double quant) choice, which keeps the vision
             tower and merger in bf16.

Each stack runs in its own process (harness.bench runs one subprocess per stack), so the Liger and Unsloth
patches never meet. Unsloth patches transformers and peft when it is imported, so `unsloth` is imported
before anything here touches transformers, and the random model and the processor it loads are written by a
separate process (`python -m harness.bench_peers --save DIR --config MODULE:FUNCTION`) that never imports
Unsloth. This module imports nothing heavy at import time: `build_peer` imports what its stack needs.

Packages: liger-kernel, unsloth and unsloth_zoo are not in the project's dependencies; on the GPU machine they
come as wheels from .whl/peers/ (benchmarks/fetch_peer_wheels.sh).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys

SAVE_DIR = "/tmp/q2vl2b_bench"  # the saved random anchor model that the 4-bit and Unsloth stacks load (harness.bench too)
PEER_STACKS = ("liger16", "liger4", "unsloth16", "unsloth4")

# Qwen2-VL's chat and vision tokens at the ids its released tokenizer gives them: the 2B config's
# image / video / vision start / end token ids index the same embedding rows.
QWEN2_VL_SPECIAL_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
    "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}
CONFIG_TOKEN_NAMES = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                      "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


def build_peer(a, config_fn, targets: str, save_dir: str = SAVE_DIR, device: str = "cuda"):
    """(model, accelerated, checkpointing label) for a.stack in PEER_STACKS, ready for harness.bench.run().

    `a` is harness.bench's argparse namespace (stack, batch, tokens, grid, r, gc, steps, warmup);
    `config_fn()` returns the model config; `targets` is the LoRA target regex; `save_dir` holds the saved
    random model (and the stand-in processor that Unsloth needs), written there on first use.
    """
    if a.stack not in PEER_STACKS:
        raise ValueError(f"unknown peer stack {a.stack!r} (allowed: {', '.join(PEER_STACKS)})")
    four = a.stack.endswith("4")
    if a.stack.startswith("unsloth"):
        return build_unsloth(a, config_fn, targets, save_dir, four, device)
    return build_liger(a, config_fn, targets, save_dir, four, device)


# --- HF + PEFT + Liger-Kernel -------------------------------------------------------------------------------


def build_liger(a, config_fn, targets, save_dir, four, device):
    """liger16 / liger4: Liger's Qwen2-VL patch, then the hf16 / harness4 recipe (PEFT LoRA, standard checkpointing)."""
    import torch
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2_vl
    from peft import LoraConfig, get_peft_model

    apply_liger_kernel_to_qwen2_vl()  # patches the transformers classes: must run before the model is built
    if four:
        from transformers import Qwen2VLForConditionalGeneration

        from harness.bench_workload import load_nf4

        ensure_saved(config_fn, save_dir, processor=False, device=device)
        model = load_nf4(Qwen2VLForConditionalGeneration, save_dir, device)
        check_quantized(model, four)
    else:
        from transformers import Qwen2VLForConditionalGeneration

        with torch.device(device):
            model = Qwen2VLForConditionalGeneration._from_config(config_fn(), dtype=torch.bfloat16,
                                                                 attn_implementation="sdpa")
    accelerated = liger_modules(model)
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.r, lora_dropout=0.0, bias="none",
                                             target_modules=targets))
    check_lora_targets(model, targets)
    model.config.use_cache = False
    from harness.bench_workload import baseline_checkpointing

    ckpt = baseline_checkpointing(model, a.gc)  # like hf16: no offloading in this stack
    model.train()
    return model, accelerated, ckpt


def liger_modules(model) -> dict:
    """What Liger swapped in: module class name -> count, plus the fused linear cross-entropy forward."""
    counts: dict = {}
    for m in model.modules():
        name = type(m).__name__
        if name.startswith("Liger"):
            counts[name] = counts.get(name, 0) + 1
    forward = type(model).forward
    if "liger_kernel" in getattr(forward, "__module__", ""):
        counts["fused_linear_cross_entropy"] = 1
    return counts


# --- Unsloth ------------------------------------------------------------------------------------------------


def build_unsloth(a, config_fn, targets, save_dir, four, device):
    """unsloth16 / unsloth4: FastVisionModel.from_pretrained on the saved random model, then get_peft_model."""
    ensure_saved(config_fn, save_dir, processor=True, device=device)  # in another process: see the module doc
    quiet_unsloth_environment()
    from unsloth import FastVisionModel  # before transformers and peft: Unsloth patches them on import

    import torch

    gc_mode = {"unsloth": "unsloth", "true": True, "false": False}[a.gc]
    model, _processor = FastVisionModel.from_pretrained(
        save_dir, load_in_4bit=four, dtype=torch.bfloat16, max_seq_length=max(2048, a.tokens),
        use_gradient_checkpointing=gc_mode, attn_implementation="sdpa", device_map=device_map(device),
        local_files_only=True)
    check_quantized(model, four)  # Unsloth quietly loads 16-bit where bitsandbytes is unusable
    model = FastVisionModel.get_peft_model(
        model, r=a.r, lora_alpha=a.r, lora_dropout=0, bias="none", target_modules=targets,
        use_gradient_checkpointing=gc_mode, random_state=3407)
    check_lora_targets(model, targets)
    FastVisionModel.for_training(model)
    return model, {}, unsloth_checkpointing_label(gc_mode)


def quiet_unsloth_environment() -> None:
    """Offline, no usage statistics, compiled modules under the temp dir (not in the working tree)."""
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", os.path.join(tempfile.gettempdir(), "unsloth_compiled_cache"))


def unsloth_checkpointing_label(gc_mode) -> str:
    return {"unsloth": "unsloth (offloaded)", True: "standard", False: "off"}[gc_mode]


# --- shared checks ------------------------------------------------------------------------------------------


def check_lora_targets(model, targets: str) -> int:
    """Fail unless LoRA sits on exactly the modules that `targets` names: the stacks must train the same thing."""
    pattern = re.compile(targets)
    names = {strip_peft_prefix(n): m for n, m in model.named_modules()}
    lora = {n for n, m in names.items() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    matched = {n for n in names if pattern.fullmatch(n)}
    if not lora or lora != matched:
        raise RuntimeError(f"LoRA is on {len(lora)} modules, the target regex names {len(matched)}; e.g. without LoRA "
                           f"{sorted(matched - lora)[:2]}, LoRA outside the regex {sorted(lora - matched)[:2]}")
    return len(lora)


def check_quantized(model, four: bool) -> int:
    """Fail unless the base is nf4 (bitsandbytes Linear4bit modules) exactly when a 4-bit stack was asked for."""
    n = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    if bool(n) != four:
        raise RuntimeError(f"asked for a {'4' if four else '16'}-bit base, got {n} Linear4bit modules")
    return n


def strip_peft_prefix(name: str) -> str:
    return name.removeprefix("base_model.model.")


def device_map(device: str) -> dict:
    return {"": 0 if device == "cuda" else device}


# --- the saved random model and its stand-in processor (a separate process) --------------------------------


def ensure_saved(config_fn, save_dir: str, processor: bool, device: str = "cuda") -> None:
    """Write the random model (and, if asked, the processor) into save_dir unless already there, in a subprocess."""
    have_model = os.path.exists(os.path.join(save_dir, "config.json"))
    have_processor = os.path.exists(os.path.join(save_dir, "tokenizer_config.json"))
    if have_model and (have_processor or not processor):
        return
    spec = f"{config_fn.__module__}:{config_fn.__qualname__}"
    cmd = [sys.executable, "-m", "harness.bench_peers", "--save", save_dir, "--config", spec, "--device", device]
    if not processor:
        cmd.append("--no-processor")
    subprocess.run(cmd, check=True)


def stand_in_tokenizer(config):
    """Byte-level tokenizer (every UTF-8 byte a token, no merges) with Qwen2-VL's chat and vision tokens at the
    ids the config uses, so image tokens, padding and end-of-turn mean the same rows as in the real model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from harness.processors import QWEN_CHAT_TEMPLATE

    for attr, token in CONFIG_TOKEN_NAMES.items():
        if getattr(config, attr, QWEN2_VL_SPECIAL_IDS[token]) != QWEN2_VL_SPECIAL_IDS[token]:
            raise ValueError(f"config {attr}={getattr(config, attr)} is not Qwen2-VL's id of {token}")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)} | QWEN2_VL_SPECIAL_IDS, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(QWEN2_VL_SPECIAL_IDS))  # already in the vocab: they keep their ids
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=32768)
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def stand_in_processor(config):
    """Qwen2VLProcessor (stand-in tokenizer + Qwen2-VL image processor, + video processor where torchvision is
    installed, as on the GPU machine); without torchvision, the harness's image-only Qwen2-VL processor."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    from harness.processors import QWEN_CHAT_TEMPLATE, ImageOnlyQwen2VLProcessor

    tokenizer = stand_in_tokenizer(config)
    image_processor = Qwen2VLImageProcessor()
    try:
        from transformers import Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor()
    except (ImportError, ValueError):  # no torchvision (CPU machines with PyPI's CPU torch)
        return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                         chat_template=QWEN_CHAT_TEMPLATE)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                            chat_template=QWEN_CHAT_TEMPLATE)


def save_stand_in_processor(config, save_dir: str) -> None:
    """Save the processor; an image-only one is saved under Qwen2VLProcessor's name so AutoProcessor knows it."""
    import json

    proc = stand_in_processor(config)
    proc.save_pretrained(save_dir)
    path = os.path.join(save_dir, "processor_config.json")
    if os.path.exists(path):
        with open(path) as f:
            cfg = json.load(f)
        if cfg.get("processor_class") != "Qwen2VLProcessor":
            cfg["processor_class"] = "Qwen2VLProcessor"
            with open(path, "w") as f:
                json.dump(cfg, f, indent=2)


def load_config_fn(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write the random model and stand-in processor the peer stacks load.")
    ap.add_argument("--save", default=SAVE_DIR, help="directory (harness.bench's SAVE_DIR by default)")
    ap.add_argument("--config", default="harness.bench_workload:qwen2_vl_2b_config",
                    help="MODULE:FUNCTION returning the config")
    ap.add_argument("--no-processor", action="store_true")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args(argv)
    config = load_config_fn(a.config)()
    if not os.path.exists(os.path.join(a.save, "config.json")):
        from transformers import Qwen2VLForConditionalGeneration

        from harness.bench_workload import save_random_model

        save_random_model(Qwen2VLForConditionalGeneration, config, a.save, a.device)
    if not a.no_processor and not os.path.exists(os.path.join(a.save, "tokenizer_config.json")):
        save_stand_in_processor(config, a.save)
    print(f"saved: {a.save}", flush=True)


if __name__ == "__main__":
    main()

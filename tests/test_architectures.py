"""Every tiny architecture x every LoRA strategy: exactly the right modules get LoRA, nothing else trains,
and each architecture trains a few steps on CPU.

The expected LoRA modules are computed here, independently of harness.registry / harness.targets, from
the raw module tree of a freshly built model and plain substring rules.
"""
import math

import pytest
import torch

from harness import modeling
from harness.config import ConfigError
from harness.pipeline import build, train_run

TINY = ["tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_mllama", "tiny_pixtral", "tiny_gemma3", "tiny_llama", "tiny_qwen2"]
TEXT_ONLY = {"tiny_llama", "tiny_qwen2"}
STRATEGIES = {  # strategy -> (components, kinds), as conf/lora_strategy/*.yaml describe them
    "full": ({"vision", "language"}, {"attention", "mlp"}),
    "language_only": ({"language"}, {"attention", "mlp"}),
    "vision_only": ({"vision"}, {"attention", "mlp"}),
    "attention_only": ({"vision", "language"}, {"attention"}),
    "mlp_only": ({"vision", "language"}, {"mlp"}),
}
TRAINED = ["full", "language_only", "vision_only", "attention_only"]

VISION = (".visual.blocks.", ".vision_model.", ".vision_tower.")
ATTENTION = (".self_attn.", ".cross_attn.", ".attn.", ".attention.")
MLP = (".mlp.", ".feed_forward.")
PREFIX = "base_model.model."


def component(name):
    if any(s in name for s in VISION):
        return "vision"
    if "language_model." in name or name.startswith("model.layers."):
        return "language"
    return None  # output head, projector / merger, embeddings


def kind(name):
    if any(s in name for s in ATTENTION):
        return "attention"
    if any(s in name for s in MLP):
        return "mlp"
    return None


@pytest.fixture(scope="module")
def linears(compose):
    """model -> {name: component} of every nn.Linear of a freshly built model (no LoRA), built once."""
    cache = {}

    def get(model_name):
        if model_name not in cache:
            _, run = compose([f"model={model_name}", "logger=none"])
            processor = modeling.load_processor_for(run.model)
            model = modeling.load_model(run.model, run.quant, torch.device("cpu"), processor, seed=run.seed)
            cache[model_name] = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        return cache[model_name]

    return get


def expected_targets(names, strategy):
    comps, kinds = STRATEGIES[strategy]
    return {n for n in names if component(n) in comps and kind(n) in kinds}


def lora_modules(model):
    from peft.tuners.lora import LoraLayer

    out = set()
    for n, m in model.named_modules():
        if isinstance(m, LoraLayer) and "default" in getattr(m, "lora_A", {}):
            out.add(n[len(PREFIX):] if n.startswith(PREFIX) else n)
    return out


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("model_name", TINY)
def test_lora_lands_on_exactly_the_strategy_modules(compose, linears, model_name, strategy):
    _, run = compose([f"model={model_name}", f"lora_strategy={strategy}", "logger=none"])
    if model_name in TEXT_ONLY and strategy == "vision_only":
        with pytest.raises(ConfigError, match=rf"{model_name}.*text-only"):
            build(run)
        return
    names = linears(model_name)
    want = expected_targets(names, strategy)
    assert want, f"the test's substring rules find nothing for {model_name} / {strategy}"
    if model_name not in TEXT_ONLY and "vision" in STRATEGIES[strategy][0]:
        assert any(component(n) == "vision" for n in want)
    _, _, _, plan, model = build(run)
    got = lora_modules(model)
    assert got == want, f"missing: {sorted(want - got)[:8]}; unexpected: {sorted(got - want)[:8]}"
    assert set(plan.names) == want

    # nothing trains but LoRA weights and the modules_to_save copies
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_A" in n or "lora_B" in n or ".modules_to_save." in n for n in trainable), trainable
    fully = {n.split(".modules_to_save.")[0][len(PREFIX):] for n in trainable if ".modules_to_save." in n}
    assert fully == set(plan.modules_to_save)
    assert all(any(f == e or f.endswith("." + e) for f in fully) for e in run.model.modules_to_save)
    assert (plan.trainable_params, plan.total_params) == modeling.count_params(model)  # the run summary's counts


def test_mllama_has_cross_attention_lora(compose, linears):
    """tiny_mllama's cross-attention layer is a LoRA target like the self-attention ones."""
    assert any(".cross_attn." in n for n in expected_targets(linears("tiny_mllama"), "attention_only"))


# tokens an image becomes in the text: qwen 56x56 -> 2x2 merged; mllama one <|image|> (cross-attention);
# pixtral 64x64 -> 4x4 [IMG] (+ 3 [IMG_BREAK] + [IMG_END]); gemma3 56x56 -> 4x4 soft tokens
IMAGE_TOKENS = {"tiny_qwen2_vl": ("<|image_pad|>", 4), "tiny_qwen2_5_vl": ("<|image_pad|>", 4),
                "tiny_mllama": ("<|image|>", 1), "tiny_pixtral": ("[IMG]", 16),
                "tiny_gemma3": ("<image_soft_token>", 16)}


@pytest.mark.parametrize("model_name", TINY)
def test_offline_processor_batches(compose, model_name):
    """Each family's local processor: labels are exactly the answer + end of turn; images expand as the model
    expects; text-only models read the digit drawn in characters."""
    from harness.collator import IGNORE_INDEX, ChatCollator
    from harness.data import build_datasets

    _, run = compose([f"model={model_name}", "logger=none"])
    processor = modeling.load_processor_for(run.model)
    samples, _ = build_datasets(run.data, run.seed)
    collator = ChatCollator(processor)
    batch = collator(samples[:2])
    tok = collator.tokenizer
    for i, s in enumerate(samples[:2]):
        labels = batch["labels"][i]
        assert tok.decode(labels[labels != IGNORE_INDEX]) == s["answer"] + tok.eos_token
        if model_name in TEXT_ONLY:
            assert s["image_text"] in collator.prompt_text(s)
        else:
            token, n = IMAGE_TOKENS[model_name]
            assert (batch["input_ids"][i] == tok.convert_tokens_to_ids(token)).sum() == n
    assert ("pixel_values" in batch) == (model_name not in TEXT_ONLY)


@pytest.mark.parametrize("model_name", [
    "tiny_mllama", "tiny_gemma3", "tiny_llama",
    "tiny_pixtral",  # without torchvision: load_processor falls back to harness.processors.pixtral
])
def test_saved_processor_reloads(compose, tmp_path, model_name):
    """A run saves its processor beside the adapter; eval / infer modes load it back with load_processor."""
    from harness.collator import ChatCollator
    from harness.data import build_datasets
    from harness.processors import load_processor
    from harness.registry import get_architecture

    _, run = compose([f"model={model_name}", "logger=none"])
    processor = modeling.load_processor_for(run.model)
    processor.save_pretrained(tmp_path)
    mc = run.model
    loaded = load_processor(str(tmp_path), get_architecture(mc.arch), mc.min_pixels, mc.max_pixels, False)
    samples, _ = build_datasets(run.data, run.seed)
    b1, b2 = ChatCollator(processor)(samples[:2]), ChatCollator(loaded)(samples[:2])
    assert sorted(b1) == sorted(b2) and all(torch.equal(b1[k], b2[k]) for k in b1)


def test_saved_pixtral_processor_reloads_with_the_family_loader(compose, tmp_path):
    from harness.collator import ChatCollator
    from harness.data import build_datasets
    from harness.processors import pixtral

    _, run = compose(["model=tiny_pixtral", "logger=none"])
    processor = modeling.load_processor_for(run.model)
    processor.save_pretrained(tmp_path)
    loaded = pixtral.from_pretrained(str(tmp_path))
    samples, _ = build_datasets(run.data, run.seed)
    b1, b2 = ChatCollator(processor)(samples[:2]), ChatCollator(loaded)(samples[:2])
    assert sorted(b1) == sorted(b2) and all(torch.equal(b1[k], b2[k]) for k in b1)


@pytest.mark.parametrize("strategy", TRAINED)
@pytest.mark.parametrize("model_name", TINY)
def test_trains_two_steps(compose, fast, tmp_path, model_name, strategy):
    if model_name in TEXT_ONLY and strategy == "vision_only":
        pytest.skip("text-only architecture: no vision tower")
    _, run = compose([*fast, f"model={model_name}", f"lora_strategy={strategy}", "logger=none",
                      "train.max_steps=2", "data.max_train_samples=8",
                      "data.max_eval_samples=2", "train.max_new_tokens=2"])
    m = train_run(run, {}, tmp_path / "run")
    losses = [l for _, l in m["losses"]]
    assert m["status"] == "ok" and len(losses) == 2
    assert all(math.isfinite(l) for l in losses), losses
    assert m["n_eval"] == 2 and 0.0 <= m["eval_exact_match"] <= 1.0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("model_name", [
    "tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_pixtral", "tiny_gemma3",
    "tiny_mllama",  # random init opens Mllama's zero-initialised cross-attention gates (registry)
])
def test_the_image_reaches_the_trainable_parameters(compose, model_name):
    """vision_only: the loss has a gradient on the image path (vision LoRA or a fully trained projector)."""
    from harness.collator import ChatCollator
    from harness.data import build_datasets

    _, run = compose([f"model={model_name}", "lora_strategy=vision_only", "logger=none"])
    _, _, processor, _, model = build(run)
    samples, _ = build_datasets(run.data, run.seed)
    model(**ChatCollator(processor)(samples[:2])).loss.backward()
    image_path = {n: p.grad for n, p in model.named_parameters()
                  if p.requires_grad and (component(n) == "vision" or "multi_modal_projector" in n)}
    assert image_path
    assert any(g is not None and g.abs().sum() > 0 for g in image_path.values())

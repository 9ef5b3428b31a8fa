"""quant=4bit / 8bit train on CPU; merged checkpoints reproduce the adapter model; eval / infer modes."""
import json
import subprocess
import sys

import pytest
import torch

from harness.collator import ChatCollator
from harness.data import build_datasets
from harness.export import save_merged
from harness.pipeline import build
from harness.train import train


def _built(compose, *overrides):
    _, run = compose(["logger=none", "data.max_train_samples=16", "train.per_device_train_batch_size=4",
                      "train.max_steps=3", "train.learning_rate=1e-2", *overrides])
    device, dtype, processor, plan, model = build(run)
    samples, eval_samples = build_datasets(run.data, run.seed)
    return run, device, dtype, processor, model, samples, eval_samples


@pytest.mark.parametrize("quant, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_training_on_cpu(compose, tmp_path, quant, layer):
    run, device, dtype, processor, model, samples, _ = _built(compose, f"quant={quant}")
    targets = [m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert targets and all(type(m.base_layer).__name__ == layer for m in targets)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    losses = train(run, model, processor, ChatCollator(processor), samples, tmp_path, device, dtype).losses
    assert losses and all(l == l and abs(l) < 1e3 for _, l in losses)
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)


def _logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


def test_merged_16bit_checkpoint_matches_adapter_model(compose, tmp_path):
    from transformers import AutoModelForImageTextToText

    run, device, dtype, processor, model, samples, _ = _built(compose)
    train(run, model, processor, ChatCollator(processor), samples, tmp_path, device, dtype)
    batch = ChatCollator(processor)(samples[:3])
    want = _logits(model, batch)
    save_merged(model, processor, tmp_path / "merged", dtype)  # as a run passes it
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    got = _logits(loaded, batch)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max())


def test_merged_from_4bit_equals_dequantized_base_plus_lora(compose, tmp_path, nf4_by_definition):
    from transformers import AutoModelForImageTextToText

    run, device, dtype, processor, model, samples, _ = _built(compose, "quant=4bit")
    train(run, model, processor, ChatCollator(processor), samples, tmp_path, device, dtype)
    batch = ChatCollator(processor)(samples[:3])
    want = _logits(model, batch)  # nf4 base (dequantized on the fly) + LoRA
    save_merged(model, processor, tmp_path / "merged", dtype)  # as a run passes it
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in cfg
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert not any(type(m).__name__ == "Linear4bit" for m in loaded.modules())
    got = _logits(loaded, batch)
    assert (got - want).abs().max() <= 1e-3 * max(1.0, want.abs().max())


@pytest.mark.parametrize("quant, merged_dtype", [("4bit", "auto"), ("8bit", "bfloat16")])
def test_run_with_merged_export_from_a_quantized_base(compose, fast, tmp_path, quant, merged_dtype):
    """The whole pipeline, so save_merged gets the dtype the way a run passes it (once a crash after training)."""
    from transformers import AutoModelForImageTextToText

    from harness.pipeline import train_run

    _, run = compose([*fast, "logger=none", "train.max_steps=2", f"quant={quant}", "save.merged=true",
                      f"save.merged_dtype={merged_dtype}"])
    m = train_run(run, {}, tmp_path / "run")
    merged = tmp_path / "run" / "merged"
    assert m["status"] == "ok" and json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "ok"
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    loaded = AutoModelForImageTextToText.from_pretrained(merged, dtype="auto")
    want = torch.float32 if merged_dtype == "auto" else torch.bfloat16  # auto: the run's dtype, fp32 on CPU
    assert {p.dtype for p in loaded.parameters()} == {want}
    assert not any(type(x).__name__ in ("Linear4bit", "Linear8bitLt") for x in loaded.modules())
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


@pytest.mark.slow
def test_eval_and_infer_modes_reload_a_run(tmp_path, fast):
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "harness", *fast, "logger=none", "train.max_steps=30",
                        "train.per_device_train_batch_size=16", "data.max_train_samples=512",
                        f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    from harness.inference import eval_run, infer

    result = eval_run(run_dir, tmp_path / "eval", device="cpu")
    assert result["exact_match"] == metrics["eval_exact_match"] and result["n_eval"] == metrics["n_eval"]
    preds = [e["prediction"] for e in result["examples"]]
    assert preds == [e["prediction"] for e in metrics["eval_examples"]]
    from harness.data.digits import digit_image
    from sklearn.datasets import load_digits

    digit_image(load_digits().images[0], 56).save(tmp_path / "d.png")
    answers = infer(run_dir, [str(tmp_path / "d.png")], None, device="cpu")
    assert len(answers) == 1
    q = subprocess.run([sys.executable, "-m", "harness", "mode=eval", "path=/nonexistent",
                        f"hydra.run.dir={tmp_path}/e2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert q.returncode == 2 and "is not a finished training run" in q.stderr


def test_full_finetuning_trains_every_weight_and_saves_the_model(compose, tmp_path, fast):
    from harness.pipeline import train_run

    run, device, dtype, processor, model, samples, _ = _built(compose, "train.full_finetuning=true")
    assert not any(hasattr(m, "lora_A") for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(run, model, processor, ChatCollator(processor), samples, tmp_path, device, dtype)
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) > 0.9 * len(before)
    _, run2 = compose([*fast, "logger=none", "train.full_finetuning=true", "train.max_steps=1"])
    m = train_run(run2, {}, tmp_path / "run")
    assert m["strategy"] == "full_finetuning" and m["trainable_params"] == m["total_params"]
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_push_to_hub_needs_a_token_from_the_environment(compose, monkeypatch):
    from harness.config import ConfigError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="save.push_to_hub='me/adapter' .*HF_TOKEN"):
        compose(["save.push_to_hub=me/adapter"])
    monkeypatch.setenv("HF_TOKEN", "hf_dummy_token_for_the_test")
    cfg, run = compose(["save.push_to_hub=me/adapter"])
    assert "hf_dummy" not in str(cfg)  # the token is never part of the config

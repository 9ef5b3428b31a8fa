"""End to end: CLI run, frozen weights stay frozen, adapter reloads in plain PEFT, same seed same losses."""
import json
import subprocess
import sys

import pytest
import torch

from harness import modeling
from harness.collator import ChatCollator
from harness.data import build_datasets
from harness.pipeline import build, train_run
from harness.train import train


@pytest.mark.slow
def test_cli_default_job_few_steps(tmp_path, repo, fast):
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "harness", *fast, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "run summary" in p.stdout and "eval exact match" in p.stdout
    assert "'mean_token_accuracy':" in p.stdout  # logged by harness.train's trainer at each logging step
    m = json.loads((run_dir / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert m["status"] == "ok" and len(m["losses"]) == 4 and m["skipped_steps"] == 0
    assert m["adapter_dir"] == str(run_dir / "adapter")
    assert m["data_train_without_images"] == 0 and m["data_train_with_images"] > 0 and m["data_too_long"] == 0
    assert all(l == l and l < 100 for _, l in m["losses"])  # finite
    assert m["trainable_params"] > 0 and m["tokens_per_s"] > 0 and 0.0 <= m["eval_exact_match"] <= 1.0
    assert m["resolved"] == {"optim": "adamw_torch", "gradient_checkpointing": "false"}  # `auto` on CPU
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["trainable_params"] == m["trainable_params"]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1, "W&B offline run missing from the run dir"
    assert m["plot"] == str(run_dir / "training.png") and (run_dir / "training.png").stat().st_size > 5000
    assert f"loss curve                {run_dir / 'training.png'}" in p.stdout


@pytest.fixture(scope="module")
def trained(compose, fast, tmp_path_factory):
    """One short in-process training run, with the weights before and after."""
    _, run = compose([*fast, "logger=none"])
    out = tmp_path_factory.mktemp("trained")
    device, dtype, processor, plan, model = build(run)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    train_samples, eval_samples = build_datasets(run.data, run.seed)
    train(run, model, processor, ChatCollator(processor), train_samples, out, device, dtype)
    model.save_pretrained(out / "adapter", safe_serialization=True)
    return dict(run=run, model=model, processor=processor, before=before, trainable=trainable, out=out,
                samples=eval_samples, device=device)


def test_frozen_weights_stay_frozen_and_lora_changes(trained):
    before, trainable = trained["before"], trained["trainable"]
    after = dict(trained["model"].named_parameters())
    frozen = [n for n in before if n not in trainable]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    changed = {n for n in trainable if not torch.equal(before[n], after[n])}
    lora_b = {n for n in trainable if "lora_B" in n}
    assert lora_b and lora_b <= changed  # lora_B starts at zero and must have moved
    # nothing but LoRA weights and the modules_to_save copy of lm_head is trainable
    assert all("lora_" in n or ("modules_to_save" in n and "lm_head" in n) for n in trainable), trainable


def test_adapter_reloads_in_plain_peft_with_identical_logits(trained):
    from peft import PeftModel

    run, processor = trained["run"], trained["processor"]
    assert (trained["out"] / "adapter" / "adapter_model.safetensors").exists()
    batch = ChatCollator(processor)(trained["samples"][:3])
    model = trained["model"].eval()
    # the base is rebuilt from its config and seed, exactly as a run builds it
    base = modeling.load_model(run.model, run.quant, trained["device"], processor, seed=run.seed)
    reloaded = PeftModel.from_pretrained(base, trained["out"] / "adapter").eval()
    with torch.no_grad():
        want = model(**batch).logits
        got = reloaded(**batch).logits
        plain = reloaded.get_base_model()
        with reloaded.disable_adapter():
            untrained = plain(**batch).logits
    assert torch.equal(want, got)
    assert not torch.allclose(want, untrained)  # the adapter really changes the outputs


def test_same_seed_gives_identical_losses(compose, tmp_path, fast):
    def losses(sub, *extra):
        _, run = compose([*fast, "logger=none", *extra])
        return [l for _, l in train_run(run, {}, tmp_path / sub)["losses"]]

    a, b = losses("a"), losses("b")
    assert a == b and len(a) == 4
    assert losses("c", "seed=7") != a


def test_local_checkpoint_path_loads_through_the_same_code(compose, tmp_path):
    """model.name_or_path = a directory with a saved tiny model and its processor."""
    _, run = compose(["logger=none"])
    device = torch.device("cpu")
    processor = modeling.load_processor_for(run.model)
    model = modeling.load_model(run.model, run.quant, device, processor, seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    _, run2 = compose(["logger=none", f"model.name_or_path={tmp_path / 'ckpt'}", "model.config={}"])
    proc2 = modeling.load_processor_for(run2.model)
    loaded = modeling.load_model(run2.model, run2.quant, device, proc2)
    for (n, p), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == n2 and torch.equal(p, p2)
    samples, _ = build_datasets(run.data, run.seed)
    b1, b2 = ChatCollator(processor)(samples[:2]), ChatCollator(proc2)(samples[:2])
    assert all(torch.equal(b1[k], b2[k]) for k in b1)


def test_num_train_epochs_sets_the_length(tmp_path):
    """train.num_train_epochs replaces max_steps: 2 passes over 8 samples at batch 4 are 4 steps."""
    import json
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "harness", "logger=none", "train.num_train_epochs=2",
                        "train.per_device_train_batch_size=4", "data.max_train_samples=8", "data.max_eval_samples=2",
                        "train.logging_steps=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["steps"] == 4 and [s for s, _ in m["losses"]] == [1, 2, 3, 4]

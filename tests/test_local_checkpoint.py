"""A local checkpoint is planned, labelled and trained from its own config.json, never from the preset's
model.config; a missing path or a checkpoint of another architecture fails up front, naming the fix."""
import json
import re
import subprocess
import sys

import pytest
import torch

from harness import modeling
from harness.config import ConfigError
from harness.pipeline import build, make_plan, train_run

LAYERS = 6  # conf/model/tiny_qwen2_vl.yaml builds 4 text layers: a plan from the preset would miss 4 and 5


@pytest.fixture(scope="module")
def ckpt(compose, tmp_path_factory):
    """A tiny Qwen2-VL with 6 text layers and its processor, saved as a local checkpoint."""
    _, run = compose(["logger=none", f"model.config.text_config.num_hidden_layers={LAYERS}"])
    processor = modeling.load_processor_for(run.model)
    model = modeling.load_model(run.model, run.quant, torch.device("cpu"), processor, seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "my_ckpt6"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def language_layers(names):
    return {int(m.group(1)) for n in names if (m := re.search(r"language_model\.layers\.(\d+)\.", n))}


def test_plan_comes_from_the_checkpoint(compose, ckpt):
    _, run = compose(["logger=none", "mode=plan", f"model.name_or_path={ckpt}", "model.config=null"])
    assert run.model.config == {} and run.model.name == "my_ckpt6"  # labelled by the checkpoint, not the preset
    plan = make_plan(run)
    assert language_layers(plan.names) == set(range(LAYERS))
    assert plan.model == "my_ckpt6" and "model=my_ckpt6" in plan.format()


def test_the_presets_random_init_config_is_not_applied_to_a_checkpoint(compose, ckpt):
    # model.config={} merges into the preset's dict (Hydra), so the 4-layer tiny config is still set: an error
    for extra in ([], ["model.config={}"]):
        _, run = compose(["logger=none", "mode=plan", f"model.name_or_path={ckpt}", *extra])
        with pytest.raises(ConfigError, match=r"num_hidden_layers=4 \(checkpoint: 6\).*model\.config=null"):
            make_plan(run)


def test_a_config_that_repeats_the_checkpoints_is_accepted(compose, ckpt):
    _, run = compose(["logger=none", f"model.name_or_path={ckpt}",
                      f"model.config.text_config.num_hidden_layers={LAYERS}"])
    assert language_layers(make_plan(run).names) == set(range(LAYERS))


def test_two_steps_on_the_checkpoint_train_lora_on_all_its_layers(compose, fast, ckpt, tmp_path):
    _, run = compose([*fast, "logger=none", f"model.name_or_path={ckpt}", "model.config=null",
                      "train.max_steps=2", "data.max_train_samples=8", "data.max_eval_samples=2",
                      "train.max_new_tokens=2"])
    m = train_run(run, {}, tmp_path / "run")
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert m["status"] == "ok" and m["model"] == "my_ckpt6"
    assert language_layers(t["name"] for t in plan["targets"]) == set(range(LAYERS))
    assert m["trainable_params"] == plan["trainable_params"] and m["total_params"] == plan["total_params"]


def test_the_loaded_model_has_lora_on_every_layer(compose, ckpt):
    _, run = compose(["logger=none", f"model.name_or_path={ckpt}", "model.config=null"])
    _, _, _, plan, model = build(run)
    lora = [n for n, p in model.named_parameters() if "lora_A" in n]
    assert language_layers(lora) == set(range(LAYERS))
    assert modeling.count_params(model) == (plan.trainable_params, plan.total_params)


@pytest.mark.parametrize("path", ["/no/such/ckpt", "./no/such/ckpt", "~/no/such/ckpt", "no/such/ckpt/dir"])
def test_a_missing_local_path_fails_naming_it(compose, path):
    with pytest.raises(ConfigError, match=rf"model\.name_or_path='{re.escape(path)}' does not exist"):
        compose(["logger=none", "mode=plan", f"model.name_or_path='{path}'", "model.config=null"])


def test_cli_plan_of_a_missing_path_exits_2_without_a_plan(tmp_path):
    p = subprocess.run([sys.executable, "-m", "harness", "mode=plan", "model.name_or_path=/no/such/ckpt",
                        "model.config=null", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "/no/such/ckpt" in p.stdout + p.stderr and "LoRA target plan" not in p.stdout


def test_a_checkpoint_of_another_architecture_fails_naming_both_and_the_fix(compose, ckpt):
    _, run = compose(["logger=none", "model=tiny_qwen2_5_vl", f"model.name_or_path={ckpt}", "model.config=null"])
    with pytest.raises(ConfigError, match=r"'qwen2_vl' checkpoint but model\.arch=qwen2_5_vl builds 'qwen2_5_vl'.*"
                                          r"model\.arch=qwen2_vl \(presets of that architecture: .*model=tiny_qwen2_vl"):
        make_plan(run)


def test_an_unreachable_hub_id_plans_from_the_presets_copy_and_says_so(compose):
    # tests run with HF_HUB_OFFLINE=1 (conftest): the hub cannot serve this id's config.json
    _, run = compose(["logger=none", "mode=plan", "model.name_or_path=nobody/not-cached"])
    assert run.model.name == "not-cached"
    plan = make_plan(run)
    assert any("planned from model.config" in w and "nobody/not-cached" in w for w in plan.warnings)
    _, run = compose(["logger=none", "mode=plan", "model.name_or_path=nobody/not-cached", "model.config=null"])
    with pytest.raises(ConfigError, match=r"model\.name_or_path='nobody/not-cached': its config\.json cannot be read"):
        make_plan(run)


@pytest.mark.parametrize("saved, quant, fix", [({"load_in_4bit": True}, "none", "quant=4bit"),
                                               ({"load_in_8bit": True}, "4bit", "quant=8bit")])
def test_a_prequantized_checkpoint_must_be_run_as_what_it_is(compose, ckpt, tmp_path, saved, quant, fix):
    """A *-bnb-4bit checkpoint loads 4-bit whatever quant says: the run must say so before the weights load."""
    import shutil

    copy = tmp_path / "bnb"
    shutil.copytree(ckpt, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", **saved}
    (copy / "config.json").write_text(json.dumps(cfg))
    _, run = compose(["logger=none", f"model.name_or_path={copy}", "model.config=null", f"quant={quant}"])
    with pytest.raises(ConfigError, match=f"quant.mode={quant} .* bitsandbytes .*allowed: {fix}"):
        modeling.load_model(run.model, run.quant, torch.device("cpu"))

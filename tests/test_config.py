"""Bad values fail at startup, before any model is built, naming the key, the value and what is allowed."""
import subprocess
import sys

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from harness.config import ConfigError


@pytest.mark.parametrize("override, key, allowed", [
    ("lora.r=0", "lora.r=0", "an integer > 0"),
    ("lora.r=-4", "lora.r=-4", "an integer > 0"),
    ("train.learning_rate=0", "train.learning_rate=0", "a number > 0"),
    ("train.learning_rate=-1e-4", "train.learning_rate=-0.0001", "a number > 0"),
    ("train.max_steps=0", "train.max_steps=0", "an integer > 0"),
    ("data.eval_fraction=0", "data.eval_fraction=0", "strictly between 0 and 1"),
    ("data.eval_fraction=1.5", "data.eval_fraction=1.5", "strictly between 0 and 1"),
    ("lora.bias=some", "lora.bias='some'", "none, all, lora_only"),
    ("quant.mode=3bit", "quant.mode='3bit'", "none, 8bit, 4bit"),
    ("mode=fly", "mode='fly'", "train, plan"),
    ("model.arch=gpt9", "model.arch='gpt9'", "qwen2_vl"),
    ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing='maybe'", "unsloth, true, false"),
    ("kernels.compile=sometimes", "kernels.compile='sometimes'", "auto, true, false"),
    ("kernels.compile_mode=fast", "kernels.compile_mode='fast'", "default, reduce-overhead"),
])
def test_bad_value_names_key_value_and_choices(compose, override, key, allowed):
    with pytest.raises(ConfigError) as e:
        compose([override])
    msg = str(e.value)
    assert key in msg and allowed in msg, msg


def test_full_finetuning_on_quantized_base_is_refused(compose):
    with pytest.raises(ConfigError, match=r"train.full_finetuning=True .*quant.mode=4bit"):
        compose(["quant=4bit", "train.full_finetuning=true"])


def test_misspelled_key_fails_at_composition(compose):
    with pytest.raises(ConfigCompositionException, match="rank"):
        compose(["lora.rank=8"])


def test_added_unknown_key_is_refused_with_suggestion(compose):
    """`+key=value` bypasses Hydra's struct mode; validation still names the typo and the nearest key."""
    with pytest.raises(ConfigError, match=r"lora.lora_alfa=8 .*did you mean lora_alpha"):
        compose(["+lora.lora_alfa=8"])


def test_wrong_type_fails_at_composition(compose):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose(["lora.r=sixteen"])


def test_default_config_is_valid(compose):
    _, run = compose()
    assert (run.model.name, run.lora.strategy, run.quant.mode, run.data.name) == (
        "tiny_qwen2_vl", "full", "none", "digits_vqa")
    assert run.logger.backend == "wandb" and run.logger.mode == "offline"


def test_cli_bad_value_exits_before_building_anything(tmp_path):
    """The CLI prints one clear line and exits 2, fast (no model, no data)."""
    p = subprocess.run([sys.executable, "-m", "harness", "lora.r=0", f"hydra.run.dir={tmp_path}/run"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "invalid config: lora.r=0 (allowed: an integer > 0)" in p.stderr
    assert not (tmp_path / "run" / "plan.json").exists()


def test_bench_config_is_validated(compose):
    with pytest.raises(ConfigError, match=r"bench.stacks\[\]='hf17' \(allowed: one of hf16, liger16, liger4, unsloth16, unsloth4, harness16, harness4\)"):
        compose(["mode=bench", "bench.stacks=[hf16,hf17]"])
    with pytest.raises(ConfigError, match="bench.tokens=200 .*more than the 258 image tokens"):
        compose(["mode=bench", "bench.tokens=200"])


def test_bench_mode_without_cuda_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    p = subprocess.run([sys.executable, "-m", "harness", "mode=bench", f"hydra.run.dir={tmp_path}/b"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "mode=bench needs a CUDA GPU" in p.stderr


def test_optimizer_name_is_checked_against_transformers():
    from harness.config import check_optim
    from harness.train import resolve_optim

    check_optim("auto")
    check_optim("adamw_torch_fused")
    with pytest.raises(ConfigError, match=r"train.optim='adamw_fused' \(allowed: one of auto, .*adamw_torch_fused"):
        check_optim("adamw_fused")
    assert resolve_optim("auto", torch.device("cuda")) == "adamw_torch_fused"
    assert resolve_optim("auto", torch.device("cpu")) == "adamw_torch"
    assert resolve_optim("sgd", torch.device("cuda")) == "sgd"


def test_kernel_switches_reach_accelerate_model(compose, monkeypatch):
    """kernels.* from the command line arrive in the config accelerate_model reads (a renamed field would
    otherwise be dropped silently, the kernel running with its default)."""
    import harness.kernels as hk
    from harness import pipeline

    _, run = compose(["kernels.enabled=true", "kernels.lora_op=false", "kernels.combo_kernels=false",
                      "kernels.tiled_mlp=false", "kernels.rope=false", "kernels.host_prep=false",
                      "kernels.lora_paths=auto"])
    seen = {}
    monkeypatch.setattr(hk, "accelerate_model", lambda model, cfg: seen.update(cfg) or {})
    pipeline.accelerate(run, model=None)
    assert seen["lora_op"] is False and seen["combo_kernels"] is False and seen["lora_paths"] == "auto"
    assert seen["tiled_mlp"] is False and seen["rope"] is False and seen["enabled"] is True
    _, run = compose(["kernels.enabled=true", "kernels.host_prep=false"])  # kernels.lora_op left at its default: on
    seen.clear()
    pipeline.accelerate(run, model=None)
    assert seen["lora_op"] is True and run.bench.lora_op is True
    assert seen["lora_paths"] == "auto"  # the measured default


def test_lora_paths_is_validated_and_reaches_the_kernels(compose, monkeypatch):
    import importlib

    import torch

    from harness.kernels import accelerate_model

    with pytest.raises(ConfigError, match=r"kernels.lora_paths='fast' \(allowed: one of cublas, auto\)"):
        compose(["kernels.lora_paths=fast"])
    mod = importlib.import_module("harness.kernels.lora_linear")
    monkeypatch.setattr(mod, "PATHS", dict.fromkeys(("fwd", "dx", "dy"), "cublas"))
    accelerate_model(torch.nn.Linear(2, 2), {"lora_paths": "auto"}, force=True)
    assert mod.PATHS == dict.fromkeys(("fwd", "dx", "dy"), "auto")
    accelerate_model(torch.nn.Linear(2, 2), {}, force=True)  # not given: left as it is (HARNESS_LORA_PATHS)
    assert mod.PATHS == dict.fromkeys(("fwd", "dx", "dy"), "auto")


def test_kernel_switch_defaults_agree_between_harness_and_library():
    """The harness's kernels.* defaults (KernelsConfig, conf/config.yaml) and the library's (KernelConfig, the
    fallback of accelerate_model for a missing key) are the same, so a run and a direct accelerate_model call
    swap the same kernels. One deliberate difference: the harness compiles on 'auto' (with the kernels, on
    CUDA); the library compiles only when asked."""
    import dataclasses

    from omegaconf import OmegaConf

    from harness.config import KernelsConfig
    from harness.kernels.patch import KernelConfig

    lib = vars(KernelConfig())
    harness = {f.name: f.default for f in dataclasses.fields(KernelsConfig)}
    yaml_kernels = OmegaConf.load("conf/config.yaml").kernels
    shared = sorted(set(lib) & set(harness))
    assert {"lora", "lora_op", "tiled_mlp", "combo_kernels", "compile_mode"} <= set(shared)
    for name in shared:
        if name == "compile":
            assert (lib[name], harness[name]) == (False, "auto")
            continue
        if name == "lora_paths":  # the library leaves the paths as they are (None); a harness run sets them
            assert (lib[name], harness[name]) == (None, "auto")
            assert yaml_kernels[name] == "auto"
            continue
        assert harness[name] == lib[name], f"kernels.{name}: harness {harness[name]!r} vs library {lib[name]!r}"
        if name in yaml_kernels:
            assert yaml_kernels[name] == harness[name], f"conf/config.yaml kernels.{name}: {yaml_kernels[name]!r}"


def test_accelerate_model_falls_back_to_library_defaults():
    """A partial kernels config (dict or object) gets KernelConfig's default for each missing switch."""
    from harness.kernels import patch

    assert patch._cfg_get({"lora_op": False}, "lora_op") is False
    assert patch._cfg_get({}, "lora_op") is patch.KernelConfig().lora_op is True
    assert patch._cfg_get(None, "compile_mode") == "default"
    assert patch._cfg_get(type("C", (), {"tiled_mlp": None})(), "tiled_mlp") is True


@pytest.mark.parametrize("init", ["orthogonal", "pissa_niter_4", "olora", "gaussian", False])
def test_peft_inits_that_need_no_data_are_accepted(compose, init):
    assert compose([f"lora.init_lora_weights={init}"])[1].lora.init_lora_weights == init


@pytest.mark.parametrize("overrides, key, allowed", [
    (["lora.init_lora_weights=eva"], "lora.init_lora_weights='eva'", "data-driven initialisation"),
    (["lora.init_lora_weights=pissa_niter_0"], "lora.init_lora_weights='pissa_niter_0'", "pissa_niter_<k>"),
    (["lora.init_lora_weights=loftq", "device=cuda", "+lora.loftq_config.loftq_bits=2"],
     "lora.loftq_config.loftq_bits=2", "one of 4, 8"),
    (["lora.init_lora_weights=loftq", "device=cuda", "quant=4bit"], "lora.init_lora_weights='loftq'", "use quant=none"),
    (["lora.init_lora_weights=loftq", "device=cpu"], "lora.init_lora_weights='loftq'", "without CUDA"),
    (["+lora.loftq_config.loftq_bits=4"], "lora.loftq_config=", "unless lora.init_lora_weights=loftq"),
])
def test_init_and_loftq_are_checked_before_the_model_is_built(compose, overrides, key, allowed):
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    assert key in str(e.value) and allowed in str(e.value), str(e.value)

"""LoRA target resolution on the meta device: overrides, layer subsets, per-component ranks, clear errors."""

import pytest

from harness.config import ConfigError
from harness.pipeline import make_plan

VISION_ATTN = {f"model.visual.blocks.{i}.attn.{x}" for i in range(2) for x in ("qkv", "proj")}
VISION_MLP = {f"model.visual.blocks.{i}.mlp.{x}" for i in range(2) for x in ("fc1", "fc2")}
LANG_ATTN = {f"model.language_model.layers.{i}.self_attn.{x}_proj" for i in range(4) for x in "qkvo"}
LANG_MLP = {f"model.language_model.layers.{i}.mlp.{x}_proj" for i in range(4) for x in ("gate", "up", "down")}
MERGER = {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2"}


def plan_for(compose, *overrides):
    _, run = compose(["logger=none", *overrides])
    return make_plan(run)


@pytest.mark.parametrize("strategy, expected", [
    ("full", VISION_ATTN | VISION_MLP | LANG_ATTN | LANG_MLP),
    ("language_only", LANG_ATTN | LANG_MLP),
    ("vision_only", VISION_ATTN | VISION_MLP),
    ("attention_only", VISION_ATTN | LANG_ATTN),
    ("mlp_only", VISION_MLP | LANG_MLP),
])
def test_strategies_select_exactly(compose, strategy, expected):
    plan = plan_for(compose, f"lora_strategy={strategy}")
    assert set(plan.names) == expected
    assert plan.modules_to_save == ["lm_head"]


def test_projector_flag_adds_the_merger(compose):
    plan = plan_for(compose, "lora.finetune_projector=true")
    assert set(plan.names) == VISION_ATTN | VISION_MLP | LANG_ATTN | LANG_MLP | MERGER
    assert {t.component for t in plan.targets if t.name in MERGER} == {"projector"}


def test_plan_counts(compose):
    plan = plan_for(compose, "lora.r=8")
    # q_proj: 128 -> 128, LoRA params = r * (in + out)
    q = next(t for t in plan.targets if t.name.endswith("layers.0.self_attn.q_proj"))
    assert q.lora_params == 8 * (128 + 128)
    assert plan.lora_params == sum(8 * (t.in_features + t.out_features) for t in plan.targets)
    assert plan.trainable_params == plan.lora_params + 128 * 300  # + lm_head (no bias)
    text = plan.format()
    assert "language   attention" in text and f"{plan.lora_params:,}" in text


def test_per_component_rank_and_alpha(compose):
    plan = plan_for(compose, "lora.vision_r=4", "lora.language_r=32", "lora.language_alpha=64")
    assert {t.r for t in plan.targets if t.component == "vision"} == {4}
    assert {(t.r, t.alpha) for t in plan.targets if t.component == "language"} == {(32, 64)}
    rp = plan.rank_pattern(16)
    assert len(rp) == len(plan.targets)


def test_target_modules_list_regex_and_all_linear(compose):
    plan = plan_for(compose, "lora_strategy=language_only", "lora.target_modules=[q_proj,v_proj]")
    assert set(plan.names) == {n for n in LANG_ATTN if n.endswith(("q_proj", "v_proj"))}
    plan = plan_for(compose, r"lora.target_modules='.*visual.*\.(qkv|fc1)'")
    assert set(plan.names) == {n for n in VISION_ATTN | VISION_MLP if n.endswith(("qkv", "fc1"))}
    # Unsloth's rule (the default): all-linear is every linear of the components and kinds the flags select
    plan = plan_for(compose, "lora.target_modules=all-linear")
    assert set(plan.names) == VISION_ATTN | VISION_MLP | LANG_ATTN | LANG_MLP  # no projector, no lm_head
    plan = plan_for(compose, "lora.target_modules=all-linear", "lora.finetune_projector=true")
    assert set(plan.names) == VISION_ATTN | VISION_MLP | LANG_ATTN | LANG_MLP | MERGER
    plan = plan_for(compose, "lora_strategy=language_only", "lora.target_modules=all-linear")
    assert set(plan.names) == LANG_ATTN | LANG_MLP


def test_explicit_targets_are_narrowed_by_the_flags_unless_asked_not_to(compose):
    plan = plan_for(compose, "lora_strategy=language_only", r"lora.target_modules='.*(qkv|q_proj)'")
    assert set(plan.names) == {n for n in LANG_ATTN if n.endswith("q_proj")}
    assert any("outside the finetune_* flags" in w and ".qkv" in w for w in plan.warnings)
    plan = plan_for(compose, "lora_strategy=language_only", r"lora.target_modules='.*(qkv|q_proj)'",
                    "lora.narrow_targets_by_flags=false")
    assert set(plan.names) == {n for n in VISION_ATTN | LANG_ATTN if n.endswith(("qkv", "q_proj"))}
    assert any("moot" in w and "finetune_vision_layers=False" in w for w in plan.warnings)
    plan = plan_for(compose, "lora.target_modules=all-linear", "lora.narrow_targets_by_flags=false")
    assert set(plan.names) == VISION_ATTN | VISION_MLP | LANG_ATTN | LANG_MLP | MERGER  # not lm_head
    with pytest.raises(ConfigError, match="inside what the finetune_\\* flags.*narrow_targets_by_flags=false"):
        plan_for(compose, "lora_strategy=vision_only", "lora.target_modules=[q_proj]")


def test_layers_to_transform(compose):
    plan = plan_for(compose, "lora_strategy=language_only", "lora.layers_to_transform=[0,3]")
    assert set(plan.names) == {n for n in LANG_ATTN | LANG_MLP if ".layers.0." in n or ".layers.3." in n}


def test_layers_to_transform_out_of_range_names_the_range(compose):
    with pytest.raises(ConfigError, match=r"layers_to_transform=\[0, 7\] has indices \[7\].*layers 0\.\.3"):
        plan_for(compose, "lora.layers_to_transform=[0,7]")


def test_unmatched_target_modules_are_listed_with_nearest_names(compose):
    with pytest.raises(ConfigError) as e:
        plan_for(compose, "lora.target_modules=[q_proj,qproj,gate_projj]")
    msg = str(e.value)
    assert "'qproj'" in msg and "'gate_projj'" in msg and "'q_proj'" not in msg.split("nearest")[0]
    assert "q_proj" in msg and "gate_proj" in msg


def test_zero_modules_names_model_strategy_and_why(compose):
    with pytest.raises(ConfigError, match=r"lora_strategy=full selects zero modules of model tiny_qwen2_vl.*"
                                          r"finetune_attention_modules and finetune_mlp_modules are both false"):
        plan_for(compose, "lora.finetune_attention_modules=false", "lora.finetune_mlp_modules=false")


def test_cli_plan_mode_prints_table(repo, tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "harness", "mode=plan", "lora_strategy=attention_only",
                        f"hydra.run.dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "LoRA target plan: model=tiny_qwen2_vl strategy=attention_only" in p.stdout
    assert "vision     attention        4" in p.stdout and "mlp" not in p.stdout.split("---")[1]


def test_experiment_preset_composes(repo, tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "harness", "--cfg", "hydra", "experiment=strategy_ablation",
                        f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "lora_strategy: full,language_only,vision_only,attention_only" in p.stdout


def test_plan_total_is_the_trained_models_and_says_why(compose):
    """The plan's total is what the run summary reports (the model after LoRA), its parts spelled out."""
    from harness import modeling
    from harness.pipeline import build

    _, run = compose(["logger=none"])
    _, _, _, plan, model = build(run)
    trainable, total = modeling.count_params(model)
    assert (plan.trainable_params, plan.total_params) == (trainable, total)
    assert total == plan.base_params + plan.lora_params + 128 * 300  # + the trainable copy of lm_head
    assert plan.base_params == sum(p.numel() for n, p in model.named_parameters()
                                   if "lora_" not in n and ".modules_to_save." not in n)
    assert (f"trainable: {trainable:,} of {total:,} params" in plan.format() and f"total {total:,} = base "
            f"{plan.base_params:,} + LoRA {plan.lora_params:,} + modules_to_save copy {128 * 300:,}" in plan.format())

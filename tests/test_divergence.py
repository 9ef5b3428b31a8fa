"""train.on_nonfinite: a diverging run stops with status diverged and keeps its last finite weights; a failure
after training keeps what was produced; what can be checked before training fails before it."""
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from harness.collator import ChatCollator
from harness.data import build_datasets
from harness.errors import RunDiverged, StageFailed, UserError
from harness.pipeline import build, train_run
from harness.train import MAX_SKIPPED_IN_A_ROW, train

DIVERGE = ["logger=none", "train.learning_rate=1e6", "train.max_steps=12", "train.logging_steps=1",
           "train.warmup_steps=0", "train.per_device_train_batch_size=4", "data.max_train_samples=64",
           "data.max_eval_samples=8"]


def strict_json(path):
    """metrics.json as a strict JSON reader sees it: a bare NaN / Infinity is an error."""
    def no_constants(name):
        raise ValueError(f"{path} holds a bare {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def all_finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors)


def test_divergence_keeps_the_last_finite_checkpoint_and_its_adapter(compose, tmp_path):
    _, run = compose([*DIVERGE, "train.save_steps=1"])
    run_dir = tmp_path / "run"
    with pytest.raises(RunDiverged, match="diverged at step 2.*learning_rate") as e:
        train_run(run, {}, run_dir)
    m = strict_json(run_dir / "metrics.json")
    assert m["status"] == "diverged" and m["diverged_at_step"] == e.value.step == 2
    assert m["restored_from"] == str(run_dir / "checkpoints" / "checkpoint-1")
    # never a non-finite checkpoint, so save_total_limit cannot rotate out the good one
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-1"]
    ckpt = load_file(run_dir / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors")
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all_finite(adapter.values()) and adapter.keys() == ckpt.keys()
    assert all(torch.equal(adapter[k], ckpt[k]) for k in ckpt)  # the adapter is the restored checkpoint


def test_cli_issue_command_exits_1_with_status_diverged_and_no_nan_adapter(tmp_path):
    """The reported command (checkpoint every 2 steps: the first one is already non-finite)."""
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "harness", *DIVERGE, "train.save_steps=2",
                        f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "diverged" in p.stderr and "train.learning_rate" in p.stderr
    m = strict_json(run_dir / "metrics.json")
    assert m["status"] == "diverged" and m["diverged_at_step"] >= 1
    assert m["restored_from"] is None and m["adapter_dir"] is None and not (run_dir / "adapter").exists()
    assert not list((run_dir / "checkpoints").glob("checkpoint-*"))  # no NaN checkpoint written
    assert strict_json(run_dir / "status.json")["status"] == "diverged"
    assert all(l is None or math.isfinite(l) for _, l in m["losses"])


@pytest.fixture
def built(compose):
    def _built(*overrides):
        _, run = compose(["logger=none", "data.max_train_samples=32", "train.per_device_train_batch_size=4",
                          "train.logging_steps=1", "train.warmup_steps=0", "train.learning_rate=1e-2",
                          *overrides])
        device, dtype, processor, plan, model = build(run)
        samples, _ = build_datasets(run.data, run.seed)
        return run, device, dtype, processor, model, samples

    return _built


def nan_loss_at(model, steps: set[int]):
    """Make the training loss NaN (and so every gradient) at the given 1-based forward calls."""
    calls = []

    def hook(module, args, kwargs, out):
        if module.training:
            calls.append(1)
            if len(calls) in steps:
                out.loss = out.loss * float("nan")
        return out

    return model.register_forward_hook(hook, with_kwargs=True)


def test_skip_step_drops_one_bad_step_and_trains_on(built, tmp_path):
    run, device, dtype, processor, model, samples = built("train.max_steps=5", "train.on_nonfinite=skip_step")
    nan_loss_at(model, {2})
    res = train(run, model, processor, ChatCollator(processor), samples, tmp_path, device, dtype)
    assert res.skipped_steps == 1 and len(res.losses) == 5
    assert math.isnan(res.losses[1][1]) and all(math.isfinite(l) for i, l in res.losses if i != 2)
    assert all_finite(p for p in model.parameters() if p.requires_grad)


def test_stop_mode_stops_at_the_bad_step(built, tmp_path):
    run, device, dtype, processor, model, samples = built("train.max_steps=6")
    nan_loss_at(model, {3})
    with pytest.raises(RunDiverged, match="at step 3: non-finite loss") as e:
        train(run, model, processor, ChatCollator(processor), samples, tmp_path, device, dtype)
    assert len(e.value.result.losses) == 3 and e.value.restored_from is None  # no checkpoints configured


def test_skip_step_gives_up_after_too_many_in_a_row(built, tmp_path):
    run, device, dtype, processor, model, samples = built("train.max_steps=12", "train.on_nonfinite=skip_step")
    nan_loss_at(model, set(range(2, 13)))
    with pytest.raises(RunDiverged, match=f"{MAX_SKIPPED_IN_A_ROW} optimizer steps in a row") as e:
        train(run, model, processor, ChatCollator(processor), samples, tmp_path, device, dtype)
    assert e.value.step == 1 + MAX_SKIPPED_IN_A_ROW and e.value.result.skipped_steps == MAX_SKIPPED_IN_A_ROW


@pytest.mark.parametrize("stage, target", [("merged_export", "harness.export.save_merged"),
                                           ("evaluate", "harness.evaluate.evaluate")])
def test_late_stage_failure_writes_metrics_and_keeps_what_was_made(compose, fast, tmp_path, monkeypatch, stage,
                                                                   target):
    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(target, broken)
    _, run = compose([*fast, "logger=none", "train.max_steps=2", "save.merged=true"])
    with pytest.raises(StageFailed, match=f"{stage}.*disk full") as e:
        train_run(run, {}, tmp_path / "run")
    assert e.value.stage == stage and isinstance(e.value.cause, OSError)
    m = strict_json(tmp_path / "run" / "metrics.json")
    assert m["status"] == "failed" and m["failed_stage"] == stage and "disk full" in m["error"]
    assert len(m["losses"]) == 2 and m["trainable_params"] > 0  # what training produced is recorded
    if stage == "merged_export":
        assert 0.0 <= m["eval_exact_match"] <= 1.0
        assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    else:
        assert "eval_exact_match" not in m and not (tmp_path / "run" / "adapter").exists()


def test_unwritable_run_dir_fails_before_any_model_is_built(compose, tmp_path, monkeypatch):
    import harness.pipeline as pipeline

    def no_build(run):
        raise AssertionError("built a model for a run that cannot be written")

    monkeypatch.setattr(pipeline, "build", no_build)
    (tmp_path / "a_file").write_text("")
    _, run = compose(["logger=none"])
    with pytest.raises(UserError, match="not writable.*hydra.run.dir"):
        train_run(run, {}, tmp_path / "a_file" / "run")


def test_on_nonfinite_and_merged_export_are_validated(compose):
    from harness.config import ConfigError

    assert compose([])[1].train.on_nonfinite == "stop"
    with pytest.raises(ConfigError, match="train.on_nonfinite"):
        compose(["train.on_nonfinite=ignore"])
    with pytest.raises(ConfigError, match="save.merged.*train.full_finetuning"):
        compose(["save.merged=true", "train.full_finetuning=true"])

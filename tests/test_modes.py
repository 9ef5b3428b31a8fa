"""mode=replay (NaN-aware comparison, CheckFailed gates CI), mode=infer (one bad image never costs the others),
mode=report on a path that is not a sweep (one-line error, nothing written)."""
import json
import math
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from harness.errors import CheckFailed, RunDiverged, UserError

NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# replay: the comparison


@pytest.mark.parametrize("before, after, first", [
    ([[1, 2.0], [2, NAN]], [[1, 2.0], [2, NAN]], None),  # NaN at the same step in both: same
    ([[1, 2.0], [2, None]], [[1, 2.0], [2, NAN]], None),  # null (today's files) and bare NaN (older ones)
    ([[1, 2.0], [2, 1.0]], [[1, 2.0], [2, NAN]], 2),  # NaN vs a number
    ([[1, 2.0], [2, 1.0]], [[1, 2.0]], 2),  # a step missing from the replay
    ([[1, 2.0]], [[1, 2.0], [2, 1.0]], 2),  # a step the original never logged
    ([[1, 2.0], [2, 1.0], [3, 0.5]], [[1, 2.0], [2, 1.25], [3, 0.75]], 2),
])
def test_compare_losses_is_nan_aware(before, after, first):
    from harness.replay import compare_losses

    result = compare_losses(before, after)
    assert result["identical"] is (first is None)
    assert (result["first_diff"] or {}).get("step") == first


def test_compare_losses_names_the_first_step_and_the_size():
    from harness.replay import compare_losses

    result = compare_losses([[1, 2.0], [2, 1.0], [3, 0.5]], [[1, 2.0], [2, 1.25], [3, 0.0]])
    assert result["first_diff"] == {"step": 2, "before": 1.0, "after": 1.25, "diff": 0.25}
    assert result["max_loss_diff"] == 0.5
    assert math.isinf(compare_losses([[1, 1.0]], [[1, None]])["max_loss_diff"])


# ----------------------------------------------------------------------------------------------
# replay: the mode, with training replaced by the metrics it would return


@pytest.fixture
def saved_run(compose, tmp_path):
    """A run directory as a training run leaves it: the saved config and metrics.json (written per test)."""
    cfg, _ = compose(["logger=none", "device=cpu"])
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run


def _replay_with(monkeypatch, saved_run, tmp_path, before: str, after: dict | Exception):
    """replay() of a run whose metrics.json is `before` (raw text), the rerun returning `after` (or raising it,
    after writing its metrics.json as a diverged run does)."""
    from harness import pipeline
    from harness.replay import replay

    (saved_run / "metrics.json").write_text(before)
    out = tmp_path / "replay"
    out.mkdir()

    def fake_train_run(run, config_dict, run_dir):
        if isinstance(after, Exception):
            (run_dir / "metrics.json").write_text(json.dumps(after.metrics))
            raise after
        return after

    monkeypatch.setattr(pipeline, "train_run", fake_train_run)
    return replay(saved_run, out), out


def test_replay_of_a_run_that_diverged_the_same_way_is_identical(monkeypatch, saved_run, tmp_path, capsys):
    before = '{"status": "diverged", "losses": [[1, 2.5], [2, NaN]], "eval_exact_match": null}'  # an older file
    diverged = RunDiverged("training diverged at step 2")
    diverged.metrics = {"status": "diverged", "losses": [[1, 2.5], [2, None]], "eval_exact_match": None}
    result, out = _replay_with(monkeypatch, saved_run, tmp_path, before, diverged)
    assert result["identical"] is True
    assert f"replay of {saved_run}: identical" in capsys.readouterr().out
    assert json.loads((out / "replay.json").read_text())["losses_identical"] is True


def test_replay_that_differs_raises_check_failed_after_writing_the_comparison(monkeypatch, saved_run, tmp_path,
                                                                              capsys):
    before = json.dumps({"status": "ok", "losses": [[1, 2.5], [2, 1.5], [3, 1.0]], "eval_exact_match": 0.5})
    after = {"status": "ok", "losses": [[1, 2.5], [2, 1.625], [3, NAN]], "eval_exact_match": 0.5}
    with pytest.raises(CheckFailed, match=r"differs: first at step 2 \(loss 1.5 -> 1.625, diff 0.125\)") as e:
        _replay_with(monkeypatch, saved_run, tmp_path, before, after)
    assert e.value.exit_code == 1
    assert "differs: first at step 2" in capsys.readouterr().out  # printed before raising
    saved = json.loads((tmp_path / "replay" / "replay.json").read_text())
    assert saved["identical"] is False and saved["first_diff"]["step"] == 2
    assert saved["max_loss_diff"] is None  # inf (NaN vs a number at step 3), written as strict JSON


def test_replay_that_differs_only_in_eval_fails_too(monkeypatch, saved_run, tmp_path):
    losses = [[1, 2.5], [2, 1.5]]
    before = json.dumps({"status": "ok", "losses": losses, "eval_exact_match": 0.5})
    with pytest.raises(CheckFailed, match=r"differs \(losses identical\); eval exact match 50.0% -> 62.5%"):
        _replay_with(monkeypatch, saved_run, tmp_path, before,
                     {"status": "ok", "losses": losses, "eval_exact_match": 0.625})


# ----------------------------------------------------------------------------------------------
# infer: a finished run's adapter (untrained: only the plumbing is under test)


@pytest.fixture(scope="module")
def adapter_run(compose, tmp_path_factory):
    from harness.pipeline import build

    cfg, run = compose(["logger=none", "device=cpu"])
    run_dir = tmp_path_factory.mktemp("adapter_run")
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    model = build(run)[-1]
    model.save_pretrained(run_dir / "adapter")
    return run_dir


def test_infer_answers_every_readable_image_in_one_batch(adapter_run, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from harness import evaluate
    from harness.inference import infer

    good = [tmp_path / "a.png", tmp_path / "b.png"]
    for i, f in enumerate(good):
        Image.new("RGB", (56, 56), (40 * i, 0, 0)).save(f)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    missing = tmp_path / "missing.png"
    images = [str(good[0]), str(missing), str(corrupt), str(good[1]), str(tmp_path)]

    calls = []
    real = evaluate.generate_answers
    monkeypatch.setattr(evaluate, "generate_answers", lambda model, collator, samples, *a, **k:
                        calls.append(len(samples)) or real(model, collator, samples, *a, **k))
    with pytest.raises(UserError, match=r"3 of 5 images could not be answered") as e:
        infer(adapter_run, images, None, device="cpu")
    assert str(missing) in str(e.value) and str(corrupt) in str(e.value) and e.value.exit_code == 2
    assert calls == [2]  # the readable ones, batched together
    lines = capsys.readouterr().out.strip().splitlines()[-5:]
    assert [line.split(": ", 1)[0] for line in lines] == images  # one line per image, in the given order
    assert not lines[0].split(": ", 1)[1].startswith("error") and not lines[3].split(": ", 1)[1].startswith("error")
    assert lines[1] == f"{missing}: error: not a file"
    assert lines[2].startswith(f"{corrupt}: error: UnidentifiedImageError")


# ----------------------------------------------------------------------------------------------
# report on a path that is not a sweep: the CLI's one-line error, exit 2, nothing written


def test_report_mode_on_a_training_run_exits_2_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- lora.r=8\n")
    (run / "metrics.json").write_text(json.dumps({"status": "ok", "losses": [[1, 1.0]], "loss_last": 1.0}))
    before = sorted(run.rglob("*"))
    p = subprocess.run([sys.executable, "-m", "harness", "mode=report", f"path={run}", "logger=none",
                        f"hydra.run.dir={tmp_path}/report_run"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"path='{run}' is a single run, not a sweep" in errors[0]
    assert "Traceback" not in p.stderr
    assert sorted(run.rglob("*")) == before and not (tmp_path / "report_run").exists()


# ----------------------------------------------------------------------------------------------
# digits_vqa split sizes: data.n_train / data.n_eval mean what they say (the default split is unchanged)


def test_digits_split_sizes_follow_n_train_and_n_eval(compose):
    from harness.data import build_datasets
    from harness.errors import DataError

    _, run = compose(["logger=none"])
    train, evals = build_datasets(run.data, run.seed)
    assert (len(train), len(evals)) == (1617, 180)  # the 10% stratified split of the 1,797 scans
    _, run = compose(["logger=none", "data.n_eval=50", "data.n_train=300"])
    train, evals = build_datasets(run.data, run.seed)
    assert (len(train), len(evals)) == (300, 50)
    assert not {s["source"] for s in train} & {s["source"] for s in evals}
    _, run = compose(["logger=none", "data.n_eval=500"])
    with pytest.raises(DataError, match=r"data.n_train=1617 \+ data.n_eval=500 exceed the 1797 digits.*at most 1297"):
        build_datasets(run.data, run.seed)
    _, run = compose(["logger=none", "data.eval_fraction=0.2"])
    with pytest.raises(DataError, match=r"data.eval_fraction=0.2 does not apply to data=digits_vqa.*data.n_eval"):
        build_datasets(run.data, run.seed)

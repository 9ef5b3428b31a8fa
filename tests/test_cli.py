"""The CLI's promises: one-line user errors, no folder left by a command that did no work, a finished run never
rewritten except by a resume of the same config, secrets redacted everywhere they could land."""
import json
import os
import subprocess
import sys

import pytest

from harness.secrets import REDACTED, is_secret_name, redact

TINY = ["logger=none", "train.max_steps=2", "train.per_device_train_batch_size=2", "data.max_train_samples=8",
        "data.max_eval_samples=2", "train.logging_steps=1"]


def harness(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.mark.parametrize("name", ["api_key", "logger.api_key", "WANDB_API_KEY", "apiKey", "hf_token", "HF_TOKEN",
                                  "token", "access_token", "HUGGING_FACE_HUB_TOKEN", "password", "db_passwd",
                                  "client_secret", "AWS_SECRET_ACCESS_KEY", "private_key", "credentials"])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["max_new_tokens", "tokens", "bench.tokens", "bench.max_tokens", "max_tokens",
                                  "pad_token", "eos_token", "num_tokens", "tokenizer", "key", "sort_key",
                                  "token_budget", "keyboard", "monkey"])
def test_not_secret_names(name):
    assert not is_secret_name(name)


def test_redaction_keeps_counts_and_catches_values_in_overrides():
    cfg = {"train": {"max_new_tokens": 4}, "bench": {"tokens": 1024, "max_tokens": 65536},
           "logger": {"api_key": "sekret-123456", "tags": ["run with sekret-123456 inside"]},
           "overrides": ["+logger.api_key=sekret-123456", "lora.r=8"]}
    out = redact(cfg)
    assert out["train"] == {"max_new_tokens": 4} and out["bench"] == {"tokens": 1024, "max_tokens": 65536}
    assert out["logger"]["api_key"] == REDACTED and "sekret" not in json.dumps(out)
    assert out["overrides"] == [f"+logger.api_key={REDACTED}", "lora.r=8"]


def test_secret_override_is_never_echoed_and_leaves_no_folder(tmp_path):
    for args in (["+logger.api_key=sekret-abcdef12", "mode=plan"], ["logger.api_key=sekret-abcdef12", "mode=plan"]):
        p = harness(*args, cwd=tmp_path)
        assert p.returncode != 0
        assert "sekret-abcdef12" not in p.stdout + p.stderr, p.stderr
    assert files_under(tmp_path / "outputs") == []


def test_user_errors_are_short_and_leave_nothing(tmp_path):
    p = harness("lora.r=0", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["error: invalid config: lora.r=0 (allowed: an integer > 0)"]
    p = harness("mode=plan", cwd=tmp_path)  # a plan prints; it keeps no run folder
    assert p.returncode == 0 and "LoRA target plan" in p.stdout
    assert files_under(tmp_path / "outputs") == []


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    run_dir = tmp / "run"
    p = harness(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir


def snapshot(run_dir):
    return {f: (run_dir / f).read_bytes() for f in files_under(run_dir) if (run_dir / f).is_file()
            and not f.endswith(".log")}


def test_resume_with_a_changed_config_names_the_keys_and_changes_nothing(finished_run, tmp_path):
    before = snapshot(finished_run)
    p = harness(*TINY, "train.resume=auto", "lora.r=8", "train.learning_rate=0.001", f"hydra.run.dir={finished_run}",
                cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    (line,) = p.stderr.strip().splitlines()
    assert "lora.r: 16 -> 8" in line and "train.learning_rate: 0.003 -> 0.001" in line
    assert snapshot(finished_run) == before


def test_a_finished_run_is_not_overwritten_without_resume(finished_run, tmp_path):
    before = snapshot(finished_run)
    p = harness(*TINY, f"hydra.run.dir={finished_run}", cwd=tmp_path)
    assert p.returncode == 2 and "already holds a run" in p.stderr and "train.resume=auto" in p.stderr
    assert snapshot(finished_run) == before


def test_saved_hydra_files_hold_the_run_and_no_secret(tmp_path):
    run_dir = tmp_path / "run"
    secret = "hf_sekrettoken_0123456789"
    env = {**os.environ, "HF_TOKEN": secret}
    p = harness(*TINY, f"logger.tags=[{secret}]", "+hydra.job.env_set.MY_API_KEY=sekret-value-42",
                f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    saved = {f: (run_dir / ".hydra" / f).read_text() for f in ("config.yaml", "overrides.yaml", "hydra.yaml")}
    assert "strategy: full" in saved["config.yaml"] and "train.max_steps=2" in saved["overrides.yaml"]
    for f in run_dir.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert secret.encode() not in data and b"sekret-value-42" not in data, f
    assert secret not in p.stdout + p.stderr


@pytest.mark.parametrize("make, args, says", [
    (None, ["data=jsonl", "data.path=/no/such.jsonl"], "data.path='/no/such.jsonl' is not a file"),
    ('{"image": "../x.png", "prompt": "q", "answer": "a"}\n', ["data=jsonl", "data.path=bad.jsonl"],
     "outside the data file's directory"),
    (None, ["data=hf", "data.path=/no/such/dataset"], "data=hf (data.path=/no/such/dataset)"),
])
def test_data_errors_are_one_line_and_leave_no_folder(tmp_path, make, args, says):
    if make:
        (tmp_path / "bad.jsonl").write_text(make)
    p = harness("logger=none", *args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("error: ") and says in line
    assert files_under(tmp_path / "outputs") == []


def test_a_sweep_keeps_no_secret_in_any_file(tmp_path):
    sweep = tmp_path / "sweep"
    p = harness("--multirun", "mode=plan", "lora.r=4,8", "+hydra.job.env_set.MY_TOKEN=sekret-sweep-771",
                f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert "LoRA target plan" in p.stdout, p.stderr[-2000:]
    assert "sekret-sweep-771" not in p.stdout + p.stderr
    saved = [f for f in sweep.rglob("*") if f.is_file()]
    assert any(f.name == "multirun.yaml" for f in saved) and any(f.name == "hydra.yaml" for f in saved)
    for f in saved:
        assert b"sekret-sweep-771" not in f.read_bytes(), f


def test_resume_of_a_run_saved_before_a_key_existed(finished_run, tmp_path):
    """A key the saved run's schema did not have yet (added since) is not a config change."""
    import shutil

    import yaml

    old = tmp_path / "old_run"
    shutil.copytree(finished_run, old)
    saved = old / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(saved.read_text())
    del cfg["train"]["on_nonfinite"]
    saved.write_text(yaml.safe_dump(cfg))
    p = harness(*TINY, "train.resume=auto", f"hydra.run.dir={old}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]

"""--multirun: failed jobs are recorded and the sweep goes on; the report; secrets never saved."""
import csv
import json
import os
import subprocess
import sys

import pytest

SMALL = ["train.max_steps=2", "train.per_device_train_batch_size=2", "data.max_train_samples=8",
         "data.max_eval_samples=2", "train.logging_steps=1"]


@pytest.mark.slow
def test_sweep_with_a_failing_job_reports_and_exits_nonzero(tmp_path):
    sweep = tmp_path / "sweep"
    p = subprocess.run([sys.executable, "-m", "harness", "--multirun", "lora_strategy=full,language_only,vision_only",
                        "lora.r=4", *SMALL, "logger=none", f"hydra.sweep.dir={sweep}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    # a 4th job in the same sweep dir that raises mid-way (a target that matches nothing)
    q = subprocess.run([sys.executable, "-m", "harness", "--multirun", "lora_strategy=custom",
                        "lora.target_modules=[no_such_proj]", *SMALL, "logger=none", f"hydra.sweep.dir={sweep}",
                        "hydra.sweep.subdir=3"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert q.returncode == 1, q.stderr[-3000:]
    assert "sweep finished with 1 failed job(s)" in q.stderr
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert "no_such_proj" in rows[3]["error"] and (sweep / "3" / "traceback.txt").exists()
    assert all(float(r["loss_last"]) > 0 for r in rows[:3])
    assert int(rows[1]["trainable_vision"]) == 0 and int(rows[2]["trainable_language"]) == 0
    md = (sweep / "summary.md").read_text()
    assert "4 jobs, 3 ok, 1 not ok" in md and "lora_strategy=vision_only" in md
    for png in ("loss_curves.png", "metric_vs_params.png", "throughput_memory.png"):
        assert (sweep / png).stat().st_size > 1000
    # the failed job wrote only into its own directory
    assert not (sweep / "3" / "metrics.json").exists() and (sweep / "0" / "metrics.json").exists()


def test_report_mode_on_demand(tmp_path, repo):
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- lora.r=8\n")
    (job / "metrics.json").write_text(json.dumps(dict(status="ok", losses=[[1, 2.0], [2, 1.0]], loss_last=1.0,
                                                      trainable_params=10, eval_exact_match=0.5)))
    p = subprocess.run([sys.executable, "-m", "harness", "mode=report", f"path={tmp_path}",
                        f"hydra.run.dir={tmp_path}/report_run"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "1 jobs, 1 ok, 0 not ok" in p.stdout and (tmp_path / "summary.csv").exists()


@pytest.mark.slow
def test_secrets_never_reach_saved_configs_or_wandb(tmp_path):
    run_dir = tmp_path / "run"
    secret, token = "wandb-secret-0123456789abcdef", "hf_secrettoken_ABCDEFGHIJ"
    env = {**os.environ, "WANDB_API_KEY": secret, "HF_TOKEN": token, "WANDB_MODE": "offline"}
    p = subprocess.run([sys.executable, "-m", "harness", *SMALL, f"hydra.run.dir={run_dir}",
                        f"logger.tags=[{token}]"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    wandb_files = list((run_dir / "wandb").rglob("*"))
    assert any(f.name.endswith(".wandb") for f in wandb_files)
    for f in [*run_dir.rglob("*.json"), *run_dir.rglob("*.yaml"), *run_dir.rglob("*.log"), *wandb_files]:
        if f.is_file() and not f.name.startswith(".hydra"):
            data = f.read_bytes()
            assert secret.encode() not in data, f
            if ".hydra" not in str(f):  # Hydra's own copy of the command line keeps what the user typed
                assert token.encode() not in data, f
    assert p.stdout.count(secret) == 0


@pytest.mark.slow
def test_replay_reproduces_a_run(tmp_path):
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "harness", *SMALL, "logger=none", "seed=5", f"hydra.run.dir={run_dir}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    q = subprocess.run([sys.executable, "-m", "harness", "mode=replay", f"path={run_dir}",
                        f"hydra.run.dir={tmp_path}/replay"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stderr[-2000:]
    assert f"replay of {run_dir}: identical" in q.stdout
    assert json.loads((tmp_path / "replay" / "replay.json").read_text())["losses_identical"] is True


@pytest.mark.parametrize("override, expect", [
    ("hydra/launcher=slurm", "hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ("hydra/launcher=local_parallel", "hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("experiment=optuna_lr_r", "hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"),
])
def test_launcher_and_sweeper_configs_compose(tmp_path, override, expect):
    for what in ("hydra", "job"):
        p = subprocess.run([sys.executable, "-m", "harness", override, "--cfg", what], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        if what == "hydra":
            assert expect in p.stdout
        else:
            assert "lora:" in p.stdout and "strategy: full" in p.stdout


@pytest.mark.slow
def test_parallel_local_sweep_runs_jobs_in_processes(tmp_path):
    sweep = tmp_path / "sweep"
    p = subprocess.run([sys.executable, "-m", "harness", "--multirun", "hydra/launcher=local_parallel", "lora.r=4,8",
                        *SMALL, "logger=none", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok"]


@pytest.mark.slow
def test_adapter_logged_as_wandb_artifact_when_asked(tmp_path):
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "harness", *SMALL, "logger.log_adapter=true", f"hydra.run.dir={run_dir}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "WANDB_MODE": "offline"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "wandb sync" in p.stdout
    (wandb_file,) = (run_dir / "wandb").rglob("*.wandb")
    assert b"tiny_qwen2_vl-full-run" in wandb_file.read_bytes()  # the artifact record


@pytest.mark.slow
def test_memory_does_not_grow_across_in_process_jobs(tmp_path):
    """Jobs of a basic-launcher sweep share one process: what a job leaves behind must be released."""
    sweep = tmp_path / "sweep"
    p = subprocess.run([sys.executable, "-m", "harness", "--multirun", "lora.r=4,4,4,4,4", *SMALL, "logger=none",
                        f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rss = [json.loads((sweep / str(i) / "metrics.json").read_text())["host_rss_start_gib"] for i in range(5)]
    # job 0 pays for first imports and caches; from job 1 on the process must stay flat
    assert max(rss[1:]) - rss[1] < 0.05, rss


def test_report_table_reads_in_units_and_marks_the_best(tmp_path):
    from harness.report import write_report

    def job(name, r, **m):
        d = tmp_path / name
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- lora.r={r}\n- train.max_steps=10\n")
        (d / "metrics.json").write_text(json.dumps(dict(status="ok", losses=[[1, 3.0], [10, m["loss_last"]]], **m)))

    job("0", 8, loss_last=0.51234, eval_exact_match=0.9722, eval_cer=0.028, tokens_per_s=13344.4,
        peak_memory_gib=0.981, wall_s=37.04, trainable_params=194048)
    job("1", 16, loss_last=0.40001, eval_exact_match=0.95, eval_cer=0.05, tokens_per_s=12000.0,
        peak_memory_gib=0.981, wall_s=40.0, trainable_params=388096)
    d = tmp_path / "2"  # killed before it wrote metrics
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("- lora.r=32\n- train.max_steps=10\n")
    md = write_report(tmp_path)["markdown"]
    rows = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| lora.r=")}
    assert rows["| lora.r=8"] == ("| lora.r=8 | 0 | ok | 194,048 | 0.5123 | **97.2%** | **0.028** | **13,344** | 0.98 "
                                  "| 37.0 s |")
    assert rows["| lora.r=16"] == "| lora.r=16 | 1 | ok | 388,096 | **0.4000** | 95.0% | 0.050 | 12,000 | 0.98 | 40.0 s |"
    assert "unknown (no metrics.json" in rows["| lora.r=32"] and "**" not in rows["| lora.r=32"]
    assert "overrides shared by all jobs: train.max_steps=10" in md  # peak memory ties: nothing bold there
    assert "Bold: the best finished job per column (last loss lowest, exact match highest, CER lowest, tokens/s highest)" in md


def test_a_run_plot_never_fails_the_run(tmp_path, monkeypatch):
    from harness import report

    m = dict(model="tiny", strategy="full", quant="none", losses=[[1, 5.0], [10, 0.5]], eval_exact_match=0.9, n_eval=10)
    assert report.plot_run(dict(m, losses=[]), tmp_path) is None  # nothing to draw
    assert report.plot_run(m, tmp_path) == tmp_path / "training.png"
    monkeypatch.setattr(report, "_loss_curves", lambda *a: 1 / 0)
    assert report.plot_run(m, tmp_path / "other") is None

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


def _job(sweep, name, overrides=None, metrics=None, status=None, raw_metrics=None):
    """A hand-written sweep job folder: .hydra/overrides.yaml, metrics.json (dict or raw text), status.json."""
    d = sweep / name
    d.mkdir(parents=True)
    if overrides is not None:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if raw_metrics is not None:
        (d / "metrics.json").write_text(raw_metrics)
    if status is not None:
        (d / "status.json").write_text(json.dumps(status))
    return d


def _ok(loss, em, tps, **more):
    return dict(status="ok", losses=[[1, 3.0], [2, loss]], loss_last=loss, eval_exact_match=em, eval_cer=1 - em,
                tokens_per_s=tps, peak_memory_gib=1.0, trainable_params=1000, **more)


@pytest.fixture
def mixed_sweep(tmp_path):
    """Two finished jobs and four that must never be ranked, each better than both in some column."""
    sweep = tmp_path / "sweep"
    _job(sweep, "0", ["lora.r=4"], _ok(0.5, 0.8, 100.0))
    _job(sweep, "1", ["lora.r=8"], _ok(0.6, 0.9, 90.0))
    # diverged: training wrote null for the non-finite loss
    _job(sweep, "2", ["lora.r=16"], dict(_ok(None, 0.99, 999.0), status="diverged", losses=[[1, 3.0], [2, None]],
                                         error="non-finite loss=nan"))
    # a late stage failed after a great loss
    _job(sweep, "3", ["lora.r=32"], dict(_ok(0.01, 0.95, 500.0), status="failed", failed_stage="merged_export",
                                         error="OSError: disk full"))
    # metrics.json says ok, status.json (written by the CLI) says diverged
    _job(sweep, "4", ["lora.r=64"], _ok(0.02, 0.97, 600.0), status=dict(status="diverged", error="RunDiverged: x"))
    # an older run: bare NaN (json.loads accepts it), status ok
    _job(sweep, "5", ["lora.r=128"], raw_metrics=json.dumps(_ok(0.4, 0.99, 700.0)).replace(
        '"loss_last": 0.4', '"loss_last": NaN').replace("[2, 0.4]", "[2, NaN]"))
    return sweep


def test_report_never_ranks_failed_or_diverged_jobs(mixed_sweep, monkeypatch):
    from harness import report

    drawn = {}  # plot file name -> the labels it ranks

    def save(fig, path):
        axes = fig.axes
        drawn[path.name] = ({t.get_text() for ax in axes for t in ax.get_yticklabels() if t.get_text()}
                            | {t.get_text() for ax in axes for t in ax.texts}
                            | {line.get_label() for ax in axes for line in ax.get_lines()})
        return orig_save(fig, path)

    orig_save = report._save
    monkeypatch.setattr(report, "_save", save)
    result = report.write_report(mixed_sweep)
    assert sorted(r["job"] for r in result["failed"]) == ["2", "3", "4", "5"]
    assert [r["status"] for r in result["rows"]] == ["ok", "ok", "diverged", "failed", "diverged", "diverged"]
    md = result["markdown"]
    table = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| lora.r=")}
    for job in ("16", "32", "64", "128"):
        assert "**" not in table[f"| lora.r={job}"], table[f"| lora.r={job}"]
    assert "**0.5000**" in table["| lora.r=4"] and "**100**" in table["| lora.r=4"]
    assert "**90.0%**" in table["| lora.r=8"]
    failed = md.split("## Failed jobs", 1)[1]
    assert "`2` (lora.r=16): diverged: non-finite loss=nan" in failed
    assert "`3` (lora.r=32): failed in stage merged_export: OSError: disk full" in failed
    assert "`4` (lora.r=64): diverged: RunDiverged: x" in failed
    assert "`5` (lora.r=128): diverged: last loss nan in metrics.json" in failed
    assert "6 jobs, 2 ok, 4 not ok" in md
    for name in ("loss_curves.png", "metric_vs_params.png", "throughput_memory.png"):
        labels = {x for x in drawn[name] if x.startswith("lora.r=")}
        assert labels == {"lora.r=4", "lora.r=8"}, (name, drawn[name])
    rows = list(csv.DictReader(open(mixed_sweep / "summary.csv")))
    assert rows[3]["failed_stage"] == "merged_export" and rows[2]["loss_last"] == ""


def test_sweep_callback_exits_1_on_a_diverged_job(mixed_sweep, capsys):
    from omegaconf import OmegaConf

    from harness.callbacks import SweepReportCallback

    with pytest.raises(SystemExit) as e:
        SweepReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(mixed_sweep)}}}))
    assert e.value.code == 1
    assert "sweep finished with 4 failed job(s): 2 (diverged), 3 (failed), 4 (diverged), 5 (diverged)" in \
        capsys.readouterr().err


def test_report_counts_jobs_with_only_metrics_json(tmp_path):
    from harness.report import write_report

    _job(tmp_path, "0", metrics=_ok(0.5, 0.8, 100.0))
    _job(tmp_path, "1", metrics=_ok(0.4, 0.9, 100.0))
    result = write_report(tmp_path)
    assert [r["job"] for r in result["rows"]] == ["0", "1"] and not result["failed"]


def test_report_refuses_a_run_dir_and_a_missing_path_writing_nothing(tmp_path):
    from harness.errors import UserError
    from harness.report import write_report

    run = tmp_path / "run"  # a single training run: its own .hydra/, metrics.json, adapter/
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- lora.r=8\n")
    (run / "metrics.json").write_text(json.dumps(_ok(0.5, 0.8, 100.0)))
    (run / "adapter").mkdir()
    before = sorted(run.rglob("*"))
    with pytest.raises(UserError, match=r"path='.*/run' is a single run, not a sweep.*one folder per job"):
        write_report(run)
    assert sorted(run.rglob("*")) == before
    with pytest.raises(UserError, match=r"path='.*/nowhere' does not exist"):
        write_report(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()

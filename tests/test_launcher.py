"""hydra/launcher=gpus: sweep jobs over a host's GPUs, one per slot, the rest queued (fake device lists on CPU)."""
import csv
import json
import subprocess
import sys

import pytest

from harness.gpu_pool import PoolSettings


def test_slots_from_device_lists():
    assert PoolSettings.from_conf({"gpus": [0, 1, 2, 3]}).slots == (("0",), ("1",), ("2",), ("3",))
    assert PoolSettings.from_conf({"gpus": [0, 1, 2, 3, 4], "gpus_per_job": 2}).slots == (("0", "1"), ("2", "3"))
    assert PoolSettings.from_conf({"gpus": "auto"}, visible=["2", "5"]).slots == (("2",), ("5",))
    assert PoolSettings.from_conf({"gpus": "auto", "cpu_jobs": 3}, visible=[]).slots == ((), (), ())
    assert PoolSettings.from_conf({"gpus": [0, 1, 2], "max_parallel": 2}).slots == (("0",), ("1",))


def test_more_gpus_per_job_than_gpus_names_the_key():
    with pytest.raises(ValueError, match="gpus_per_job=4 but only 2 GPU"):
        PoolSettings.from_conf({"gpus": [0, 1], "gpus_per_job": 4})


def _jobs(sweep):
    return sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name))


@pytest.mark.slow
def test_jobs_share_the_gpus_one_each_and_queue(tmp_path):
    sweep = tmp_path / "sweep"
    p = subprocess.run([sys.executable, "-m", "harness", "--multirun", "hydra/launcher=gpus",
                        "hydra.launcher.gpus=[0,1]", "mode=plan", "lora.r=4,8,16", f"hydra.sweep.dir={sweep}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert "3 jobs, 2 at a time (GPU 0, GPU 1)" in p.stdout + p.stderr, p.stderr[-3000:]
    runs = [json.loads((job / "launcher.json").read_text()) for job in _jobs(sweep)]
    assert len(runs) == 3 and all(len(r["devices"]) == 1 for r in runs)
    assert all(r["cuda_visible_devices"] == r["devices"][0] for r in runs)
    assert len({r["pid"] for r in runs}) == 3  # a fresh process per job
    for i, a in enumerate(runs):  # jobs that overlap in time never share a GPU
        for b in runs[i + 1:]:
            if a["start"] < b["end"] and b["start"] < a["end"]:
                assert a["devices"] != b["devices"]
    first_end = min(r["end"] for r in runs[:2])
    assert runs[2]["start"] >= first_end - 0.5  # the third waited for a free GPU


@pytest.mark.slow
def test_a_failing_job_stays_in_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    p = subprocess.run([sys.executable, "-m", "harness", "--multirun", "hydra/launcher=gpus",
                        "hydra.launcher.gpus=[0,1]", "lora.r=0,4", "logger=none", "train.max_steps=1",
                        "train.per_device_train_batch_size=2",
                        "data.max_train_samples=4", "data.max_eval_samples=2", f"hydra.sweep.dir={sweep}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert "lora.r=0" in rows[0]["error"]
    assert not (sweep / "0" / "metrics.json").exists() and (sweep / "1" / "adapter").is_dir()

"""A run killed with SIGKILL mid-training and resumed ends with the same adapter, bitwise (CPU)."""
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

ARGS = ["logger=none", "train.max_steps=24", "train.save_steps=4", "train.per_device_train_batch_size=4",
        "data.max_train_samples=96", "data.max_eval_samples=4", "train.logging_steps=1", "train.warmup_steps=2"]


def _run(run_dir, *extra, cwd):
    return subprocess.Popen([sys.executable, "-m", "harness", *ARGS, *extra, f"hydra.run.dir={run_dir}"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_adapter(tmp_path):
    ref = _run(tmp_path / "ref", cwd=tmp_path)
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out[-3000:]

    run_dir = tmp_path / "killed"
    p = _run(run_dir, cwd=tmp_path)
    deadline = time.time() + 600
    while not (run_dir / "checkpoints" / "checkpoint-8" / "trainer_state.json").exists():
        assert p.poll() is None, "finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (run_dir / "metrics.json").exists()

    q = _run(run_dir, "train.resume=auto", cwd=tmp_path)
    out, _ = q.communicate(timeout=600)
    assert q.returncode == 0, out[-3000:]
    assert "resuming from" in out
    a = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    import json

    la = json.loads((tmp_path / "ref" / "metrics.json").read_text())["losses"]
    lb = json.loads((run_dir / "metrics.json").read_text())["losses"]
    assert la == lb and len(la) == 24  # the history before the kill is kept

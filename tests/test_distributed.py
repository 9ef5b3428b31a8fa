"""torchrun: one run over several processes (DDP through the HF Trainer); gloo on CPU."""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", ["false", "unsloth"])
def test_torchrun_two_cpu_processes_train_one_run(tmp_path, checkpointing):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                        "-m", "harness", "logger=none", "train.max_steps=3", "train.per_device_train_batch_size=2",
                        "data.max_train_samples=16", "data.max_eval_samples=2", "train.logging_steps=1",
                        f"train.gradient_checkpointing={checkpointing}",
                        f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())  # written once, by rank 0
    assert m["status"] == "ok" and len(m["losses"]) == 3
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert p.stdout.count("run summary") == 1
    assert m["world_size"] == 2

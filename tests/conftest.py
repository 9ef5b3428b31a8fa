import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
CONF = str(REPO / "conf")

# Fast settings for end-to-end runs in tests.
FAST = ["train.max_steps=4", "train.per_device_train_batch_size=4", "train.logging_steps=1",
        "data.max_train_samples=64", "data.max_eval_samples=8", "train.warmup_steps=0"]


def compose_cfg(overrides=()):
    from hydra import compose, initialize_config_dir

    from harness.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="session")
def repo():
    return REPO


@pytest.fixture(scope="session")
def fast():
    return list(FAST)


@pytest.fixture(scope="session")
def compose():
    """compose(overrides) -> (DictConfig, validated RunConfig)."""
    from harness.config import validate

    def _compose(overrides=()):
        cfg = compose_cfg(overrides)
        return cfg, validate(cfg)

    return _compose


@pytest.fixture
def nf4_by_definition(monkeypatch):
    """bitsandbytes' nf4 Linear4bit forward computed from the layout's definition (dequantise, then matmul).
    bitsandbytes 0.50.2's CPU ops are wrong when a row is not a whole number of 64-blocks (seen on an
    AVX512-BF16 CPU; tests/kernels/test_nf4_dequant.py), which the tiny test models have."""
    import bitsandbytes as bnb
    import torch

    from harness.kernels.nf4_dequant import dequantize_nf4_torch

    def forward(self, x):
        qs = self.weight.quant_state
        if getattr(qs, "quant_type", None) != "nf4":
            return orig(self, x)
        w = dequantize_nf4_torch(self.weight.data, qs, x.dtype)
        return torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    orig = bnb.nn.Linear4bit.forward
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", forward)

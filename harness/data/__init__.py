"""Datasets as chat samples: each sample is {"images": [PIL.Image, ...], "prompt": str, "answer": str},
optionally with "image_text": a text rendering of the images, which text-only models get instead."""
from __future__ import annotations

from typing import Callable

from harness.config import DataConfig

# data.name -> builder(DataConfig, seed) -> (train samples, eval samples)
DATASETS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        DATASETS[name] = fn
        return fn

    return deco


def build_datasets(cfg: DataConfig, seed: int):
    from harness.config import ConfigError
    from harness.data import digits  # noqa: F401  (registers)

    if cfg.name not in DATASETS:
        raise ConfigError(f"invalid config: data.name={cfg.name!r} (allowed: one of {', '.join(sorted(DATASETS))})")
    train, evals = DATASETS[cfg.name](cfg, seed)
    if cfg.max_train_samples:
        train = train[: cfg.max_train_samples]
    if cfg.max_eval_samples:
        evals = evals[: cfg.max_eval_samples]
    if not train:
        raise ValueError(f"data={cfg.name}: the training split is empty")
    return train, evals

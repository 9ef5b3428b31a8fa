"""Datasets as chat samples: each sample is {"images": [PIL.Image, ...], "prompt": str, "answer": str,
"source": str}, optionally with "image_text": a text rendering of the images, which text-only models get
instead. "source" names the sample in errors and skip reasons ("file.jsonl:17", "train[42]", "digits[3]").
harness.data.lengths checks the samples with the run's collator before training (lengths, images).

A builder returns (train, eval) or (train, eval, stats); stats is {"skipped": n, "reasons": [...]}
(samples dropped for bad data, see harness.data.common.BadSamples). `build_datasets` normalises both
forms into a `Splits`: a 2-tuple (train, eval), so `train, evals = build_datasets(...)` keeps working,
with the stats on `.stats`.
"""
from __future__ import annotations

from typing import Callable

from harness.config import DataConfig

# data.name -> builder(DataConfig, seed) -> (train samples, eval samples[, stats])
DATASETS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        DATASETS[name] = fn
        return fn

    return deco


class Splits(tuple):
    """(train, eval) with the data stats attached: .train, .eval, .stats ({"skipped": n, "reasons": [...]})."""

    def __new__(cls, train: list, evals: list, stats: dict | None = None):
        self = super().__new__(cls, (train, evals))
        self.stats = {"skipped": 0, "reasons": [], **(stats or {})}
        return self

    @property
    def train(self) -> list:
        return self[0]

    @property
    def eval(self) -> list:
        return self[1]


def source_of(cfg: DataConfig) -> str:
    return f"data={cfg.name}" + (f" (data.path={cfg.path})" if getattr(cfg, "path", None) else "")


def build_datasets(cfg: DataConfig, seed: int) -> Splits:
    from harness.config import ConfigError
    from harness.data import digits, hf, jsonl, synthetic_ocr  # noqa: F401  (registers)
    from harness.errors import DataError

    if cfg.name not in DATASETS:
        raise ConfigError(f"invalid config: data.name={cfg.name!r} (allowed: one of {', '.join(sorted(DATASETS))})")
    out = DATASETS[cfg.name](cfg, seed)
    train, evals = out[0], out[1]
    stats = out[2] if len(out) > 2 else None
    if cfg.max_train_samples:
        train = train[: cfg.max_train_samples]
    if cfg.max_eval_samples:
        evals = evals[: cfg.max_eval_samples]
    splits = Splits(list(train), list(evals), stats)
    if not train:
        skipped = splits.stats["skipped"]
        raise DataError(f"{source_of(cfg)}: the training split is empty"
                         + (f" after skipping {skipped} bad samples (first: {splits.stats['reasons'][0]})"
                            if skipped else ""))
    return splits

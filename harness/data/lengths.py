"""Checks on the samples before training, in one pass with the run's own collator, so that a run fails (or
skips) before its first step rather than at step 6 of 12, and again at step 6 on resume:

- every train and eval sample's token count (template, image tokens, answer, end of turn) against
  data.max_length: data.on_too_long=skip counts it as a bad sample (data.stats -> data_skipped /
  data_skip_reasons), =error raises a DataError naming the sample, its length and the fixes;
- a sample the processor cannot encode (or whose answer cannot be labelled) is a bad sample
  (data.on_bad_sample);
- a vision-language model whose train samples carry no image at all is a DataError unless
  data.allow_text_only=true; some samples without an image give a loud warning with the count.

Samples are named by their "source" (set by the builders: "file.jsonl:17", "train[42]", "digits[3]"),
else by split and index.
"""
from __future__ import annotations

import logging

from harness.config import DataConfig
from harness.data import Splits, source_of
from harness.data.common import MAX_REASONS, BadSample, BadSamples
from harness.errors import DataError

log = logging.getLogger(__name__)

CHUNK = 64  # samples encoded together: the processor's per-call overhead dominates single samples
PROGRESS_FROM = 2048  # samples; below this the pass takes seconds and no progress bar is shown


def name_of(sample: dict, split: str, index: int) -> str:
    return str(sample.get("source") or f"{split}[{index}]")


def measure_one(collator, sample: dict, where: str, broken: BadSamples) -> int | None:
    """One sample's token count; None (and a bad sample) when the processor cannot encode it."""
    try:
        return collator.measure([sample])[0]
    except Exception as e:  # noqa: BLE001 - any processor error on this sample's data makes it unusable
        broken.handle(where, BadSample(f"the processor cannot encode it: {type(e).__name__}: {e}"))
        return None


def measure(samples: list[dict], collator, split: str, broken: BadSamples) -> list[int | None]:
    """Token counts in chunks; a chunk that fails is measured sample by sample to name the bad one."""
    from tqdm.auto import tqdm

    lengths: list[int | None] = []
    starts = range(0, len(samples), CHUNK)
    for start in tqdm(starts, desc=f"measuring {split} samples", unit="chunk",
                      disable=len(samples) < PROGRESS_FROM):
        chunk = samples[start:start + CHUNK]
        try:
            lengths += collator.measure(chunk)
        except Exception:  # noqa: BLE001 - retried one by one below, each failure named
            lengths += [measure_one(collator, s, name_of(s, split, start + j), broken) for j, s in enumerate(chunk)]
    return lengths


def too_long_error(cfg: DataConfig, over: list[tuple[str, int]]) -> DataError:
    name, n = over[0]
    more = ""
    if len(over) > 1:
        more = f" ({len(over) - 1} more samples are too long, the longest {max(k for _, k in over)} tokens)"
    return DataError(f"{source_of(cfg)}: sample {name} has {n} tokens, more than data.max_length={cfg.max_length}"
                     f"{more}; fix: raise data.max_length, lower model.max_pixels (fewer image tokens), or set "
                     "data.on_too_long=skip to skip such samples")


def check_lengths(samples: list[dict], collator, cfg: DataConfig, bad: BadSamples, split: str = "train",
                  broken: BadSamples | None = None) -> list[dict]:
    """The samples that fit data.max_length. Over-long ones are counted in `bad` (data.on_too_long=skip) or
    raise a DataError naming the first (=error); ones the processor cannot encode go to `broken`
    (data.on_bad_sample; default: `bad`)."""
    lengths = measure(samples, collator, split, broken or bad)
    over = [(name_of(s, split, i), n) for i, (s, n) in enumerate(zip(samples, lengths))
            if n is not None and n > cfg.max_length]
    if over and cfg.on_too_long == "error":
        raise too_long_error(cfg, over)
    for name, n in over:
        bad.handle(name, BadSample(f"{n} tokens, more than data.max_length={cfg.max_length} "
                                   "(data.on_too_long=skip)"))
    return [s for s, n in zip(samples, lengths) if n is not None and n <= cfg.max_length]


def where_images_come_from(cfg: DataConfig) -> str:
    if cfg.name == "jsonl":
        return "put each line's image path(s) under the key 'image' or 'images' (or image items in chat content)"
    if cfg.name == "hf":
        return (f"set data.columns.image to the column holding the images (now {cfg.columns.image!r}; auto takes "
                "image / images or the one datasets.Image column)")
    return "give the samples images"


def check_images(train: list[dict], collator, cfg: DataConfig) -> None:
    """A vision-language model must see images: none in any train sample is an error, some missing a warning."""
    if not getattr(collator, "multimodal", False) or not train:
        return
    without = sum(1 for s in train if not s.get("images"))
    if without == len(train) and not cfg.allow_text_only:
        raise DataError(f"{source_of(cfg)}: none of the {len(train)} train samples has an image, but the model is a "
                        f"vision-language model; fix: {where_images_come_from(cfg)}, or set data.allow_text_only=true "
                        "to train it on text only")
    if without:
        log.warning("%s: %d of %d train samples have NO image: the vision-language model trains on them as text "
                    "only%s", source_of(cfg), without, len(train),
                    "" if cfg.allow_text_only else f" (if they should have one: {where_images_come_from(cfg)})")


def merge_stats(*stats: dict) -> dict:
    """Sum the skipped counts, keep the first MAX_REASONS reasons; other keys of the first stats are kept."""
    out = dict(stats[0])
    out["skipped"] = sum(s.get("skipped", 0) for s in stats)
    out["reasons"] = [r for s in stats for r in s.get("reasons", [])][:MAX_REASONS]
    return out


def check_data(splits: Splits, collator, cfg: DataConfig) -> Splits:
    """The one pass before training: images (for a VLM), then lengths and encodability of train and eval.
    Returns the kept samples with the stats merged (skipped, reasons, too_long, train_with_images,
    train_without_images)."""
    check_images(splits.train, collator, cfg)
    too_long = BadSamples("skip", source_of(cfg))  # on_too_long=error raises in check_lengths instead
    broken = BadSamples(cfg.on_bad_sample, source_of(cfg))
    train = check_lengths(splits.train, collator, cfg, too_long, "train", broken)
    evals = check_lengths(splits.eval, collator, cfg, too_long, "eval", broken)
    if not train:
        first = (too_long.reasons or broken.reasons or ["?"])[0]
        fix = ("raise data.max_length or lower model.max_pixels" if too_long.skipped
               else "make the samples encodable by this model's processor (see the reason)")
        raise DataError(f"{source_of(cfg)}: no train sample is left after the checks before training "
                        f"(first skipped: {first}); fix: {fix}")
    with_images = sum(1 for s in train if s.get("images"))
    stats = merge_stats(splits.stats, broken.stats(), too_long.stats())
    stats.update(too_long=too_long.skipped, train_with_images=with_images,
                 train_without_images=len(train) - with_images)
    return Splits(train, evals, stats)

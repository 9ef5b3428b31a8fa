"""hf: a datasets.Dataset, from a local directory written by save_to_disk (load_from_disk) or through
datasets.load_dataset(data.path, data.subset, split=data.split) (local files / loader scripts, or
the hub when online).

data.columns maps the sample's fields to columns: image (a datasets.Image column, a list of them, a
path relative to a local data.path, or bytes), prompt, answer; or messages (chat format, see
harness.data.common.parse_messages) with the images from the image column. Defaults: image or images
(else the one column whose feature is datasets.Image or a list of them), prompt or question, answer
("auto"); messages is used when set explicitly, or when there is no answer column and a messages column
exists. columns.prompt: null gives every sample data.prompt. A column that does not exist is an error
listing the columns that do. Images are decoded here (not by datasets) so that a corrupt one is a bad
sample (data.on_bad_sample). Eval: data.eval_split when set, else a seeded data.eval_fraction split.
With no image column found, a column of image paths is an error (its images would be silently lost).
Each sample carries "source": "<split>[<row>]".
"""
from __future__ import annotations

import logging
from pathlib import Path

from harness.config import DataConfig
from harness.data import register, source_of
from harness.data.common import (BadSample, BadSamples, as_text, looks_like_image, open_image, parse_messages,
                                 resolve_inside, seeded_split)
from harness.errors import DataError

DEFAULTS = {"image": ("image", "images"), "prompt": ("prompt", "question"), "answer": ("answer",),
            "messages": ("messages",)}
log = logging.getLogger(__name__)


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json",
                                                                "dataset_dict.json"))


def load_split(cfg: DataConfig, split: str):
    import datasets

    path = Path(cfg.path).expanduser()
    if is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{source_of(cfg)}: no split {split!r} in the saved dataset "
                                 f"(splits: {', '.join(ds)})")
            ds = ds[split]
        elif split != cfg.split:  # a single saved Dataset has one split: the eval split cannot come from it
            raise DataError(f"{source_of(cfg)}: a single saved Dataset has no split {split!r}; "
                             "leave data.eval_split null (seeded split) or save a DatasetDict")
        return ds
    try:
        return datasets.load_dataset(cfg.path, cfg.subset, split=split)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(f"{source_of(cfg)}: {str(e).splitlines()[0]} (allowed: a folder written by save_to_disk, "
                        "local data files / a loader name, or a hub dataset id reachable now or in the HF cache)"
                        ) from e


def is_image_feature(feat) -> bool:
    """datasets.Image, or a list / Sequence of them."""
    import datasets

    return isinstance(feat, datasets.Image) or isinstance(getattr(feat, "feature", None), datasets.Image)


def image_column(cfg: DataConfig, names: list[str], features) -> str | None:
    """columns.image=auto: image / images, else the one column whose feature is an Image (several: name one)."""
    named = next((c for c in DEFAULTS["image"] if c in names), None)
    if named is not None or features is None:
        return named
    found = [c for c in names if c in features and is_image_feature(features[c])]
    if len(found) > 1:
        raise DataError(f"{source_of(cfg)}: several image columns ({', '.join(found)}) and none named image / images; "
                        f"fix: data.columns.image=<one of them>")
    return found[0] if found else None


def resolve_columns(cfg: DataConfig, names: list[str], features=None) -> dict:
    """{"image": col | None, "prompt": col | None, "answer": col | None, "messages": col | None}."""
    given = {k: getattr(cfg.columns, k) for k in DEFAULTS}

    def missing(key, col):
        return DataError(f"{source_of(cfg)}: column {col!r} (data.columns.{key}) not found; "
                          f"the dataset has columns: {', '.join(names)}")

    cols = {}
    for key, defaults in DEFAULTS.items():
        col = given[key]
        if col == "auto":
            col = image_column(cfg, names, features) if key == "image" else next((c for c in defaults if c in names),
                                                                                  None)
        elif col is not None and col not in names:
            raise missing(key, col)
        cols[key] = col
    # chat mode: columns.messages named explicitly, or no answer column at all and a messages column exists
    use_messages = given["messages"] not in (None, "auto") or (cols["answer"] is None and cols["messages"] is not None)
    if use_messages:
        cols["answer"] = cols["prompt"] = None
    else:
        cols["messages"] = None
        if cols["answer"] is None:
            raise missing("answer", "answer")
        if cols["prompt"] is None and given["prompt"] is not None:
            raise missing("prompt", "prompt' or 'question")
    return cols


def as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def undecoded(ds, col):
    """Cast Image columns (and lists of them) to decode=False: we decode, so corrupt images can be skipped."""
    import datasets

    if col is None:
        return ds
    feat = ds.features[col]
    if isinstance(feat, datasets.Image):
        return ds.cast_column(col, datasets.Image(decode=False))
    inner = getattr(feat, "feature", None)
    if isinstance(inner, datasets.Image):
        seq = datasets.List(datasets.Image(decode=False)) if isinstance(feat, getattr(datasets, "List", ())) \
            else datasets.Sequence(datasets.Image(decode=False))
        return ds.cast_column(col, seq)
    return ds


def check_no_path_column(ds, cfg: DataConfig, cols: dict) -> None:
    """No image column found: a column of image paths (first row) means images would be silently lost."""
    if cols["image"] is not None or cfg.columns.image is None or len(ds) == 0:
        return
    first = ds[0]
    used = {c for c in cols.values() if c}
    for name in ds.column_names:
        if name not in used and looks_like_image(first[name]):
            raise DataError(f"{source_of(cfg)}: column {name!r} holds image paths ({first[name]!r}) but no image "
                            f"column is set; fix: data.columns.image={name}")


def row_images(sources: list, base: Path | None, where: str) -> list:
    images = []
    for s in sources:
        if isinstance(s, str):  # a path: relative to a local dataset directory only
            if base is None:
                raise BadSample(f"image path {s!r} needs a local data.path directory")
            s = resolve_inside(base, s, f"{where} image")
        elif isinstance(s, dict) and s.get("bytes") is None and s.get("path"):
            s = resolve_inside(base, s["path"], f"{where} image") if base is not None else s["path"]
        images.append(open_image(s, f"{where} image"))
    return images


def row_sample(row: dict, cols: dict, cfg: DataConfig, base: Path | None, where: str) -> dict:
    sources = as_list(row[cols["image"]]) if cols["image"] else []
    if cols["messages"]:
        prompt, answer, inline = parse_messages(row[cols["messages"]])
        sources += inline
    else:
        prompt = cfg.prompt if cols["prompt"] is None else row[cols["prompt"]]
        answer = row[cols["answer"]]
        if answer is None or prompt is None:
            raise BadSample(f"empty {'answer' if answer is None else 'prompt'}")
        prompt, answer = as_text(prompt, cols["prompt"] or "data.prompt"), as_text(answer, cols["answer"])
    return {"images": row_images(sources, base, where), "prompt": prompt, "answer": answer, "source": where}


def to_samples(ds, cfg: DataConfig, bad: BadSamples, split: str) -> list[dict]:
    cols = resolve_columns(cfg, list(ds.column_names), ds.features)
    check_no_path_column(ds, cfg, cols)
    if cols["image"] is not None:
        log.info("%s: images from column %r", source_of(cfg), cols["image"])
    ds = undecoded(ds, cols["image"])
    base = Path(cfg.path).expanduser() if Path(cfg.path).expanduser().is_dir() else None
    samples = []
    for i, row in enumerate(ds):
        where = f"{split}[{i}]"
        try:
            samples.append(row_sample(row, cols, cfg, base, where))
        except BadSample as e:
            bad.handle(where, e)
    return samples


@register("hf")
def hf(cfg: DataConfig, seed: int):
    bad = BadSamples(cfg.on_bad_sample, source_of(cfg))
    train = to_samples(load_split(cfg, cfg.split), cfg, bad, cfg.split)
    if cfg.eval_split:
        evals = to_samples(load_split(cfg, cfg.eval_split), cfg, bad, cfg.eval_split)
    else:
        train, evals = seeded_split(train, cfg.eval_fraction, seed)
    if not train:
        raise DataError(f"{source_of(cfg)}: no usable samples in split {cfg.split!r}"
                         + (f" ({bad.skipped} skipped; first: {bad.reasons[0]})" if bad.skipped else ""))
    return train, evals, bad.stats()

"""jsonl: a local file, one sample per line.

A line is either
  {"image": "rel/path.png" | "images": ["a.png", "b.png"] (or none: text-only),
   "prompt" | "question": "...", "answer": "..."}
or a chat sample {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
   {"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}]}
(images may also come from an "image"/"images" key beside "messages"). Image paths are relative to
the file's directory; an absolute path or one that leaves that directory ("../x.png") is refused
(PermissionError). A missing / unreadable image or a malformed line is a bad sample: skipped and
counted (data.on_bad_sample=skip) or raised with the line number and file (=error); so is a line that
is not valid UTF-8. Keys the reader does not know are listed in one warning; one whose value looks like
an image path ("img": "a.png") is an error before training, since its images would be silently lost.
Each sample carries "source": "<file>:<line>". The train/eval split is seeded (data.eval_fraction, seed).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from harness.config import DataConfig
from harness.data import register, source_of
from harness.data.common import (BadSample, BadSamples, as_text, looks_like_image, open_image, parse_messages,
                                 resolve_inside, seeded_split)
from harness.errors import DataError

log = logging.getLogger(__name__)

KNOWN_KEYS = ("image", "images", "prompt", "question", "answer", "messages")


def image_sources(row: dict) -> list:
    if row.get("images") is not None:
        imgs = row["images"]
        return list(imgs) if isinstance(imgs, (list, tuple)) else [imgs]
    if row.get("image") is not None:
        return [row["image"]]
    return []


def sample_from_row(row: dict, base: Path, where: str, default_prompt: str | None = None) -> dict:
    if not isinstance(row, dict):
        raise BadSample(f"expected a JSON object, got {type(row).__name__}")
    sources = image_sources(row)
    if row.get("messages") is not None:
        prompt, answer, inline = parse_messages(row["messages"])
        sources = sources + inline
    else:
        prompt = row.get("prompt", row.get("question", default_prompt))
        answer = row.get("answer")
        if answer is None:
            raise BadSample("no 'answer' (or 'messages') key")
        if prompt is None:
            raise BadSample("no 'prompt' or 'question' key")
        prompt, answer = as_text(prompt, "prompt"), as_text(answer, "answer")
    # the path check raises PermissionError (never skipped): a data file must not read outside its dir
    paths = [resolve_inside(base, s, f"{where} image") for s in sources]
    images = [open_image(p, str(p)) for p in paths]
    return {"images": images, "prompt": prompt, "answer": answer, "source": where}


def check_keys(row, where: str, unknown: set) -> None:
    """Collect keys the reader ignores; one holding an image path means images would be lost: DataError."""
    if not isinstance(row, dict):
        return
    for key, value in row.items():
        if key in KNOWN_KEYS:
            continue
        if looks_like_image(value):
            raise DataError(f"{where}: key {key!r} holds an image path ({value!r}) but the jsonl reader only reads "
                            f"images from 'image' / 'images' (and chat content); fix: rename {key!r} to 'image' "
                            "(one path) or 'images' (a list)")
        unknown.add(key)


def decode_line(raw: bytes, lineno: int) -> str:
    """One line's bytes as text; not UTF-8 is a bad sample naming the byte offset (a BOM on line 1 is dropped)."""
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise BadSample(f"not valid UTF-8 at byte {e.start} of the line ({raw[e.start:e.start + 4]!r})") from None


def read_jsonl(path: str | Path, on_bad_sample: str = "skip", source: str | None = None) -> tuple[list, dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{source or 'data=jsonl'}: data.path={str(path)!r} is not a file (allowed: a .jsonl file, "
                        "one sample per line)")
    base = path.resolve().parent
    bad = BadSamples(on_bad_sample, source or f"data=jsonl ({path})")
    samples, unknown = [], set()
    with path.open("rb") as f:  # bytes: a non-UTF-8 line is one bad sample with its line number
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = decode_line(raw, lineno)
                if not line.strip():
                    continue
                row = json.loads(line)
                check_keys(row, where, unknown)
                samples.append(sample_from_row(row, base, where))
            except (BadSample, json.JSONDecodeError, RecursionError) as e:
                bad.handle(where, e)
    if unknown:
        log.warning("%s: ignoring keys %s (the jsonl reader reads %s)", source or path,
                    ", ".join(sorted(unknown)), ", ".join(KNOWN_KEYS))
    return samples, bad.stats()


@register("jsonl")
def jsonl(cfg: DataConfig, seed: int):
    samples, stats = read_jsonl(cfg.path, cfg.on_bad_sample, source_of(cfg))
    if not samples:
        raise DataError(f"{source_of(cfg)}: no usable samples"
                         + (f" ({stats['skipped']} skipped; first: {stats['reasons'][0]})" if stats["skipped"] else
                            " (the file is empty)"))
    train, evals = seeded_split(samples, cfg.eval_fraction, seed)
    return train, evals, stats

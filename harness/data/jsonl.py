"""jsonl: a local file, one sample per line.

A line is either
  {"image": "rel/path.png" | "images": ["a.png", "b.png"] (or none: text-only),
   "prompt" | "question": "...", "answer": "..."}
or a chat sample {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
   {"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}]}
(images may also come from an "image"/"images" key beside "messages"). Image paths are relative to
the file's directory; an absolute path or one that leaves that directory ("../x.png") is refused
(PermissionError). A missing / unreadable image or a malformed line is a bad sample: skipped and
counted (data.on_bad_sample=skip) or raised with the line number and file (=error). The train/eval
split is seeded (data.eval_fraction, seed).
"""
from __future__ import annotations

import json
from pathlib import Path

from harness.config import DataConfig
from harness.data import register, source_of
from harness.data.common import BadSample, BadSamples, open_image, parse_messages, resolve_inside, seeded_split


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
        prompt, answer = str(prompt), str(answer)
    # the path check raises PermissionError (never skipped): a data file must not read outside its dir
    paths = [resolve_inside(base, s, f"{where} image") for s in sources]
    images = [open_image(p, str(p)) for p in paths]
    return {"images": images, "prompt": prompt, "answer": answer}


def read_jsonl(path: str | Path, on_bad_sample: str = "skip", source: str | None = None) -> tuple[list, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{source or 'data=jsonl'}: data.path={str(path)!r} is not a file")
    base = path.resolve().parent
    bad = BadSamples(on_bad_sample, source or f"data=jsonl ({path})")
    samples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
                samples.append(sample_from_row(row, base, where))
            except (BadSample, json.JSONDecodeError) as e:
                bad.handle(where, e)
    return samples, bad.stats()


@register("jsonl")
def jsonl(cfg: DataConfig, seed: int):
    samples, stats = read_jsonl(cfg.path, cfg.on_bad_sample, source_of(cfg))
    if not samples:
        raise ValueError(f"{source_of(cfg)}: no usable samples"
                         + (f" ({stats['skipped']} skipped; first: {stats['reasons'][0]})" if stats["skipped"] else
                            " (the file is empty)"))
    train, evals = seeded_split(samples, cfg.eval_fraction, seed)
    return train, evals, stats

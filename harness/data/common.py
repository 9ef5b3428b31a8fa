"""Shared pieces of the data builders: image decoding with RGB conversion, bad-sample accounting,
chat-format ("messages") parsing, seeded splits, and the rule that image paths stay inside a base dir."""
from __future__ import annotations

import io
import logging
import os
import random
from pathlib import Path

from PIL import Image

from harness.errors import DataError, OutsideDataDir

log = logging.getLogger(__name__)

MAX_REASONS = 20  # skip reasons kept per run: metrics.json stays small


class BadSample(Exception):
    """One sample cannot be used (missing or corrupt image, malformed row); skipped or raised per data.on_bad_sample."""


class BadSamples:
    """Counts skipped samples (data.on_bad_sample=skip) or re-raises (=error) with the source named."""

    def __init__(self, mode: str, source: str):
        self.mode, self.source = mode, source
        self.skipped = 0
        self.reasons: list[str] = []

    def handle(self, where: str, err: Exception) -> None:
        reason = f"{where}: {err}"
        if self.mode == "error":
            raise DataError(f"{self.source}: bad sample at {reason} "
                            "(set data.on_bad_sample=skip to skip such samples)") from err
        self.skipped += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)
        log.warning("%s: skipping bad sample at %s", self.source, reason)

    def stats(self) -> dict:
        return {"skipped": self.skipped, "reasons": list(self.reasons)}


def to_rgb(img: Image.Image) -> Image.Image:
    """L / P / RGBA / CMYK / I;16 ... -> RGB (transparency composited on white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = img.point(lambda v: v / 256) if img.mode.startswith("I") else img
        img = img.convert("L")
    return img.convert("RGB")


def open_image(src, name: str = "") -> Image.Image:
    """A path, bytes, {"bytes", "path"} dict or PIL image -> a fully decoded RGB image; BadSample otherwise."""
    try:
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, dict):
            if src.get("bytes") is not None:
                return open_image(src["bytes"], name or str(src.get("path") or "<bytes>"))
            if src.get("path"):
                return open_image(src["path"], name)
            raise BadSample(f"image {name or src!r} has neither bytes nor path")
        elif isinstance(src, (bytes, bytearray)):
            img = Image.open(io.BytesIO(src))
        elif isinstance(src, (str, os.PathLike)):
            if not Path(src).is_file():
                raise BadSample(f"image file not found: {src}")
            img = Image.open(src)
        else:
            raise BadSample(f"image {name!r}: unsupported value of type {type(src).__name__}")
        img.load()  # decode now: truncated / corrupt files fail here, not in the middle of training
        return to_rgb(img)
    except BadSample:
        raise
    except Exception as e:  # PIL.UnidentifiedImageError, OSError (truncated), ValueError ...
        raise BadSample(f"unreadable image {name or src!r}: {type(e).__name__}: {e}") from e


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def looks_like_image(value) -> bool:
    """A string (or a non-empty list of strings) ending in an image file suffix: an image path."""
    if isinstance(value, (list, tuple)) and value:
        return all(looks_like_image(v) for v in value)
    return isinstance(value, str) and value.strip().lower().endswith(IMAGE_SUFFIXES)


def resolve_inside(base: Path, rel: str, key: str) -> Path:
    """base / rel, refusing absolute paths and paths that leave base (../, symlinks)."""
    if not isinstance(rel, str) or not rel:
        raise BadSample(f"{key}: expected a relative image path, got {rel!r}")
    base = base.resolve()
    p = Path(rel)
    target = (base / p).resolve()
    if p.is_absolute() or (target != base and base not in target.parents):
        raise OutsideDataDir(f"{key}: image path {rel!r} is outside the data file's directory {base} "
                              "(only paths relative to it, without '..', are allowed)")
    return target


def seeded_split(samples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle with `seed`, then put round(eval_fraction * n) samples (at least 1 when n >= 2) in eval."""
    idx = list(range(len(samples)))
    random.Random(seed).shuffle(idx)
    n = len(idx)
    n_eval = min(max(int(round(eval_fraction * n)), 1 if n >= 2 else 0), max(n - 1, 0))
    return [samples[i] for i in idx[n_eval:]], [samples[i] for i in idx[:n_eval]]


def as_text(value, key: str) -> str:
    """A prompt / answer value as text: strings as they are, numbers and booleans via str(); a dict, list or
    None is a malformed row (BadSample), never its Python repr."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    raise BadSample(f"{key}: expected a string, got {type(value).__name__} {_short(value)}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text_of(content, key: str) -> str:
    """A turn's content as text: a string, or the text items of a list of {"type": ..., "text": ...} dicts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise BadSample(f"{key}: content must be a string or a list of items, got {type(content).__name__} "
                        f"{_short(content)}")
    parts = []
    for j, c in enumerate(content):
        if not isinstance(c, dict):
            raise BadSample(f"{key}[{j}]: a content item must be an object like {{\"type\": \"text\", \"text\": ...}}, "
                            f"got {type(c).__name__} {_short(c)}")
        if c.get("type", "text") != "text":
            continue
        text = c.get("text")
        if text is not None and not isinstance(text, str):  # None: an absent text (datasets fills struct keys)
            raise BadSample(f"{key}[{j}].text: expected a string, got {type(text).__name__} {_short(text)}")
        parts.append(text or "")
    return "".join(parts)


def _check_turn(m, i: int) -> None:
    if not isinstance(m, dict):
        raise BadSample(f"messages[{i}]: a turn must be an object with role and content, got {type(m).__name__} "
                        f"{_short(m)}")
    if not isinstance(m.get("role"), str):
        raise BadSample(f"messages[{i}].role: expected a string (user / assistant / system), "
                        f"got {_short(m.get('role'))}")


def _inline_images(content) -> list:
    """The image sources given inline in a user turn's content (items of type image: image / path / url)."""
    if not isinstance(content, (list, tuple)):
        return []
    images = []
    for c in content:
        if isinstance(c, dict) and c.get("type") == "image":
            src = next((c[k] for k in ("image", "path", "url") if c.get(k) is not None), None)
            if src is not None:
                images.append(src)
    return images


def parse_messages(messages) -> tuple[str, str, list]:
    """Chat format -> (prompt, answer, images referenced inside the content).

    messages: [{"role": "user", "content": str | [{"type": "image", "image"/"path": ...}, {"type": "text",
    "text": ...}]}, {"role": "assistant", "content": ...}, ...]. The last assistant turn is the answer;
    the text of the user turns before it (joined by newlines) is the prompt; system turns and earlier
    assistant turns are dropped (single-turn samples only). `images` lists the sources given inline
    (content items of type image with an "image", "path" or "url" value), in order. A malformed turn
    (not an object, a non-string role, content neither a string nor a list of items) is a BadSample
    naming the turn index.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadSample(f"messages: expected a non-empty list of turns, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        _check_turn(m, i)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise BadSample("messages: no assistant turn (the answer)")
    prompts, images = [], []
    for i, m in enumerate(messages[:last]):
        if m["role"] != "user":
            continue
        prompts.append(_text_of(m.get("content"), f"messages[{i}].content"))
        images += _inline_images(m.get("content"))
    answer = _text_of(messages[last].get("content"), f"messages[{last}].content").strip()
    prompt = "\n".join(p for p in prompts if p).strip()
    if not answer:
        raise BadSample("messages: the assistant turn is empty")
    return prompt, answer, images

"""synthetic_ocr: seeded images of short text drawn with PIL's default font (offline, Pillow >= 10.1).

Each sample is a rendered string (a word, a number or a LaTeX-like formula such as "x^2+3=7" or
"\\frac{a}{b}", shown as its literal source) on a random light background, at a random image size,
font size and position, with pixel noise; prompt "What text is in the image?" (data.prompt when the
config says so), answer = the exact string. data.min_chars / data.max_chars bound the string length
(default 1-4 so that the tiny 56x56 model can read it), data.text_kinds picks the kinds, data.noise
the noise level, data.n_train / data.n_eval the sizes. Train and eval use disjoint seeds.
"""
from __future__ import annotations

import random
import string
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from harness.config import DataConfig
from harness.data import register

WORDS = ("a an at be by do go he if in is it me my no of on or so to up us we ox "
         "art bag bed big box bus cat cow cup day dog ear egg eye fan fox gap hat ink jam key leg "
         "map mix net owl pen pig red run sea sky sun tea top van web yes zip "
         "able band bird blue cake code data disk door fish gold home jazz kite lamp leaf milk moon "
         "nest note open park quiz rain road rock salt ship snow star tree wave wind wolf yarn zero "
         "apple bread chair cloud dance earth flame grape house juice lemon music night ocean paper "
         "piano queen river stone table tiger water zebra "
         "action bridge camera dragon engine forest garden hammer island jungle kernel laptop "
         "market number orange pencil rocket silver summer tensor window yellow").split()

VARS = "abcnxyz"


def _formula(rng: random.Random) -> str:
    v, w = rng.sample(VARS, 2)
    d = lambda: str(rng.randint(1, 9))
    templates = [
        lambda: f"{v}^{d()}", lambda: f"{v}+{w}", lambda: f"{v}-{d()}", lambda: f"{d()}{v}",
        lambda: f"{v}={d()}", lambda: f"{v}_{d()}", lambda: f"{d()}+{d()}", lambda: f"{v}/{w}",
        lambda: f"{d()}{v}={d()}", lambda: f"{v}^{d()}+{d()}", lambda: f"{v}^{d()}+{d()}={d()}",
        lambda: f"{v}_{d()}+{w}_{d()}", lambda: f"({v}+{w})^{d()}", lambda: f"\\frac{{{v}}}{{{w}}}",
        lambda: f"\\sqrt{{{v}}}", lambda: f"\\sqrt{{{d()}{v}}}", lambda: f"\\frac{{{d()}}}{{{v}+{d()}}}",
        lambda: "\\pi r^2", lambda: "e^{i\\pi}+1=0", lambda: f"\\sum_{{i=1}}^{{{v}}} i",
        lambda: f"\\int_0^{d()} {v} d{v}", lambda: f"{v}^2+{d()}={d()}{d()}",
    ]
    return rng.choice(templates)()


def random_text(rng: random.Random, kinds: list[str], min_chars: int, max_chars: int) -> str:
    """A word, number or formula of min_chars..max_chars characters (random letters when no word fits)."""
    for _ in range(100):
        kind = rng.choice(kinds)
        if kind == "word":
            fits = [w for w in WORDS if min_chars <= len(w) <= max_chars]
            text = rng.choice(fits) if fits else "".join(
                rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_chars, max_chars)))
        elif kind == "number":
            n = rng.randint(min_chars, max_chars)
            text = str(rng.randint(0, 9)) if n == 1 else str(rng.randint(1, 9)) + "".join(
                str(rng.randint(0, 9)) for _ in range(n - 1))
        else:
            text = _formula(rng)
        if min_chars <= len(text) <= max_chars:
            return text
    # no formula of that length: digits and operators of the right length
    n = rng.randint(min_chars, max_chars)
    return "".join(rng.choice("0123456789+-=x") for _ in range(n))


@lru_cache(maxsize=64)
def _font(size: int):
    return ImageFont.load_default(size=size)


def render(text: str, rng: random.Random, base: int, noise: float) -> Image.Image:
    """The text on a w x h canvas (w in [base, 1.5 base], h in [0.75 base, base], scaled up for long text),
    font size as large as fits (random below that), random position, colours and Gaussian noise."""
    w = rng.randint(base, int(base * 1.5))
    h = rng.randint(int(base * 0.75), base)
    img = Image.new("L", (1, 1))
    draw = ImageDraw.Draw(img)

    def box(size):
        l, t, r, b = draw.textbbox((0, 0), text, font=_font(size))
        return l, t, r - l, b - t

    top = max(8, int(h * 0.6))
    size = top
    while size > 8 and box(size)[2] > w - 4:
        size -= 1
    if box(size)[2] > w - 4:  # long text: widen the canvas instead of shrinking below 8 px
        w = box(size)[2] + 6
    size = rng.randint(max(8, int(size * 0.75)), size)
    l, t, tw, th = box(size)
    bg = rng.randint(190, 255)
    fg = rng.randint(0, 70)
    img = Image.new("L", (w, h), color=bg)
    x = rng.randint(0, max(0, w - tw - 1)) - l
    y = rng.randint(0, max(0, h - th - 1)) - t
    ImageDraw.Draw(img).text((x, y), text, fill=fg, font=_font(size))
    if noise > 0:
        arr = np.asarray(img, dtype=np.float32)
        nrng = np.random.default_rng(rng.getrandbits(32))
        arr = arr + nrng.normal(0.0, 255.0 * noise * 0.5, arr.shape)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def make_samples(cfg: DataConfig, n: int, seed: int, split: str = "train") -> list[dict]:
    rng = random.Random(seed)
    prompt = cfg.prompt if cfg.prompt and cfg.prompt != "What digit is this?" else "What text is in the image?"
    out = []
    for i in range(n):
        text = random_text(rng, list(cfg.text_kinds), cfg.min_chars, cfg.max_chars)
        out.append({"images": [render(text, rng, cfg.image_size, cfg.noise)], "prompt": prompt, "answer": text,
                    "source": f"synthetic_ocr {split}[{i}] (seed {seed})"})
    return out


@register("synthetic_ocr")
def synthetic_ocr(cfg: DataConfig, seed: int):
    # distinct streams for train and eval; the same string may appear in both (short strings repeat)
    return make_samples(cfg, cfg.n_train, seed * 2 + 1), make_samples(cfg, cfg.n_eval, seed * 2 + 2, "eval")

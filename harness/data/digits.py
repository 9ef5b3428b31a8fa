"""digits_vqa: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, no download).

Each image is upscaled to data.image_size and asked "What digit is this?" -> "7". Samples also carry
`image_text`, the 8x8 scan drawn in characters, which text-only models read instead of the image.
The train/eval split is stratified and seeded, data.n_train / data.n_eval scans (default 1617 / 180).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from harness.config import DataConfig
from harness.data import register


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """8x8 grey levels 0..16 -> an RGB image of size x size (white digit on black)."""
    arr = (np.asarray(pixels, dtype=np.float32).reshape(8, 8) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L").resize((size, size), Image.Resampling.BILINEAR).convert("RGB")


SHADES = " .:-=+*#%@"  # grey level 0..16 -> a character, dark to bright


def digit_text(pixels: np.ndarray) -> str:
    """8x8 grey levels 0..16 -> 8 lines of 8 characters: the digit for text-only models."""
    levels = np.rint(np.asarray(pixels, dtype=np.float32).reshape(8, 8) * ((len(SHADES) - 1) / 16.0)).astype(int)
    return "\n".join("".join(SHADES[v] for v in row) for row in levels.clip(0, len(SHADES) - 1))


def split_sizes(cfg: DataConfig, total: int) -> tuple[int, int]:
    """(data.n_train, data.n_eval), checked against the `total` scans; data.eval_fraction does not apply here."""
    from harness.errors import DataError

    if cfg.eval_fraction != DataConfig.eval_fraction:
        raise DataError(f"data.eval_fraction={cfg.eval_fraction} does not apply to data=digits_vqa, which is split "
                        f"by size: set data.n_eval (and data.n_train) instead")
    if cfg.n_train + cfg.n_eval > total:
        raise DataError(f"data.n_train={cfg.n_train} + data.n_eval={cfg.n_eval} exceed the {total} digits of "
                        f"data=digits_vqa; lower data.n_train to at most {max(total - cfg.n_eval, 1)}")
    return cfg.n_train, cfg.n_eval


@register("digits_vqa")
def digits_vqa(cfg: DataConfig, seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx = np.arange(len(digits.target))
    n_train, n_eval = split_sizes(cfg, len(idx))
    stratify = digits.target if min(n_train, n_eval) >= 10 else None  # stratifying needs each digit on both sides
    train_idx, eval_idx = train_test_split(idx, test_size=n_eval, train_size=n_train, random_state=seed,
                                           stratify=stratify)
    make = lambda i: {"images": [digit_image(digits.images[i], cfg.image_size)], "prompt": cfg.prompt,
                      "answer": str(int(digits.target[i])), "image_text": digit_text(digits.images[i]),
                      "source": f"digits[{i}]"}  # the scan's index in sklearn's load_digits()
    return [make(i) for i in train_idx], [make(i) for i in eval_idx]

"""Offline processor for Llama 3.2 Vision (Mllama): byte-level tokenizer + MllamaImageProcessorPil.

Mllama reads images through cross-attention, so the text holds one `<|image|>` per image (no expansion);
the processor adds `cross_attention_mask`, `aspect_ratio_ids` and `aspect_ratio_mask`.

Image size: tiles are sqrt(min_pixels) square and an image uses at most max_pixels // min_pixels tiles
(Llama 3.2 Vision: 560 px tiles, 4 tiles -> min_pixels 313600, max_pixels 1254400). The tile size must
equal the vision config's image_size and the tile count its max_num_tiles.
"""
from __future__ import annotations

import math

from harness.processors import LLAMA3_CHAT_TEMPLATE, build_byte_tokenizer, register_processor
from harness.registry import Architecture


@register_processor("mllama")
def mllama_processor(arch: Architecture, min_pixels: int, max_pixels: int):
    from transformers import MllamaImageProcessorPil, MllamaProcessor

    tile = math.isqrt(min_pixels)
    tiles = max(1, max_pixels // min_pixels)
    tokenizer = build_byte_tokenizer(arch.special_tokens, LLAMA3_CHAT_TEMPLATE)
    image_processor = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=tiles)
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=LLAMA3_CHAT_TEMPLATE)

"""Offline processor for Gemma 3: byte-level tokenizer + Gemma3ImageProcessorPil + Gemma3Processor.

The chat template writes `<start_of_image>` per image; Gemma3Processor expands it to
"\\n\\n<start_of_image>" + N x "<image_soft_token>" + "<end_of_image>\\n\\n" and returns
`token_type_ids` (1 at image tokens), which the model uses for bidirectional attention over the image
during training.

Image size: images are resized to sqrt(max_pixels) square, which must equal the vision config's
image_size (Gemma 3: 896 -> max_pixels 802816). N = min(256, patches per image) with SigLIP's 14 px
patches: 256 for every released Gemma 3 (896 px = 64x64 patches pooled 4x4), 16 for a 56 px tiny model
(4x4 patches, no pooling). The config's mm_tokens_per_image must equal N.
"""
from __future__ import annotations

import math

from harness.processors import build_byte_tokenizer, register_processor
from harness.registry import Architecture

MM_TOKENS_PER_IMAGE = 256  # every released Gemma 3 checkpoint
PATCH_SIZE = 14  # SigLIP's


def image_seq_length(side: int) -> int:
    """Soft tokens per image of side x side px: the patch grid, average-pooled down to at most 16x16."""
    return min(MM_TOKENS_PER_IMAGE, (side // PATCH_SIZE) ** 2)

GEMMA3_CHAT_TEMPLATE = (
    "<bos>{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@register_processor("gemma3")
def gemma3_processor(arch: Architecture, min_pixels: int, max_pixels: int):
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    st = arch.special_tokens
    tokenizer = build_byte_tokenizer(st, GEMMA3_CHAT_TEMPLATE)
    # Gemma3Processor reads tokenizer.image_token / boi_token / eoi_token (and their ids)
    tokenizer._set_model_specific_special_tokens({"image_token": st["image"], "boi_token": st["boi"],
                                                  "eoi_token": st["eoi"]})
    side = math.isqrt(max_pixels)
    image_processor = Gemma3ImageProcessorPil(size={"height": side, "width": side})
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE,
                           image_seq_length=image_seq_length(side))

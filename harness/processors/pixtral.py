"""Offline processor for Pixtral (Llava with a Pixtral vision tower): byte-level tokenizer with the
Mistral instruct tokens + PixtralImageProcessorPil + PixtralProcessor.

An image becomes rows of `[IMG]` (one per 16 px patch) each ended by `[IMG_BREAK]`, the last by
`[IMG_END]`. Images keep their aspect ratio, the longest edge is capped at sqrt(max_pixels)
(pixtral-12b: 1024 -> max_pixels 1048576) and rounded up to whole patches.

Without torchvision: transformers' `processing_pixtral` imports one helper
(`get_resize_output_image_size`, used only to count tokens ahead of time) from the torchvision-backed
image processor module, so it fails to import. Where torchvision is missing, that module is stood in
for by the PIL module's identical helper before PixtralProcessor is imported; nothing else changes.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

from harness.processors import build_byte_tokenizer, register_processor
from harness.registry import Architecture

PATCH_SIZE = 16  # pixtral-12b's vision patch size; the vision config's patch_size must match

MISTRAL_CHAT_TEMPLATE = (
    "<s>{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST]{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}[IMG]"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}[/INST]{% else %}</s>{% endif %}{% endfor %}"
)


def pixtral_processor_class():
    """transformers' PixtralProcessor, importable with or without torchvision."""
    name = "transformers.models.pixtral.image_processing_pixtral"
    if importlib.util.find_spec("torchvision") is None and name not in sys.modules:
        from transformers.models.pixtral import image_processing_pil_pixtral as pil

        shim = types.ModuleType(name, "stand-in for the torchvision-backed Pixtral image processor module "
                                      "(installed by harness.processors.pixtral: torchvision is missing)")
        shim.get_resize_output_image_size = pil.get_resize_output_image_size
        sys.modules[name] = shim
    return importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor


@register_processor("pixtral")
def pixtral_processor(arch: Architecture, min_pixels: int, max_pixels: int):
    from transformers import PixtralImageProcessorPil

    st = arch.special_tokens
    tokenizer = build_byte_tokenizer(st, MISTRAL_CHAT_TEMPLATE)
    side = math.isqrt(max_pixels)
    image_processor = PixtralImageProcessorPil(size={"longest_edge": side},
                                               patch_size={"height": PATCH_SIZE, "width": PATCH_SIZE})
    return pixtral_processor_class()(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                                     chat_template=MISTRAL_CHAT_TEMPLATE, image_token=st["image"],
                                     image_break_token=st["image_break"], image_end_token=st["image_end"])


def from_pretrained(path: str, trust_remote_code: bool = False):
    """A saved Pixtral processor (e.g. a run's adapter dir) without torchvision: AutoProcessor only finds
    transformers' torchvision placeholder; the real class loads the saved parts (the PIL image processor)."""
    return pixtral_processor_class().from_pretrained(path, trust_remote_code=trust_remote_code)

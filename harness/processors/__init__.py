"""Processors (tokenizer + image processor) built locally, offline, for random-init models.

A hub id or local checkpoint gets its own processor through `AutoProcessor`; random-init models
get one built here: a byte-level BPE tokenizer (256 byte tokens + the architecture's chat special
tokens, no merges) with a chat template, plus the architecture's image processor.

Qwen2-VL's processor wants a video processor, which needs torchvision; PyPI's torchvision does not
import beside the CPU torch build. `ImageOnlyQwen2VLProcessor` is the same processor without the
video half, so image fine-tuning works with or without torchvision.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable

from harness.registry import Architecture

log = logging.getLogger(__name__)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|image|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_byte_tokenizer(special: dict, chat_template: str):
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is a token, plus special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    kwargs = dict(eos_token=special["eos"], pad_token=special["pad"])
    if special.get("bos"):
        kwargs["bos_token"] = special["bos"]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=list(special["extra"]), **kwargs)
    fast.chat_template = chat_template
    return fast


def _qwen2_vl_processor(arch: Architecture, min_pixels: int, max_pixels: int):
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = build_byte_tokenizer(arch.special_tokens, QWEN_CHAT_TEMPLATE)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return _image_only_qwen2_vl()(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=QWEN_CHAT_TEMPLATE)


def _text_processor(arch: Architecture, min_pixels: int, max_pixels: int):
    template = QWEN_CHAT_TEMPLATE if arch.special_tokens.get("eos") == "<|im_end|>" else LLAMA3_CHAT_TEMPLATE
    return build_byte_tokenizer(arch.special_tokens, template)


# arch.processor -> builder(arch, min_pixels, max_pixels). Other families register here.
LOCAL_PROCESSORS: dict[str, Callable] = {
    "qwen2_vl": _qwen2_vl_processor,
    "text": _text_processor,
}


@functools.cache
def _image_only_qwen2_vl():
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor for images and text only (no video processor, hence no torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor


def __getattr__(name):  # lazy: importing transformers' processors is slow
    if name == "ImageOnlyQwen2VLProcessor":
        return _image_only_qwen2_vl()
    raise AttributeError(name)


def register_processor(family: str):
    """Decorator for a family module harness/processors/<family>.py: builder(arch, min_pixels, max_pixels)."""

    def deco(fn):
        LOCAL_PROCESSORS[family] = fn
        return fn

    return deco


def build_local_processor(arch: Architecture, min_pixels: int, max_pixels: int):
    if arch.processor not in LOCAL_PROCESSORS:
        import importlib

        try:  # families live in their own module, which registers its builder on import
            importlib.import_module(f"harness.processors.{arch.processor}")
        except ModuleNotFoundError:
            pass
    try:
        builder = LOCAL_PROCESSORS[arch.processor]
    except KeyError:
        raise NotImplementedError(
            f"no offline processor builder for architecture {arch.name!r} (processor family {arch.processor!r}); "
            f"available: {', '.join(sorted(LOCAL_PROCESSORS))}. Point model.name_or_path at a checkpoint "
            "that ships its processor.") from None
    return builder(arch, min_pixels, max_pixels)


def load_processor(path: str, arch: Architecture, min_pixels: int, max_pixels: int, trust_remote_code: bool):
    """The processor saved beside a checkpoint (hub id or directory)."""
    from transformers import AutoProcessor, AutoTokenizer

    if not arch.is_multimodal:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    try:
        proc = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code,
                                             min_pixels=min_pixels, max_pixels=max_pixels)
        if hasattr(proc, "image_processor"):
            return proc
        reason = f"AutoProcessor returned only a {type(proc).__name__}"
    except (ImportError, AttributeError, ValueError, TypeError) as e:
        reason = f"AutoProcessor failed: {e}"
    if arch.processor != "qwen2_vl":
        import importlib

        try:  # a family module may know how to rebuild its processor without torchvision
            family = importlib.import_module(f"harness.processors.{arch.processor}")
        except ModuleNotFoundError:
            family = None
        if family is not None and hasattr(family, "from_pretrained"):
            log.info("%s; using harness.processors.%s.from_pretrained", reason, arch.processor)
            return family.from_pretrained(path, trust_remote_code=trust_remote_code)
        raise RuntimeError(f"could not load the processor of {path}: {reason}")
    # No torchvision, or a checkpoint saved by this harness: the image-only processor from the saved parts.
    log.info("%s; using the image-only Qwen2-VL processor", reason)
    from transformers import AutoImageProcessor

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    ip = AutoImageProcessor.from_pretrained(path, min_pixels=min_pixels, max_pixels=max_pixels)
    return _image_only_qwen2_vl()(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)

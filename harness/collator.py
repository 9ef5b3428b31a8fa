"""Batches for training and generation: chat template, image token expansion, label masking.

Training batches are right-padded; only the assistant's answer and its end-of-turn token carry
labels (prompt, image and padding tokens get -100) unless data.train_on_responses_only=false.
Generation batches are left-padded prompts. Text-only models (the processor is a tokenizer) get a
sample's `image_text` in place of its images.
"""
from __future__ import annotations

import logging

import torch

from harness.data.common import to_rgb
from harness.processors import tokenizer_of

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def messages_of(sample: dict, multimodal: bool = True) -> list[dict]:
    """The user turn. Text-only models get the images' text rendering (sample["image_text"], where the
    data set has one, e.g. digits_vqa's 8x8 digit drawn in characters) above the prompt instead of images."""
    if multimodal:
        content = [{"type": "image"} for _ in sample.get("images") or []]
    else:
        content = [{"type": "text", "text": sample["image_text"] + "\n"}] if sample.get("image_text") else []
    content.append({"type": "text", "text": sample["prompt"]})
    return [{"role": "user", "content": content}]


class ChatCollator:
    def __init__(self, processor, train_on_responses_only: bool = True, max_length: int = 2048):
        self.processor = processor
        self.tokenizer = tokenizer_of(processor)
        self.multimodal = processor is not self.tokenizer
        self.train_on_responses_only = train_on_responses_only
        self.max_length = max_length
        self.tokens_seen = 0  # non-padding tokens of all training batches built
        self._warned = False
        self.image_token_ids = {
            i for i in (getattr(processor, "image_token_id", None), getattr(processor, "video_token_id", None))
            if i is not None
        }

    def prompt_text(self, sample: dict) -> str:
        if not self.multimodal and sample.get("images") and not sample.get("image_text") and not self._warned:
            self._warned = True
            log.warning("a text-only model got samples with images and no image_text: the images are dropped")
        return self.processor.apply_chat_template(messages_of(sample, self.multimodal), add_generation_prompt=True,
                                                  tokenize=False)

    def _encode(self, texts: list[str], samples: list[dict], padding_side: str) -> dict:
        self.tokenizer.padding_side = padding_side
        kwargs = dict(padding=True, return_tensors="pt", add_special_tokens=False)
        if not self.multimodal:
            return dict(self.tokenizer(texts, **kwargs))
        # images nested per sample ([[img], [img, img], []]): what Mllama / Gemma 3 need to pair images
        # with texts, and what flat-list processors (Qwen2-VL, Pixtral) accept as well
        # (every image as RGB: L / P / RGBA inputs from any data source; alpha composited on white)
        images = [[to_rgb(im) for im in s.get("images") or []] for s in samples]
        return dict(self.processor(text=texts, images=images if any(images) else None, **kwargs))

    def train_texts(self, samples: list[dict]) -> list[str]:
        """Templated prompt + answer + end of turn: what a training batch encodes."""
        return [self.prompt_text(s) + s["answer"] + self.tokenizer.eos_token for s in samples]

    def answer_start(self, ids: torch.Tensor, n: int, answer: str) -> int:
        """Where the answer's tokens (+ end of turn) start among a sample's n real tokens; ValueError when they
        are not a suffix of it (the tokenizer merges across the prompt/answer boundary)."""
        tokens = self.tokenizer(answer + self.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        start = n - len(tokens)
        if ids[start:n].tolist() != tokens:
            raise ValueError("the answer's tokens are not a suffix of the templated sample; the tokenizer "
                             f"merges across the prompt/answer boundary for answer {answer!r}")
        return start

    def measure(self, samples: list[dict]) -> list[int]:
        """Each sample's token count in a training batch (template, image tokens, answer, end of turn), with its
        answer labelling checked; what the check before training (harness.data.lengths) runs. Raises what
        encoding these samples raises."""
        batch = self._encode(self.train_texts(samples), samples, "right")
        lengths = batch["attention_mask"].sum(1).tolist()
        if self.train_on_responses_only:
            for i, s in enumerate(samples):
                self.answer_start(batch["input_ids"][i], lengths[i], s["answer"])
        return lengths

    def __call__(self, samples: list[dict]) -> dict:
        batch = self._encode(self.train_texts(samples), samples, "right")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if ids.shape[1] > self.max_length:  # last resort: harness.data.lengths measures every sample before training
            names = ", ".join(str(s.get("source", "?")) for s in samples)
            raise ValueError(f"a batch has {ids.shape[1]} tokens, more than data.max_length={self.max_length} "
                             f"(samples: {names}); raise data.max_length or shrink the images (model.max_pixels)")
        labels = torch.full_like(ids, IGNORE_INDEX)
        lengths = mask.sum(1).tolist()
        for i, s in enumerate(samples):
            n = lengths[i]
            if self.train_on_responses_only:
                start = self.answer_start(ids[i], n, s["answer"])
                labels[i, start:n] = ids[i, start:n]
            else:
                labels[i, :n] = ids[i, :n]
                for tid in self.image_token_ids:
                    labels[i][ids[i] == tid] = IGNORE_INDEX
        batch["labels"] = labels
        self.tokens_seen += int(mask.sum())
        return batch

    def prompts(self, samples: list[dict]) -> dict:
        """Left-padded prompts for generation."""
        return self._encode([self.prompt_text(s) for s in samples], samples, "left")

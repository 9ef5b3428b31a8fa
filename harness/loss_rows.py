"""The loss's labelled rows from the host, for any model whose loss is harness.kernels' fused cross-entropy.

The fused loss computes logits only for the positions whose next-token label counts (prompts and image tokens
are often a quarter or more of a VLM batch). Finding those positions on the GPU means reading the labels back
(a count and a ``nonzero``: a host sync every step). The collator has the labels on the host anyway:
:class:`LossRowsCollator` adds them to every training batch as ``loss_rows``, and the fused loss takes them from
there. Qwen2-VL-family models get the same rows inside ``harness.host_prep``'s ``HostPrep``; this is for the
others (text LLMs, Mllama, Pixtral, Gemma 3).
"""
from __future__ import annotations

import dataclasses

import torch

from harness.host_prep import label_rows

__all__ = ["LossRows", "LossRowsCollator"]


@dataclasses.dataclass
class LossRows:
    rows: torch.Tensor  # [n] flat indices into batch * seq of the shifted loss's labelled positions
    n: int
    _on: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # device -> copy

    @classmethod
    def of(cls, labels: torch.Tensor, ignore_index: int = -100) -> "LossRows":
        rows = label_rows(labels, ignore_index)
        return cls(rows, int(rows.numel()))

    def pin_memory(self) -> "LossRows":  # DataLoader(pin_memory=True) calls this
        return LossRows(self.rows.pin_memory(), self.n)

    def to(self, device, non_blocking: bool = True) -> "LossRows":
        """The copy on ``device``, made once and asynchronously from page-locked memory (a pageable copy would
        wait for the GPU's queue to drain)."""
        device = torch.device(device)
        if device.type == self.rows.device.type:
            return self
        if device not in self._on:
            rows = self.rows if self.rows.is_pinned() else self.rows.pin_memory()
            self._on[device] = LossRows(rows.to(device, non_blocking=True), self.n)
        return self._on[device]


class LossRowsCollator:
    """Wraps a collator: every batch with labels gets its ``loss_rows``."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, samples):
        batch = self.collator(samples)
        if batch.get("labels") is not None:
            batch["loss_rows"] = LossRows.of(batch["labels"])
        return batch

    def __getattr__(self, name):  # prompts(), tokens_seen, ... of the wrapped collator
        inner = self.__dict__.get("collator")
        if inner is None:  # during unpickling (DataLoader workers under spawn), before __dict__ is filled
            raise AttributeError(name)
        return getattr(inner, name)

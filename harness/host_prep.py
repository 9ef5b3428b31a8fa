"""Qwen2-VL-family inputs computed on the host, in the collator, so the training forward never waits on the GPU.

Left to itself, a Qwen2-VL / Qwen2.5-VL forward derives from ``image_grid_thw`` and ``input_ids``, on the GPU and
with Python loops over ``.tolist()`` / ``.item()`` values, a handful of small tensors: the vision tower's rotary
positions, attention segments (and windows), the count check of image tokens against image features, and the
language model's 3-D M-RoPE positions. Each of those reads drains the GPU's queue and leaves it idle while the
host computes; dozens of tiny launches follow. All of it depends only on the batch's token ids and image grids,
which the collator has on the host anyway. :func:`prepare` computes it there (transformers' own
``vision_utils`` helpers for the tower, :func:`mrope_position_ids` for the language model, checked against
``get_rope_index`` in the tests), and :func:`install` wraps the model's forward so that a batch carrying a
``host_prep`` entry runs: embeddings -> vision tower with the precomputed kwargs -> image features written into
the embeddings by index -> language model with the given positions. Batches without one (generation, other
callers) take the model's own path unchanged.

With right padding only (the training collator's), the attention mask is dropped: under a causal mask no real
token can see a padding token that follows it, so every non-padding output is unchanged, and attention runs the
mask-free causal (flash) kernels. Padding positions' outputs differ; they carry no labels.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["PrepSpec", "HostPrep", "spec_of", "install", "prepare", "mrope_position_ids", "PreparingCollator"]

_ORIGINAL = "_harness_host_prep_original_forward"
# marks segment tensors built here from the batch's grid (kernels/compiled.py then batches vision attention)
STANDARD_SEGMENTS = "_harness_standard_segments"


@dataclasses.dataclass(frozen=True)
class PrepSpec:
    """What the host needs to know about the model: read from its config once, at :func:`install`."""

    image_token_id: int
    spatial_merge_size: int
    window_size: int | None = None  # windowed towers (Qwen2.5-VL)
    patch_size: int | None = None


@dataclasses.dataclass
class HostPrep:
    position_ids: torch.Tensor  # [3, batch, seq] M-RoPE positions (padding: 0, as transformers)
    image_index: torch.Tensor  # [image tokens] flat indices into batch * seq, in image order
    grid: torch.Tensor  # [images, 3] (t, h, w) in patches; stays on the host
    vision: dict[str, Any]  # the tower's precomputed kwargs (position_ids, cu_seqlens, max_seqlen, windows)
    n_patches: int
    drop_attention_mask: bool  # right padding only (or none): the causal mask alone gives the same outputs
    label_rows: torch.Tensor | None = None  # [n_labels] flat rows of the shifted loss with a label (label_rows())
    n_labels: int | None = None
    _on: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # device -> copy

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "HostPrep":
        vision = {k: fn(v) if torch.is_tensor(v) else v for k, v in self.vision.items()}
        rows = None if self.label_rows is None else fn(self.label_rows)
        return dataclasses.replace(self, position_ids=fn(self.position_ids), image_index=fn(self.image_index),
                                   vision=vision, label_rows=rows, _on={})

    def pin_memory(self) -> "HostPrep":  # DataLoader(pin_memory=True) calls this
        return self._map(torch.Tensor.pin_memory)

    def to(self, device, non_blocking: bool = True) -> "HostPrep":
        """The copy on ``device`` (made once: the forward and the loss both ask; accelerate's DataLoader may
        ask first). Copies are always asynchronous, from page-locked memory; the grid stays on the host."""
        device = torch.device(device)
        if device.type == self.position_ids.device.type:
            return self
        if device in self._on:
            return self._on[device]
        # page-locked first (the caching host allocator makes repeats cheap; the DataLoader's pin_memory has
        # usually done it): a pageable host-to-device copy would wait for the GPU's queue to drain
        out = self._map(lambda t: (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True))
        for k in ("cu_seqlens", "cu_window_seqlens"):
            if k in out.vision:
                setattr(out.vision[k], STANDARD_SEGMENTS, True)
        self._on[device] = out
        return out


# --------------------------------------------------------------------------- the host-side computation


def mrope_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, grid: torch.Tensor | None,
                       image_token_id: int, spatial_merge_size: int) -> torch.Tensor:
    """Qwen2-VL's 3-D rotary positions ``[3, batch, seq]`` for text and images (``get_rope_index``'s result).

    Text tokens count up on all three axes; an image's tokens take (t, h, w) grid positions offset by the
    position where it starts, after which text continues from that start + max(h, w) / merge. Padding
    (attention_mask 0) gets 0. Consecutive images are split by their grids' token counts. NumPy on the host:
    torch's CPU ops cost milliseconds each on a busy GPU host."""
    ids = input_ids.numpy()
    bsz, seq = ids.shape
    keep_all = np.ones((bsz, seq), dtype=bool) if attention_mask is None else attention_mask.numpy().astype(bool)
    out = np.zeros((3, bsz, seq), dtype=np.int64)
    grids = [] if grid is None else [tuple(int(v) for v in row) for row in grid.tolist()]
    m = spatial_merge_size
    g = 0
    for b in range(bsz):
        keep = keep_all[b]
        is_img = ids[b][keep] == image_token_id
        n = is_img.size
        if n == 0:
            continue
        pos = np.empty((3, n), dtype=np.int64)
        change = np.flatnonzero(is_img[1:] != is_img[:-1]) + 1
        cur = 0
        for i, j in zip(np.r_[0, change].tolist(), np.r_[change, n].tolist()):
            if not is_img[i]:
                pos[:, i:j] = np.arange(cur, cur + j - i)
                cur += j - i
                continue
            k = i
            while k < j:
                if g >= len(grids):
                    raise ValueError(f"sample {b} has more image tokens than image_grid_thw has images ({len(grids)})")
                t, h, w = grids[g]
                lh, lw = h // m, w // m
                count = t * lh * lw
                if k + count > j:
                    raise ValueError(f"sample {b}: a run of {j - i} image tokens does not split into whole images "
                                     f"at image {g} (grid {t}x{h}x{w}, {count} tokens with merge {m})")
                pos[0, k:k + count] = np.repeat(np.arange(t), lh * lw) + cur
                pos[1, k:k + count] = np.tile(np.repeat(np.arange(lh), lw), t) + cur
                pos[2, k:k + count] = np.tile(np.arange(lw), t * lh) + cur
                cur += max(h, w) // m
                k += count
                g += 1
        out[:, b, keep] = pos
    if g != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but the token ids hold image tokens for {g}")
    return torch.from_numpy(out)


def vision_position_ids(grids: list[tuple[int, int, int]], m: int) -> torch.Tensor:
    """The tower's rotary (h, w) positions ``[patches, 2]``, blocked by merge unit, repeated per frame
    (``transformers.vision_utils.get_vision_position_ids``)."""
    parts = []
    for t, h, w in grids:
        hp = np.broadcast_to(np.arange(h)[:, None], (h, w)).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3)
        wp = np.broadcast_to(np.arange(w)[None, :], (h, w)).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3)
        parts.append(np.tile(np.stack([hp.reshape(-1), wp.reshape(-1)], -1), (t, 1)))
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def vision_cu_seqlens(grids: list[tuple[int, int, int]]) -> torch.Tensor:
    """Attention segments per frame: ``[0, h*w, 2*h*w, ...]`` int32 (``get_vision_cu_seqlens``)."""
    lens = np.concatenate([np.full(t, h * w) for t, h, w in grids])
    return torch.from_numpy(np.r_[0, np.cumsum(lens)].astype(np.int32))


def vision_window_index(grids: list[tuple[int, int, int]], m: int, window_size: int,
                        patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's window order of merged units and window segments (``get_vision_window_index``)."""
    vws = window_size // m // patch_size
    index, cu, offset = [], [0], 0
    for t, h, w in grids:
        lh, lw = h // m, w // m
        idx = np.arange(t * lh * lw).reshape(t, lh, lw)
        ph, pw = vws - lh % vws, vws - lw % vws
        nh, nw = (lh + ph) // vws, (lw + pw) // vws
        padded = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
        padded = padded.reshape(t, nh, vws, nw, vws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, vws, vws)
        seqlens = (padded != -100).sum((2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * m * m + cu[-1]).tolist())
        offset += t * lh * lw
    cu = np.asarray(cu, dtype=np.int32)
    cu = cu[np.r_[True, cu[1:] != cu[:-1]]]  # unique_consecutive
    return torch.from_numpy(np.concatenate(index).astype(np.int64)), torch.from_numpy(cu)


def label_rows(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Flat indices (into batch * seq) of the positions whose next-token label counts: the rows of the
    shifted loss a fused cross-entropy computes, known on the host so that it needs no device read."""
    lab = labels.numpy()
    kept = np.zeros(lab.shape, dtype=bool)
    kept[:, :-1] = lab[:, 1:] != ignore_index
    return torch.from_numpy(np.flatnonzero(kept.reshape(-1)).astype(np.int64))


def _right_padded(attention_mask: torch.Tensor | None) -> bool:
    """Every row is ones then zeros (or there is no mask)."""
    if attention_mask is None:
        return True
    m = attention_mask.bool()
    return bool((m == (torch.arange(m.shape[1])[None, :] < m.sum(1, keepdim=True))).all())


def prepare(batch: dict, spec: PrepSpec) -> HostPrep:
    """The host-side inputs of one batch (its tensors on the CPU). Raises ValueError when the image tokens and
    the image grids do not match, naming the counts."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    grid = batch.get("image_grid_thw")
    if any(t is not None and t.device.type != "cpu" for t in (ids, mask, labels, grid)):
        raise ValueError("host_prep.prepare wants the batch on the CPU (it runs in the collator)")
    grids = [] if grid is None else [tuple(int(v) for v in row) for row in grid.tolist()]
    grid = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
    m = spec.spatial_merge_size
    image_index = torch.from_numpy(np.flatnonzero(ids.numpy().reshape(-1) == spec.image_token_id).astype(np.int64))
    want = sum(t * h * w for t, h, w in grids) // (m * m)
    if image_index.numel() != want:
        raise ValueError(f"Image features and image tokens do not match: the batch has {image_index.numel()} image "
                         f"tokens and its image_grid_thw {grids} makes {want} (spatial_merge_size {m})")
    vision: dict[str, Any] = {}
    if grids:
        vision["position_ids"] = vision_position_ids(grids, m)
        cu = vision_cu_seqlens(grids)
        vision["cu_seqlens"] = cu
        vision["max_seqlen"] = max(h * w for _t, h, w in grids)
        if spec.window_size is not None:
            wi, cuw = vision_window_index(grids, m, spec.window_size, spec.patch_size)
            vision["window_index"], vision["cu_window_seqlens"] = wi, cuw
            vision["max_window_seqlen"] = int((cuw[1:] - cuw[:-1]).max())
    rows = None if labels is None else label_rows(labels)
    return HostPrep(position_ids=mrope_position_ids(ids, mask, grid, spec.image_token_id, m),
                    image_index=image_index, grid=grid, vision=vision,
                    n_patches=sum(t * h * w for t, h, w in grids),
                    drop_attention_mask=_right_padded(mask), label_rows=rows,
                    n_labels=None if rows is None else int(rows.numel()))


# --------------------------------------------------------------------------- the model side


def _inner(model: nn.Module) -> nn.Module | None:
    """The module that owns the vision tower, the language model and ``get_rope_index``."""
    for m in model.modules():
        if all(hasattr(m, n) for n in ("visual", "language_model", "get_rope_index", "get_input_embeddings")):
            return m
    return None


def spec_of(model: nn.Module) -> PrepSpec | None:
    """A spec when the model is one this module knows how to feed (Qwen2-VL-family towers that accept the
    precomputed kwargs of ``transformers.vision_utils``), else None."""
    try:
        from transformers import vision_utils  # noqa: F401  (transformers >= 5.1x)
    except ImportError:
        return None
    inner = _inner(model)
    if inner is None:
        return None
    cfg = inner.config
    vc = getattr(cfg, "vision_config", None)
    tower = inner.visual
    image_token_id = getattr(cfg, "image_token_id", None)
    merge = getattr(tower, "spatial_merge_size", getattr(vc, "spatial_merge_size", None))
    if image_token_id is None or not isinstance(merge, int):
        return None
    import inspect
    import sys

    src_mod = sys.modules.get(type(tower).__module__)
    try:
        src = inspect.getsource(inspect.unwrap(type(tower).forward))
    except (OSError, TypeError):
        return None
    if "get_vision_position_ids" not in src or "get_vision_attention_seqlens" not in src or src_mod is None:
        return None  # a tower that computes its metadata some other way: leave it alone
    windowed = "get_vision_window_index" in src
    if windowed and not all(isinstance(getattr(tower, n, None), int) for n in ("window_size", "patch_size")):
        return None
    return PrepSpec(image_token_id=int(image_token_id), spatial_merge_size=merge,
                    window_size=tower.window_size if windowed else None,
                    patch_size=tower.patch_size if windowed else None)


def _prepared_forward(self, *args, host_prep: HostPrep | None = None, **kwargs):
    original = self.__dict__[_ORIGINAL]
    if host_prep is None:
        return original(*args, **kwargs)
    if args or any(kwargs.get(k) is not None for k in ("inputs_embeds", "position_ids", "pixel_values_videos")):
        raise ValueError("a batch with host_prep passes input_ids, pixel_values and image_grid_thw as keywords, "
                         "and no inputs_embeds, position_ids or videos")
    input_ids = kwargs.pop("input_ids")
    pixel_values = kwargs.pop("pixel_values", None)
    for k in ("image_grid_thw", "mm_token_type_ids", "inputs_embeds", "position_ids", "pixel_values_videos",
              "video_grid_thw"):
        kwargs.pop(k, None)
    p = host_prep.to(input_ids.device)
    embeds = self.get_input_embeddings()(input_ids)
    if p.image_index.numel():
        if pixel_values is None or pixel_values.shape[0] != p.n_patches:
            got = None if pixel_values is None else pixel_values.shape[0]
            raise ValueError(f"pixel_values has {got} patches; the batch's image_grid_thw makes {p.n_patches}")
        feats = self.visual(pixel_values.type(self.visual.dtype), grid_thw=p.grid, **p.vision).pooler_output
        flat = embeds.reshape(-1, embeds.shape[-1])
        embeds = flat.index_copy(0, p.image_index, feats.to(flat.dtype)).view_as(embeds)
    if p.drop_attention_mask:
        kwargs["attention_mask"] = None
    return original(input_ids=None, inputs_embeds=embeds, position_ids=p.position_ids, **kwargs)


def install(model: nn.Module) -> PrepSpec | None:
    """Let ``model`` take batches with a ``host_prep`` entry (see :func:`prepare`); the spec, or None when the
    model is not one of the family (nothing changed)."""
    spec = spec_of(model)
    if spec is None:
        return None
    inner = _inner(model)
    if _ORIGINAL not in inner.__dict__:
        inner.__dict__[_ORIGINAL] = inner.forward
        inner.forward = functools.partial(_prepared_forward, inner)
    inner.__dict__["_harness_host_prep_spec"] = spec
    return spec


def installed_spec(model: nn.Module) -> PrepSpec | None:
    inner = _inner(model)
    return None if inner is None else inner.__dict__.get("_harness_host_prep_spec")


class PreparingCollator:
    """Wraps a collator: every training batch gets its ``host_prep`` (computed where the collator runs: the
    DataLoader's workers, or the main process between steps while the GPU works)."""

    def __init__(self, collator, spec: PrepSpec):
        self.collator = collator
        self.spec = spec

    def __call__(self, samples):
        batch = self.collator(samples)
        batch["host_prep"] = prepare(batch, self.spec)
        return batch

    def __getattr__(self, name):  # prompts(), tokens_seen, ... of the wrapped collator
        inner = self.__dict__.get("collator")
        if inner is None:  # during unpickling (DataLoader workers under spawn), before __dict__ is filled
            raise AttributeError(name)
        return getattr(inner, name)

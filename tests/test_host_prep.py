"""harness/host_prep.py: Qwen2-VL-family inputs computed on the host give the model's own results.

Tiny random Qwen2-VL and Qwen2.5-VL (windowed tower), fp32 on CPU: M-RoPE positions equal the model's
``get_rope_index`` (padding, several images, unequal images, text-only rows); a forward with ``host_prep`` gives
the loss and LoRA gradients of the model's own forward, with right padding (mask dropped) and without; the
batched vision attention still engages; mismatched image tokens fail with the counts.
"""
import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers.vision_utils")

from harness import host_prep  # noqa: E402

IMG, VSTART, VEND = 297, 295, 296


def _model(arch: str):
    import transformers

    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                pad_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [2, 3, 3]})
    if arch == "qwen2_vl":
        cfg = transformers.Qwen2VLConfig(
            text_config=text, image_token_id=IMG, video_token_id=298, vision_start_token_id=VSTART,
            vision_end_token_id=VEND,
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                               temporal_patch_size=2, spatial_merge_size=2, in_channels=3))
        cls = transformers.Qwen2VLForConditionalGeneration
        targets = ["q_proj", "v_proj", "qkv", "fc1"]
    else:
        cfg = transformers.Qwen2_5_VLConfig(
            text_config=text, image_token_id=IMG, video_token_id=298, vision_start_token_id=VSTART,
            vision_end_token_id=VEND,
            vision_config=dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                               window_size=32, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                               in_channels=3, fullatt_block_indexes=[1]))
        cls = transformers.Qwen2_5_VLForConditionalGeneration
        targets = ["q_proj", "v_proj", "qkv", "gate_proj"]
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation="sdpa").float()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=targets))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model.train()


def _batch(seed, images_per_row, pad=(0, 0), seq=40, t=1):
    """Right-padded rows: [start, image tokens, end] per image, random text; ``images_per_row`` lists (h, w)
    patch grids per row; ``pad`` padding tokens per row."""
    g = torch.Generator().manual_seed(seed)
    rows, grids = [], []
    for imgs, p in zip(images_per_row, pad):
        ids = [int(v) for v in torch.randint(3, 290, (3,), generator=g)]
        for h, w in imgs:
            ids += [VSTART] + [IMG] * (t * h * w // 4) + [VEND] + [int(v) for v in torch.randint(3, 290, (2,),
                                                                                                  generator=g)]
            grids.append([t, h, w])
        n = seq - p
        assert len(ids) <= n, (len(ids), n)
        ids += [int(v) for v in torch.randint(3, 290, (n - len(ids),), generator=g)]
        rows.append(ids + [2] * p)
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pad):
        if p:
            mask[i, -p:] = 0
    labels = ids.masked_fill((ids == IMG) | (mask == 0), -100)
    grid = torch.tensor(grids) if grids else None
    out = dict(input_ids=ids, attention_mask=mask, labels=labels, mm_token_type_ids=(ids == IMG).long())
    if grid is not None:
        out["image_grid_thw"] = grid
        out["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4, generator=g)
    return out


CASES = {
    "one image each": ([[(8, 8)], [(8, 8)]], (0, 0)),
    "padding, unequal images, a text-only row": ([[(8, 8), (4, 12)], [], [(8, 4)]], (0, 5, 9)),
    "two images back to back": ([[(4, 4), (8, 8)]], (3,)),
}


def _back_to_back(batch):
    """Remove the end/start tokens between a row's images so that their image tokens touch."""
    ids = batch["input_ids"][0].tolist()
    i = ids.index(VEND)
    del ids[i:i + 4]  # end, 2 text tokens, start
    ids += [3, 3, 3, 3]
    batch["input_ids"][0] = torch.tensor(ids)
    batch["mm_token_type_ids"] = (batch["input_ids"] == IMG).long()
    batch["labels"] = batch["input_ids"].masked_fill((batch["input_ids"] == IMG) | (batch["attention_mask"] == 0),
                                                     -100)
    return batch


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("case", list(CASES))
def test_mrope_positions_equal_get_rope_index(arch, case):
    model = _model(arch)
    imgs, pad = CASES[case]
    batch = _batch(1, imgs, pad)
    spec = host_prep.spec_of(model)
    ours = host_prep.mrope_position_ids(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                                        spec.image_token_id, spec.spatial_merge_size)
    inner = host_prep._inner(model)
    theirs, _ = inner.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                     image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    assert torch.equal(ours, theirs)


def test_back_to_back_images_split_by_their_grids():
    """Two images with no text between them: one run of tokens, positions per image (transformers' groupby
    would treat the run as one image)."""
    batch = _back_to_back(_batch(2, [[(4, 4), (8, 8)]], (0,)))
    pos = host_prep.mrope_position_ids(batch["input_ids"], None, batch["image_grid_thw"], IMG, 2)
    start = batch["input_ids"][0].tolist().index(IMG)
    first, second = pos[:, 0, start:start + 4], pos[:, 0, start + 4:start + 20]
    assert first[1].tolist() == [start, start, start + 1, start + 1] and first[2].tolist() == [start, start + 1] * 2
    nxt = start + 2  # after a 2x2 merged image, the next starts at its start + max(h, w)
    assert second[0].unique().tolist() == [nxt] and second[1].min() == nxt and second[1].max() == nxt + 3


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("case", ["one image each", "padding, unequal images, a text-only row"])
def test_prepared_forward_matches_the_models_own(arch, case):
    model = _model(arch)
    imgs, pad = CASES[case]
    batch = _batch(3, imgs, pad)
    loss_ref, grads_ref = _loss_and_grads(model, batch)
    spec = host_prep.install(model)
    assert spec is not None and (spec.window_size is not None) == (arch == "qwen2_5_vl")
    prep = host_prep.prepare(batch, spec)
    assert prep.drop_attention_mask  # right padding
    calls = []
    inner = host_prep._inner(model)
    orig_rope = inner.get_rope_index
    inner.get_rope_index = lambda *a, **k: calls.append(1) or orig_rope(*a, **k)
    loss, grads = _loss_and_grads(model, dict(batch, host_prep=prep))
    assert not calls  # positions came from the host
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and any("visual" in k for k in grads)
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # a batch without host_prep still takes the model's own path
    loss2, _ = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss2, loss_ref, rtol=1e-6, atol=1e-7)


def test_left_padding_keeps_the_mask():
    batch = _batch(4, [[(8, 8)], [(8, 8)]], (0, 0))
    batch["attention_mask"][1, :3] = 0
    prep = host_prep.prepare(batch, host_prep.PrepSpec(IMG, 2))
    assert not prep.drop_attention_mask
    assert prep.position_ids[:, 1, :3].eq(0).all() and prep.position_ids[0, 1, 3] == 0


def test_batched_vision_attention_engages_with_host_segments():
    """kernels/compiled.py batches the tower's attention only for segments it can trust: host_prep's are."""
    from harness.kernels.compiled import prepare_for_compile
    from harness.kernels.patch import revert_model

    model = _model("qwen2_5_vl")
    batch = _batch(5, [[(16, 16)], [(16, 16)]], (0, 0), seq=80)
    loss_ref, grads_ref = _loss_and_grads(model, batch)
    report = prepare_for_compile(model)
    assert len(report["vision_attention_batched"]) == 3
    spec = host_prep.install(model)
    try:
        prep = host_prep.prepare(batch, spec)
        # the device copy marks its segments (on CPU, .to("cpu") is the same object: mark by hand)
        for k in ("cu_seqlens", "cu_window_seqlens"):
            setattr(prep.vision[k], host_prep.STANDARD_SEGMENTS, True)
        loss, grads = _loss_and_grads(model, dict(batch, host_prep=prep))
        segs = [blk.attn.__dict__["_harness_seg_len"] for blk in host_prep._inner(model).visual.blocks]
        # 16x16 patches; windows of 32 px / 4 px patches = 8x8 patches; block 1 attends over the whole image
        assert segs == [64, 256, 64]
    finally:
        revert_model(model)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_mismatched_image_tokens_fail_with_the_counts():
    batch = _batch(6, [[(8, 8)]], (0,))
    batch["input_ids"][0, 5] = 7  # one image token fewer
    with pytest.raises(ValueError, match=r"15 image tokens .* makes 16"):
        host_prep.prepare(batch, host_prep.PrepSpec(IMG, 2))


def test_text_only_models_are_left_alone():
    import transformers

    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=100)
    model = transformers.Qwen2ForCausalLM(cfg)
    assert host_prep.install(model) is None
    assert "forward" not in model.__dict__


def test_pinned_and_device_copies():
    batch = _batch(7, [[(8, 8)]], (2,))
    prep = host_prep.prepare(batch, host_prep.PrepSpec(IMG, 2))
    assert prep.to("cpu") is prep
    if torch.cuda.is_available():
        dev = prep.pin_memory().to("cuda")
        assert dev.position_ids.is_cuda and dev.grid.device.type == "cpu"
        assert getattr(dev.vision["cu_seqlens"], host_prep.STANDARD_SEGMENTS)


def test_collator_wrapper_adds_host_prep():
    batch = _batch(8, [[(8, 8)]], (0,))
    col = host_prep.PreparingCollator(lambda samples: dict(batch), host_prep.PrepSpec(IMG, 2))
    out = col([{}])
    assert isinstance(out["host_prep"], host_prep.HostPrep)


@pytest.mark.parametrize("grids", [[(1, 8, 8)], [(1, 16, 12), (2, 8, 8), (1, 4, 28)], [(1, 32, 32)] * 4])
def test_vision_metadata_equals_transformers_helpers(grids):
    from transformers import vision_utils as vu

    grid = torch.tensor(grids)
    assert torch.equal(host_prep.vision_position_ids(grids, 2), vu.get_vision_position_ids(grid, 2))
    assert torch.equal(host_prep.vision_cu_seqlens(grids), vu.get_vision_cu_seqlens(grid))
    for window, patch in [(112, 14), (32, 4), (8, 4)]:
        wi, cu = host_prep.vision_window_index(grids, 2, window, patch)
        wi_ref, cu_ref = vu.get_vision_window_index(grid, spatial_merge_size=2, window_size=window, patch_size=patch)
        assert torch.equal(wi, wi_ref) and torch.equal(cu, cu_ref), (window, patch)


def test_label_rows_are_the_shifted_labels_that_count():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, 8, 9]])
    rows = host_prep.label_rows(labels)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    assert torch.equal(rows, torch.nonzero(shifted != -100).flatten())


class _FixedBatches:
    """A picklable stand-in collator: the same batch for every call, with the attribute a ChatCollator has."""

    tokens_seen = 7

    def __init__(self, batch):
        self.batch = batch

    def __call__(self, samples):
        return dict(self.batch)


def test_prepared_batches_cross_dataloader_workers(monkeypatch):
    """In training the collator runs in DataLoader workers: the wrapper and its HostPrep pickle (spawn start
    method, the strictest), and the wrapped collator's attributes stay reachable."""
    import pickle
    from pathlib import Path

    # The stand-in collator pickles by reference as `tests.test_host_prep._FixedBatches` (pytest's importlib
    # mode): the spawned worker inherits this sys.path, so the repo root must be on it wherever pytest runs.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))

    batch = _batch(9, [[(8, 8)], [(4, 8)]], (0, 4))
    col = host_prep.PreparingCollator(_FixedBatches(batch), host_prep.PrepSpec(IMG, 2))
    assert col.tokens_seen == 7
    again = pickle.loads(pickle.dumps(col))
    assert again.tokens_seen == 7
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2, collate_fn=col, num_workers=1,
                                         multiprocessing_context="spawn")
    got = [b["host_prep"] for b in loader]
    ref = host_prep.prepare(batch, col.spec)
    assert len(got) == 2
    for p in got:
        assert torch.equal(p.position_ids, ref.position_ids) and torch.equal(p.label_rows, ref.label_rows)
        assert p.vision.keys() == ref.vision.keys() and p.drop_attention_mask and ref.drop_attention_mask

"""accelerate_model on a tiny random Qwen2-VL wrapped with PEFT LoRA (CPU, TRITON_INTERPRET=1)."""

import pytest
import torch

from harness.kernels.patch import accelerate_model, revert_model

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "qkv", "fc1", "fc2"]
IMG, VSTART = 299, 297


def _tiny_model():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=256,
            bos_token_id=0, eos_token_id=1, pad_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        image_token_id=IMG, video_token_id=298, vision_start_token_id=VSTART,
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).float().eval()
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(model, lcfg)
    with torch.no_grad():  # B is zero at init: randomise so that every LoRA grad is non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
            with torch.no_grad():
                if n.endswith("norm.weight") or "layernorm" in n:
                    p.normal_(1.0, 0.2)
    return model


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    bsz, seq = 2, 13
    ids = torch.randint(3, 290, (bsz, seq), generator=g)
    ids[:, 1] = VSTART
    ids[:, 2:6] = IMG  # 16 patches -> 4 merged tokens per image
    pixel_values = torch.randn(bsz * 16, 3 * 2 * 4 * 4, generator=g)
    grid = torch.tensor([[1, 4, 4]] * bsz)
    mm = torch.zeros_like(ids)
    mm[:, 2:6] = 1  # image tokens
    labels = ids.clone()
    labels[:, :6] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                image_grid_thw=grid, mm_token_type_ids=mm, labels=labels)


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model._last_logits_none = out.logits is None
    return out.loss.detach(), grads


def test_accelerate_model_matches_reference(cpu_interp, seed):
    model = _tiny_model()
    inputs = _inputs(seed)
    sd_keys = list(model.state_dict().keys())
    adapter_keys = list(peft.get_peft_model_state_dict(model).keys())
    loss_ref, grads_ref = _loss_and_grads(model, inputs)

    report = accelerate_model(model, {"enabled": True, "lora": True, "rms_norm": True, "rope": True,
                                      "swiglu": True, "cross_entropy": True}, force=True)
    try:
        assert len(report["lora_linear"]) == 2 * 5 + 3  # text: q,v,gate,up,down x2 layers; vision: qkv,fc1,fc2
        assert len(report["rms_norm"]) == 5
        assert len(report["swiglu"]) == 2
        assert len(report["rope"]) == 2
        assert len(report["cross_entropy"]) == 1
        # state-dict neutral: no new parameters / buffers, adapter saving unchanged
        assert list(model.state_dict().keys()) == sd_keys
        assert list(peft.get_peft_model_state_dict(model).keys()) == adapter_keys

        loss, grads = _loss_and_grads(model, inputs)
        assert model._last_logits_none  # the fused CE path ran (no logits materialised)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-5)
        assert grads.keys() == grads_ref.keys() and len(grads) > 0
        for n in grads:
            assert "lora_" in n
            torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    finally:
        revert_model(model)
    loss2, _ = _loss_and_grads(model, inputs)
    torch.testing.assert_close(loss2, loss_ref, rtol=1e-6, atol=1e-7)
    assert "forward" not in model.base_model.model.lm_head.__dict__


def test_auto_on_cpu_swaps_nothing():
    model = _tiny_model()
    assert accelerate_model(model, {"enabled": "auto"}) == {}
    assert accelerate_model(model, {"enabled": False}, force=True) == {}


def test_host_prep_with_the_kernels_matches_reference(cpu_interp, monkeypatch):
    """harness.host_prep on the accelerated model: same loss and LoRA grads, and the fused loss takes its
    labelled rows from the host (no device read of the labels)."""
    from harness import host_prep
    from harness.kernels import cross_entropy

    model = _tiny_model().train()
    inputs = _inputs(3)
    inputs["labels"][1, 8:] = -100  # rows without labels: the fused loss leaves them out
    loss_ref, grads_ref = _loss_and_grads(model, inputs)
    accelerate_model(model, {"enabled": True}, force=True)
    spec = host_prep.install(model)
    assert spec is not None
    seen = []
    apply = cross_entropy.FusedLinearCrossEntropyFunction.apply
    monkeypatch.setattr(cross_entropy.FusedLinearCrossEntropyFunction, "apply",
                        lambda *a: seen.append(a[8]) or apply(*a))
    try:
        loss, grads = _loss_and_grads(model, dict(inputs, host_prep=host_prep.prepare(inputs, spec)))
    finally:
        revert_model(model)
    assert len(seen) == 1 and seen[0] is not None and seen[0][1] == int((inputs["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-5)
    for n in grads_ref:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_the_trainer_leaves_the_loss_to_the_model(cpu_interp, compose, fast, monkeypatch, tmp_path):
    """harness.train's SFTTrainer: TRL's own LM-head patch of the forward is undone, so a training step's loss
    is the model's own, here the fused linear cross-entropy the kernels swapped in (on a GPU: no host syncs
    in the loss), equal to the model's loss called directly; the token accuracy it logs comes from the fused
    loss's top-1 count and equals the logits'; the trainer's NaN filter (a sync) is off."""
    from harness.collator import ChatCollator
    from harness.data import build_datasets
    from harness.kernels import cross_entropy
    from harness.pipeline import build
    from harness.train import IndexedCollator, index_dataset, sft_config, trainer_class

    _, run = compose([*fast, "logger=none", "model.modules_to_save=[]"])  # a plain lm_head: the fused loss applies
    device, dtype, processor, plan, model = build(run)
    model.train()
    report = accelerate_model(model, {"enabled": True, "lora": False, "rms_norm": False, "rope": False,
                                      "swiglu": False, "cross_entropy": True}, force=True)
    assert len(report["cross_entropy"]) == 1
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    samples, _ = build_datasets(run.data, run.seed)
    collator = ChatCollator(processor)
    try:
        trainer = trainer_class()(model=model, args=sft_config(run, tmp_path, device, dtype),
                                  train_dataset=index_dataset(len(samples)),
                                  data_collator=IndexedCollator(collator, samples), processing_class=processor)
        assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards
        assert trainer.args.logging_nan_inf_filter is False
        calls = []
        apply = cross_entropy.FusedLinearCrossEntropyFunction.apply
        monkeypatch.setattr(cross_entropy.FusedLinearCrossEntropyFunction, "apply",
                            lambda *a: calls.append(1) or apply(*a))
        batch = collator(samples[:2])
        n_items = (batch["labels"][:, 1:] != -100).sum()
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
        accuracy = trainer.accuracy.read()  # from the fused loss's top-1 count
        direct = model(**batch, num_items_in_batch=n_items).loss
        assert len(calls) == 2 and loss.requires_grad
        torch.testing.assert_close(loss, direct)
        assert 0 < float(loss) < 20
    finally:
        revert_model(model)
    with torch.no_grad():  # the same share from transformers' logits
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    lab = batch["labels"][:, 1:]
    mask = lab != -100
    assert accuracy == round(float(((logits[:, :-1].argmax(-1) == lab) & mask).sum()) / int(mask.sum()), 4)


@pytest.mark.parametrize("extra", [[], ["train.full_finetuning=true"], ["quant=4bit"]], ids=["lora", "full_finetuning", "qlora"])
def test_a_training_run_with_every_fast_path_matches_plain_training(cpu_interp, compose, fast, monkeypatch, tmp_path,
                                                                      extra):
    """The GPU configuration of a `harness` run, on CPU: the fused loss (Triton, interpreted),
    host_prep in the collator, offloaded checkpointing with per-layer graphs (replayed by the CPU stand-in),
    all under harness.train's trainer. Its losses follow those of the same run with none of it, every step
    after the warm-up replays graphs, and the fused loss computes every step's loss."""
    import functools

    import harness.layer_graphs as layer_graphs
    import harness.train as train_mod
    from harness import host_prep
    from harness.checkpointing import enable_checkpointing, graphs_summary
    from harness.collator import ChatCollator
    from harness.data import build_datasets
    from harness.kernels import cross_entropy
    from harness.pipeline import build

    from ..test_layer_graphs import Replay

    overrides = [*fast, "logger=none", "model.modules_to_save=[]", "train.max_steps=4", "train.logging_steps=1",
                 *extra]

    def run(fast_paths: bool):
        _, run = compose(overrides + [f"train.gradient_checkpointing={'unsloth' if fast_paths else 'false'}"])
        device, dtype, processor, _, model = build(run)
        samples, _ = build_datasets(run.data, run.seed)
        collator = ChatCollator(processor, run.data.train_on_responses_only, run.data.max_length)
        if fast_paths:
            # the interpreted layer kernels are slow and tested on their own; the fused loss is the one that
            # meets the trainer
            accelerate_model(model, {"enabled": True, "compile": False, "lora": False, "rms_norm": False,
                                     "rope": False, "swiglu": False}, force=True)
            collator = host_prep.PreparingCollator(collator, host_prep.install(model))
        losses = train_mod.train(run, model, processor, collator, samples, tmp_path / str(fast_paths),
                                 device, dtype).losses
        return model, losses

    _, ref = run(False)
    calls = []
    apply = cross_entropy.FusedLinearCrossEntropyFunction.apply
    monkeypatch.setattr(cross_entropy.FusedLinearCrossEntropyFunction, "apply",
                        lambda *a: calls.append(a[8] is not None) or apply(*a))
    monkeypatch.setattr(layer_graphs, "_CudaGraph", Replay)
    monkeypatch.setattr(train_mod, "enable_checkpointing", functools.partial(enable_checkpointing, force=True))
    try:
        model, got = run(True)
        g = graphs_summary(model)
    finally:
        revert_model(model)
    assert [s for s, _ in got] == [s for s, _ in ref] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(got, ref):
        assert abs(a - b) <= 1e-3 * abs(b), (got, ref)
    assert calls == [True] * 4  # every step's loss by the fused kernel, with the labelled rows from the host
    assert g["failures"] == [] and g["captured"] > 0 and g["replays"] >= 2 * g["captured"]
    assert g["buffer copies"]["skipped"] > 0


def test_loss_rows_from_the_collator_feed_the_fused_loss(cpu_interp, compose, fast, monkeypatch):
    """Models without host_prep (a text LLM here): the collator adds the labelled rows (harness.loss_rows), the
    fused loss takes them instead of reading the labels back, and the loss and LoRA grads are those of
    transformers' loss; a forward without labels (generation) never sees the key."""
    import pickle

    from harness.collator import ChatCollator
    from harness.data import build_datasets
    from harness.kernels import cross_entropy
    from harness.loss_rows import LossRows, LossRowsCollator
    from harness.pipeline import build

    _, run = compose([*fast, "logger=none", "model=tiny_llama", "model.modules_to_save=[]"])
    device, dtype, processor, plan, model = build(run)
    model.train()
    samples, _ = build_datasets(run.data, run.seed)
    collator = LossRowsCollator(ChatCollator(processor))
    assert pickle.loads(pickle.dumps(collator)).collator is not None and collator.tokenizer is not None
    batch = collator(samples[:3])
    rows = batch.pop("loss_rows")
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:].reshape(-1)
    assert torch.equal(rows.rows, (shifted != -100).nonzero().squeeze(1)) and rows.n == len(rows.rows)
    assert isinstance(rows, LossRows) and rows.to("cpu") is rows  # on the host already: no copy
    loss_ref, grads_ref = _loss_and_grads(model, batch)
    report = accelerate_model(model, {"enabled": True, "lora": False, "rms_norm": False, "rope": False,
                                      "swiglu": False, "cross_entropy": True}, force=True)
    assert len(report["cross_entropy"]) == 1
    seen = []
    apply = cross_entropy.FusedLinearCrossEntropyFunction.apply
    monkeypatch.setattr(cross_entropy.FusedLinearCrossEntropyFunction, "apply",
                        lambda *a: seen.append(a[8]) or apply(*a))
    try:
        loss, grads = _loss_and_grads(model, dict(batch, loss_rows=rows))
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"}, loss_rows=rows)  # popped, not passed on
    finally:
        revert_model(model)
    assert len(seen) == 1 and seen[0][1] == rows.n and torch.equal(seen[0][0], rows.rows)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-5)
    for n in grads_ref:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_a_head_trained_as_modules_to_save_gets_the_fused_loss(cpu_interp, compose, fast, monkeypatch):
    """The default tiny job trains lm_head through PEFT's modules_to_save: the fused loss runs on the trainable
    copy (the wrapper's active module), with the same loss and gradients, the head's included, as transformers'
    loss; with adapters disabled it uses the original head."""
    from harness.kernels import cross_entropy
    from harness.kernels.patch import _plain_head
    from harness.collator import ChatCollator
    from harness.data import build_datasets
    from harness.pipeline import build

    _, run = compose([*fast, "logger=none"])  # conf/model/tiny_qwen2_vl: modules_to_save [lm_head]
    device, dtype, processor, plan, model = build(run)
    model.train()
    lm = model.base_model.model
    assert type(lm.lm_head).__name__ == "ModulesToSaveWrapper"
    assert _plain_head(lm.lm_head) is lm.lm_head.modules_to_save["default"]
    samples, _ = build_datasets(run.data, run.seed)
    batch = ChatCollator(processor)(samples[:3])
    loss_ref, grads_ref = _loss_and_grads(model, batch)
    assert any("modules_to_save" in n and "lm_head" in n for n in grads_ref)
    report = accelerate_model(model, {"enabled": True, "lora": False, "rms_norm": False, "rope": False,
                                      "swiglu": False, "cross_entropy": True}, force=True)
    assert len(report["cross_entropy"]) == 1
    seen = []
    apply = cross_entropy.FusedLinearCrossEntropyFunction.apply
    monkeypatch.setattr(cross_entropy.FusedLinearCrossEntropyFunction, "apply",
                        lambda *a: seen.append(a[1]) or apply(*a))
    try:
        loss, grads = _loss_and_grads(model, batch)
        with model.disable_adapter():
            assert _plain_head(lm.lm_head) is lm.lm_head.original_module
    finally:
        revert_model(model)
    assert len(seen) == 1 and seen[0] is lm.lm_head.modules_to_save["default"].weight
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-5)
    for n in grads_ref:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_the_bench_loop_gives_the_fused_loss_its_rows_too(cpu_interp, compose, fast):
    """harness.bench's own loop feeds a model with the fused loss (and no host_prep) its labelled rows, like
    the training collator; fused_loss_module finds the swapped module, and nothing once reverted."""
    import argparse

    from harness import bench
    from harness.kernels.patch import fused_loss_module
    from harness.pipeline import build

    _, run = compose([*fast, "logger=none", "model=tiny_llama", "model.modules_to_save=[]"])
    model = build(run)[-1]
    a = argparse.Namespace(model="tiny_llama", device="cpu", batch=2, tokens=24, grid=4)
    assert fused_loss_module(model) is None and "loss_rows" not in bench.step_inputs(a, model)()
    accelerate_model(model, {"enabled": True, "lora": False, "rms_norm": False, "rope": False, "swiglu": False},
                     force=True)
    try:
        assert fused_loss_module(model) is not None
        batch = bench.step_inputs(a, model)()
        assert batch["loss_rows"].n == int((batch["labels"][:, 1:] != -100).sum())
    finally:
        revert_model(model)
    assert fused_loss_module(model) is None


def test_generate_accepts_image_inputs_with_the_fused_loss_swapped_in(cpu_interp, compose, fast):
    """generate() checks its inputs against the model's forward signature: the swapped-in loss forward must
    show the original one, or a VLM's evaluation fails with "model_kwargs are not used: pixel_values" (seen on
    an H100 after training with the fused loss). Generation itself runs the original forward: same answers."""
    import inspect

    from harness.collator import ChatCollator
    from harness.data import build_datasets
    from harness.evaluate import generate_answers
    from harness.kernels.patch import _ce_forward, fused_loss_module
    from harness.pipeline import build

    _, run = compose([*fast, "logger=none"])
    device, dtype, processor, _, model = build(run)
    samples, _ = build_datasets(run.data, run.seed)
    collator = ChatCollator(processor, run.data.train_on_responses_only, run.data.max_length)
    lm = fused_loss_module(model)
    assert lm is None
    before = generate_answers(model, collator, samples[:3], 3, 4, device, dtype=dtype)
    report = accelerate_model(model, {"enabled": True, "compile": False, "lora": False, "rms_norm": False,
                                      "rope": False, "swiglu": False, "cross_entropy": True}, force=True)
    try:
        assert len(report["cross_entropy"]) == 1
        lm = fused_loss_module(model)
        assert lm is not None and lm.forward.__func__ is _ce_forward
        assert "pixel_values" in inspect.signature(lm.forward).parameters
        after = generate_answers(model, collator, samples[:3], 3, 4, device, dtype=dtype)
    finally:
        revert_model(model)
    assert after == before and len(after) == 3

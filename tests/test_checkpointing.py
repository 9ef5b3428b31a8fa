"""Checkpointing modes give the same LoRA gradients as no checkpointing (fp32, 1e-6 relative)."""
import pytest
import torch

from harness.checkpointing import enable_checkpointing
from harness.collator import ChatCollator
from harness.data import build_datasets
from harness.pipeline import build


def lora_grads(compose, mode, force=False, extra=()):
    _, run = compose(["logger=none", "data.max_train_samples=8", *extra])
    device, dtype, processor, plan, model = build(run)
    model.train()
    used = enable_checkpointing(model, mode, device, force=force)
    samples, _ = build_datasets(run.data, run.seed)
    batch = ChatCollator(processor)(samples[:4])
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return loss.detach(), grads, used


@pytest.mark.parametrize("extra", [(), ("lora_strategy=language_only",)], ids=["vision_trained", "vision_frozen"])
def test_checkpointing_modes_match_no_checkpointing(compose, extra):
    ref_loss, ref, used = lora_grads(compose, "false", extra=extra)
    assert used == "off"
    for mode, force, expect in [("true", False, "standard"), ("unsloth", False, "standard"),
                                ("unsloth", True, "offloaded")]:
        loss, grads, used = lora_grads(compose, mode, force, extra)
        assert used.startswith(expect), used
        assert torch.equal(loss, ref_loss) or torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
        assert grads.keys() == ref.keys()
        for n in ref:
            err = (grads[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)
            assert err <= 1e-6, (mode, n, float(err))


def test_offloaded_layers_are_the_decoder_layers_and_vision_blocks(compose):
    _, run = compose(["logger=none"])
    device, dtype, processor, plan, model = build(run)
    used = enable_checkpointing(model, "unsloth", device, force=True)
    # tiny_qwen2_vl: 4 decoder layers + 2 vision blocks
    assert used == "offloaded (6 layers)", used


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["false", "true", "unsloth"])
def test_the_chosen_mode_is_what_trains(compose, fast, tmp_path, monkeypatch, mode):
    """train.gradient_checkpointing survives the trainer: TRL's SFTConfig turns checkpointing on by default and
    the Trainer would re-enable torch's checkpoint on every layer at train() (overriding `false`, replacing the
    offloaded function of `unsloth`). After training, each layer still has the mode's checkpoint function."""
    import functools

    from transformers.modeling_layers import GradientCheckpointingLayer

    import harness.train as train_mod
    from harness.checkpointing import offloaded_checkpoint

    # on CPU `unsloth` degrades to standard checkpointing unless forced (the offloader runs on CPU too)
    monkeypatch.setattr(train_mod, "enable_checkpointing", functools.partial(enable_checkpointing, force=True))
    _, run = compose([*fast, "logger=none", "train.max_steps=1", f"train.gradient_checkpointing={mode}"])
    device, dtype, processor, _, model = build(run)
    train_samples, _ = build_datasets(run.data, run.seed)
    train_mod.train(run, model, processor, ChatCollator(processor), train_samples, tmp_path, device, dtype)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers
    on = [bool(getattr(m, "gradient_checkpointing", False)) for m in layers]
    if mode == "false":
        assert not any(on)
        return
    assert all(on)
    funcs = [m._gradient_checkpointing_func for m in layers]
    offloaded = [isinstance(f, functools.partial) and f.func is offloaded_checkpoint for f in funcs]
    assert all(offloaded) if mode == "unsloth" else not any(offloaded)


def test_auto_checkpointing_is_offloaded_on_cuda_only():
    from harness.checkpointing import checkpointing_mode

    assert checkpointing_mode("auto", torch.device("cuda")) == "unsloth"
    assert checkpointing_mode("auto", torch.device("cpu")) == "false"
    for mode in ("unsloth", "true", "false"):
        assert checkpointing_mode(mode, torch.device("cuda")) == mode == checkpointing_mode(mode, torch.device("cpu"))

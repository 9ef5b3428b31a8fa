"""Regional compilation (kernels/compiled.py) on a tiny random Qwen2-VL + PEFT LoRA, on CPU.

The compiled model must give the eager model's loss and LoRA gradients: with the compiler-friendly
LoRA forward, the batched per-image vision attention, and with checkpointing (standard and the
offloaded path) wrapped around the compiled layers.
"""

import pytest
import torch

from harness.kernels.compiled import compile_layers, prepare_for_compile, uncompile_layers
from harness.kernels.patch import revert_model

from .test_patch import _inputs, _loss_and_grads, _tiny_model

peft = pytest.importorskip("peft")


def _check(model, inputs, loss_ref, grads_ref, rtol=1e-4, atol=1e-5):
    loss, grads = _loss_and_grads(model, inputs)
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=atol)
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("gc,seed,lora_op", [("off", 11, False), ("standard", 12, False), ("offloaded", 13, False),
                                             ("off", 14, True), ("offloaded", 15, True)])
def test_compiled_layers_match_eager(gc, seed, lora_op):
    torch._dynamo.reset()
    model = _tiny_model()
    inputs = dict(_inputs(seed), use_cache=False)  # training: no KV cache (it differs per layer)
    loss_ref, grads_ref = _loss_and_grads(model, inputs)

    report = prepare_for_compile(model, lora_op=lora_op)
    lora_mods = [m for m in model.modules() if "_harness_lora_op" in m.__dict__]
    assert len(lora_mods) == 2 * 5 + 3 + len(report["tiled_mlp"]) and all(m.__dict__["_harness_lora_op"] is lora_op for m in lora_mods)
    assert len(report["lora_linear"]) == 2 * 5 + 3
    assert len(report["vision_attention_batched"]) == 1
    names = compile_layers(model, backend="aot_eager")
    assert len(names) == 2 + 1  # 2 decoder layers + 1 vision block
    if gc != "off":
        from harness.checkpointing import enable_checkpointing

        model.train()
        mode = "unsloth" if gc == "offloaded" else "true"
        label = enable_checkpointing(model, mode, torch.device("cpu"), force=gc == "offloaded")
        assert label.startswith("offloaded" if gc == "offloaded" else "standard")
    from torch._dynamo.utils import counters

    counters.clear()
    try:
        _check(model, inputs, loss_ref, grads_ref)
        if gc == "off":  # a second batch through the same graphs
            _check(model, dict(_inputs(seed + 1), use_cache=False), *_loss_and_grads_eager(seed + 1))
            # compiled for real (errors fall back to eager silently): one graph per layer stack
            assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    finally:
        uncompile_layers(model)
        revert_model(model)
    loss2, _ = _loss_and_grads(model, inputs)
    torch.testing.assert_close(loss2, loss_ref, rtol=1e-6, atol=1e-7)


def _loss_and_grads_eager(seed):
    model = _tiny_model()
    return _loss_and_grads(model, _inputs(seed))


def test_batched_vision_attention_falls_back_on_unequal_images():
    """Images of different sizes: the per-image split runs (results equal to the original)."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(3)
    # one 4x4 image and one 4x8 image: 16 and 32 patches
    pix = torch.randn(48, 3 * 2 * 4 * 4, generator=g)
    grid = torch.tensor([[1, 4, 4], [1, 4, 8]])
    visual = model.base_model.model.model.visual
    with torch.no_grad():
        ref = visual(pix, grid_thw=grid)
        prepare_for_compile(model)
        assert visual.blocks[0].attn.__dict__.get("_harness_seg_len", "unset") == "unset"
        out = visual(pix, grid_thw=grid)
        assert visual.blocks[0].attn.__dict__["_harness_seg_len"] is None
    ref_t = ref.pooler_output if hasattr(ref, "pooler_output") else ref
    out_t = out.pooler_output if hasattr(out, "pooler_output") else out
    torch.testing.assert_close(out_t, ref_t, rtol=1e-5, atol=1e-6)
    revert_model(model)


@pytest.mark.slow
def test_inductor_compiled_matches_eager():
    """The real backend (Inductor, C++ codegen on CPU): same loss and grads as eager."""
    torch._dynamo.reset()
    model = _tiny_model()
    inputs = _inputs(0)
    loss_ref, grads_ref = _loss_and_grads(model, inputs)
    prepare_for_compile(model)
    compile_layers(model)
    try:
        _check(model, inputs, loss_ref, grads_ref, rtol=1e-3, atol=1e-4)
    finally:
        uncompile_layers(model)
        revert_model(model)


def _tiny_nf4_model(tmp_path):
    """The tiny model's base saved and reloaded as bitsandbytes nf4 (double quant), then LoRA."""
    from transformers import BitsAndBytesConfig, Qwen2VLForConditionalGeneration

    pytest.importorskip("bitsandbytes")
    from .test_patch import TARGETS

    _tiny_model().merge_and_unload().save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, quantization_config=q, dtype=torch.float32,
                                                            device_map={"": "cpu"})
    for p in model.parameters():
        p.requires_grad_(False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    # training mode: in eval mode on CPUs with AVX512-BF16, bitsandbytes 0.50 repacks nf4 weights for its
    # CPU inference kernel, which fails on these tiny shapes ("shape '[96, 0]' is invalid")
    return model.train()


@pytest.mark.parametrize("lora_op", [True, False])
def test_compiled_nf4_base_matches_eager(tmp_path, nf4_by_definition, lora_op):
    """nf4 base: the dequantisation runs as the registered op inside the compiled layers (its output the
    weight of harness::lora_mm, or of the traced addmm)."""
    torch._dynamo.reset()
    model = _tiny_nf4_model(tmp_path)
    inputs = dict(_inputs(5), use_cache=False)  # a KV cache differs per layer (eval / generation run eager)
    loss_ref, grads_ref = _loss_and_grads(model, inputs)
    report = prepare_for_compile(model, lora_op=lora_op)
    assert len(report["lora_linear_nf4"]) == 2 * 5 + 3 and "lora_linear" not in report
    graphs = []

    def counting_backend(gm, example_inputs):  # eager execution of each captured graph, counted
        graphs.append(gm)
        return gm.forward

    assert len(compile_layers(model, backend=counting_backend)) == 3
    try:
        _check(model, inputs, loss_ref, grads_ref)
        # one graph for both decoder layers (their quant-state offsets are graph inputs, not per-layer
        # constants that would force a recompile per layer) and one for the vision block
        assert len(graphs) == 2, [len(g.graph.nodes) for g in graphs]
    finally:
        revert_model(model)
    assert "_harness_nf4_plain" not in model.base_model.model.lm_head.__dict__


def _tiny_qwen2_5_vl_tower():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=3, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2, window_size=112,
                  patch_size=14, spatial_merge_size=2, fullatt_block_indexes=[1])
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").model.visual


@pytest.mark.parametrize("grids,window_len,image_len", [
    ([[1, 16, 16], [1, 16, 16]], 64, 256),   # whole windows, equal images: every block batched
    ([[1, 16, 16], [1, 16, 8]], 64, None),   # whole windows, unequal images: window blocks batched
    ([[2, 16, 16], [1, 16, 16]], 64, 256),   # a 2-frame video: attention per frame, windows per frame
    ([[1, 12, 12], [1, 12, 12]], None, 144),  # partial windows at the edges: window blocks split as before
])
def test_batched_windowed_vision_attention_matches(grids, window_len, image_len):
    """Qwen2.5-VL's windowed tower: attention batched over equal windows (and equal frames) gives the
    original per-window split's output and gradients; unequal segments run the original split."""
    tower = _tiny_qwen2_5_vl_tower()
    grid = torch.tensor(grids)
    n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    g = torch.Generator().manual_seed(5)
    pix = torch.randn(n, 3 * 2 * 14 * 14, generator=g)

    def run():
        tower.zero_grad(set_to_none=True)
        out = tower(pix, grid_thw=grid)
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in tower.named_parameters() if p.grad is not None}

    ref, ref_grads = run()
    report = prepare_for_compile(tower)
    try:
        assert len(report["vision_attention_batched"]) == 3
        out, grads = run()
        segs = [blk.attn.__dict__["_harness_seg_len"] for blk in tower.blocks]
        assert segs == [window_len, image_len, window_len]  # block 1 attends over whole frames
    finally:
        revert_model(tower)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_combo_kernels_are_switched_on_for_cuda_models_only(monkeypatch):
    """kernels.combo_kernels: set process-wide only when the compiled model is on CUDA (Inductor's CPU backend
    has no combo kernels) and only when asked; False leaves the user's setting alone."""
    import torch._inductor.config as ic

    # ic.patch, not monkeypatch: monkeypatch's undo deletes the option from the config module (torch 2.13)
    with ic.patch(combo_kernels=False):
        _check_combo_kernels(monkeypatch)


def _check_combo_kernels(monkeypatch):
    import torch._inductor.config as ic

    model = _tiny_model()
    try:
        compile_layers(model, backend="aot_eager")
        assert ic.combo_kernels is False  # CPU model
        uncompile_layers(model)
        fake_cuda = torch.nn.Parameter(torch.zeros(1))
        monkeypatch.setattr(type(fake_cuda), "is_cuda", property(lambda self: True))
        compile_layers(model, backend="inductor", combo_kernels=False)
        assert ic.combo_kernels is False
        uncompile_layers(model)
        compile_layers(model, backend="aot_eager")  # not Inductor: nothing to set
        assert ic.combo_kernels is False
        uncompile_layers(model)
        compile_layers(model, backend="inductor")
        assert ic.combo_kernels is True
    finally:
        uncompile_layers(model)



@pytest.mark.parametrize("lora_op", [True, False])
def test_compiled_lora_runs_in_autocast_dtype(monkeypatch, lora_op):
    """The Trainer's bf16=True wraps the forward in autocast. On CUDA a LayerNorm under autocast returns fp32, so the
    vision tower's qkv and fc1 receive fp32 activations while their weights are bf16. The lean LoRA forward and the
    tiled MLP must run those GEMMs in bf16, as F.linear under autocast does: the opaque harness::lora_mm op is not
    cast by autocast, and taking the activation's dtype cast the weights to fp32 (fp32 GEMMs on the GPU, ~300 ms
    of a Trainer step). Here the fp32 activations are handed to the modules directly (CPU autocast's LayerNorm
    returns bf16)."""
    import harness.kernels.compiled as compiled
    import harness.kernels.tiled_mlp as tiled

    model = _tiny_model()
    for n, p in model.named_parameters():
        if "lora_" not in n:
            p.data = p.data.to(torch.bfloat16)  # a 16-bit base, fp32 adapters (PEFT's autocast_adapter_dtype)
    lin = next(m for n, m in model.named_modules() if n.endswith("blocks.0.mlp.fc1"))
    mlp = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))
    g = torch.Generator().manual_seed(21)
    x_lin = torch.randn(7, lin.in_features, generator=g, requires_grad=True)  # fp32, as from an autocast LayerNorm
    x_mlp = torch.randn(2, 5, mlp.gate_proj.in_features, generator=g, requires_grad=True)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = [lin(x_lin), mlp(x_mlp)]
        grads = torch.autograd.grad([o.float().square().sum() for o in outs], [x_lin, x_mlp])
        return outs, grads

    ref_outs, ref_grads = run()  # PEFT's own forward under autocast
    seen = []
    real_addmm, real_mm = compiled.lowrank_addmm, tiled.lora_mm

    def spy_addmm(x, w, A, B, s, b=None):
        seen.append(("lora", x.dtype, w.dtype, A.dtype))
        return real_addmm(x, w, A, B, s, b)

    def spy_mm(x, W, b, A, B, s):
        seen.append(("mlp", x.dtype, W.dtype, A.dtype))
        return real_mm(x, W, b, A, B, s)

    monkeypatch.setattr(compiled, "lowrank_addmm", spy_addmm)
    monkeypatch.setattr(tiled, "lora_mm", spy_mm)
    prepare_for_compile(model, lora_op=lora_op)
    try:
        outs, grads = run()
    finally:
        revert_model(model)
    if lora_op:  # fc1 through the op, the tiled MLP's projections too: every operand bf16
        assert {k for k, *_ in seen} == {"lora", "mlp"}
        assert {tuple(dts) for _, *dts in seen} == {(torch.bfloat16,) * 3}, set(seen)
    else:
        assert not seen
    for o, r in zip(outs, ref_outs):
        assert o.dtype == r.dtype == torch.bfloat16
        torch.testing.assert_close(o, r, rtol=2e-2, atol=2e-2)
    for gr, r in zip(grads, ref_grads):
        assert gr.dtype == torch.float32  # the gradient reaches the fp32 input in its own dtype
        torch.testing.assert_close(gr, r, rtol=3e-2, atol=3e-2)

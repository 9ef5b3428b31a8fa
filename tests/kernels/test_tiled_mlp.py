"""The tiled gated MLP (kernels/tiled_mlp.py): its explicit backward against autograd on the unfused
module, the recompute skip, and whole-model gradients with every checkpointing path (fp32, CPU)."""
import importlib

import pytest
import torch

import harness.kernels.compiled as compiled
import harness.kernels.tiled_mlp as tm
from harness.checkpointing import enable_checkpointing
from harness.kernels.tiled_mlp import gated_mlp_reference, mlp_ends_layer, recomputing, tiled_gated_mlp

from .test_patch import _inputs, _loss_and_grads, _tiny_model


def _weights(H, I, r, lora, dtype=torch.float32):
    W = [torch.randn(I, H, dtype=dtype) / H**0.5, torch.randn(I, H, dtype=dtype) / H**0.5,
         torch.randn(H, I, dtype=dtype) / I**0.5]
    ads = []
    for (out_f, in_f), on in zip([(I, H), (I, H), (H, I)], lora):
        if on:  # fp32 adapters, as PEFT keeps them
            ads += [(torch.randn(r, in_f) / in_f**0.5).requires_grad_(True), (torch.randn(out_f, r) * 0.3).requires_grad_(True)]
        else:
            ads += [None, None]
    return W, ads


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("lora", [(True, True, True), (True, False, True), (False, False, True)])
@pytest.mark.parametrize("rows", [23, 4])
@pytest.mark.parametrize("op", [False, True, "triton"])  # traced addmm / the harness::lora_mm op (cuBLAS / Triton paths)
def test_tiled_mlp_matches_autograd_fp32(seed, monkeypatch, close, act, lora, rows, op):
    monkeypatch.setattr(tm, "TILE_ROWS", 4)  # 23 rows -> 8 tiles of 2-3 rows; 4 rows -> 1 tile
    if op == "triton":  # the op on lora_linear's Triton paths (epilogue GEMMs, fused dy pass) in the interpreter
        monkeypatch.setattr(importlib.import_module("harness.kernels.lora_linear"), "PATHS",
                            dict.fromkeys(("fwd", "dx", "dy"), "auto"))
        op = True
    H, I, r = 24, 40, 4
    W, ads = _weights(H, I, r, lora)
    x = torch.randn(1, rows, H, requires_grad=True)
    dy = torch.randn(1, rows, H)
    scales = (2.0, 0.5, 1.5)
    y = tiled_gated_mlp(x, *W, *ads, *scales, act=act, op=op)
    yr = gated_mlp_reference(x, *W, *ads, *scales, act=act)
    close(y, yr, 1e-5, 1e-6, "y")
    leaves = [x] + [a for a in ads if a is not None]
    got = torch.autograd.grad(y, leaves, dy)
    ref = torch.autograd.grad(yr, leaves, dy)
    for i, (g, rf) in enumerate(zip(got, ref)):
        close(g, rf, 1e-5, 1e-6, f"grad {i}")


@pytest.mark.parametrize("op", [False, True])
def test_tiled_mlp_bf16_activations_fp32_adapters(seed, monkeypatch, op):
    monkeypatch.setattr(tm, "TILE_ROWS", 8)
    H, I, r = 32, 48, 4
    W, ads = _weights(H, I, r, (True, True, True), torch.bfloat16)
    x = torch.randn(37, H, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(37, H, dtype=torch.bfloat16)
    y = tiled_gated_mlp(x, *W, *ads, 2.0, 2.0, 2.0, op=op)
    assert y.dtype == torch.bfloat16
    leaves = [x] + ads
    got = torch.autograd.grad(y, leaves, dy)
    assert [g.dtype for g in got] == [torch.bfloat16] + [torch.float32] * 6  # grads in each leaf's dtype
    x32 = x.detach().float().requires_grad_(True)
    yr = gated_mlp_reference(x32, *[w.float() for w in W], *ads, 2.0, 2.0, 2.0)
    ref = torch.autograd.grad(yr, [x32] + ads, dy.float())
    for g, rf in zip([y] + list(got), [yr] + list(ref)):
        err = ((g.float() - rf).norm() / rf.norm()).item()
        assert err < 2e-2, err


def test_skip_returns_zeros_and_the_same_gradients(seed, close):
    H, I, r = 16, 24, 2
    W, ads = _weights(H, I, r, (True, True, True))
    x = torch.randn(9, H, requires_grad=True)
    dy = torch.randn(9, H)
    leaves = [x] + ads
    with recomputing():
        y = tiled_gated_mlp(x, *W, *ads)  # skip=None reads the recompute marker
    assert torch.count_nonzero(y) == 0
    got = torch.autograd.grad(y, leaves, dy)
    ref = torch.autograd.grad(gated_mlp_reference(x, *W, *ads), leaves, dy)
    for i, (g, rf) in enumerate(zip(got, ref)):
        close(g, rf, 1e-5, 1e-6, f"grad {i}")
    assert not tm._STATE["recompute"]  # the marker is scoped


def test_bad_activation_is_refused():
    W, ads = _weights(8, 8, 2, (False, False, False))
    with pytest.raises(ValueError, match="allowed: silu, gelu_tanh"):
        tiled_gated_mlp(torch.randn(3, 8), *W, act="relu")


def test_mlp_ends_layer_reads_the_layer_source():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.mllama.modeling_mllama import (MllamaCrossAttentionDecoderLayer,
                                                            MllamaSelfAttentionDecoderLayer)
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer

    for cls in (Qwen2VLDecoderLayer, Qwen2_5_VLDecoderLayer, LlamaDecoderLayer, MllamaSelfAttentionDecoderLayer):
        assert mlp_ends_layer(cls), cls
    # Gemma 3 normalises the MLP output; Mllama's cross-attention layer gates it: their MLPs must run
    for cls in (Gemma3DecoderLayer, MllamaCrossAttentionDecoderLayer):
        assert not mlp_ends_layer(cls), cls


def _prepared(monkeypatch, lora_op=False):
    monkeypatch.setattr(tm, "TILE_ROWS", 5)  # 26 tokens -> 8 tiles
    model = _tiny_model()
    model.train()
    report = compiled.prepare_for_compile(model, lora_op=lora_op)
    assert len(report["tiled_mlp"]) == 2  # the two decoder layers' MLPs (the vision MLP is not gated)
    ends = [m for m in model.modules() if m.__dict__.get("_harness_mlp_ends_layer")]
    assert len(ends) == 2
    return model


@pytest.mark.parametrize("mode", ["false", "true", "unsloth", "unsloth+graphs", "unsloth+graphs+lora_op"])
def test_whole_model_gradients_with_tiled_mlp(monkeypatch, mode):
    """Tiny Qwen2-VL, tiled MLPs, each checkpointing path: loss and every LoRA gradient match the plain
    model; in every recompute the MLPs skipped their forward."""
    calls = {"skip": 0, "full": 0}
    real = compiled.tiled_gated_mlp

    def counting(*args, **kwargs):
        calls["skip" if args[-1] else "full"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(compiled, "tiled_gated_mlp", counting)
    ref_model = _tiny_model()
    ref_model.train()
    model = _prepared(monkeypatch, lora_op=mode.endswith("lora_op"))
    if mode.startswith("unsloth+graphs"):
        from ..test_layer_graphs import Replay

        enable_checkpointing(model, "unsloth", torch.device("cpu"), force=True, graphs=True)
        model.__dict__["_harness_offloader"].graphs._factory = Replay
    else:
        enable_checkpointing(model, mode, torch.device("cpu"), force=True)
    for seed in (31, 32, 33):  # with graphs: warm-up, capture, replay
        inputs = dict(_inputs(seed), use_cache=False)
        loss, grads = _loss_and_grads(model, inputs)
        loss_ref, grads_ref = _loss_and_grads(ref_model, inputs)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-7)
        assert grads.keys() == grads_ref.keys()
        for n in grads:
            err = ((grads[n] - grads_ref[n]).norm() / grads_ref[n].norm().clamp_min(1e-30)).item()
            assert err < 1e-5, (mode, n, err)
    if mode in ("false", "true"):  # torch's checkpoint recomputes exactly what the first forward ran
        assert calls["skip"] == 0 and calls["full"] > 0
    else:
        assert calls["skip"] > 0, calls  # the offloaded path's recompute skipped the MLP forward


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("op", [False, True])
def test_tiled_mlp_bf16_gpu_real_size(cuda, rel, act, op, monkeypatch):
    """Qwen2-VL-2B's MLP at 8,192 tokens in bf16: values and gradients within bf16 tolerance of the unfused
    module, and the backward's peak memory well under the unfused one's (eager here: the fp32 activation
    temporaries that the compiler fuses away are per tile, so 8 tiles of 1,024 rows)."""
    monkeypatch.setattr(tm, "TILE_ROWS", 1024)
    torch.manual_seed(0)
    N, H, I, r = 8192, 1536, 8960, 16
    W = [(torch.randn(I, H, device=cuda) / H**0.5).bfloat16(), (torch.randn(I, H, device=cuda) / H**0.5).bfloat16(),
         (torch.randn(H, I, device=cuda) / I**0.5).bfloat16()]
    ads = []
    for out_f, in_f in [(I, H), (I, H), (H, I)]:
        ads += [(torch.randn(r, in_f, device=cuda) / in_f**0.5).requires_grad_(True),
                (torch.randn(out_f, r, device=cuda) * 0.05).requires_grad_(True)]
    x = torch.randn(N, H, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(N, H, device=cuda, dtype=torch.bfloat16)

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res = fn()
        torch.cuda.synchronize()
        return res, torch.cuda.max_memory_allocated() - base

    got, m_tiled = peak(lambda: torch.autograd.grad(tiled_gated_mlp(x, *W, *ads, 2.0, 2.0, 2.0, act=act, op=op),
                                                    [x] + ads, dy))
    ref, m_ref = peak(lambda: torch.autograd.grad(gated_mlp_reference(x, *W, *ads, 2.0, 2.0, 2.0, act=act), [x] + ads, dy))
    x32 = x.detach().float().requires_grad_(True)
    ref32 = torch.autograd.grad(gated_mlp_reference(x32, *[w.float() for w in W], *ads, 2.0, 2.0, 2.0, act=act),
                                [x32] + ads, dy.float())
    for i, (g, r16, r32) in enumerate(zip(got, ref, ref32)):
        assert rel(g, r32) < 1e-2, (i, rel(g, r32), rel(r16, r32))
    assert m_tiled < 0.5 * m_ref, (m_tiled / 2**20, m_ref / 2**20)

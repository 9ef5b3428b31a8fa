import importlib

import pytest
import torch

from harness.kernels.rms_norm import RMSNormFunction, rms_norm, rms_norm_reference

# the module itself: `harness.kernels.rms_norm` as an attribute is the function of that name
rms_mod = importlib.import_module("harness.kernels.rms_norm")


def _inputs(shape, dtype, noncontig):
    if noncontig:  # a strided view: every other column of a wider tensor
        base = torch.randn(*shape[:-1], shape[-1] * 2, dtype=dtype)
        x = base[..., ::2]
        assert not x.is_contiguous()
    else:
        x = torch.randn(*shape, dtype=dtype)
    return x


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("shape,noncontig", [((13, 67), False), ((2, 5, 67), True), ((3, 1, 130), True)])
def test_rms_norm_fp32(seed, cpu_interp, close, offset, shape, noncontig):
    x = _inputs(shape, torch.float32, noncontig).requires_grad_(True)
    w = (torch.randn(shape[-1]) * 0.5 + (0.0 if offset else 1.0)).requires_grad_(True)
    dy = torch.randn(shape)
    y = RMSNormFunction.apply(x, w, 1e-6, offset)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    yr = rms_norm_reference(x, w, 1e-6, offset)
    dxr, dwr = torch.autograd.grad(yr, (x, w), dy)
    close(y, yr, 1e-5, 1e-5, "y")
    close(dx, dxr, 1e-5, 1e-5, "dx")
    close(dw, dwr, 1e-5, 1e-5, "dw")


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("n_rows", [1, 13, 600])
def test_rms_norm_frozen_weight_backward_is_dx_alone(seed, cpu_interp, close, monkeypatch, offset, n_rows):
    """LoRA training leaves the norm weights frozen: the backward must give the same dX, no dW, and never run
    the dW row sum."""
    calls = []
    real = rms_mod._sum_dw_partials
    monkeypatch.setattr(rms_mod, "_sum_dw_partials", lambda *a: calls.append(1) or real(*a))
    x = _inputs((n_rows, 67), torch.float32, True).requires_grad_(True)
    w = torch.randn(67) * 0.5 + (0.0 if offset else 1.0)  # frozen
    dy = torch.randn(n_rows, 67)
    (dx,) = torch.autograd.grad(RMSNormFunction.apply(x, w, 1e-6, offset), (x,), dy)
    (dxr,) = torch.autograd.grad(rms_norm_reference(x, w, 1e-6, offset), (x,), dy)
    close(dx, dxr, 1e-5, 1e-5, "dx")
    assert calls == []
    assert w.grad is None


@pytest.mark.parametrize("offset", [False, True])
def test_rms_norm_fp16(seed, cpu_interp, close, offset):
    x = _inputs((2, 7, 67), torch.float16, True).requires_grad_(True)
    w = (torch.randn(67) * 0.5 + 1.0).half().requires_grad_(True)
    dy = torch.randn(2, 7, 67).half()
    y = rms_norm(x, w, 1e-6, offset)
    assert y.dtype == torch.float16
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x32, w32 = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    yr = rms_norm_reference(x32, w32, 1e-6, offset)
    dxr, dwr = torch.autograd.grad(yr, (x32, w32), dy.float())
    close(y, yr, 1e-2, 1e-2, "y")
    close(dx, dxr, 1e-2, 1e-2, "dx")
    close(dw, dwr, 1e-2, 5e-2, "dw")


# (rows per tile, programs per SM, warps, stages, dW accumulator per row): the two defaults (narrow rows:
# pipelined, per-row dW; wide rows: plain loop, per-column dW), one-row tiles, other stage counts and
# accumulators, alone and together
BWD_CONFIGS = [
    (2, 2, 4, 3, True),
    (2, 2, 8, 1, False),
    (1, 2, 4, 1, True),
    (4, 2, 4, 2, True),
    (4, 2, 4, 1, False),
    (1, 4, 4, 2, False),
]


@pytest.mark.parametrize("config", BWD_CONFIGS, ids=lambda c: "bm{}-sm{}-w{}-st{}-rows{}".format(*c))
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("n_rows", [701, 64])
def test_rms_norm_backward_many_programs_ragged_tail(seed, cpu_interp, close, monkeypatch, n_rows, offset, config):
    # several programs, several row tiles each, a last tile cut short: dX rows and the dW partial sums,
    # for each backward launch config (67 columns pad to a 128-wide row)
    monkeypatch.setitem(rms_mod.BWD_CONFIG, 128, config)
    assert rms_mod._bwd_config(128) == config
    x = torch.randn(n_rows, 67, requires_grad=True)
    w = (torch.randn(67) * 0.5 + (0.0 if offset else 1.0)).requires_grad_(True)
    dy = torch.randn(n_rows, 67)
    dx, dw = torch.autograd.grad(RMSNormFunction.apply(x, w, 1e-6, offset), (x, w), dy)
    dxr, dwr = torch.autograd.grad(rms_norm_reference(x, w, 1e-6, offset), (x, w), dy)
    close(dx, dxr, 1e-5, 1e-5, "dx")
    close(dw, dwr, 1e-4, 1e-5, "dw")


def test_rms_norm_default_bwd_config():
    # the sweep's best on an H100 (2026-12-05) at hidden 1536 and 3584; wider rows: no shared-memory pipeline
    assert rms_mod._bwd_config(2048) == (2, 2, 4, 3, True)
    assert rms_mod._bwd_config(4096) == (2, 2, 8, 1, False)
    assert rms_mod._bwd_config(8192) == (2, 2, 16, 1, False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_prog,n_cols", [(150, 67), (64, 32), (3, 1536), (600, 40)])
@pytest.mark.parametrize("config", [None, (32, 64, 4), (8, 16, 2)], ids=["default", "bn32-bp64", "bn8-bp16"])
def test_dw_sum_kernel(seed, cpu_interp, close, monkeypatch, dtype, n_prog, n_cols, config):
    # short last column block; the default loads every row at once up to 512 (600: two trips, the second
    # short); the chunked configs walk the rows in several trips with a short last one
    monkeypatch.setattr(rms_mod, "DW_SUM_CONFIG", config)
    partial = torch.randn(n_prog, n_cols)
    dw = rms_mod._sum_dw_partials(partial, dtype)
    assert dw.dtype == dtype and dw.shape == (n_cols,)
    ref = partial.double().sum(0).float()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # fp16 / bf16: one rounding of the fp32 sum
    close(dw, ref, tol, tol, "dw sum")


def test_dw_sum_default_config():
    # every partial row in one load (the backward's 264 on an H100 -> 512), capped at 512 rows
    assert rms_mod._sum_config(264) == (16, 512, 4)
    assert rms_mod._sum_config(3) == (16, 4, 4)
    assert rms_mod._sum_config(5000) == (16, 512, 4)


def test_rms_norm_backward_dw_in_weight_dtype(seed, cpu_interp, close, monkeypatch):
    # fp16 weight: the dW kernel stores fp16 itself (autograd would cast an fp32 dW silently, so the
    # dtype is checked where the backward makes it), equal to the fp32 reference within fp16 rounding
    made = []

    def spy(partial, dtype):
        out = sum_dw(partial, dtype)
        made.append(out.dtype)
        return out

    sum_dw = rms_mod._sum_dw_partials
    monkeypatch.setattr(rms_mod, "_sum_dw_partials", spy)
    x = torch.randn(301, 67).half().requires_grad_(True)
    w = (torch.randn(67) * 0.5 + 1.0).half().requires_grad_(True)
    dy = torch.randn(301, 67).half()
    dx, dw = torch.autograd.grad(RMSNormFunction.apply(x, w, 1e-6, False), (x, w), dy)
    assert made == [torch.float16] and dw.dtype == torch.float16
    x32, w32 = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    dxr, dwr = torch.autograd.grad(rms_norm_reference(x32, w32, 1e-6, False), (x32, w32), dy.float())
    close(dx, dxr, 1e-2, 1e-2, "dx")
    close(dw, dwr, 1e-2, 1e-2, "dw")


def test_rms_norm_matches_hf_modules(cpu_interp, close):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    x = torch.randn(5, 67)
    q = Qwen2RMSNorm(67, eps=1e-6)
    g = Gemma3RMSNorm(67, eps=1e-6)
    with torch.no_grad():
        q.weight.normal_()
        g.weight.normal_()
    close(rms_norm(x, q.weight, 1e-6, False), q(x), 1e-5, 1e-5, "qwen2")
    close(rms_norm(x, g.weight, 1e-6, True), g(x), 1e-5, 1e-5, "gemma3")


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [1536, 3584])
@pytest.mark.parametrize("offset", [False, True])
def test_rms_norm_bf16_gpu(cuda, rel, hidden, offset):
    torch.manual_seed(hidden)
    x = torch.randn(4096, hidden, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(hidden, device=cuda) * 0.1 + 1).bfloat16().requires_grad_(True)
    dy = torch.randn(4096, hidden, device=cuda, dtype=torch.bfloat16)
    y = rms_norm(x, w, 1e-6, offset)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x32, w32 = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    yr = rms_norm_reference(x32, w32, 1e-6, offset)
    dxr, dwr = torch.autograd.grad(yr, (x32, w32), dy.float())
    assert rel(y, yr) < 1e-2 and rel(dx, dxr) < 1e-2 and rel(dw, dwr) < 1e-2
    (dx_frozen,) = torch.autograd.grad(rms_norm(x, w.detach(), 1e-6, offset), (x,), dy)  # the dX-only kernel
    assert rel(dx_frozen, dxr) < 1e-2

import pytest
import torch

from harness.kernels.lora_linear import (
    lora_linear,
    lora_linear_grouped,
    lora_linear_grouped_reference,
    lora_linear_reference,
)


def _grads(fn, x, A, B, dy):
    y = fn()
    return (y, *torch.autograd.grad(y, (x, A, B), dy))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_linear(seed, close, bias, adapter_dtype, dtype):
    N0, N1, K, M, r, s = 13, 3, 67, 45, 4, 2.0
    x = torch.randn(N1, N0, K, dtype=dtype).transpose(0, 1).requires_grad_(True)  # non-contiguous
    W = (torch.randn(M, K) / K**0.5).to(dtype)
    b = torch.randn(M).to(dtype) if bias else None
    adt = adapter_dtype or dtype
    A = (torch.randn(r, K) / K**0.5).to(adt).requires_grad_(True)
    B = torch.randn(M, r).to(adt).requires_grad_(True)
    dy = torch.randn(N0, N1, M, dtype=dtype)
    y, dx, dA, dB = _grads(lambda: lora_linear(x, W, b, A, B, s), x, A, B, dy)
    assert y.dtype == dtype and dA.dtype == adt and dB.dtype == adt
    # reference in float64
    x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    yr, dxr, dAr, dBr = _grads(
        lambda: lora_linear_reference(x64, W.double(), None if b is None else b.double(), A64, B64, s),
        x64, A64, B64, dy.double(),
    )
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, e, n in [(y, yr, "y"), (dx, dxr, "dx"), (dA, dAr, "dA"), (dB, dBr, "dB")]:
        close(a, e, tol, tol * 5 if dtype == torch.float16 else tol, n)


def test_lora_grouped(seed, close):
    K, r = 67, 4
    outs = [45, 21, 21]
    x = torch.randn(13, 2, K).transpose(0, 1).requires_grad_(True)
    Ws = [torch.randn(m, K) / K**0.5 for m in outs]
    bs = [torch.randn(outs[0]), None, torch.randn(outs[2])]
    As = [(torch.randn(r + i, K) / K**0.5).requires_grad_(True) for i in range(3)]  # different ranks
    Bs = [torch.randn(m, r + i).requires_grad_(True) for i, m in enumerate(outs)]
    scales = [2.0, 0.5, 1.0]
    dys = [torch.randn(2, 13, m) for m in outs]
    ys = lora_linear_grouped(x, Ws, bs, As, Bs, scales)
    g = torch.autograd.grad(ys, (x, *As, *Bs), dys)
    yr = lora_linear_grouped_reference(x, Ws, bs, As, Bs, scales)
    gr = torch.autograd.grad(yr, (x, *As, *Bs), dys)
    for a, e in zip(ys, yr):
        close(a, e, 1e-5, 1e-5, "y")
    for i, (a, e) in enumerate(zip(g, gr)):
        close(a, e, 1e-5, 1e-5, f"grad {i}")


@pytest.mark.parametrize("nested", [False, True])
def test_lora_nf4(seed, cpu_interp, close, nested):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    K, M, r, s = 64, 45, 4, 2.0
    W = torch.randn(M, K) / K**0.5
    packed, qs = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=nested, quant_type="nf4")
    Wdq = bnbf.dequantize_4bit(packed, qs, quant_type="nf4")
    x = torch.randn(2, 13, K).requires_grad_(True)
    A = (torch.randn(r, K) / 8).requires_grad_(True)
    B = torch.randn(M, r).requires_grad_(True)
    dy = torch.randn(2, 13, M)
    y, dx, dA, dB = _grads(lambda: lora_linear(x, None, None, A, B, s, nf4=(packed, qs)), x, A, B, dy)
    yr, dxr, dAr, dBr = _grads(lambda: lora_linear_reference(x, Wdq, None, A, B, s), x, A, B, dy)
    for a, e, n in [(y, yr, "y"), (dx, dxr, "dx"), (dA, dAr, "dA"), (dB, dBr, "dB")]:
        close(a, e, 1e-5, 1e-5, n)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [1536, 3584])
def test_lora_bf16_gpu(cuda, rel, hidden):
    torch.manual_seed(hidden)
    N, r, s = 4096, 16, 2.0
    x = torch.randn(N, hidden, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(hidden, hidden, device=cuda, dtype=torch.bfloat16) / hidden**0.5
    A = (torch.randn(r, hidden, device=cuda) / hidden**0.5).requires_grad_(True)  # fp32 adapters (PEFT default)
    B = (torch.randn(hidden, r, device=cuda) * 0.1).requires_grad_(True)
    dy = torch.randn(N, hidden, device=cuda, dtype=torch.bfloat16)
    y, dx, dA, dB = _grads(lambda: lora_linear(x, W, None, A, B, s), x, A, B, dy)
    x32 = x.detach().float().requires_grad_(True)
    yr, dxr, dAr, dBr = _grads(lambda: lora_linear_reference(x32, W.float(), None, A, B, s), x32, A, B, dy.float())
    for a, e in [(y, yr), (dx, dxr), (dA, dAr), (dB, dBr)]:
        assert rel(a, e) < 2e-2


def test_fp32_adapters_follow_in_place_optimizer_updates():
    """Adapters are re-read at every call: a fused/foreach optimizer step (which may not bump the version
    counter) must change the output. Guards against caching casts of the adapter weights."""
    from harness.kernels.lora_linear import lora_linear

    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float16)
    w = torch.randn(6, 8, dtype=torch.float16)
    a = torch.nn.Parameter(torch.randn(2, 8))
    b = torch.nn.Parameter(torch.randn(6, 2))
    y0 = lora_linear(x, w, None, a, b, 0.5).detach().clone()
    opt = torch.optim.AdamW([a, b], lr=0.5, foreach=True)
    lora_linear(x, w, None, a, b, 0.5).float().sum().backward()
    opt.step()
    y1 = lora_linear(x, w, None, a, b, 0.5)
    assert not torch.allclose(y0.float(), y1.float())

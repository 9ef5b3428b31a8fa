"""The LoRA linear as fused Triton GEMMs (kernels/lora_gemm.py) against PEFT's math in float64.

CPU: the Triton interpreter with 16-wide tiles, so the odd shapes below span several tiles with ragged edges
(masked K / N steps, wrapped row and column loads). GPU: bf16 at real shapes.
"""
import pytest
import torch

from harness.kernels.lora_gemm import base_gemm, base_gemm_dx, lora_gemm, lora_gemm_reference


def _inputs(T, K, N, r, dtype, adapter_dtype=None, bias=False, device="cpu"):
    adt = adapter_dtype or dtype
    x = torch.randn(3, T, K, dtype=dtype, device=device).transpose(0, 1).requires_grad_(True)  # non-contiguous
    W = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    A = (torch.randn(r, K, device=device) / K**0.5).to(adt).requires_grad_(True)
    B = torch.randn(N, r, device=device).to(adt).requires_grad_(True)
    dy = torch.randn(T, 3, N, dtype=dtype, device=device)
    return x, W, b, A, B, dy


def _run(fn, x, A, B, dy):
    y = fn()
    need = [t for t in (x, A, B) if t.requires_grad]
    return (y, *torch.autograd.grad(y, need, dy))


def _reference(x, W, b, A, B, dy, s):
    x64, A64, B64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, A, B))
    return _run(lambda: lora_gemm_reference(x64, W.double(), None if b is None else b.double(), A64, B64, s),
                x64, A64, B64, dy.double())


@pytest.mark.parametrize("shape", [(15, 67, 37, 4), (16, 128, 128, 16), (7, 33, 130, 20), (15, 72, 40, 4)],
                         ids=["odd-r4", "even-r16", "odd-r20", "aligned-ragged-r4"])
@pytest.mark.parametrize("bias,adapter_dtype", [(False, None), (True, torch.float32)],
                         ids=["plain", "bias-fp32-adapters"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", ["pointer", "tma"])
def test_lora_gemm_matches_reference(cpu_interp, seed, close, monkeypatch, path, shape, bias, adapter_dtype, dtype):
    """Both kernel families: pointer loads with wrapped edge rows, and the persistent TMA-descriptor kernels
    (3 programs walking all tiles; out-of-bounds tiles read as zeros)."""
    T, K, N, r = shape
    if path == "tma" and (K % 8 or N % 8):
        pytest.skip("TMA needs 16-byte aligned rows (the wrapper sends these shapes to the pointer kernels)")
    monkeypatch.setattr("harness.kernels.lora_gemm._tma_eligible", lambda *t: path == "tma")
    x, W, b, A, B, dy = _inputs(T, K, N, r, dtype, adapter_dtype, bias)
    s = 2.0
    got = _run(lambda: lora_gemm(x, W, b, A, B, s), x, A, B, dy)
    ref = _reference(x, W, b, A, B, dy, s)
    assert got[0].dtype == dtype and got[2].dtype == A.dtype and got[3].dtype == B.dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, e, name in zip(got, ref, ("y", "dx", "dA", "dB")):
        close(a, e, tol, tol * 5 if dtype == torch.float16 else tol, name)


def test_lora_gemm_without_input_grad(cpu_interp, seed, close):
    """A frozen input (the first layer's) has no dx GEMM to ride on: dA and dB still come out right."""
    x, W, b, A, B, dy = _inputs(9, 40, 24, 8, torch.float32)
    x = x.detach()
    got = _run(lambda: lora_gemm(x, W, None, A, B, 0.5), x, A, B, dy)
    ref = _reference(x, W, None, A, B, dy, 0.5)
    for a, e, name in zip(got, ref, ("y", "dA", "dB")):
        close(a, e, 1e-5, 1e-5, name)


def test_lora_gemm_frozen_adapter_b(cpu_interp, seed, close):
    """Gradients only where asked: B frozen gives dA and dx alone (and the dB sum is skipped)."""
    x, W, b, A, B, dy = _inputs(11, 48, 40, 16, torch.float32)
    B.requires_grad_(False)
    got = _run(lambda: lora_gemm(x, W, None, A, B, 1.0), x, A, B, dy)
    ref = _reference(x, W, None, A, B, dy, 1.0)
    assert len(got) == 3
    for a, e, name in zip(got, ref, ("y", "dx", "dA")):
        close(a, e, 1e-5, 1e-5, name)


@pytest.mark.parametrize("tma", [False, True])
def test_base_gemms_match_torch(cpu_interp, seed, close, tma):
    x = torch.randn(21, 72)  # ragged against the 16-wide tiles, 16-byte aligned rows for TMA
    W = torch.randn(40, 72)
    dy = torch.randn(21, 40)
    close(base_gemm(x, W, tma=tma), x @ W.t(), 1e-5, 1e-5, "x W^T")
    close(base_gemm_dx(dy, W, tma=tma), dy @ W, 1e-5, 1e-5, "dy W")


def test_lora_gemm_cpu_without_interpreter_runs_reference(monkeypatch, seed, close):
    """Where Triton cannot run, the call is the cuBLAS/ATen path of lora_linear (same numbers)."""
    monkeypatch.setattr("harness.kernels.lora_gemm.use_triton", lambda *t: False)
    x, W, b, A, B, dy = _inputs(5, 12, 10, 4, torch.float32, bias=True)
    got = _run(lambda: lora_gemm(x, W, b, A, B, 2.0), x, A, B, dy)
    ref = _reference(x, W, b, A, B, dy, 2.0)
    for a, e, name in zip(got, ref, ("y", "dx", "dA", "dB")):
        close(a, e, 1e-5, 1e-5, name)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden,out", [(1536, 1536), (3584, 3584), (3584, 18944), (1000, 333)])
def test_lora_gemm_bf16_gpu(cuda, rel, hidden, out):
    torch.manual_seed(0)
    x, W, b, A, B, dy = _inputs(1365, hidden, out, 16, torch.bfloat16, device="cuda")
    got = _run(lambda: lora_gemm(x, W, None, A, B, 2.0), x, A, B, dy)
    ref = _reference(x, W, None, A, B, dy, 2.0)
    for a, e, name in zip(got, ref, ("y", "dx", "dA", "dB")):
        assert rel(a, e) < 1e-2, f"{name}: rel err {rel(a, e):.2e}"
    # the atomic sums are fresh on every call (not accumulated across calls, not doubled by the autotuner)
    again = _run(lambda: lora_gemm(x, W, None, A, B, 2.0), x, A, B, dy)
    for a, e, name in zip(again[2:], ref[2:], ("dA", "dB")):
        assert rel(a, e) < 1e-2, f"{name} (second call): rel err {rel(a, e):.2e}"

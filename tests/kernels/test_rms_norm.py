import pytest
import torch

from harness.kernels.rms_norm import RMSNormFunction, rms_norm, rms_norm_reference


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


@pytest.mark.parametrize("n_rows", [701, 64])
def test_rms_norm_backward_many_programs_ragged_tail(seed, cpu_interp, close, n_rows):
    # several programs, several row tiles each, a last tile cut short: dX rows and the dW partial sums
    x = torch.randn(n_rows, 67, requires_grad=True)
    w = (torch.randn(67) * 0.5 + 1.0).requires_grad_(True)
    dy = torch.randn(n_rows, 67)
    dx, dw = torch.autograd.grad(RMSNormFunction.apply(x, w, 1e-6, False), (x, w), dy)
    dxr, dwr = torch.autograd.grad(rms_norm_reference(x, w, 1e-6, False), (x, w), dy)
    close(dx, dxr, 1e-5, 1e-5, "dx")
    close(dw, dwr, 1e-4, 1e-5, "dw")


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

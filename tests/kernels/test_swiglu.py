import pytest
import torch

from harness.kernels.swiglu import GatedActFunction, gated_act, gated_act_reference


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape,noncontig", [((13, 67), False), ((3, 5, 67), True)])
def test_gated_fp32(seed, cpu_interp, close, act, shape, noncontig):
    if noncontig:  # gate/up as the two halves of one fused projection output
        gu = torch.randn(*shape[:-1], 2 * shape[-1]) * 3
        g, u = gu[..., : shape[-1]], gu[..., shape[-1]:]
        g, u = g.detach().requires_grad_(True), u.detach().requires_grad_(True)
        assert not g.is_contiguous()
    else:
        g = (torch.randn(shape) * 3).requires_grad_(True)
        u = torch.randn(shape).requires_grad_(True)
    dh = torch.randn(shape)
    h = GatedActFunction.apply(g, u, act)
    dg, du = torch.autograd.grad(h, (g, u), dh)
    g64, u64 = g.detach().double().requires_grad_(True), u.detach().double().requires_grad_(True)
    hr = gated_act_reference(g64, u64, act)  # float64 reference
    dgr, dur = torch.autograd.grad(hr, (g64, u64), dh.double())
    close(h, hr, 1e-5, 1e-5, "h")
    close(dg, dgr, 1e-5, 1e-5, "dg")
    close(du, dur, 1e-5, 1e-5, "du")


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_fp16(seed, cpu_interp, close, act):
    g = (torch.randn(7, 67) * 3).half().requires_grad_(True)
    u = torch.randn(7, 67).half().requires_grad_(True)
    dh = torch.randn(7, 67).half()
    h = gated_act(g, u, act)
    assert h.dtype == torch.float16
    dg, du = torch.autograd.grad(h, (g, u), dh)
    g32, u32 = g.detach().float().requires_grad_(True), u.detach().float().requires_grad_(True)
    hr = gated_act_reference(g32, u32, act)
    dgr, dur = torch.autograd.grad(hr, (g32, u32), dh.float())
    close(h, hr, 1e-2, 1e-2, "h")
    close(dg, dgr, 1e-2, 1e-2, "dg")
    close(du, dur, 1e-2, 1e-2, "du")


@pytest.mark.gpu
@pytest.mark.parametrize("inter", [8960, 18944])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_bf16_gpu(cuda, rel, inter, act):
    torch.manual_seed(inter)
    g = torch.randn(2048, inter, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn(2048, inter, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    dh = torch.randn_like(g)
    h = gated_act(g, u, act)
    dg, du = torch.autograd.grad(h, (g, u), dh)
    g32, u32 = g.detach().float().requires_grad_(True), u.detach().float().requires_grad_(True)
    hr = gated_act_reference(g32, u32, act)
    dgr, dur = torch.autograd.grad(hr, (g32, u32), dh.float())
    assert rel(h, hr) < 1e-2 and rel(dg, dgr) < 1e-2 and rel(du, dur) < 1e-2

"""harness::lora_mm (kernels/lora_op.py): the compiled layers' LoRA linear as an opaque op, against PEFT's math,
eager and through torch.compile, forward and backward, odd shapes, with and without bias."""

import importlib

import pytest
import torch

from harness.kernels.lora_linear import lora_linear_reference
from harness.kernels.lora_op import lowrank_addmm


def _case(n, k, m, r, bias, seed, transposed_x=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, n, generator=g).t() if transposed_x else torch.randn(n, k, generator=g)  # any strides
    w = torch.randn(m, k, generator=g) / k ** 0.5
    b = torch.randn(m, generator=g) if bias else None
    A = torch.randn(r, k, generator=g) / k ** 0.5
    B = torch.randn(m, r, generator=g)
    dy = torch.randn(n, m, generator=g)
    return x, w, b, A, B, dy


def _grads(fn, x, w, b, A, B, dy, s, train_bias):
    x, A, B = (t.detach().clone().requires_grad_(True) for t in (x, A, B))
    if b is not None:
        b = b.detach().clone().requires_grad_(train_bias)
    y = fn(x, w, b, A, B, s)
    wanted = [x, A, B] + ([b] if b is not None and train_bias else [])
    return [y.detach(), *torch.autograd.grad(y, wanted, dy)]


def _ours(x, w, b, A, B, s):
    return lowrank_addmm(x, w, A, B, s, b)


def _ref(x, w, b, A, B, s):
    return lora_linear_reference(x, w, b, A, B, s)


@pytest.fixture(params=["cublas", "auto"])
def lora_paths(request, monkeypatch):
    """The op's kernel paths: cuBLAS, and (in the interpreter on CPU) the Triton epilogue GEMMs + fused dy pass."""
    mod = importlib.import_module("harness.kernels.lora_linear")
    monkeypatch.setattr(mod, "PATHS", dict.fromkeys(("fwd", "dx", "dy"), request.param))
    return request.param


@pytest.mark.parametrize("n,k,m,r", [(37, 19, 23, 3), (64, 48, 80, 16), (5, 130, 7, 8)])
@pytest.mark.parametrize("bias,train_bias", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("transposed_x", [False, True])
def test_lora_mm_matches_peft_math(n, k, m, r, bias, train_bias, transposed_x, lora_paths):
    x, w, b, A, B, dy = _case(n, k, m, r, bias, seed=n + k + m + r, transposed_x=transposed_x)
    got = _grads(_ours, x, w, b, A, B, dy, 0.37, train_bias)
    ref = _grads(_ref, x, w, b, A, B, dy, 0.37, train_bias)
    names = ["y", "dx", "dA", "dB", "db"]
    for name, g, e in zip(names, got, ref):
        # fp32: 1e-5 of the result's scale (sums of up to 130 products; the summation order differs)
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()),
                                   msg=lambda msg: f"{name}: {msg}")


def test_lora_mm_fp16_and_frozen_input():
    x, w, b, A, B, dy = (t.half() if t is not None else None for t in _case(33, 40, 24, 4, True, seed=3))
    A_, B_ = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    y = lowrank_addmm(x, w, A_, B_, 2.0, b)  # x needs no gradient: dx is not computed
    dA, dB = torch.autograd.grad(y, (A_, B_), dy)
    A2, B2 = A.float().requires_grad_(True), B.float().requires_grad_(True)
    y2 = lora_linear_reference(x.float(), w.float(), b.float(), A2, B2, 2.0)
    dA2, dB2 = torch.autograd.grad(y2, (A2, B2), dy.float())
    for g, e in ((y, y2), (dA, dA2), (dB, dB2)):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g.float(), e, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_lora_mm_compiled_matches_eager(backend, lora_paths):
    torch._dynamo.reset()
    x, w, b, A, B, dy = _case(29, 24, 40, 8, True, seed=7)

    def f(x, w, b, A, B):
        # the compiled layers' pattern: adapters cast in the graph, the op, a neighbour to fuse with
        return torch.relu(lowrank_addmm(x, w, A.to(x.dtype), B.to(x.dtype), 0.5, b)) * 2

    want = _grads(lambda x, w, b, A, B, s: f(x, w, b, A, B), x, w, b, A, B, dy, 0.5, True)
    got = _grads(lambda x, w, b, A, B, s: torch.compile(f, backend=backend, fullgraph=True)(x, w, b, A, B),
                 x, w, b, A, B, dy, 0.5, True)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_lora_mm_is_opaque_to_the_compiler():
    # the point of the op: the traced graph holds harness::lora_mm (whose in-place add the compiler cannot
    # turn into an out-of-place addmm plus a copy), and its backward harness::lora_mm_backward
    torch._dynamo.reset()
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, _inputs):
        graphs.append(str(gm.code))
        return gm

    x, w, b, A, B, _ = _case(16, 8, 12, 4, False, seed=1)
    A.requires_grad_(True)
    fn = torch.compile(lambda x, w, A, B: lowrank_addmm(x, w, A, B, 0.5),
                       backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    fn(x, w, A, B).sum().backward()
    fw, bw = graphs
    assert "harness.lora_mm" in fw and "aten.addmm" not in fw
    assert "harness.lora_mm_backward" in bw and "aten.addmm" not in bw


@pytest.mark.gpu
@pytest.mark.parametrize("hidden,out", [(1536, 8960), (3584, 512), (8960, 1536)])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("da_stream", [False, True])
def test_lora_mm_bf16_gpu(cuda, rel, monkeypatch, hidden, out, compiled, lora_paths, da_stream):
    """Real shapes (Qwen2-VL-2B MLP up, Qwen2-VL-7B k_proj), bf16 with bf16 adapters as the compiled layers cast
    them, against the fp32 reference: relative error within bf16 rounding; with dA on the side stream too."""
    monkeypatch.setattr(importlib.import_module("harness.kernels.lora_op"), "OP_DA_STREAM", da_stream)
    torch._dynamo.reset()
    g = torch.Generator(device=cuda).manual_seed(hidden + out)
    N, r, s = 4096, 16, 2.0
    x = torch.randn(N, hidden, device=cuda, generator=g)
    w = torch.randn(out, hidden, device=cuda, generator=g) / hidden ** 0.5
    b = torch.randn(out, device=cuda, generator=g) if out == 512 else None  # k_proj has a bias
    A = torch.randn(r, hidden, device=cuda, generator=g) / hidden ** 0.5
    B = torch.randn(out, r, device=cuda, generator=g) * 0.1
    dy = torch.randn(N, out, device=cuda, generator=g)
    fn = torch.compile(_ours, backend="inductor", fullgraph=True) if compiled else _ours
    bf = [t.bfloat16() if t is not None else None for t in (x, w, b, A, B, dy)]
    got = _grads(fn, *bf, s, False)
    want = _grads(_ref, x, w, b, A, B, dy, s, False)
    for name, a, e in zip(("y", "dx", "dA", "dB"), got, want):
        assert a.dtype == torch.bfloat16, name
        assert rel(a, e) < 1e-2, f"{name}: relative error {rel(a, e):.2e}"

import importlib

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


def _assert_matches_float64(close, got, x, W, b, A, B, dy, s, dtype):
    """(y, dx, dA, dB) against PEFT's math in float64; fp32 to 1e-5, fp16 to 1e-2 (of the result's scale)."""
    x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    ref = _grads(lambda: lora_linear_reference(x64, W.double(), None if b is None else b.double(), A64, B64, s),
                 x64, A64, B64, dy.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, e, n in zip(got, ref, ("y", "dx", "dA", "dB")):
        close(a, e, tol, tol * 5 if dtype == torch.float16 else tol, n)


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
    _assert_matches_float64(close, (y, dx, dA, dB), x, W, b, A, B, dy, s, dtype)


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


# ------------------------------------------------------------------ the Triton paths (epilogue GEMMs, fused dy pass)

_PATH_SETS = [("epilogue", "epilogue", "fused"), ("cublas", "cublas", "cublas"), ("epilogue", "cublas", "cublas"),
              ("cublas", "epilogue", "fused")]


@pytest.mark.parametrize("paths", _PATH_SETS, ids=["-".join(p) for p in _PATH_SETS])
@pytest.mark.parametrize("shape", [(39, 67, 45, 4), (33, 40, 72, 16)], ids=["odd-r4", "wide-r16"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_linear_paths(cpu_interp, seed, close, monkeypatch, paths, shape, bias, dtype):
    """Every forward / dx / dy kernel choice computes PEFT's LoRA linear (float64 reference), odd shapes included,
    with x non-contiguous and fp32 adapters."""
    mod = importlib.import_module("harness.kernels.lora_linear")  # (the package attribute is the function)

    for key, value in zip(("fwd", "dx", "dy"), paths):
        monkeypatch.setitem(mod.PATHS, key, value)
    T, K, N, r = shape
    s = 0.5
    x = torch.randn(3, T, K, dtype=dtype).transpose(0, 1).requires_grad_(True)
    W = (torch.randn(N, K) / K**0.5).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    A = (torch.randn(r, K) / K**0.5).requires_grad_(True)
    B = torch.randn(N, r).requires_grad_(True)
    dy = torch.randn(T, 3, N, dtype=dtype)
    y, dx, dA, dB = _grads(lambda: lora_linear(x, W, b, A, B, s), x, A, B, dy)
    _assert_matches_float64(close, (y, dx, dA, dB), x, W, b, A, B, dy, s, dtype)


@pytest.mark.parametrize("paths", _PATH_SETS, ids=["-".join(p) for p in _PATH_SETS])
@pytest.mark.parametrize("rank_grads", ["cublas", "splitk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_grouped_paths(cpu_interp, seed, close, monkeypatch, paths, rank_grads, dtype):
    """The grouped form (q/k/v, gate/up) through every kernel path: each projection's y, and dx, dA, dB of all,
    against PEFT's math per projection (float64); different ranks and widths, a bias on one, x non-contiguous,
    fp32 adapters; dx's first GEMM adds every projection's rank-r term. Each path set runs its own kernels: one
    forward epilogue GEMM and one fused dy pass per projection, one dx epilogue GEMM for all."""
    mod = importlib.import_module("harness.kernels.lora_linear")
    gemm = importlib.import_module("harness.kernels.lora_gemm")
    monkeypatch.setattr(mod, "RANK_GRADS", rank_grads)
    for key, value in zip(("fwd", "dx", "dy"), paths):
        monkeypatch.setitem(mod.PATHS, key, value)
    calls = {"fwd": 0, "dx": 0, "dy": 0}

    def counting(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(gemm, "gemm_rank_epilogue", counting("fwd", gemm.gemm_rank_epilogue))
    monkeypatch.setattr(gemm, "gemm_dx_rank_epilogue", counting("dx", gemm.gemm_dx_rank_epilogue))
    monkeypatch.setattr(mod, "_dy_pass", counting("dy", mod._dy_pass))
    T, K = 41, 40
    outs, ranks, scales = [48, 24, 17], [16, 4, 5], [0.5, 2.0, 1.0]
    x = torch.randn(2, T, K, dtype=dtype).transpose(0, 1).requires_grad_(True)
    Ws = [(torch.randn(m, K) / K**0.5).to(dtype) for m in outs]
    bs = [None, torch.randn(outs[1]).to(dtype), None]
    As = [(torch.randn(r, K) / K**0.5).requires_grad_(True) for r in ranks]
    Bs = [(torch.randn(m, r) * 0.5).requires_grad_(True) for m, r in zip(outs, ranks)]
    dys = [torch.randn(T, 2, m, dtype=dtype) for m in outs]
    ys = lora_linear_grouped(x, Ws, bs, As, Bs, scales)
    got = torch.autograd.grad(ys, (x, *As, *Bs), dys)
    x64 = x.detach().double().requires_grad_(True)
    A64 = [a.detach().double().requires_grad_(True) for a in As]
    B64 = [b.detach().double().requires_grad_(True) for b in Bs]
    ref_y = [lora_linear_reference(x64, w.double(), None if b is None else b.double(), a, bb, sc)
             for w, b, a, bb, sc in zip(Ws, bs, A64, B64, scales)]
    ref = torch.autograd.grad(ref_y, (x64, *A64, *B64), [d.double() for d in dys])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    rtol = tol * 5 if dtype == torch.float16 else tol
    for i, (a, e) in enumerate(zip(ys, ref_y)):
        assert a.dtype == dtype
        close(a, e, tol, rtol, f"y{i}")
    names = ["dx"] + [f"dA{i}" for i in range(3)] + [f"dB{i}" for i in range(3)]
    for a, e, n in zip(got, ref, names):
        assert n == "dx" or a.dtype == torch.float32
        close(a, e, tol, rtol, n)
    fwd, dx, dyp = paths
    assert calls == {"fwd": 3 * (fwd == "epilogue"), "dx": int(dx == "epilogue"), "dy": 3 * (dyp == "fused")}


@pytest.mark.parametrize("rank_grads", ["cublas", "splitk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rank_grads_either_way(cpu_interp, seed, close, monkeypatch, rank_grads, dtype):
    """dA and dB outside the fused dy pass, by one GEMM each or by the split-K kernel, in the adapters' dtype: both
    PEFT's math (float64 reference), odd shape, fp32 adapters."""
    mod = importlib.import_module("harness.kernels.lora_linear")
    monkeypatch.setattr(mod, "RANK_GRADS", rank_grads)
    monkeypatch.setattr(mod, "PATHS", dict.fromkeys(("fwd", "dx", "dy"), "cublas"))
    T, K, N, r = 53, 37, 29, 5
    x = torch.randn(T, K, dtype=dtype).requires_grad_(True)
    W = (torch.randn(N, K) / K**0.5).to(dtype)
    A = (torch.randn(r, K) / K**0.5).requires_grad_(True)
    B = torch.randn(N, r).requires_grad_(True)
    dy = torch.randn(T, N, dtype=dtype)
    y, dx, dA, dB = _grads(lambda: lora_linear(x, W, None, A, B, 0.75), x, A, B, dy)
    assert dA.dtype == dB.dtype == torch.float32 and dB.is_contiguous()
    _assert_matches_float64(close, (y, dx, dA, dB), x, W, None, A, B, dy, 0.75, dtype)


def test_auto_paths_pick_epilogue_where_it_spares_the_larger_tensor_or_fills_the_gpu(monkeypatch):
    """auto: the forward epilogue GEMM for N >= K (it spares an [M, N] write + read), the dx epilogue GEMM for
    K >= N, either where its output is at least two waves of 128 x 256 tiles; the fused dy pass beside the split-K
    dB always, beside two cuBLAS GEMMs only for dy of 2^26 elements or more (lora_linear, grouped and lora_op
    alike); plain cuBLAS everywhere when Triton cannot run. (The measurements these rules follow: docs/kernels.md
    runs 7, 9 and 11.)"""
    mod = importlib.import_module("harness.kernels.lora_linear")
    monkeypatch.setattr(mod, "PATHS", {"fwd": "auto", "dx": "auto", "dy": "auto"})
    _paths = mod._paths

    monkeypatch.setattr(mod, "RANK_GRADS", "splitk")  # beside cuBLAS g + the split-K dB: the fused dy pass always
    assert _paths(2048, 8960, 1536, True, 132) == ("epilogue", "cublas", "fused")  # tiled MLP up: dx 96 tiles
    assert _paths(2048, 1536, 8960, True, 132) == ("cublas", "epilogue", "fused")  # tiled MLP down: y 96 tiles
    assert _paths(8192, 18944, 3584, True, 132) == ("epilogue", "epilogue", "fused")  # 896-tile dx: fills
    assert _paths(8192, 3584, 18944, True, 132) == ("epilogue", "epilogue", "fused")
    assert _paths(4096, 1280, 5120, True, 132) == ("cublas", "epilogue", "fused")  # 160 tiles: not two waves
    assert _paths(8192, 1536, 1536, True, 132) == ("epilogue", "epilogue", "fused")  # square q / o
    assert _paths(8192, 1536, 1536, False, 132) == ("cublas", "cublas", "cublas")
    # with RANK_GRADS "cublas" (the default): only a large dy goes fused
    monkeypatch.setattr(mod, "RANK_GRADS", "cublas")
    assert mod.DY_FUSED_MIN_ELEMENTS == 1 << 26
    assert _paths(8192, 18944, 3584, True, 132)[2] == "fused"  # MLP up: dy of 155 M elements
    assert _paths(8192, 3584, 18944, True, 132)[2] == "cublas"  # MLP down: 29 M
    assert _paths(8192, 1536, 1536, True, 132) == ("epilogue", "epilogue", "cublas")  # square q / o, 8,192 rows
    assert _paths(4096, 1536, 1536, True, 132) == ("epilogue", "epilogue", "cublas")  # anchor q/o
    assert _paths(2048, 8960, 1536, True, 132) == ("epilogue", "cublas", "cublas")
    monkeypatch.setattr(mod, "DY_FUSED_MIN_ELEMENTS", 0)  # the threshold is read at each call
    assert _paths(4096, 1536, 1536, True, 132)[2] == "fused"
    monkeypatch.setattr(mod, "DY_FUSED_MIN_ELEMENTS", 1 << 26)
    op = importlib.import_module("harness.kernels.lora_op")
    monkeypatch.setattr(op, "_triton_ok", lambda x, w: True)
    assert op._op_paths(torch.empty(4096, 1536), torch.empty(1536, 1536))[2] == "cublas"  # the op's threshold
    monkeypatch.setitem(mod.PATHS, "dy", "fused")  # an explicit choice is kept
    assert _paths(2048, 8960, 1536, True, 132)[2] == "fused"


@pytest.mark.parametrize("M,N,r", [(37, 50, 4), (64, 33, 16), (5, 130, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dy_pass_matches_torch(cpu_interp, seed, close, M, N, r, dtype):
    """g = dy B and dB = dy^T xa from one read of dy: several row blocks and column groups (partials summed),
    ragged edges, rank padded to 16 / 32, dy non-contiguous."""
    from harness.kernels.lora_linear import _dy_pass

    dy = torch.randn(N, M, dtype=dtype).t()  # non-contiguous [M, N]
    B = torch.randn(N, r, dtype=dtype)
    xa = torch.randn(M, r, dtype=dtype)
    g, db = _dy_pass(dy, B, xa)
    assert g.dtype == db.dtype == torch.float32 and g.shape == (M, r) and db.shape == (N, r)
    assert g.is_contiguous() and db.is_contiguous()  # rank padding sliced off, not left as a strided view
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    close(g, dy.double() @ B.double(), tol, tol, "g")
    close(db, dy.double().t() @ xa.double(), tol, tol, "dB")
    # the backward's call: both scaled, g in the activation dtype, dB in the adapter's (fp32 here)
    gs, dbs = _dy_pass(dy, B, xa, 0.375, dtype, torch.float32)
    assert gs.dtype == dtype and dbs.dtype == torch.float32 and gs.is_contiguous() and dbs.is_contiguous()
    close(gs, 0.375 * dy.double() @ B.double(), tol, tol, "s g")
    close(dbs, 0.375 * dy.double().t() @ xa.double(), tol, tol, "s dB")


@pytest.mark.parametrize("parts,rows,cols,prow,pcol", [(1, 5, 3, 5, 3), (7, 37, 20, 40, 32), (3, 16, 300, 16, 300)])
@pytest.mark.parametrize("t", [False, True], ids=["plain", "transposed"])
def test_sum_parts(cpu_interp, seed, close, parts, rows, cols, prow, pcol, t):
    """The partial-sum finisher of the split reductions: the parts' top-left [rows, cols] summed, scaled, cast once,
    optionally written transposed (contiguous), padding never read into the result."""
    from harness.kernels.lora_linear import _sum_parts

    p = torch.randn(parts, prow, pcol)
    out = _sum_parts(p, -1.5, torch.float16, rows, cols, t=t)
    ref = -1.5 * p.double().sum(0)[:rows, :cols]
    ref = ref.t() if t else ref
    assert out.dtype == torch.float16 and out.shape == ref.shape and out.is_contiguous()
    close(out, ref, 2e-3, 2e-3, "sum")
    assert torch.equal(out, _sum_parts(p, -1.5, torch.float16, rows, cols, t=t))  # fixed order: bitwise repeatable


@pytest.mark.parametrize("N,r,K", [(97, 4, 45), (300, 16, 130), (64, 20, 33)])
@pytest.mark.parametrize("t", [False, True], ids=["plain", "transposed"])
def test_skinny_tn_split_k(cpu_interp, seed, close, N, r, K, t):
    """alpha g^T x for tall g (LoRA's dA / dB): split over the token dim into fp32 partials (several splits at these
    sizes), rank padded to 16 / 32, optionally transposed; bitwise repeatable (no atomics)."""
    from harness.kernels.lora_linear import _skinny_tn

    g, x = torch.randn(N, r), torch.randn(N, K)
    out = _skinny_tn(g, x, 0.5, torch.float32, t=t)
    ref = 0.5 * g.double().t() @ x.double()
    ref = ref.t() if t else ref
    assert out.shape == ref.shape and out.is_contiguous()
    close(out, ref, 1e-5, 1e-5, "g^T x")
    assert torch.equal(out, _skinny_tn(g, x, 0.5, torch.float32, t=t))


@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
@pytest.mark.parametrize("shape", [(37, 67, 45, 4), (40, 72, 48, 16)], ids=["odd-r4", "aligned-r16"])
@pytest.mark.parametrize("bias", [False, True])
def test_rank_epilogue_gemms(cpu_interp, seed, close, tma, shape, bias):
    """The plain Triton GEMMs with the rank-r product in the epilogue: y = x W^T + b + s xa B^T and
    dx = dy W + gs A, both kernel families (TMA in the interpreter needs 16-byte aligned rows: the aligned shape)."""
    from harness.kernels.lora_gemm import gemm_dx_rank_epilogue, gemm_rank_epilogue

    M, K, N, r = shape
    if tma and (K % 8 or N % 8):
        pytest.skip("TMA descriptors need 16-byte aligned rows")
    x, W = torch.randn(M, K), torch.randn(N, K) / K**0.5
    xa, B = torch.randn(M, r), torch.randn(N, r)
    b = torch.randn(N) if bias else None
    y = gemm_rank_epilogue(x, W, xa, B, b, 0.25, tma=tma)
    ref = x.double() @ W.double().t() + 0.25 * xa.double() @ B.double().t() + (0 if b is None else b.double())
    close(y, ref, 1e-5, 1e-5, "y")
    dy, gs, A = torch.randn(M, N), torch.randn(M, r), torch.randn(r, K)
    dx = gemm_dx_rank_epilogue(dy, W, gs, A, tma=tma)
    close(dx, dy.double() @ W.double() + gs.double() @ A.double(), 1e-5, 1e-5, "dx")


@pytest.mark.gpu
@pytest.mark.parametrize("paths", _PATH_SETS[:2], ids=["-".join(p) for p in _PATH_SETS[:2]])
@pytest.mark.parametrize("K,N", [(1536, 1536), (3584, 18944), (18944, 3584), (1000, 333)])
def test_lora_paths_bf16_gpu(cuda, rel, monkeypatch, paths, K, N):
    """bf16 at real shapes (and a ragged one) through the Triton epilogue GEMMs + fused dy pass and through cuBLAS:
    relative error of y, dx, dA, dB under 2e-2 against fp32; a second call gives the same (fresh partial sums)."""
    mod = importlib.import_module("harness.kernels.lora_linear")  # (the package attribute is the function)

    for key, value in zip(("fwd", "dx", "dy"), paths):
        monkeypatch.setitem(mod.PATHS, key, value)
    torch.manual_seed(K + N)
    T, r, s = 4096, 16, 2.0
    x = torch.randn(T, K, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(N, K, device=cuda, dtype=torch.bfloat16) / K**0.5
    A = (torch.randn(r, K, device=cuda) / K**0.5).requires_grad_(True)
    B = (torch.randn(N, r, device=cuda) * 0.1).requires_grad_(True)
    dy = torch.randn(T, N, device=cuda, dtype=torch.bfloat16)
    out = _grads(lambda: lora_linear(x, W, None, A, B, s), x, A, B, dy)
    again = _grads(lambda: lora_linear(x, W, None, A, B, s), x, A, B, dy)
    x32 = x.detach().float().requires_grad_(True)
    ref = _grads(lambda: lora_linear_reference(x32, W.float(), None, A, B, s), x32, A, B, dy.float())
    for a, b2, e in zip(out, again, ref):
        assert rel(a, e) < 2e-2
        assert torch.equal(a, b2)


@pytest.mark.gpu
@pytest.mark.parametrize("paths", _PATH_SETS[:2], ids=["-".join(p) for p in _PATH_SETS[:2]])
def test_lora_grouped_bf16_gpu(cuda, rel, monkeypatch, paths):
    """Grouped gate/up at a real MLP shape (4096 tokens, 1536 -> 2 x 8960) in bf16, both path sets: y, dx, dA, dB
    within 2e-2 of fp32, and a second call gives the same."""
    mod = importlib.import_module("harness.kernels.lora_linear")
    for key, value in zip(("fwd", "dx", "dy"), paths):
        monkeypatch.setitem(mod.PATHS, key, value)
    torch.manual_seed(0)
    T, K, N, r = 4096, 1536, 8960, 16
    x = torch.randn(T, K, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    Ws = [torch.randn(N, K, device=cuda, dtype=torch.bfloat16) / K**0.5 for _ in range(2)]
    As = [(torch.randn(r, K, device=cuda) / K**0.5).requires_grad_(True) for _ in range(2)]
    Bs = [(torch.randn(N, r, device=cuda) * 0.1).requires_grad_(True) for _ in range(2)]
    dys = [torch.randn(T, N, device=cuda, dtype=torch.bfloat16) for _ in range(2)]

    def run():
        ys = lora_linear_grouped(x, Ws, [None, None], As, Bs, [2.0, 2.0])
        return (*ys, *torch.autograd.grad(ys, (x, *As, *Bs), dys))

    out, again = run(), run()
    x32 = x.detach().float().requires_grad_(True)
    ys = [lora_linear_reference(x32, w.float(), None, a, b, 2.0) for w, a, b in zip(Ws, As, Bs)]
    ref = (*ys, *torch.autograd.grad(ys, (x32, *As, *Bs), [d.float() for d in dys]))
    for a, b2, e in zip(out, again, ref):
        assert rel(a, e) < 2e-2
        assert torch.equal(a, b2)


@pytest.mark.gpu
@pytest.mark.parametrize("K,N", [(1536, 1536), (1000, 333)])
def test_da_side_stream_matches_serial_gpu(cuda, monkeypatch, K, N):
    """dA on the side stream (DA_STREAM) gives bitwise the serial backward's y, dx, dA, dB, call after call: the
    join orders dA before its use, and memory the side stream read is not handed out early (the allocations of
    each call are freed and reused by the next)."""
    mod = importlib.import_module("harness.kernels.lora_linear")
    torch.manual_seed(K)
    T, r = 4096, 16
    x = torch.randn(T, K, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(N, K, device=cuda, dtype=torch.bfloat16) / K**0.5
    A = (torch.randn(r, K, device=cuda, dtype=torch.bfloat16) / K**0.5).requires_grad_(True)
    B = (torch.randn(N, r, device=cuda, dtype=torch.bfloat16) * 0.1).requires_grad_(True)
    dys = [torch.randn(T, N, device=cuda, dtype=torch.bfloat16) for _ in range(3)]
    monkeypatch.setattr(mod, "DA_STREAM", False)
    serial = [[t.detach() for t in _grads(lambda: lora_linear(x, W, None, A, B, 2.0), x, A, B, dy)] for dy in dys]
    monkeypatch.setattr(mod, "DA_STREAM", True)
    for _ in range(2):
        side = [[t.detach() for t in _grads(lambda: lora_linear(x, W, None, A, B, 2.0), x, A, B, dy)] for dy in dys]
        for got, want in zip(side, serial):
            for a, e in zip(got, want):
                assert torch.equal(a, e)
    assert mod._SIDE_STREAMS, "the side stream was never used"
    # captured in a CUDA graph (the fork and join become graph edges; fresh leaves, whose autograd nodes no eager
    # call made on another stream): the replay gives the same again
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in (x, A, B))
    graphed = torch.cuda.make_graphed_callables(lambda x_, a_, b_: lora_linear(x_, W, None, a_, b_, 2.0), leaves)
    for dy, want in zip(dys, serial):
        y = graphed(*leaves)
        got = (y, *torch.autograd.grad(y, leaves, dy))
        for a, e in zip(got, want):
            assert torch.equal(a, e)


def test_da_stream_is_a_no_op_without_cuda(seed, close, monkeypatch):
    """DA_STREAM on, CPU tensors: the backward computes dA in place and matches the reference."""
    mod = importlib.import_module("harness.kernels.lora_linear")
    monkeypatch.setattr(mod, "DA_STREAM", True)
    monkeypatch.setattr(mod, "_SIDE_STREAMS", {})
    x = torch.randn(37, 24, requires_grad=True)
    W, dy = torch.randn(19, 24), torch.randn(37, 19)
    A, B = torch.randn(4, 24, requires_grad=True), torch.randn(19, 4, requires_grad=True)
    got = _grads(lambda: lora_linear(x, W, None, A, B, 0.5), x, A, B, dy)
    want = _grads(lambda: lora_linear_reference(x, W, None, A, B, 0.5), x, A, B, dy)
    for a, e in zip(got, want):
        close(a, e, 1e-5, 1e-5)
    assert not mod._SIDE_STREAMS


def test_set_paths_parses_and_refuses_bad_values(monkeypatch):
    mod = importlib.import_module("harness.kernels.lora_linear")
    monkeypatch.setattr(mod, "PATHS", {"fwd": "auto", "dx": "auto", "dy": "auto"})
    assert mod.set_paths("cublas") == {"fwd": "cublas", "dx": "cublas", "dy": "cublas"}
    assert mod.set_paths("fwd=epilogue, dy=fused") == {"fwd": "epilogue", "dx": "cublas", "dy": "fused"}
    assert mod._paths(64, 32, 128, True, 4) == ("epilogue", "cublas", "fused")
    with pytest.raises(ValueError, match=r"dy=fast.*allowed.*dy=auto\|fused\|cublas"):
        mod.set_paths("dy=fast")

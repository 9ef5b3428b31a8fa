import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from harness.kernels.nf4_dequant import dequantize_nf4, dequantize_nf4_torch  # noqa: E402


@pytest.mark.parametrize("shape,blocksize", [((45, 67), 64), ((64, 96), 128)])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nf4_matches_bitsandbytes(seed, cpu_interp, close, shape, blocksize, nested, dtype):
    w = torch.randn(shape, dtype=torch.float32).to(dtype)
    packed, qs = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    ref = bnbf.dequantize_4bit(packed, qs, quant_type="nf4")
    out = dequantize_nf4(packed, qs)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    close(out, ref, tol, tol, "kernel vs bnb")
    close(dequantize_nf4_torch(packed, qs), ref, tol, tol, "torch fallback vs bnb")
    # poisoned output buffer: every element must be written
    buf = torch.full(shape, float("nan"), dtype=dtype)
    dequantize_nf4(packed, qs, out=buf)
    close(buf, ref, tol, tol, "out=")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3584, 3584), (18944, 3584)])
def test_nf4_bf16_gpu(cuda, rel, shape):
    torch.manual_seed(0)
    w = torch.randn(shape, device=cuda, dtype=torch.bfloat16) * 0.02
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref = bnbf.dequantize_4bit(packed, qs, quant_type="nf4")
    out = dequantize_nf4(packed, qs)
    assert rel(out, ref) < 1e-3

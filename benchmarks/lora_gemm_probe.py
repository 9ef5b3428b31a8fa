"""Where the LoRA-fused Triton GEMMs (kernels/lora_gemm.py) spend their time: each kernel variant at each launch
shape, beside cuBLAS, on the GPU. Diagnostic companion of kernels_bench.py's lora_gemm rows.

    python benchmarks/lora_gemm_probe.py [--shapes 8192x1536x1536,8192x3584x3584] [--tma]

Per shape (tokens M x in K x out N, r=16, bf16) it prints GPU times (triton do_bench medians) of:
  fwd:  cuBLAS x W^T | Triton base | + xa (no store) | + xa stored  (each launch config)
  bwd:  cuBLAS dy W  | Triton base | + g (dx += g A) | + dA sums | + dB sums | all
  --tma: the same with the persistent TMA-descriptor kernels (base, fused; fwd also without loop flattening).
"""
from __future__ import annotations

import argparse

import torch
import triton

from harness.kernels import lora_gemm as lg


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


CONFIGS = [(128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
           (256, 128, 64, 3, 8), (128, 128, 128, 3, 8)]


def fwd_launch(x, W, A, B, y, xa, cfg, has_lora, store_xa):
    bm, bn, bk, st, wp = cfg
    M, K = x.shape
    N = W.shape[0]
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    args = (x, W, A, B, y, y, xa, M, N, K, 2.0, x.stride(0), x.stride(1), W.stride(0), W.stride(1), A.stride(0),
            A.stride(1), B.stride(0), B.stride(1), y.stride(0), y.stride(1), xa.stride(0), 8192)
    return lambda: lg._lora_fwd_kernel[grid](*args, HAS_LORA=has_lora, HAS_BIAS=False, STORE_XA=store_xa,
                                             EVEN_K=K % 128 == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=16,
                                             GROUP_M=8, IEEE=False, num_warps=wp, num_stages=st)


def bwd_launch(dy, x, W, A, B, xa, dx, sums, cfg, has_lora, need_da, need_db):
    bm, bk, bn, st, wp = cfg  # output tile bm x bk, reduction step bn
    M, N = dy.shape
    K = W.shape[1]
    dA, dB = sums[: 16 * K].view(16, K), sums[16 * K:].view(N, 16)
    grid = (triton.cdiv(M, bm) * triton.cdiv(K, bk),)
    args = (dy, W, A, B, x, xa, dx, dA, dB, M, N, K, 2.0, dy.stride(0), dy.stride(1), W.stride(0), W.stride(1),
            A.stride(0), A.stride(1), B.stride(0), B.stride(1), x.stride(0), x.stride(1), xa.stride(0), dx.stride(0),
            dx.stride(1), 8192)
    return lambda: lg._lora_bwd_kernel[grid](*args, HAS_LORA=has_lora, NEED_DA=need_da, NEED_DB=need_db,
                                             EVEN_N=N % 128 == 0, BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, BLOCK_R=16,
                                             GROUP_M=8, IEEE=False, num_warps=wp, num_stages=st)


def _progs(tiles):
    return min(torch.cuda.get_device_properties(0).multi_processor_count, tiles)


def fwd_tma_launch(x, W, A, B, y, xa, cfg, has_lora, store_xa, flatten=True):
    bm, bn, bk, st, wp = cfg
    M, K = x.shape
    N = W.shape[0]
    n = _progs(triton.cdiv(M, bm) * triton.cdiv(N, bn))
    return lambda: lg._lora_fwd_tma_kernel[(n,)](
        x, W, A, B, y, y, xa, M, N, K, 2.0, 8192, HAS_LORA=has_lora, HAS_BIAS=False, STORE_XA=store_xa,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=16, GROUP_M=8, FLATTEN=flatten, IEEE=False,
        num_warps=wp, num_stages=st)


def bwd_tma_launch(dy, x, W, A, B, xa, dx, sums, cfg, has_lora, need_da, need_db, flatten=True):
    bm, bk, bn, st, wp = cfg
    M, N = dy.shape
    K = W.shape[1]
    dA, dB = sums[: 16 * K].view(16, K), sums[16 * K:].view(N, 16)
    n = _progs(triton.cdiv(M, bm) * triton.cdiv(K, bk))
    return lambda: lg._lora_bwd_tma_kernel[(n,)](
        dy, W, A, B, x, xa, dx, dA, dB, M, N, K, 2.0, 8192, HAS_LORA=has_lora, NEED_DA=need_da, NEED_DB=need_db,
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, BLOCK_R=16, GROUP_M=8, FLATTEN=flatten, IEEE=False,
        num_warps=wp, num_stages=st)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8192x1536x1536,8192x3584x3584")
    ap.add_argument("--tma", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for spec in args.shapes.split(","):
        M, K, N = (int(v) for v in spec.split("x"))
        dev, dt = "cuda", torch.bfloat16
        x = torch.randn(M, K, device=dev, dtype=dt)
        W = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
        A = torch.randn(16, K, device=dev, dtype=dt) / K**0.5
        B = torch.randn(N, 16, device=dev, dtype=dt) * 0.1
        dy = torch.randn(M, N, device=dev, dtype=dt)
        y = torch.empty(M, N, device=dev, dtype=dt)
        xa = torch.empty(M, 16, device=dev, dtype=dt)
        dx = torch.empty(M, K, device=dev, dtype=dt)
        sums = torch.zeros(16 * K + N * 16, device=dev, dtype=torch.float32)
        cf, cb = bench(lambda: torch.mm(x, W.t(), out=y)), bench(lambda: torch.mm(dy, W, out=dx))
        flops = 2 * M * N * K
        print(f"\n## M={M} K={K} N={N} r=16: cuBLAS fwd {cf * 1e3:.1f} us ({flops / cf / 1e9:.0f} TFLOP/s), "
              f"bwd dX {cb * 1e3:.1f} us ({flops / cb / 1e9:.0f} TFLOP/s)")
        print("| config (BM,BN,BK,stages,warps) | fwd base | +xa | +xa stored | bwd base | +g | +g+dA | +g+dB | all |"
              + (" TMA fwd base | TMA fwd lora | TMA fwd lora no-flatten | TMA bwd base | TMA bwd +g | TMA bwd all |"
                 if args.tma else ""))
        for cfg in CONFIGS:
            cells = []
            for fn in (lambda: fwd_launch(x, W, A, B, y, xa, cfg, False, False),
                       lambda: fwd_launch(x, W, A, B, y, xa, cfg, True, False),
                       lambda: fwd_launch(x, W, A, B, y, xa, cfg, True, True),
                       lambda: bwd_launch(dy, x, W, A, B, xa, dx, sums, cfg, False, False, False),
                       lambda: bwd_launch(dy, x, W, A, B, xa, dx, sums, cfg, True, False, False),
                       lambda: bwd_launch(dy, x, W, A, B, xa, dx, sums, cfg, True, True, False),
                       lambda: bwd_launch(dy, x, W, A, B, xa, dx, sums, cfg, True, False, True),
                       lambda: bwd_launch(dy, x, W, A, B, xa, dx, sums, cfg, True, True, True)) + (
                    (lambda: fwd_tma_launch(x, W, A, B, y, xa, cfg, False, False),
                     lambda: fwd_tma_launch(x, W, A, B, y, xa, cfg, True, True),
                     lambda: fwd_tma_launch(x, W, A, B, y, xa, cfg, True, True, flatten=False),
                     lambda: bwd_tma_launch(dy, x, W, A, B, xa, dx, sums, cfg, False, False, False),
                     lambda: bwd_tma_launch(dy, x, W, A, B, xa, dx, sums, cfg, True, False, False),
                     lambda: bwd_tma_launch(dy, x, W, A, B, xa, dx, sums, cfg, True, True, True)) if args.tma else ()):
                try:
                    cells.append(f"{bench(fn()) * 1e3:.1f}")
                except Exception as e:  # out of shared memory / registers for this config
                    cells.append(type(e).__name__[:12])
            print(f"| {cfg} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

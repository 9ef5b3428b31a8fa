"""Benchmark + bf16 spot checks of harness.kernels on CUDA.

    python benchmarks/kernels_bench.py [--out DIR] [--quick] [--only rms,rope,...] [--tune | --tune-only]

--tune sweeps the RMSNorm backward's and RoPE's launch shapes first; --tune-only sweeps and exits
(``--tune-only --only rms``: the RMSNorm backward sweep alone, lines prefixed "tune rms bwd").

Times with triton.testing.do_bench (median). For memory-bound kernels it reports achieved GB/s
(minimal bytes: each input read once, each output written once) and the % of a device-to-device
copy measured in the same run (bytes read + written). For LoRA it reports fused fwd+bwd vs the
plain cuBLAS base matmul fwd+bwd (x @ W^T, dX); for the fused CE, time and peak memory vs the
unfused loss (logits materialised and upcast to fp32, as transformers does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from harness.kernels import (  # the installed project (pip install -e .)
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_reference,
    dequantize_nf4,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    gated_act,
    gated_act_reference,
    lora_linear,
    lora_linear_grouped,
    lora_linear_reference,
    mrope_cos_sin,
    rms_norm,
    rms_norm_reference,
)
from harness.kernels.lora_gemm import base_gemm, base_gemm_dx, lora_gemm  # noqa: E402
import triton  # noqa: E402
import importlib  # noqa: E402

LORA_LINEAR = importlib.import_module("harness.kernels.lora_linear")  # the module (the package attribute is the function)

ROWS: list[dict] = []
CHECKS: list[dict] = []
DT = torch.bfloat16
DEV = "cuda"


def bench(fn, warmup=25, rep=100):
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def kernel_breakdown(fn, iters=10):
    """{kernel name: ms per call} from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out: dict = {}
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            out[e.name] = out.get(e.name, 0.0) + e.time_range.elapsed_us() / iters / 1e3
    return out


PROFILE_ITERS = 10  # --iters: calls per torch.profiler measurement (gbench's default)


def gbench(fn, iters=None):
    """GPU kernel time per call (ms): sum of the CUDA kernel durations recorded by torch.profiler,
    i.e. the time without Python / launch overhead. (CUDA-graph capture of autograd backward was
    tried first and broke the CUDA context on torch 2.11, so it is not used.)"""
    parts = safe_breakdown(fn, iters)
    total = sum(parts.values()) if parts else 0.0
    return total if total > 0 else None


def safe_breakdown(fn, iters=None):
    """kernel_breakdown, or None (with a line saying why) where the profiler fails."""
    try:
        return kernel_breakdown(fn, iters or PROFILE_ITERS)
    except Exception as e:  # pragma: no cover
        print(f"    (profiler timing failed: {type(e).__name__}: {str(e)[:80]})", flush=True)
        return None


def both(fn):
    return bench(fn), gbench(fn)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def kernel_note(t, base):
    """``"; kernel time: +x%"`` for two ``both`` results (do_bench ms, profiler ms), or "" without profiler times."""
    return f"; kernel time: {100 * (t[1] / base[1] - 1):+.1f}%" if (t[1] and base[1]) else ""


def row(kernel, shape, ms, nbytes=None, copy_bw=None, note="", gms=None):
    """ms: do_bench median (includes launch overhead); gms: profiler sum of kernel times (GPU time).
    GB/s and % of copy use the kernel time when available."""
    if isinstance(ms, tuple):
        ms, gms = ms
    t = gms if gms else ms
    gbs = nbytes / t / 1e6 if (nbytes and t > 0) else None
    pct = 100 * gbs / copy_bw if (gbs and copy_bw) else None
    r = dict(kernel=kernel, shape=shape, ms=ms, kernel_ms=gms, gbs=gbs, pct_copy=pct, note=note)
    ROWS.append(r)
    g = f"{gms:8.4f}" if gms else "     n/a"
    print(f"  {kernel:<30} {shape:<36} {ms:8.4f} ms kernels {g} ms "
          f"{'' if gbs is None else f'{gbs:7.0f} GB/s {pct:5.1f}%'}  {note}", flush=True)


def check(name, err, bound):
    CHECKS.append(dict(check=name, rel_err=err, bound=bound, ok=err < bound))
    print(f"  check {name:<50} rel err {err:.2e} ({'ok' if err < bound else 'FAIL'} < {bound:g})", flush=True)


def copy_bandwidth():
    n = 1 << 29  # 1 GiB of bf16
    a = torch.randn(n // 2, device=DEV, dtype=torch.float32).view(DT)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    bw = 2 * a.numel() * a.element_size() / ms / 1e6
    del a, b
    return bw, ms


def grad_fn(out_fn, inputs, dy):
    def f():
        y = out_fn()
        return torch.autograd.grad(y, inputs, dy)
    return f


@contextlib.contextmanager
def lora_settings():
    """Restore harness.kernels.lora_linear's PATHS and DA_STREAM on exit, whatever the block set."""
    paths, da = dict(LORA_LINEAR.PATHS), LORA_LINEAR.DA_STREAM
    try:
        yield
    finally:
        LORA_LINEAR.PATHS.update(paths)
        LORA_LINEAR.DA_STREAM = da


def lora_case(M, K, N, r=16):
    """x [M, K] (requires grad), frozen W [N, K], adapters A [r, K] / B [N, r] (require grad), dy [M, N]: bf16."""
    x = torch.randn(M, K, device=DEV, dtype=DT, requires_grad=True)
    W = torch.randn(N, K, device=DEV, dtype=DT) / K**0.5
    A = (torch.randn(r, K, device=DEV, dtype=DT) / K**0.5).requires_grad_(True)
    B = (torch.randn(N, r, device=DEV, dtype=DT) * 0.1).requires_grad_(True)
    return x, W, A, B, torch.randn(M, N, device=DEV, dtype=DT)


# ----------------------------------------------------------------------------- kernels
def bench_rms(copy_bw, N, H):
    x = torch.randn(N, H, device=DEV, dtype=DT, requires_grad=True)
    w = (torch.randn(H, device=DEV) * 0.1 + 1).to(DT).requires_grad_(True)
    dy = torch.randn(N, H, device=DEV, dtype=DT)
    y = rms_norm(x, w, 1e-6)
    f = both(lambda: rms_norm(x, w, 1e-6))
    row("rms_norm fwd", f"[{N},{H}]", f, 2 * N * H * 2 + H * 2, copy_bw)
    fb = both(lambda: torch.autograd.grad(rms_norm(x, w, 1e-6), (x, w), dy))
    row("rms_norm fwd+bwd", f"[{N},{H}]", fb, 5 * N * H * 2, copy_bw)
    # the backward alone, on a retained graph: reads dy, x, rstd, writes dx (+ the small dW partial sum)
    b = both(rms_bwd(y, x, w, dy))
    row("rms_norm bwd", f"[{N},{H}]", b, 3 * N * H * 2 + 4 * N, copy_bw, "(backward alone, dW sum included)")
    w_frozen = w.detach()  # LoRA training: the norm weight is frozen, the backward is dX alone
    bf = both(rms_bwd(rms_norm(x, w_frozen, 1e-6), x, w_frozen, dy))
    row("rms_norm bwd frozen weight", f"[{N},{H}]", bf, 3 * N * H * 2 + 4 * N, copy_bw, "(backward alone, no dW: LoRA)")
    row("rms_norm fwd+bwd torch ref", f"[{N},{H}]", both(lambda: torch.autograd.grad(rms_norm_reference(x, w, 1e-6), (x, w), dy)))
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x32, w32 = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    yr = rms_norm_reference(x32, w32, 1e-6)
    dxr, dwr = torch.autograd.grad(yr, (x32, w32), dy.float())
    check(f"rms_norm y/dx/dw H={H}", max(rel(y, yr), rel(dx, dxr), rel(dw, dwr)), 1e-2)


def rms_bwd_configs(block):
    """The backward launch configs tune_rms sweeps: (rows per tile, programs per SM, warps, stages, dW
    accumulator per row), at most 72, so that both hidden sizes fit one GPU call. Configs whose tile
    gives a thread less than one element are left out (their warps would idle)."""
    out = []
    for bm in (2, 4, 8):
        for per_sm in (2, 4):
            for warps in (4, 8, 16):
                if bm * block // (32 * warps) < 1:
                    continue
                for stages in (1, 3):
                    for dw_rows in (True, False):
                        out.append((bm, per_sm, warps, stages, dw_rows))
    return out


def rms_bwd(y, x, w, dy):
    """The backward of ``y = rms_norm(x, w)`` alone, on a retained graph: dX and dW, or dX alone for a frozen ``w``
    (the dX kernel only)."""
    wrt = (x, w) if w.requires_grad else (x,)
    return lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True)


def time_rms_bwd(mod, block, config, x, w, dy, iters=20):
    """GPU ms of the backward alone (both kernels; with a frozen ``w``, the dX kernel alone) with
    BWD_CONFIG[block] = config, or the error (a pipelined config's shared memory may not fit: Triton refuses it
    at launch)."""
    mod.BWD_CONFIG[block] = config
    try:
        fn = rms_bwd(rms_norm(x, w, 1e-6), x, w, dy)
        fn()  # compiles; a config that cannot launch raises here
        return sum(kernel_breakdown(fn, iters).values()), None
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e)[:80]}"
    finally:
        mod.BWD_CONFIG.pop(block, None)


def print_rms_bwd_kernels(mod, block, config, label, H, x, w, dy):
    """Per-kernel GPU ms of the backward under config: how much the dW row sum costs beside the main kernel."""
    mod.BWD_CONFIG[block] = config
    try:
        kernels = kernel_breakdown(rms_bwd(rms_norm(x, w, 1e-6), x, w, dy), 20)
    finally:
        mod.BWD_CONFIG.pop(block, None)
    for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1]):
        print(f"tune rms bwd H={H} {label} {config} kernel {name[:60]}: {ms:.4f} ms", flush=True)


def tune_rms(copy_bw, N, H, frozen=False):
    """Sweep the backward's launch config (rows per tile, programs per SM, warps, pipeline stages, dW
    accumulator per row); print the 8 fastest, the default, and both one's kernels. Every line starts
    with "tune rms bwd" (grep it out of a GPU call's log). frozen: the weight does not require grad (LoRA
    training), so the backward is the dX kernel alone; its lines say "frozen" after H."""
    import importlib

    mod = importlib.import_module("harness.kernels.rms_norm")  # the attribute of that name is the function
    x = torch.randn(N, H, device=DEV, dtype=DT, requires_grad=True)
    w = (torch.randn(H, device=DEV) * 0.1 + 1).to(DT).requires_grad_(not frozen)
    dy = torch.randn(N, H, device=DEV, dtype=DT)
    block = 1 << (H - 1).bit_length()
    default = mod._bwd_config(block)
    nbytes = 3 * N * H * 2 + 4 * N  # x and dy read, dx written (bf16), rstd read (fp32)
    H = f"{H} frozen" if frozen else H  # (only printed from here on)

    def line(label, config, t):
        gbs = nbytes / t / 1e6
        return (f"tune rms bwd H={H} {label} {config}: {t:.4f} ms {gbs:.0f} GB/s "
                f"{100 * gbs / copy_bw:.1f}% of copy")

    configs = rms_bwd_configs(block)
    if default not in configs:
        configs.append(default)
    res, failed = [], []
    for config in configs:
        t, err = time_rms_bwd(mod, block, config, x, w, dy)
        if t:
            res.append((t, config))
        else:
            failed.append(config)
            print(f"tune rms bwd H={H} failed {config}: {err}", flush=True)
    res.sort(key=lambda r: r[0])
    print(f"tune rms bwd H={H}: {len(res)} configs timed, {len(failed)} failed; "
          f"(rows/tile, programs/SM, warps, stages, dw_rows)", flush=True)
    for i, (t, config) in enumerate(res[:8]):
        print(line(f"top{i + 1}", config, t), flush=True)
    t_default = next((t for t, c in res if c == default), None)
    print(line("default", default, t_default) if t_default else f"tune rms bwd H={H} default {default}: failed", flush=True)
    if res:
        print_rms_bwd_kernels(mod, block, res[0][1], "best", H, x, w, dy)
    print_rms_bwd_kernels(mod, block, default, "default", H, x, w, dy)


def tune_dw_sum(n_prog, H, iters=20):
    """Sweep the dW row sum's launch (columns per program, rows per load, warps) on [n_prog, H] fp32 partials, the
    shape the backward hands it; print the 6 fastest and the default. Lines start with "tune rms dw-sum"."""
    import importlib

    mod = importlib.import_module("harness.kernels.rms_norm")
    partial = torch.randn(n_prog, H, device=DEV)
    ref = partial.double().sum(0)
    res = []
    for block_n in (8, 16, 32, 64):
        for max_p in (64, 128, 256, 512):
            for warps in (2, 4, 8):
                mod.DW_SUM_CONFIG = (block_n, max_p, warps)
                try:
                    dw = mod._sum_dw_partials(partial, torch.float32)
                    assert rel(dw, ref) < 1e-5, "wrong sum"
                    t = sum(kernel_breakdown(lambda: mod._sum_dw_partials(partial, torch.bfloat16), iters).values())
                    res.append((t, (block_n, max_p, warps)))
                except Exception as e:
                    print(f"tune rms dw-sum H={H} failed {(block_n, max_p, warps)}: {type(e).__name__}: {str(e)[:80]}")
                finally:
                    mod.DW_SUM_CONFIG = None
    res.sort(key=lambda r: r[0])
    print(f"tune rms dw-sum H={H} rows={n_prog}: {len(res)} configs timed (columns/program, max rows/load, warps)")
    for i, (t, c) in enumerate(res[:6]):
        print(f"tune rms dw-sum H={H} top{i + 1} {c}: {t * 1e3:.2f} us", flush=True)
    for label, config in (("default", mod.DW_SUM_DEFAULT), ("old launch", (32, 64, 4))):
        t = next((t for t, c in res if c == config), None)
        print(f"tune rms dw-sum H={H} {label} {config}: " + (f"{t * 1e3:.2f} us" if t else "failed"), flush=True)


def tune_rope(copy_bw, N, H):
    mod = __import__("harness.kernels.rope", fromlist=["ELEMS_PER_PROGRAM"])
    D = 128
    hq, hk = H // D, max(2, H // D // 7)
    B, S = 4, N // 4
    inv_freq = 1.0 / (1000000 ** (torch.arange(0, D, 2, dtype=torch.float, device=DEV) / D))
    cos, sin = mrope_cos_sin(torch.randint(0, 4096, (3, B, S), device=DEV), inv_freq, [16, 24, 24], dtype=DT)
    q = torch.randn(B, S, hq, D, device=DEV, dtype=DT).transpose(1, 2)
    k = torch.randn(B, S, hk, D, device=DEV, dtype=DT).transpose(1, 2)
    nbytes = 2 * (q.numel() + k.numel()) * 2 + 2 * cos.numel() * 2
    default = mod.ELEMS_PER_PROGRAM, mod.KERNEL
    qg, kg = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    go = (torch.randn_like(q), torch.randn_like(k))
    for kernel in ("2d", "3d"):  # (position, head) rows vs [positions, heads, dim] tiles (kernels/rope.py)
        for e in (1024, 2048, 4096, 8192, 16384, 32768):
            mod.ELEMS_PER_PROGRAM, mod.KERNEL = e, kernel
            try:
                t = gbench(lambda: apply_rotary_pos_emb(q, k, cos, sin), iters=20)
                tb = gbench(lambda: torch.autograd.grad(apply_rotary_pos_emb(qg, kg, cos, sin), (qg, kg), go), iters=20)
            except Exception as exc:  # a launch shape that does not compile or fit
                print(f"  tune rope H={H}: kernel {kernel} elements/program {e}: failed ({type(exc).__name__})")
                continue
            if t and tb:
                print(f"  tune rope H={H}: kernel {kernel} elements/program {e}: fwd {t:.4f} ms "
                      f"{100 * nbytes / t / 1e6 / copy_bw:.0f}% of copy, fwd+bwd {tb:.4f} ms "
                      f"{100 * 2 * nbytes / tb / 1e6 / copy_bw:.0f}%", flush=True)
    mod.ELEMS_PER_PROGRAM, mod.KERNEL = default


def bench_rope(copy_bw, N, H):
    D = 128
    hq, hk = H // D, max(2, H // D // 7)
    B, S = 4, N // 4
    inv_freq = 1.0 / (1000000 ** (torch.arange(0, D, 2, dtype=torch.float, device=DEV) / D))
    pos = torch.randint(0, 4096, (3, B, S), device=DEV)
    cos, sin = mrope_cos_sin(pos, inv_freq, [16, 24, 24], dtype=DT)
    q = torch.randn(B, S, hq, D, device=DEV, dtype=DT).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, S, hk, D, device=DEV, dtype=DT).transpose(1, 2).requires_grad_(True)
    nbytes = 2 * (q.numel() + k.numel()) * 2 + 2 * cos.numel() * 2
    row("rope fwd (q+k)", f"B{B} S{S} hq{hq} hk{hk} D{D}", both(lambda: apply_rotary_pos_emb(q, k, cos, sin)), nbytes, copy_bw)
    row("rope fwd torch ref", f"B{B} S{S} hq{hq} hk{hk} D{D}", both(lambda: apply_rotary_pos_emb_reference(q, k, cos, sin)), nbytes, copy_bw)
    qo, ko = apply_rotary_pos_emb(q, k, cos, sin)
    go = (torch.randn_like(qo), torch.randn_like(ko))
    fb = both(lambda: torch.autograd.grad(apply_rotary_pos_emb(q, k, cos, sin), (q, k), go))
    row("rope fwd+bwd", f"B{B} S{S} hq{hq} hk{hk} D{D}", fb, 2 * nbytes, copy_bw)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), go)
    q32, k32 = q.detach().float().requires_grad_(True), k.detach().float().requires_grad_(True)
    qr, kr = apply_rotary_pos_emb_reference(q32, k32, cos.float(), sin.float())
    dqr, dkr = torch.autograd.grad((qr, kr), (q32, k32), (go[0].float(), go[1].float()))
    check(f"rope q/k/dq/dk H={H}", max(rel(qo, qr), rel(ko, kr), rel(dq, dqr), rel(dk, dkr)), 1e-2)


def bench_gated(copy_bw, N, I, act):
    g = torch.randn(N, I, device=DEV, dtype=DT, requires_grad=True)
    u = torch.randn(N, I, device=DEV, dtype=DT, requires_grad=True)
    dh = torch.randn(N, I, device=DEV, dtype=DT)
    name = "swiglu" if act == "silu" else "geglu"
    f = both(lambda: gated_act(g, u, act))
    row(f"{name} fwd", f"[{N},{I}]", f, 3 * N * I * 2, copy_bw)
    fb = both(lambda: torch.autograd.grad(gated_act(g, u, act), (g, u), dh))
    row(f"{name} fwd+bwd", f"[{N},{I}]", fb, 8 * N * I * 2, copy_bw)
    row(f"{name} bwd", f"[{N},{I}]", fb[0] - f[0], 5 * N * I * 2, copy_bw, "(fwd+bwd minus fwd)",
        gms=(fb[1] - f[1]) if (fb[1] and f[1]) else None)
    row(f"{name} fwd+bwd torch ref", f"[{N},{I}]", both(lambda: torch.autograd.grad(gated_act_reference(g, u, act), (g, u), dh)), 8 * N * I * 2, copy_bw)
    h = gated_act(g, u, act)
    dg, du = torch.autograd.grad(h, (g, u), dh)
    g32, u32 = g.detach().float().requires_grad_(True), u.detach().float().requires_grad_(True)
    hr = gated_act_reference(g32, u32, act)
    dgr, dur = torch.autograd.grad(hr, (g32, u32), dh.float())
    check(f"{name} h/dg/du I={I}", max(rel(h, hr), rel(dg, dgr), rel(du, dur)), 1e-2)


def bench_nf4(copy_bw, M, K):
    try:
        import bitsandbytes.functional as bnbf
    except Exception as e:  # pragma: no cover
        print(f"  nf4: bitsandbytes unavailable ({e}); skipped")
        return None
    w = torch.randn(M, K, device=DEV, dtype=DT) * 0.02
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    n = M * K
    nbytes = n // 2 + n * 2 + qs.absmax.numel() + qs.state2.absmax.numel() * 4
    out = torch.empty(M, K, device=DEV, dtype=DT)
    # a copy moving the same bytes (half read, half written): small tensors do not reach the 1 GiB rate
    src = torch.empty(nbytes // 4, device=DEV, dtype=torch.float16)
    dst = torch.empty_like(src)
    same = gbench(lambda: dst.copy_(src), iters=20)
    same_note = f"copy of the same bytes: {nbytes / same / 1e6:.0f} GB/s" if same else ""
    row("nf4 dequant (double-quant)", f"[{M},{K}] bs64", both(lambda: dequantize_nf4(packed, qs, out=out)), nbytes, copy_bw,
        same_note)
    row("nf4 dequant bitsandbytes", f"[{M},{K}] bs64", both(lambda: bnbf.dequantize_4bit(packed, qs, quant_type="nf4")), nbytes, copy_bw)
    check(f"nf4 vs bnb [{M},{K}]", rel(dequantize_nf4(packed, qs), bnbf.dequantize_4bit(packed, qs, quant_type="nf4")), 1e-3)
    return packed, qs


def bench_lora(N, K, M, r=16, adapter_dtype=None, nf4=None, paths_only=False):
    adapter_dtype = adapter_dtype or DT
    x = torch.randn(N, K, device=DEV, dtype=DT, requires_grad=True)
    W = torch.randn(M, K, device=DEV, dtype=DT) / K**0.5
    A = (torch.randn(r, K, device=DEV) / K**0.5).to(adapter_dtype).requires_grad_(True)
    B = (torch.randn(M, r, device=DEV) * 0.1).to(adapter_dtype).requires_grad_(True)
    dy = torch.randn(N, M, device=DEV, dtype=DT)
    s = 2.0
    shape = f"x[{N},{K}] W[{M},{K}] r{r}" + ("" if adapter_dtype == DT else " A/B fp32")
    base_b = both(grad_fn(lambda: F.linear(x, W), (x,), dy))
    row("base matmul fwd+bwd (cuBLAS)", shape, base_b)
    fused_b = both(grad_fn(lambda: lora_linear(x, W, None, A, B, s), (x, A, B), dy))
    base, fused = base_b[0], fused_b[0]
    paths = "/".join(LORA_LINEAR._paths(N, M, K, True, torch.cuda.get_device_properties(0).multi_processor_count))
    row("lora_linear fused fwd+bwd", shape, fused_b,
        note=f"overhead vs base {100 * (fused / base - 1):+.1f}%{kernel_note(fused_b, base_b)}; paths {paths}")
    lora_paths_sweep(shape, lambda: lora_linear(x, W, None, A, B, s), (x, A, B), dy, base_b)
    print_breakdown(f"lora_linear default paths {shape}", grad_fn(lambda: lora_linear(x, W, None, A, B, s), (x, A, B), dy))
    print_breakdown(f"base matmul {shape}", grad_fn(lambda: F.linear(x, W), (x,), dy))
    if adapter_dtype == DT:
        lora_parts(shape, x.detach(), W, A.detach(), B.detach(), dy, s)
    if paths_only:  # the spot check of every path, then done
        x32, A32, B32 = (t.detach().float().requires_grad_(True) for t in (x, A, B))
        yr = lora_linear_reference(x32, W.float(), None, A32, B32, s)
        ref = (yr, *torch.autograd.grad(yr, (x32, A32, B32), dy.float()))
        for spec in ("cublas", "fwd=epilogue,dx=epilogue,dy=fused"):
            with lora_settings():
                LORA_LINEAR.set_paths(spec)
                y = lora_linear(x, W, None, A, B, s)
                got = (y, *torch.autograd.grad(y, (x, A, B), dy))
            check(f"lora paths {spec} y/dx/dA/dB {shape}", max(rel(a, b) for a, b in zip(got, ref)), 2e-2)
        return base, fused
    if adapter_dtype == DT:
        peft_fn = lambda: lora_linear_reference(x, W, None, A, B, s)  # noqa: E731
    else:  # PEFT with fp32 adapters: x cast to fp32 for the LoRA path, result cast back
        peft_fn = lambda: (F.linear(x, W) + F.linear(F.linear(x.float(), A), B) * s).to(DT)  # noqa: E731
    peft = bench(grad_fn(peft_fn, (x, A, B), dy))
    row("lora PEFT-style unfused fwd+bwd", shape, peft, note=f"overhead vs base {100 * (peft / base - 1):+.1f}%")
    # the LoRA linear as our own Triton GEMMs (kernels/lora_gemm.py), beside the same GEMMs without LoRA
    gemm_b = both(grad_fn(lambda: lora_gemm(x, W, None, A, B, s), (x, A, B), dy))
    tbase_b = both(lambda: (base_gemm(x, W), base_gemm_dx(dy, W)))
    row("lora_gemm (Triton GEMM) fwd+bwd", shape, gemm_b,
        note=f"overhead vs cuBLAS base {100 * (gemm_b[0] / base - 1):+.1f}%{kernel_note(gemm_b, base_b)}")
    row("  Triton base GEMM fwd+dX (no LoRA)", shape, tbase_b,
        note=f"vs cuBLAS base {100 * (tbase_b[0] / base - 1):+.1f}%{kernel_note(tbase_b, base_b)}")
    yg = lora_gemm(x, W, None, A, B, s)
    gx, gA, gB = torch.autograd.grad(yg, (x, A, B), dy)
    fwd_gemm = bench(lambda: lora_gemm(x, W, None, A, B, s))
    fwd_base = bench(lambda: F.linear(x, W))
    fwd_fused = bench(lambda: lora_linear(x, W, None, A, B, s))
    row("  fwd only: lora_gemm", shape, fwd_gemm, note=f"cuBLAS base {fwd_base:.4f} ms ({100 * (fwd_gemm / fwd_base - 1):+.1f}%); "
        f"Triton base {bench(lambda: base_gemm(x, W)):.4f} ms")
    bwd_only = bench(grad_fn(lambda: lora_linear(x, W, None, A, B, s), (x, A, B), dy)) - fwd_fused
    print(f"    bwd-only fused {bwd_only:.4f} ms vs base {base - fwd_base:.4f} ms")
    row("  fwd only: base / fused", shape, fwd_fused, note=f"base {fwd_base:.4f} ms ({100 * (fwd_fused / fwd_base - 1):+.1f}%)")
    y = lora_linear(x, W, None, A, B, s)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), dy)
    x32, A32, B32 = (t.detach().float().requires_grad_(True) for t in (x, A, B))
    yr = lora_linear_reference(x32, W.float(), None, A32, B32, s)
    dxr, dAr, dBr = torch.autograd.grad(yr, (x32, A32, B32), dy.float())
    check(f"lora y/dx/dA/dB {shape}", max(rel(y, yr), rel(dx, dxr), rel(dA, dAr), rel(dB, dBr)), 2e-2)
    check(f"lora_gemm y/dx/dA/dB {shape}", max(rel(yg, yr), rel(gx, dxr), rel(gA, dAr), rel(gB, dBr)), 2e-2)
    if nf4 is not None:
        packed, qs = nf4
        fused4 = bench(grad_fn(lambda: lora_linear(x, None, None, A, B, s, nf4=(packed, qs)), (x, A, B), dy))
        row("lora_linear nf4 fused fwd+bwd", shape, fused4, note=f"vs 16-bit base {100 * (fused4 / base - 1):+.1f}%")
    return base, fused


def print_breakdown(label, fn):
    """Each CUDA kernel of ``fn`` (us per call, torch.profiler), largest first, and their sum: where the time goes."""
    parts = safe_breakdown(fn)
    if parts is None:
        return
    print(f"  kernels of {label}: {sum(parts.values()) * 1e3:.1f} us in {len(parts)} kernels", flush=True)
    for name, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"    {ms * 1e3:8.1f} us  {name[:110]}", flush=True)


def lora_paths_sweep(shape, fn, inputs, dy, base_b):
    """lora_linear fwd+bwd under every (fwd, dx, dy) kernel choice of harness.kernels.lora_linear.PATHS (cublas/
    cublas/cublas is the path before the Triton epilogue GEMMs and the fused dy pass), beside the cuBLAS base."""
    for fwd in ("cublas", "epilogue"):
        for dx in ("cublas", "epilogue"):
            for dyp in ("cublas", "fused"):
                with lora_settings():
                    LORA_LINEAR.PATHS.update(fwd=fwd, dx=dx, dy=dyp)
                    t = both(grad_fn(fn, inputs, dy))
                row(f"  lora_linear paths {fwd}/{dx}/{dyp}", shape, t,
                    note=f"overhead vs base {100 * (t[0] / base_b[0] - 1):+.1f}%{kernel_note(t, base_b)}")


def lora_parts(shape, x, W, A, B, dy, s):
    """GPU kernel time of each part of the Triton paths beside what it replaces (one line each, "lora part"): where
    the overhead over the two cuBLAS base GEMMs sits."""
    from harness.kernels.lora_gemm import gemm_dx_rank_epilogue, gemm_rank_epilogue

    xa = x @ A.t()
    g = (dy @ B) * s
    parts = {
        "cuBLAS x W^T": lambda: x @ W.t(),
        "epilogue GEMM x W^T + s xa B^T": lambda: gemm_rank_epilogue(x, W, xa, B, None, s),
        "Triton x W^T (no LoRA)": lambda: base_gemm(x, W),
        "cuBLAS y = s xa B^T; y += x W^T": lambda: torch.mm(xa, B.t()).addmm_(x, W.t()),
        "cuBLAS dy W": lambda: dy @ W,
        "epilogue GEMM dy W + gs A": lambda: gemm_dx_rank_epilogue(dy, W, g, A),
        "Triton dy W (no LoRA)": lambda: base_gemm_dx(dy, W),
        "cuBLAS dx = gs A; dx += dy W": lambda: torch.mm(g, A).addmm_(dy, W),
        "xa = x A^T (cuBLAS)": lambda: x @ A.t(),
        "fused dy pass (g, dB)": lambda: LORA_LINEAR._dy_pass(dy, B, xa, s, DT, DT),
        "g = dy B (cuBLAS)": lambda: dy @ B,
        "dB = dy^T xa (split-K)": lambda: LORA_LINEAR._skinny_tn(xa, dy, s, DT, t=True),
        "dB = dy^T xa (cuBLAS)": lambda: LORA_LINEAR._mm_scaled(dy.t(), xa, s),
        "dA = g^T x (split-K)": lambda: LORA_LINEAR._skinny_tn(g, x, 1.0, DT),
        "dA = g^T x (cuBLAS)": lambda: torch.mm(g.t(), x),
    }
    for name, fn in parts.items():
        t = gbench(fn)
        print(f"  lora part {shape} {name}: {t * 1e3:.1f} us" if t else f"  lora part {shape} {name}: n/a", flush=True)


def tune_dy(copy_bw, shapes, r=16):
    """The fused dy pass (g = s dy B and dB = s dy^T xa from one read of dy, with its two partial-sum kernels) over
    harness.kernels.lora_linear.DY_LAUNCH (row block, column step, programs per SM, warps), per dy shape [M, N]:
    GPU kernel time and the bandwidth of one read of dy, the default launch marked; beside it what the "cublas" dy
    paths run instead: two cuBLAS GEMMs (kernels/lora_op.py's, in the compiled layers) and cuBLAS + the split-K
    dB (lora_linear's eager path). Last, the one launch closest to each shape's best (geometric mean of the ratios)."""
    default = dict(LORA_LINEAR.DY_LAUNCH)
    dkey = (default["block_m"], default["block_n"], default["programs_per_sm"], default["warps"])
    table = {}  # launch -> [time / best time per shape]
    for M, N in shapes:
        dy = torch.randn(M, N, device=DEV, dtype=DT)
        B = torch.randn(N, r, device=DEV, dtype=DT)
        xa = torch.randn(M, r, device=DEV, dtype=DT)
        ref_g, ref_db = (dy.float() @ B.float()) * 0.5, (dy.float().t() @ xa.float()) * 0.5
        results = []
        for bm in (64, 128, 256):
            for bn in (64, 128):
                for pps in (1, 2, 4):
                    for warps in (4, 8):
                        LORA_LINEAR.DY_LAUNCH.update(block_m=bm, block_n=bn, programs_per_sm=pps, warps=warps)
                        try:
                            g, db = LORA_LINEAR._dy_pass(dy, B, xa, 0.5, DT, DT)
                            err = max(rel(g, ref_g), rel(db, ref_db))
                            t = gbench(lambda: LORA_LINEAR._dy_pass(dy, B, xa, 0.5, DT, DT), iters=5)
                        except Exception as e:  # e.g. out of shared memory for a launch shape
                            print(f"  tune dy [{M},{N}] {bm}/{bn}/{pps}/{warps}: {type(e).__name__}", flush=True)
                            continue
                        finally:
                            LORA_LINEAR.DY_LAUNCH.update(default)
                        if t:
                            results.append((t, bm, bn, pps, warps, err))
        one_read_us = M * N * dy.element_size() / (copy_bw * 1e9) * 1e6  # dy's bytes at the copy rate
        results.sort()
        for t, *key, _ in results:
            table.setdefault(tuple(key), []).append(t / results[0][0])
        shown = results[:3] + [x for x in results[3:] if x[1:5] == dkey]  # the three fastest, and the default
        for t, bm, bn, pps, warps, err in shown:
            mark = " (default)" if (bm, bn, pps, warps) == dkey else ""
            print(f"  tune dy [{M},{N}] block_m {bm} block_n {bn} programs/SM {pps} warps {warps}: "
                  f"{t * 1e3:.1f} us, rel err {err:.1e}; one read of dy {one_read_us:.1f} us{mark}", flush=True)
        pair = gbench(lambda: (LORA_LINEAR._mm_scaled(dy, B, 0.5), LORA_LINEAR._mm_scaled(dy.t(), xa, 0.5)), iters=5)
        split = gbench(lambda: (LORA_LINEAR._mm_scaled(dy, B, 0.5), LORA_LINEAR._skinny_tn(xa, dy, 0.5, DT, t=True)),
                       iters=5)
        print(f"  tune dy [{M},{N}] cublas paths: two cuBLAS GEMMs (lora_op) {pair * 1e3:.1f} us, cuBLAS + split-K "
              f"dB (lora_linear) {split * 1e3:.1f} us; fused best {results[0][0] * 1e3:.1f} us", flush=True)
    n = len(shapes)
    uniform = sorted((math.exp(sum(math.log(v) for v in vs) / n), k) for k, vs in table.items() if len(vs) == n)
    for gm, (bm, bn, pps, warps) in uniform[:3]:
        print(f"  tune dy uniform: block_m {bm} block_n {bn} programs/SM {pps} warps {warps}: geometric mean "
              f"{gm:.3f}x of each shape's best{' (default)' if (bm, bn, pps, warps) == dkey else ''}", flush=True)
    default_gm = [gm for gm, k in uniform if k == dkey]
    if default_gm:
        print(f"  tune dy uniform: the default: {default_gm[0]:.3f}x", flush=True)


def graphed(fn_y, inputs, dy):
    """``fn_y(*inputs)`` fwd+bwd as two CUDA graphs (torch.cuda.make_graphed_callables; Triton autotunes in its
    warm-up, before capture). A call replays them, so its wall time is GPU time: no host overhead (the eager
    calls of the small shapes are host-bound), and kernels that run side by side counted once (unlike the
    profiler's sum). None (with the reason) where capture fails."""
    try:
        g = torch.cuda.make_graphed_callables(fn_y, tuple(inputs))
    except Exception as e:  # pragma: no cover
        print(f"    (graph capture failed: {type(e).__name__}: {str(e)[:120]})", flush=True)
        return None

    def f():
        return torch.autograd.grad(g(*inputs), inputs, dy)
    return f


def dy_ab(shapes, rounds=5, r=16):
    """The dy path in sequence (a whole lora_linear fwd+bwd, so the rank-r kernels see the cache state the GEMMs
    leave, unlike the isolated parts): per x [M, K] -> [M, N], ``rounds`` interleaved rounds of the cuBLAS base,
    default paths with dy cublas, with dy fused, and with dy fused and dA on a side stream beside the dx GEMM
    ("overlap", lora_linear.DA_STREAM); fwd / dx as auto picks. Each is timed twice: eager GPU kernel time
    (profiler sum) and the wall time of the fwd+bwd replayed as CUDA graphs (:func:`graphed`: the only one that
    sees kernels overlap, and free of host overhead). Medians, and the median of each round's ratio to the base of
    the same round (steadier than one base timing: clocks drift by 5-7%)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    modes = ("cublas", "fused", "overlap")

    def setting(mode):
        LORA_LINEAR.PATHS.update(fwd="auto", dx="auto", dy="cublas" if mode == "cublas" else "fused")
        LORA_LINEAR.DA_STREAM = mode == "overlap"

    for M, K, N in shapes:
        x, W, A, B, dy = lora_case(M, K, N, r)
        eager = {"base": grad_fn(lambda: F.linear(x, W), (x,), dy)}
        graph = {"base": graphed(lambda x_: F.linear(x_, W), (x,), dy)}
        kern = {k: [] for k in ("base", *modes)}
        wall = {k: [] for k in ("base", *modes)}
        outs = {}
        with lora_settings():
            for mode in modes:
                setting(mode)
                eager[mode] = grad_fn(lambda: lora_linear(x, W, None, A, B, 2.0), (x, A, B), dy)
                graph[mode] = graphed(lambda x_, a_, b_: lora_linear(x_, W, None, a_, b_, 2.0), (x, A, B), dy)
                outs[mode] = [t.clone() for t in eager[mode]()]  # the side stream must not change a result
                if graph[mode] is not None:
                    outs[mode + " graphed"] = [t.clone() for t in graph[mode]()]
            for _ in range(rounds):
                for mode in ("base", *modes):  # (gbench runs fn once before timing: autotune outside)
                    if mode != "base":
                        setting(mode)
                    kern[mode].append(gbench(eager[mode]))
                    wall[mode].append(bench(graph[mode]) if graph[mode] is not None else None)
        torch.cuda.synchronize()
        side_diff = max(rel(a, b) for a, b in zip(outs["overlap"], outs["fused"]))
        graph_diff = max([rel(a, b) for m in modes if m + " graphed" in outs
                          for a, b in zip(outs[m + " graphed"], outs[m])] or [float("nan")])
        auto = LORA_LINEAR._paths(M, N, K, True, sms)

        def fmt(times):
            if any(t is None for v in times.values() for t in v):
                return "n/a"
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            ratio = {m: sorted(t / b for t, b in zip(times[m], times["base"]))[rounds // 2] for m in modes}
            return f"base {med['base'] * 1e3:.1f} us; " + ", ".join(
                f"{m} {med[m] * 1e3:.1f} us ({100 * (ratio[m] - 1):+.1f}%)" for m in modes)

        print(f"  dy a/b x[{M},{K}] -> {N} (fwd/dx {auto[0]}/{auto[1]}, auto dy {auto[2]}): eager kernel time: "
              f"{fmt(kern)} | graphed wall: {fmt(wall)} | rel diff overlap vs fused {side_diff:.1e}, graphed vs eager "
              f"{graph_diff:.1e}", flush=True)
        del eager, graph, outs
        torch.cuda.empty_cache()


def host_probe(M=512, K=512, N=512, r=16, calls=300):
    """Host (CPU) time per eager call, at a shape small enough that the GPU keeps up (so the loop's time is the
    host's): the base, lora_linear on each path set, the Triton launches alone; then a cProfile of the default path
    (where the host time goes, by function)."""
    import cProfile
    import pstats

    from harness.kernels.lora_gemm import gemm_dx_rank_epilogue, gemm_rank_epilogue

    x, W, A, B, dy = lora_case(M, K, N, r)
    xa, gs = torch.randn(M, r, device=DEV, dtype=DT), torch.randn(M, r, device=DEV, dtype=DT)

    def host_us(fn):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - t) / calls * 1e6
        torch.cuda.synchronize()
        return host

    lora = grad_fn(lambda: lora_linear(x, W, None, A, B, 2.0), (x, A, B), dy)
    cases = [("F.linear fwd+bwd", None, grad_fn(lambda: F.linear(x, W), (x,), dy))]
    for spec in ("cublas", "fwd=epilogue,dx=epilogue,dy=fused", "fwd=epilogue,dx=cublas,dy=cublas",
                 "fwd=cublas,dx=epilogue,dy=cublas", "fwd=cublas,dx=cublas,dy=fused"):
        cases.append((f"lora_linear fwd+bwd, paths {spec}", spec, lora))
    cases.append(("lora_linear fwd+bwd, epilogue/epilogue/fused + DA_STREAM", "da", lora))
    cases += [("gemm_rank_epilogue alone", None, lambda: gemm_rank_epilogue(x.detach(), W, xa, B.detach(), None, 2.0)),
              ("gemm_dx_rank_epilogue alone", None, lambda: gemm_dx_rank_epilogue(dy, W, gs, A.detach())),
              ("_dy_pass alone", None, lambda: LORA_LINEAR._dy_pass(dy, B.detach(), xa, 2.0, DT, DT)),
              ("_mm_scaled alone", None, lambda: LORA_LINEAR._mm_scaled(dy, B.detach(), 2.0)),
              ("torch.mm alone", None, lambda: torch.mm(dy, B.detach()))]
    for name, spec, fn in cases:
        with lora_settings():
            LORA_LINEAR.DA_STREAM = spec == "da"
            if spec:
                LORA_LINEAR.set_paths("fwd=epilogue,dx=epilogue,dy=fused" if spec == "da" else spec)
            print(f"  host x[{M},{K}] -> {N}: {name}: {host_us(fn):.1f} us per call", flush=True)
    with lora_settings():
        LORA_LINEAR.set_paths("fwd=epilogue,dx=epilogue,dy=fused")
        LORA_LINEAR.DA_STREAM = False
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            lora()
        prof.disable()
        torch.cuda.synchronize()
        print(f"  host cProfile of {calls} lora_linear fwd+bwd calls (epilogue/epilogue/fused), by own time:", flush=True)
        st = pstats.Stats(prof, stream=sys.stdout)
        st.sort_stats("tottime").print_stats(25)


def bench_lora_group(N, H, outs, label, r=16, bias=False):
    """n LoRA projections on one x (q/k/v, gate/up): the base GEMMs, n separate lora_linear calls and one
    lora_linear_grouped call (default paths and cublas), fwd+bwd, do_bench and GPU kernel time."""
    x = torch.randn(N, H, device=DEV, dtype=DT, requires_grad=True)
    Ws = [torch.randn(m, H, device=DEV, dtype=DT) / H**0.5 for m in outs]
    bs = [torch.randn(m, device=DEV, dtype=DT) if bias else None for m in outs]
    As = [(torch.randn(r, H, device=DEV, dtype=DT) / H**0.5).requires_grad_(True) for _ in outs]
    Bs = [(torch.randn(m, r, device=DEV, dtype=DT) * 0.1).requires_grad_(True) for m in outs]
    dys = [torch.randn(N, m, device=DEV, dtype=DT) for m in outs]
    shape = f"x[{N},{H}] {label} r{r}"
    base = both(grad_fn(lambda: [F.linear(x, W, b) for W, b in zip(Ws, bs)], (x,), dys))
    row(f"{label} base matmuls fwd+bwd", shape, base)
    sep = both(grad_fn(lambda: [lora_linear(x, W, b, A, B, 2.0) for W, b, A, B in zip(Ws, bs, As, Bs)],
                       (x, *As, *Bs), dys))
    row(f"{label} {len(outs)}x lora_linear fwd+bwd", shape, sep,
        note=f"overhead vs base {100 * (sep[0] / base[0] - 1):+.1f}%{kernel_note(sep, base)}")
    for spec in ("default", "cublas"):
        with lora_settings():
            if spec != "default":
                LORA_LINEAR.set_paths(spec)
            grp = both(grad_fn(lambda: lora_linear_grouped(x, Ws, bs, As, Bs, [2.0] * len(outs)), (x, *As, *Bs), dys))
        row(f"{label} lora_linear_grouped fwd+bwd{'' if spec == 'default' else ' (paths ' + spec + ')'}", shape, grp,
            note=f"overhead vs base {100 * (grp[0] / base[0] - 1):+.1f}%{kernel_note(grp, base)}")
    ys = lora_linear_grouped(x, Ws, bs, As, Bs, [2.0] * len(outs))
    got = (*ys, *torch.autograd.grad(ys, (x, *As, *Bs), dys))
    x32 = x.detach().float().requires_grad_(True)
    A32, B32 = [a.detach().float().requires_grad_(True) for a in As], [b.detach().float().requires_grad_(True) for b in Bs]
    yr = [lora_linear_reference(x32, W.float(), None if b is None else b.float(), a, bb, 2.0)
          for W, b, a, bb in zip(Ws, bs, A32, B32)]
    ref = (*yr, *torch.autograd.grad(yr, (x32, *A32, *B32), [d.float() for d in dys]))
    check(f"{label} grouped y/dx/dA/dB {shape}", max(rel(a, e) for a, e in zip(got, ref)), 2e-2)


def bench_lora_qkv(N, H, r=16):
    D = 128
    hq, hk = H // D, max(2, H // D // 7)
    bench_lora_group(N, H, [hq * D, hk * D, hk * D], "qkv", r, bias=True)


def peak_extra(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_ce(N, H, V, weight_grad=False):
    h = torch.randn(N, H, device=DEV, dtype=DT, requires_grad=True)
    w = (torch.randn(V, H, device=DEV) / H**0.5).to(DT).requires_grad_(weight_grad)
    lab = torch.randint(0, V, (N,), device=DEV)
    lab[torch.rand(N, device=DEV) < 0.1] = -100
    ins = (h, w) if weight_grad else (h,)
    shape = f"[{N},{H}] V{V}" + (" +dW" if weight_grad else "")

    def fused():
        return torch.autograd.grad(fused_linear_cross_entropy(h, w, lab), ins)

    def unfused():
        return torch.autograd.grad(fused_linear_cross_entropy_reference(h, w, lab), ins)

    tf, tu = bench(fused, 5, 30), bench(unfused, 5, 30)
    mf, mu = peak_extra(fused), peak_extra(unfused)
    row("fused linear CE fwd+bwd", shape, tf, note=f"peak extra {mf:.0f} MiB")
    row("unfused CE fwd+bwd (fp32 logits)", shape, tu, note=f"peak extra {mu:.0f} MiB; fused/unfused mem = {mf / mu:.3f}")
    lf = fused_linear_cross_entropy(h, w, lab)
    gf = torch.autograd.grad(lf, ins)
    h32, w32 = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(weight_grad)
    lr = fused_linear_cross_entropy_reference(h32, w32, lab)
    gr = torch.autograd.grad(lr, (h32, w32) if weight_grad else (h32,))
    check(f"CE loss/grads {shape}", max([abs(lf.item() - lr.item()) / abs(lr.item())] + [rel(a, b) for a, b in zip(gf, gr)]), 2e-2)
    return mf, mu


def main():
    global PROFILE_ITERS
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="rms,rope,gated,nf4,lora,ce",
                    help="comma-separated groups: rms, rope, gated, nf4, lora, ce")
    ap.add_argument("--tune", action="store_true",
                    help="sweep the RMSNorm backward and RoPE launch shapes first (those of --only's rms, rope)")
    ap.add_argument("--tune-only", action="store_true", help="the --tune sweeps alone, then exit")
    ap.add_argument("--tune-dy", action="store_true",
                    help="lora group: sweep the fused dy pass's launch (DY_LAUNCH) at the LoRA shapes first")
    ap.add_argument("--lora-paths", action="store_true",
                    help="lora group: the LoRA-linear kernel paths and their parts alone, at the real shapes")
    ap.add_argument("--dy-ab", type=int, default=0, metavar="ROUNDS",
                    help="lora group: the dy path (cublas vs fused) inside whole fwd+bwd calls, ROUNDS interleaved "
                         "rounds with the base, at the kernel and anchor shapes; then exit")
    ap.add_argument("--host", action="store_true",
                    help="lora group: host (CPU) time per eager call of each path and a cProfile of the default "
                         "(then --dy-ab if given, else exit)")
    ap.add_argument("--iters", type=int, default=10,
                    help="calls per profiler measurement of GPU kernel time (more: steadier large shapes)")
    args = ap.parse_args()
    PROFILE_ITERS = args.iters
    only = set(args.only.split(","))
    assert torch.cuda.is_available(), "needs CUDA"
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    name = torch.cuda.get_device_name()
    print(f"# device {name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    copy_bw, copy_ms = copy_bandwidth()
    print(f"# device-to-device copy: {copy_bw:.0f} GB/s (1 GiB in {copy_ms:.3f} ms, read+write counted)", flush=True)
    N = 8192
    hiddens = [1536, 3584]
    inters = {1536: 8960, 3584: 18944}
    if "lora" in only and args.host:
        host_probe()
        print(f"\n# host probe done in {time.time() - t0:.0f} s", flush=True)
        if not args.dy_ab:
            return
    if "lora" in only and args.dy_ab:
        # the M = 8,192 kernel shapes, then the anchor's (4 x 1,024 tokens: q/o, k/v; 4 x 32 x 32 patches: vision
        # qkv, proj, fc1, fc2; the tiled MLP's 2,048-row tiles)
        dy_ab([(N, 1536, 1536), (N, 3584, 3584), (N, 18944, 3584), (N, 3584, 18944), (4096, 1536, 1536),
               (4096, 1536, 256), (4096, 1280, 3840), (4096, 1280, 1280), (4096, 1280, 5120), (4096, 5120, 1280),
               (2048, 1536, 8960), (2048, 8960, 1536)], args.dy_ab)
        print(f"\n# dy a/b done in {time.time() - t0:.0f} s", flush=True)
        return
    if "lora" in only and args.tune_dy:
        # the M = 8,192 kernel shapes, the tiled MLP's 2,048-row tiles, then the anchor's other dy shapes (4 x 1,024
        # tokens: q/o, k/v; 4 x 32 x 32 patches: vision qkv, proj/fc2, fc1)
        tune_dy(copy_bw, [(N, 1536), (N, 3584), (N, 18944), (2048, 8960), (2048, 1536), (4096, 1536), (4096, 256),
                          (4096, 3840), (4096, 1280), (4096, 5120)])
    if args.tune or args.tune_only:
        for H in hiddens:
            if "rms" in only:
                tune_dw_sum(2 * torch.cuda.get_device_properties(0).multi_processor_count, H)  # the backward's partial rows
                tune_rms(copy_bw, N, H)
                tune_rms(copy_bw, N, H, frozen=True)
            if "rope" in only:
                tune_rope(copy_bw, N, H)
        if args.tune_only:
            print(f"\n# tune done in {time.time() - t0:.0f} s", flush=True)
            return
    if "rms" in only:
        for H in hiddens:
            bench_rms(copy_bw, N, H)
    if "rope" in only:
        for H in hiddens:
            bench_rope(copy_bw, N, H)
    if "gated" in only:
        for H in hiddens:
            for act in ("silu", "gelu_tanh"):
                bench_gated(copy_bw, N, inters[H], act)
    nf4 = {}
    if "nf4" in only:
        for H in hiddens:
            nf4[H] = bench_nf4(copy_bw, H, H)
            bench_nf4(copy_bw, inters[H], H)
    if "lora" in only and args.lora_paths:
        for N_, K_, M_ in ((N, 1536, 1536), (N, 3584, 3584), (N, 3584, 18944), (N, 18944, 3584), (2048, 1536, 8960),
                           (2048, 8960, 1536)):
            bench_lora(N_, K_, M_, paths_only=True)
        bench_lora_group(4096, 1536, [8960, 8960], "gate/up")  # the eager gated MLP of Qwen2-VL-2B, 4 x 1,024 tokens
        bench_lora_qkv(4096, 1536)
    elif "lora" in only:
        for H in hiddens:
            bench_lora(N, H, H, nf4=nf4.get(H))
        bench_lora(N, 3584, 18944)
        bench_lora(N, 18944, 3584)
        bench_lora(2048, 1536, 8960)  # the anchor's tiled-MLP projections: 2,048-row tiles, Qwen2-VL-2B gate/up, down
        bench_lora(2048, 8960, 1536)
        bench_lora(N, 3584, 3584, adapter_dtype=torch.float32)
        for H in hiddens:
            bench_lora_qkv(N, H)
        bench_lora_group(4096, 1536, [8960, 8960], "gate/up")
    if "ce" in only:
        for H in hiddens:
            bench_ce(N, H, 151936)
        bench_ce(N, 1536, 151936, weight_grad=True)
        if not args.quick:
            bench_ce(2048, 1536, 262144)
    print(f"\n# done in {time.time() - t0:.0f} s\n")
    print(f"## {name}; copy bandwidth {copy_bw:.0f} GB/s\n")
    print("| kernel | shape | time ms (do_bench) | GPU kernel ms (profiler) | GB/s | % copy | note |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in ROWS:
        gbs = "" if r["gbs"] is None else f"{r['gbs']:.0f}"
        pct = "" if r["pct_copy"] is None else f"{r['pct_copy']:.0f}%"
        gm = "" if not r.get("kernel_ms") else f"{r['kernel_ms']:.4f}"
        print(f"| {r['kernel'].strip()} | {r['shape']} | {r['ms']:.4f} | {gm} | {gbs} | {pct} | {r['note']} |")
    print("\n| bf16 spot check | rel err | ok |\n|---|---:|---|")
    for c in CHECKS:
        print(f"| {c['check']} | {c['rel_err']:.2e} | {'yes' if c['ok'] else 'NO'} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(dict(device=name, copy_gbs=copy_bw, rows=ROWS, checks=CHECKS), f, indent=1)


if __name__ == "__main__":
    main()

"""LoRA linear ``y = x W^T (+ b) + s (x A^T) B^T`` as one Triton GEMM per direction, the rank-r work riding on
the base GEMM's tiles (W frozen, 16-bit).

Why: beside a cuBLAS base GEMM the rank-r products are separate kernels, and each makes a full pass over an
``[M, K]`` activation (x for ``xa`` and ``dA``, dy for ``g`` and ``dB``). At square shapes those passes cost as
much as a sizeable fraction of the GEMM itself (docs/kernels.md: +82% at 1536^2 with six rank-16 kernels, and a
floor of three passes, +10-17%, even with every product folded into a cuBLAS epilogue). Here the base GEMM is
ours, so the rank-r products read the tiles it already loads:

Forward, one kernel. Program ``(m, n)`` computes the tile ``y[m, n]``::

    for each k-block:  acc += x[m,k] W[n,k]^T ;  acc_xa += x[m,k] A[:,k]^T      # same x tile, in SMEM
    acc += (s acc_xa) B[n,:]^T  (+ b[n]);  y[m, n] = acc                         # epilogue, one rounding
    programs with n == 0 store xa[m] (for dB)

  Every n-column of programs recomputes ``xa[m]``: r / BLOCK_N more tensor-core work (6-12% of the GEMM's MMA
  for r=16) instead of a pass over x through HBM.

Backward, one kernel. Program ``(m, k)`` computes the tile ``dx[m, k]``::

    for each n-block:  acc += dy[m,n] W[n,k] ;  acc_g += dy[m,n] B[n,:]
    gs = s acc_g;  acc += gs A[:,k];  dx[m, k] = acc
    dA[:, k] += gs^T x[m, k]               # one x tile per program: x is read once in all, fp32 atomics
    dB[j, :] += dy[m, j]^T xa[m]           # for the n-blocks j = k, k + #k-blocks, ...: dy from L2, atomics

Two kernel families with that math: on Hopper and newer, for contiguous operands with 16-byte aligned rows, persistent
kernels that move tiles with TMA tensor descriptors (edge tiles read as zeros, stores clipped); elsewhere (strided
inputs, older GPUs, the interpreter's odd shapes) pointer-load kernels whose edge tiles wrap onto valid rows and
mask their stores and sums. Both are autotuned per (N, K, M rounded up to a power of two).

dA and dB are sums over the token blocks, accumulated with fp32 atomics (run-to-run order differences at the
1e-7 level, like :func:`harness.kernels.lora_linear._skinny_tn`); ``s`` of dB is applied to the ``[N, r]`` sum.

Measured on an H100 (docs/kernels.md, run 5): this is correct but not faster. Fwd+bwd kernel time over the cuBLAS base
is +91% at 1536^2 and +50% at 3584^2; :func:`harness.kernels.lora_linear.lora_linear` measures +104% and +24%. The
rank-16 MMA in the main loop costs ~30% of the GEMM, not its 6% of FLOPs, and the atomic dA/dB epilogues cost more
than separate passes. So the model patching does not use it. It stays as a tested function with
``benchmarks/lora_gemm_probe.py`` for the next attempt.

Ranks that are not a power of two >= 16 are zero-padded to the next one (``tl.dot`` needs 16). The reference is
:func:`harness.kernels.lora_linear.lora_linear_reference`; on CPU (without ``TRITON_INTERPRET=1``) and for
nf4 weights :func:`harness.kernels.lora_linear.lora_linear` runs instead.
"""

from __future__ import annotations

import torch

from ._triton_utils import HAS_TRITON, jit, next_pow2, tl, triton, use_triton
from .lora_linear import _compute_dtype, _skinny_tn, lora_linear, lora_linear_reference

__all__ = ["lora_gemm", "lora_gemm_reference", "LoRAGemmFunction", "base_gemm", "gemm_rank_epilogue",
           "gemm_dx_rank_epilogue"]

lora_gemm_reference = lora_linear_reference


@jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@jit
def _tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    # grouped order: GROUP_M row-blocks share their column sweep, so W tiles are reused from L2
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


@jit
def _main_loop(p_ptrs, q_ptrs, s_ptrs, step_p, step_q, step_s, red, acc, acc_s,
               HAS_SIDE: tl.constexpr, EVEN: tl.constexpr, BLOCK_RED: tl.constexpr, IEEE: tl.constexpr):
    """The pointer kernels' loop over the reduction dim: ``acc += P Q`` and, with ``HAS_SIDE``, ``acc_s += P S`` from
    the same P tile (forward: P = x, Q = W^T, S = A^T; backward: P = dy, Q = W, S = B). P tiles are
    [rows, BLOCK_RED], Q and S tiles [BLOCK_RED, cols]; ``red`` is the reduction length (masked unless ``EVEN``)."""
    o = tl.arange(0, BLOCK_RED)
    for i in range(0, tl.cdiv(red, BLOCK_RED)):
        if EVEN:
            p = tl.load(p_ptrs)
            q = tl.load(q_ptrs)
        else:
            mask = o < red - i * BLOCK_RED
            p = tl.load(p_ptrs, mask=mask[None, :], other=0.0)
            q = tl.load(q_ptrs, mask=mask[:, None], other=0.0)
        acc = _mma(p, q, acc, IEEE)
        if HAS_SIDE:
            if EVEN:
                side = tl.load(s_ptrs)
            else:
                side = tl.load(s_ptrs, mask=mask[:, None], other=0.0)
            acc_s = _mma(p, side, acc_s, IEEE)
            s_ptrs += BLOCK_RED * step_s
        p_ptrs += BLOCK_RED * step_p
        q_ptrs += BLOCK_RED * step_q
    return acc, acc_s


@jit
def _lora_fwd_kernel(
    X, W, A, B, BIAS, Y, XA,
    M, N, K, scale,
    sxm, sxk, swn, swk, sar, sak, sbn, sbr, sym, syn, sxam, M_BUCKET,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_XA: tl.constexpr, EVEN_K: tl.constexpr,
    XA_IN: tl.constexpr, SIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, IEEE: tl.constexpr,
):
    # XA_IN: xa [M, BLOCK_R] is given (computed beforehand), so the main loop is the plain GEMM (SIDE False) and
    # only the epilogue adds (s xa) B^T. Otherwise SIDE == HAS_LORA: xa is accumulated from the x tiles.
    pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrapped row/column indices: edge tiles load valid memory without masks; the store is masked
    om = (rm % M).to(tl.int64)
    on = (rn % N).to(tl.int64)
    ok = tl.arange(0, BLOCK_K)
    orr = tl.arange(0, BLOCK_R)
    x_ptrs = X + om[:, None] * sxm + ok[None, :] * sxk
    w_ptrs = W + ok[:, None] * swk + on[None, :] * swn  # [BLOCK_K, BLOCK_N] view of W^T
    a_ptrs = A + ok[:, None] * sak + orr[None, :] * sar  # [BLOCK_K, BLOCK_R] view of A^T
    acc, acc_xa = _main_loop(x_ptrs, w_ptrs, a_ptrs, sxk, swk, sak, K,
                             tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                             tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), SIDE, EVEN_K, BLOCK_K, IEEE)
    mmask = rm < M
    if HAS_LORA:
        if XA_IN:
            acc_xa = tl.load(XA + om[:, None] * sxam + orr[None, :]).to(tl.float32)  # wrapped rows: valid memory
        elif STORE_XA:
            if pid_n == 0:
                tl.store(XA + rm[:, None].to(tl.int64) * sxam + orr[None, :], acc_xa.to(XA.dtype.element_ty),
                         mask=mmask[:, None])
        bt = tl.load(B + on[None, :] * sbn + orr[:, None] * sbr)  # [BLOCK_R, BLOCK_N] view of B^T
        acc = _mma((acc_xa * scale).to(bt.dtype), bt, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(BIAS + on).to(tl.float32)[None, :]
    y_ptrs = Y + rm[:, None].to(tl.int64) * sym + rn[None, :] * syn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mmask[:, None] & (rn < N)[None, :])


@jit
def _lora_bwd_kernel(
    DY, W, A, B, X, XA, G, DX, DA, DB,
    M, N, K, scale,
    sdm, sdn, swn, swk, sar, sak, sbn, sbr, sxm, sxk, sxam, sgm, sxm_out, sxk_out, M_BUCKET,
    HAS_LORA: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, EVEN_N: tl.constexpr,
    G_IN: tl.constexpr, SIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, IEEE: tl.constexpr,
):
    # dx [M, K] = dy [M, N] @ W [N, K] (+ s (dy B) A): output tiles BLOCK_M x BLOCK_K, reduction over N.
    # G_IN: gs = s dy B [M, BLOCK_R] is given, so the main loop is the plain GEMM (SIDE False), the epilogue adds
    # gs A, and dA / dB are left to the caller (NEED_DA = NEED_DB = False).
    num_k = tl.cdiv(K, BLOCK_K)
    pid_m, pid_k = _tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_k, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    om = (rm % M).to(tl.int64)
    okk = (rk % K).to(tl.int64)
    on = tl.arange(0, BLOCK_N)
    orr = tl.arange(0, BLOCK_R)
    dy_ptrs = DY + om[:, None] * sdm + on[None, :] * sdn
    w_ptrs = W + on[:, None].to(tl.int64) * swn + okk[None, :] * swk
    b_ptrs = B + on[:, None] * sbn + orr[None, :] * sbr
    acc, acc_g = _main_loop(dy_ptrs, w_ptrs, b_ptrs, sdn, swn, sbn, N,
                            tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32),
                            tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), SIDE, EVEN_N, BLOCK_N, IEEE)
    mmask = rm < M
    kmask = rk < K
    if HAS_LORA:
        if G_IN:
            gs = tl.load(G + om[:, None] * sgm + orr[None, :])
        else:
            # rows past M (wrapped loads) must not reach the dA / dB sums
            gs = tl.where(mmask[:, None], acc_g * scale, 0.0).to(DX.dtype.element_ty)
        a = tl.load(A + orr[:, None] * sar + okk[None, :] * sak)  # [BLOCK_R, BLOCK_K]
        acc = _mma(gs, a, acc, IEEE)
    tl.store(DX + rm[:, None].to(tl.int64) * sxm_out + rk[None, :] * sxk_out, acc.to(DX.dtype.element_ty),
             mask=mmask[:, None] & kmask[None, :])
    if HAS_LORA:
        if NEED_DA:
            x = tl.load(X + om[:, None] * sxm + okk[None, :] * sxk)
            da = _mma(tl.trans(gs), x, tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32), IEEE)
            tl.atomic_add(DA + orr[:, None] * K + rk[None, :], da, mask=kmask[None, :])
        if NEED_DB:
            xa = tl.load(XA + om[:, None] * sxam + orr[None, :], mask=mmask[:, None], other=0.0)
            num_n = tl.cdiv(N, BLOCK_N)
            for j in range(pid_k, num_n, num_k):
                rn = j * BLOCK_N + on
                nmask2 = rn < N
                dy = tl.load(DY + om[:, None] * sdm + rn[None, :] * sdn, mask=nmask2[None, :], other=0.0)
                db = _mma(tl.trans(dy), xa, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), IEEE)
                tl.atomic_add(DB + rn[:, None] * BLOCK_R + orr[None, :], db, mask=nmask2[:, None])


# --------------------------------------------------------------------- TMA (Hopper+) persistent variants
# Same math, tiles moved by the tensor-memory accelerator (tensor descriptors): no address arithmetic in the
# loop, out-of-bounds rows/columns read as zeros and are clipped on store (so no masks and no row wrapping),
# one program per SM walking the tiles. Needs 16-byte aligned row strides (K, N multiples of 8 in 16-bit).

@jit
def _lora_fwd_tma_kernel(
    X, W, A, B, BIAS, Y, XA, M, N, K, scale, M_BUCKET,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_XA: tl.constexpr, XA_IN: tl.constexpr, SIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, IEEE: tl.constexpr,
):
    xd = tl.make_tensor_descriptor(X, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    wd = tl.make_tensor_descriptor(W, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    yd = tl.make_tensor_descriptor(Y, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    ad = tl.make_tensor_descriptor(A, shape=[BLOCK_R, K], strides=[K, 1], block_shape=[BLOCK_R, BLOCK_K])
    bd = tl.make_tensor_descriptor(B, shape=[N, BLOCK_R], strides=[BLOCK_R, 1], block_shape=[BLOCK_N, BLOCK_R])
    xad = tl.make_tensor_descriptor(XA, shape=[M, BLOCK_R], strides=[BLOCK_R, 1], block_shape=[BLOCK_M, BLOCK_R])
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n = _tile(tile, num_m, num_n, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            x = xd.load([m0, kb * BLOCK_K])
            acc = _mma(x, wd.load([n0, kb * BLOCK_K]).T, acc, IEEE)
            if SIDE:
                acc_xa = _mma(x, ad.load([0, kb * BLOCK_K]).T, acc_xa, IEEE)
        if HAS_LORA:
            if XA_IN:
                acc_xa = xad.load([m0, 0]).to(tl.float32)
            elif STORE_XA:
                if pid_n == 0:
                    xad.store([m0, 0], acc_xa.to(Y.dtype.element_ty))
            acc = _mma((acc_xa * scale).to(Y.dtype.element_ty), bd.load([n0, 0]).T, acc, IEEE)
        if HAS_BIAS:
            rn = n0 + tl.arange(0, BLOCK_N)
            acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        yd.store([m0, n0], acc.to(Y.dtype.element_ty))


@jit
def _lora_bwd_tma_kernel(
    DY, W, A, B, X, XA, G, DX, DA, DB, M, N, K, scale, M_BUCKET,
    HAS_LORA: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, G_IN: tl.constexpr, SIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, IEEE: tl.constexpr,
):
    dyd = tl.make_tensor_descriptor(DY, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    wd = tl.make_tensor_descriptor(W, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    dxd = tl.make_tensor_descriptor(DX, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    bd = tl.make_tensor_descriptor(B, shape=[N, BLOCK_R], strides=[BLOCK_R, 1], block_shape=[BLOCK_N, BLOCK_R])
    ad = tl.make_tensor_descriptor(A, shape=[BLOCK_R, K], strides=[K, 1], block_shape=[BLOCK_R, BLOCK_K])
    xd = tl.make_tensor_descriptor(X, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    xad = tl.make_tensor_descriptor(XA, shape=[M, BLOCK_R], strides=[BLOCK_R, 1], block_shape=[BLOCK_M, BLOCK_R])
    gd = tl.make_tensor_descriptor(G, shape=[M, BLOCK_R], strides=[BLOCK_R, 1], block_shape=[BLOCK_M, BLOCK_R])
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    num_n = tl.cdiv(N, BLOCK_N)
    orr = tl.arange(0, BLOCK_R)
    for tile in tl.range(tl.program_id(0), num_m * num_k, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_k = _tile(tile, num_m, num_k, GROUP_M)
        m0 = pid_m * BLOCK_M
        k0 = pid_k * BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for nb in range(0, num_n):
            dy = dyd.load([m0, nb * BLOCK_N])
            acc = _mma(dy, wd.load([nb * BLOCK_N, k0]), acc, IEEE)
            if SIDE:
                acc_g = _mma(dy, bd.load([nb * BLOCK_N, 0]), acc_g, IEEE)
        if HAS_LORA:
            if G_IN:
                gs = gd.load([m0, 0])
            else:
                # rows past M were loaded as zeros, so their g is 0 and they add nothing to dA / dB
                gs = (acc_g * scale).to(DX.dtype.element_ty)
            acc = _mma(gs, ad.load([0, k0]), acc, IEEE)
        dxd.store([m0, k0], acc.to(DX.dtype.element_ty))
        if HAS_LORA:
            if NEED_DA:
                rk = k0 + tl.arange(0, BLOCK_K)
                da = _mma(gs.T, xd.load([m0, k0]), tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32), IEEE)
                tl.atomic_add(DA + orr[:, None] * K + rk[None, :], da, mask=(rk < K)[None, :])
            if NEED_DB:
                xa = xad.load([m0, 0])
                for j in range(pid_k, num_n, num_k):
                    rn = j * BLOCK_N + tl.arange(0, BLOCK_N)
                    db = _mma(dyd.load([m0, j * BLOCK_N]).T, xa, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32),
                              IEEE)
                    tl.atomic_add(DB + rn[:, None] * BLOCK_R + orr[None, :], db, mask=(rn < N)[:, None])


# ---------------------------------------------------------------------------------------------- launch configs

# Hopper/Ampere bf16 GEMM launch shapes: (output tile rows, output tile cols, reduction step, stages, warps).
# The forward's output tile is BLOCK_M x BLOCK_N with reduction step BLOCK_K; the backward's output tile is
# BLOCK_M x BLOCK_K (dx has K columns) with reduction step BLOCK_N.
_GEMM_SHAPES = [(128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (128, 128, 64, 4, 4), (128, 128, 64, 4, 8),
                (256, 128, 64, 3, 8), (128, 128, 128, 3, 8)]
_INTERP = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}  # small: odd shapes span several tiles
_INTERP_PROGS = 3  # persistent kernels in the interpreter: fewer programs than tiles, so each walks several


def _configs(out_cols: str, red: str, **extra):
    return [triton.Config({"BLOCK_M": bm, out_cols: bn, red: bk, "GROUP_M": 8, **extra}, num_stages=st,
                          num_warps=wp) for bm, bn, bk, st, wp in _GEMM_SHAPES]


# keyed on the shape, with M bucketed to a power of two (token counts vary from batch to batch), and on whether
# the LoRA parts are compiled in (the plain GEMM of base_gemm is tuned on its own)
_TUNE_KEY = ["N", "K", "M_BUCKET", "HAS_LORA", "SIDE"]

if HAS_TRITON:
    _TUNED = {
        _lora_fwd_kernel: triton.autotune(_configs("BLOCK_N", "BLOCK_K"), key=_TUNE_KEY)(_lora_fwd_kernel),
        _lora_bwd_kernel: triton.autotune(_configs("BLOCK_K", "BLOCK_N"), key=_TUNE_KEY,
                                                   reset_to_zero=["DA", "DB"])(_lora_bwd_kernel),
        _lora_fwd_tma_kernel: triton.autotune(_configs("BLOCK_N", "BLOCK_K", FLATTEN=True),
                                                      key=_TUNE_KEY)(_lora_fwd_tma_kernel),
        _lora_bwd_tma_kernel: triton.autotune(_configs("BLOCK_K", "BLOCK_N", FLATTEN=True), key=_TUNE_KEY,
                                                      reset_to_zero=["DA", "DB"])(_lora_bwd_tma_kernel),
    }  # reset_to_zero: each timing run sums afresh

def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def _tma_ready(device: torch.device) -> None:
    """Device-side tensor descriptors need a scratch allocation per launch, which Triton asks of the allocator
    set with ``triton.set_allocator``. That setting is a context variable: set in the forward's thread, it is
    unset in autograd's backward thread, so it is set before every TMA launch (a context-variable store), from
    torch's caching allocator (CUDA-graph safe)."""
    triton.set_allocator(_scratch)


def _tma_eligible(*ts: torch.Tensor) -> bool:
    """TMA path: Hopper or newer, contiguous operands, 16-byte aligned rows and bases."""
    if not ts[0].is_cuda or torch.cuda.get_device_capability(ts[0].device)[0] < 9:
        return False
    return all(t.is_contiguous() and (t.shape[-1] * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in ts)


def _launch(kernel, tma, tiles, args, meta, M, device, sums=None):
    """Run ``kernel`` (autotuned on CUDA, fixed small tiles in the interpreter). ``tiles(meta)``: the number of
    output tiles; a TMA kernel is persistent (at most one program per SM)."""
    if tma:
        _tma_ready(device)
    if device.type == "cuda":
        tuned = _TUNED[kernel]
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        grid = (lambda m: (min(sms, tiles(m)),)) if tma else (lambda m: (tiles(m),))
        tuned_before = len(tuned.cache)
        tuned[grid](*args, next_pow2(M), **meta)
        if sums is not None and len(tuned.cache) > tuned_before:
            # this call tuned a new shape: the timing runs added into the atomic sums too (whether the autotuner
            # re-zeroes them before its final run differs between Triton versions), so run it once more, clean
            sums.zero_()
            tuned[grid](*args, next_pow2(M), **meta)
    else:
        extra = {"FLATTEN": True} if tma else {}
        n = min(_INTERP_PROGS, tiles(_INTERP)) if tma else tiles(_INTERP)
        kernel[(n,)](*args, next_pow2(M), **_INTERP, **extra, **meta, num_warps=4, num_stages=1)


def _fwd(x2, W, A, B, bias, scale, has_lora=True, store_xa=True, tma=None, xa_in=None):
    """``y = x2 W^T (+ bias) + scale (x2 A^T) B^T``; returns (y, xa). ``xa_in``: xa given ([M, R], R = A's rows),
    so the kernel runs the plain GEMM and adds the rank-r term in its epilogue (A is then not read)."""
    M, K = x2.shape
    N = W.shape[0]
    R = A.shape[0]
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if xa_in is not None:
        xa, store_xa = xa_in, False
    else:
        xa = torch.empty((M, R), dtype=x2.dtype, device=x2.device) if (has_lora and store_xa) else y
    tensors = (x2, W, A, B, y) if xa_in is None else (x2, W, A, B, y, xa_in)
    tma = _tma_eligible(*tensors) if tma is None else tma
    tiles = lambda m: triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"])  # noqa: E731
    meta = dict(HAS_LORA=has_lora, HAS_BIAS=bias is not None, STORE_XA=has_lora and store_xa, BLOCK_R=R,
                XA_IN=xa_in is not None, SIDE=has_lora and xa_in is None, IEEE=x2.dtype == torch.float32)
    b = bias if bias is not None else y
    if tma:
        _launch(_lora_fwd_tma_kernel, True, tiles, (x2, W, A, B, b, y, xa, M, N, K, float(scale)), meta, M,
                x2.device)
    else:
        _launch(_lora_fwd_kernel, False, tiles,
                (x2, W, A, B, b, y, xa, M, N, K, float(scale), x2.stride(0), x2.stride(1), W.stride(0), W.stride(1),
                 A.stride(0), A.stride(1), B.stride(0), B.stride(1), y.stride(0), y.stride(1), xa.stride(0)),
                dict(meta, EVEN_K=K % 128 == 0), M, x2.device)
    return y, xa


def _bwd(dy2, x2, W, A, B, xa, scale, need_da, need_db, has_lora=True, tma=None, g_in=None):
    """``dx = dy2 W + scale (dy2 B) A`` and the dA / dB sums; returns (dx, dA, dB). ``g_in``: ``scale dy2 B``
    given ([M, R]), so the kernel runs the plain GEMM and adds ``g_in A`` in its epilogue (no dA / dB; x2, B and
    xa are not read)."""
    M, N = dy2.shape
    K = W.shape[1]
    R = A.shape[0]
    dx = torch.empty((M, K), dtype=dy2.dtype, device=dy2.device)
    if g_in is not None:
        need_da = need_db = False
    if has_lora and (need_da or need_db):  # one zeroed fp32 buffer for both atomic sums
        sums = torch.zeros(R * K + N * R, dtype=torch.float32, device=dy2.device)
        dA, dB = sums[: R * K].view(R, K), sums[R * K:].view(N, R)
    else:
        sums, dA, dB = None, dx, dx
    g = xa if g_in is None else g_in  # (unread without g_in)
    tensors = (dy2, x2, W, A, B, xa, dx) if g_in is None else (dy2, W, A, g_in, dx)
    tma = _tma_eligible(*tensors) if tma is None else tma
    tiles = lambda m: triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(K, m["BLOCK_K"])  # noqa: E731
    meta = dict(HAS_LORA=has_lora, NEED_DA=need_da, NEED_DB=need_db, BLOCK_R=R, G_IN=g_in is not None,
                SIDE=has_lora and g_in is None, IEEE=dy2.dtype == torch.float32)
    if tma:
        _launch(_lora_bwd_tma_kernel, True, tiles, (dy2, W, A, B, x2, xa, g, dx, dA, dB, M, N, K, float(scale)),
                meta, M, dy2.device, sums=sums)
    else:
        _launch(_lora_bwd_kernel, False, tiles,
                (dy2, W, A, B, x2, xa, g, dx, dA, dB, M, N, K, float(scale), dy2.stride(0), dy2.stride(1),
                 W.stride(0), W.stride(1), A.stride(0), A.stride(1), B.stride(0), B.stride(1), x2.stride(0),
                 x2.stride(1), xa.stride(0), g.stride(0), dx.stride(0), dx.stride(1)),
                dict(meta, EVEN_N=N % 128 == 0), M, dy2.device, sums=sums)
    return dx, dA, dB


def base_gemm(x2: torch.Tensor, W: torch.Tensor, tma=None) -> torch.Tensor:
    """``x @ W^T`` by the same Triton GEMM with the LoRA parts compiled out (benchmarks: the GEMM's own speed)."""
    tma = _tma_eligible(x2, W) if tma is None else tma
    A, B = W.new_empty(16, W.shape[1]), W.new_empty(W.shape[0], 16)  # never read
    return _fwd(x2, W, A, B, None, 1.0, has_lora=False, tma=tma)[0]


def base_gemm_dx(dy2: torch.Tensor, W: torch.Tensor, tma=None) -> torch.Tensor:
    """``dy @ W`` by the backward kernel with the LoRA parts compiled out."""
    tma = _tma_eligible(dy2, W) if tma is None else tma
    A, B, xa = W.new_empty(16, W.shape[1]), W.new_empty(W.shape[0], 16), dy2.new_empty(dy2.shape[0], 16)
    return _bwd(dy2, dy2, W, A, B, xa, 1.0, False, False, has_lora=False, tma=tma)[0]  # x (dy2), A, B, xa: unread


def gemm_rank_epilogue(x2, W, xa, B, bias, scale: float, tma=None) -> torch.Tensor:
    """``y = x2 W^T (+ bias) + scale xa B^T`` with ``xa = x2 A^T`` ([M, r]) computed beforehand: the plain Triton
    GEMM, the rank-r product and the bias added in its epilogue, so y is written once and never re-read (beside
    cuBLAS the rank-r term is an [M, N] tensor written, then read back as the GEMM's C)."""
    dt = x2.dtype
    R = max(16, next_pow2(xa.shape[1]))
    xa_p, B_p = _padded(xa, 1, R, dt), _padded(B, 1, R, dt)
    b = None if bias is None else bias.to(dt)
    return _fwd(x2, W, W.new_empty(R, W.shape[1]), B_p, b, scale, tma=tma, xa_in=xa_p)[0]  # (A: unread)


def gemm_dx_rank_epilogue(dy2, W, gs, A, tma=None) -> torch.Tensor:
    """``dx = dy2 W + gs A`` with ``gs = s dy2 B`` ([M, r]) computed beforehand: the plain Triton GEMM with the
    rank-r product added in its epilogue (dx written once)."""
    dt = dy2.dtype
    R = max(16, next_pow2(gs.shape[1]))
    gs_p, A_p = _padded(gs, 1, R, dt), _padded(A, 0, R, dt)
    B = W.new_empty(W.shape[0], R)  # unread
    return _bwd(dy2, dy2, W, A_p, B, gs_p, 1.0, False, False, tma=tma, g_in=gs_p)[0]


def _padded(t: torch.Tensor, dim: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, contiguous, zero-padded along ``dim`` to ``size`` (a no-op in the usual r=16 case)."""
    t = t.to(dtype).contiguous()
    if t.shape[dim] == size:
        return t
    pad = list(t.shape)
    pad[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(pad)], dim)


class LoRAGemmFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale):
        cdt = _compute_dtype(x)
        K = x.shape[-1]
        r = lora_A.shape[0]
        R = max(16, next_pow2(r))
        x2 = x.reshape(-1, K)
        x2 = x2 if x2.dtype == cdt else x2.to(cdt)
        W = weight if weight.dtype == cdt else weight.to(cdt)
        A, B = _padded(lora_A, 0, R, cdt), _padded(lora_B, 1, R, cdt)
        b = None if bias is None else bias.to(cdt)
        y, xa = _fwd(x2, W, A, B, b, scale)
        ctx.save_for_backward(x2, xa, weight, A, B, bias)
        ctx.scale, ctx.r, ctx.cdt = scale, r, cdt
        ctx.in_shape, ctx.x_dtype, ctx.ab_dtypes = x.shape, x.dtype, (lora_A.dtype, lora_B.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, weight, A, B, bias = ctx.saved_tensors
        s, r, cdt = ctx.scale, ctx.r, ctx.cdt
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dy2 = dy2 if dy2.dtype == cdt else dy2.to(cdt)
        dx = dw = db = dA = dB = None
        if need_x:
            W = weight if weight.dtype == cdt else weight.to(cdt)
            dx, dA_sum, dB_sum = _bwd(dy2, x2, W, A, B, xa, s, need_a, need_bb)
            dx = dx.view(ctx.in_shape)
            if dx.dtype != ctx.x_dtype:
                dx = dx.to(ctx.x_dtype)
            if need_a:
                dA = dA_sum[:r].to(ctx.ab_dtypes[0])
            if need_bb:
                dB = (dB_sum[:, :r] * s).to(ctx.ab_dtypes[1])
        else:  # no dx GEMM to ride on: the rank-r products alone
            if need_a:
                g = torch.mm(dy2, B)
                dA = _skinny_tn(g, x2, s, ctx.ab_dtypes[0])[:r]
            if need_bb:
                dB = _skinny_tn(xa, dy2, s, ctx.ab_dtypes[1], t=True)[:, :r].contiguous()
        if need_w:
            dw = torch.mm(dy2.t(), x2).to(weight.dtype)
        if need_b and bias is not None:
            db = dy2.sum(0).to(bias.dtype)
        return dx, dw, db, dA, dB, None


def lora_gemm(x, weight, bias, lora_A, lora_B, scale: float):
    """LoRA linear by the fused Triton GEMMs (see module docstring); same arguments as
    :func:`harness.kernels.lora_linear.lora_linear` without ``nf4``. Falls back to it where Triton cannot run
    (CPU without the interpreter) or the weight is not a plain 16-bit/fp32 tensor."""
    if weight is None or not use_triton(x, weight, lora_A, lora_B) or weight.dtype not in (
            torch.float16, torch.bfloat16, torch.float32):
        return lora_linear(x, weight, bias, lora_A, lora_B, scale)
    return LoRAGemmFunction.apply(x, weight, bias, lora_A, lora_B, float(scale))

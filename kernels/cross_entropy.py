"""Fused linear + cross-entropy that never materialises the ``[N, V]`` logits.

``loss = CE(hidden @ weight^T, labels)`` (mean over tokens whose label != ignore_index, or sum
divided by ``num_items_in_batch`` when given), with optional Gemma-style logit soft-capping
``z = cap * tanh(z / cap)``.

Rows are processed in chunks: for each chunk the logits ``[C, V]`` are computed with cuBLAS (in
the activation dtype), a Triton kernel does an online logsumexp per row (fp32) and overwrites the
logits in place with the gradient ``(softmax - onehot) / n``, then ``dHidden = grad @ W`` and
(only if the weight requires grad) ``dW += grad^T @ hidden``. The gradients are computed in the
forward pass and scaled by the incoming grad in backward, so peak extra memory is one chunk of
logits plus dHidden (plus dW when the head is trained).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton_utils import jit, next_pow2, tl, use_triton

__all__ = [
    "fused_linear_cross_entropy",
    "top1_hits",
    "fused_linear_cross_entropy_reference",
    "FusedLinearCrossEntropyFunction",
]


def fused_linear_cross_entropy_reference(
    hidden, weight, labels, ignore_index: int = -100, softcap: float | None = None, num_items_in_batch=None,
    bias=None,
):
    """Unfused: logits materialised (fp32 upcast, like transformers' ``ForCausalLMLoss``)."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss


@jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@jit
def _ce_chunk_kernel(
    LOGITS, stride_l, LABELS, LOSS, TOP1,
    V, ignore_index, inv_n, softcap,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    label = tl.load(LABELS + row).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    # pass 1: online max / sum-exp (fp32)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        if SOFTCAP:
            z = softcap * _tanh(z / softcap)
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_safe) + tl.exp(z - m_safe)
        m = m_new
    m_row = tl.max(m, axis=0)
    d_row = tl.sum(d * tl.exp(m - m_row), axis=0)
    lse = m_row + tl.log(d_row)
    if label == ignore_index:
        # ignored row: zero loss, zero gradient
        tl.store(LOSS + row, 0.0)
        tl.store(TOP1 + row, 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            tl.store(base + cols, tl.zeros([BLOCK_V], dtype=tl.float32).to(LOGITS.dtype.element_ty), mask=cols < V)
    else:
        z_label = tl.load(base + label).to(tl.float32)
        if SOFTCAP:
            z_label = softcap * _tanh(z_label / softcap)
        tl.store(LOSS + row, (lse - z_label) * inv_n)
        # the label is the model's top-1 prediction (its logit is the row's maximum; ties count)
        tl.store(TOP1 + row, (z_label >= m_row).to(tl.float32))
        # pass 2: gradient wrt the (pre-softcap) logits, written in place
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            cmask = cols < V
            z = tl.load(base + cols, mask=cmask, other=0.0).to(tl.float32)
            if SOFTCAP:
                t = _tanh(z / softcap)
                p = tl.exp(softcap * t - lse)
                g = tl.where(cols == label, p - 1.0, p) * (1.0 - t * t)
            else:
                p = tl.exp(z - lse)
                g = tl.where(cols == label, p - 1.0, p)
            tl.store(base + cols, (g * inv_n).to(LOGITS.dtype.element_ty), mask=cmask)


def _default_chunk(n: int, v: int, h: int, elem: int) -> int:
    # chunk logits of ~ 128-256 MiB (the chunk is the loss's whole transient memory), and at least
    # 256 rows, enough for a GEMM that fills the GPU
    budget = 256 * 2**20
    c = max(256, budget // max(1, v * elem))
    c = 1 << (c.bit_length() - 1)
    return max(1, min(n, c))


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, softcap, denom, chunk_size, kept=None, top1=None):
        H = hidden.shape[-1]
        h2 = hidden.reshape(-1, H)
        lab = labels.reshape(-1)
        N, V = h2.shape[0], weight.shape[0]
        dev = hidden.device
        cdt = hidden.dtype
        if torch.is_autocast_enabled(dev.type):
            cdt = torch.get_autocast_dtype(dev.type)
            h2 = h2.to(cdt)
        W = weight if weight.dtype == cdt else weight.to(cdt)
        b = None if bias is None else bias.to(cdt)
        if kept is None:
            keep = lab != ignore_index
            n_keep = int(keep.sum().item())  # one host sync (the mean's denominator needs it anyway)
        else:  # the rows with a label, known on the host (harness.host_prep): no device read
            kept_rows, n_keep = kept
        inv_t = None  # 1 / num_items_in_batch as a device tensor: applied to the loss and in backward
        if denom is None:
            inv_n = 1.0 / max(float(n_keep), 1.0)
        elif torch.is_tensor(denom):
            # the Trainer counts the batch's labels on the device: reading that count here would be a host
            # sync, so the kernel computes the sum's gradient and the division happens on the device
            inv_t = 1.0 / denom.to(device=dev, dtype=torch.float32, non_blocking=True)
            inv_n = 1.0
        else:
            inv_n = 1.0 / float(denom)
        need_w = weight.requires_grad
        need_h = hidden.requires_grad
        need_b = bias is not None and bias.requires_grad
        # rows whose label is ignored contribute nothing (loss 0, gradient 0): leave them out of the
        # logits GEMMs (image and prompt tokens are often a quarter or more of a VLM batch)
        if n_keep >= N:
            rows = None
        else:
            rows = keep.nonzero().squeeze(1) if kept is None else kept_rows
        dh_full = torch.zeros((N, H), dtype=cdt, device=dev) if (need_h and rows is not None) else None
        if rows is not None:
            h2, lab, N = h2.index_select(0, rows), lab.index_select(0, rows), n_keep
        dh = torch.empty((N, H), dtype=cdt, device=dev) if need_h else None
        dw = torch.zeros((V, H), dtype=cdt, device=dev) if need_w else None  # accumulated in cdt
        dbias = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
        losses = torch.empty(N, dtype=torch.float32, device=dev)
        hits = torch.empty(N, dtype=torch.float32, device=dev)  # 1 where the label is the top-1 logit
        C = chunk_size or _default_chunk(N, V, H, torch.finfo(cdt).bits // 8)
        block_v = min(4096, next_pow2(V))
        with torch.autocast(device_type=dev.type, enabled=False):
            for s0 in range(0, N, C):
                s1 = min(N, s0 + C)
                hc = h2[s0:s1]
                logits = torch.addmm(b, hc, W.t()) if b is not None else torch.mm(hc, W.t())
                lab_c = lab[s0:s1]
                if not lab_c.is_contiguous():
                    lab_c = lab_c.contiguous()
                _ce_chunk_kernel[(s1 - s0,)](
                    logits, logits.stride(0), lab_c, losses[s0:s1], hits[s0:s1],
                    V, ignore_index, inv_n, float(softcap or 0.0),
                    SOFTCAP=bool(softcap), BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
                )
                # logits now hold d(loss)/d(logits)
                if need_h:
                    torch.mm(logits, W, out=dh[s0:s1])
                if need_w:
                    dw.addmm_(logits.t(), hc)
                if need_b:
                    dbias += logits.float().sum(0)
                del logits
        loss = losses.sum()
        if top1 is not None:  # the caller's running count of top-1 hits (a metric: read at logging time)
            top1 += hits.sum()
        if inv_t is not None:
            loss = loss * inv_t
        if rows is not None and need_h:
            dh = dh_full.index_copy_(0, rows, dh)
        ctx.save_for_backward(dh, dw, dbias)
        ctx.inv_t = inv_t
        ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw, dbias = ctx.saved_tensors
        h_shape, h_dtype, w_dtype, b_dtype = ctx.shapes
        if ctx.inv_t is not None:
            grad_out = grad_out * ctx.inv_t  # the division by a device-side num_items_in_batch
        # scaled always: asking whether grad_out is 1 would be a host sync (dh is small; dw exists only when
        # the LM head trains)
        if dh is not None:
            dh = (dh * grad_out.to(dh.dtype)).view(h_shape).to(h_dtype)
        if dw is not None:
            dw = (dw * grad_out.to(dw.dtype)).to(w_dtype)
        if dbias is not None:
            dbias = (dbias * grad_out).to(b_dtype)
        return dh, dw, None, dbias, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    num_items_in_batch=None,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    kept: tuple[torch.Tensor, int] | None = None,
    top1: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean CE of ``hidden @ weight^T`` vs ``labels`` without materialising the logits.

    hidden ``[..., H]``, weight ``[V, H]``, labels ``[...]`` (already shifted). With
    ``num_items_in_batch`` the loss is ``sum / num_items_in_batch`` (transformers' convention for
    gradient accumulation). Falls back to the unfused reference without Triton.

    ``kept``: (the flat indices of the rows whose label is not ``ignore_index``, on the device, and their
    count), when the caller knows them from the host (harness.host_prep): then the kernel reads no device
    value on the host. They must match ``labels``; nothing checks that (checking would be the sync).

    ``top1``: a float32 scalar tensor on the device; the number of labelled rows whose label is the top-1
    logit is added to it (token accuracy, without a host read).
    """
    if use_triton(hidden, weight):
        return FusedLinearCrossEntropyFunction.apply(
            hidden, weight, labels, bias, int(ignore_index), softcap, num_items_in_batch, chunk_size, kept, top1
        )
    h2, lab = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if top1 is not None:
        top1 += top1_hits(h2, weight, lab, ignore_index, softcap, bias)
    return fused_linear_cross_entropy_reference(h2, weight, lab, ignore_index, softcap, num_items_in_batch, bias)


def top1_hits(hidden, weight, labels, ignore_index: int = -100, softcap: float | None = None, bias=None):
    """Reference count of labelled rows whose label is the argmax of the logits (softcap is monotonic: no
    effect on the argmax)."""
    with torch.no_grad():
        logits = F.linear(hidden, weight, bias).float()
        z_label = logits.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
        return ((z_label >= logits.max(1).values) & (labels != ignore_index)).sum().float()

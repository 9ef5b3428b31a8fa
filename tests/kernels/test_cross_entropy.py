import pytest
import torch

from harness.kernels.cross_entropy import (
    FusedLinearCrossEntropyFunction,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    top1_hits,
)


def _labels(n, v, p_ignore=0.25):
    lab = torch.randint(0, v, (n,))
    lab[torch.rand(n) < p_ignore] = -100
    return lab


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("num_items", [None, 17, "tensor"])
def test_fused_ce_fp32(seed, cpu_interp, close, softcap, weight_grad, num_items):
    if num_items == "tensor":  # as the Trainer passes it: counted on the device
        num_items = torch.tensor(17)
    N, H, V = 37, 67, 1001
    h = torch.randn(N, 2 * H)[:, ::2].requires_grad_(True)  # non-contiguous
    w = (torch.randn(V, H) / H**0.5).requires_grad_(weight_grad)
    lab = _labels(N, V)
    best = (h.detach() @ w.detach().t()).argmax(1)
    lab[::3] = torch.where(lab[::3] == -100, lab[::3], best[::3])  # some rows predicted right: top-1 hits
    top1 = torch.zeros(())
    loss = FusedLinearCrossEntropyFunction.apply(h, w, lab, None, -100, softcap, num_items, 8, None, top1)  # 5 chunks
    assert float(top1) == float(top1_hits(h.detach(), w.detach(), lab)) > 0  # rows whose label is the argmax
    inputs = (h, w) if weight_grad else (h,)
    g = torch.autograd.grad(loss * 1.7, inputs)  # non-unit upstream grad
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(weight_grad)
    ref = fused_linear_cross_entropy_reference(h64, w64, lab, -100, softcap, num_items)
    gr = torch.autograd.grad(ref * 1.7, (h64, w64) if weight_grad else (h64,))
    close(loss, ref, 1e-5, 1e-5, "loss")
    for a, e in zip(g, gr):
        close(a, e, 1e-5, 1e-5, "grad")


def test_fused_ce_fp16(seed, cpu_interp, close):
    N, H, V = 29, 67, 1001
    h = torch.randn(N, H).half().requires_grad_(True)
    w = (torch.randn(V, H) / H**0.5).half()
    lab = _labels(N, V)
    loss = fused_linear_cross_entropy(h, w, lab)
    (dh,) = torch.autograd.grad(loss, (h,))
    h32 = h.detach().float().requires_grad_(True)
    ref = fused_linear_cross_entropy_reference(h32, w.float(), lab)
    (dhr,) = torch.autograd.grad(ref, (h32,))
    close(loss, ref, 1e-2, 1e-2, "loss")
    close(dh, dhr, 1e-2, 1e-3, "dh")


@pytest.mark.parametrize("p_ignore", [0.0, 0.4])
def test_rows_given_by_the_host_give_the_same_loss_and_grads(seed, cpu_interp, close, p_ignore):
    """``kept`` (harness.host_prep's labelled rows) replaces the device read of the labels: same results."""
    N, H, V = 41, 32, 517
    h = torch.randn(N, H, requires_grad=True)
    w = (torch.randn(V, H) / H**0.5).requires_grad_(True)
    lab = _labels(N, V, p_ignore)
    rows = torch.nonzero(lab != -100).flatten()
    out = []
    for kept in (None, (rows, int(rows.numel()))):
        loss = fused_linear_cross_entropy(h, w, lab, chunk_size=8, kept=kept)
        out.append((loss, *torch.autograd.grad(loss * 0.3, (h, w))))
    for a, e in zip(out[1], out[0]):
        close(a, e, 1e-6, 1e-6, "kept rows")


def test_all_ignored_is_zero(cpu_interp):
    h = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(33, 16)
    loss = fused_linear_cross_entropy(h, w, torch.full((5,), -100))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max().item() == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [151936, 262144])
def test_fused_ce_bf16_gpu(cuda, rel, vocab):
    torch.manual_seed(vocab)
    N, H = 1024, 1536
    h = torch.randn(N, H, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, H, device=cuda) / H**0.5).bfloat16().requires_grad_(True)
    lab = _labels(N, vocab).to(cuda)
    loss = fused_linear_cross_entropy(h, w, lab)
    dh, dw = torch.autograd.grad(loss, (h, w))
    h32, w32 = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    ref = fused_linear_cross_entropy_reference(h32, w32, lab)
    dhr, dwr = torch.autograd.grad(ref, (h32, w32))
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-2
    assert rel(dh, dhr) < 2e-2 and rel(dw, dwr) < 2e-2


def test_fused_ce_reads_nothing_back_with_host_rows_and_a_device_count(cpu_interp, close, monkeypatch):
    """With the labelled rows from the host (harness.host_prep) and num_items_in_batch as a tensor (the
    Trainer's), forward and backward never read a device value (.item(), nonzero): no host sync on a GPU."""
    N, H, V = 23, 32, 301
    h = torch.randn(N, H).requires_grad_(True)
    w = torch.randn(V, H) / H**0.5
    lab = _labels(N, V)
    rows = (lab != -100).nonzero().squeeze(1)
    n_items = torch.tensor(int((lab != -100).sum()) + 5)  # e.g. the count over accumulated micro-batches
    ref = fused_linear_cross_entropy_reference(h.detach().double().requires_grad_(True), w.double(), lab,
                                               num_items_in_batch=n_items)

    def no_read(*a, **k):
        raise AssertionError("device value read on the host")

    monkeypatch.setattr(torch.Tensor, "item", no_read)
    monkeypatch.setattr(torch.Tensor, "nonzero", no_read)
    loss = fused_linear_cross_entropy(h, w, lab, num_items_in_batch=n_items, kept=(rows, len(rows)))
    (dh,) = torch.autograd.grad(loss * 0.5, (h,))
    monkeypatch.undo()
    close(loss, ref, 1e-5, 1e-5, "loss")
    h64 = h.detach().double().requires_grad_(True)
    (dhr,) = torch.autograd.grad(fused_linear_cross_entropy_reference(h64, w.double(), lab,
                                                                      num_items_in_batch=n_items) * 0.5, (h64,))
    close(dh, dhr, 1e-5, 1e-5, "grad")

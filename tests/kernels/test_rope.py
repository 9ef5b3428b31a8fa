import pytest
import torch

from harness.kernels.rope import (
    RoPEFunction,
    apply_multimodal_rotary_pos_emb_reference,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_reference,
    mrope_cos_sin,
)


@pytest.fixture(params=["2d", "3d"])
def kernel(request, monkeypatch):
    """Both launch layouts of the q+k kernel: (position, head) rows, and [positions, heads, dim] tiles."""
    import harness.kernels.rope as rope_mod

    monkeypatch.setattr(rope_mod, "KERNEL", request.param)
    return request.param


def _cos_sin(bsz, seq, dim, dtype, section=(2, 3, 3)):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    pos = torch.randint(0, 50, (3, bsz, seq))
    return mrope_cos_sin(pos, inv_freq, section, dtype=dtype)


@pytest.mark.parametrize("dim", [16, 20])  # 20: a half (10) that is not a power of two, like head_dim 80
@pytest.mark.parametrize("layout", [1, 2])
def test_rope_fp32(seed, cpu_interp, close, layout, dim, kernel):
    bsz, hq, hk, seq = 2, 3, 1, 13
    cos, sin = _cos_sin(bsz, seq, dim, torch.float32, section=(2, 3, 3) if dim == 16 else (2, 4, 4))
    if layout == 1:  # HF attention layout: [b, s, h, d] projections viewed as [b, h, s, d] (non-contiguous)
        q = torch.randn(bsz, seq, hq, dim).transpose(1, 2)
        k = torch.randn(bsz, seq, hk, dim).transpose(1, 2)
        assert not q.is_contiguous()
    else:  # [b, s, h, d] sliced from a fused qkv tensor
        qkv = torch.randn(bsz, seq, hq + 2 * hk, dim)
        q, k = qkv[:, :, :hq], qkv[:, :, hq : hq + hk]
    q = q.detach().requires_grad_(True)
    k = k.detach().requires_grad_(True)
    dq_o, dk_o = torch.randn(q.shape), torch.randn(k.shape)
    qo, ko = RoPEFunction.apply(q, k, cos, sin, layout)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (dq_o, dk_o))
    qr, kr = apply_rotary_pos_emb_reference(q, k, cos, sin, layout)
    dqr, dkr = torch.autograd.grad((qr, kr), (q, k), (dq_o, dk_o))
    for a, b, n in [(qo, qr, "q"), (ko, kr, "k"), (dq, dqr, "dq"), (dk, dkr, "dk")]:
        close(a, b, 1e-5, 1e-5, n)


def test_rope_gradient_of_q_only(seed, cpu_interp, close, kernel):
    # k unused downstream: its gradient is None, q's is still the transposed rotation
    bsz, hq, hk, seq, dim = 2, 6, 2, 37, 16
    cos, sin = _cos_sin(bsz, seq, dim, torch.float32)
    q = torch.randn(bsz, hq, seq, dim, requires_grad=True)
    k = torch.randn(bsz, hk, seq, dim, requires_grad=True)
    go = torch.randn(q.shape)
    qo, _ = RoPEFunction.apply(q, k, cos, sin, 1)
    (dq,) = torch.autograd.grad(qo, (q,), go)
    qr, _ = apply_rotary_pos_emb_reference(q, k, cos, sin, 1)
    (dqr,) = torch.autograd.grad(qr, (q,), go)
    close(dq, dqr, 1e-5, 1e-5, "dq")


def test_rope_fp16(seed, cpu_interp, close, kernel):
    bsz, hq, hk, seq, dim = 1, 5, 1, 13, 32
    cos, sin = _cos_sin(bsz, seq, dim, torch.float16, section=(4, 6, 6))
    q = torch.randn(bsz, seq, hq, dim).half().transpose(1, 2).requires_grad_(True)
    k = torch.randn(bsz, seq, hk, dim).half().transpose(1, 2).requires_grad_(True)
    go = (torch.randn(q.shape).half(), torch.randn(k.shape).half())
    qo, ko = apply_rotary_pos_emb(q, k, cos, sin)
    assert qo.dtype == torch.float16
    dq, dk = torch.autograd.grad((qo, ko), (q, k), go)
    q32, k32 = q.detach().float().requires_grad_(True), k.detach().float().requires_grad_(True)
    qr, kr = apply_rotary_pos_emb_reference(q32, k32, cos.float(), sin.float())
    dqr, dkr = torch.autograd.grad((qr, kr), (q32, k32), (go[0].float(), go[1].float()))
    for a, b, n in [(qo, qr, "q"), (ko, kr, "k"), (dq, dqr, "dq"), (dk, dkr, "dk")]:
        close(a, b, 1e-2, 1e-2, n)


def test_mrope_cos_sin_matches_transformers(seed, close):
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    ).text_config
    rot = Qwen2VLRotaryEmbedding(cfg)
    pos = torch.randint(0, 100, (3, 2, 13))
    x = torch.randn(2, 13, 64)
    cos_hf, sin_hf = rot(x, pos)
    cos, sin = mrope_cos_sin(pos, rot.inv_freq, [2, 3, 3], rot.attention_scaling, dtype=x.dtype)
    close(cos, cos_hf, 1e-6, 1e-6, "cos")
    close(sin, sin_hf, 1e-6, 1e-6, "sin")
    # and the per-axis formulation of the older apply_multimodal_rotary_pos_emb gives the same rotation
    freqs = pos[..., None].float() * rot.inv_freq
    emb = torch.cat((freqs, freqs), -1)
    q, k = torch.randn(2, 4, 13, 16), torch.randn(2, 2, 13, 16)
    a = apply_multimodal_rotary_pos_emb_reference(q, k, emb.cos(), emb.sin(), [2, 3, 3])
    b = apply_rotary_pos_emb_reference(q, k, cos, sin)
    close(a[0], b[0], 1e-5, 1e-5, "q")
    close(a[1], b[1], 1e-5, 1e-5, "k")


@pytest.mark.gpu
def test_rope_bf16_gpu(cuda, rel, kernel):
    torch.manual_seed(0)
    bsz, seq, hq, hk, dim = 2, 2048, 28, 4, 128
    cos, sin = _cos_sin(bsz, seq, dim, torch.bfloat16, section=(16, 24, 24))
    cos, sin = cos.to(cuda), sin.to(cuda)
    q = torch.randn(bsz, seq, hq, dim, device=cuda, dtype=torch.bfloat16).transpose(1, 2).requires_grad_(True)
    k = torch.randn(bsz, seq, hk, dim, device=cuda, dtype=torch.bfloat16).transpose(1, 2).requires_grad_(True)
    go = (torch.randn(q.shape, device=cuda, dtype=torch.bfloat16), torch.randn(k.shape, device=cuda, dtype=torch.bfloat16))
    qo, ko = apply_rotary_pos_emb(q, k, cos, sin)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), go)
    q32, k32 = q.detach().float().requires_grad_(True), k.detach().float().requires_grad_(True)
    qr, kr = apply_rotary_pos_emb_reference(q32, k32, cos.float(), sin.float())
    dqr, dkr = torch.autograd.grad((qr, kr), (q32, k32), (go[0].float(), go[1].float()))
    for a, b in [(qo, qr), (ko, kr), (dq, dqr), (dk, dkr)]:
        assert rel(a, b) < 1e-2

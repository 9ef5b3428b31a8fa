"""GPU checks of the harness itself (kernel-level GPU tests live in tests/kernels). Skipped without CUDA."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_4bit_training_on_cuda(compose, fast, tmp_path):
    from harness.pipeline import train_run

    _, run = compose([*fast, "logger=none", "quant=4bit", "train.max_steps=3", "device=cuda"])
    m = train_run(run, {}, tmp_path)
    assert m["device"].startswith("cuda") and m["dtype"] == "bfloat16"
    assert all(l == l for _, l in m["losses"])
    # the CUDA defaults: fused AdamW, offloaded checkpointing with graphs, the fused loss on the trained head
    assert m["resolved"] == {"optim": "adamw_torch_fused", "gradient_checkpointing": "unsloth"}
    assert m["accelerated"].get("cross_entropy") == 1 and m["accelerated"].get("host_prep") == 1
    assert m["cuda_graphs"]["captured"] > 0 and not m["cuda_graphs"]["failures"], m["cuda_graphs"]
    print(f"\n4-bit tiny run on {torch.cuda.get_device_name()}: losses {m['losses']}, "
          f"peak {m['peak_memory_gib']:.3f} GiB, {m['tokens_per_s']:.0f} tokens/s, accelerated {m['accelerated']}")


def _qwen2_vl(size):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if size == "2b":
        text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, rope_scaling={"type": "mrope",
                                                                                   "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)
    else:
        text = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rope_scaling={"type": "mrope",
                                                                                  "mrope_section": [4, 6, 6]})
        vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=text["vocab_size"] - 5,
                        video_token_id=text["vocab_size"] - 4, vision_start_token_id=text["vocab_size"] - 3,
                        vision_end_token_id=text["vocab_size"] - 2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return Qwen2VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa"), cfg


def _batch(cfg, grid=8, tokens=256, b=2):
    g = torch.Generator().manual_seed(1)
    n_img = grid * grid // 4
    ids = torch.randint(0, cfg.text_config.vocab_size - 10, (b, tokens), generator=g)
    ids[:, 1:1 + n_img] = cfg.image_token_id
    labels = ids.clone()
    labels[:, : n_img + 2] = -100
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
               pixel_values=torch.randn(b * grid * grid, 1176, generator=g).bfloat16(),
               image_grid_thw=torch.tensor([[1, grid, grid]] * b), mm_token_type_ids=(ids == cfg.image_token_id).long())
    out = {k: v.cuda() for k, v in out.items()}
    out["use_cache"] = False  # training: no KV cache (compiled layers would otherwise see a per-layer cache)
    return out


@pytest.mark.parametrize("size,compiled", [("tiny", False), ("2b", False), ("tiny", True), ("2b", True)])
def test_kernels_match_reference_whole_model(size, compiled):
    """Loss and LoRA gradients with the kernels (eager Triton kernels, or compiled layers) vs without,
    same weights, bf16."""
    from peft import LoraConfig, get_peft_model

    from harness.kernels import accelerate_model, revert_model

    model, cfg = _qwen2_vl(size)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=r".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|visual\.blocks.*\.(qkv|attn\.proj|fc1|fc2))$"))
    for n, p in model.named_parameters():  # lora_B starts at zero: give it values so dA is non-trivial
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    batch = _batch(cfg)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref = loss_and_grads()
    # noise floor: the same reference with the adapters in bf16 (the kernels multiply in the activation dtype)
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.bfloat16()
    _, ref_bf16 = loss_and_grads()
    for p in lora:
        p.data = p.data.float()
    noise = max(float((ref_bf16[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-12)) for n in ref)
    report = accelerate_model(model, {"enabled": True, "compile": compiled})
    try:
        assert report.get("lora_linear") and report.get("compiled_layers" if compiled else "rms_norm")
        loss, grads = loss_and_grads()
    finally:
        revert_model(model)
    assert abs(loss - ref_loss) / ref_loss < 1e-2, (float(loss), float(ref_loss))
    worst = max(float((grads[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-12)) for n in ref)
    print(f"\n{size} {'compiled' if compiled else 'eager kernels'}: loss {float(loss):.5f} vs {float(ref_loss):.5f}; worst LoRA grad rel err {worst:.2e} "
          f"(bf16-adapter noise floor {noise:.2e})")
    assert worst <= max(2 * noise, 1e-2)


def test_offloaded_checkpointing_matches_on_cuda(compose):
    from harness.checkpointing import enable_checkpointing
    from peft import LoraConfig, get_peft_model

    grads = {}
    for mode in ("false", "true", "unsloth"):
        model, cfg = _qwen2_vl("tiny")
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "qkv", "fc1"]))
        model.train()
        used = enable_checkpointing(model, mode, torch.device("cuda"))
        batch = _batch(cfg)
        model(**batch).loss.backward()
        grads[mode] = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        if mode == "unsloth":
            assert used.startswith("offloaded")
    for mode in ("true", "unsloth"):
        for n, g in grads["false"].items():
            assert torch.allclose(grads[mode][n], g, rtol=1e-3, atol=1e-5), (mode, n)


@pytest.mark.parametrize("size", ["tiny", "2b"])
def test_cuda_graphed_layers_match_on_cuda(size):
    """Real CUDA-graph capture of every layer (compiled, offloaded checkpointing): over a warm-up, a
    capture and a replay step, loss and LoRA gradients equal the same model without graphs."""
    from peft import LoraConfig, get_peft_model

    from harness.checkpointing import enable_checkpointing
    from harness.kernels import accelerate_model

    results = {}
    for graphs in (False, True):
        torch._dynamo.reset()
        model, cfg = _qwen2_vl(size)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj",
                                                                                      "gate_proj", "down_proj",
                                                                                      "qkv", "fc1"]))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        model.train()
        accelerate_model(model, {"enabled": True, "compile": True})
        used = enable_checkpointing(model, "unsloth", torch.device("cuda"), graphs=graphs)
        assert used.endswith(", CUDA graphs)") == graphs
        steps = []
        for seed in range(3):
            batch = _batch(cfg)
            batch["pixel_values"] = batch["pixel_values"] + seed  # new data every step
            model.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            steps.append((float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                        if p.requires_grad}))
        if graphs:
            lg = model.__dict__["_harness_offloader"].graphs
            n_layers = cfg.text_config.num_hidden_layers + cfg.vision_config.depth
            assert lg.failures == [] and lg.captured == 2 * n_layers, lg.summary()
            assert lg.replays == 2 * n_layers * 2
            # chained static buffers: per replayed step, every layer but the first of each stack finds its
            # input (forward) and output gradient (backward) already in place
            made, skipped = lg.copy_counts()
            assert skipped >= 2 * 2 * (n_layers - 2), lg.summary()
        results[graphs] = steps
        del model
        torch.cuda.empty_cache()
    for (l0, g0), (l1, g1) in zip(results[False], results[True]):
        assert abs(l0 - l1) <= 1e-3 * abs(l0), (l0, l1)
        worst = max(float((g1[n] - g0[n]).norm() / g0[n].norm().clamp_min(1e-12)) for n in g0)
        assert worst < 1e-2, worst
    print(f"\n{size}: graphed vs not, losses {[s[0] for s in results[True]]} vs {[s[0] for s in results[False]]}")


@pytest.mark.parametrize("grid", [16, 12])
def test_layers_that_synchronize_run_without_graphs_on_cuda(grid):
    """Qwen2.5-VL's windowed vision attention: with images a whole number of windows (grid 16: 8x8 merged
    units, windows of 4x4) it runs batched, never reads device values on the host, and every layer is
    graphed; with partial windows (grid 12) the windowed block splits on host-read window sizes, the probe
    before capture finds that, that block runs without graphs, the rest are graphed, and nothing breaks (a
    capture that fails half-way would leave the RNG in capture mode: the randn below would raise)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from harness.checkpointing import enable_checkpointing
    from harness.kernels import accelerate_model

    text = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    vision = dict(depth=2, hidden_size=64, out_hidden_size=128, intermediate_size=128, num_heads=4, window_size=112,
                  fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=995, video_token_id=996,
                           vision_start_token_id=997, vision_end_token_id=998)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "qkv", "fc1", "gate_proj"]))
    model.train()
    accelerate_model(model, {"enabled": True, "compile": True})
    enable_checkpointing(model, "unsloth", torch.device("cuda"), graphs=True)
    for seed in range(3):
        batch = _batch(cfg, grid=grid)
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        assert torch.isfinite(loss)
    lg = model.__dict__["_harness_offloader"].graphs
    assert not lg.stopped, lg.summary()
    layers = cfg.text_config.num_hidden_layers + cfg.vision_config.depth
    if grid == 16:
        assert lg.captured == 2 * layers and not lg.failures, lg.summary()
    else:  # the windowed block (0) syncs; the full-attention block (1) is batched over equal images
        assert lg.captured == 2 * (layers - 1), lg.summary()
        assert any("VisionBlock" in f for f in lg.failures), lg.summary()
    torch.randn(4, device="cuda")  # the CUDA RNG is usable
    print("\n", lg.summary())


def test_loss_rows_reach_the_gpu_once_and_without_a_sync():
    from harness.loss_rows import LossRows

    labels = torch.full((2, 9), -100)
    labels[0, 3:7] = 5
    rows = LossRows.of(labels).pin_memory()
    assert rows.rows.is_pinned() and rows.n == 4
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dev = rows.to("cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert dev is rows.to("cuda") and dev.rows.is_cuda and dev.rows.tolist() == [2, 3, 4, 5]

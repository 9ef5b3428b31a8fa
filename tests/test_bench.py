"""mode=bench off the GPU: the workload definitions, the longest-sequence search and a CPU smoke run of
the bench loop on tiny models (the GPU numbers themselves live in docs/benchmarks.md)."""
import argparse
import math
import re

import pytest
import torch

from harness import bench
from harness.bench_workload import ANCHOR, load_workload, longest_fitting
from harness.config import ConfigError


def test_longest_fitting_finds_the_boundary():
    calls = []

    def fits(n):
        calls.append(n)
        return n <= 5000

    assert longest_fitting(fits, 1024, 65536, 256) == 4864  # the largest multiple of 256 <= 5000
    assert calls[:4] == [1024, 2048, 4096, 8192] and len(calls) <= 9
    assert longest_fitting(lambda n: n <= 100_000, 1024, 65536, 256) == 65536  # capped
    assert longest_fitting(lambda n: False, 1024, 65536, 256) == 0


def test_workloads_from_conf_model():
    a = argparse.Namespace(batch=4, tokens=1024, grid=32)
    q2 = load_workload("qwen2_vl_2b")
    assert len(q2.targets) == 324 == len([t for t in q2.targets if t.endswith(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "attn.proj", "fc1", "fc2"))])
    # the same model as the anchors' workload: FLOPs within 2% (the merger is counted here, not there)
    assert math.isclose(q2.flops_fn(a), ANCHOR.flops_fn(a), rel_tol=0.02)
    llama = load_workload("llama3_2_1b")
    assert not llama.vision and len(llama.targets) == 16 * 7
    with pytest.raises(ValueError, match=r"bench.model=nope \(allowed: anchor, .*qwen2_5_vl_7b"):
        load_workload("nope")
    with pytest.raises(ValueError, match="bench.model=tiny_mllama"):
        load_workload("tiny_mllama")  # its image batch is not built by the bench yet: a clear error


@pytest.mark.parametrize("model,stack", [("tiny_qwen2_vl", "harness16"), ("tiny_llama", "hf16"),
                                         ("tiny_llama", "harness4")])  # harness4: saved random model, nf4 load
def test_bench_loop_on_cpu(model, stack):
    a = argparse.Namespace(stack=stack, model=model, device="cpu", batch=2, tokens=48, grid=4, r=4, gc="unsloth",
                           no_kernels=False, no_compile=False, no_graphs=False, compile_mode="default", steps=2,
                           warmup=1)
    row = bench.run(a)
    assert row["stack"] == stack and row["model"] == model and row["tokens_per_s"] > 0
    assert row["trainable"] > 0 and math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
    md = bench.table([row, dict(stack="harness16", model=model, gc="standard", longest_tokens=4096, cap=8192,
                                memory_gib=80.0, peak_gib=61.234)])
    assert f"{stack} [{model}]" in md and "| 4,096 | 61.23 | 8,192 | capped at 80 GiB |" in md


def test_peer_stacks_run_the_anchor_workload_only():
    a = argparse.Namespace(stack="unsloth16", model="tiny_llama", device="cpu")
    with pytest.raises(ValueError, match="peer stacks run the anchor workload only"):
        bench.build(a)


def test_bench_model_is_validated(compose):
    with pytest.raises(ConfigError, match=r"bench.model='qwen9' \(allowed: one of anchor, gemma3_4b"):
        compose(["mode=bench", "bench.model=qwen9"])


def test_bench_memory_cap_is_validated_and_off_the_gpu_a_no_op(compose):
    with pytest.raises(ConfigError, match=r"bench.memory_gib=-1"):
        compose(["mode=bench", "bench.memory_gib=-1"])
    _, run = compose(["mode=bench", "bench.memory_gib=80"])
    assert run.bench.memory_gib == 80
    assert bench.cap_memory(80, "cpu") is None and bench.cap_memory(0, "cuda") is None


@pytest.mark.slow
def test_a_stack_past_its_time_limit_gets_an_error_row_and_the_rest_run(tmp_path):
    out = tmp_path / "bench.jsonl"
    cpu = ["--device", "cpu", "--model", "tiny_llama", "--batch", "1", "--tokens", "16", "--grid", "4", "--r", "2",
           "--steps", "1", "--warmup", "0"]
    rows = bench.run_stacks([("hf16", cpu + ["--steps", "100000"]), ("hf16", cpu)], out, timeout_s=30)
    assert "timed out after 30 s" in rows[0]["error"] and "tokens_per_s" not in rows[0]
    assert rows[1].get("tokens_per_s", 0) > 0, rows[1]
    assert len(out.read_text().splitlines()) == 2
    assert "timed out" in bench.table(rows)


def test_table_states_each_harness_stack_against_the_peers_of_its_call():
    from harness.bench import table

    def row(stack, tps, peak, tokens=1024, model="anchor"):
        return dict(stack=stack, model=model, gc="g", batch=4, tokens=tokens, tokens_per_s=tps, median_step_s=0.1,
                    peak_gib=peak, after_load_gib=1.0, mfu=0.1, loss_first=1, loss_last=0.5)

    rows = [row("unsloth16", 9000, 5.5), row("hf16", 5000, 12.0), row("harness16", 27000, 5.0),
            row("hf16", 100, 1.0, tokens=2048),  # another shape: not compared
            dict(stack="unsloth4", error="timed out after 140 s")]  # an error row: not compared
    text = table(rows)
    line = [l for l in text.splitlines() if l.startswith("- harness16")]
    assert line == ["- harness16 tokens/s: 3.00x unsloth16 at 0.91x its peak memory; "
                    "5.40x hf16 at 0.42x its peak memory"], text


def test_bench_through_the_trainer_on_cpu():
    """--trainer: the same model and batch through harness.train's SFTTrainer (the loop a `harness` run uses):
    its first loss is the bench loop's, the row says how it was timed, the table labels it; peers refuse it."""
    a = argparse.Namespace(stack="harness16", model="tiny_qwen2_vl", device="cpu", batch=2, tokens=48, grid=4, r=4,
                           gc="unsloth", no_kernels=False, no_compile=False, no_graphs=False, compile_mode="default",
                           steps=2, warmup=1)
    loop = bench.run(a)
    row = bench.run_trainer(a)
    assert row["loop"] == "trainer" and row["step_time"] == "mean (no per-step sync)"
    assert row["tokens_per_s"] > 0 and row["optim"] == "adamw_torch" and row["accelerated"] == {"host_prep": 1}
    assert row["loss_first"] == loop["loss_first"] and math.isfinite(row["loss_last"])
    assert row["loss_last"] != row["loss_first"]  # it trained (lr 2e-4, 4 steps)
    md = bench.table([loop, row])
    assert "| harness16 via Trainer [tiny_qwen2_vl] | standard | 2 x 48 |" in md and " s (mean) |" in md
    with pytest.raises(ValueError, match="--trainer with stack hf16"):
        bench.run_trainer(argparse.Namespace(**{**vars(a), "stack": "hf16"}))


def test_trainer_profile_reports_where_the_step_goes_on_cpu(capsys):
    """--trainer --profile: two timed steps under torch.profiler; the report gives the wall and GPU-busy split, the
    collator's host time and the host operator tables, and the row says its steps were profiled."""
    a = argparse.Namespace(stack="harness16", model="tiny_qwen2_vl", device="cpu", batch=2, tokens=48, grid=4, r=4,
                           gc="unsloth", no_kernels=False, no_compile=False, no_graphs=False, compile_mode="default",
                           steps=3, warmup=1, profile=True)
    row = bench.run_trainer(a)
    out = capsys.readouterr().out
    assert row["profiled_steps"] == 2 and row["tokens_per_s"] > 0
    assert re.search(r"trainer: wall \d+\.\d+s for 2 steps \(profiled\); GPU kernel time 0\.000s", out), out
    calls = re.search(r"trainer: collator (\d+\.\d+) ms host time per call \((\d+) calls\)", out)
    assert calls and float(calls.group(1)) > 0 and int(calls.group(2)) == 2, out  # one batch per profiled step
    assert "Self CPU" in out and "aten::" in out


def test_kernel_categories_sort_profiler_rows_into_families():
    from harness.bench import category_table, kernel_categories

    rows = [
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT", 400, 150.0),
        ("Memcpy DtoD (Device -> Device)", 1000, 20.0),
        ("Memcpy DtoH (Device -> Pageable)", 60, 50.0),
        ("triton_poi_fused__to_copy_add_0", 3000, 30.0),
        ("_ce_fwd_bwd_kernel", 2, 8.0),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 120, 28.0),
        ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 4, 2.0),
        ("some_unknown_kernel", 2, 1.0),
    ]
    cats = dict((c, (n, t)) for c, n, t in kernel_categories(rows, steps=2))
    assert cats["matmuls (cuBLAS/CUTLASS)"] == (200, 75.0)
    assert cats["device copies (graph buffers, clones)"] == (500, 10.0)
    assert cats["host<->device copies (offload)"] == (30, 25.0)
    assert cats["Inductor-generated (fused pointwise, norms)"] == (1500, 15.0)
    assert cats["harness Triton kernels"] == (1, 4.0)
    assert cats["attention"] == (60, 14.0)
    assert cats["optimizer"] == (2, 1.0)
    assert cats["other"] == (1, 0.5)
    order = [c for c, _, _ in kernel_categories(rows, steps=2)]
    assert order[0] == "matmuls (cuBLAS/CUTLASS)"  # largest first
    md = category_table(kernel_categories(rows, steps=2), wall_ms=200.0)
    assert "| matmuls (cuBLAS/CUTLASS) | 200 | 75.00 | 38% |" in md
    assert md.splitlines()[-1].startswith("| **all kernels** | 2,294 | 144.50 | 72% |")


def test_family_top_and_copy_sizes_break_a_family_down(tmp_path):
    import json

    from harness.bench import copy_sizes, family_top

    rows = [
        ("memcpy128", 2000, 24.0),
        ("Memcpy DtoD (Device -> Device)", 200, 4.0),
        ("triton_poi_fused_add_0", 100, 2.0),
        ("nvjet_hsh_256x128", 10, 50.0),
    ]
    md = family_top(rows, steps=2, n=1)
    lines = md.splitlines()
    # one row per family, the costliest: memcpy128 at 1,000 a step, 12 ms a step, 12 us each
    assert "device copies (graph buffers, clones): top 1" in lines
    assert "| memcpy128 | 1,000 | 12.00 | 12.0 |" in lines
    assert not any("Memcpy DtoD" in line for line in lines)
    assert "| triton_poi_fused_add_0 | 50 | 1.00 | 20.0 |" in lines
    assert "| nvjet_hsh_256x128 | 5 | 25.00 | 5000.0 |" in lines

    trace = tmp_path / "trace.json"
    events = ([{"name": "memcpy128", "cat": "kernel", "dur": 30.0, "args": {"grid": [96, 1, 1], "block": [128, 1, 1]}}] * 4
              + [{"name": "memcpy128", "cat": "kernel", "dur": 2.0, "args": {"grid": [1, 1, 1], "block": [128, 1, 1]}}] * 6
              + [{"name": "Memcpy DtoD (Device -> Device)", "cat": "gpu_memcpy", "dur": 8.0, "args": {"bytes": 12582912}}] * 2
              + [{"name": "Memcpy HtoD (Pinned -> Device)", "cat": "gpu_memcpy", "dur": 200.0, "args": {"bytes": 1}},
                 {"name": "triton_poi_fused_add_0", "cat": "kernel", "dur": 50.0, "args": {}}])
    trace.write_text(json.dumps({"traceEvents": events}))
    md = copy_sizes(str(trace), steps=2).splitlines()
    assert md[2] == "| memcpy128 grid [96, 1, 1] block [128, 1, 1] | 2 | 0.06 | 30.0 |"  # largest total first
    assert md[3] == "| Memcpy DtoD (Device -> Device) 12582912 B | 1 | 0.01 | 8.0 |"
    assert md[4] == "| memcpy128 grid [1, 1, 1] block [128, 1, 1] | 3 | 0.01 | 2.0 |"
    assert len(md) == 5  # host copies and other kernels are not device copies


def test_inductor_options_are_set_typed_and_named_in_the_table():
    from torch._inductor import config as ic

    from harness.bench import _label, set_inductor_options

    # ic.patch restores the options; monkeypatch's undo would delete them from the config module (torch 2.13)
    with ic.patch(combo_kernels=False, max_autotune=False):
        _check_inductor_options(ic, set_inductor_options, _label)


def _check_inductor_options(ic, set_inductor_options, _label):
    done = set_inductor_options(["combo_kernels=true", "max_autotune=0"])
    assert done == {"combo_kernels": True, "max_autotune": False}
    assert ic.combo_kernels is True and ic.max_autotune is False
    with pytest.raises(SystemExit, match="no option 'not_an_option'"):
        set_inductor_options(["not_an_option=1"])
    with pytest.raises(SystemExit, match="expected true/false"):
        set_inductor_options(["combo_kernels=maybe"])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        set_inductor_options(["combo_kernels"])
    assert _label({"stack": "harness16", "inductor": done}) == \
        "harness16 (inductor combo_kernels=True, max_autotune=False)"
    assert _label({"stack": "harness16", "lora_op": False}) == "harness16 (no lora_op)"
    assert _label({"stack": "harness16", "lora_op": True}) == "harness16"
    assert _label({"stack": "harness16", "lora_paths": "cublas"}) == "harness16 (lora_paths cublas)"
    assert _label({"stack": "harness16", "lora_paths": "auto"}) == "harness16"
    assert _label({"stack": "harness16", "lora_op_da_stream": False}) == "harness16 (dA after dx)"
    assert _label({"stack": "harness16", "lora_op_da_stream": True}) == "harness16"
    assert set_inductor_options([]) == {}


def test_bench_inductor_overrides_reach_the_harness_stacks_only(compose, monkeypatch, tmp_path):
    _, run = compose(["mode=bench", "bench.stacks=[unsloth16,harness16]", "bench.trainer=true",
                      "+bench.inductor.combo_kernels=true", "bench.lora_op=false", "bench.lora_paths=auto"])
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run_stacks", lambda plan, out, timeout_s=None: seen.setdefault("plan", plan) and [])
    monkeypatch.setattr(bench, "plot", lambda rows, path: None)
    bench.bench_mode(run.bench, tmp_path)
    plan = {(s, "--trainer" in args): args for s, args in seen["plan"]}
    assert set(plan) == {("unsloth16", False), ("harness16", False), ("harness16", True)}
    assert "--inductor" not in plan[("unsloth16", False)] and "--no-lora-op" not in plan[("unsloth16", False)]
    for key in (("harness16", False), ("harness16", True)):
        args = plan[key]
        assert args[args.index("--inductor") + 1] == "combo_kernels=true"
        assert "--no-lora-op" in args
        assert args[args.index("--lora-paths") + 1] == "auto"
    assert "--lora-paths" not in plan[("unsloth16", False)]


def test_lora_paths_label_names_the_paths_a_run_took(monkeypatch):
    import importlib

    mod = importlib.import_module("harness.kernels.lora_linear")
    monkeypatch.setattr(mod, "PATHS", dict.fromkeys(("fwd", "dx", "dy"), "cublas"))
    assert bench._lora_paths_label() == "cublas"
    mod.set_paths("auto")
    assert bench._lora_paths_label() == "auto"
    mod.set_paths("dy=fused")
    assert bench._lora_paths_label() == "fwd=auto,dx=auto,dy=fused"

"""How close each LoRA kernel path's loss and LoRA gradients come to an fp32 truth, on the anchor's model and batch
(random Qwen2-VL-2B, 4 x 1024 tokens, 32 x 32 patches per image, r = 16, every anchor target). A diagnostic
(GPU only), not a test: it answers "is kernels.lora_paths=auto as accurate as cublas?", per module kind.

    python benchmarks/lora_paths_precision.py [--b-std 0.02,0.0002] [--no-compiled] [--paths 'cublas|auto']

Truth: the same weights upcast to fp32, PyTorch's path. Rows of its table: LoRA parameter groups (module kind x
A / B); columns: the bf16 PyTorch path (PEFT's own math: the noise every bf16 run has), then the Triton kernels
(eager lora_linear and, unless --no-compiled, the compiled layers with the lora_op) with each path set. Cells:
relative L2 error of the group's concatenated gradient against the truth. lora_B is drawn from N(0, b_std) per
setting (training starts at 0: the small std is the early-training regime, where the rank-r term is far below
the base GEMM's bf16 resolution).
"""
from __future__ import annotations

import argparse
import importlib
import re
import time
from collections import defaultdict

import torch


def groups_of(names):
    out = defaultdict(list)
    for n in names:
        m = re.search(r"(visual|language_model).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv|proj|"
                      r"fc1|fc2)\.(lora_A|lora_B)", n)
        key = f"{'vis' if m.group(1) == 'visual' else 'lm'}.{m.group(2)}.{m.group(3)[-1]}" if m else n
        out[key].append(n)
    return dict(sorted(out.items()))


def rel(a: dict, b: dict, names) -> float:
    num = sum(float((a[n] - b[n]).double().pow(2).sum()) for n in names)
    den = sum(float(b[n].double().pow(2).sum()) for n in names)
    return (num / max(den, 1e-300)) ** 0.5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--b-std", default="0.02,0.0002")
    ap.add_argument("--no-compiled", action="store_true")
    ap.add_argument("--paths", default="cublas|auto|fwd=auto,dx=auto,dy=cublas",
                    help="path sets to compare, '|' between sets (kernels.lora_linear.set_paths specs)")
    a = ap.parse_args()
    from harness.bench_workload import ANCHOR
    from harness.kernels import accelerate_model, revert_model

    mod = importlib.import_module("harness.kernels.lora_linear")
    path_sets = [p for p in a.paths.split("|") if p]
    torch.manual_seed(0)
    model = ANCHOR.add_lora(ANCHOR.random_model("cuda", torch.bfloat16), 16)
    model.config.use_cache = False
    batch = ANCHOR.make_batch(argparse.Namespace(batch=4, tokens=1024, grid=32), "cuda")
    batch["use_cache"] = False
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = groups_of(lora)
    stds = [float(s) for s in a.b_std.split(",")]
    b_init = {}
    for s in stds:
        g = torch.Generator(device="cuda").manual_seed(7)
        b_init[s] = {n: torch.randn(p.shape, generator=g, device="cuda") * s for n, p in lora.items() if "lora_B" in n}

    def set_b(s):
        with torch.no_grad():
            for n, v in b_init[s].items():
                lora[n].copy_(v.to(lora[n].dtype))

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        torch.cuda.synchronize()
        return float(loss), {n: p.grad.detach().float().clone() for n, p in lora.items()}

    results = {s: {} for s in stds}  # std -> column -> (loss, grads)
    t0 = time.time()
    for s in stds:
        set_b(s)
        results[s]["torch bf16"] = run()
        results[s]["torch bf16 (again)"] = run()
    variants = [("eager", {"enabled": True, "compile": False})]
    if not a.no_compiled:
        variants.append(("compiled", {"enabled": True, "compile": True, "tiled_mlp": False, "lora_op": True}))
    for label, cfg in variants:
        report = accelerate_model(model, cfg)
        print(f"{label}: accelerated {({k: len(v) for k, v in report.items() if v})}", flush=True)
        try:
            for paths in path_sets:
                mod.set_paths(paths)
                for s in stds:
                    set_b(s)
                    results[s][f"{label} {paths}"] = run()
                    results[s][f"{label} {paths} (again)"] = run()
        finally:
            revert_model(model)
            mod.set_paths("cublas")
    print(f"bf16 runs: {time.time() - t0:.1f} s", flush=True)
    model.float()
    for s in stds:
        set_b(s)
        results[s]["truth"] = run()
    for s in stds:
        truth_loss, truth = results[s]["truth"]
        cols = [c for c in results[s] if c != "truth" and not c.endswith("(again)")]
        print(f"\n## lora_B ~ N(0, {s}): loss (fp32 truth {truth_loss:.6f}) and LoRA-gradient relative error vs fp32\n")
        print("| group | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        print("| loss - truth | " + " | ".join(f"{results[s][c][0] - truth_loss:+.2e}" for c in cols) + " |")
        print("| all LoRA grads | " + " | ".join(f"{rel(results[s][c][1], truth, lora):.2e}" for c in cols) + " |")
        for key, names in groups.items():
            print(f"| {key} | " + " | ".join(f"{rel(results[s][c][1], truth, names):.2e}" for c in cols) + " |")
        # a second run of each column against its first: 0 where every kernel of the step is deterministic (the
        # torch column shows what the model's own kernels, e.g. attention's backward, contribute)
        print("| repeat run vs first | " + " | ".join(
            f"{rel(results[s][c + ' (again)'][1], results[s][c][1], lora):.1e}" for c in cols) + " |")


if __name__ == "__main__":
    main()

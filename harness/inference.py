"""mode=eval and mode=infer: reload a finished run (its saved config + adapter) and use it.

The base is rebuilt exactly as the run built it (same config, same seed for random-init models, or
the same checkpoint), the adapter is loaded with plain PEFT, and the model is put in inference mode
(eval(), KV cache on, left padding).
"""
from __future__ import annotations

import json
from pathlib import Path

from harness import modeling
from harness.collator import ChatCollator
from harness.config import ConfigError, RunConfig, load_saved_run, validate


def load_run(path: str | Path, device: str = "auto"):
    """(run config, device, dtype, processor, model with adapter) of a finished run directory."""
    from peft import PeftModel

    cfg, path = load_saved_run(path, "adapter/adapter_config.json")
    adapter = path / "adapter"
    cfg.mode, cfg.device = "train", device
    run: RunConfig = validate(cfg)
    dev = modeling.resolve_device(run.device)
    dtype = modeling.resolve_dtype(run.quant.dtype, dev)
    processor = modeling.load_processor_for(run.model)
    base = modeling.load_model(run.model, run.quant, dev, processor, seed=run.seed)
    model = PeftModel.from_pretrained(base, adapter).eval()
    model.config.use_cache = True
    return run, dev, dtype, processor, model


def eval_run(path: str | Path, out_dir: Path, device: str = "auto") -> dict:
    from harness.data import build_datasets
    from harness.evaluate import evaluate

    run, dev, dtype, processor, model = load_run(path, device)
    _, eval_samples = build_datasets(run.data, run.seed)
    result = evaluate(model, ChatCollator(processor), eval_samples, run.train.eval_batch_size,
                      run.train.max_new_tokens, dev, dtype)
    result["run"] = str(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1))  # this invocation's own dir
    print(f"eval of {path}: exact match {result['exact_match']:.1%} on {result['n_eval']} held-out samples")
    return result


def infer(path: str | Path, images: list[str], prompt: str | None, device: str = "auto") -> list[str]:
    from PIL import Image

    from harness.evaluate import generate_answers

    run, dev, dtype, processor, model = load_run(path, device)
    question = prompt or run.data.prompt
    samples = []
    for f in images:
        if not Path(f).is_file():
            raise ConfigError(f"invalid config: images contains {f!r}, which is not a file")
        samples.append({"images": [Image.open(f).convert("RGB")], "prompt": question, "answer": ""})
    answers = generate_answers(model, ChatCollator(processor), samples, run.train.eval_batch_size,
                               run.train.max_new_tokens, dev, desc="infer", dtype=dtype)
    for f, a in zip(images, answers):
        print(f"{f}: {a.strip()}")
    return answers

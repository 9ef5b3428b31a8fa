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
from harness.config import RunConfig, load_saved_run, validate
from harness.errors import UserError


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
    """Answer `prompt` (default: the run's data.prompt) about each image, one line per image in the given order.
    An image that cannot be read or processed gets an error line and the others are still answered (batched);
    then UserError (exit 2) names the failed ones."""
    from harness.evaluate import generate_answers

    run, dev, dtype, processor, model = load_run(path, device)
    collator = ChatCollator(processor)
    question = prompt or run.data.prompt
    samples, errors = {}, {}
    for f in images:
        sample, error = _image_sample(f, question, collator)
        if error:
            errors[f] = error
        else:
            samples[f] = sample
    answers = dict(zip(samples, generate_answers(model, collator, list(samples.values()), run.train.eval_batch_size,
                                                 run.train.max_new_tokens, dev, desc="infer", dtype=dtype)))
    for f in images:
        print(f"{f}: {answers[f].strip()}" if f in answers else f"{f}: error: {errors[f]}")
    if errors:
        raise UserError(f"{len(errors)} of {len(images)} images could not be answered: "
                        + "; ".join(f"{f} ({e})" for f, e in errors.items()) + ". Fix: pass readable image files")
    return [answers[f] for f in images]


def _image_sample(f: str, question: str, collator: ChatCollator) -> tuple[dict | None, str | None]:
    """(sample, None), or (None, why) for an image that is missing, unreadable or that the processor rejects
    (checked alone here, so one bad image never fails the batch it would have been generated in)."""
    from PIL import Image

    if not Path(f).is_file():
        return None, "not a file"
    try:
        with Image.open(f) as im:
            sample = {"images": [im.convert("RGB")], "prompt": question, "answer": ""}
        collator.prompts([sample])
    except Exception as e:  # noqa: BLE001 - PIL and processors raise many types for a bad image
        return None, f"{type(e).__name__}: {e}"
    return sample, None

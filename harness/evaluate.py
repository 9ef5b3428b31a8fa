"""Evaluation by generation: batched greedy answers for held-out samples, exact-match accuracy and
character error rate (CER)."""
from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from harness.collator import ChatCollator


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


@torch.no_grad()
def generate_answers(model, collator: ChatCollator, samples: list[dict], batch_size: int, max_new_tokens: int,
                     device, desc: str = "eval", dtype: torch.dtype = torch.float32) -> list[str]:
    """Inference mode: eval(), KV cache on, left padding; returns the decoded answers.

    16-bit runs generate under autocast, as they train: modules_to_save are kept in fp32.
    """
    was_training = model.training
    model.eval()
    tok = collator.tokenizer
    answers: list[str] = []
    for i in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False):
        chunk = samples[i : i + batch_size]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator.prompts(chunk).items()}
        amp = (torch.autocast(device.type, dtype=dtype) if dtype in (torch.bfloat16, torch.float16)
               else contextlib.nullcontext())
        with amp:
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        answers += tok.batch_decode(new, skip_special_tokens=True)
    if was_training:
        model.train()
    return answers


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return float("nan")
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(references)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two strings; O(len(a) len(b))."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(predictions: list[str], references: list[str]) -> float:
    """Corpus-level character error rate: total edit distance / total reference characters, over the
    normalized strings (whitespace collapsed, as for exact match). Can exceed 1 (long wrong predictions).
    NaN when there are no references; edits / 1 when all references are empty."""
    if not references:
        return float("nan")
    pairs = [(normalize(p), normalize(r)) for p, r in zip(predictions, references)]
    return sum(levenshtein(p, r) for p, r in pairs) / max(sum(len(r) for _, r in pairs), 1)


def evaluate(model, collator, samples, batch_size, max_new_tokens, device, dtype=torch.float32) -> dict:
    preds = generate_answers(model, collator, samples, batch_size, max_new_tokens, device, dtype=dtype)
    refs = [s["answer"] for s in samples]
    return {"exact_match": exact_match(preds, refs), "cer": cer(preds, refs), "n_eval": len(samples),
            "examples": [{"answer": r, "prediction": p} for r, p in list(zip(refs, preds))[:10]]}

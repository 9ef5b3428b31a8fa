"""save_pretrained_merged / push_to_hub_merged, bound to the models the API returns (harness.api.peft.bind_methods).

merged_16bit folds LoRA into the base with harness.export.save_merged (a plain transformers checkpoint + the
processor); lora saves the adapter as a CLI run's save_adapter does. The token for the hub comes from the call or
HF_TOKEN, is handed to HfApi and never stored.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from harness.api.errors import reject_unknown
from harness.api.state import state_of

SAVE_METHODS = ("merged_16bit", "lora")


def save_pretrained_merged(self, save_directory, tokenizer=None, save_method: str = "merged_16bit", **kwargs) -> Path:
    """Write `save_directory`: merged_16bit (LoRA folded in, 16-bit, loads with plain transformers) or lora (the
    adapter, loads with peft.PeftModel.from_pretrained). `tokenizer`: the processor / tokenizer to save beside it
    (None: the one from_pretrained returned). The model itself is left as it was (the merge runs on a copy)."""
    where = "save_pretrained_merged"
    reject_unknown(kwargs, where)
    state = state_of(self, where)
    if save_method not in SAVE_METHODS:
        raise ValueError(f"{where}: save_method={save_method!r} is not supported (allowed: "
                         f"{', '.join(SAVE_METHODS)})")
    if state.plan is None:
        raise ValueError(f"{where}: the model has no LoRA adapters to merge (allowed: the model returned by "
                         "get_peft_model; a full fine-tune saves with model.save_pretrained)")
    processor = tokenizer if tokenizer is not None else state.processor
    out = Path(save_directory)
    if save_method == "lora":
        from harness.pipeline import write_model

        return write_model(self, processor, out)
    from harness.export import save_merged

    # save_merged replaces the LoRA layers of the model it is given and casts it: a copy keeps the trained model
    return save_merged(copy.deepcopy(self), processor, out, merged_dtype(state))


def merged_dtype(state) -> torch.dtype:
    """The run's compute dtype when it is 16-bit (bf16 / fp16 on GPU), else bf16 (e.g. an fp32 run on CPU)."""
    from harness import modeling

    dtype = modeling.resolve_dtype(state.run.quant.dtype, state.device)
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def push_to_hub_merged(self, repo_id: str, tokenizer=None, save_method: str = "merged_16bit", token=None,
                       private: bool = True, commit_message: str | None = None, **kwargs) -> str:
    """save_pretrained_merged into a temporary folder, then upload it to the hub repo `repo_id` (created if
    missing, private unless private=False) with huggingface_hub.HfApi. Returns the repo id."""
    where = "push_to_hub_merged"
    reject_unknown(kwargs, where)
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"{where}: repo_id={repo_id!r} (allowed: a hub repo id like 'user/model')")
    from harness.secrets import hub_token

    hub_token_value = token or hub_token()  # read now, handed to HfApi, never kept
    if not hub_token_value:
        raise ValueError(f"{where}: token=None and HF_TOKEN is not set (allowed: token='hf_...' or HF_TOKEN in the "
                         "environment)")
    from harness.pipeline import push_to_hub

    with tempfile.TemporaryDirectory(prefix="harness-push-") as tmp:
        folder = save_pretrained_merged(self, Path(tmp) / "model", tokenizer, save_method)
        push_to_hub(folder, repo_id, hub_token_value, private, commit_message or f"harness: {save_method} model")
    return repo_id

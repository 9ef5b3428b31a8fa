"""A data collator for TRL's SFTTrainer over chat samples, doing its work with the CLI's ChatCollator.

Each row is {"messages": [...]} in the chat format (user content items {"type": "text", "text": ...} and
{"type": "image", "image": PIL image | path | bytes}, then an assistant turn), optionally with the images in a
top-level "images" list instead; or a harness sample {"prompt", "answer", "images"}. Rows are turned into harness
samples with harness.data.common.parse_messages and batched by harness.collator.ChatCollator (chat template,
image tokens, label masking), wrapped like a CLI run's collator when pipeline.accelerate installed host-side
preparation. Use it with SFTConfig(remove_unused_columns=False, dataset_text_field="",
dataset_kwargs={"skip_prepare_dataset": True}).
"""
from __future__ import annotations

from harness.api.errors import reject_unknown
from harness.api.state import find_state
from harness.collator import ChatCollator, messages_of
from harness.data.common import BadSample, as_text, open_image, parse_messages

ROW_FORMAT = ('{"messages": [{"role": "user", "content": [{"type": "text", "text": ...}, {"type": "image", '
              '"image": ...}]}, {"role": "assistant", "content": [{"type": "text", "text": ...}]}]}, or '
              '{"prompt", "answer", "images"}')


class _SystemChatCollator(ChatCollator):
    """ChatCollator that keeps a sample's system turn (sample["system"]) in front of the user turn."""

    def prompt_text(self, sample: dict) -> str:
        if not sample.get("system"):
            return super().prompt_text(sample)
        messages = [{"role": "system", "content": [{"type": "text", "text": sample["system"]}]},
                    *messages_of(sample, self.multimodal)]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class VisionDataCollator:
    """data_collator for SFTTrainer: VisionDataCollator(model, processor). Labels: the answer and its end of turn
    only (train_on_responses_only=True, as a CLI run), or every non-image token. max_seq_length: None takes
    from_pretrained's; a longer batch is an error naming it."""

    def __init__(self, model, processor, max_seq_length: int | None = None, train_on_responses_only: bool = True,
                 **kwargs):
        reject_unknown(kwargs, type(self).__name__)
        if not isinstance(train_on_responses_only, bool):
            raise ValueError(f"{type(self).__name__}: train_on_responses_only={train_on_responses_only!r} (allowed: "
                             "True or False)")
        state = find_state(model)
        if max_seq_length is None:
            max_seq_length = state.run.data.max_length if state is not None else 2048
        self.chat = _SystemChatCollator(processor, train_on_responses_only, max_seq_length)
        self.batches = _as_in_the_cli(self.chat, model, state)

    def __call__(self, rows: list[dict]) -> dict:
        return self.batches([sample_of(row, i) for i, row in enumerate(rows)])


class UnslothVisionDataCollator(VisionDataCollator):
    """VisionDataCollator with Unsloth's default: labels on every non-image token (train_on_responses_only=False)."""

    def __init__(self, model, processor, max_seq_length: int | None = None, train_on_responses_only: bool = False,
                 **kwargs):
        super().__init__(model, processor, max_seq_length, train_on_responses_only, **kwargs)


def _as_in_the_cli(collator, model, state):
    """The wrapping pipeline.train_run gives its collator after accelerate: host-side preparation on the
    Qwen2-VL family, the fused loss's labelled rows elsewhere."""
    accelerated = state.accelerated if state is not None else {}
    if accelerated.get("host_prep"):
        from harness import host_prep

        return host_prep.PreparingCollator(collator, host_prep.installed_spec(model))
    if accelerated.get("cross_entropy"):
        from harness.loss_rows import LossRowsCollator

        return LossRowsCollator(collator)
    return collator


def sample_of(row, i: int) -> dict:
    """One dataset row -> a harness sample {"prompt", "answer", "images", "system"}; ValueError naming the row."""
    try:
        if isinstance(row, dict) and "messages" in row:
            prompt, answer, images = parse_messages(row["messages"])
            images = images or list(row.get("images") or [])
            return dict(prompt=prompt, answer=answer, images=[open_image(x) for x in images],
                        system=_system_text(row["messages"]))
        if isinstance(row, dict) and "prompt" in row and "answer" in row:
            return dict(prompt=as_text(row["prompt"], "prompt"), answer=as_text(row["answer"], "answer"),
                        images=[open_image(x) for x in row.get("images") or []])
    except BadSample as e:
        raise ValueError(f"batch row {i}: {e} (allowed: {ROW_FORMAT})") from None
    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise ValueError(f"batch row {i} has {keys}; allowed: {ROW_FORMAT}")


def _system_text(messages) -> str:
    """The text of the system turns (parse_messages drops them)."""
    parts = []
    for m in messages:
        content = m.get("content")
        if m.get("role") == "system":
            parts.append(content if isinstance(content, str) else
                         "".join(c.get("text") or "" for c in content or [] if c.get("type", "text") == "text"))
    return "\n".join(p for p in parts if p)

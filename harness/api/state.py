"""What the Python API knows about a model it built, kept beside the model (never inside its state dict).

`ApiState` is the one record: the validated RunConfig (the same dataclasses the CLI composes), the TargetPlan
(None before get_peft_model, and with full fine-tuning), the processor, the device, and what accelerate /
checkpointing did. It lives in `_STATES`, a WeakKeyDictionary keyed by the model object: the entry goes away
with the model, and nothing is added to the model's attributes, state dict or pickles.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from harness.config import RunConfig
from harness.targets import TargetPlan


@dataclass
class ApiState:
    run: RunConfig  # validated; hand it to a CLI run with harness.api.cli_overrides(model)
    processor: Any  # processor (VLM) or tokenizer (text model) from from_pretrained
    device: Any  # torch.device the model lives on
    plan: TargetPlan | None = None  # set by get_peft_model: exactly the modules PEFT received
    accelerated: dict = field(default_factory=dict)  # harness.pipeline.accelerate's report
    checkpointing: str = "off"  # what harness.checkpointing.enable_checkpointing enabled


# model object -> its ApiState (the registry of models built by this API; entries die with their model)
_STATES: "weakref.WeakKeyDictionary[Any, ApiState]" = weakref.WeakKeyDictionary()


def attach(model, state: ApiState) -> None:
    _STATES[model] = state


def find_state(model) -> ApiState | None:
    """The state of `model`, or of the base model it wraps (a PEFT model built outside the API)."""
    for m in (model, _base_of(model)):
        if m is not None and m in _STATES:
            return _STATES[m]
    return None


def state_of(model, where: str) -> ApiState:
    """find_state, or a ValueError naming the call and what model it needs."""
    state = find_state(model)
    if state is None:
        raise ValueError(f"{where}: model={type(model).__name__} was not built by this API; allowed: the model "
                         "returned by FastVisionModel / FastLanguageModel.from_pretrained (or get_peft_model)")
    return state


def _base_of(model):
    get = getattr(model, "get_base_model", None)
    try:
        return get() if callable(get) else None
    except Exception:  # noqa: BLE001 - a wrapper without a base model
        return None

"""Keep secrets out of saved configs, logs and W&B: redact by key name and by known values."""
from __future__ import annotations

import os
import re
from typing import Any

SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "OPENAI_API_KEY")
SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.I)
REDACTED = "***REDACTED***"


def hub_token() -> str | None:
    """The Hugging Face token from the environment (read when needed, never stored)."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")


def secret_values() -> list[str]:
    vals = [os.environ[k] for k in SECRET_ENV if os.environ.get(k)]
    vals += [v for k, v in os.environ.items() if SECRET_KEY.search(k) and v and len(v) >= 8]
    return sorted(set(vals), key=len, reverse=True)


def redact(obj: Any, _values: list[str] | None = None) -> Any:
    """A copy of a nested dict/list with secret-named keys and secret values replaced."""
    values = secret_values() if _values is None else _values
    if isinstance(obj, dict):
        return {k: (REDACTED if isinstance(k, str) and SECRET_KEY.search(k) and v not in (None, "", False)
                    else redact(v, values)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, values) for v in obj)
    if isinstance(obj, str):
        for v in values:
            obj = obj.replace(v, REDACTED)
    return obj

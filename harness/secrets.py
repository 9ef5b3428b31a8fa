"""Keep secrets out of saved configs, overrides, logs, errors and W&B: redact by key name and by known values.

The name rule (`is_secret_name`) is exact, on the words of a key's last component (split at `_ - .` and
camelCase, lower-cased):
- any word is one of SECRET_WORDS (password, secret, credential, apikey, ...), or
- the last two words are api/access/private/secret/auth + key (`api_key`, `AWS_SECRET_ACCESS_KEY`), or
- the last word is `token` (singular) and the word before it does not name a count or a special token
  (`hf_token`, `HF_TOKEN`, `access_token` are secret; `max_new_tokens`, `tokens`, `max_tokens`, `pad_token`
  are not).
Values: every value stored under a secret name (in the config or the command line) and every secret-named
environment variable's value are replaced wherever they appear inside other strings.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Iterable

SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "OPENAI_API_KEY")
SECRET_WORDS = frozenset({"password", "passwd", "passphrase", "secret", "secrets", "credential", "credentials",
                          "apikey", "authorization"})
KEY_PREFIXES = frozenset({"api", "access", "private", "secret", "auth"})
# `<word>_token` that is not a credential: counts and special tokens
NOT_SECRET_TOKEN = frozenset({"max", "min", "num", "n", "pad", "eos", "bos", "unk", "sep", "cls", "mask", "image",
                              "video", "audio", "boi", "eoi", "start", "end"})
REDACTED = "***REDACTED***"
MIN_VALUE_LEN = 4  # shorter values are not searched inside other strings (too many false hits)


def _words(name: str) -> list[str]:
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", name.lower()) if w]


def is_secret_name(key: Any) -> bool:
    """Whether a config key / env var / override key names a secret (see the module docstring)."""
    if not isinstance(key, str):
        return False
    words = _words(key.rsplit(".", 1)[-1].lstrip("+~"))
    if not words:
        return False
    if SECRET_WORDS.intersection(words):
        return True
    if len(words) >= 2 and words[-1] == "key" and words[-2] in KEY_PREFIXES:
        return True
    return words[-1] == "token" and (len(words) == 1 or words[-2] not in NOT_SECRET_TOKEN)


def hub_token() -> str | None:
    """The Hugging Face token from the environment (read when needed, never stored)."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")


def _split_override(s: str) -> tuple[str, str] | None:
    """'+logger.api_key=abc' -> ('+logger.api_key', 'abc'); None when s is not a key=value override."""
    m = re.match(r"^([+~]{0,2}[A-Za-z_][\w.\-/@]*)=(.*)$", s, re.S)
    return (m.group(1), m.group(2)) if m else None


def values_in(obj: Any, argv: Iterable[str] = ()) -> list[str]:
    """The secret values to search for: under secret names in `obj` (nested dicts / lists), in `key=value`
    command-line overrides, and in the environment. Longest first, so a value containing another goes whole."""
    found: set[str] = {os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    found |= {v for k, v in os.environ.items() if is_secret_name(k) and v}

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if is_secret_name(k) and isinstance(v, (str, int)) and not isinstance(v, bool):
                    found.add(str(v))
                else:
                    walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        elif isinstance(o, str) and (kv := _split_override(o)) and is_secret_name(kv[0]) and kv[1]:
            found.add(kv[1])

    walk(obj)
    walk(list(argv))
    return sorted((v for v in found if len(v) >= MIN_VALUE_LEN), key=len, reverse=True)


def replace_values(s: str, values: list[str]) -> str:
    for v in values:
        s = s.replace(v, REDACTED)
    return s


def redact_text(s: str, values: list[str]) -> str:
    """A config string or a `key=value` override (the whole value goes when the key names a secret)."""
    kv = _split_override(s)
    if kv and is_secret_name(kv[0]) and kv[1]:
        return f"{kv[0]}={REDACTED}"
    return replace_values(s, values)


def redact(obj: Any, values: list[str] | None = None) -> Any:
    """A copy of a nested dict / list with secret-named keys' values and known secret values replaced."""
    values = values_in(obj, sys.argv) if values is None else values
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_name(k) and v not in (None, "", False) else redact(v, values))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, values) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj, values)
    return obj


def redact_log_records(values: list[str]) -> None:
    """Every log record's text from here on has `values` replaced (Hydra's launcher logs each job's overrides,
    a failing library may log its arguments). Installed once, by the CLI entry point, before Hydra starts."""
    if not values:
        return
    make = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = make(*args, **kwargs)
        text = record.getMessage()
        clean = replace_values(text, values)
        if clean != text:
            record.msg, record.args = clean, None
        return record

    logging.setLogRecordFactory(factory)


class RedactingStream:
    """stdout / stderr with `values` replaced in everything written (Hydra prints overrides in its errors)."""

    def __init__(self, stream, values: list[str]):
        self._stream, self._values = stream, values

    def write(self, s: str) -> int:
        return self._stream.write(replace_values(s, self._values))

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def guard_output(argv) -> None:
    """From here on, this process's stdout, stderr and log records have the secrets in `argv` (and the environment's)
    replaced. Set once per process at its entry point (the CLI; a sweep job's own process)."""
    values = values_in({}, argv)
    if values:
        redact_log_records(values)
        sys.stdout, sys.stderr = RedactingStream(sys.stdout, values), RedactingStream(sys.stderr, values)

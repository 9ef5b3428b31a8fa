"""Files a run writes about itself: strict JSON (non-finite floats as null), written atomically, by rank 0 only."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def is_main_process() -> bool:
    """Under torchrun every rank runs the whole command; rank 0 writes the run folder, logs and evaluates."""
    return int(os.environ.get("RANK", "0")) == 0


def finite_or_none(obj: Any) -> Any:
    """A copy with every NaN / inf float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any, indent: int = 1) -> Path:
    """Write `obj` as strict JSON via a temporary file and a rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(finite_or_none(obj), indent=indent, allow_nan=False))
    os.replace(tmp, path)
    return path

"""W&B: offline by default with its files inside the run dir; config logged with secrets redacted."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from harness.config import LoggerConfig
from harness.secrets import redact

log = logging.getLogger(__name__)


def start(cfg: LoggerConfig, run_dir: Path, config: dict, name: str, tags: list[str]):
    """Return an active wandb run, or None when logger.backend=none."""
    if cfg.backend == "none" or cfg.mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    kwargs = dict(project=cfg.project, entity=cfg.entity, group=cfg.group, name=redact(cfg.name or name),
                  tags=redact(list(dict.fromkeys([*tags, *cfg.tags]))), config=redact(config), dir=str(run_dir),
                  reinit="finish_previous", settings=wandb.Settings(console="off", x_disable_stats=True))
    argv = sys.argv
    sys.argv = redact(list(argv))  # W&B records the command line in its run metadata
    try:
        try:
            run = wandb.init(mode=cfg.mode, **kwargs)
        except Exception as e:  # online failed (no network, bad key): keep the run going offline
            if cfg.mode != "online":
                raise
            log.warning("W&B online logging failed (%s); continuing offline", e)
            run = wandb.init(mode="offline", **kwargs)
    finally:
        sys.argv = argv
    return run


def log_adapter(run, folder: Path, name: str) -> None:
    """The saved adapter as a W&B model artifact (offline runs keep it for `wandb sync`)."""
    if run is None:
        return
    import re

    import wandb

    art = wandb.Artifact(re.sub(r"[^A-Za-z0-9._-]", "-", name), type="model")
    art.add_dir(str(folder))
    run.log_artifact(art)


def finish(run, summary: dict) -> None:
    if run is None:
        return
    for k, v in summary.items():
        if isinstance(v, (int, float, str)):
            run.summary[k] = v
    offline = run.settings.mode == "offline" or getattr(run.settings, "_offline", False)
    path = run.dir
    run.finish()
    if offline:
        print(f"W&B run saved offline; upload it with: wandb sync {Path(path).parent}")

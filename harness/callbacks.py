"""Hydra callbacks: the sweep report at the end of every --multirun, and a non-zero exit if a job failed
(status failed, diverged or unknown in its metrics.json / status.json) or no report could be written."""
from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from harness.errors import UserError


class SweepReportCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from harness.report import print_report, write_report

        try:
            result = write_report(Path(config.hydra.sweep.dir))
        except UserError as e:  # e.g. no job left a folder: the sweep did not do what was asked
            print(f"error: no sweep report: {e}", file=sys.stderr)
            sys.exit(1)
        print_report(result)
        if result["failed"]:
            print(f"sweep finished with {len(result['failed'])} failed job(s): "
                  + ", ".join(f"{r['job']} ({r['status']})" for r in result["failed"]), file=sys.stderr)
            sys.exit(1)


class RedactSweepConfig(Callback):
    """Hydra saves the sweep's config with its command line (multirun.yaml) before any job runs: rewritten with
    secrets redacted (harness/secrets.py) when a job starts and when the sweep ends."""

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        _redact_multirun_yaml(config)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        _redact_multirun_yaml(config)


def _redact_multirun_yaml(config: DictConfig) -> None:
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from harness.secrets import redact, values_in

    if config.hydra.get("mode") != RunMode.MULTIRUN:
        return
    path = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
    if not path.is_file():
        return
    saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    clean = redact(saved, values_in(saved, sys.argv))
    if clean != saved:
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(clean)))

"""Hydra callbacks: the sweep report at the end of every --multirun, and a non-zero exit if a job failed."""
from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepReportCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from harness.report import print_report, write_report

        result = write_report(Path(config.hydra.sweep.dir))
        print_report(result)
        if result["failed"]:
            print(f"sweep finished with {len(result['failed'])} failed job(s): "
                  + ", ".join(r["job"] for r in result["failed"]), file=sys.stderr)
            sys.exit(1)

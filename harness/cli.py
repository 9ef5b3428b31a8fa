"""`harness`: the Hydra entry point. Compose, validate, dispatch on `mode`; everything else lives elsewhere."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from harness.config import ConfigError, register_configs, validate

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("harness")

register_configs()


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def dispatch(cfg: DictConfig):
    run = validate(cfg)  # before any model is built
    if run.mode == "plan":
        from harness.pipeline import plan_run

        return plan_run(run).trainable_params
    if run.mode == "train":
        from harness.pipeline import train_run
        from harness.secrets import redact

        config_dict = redact(OmegaConf.to_container(cfg, resolve=True))
        return train_run(run, config_dict, run_dir())["eval_exact_match"]
    raise ConfigError(f"mode={run.mode} is not implemented yet")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig):
    try:
        return dispatch(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()

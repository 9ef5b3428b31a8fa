"""`--multirun hydra/launcher=gpus`: one job per free GPU slot, the rest queued (see harness/gpu_pool.py).

Hydra only instantiates launchers that live in the `hydra_plugins` package; the work is in harness.gpu_pool.
"""

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class GpuLauncherConf:
    _target_: str = "hydra_plugins.harness_launcher.gpu_launcher.GpuLauncher"
    # auto: every GPU this process sees (CUDA_VISIBLE_DEVICES respected); or a list of device ids
    gpus: Any = "auto"
    gpus_per_job: int = 1
    # without GPUs: how many jobs run at once on the CPU
    cpu_jobs: int = 1
    # jobs run in fresh processes started this way (spawn: CUDA is never inherited half-initialised)
    start_method: str = "spawn"
    env: dict = field(default_factory=dict)  # extra environment for every job
    max_parallel: Optional[int] = None  # at most this many jobs at once (null: one per slot)


ConfigStore.instance().store(group="hydra/launcher", name="gpus_schema", node=GpuLauncherConf, provider="harness")


class GpuLauncher(Launcher):
    def __init__(self, **conf: Any) -> None:
        self.conf = conf
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from harness.gpu_pool import PoolSettings, launch

        return launch(self, job_overrides, initial_job_idx, PoolSettings.from_conf(self.conf))

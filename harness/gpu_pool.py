"""Sweep jobs spread over a host's GPUs: each job runs in a fresh process that sees only its own GPU(s)
(CUDA_VISIBLE_DEVICES set before torch starts), at most one job per slot, the rest queued until a slot frees.

Used by the Hydra launcher `hydra/launcher=gpus` (hydra_plugins/harness_launcher). A job's outputs and failures
stay in its own directory exactly as with Hydra's basic launcher (harness.cli records them); the launcher adds
`launcher.json` there: the devices it ran on and when.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolSettings:
    slots: tuple[tuple[str, ...], ...]  # the device ids each slot exposes; () = a CPU slot
    start_method: str = "spawn"
    env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_conf(cls, conf: dict, visible: list[str] | None = None) -> "PoolSettings":
        gpus = conf.get("gpus", "auto")
        per_job = int(conf.get("gpus_per_job", 1))
        if per_job < 1:
            raise ValueError(f"hydra.launcher.gpus_per_job={per_job} (allowed: an integer >= 1)")
        devices = (visible_gpus() if visible is None else visible) if gpus == "auto" else [str(g) for g in gpus]
        if devices and per_job > len(devices):
            raise ValueError(f"hydra.launcher.gpus_per_job={per_job} but only {len(devices)} GPU(s) "
                             f"({','.join(devices)}); lower gpus_per_job or list more hydra.launcher.gpus")
        slots = [tuple(devices[i:i + per_job]) for i in range(0, len(devices) - per_job + 1, per_job)]
        if not slots:
            slots = [()] * max(1, int(conf.get("cpu_jobs", 1)))
        if conf.get("max_parallel"):
            slots = slots[: int(conf["max_parallel"])]
        return cls(tuple(slots), conf.get("start_method", "spawn"),
                   tuple(sorted((str(k), str(v)) for k, v in (conf.get("env") or {}).items())))


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else every device torch counts."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def _run_one(payload: bytes, devices: tuple[str, ...], env: tuple[tuple[str, str], ...]):
    """In the job's own process: pin the devices, then run the job as Hydra's launchers do."""
    if devices:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU slot: the job must not reach for a GPU
    os.environ.update(dict(env))
    import cloudpickle
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import run_job, setup_globals
    from omegaconf import open_dict

    from harness.run_files import write_json

    idx, overrides, hydra_context, config, task_function, singletons = cloudpickle.loads(payload)
    from harness.secrets import guard_output

    guard_output(overrides)  # a fresh process: the CLI's redaction of typed secrets is not inherited
    setup_globals()
    Singleton.set_state(singletons)
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    job_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
    started = time.time()
    ret = run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json(job_dir / "launcher.json", {"devices": list(devices), "pid": os.getpid(), "start": started,
                                           "end": time.time(),
                                           "cuda_visible_devices": os.environ["CUDA_VISIBLE_DEVICES"]})
    return cloudpickle.dumps(ret)


def launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
           settings: PoolSettings) -> list[Any]:
    """Run every job, at most one per slot at a time, and return Hydra's JobReturns in job order."""
    import cloudpickle
    from hydra.core.singleton import Singleton
    from hydra.core.utils import configure_log, filter_overrides, setup_globals

    setup_globals()
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    slots = list(settings.slots)
    where = ", ".join("GPU " + ",".join(s) if s else "CPU" for s in slots)
    log.info(f"Launching {len(job_overrides)} jobs, {len(slots)} at a time ({where})")
    singletons = Singleton.get_state()
    ctx = multiprocessing.get_context(settings.start_method)
    results: dict[int, Any] = {}
    free = list(range(len(slots)))
    running: dict[Any, tuple[int, int]] = {}  # future -> (job position, slot)
    with ProcessPoolExecutor(max_workers=len(slots), mp_context=ctx, max_tasks_per_child=1) as pool:
        for pos, overrides in enumerate(job_overrides):
            while not free:  # queue: wait for a running job to give its slot back
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    results[running[fut][0]] = fut
                    free.append(running.pop(fut)[1])
            slot = free.pop(0)
            idx = initial_job_idx + pos
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))} "
                     f"({'GPU ' + ','.join(slots[slot]) if slots[slot] else 'CPU'})")
            payload = cloudpickle.dumps((idx, list(overrides), launcher.hydra_context, config,
                                         launcher.task_function, singletons))
            running[pool.submit(_run_one, payload, slots[slot], settings.env)] = (pos, slot)
        for fut in running:
            results[running[fut][0]] = fut
        returns = [cloudpickle.loads(results[pos].result()) for pos in range(len(job_overrides))]
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return returns

"""torch.distributed set-up from torchrun or an ``srun`` step, and the few collectives training needs.

A process joins a process group only when a launcher started several: torchrun (``RANK`` / ``WORLD_SIZE``)
or ``srun`` (a job step: ``SLURM_STEP_NUM_TASKS`` / ``SLURM_PROCID``). ``sbatch`` and ``salloc`` also set
``SLURM_NTASKS``, but a ``python train.py`` in their script is one process, so that variable is never read.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lib.config import ConfigError

__all__ = ["DistInfo", "launch_workers", "launch_env", "first_host", "slurm_port", "init_distributed", "is_main",
           "all_reduce_sum", "all_gather_objects", "cleanup", "select_device", "local_cuda_index", "on_main"]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int | None = None   # processes on this node that see the same devices (torchrun); None: unknown

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launch_workers(nproc: int, script: str, argv: list[str]) -> int:
    """Run ``python script *argv`` as ``nproc`` processes on this node (torchrun's machinery, its public
    ``elastic_launch``) and return the exit code of the first process that failed (0 when all succeeded).

    torchrun itself ends a failed run with a traceback of its own and exit 1; here the processes' own error
    line (printed once, by rank 0) and their documented exit code are what the caller sees.
    """
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):   # the processes report; torchrun's own logs stay quiet
        if name.startswith("torch.distributed.elastic"):    # (each of its loggers has a level of its own)
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)(script, *argv)
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return 128 - code if code < 0 else code or 1   # killed by signal N: 128 + N, as a shell reports it
    except SignalException as e:   # this process was signalled: the processes got the same signal and have
        return 128 + int(e.sigval)  # stopped as they do on it (a checkpoint first, for SIGTERM / SIGINT)
    return 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``gpu[003-004,9],cpu1`` -> ``gpu003``), without ``scontrol``."""
    head = re.match(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)*", nodelist.strip()).group(0)
    return re.sub(r"\[([^\],-]*)[^\]]*\]", r"\1", head)


def slurm_port(job_id: str, step_id: str = "0") -> int:
    """A rendezvous port from the job (and step) id: jobs sharing a node do not collide, and every task of
    a step computes the same one. In [10000, 30000): below Linux's ephemeral ports (32768+)."""
    return 10000 + (int(job_id) * 7 + int(step_id or 0)) % 20000


def launch_env(env: Mapping[str, str]) -> dict[str, str]:
    """The torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for this process.

    torchrun's own win; an ``srun`` step with several tasks is translated; anything else (a plain
    process, or one inside ``sbatch`` / ``salloc`` whatever their ``--ntasks``) is a single process: {}.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        return {k: env[k] for k in keys if k in env}
    tasks = env.get("SLURM_STEP_NUM_TASKS")
    if tasks is None or "SLURM_PROCID" not in env or int(tasks) <= 1:
        return {}
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": tasks, "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
           "MASTER_ADDR": env.get("MASTER_ADDR") or (first_host(nodes) if nodes else "127.0.0.1")}
    if "MASTER_PORT" in env:
        out["MASTER_PORT"] = env["MASTER_PORT"]
    elif "SLURM_JOB_ID" in env:
        out["MASTER_PORT"] = str(slurm_port(env["SLURM_JOB_ID"], env.get("SLURM_STEP_ID", "0")))
    else:
        raise ConfigError("srun step without SLURM_JOB_ID: set MASTER_PORT for the rendezvous")
    return out


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group if launched by torchrun or srun; a single process otherwise.

    Under CUDA each process takes device ``local rank mod visible devices`` (so one GPU bound per task
    works); torchrun starting more processes than the devices they all see is refused before any GPU work.
    """
    env = launch_env(os.environ)
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    os.environ.update(env)  # init_process_group's env:// reads them
    local_world = env.get("LOCAL_WORLD_SIZE")
    info = DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                    int(local_world) if local_world else None)
    if device_type == "cuda":
        torch.cuda.set_device(local_cuda_index(info))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return info


def local_cuda_index(info: DistInfo) -> int:
    """This process's GPU: its local rank modulo the visible devices; an error when processes would share one."""
    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError("train.device asks for CUDA but no GPU is visible to this process")
    if info.local_world_size is not None and info.local_world_size > count:
        raise ConfigError(f"{info.local_world_size} processes on this node but {count} visible GPU(s): start at "
                          f"most {count} (torchrun --nproc_per_node / NPROC), or set train.device=cpu")
    return info.local_rank % count


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums across processes (float64, so counts stay exact)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` for a single process."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T], shared: tuple[type[Exception], ...] = (ConfigError,)) -> T:
    """``fn()`` on rank 0 only; every rank returns its (picklable) result or raises its error.

    The outcome is broadcast whatever happens on rank 0, so no rank is left waiting in a collective: an
    error of a ``shared`` type is raised on every rank as that type with rank 0's message, any other as
    a RuntimeError naming it (rank 0 re-raises its own).
    """
    if not dist.is_initialized():
        return fn()
    outcome: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            outcome = [("ok", fn())]
        except BaseException as e:  # every failure must reach the other ranks
            failure, outcome = e, [("error", type(e).__name__, str(e))]
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0][0] == "ok":
        return outcome[0][1]
    _, name, message = outcome[0]
    kind = next((k for k in shared if k.__name__ == name), None)
    raise kind(message) if kind is not None else RuntimeError(f"rank 0 failed: {name}: {message}")


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def select_device(name: str, info: DistInfo) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda[:N]``; under several processes each takes ``local_cuda_index``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name!r} but CUDA is not available")
        return torch.device("cuda", local_cuda_index(info) if info.enabled else torch.device(name).index or 0)
    return torch.device(name)


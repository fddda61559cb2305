"""Several training processes: the torchrun process group, this process's rank and device, and the collectives the loop needs.

Under ``torchrun`` (``WORLD_SIZE > 1``) each rank reads a disjoint part of the
data, gradients are averaged by DistributedDataParallel (gloo on CPU, nccl on
CUDA), logged losses are averaged over ranks, and only rank 0 writes the run
folder. A rank's process ends as soon as its training has (see
:func:`end_worker_process`). With one process every collective here is the
identity and no process group is made.

Layer: training (imports only the base layer).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from musiclm.device import pick_device


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place among the training processes: its rank, how many there are, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run folder and prints."""
        return self.rank == 0


def env_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), known before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def setup_distributed(device: str | None) -> Dist:
    """The process group when launched by torchrun (WORLD_SIZE > 1), and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(env_rank(), world, local_rank, dev)


def teardown_distributed(d: Dist) -> None:
    """Destroy the process group :func:`setup_distributed` made, if it made one."""
    if d.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def end_worker_process() -> NoReturn:
    """End this torchrun worker with exit status 0, skipping the interpreter's teardown.

    DDP keeps references to its gloo process group that outlive ``destroy_process_group``,
    so gloo's worker threads are still running while Python finalizes. The last collective
    (``all_gather_object`` in a checkpoint save) leaves its output tensors to such a thread
    to free; on a busy machine the thread runs late, after finalization began, and freeing
    a tensor that Python already dropped takes the GIL. Python then ends the thread with
    ``pthread_exit``, which unwinds through a noexcept destructor: std::terminate, SIGABRT,
    and torchrun stops every other rank. The run folder is complete and closed by now, so
    the process only has to flush its output and leave.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def all_sum(values: list[float], d: Dist) -> list[float]:
    """``values`` summed element-wise over all ranks (float64); ``values`` itself with one process."""
    if d.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def all_mean(values: list[float], d: Dist) -> list[float]:
    """``values`` averaged element-wise over all ranks."""
    return [v / d.world_size for v in all_sum(values, d)]


def all_gather(value: Any, d: Dist) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order; ``[value]`` with one process."""
    if d.world_size == 1:
        return [value]
    values: list[Any] = [None] * d.world_size
    dist.all_gather_object(values, value)
    return values

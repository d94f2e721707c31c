"""The torchrun process group of the inference jobs (``pixsigma-sample``, ``pixsigma-evaluate``): rank, world, device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's rank in a world of ``world_size`` processes (a single process: 0 of 1)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (a no-op in a single process)."""
        if self.world_size > 1:
            dist.barrier()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_distributed() -> tuple[Dist, torch.device]:
    """torchrun's process group (NCCL on CUDA, gloo on CPU), or a single process."""
    if "RANK" not in os.environ:
        return Dist(), default_device()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    return Dist(rank, world), device


def close_distributed() -> None:
    """Leave the process group (after a last barrier), when there is one."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

"""The torchrun process group of the inference jobs (``pixsigma-sample``, ``pixsigma-evaluate``): rank, world, device."""

from __future__ import annotations

import gc
import logging
import os
import sys
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
        gc.collect()  # objects in cycles that still hold the group go now, not at interpreter exit


def exit_torchrun_worker() -> None:
    """End a torchrun worker whose run finished on every rank: flush, then ``os._exit(0)``.

    Under load, a rank of a finished 2-rank gloo run sometimes died in interpreter shutdown with
    ``terminate called without an active exception`` (SIGABRT) after its last barrier and
    ``destroy_process_group``; torchrun then reports the whole run failed and SIGTERMs the other rank. Gloo's
    worker threads can still release tensors that own Python objects while the interpreter is torn down
    (pytorch/pytorch#179291 describes the race; its fix, an atexit destroy, was abandoned). Everything the run
    writes is written and closed by now, so the worker skips finalization. A plain ``python`` process (no
    ``RANK``) returns normally.
    """
    if "RANK" not in os.environ:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

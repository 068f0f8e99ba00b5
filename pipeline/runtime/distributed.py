"""Process groups under torchrun: a plain block keyed on `RANK` / `LOCAL_RANK` / `WORLD_SIZE`.

Without `RANK` everything is a single process and the collectives below are identities, so
the training loop reads the same either way. NCCL on CUDA (one GPU per process), gloo on CPU;
`master_process` (rank 0) alone writes files.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.runtime.stage import resolve_device


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def master_process(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_spec: str = "auto") -> DistEnv:
    """Join the torchrun process group when `RANK` is set; otherwise a single process."""
    if int(os.environ.get("RANK", -1)) == -1:
        return DistEnv(device=resolve_device(device_spec))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    device = resolve_device(device_spec)
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"  # one GPU per process
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        atexit.register(_destroy_process_group)
    return DistEnv(rank, local_rank, world_size, device)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.ddp:
        dist.barrier()


def broadcast(env: DistEnv, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.ddp:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not env.ddp:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out

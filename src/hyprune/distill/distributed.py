"""torch.distributed setup for torchrun / accelerate launch, and the few collectives the loop needs.

Under a launcher (``WORLD_SIZE > 1`` in the environment) the process group is created here: gloo on
the CPU, nccl on GPUs (one GPU per process, ``LOCAL_RANK``), and kept until the process exits, so a
script can call `finetune` and then `distill` in one launch (re-creating a group under torchrun
reads stale rendezvous keys and fails). A group that the caller created is used as is. With one
process every helper is a no-op.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device | None = None  # None: keep the model where it is (single process)
    owns_group: bool = False  # created here (destroyed at exit), not by the caller

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistInfo:
    """Join (or create) the process group when launched with more than one process."""
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        owns = False
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return DistInfo()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        atexit.register(_destroy)
        world, rank = dist.get_world_size(), dist.get_rank()
        owns = True
    if world <= 1:
        return DistInfo(owns_group=owns)
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistInfo(world_size=world, rank=rank, local_rank=local, device=device, owns_group=owns)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks (in place on a copy; the device follows the backend)."""
    if not info.enabled:
        return tensor
    t = tensor.detach().clone()
    if dist.get_backend() == "nccl":
        t = t.to(info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / info.world_size).to(tensor.device)


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out

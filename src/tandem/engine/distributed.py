"""Scale-out on PyTorch's own engine: torchrun + DistributedDataParallel.

`tandem run` started by `torchrun --nproc_per_node=N` (or multi-node torchrun) finds the usual
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) and joins the process
group: NCCL on CUDA, gloo on CPU. Each rank trains on its shard of every batch; DDP averages
the gradients; only rank 0 writes logs, checkpoints and reports.

Rule for methods: anything that decides *structure* (importance scores, masks, gates, chosen
bitwidths, k-means centroids) must be identical on every rank. Compute it with `on_rank0`
(rank 0 computes, the others receive its result) or reduce it with `all_reduce_mean`; never
let each rank decide from its own shard of the data.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1; a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local)


def info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def is_main() -> bool:
    return info().is_main


def barrier() -> None:
    if info().enabled:
        dist.barrier()


def on_rank0(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and give every rank its (picklable) result.

    Use it for every structural decision (which channels to prune, which bits to use), so all
    ranks build the same network."""
    if not info().enabled:
        return fn()
    box = [fn() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over ranks (a copy; `t` is unchanged)."""
    if not info().enabled:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / info().world_size


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

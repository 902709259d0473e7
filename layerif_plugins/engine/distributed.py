"""Data parallelism through ``torch.distributed`` (``torchrun``): shards, reductions, rank-0 I/O.

The engine calls these helpers unconditionally; without an initialised process group they
are no-ops (world size 1), so one code path serves one process and many.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(world_size, rank)`` of the current process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def shard(n: int) -> list[int]:
    """This rank's example indices (strided, so every rank gets a similar mix of lengths)."""
    size, rank = world()
    return list(range(rank, n, size))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (per-example arrays: each rank fills its own rows, zeros elsewhere)."""
    size, _ = world()
    if size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if world()[0] > 1:
        dist.barrier()


def is_main() -> bool:
    return world()[1] == 0


def init_from_env(device_type: str) -> torch.device | None:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    gloo on CPU, nccl on CUDA; returns this rank's device (``cuda:LOCAL_RANK`` on GPU) or None
    when not launched distributed.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return None
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")

"""Process-group set-up for torchrun, and the few collective helpers the trainer needs.

``torchrun --nproc_per_node N -m langcell pretrain ...`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``
in each process's environment. Without them the trainer runs as a single process and none of this
touches ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    """Where this process stands in the job."""

    rank: int  # global rank of this process (0 on one process)
    local_rank: int  # rank on this machine: picks the GPU
    world_size: int  # number of processes in the job
    device: torch.device  # the device this process computes on

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and the final model."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def setup(device: str | None = None) -> DistributedContext:
    """Join the process group torchrun prepared (NCCL on GPUs, gloo on CPU), or run alone.

    Parameters
    ----------
    device
        ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device)


def teardown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistributedContext) -> None:
    """Wait for every process (no-op on one)."""
    if ctx.distributed:
        dist.barrier()


def all_ranks_agree(ctx: DistributedContext, flag: bool) -> bool:
    """True only if ``flag`` is true on every rank (used to stop together on a non-finite loss)."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0.5)


def mean_over_ranks(ctx: DistributedContext, values: dict[str, float]) -> dict[str, float]:
    """Average logged scalars over ranks so the log shows the job's numbers, not rank 0's."""
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    tensor /= ctx.world_size
    return dict(zip(keys, tensor.tolist(), strict=True))


def sum_over_ranks(ctx: DistributedContext, values: dict[str, float]) -> dict[str, float]:
    """Sum counters (cells, tokens) over ranks."""
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist(), strict=True))

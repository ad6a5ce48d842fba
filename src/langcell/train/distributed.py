"""The process group under torchrun (set-up in :mod:`langcell._distributed`) and the trainer's collectives.

``torchrun --nproc_per_node N -m langcell pretrain ...`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``
in each process's environment. Without them the trainer runs as a single process and none of this
touches ``torch.distributed``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Joining the group is shared with inference across processes, so it lives below both layers.
from .._distributed import DistributedContext, barrier, setup, teardown

__all__ = ["DistributedContext", "all_ranks_agree", "barrier", "mean_over_ranks", "setup", "sum_over_ranks",
           "teardown"]


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

"""Process groups: joining the one torchrun prepared, and sharing cells out among its processes.

``torchrun --nproc_per_node N -m langcell <command> ...`` sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` in each process's environment. :func:`setup` joins that group (or runs alone without
them); pretraining (:mod:`langcell.train.distributed`) and inference across processes (``tl.embed`` /
``tl.annotate`` with ``distributed=True``, and their commands) both use it, so it lives here, below both.

Inference splits the cells into contiguous shares (:func:`cell_share`), each process scores its share,
and :func:`gather_rows` puts the rows back together, in order, on every process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .errors import LangCellError

__all__ = [
    "DistributedContext", "barrier", "cell_share", "current_context", "gather_rows", "launched_by_torchrun",
    "setup", "teardown",
]


@dataclass
class DistributedContext:
    """Where this process stands in the job."""

    rank: int  # global rank of this process (0 on one process)
    local_rank: int  # rank on this machine: picks the GPU
    world_size: int  # number of processes in the job
    device: torch.device  # the device this process computes on (and the collectives use)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs, results and the final model."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun started (``WORLD_SIZE`` above 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | None = None) -> DistributedContext:
    """Join the process group torchrun prepared (NCCL on GPUs, gloo on CPU), or run alone.

    Parameters
    ----------
    device
        ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available). Under torchrun each process takes the
        GPU of its local rank.
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


def current_context() -> DistributedContext:
    """The context of a process group that is already initialised (by :func:`setup` or by the caller).

    Raises
    ------
    LangCellError
        If no process group is initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise LangCellError(
            "distributed=True needs an initialised process group: start the script with torchrun and call "
            "torch.distributed.init_process_group() first, or pass distributed=False"
        )
    # NCCL moves only CUDA tensors; gloo moves CPU tensors.
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistributedContext(
        rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=dist.get_world_size(), device=device,
    )


def teardown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistributedContext) -> None:
    """Wait for every process (no-op on one)."""
    if ctx.distributed:
        dist.barrier()


def cell_share(n_cells: int, ctx: DistributedContext) -> slice:
    """This process's contiguous share of ``n_cells`` cells: rows ``[r * n // W, (r + 1) * n // W)``.

    Shares differ in size by at most one cell, and every process gets at least one.

    Raises
    ------
    LangCellError
        When there are more processes than cells (every process raises the same error, before any
        collective call, so that none waits for the others).
    """
    if n_cells < ctx.world_size:
        raise LangCellError(
            f"{ctx.world_size} processes share {n_cells} cell(s): every process needs at least one cell; "
            f"start at most {max(n_cells, 1)} processes (torchrun --nproc_per_node) or run on one"
        )
    return slice(ctx.rank * n_cells // ctx.world_size, (ctx.rank + 1) * n_cells // ctx.world_size)


def gather_rows(part: np.ndarray, n_cells: int, ctx: DistributedContext) -> np.ndarray:
    """The rows of every process's share (:func:`cell_share`), in rank order, on every process.

    Parameters
    ----------
    part
        This process's rows, ``[share size, ...]``; the same trailing shape and dtype on every process.
    n_cells
        The number of cells shared out.
    ctx
        The job; with one process ``part`` is returned as it is.
    """
    if not ctx.distributed:
        return part
    sizes = [(r + 1) * n_cells // ctx.world_size - r * n_cells // ctx.world_size for r in range(ctx.world_size)]
    # all_gather needs tensors of one shape: pad every share to the largest, then cut the padding off.
    padded = torch.zeros((max(sizes), *part.shape[1:]), dtype=torch.from_numpy(part[:0]).dtype, device=ctx.device)
    padded[: len(part)] = torch.from_numpy(np.ascontiguousarray(part)).to(ctx.device)
    pieces = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(pieces, padded)
    return np.concatenate([piece[:size].cpu().numpy() for piece, size in zip(pieces, sizes, strict=True)])

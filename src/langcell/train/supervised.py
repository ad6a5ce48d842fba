"""The one supervised epoch loop: LangCell-CE (full and linear probe) and few-shot tuning all train here.

A trainer decides *what* a batch is and *how* its loss is computed; :func:`fit_epochs` does the rest
the same way for all of them: one AdamW step per batch (warm-up + cosine schedule, gradient clipping,
a clear error on a non-finite loss), the mean loss of every epoch, and one progress bar over steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .._progress import progress_bar
from ..errors import LangCellError
from .optim import repeatable_step, warmup_cosine_schedule

__all__ = ["adamw_with_schedule", "fit_epochs", "model_device", "optimizer_step", "seeded"]


def adamw_with_schedule(
    groups: list[dict[str, Any]], total_steps: int, warmup_fraction: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over ``groups`` (from :func:`langcell.train.optim.param_groups`) and its schedule.

    The learning rate warms up linearly over ``warmup_fraction`` of ``total_steps``, then decays to 0 on
    a cosine.
    """
    optimizer = torch.optim.AdamW(groups)
    return optimizer, warmup_cosine_schedule(optimizer, int(warmup_fraction * total_steps), total_steps, 0.0)


def fit_epochs(
    epoch_batches: Sequence[Sequence[Any]],
    batch_loss: Callable[[Any], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    parameters: list[torch.nn.Parameter],
    *,
    n_items: int,
    max_grad_norm: float,
    progress: bool,
    description: str,
) -> list[float]:
    """Run every epoch's batches through ``batch_loss`` and one optimiser step each.

    Parameters
    ----------
    epoch_batches
        For each epoch, its batches in order; a batch is whatever ``batch_loss`` takes and has a
        ``len`` (the rows of the training set it holds), e.g. an index array.
    batch_loss
        The scalar training loss of one batch (the model in training mode, gradients on).
    optimizer, scheduler
        Stepped once per batch (see :func:`adamw_with_schedule`).
    parameters
        The parameters whose gradient norm is clipped to ``max_grad_norm`` (0: no clipping).
    n_items
        The size of the training set: an epoch's loss is the sum of ``loss * len(batch)`` over its
        batches divided by this.
    max_grad_norm
        Gradient clipping threshold.
    progress, description
        Show one progress bar over all steps, labelled ``description``.

    Returns
    -------
    list of float
        The mean training loss of every epoch.
    """
    bar = progress_bar(sum(len(batches) for batches in epoch_batches), progress, description, "step")
    losses = []
    try:
        for batches in epoch_batches:
            loss_sum = 0.0
            for batch in batches:
                loss = batch_loss(batch)
                optimizer_step(loss, optimizer, scheduler, parameters, max_grad_norm)
                loss_sum += float(loss.detach()) * len(batch)
                if bar is not None:
                    bar.update(1)
            losses.append(loss_sum / n_items)
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        if bar is not None:
            bar.close()
    return losses


def optimizer_step(loss: torch.Tensor, optimizer: Any, scheduler: Any, parameters: Any, max_grad_norm: float) -> None:
    """Backward, clip, step the optimiser and the schedule; refuse a non-finite loss before any of it."""
    if not torch.isfinite(loss.detach()):
        raise LangCellError(
            f"the training loss became non-finite ({float(loss.detach())}); lower lr / encoder_lr"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    with repeatable_step(optimizer):
        optimizer.step()
    scheduler.step()


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch inside the block and restore the caller's random state afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")

"""Optimisation shared by every training loop: AdamW parameter groups, warm-up + cosine schedule.

Pretraining, LangCell-CE fine-tuning and few-shot tuning all build their optimiser from
:func:`param_groups` (no weight decay on biases and LayerNorm) and :func:`warmup_cosine_schedule`, and
step it inside :func:`repeatable_step`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import LangCellError
from ..models.langcell import LangCell


# -------------------------------------------------------------------------------------- parameters
def set_trainable(model: LangCell, stage: str, freeze_text: bool) -> None:
    """Choose what learns in ``stage`` (see the module docstring)."""
    for name, param in model.named_parameters():
        if stage == "cell":
            param.requires_grad = name.startswith(("cell_encoder.", "cell_proj.", "mgm_head."))
        elif freeze_text and name.startswith("text_encoder."):
            param.requires_grad = ".crossattention." in name
        else:
            param.requires_grad = True


def param_groups(model: LangCell, lr: float, text_lr_scale: float, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, LayerNorms and the scale; the pretrained text tower slower."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or "LayerNorm" in name or name == "logit_scale"
        # Cross-attention is new in every preset: it learns at the full rate like the heads.
        slow_text = name.startswith("text_encoder.") and ".crossattention." not in name
        groups.setdefault((no_decay, slow_text), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "lr": lr * (text_lr_scale if slow_text else 1.0),
        }
        for (no_decay, slow_text), params in sorted(groups.items())
    ]


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float):
    """Linear warm-up to the peak, then cosine down to ``min_ratio`` of it."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_rates(**values: Any) -> None:
    """Refuse a learning rate (or temperature) that is not a positive finite number, naming it."""
    for name, value in values.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and value > 0 and math.isfinite(value)):
            raise LangCellError(f"{name} must be a positive number, got {value!r}")


def check_optimiser_settings(**rates: Any) -> None:
    """Check the settings every supervised trainer takes: the learning rates given by name (see
    :func:`check_rates`) and ``weight_decay``, ``max_grad_norm`` (>= 0) and ``warmup_fraction`` ([0, 1))."""
    weight_decay, max_grad_norm = rates.pop("weight_decay"), rates.pop("max_grad_norm")
    warmup_fraction = rates.pop("warmup_fraction")
    check_rates(**rates)
    if not (weight_decay >= 0 and max_grad_norm >= 0):
        raise LangCellError("weight_decay and max_grad_norm must be >= 0 (0 turns them off)")
    if not 0 <= warmup_fraction < 1:
        raise LangCellError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")


# ------------------------------------------------------------------------------------------ the step
@contextlib.contextmanager
def repeatable_step(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Run the optimiser step inside on one intra-op thread when its parameters are on the CPU.

    Why: beside other work, torch's multi-threaded CPU AdamW update now and then rounded one thread's half
    of a tensor differently from identical gradients and moments, and a run with the same seed then went
    elsewhere (MODEL_CARD.md): 8 of 56 short demo runs under load, against 0 of 39 with the step on one
    thread, whose result is bitwise the normal one. The step is a small part of a CPU training step
    (e.g. 0.27-0.38 s against 0.20-0.25 s for the 39 M trainable parameters of ``base``'s cell stage on 2
    cores). GPU parameters are stepped as they are. The thread count is restored, also after an exception.
    """
    on_cpu = any(param.device.type == "cpu" for group in optimizer.param_groups for param in group["params"])
    threads = torch.get_num_threads()
    if on_cpu:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if on_cpu:
            torch.set_num_threads(threads)

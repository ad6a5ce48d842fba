"""Numeric precision of model passes: full fp32, or bf16/fp16 autocast.

One place for the names ``"fp32"``, ``"bf16"`` and ``"fp16"`` used by pretraining and by every
inference function (embeddings, zero-shot annotation, retrieval). Autocast, not a cast of the weights:
matrix products run in the low-precision type while softmax, LayerNorm and the losses stay in fp32, and
the model itself is left untouched.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .errors import LangCellError

__all__ = ["PRECISIONS", "autocast", "check_precision"]

#: Accepted precision names.
PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(precision: Any, device: torch.device | None = None) -> str:
    """Return ``precision`` if it names a precision usable on ``device``, else raise :class:`LangCellError`.

    Parameters
    ----------
    precision
        ``"fp32"``, ``"bf16"`` (CPU or CUDA) or ``"fp16"`` (CUDA only: CPU half precision is slow and
        inaccurate).
    device
        Where the model runs; ``None`` skips the device check.
    """
    if precision not in PRECISIONS:
        raise LangCellError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device is not None and device.type != "cuda":
        raise LangCellError(
            f"precision 'fp16' needs a CUDA device, the model is on {device.type}; use 'bf16' or 'fp32'"
        )
    return precision


def autocast(precision: str, device: torch.device):
    """A context manager running model passes on ``device`` at ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)

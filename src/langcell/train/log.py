"""The pretraining log: losses, throughput and held-out evaluation per logging window, on rank 0.

Always a CSV file (``<run>/log.csv``); with the recipe's ``tensorboard`` (``langcell pretrain
--tensorboard``) also TensorBoard event files in ``<run>/tensorboard``, one scalar per CSV column
(``tensorboard --logdir <run>/tensorboard`` shows them while the run goes on).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import time
from pathlib import Path
from typing import Any

from ..errors import LangCellError


def check_tensorboard() -> None:
    """Raise :class:`LangCellError` when the ``tensorboard`` package, which TensorBoard logging needs, is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise LangCellError(
            "TensorBoard logging (tensorboard=true in the recipe, or --tensorboard) needs the tensorboard "
            'package: pip install "langcell[tensorboard]", or turn it off'
        )


# ---------------------------------------------------------------------------------------------- log
class RunLog:
    """CSV (always) and TensorBoard (when asked for) on rank 0, and the run's one clock.

    ``log.csv`` has one row per logging window: ``stage`` (``cell`` or ``joint``), ``step`` (within
    the stage), the learning rate, the window's mean losses, its throughput, and ``elapsed_s``: seconds
    since the run started, on one clock for both stages. A resumed run goes on from the last
    ``elapsed_s`` the log holds (the time between the interruption and the resume is not counted).

    Parameters
    ----------
    out
        The run directory (``log.csv`` and ``tensorboard/`` go there).
    enabled
        Write anything at all (rank 0 only).
    started
        :func:`time.perf_counter` at the start of this call of the run (default: now).
    tensorboard
        Also write TensorBoard event files to ``out/tensorboard`` (check :func:`check_tensorboard` first).
    """

    FIELDS = ["stage", "step", "lr", "loss", "mgm_loss", "cc_loss", "ct_loss", "ctm_loss",
              "cells_per_s", "tokens_per_s", "elapsed_s", "eval_accuracy", "eval_macro_f1"]

    def __init__(self, out: Path, enabled: bool, started: float | None = None, tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.writer = None
        self.started = time.perf_counter() if started is None else started
        self.elapsed_before = 0.0  # seconds an earlier call of the run logged (resume)
        if not enabled:
            return
        self.path = out / "log.csv"
        fields = self.FIELDS
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if not fresh:
            # A resumed run keeps the columns its log started with (older runs lack the eval columns).
            with self.path.open(newline="") as f:
                fields = next(csv.reader(f), None) or self.FIELDS
        if not fresh:
            self.elapsed_before = _last_elapsed(self.path)
        self.file = self.path.open("a", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
        if fresh:
            self.csv.writeheader()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))

    def elapsed(self) -> float:
        """Seconds of the run so far: those of earlier calls (resume) plus those of this one."""
        return self.elapsed_before + time.perf_counter() - self.started

    def write(self, row: dict[str, Any], global_step: int) -> None:
        """Append one row (missing columns stay empty) and its numbers as TensorBoard scalars."""
        if not self.enabled:
            return
        self.csv.writerow({k: row.get(k, "") for k in self.csv.fieldnames})
        self.file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, float):
                    self.writer.add_scalar(key, value, global_step)
            self.writer.flush()

    def close(self) -> None:
        """Close the files."""
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def _last_elapsed(path: Path) -> float:
    """The last ``elapsed_s`` of an existing ``log.csv`` (0 when it has none or cannot be read as one)."""
    last = 0.0
    with path.open(newline="") as f, contextlib.suppress(csv.Error):
        for row in csv.DictReader(f):
            with contextlib.suppress(TypeError, ValueError):
                last = float(row.get("elapsed_s") or last)
    return last

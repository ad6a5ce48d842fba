"""The pretraining log: losses and throughput per logging window, as CSV (and TensorBoard when installed), on rank 0."""

from __future__ import annotations

import contextlib
import csv
import time
from pathlib import Path
from typing import Any


# ---------------------------------------------------------------------------------------------- log
class RunLog:
    """CSV (always) and TensorBoard (when installed) on rank 0, and the run's one clock.

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
    """

    FIELDS = ["stage", "step", "lr", "loss", "mgm_loss", "cc_loss", "ct_loss", "ctm_loss",
              "cells_per_s", "tokens_per_s", "elapsed_s"]

    def __init__(self, out: Path, enabled: bool, started: float | None = None) -> None:
        self.enabled = enabled
        self.writer = None
        self.started = time.perf_counter() if started is None else started
        self.elapsed_before = 0.0  # seconds an earlier call of the run logged (resume)
        if not enabled:
            return
        self.path = out / "log.csv"
        fresh = not self.path.exists()
        if not fresh:
            self.elapsed_before = _last_elapsed(self.path)
        self.file = self.path.open("a", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        if fresh:
            self.csv.writeheader()
        with contextlib.suppress(Exception):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))

    def elapsed(self) -> float:
        """Seconds of the run so far: those of earlier calls (resume) plus those of this one."""
        return self.elapsed_before + time.perf_counter() - self.started

    def write(self, row: dict[str, Any], global_step: int) -> None:
        if not self.enabled:
            return
        self.csv.writerow({k: row.get(k, "") for k in self.FIELDS})
        self.file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, float):
                    self.writer.add_scalar(key, value, global_step)

    def close(self) -> None:
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

"""The pretraining log: losses and throughput per logging window, as CSV (and TensorBoard when installed), on rank 0."""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Any


# ---------------------------------------------------------------------------------------------- log
class RunLog:
    """CSV (always) and TensorBoard (when installed) on rank 0."""

    FIELDS = ["stage", "step", "lr", "loss", "mgm_loss", "cc_loss", "ct_loss", "ctm_loss",
              "cells_per_s", "tokens_per_s", "elapsed_s"]

    def __init__(self, out: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.path = out / "log.csv"
        fresh = not self.path.exists()
        self.file = self.path.open("a", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        if fresh:
            self.csv.writeheader()
        with contextlib.suppress(Exception):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))

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

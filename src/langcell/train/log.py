"""The pretraining log: losses, throughput and held-out evaluation per logging window, on rank 0.

Always a CSV file (``<run>/log.csv``); with the recipe's ``tensorboard`` (``langcell pretrain
--tensorboard``) also TensorBoard event files in ``<run>/tensorboard``, one scalar per CSV column
(``tensorboard --logdir <run>/tensorboard`` shows them while the run goes on).
"""

from __future__ import annotations

import csv
import importlib.util
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
    """CSV (always) and TensorBoard (when asked for) on rank 0; a no-op on the other ranks.

    Parameters
    ----------
    out
        The run directory.
    enabled
        Whether this process writes (rank 0).
    tensorboard
        Also write TensorBoard event files to ``out/tensorboard`` (check :func:`check_tensorboard` first).
    """

    FIELDS = ["stage", "step", "lr", "loss", "mgm_loss", "cc_loss", "ct_loss", "ctm_loss",
              "cells_per_s", "tokens_per_s", "elapsed_s", "eval_accuracy", "eval_macro_f1"]

    def __init__(self, out: Path, enabled: bool, tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.path = out / "log.csv"
        fields = self.FIELDS
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if not fresh:
            # A resumed run keeps the columns its log started with (older runs lack the eval columns).
            with self.path.open(newline="") as f:
                fields = next(csv.reader(f), None) or self.FIELDS
        self.file = self.path.open("a", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
        if fresh:
            self.csv.writeheader()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))

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

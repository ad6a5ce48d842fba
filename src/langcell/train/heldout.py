"""Held-out zero-shot evaluation during pretraining: is the model getting better at what it is for?

With ``eval_every > 0`` a run carves ``eval_cells`` labelled cells out of the corpus at its start
(:func:`held_out_cells`: a seeded draw, the same on every process and on every resume), trains on the
rest only, and every ``eval_every`` optimiser steps scores the held-out cells zero-shot against the
corpus's cell-type texts (every distinct cell-type text of the corpus is a class), exactly as
:func:`langcell.tl.annotate` would with those texts as ``{name: description}`` labels. Accuracy and
macro-F1 go into the log beside the losses (rank 0 only), so a run can be watched and stopped when
they stop improving.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import LangCellError
from ..inference.zero_shot import encode_class_texts, zero_shot_scores
from ..metrics import classification_metrics
from .data import CellTextTable

__all__ = ["HeldOutEvaluation", "held_out_cells"]


def held_out_cells(table: CellTextTable, n_cells: int, seed: int) -> np.ndarray:
    """Indices (sorted) of ``n_cells`` corpus cells that have a cell-type text, drawn with ``seed``.

    Raises
    ------
    LangCellError
        When fewer than ``n_cells`` + 1 cells have a cell-type text (training needs some too).
    """
    labelled = table.cells_with_cell_type_text()
    if n_cells >= len(labelled):
        raise LangCellError(
            f"eval_cells={n_cells} but the corpus has only {len(labelled)} cells with a cell-type text, and "
            "training needs the rest; lower eval_cells in the recipe, or set eval_every to 0"
        )
    # A stream of its own (not the batch order's), so that changing the batch seed keeps the held-out set.
    rng = np.random.default_rng([seed, 15])
    return np.sort(rng.permutation(labelled)[:n_cells])


class HeldOutEvaluation:
    """Zero-shot accuracy and macro-F1 of the held-out cells against the corpus's cell-type texts.

    Parameters
    ----------
    corpus
        The :class:`~langcell.data.corpus.TokenCorpus` the run trains on.
    table
        Its :class:`~langcell.train.data.CellTextTable`.
    cells
        The held-out cells (:func:`held_out_cells`).
    max_length
        Cells are cut to this many tokens (the recipe's ``max_length``).
    precision
        The recipe's precision. Texts are read up to the text tower's positions, as annotation does.
    """

    def __init__(self, corpus: Any, table: CellTextTable, cells: np.ndarray, *, max_length: int,
                 precision: str) -> None:
        class_ids = np.unique(table.text_ids[table.cells_with_cell_type_text(), 0])
        self.texts = [table.texts[i] for i in class_ids]  # the classes: every cell-type text of the corpus
        self.truth = np.searchsorted(class_ids, table.text_ids[cells, 0])  # each held-out cell's class
        self.indices = np.asarray(cells, dtype=np.int64)  # corpus indices: the trainer leaves them out
        self.cells = [corpus[int(i)][:max_length] for i in cells]
        self.precision = precision

    def __call__(self, model: Any) -> dict[str, float]:
        """``{"eval_accuracy": ..., "eval_macro_f1": ...}`` of ``model`` now (its training mode is kept)."""
        classes = encode_class_texts(model, self.texts, precision=self.precision)
        scores = zero_shot_scores(model, self.cells, classes, precision=self.precision)
        metrics = classification_metrics(self.truth, scores.predicted, len(self.texts))
        return {"eval_accuracy": metrics["accuracy"], "eval_macro_f1": metrics["macro_f1"]}

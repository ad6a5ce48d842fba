"""Per-cell confidence and ontology-aware answers from a cells x classes score matrix.

:func:`langcell.tl.annotate` writes both; they live here, apart from the model work, because they only
need the scores, the class names and the classes' Cell Ontology terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..metrics import score_confidence
from ..ontology.hierarchy import lowest_common_ancestor
from ..ontology.texts import term_label, term_prefix


def write_confidence(adata: Any, key_added: str, scores: np.ndarray) -> None:
    """``obs[key_added + "_margin"]`` and ``obs[key_added + "_entropy"]`` of the score matrix."""
    margin, entropy = score_confidence(scores)
    adata.obs[key_added + "_margin"] = margin
    adata.obs[key_added + "_entropy"] = entropy


def lca_answers(
    scores: np.ndarray, term_ids: Sequence[str], calls: np.ndarray, lca_margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's ontology-aware answer: the lowest common ancestor of its two best classes when close.

    A cell gets the label of the lowest common CL ancestor (:func:`~langcell.ontology.lowest_common_ancestor`)
    of its best and second-best classes when their score margin is below ``lca_margin`` and both
    classes have CL terms sharing an ancestor other than the root; every other cell keeps its call
    (``calls``, abstentions included).

    Returns
    -------
    answers : numpy.ndarray
        ``object [n_cells]``: the answer of every cell.
    coarsened : numpy.ndarray
        ``bool [n_cells]``: the cells answered with an ancestor.
    """
    order = np.argsort(-scores, axis=1, kind="stable")[:, :2]
    answers = np.asarray(calls, dtype=object).copy()
    coarsened = np.zeros(scores.shape[0], dtype=bool)
    if scores.shape[1] < 2:
        return answers, coarsened
    best, second = order[:, 0], order[:, 1]
    margin = scores[np.arange(best.size), best] - scores[np.arange(best.size), second]
    is_cl = np.array([bool(t) and term_prefix(t) == "CL" for t in term_ids])
    close = (margin < lca_margin) & is_cl[best] & is_cl[second]
    pairs: dict[tuple[int, int], str | None] = {}
    for cell in np.flatnonzero(close):
        pair = (int(best[cell]), int(second[cell]))
        if pair not in pairs:
            ancestor = lowest_common_ancestor(term_ids[pair[0]], term_ids[pair[1]])
            pairs[pair] = None if ancestor is None else term_label(ancestor)
        if pairs[pair] is not None:
            answers[cell] = pairs[pair]
            coarsened[cell] = True
    return answers, coarsened


def class_term_ids(uns_entry: dict, n_classes: int) -> list[str]:
    """The CL term id of each class from annotate's resolution table (``""`` where a class has none)."""
    resolution = uns_entry.get("resolution") or {}
    term_ids = list(resolution.get("term_id", [""] * n_classes))
    if len(term_ids) != n_classes:
        return [""] * n_classes
    return ["" if t is None or pd.isna(t) else str(t) for t in term_ids]

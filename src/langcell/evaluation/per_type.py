"""Per-type accuracy of predicted labels (novel cell-type identification): each type's accuracy, what
its cells were called instead, and the means over seen and novel types."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._checks import check_anndata as _check_anndata
from .._checks import check_key_added as _check_key
from .._checks import listed
from .._docs import doc_params
from .._labels import NO_LABEL_VALUES
from ..errors import LangCellError
from ..metrics import classification_metrics
from ._tables import check_name_list, obs_strings

_PER_TYPE_COLUMNS = ("cell_type", "n_cells", "n_correct", "accuracy", "seen", "most_predicted", "most_predicted_share")


@doc_params
def per_type_accuracy(
    adata: Any,
    *,
    label_key: str,
    prediction_key: str,
    seen: Sequence[str] | None = None,
    key_added: str = "langcell_per_type",
    inplace: bool = False,
) -> dict[str, Any] | None:
    """Accuracy of every true cell type, and its means over seen and unseen (novel) types.

    For true type ``t`` with ``n_t`` scored cells of which ``c_t`` are predicted ``t``, the type's
    accuracy is ``c_t / n_t`` (its recall). A type is *seen* when it is in ``seen`` (e.g. the types of
    the pretraining corpus) and *unseen* otherwise. Cells whose true label is missing, empty,
    "unknown" or "na" are not scored; a missing prediction counts as wrong.

    Parameters
    ----------
    adata
        Cells with true labels and predictions in obs.
    label_key
        obs column of the true cell types.
    prediction_key
        obs column of the predictions (e.g. ``"langcell_cell_type"`` from :func:`langcell.tl.annotate`).
    seen
        The seen type names; ``None``: no seen/unseen split (the ``seen`` column and the split
        summaries are ``None``).
    {inplace}

    Returns
    -------
    dict or None
        ``inplace=False``: the result, JSON-ready:

        ``"per_type"``
            one record per true type (category order for a categorical column, else sorted):
            ``cell_type``, ``n_cells``, ``n_correct``, ``accuracy``, ``seen`` (bool, or None),
            ``most_predicted`` (the commonest prediction for the type's cells; ties: alphabetical, a missing
            prediction last; None when it is missing) and
            ``most_predicted_share``.
        ``"summary"``
            ``n_cells`` (scored), ``n_excluded``, ``n_types``, ``accuracy`` (over cells), ``macro_f1``
            (:func:`langcell.metrics.classification_metrics` over the true and predicted classes, as
            scikit-learn's ``f1_score(average="macro")``), ``mean_type_accuracy`` (balanced accuracy);
            with ``seen``: ``n_seen_types``, ``n_unseen_types``, ``mean_accuracy_seen`` and
            ``mean_accuracy_unseen`` (means of the type accuracies; None without such types),
            ``accuracy_seen_cells`` and ``accuracy_unseen_cells`` (over the cells of those types), and
            ``seen_without_cells`` (seen names with no scored cell).

        ``inplace=True``: ``None``, and ``uns[key_added]`` holds ``"params"`` (label_key, prediction_key, seen),
        ``"summary"`` and ``"per_type"`` (as ``{column: list}``, h5ad-writable: without the ``seen``
        column when ``seen`` is None, ``""`` for a missing ``most_predicted``).

    Raises
    ------
    LangCellError
        For a missing column, the same column twice, no scored cell, predictions that share no name with
        the labels (two vocabularies), a bad ``seen`` or ``key_added``.
    """
    _check_anndata(adata)
    _check_key(key_added)
    if label_key == prediction_key:
        raise LangCellError(f"label_key and prediction_key are both {label_key!r}; pass the predictions' column")
    truth = obs_strings(adata, label_key, "label_key")
    predicted = obs_strings(adata, prediction_key, "prediction_key")
    seen_set = None if seen is None else set(check_name_list(seen, "seen"))
    scored = ~np.isin(np.char.lower(truth.astype(str)), list(NO_LABEL_VALUES))
    if not scored.any():
        raise LangCellError(
            f"obs[{label_key!r}] has no usable label (only missing, 'unknown' or 'na'); pass a labelled column"
        )
    truth, predicted = truth[scored], predicted[scored]
    named = {str(p) for p in predicted if p is not None and str(p)}
    if named and not named & set(truth):
        # Different vocabularies ("B cell" vs "B cell, CD19-positive") would score every type 0.
        raise LangCellError(
            f"no prediction in obs[{prediction_key!r}] is a label of obs[{label_key!r}] (predictions "
            f"{listed(sorted(named), 5)}, labels {listed(sorted(set(truth)), 5)}): they name classes differently; "
            "annotate with the label column's own names as labels, or compare Cell Ontology term id columns"
        )
    column = adata.obs[label_key]
    present = set(truth)
    if isinstance(column.dtype, pd.CategoricalDtype):
        types = list(dict.fromkeys(str(c).strip() for c in column.cat.categories if str(c).strip() in present))
    else:
        types = sorted(present)

    records = []
    for name in types:
        mine = predicted[truth == name]
        counts = pd.Series(mine).value_counts()
        # Ties: alphabetical, a missing prediction ('') last.
        top = sorted(counts.index[counts == counts.max()], key=lambda v: (v == "", v))[0]
        n_correct = int(np.sum(mine == name))
        records.append({
            "cell_type": name,
            "n_cells": int(mine.size),
            "n_correct": n_correct,
            "accuracy": n_correct / mine.size,
            "seen": None if seen_set is None else name in seen_set,
            "most_predicted": str(top) if top != "" else None,
            "most_predicted_share": float(counts.max() / mine.size),
        })

    classes = types + sorted(set(predicted) - set(types))
    index = {name: code for code, name in enumerate(classes)}
    overall = classification_metrics(
        np.array([index[v] for v in truth]), np.array([index[v] for v in predicted]), len(classes)
    )
    accuracies = np.array([r["accuracy"] for r in records])
    summary: dict[str, Any] = {
        "n_cells": int(truth.size),
        "n_excluded": int(np.sum(~scored)),
        "n_types": len(types),
        "accuracy": overall["accuracy"],
        "macro_f1": overall["macro_f1"],
        "mean_type_accuracy": float(accuracies.mean()),
    }
    if seen_set is not None:
        is_seen = np.array([r["seen"] for r in records], dtype=bool)
        cell_seen = np.isin(truth, [t for t in types if t in seen_set])
        summary.update(
            n_seen_types=int(is_seen.sum()),
            n_unseen_types=int((~is_seen).sum()),
            mean_accuracy_seen=float(accuracies[is_seen].mean()) if is_seen.any() else None,
            mean_accuracy_unseen=float(accuracies[~is_seen].mean()) if (~is_seen).any() else None,
            accuracy_seen_cells=float(np.mean(truth[cell_seen] == predicted[cell_seen])) if cell_seen.any() else None,
            accuracy_unseen_cells=(
                float(np.mean(truth[~cell_seen] == predicted[~cell_seen])) if (~cell_seen).any() else None
            ),
            seen_without_cells=sorted(seen_set - present),
        )
    if not inplace:
        return {"summary": summary, "per_type": records}
    adata.uns[key_added] = {
        "params": {
            "label_key": label_key,
            "prediction_key": prediction_key,
            "seen": None if seen is None else sorted(seen_set),
        },
        "summary": summary,
        "per_type": per_type_columns(records),
    }
    return None


def per_type_columns(records: list[dict[str, Any]]) -> dict[str, list]:
    """Per-type records as h5ad-writable columns ("" for a missing name, seen omitted when unknown)."""
    columns: dict[str, list] = {}
    for column in _PER_TYPE_COLUMNS:
        values = [r[column] for r in records]
        if column == "seen" and any(v is None for v in values):
            continue
        columns[column] = ["" if v is None and column == "most_predicted" else v for v in values]
    return columns

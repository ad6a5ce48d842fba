"""Can a user trust the calls? Calibration of the confidences, and ontology-aware correctness, on labelled cells.

:func:`calibration`
    The reliability curve and the expected calibration error of a confidence column against the truth.
:func:`ontology_accuracy`
    The share of cells whose call is the true Cell Ontology term, a correct but coarser ancestor of it,
    wrong, or an abstention.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._checks import check_anndata as _check_anndata
from .._checks import check_key_added as _check_key
from .._checks import listed
from .._docs import doc_params
from .._labels import NO_LABEL_VALUES
from ..errors import LangCellError
from ..metrics import reliability_curve
from ..ontology.hierarchy import RELATIONS, term_relation
from ..ontology.resolve import read_label_table, resolve_labels
from ._tables import obs_strings

__all__ = ["calibration", "ontology_accuracy"]

#: Calls that are abstentions rather than claims (annotate's default unknown_label, and the like).
ABSTENTIONS = frozenset({*NO_LABEL_VALUES, "unassigned"})


def _labelled(adata: Any, label_key: str, prediction_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truth and calls of the cells with a usable label, and the mask of those cells."""
    if label_key == prediction_key:
        raise LangCellError(f"label_key and prediction_key are both {label_key!r}; pass the predictions' column")
    truth = obs_strings(adata, label_key, "label_key")
    predicted = obs_strings(adata, prediction_key, "prediction_key")
    scored = ~np.isin(np.char.lower(truth.astype(str)), list(NO_LABEL_VALUES))
    if not scored.any():
        raise LangCellError(
            f"obs[{label_key!r}] has no usable label (only missing, 'unknown' or 'na'); pass a labelled column"
        )
    return truth[scored], predicted[scored], scored


@doc_params
def calibration(
    adata: Any,
    *,
    label_key: str,
    prediction_key: str = "langcell_cell_type",
    confidence_key: str | None = None,
    n_bins: int = 10,
    key_added: str = "langcell_calibration",
    inplace: bool = False,
) -> dict[str, Any] | None:
    """Reliability curve and expected calibration error (ECE) of the calls' confidence on labelled cells.

    A cell is correct when its call equals its label. The confidences are binned into ``n_bins``
    equal-width bins of [0, 1]; :func:`langcell.metrics.reliability_curve` gives each bin's count, mean
    confidence and accuracy, ``ECE = sum_b (n_b / n) |accuracy_b - confidence_b|`` and the maximum gap.
    A calibrated model has accuracy equal to confidence in every bin (the diagonal of
    :func:`langcell.pl.calibration`). Cells whose label is missing, "unknown" or "na" are left out.

    Parameters
    ----------
    adata
        Cells with labels and calls in obs.
    label_key
        obs column of the true labels (named as the classes of the calls).
    prediction_key
        obs column of the calls (e.g. ``"langcell_cell_type"`` from :func:`langcell.tl.annotate`).
    confidence_key
        obs column of the confidences in [0, 1]; default ``prediction_key + "_score"`` (the best
        class's score).
    n_bins
        Number of bins, at least 1.
    {inplace}

    Returns
    -------
    dict or None
        ``inplace=False``: ``"bins"`` (``{column: list}``: lower, upper, n_cells, mean_confidence,
        accuracy; NaN where a bin is empty), ``"ece"``, ``"mce"``, ``"n_cells"``, ``"accuracy"``,
        ``"mean_confidence"`` and ``"params"`` (label_key, prediction_key, confidence_key, n_bins).
        ``inplace=True``: ``None``, the same dict in ``uns[key_added]``.

    Raises
    ------
    LangCellError
        For a missing column, the same column as labels and calls, no labelled cell, calls that share no
        name with the labels, confidences outside [0, 1], a bad ``n_bins`` or ``key_added``.
    """
    _check_anndata(adata)
    _check_key(key_added)
    confidence_key = prediction_key + "_score" if confidence_key is None else confidence_key
    truth, predicted, scored = _labelled(adata, label_key, prediction_key)
    if not isinstance(confidence_key, str) or confidence_key not in adata.obs.columns:
        raise LangCellError(
            f"obs has no confidence column {confidence_key!r}; pass confidence_key=<an obs column of scores in "
            f"[0, 1]> (columns: {listed(adata.obs.columns)})"
        )
    if not set(predicted) & set(truth):
        raise LangCellError(
            f"no call in obs[{prediction_key!r}] is a label of obs[{label_key!r}] (calls {listed(sorted(set(predicted)), 5)}, "
            f"labels {listed(sorted(set(truth)), 5)}); annotate with the label column's own names as labels"
        )
    confidence = adata.obs[confidence_key].to_numpy(dtype=np.float64)[scored]
    result = reliability_curve(confidence, predicted == truth, n_bins)
    result["params"] = {
        "label_key": label_key, "prediction_key": prediction_key, "confidence_key": confidence_key,
        "n_bins": int(n_bins),
    }
    if inplace:
        adata.uns[key_added] = result
        return None
    return result


@doc_params
def ontology_accuracy(
    adata: Any,
    *,
    label_key: str,
    prediction_key: str = "langcell_cell_type",
    annotation_key: str | None = "langcell_cell_type",
    mapping: Mapping[str, str] | str | None = None,
    key_added: str = "langcell_ontology_accuracy",
    inplace: bool = False,
) -> dict[str, Any] | None:
    """Ontology-aware correctness on labelled cells: exact, correct at an ancestor, wrong, or abstained.

    Labels and calls are resolved to Cell Ontology terms; a call is *exact* when it is the label's
    term, *ancestor* when it is a strict ancestor of it (correct but coarser: "T cell" for a CD4 T
    cell, as the ``_lca`` answers of :func:`langcell.tl.annotate` give), *wrong* otherwise (a more
    specific term than the label included: it claims what the label does not say), and *abstained*
    when the call is missing, "unknown", "na" or "unassigned". See :mod:`langcell.ontology.hierarchy`.

    Names are resolved, in order, with ``mapping``, with the resolution table of the annotation in
    ``uns[annotation_key]`` (how :func:`langcell.tl.annotate` resolved its classes), then with
    :func:`langcell.ontology.resolve_labels` (term ids, CL labels, community names).

    Parameters
    ----------
    adata
        Cells with labels and calls in obs.
    label_key
        obs column of the true labels (names or CL term ids).
    prediction_key
        obs column of the calls (e.g. ``"langcell_cell_type"`` or ``"langcell_cell_type_lca"``).
    annotation_key
        The ``key_added`` of the annotation whose ``uns[...]["resolution"]`` names the classes' terms;
        ``None`` or absent: not used.
    mapping
        ``{name: CL term id}`` (or a JSON/TSV path) for names that do not resolve otherwise.
    {inplace}

    Returns
    -------
    dict or None
        ``inplace=False``: ``"summary"`` with ``n_cells`` (labelled), the counts ``n_exact``,
        ``n_ancestor``, ``n_wrong``, ``n_abstained``, their fractions ``exact``, ``ancestor``, ``wrong``,
        ``abstained`` and ``correct`` (exact + ancestor); ``"terms"`` (``{name: term id}`` used) and
        ``"params"``. ``inplace=True``: ``None``, the same dict in ``uns[key_added]``.

    Raises
    ------
    LangCellError
        For a missing column, no labelled cell, a bad mapping or ``key_added``, or names that resolve to
        no Cell Ontology term (listed, with the fix).
    """
    _check_anndata(adata)
    _check_key(key_added)
    truth, predicted, _ = _labelled(adata, label_key, prediction_key)
    abstained = np.isin(np.char.lower(predicted.astype(str)), list(ABSTENTIONS))
    names = sorted(set(truth) | set(predicted[~abstained]))
    terms = _terms_of(names, adata, annotation_key, mapping)
    relations = np.array(
        ["abstained" if off else term_relation(terms[p], terms[t]) for t, p, off in zip(truth, predicted, abstained,
                                                                                         strict=True)]
    )
    summary: dict[str, Any] = {"n_cells": int(truth.size)}
    for relation in (*RELATIONS, "abstained"):
        count = int(np.sum(relations == relation))
        summary[f"n_{relation}"] = count
        summary[relation] = count / truth.size
    summary["correct"] = summary["exact"] + summary["ancestor"]
    result = {
        "summary": summary,
        "terms": terms,
        "params": {"label_key": label_key, "prediction_key": prediction_key, "annotation_key": annotation_key},
    }
    if inplace:
        adata.uns[key_added] = result
        return None
    return result


def _terms_of(names: list[str], adata: Any, annotation_key: str | None, mapping: Any) -> dict[str, str]:
    """``{name: CL term id}`` from the mapping, the annotation's resolution table, then the resolver."""
    terms = dict(read_label_table(mapping, "mapping"))
    entry = adata.uns.get(annotation_key) if annotation_key is not None else None
    resolution = entry.get("resolution") if isinstance(entry, Mapping) else None
    if isinstance(resolution, Mapping) and "label" in resolution and "term_id" in resolution:
        for label, term in zip(resolution["label"], resolution["term_id"], strict=False):
            if isinstance(term, str) and term.startswith("CL:"):
                terms.setdefault(str(label), term)
    rest = [name for name in names if name not in terms]
    if rest:
        table = resolve_labels(rest)
        terms.update(dict(zip(table["label"], table["term_id"], strict=True)))
    return {name: terms[name] for name in names}

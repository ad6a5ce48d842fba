"""Metrics as pure numpy functions: classification (accuracy, macro-F1), cell-text retrieval (recall@k),
per-cell confidence (margin, entropy) and calibration (reliability curve, expected calibration error).

No model and no AnnData here, so every number langcell reports can be checked against an independent
computation. Rankings are by score, descending; equal scores are ordered by index (the lower index
ranks first), so every result is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._checks import check_positive_int
from .errors import LangCellError

#: Default recall cut-offs (the paper reports recall@1/5/10).
DEFAULT_KS = (1, 5, 10)


def classification_metrics(true_codes: np.ndarray, predicted_codes: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class F1 of integer predictions.

    Per class ``c``: ``F1 = 2 TP / (2 TP + FP + FN)`` (0 when the class is present but never
    predicted correctly). Macro-F1 is the unweighted mean of F1 over the classes present in the true
    **or** predicted codes, as scikit-learn's ``f1_score(average="macro")`` computes it.

    Parameters
    ----------
    true_codes, predicted_codes
        Integer class codes in ``[0, n_classes)``, same length (at least 1).
    n_classes
        Number of classes (the length of ``f1_per_class``).

    Returns
    -------
    dict
        ``accuracy`` (float), ``macro_f1`` (float) and ``f1_per_class`` (list of ``n_classes`` floats;
        NaN for a class absent from both arrays).
    """
    true_codes = np.asarray(true_codes, dtype=np.int64)
    predicted_codes = np.asarray(predicted_codes, dtype=np.int64)
    if true_codes.shape != predicted_codes.shape or true_codes.ndim != 1 or true_codes.size == 0:
        raise LangCellError("true and predicted codes must be 1-D arrays of the same, non-zero length")
    for codes in (true_codes, predicted_codes):
        if codes.min() < 0 or codes.max() >= n_classes:
            raise LangCellError(f"class codes must lie in [0, {n_classes}); got {codes.min()}..{codes.max()}")
    true_positive = np.bincount(true_codes[true_codes == predicted_codes], minlength=n_classes)
    n_true = np.bincount(true_codes, minlength=n_classes)
    n_predicted = np.bincount(predicted_codes, minlength=n_classes)
    present = (n_true + n_predicted) > 0
    f1 = np.full(n_classes, np.nan)
    f1[present] = 2.0 * true_positive[present] / (n_true[present] + n_predicted[present])
    return {
        "accuracy": float(np.mean(true_codes == predicted_codes)),
        "macro_f1": float(np.mean(f1[present])),
        "f1_per_class": [float(v) for v in f1],
    }



def frequency_order(truth: Sequence[str], predicted: Sequence[str]) -> list[str]:
    """The labels of ``truth`` by frequency (most frequent first, ties alphabetical), then the labels
    that are only predicted (e.g. an abstention label), ordered the same way by their predictions."""
    def by_count(values: np.ndarray) -> list[str]:
        names, counts = np.unique(values, return_counts=True)
        return [str(names[i]) for i in sorted(range(names.size), key=lambda i: (-counts[i], str(names[i])))]

    true_labels = by_count(np.asarray(truth, dtype=str))
    predicted = np.asarray(predicted, dtype=str)
    return true_labels + by_count(predicted[~np.isin(predicted, true_labels)])


def per_class_report(truth: Sequence[str], predicted: Sequence[str]) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support, and the confusion matrix, of string labels.

    For class ``c`` with ``TP`` cells predicted ``c`` that are ``c``, ``P`` cells predicted ``c``
    and ``T`` cells that are ``c`` (its support): precision ``TP / P``, recall ``TP / T`` and
    F1 ``2 TP / (P + T)``, each 0 when its denominator is 0 (scikit-learn's ``zero_division=0``).
    Classes are in :func:`frequency_order` (the truth's most frequent first).

    Parameters
    ----------
    truth, predicted
        One label per cell each (at least one cell).

    Returns
    -------
    dict
        ``"labels"`` (the order), ``"per_class"`` (one record per label: ``label``, ``precision``,
        ``recall``, ``f1``, ``support``, ``n_predicted``) and ``"confusion"`` (``list`` of rows: counts of
        true label ``i`` predicted as label ``j``, in the order of ``"labels"``).
    """
    truth = np.asarray(truth, dtype=str)
    predicted = np.asarray(predicted, dtype=str)
    if truth.shape != predicted.shape or truth.ndim != 1 or truth.size == 0:
        raise LangCellError("truth and predictions must be 1-D, one label per cell each, and not empty")
    labels = frequency_order(truth, predicted)
    index = {label: i for i, label in enumerate(labels)}
    true_codes = np.array([index[v] for v in truth], dtype=np.int64)
    predicted_codes = np.array([index[v] for v in predicted], dtype=np.int64)
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(confusion, (true_codes, predicted_codes), 1)
    hits, support, n_predicted = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros(a.shape, dtype=np.float64), where=b > 0)

    precision, recall, f1 = ratio(hits, n_predicted), ratio(hits, support), ratio(2 * hits, support + n_predicted)
    per_class = [
        {"label": label, "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
         "support": int(support[i]), "n_predicted": int(n_predicted[i])}
        for i, label in enumerate(labels)
    ]
    return {"labels": labels, "per_class": per_class, "confusion": confusion.tolist()}

def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` highest scores of every row, best first (ties: lower index first).

    Parameters
    ----------
    scores
        ``[n_rows, n_columns]``.
    k
        At least 1; clamped to ``n_columns``.

    Returns
    -------
    numpy.ndarray
        ``int64 [n_rows, min(k, n_columns)]``.
    """
    scores = _check_matrix(scores, "scores")
    k = check_positive_int(k, "k")
    # A stable sort of the negated scores keeps equal scores in index order.
    return np.argsort(-scores, axis=1, kind="stable")[:, : min(k, scores.shape[1])].astype(np.int64)


def cell_to_text_recall(
    similarity: np.ndarray, cell_labels: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[int, float]:
    """Cell -> text recall@k: the share of cells whose own text is among their ``k`` most similar texts.

    The rank of cell ``i``'s own text ``y_i`` is the number of texts ``j`` with
    ``S[i, j] > S[i, y_i]``, plus the number with ``S[i, j] == S[i, y_i]`` and ``j < y_i``; the cell
    counts as a hit at ``k`` when that rank is below ``k``. recall@k is the mean of the hits over the
    cells with a label (``y_i >= 0``). For ``k`` at or above the number of texts it is 1.

    Parameters
    ----------
    similarity
        ``S``, ``[n_cells, n_texts]``.
    cell_labels
        ``y``, ``int [n_cells]``: the index of each cell's own text; ``-1`` leaves a cell out.
    ks
        The cut-offs, each at least 1.

    Returns
    -------
    dict
        ``{k: recall@k}``.
    """
    similarity = _check_matrix(similarity, "similarity")
    labels = _check_labels(cell_labels, similarity.shape[0], similarity.shape[1])
    ks = check_ks(ks)
    rows = np.flatnonzero(labels >= 0)
    if rows.size == 0:
        raise LangCellError("no cell has a label (all are -1); pass at least one labelled cell")
    scores, own = similarity[rows], labels[rows]
    own_score = scores[np.arange(rows.size), own][:, None]
    before = np.arange(similarity.shape[1])[None, :] < own[:, None]
    rank = (scores > own_score).sum(axis=1) + ((scores == own_score) & before).sum(axis=1)
    return {k: float(np.mean(rank < k)) for k in ks}


def text_to_cell_metrics(
    similarity: np.ndarray, cell_labels: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, dict[int, float]]:
    """Text -> cell recall@k and precision@k, averaged over the texts that label at least one cell.

    For text ``t``, rank all cells by ``S[:, t]`` (descending; ties: lower cell index first) and take
    the top ``k`` (all cells when ``k`` exceeds their number). Let ``h_t(k)`` be how many of them carry
    label ``t``.

    * recall@k of ``t`` = 1 if ``h_t(k) >= 1`` else 0: at least one cell of the type is retrieved
      (a query with many relevant items, scored as in image-text retrieval).
    * precision@k of ``t`` = ``h_t(k) / min(k, n_cells)``: the fraction of the retrieved cells that
      carry the text's label.

    Both are averaged over the texts with at least one labelled cell (each text weighs the same,
    however many cells it labels). Cells labelled ``-1`` are still ranked (they count as misses).

    Parameters
    ----------
    similarity
        ``S``, ``[n_cells, n_texts]``.
    cell_labels
        ``int [n_cells]``: each cell's text index, ``-1`` for none.
    ks
        The cut-offs, each at least 1.

    Returns
    -------
    dict
        ``{"recall": {k: value}, "precision": {k: value}}``.
    """
    similarity = _check_matrix(similarity, "similarity")
    labels = _check_labels(cell_labels, similarity.shape[0], similarity.shape[1])
    ks = check_ks(ks)
    queries = np.unique(labels[labels >= 0])
    if queries.size == 0:
        raise LangCellError("no cell has a label (all are -1); pass at least one labelled cell")
    n_cells = similarity.shape[0]
    top = top_k_indices(similarity[:, queries].T, max(ks))  # [n_queries, min(max k, n_cells)]
    hits = np.cumsum(labels[top] == queries[:, None], axis=1)  # hits among the first j + 1 cells
    recall, precision = {}, {}
    for k in ks:
        depth = min(k, n_cells)
        recall[k] = float(np.mean(hits[:, depth - 1] >= 1))
        precision[k] = float(np.mean(hits[:, depth - 1] / depth))
    return {"recall": recall, "precision": precision}


def retrieval_metrics(
    similarity: np.ndarray, cell_labels: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Both directions at once, as a flat dict.

    Returns
    -------
    dict
        ``"cell_to_text_recall@k"`` (:func:`cell_to_text_recall`), ``"text_to_cell_recall@k"`` and
        ``"text_to_cell_precision@k"`` (:func:`text_to_cell_metrics`) for every ``k`` in ``ks``.
    """
    out: dict[str, float] = {}
    for k, value in cell_to_text_recall(similarity, cell_labels, ks).items():
        out[f"cell_to_text_recall@{k}"] = value
    text_side = text_to_cell_metrics(similarity, cell_labels, ks)
    for name in ("recall", "precision"):
        for k, value in text_side[name].items():
            out[f"text_to_cell_{name}@{k}"] = value
    return out


def _check_matrix(matrix: Any, name: str) -> np.ndarray:
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise LangCellError(f"{name} must be a non-empty 2-D matrix, got shape {matrix.shape}")
    if not np.issubdtype(matrix.dtype, np.number) or not np.all(np.isfinite(matrix)):
        raise LangCellError(f"{name} must hold finite numbers")
    return matrix


def _check_labels(labels: Any, n_cells: int, n_texts: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n_cells,) or not np.issubdtype(labels.dtype, np.integer):
        raise LangCellError(f"cell_labels must be {n_cells} integer text indices (-1: none), got {labels.shape}")
    if labels.size and (labels.min() < -1 or labels.max() >= n_texts):
        raise LangCellError(f"cell_labels must lie in [-1, {n_texts}); got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def check_ks(ks: Any) -> tuple[int, ...]:
    if isinstance(ks, int | np.integer) and not isinstance(ks, bool):
        ks = (ks,)
    if isinstance(ks, str) or not isinstance(ks, Sequence | np.ndarray) or len(ks) == 0:
        raise LangCellError(f"ks must be a list of positive integers such as (1, 5, 10), got {ks!r}")
    return tuple(dict.fromkeys(check_positive_int(k, "every k") for k in ks))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``[n, K]`` logits, computed in float64 and returned as float32 probabilities."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted.astype(np.float64))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def score_confidence(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row confidence of a score matrix whose rows are probabilities: the margin and the entropy.

    The margin is ``p(1) - p(2)``, the best score less the second best (1 for a single class): small
    when the two best classes are close. The normalised entropy is ``-sum_k p_k log p_k / log K``
    (``0 log 0 = 0``; 0 for a single class): 0 for a one-hot row, 1 for the uniform one. Rows are used
    as given (annotation scores already sum to 1).

    Parameters
    ----------
    scores
        ``[n_rows, K]`` non-negative scores, each row summing to 1.

    Returns
    -------
    margin, entropy : numpy.ndarray
        ``float64 [n_rows]`` each, in [0, 1].
    """
    scores = _check_matrix(scores, "scores").astype(np.float64)
    n_rows, n_classes = scores.shape
    if n_classes == 1:
        return np.ones(n_rows), np.zeros(n_rows)
    top_two = -np.partition(-scores, 1, axis=1)[:, :2]
    margin = top_two[:, 0] - top_two[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(scores > 0, scores * np.log(np.where(scores > 0, scores, 1.0)), 0.0)
    entropy = -terms.sum(axis=1) / np.log(n_classes)
    return np.clip(margin, 0.0, 1.0), np.clip(entropy, 0.0, 1.0)


def reliability_curve(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """Reliability curve and expected calibration error (ECE) of confidences against correctness.

    The interval [0, 1] is cut into ``n_bins`` equal-width bins; bin ``b`` holds the confidences in
    ``(b / n_bins, (b + 1) / n_bins]`` (the first bin also holds 0). For each bin: its number of cells
    ``n_b``, their mean confidence ``conf_b`` and their accuracy ``acc_b`` (the share of correct cells).
    ``ECE = sum_b (n_b / n) |acc_b - conf_b|`` over the non-empty bins (Naeini et al. 2015; Guo et
    al. 2017); the maximum calibration error is ``max_b |acc_b - conf_b|``.

    Parameters
    ----------
    confidence
        ``[n]`` confidences in [0, 1] (e.g. the score of the predicted class).
    correct
        ``[n]`` booleans: was the prediction right.
    n_bins
        Number of equal-width bins, at least 1.

    Returns
    -------
    dict
        ``"bins"`` (a table as ``{column: list}``: ``lower``, ``upper``, ``n_cells``,
        ``mean_confidence`` and ``accuracy``, the last two NaN for an empty bin), ``"ece"``, ``"mce"``,
        ``"n_cells"``, ``"accuracy"`` and ``"mean_confidence"`` (over all cells).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct)
    n_bins = check_positive_int(n_bins, "n_bins")
    if confidence.ndim != 1 or confidence.size == 0 or correct.shape != confidence.shape:
        raise LangCellError("confidence and correct must be 1-D arrays of the same, non-zero length")
    if not np.all(np.isfinite(confidence)) or confidence.min() < 0 or confidence.max() > 1:
        raise LangCellError("confidences must lie in [0, 1]; pass probabilities such as the best class's score")
    correct = correct.astype(bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Right-closed bins: ceil(c * n_bins) - 1, with 0 in the first bin.
    which = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=n_bins) / counts
        accuracy = np.bincount(which, weights=correct.astype(np.float64), minlength=n_bins) / counts
    gaps = np.abs(accuracy - mean_confidence)
    filled = counts > 0
    return {
        "bins": {
            "lower": edges[:-1].tolist(),
            "upper": edges[1:].tolist(),
            "n_cells": counts.astype(int).tolist(),
            "mean_confidence": [float(v) for v in mean_confidence],
            "accuracy": [float(v) for v in accuracy],
        },
        "ece": float(np.sum(counts[filled] / confidence.size * gaps[filled])),
        "mce": float(gaps[filled].max()),
        "n_cells": int(confidence.size),
        "accuracy": float(correct.mean()),
        "mean_confidence": float(confidence.mean()),
    }

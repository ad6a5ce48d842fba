"""A linear head initialised from the class texts, kept near them (the CLAP / LP++ idea for CLIP models).

On frozen, L2-normalised cell embeddings ``z`` the head scores class k as

    logit_k = s * z . t_k  +  z . u_k  +  b_k

with ``t_k`` the normalised text embedding of class k and ``s`` the model's logit scale. Its start,
``u = 0, b = 0``, is zero-shot similarity itself (same logits up to ``s``, same argmax). Training
minimises the mean cross-entropy on the labelled cells plus ``penalty / 2 * (|u|^2 + |b|^2)``, which
pulls the head back towards the text-given one: with few cells a strong pull keeps zero-shot's
knowledge, with more cells a weak one lets the data speak. ``penalty = inf`` is zero-shot unchanged.
The penalty is chosen by cross-validation over the labelled cells alone (:func:`cross_validated_head`).

The problem is convex and small (n x K cells, one matrix), so it is solved to optimality by full-batch
L-BFGS (scipy, analytic gradient) rather than by the epoch loop of :mod:`langcell.train.supervised`: the penalty's meaning is then
the optimum it defines, not where a learning-rate schedule happened to stop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_PENALTIES", "TextHead", "cross_validated_head", "fit_text_head", "stratified_folds"]

#: Penalties tried by cross-validation; ``inf`` keeps the zero-shot head (it may be the best choice).
DEFAULT_PENALTIES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, math.inf)

#: Cross-validation folds (at most; fewer when there are fewer labelled cells).
DEFAULT_FOLDS = 5


@dataclass
class TextHead:
    """A fitted head: ``logits = scale * z @ text.T + z @ delta.T + bias``."""

    text: np.ndarray  # [K, D] normalised class text embeddings (the start)
    scale: float  # logit scale s applied to the text part
    delta: np.ndarray  # [K, D] learned change of the weights (in logit units)
    bias: np.ndarray  # [K] learned bias
    penalty: float  # the pull towards the start this head was fitted with

    def logits(self, features: np.ndarray) -> np.ndarray:
        """``[n, K]`` logits of normalised cell embeddings ``features`` ``[n, D]`` (float64)."""
        z = np.asarray(features, dtype=np.float64)
        return self.scale * z @ self.text.T.astype(np.float64) + z @ self.delta.T + self.bias

    def weight_and_bias(self) -> tuple[np.ndarray, np.ndarray]:
        """The head as one linear map on ``z``: weight ``[K, D]`` and bias ``[K]``."""
        return self.scale * self.text.astype(np.float64) + self.delta, self.bias.copy()


def fit_text_head(
    features: np.ndarray, labels: np.ndarray, text: np.ndarray, scale: float, penalty: float, *, max_iter: int = 200
) -> TextHead:
    """Fit the head of the module docstring on labelled cells.

    Parameters
    ----------
    features
        ``[n, D]`` L2-normalised cell embeddings.
    labels
        ``[n]`` class codes in ``[0, K)``.
    text
        ``[K, D]`` L2-normalised class text embeddings.
    scale
        Logit scale of the text part (the model's ``exp(logit_scale)``).
    penalty
        Strength of the pull towards the start, > 0; ``inf`` returns the start.
    max_iter
        L-BFGS iterations.

    Returns
    -------
    TextHead
    """
    n_classes, dim = text.shape
    if math.isinf(penalty):
        return TextHead(text, float(scale), np.zeros((n_classes, dim)), np.zeros(n_classes), penalty)
    from scipy.optimize import minimize

    z = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n = y.size
    base = float(scale) * z @ np.asarray(text, dtype=np.float64).T
    onehot = np.eye(n_classes)[y]

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        delta, bias = flat[: n_classes * dim].reshape(n_classes, dim), flat[n_classes * dim :]
        logits = base + z @ delta.T + bias
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = -log_p[np.arange(n), y].mean() + 0.5 * penalty * (flat @ flat)
        residual = (np.exp(log_p) - onehot) / n  # d loss / d logits
        gradient = np.concatenate([(residual.T @ z).ravel(), residual.sum(axis=0)]) + penalty * flat
        return float(loss), gradient

    result = minimize(objective, np.zeros(n_classes * dim + n_classes), jac=True, method="L-BFGS-B",
                      options={"maxiter": max_iter, "gtol": 1e-8})
    flat = result.x
    return TextHead(text, float(scale), flat[: n_classes * dim].reshape(n_classes, dim), flat[n_classes * dim :], penalty)


def stratified_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold of every labelled cell: each class's cells shuffled, then dealt round the folds in turn.

    With one cell per class, every fold holds whole classes out (the head must then rely on the text
    for them, which is what the penalty decides).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    ranks = np.empty(labels.size, dtype=np.int64)
    for code in np.unique(labels):
        rows = np.flatnonzero(labels == code)
        ranks[rows] = rng.permutation(rows.size)
    order = np.lexsort((labels, ranks))  # rank 0 of every class, then rank 1, ...
    folds = np.empty(labels.size, dtype=np.int64)
    folds[order] = np.arange(labels.size) % n_folds
    return folds


def cross_validated_head(
    features: np.ndarray,
    labels: np.ndarray,
    text: np.ndarray,
    scale: float,
    *,
    penalties: Sequence[float] = DEFAULT_PENALTIES,
    n_folds: int = DEFAULT_FOLDS,
    seed: int = 0,
) -> tuple[TextHead, np.ndarray, dict[str, list[float]]]:
    """Choose the penalty by k-fold cross-validation on the labelled cells, then fit on all of them.

    Each penalty is scored by the mean held-out negative log-likelihood over the folds (ties go to the
    stronger penalty, the one nearer zero-shot). Only ``features`` and ``labels`` are read: nothing
    about the cells to annotate.

    Parameters
    ----------
    features, labels, text, scale
        As in :func:`fit_text_head`.
    penalties
        Candidates (``inf`` = zero-shot head).
    n_folds
        Folds, capped at the number of labelled cells (leave-one-out below ``n_folds`` cells).
    seed
        Seeds the fold assignment.

    Returns
    -------
    head, out_of_fold, table
        The head fitted on every labelled cell with the chosen penalty; ``[n, K]`` held-out logits of
        every labelled cell at that penalty (for calibration and for choosing a mixing weight); and
        ``{"penalty", "nll"}`` for every candidate.
    """
    labels = np.asarray(labels, dtype=np.int64)
    folds = stratified_folds(labels, max(2, min(n_folds, labels.size)), seed)
    rows = np.arange(labels.size)
    table: dict[str, list[float]] = {"penalty": [], "nll": []}
    best = None
    for penalty in sorted(penalties, reverse=True):  # strongest first: ties keep it
        held_out = np.empty((labels.size, text.shape[0]))
        for fold in np.unique(folds):
            inside = folds != fold
            head = fit_text_head(features[inside], labels[inside], text, scale, penalty)
            held_out[~inside] = head.logits(features[~inside])
        shifted = held_out - held_out.max(axis=1, keepdims=True)
        nll = float(-(shifted[rows, labels] - np.log(np.exp(shifted).sum(axis=1))).mean())
        table["penalty"].append(float(penalty))
        table["nll"].append(nll)
        if best is None or nll < best[0] - 1e-9:
            best = (nll, penalty, held_out)
    _, penalty, out_of_fold = best
    return fit_text_head(features, labels, text, scale, penalty), out_of_fold, table

"""Calibration and label-shift correction of class posteriors (numpy only).

Few-shot training cells are balanced (n per class) and zero-shot annotation assumes nothing about the
class frequencies, while the cells to annotate are usually far from balanced (CBMC: 45 % CD4 T cells).
Saerens, Latinne & Decaestecker (2002, *Neural Computation* 14:21-41) re-estimate the class priors of
the unlabelled cells by expectation-maximisation and correct the posteriors with them:

* E step: ``q_ik = (pi_k / pi0_k) p_ik / sum_j (pi_j / pi0_j) p_ij`` (Bayes' rule with the new priors;
  ``p`` the classifier's posteriors, ``pi0`` the priors it was trained under);
* M step: ``pi_k = mean_i q_ik``;

until the priors move by less than ``tol``. EM reads posteriors as probabilities, so they must be
calibrated first: :func:`fit_temperature` fits one temperature to labelled cells by likelihood. The
estimate is refused (a warning, uniform priors, and the reason recorded) when it does not converge or
when one class takes more than ``max_share`` of the cells, the failure the issue measured on
uncalibrated scores (75 % of the prior on one class).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import LangCellError

__all__ = [
    "DEFAULT_MAX_SHARE",
    "PRIORS",
    "PriorEstimate",
    "check_prior",
    "correct_posteriors",
    "em_priors",
    "estimate_priors",
    "fit_temperature",
    "log_softmax",
    "zero_shot_prior",
]

#: The label-shift corrections: ``"uniform"`` (none: the posteriors as the method gives them) and
#: ``"em"`` (priors re-estimated on the unlabelled cells, Saerens et al. 2002).
PRIORS = ("uniform", "em")

#: An EM estimate giving one class more than this share of the cells is refused as degenerate.
DEFAULT_MAX_SHARE = 0.9

#: EM stops when no prior moves by more than this ...
DEFAULT_TOL = 1e-5

#: ... or, not converged, after this many iterations (the estimate is then refused).
DEFAULT_MAX_ITER = 1000


def check_prior(prior: Any) -> str:
    """``prior`` if it is one of :data:`PRIORS`, else a :class:`LangCellError` naming the choices."""
    if not isinstance(prior, str) or prior not in PRIORS:
        raise LangCellError(
            f"prior must be one of {PRIORS}, got {prior!r}; 'em' re-estimates the class frequencies of the "
            "cells to annotate, 'uniform' (the default) does not"
        )
    return prior


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, bounds: tuple[float, float] = (1e-2, 1e2)) -> float:
    """The temperature ``T`` that maximises the likelihood of ``labels`` under ``softmax(logits / T)``.

    Parameters
    ----------
    logits
        ``[n, K]`` scores of labelled cells (any scale; log-probabilities work too).
    labels
        ``[n]`` class codes in ``[0, K)``.
    bounds
        The search interval of ``T``; the negative log-likelihood is minimised over ``log T`` (it is
        convex in ``1 / T``, so the bounded scalar search finds the optimum).

    Returns
    -------
    float
        The fitted temperature; calibrated posteriors are ``softmax(logits / T)``.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or labels.size == 0:
        raise LangCellError("fit_temperature needs [n, K] logits and n labels (n >= 1)")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise LangCellError(f"labels must lie in [0, {logits.shape[1]})")
    rows = np.arange(labels.size)

    def nll(log_t: float) -> float:
        return -float(log_softmax(logits / np.exp(log_t))[rows, labels].mean())

    low, high = np.log(bounds[0]), np.log(bounds[1])
    result = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def correct_posteriors(posteriors: np.ndarray, priors: np.ndarray, train_priors: np.ndarray | None = None) -> np.ndarray:
    """Bayes' rule with new priors: ``q_ik ∝ (priors_k / train_priors_k) p_ik`` (rows sum to 1)."""
    posteriors = np.asarray(posteriors, dtype=np.float64)
    n_classes = posteriors.shape[1]
    train_priors = np.full(n_classes, 1.0 / n_classes) if train_priors is None else np.asarray(train_priors, float)
    weighted = posteriors * (np.asarray(priors, dtype=np.float64) / train_priors)
    return weighted / weighted.sum(axis=1, keepdims=True)


def em_priors(
    posteriors: np.ndarray,
    train_priors: np.ndarray | None = None,
    *,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """The EM of Saerens et al. (2002): class priors of unlabelled cells from their posteriors.

    Parameters
    ----------
    posteriors
        ``[n, K]`` calibrated class posteriors under ``train_priors`` (rows sum to 1).
    train_priors
        ``[K]`` the priors the posteriors were computed under; ``None``: uniform (balanced shots, or
        zero-shot scores, which assume no class frequencies).
    tol, max_iter
        Convergence: the largest change of a prior in one iteration below ``tol``, within ``max_iter``.

    Returns
    -------
    priors, corrected, n_iter, converged
        The estimated priors ``[K]``, the corrected posteriors ``[n, K]``, the iterations run and
        whether EM converged.
    """
    posteriors = np.asarray(posteriors, dtype=np.float64)
    n_classes = posteriors.shape[1]
    train_priors = np.full(n_classes, 1.0 / n_classes) if train_priors is None else np.asarray(train_priors, float)
    priors = train_priors.copy()
    corrected = posteriors
    for iteration in range(1, max_iter + 1):
        corrected = correct_posteriors(posteriors, priors, train_priors)
        updated = corrected.mean(axis=0)
        change = float(np.abs(updated - priors).max())
        priors = updated
        if change < tol:
            return priors, correct_posteriors(posteriors, priors, train_priors), iteration, True
    return priors, corrected, max_iter, False


@dataclass
class PriorEstimate:
    """What :func:`estimate_priors` found: the priors used and why.

    Attributes
    ----------
    priors
        ``[K]`` the priors the posteriors were corrected with (uniform after a fallback).
    posteriors
        ``[n, K]`` the corrected posteriors (the input's, unchanged, after a fallback).
    status
        ``"em"`` (converged and accepted), or ``"fallback: <reason>"``.
    n_iter
        EM iterations run.
    estimated
        ``[K]`` EM's estimate, also when it was refused.
    """

    priors: np.ndarray  # [K] priors used for the correction
    posteriors: np.ndarray  # [n, K] corrected posteriors
    status: str  # "em" or "fallback: <reason>"
    n_iter: int  # EM iterations run
    estimated: np.ndarray = field(default_factory=lambda: np.empty(0))  # [K] EM's raw estimate

    def as_dict(self, classes: list[str]) -> dict[str, Any]:
        """JSON-friendly record: ``{"priors": {class: prior}, "estimated": {...}, "status", "n_iter"}``."""
        return {
            "priors": {name: float(p) for name, p in zip(classes, self.priors, strict=True)},
            "estimated": {name: float(p) for name, p in zip(classes, self.estimated, strict=True)},
            "status": self.status,
            "n_iter": int(self.n_iter),
        }


def estimate_priors(
    posteriors: np.ndarray,
    *,
    train_priors: np.ndarray | None = None,
    max_share: float = DEFAULT_MAX_SHARE,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    where: str = "",
) -> PriorEstimate:
    """Run :func:`em_priors` and accept its estimate only when it converged and is not degenerate.

    A refused estimate (not converged within ``max_iter``, or one class above ``max_share``) gives a
    :class:`UserWarning` saying so, uniform priors and the posteriors unchanged.

    Parameters
    ----------
    posteriors
        ``[n, K]`` calibrated posteriors of the cells to annotate.
    train_priors, tol, max_iter
        As in :func:`em_priors`.
    max_share
        Largest prior accepted for one class.
    where
        Names the run in the warning (e.g. ``"langcell:linear, 3 shots, repeat 0"``).

    Returns
    -------
    PriorEstimate
    """
    posteriors = np.asarray(posteriors, dtype=np.float64)
    if posteriors.ndim != 2 or posteriors.shape[0] == 0 or not np.isfinite(posteriors).all():
        raise LangCellError("prior estimation needs finite [n, K] posteriors of at least one cell")
    n_classes = posteriors.shape[1]
    priors, corrected, n_iter, converged = em_priors(posteriors, train_priors, tol=tol, max_iter=max_iter)
    reason = None
    if not converged:
        reason = f"EM did not converge in {max_iter} iterations"
    elif priors.max() > max_share:
        reason = f"EM put {priors.max():.2f} of the cells in one class (more than {max_share})"
    if reason is None:
        return PriorEstimate(priors, corrected, "em", n_iter, priors)
    warnings.warn(
        f"prior='em'{' (' + where + ')' if where else ''}: {reason}; falling back to uniform priors",
        UserWarning,
        stacklevel=2,
    )
    uniform = np.full(n_classes, 1.0 / n_classes)
    return PriorEstimate(uniform, posteriors, f"fallback: {reason}", n_iter, priors)


def zero_shot_prior(
    similarity: np.ndarray,
    p_sim: np.ndarray,
    p_ctm: np.ndarray,
    *,
    alpha: float,
    inverse_temperature: float,
    where: str = "",
) -> tuple[np.ndarray, PriorEstimate]:
    """Zero-shot scores corrected for the class priors of the cells scored (``prior="em"``).

    EM reads the *similarity* softmax at a calibrated temperature, ``softmax(similarity x
    inverse_temperature)`` (the model's own ``exp(logit_scale)`` when no labelled cell is at hand, or
    one fitted by :func:`fit_temperature`), never the blended final scores: those sit near 1/K and
    are not probabilities (EM on them put 75 % of the prior on one class in the issue's measurement).
    The corrected similarity posteriors then take ``p_sim``'s place in the released blend,
    ``alpha * q + (1 - alpha) * p_ctm``; the matching part is left as it is. A refused estimate
    leaves the scores exactly as they were.

    Parameters
    ----------
    similarity, p_sim, p_ctm
        ``[n, K]`` from :class:`langcell.inference.zero_shot.ZeroShotScores`.
    alpha
        Weight of the similarity part.
    inverse_temperature
        Multiplies the cosine similarities before the softmax that EM reads.
    where
        Names the run in a fallback warning.

    Returns
    -------
    scores, estimate
        ``[n, K]`` final scores and the :class:`PriorEstimate`.
    """
    calibrated = np.exp(log_softmax(np.asarray(similarity, dtype=np.float64) * inverse_temperature))
    estimate = estimate_priors(calibrated, where=where)
    if estimate.status != "em":
        return alpha * np.asarray(p_sim, np.float64) + (1 - alpha) * np.asarray(p_ctm, np.float64), estimate
    return alpha * estimate.posteriors + (1 - alpha) * np.asarray(p_ctm, np.float64), estimate

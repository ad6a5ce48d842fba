"""The simplest baselines a user would try instead of LangCell, on the same cells.

Log-normalised expression (counts per 10k, log1p) for a logistic regression or a kNN on its principal
components, and a PCA embedding for the integration metrics. The demo, the few-shot protocol, the
evaluation report and the benchmarks all call these, so every comparison uses the same baseline.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data.pca import log_normalised_pca
from ..data.sources import count_source
from ..errors import LangCellError


def log_normalised_features(
    adata, *, counts_layer: str | None = None, n_counts_key: str | None = "n_counts"
) -> np.ndarray:
    """Dense ``log1p(counts / total * 10,000)`` of every cell (``float64``, cells x genes).

    The total is ``obs[n_counts_key]`` when that column is present and positive (as the tokenizer
    normalises), otherwise the cell's sum over the matrix. The counts are read where the tokenizer reads
    them (``counts_layer``: ``None`` = ``X``, a layer name, or ``"raw"``).
    """
    source = count_source(
        adata, "the AnnData", gene_column=None, counts_layer=counts_layer, n_counts_key=n_counts_key
    )
    counts = source.matrix
    dense = np.asarray(counts.todense() if hasattr(counts, "todense") else counts, dtype=np.float64)
    totals = dense.sum(axis=1)
    if source.n_counts is not None:
        given = np.asarray(source.n_counts, dtype=np.float64)
        totals = np.where(np.isfinite(given) & (given > 0), given, totals)
    return np.log1p(dense / np.maximum(totals, 1)[:, None] * 1e4)


def logistic_regression_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int):
    """Standardise the features on the training cells, fit a logistic regression, predict ``x_test``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    classifier = LogisticRegression(max_iter=2000, random_state=seed)
    classifier.fit(scaler.transform(x_train), y_train)
    return classifier.predict(scaler.transform(x_test))


def logistic_regression_baseline(train, test, label_key: str, seed: int) -> np.ndarray:
    """Predict ``test`` labels with a logistic regression on log-normalised counts of ``train``.

    Both sets are normalised to 10,000 counts per cell (by ``obs["n_counts"]`` when present, as the
    tokenizer does) and log1p-transformed (:func:`log_normalised_features`); the features are
    standardised on the training cells (:func:`logistic_regression_predict`).
    """
    return logistic_regression_predict(
        log_normalised_features(train), train.obs[label_key].astype(str).to_numpy(),
        log_normalised_features(test), seed,
    )


def principal_components(features: np.ndarray, labelled: np.ndarray, n_pcs: int, seed: int):
    """PCA of the labelled cells' features (no labels used), as scanpy's ``tl.pca`` would (ARPACK)."""
    from sklearn.decomposition import PCA

    n_components = min(n_pcs, labelled.size - 1, features.shape[1] - 1)
    if n_components < 1:
        raise LangCellError(
            f"too few labelled cells ({labelled.size}) or genes ({features.shape[1]}) for a PCA; "
            "pass baselines=('logistic_regression',) or more data"
        )
    pcs = np.zeros((features.shape[0], n_components))
    pcs[labelled] = PCA(n_components=n_components, svd_solver="arpack", random_state=seed).fit_transform(
        features[labelled]
    )
    return pcs, int(n_components)


def knn_predict(pcs, codes, train, test, n_per_class: int, n_neighbors: int | None) -> np.ndarray:
    from sklearn.neighbors import KNeighborsClassifier

    k = min(5, n_per_class) if n_neighbors is None else min(n_neighbors, train.size)
    return KNeighborsClassifier(n_neighbors=k).fit(pcs[train], codes[train]).predict(pcs[test])


def baseline_pca(adata: Any, *, n_pcs: int = 50, counts_layer: str | None = None) -> tuple[np.ndarray, int]:
    """The unintegrated baseline of :func:`integration_metrics`: PCA of log-normalised counts.

    The counts are copied (``adata`` is left alone), normalised to 10,000 per cell
    (``scanpy.pp.normalize_total``), ``log1p``-transformed and reduced with ``scanpy.tl.pca`` (ARPACK,
    ``random_state=0``, all genes: scib-metrics' Benchmarker also ignores highly variable genes).

    Parameters
    ----------
    adata
        Cells with raw counts (in memory).
    n_pcs
        Components wanted; capped at ``n_cells - 1`` and ``n_genes - 1``.
    counts_layer
        ``None`` (``X``), a layer name, or ``"raw"`` (``adata.raw.X``).

    Returns
    -------
    pcs : numpy.ndarray
        ``float32 [n_cells, n_pcs used]``.
    n_pcs : int
        The number of components.

    Raises
    ------
    LangCellError
        For a backed AnnData, a missing layer, too few cells or genes, or values that are not raw counts.
    """
    return log_normalised_pca(adata, n_pcs=n_pcs, counts_layer=counts_layer)

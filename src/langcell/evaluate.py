"""Evaluation of LangCell embeddings and annotations: scIB integration metrics and novel-cell-type accuracy.

:func:`integration_metrics`
    The scIB benchmark (Luecken et al. 2022) of cell embeddings, computed with the public functions of
    `scib-metrics <https://scib-metrics.readthedocs.io>`_ (an optional dependency: it brings jax,
    ~400 MB; ``pip install "langcell[integration]"``): bio conservation (label silhouette, isolated
    labels, NMI/ARI of k-means clusters, cLISI) and batch correction (batch silhouette, iLISI, graph
    connectivity, PCR comparison; BRAS and kBET on request) for every embedding and for a PCA
    baseline, with the scIB aggregate scores.
:func:`per_type_accuracy`
    Accuracy of every true cell type, split into types seen in (pre)training and unseen ("novel") types:
    the novel-cell-type report.
:func:`evaluate`
    Everything at once for one model: zero-shot annotation scored per type, cell-text retrieval
    recall@k and, given a batch column, the integration metrics of the LangCell embedding.

All three are part of ``langcell.tl``.

How the integration scores match scib-metrics' ``Benchmarker``
-------------------------------------------------------------
Read from ``scib_metrics/benchmark/_core.py`` (scib-metrics 0.5.10) and reproduced here:

* every metric gets the embedding, the labels and the batches exactly as ``MetricAnnDataAPI`` passes
  them (e.g. ``isolated_labels(X, labels, batch)``, ``pcr_comparison(X_pre, X, batch,
  categorical=True)`` with the baseline as ``X_pre``), with the library's default settings;
* one neighbour search per embedding with 90 neighbours, subset to 15 for graph connectivity, 50 for
  kBET and 90 for the LISI scores (``NeighborsResults.subset_neighbors``);
* NMI and ARI of k-means count as two metrics;
* the aggregates are the unscaled means (``get_results(min_max_scale=False)``, its default): bio
  conservation = mean of the bio metrics, batch correction = mean of the batch metrics (NaN values
  skipped, as pandas' ``groupby().mean()`` does), total = 0.6 bio + 0.4 batch (the scIB weighting).

Two choices differ from ``Benchmarker``'s defaults and are settings here: the neighbours are exact
(``neighbors="exact"``: scib-metrics' jax search, which is exact on CPU and GPU and deterministic;
``"pynndescent"`` is ``Benchmarker``'s approximate search, faster above ~20,000 cells once its ~30 s
numba compilation is paid), and the default batch metrics are the classic scIB set (batch silhouette)
without kBET, whose diffusion-map neighbours cost about a minute of compilation even on small data.
``Benchmarker`` 0.5 scores BRAS and kBET instead: pass ``metrics=BENCHMARKER_METRICS`` to get its
set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._checks import check_anndata as _check_anndata
from ._checks import check_key_added as _check_key
from ._checks import check_positive_int, gene_tokenizer_of
from ._labels import NO_LABEL_VALUES
from .errors import LangCellError
from .retrieval import DEFAULT_KS

__all__ = [
    "BATCH_METRICS",
    "BENCHMARKER_METRICS",
    "BIO_METRICS",
    "DEFAULT_METRICS",
    "baseline_pca",
    "evaluate",
    "integration_metrics",
    "per_type_accuracy",
]

#: Bio conservation metrics (higher = cell types kept apart), in table order. ``nmi_kmeans`` and
#: ``ari_kmeans`` both come from one ``nmi_ari_cluster_labels_kmeans`` call.
BIO_METRICS = ("silhouette_label", "isolated_labels", "nmi_kmeans", "ari_kmeans", "clisi")
#: Batch correction metrics (higher = batches mixed), in table order. ``bras`` is the batch silhouette
#: variant scib-metrics' Benchmarker uses since 0.5.7; ``kbet`` is ``kbet_per_label``.
BATCH_METRICS = ("silhouette_batch", "bras", "ilisi", "kbet", "graph_connectivity", "pcr_comparison")
#: What :func:`integration_metrics` computes by default: the scIB paper's metrics, without kBET.
DEFAULT_METRICS = (*BIO_METRICS, "silhouette_batch", "ilisi", "graph_connectivity", "pcr_comparison")
#: The metrics of scib-metrics 0.5's ``Benchmarker`` with its default settings.
BENCHMARKER_METRICS = (*BIO_METRICS, "bras", "ilisi", "kbet", "graph_connectivity", "pcr_comparison")
#: Neighbour searches accepted by :func:`integration_metrics`.
NEIGHBOR_METHODS = ("exact", "pynndescent")

#: Neighbours per metric, as in Benchmarker (15 for graph connectivity, 50 for kBET, 90 for LISI).
_NEIGHBORS_OF = {"graph_connectivity": 15, "kbet": 50, "clisi": 90, "ilisi": 90}
#: Metrics that compare batches within each label: they need a label present in two batches.
_WITHIN_LABEL_METRICS = ("silhouette_batch", "bras", "kbet")
_INSTALL_HINT = 'pip install "langcell[integration]"'
_PER_TYPE_COLUMNS = ("cell_type", "n_cells", "n_correct", "accuracy", "seen", "most_predicted", "most_predicted_share")


# --------------------------------------------------------------------------------------------------
# Integration metrics
# --------------------------------------------------------------------------------------------------


def integration_metrics(
    adata: Any,
    *,
    batch_key: str,
    label_key: str,
    embeddings: Sequence[str] = ("X_langcell",),
    baseline: str = "X_pca",
    n_pcs: int = 50,
    metrics: Sequence[str] = DEFAULT_METRICS,
    neighbors: str = "exact",
    counts_layer: str | None = None,
    key_added: str = "langcell_integration",
    copy: bool = False,
):
    """scIB integration metrics of cell embeddings and of a PCA baseline, with the scIB aggregate scores.

    Each metric is the scib-metrics function of the same name, called as scib-metrics' ``Benchmarker``
    calls it (see the module notes); the neighbour graph is searched once per embedding.

    Bio conservation (``BIO_METRICS``): ``silhouette_label`` (label ASW, rescaled to [0, 1]),
    ``isolated_labels`` (ASW of the labels present in the fewest batches), ``nmi_kmeans`` and
    ``ari_kmeans`` (k-means with one cluster per label against the labels), ``clisi`` (cell-type
    LISI, scaled). Batch correction (``BATCH_METRICS``): ``silhouette_batch`` (batch ASW within
    labels), ``bras`` (its BRAS variant), ``ilisi`` (integration LISI, scaled), ``kbet`` (kBET per
    label; slow: about a minute of compilation), ``graph_connectivity`` (share of each label's cells in
    the largest connected component of its kNN subgraph, averaged over labels) and
    ``pcr_comparison`` (how much less variance the batch explains than in the baseline; 0 for the
    baseline itself).

    Parameters
    ----------
    adata
        Cells with embeddings in ``obsm`` and, when ``obsm[baseline]`` is missing, raw counts.
    batch_key
        obs column of the batch (at least two distinct values, none missing).
    label_key
        obs column of the cell-type labels (at least two distinct values, none missing).
    embeddings
        obsm keys of the embeddings to score (e.g. ``("X_langcell",)`` from :func:`langcell.tl.embed`).
    baseline
        obsm key of the unintegrated baseline, also ``X_pre`` of ``pcr_comparison``. When ``adata``
        has no such obsm entry it is computed without touching ``adata``: the counts (``X`` or
        ``counts_layer``) are copied, normalised to 10,000 per cell (``scanpy.pp.normalize_total``),
        ``log1p``-transformed and reduced to ``n_pcs`` principal components (``scanpy.tl.pca``, ARPACK,
        ``random_state=0``, all genes); it is not stored.
    n_pcs
        Principal components of a computed baseline (capped at ``n_cells - 1`` and ``n_genes - 1``).
    metrics
        The metrics to compute, any of ``BIO_METRICS + BATCH_METRICS`` (default ``DEFAULT_METRICS``;
        ``BENCHMARKER_METRICS`` for Benchmarker's set).
    neighbors
        ``"exact"`` (scib-metrics' ``jax_approx_min_k``: exact outside TPUs, deterministic; its cost
        grows with the square of the cells: ~20 s for 10,000 cells on 2 CPU cores) or
        ``"pynndescent"`` (scib-metrics' ``pynndescent`` with ``random_state=0``, as Benchmarker).
        Cells have at most ``n_cells - 1`` neighbours (90 when there are more cells).
    counts_layer
        Where the raw counts of a computed baseline are: ``None`` (``X``), a layer name, or ``"raw"``.
    key_added
        The uns key written.
    copy
        Store the results in a copy of ``adata`` instead of ``adata``.

    Returns
    -------
    pandas.DataFrame or tuple
        One row per embedding, then the baseline (index ``"embedding"``: the obsm keys); one column
        per metric (in ``BIO_METRICS + BATCH_METRICS`` order), then ``"bio_conservation"`` and
        ``"batch_correction"`` (the mean of each group's metrics, when the group has any) and
        ``"total"`` (``0.6 * bio_conservation + 0.4 * batch_correction``, when both exist).
        ``(table, annotated_copy)`` when ``copy=True``. The field written is ``uns[key_added]``:
        ``"params"`` (batch_key, label_key, embeddings, baseline, baseline_computed, n_pcs used or
        None, metrics, neighbors, n_neighbors, counts_layer, scib_metrics_version) and ``"results"``
        (the table as ``{column: list}``, ``"embedding"`` first).

    Raises
    ------
    LangCellError
        Before any computation or write: when scib-metrics is not installed; for a missing column or
        obsm key, fewer than two batches or labels, missing batch or label values, as many labels as
        cells, no label in two batches (for the within-label batch metrics), an unknown or repeated
        metric or embedding, an embedding that is not a finite 2-D matrix, a bad ``n_pcs`` or
        ``neighbors``, or counts that are not raw counts (computed baseline).

    Examples
    --------
    >>> langcell.tl.embed(adata, model)                                                # doctest: +SKIP
    >>> langcell.tl.integration_metrics(adata, batch_key="batch", label_key="cell_type")  # doctest: +SKIP
    """
    _check_anndata(adata)
    _check_key(key_added)
    table, params = _integration_table(
        adata, batch_key=batch_key, label_key=label_key, embeddings=embeddings, baseline=baseline, n_pcs=n_pcs,
        metrics=metrics, neighbors=neighbors, counts_layer=counts_layer,
    )
    adata = adata.copy() if copy else adata
    adata.uns[key_added] = {"params": params, "results": _columns(table.reset_index())}
    return (table, adata) if copy else table


def _integration_table(
    adata: Any,
    *,
    batch_key: Any,
    label_key: Any,
    embeddings: Any,
    baseline: Any,
    n_pcs: Any,
    metrics: Any,
    neighbors: Any,
    counts_layer: str | None,
    computed_baseline: tuple[np.ndarray, int] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The table and params of :func:`integration_metrics`; writes nothing.

    ``computed_baseline`` is a :func:`baseline_pca` result already computed by the caller (for the
    same cells), used when ``obsm[baseline]`` is missing.
    """
    scib_metrics = _import_scib_metrics()
    metrics = _check_metrics(metrics)
    labels, batches = _integration_columns(adata, batch_key, label_key, metrics)
    _check_neighbors(neighbors)
    n_pcs = check_positive_int(n_pcs, "n_pcs")
    names = _check_embedding_names(embeddings, baseline)
    matrices = {name: _embedding(adata, name) for name in names}
    baseline_computed = baseline not in adata.obsm
    if not baseline_computed:
        pre, n_pcs_used = _embedding(adata, baseline), None
    elif computed_baseline is not None:
        pre, n_pcs_used = computed_baseline
    else:
        pre, n_pcs_used = baseline_pca(adata, n_pcs=n_pcs, counts_layer=counts_layer)
    matrices[baseline] = pre

    n_neighbors = min(max(_NEIGHBORS_OF.values()), adata.n_obs - 1)
    rows = [
        _scib_scores(scib_metrics, matrix, labels, batches, pre, metrics, neighbors, n_neighbors)
        for matrix in matrices.values()
    ]
    table = _with_aggregates(pd.DataFrame(rows, index=pd.Index(list(matrices), name="embedding")), metrics)
    params = {
        "batch_key": batch_key,
        "label_key": label_key,
        "embeddings": names,
        "baseline": baseline,
        "baseline_computed": bool(baseline_computed),
        "n_pcs": n_pcs_used,
        "metrics": list(metrics),
        "neighbors": neighbors,
        "n_neighbors": int(n_neighbors),
        "counts_layer": counts_layer,
        "scib_metrics_version": str(scib_metrics.__version__),
    }
    return table, params


def _check_neighbors(neighbors: Any) -> None:
    if neighbors not in NEIGHBOR_METHODS:
        raise LangCellError(f"neighbors must be one of {NEIGHBOR_METHODS}, got {neighbors!r}")


def _check_embedding_names(embeddings: Any, baseline: Any) -> list[str]:
    if isinstance(embeddings, str) or not isinstance(embeddings, Sequence) or len(embeddings) == 0:
        raise LangCellError(f"embeddings must be a non-empty list of obsm keys such as ['X_langcell'], got {embeddings!r}")
    if not isinstance(baseline, str) or not baseline:
        raise LangCellError(f"baseline must be an obsm key (e.g. 'X_pca'), got {baseline!r}")
    names = list(embeddings)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated or baseline in names:
        raise LangCellError(
            f"embeddings {repeated or [baseline]!r} listed twice (the baseline {baseline!r} always gets a row); "
            "name each embedding once and the baseline only as baseline="
        )
    return names


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
    import anndata
    import scanpy as sc
    import scipy.sparse as sp

    from .data.sources import count_source

    _check_anndata(adata)
    n_pcs = check_positive_int(n_pcs, "n_pcs")
    if adata.isbacked:
        raise LangCellError(
            "the PCA baseline needs the counts in memory but the AnnData is backed; load it with "
            "adata.to_memory(), or put a precomputed baseline in obsm"
        )
    source = count_source(adata, "the AnnData", gene_column=None, counts_layer=counts_layer, n_counts_key=None)
    counts = source.matrix
    counts = sp.csr_matrix(counts, dtype=np.float32, copy=True) if sp.issparse(counts) else np.array(
        counts, dtype=np.float32
    )
    values = counts.data if sp.issparse(counts) else counts
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values != np.rint(values)):
        raise LangCellError(
            "the PCA baseline needs raw counts (finite, non-negative integers) but the matrix holds other values; "
            "pass counts_layer=<the layer of raw counts> (or 'raw'), or put a precomputed baseline in obsm"
        )
    n_comps = min(n_pcs, adata.n_obs - 1, adata.n_vars - 1)
    if n_comps < 1:
        raise LangCellError(
            f"a PCA needs at least 2 cells and 2 genes, got {adata.n_obs} x {adata.n_vars}; pass more data"
        )
    work = anndata.AnnData(X=counts)
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    sc.tl.pca(work, n_comps=n_comps, svd_solver="arpack", random_state=0, mask_var=None)
    return np.asarray(work.obsm["X_pca"], dtype=np.float32), int(n_comps)


def _scib_scores(
    scib_metrics: Any,
    matrix: np.ndarray,
    labels: np.ndarray,
    batches: np.ndarray,
    pre: np.ndarray,
    metrics: tuple[str, ...],
    neighbors: str,
    n_neighbors: int,
) -> dict[str, float]:
    """Every requested metric of one embedding (the argument order of Benchmarker's MetricAnnDataAPI)."""
    knn = None
    if any(name in _NEIGHBORS_OF for name in metrics):
        if neighbors == "exact":
            knn = scib_metrics.nearest_neighbors.jax_approx_min_k(matrix, n_neighbors)
        else:
            knn = scib_metrics.nearest_neighbors.pynndescent(matrix, n_neighbors=n_neighbors, random_state=0, n_jobs=1)

    def graph(name: str):
        return knn.subset_neighbors(n=min(_NEIGHBORS_OF[name], n_neighbors))

    scores: dict[str, float] = {}
    if "nmi_kmeans" in metrics or "ari_kmeans" in metrics:
        clustering = scib_metrics.nmi_ari_cluster_labels_kmeans(matrix, labels)
    for name in metrics:
        if name == "silhouette_label":
            value = scib_metrics.silhouette_label(matrix, labels)
        elif name == "isolated_labels":
            value = scib_metrics.isolated_labels(matrix, labels, batches)
        elif name in ("nmi_kmeans", "ari_kmeans"):
            value = clustering[name.split("_")[0]]
        elif name == "clisi":
            value = scib_metrics.clisi_knn(graph(name), labels)
        elif name == "silhouette_batch":
            value = scib_metrics.silhouette_batch(matrix, labels, batches)
        elif name == "bras":
            value = scib_metrics.bras(matrix, labels, batches)
        elif name == "ilisi":
            value = scib_metrics.ilisi_knn(graph(name), batches)
        elif name == "kbet":
            value = scib_metrics.kbet_per_label(graph(name), batches, labels)
        elif name == "graph_connectivity":
            value = scib_metrics.graph_connectivity(graph(name), labels)
        else:  # pcr_comparison
            value = scib_metrics.pcr_comparison(pre, matrix, batches, categorical=True)
        scores[name] = float(value)
    return scores


def _with_aggregates(table: pd.DataFrame, metrics: tuple[str, ...]) -> pd.DataFrame:
    """Add Benchmarker's aggregates: group means (NaN skipped) and total = 0.6 bio + 0.4 batch."""
    bio = [m for m in BIO_METRICS if m in metrics]
    batch = [m for m in BATCH_METRICS if m in metrics]
    table = table[bio + batch].astype(np.float64)
    if bio:
        table["bio_conservation"] = table[bio].mean(axis=1, skipna=True)
    if batch:
        table["batch_correction"] = table[batch].mean(axis=1, skipna=True)
    if bio and batch:
        table["total"] = 0.6 * table["bio_conservation"] + 0.4 * table["batch_correction"]
    return table


def _import_scib_metrics() -> Any:
    try:
        import scib_metrics
    except ImportError as error:
        raise LangCellError(
            "the integration metrics need scib-metrics, an optional dependency (it brings jax); install it "
            f"with {_INSTALL_HINT}"
        ) from error
    return scib_metrics


def _check_metrics(metrics: Any) -> tuple[str, ...]:
    known = BIO_METRICS + BATCH_METRICS
    if isinstance(metrics, str) or not isinstance(metrics, Sequence) or len(metrics) == 0:
        raise LangCellError(f"metrics must be a non-empty list of metric names (any of {', '.join(known)})")
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise LangCellError(f"unknown metrics {unknown!r}; choose among {', '.join(known)}")
    if len(set(metrics)) != len(metrics):
        raise LangCellError(f"metrics are repeated in {list(metrics)!r}; name each once")
    return tuple(m for m in known if m in metrics)


def _integration_columns(
    adata: Any, batch_key: Any, label_key: Any, metrics: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and batches as string arrays, after every check the metrics need."""
    if batch_key == label_key:
        raise LangCellError(f"batch_key and label_key are both {batch_key!r}; pass two different obs columns")
    arrays = []
    for what, key in (("label", label_key), ("batch", batch_key)):
        values = _obs_strings(adata, key, f"{what}_key")
        missing = int(np.sum(values == ""))
        if missing:
            raise LangCellError(
                f"obs[{key!r}] has {missing} missing value(s); every cell needs a {what} for the integration "
                f"metrics: drop those cells (adata[adata.obs[{key!r}].notna()]) or fill them in"
            )
        n_distinct = len(set(values))
        if n_distinct < 2:
            raise LangCellError(
                f"obs[{key!r}] has {n_distinct} distinct value(s); the integration metrics need at least two "
                f"{what} values"
            )
        arrays.append(values)
    labels, batches = arrays
    if len(set(labels)) >= adata.n_obs:
        raise LangCellError(
            f"obs[{label_key!r}] gives every cell its own label; silhouettes need fewer labels than cells"
        )
    within = [m for m in metrics if m in _WITHIN_LABEL_METRICS]
    if within:
        # scib-metrics skips a label whose cells lie in one batch, or each in its own batch, and fails
        # when it skips them all.
        groups = pd.DataFrame({"label": labels, "batch": batches}).groupby("label")["batch"]
        n_batches, n_cells = groups.nunique(), groups.size()
        if not ((n_batches >= 2) & (n_batches < n_cells)).any():
            raise LangCellError(
                f"no label of obs[{label_key!r}] occurs in two batches of obs[{batch_key!r}] (with two cells in "
                f"one of them), so {within} (batch mixing within labels) cannot be computed; leave them out "
                "of metrics="
            )
    return labels, batches


def _obs_strings(adata: Any, key: Any, argument: str) -> np.ndarray:
    """An obs column as stripped strings ('' for missing values)."""
    if not isinstance(key, str) or key not in adata.obs.columns:
        raise LangCellError(
            f"obs has no column {key!r}; pass {argument}=<an obs column> (columns: {list(adata.obs.columns)[:10]})"
        )
    column = adata.obs[key]
    return np.array(["" if pd.isna(v) else str(v).strip() for v in column.astype(object)], dtype=object)


def _embedding(adata: Any, key: str) -> np.ndarray:
    if not isinstance(key, str) or key not in adata.obsm:
        raise LangCellError(
            f"obsm has no embedding {key!r} (obsm keys: {list(adata.obsm)[:10]}); compute it first, e.g. "
            "langcell.tl.embed(adata, model)"
        )
    matrix = np.asarray(adata.obsm[key])
    if matrix.ndim != 2 or matrix.shape[1] == 0 or not np.issubdtype(matrix.dtype, np.number):
        raise LangCellError(f"obsm[{key!r}] must be a numeric cells x dimensions matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise LangCellError(f"obsm[{key!r}] holds NaN or infinite values; recompute it")
    return matrix.astype(np.float32)


def _columns(table: pd.DataFrame) -> dict[str, list]:
    """A table as ``{column: list}`` of plain Python values (h5ad- and JSON-writable)."""
    return {str(column): [_plain(v) for v in table[column].tolist()] for column in table.columns}


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """A table as a list of row dicts with JSON values (NaN becomes None)."""
    out = []
    for row in table.to_dict(orient="records"):
        out.append({str(k): _json_value(v) for k, v in row.items()})
    return out


def _json_value(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------------------
# Per-type accuracy (novel cell types)
# --------------------------------------------------------------------------------------------------


def per_type_accuracy(
    adata: Any,
    *,
    label_key: str,
    prediction_key: str,
    seen: Sequence[str] | None = None,
    key_added: str | None = None,
) -> dict[str, Any]:
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
    key_added
        When given, the result is also stored in ``uns[key_added]``.

    Returns
    -------
    dict
        JSON-ready:

        ``"per_type"``
            one record per true type (category order for a categorical column, else sorted):
            ``cell_type``, ``n_cells``, ``n_correct``, ``accuracy``, ``seen`` (bool, or None),
            ``most_predicted`` (the commonest prediction for the type's cells; ties: alphabetical, a missing
            prediction last; None when it is missing) and
            ``most_predicted_share``.
        ``"summary"``
            ``n_cells`` (scored), ``n_excluded``, ``n_types``, ``accuracy`` (over cells), ``macro_f1``
            (:func:`langcell.finetune.classification_metrics` over the true and predicted classes, as
            scikit-learn's ``f1_score(average="macro")``), ``mean_type_accuracy`` (balanced accuracy);
            with ``seen``: ``n_seen_types``, ``n_unseen_types``, ``mean_accuracy_seen`` and
            ``mean_accuracy_unseen`` (means of the type accuracies; None without such types),
            ``accuracy_seen_cells`` and ``accuracy_unseen_cells`` (over the cells of those types), and
            ``seen_without_cells`` (seen names with no scored cell).

        With ``key_added``, ``uns[key_added]`` holds ``"params"`` (label_key, prediction_key, seen),
        ``"summary"`` and ``"per_type"`` (as ``{column: list}``, h5ad-writable: without the ``seen``
        column when ``seen`` is None, ``""`` for a missing ``most_predicted``).

    Raises
    ------
    LangCellError
        For a missing column, the same column twice, no scored cell, a bad ``seen`` or ``key_added``.
    """
    from .finetune import classification_metrics

    _check_anndata(adata)
    if key_added is not None:
        _check_key(key_added)
    if label_key == prediction_key:
        raise LangCellError(f"label_key and prediction_key are both {label_key!r}; pass the predictions' column")
    truth = _obs_strings(adata, label_key, "label_key")
    predicted = _obs_strings(adata, prediction_key, "prediction_key")
    seen_set = None if seen is None else set(_check_names(seen, "seen"))
    scored = ~np.isin(np.char.lower(truth.astype(str)), list(NO_LABEL_VALUES))
    if not scored.any():
        raise LangCellError(
            f"obs[{label_key!r}] has no usable label (only missing, 'unknown' or 'na'); pass a labelled column"
        )
    truth, predicted = truth[scored], predicted[scored]
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
    result = {"summary": summary, "per_type": records}
    if key_added is not None:
        adata.uns[key_added] = {
            "params": {
                "label_key": label_key,
                "prediction_key": prediction_key,
                "seen": None if seen is None else sorted(seen_set),
            },
            "summary": summary,
            "per_type": _per_type_columns(records),
        }
    return result


def _per_type_columns(records: list[dict[str, Any]]) -> dict[str, list]:
    """Per-type records as h5ad-writable columns ("" for a missing name, seen omitted when unknown)."""
    columns: dict[str, list] = {}
    for column in _PER_TYPE_COLUMNS:
        values = [r[column] for r in records]
        if column == "seen" and any(v is None for v in values):
            continue
        columns[column] = ["" if v is None and column == "most_predicted" else v for v in values]
    return columns


def _check_names(names: Any, argument: str) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence | np.ndarray | pd.Index | set | frozenset):
        raise LangCellError(f"{argument} must be a list of cell-type names, got {names!r}")
    names = list(names)
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise LangCellError(f"{argument} must hold non-empty strings; got {bad[:5]!r}")
    return [n.strip() for n in names]


# --------------------------------------------------------------------------------------------------
# Everything for one model
# --------------------------------------------------------------------------------------------------


def evaluate(
    adata: Any,
    model: Any,
    *,
    label_key: str,
    batch_key: str | None = None,
    labels: Sequence[str] | Mapping[str, str] | None = None,
    seen: Sequence[str] | None = None,
    mapping: Mapping[str, str] | str | None = None,
    alpha: float | None = None,
    top_k: int | None = None,
    mode: str = "fast",
    ks: Sequence[int] = DEFAULT_KS,
    metrics: Sequence[str] = DEFAULT_METRICS,
    baseline: str = "X_pca",
    n_pcs: int = 50,
    neighbors: str = "exact",
    counts_layer: str | None = None,
    gene_column: str | None = None,
    n_counts_key: str | None = "n_counts",
    max_length: int | None = None,
    precision: str = "fp32",
    progress: bool = False,
    annotation_key: str = "langcell_cell_type",
    embedding_key: str = "X_langcell",
    key_added: str = "langcell_evaluation",
    copy: bool = False,
):
    """Evaluate a model on labelled cells: zero-shot annotation per type, retrieval and integration.

    1. :func:`langcell.tl.annotate` with the candidate classes ``labels``;
    2. :func:`per_type_accuracy` of those predictions against ``obs[label_key]`` (split into ``seen``
       and unseen types);
    3. :func:`langcell.tl.embed` into ``obsm[embedding_key]`` and :func:`langcell.tl.retrieval_recall`
       on those embeddings (the same texts as the annotation when ``labels`` is a dict);
    4. with ``batch_key``: :func:`integration_metrics` of the embedding against the PCA ``baseline``,
       on the labelled cells.

    Parameters
    ----------
    adata
        Labelled cells with raw counts.
    model
        A :class:`~langcell.models.langcell.LangCell` with its gene tokenizer.
    label_key
        obs column of the true cell types (names, or Cell Ontology term ids). Cells labelled missing,
        "unknown" or "na" are annotated and embedded but not scored.
    batch_key
        obs column of the batch; ``None`` skips the integration metrics (they need scib-metrics).
    labels
        The candidate classes of the annotation (names, term ids, or ``{name: description}``); default:
        the distinct labels of ``obs[label_key]`` (category order for a categorical column).
    seen
        Types seen in training (see :func:`per_type_accuracy`); ``None``: no split.
    mapping
        ``{label: term id}`` (or a JSON/TSV path) for names the Cell Ontology resolver cannot place.
    alpha, top_k, mode
        Annotation settings (:func:`langcell.tl.annotate`; ``None``: its defaults).
    ks
        Retrieval cut-offs.
    metrics, baseline, n_pcs, neighbors
        Integration settings (:func:`integration_metrics`).
    counts_layer, gene_column, n_counts_key, max_length, precision, progress
        Where the counts are and how the model runs (as in :func:`langcell.tl.annotate`).
    annotation_key
        ``key_added`` of the annotation (its obs, obsm and uns fields).
    embedding_key
        obsm key of the embeddings (recomputed, overwritten).
    key_added
        uns key of the report.
    copy
        Work on a copy of ``adata`` and return it too.

    Returns
    -------
    dict or tuple
        The report (JSON-serialisable): ``"n_cells"``, ``"n_scored"``, ``"label_key"``,
        ``"batch_key"``, ``"classes"`` (the candidate classes), ``"annotation"`` (the result of
        :func:`per_type_accuracy`), ``"retrieval"`` (of :func:`langcell.tl.retrieval_recall`),
        ``"integration"`` (the records of :func:`integration_metrics`, or None) and ``"params"``.
        ``(report, annotated_copy)`` when ``copy=True``. Fields written: those of
        :func:`langcell.tl.annotate` (``annotation_key``), of :func:`langcell.tl.embed`
        (``embedding_key``) and ``uns[key_added]``: ``"params"``, ``"annotation"`` (``"summary"`` and
        ``"per_type"`` as ``{column: list}``), ``"retrieval"`` (the recall/precision numbers, ``"ks"``,
        ``"n_cells"``) and, with ``batch_key``, ``"integration"`` (the table as ``{column: list}``).

    Raises
    ------
    LangCellError
        Before the model runs: for a missing column, fewer than two labelled types, bad ``labels`` or
        ``seen``, a model without a gene tokenizer, and everything :func:`integration_metrics` refuses
        on the labelled cells (missing scib-metrics included); then what the annotation refuses
        (unknown label names, counts that are not raw counts) before anything is written.
    """
    from . import tl
    from .retrieval import _check_ks, _label_texts

    _check_anndata(adata)
    for key in (key_added, annotation_key, embedding_key):
        _check_key(key)
    gene_tokenizer_of(model)
    ks = _check_ks(ks)
    truth = _obs_strings(adata, label_key, "label_key")
    labelled = ~np.isin(np.char.lower(truth.astype(str)), list(NO_LABEL_VALUES))
    present = list(dict.fromkeys(truth[labelled]))
    if len(present) < 2:
        raise LangCellError(
            f"obs[{label_key!r}] has {len(present)} labelled type(s); an evaluation needs at least two"
        )
    if labels is None:
        column = adata.obs[label_key]
        if isinstance(column.dtype, pd.CategoricalDtype):
            categories = dict.fromkeys(str(c).strip() for c in column.cat.categories)
            labels = [c for c in categories if c in set(present)]
        else:
            labels = sorted(present)
    elif not isinstance(labels, Mapping):
        labels = _check_names(labels, "labels")
    descriptions = dict(labels) if isinstance(labels, Mapping) else None
    seen = None if seen is None else _check_names(seen, "seen")
    # The retrieval texts of every label present, resolved now: an unknown label fails before any write.
    _label_texts(present, label_key, descriptions, mapping)

    rows = np.flatnonzero(labelled)
    computed_baseline = None
    if batch_key is not None:
        # Every check of the integration metrics (and the baseline PCA, which reads the counts) runs
        # before the model does; they see the labelled cells only, as the metrics need a label per cell.
        _import_scib_metrics()
        part = adata if rows.size == adata.n_obs else adata[rows]
        _integration_columns(part, batch_key, label_key, _check_metrics(metrics))
        _check_neighbors(neighbors)
        _check_embedding_names([embedding_key], baseline)
        if baseline in adata.obsm:
            _embedding(part, baseline)
        else:
            computed_baseline = baseline_pca(part, n_pcs=n_pcs, counts_layer=counts_layer)

    adata = adata.copy() if copy else adata
    annotate_options = {k: v for k, v in (("alpha", alpha), ("top_k", top_k)) if v is not None}
    encode = dict(counts_layer=counts_layer, gene_column=gene_column, n_counts_key=n_counts_key,
                  max_length=max_length, precision=precision, progress=progress)
    tl.annotate(adata, model, labels, mapping=mapping, mode=mode, key_added=annotation_key,
                **annotate_options, **encode)
    annotation = per_type_accuracy(adata, label_key=label_key, prediction_key=annotation_key, seen=seen)
    tl.embed(adata, model, key_added=embedding_key, **encode)
    retrieval = tl.retrieval_recall(
        adata, model, label_key, ks=ks, texts=descriptions, mapping=mapping, use_rep=embedding_key,
        counts_layer=counts_layer, gene_column=gene_column, n_counts_key=n_counts_key, precision=precision,
    )
    integration_table = integration_params = None
    if batch_key is not None:
        part = adata if rows.size == adata.n_obs else adata[rows]
        integration_table, integration_params = _integration_table(
            part, batch_key=batch_key, label_key=label_key, embeddings=[embedding_key], baseline=baseline,
            n_pcs=n_pcs, metrics=metrics, neighbors=neighbors, counts_layer=counts_layer,
            computed_baseline=computed_baseline,
        )

    annotation_params = adata.uns[annotation_key]["params"]
    params = {
        "label_key": label_key,
        "batch_key": batch_key,
        "seen": seen,
        "mode": mode,
        "alpha": annotation_params["alpha"],
        "top_k": annotation_params["top_k"],
        "ks": list(ks),
        "annotation_key": annotation_key,
        "embedding_key": embedding_key,
    }
    retrieval_numbers = {k: float(v) for k, v in retrieval.items() if "@" in k}
    report = {
        "n_cells": int(adata.n_obs),
        "n_scored": int(annotation["summary"]["n_cells"]),
        "label_key": label_key,
        "batch_key": batch_key,
        "classes": list(adata.uns[annotation_key]["classes"]),
        "annotation": annotation,
        "retrieval": {k: _json_value(v) for k, v in retrieval.items()},
        "integration": None if integration_table is None else _records(integration_table.reset_index()),
        "params": {**params, "integration": integration_params},
    }
    stored: dict[str, Any] = {
        "params": params,
        "annotation": {"summary": annotation["summary"], "per_type": _per_type_columns(annotation["per_type"])},
        "retrieval": {**retrieval_numbers, "ks": list(ks), "n_cells": int(retrieval["n_cells"])},
    }
    if integration_table is not None:
        stored["integration"] = _columns(integration_table.reset_index())
        stored["integration_params"] = integration_params
    adata.uns[key_added] = stored
    return (report, adata) if copy else report

"""scIB integration metrics of cell embeddings, next to a PCA baseline.

:func:`integration_metrics`
    The scIB benchmark (Luecken et al. 2022) of cell embeddings, computed with the public functions of
    `scib-metrics <https://scib-metrics.readthedocs.io>`_ (an optional dependency: it brings jax,
    ~400 MB; ``pip install "langcell[integration]"``): bio conservation (label silhouette, isolated
    labels, NMI/ARI of k-means clusters, cLISI) and batch correction (batch silhouette, iLISI, graph
    connectivity, PCR comparison; BRAS and kBET on request) for every embedding and for a PCA
    baseline, with the scIB aggregate scores.
Per-type accuracy and the one-call report are :mod:`.per_type` and :mod:`.report`.

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

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._checks import check_anndata as _check_anndata
from .._checks import check_key_added as _check_key
from .._checks import check_positive_int
from .._docs import doc_params
from ..errors import LangCellError
from ._tables import obs_strings, obsm_matrix, table_columns
from .baselines import baseline_pca

__all__ = [
    "BATCH_METRICS",
    "BENCHMARKER_METRICS",
    "BIO_METRICS",
    "DEFAULT_METRICS",
    "integration_metrics",
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


# --------------------------------------------------------------------------------------------------
# Integration metrics
# --------------------------------------------------------------------------------------------------


@doc_params
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
    inplace: bool = False,
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
    {inplace}

    Returns
    -------
    pandas.DataFrame or None
        ``inplace=False``: one row per embedding, then the baseline (index ``"embedding"``: the obsm keys); one column
        per metric (in ``BIO_METRICS + BATCH_METRICS`` order), then ``"bio_conservation"`` and
        ``"batch_correction"`` (the mean of each group's metrics, when the group has any) and
        ``"total"`` (``0.6 * bio_conservation + 0.4 * batch_correction``, when both exist).
        ``inplace=True``: ``None``; the field written is ``uns[key_added]``:
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
    >>> langcell.evaluation.integration_metrics(adata, batch_key="batch", label_key="cell_type")  # doctest: +SKIP
    """
    _check_anndata(adata)
    _check_key(key_added)
    table, params = integration_scores(
        adata, batch_key=batch_key, label_key=label_key, embeddings=embeddings, baseline=baseline, n_pcs=n_pcs,
        metrics=metrics, neighbors=neighbors, counts_layer=counts_layer,
    )
    if not inplace:
        return table
    adata.uns[key_added] = {"params": params, "results": table_columns(table.reset_index())}
    return None


def integration_scores(
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
    scib_metrics = import_scib_metrics()
    metrics = check_metrics(metrics)
    labels, batches = integration_columns(adata, batch_key, label_key, metrics)
    check_neighbors(neighbors)
    n_pcs = check_positive_int(n_pcs, "n_pcs")
    names = check_embedding_names(embeddings, baseline)
    matrices = {name: obsm_matrix(adata, name) for name in names}
    baseline_computed = baseline not in adata.obsm
    if not baseline_computed:
        pre, n_pcs_used = obsm_matrix(adata, baseline), None
    elif computed_baseline is not None:
        pre, n_pcs_used = computed_baseline
    else:
        pre, n_pcs_used = baseline_pca(adata, n_pcs=n_pcs, counts_layer=counts_layer)
    matrices[baseline] = pre

    n_neighbors = min(max(_NEIGHBORS_OF.values()), adata.n_obs - 1)
    with quiet_jax_probe():  # jax sets up its backend on first use, here
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


def check_neighbors(neighbors: Any) -> None:
    if neighbors not in NEIGHBOR_METHODS:
        raise LangCellError(f"neighbors must be one of {NEIGHBOR_METHODS}, got {neighbors!r}")


def check_embedding_names(embeddings: Any, baseline: Any) -> list[str]:
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


def import_scib_metrics() -> Any:
    """scib-metrics, imported with jax's platform probing kept quiet (:func:`quiet_jax_probe`)."""
    try:
        with quiet_jax_probe():
            import scib_metrics
    except ImportError as error:
        raise LangCellError(
            "the integration metrics need scib-metrics, an optional dependency (it brings jax); install it "
            f"with {_INSTALL_HINT}"
        ) from error
    return scib_metrics


#: What jax logs while it looks for accelerators it then does not use (it falls back to the CPU either way).
JAX_PROBE_MESSAGES = (
    "may be present on this machine",  # "An NVIDIA GPU (or a Google TPU) may be present ... Falling back to cpu."
    "No GPU/TPU found",  # older jax: "No GPU/TPU found, falling back to CPU."
    "Unable to initialize backend",  # a backend that is not there (tpu, rocm, ...)
)
#: The logger jax's backend set-up writes those messages to.
JAX_PROBE_LOGGER = "jax._src.xla_bridge"


class _DropJaxProbe(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in JAX_PROBE_MESSAGES)


@contextlib.contextmanager
def quiet_jax_probe():
    """Drop jax's platform-probing messages (:data:`JAX_PROBE_MESSAGES`) inside the ``with`` block.

    jax looks for GPUs and TPUs the first time it needs a backend, and says so when it finds none it
    can use ("An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not
    installed", "No GPU/TPU found"): noise for a user who asked for metrics, which run on the CPU
    either way. Only those messages of :data:`JAX_PROBE_LOGGER` are dropped; anything else jax says
    is shown, the environment (``JAX_PLATFORMS``) is not touched, and the filter is removed on exit.
    """
    logger = logging.getLogger(JAX_PROBE_LOGGER)
    probe_filter = _DropJaxProbe()
    logger.addFilter(probe_filter)
    try:
        yield
    finally:
        logger.removeFilter(probe_filter)


def check_metrics(metrics: Any) -> tuple[str, ...]:
    known = BIO_METRICS + BATCH_METRICS
    if isinstance(metrics, str) or not isinstance(metrics, Sequence) or len(metrics) == 0:
        raise LangCellError(f"metrics must be a non-empty list of metric names (any of {', '.join(known)})")
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise LangCellError(f"unknown metrics {unknown!r}; choose among {', '.join(known)}")
    if len(set(metrics)) != len(metrics):
        raise LangCellError(f"metrics are repeated in {list(metrics)!r}; name each once")
    return tuple(m for m in known if m in metrics)


def integration_columns(
    adata: Any, batch_key: Any, label_key: Any, metrics: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and batches as string arrays, after every check the metrics need."""
    if batch_key == label_key:
        raise LangCellError(f"batch_key and label_key are both {batch_key!r}; pass two different obs columns")
    arrays = []
    for what, key in (("label", label_key), ("batch", batch_key)):
        values = obs_strings(adata, key, f"{what}_key")
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

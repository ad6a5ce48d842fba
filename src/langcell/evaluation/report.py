"""``evaluate``: zero-shot annotation, per-type accuracy, retrieval recall and (optionally) scIB
integration metrics of one model on labelled cells, as one JSON-ready report (``langcell evaluate``).

Every input check runs before the model does, so a bad argument costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .. import tl
from .._checks import check_anndata as _check_anndata
from .._checks import check_key_added as _check_key
from .._checks import gene_tokenizer_of, output_anndata
from .._labels import NO_LABEL_VALUES
from ..errors import LangCellError
from ..metrics import check_ks
from ..ontology.classes import label_column_texts
from ._tables import check_name_list, json_value, obs_strings, obsm_matrix, table_columns, table_records
from .baselines import baseline_pca
from .integration import (
    DEFAULT_METRICS,
    check_embedding_names,
    check_metrics,
    check_neighbors,
    import_scib_metrics,
    integration_columns,
    integration_scores,
)
from .per_type import per_type_accuracy, per_type_columns
from .retrieval import retrieval_recall


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
    ks: Sequence[int] | None = None,
    metrics: Sequence[str] | None = None,
    baseline: str = "X_pca",
    n_pcs: int = 50,
    neighbors: str = "exact",
    counts_layer: str | None = None,
    gene_column: str | None = None,
    n_counts_key: str | None = "n_counts",
    max_length: int | None = None,
    precision: str = "fp32",
    progress: bool = True,
    annotation_key: str = "langcell_cell_type",
    embedding_key: str = "X_langcell",
    key_added: str = "langcell_evaluation",
    inplace: bool = False,
):
    """Evaluate a model on labelled cells: zero-shot annotation per type, retrieval and integration.

    1. :func:`langcell.tl.annotate` with the candidate classes ``labels``;
    2. :func:`per_type_accuracy` of those predictions against ``obs[label_key]`` (split into ``seen``
       and unseen types);
    3. :func:`langcell.tl.embed` into ``obsm[embedding_key]`` and :func:`langcell.evaluation.retrieval_recall`
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
        Retrieval cut-offs (:func:`retrieval_recall`; ``None``: 1, 5, 10 less those at or above the
        number of candidate texts, where cell -> text recall is 1.0 by construction).
    metrics, baseline, n_pcs, neighbors
        Integration settings (:func:`integration_metrics`; ``metrics=None``: its default set). Metrics
        without ``batch_key`` are refused: they would be ignored.
    counts_layer, gene_column, n_counts_key, max_length, precision, progress
        Where the counts are and how the model runs (as in :func:`langcell.tl.annotate`).
    annotation_key
        ``key_added`` of the annotation (its obs, obsm and uns fields).
    embedding_key
        obsm key of the embeddings (recomputed, overwritten).
    key_added
        uns key of the report.
    inplace
        ``False`` (default): the work happens on an in-memory copy and ``adata`` is left untouched.
        ``True``: the annotation, the embeddings and the report are also written into ``adata``.
        Unlike the table functions, ``evaluate`` returns its report either way: it is what
        ``langcell evaluate`` prints and saves next to the annotated cells.

    Returns
    -------
    dict
        The report (JSON-serialisable): ``"n_cells"``, ``"n_scored"``, ``"label_key"``,
        ``"batch_key"``, ``"classes"`` (the candidate classes), ``"annotation"`` (the result of
        :func:`per_type_accuracy`), ``"retrieval"`` (of :func:`langcell.evaluation.retrieval_recall`),
        ``"integration"`` (the records of :func:`integration_metrics`, or None) and ``"params"``.
        With ``inplace=True`` the fields written are those of
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
    _check_anndata(adata)
    for key in (key_added, annotation_key, embedding_key):
        _check_key(key)
    gene_tokenizer_of(model)
    if ks is not None:
        ks = check_ks(ks)
    labelled, present, labels = _classes(adata, label_key, labels)
    descriptions = dict(labels) if isinstance(labels, Mapping) else None
    seen = None if seen is None else check_name_list(seen, "seen")
    # The retrieval texts of every label present, resolved now: an unknown label fails before any write.
    label_column_texts(present, label_key, descriptions, mapping)

    rows = np.flatnonzero(labelled)
    if metrics is not None:
        if batch_key is None:
            raise LangCellError(
                "metrics were given without batch_key: the scIB integration metrics compare batches; pass "
                "batch_key=<the obs column of the batch> (--batch-key), or leave metrics out"
            )
        check_metrics(metrics)
    metrics = DEFAULT_METRICS if metrics is None else metrics
    computed_baseline = None
    if batch_key is not None:
        computed_baseline = _check_integration(
            adata, rows, batch_key, label_key, metrics, neighbors, embedding_key, baseline, n_pcs, counts_layer
        )

    adata = output_anndata(adata, copy=not inplace)
    annotate_options = {k: v for k, v in (("alpha", alpha), ("top_k", top_k)) if v is not None}
    encode = dict(counts_layer=counts_layer, gene_column=gene_column, n_counts_key=n_counts_key,
                  max_length=max_length, precision=precision, progress=progress)
    tl.annotate(adata, model, labels, mapping=mapping, mode=mode, key_added=annotation_key,
                **annotate_options, **encode)
    annotation = per_type_accuracy(adata, label_key=label_key, prediction_key=annotation_key, seen=seen)
    tl.embed(adata, model, key_added=embedding_key, **encode)
    retrieval = retrieval_recall(
        adata, model, label_key, ks=ks, texts=descriptions, mapping=mapping, use_rep=embedding_key,
        counts_layer=counts_layer, gene_column=gene_column, n_counts_key=n_counts_key, precision=precision,
    )
    integration_table = integration_params = None
    if batch_key is not None:
        part = adata if rows.size == adata.n_obs else adata[rows]
        integration_table, integration_params = integration_scores(
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
        "ks": list(retrieval["ks"]),
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
        "retrieval": {k: json_value(v) for k, v in retrieval.items()},
        "integration": None if integration_table is None else table_records(integration_table.reset_index()),
        "params": {**params, "integration": integration_params},
    }
    stored: dict[str, Any] = {
        "params": params,
        "annotation": {"summary": annotation["summary"], "per_type": per_type_columns(annotation["per_type"])},
        "retrieval": {**retrieval_numbers, "ks": list(retrieval["ks"]), "n_cells": int(retrieval["n_cells"])},
    }
    if integration_table is not None:
        stored["integration"] = table_columns(integration_table.reset_index())
        stored["integration_params"] = integration_params
    adata.uns[key_added] = stored
    return report


def _classes(adata: Any, label_key: str, labels: Any) -> tuple[np.ndarray, list[str], Any]:
    """Which cells are labelled, the labels present, and the candidate classes (default: those present,
    in category order for a categorical column)."""
    truth = obs_strings(adata, label_key, "label_key")
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
        labels = check_name_list(labels, "labels")
    return labelled, present, labels


def _check_integration(adata, rows, batch_key, label_key, metrics, neighbors, embedding_key, baseline, n_pcs,
                       counts_layer):
    """Every check of the integration metrics, before the model runs; the baseline PCA when it must be
    computed (it reads the counts). They see the labelled cells only, as the metrics need a label per cell."""
    import_scib_metrics()
    part = adata if rows.size == adata.n_obs else adata[rows]
    integration_columns(part, batch_key, label_key, check_metrics(metrics))
    check_neighbors(neighbors)
    check_embedding_names([embedding_key], baseline)
    if baseline in adata.obsm:
        obsm_matrix(part, baseline)  # checked: a usable matrix
        return None
    return baseline_pca(part, n_pcs=n_pcs, counts_layer=counts_layer)

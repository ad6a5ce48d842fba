"""``tl.retrieve_cells`` / ``tl.retrieve_texts``: cell-text retrieval in LangCell's shared embedding space.

Cells and texts are compared by the cosine similarity of their L2-normalised embeddings
(``cell_proj`` of the cell's ``<cls>`` state, ``text_proj`` of the text's ``[CLS]`` state): the
similarity LangCell's cell-text contrastive loss trains.

:func:`retrieve_cells`
    For each text, the ``top_n`` most similar cells.
:func:`retrieve_texts`
    For each cell, the ``top_n`` most similar texts.

Recall@k on labelled cells is :func:`langcell.evaluation.retrieval_recall`; the ranking and the
metrics are the numpy functions of :mod:`langcell.metrics` (equal similarities ordered by index, so
every result is deterministic).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._checks import check_anndata as _check_anndata
from .._checks import check_key_added as _check_key
from .._checks import check_positive_int, output_anndata
from .._docs import doc_params
from ..errors import LangCellError
from ..inference.embed import text_embeddings, unit_cell_embeddings
from ..metrics import top_k_indices
from ..ontology.classes import class_texts

__all__ = [
    "retrieve_cells",
    "retrieve_texts",
]
# --------------------------------------------------------------------------------------------------
# AnnData layer
# --------------------------------------------------------------------------------------------------


@doc_params
def retrieve_cells(
    adata: Any,
    model: Any,
    texts: Sequence[str] | Mapping[str, str],
    *,
    top_n: int = 10,
    as_labels: bool = False,
    use_rep: str | None = "X_langcell",
    counts_layer: str | None = None,
    gene_column: str | None = None,
    n_counts_key: str | None = "n_counts",
    max_length: int | None = None,
    max_tokens: int = 16_384,
    precision: str = "fp32",
    progress: bool = True,
    key_added: str = "langcell_retrieval",
    copy: bool = False,
):
    """Text -> cells: for each text, the ``top_n`` cells of highest cosine similarity.

    Parameters
    ----------
    adata
        Cells with raw counts, or with embeddings in ``obsm[use_rep]``.
    model
        A :class:`~langcell.models.langcell.LangCell` (with its gene tokenizer unless embeddings are reused).
    texts
        The queries: a list of texts (their names are the texts themselves) or ``{name: text}``.
    top_n
        Cells per text, at least 1; clamped to the number of cells.
    as_labels
        Treat ``texts`` as cell-type names (or Cell Ontology ids) and query with their Cell Ontology
        text (:func:`langcell.ontology.label_texts`); the names stay the labels.
    use_rep
        An obsm key of cell embeddings to reuse (what :func:`langcell.tl.embed` writes); when present
        they are used (rows re-normalised) instead of running the cell encoder, and
        ``params["reused_embeddings"]`` says so. Their width must equal the model's projection size.
        ``None`` always computes the embeddings.
    counts_layer, gene_column, n_counts_key, max_length, max_tokens, precision
        Tokenization, batching and precision when the embeddings are computed (see
        :func:`langcell.tl.embed`); ``precision`` also applies to the text embeddings.
    {progress}
    key_added
        The uns key written.
    {copy}

    Returns
    -------
    anndata.AnnData or None
        The annotated copy if ``copy=True``, else ``None``. Writes ``uns[key_added]``, a dict with
        ``"params"`` (top_n used, as_labels, use_rep, reused_embeddings, counts_layer, gene_column,
        max_length), ``"names"`` and ``"texts"`` (one per query), ``"cell_indices"`` (``int64
        [n_texts, top_n]``, positions in ``adata``, best first), ``"cell_names"`` (the matching
        obs names) and ``"scores"`` (``float32 [n_texts, top_n]`` cosine similarities).

    Raises
    ------
    LangCellError
        For no or empty texts, repeated names, ``top_n`` below 1, embeddings of the wrong width, an
        unknown label (``as_labels``), or what :func:`langcell.tl.embed` refuses.
    """
    _check_anndata(adata)
    _check_key(key_added)
    top_n = check_positive_int(top_n, "top_n")
    names, query_texts = _query_texts(texts, as_labels)
    cell_embeddings, reused, max_length = unit_cell_embeddings(
        adata, model, use_rep, counts_layer=counts_layer, gene_column=gene_column, n_counts_key=n_counts_key,
        max_length=max_length, max_tokens=max_tokens, precision=precision, progress=progress,
    )
    similarity = cell_embeddings @ text_embeddings(model, query_texts, names, precision).T  # [n_cells, n_texts]
    order = top_k_indices(similarity.T, top_n)
    scores = np.take_along_axis(similarity.T, order, axis=1).astype(np.float32)

    adata = output_anndata(adata, copy)
    adata.uns[key_added] = {
        "params": {
            "top_n": int(order.shape[1]),
            "as_labels": bool(as_labels),
            "use_rep": use_rep,
            "reused_embeddings": reused,
            "counts_layer": counts_layer,
            "gene_column": gene_column,
            "max_length": max_length,
        },
        "names": list(names),
        "texts": list(query_texts),
        "cell_indices": order,
        "cell_names": np.asarray(adata.obs_names, dtype=object)[order],
        "scores": scores,
    }
    return adata if copy else None


@doc_params
def retrieve_texts(
    adata: Any,
    model: Any,
    texts: Sequence[str] | Mapping[str, str],
    *,
    top_n: int = 5,
    as_labels: bool = False,
    use_rep: str | None = "X_langcell",
    counts_layer: str | None = None,
    gene_column: str | None = None,
    n_counts_key: str | None = "n_counts",
    max_length: int | None = None,
    max_tokens: int = 16_384,
    precision: str = "fp32",
    progress: bool = True,
    key_added: str = "langcell_text_retrieval",
    copy: bool = False,
):
    """Cell -> texts: for each cell, the ``top_n`` texts of highest cosine similarity.

    Parameters
    ----------
    adata, model, texts, as_labels, use_rep, counts_layer, gene_column, n_counts_key, max_length, max_tokens
    precision, progress
        As in :func:`retrieve_cells`.
    top_n
        Texts per cell, at least 1; clamped to the number of texts.
    key_added
        Prefix of the fields written.
    {copy}

    Returns
    -------
    anndata.AnnData or None
        The annotated copy if ``copy=True``, else ``None``. The fields written are:

        ``obs[key_added]``
            categorical (categories: the text names): each cell's most similar text.
        ``obs[key_added + "_score"]``
            float: that cosine similarity.
        ``obsm[key_added + "_scores"]``
            ``float32 [n_cells, n_texts]``: the cosine similarity of every cell to every text, columns in
            the order of ``uns[key_added]["names"]``.
        ``obsm[key_added + "_top"]``
            ``int64 [n_cells, top_n]``: the indices of each cell's top texts, best first.
        ``uns[key_added]``
            ``"params"`` (as :func:`retrieve_cells`), ``"names"`` and ``"texts"``.

    Raises
    ------
    LangCellError
        As :func:`retrieve_cells`.
    """
    _check_anndata(adata)
    _check_key(key_added)
    top_n = check_positive_int(top_n, "top_n")
    names, query_texts = _query_texts(texts, as_labels)
    cell_embeddings, reused, max_length = unit_cell_embeddings(
        adata, model, use_rep, counts_layer=counts_layer, gene_column=gene_column, n_counts_key=n_counts_key,
        max_length=max_length, max_tokens=max_tokens, precision=precision, progress=progress,
    )
    similarity = (cell_embeddings @ text_embeddings(model, query_texts, names, precision).T).astype(np.float32)
    order = top_k_indices(similarity, top_n)

    adata = output_anndata(adata, copy)
    adata.obs[key_added] = pd.Categorical.from_codes(order[:, 0], categories=list(names))
    adata.obs[key_added + "_score"] = similarity[np.arange(order.shape[0]), order[:, 0]].astype(np.float64)
    adata.obsm[key_added + "_scores"] = similarity
    adata.obsm[key_added + "_top"] = order
    adata.uns[key_added] = {
        "params": {
            "top_n": int(order.shape[1]),
            "as_labels": bool(as_labels),
            "use_rep": use_rep,
            "reused_embeddings": reused,
            "counts_layer": counts_layer,
            "gene_column": gene_column,
            "max_length": max_length,
        },
        "names": list(names),
        "texts": list(query_texts),
    }
    return adata if copy else None


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _query_texts(texts: Any, as_labels: bool) -> tuple[list[str], list[str]]:
    """Names and texts of the queries."""
    if isinstance(texts, str):
        raise LangCellError("texts must be a list of texts (or {name: text}), not one string; wrap it: [text]")
    if isinstance(texts, Mapping):
        names, values = [str(k) for k in texts], list(texts.values())
    elif isinstance(texts, Sequence | np.ndarray | pd.Index | pd.Series):
        values = list(texts)
        names = [str(v) for v in values]
    else:
        raise LangCellError(f"texts must be a list of texts or a dict {{name: text}}, got {type(texts).__name__}")
    if not values:
        raise LangCellError("no texts given; pass at least one text")
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise LangCellError("every text must be a non-empty string")
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise LangCellError(f"texts {repeated[:5]!r} are repeated; pass each query once")
    if as_labels:
        if isinstance(texts, Mapping):
            raise LangCellError("as_labels=True takes a list of cell-type names, not a dict; pass list(...)")
        described, _ = class_texts(values)
        return [str(v) for v in values], described
    return names, [" ".join(v.split()) for v in values]

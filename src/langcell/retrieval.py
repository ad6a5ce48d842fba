"""Cell-text retrieval in LangCell's shared embedding space, and its recall@k on labelled cells.

Cells and texts are compared by the cosine similarity of their L2-normalised embeddings
(``cell_proj`` of the cell's ``<cls>`` state, ``text_proj`` of the text's ``[CLS]`` state): the
similarity LangCell's cell-text contrastive loss trains.

:func:`retrieve_cells`
    For each text, the ``top_n`` most similar cells.
:func:`retrieve_texts`
    For each cell, the ``top_n`` most similar texts.
:func:`retrieval_recall`
    Both directions scored on labelled cells whose labels are described by Cell Ontology texts.

The metrics are pure numpy functions of a similarity matrix and label indices
(:func:`cell_to_text_recall`, :func:`text_to_cell_metrics`, :func:`retrieval_metrics`), so they can
be checked without a model. Rankings are by similarity, descending; equal similarities are ordered by
index (the lower index ranks first), so every result is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import ontology
from ._checks import check_anndata as _check_anndata
from ._checks import check_key_added as _check_key
from ._checks import check_positive_int
from ._labels import NO_LABEL_VALUES
from .errors import LangCellError

__all__ = [
    "cell_to_text_recall",
    "retrieval_metrics",
    "retrieval_recall",
    "retrieve_cells",
    "retrieve_texts",
    "text_to_cell_metrics",
    "top_k_indices",
]

#: Default recall cut-offs (the paper reports recall@1/5/10).
DEFAULT_KS = (1, 5, 10)
_TERM_COLUMN_SUFFIX = "_ontology_term_id"


# --------------------------------------------------------------------------------------------------
# Pure numpy metrics
# --------------------------------------------------------------------------------------------------


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
    ks = _check_ks(ks)
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
    ks = _check_ks(ks)
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


# --------------------------------------------------------------------------------------------------
# AnnData layer
# --------------------------------------------------------------------------------------------------


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
    progress: bool = False,
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
    progress
        Show a progress bar while embedding cells.
    key_added
        The uns key written.
    copy
        Return an annotated copy instead of writing into ``adata``.

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
    cell_embeddings, reused, max_length = _cell_embeddings(
        adata, model, use_rep, counts_layer=counts_layer, gene_column=gene_column, n_counts_key=n_counts_key,
        max_length=max_length, max_tokens=max_tokens, precision=precision, progress=progress,
    )
    similarity = cell_embeddings @ _text_embeddings(model, query_texts, names, precision).T  # [n_cells, n_texts]
    order = top_k_indices(similarity.T, top_n)
    scores = np.take_along_axis(similarity.T, order, axis=1).astype(np.float32)

    adata = adata.copy() if copy else adata
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
    progress: bool = False,
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
    copy
        Return an annotated copy instead of writing into ``adata``.

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
    cell_embeddings, reused, max_length = _cell_embeddings(
        adata, model, use_rep, counts_layer=counts_layer, gene_column=gene_column, n_counts_key=n_counts_key,
        max_length=max_length, max_tokens=max_tokens, precision=precision, progress=progress,
    )
    similarity = (cell_embeddings @ _text_embeddings(model, query_texts, names, precision).T).astype(np.float32)
    order = top_k_indices(similarity, top_n)

    adata = adata.copy() if copy else adata
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


def retrieval_recall(
    adata: Any,
    model: Any,
    label_key: str,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    texts: Mapping[str, str] | None = None,
    mapping: Mapping[str, str] | str | None = None,
    use_rep: str | None = "X_langcell",
    counts_layer: str | None = None,
    gene_column: str | None = None,
    n_counts_key: str | None = "n_counts",
    max_length: int | None = None,
    max_tokens: int = 16_384,
    precision: str = "fp32",
    progress: bool = False,
) -> dict[str, Any]:
    """Score cell-text retrieval on labelled cells: recall@k both ways and text -> cell precision@k.

    Every distinct label of ``obs[label_key]`` gets one text:

    * ``texts[label]`` when ``texts`` gives one;
    * otherwise, for a column of Cell Ontology term ids (its name ends in ``_ontology_term_id``, e.g.
      CELLxGENE's ``cell_type_ontology_term_id``), the term's text
      (:func:`langcell.ontology.term_text`);
    * otherwise the label is resolved to a Cell Ontology term by name and described
      (:func:`langcell.ontology.label_texts`, with ``mapping`` for labels it cannot place).

    Labels that end up with the same text share one candidate text. Cells whose label is missing or
    one of "unknown"/"na" are left out. The candidate texts are the distinct texts of the labels present;
    the similarity is the cosine of cell and text embeddings, and the metrics are those of
    :func:`cell_to_text_recall` (cell -> text recall@k: is the cell's own type's text among its k most
    similar texts, averaged over cells) and :func:`text_to_cell_metrics` (text -> cell recall@k: is a
    cell of the type among the text's k most similar cells; precision@k: the fraction of those k cells
    that carry the type; both averaged over texts).

    Parameters
    ----------
    adata
        Labelled cells with raw counts (or embeddings in ``obsm[use_rep]``).
    model
        A :class:`~langcell.models.langcell.LangCell`.
    label_key
        The obs column of cell-type labels (names or Cell Ontology term ids).
    ks
        The cut-offs, each at least 1.
    texts
        ``{label: text}`` for labels whose text you write yourself.
    mapping
        ``{label: term id}`` (or a JSON/TSV path) for labels the name resolver cannot place.
    use_rep, counts_layer, gene_column, n_counts_key, max_length, max_tokens, precision, progress
        As in :func:`retrieve_cells`.

    Returns
    -------
    dict
        ``"cell_to_text_recall@k"``, ``"text_to_cell_recall@k"``, ``"text_to_cell_precision@k"`` for every
        k (floats in [0, 1]); ``"ks"``; ``"n_cells"`` (cells scored), ``"n_excluded"`` (cells left out);
        ``"texts"`` (the candidate texts) and ``"text_labels"`` (for each text, the labels it describes);
        ``"reused_embeddings"`` (bool).

    Raises
    ------
    LangCellError
        For a missing column, no labelled cell, an unknown label or term id, bad ``ks``, or what
        :func:`retrieve_cells` refuses.
    """
    _check_anndata(adata)
    ks = _check_ks(ks)
    if not isinstance(label_key, str) or label_key not in adata.obs.columns:
        raise LangCellError(
            f"obs has no column {label_key!r}; pass label_key=<the obs column with cell-type labels or Cell "
            f"Ontology term ids> (columns: {list(adata.obs.columns)[:10]})"
        )
    column = adata.obs[label_key]
    values = np.array(
        ["" if pd.isna(v) else str(v).strip() for v in column.astype(object)], dtype=object
    )
    labelled = ~np.isin(np.char.lower(values.astype(str)), list(NO_LABEL_VALUES))
    if not labelled.any():
        raise LangCellError(
            f"obs[{label_key!r}] has no usable label (only missing, 'unknown' or 'na'); pass a labelled column"
        )
    distinct = list(dict.fromkeys(values[labelled]))
    label_text = _label_texts(distinct, label_key, texts, mapping)
    candidate_texts = list(dict.fromkeys(label_text[label] for label in distinct))
    text_index = {text: i for i, text in enumerate(candidate_texts)}
    codes = np.full(values.size, -1, dtype=np.int64)
    codes[labelled] = [text_index[label_text[v]] for v in values[labelled]]

    cell_embeddings, reused, _ = _cell_embeddings(
        adata, model, use_rep, counts_layer=counts_layer, gene_column=gene_column, n_counts_key=n_counts_key,
        max_length=max_length, max_tokens=max_tokens, precision=precision, progress=progress,
    )
    rows = np.flatnonzero(labelled)
    names = [f"text {i}" for i in range(len(candidate_texts))]  # texts may repeat words; names need not
    similarity = cell_embeddings[rows] @ _text_embeddings(model, candidate_texts, names, precision).T
    result: dict[str, Any] = dict(retrieval_metrics(similarity, codes[rows], ks))
    result.update(
        ks=list(ks),
        n_cells=int(rows.size),
        n_excluded=int(values.size - rows.size),
        texts=candidate_texts,
        text_labels=[[label for label in distinct if label_text[label] == text] for text in candidate_texts],
        reused_embeddings=reused,
    )
    return result


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _label_texts(
    labels: list[str], label_key: str, texts: Mapping[str, str] | None, mapping: Any
) -> dict[str, str]:
    """One text per label: the user's, a term id's, or a resolved name's."""
    if texts is not None and not isinstance(texts, Mapping):
        raise LangCellError("texts must be a dict {label: text}; leave it out to describe labels from the ontology")
    given = {} if texts is None else {str(k): v for k, v in texts.items()}
    out: dict[str, str] = {}
    for label in labels:
        if label in given:
            text = given[label]
            if not isinstance(text, str) or not text.strip():
                raise LangCellError(f"texts[{label!r}] is empty; write a sentence for it or leave it out")
            out[label] = " ".join(text.split())
    rest = [label for label in labels if label not in out]
    if not rest:
        return out
    if label_key.endswith(_TERM_COLUMN_SUFFIX):
        aspect = label_key[: -len(_TERM_COLUMN_SUFFIX)]
        aspect = aspect if aspect in ontology.ASPECTS else "cell_type"
        for term in rest:
            try:
                out[term] = ontology.term_text(term, aspect)
            except LangCellError as error:
                raise LangCellError(f"obs[{label_key!r}]: {error}") from None
    else:
        resolved, _ = ontology.label_texts(rest, mapping=mapping)
        out.update(resolved)
    return out


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
        described, _ = ontology.label_texts(values)
        return [str(v) for v in values], [described[v] for v in values]
    return names, [" ".join(v.split()) for v in values]


def _text_embeddings(model: Any, texts: list[str], names: list[str], precision: str = "fp32") -> np.ndarray:
    """L2-normalised text embeddings ``float32 [n_texts, projection_dim]`` (eval mode, no gradients)."""
    from .inference.zero_shot import encode_class_texts

    return encode_class_texts(model, texts, names, precision=precision).embeddings.float().cpu().numpy()


def _cell_embeddings(adata, model, use_rep, **encode_options) -> tuple[np.ndarray, bool, int | None]:
    """Unit cell embeddings, whether they were reused from obsm, and the max_length used (None if reused).

    ``encode_options`` (counts_layer, gene_column, n_counts_key, max_length, max_tokens, precision,
    progress) go to the embedding routine of :func:`langcell.tl.embed` when the cells are encoded.
    """
    width = int(model.config.projection_dim)
    if use_rep is not None and use_rep in adata.obsm:
        embeddings = np.asarray(adata.obsm[use_rep], dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != width:
            raise LangCellError(
                f"obsm[{use_rep!r}] has shape {embeddings.shape} but the model's embeddings have {width} "
                "dimensions: they come from another model; delete them, recompute them with tl.embed, or "
                "pass use_rep=None"
            )
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        if not np.all(np.isfinite(embeddings)) or np.any(norms == 0):
            raise LangCellError(
                f"obsm[{use_rep!r}] holds zero or non-finite rows; recompute them with tl.embed or pass use_rep=None"
            )
        return embeddings / norms, True, None
    from .tl import _embedding_matrix

    embeddings, max_length = _embedding_matrix(adata, model, **encode_options)
    return embeddings, False, max_length


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


def _check_ks(ks: Any) -> tuple[int, ...]:
    if isinstance(ks, int | np.integer) and not isinstance(ks, bool):
        ks = (ks,)
    if isinstance(ks, str) or not isinstance(ks, Sequence | np.ndarray) or len(ks) == 0:
        raise LangCellError(f"ks must be a list of positive integers such as (1, 5, 10), got {ks!r}")
    return tuple(dict.fromkeys(check_positive_int(k, "every k") for k in ks))



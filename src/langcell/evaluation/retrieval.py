"""Retrieval recall on labelled cells: cell -> text and text -> cell recall@k of the model's embeddings,
each label described by its ontology text (the numbers come from :mod:`langcell.metrics`)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._checks import check_anndata as _check_anndata
from .._checks import check_key_added, listed
from .._docs import doc_params
from .._labels import NO_LABEL_VALUES
from ..errors import LangCellError
from ..inference.embed import text_embeddings, unit_cell_embeddings
from ..metrics import DEFAULT_KS, check_ks, retrieval_metrics
from ..ontology.classes import label_column_texts


@doc_params
def retrieval_recall(
    adata: Any,
    model: Any,
    label_key: str,
    *,
    ks: Sequence[int] | None = None,
    texts: Mapping[str, str] | None = None,
    mapping: Mapping[str, str] | str | None = None,
    use_rep: str | None = "X_langcell",
    counts_layer: str | None = None,
    gene_column: str | None = None,
    n_counts_key: str | None = "n_counts",
    max_length: int | None = None,
    max_tokens: int = 16_384,
    precision: str = "fp32",
    progress: bool = True,
    key_added: str = "langcell_retrieval_recall",
    inplace: bool = False,
) -> dict[str, Any] | None:
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
        The cut-offs, each at least 1. ``None``: (1, 5, 10) without the k at or above the number of
        candidate texts. Cell -> text recall@k is 1.0 by construction for such a k (every text is
        among the k most similar), so it is left out of the default result, and a warning names it;
        ks you pass are all kept, with the same warning.
    texts
        ``{label: text}`` for labels whose text you write yourself.
    mapping
        ``{label: term id}`` (or a JSON/TSV path) for labels the name resolver cannot place.
    use_rep, counts_layer, gene_column, n_counts_key, max_length, max_tokens, precision, progress
        As in :func:`retrieve_cells`.

    {inplace}

    Returns
    -------
    dict or None
        ``inplace=False``: ``"cell_to_text_recall@k"``, ``"text_to_cell_recall@k"``, ``"text_to_cell_precision@k"`` for every
        k (floats in [0, 1]; with ``ks=None``, no ``"cell_to_text_recall@k"`` for a k at or above the
        number of texts); ``"ks"``; ``"ks_left_out"`` (the default ks whose cell -> text recall was left
        out); ``"n_texts"``; ``"n_cells"`` (cells scored), ``"n_excluded"`` (cells left out);
        ``"texts"`` (the candidate texts) and ``"text_labels"`` (for each text, the labels it describes);
        ``"reused_embeddings"`` (bool). ``inplace=True``: ``None``, and ``uns[key_added]`` holds the same
        entries (each text's labels joined by ``"; "``) and ``"params"`` (label_key, ks, use_rep).

    Raises
    ------
    LangCellError
        For a missing column, no labelled cell, an unknown label or term id, bad ``ks``, or what
        :func:`retrieve_cells` refuses.
    """
    _check_anndata(adata)
    check_key_added(key_added)
    default_ks = ks is None
    ks = check_ks(DEFAULT_KS if default_ks else ks)
    if not isinstance(label_key, str) or label_key not in adata.obs.columns:
        raise LangCellError(
            f"obs has no column {label_key!r}; pass label_key=<the obs column with cell-type labels or Cell "
            f"Ontology term ids> (columns: {listed(adata.obs.columns)})"
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
    label_text = label_column_texts(distinct, label_key, texts, mapping)
    candidate_texts = list(dict.fromkeys(label_text[label] for label in distinct))
    text_index = {text: i for i, text in enumerate(candidate_texts)}
    codes = np.full(values.size, -1, dtype=np.int64)
    codes[labelled] = [text_index[label_text[v]] for v in values[labelled]]

    cell_embeddings, reused, _ = unit_cell_embeddings(
        adata, model, use_rep, counts_layer=counts_layer, gene_column=gene_column, n_counts_key=n_counts_key,
        max_length=max_length, max_tokens=max_tokens, precision=precision, progress=progress,
    )
    rows = np.flatnonzero(labelled)
    names = [f"text {i}" for i in range(len(candidate_texts))]  # texts may repeat words; names need not
    similarity = cell_embeddings[rows] @ text_embeddings(model, candidate_texts, names, precision).T
    result: dict[str, Any] = dict(retrieval_metrics(similarity, codes[rows], ks))
    trivial = trivial_ks(ks, len(candidate_texts), left_out=default_ks)
    if default_ks:
        for k in trivial:
            del result[f"cell_to_text_recall@{k}"]
    result.update(
        ks=list(ks),
        ks_left_out=trivial if default_ks else [],
        n_texts=len(candidate_texts),
        n_cells=int(rows.size),
        n_excluded=int(values.size - rows.size),
        texts=candidate_texts,
        text_labels=[[label for label in distinct if label_text[label] == text] for text in candidate_texts],
        reused_embeddings=reused,
    )
    if not inplace:
        return result
    adata.uns[key_added] = {
        **result,
        "text_labels": ["; ".join(labels) for labels in result["text_labels"]],
        "params": {"label_key": label_key, "ks": list(ks), "use_rep": use_rep},
    }
    return None


def trivial_ks(ks: Sequence[int], n_texts: int, *, left_out: bool) -> list[int]:
    """The ks at or above ``n_texts``, for which cell -> text recall@k is 1.0 whatever the model does;
    one warning names them (and says whether they were ``left_out`` of the result)."""
    trivial = [int(k) for k in ks if k >= n_texts]
    if trivial:
        what = "left out of the result" if left_out else "pass ks below the number of texts to measure anything"
        warnings.warn(
            f"cell -> text recall@k is 1.0 by construction for k={', '.join(map(str, trivial))}: there are "
            f"only {n_texts} candidate texts, all of them among the k most similar; {what}",
            stacklevel=3,
        )
    return trivial

"""``tl.explain``: the genes whose tokens drive each cell's match with its predicted class.

The attribution method (gradient x input on the gene tokens' input embeddings) and what it leaves out
are described in :mod:`langcell.inference.explain`; this module reads what :func:`langcell.tl.annotate`
wrote, tokenizes the cells the same way, and aggregates the per-token attributions into a table per
predicted class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from .._checks import (
    check_anndata,
    check_key_added,
    check_positive_int,
    gene_tokenizer_of,
    listed,
    output_anndata,
)
from .._docs import doc_params
from ..errors import LangCellError
from ..inference.explain import DEFAULT_MAX_TOKENS, contrast_targets, token_attributions
from ..inference.zero_shot import encode_class_texts
from ..precision import check_precision
from ._annotate import stored_class_texts

__all__ = ["explain", "explanation_table"]

#: Columns of the table in ``uns[key_added]["table"]``.
TABLE_COLUMNS = [
    "class", "rank", "gene", "gene_id", "importance", "mean_attribution", "top_fraction", "n_cells",
]


@doc_params
def explain(
    adata: Any,
    model: Any,
    *,
    key: str = "langcell_cell_type",
    n_genes: int = 20,
    contrast: bool = True,
    n_counts_key: str | None = "n_counts",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    precision: str = "fp32",
    progress: bool = True,
    key_added: str | None = None,
    copy: bool = False,
):
    """Explain zero-shot annotations: the genes that drive each cell towards its predicted class.

    For every cell annotated by :func:`langcell.tl.annotate` (abstaining cells are skipped), each gene
    token gets the gradient x input attribution of the cell's similarity to its predicted class text
    (method, and what it ignores, in :mod:`langcell.inference.explain`); the attributions are then
    averaged per predicted class. The class texts are the ones annotate stored in ``uns[key]`` (prompt
    ensembles included), and the cells are tokenized with the counts settings annotate recorded.

    Genes are ranked by the *magnitude* of their attribution: gradient x input measures the effect of
    scaling a gene's embedding towards zero, which is not the same as removing the gene (a LayerNorm
    follows the embedding), so its sign can point either way; its size says how much the match
    depends on the gene. A test with a planted signal (one gene alone decides the class of a trained
    tiny model) checks that this gene comes first.

    Parameters
    ----------
    adata
        The annotated cells (raw counts, as for annotate).
    model
        The :class:`langcell.models.LangCell` that annotated them, with its gene tokenizer.
    key
        The ``key_added`` of the annotate call: ``obs[key]`` holds the predictions.
    n_genes
        Genes kept per class in the table, and per cell in ``obs[key_added + "_top_genes"]``; at least 1.
    contrast
        Explain the similarity to the predicted class *minus* the mean similarity to the other
        classes (what sets the class apart; genes high in every cell type cancel). ``False`` explains
        the plain similarity.
    n_counts_key
        The obs column of total counts used when tokenizing (as in annotate).
    max_tokens
        Cell tokens per forward/backward pass (bounds memory).
    {precision}
    {progress}
    key_added
        Where the results go (default ``key + "_explain"``).
    {copy}

    Returns
    -------
    anndata.AnnData or None
        The copy if ``copy=True``, else ``None``. Fields written:

        ``uns[key_added]``
            dict with ``"params"`` (key, n_genes, contrast, method, n_cells), ``"table"`` (columns
            :data:`TABLE_COLUMNS`, stored as a dict of arrays; :func:`explanation_table` gives it
            as a DataFrame): per predicted class its ``n_genes`` genes of highest ``importance``, the
            mean absolute attribution over the class's cells (0 for a cell that does not express
            the gene), rank 1 first; the mean signed attribution (its sign is not reliable, see
            below); the fraction of the class's cells that have the gene among their own top
            ``n_genes``; and the number of cells of the class.
        ``obs[key_added + "_top_genes"]``
            str: each cell's ``n_genes`` genes of largest absolute attribution, joined by ";" (""
            for cells that were not explained).

    Raises
    ------
    LangCellError
        For ``n_genes`` below 1, no annotation under ``key`` (run annotate first), a model without a gene
        tokenizer or whose tokenizer does not fit its cell encoder, or data sharing no gene with the
        model's vocabulary. Nothing is written then.

    Examples
    --------
    >>> langcell.tl.annotate(adata, model, ["B cell", "natural killer cell", "CD14-positive monocyte"])  # doctest: +SKIP
    >>> langcell.tl.explain(adata, model)                                          # doctest: +SKIP
    >>> langcell.tl.explanation_table(adata).query("rank <= 5")                   # doctest: +SKIP
    """
    check_anndata(adata)
    n_genes = check_positive_int(n_genes, "n_genes")
    key_added = key + "_explain" if key_added is None else key_added
    check_key_added(key_added)
    names, prompts, predicted, params = _annotation_of(adata, key)
    tokenizer = _matching_tokenizer(model)
    check_precision(precision, model.logit_scale.device)
    rows = np.flatnonzero(predicted >= 0)
    cells = tokenizer.encode(
        adata[rows] if rows.size < adata.n_obs else adata,
        gene_column=params.get("gene_column"),
        counts_layer=params.get("counts_layer"),
        n_counts_key=n_counts_key,
        max_length=int(params.get("max_length") or model.config.cell.max_position_embeddings),
        progress=progress,
    )
    classes = encode_class_texts(model, prompts, names, precision=precision)
    targets = contrast_targets(classes.embeddings, torch.as_tensor(predicted[rows]), contrast=contrast)
    attributions = token_attributions(
        model, cells, targets.cpu().numpy(), max_tokens=max_tokens, progress=progress
    )
    table, top_genes = _aggregate(cells, attributions, predicted[rows], names, _gene_names(tokenizer), n_genes)

    adata = output_anndata(adata, copy)
    per_cell = np.full(adata.n_obs, "", dtype=object)
    per_cell[rows] = top_genes
    adata.obs[key_added + "_top_genes"] = per_cell.astype(str)
    adata.uns[key_added] = {
        "params": {
            "key": key,
            "n_genes": n_genes,
            "contrast": bool(contrast),
            "method": "gradient x input, cell-text similarity",
            "n_cells": int(rows.size),
            "precision": precision,
        },
        "table": {column: table[column].to_numpy() for column in TABLE_COLUMNS},
    }
    return adata if copy else None


def explanation_table(adata: Any, key_added: str = "langcell_cell_type_explain") -> pd.DataFrame:
    """The table :func:`explain` stored in ``uns[key_added]``, as a DataFrame.

    Parameters
    ----------
    adata
        Cells explained by :func:`explain`.
    key_added
        The ``key_added`` of that call.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`TABLE_COLUMNS`, one row per (class, rank).
    """
    entry = adata.uns.get(key_added)
    if not isinstance(entry, dict) or "table" not in entry:
        raise LangCellError(f"uns has no explanation under {key_added!r}; run langcell.tl.explain first")
    return pd.DataFrame({column: np.asarray(entry["table"][column]) for column in TABLE_COLUMNS})


def _annotation_of(adata: Any, key: str) -> tuple[list[str], list[list[str]], np.ndarray, dict]:
    """Class names and texts, each cell's predicted class index (-1: abstained) and annotate's params."""
    if not isinstance(key, str) or key not in adata.obs.columns or key not in adata.uns:
        raise LangCellError(
            f"no annotation under key={key!r} (obs[{key!r}] and uns[{key!r}] are written by langcell.tl.annotate); "
            f"run tl.annotate first, or pass the key it used (obs columns: {listed(adata.obs.columns)})"
        )
    names, prompts = stored_class_texts(adata.uns[key], f"uns[{key!r}]")
    values = adata.obs[key].astype(object).to_numpy()
    index = {name: k for k, name in enumerate(names)}
    predicted = np.array([index.get(str(v), -1) if isinstance(v, str) else -1 for v in values], dtype=np.int64)
    if not (predicted >= 0).any():
        raise LangCellError(f"no cell of obs[{key!r}] holds one of the classes {listed(names)}; nothing to explain")
    return names, prompts, predicted, dict(adata.uns[key].get("params", {}))


def _matching_tokenizer(model: Any) -> Any:
    """The model's gene tokenizer, refused when its vocabulary is not the one the cell encoder was built for."""
    tokenizer = gene_tokenizer_of(model)
    if int(tokenizer.vocab_size) != int(model.config.cell.vocab_size):
        raise LangCellError(
            f"the model's gene tokenizer has {tokenizer.vocab_size} tokens but its cell encoder {model.config.cell.vocab_size}: "
            "they do not belong together; load the model with LangCell.from_pretrained, which restores its own tokenizer"
        )
    return tokenizer


def _gene_names(tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """Vocabulary keys and display names (gene symbols for an Ensembl vocabulary, where known)."""
    keys = np.asarray(tokenizer.genes, dtype=object)
    if tokenizer.gene_id_kind != "ensembl" or tokenizer.organism is None:
        return keys, keys
    from ..data.genes import load_gene_table

    table = load_gene_table(tokenizer.organism)
    symbols = pd.Series(table["symbol"].to_numpy(), index=table["ensembl_id"].to_numpy())
    shown = symbols.reindex(keys).fillna("").to_numpy(dtype=object)
    return keys, np.where(shown == "", keys, shown)


def _aggregate(
    cells: Any,
    attributions: list[np.ndarray],
    predicted: np.ndarray,
    names: list[str],
    genes: tuple[np.ndarray, np.ndarray],
    n_genes: int,
) -> tuple[pd.DataFrame, list[str]]:
    """The per-class table and each cell's top genes from per-token attributions.

    Genes are ranked by the magnitude of their attribution: scaling a token's embedding towards zero
    is not removing the gene (the embedding LayerNorm follows), so the sign of gradient x input on an
    embedding is not reliable, while its size measures how much the score depends on the token (the
    planted-signal test: the deciding gene had by far the largest magnitude, with either sign).
    """
    keys, shown = genes
    n_classes, vocabulary = len(names), len(keys)
    signed = np.zeros((n_classes, vocabulary))
    magnitude = np.zeros((n_classes, vocabulary))
    in_top = np.zeros((n_classes, vocabulary))
    top_genes = []
    for i, values in enumerate(attributions):
        genes_of_cell = np.asarray(cells[i][1 : values.size], dtype=np.int64) - 2  # drop <cls>; ids start at 2
        values = values[1:].astype(np.float64)
        np.add.at(signed[predicted[i]], genes_of_cell, values)
        np.add.at(magnitude[predicted[i]], genes_of_cell, np.abs(values))
        best = genes_of_cell[np.argsort(-np.abs(values), kind="stable")[:n_genes]]
        in_top[predicted[i], best] += 1
        top_genes.append(";".join(shown[best]))
    counts = np.bincount(predicted, minlength=n_classes)
    frames = []
    for k in np.flatnonzero(counts):
        importance = magnitude[k] / counts[k]
        order = np.argsort(-importance, kind="stable")[:n_genes]
        frames.append(pd.DataFrame({
            "class": names[k], "rank": np.arange(1, order.size + 1), "gene": shown[order].astype(str),
            "gene_id": keys[order].astype(str), "importance": importance[order],
            "mean_attribution": signed[k, order] / counts[k],
            "top_fraction": in_top[k, order] / counts[k], "n_cells": int(counts[k]),
        }))
    return pd.concat(frames, ignore_index=True)[TABLE_COLUMNS], top_genes

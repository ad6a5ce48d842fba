"""``tl.predict``: a trained LangCell-CE classifier applied to new cells."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .._checks import check_anndata as _check_anndata
from .._checks import check_key_added as _check_key
from .._checks import check_max_length, output_anndata
from .._docs import doc_params
from ..errors import LangCellError
from ..metrics import softmax
from ..models.classifier import DEFAULT_MAX_TOKENS, CellTypeClassifier


@doc_params
def predict(
    adata: Any,
    classifier: CellTypeClassifier,
    *,
    counts_layer: str | None = None,
    gene_column: str | None = None,
    n_counts_key: str | None = "n_counts",
    max_length: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: bool = True,
    key_added: str = "langcell_ce",
    copy: bool = False,
):
    """Classify new cells with a trained :class:`CellTypeClassifier`.

    Parameters
    ----------
    adata
        Cells with **raw counts**; their genes are matched to the classifier's gene tokenizer.
    classifier
        From :func:`finetune` or :meth:`CellTypeClassifier.load`.
    {counts_options}
    {max_length}
    {max_tokens}
    {progress}
    key_added
        Prefix of the fields written; existing fields of those names are overwritten.
    {copy}

    Returns
    -------
    anndata.AnnData or None
        The annotated copy if ``copy=True``, else ``None``. The fields written are:

        ``obs[key_added]``
            categorical (categories: the classifier's classes): the most probable class of every cell.
        ``obs[key_added + "_score"]``
            float: its probability.
        ``obsm[key_added + "_probs"]``
            ``float32 [n_cells, n_classes]``: softmax of the logits, columns in the order of
            ``uns[key_added]["classes"]``.
        ``uns[key_added]``
            ``"params"`` (counts_layer, gene_column, max_length, pooling, n_classes) and ``"classes"``.

    Raises
    ------
    LangCellError
        For something other than a classifier, a classifier without a gene tokenizer, counts that are
        not raw counts, or genes none of which is in the vocabulary.
    """
    _check_anndata(adata)
    if not isinstance(classifier, CellTypeClassifier):
        raise LangCellError(
            f"classifier must be a CellTypeClassifier, got {type(classifier).__name__}; train one with "
            "finetune(...) or load one with CellTypeClassifier.load(path)"
        )
    _check_key(key_added)
    if classifier.gene_tokenizer is None:
        raise LangCellError(
            "the classifier has no gene tokenizer, so it cannot tokenize counts; attach the one its encoder "
            "was trained with (classifier.gene_tokenizer = GeneTokenizer.load(...))"
        )
    max_length = check_max_length(max_length, classifier.config.max_position_embeddings)
    cells = classifier.gene_tokenizer.encode(
        adata, gene_column=gene_column, counts_layer=counts_layer, n_counts_key=n_counts_key,
        max_length=max_length, progress=progress,
    )
    probabilities = softmax(
        classifier.predict_logits(cells, max_tokens=max_tokens, max_length=max_length, progress=progress)
    )
    best = probabilities.argmax(axis=1)
    adata = output_anndata(adata, copy)
    adata.obs[key_added] = pd.Categorical.from_codes(best, categories=list(classifier.labels))
    adata.obs[key_added + "_score"] = probabilities[np.arange(best.size), best].astype(np.float64)
    adata.obsm[key_added + "_probs"] = probabilities
    adata.uns[key_added] = {
        "params": {
            "counts_layer": counts_layer,
            "gene_column": gene_column,
            "max_length": int(max_length),
            "pooling": classifier.pooling,
            "n_classes": classifier.n_classes,
        },
        "classes": list(classifier.labels),
    }
    return adata if copy else None

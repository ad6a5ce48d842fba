"""Argument checks shared by the AnnData-level functions (tl, finetune, retrieval, fewshot, evaluate).

Each raises :class:`~langcell.errors.LangCellError` naming the problem and the fix, before any work.
"""

from __future__ import annotations

from typing import Any

from .errors import LangCellError


def check_anndata(adata: Any) -> None:
    """Refuse anything but an AnnData with at least one cell."""
    import anndata

    if not isinstance(adata, anndata.AnnData):
        raise LangCellError(
            f"adata must be an AnnData, got {type(adata).__name__}; read one with anndata.read_h5ad(path)"
        )
    if adata.n_obs == 0:
        raise LangCellError("the AnnData has no cells; pass data with at least one cell")


def check_key_added(key_added: Any) -> None:
    """Refuse a ``key_added`` that is not a non-empty string."""
    if not isinstance(key_added, str) or not key_added:
        raise LangCellError(f"key_added must be a non-empty string, got {key_added!r}")


def gene_tokenizer_of(model: Any) -> Any:
    """The model's gene tokenizer, or a clear error when it has none (it cannot turn counts into tokens)."""
    tokenizer = getattr(model, "gene_tokenizer", None)
    if tokenizer is None:
        raise LangCellError(
            "the model has no gene tokenizer, so it cannot turn counts into tokens; load the model with "
            "LangCell.from_pretrained, which restores it, or attach the one it was trained with "
            "(model.set_gene_tokenizer(GeneTokenizer.load(...)))"
        )
    return tokenizer

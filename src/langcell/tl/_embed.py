"""``tl.embed``: LangCell cell embeddings of every cell into ``obsm``."""

from __future__ import annotations

from typing import Any

from .. import _distributed
from .._checks import check_anndata as _check_anndata
from .._checks import output_anndata
from .._docs import doc_params
from ..errors import LangCellError
from ..inference.embed import check_max_length, corpus_cells, corpus_for, embed_cells, embedding_matrix


@doc_params
def embed(
    adata: Any,
    model: Any,
    *,
    counts_layer: str | None = None,
    gene_column: str | None = None,
    n_counts_key: str | None = "n_counts",
    max_length: int | None = None,
    max_tokens: int = 16_384,
    chunk_size: int = 8_192,
    precision: str = "fp32",
    progress: bool = True,
    distributed: bool = False,
    corpus: Any = None,
    key_added: str = "X_langcell",
    copy: bool = False,
):
    """L2-normalised LangCell cell embeddings (the ``cell_proj`` space shared with texts).

    Cells are tokenized and embedded ``chunk_size`` rows at a time, so a backed AnnData
    (``anndata.read_h5ad(path, backed="r")``) streams from disk: memory holds one chunk's tokens and the
    ``n_cells x 256`` result, whatever the number of cells.

    Parameters
    ----------
    adata
        Cells with raw counts (in ``X``, ``layers[counts_layer]`` or ``.raw`` with ``counts_layer="raw"``).
    model
        A :class:`~langcell.models.langcell.LangCell` with its gene tokenizer.
    {counts_options}
    {max_length}
    {max_tokens}
    chunk_size
        Cells tokenized at a time.
    {precision}
    {progress}
    {distributed}
    {corpus}
    key_added
        The obsm key.
    {copy}

    Returns
    -------
    AnnData or None
        ``adata.obsm[key_added]``: ``float32 [n_cells, projection_dim]``, unit rows.
        ``adata.uns[key_added]["params"]``: the settings of the call. A copy when ``copy=True``.
    """
    _check_anndata(adata)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise LangCellError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if corpus is not None:
        corpus = corpus_for(model, corpus, adata.n_obs)
    ctx = _distributed.current_context() if distributed else None
    # Each process embeds a contiguous share of the rows (all of them on one process).
    rows = _distributed.cell_share(adata.n_obs, ctx) if ctx is not None else slice(0, adata.n_obs)
    if corpus is None:
        part, max_length = embedding_matrix(
            adata, model, counts_layer=counts_layer, gene_column=gene_column, n_counts_key=n_counts_key,
            max_length=max_length, max_tokens=max_tokens, chunk_size=chunk_size, precision=precision,
            progress=progress, rows=rows,
        )
    else:
        max_length = check_max_length(max_length, model)
        part = embed_cells(model, corpus_cells(corpus, rows, max_length), max_tokens=max_tokens,
                           max_length=max_length, precision=precision, progress=progress)
    result = _distributed.gather_rows(part, adata.n_obs, ctx) if ctx is not None else part
    adata = output_anndata(adata, copy)
    adata.obsm[key_added] = result
    adata.uns[key_added] = {
        "params": {
            "counts_layer": counts_layer,
            "gene_column": gene_column,
            "max_length": max_length,
            "precision": precision,
            "n_processes": ctx.world_size if ctx is not None else 1,
            "projection_dim": int(model.config.projection_dim),
        }
    }
    return adata if copy else None


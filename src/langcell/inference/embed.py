"""Cell and text embeddings of a trained model.

:func:`embed_cells` embeds token sequences (length-bucketed, inference mode, original order restored).
:func:`embedding_matrix` tokenizes and embeds an AnnData chunk by chunk (a backed AnnData streams from
disk); :func:`unit_cell_embeddings` reuses embeddings already in ``obsm`` when they fit the model;
:func:`text_embeddings` embeds texts. The AnnData tools (:func:`langcell.tl.embed`, retrieval) call
these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .._checks import gene_tokenizer_of
from .._progress import progress_bar
from ..data.corpus import TokenCorpus
from ..errors import LangCellError
from ..models.batched import forward_in_batches
from ..precision import check_precision
from .zero_shot import encode_class_texts

#: Cell tokens (batch size x padded length) per forward pass when embedding.
DEFAULT_EMBED_MAX_TOKENS = 16_384


def embed_cells(
    model,
    cells: Sequence[np.ndarray],
    *,
    max_tokens: int = DEFAULT_EMBED_MAX_TOKENS,
    max_length: int | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> np.ndarray:
    """L2-normalised cell embeddings ``[n_cells, projection_dim]`` (float32), in the input order.

    Parameters
    ----------
    model
        A :class:`~langcell.models.langcell.LangCell`; put in eval mode for the call.
    cells
        Token sequences, ``<cls>`` first (e.g. a :class:`~langcell.data.tokenizer.TokenizedCells`).
    max_tokens
        Token budget of one forward pass: cells of similar length are batched together so that
        almost no compute goes to padding.
    max_length
        Cut cells to their first ``max_length`` tokens (default: the model's number of positions).
    precision
        ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA) or ``"int8"`` (CPU) for the forward passes
        (:func:`langcell.precision.inference_precision`); embeddings are returned as float32 either way.
    progress
        Show a progress bar.
    """
    device = model.logit_scale.device
    precision = check_precision(precision, device)
    limit = model.config.cell.max_position_embeddings
    max_length = limit if max_length is None else min(int(max_length), limit)
    pad_id = model.gene_tokenizer.pad_id if model.gene_tokenizer is not None else 0

    def embeddings(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model.cell_embeddings({"input_ids": ids, "attention_mask": mask})

    return forward_in_batches(
        model, cells, embeddings, model.config.projection_dim, pad_id=pad_id, max_tokens=max_tokens,
        max_length=max_length, precision=precision, progress=progress, description="embed",
        runs=model.cell_modules(),
    )


def embedding_matrix(
    adata: Any,
    model: Any,
    *,
    counts_layer: str | None,
    gene_column: str | None,
    n_counts_key: str | None,
    max_length: int | None,
    max_tokens: int,
    chunk_size: int = 8_192,
    precision: str = "fp32",
    progress: bool = False,
    rows: slice | None = None,
) -> tuple[np.ndarray, int]:
    """Unit cell embeddings ``float32 [n_obs, projection_dim]`` of ``adata``, and the max_length used.

    Tokenizes and embeds ``chunk_size`` rows at a time (a backed AnnData streams from disk). Shared by
    :func:`embed` and the retrieval functions; validates the model and settings before any work.
    ``rows`` (a contiguous range, e.g. one process's share) embeds only those rows.
    """
    tokenizer = gene_tokenizer_of(model)
    check_precision(precision, model.logit_scale.device)
    max_length = check_max_length(max_length, model)
    first, last = (0, adata.n_obs) if rows is None else (rows.start, rows.stop)
    result = np.zeros((last - first, model.config.projection_dim), dtype=np.float32)
    bar = progress_bar(last - first, progress, "embed", "cell")
    try:
        # One level of slicing only: anndata cannot take a view of a view of a backed file.
        for start in range(first, last, chunk_size):
            stop = min(start + chunk_size, last)
            part = adata[start:stop]
            part = part.to_memory() if adata.isbacked else part
            cells = tokenizer.encode(
                part, gene_column=gene_column, counts_layer=counts_layer, n_counts_key=n_counts_key,
                max_length=max_length,
            )
            result[start - first : stop - first] = embed_cells(
                model, cells, max_tokens=max_tokens, max_length=max_length, precision=precision
            )
            if bar is not None:
                bar.update(stop - start)
    finally:
        if bar is not None:
            bar.close()
    return result, max_length


def check_max_length(max_length: Any, model: Any) -> int:
    """``max_length`` checked and capped at the cell encoder's positions (their number when ``None``)."""
    limit = int(model.config.cell.max_position_embeddings)
    if max_length is None:
        return limit
    if isinstance(max_length, bool) or not isinstance(max_length, int | np.integer) or max_length < 1:
        raise LangCellError(f"max_length must be a positive integer number of tokens, got {max_length!r}")
    return int(min(max_length, limit))


def text_embeddings(model: Any, texts: list[str], names: list[str], precision: str = "fp32") -> np.ndarray:
    """L2-normalised text embeddings ``float32 [n_texts, projection_dim]`` (eval mode, no gradients)."""
    return encode_class_texts(model, texts, names, precision=precision).embeddings.float().cpu().numpy()


def unit_cell_embeddings(adata, model, use_rep, **encode_options) -> tuple[np.ndarray, bool, int | None]:
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

    embeddings, max_length = embedding_matrix(adata, model, **encode_options)
    return embeddings, False, max_length


def corpus_for(model: Any, corpus: Any, n_cells: int) -> TokenCorpus:
    """``corpus`` (a :class:`TokenCorpus` or its directory) checked to hold ``n_cells`` cells tokenized
    with the model's gene vocabulary; raises :class:`LangCellError` otherwise."""
    if not isinstance(corpus, TokenCorpus):
        corpus = TokenCorpus(corpus)
    if len(corpus) != n_cells:
        raise LangCellError(
            f"the corpus {str(corpus.directory)!r} holds {len(corpus)} cells but adata has {n_cells} rows; pass "
            "an AnnData made from the corpus's obs (anndata.AnnData(obs=corpus.obs))"
        )
    if corpus.tokenizer != gene_tokenizer_of(model):
        raise LangCellError(
            f"the corpus {str(corpus.directory)!r} was tokenized with another gene vocabulary than the model's; "
            "tokenize the cells with the model's tokenizer (langcell tokenize --tokenizer MODEL_DIR) or pass the h5ad file"
        )
    return corpus


def corpus_cells(corpus: TokenCorpus, rows: slice, max_length: int) -> list[np.ndarray]:
    """Token sequences of the corpus cells ``rows``, each cut to ``max_length`` tokens (read-only views)."""
    return [corpus[i][:max_length] for i in range(rows.start, rows.stop)]

"""Cell embeddings from token sequences: length-bucketed, inference mode, original order restored.

Tensor-level (no AnnData): :func:`langcell.tl.embed` is the AnnData layer above it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .._progress import progress_bar
from ..data.batching import pad_sequences, token_budget_batches
from ..precision import autocast, check_precision

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
        ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA) autocast of the forward passes
        (:mod:`langcell.precision`); embeddings are returned as float32 either way.
    progress
        Show a progress bar.
    """
    device = model.logit_scale.device
    precision = check_precision(precision, device)
    limit = model.config.cell.max_position_embeddings
    max_length = limit if max_length is None else min(int(max_length), limit)
    lengths = np.minimum(np.fromiter((len(c) for c in cells), dtype=np.int64, count=len(cells)), max_length)
    out = np.zeros((len(cells), model.config.projection_dim), dtype=np.float32)
    if len(cells) == 0:
        return out
    pad_id = model.gene_tokenizer.pad_id if model.gene_tokenizer is not None else 0
    batches = token_budget_batches(lengths, max_tokens)
    bar = progress_bar(len(cells), progress, "embed", "cell")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(precision, device):
            for index in batches:
                ids, mask = pad_sequences([cells[int(i)] for i in index], pad_id, max_length)
                emb = model.cell_embeddings({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
                out[index] = emb.float().cpu().numpy()
                if bar is not None:
                    bar.update(len(index))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return out

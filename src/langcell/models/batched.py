"""Running a model over many cells: token-budget batches, inference mode, outputs in the input order.

The cell embeddings (:func:`langcell.inference.embed.embed_cells`) and the LangCell-CE classifier's
features and logits (:class:`langcell.models.CellTypeClassifier`) both encode cells this way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .._progress import progress_bar
from ..data.batching import pad_sequences, token_budget_batches
from ..precision import inference_precision


def forward_in_batches(
    module: torch.nn.Module,
    sequences: Sequence[np.ndarray],
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    width: int,
    *,
    pad_id: int,
    max_tokens: int,
    max_length: int,
    precision: str = "fp32",
    runs: torch.nn.Module | None = None,
    progress: bool = False,
    description: str = "encode",
) -> np.ndarray:
    """``forward(input_ids, attention_mask) -> [batch, width]`` over every cell, as float32 ``[n, width]``.

    Cells (each cut to ``max_length`` tokens) are grouped by length under ``max_tokens`` tokens per
    batch (:func:`langcell.data.batching.token_budget_batches`); ``module`` runs in eval mode without
    gradients, at ``precision`` (:func:`langcell.precision.inference_precision`), and gets its training
    mode back afterwards. ``runs``, when given, is the part of ``module`` that ``forward`` uses: only its
    weights change precision (casting a text tower that cell embeddings never touch costs about 0.4 s).
    """
    out = np.zeros((len(sequences), width), dtype=np.float32)
    if len(sequences) == 0:
        return out
    lengths = np.minimum(np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences)), max_length)
    device = next(module.parameters()).device
    bar = progress_bar(len(sequences), progress, description, "cell")
    was_training = module.training
    module.eval()
    try:
        with inference_precision(module, precision, device, part=runs), torch.inference_mode():
            for rows in token_budget_batches(lengths, max_tokens):
                ids, mask = pad_sequences([sequences[int(i)] for i in rows], pad_id, max_length)
                out[rows] = forward(torch.from_numpy(ids), torch.from_numpy(mask)).float().cpu().numpy()
                if bar is not None:
                    bar.update(len(rows))
    finally:
        module.train(was_training)
        if bar is not None:
            bar.close()
    return out

"""Which gene tokens drive a cell's match with a class text (tensor level: no AnnData here).

:func:`langcell.tl.explain` is the AnnData layer over this module.

The method: gradient x input
----------------------------
For a cell and a target direction ``t`` in the shared space (a class text embedding, or a contrast
of class text embeddings, see below), the score explained is ``s = <z(cell), t>`` where ``z(cell)`` is
the cell's projection ``cell_proj(<cls> state)`` *before* its L2 normalisation. The zero-shot
similarity of the cell to class k is ``<z, t_k> / |z|``: the norm divides every class's similarity of
that cell by the same positive number, so ``s`` decides the similarity ranking of the classes exactly
as the cosine does. It is explained instead of the cosine because the cosine saturates: a
well-trained cell embedding sits near the maximum of ``<z / |z|, t>`` on the unit sphere, where its
gradient vanishes (a planted-signal test showed attributions of ~1e-8 for the gene that alone decided
the class), while ``s`` keeps the gradient of the direction the cell was pushed in.

The attribution of the gene token at position ``i`` is ``a_i = <ds/dx_i, x_i>``, where ``x_i`` is the
token's *input* word embedding (the row of ``cell_encoder.embeddings.word_embeddings`` for that gene,
before position embeddings and LayerNorm are added). It is the first-order change of ``s`` when the
gene's embedding is scaled towards zero (``d s(x_i (1 + eps)) / d eps`` at ``eps = 0``), so positive
values are genes that pull the cell towards the target and negative ones genes that push it away.

Why this method: one forward and one backward pass per batch give every token's attribution at once
(integrated gradients needs tens of passes per cell; occlusion, one pass per gene), and the result is
exact for what it measures, which the tests check against finite differences.

What it ignores:

* the cell-text matching (CTM) head, which carries weight ``1 - alpha`` of the released blended
  score: explaining it needs one multimodal text pass per cell and class with gradients through
  cross-attention, and its softmax over match *probabilities* is nearly flat, so its gradients say
  little. The explanation is of the dual-encoder (similarity) part of the decision only;
* the position (rank) embedding of each token: a gene's rank is part of the input too, but it is
  shared by whatever gene holds that rank, so it is not attributed to the gene;
* effects beyond first order (saturation): a gene whose removal would change the score a lot while its
  local gradient is small gets a small attribution; integrated gradients would catch that at ~50x the cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .._progress import progress_bar
from ..data.batching import as_sequences, pad_sequences, token_budget_batches
from ..errors import LangCellError

__all__ = ["DEFAULT_MAX_TOKENS", "contrast_targets", "explain_batch", "token_attributions"]

DEFAULT_MAX_TOKENS = 8_192
"""Cell tokens per batch: a backward pass keeps every layer's activations, so half of zero-shot's budget."""


def contrast_targets(class_embeddings: torch.Tensor, predicted: torch.Tensor, *, contrast: bool = True) -> torch.Tensor:
    """Target directions ``[N, D]``: each cell's predicted class embedding, minus the others' mean.

    Parameters
    ----------
    class_embeddings
        ``[K, D]`` class text embeddings (L2-normalised).
    predicted
        ``[N]`` class index of each cell.
    contrast
        Subtract the mean embedding of the other K - 1 classes, so that ``<e, t>`` is the similarity
        to the predicted class minus the mean similarity to the others: what makes the cell *this*
        class rather than another candidate. Genes that raise every similarity alike (high in every
        cell type) then cancel. With one class there is nothing to contrast with: the plain target.

    Returns
    -------
    torch.Tensor
        ``[N, D]`` (the cosine is linear in the text embedding, so the contrast is exact).
    """
    targets = class_embeddings[predicted]
    n_classes = class_embeddings.shape[0]
    if contrast and n_classes > 1:
        total = class_embeddings.sum(dim=0, keepdim=True)
        targets = targets - (total - targets) / (n_classes - 1)
    return targets


def explain_batch(model: Any, batch: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Gradient x input of ``<cell_proj(<cls> state), target>`` on every token's word embedding, for one batch.

    Parameters
    ----------
    model
        A :class:`langcell.models.LangCell` in eval mode (dropout would make the scores random).
    batch
        ``{"input_ids", "attention_mask"}`` ``[B, L]`` right-padded cells, ``<cls>`` first.
    targets
        ``[B, D]`` target direction of each cell (:func:`contrast_targets`).

    Returns
    -------
    torch.Tensor
        ``[B, L]`` attributions (the model's float dtype, at least float32); 0 at padding. Position 0
        (``<cls>``) is included: callers drop it, as it is not a gene.
    """
    device = model.logit_scale.device
    input_ids = torch.as_tensor(batch["input_ids"]).long().to(device)
    mask = torch.as_tensor(batch["attention_mask"]).to(device)
    captured: list[torch.Tensor] = []

    def keep_input(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        # A fresh leaf: the gradient is taken with respect to the input embeddings only, never the weights.
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    hook = model.cell_encoder.embeddings.word_embeddings.register_forward_hook(keep_input)
    try:
        with torch.enable_grad():
            # The masked (unpacked) path keeps the [B, L, H] layout, so gradients map to positions directly.
            first = model.cell_encoder(input_ids, mask, first_token_only=True, attention="masked")
            projected = model.cell_proj(first)
            # float32 at least (a float64 model keeps float64: the finite-difference test relies on it).
            projected = projected.to(torch.promote_types(projected.dtype, torch.float32))
            # Not normalised: see the module docstring (the cosine saturates, the ranking is the same).
            score = (projected * targets.to(device=device, dtype=projected.dtype)).sum()
            (gradient,) = torch.autograd.grad(score, captured[0])
    finally:
        hook.remove()
    attributions = (gradient * captured[0].detach()).sum(dim=-1)
    return attributions * mask.to(attributions.dtype)


def token_attributions(
    model: Any,
    cells: Any,
    targets: torch.Tensor | np.ndarray,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch_size: int | None = None,
    progress: bool = False,
) -> list[np.ndarray]:
    """Per-token attributions of many cells (see the module docstring for the method).

    Parameters
    ----------
    model
        A :class:`langcell.models.LangCell` (put in eval mode for the call, then restored).
    cells
        A :class:`langcell.data.tokenizer.TokenizedCells` or a sequence of 1-D token id arrays
        (``<cls>`` first); sequences longer than the cell encoder's positions are truncated to them.
    targets
        ``[N, D]`` target direction of each cell (:func:`contrast_targets`).
    max_tokens
        Cell tokens per batch (batch size x padded length); cells of similar length are batched together.
    max_batch_size
        Optional cap on cells per batch.
    progress
        Show a progress bar over cells.

    Returns
    -------
    list of numpy.ndarray
        One float32 array per cell, aligned with its (possibly truncated) token sequence; element 0
        (``<cls>``) is included.
    """
    sequences: Sequence[np.ndarray] = as_sequences(cells)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
    if targets.ndim != 2 or targets.shape[0] != len(sequences):
        raise LangCellError(
            f"targets must be [n_cells, dim] with one row per cell ({len(sequences)}), got {tuple(targets.shape)}"
        )
    max_positions = int(model.config.cell.max_position_embeddings)
    lengths = np.minimum([len(s) for s in sequences], max_positions).astype(np.int64)
    batches = token_budget_batches(lengths, max_tokens, max_batch_size=max_batch_size)
    pad_id = int(model.config.cell.pad_token_id)
    out: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * len(sequences)
    was_training = bool(model.training)
    model.eval()
    bar = progress_bar(len(sequences), progress, "explain", "cell")
    try:
        for rows in batches:
            input_ids, attention_mask = pad_sequences([sequences[i] for i in rows], pad_id, max_positions)
            batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
            values = explain_batch(model, batch, targets[torch.from_numpy(rows)]).cpu().numpy()
            for j, row in enumerate(rows):
                out[row] = values[j, : lengths[row]].astype(np.float32)
            if bar is not None:
                bar.update(len(rows))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return out

"""Training LangCell-CE (:class:`langcell.models.CellTypeClassifier`): a linear probe on frozen
features, or full fine-tuning of the encoder and head together; both through
:func:`langcell.train.supervised.fit_epochs`. AnnData in and out is :func:`langcell.tl.finetune`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.batching import pad_sequences, token_budget_batches
from ..errors import LangCellError
from .optim import param_groups
from .supervised import adamw_with_schedule, fit_epochs

#: Epochs of the linear probe when ``epochs=None``: it trains a small head on fixed features (cheap epochs).
LINEAR_EPOCHS = 100


#: Full fine-tuning when ``epochs=None`` (see :func:`full_finetuning_epochs`): at least this many passes,
#: the usual choice on large training sets, where a pass is thousands of steps ...
FULL_MIN_EPOCHS = 3


#: ... and more passes on small ones, until the optimiser makes at least this many steps: 3 passes over a
#: few hundred cells are a handful of steps, which leave the encoder and head close to their start
#: (measured in BENCHMARKS.md: macro-F1 0.23 after 6 steps vs 0.67 after 200 on 84 pbmc68k cells) ...
FULL_MIN_STEPS = 200


#: ... but never more than this many passes over a tiny training set.
FULL_MAX_EPOCHS = 100


def text_initialised_head(
    head: nn.Linear, cell_proj: nn.Linear, text_embeddings: torch.Tensor, scale: float, features: np.ndarray
) -> None:
    """Set a classifier head on ``<cls>`` states to LangCell's zero-shot similarity (step 0 = zero-shot).

    Zero-shot similarity scores class k as ``cos(cell_proj(h), t_k)``; dividing by the cell's norm does
    not change a cell's ranking of the classes, so the linear head ``W = c T P``, ``b = c T p``
    (``P, p`` the projection's weight and bias, ``T`` the normalised class texts) predicts exactly
    what similarity predicts. ``c`` is the model's logit scale over the median norm of the projected
    ``features`` (the training cells), so the logits are on the scale of ``scale * cos``.
    """
    with torch.no_grad():
        text = text_embeddings.to(head.weight.device, torch.float64)
        weight = cell_proj.weight.to(text.device, torch.float64)
        bias = cell_proj.bias.to(text.device, torch.float64)
        projected = torch.from_numpy(np.asarray(features, dtype=np.float64)).to(text.device) @ weight.T + bias
        factor = float(scale) / float(projected.norm(dim=1).median().clamp_min(1e-12))
        head.weight.copy_((factor * text @ weight).to(head.weight.dtype))
        head.bias.copy_((factor * text @ bias).to(head.bias.dtype))


def train_linear_probe(
    classifier, sequences, codes, train, held_out, *, epochs, lr, weight_decay, batch_size, max_tokens,
    max_length, warmup_fraction, max_grad_norm, seed, progress, anchor=None,
) -> tuple[list[float], np.ndarray, int]:
    """Linear probe: encode every cell once with the frozen encoder, then fit the head alone.

    ``anchor``: ``None`` (the head starts where it is and AdamW decays it towards 0), or
    ``(cell_proj, text_embeddings, scale)``: the head starts at zero-shot similarity
    (:func:`text_initialised_head`) and ``weight_decay`` becomes a pull towards that start
    (``weight_decay / 2 * |head - start|^2`` added to the loss) instead of towards 0.

    Returns the mean training loss of every epoch, the held-out cells' logits and the number of steps.
    """
    for param in classifier.cell_encoder.parameters():
        param.requires_grad = False
    features = classifier.encode_features(sequences, max_tokens=max_tokens, max_length=max_length, progress=progress)
    device = classifier.device
    # The head learns on standardised features (per-dimension mean and std of the training cells), the
    # usual linear-probe recipe: an untrained or little-trained encoder gives every cell nearly the same
    # post-LayerNorm state, and the differences that carry the cell type would be lost in the offset.
    # Standardising is affine, so it is folded into the head's weights afterwards (exactly).
    mean = features[train].astype(np.float64).mean(axis=0)
    std = features[train].astype(np.float64).std(axis=0)
    std = np.where(std > 0, std, 1.0)
    head = classifier.head
    pull = None
    if anchor is not None:
        text_initialised_head(head, *anchor, features[train])
        _standardise_head(head, mean, std)  # the same start, read on standardised features
        pull = [param.detach().clone() for param in (head.weight, head.bias)]
    features = ((features - mean) / std).astype(np.float32)
    x_train = torch.from_numpy(features[train]).to(device)
    y_train = torch.from_numpy(codes[train]).to(device)
    # One generator draws every epoch's order up front: the same orders as drawing them epoch by epoch.
    generator = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(train.size, generator=generator).to(device) for _ in range(epochs)]
    epoch_batches = [[order[start : start + batch_size] for start in range(0, train.size, batch_size)] for order in orders]
    total = sum(len(batches) for batches in epoch_batches)
    decay = weight_decay if pull is None else 0.0
    optimizer, scheduler = adamw_with_schedule(param_groups(head, lr, 1.0, decay), total, warmup_fraction)

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(head(x_train[rows]), y_train[rows])
        if pull is not None:
            loss = loss + 0.5 * weight_decay * sum(
                (param - start).square().sum() for param, start in zip((head.weight, head.bias), pull, strict=True)
            )
        return loss

    head.train()
    losses = fit_epochs(
        epoch_batches, batch_loss, optimizer, scheduler,
        list(head.parameters()), n_items=train.size, max_grad_norm=max_grad_norm, progress=progress,
        description="linear probe",
    )
    for param in classifier.cell_encoder.parameters():
        param.requires_grad = True
    with torch.inference_mode():
        held_out_logits = classifier.head(torch.from_numpy(features[held_out]).to(device)).float().cpu().numpy()
    _fold_standardisation(classifier.head, mean, std)
    return losses, held_out_logits, total


def _standardise_head(head: nn.Linear, mean: np.ndarray, std: np.ndarray) -> None:
    """The inverse of :func:`_fold_standardisation`: a head on ``x`` as one on ``(x - mean) / std``."""
    with torch.no_grad():
        weight = head.weight.double()
        bias = head.bias.double() + weight @ torch.from_numpy(mean).to(head.weight.device)
        head.weight.copy_((weight * torch.from_numpy(std).to(head.weight.device)).to(head.weight.dtype))
        head.bias.copy_(bias.to(head.bias.dtype))


def _fold_standardisation(head: nn.Linear, mean: np.ndarray, std: np.ndarray) -> None:
    """Turn a head trained on ``(x - mean) / std`` into one on ``x``: ``W' = W / std``, ``b' = b - W' mean``."""
    with torch.no_grad():
        weight = head.weight.double() / torch.from_numpy(std).to(head.weight.device)
        bias = head.bias.double() - weight @ torch.from_numpy(mean).to(head.weight.device)
        head.weight.copy_(weight.to(head.weight.dtype))
        head.bias.copy_(bias.to(head.bias.dtype))


def full_finetuning_epochs(steps_per_epoch: int) -> int:
    """Passes of full fine-tuning when ``finetune(..., epochs=None)``: enough for ``FULL_MIN_STEPS`` steps.

    ``ceil(FULL_MIN_STEPS / steps_per_epoch)``, clipped to ``[FULL_MIN_EPOCHS, FULL_MAX_EPOCHS]``: 3 passes
    over a large training set, more over a small one (100 over 84 cells in batches of 64).

    Parameters
    ----------
    steps_per_epoch
        Optimiser steps of one pass over the training cells (at least 1).

    Returns
    -------
    int
        The number of epochs.
    """
    if steps_per_epoch < 1:
        raise LangCellError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
    return min(max(math.ceil(FULL_MIN_STEPS / steps_per_epoch), FULL_MIN_EPOCHS), FULL_MAX_EPOCHS)


def train_full(
    classifier, sequences, codes, train, *, epochs, lr, encoder_lr, weight_decay, max_tokens, max_batch_size,
    max_length, warmup_fraction, max_grad_norm, seed, progress,
) -> tuple[list[float], int, int]:
    """Full fine-tuning: the encoder and the head learn together, batches by length under a token budget.

    ``epochs=None`` chooses them with :func:`full_finetuning_epochs`. Returns the mean training loss of
    every epoch, the number of epochs and the number of optimiser steps.
    """
    lengths = np.minimum(np.fromiter((sequences[i].size for i in train), dtype=np.int64), max_length)

    def batches_of(epoch: int) -> list[np.ndarray]:
        batches = token_budget_batches(lengths, max_tokens, max_batch_size=max_batch_size, shuffle=True,
                                       seed=seed + epoch)
        return [train[b] for b in batches]

    # Shuffled anew each epoch; the batch count depends on the lengths only, so the schedule is exact.
    epoch_batches = [batches_of(0)]
    if epochs is None:
        epochs = full_finetuning_epochs(len(epoch_batches[0]))
    epoch_batches += [batches_of(epoch) for epoch in range(1, epochs)]
    total = sum(len(batches) for batches in epoch_batches)
    optimizer, scheduler = adamw_with_schedule(
        param_groups(classifier.cell_encoder, encoder_lr, 1.0, weight_decay)
        + param_groups(classifier.head, lr, 1.0, weight_decay),
        total,
        warmup_fraction,
    )
    pad_id = classifier.config.pad_token_id

    def batch_loss(rows: np.ndarray) -> torch.Tensor:
        ids, mask = pad_sequences([sequences[i] for i in rows], pad_id, max_length)
        labels = torch.from_numpy(codes[rows]).to(classifier.device)
        return F.cross_entropy(classifier(torch.from_numpy(ids), torch.from_numpy(mask)), labels)

    classifier.train()
    losses = fit_epochs(
        epoch_batches, batch_loss, optimizer, scheduler, list(classifier.parameters()), n_items=train.size,
        max_grad_norm=max_grad_norm, progress=progress, description="fine-tune",
    )
    classifier.eval()
    return losses, epochs, total

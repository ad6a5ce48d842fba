"""Few-shot tuning of a LangCell model on n labelled cells per class (the paper's few-shot setting).

The model is tuned on a copy with a contrastive cell-class loss and the cell-text matching loss over
the class texts (:func:`fewshot_loss`; ``match_classes`` restricts matching to the own class and the
most similar others); the batches run through :func:`langcell.train.supervised.fit_epochs`. The
protocol that compares it with the baselines is :func:`langcell.evaluation.fewshot`.

The matching score of a class
-----------------------------
The CTM head gives two logits per (cell, class text) pair, (no match, match). The class's matching
score is their difference ``m_k = logit_match - logit_no_match``, the log-odds of "match"; the
matching loss is the cross-entropy over the K classes of these scores, so a cell learns to match its
own class's text better than every other class's. (``log_softmax(logits)[..., 1]``, the log
probability of "match", would be the other natural choice. It is capped at 0, so once the own class
is a confident match its score cannot grow and the loss can only fall by making the other classes
non-matches; the log-odds are unbounded and rank the K pairs on the scale the binary head was
pretrained on, where the release's zero-shot score reads them through ``softmax(logits)[..., 1]``.)
"""

from __future__ import annotations

import copy as copy_module
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._checks import check_max_length, check_positive_int
from ..data.batching import as_sequences, pad_sequences, token_budget_batches
from ..errors import LangCellError
from ..inference.zero_shot import DEFAULT_MAX_PAIR_TOKENS, TEMPERATURE
from .optim import check_rates, param_groups
from .supervised import adamw_with_schedule, fit_epochs, model_device, seeded

#: Cell tokens (batch size x padded length) per step and per inference pass.
DEFAULT_MAX_TOKENS = 8_192


#: Cells per tuning step. The training sets are tiny (n x K cells), so small batches give the model a
#: few steps per epoch even at one shot per class.
DEFAULT_MAX_BATCH_SIZE = 8


#: Passes over the training cells. With 8 cells a step, 1-shot on 10 classes takes 2 steps per epoch and
#: 10-shot 13: 20 epochs give 40 to 260 steps, enough to move a pretrained model without memorising.
DEFAULT_EPOCHS = 20


#: Peak learning rate of the cell encoder, the cross-attention and the heads: the top of the usual
#: range for fine-tuning BERT-sized encoders (1e-5 to 1e-4). Few steps, and the aim is a nudge to the
#: pretrained alignment rather than learning from scratch, so a higher rate would overshoot.
DEFAULT_LR = 1e-4


#: Peak learning rate of the text tower's own (self-attention and feed-forward) weights: it sees only
#: the K class texts, so it moves ten times slower lest the class texts collapse onto the few cells.
DEFAULT_TEXT_LR = 1e-5


def fewshot_loss(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    class_tokens: Mapping[str, torch.Tensor],
    *,
    tau: float = TEMPERATURE,
    match_classes: int | None = None,
    text_states: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The few-shot objective of one batch: similarity cross-entropy plus matching cross-entropy.

    Parameters
    ----------
    model
        A :class:`~langcell.models.langcell.LangCell`.
    batch
        ``{"input_ids", "attention_mask"}`` ``[B, L]`` tokenized cells, ``<cls>`` first.
    labels
        ``[B]`` class index of every cell, into the rows of ``class_tokens``.
    class_tokens
        ``{"input_ids", "attention_mask"}`` ``[K, T]``: the K class texts, tokenized
        (:meth:`LangCell.tokenize_texts`). They are encoded in this call, so gradients reach the text
        tower.
    tau
        Temperature of the similarity softmax (the release's 0.05).
    match_classes
        ``None`` (the protocol): the matching cross-entropy runs over all K classes, i.e. the
        multimodal tower reads every (cell, class) pair. An integer m < K: over the cell's own class and
        its m - 1 most similar other classes (hard negatives, chosen by the detached similarities), so
        the multimodal tower reads m pairs per cell instead of K.
    text_states
        ``[K, H]`` the class texts' ``[CLS]`` states of the unimodal text pass, computed once when the
        text tower's own weights are frozen (:func:`tune_langcell` with ``text_lr=0``); only
        ``text_proj`` then runs per step. ``None``: the texts are encoded in this call.

    Returns
    -------
    dict of torch.Tensor
        ``"similarity"``: ``CE(cos(cell, text_k) / tau)`` over the K classes; ``"matching"``: the
        cross-entropy of the matching scores ``logit_match - logit_no_match`` (multimodal text tower,
        :meth:`LangCell.match_logits`) over the K classes, or the ``match_classes`` chosen ones;
        ``"loss"``: their sum. Each is a mean over the batch.
    """
    device = model.logit_scale.device
    mask = torch.as_tensor(batch["attention_mask"]).to(device)
    cell_embeddings, states = model.encode_cells(
        {"input_ids": torch.as_tensor(batch["input_ids"]), "attention_mask": mask}
    )
    if text_states is None:
        text_embeddings = model.encode_texts(class_tokens)
    else:
        text_embeddings = F.normalize(model.text_proj(text_states), dim=-1)
    labels = torch.as_tensor(labels).long().to(device)
    similarity = model.similarity(cell_embeddings, text_embeddings)
    similarity_loss = F.cross_entropy(similarity / tau, labels)
    n_classes = int(class_tokens["input_ids"].shape[0])
    if match_classes is None or match_classes >= n_classes:
        match_logits = model.match_logits(states, mask, class_tokens)  # [B, K, 2]
        matching_loss = F.cross_entropy(match_logits[..., 1] - match_logits[..., 0], labels)
    else:
        chosen = hard_match_classes(similarity, labels, match_classes)  # [B, m], own class first
        cell_index = torch.arange(chosen.shape[0], device=device).repeat_interleave(chosen.shape[1])
        tokens = {key: value[chosen.flatten()] for key, value in class_tokens.items()}
        match_logits = model.match_logits(states, mask, tokens, cell_index=cell_index).view(*chosen.shape, 2)
        own = torch.zeros_like(labels)  # the own class is column 0 of ``chosen``
        matching_loss = F.cross_entropy(match_logits[..., 1] - match_logits[..., 0], own)
    return {"loss": similarity_loss + matching_loss, "similarity": similarity_loss, "matching": matching_loss}


def hard_match_classes(similarity: torch.Tensor, labels: torch.Tensor, match_classes: int) -> torch.Tensor:
    """Each cell's own class, then its ``match_classes - 1`` most similar other classes.

    Parameters
    ----------
    similarity
        ``[B, K]`` cell-class similarities (read without gradient).
    labels
        ``[B]`` own class of every cell.
    match_classes
        Classes per cell, at most K.

    Returns
    -------
    torch.Tensor
        ``[B, match_classes]`` long class indices; column 0 is ``labels``, the others by decreasing
        similarity (ties by lower index).
    """
    ranked = similarity.detach().float().clone()
    ranked.scatter_(1, labels[:, None], torch.inf)  # the own class always ranks first
    return torch.topk(ranked, match_classes, dim=1, sorted=True).indices


def check_match_classes(match_classes: Any, n_classes: int) -> int | None:
    """``match_classes`` as ``None`` (all classes) or an integer in [2, K], else a clear error.

    A value of K or more means every class (``None``): one default serves any class set.
    """
    if match_classes is None:
        return None
    if isinstance(match_classes, bool) or not isinstance(match_classes, int | np.integer) or match_classes < 2:
        raise LangCellError(
            f"match_classes must be None (every class) or an integer of at least 2 (the own class and at "
            f"least one hard negative), got {match_classes!r}"
        )
    return None if match_classes >= n_classes else int(match_classes)


def tune_langcell(
    model: Any,
    cells: Any,
    labels: np.ndarray,
    class_texts: Sequence[str],
    *,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    text_lr: float = DEFAULT_TEXT_LR,
    tau: float = TEMPERATURE,
    weight_decay: float = 0.01,
    warmup_fraction: float = 0.1,
    max_grad_norm: float = 1.0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_pair_tokens: int = DEFAULT_MAX_PAIR_TOKENS,
    max_length: int | None = None,
    match_classes: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Any, list[float]]:
    """Tune a copy of a LangCell model on labelled cells with :func:`fewshot_loss`.

    Both encoders and the projection and matching heads learn (AdamW, no decay on biases and
    LayerNorms, linear warm-up then cosine decay to 0, gradient clipping). The text tower's own weights
    learn at ``text_lr``, everything else (cell encoder, cross-attention, heads) at ``lr``. With
    ``text_lr=0`` the text tower's own weights are frozen: the class texts' unimodal ``[CLS]`` states
    are then computed once (in eval mode, before tuning) instead of at every step, and only
    ``text_proj`` and the multimodal pass (whose cross-attention learns) run per step. Cells are
    batched by length under ``max_tokens`` and reshuffled every epoch; a batch also holds at most
    ``max_pair_tokens // (K x text length)`` cells (``match_classes`` in place of K when it is set), which
    bounds the multimodal pass over the (cell, class) pairs. Dropout is active while tuning.

    Parameters
    ----------
    model
        A :class:`~langcell.models.langcell.LangCell`; it is deep-copied (its tokenizers are shared
        with the copy, not copied) and never changed.
    cells
        Tokenized training cells (:class:`~langcell.data.tokenizer.TokenizedCells` or 1-D token arrays).
    labels
        Class index of every cell, in ``[0, K)``.
    class_texts
        The K class texts.
    epochs, lr, text_lr, tau, weight_decay, warmup_fraction, max_grad_norm
        The optimisation (see :func:`fewshot`); ``text_lr=0`` freezes the text tower's own weights.
    max_tokens, max_batch_size, max_pair_tokens
        Batch limits (cell tokens, cells, text tokens of the matching pass).
    max_length
        Longest cell in tokens (default and cap: the cell encoder's positions).
    match_classes
        Classes per cell in the matching loss (:func:`fewshot_loss`); ``None``: all K.
    seed
        Seeds the batch order and dropout; the global torch random state is left as it was.
    progress
        Show a progress bar.

    Returns
    -------
    tuned : LangCell
        The tuned copy, in eval mode.
    losses : list of float
        The mean training loss of every epoch.
    """
    sequences = as_sequences(cells)
    labels = np.asarray(labels, dtype=np.int64)
    texts = list(class_texts)
    if labels.shape != (len(sequences),) or not sequences:
        raise LangCellError(
            f"{labels.size} labels for {len(sequences)} cells; pass one label per training cell"
        )
    if labels.min() < 0 or labels.max() >= len(texts):
        raise LangCellError(f"labels must lie in [0, {len(texts)}), one class text per label value")
    epochs = check_positive_int(epochs, "epochs")
    check_rates(lr=lr, tau=tau)
    check_text_lr(text_lr)
    max_length = check_max_length(max_length, model.config.cell.max_position_embeddings)
    match_classes = check_match_classes(match_classes, len(texts))
    device = model_device(model)
    # The tokenizers are read-only: the copy shares them (a deep copy of a text tokenizer is slow).
    shared = {id(model.text_tokenizer): model.text_tokenizer, id(model.gene_tokenizer): model.gene_tokenizer}
    tuned = copy_module.deepcopy(model, shared)
    class_tokens = {key: value.to(device) for key, value in tuned.tokenize_texts(texts).items()}
    text_states = _frozen_text_states(tuned, class_tokens) if text_lr == 0 else None
    pairs_per_cell = (match_classes or len(texts)) * int(class_tokens["input_ids"].shape[1])
    batch_cap = max(1, min(int(max_batch_size), int(max_pair_tokens) // max(pairs_per_cell, 1)))
    lengths = np.minimum(np.fromiter((s.size for s in sequences), dtype=np.int64), max_length)
    with seeded(seed, device):
        epoch_batches = [
            token_budget_batches(
                lengths, max_tokens, max_batch_size=batch_cap, shuffle=True, seed=seed + epoch
            )
            for epoch in range(epochs)
        ]
        total = sum(len(batches) for batches in epoch_batches)
        optimizer, scheduler = adamw_with_schedule(
            param_groups(tuned, lr, text_lr / lr, weight_decay), total, warmup_fraction
        )
        pad_id = int(tuned.config.cell.pad_token_id)

        def batch_loss(rows: np.ndarray) -> torch.Tensor:
            ids, mask = pad_sequences([sequences[i] for i in rows], pad_id, max_length)
            cells = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
            return fewshot_loss(
                tuned, cells, torch.from_numpy(labels[rows]), class_tokens, tau=tau, match_classes=match_classes,
                text_states=text_states,
            )["loss"]

        tuned.train()
        losses = fit_epochs(
            epoch_batches, batch_loss, optimizer, scheduler, [p for p in tuned.parameters() if p.requires_grad],
            n_items=len(sequences), max_grad_norm=max_grad_norm, progress=progress, description="few-shot tuning",
        )
    tuned.zero_grad(set_to_none=True)
    return tuned.eval(), losses


def check_text_lr(text_lr: object) -> float:
    """``text_lr`` as a float >= 0 (0 freezes the text tower's own weights), else a clear error."""
    number = isinstance(text_lr, int | float) and not isinstance(text_lr, bool)
    if not (number and text_lr >= 0 and np.isfinite(text_lr)):
        raise LangCellError(f"text_lr must be a number >= 0 (0 freezes the text tower), got {text_lr!r}")
    return float(text_lr)


def _frozen_text_states(model: Any, class_tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """Freeze the text tower's own weights (cross-attention keeps learning); its class-text states, once."""
    for name, param in model.text_encoder.named_parameters():
        if ".crossattention." not in name:
            param.requires_grad = False
    was_training = model.training
    model.eval()
    with torch.no_grad():
        states = model.text_encoder(class_tokens["input_ids"], class_tokens["attention_mask"], mode="text")[:, 0]
    model.train(was_training)
    return states.detach()

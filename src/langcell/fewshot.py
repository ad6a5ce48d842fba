"""Few-shot cell-type annotation: LangCell's protocol next to expression baselines on the same cells.

The LangCell paper tunes the whole model on ``n`` labelled cells per class (n = 1, 3, 5, 10 ...) and
annotates the remaining cells. Here, for every ``n`` and every repeat:

1. :func:`sample_shots` draws ``n`` training cells per class (seeded); every other labelled cell is a
   test cell. Every method sees exactly this split.
2. **LangCell** (:func:`tune_langcell`): a copy of the model (the caller's model never changes) is
   tuned on the ``n x K`` training cells, *both* encoders and the heads, with
   ``CE(cos(cell, text_k) / tau) + CE(match score_k)`` over the K class texts (:func:`fewshot_loss`);
   the class texts are encoded anew, with gradients, at every step. The test cells are then annotated
   exactly as zero-shot annotation does (:func:`langcell.inference.zero_shot.zero_shot_scores`: the alpha blend
   of the similarity and matching softmaxes) with the tuned model.
3. **Logistic regression** on log-normalised counts, standardised on the training cells
   (:func:`langcell.demo.logistic_regression_predict`, the demo's baseline).
4. **kNN** (scikit-learn ``KNeighborsClassifier``) on the principal components of the log-normalised
   counts.
5. Accuracy and macro-F1 of every method on the test cells (:func:`langcell.finetune.classification_metrics`).

:func:`fewshot` is the AnnData layer; ``langcell.tl.fewshot`` is the same function and
:func:`langcell.pl.fewshot_curves` draws its results.

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

The kNN features are transductive
---------------------------------
The principal components are fitted once on the log-normalised counts of all labelled cells,
training and test together, without their labels, as a scanpy user would run ``sc.tl.pca`` on the
whole dataset before classifying. No label of a test cell is used; their expression shapes the
components, as it shapes the (likewise label-free) pretraining of a foundation model.
"""

from __future__ import annotations

import copy as copy_module
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ._checks import check_anndata, check_key_added, check_max_length, check_positive_int, gene_tokenizer_of
from ._labels import label_codes
from ._progress import progress_bar
from .data.batching import as_sequences, pad_sequences, token_budget_batches
from .errors import LangCellError
from .finetune import _model_device, _seeded, _step, classification_metrics
from .inference.zero_shot import (
    DEFAULT_ALPHA,
    DEFAULT_MAX_PAIR_TOKENS,
    DEFAULT_TOP_K,
    MODES,
    TEMPERATURE,
    check_alpha,
    check_top_k,
    encode_class_texts,
    zero_shot_scores,
)
from .train.optim import param_groups, warmup_cosine_schedule

__all__ = [
    "BASELINES",
    "DEFAULT_SHOTS",
    "RESULT_COLUMNS",
    "fewshot",
    "fewshot_loss",
    "hard_match_classes",
    "sample_shots",
    "tune_langcell",
]

#: Training cells per class in the paper's few-shot experiments.
DEFAULT_SHOTS = (1, 3, 5, 10)
#: The expression baselines :func:`fewshot` can run next to LangCell.
BASELINES = ("logistic_regression", "knn")
#: Columns of the results table, in order.
RESULT_COLUMNS = ("method", "shots", "repeat", "accuracy", "macro_f1", "n_train", "n_test")
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


# --------------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------------


def sample_shots(
    codes: np.ndarray,
    n_per_class: int,
    *,
    seed: int,
    min_test: int = 1,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n_per_class`` training items of every class; the other labelled items are the test set.

    Each class's items are put in a random order (one ``numpy.random.default_rng(seed)``, classes
    visited in increasing code order) and the first ``n_per_class`` are taken. The order does not
    depend on ``n_per_class``, so with one seed the training items of a smaller ``n`` are a subset of
    those of a larger one (the few-shot curve adds cells rather than redrawing them).

    Parameters
    ----------
    codes
        Integer class code of every item; negative codes mark unlabelled items, in neither set.
    n_per_class
        Training items per class (at least 1).
    seed
        The same seed gives the same split.
    min_test
        Every class must keep at least this many test items: a class needs ``n_per_class + min_test``
        items.
    class_names
        Names of the codes, for error messages.

    Returns
    -------
    train, test : numpy.ndarray
        Sorted ``int64`` indices into ``codes``.

    Raises
    ------
    LangCellError
        For codes that are not a 1-D integer array, no labelled item, ``n_per_class`` or ``min_test``
        not a positive integer, or a class with fewer than ``n_per_class + min_test`` items (named,
        with its size: lower ``n_per_class`` or leave the class out).
    """
    codes = np.asarray(codes)
    if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer):
        raise LangCellError("codes must be a 1-D integer array (one class code per item, -1 = unlabelled)")
    n_per_class = check_positive_int(n_per_class, "n_per_class (shots)")
    min_test = check_positive_int(min_test, "min_test")
    classes, counts = np.unique(codes[codes >= 0], return_counts=True)
    if classes.size == 0:
        raise LangCellError("no labelled item (every code is negative); label some cells")
    too_small = counts < n_per_class + min_test
    if too_small.any():
        named = [
            f"{class_names[c]!r} ({n} cells)" if class_names is not None else f"{c} ({n} items)"
            for c, n in zip(classes[too_small], counts[too_small], strict=True)
        ]
        raise LangCellError(
            f"{n_per_class}-shot sampling needs at least {n_per_class + min_test} cells per class "
            f"({n_per_class} to train, {min_test} to test), but these classes have fewer: "
            f"{', '.join(named)}; "
            "lower the shots or leave those classes out (labels=[the classes to keep])"
        )
    rng = np.random.default_rng(seed)
    train = [rng.permutation(np.flatnonzero(codes == code))[:n_per_class] for code in classes]
    train = np.sort(np.concatenate(train)).astype(np.int64)
    test = np.setdiff1d(np.flatnonzero(codes >= 0), train).astype(np.int64)
    return train, test


def _run_seed(seed: int, *parts: int) -> int:
    """A seed for one part of the protocol, independent of the seeds of the other parts."""
    return int(np.random.SeedSequence([int(seed), *map(int, parts)]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------------
# LangCell tuning (tensor level)
# --------------------------------------------------------------------------------------------------


def fewshot_loss(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    class_tokens: Mapping[str, torch.Tensor],
    *,
    tau: float = TEMPERATURE,
    match_classes: int | None = None,
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
    text_embeddings = model.encode_texts(class_tokens)
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
    learn at ``text_lr``, everything else (cell encoder, cross-attention, heads) at ``lr``. Cells are
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
        The optimisation (see :func:`fewshot`).
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
    _check_rates(lr=lr, text_lr=text_lr, tau=tau)
    max_length = check_max_length(max_length, model.config.cell.max_position_embeddings)
    match_classes = check_match_classes(match_classes, len(texts))
    device = _model_device(model)
    # The tokenizers are read-only: the copy shares them (a deep copy of a text tokenizer is slow).
    shared = {id(model.text_tokenizer): model.text_tokenizer, id(model.gene_tokenizer): model.gene_tokenizer}
    tuned = copy_module.deepcopy(model, shared)
    class_tokens = {key: value.to(device) for key, value in tuned.tokenize_texts(texts).items()}
    pairs_per_cell = (match_classes or len(texts)) * int(class_tokens["input_ids"].shape[1])
    batch_cap = max(1, min(int(max_batch_size), int(max_pair_tokens) // max(pairs_per_cell, 1)))
    lengths = np.minimum(np.fromiter((s.size for s in sequences), dtype=np.int64), max_length)
    with _seeded(seed, device):
        epoch_batches = [
            token_budget_batches(
                lengths, max_tokens, max_batch_size=batch_cap, shuffle=True, seed=seed + epoch
            )
            for epoch in range(epochs)
        ]
        total = sum(len(batches) for batches in epoch_batches)
        optimizer = torch.optim.AdamW(param_groups(tuned, lr, text_lr / lr, weight_decay))
        scheduler = warmup_cosine_schedule(optimizer, int(warmup_fraction * total), total, 0.0)
        parameters = [p for p in tuned.parameters() if p.requires_grad]
        pad_id = int(tuned.config.cell.pad_token_id)
        bar = progress_bar(total, progress, "few-shot tuning", "step")
        losses = []
        tuned.train()
        try:
            for batches in epoch_batches:
                loss_sum = 0.0
                for rows in batches:
                    ids, mask = pad_sequences([sequences[i] for i in rows], pad_id, max_length)
                    loss = fewshot_loss(
                        tuned,
                        {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)},
                        torch.from_numpy(labels[rows]),
                        class_tokens,
                        tau=tau,
                        match_classes=match_classes,
                    )["loss"]
                    _step(loss, optimizer, scheduler, parameters, max_grad_norm)
                    loss_sum += float(loss.detach()) * len(rows)
                    if bar is not None:
                        bar.update(1)
                losses.append(loss_sum / len(sequences))
                if bar is not None:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
        finally:
            if bar is not None:
                bar.close()
    tuned.zero_grad(set_to_none=True)
    return tuned.eval(), losses


# --------------------------------------------------------------------------------------------------
# The AnnData layer
# --------------------------------------------------------------------------------------------------


def fewshot(
    adata: Any,
    model: Any,
    label_key: str,
    *,
    shots: Sequence[int] = DEFAULT_SHOTS,
    repeats: int = 1,
    labels: Sequence[str] | Mapping[str, str] | None = None,
    mapping: Mapping[str, str] | str | None = None,
    min_test: int = 1,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    text_lr: float = DEFAULT_TEXT_LR,
    tau: float = TEMPERATURE,
    alpha: float = DEFAULT_ALPHA,
    mode: str = "fast",
    top_k: int = DEFAULT_TOP_K,
    weight_decay: float = 0.01,
    warmup_fraction: float = 0.1,
    max_grad_norm: float = 1.0,
    baselines: Sequence[str] = BASELINES,
    n_pcs: int = 50,
    n_neighbors: int | None = None,
    seed: int = 0,
    counts_layer: str | None = None,
    gene_column: str | None = None,
    n_counts_key: str | None = "n_counts",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_pair_tokens: int = DEFAULT_MAX_PAIR_TOKENS,
    max_length: int | None = None,
    match_classes: int | None = None,
    progress: bool = False,
    key_added: str = "langcell_fewshot",
    copy: bool = False,
):
    """Few-shot annotation: LangCell tuned on n cells per class, next to baselines on the same split.

    For every ``n`` in ``shots`` and every repeat, :func:`sample_shots` draws ``n`` training cells of
    every class and keeps the other labelled cells for testing; LangCell and every baseline are
    trained on exactly those cells and scored on exactly those test cells. The protocol is described
    in :mod:`langcell.fewshot`. ``model`` is never changed: each run tunes a fresh copy.

    Parameters
    ----------
    adata
        Cells with **raw counts** (in ``X``, or the layer ``counts_layer``).
    model
        A :class:`~langcell.models.langcell.LangCell` with its gene tokenizer.
    label_key
        obs column with the true cell types. Missing values (NaN, "") mark unlabelled cells, which
        take no part.
    shots
        Training cells per class, each a positive integer (the paper: 1, 3, 5, 10).
    repeats
        Random splits per ``n`` (results are reported per repeat; plot their mean and spread with
        :func:`langcell.pl.fewshot_curves`). For one repeat, a smaller ``n``'s training cells are a
        subset of a larger ``n``'s.
    labels
        ``None``: every class of ``obs[label_key]``, its text from the Cell Ontology
        (:func:`langcell.ontology.label_texts`, as :func:`langcell.tl.annotate` resolves labels). A
        list: only these classes (cells of other classes are left out), resolved the same way. A dict
        ``{label: description}``: these classes with these texts.
    mapping
        ``{label: term id}`` (or a JSON/TSV path) for labels the resolver cannot place.
    min_test
        Test cells every class must keep: each class needs ``max(shots) + min_test`` labelled cells
        (else a :class:`LangCellError` names the class and its size).
    epochs
        Passes over the training cells when tuning LangCell.
    lr
        Peak learning rate of the cell encoder, the cross-attention and the heads.
    text_lr
        Peak learning rate of the text tower's self-attention and feed-forward weights.
    tau
        Temperature of the similarity cross-entropy (0.05, the release's zero-shot temperature).
    alpha, mode, top_k
        How the tuned model annotates the test cells, as in :func:`langcell.tl.annotate`: weight of
        the similarity score (0.1 in the release), ``"fast"`` (matching for each cell's ``top_k``
        classes by similarity) or ``"official"`` (matching for every class).
    weight_decay, warmup_fraction, max_grad_norm
        AdamW weight decay, share of the steps warming up, gradient clipping (0 turns it off).
    baselines
        Any of ``"logistic_regression"`` and ``"knn"``; ``()`` runs LangCell alone.
    n_pcs
        Principal components of the kNN features (capped by the number of labelled cells and genes).
    n_neighbors
        Neighbours of the kNN vote. ``None``: ``min(5, n)`` at ``n`` shots, never more neighbours than
        training cells per class (1-shot is the nearest-neighbour rule). An integer is capped at the
        number of training cells.
    seed
        Seeds the splits, the tuning (batch order, dropout) and the baselines; the global torch random
        state is left as it was.
    counts_layer, gene_column, n_counts_key
        Where the counts, gene names and per-cell totals are (see :meth:`GeneTokenizer.encode`); the
        baselines read the same counts and totals.
    max_tokens, max_batch_size, max_pair_tokens
        Cell tokens per batch, cells per tuning step, text tokens per matching pass.
    max_length
        Longest cell in tokens, ``<cls>`` included (default and cap: the cell encoder's positions).
    match_classes
        ``None`` (the paper's protocol): the matching loss covers every class. An integer m: the own
        class and the m - 1 most similar others per cell (:func:`fewshot_loss`), which makes each
        tuning step's multimodal pass K / m times smaller.
    progress
        Show progress bars.
    key_added
        The uns key of the results.
    copy
        Store the results in a copy of ``adata`` instead of ``adata``.

    Returns
    -------
    pandas.DataFrame or tuple
        The results, one row per (method, shots, repeat) with the columns ``method``
        (``"langcell"``, ``"logistic_regression"``, ``"knn"``), ``shots``, ``repeat``, ``accuracy``,
        ``macro_f1``, ``n_train`` and ``n_test``; ``(results, annotated_copy)`` when ``copy=True``.
        The field written is ``uns[key_added]``, a dict of:

        ``"params"``
            the settings (label_key, shots, repeats, epochs, lr, text_lr, tau, alpha, mode, top_k,
            match_classes, weight_decay, warmup_fraction, max_grad_norm, max_batch_size, baselines, n_pcs used, n_neighbors,
            min_test, seed, counts_layer, gene_column, max_length, n_classes).
        ``"results"``
            the results table as ``{column: list}``.
        ``"classes"``, ``"texts"``
            the class names and the text of each.
        ``"train_cells"``
            ``{"<n>_shots_repeat_<r>": obs names of that run's training cells}``; its test cells are
            the other labelled cells of the classes.
        ``"train_loss"``
            ``{"shots", "repeat", "loss"}``: for every LangCell run, its mean training loss per epoch
            (``loss`` is runs x epochs).

    Raises
    ------
    LangCellError
        Before anything is computed or written: for a missing ``label_key``, fewer than two classes,
        labels not in the column, a class too small for ``max(shots) + min_test``, bad shots (not
        positive integers, repeated), a bad setting, an unknown baseline, a model without a gene
        tokenizer, or counts that are not raw counts.
    """
    check_anndata(adata)
    check_key_added(key_added)
    shots = _check_shots(shots)
    repeats = check_positive_int(repeats, "repeats")
    epochs = check_positive_int(epochs, "epochs")
    min_test = check_positive_int(min_test, "min_test")
    _check_rates(lr=lr, text_lr=text_lr, tau=tau)
    alpha = check_alpha(alpha)
    if mode not in MODES:
        raise LangCellError(f"mode must be one of {MODES}, got {mode!r}; 'fast' is the default")
    if not (weight_decay >= 0 and max_grad_norm >= 0):
        raise LangCellError("weight_decay and max_grad_norm must be >= 0 (0 turns them off)")
    if not 0 <= warmup_fraction < 1:
        raise LangCellError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    baselines = _check_baselines(baselines)
    n_pcs = check_positive_int(n_pcs, "n_pcs")
    if n_neighbors is not None:
        n_neighbors = check_positive_int(n_neighbors, "n_neighbors")
    for name, value in (("max_tokens", max_tokens), ("max_batch_size", max_batch_size),
                        ("max_pair_tokens", max_pair_tokens)):
        check_positive_int(value, name)
    tokenizer = gene_tokenizer_of(model)
    max_length = check_max_length(max_length, model.config.cell.max_position_embeddings)

    classes, codes, descriptions = _classes_and_codes(adata, label_key, labels)
    top_k = check_top_k(top_k, len(classes))
    match_classes = check_match_classes(match_classes, len(classes))
    # Every class must be large enough for the largest n before any work starts.
    sample_shots(codes, max(shots), seed=seed, min_test=min_test, class_names=classes)
    from . import ontology

    text_of, _ = ontology.label_texts(classes, descriptions=descriptions, mapping=mapping)
    texts = [text_of[name] for name in classes]

    cells = tokenizer.encode(
        adata, gene_column=gene_column, counts_layer=counts_layer, n_counts_key=n_counts_key,
        max_length=max_length, progress=progress,
    )
    sequences = as_sequences(cells)
    labelled = np.flatnonzero(codes >= 0)
    features = pcs = None
    n_pcs_used = None
    if baselines:
        from .demo import log_normalised_features

        features = log_normalised_features(adata, counts_layer=counts_layer, n_counts_key=n_counts_key)
        if "knn" in baselines:
            pcs, n_pcs_used = _principal_components(features, labelled, n_pcs, seed)

    tuning = dict(
        epochs=epochs, lr=lr, text_lr=text_lr, tau=tau, weight_decay=weight_decay,
        warmup_fraction=warmup_fraction, max_grad_norm=max_grad_norm, max_tokens=max_tokens,
        max_batch_size=max_batch_size, max_pair_tokens=max_pair_tokens, max_length=max_length,
        match_classes=match_classes,
    )
    scoring = dict(
        alpha=alpha, top_k=top_k, mode=mode, max_tokens=max_tokens, max_pair_tokens=max_pair_tokens
    )
    records: list[dict[str, Any]] = []
    train_cells: dict[str, list[str]] = {}
    train_loss: dict[str, list] = {"shots": [], "repeat": [], "loss": []}
    obs_names = np.asarray(adata.obs_names, dtype=object)
    bar = progress_bar(len(shots) * repeats, progress, "few-shot runs", "run")
    try:
        for repeat in range(repeats):
            split_seed = _run_seed(seed, repeat)
            for n in shots:
                train, test = sample_shots(codes, n, seed=split_seed, min_test=min_test, class_names=classes)
                train_cells[f"{n}_shots_repeat_{repeat}"] = [str(name) for name in obs_names[train]]
                predictions, losses = _langcell_predictions(
                    model, sequences, codes, train, test, texts, classes,
                    {**tuning, "seed": _run_seed(seed, repeat, n)}, scoring,
                )
                train_loss["shots"].append(int(n))
                train_loss["repeat"].append(int(repeat))
                train_loss["loss"].append([float(v) for v in losses])
                if "logistic_regression" in baselines:
                    from .demo import logistic_regression_predict

                    predictions["logistic_regression"] = logistic_regression_predict(
                        features[train], codes[train], features[test], seed
                    )
                if "knn" in baselines:
                    predictions["knn"] = _knn_predict(pcs, codes, train, test, n, n_neighbors)
                for method, predicted in predictions.items():
                    metrics = classification_metrics(codes[test], np.asarray(predicted), len(classes))
                    records.append({
                        "method": method, "shots": int(n), "repeat": int(repeat),
                        "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                        "n_train": int(train.size), "n_test": int(test.size),
                    })
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    results = pd.DataFrame.from_records(records, columns=list(RESULT_COLUMNS))
    adata = adata.copy() if copy else adata
    adata.uns[key_added] = {
        "params": {
            "label_key": label_key,
            "shots": [int(n) for n in shots],
            "repeats": int(repeats),
            "epochs": int(epochs),
            "lr": float(lr),
            "text_lr": float(text_lr),
            "tau": float(tau),
            "alpha": float(alpha),
            "mode": mode,
            "top_k": int(top_k) if mode == "fast" else len(classes),
            "match_classes": len(classes) if match_classes is None else int(match_classes),
            "weight_decay": float(weight_decay),
            "warmup_fraction": float(warmup_fraction),
            "max_grad_norm": float(max_grad_norm),
            "max_batch_size": int(max_batch_size),
            "baselines": list(baselines),
            "n_pcs": n_pcs_used,
            "n_neighbors": n_neighbors,
            "min_test": int(min_test),
            "seed": int(seed),
            "counts_layer": counts_layer,
            "gene_column": gene_column,
            "max_length": int(max_length),
            "n_classes": len(classes),
        },
        "results": {column: results[column].tolist() for column in RESULT_COLUMNS},
        "classes": list(classes),
        "texts": list(texts),
        "train_cells": train_cells,
        "train_loss": train_loss,
    }
    return (results, adata) if copy else results


# --------------------------------------------------------------------------------------------------
# One run of each method
# --------------------------------------------------------------------------------------------------


def _langcell_predictions(
    model, sequences, codes, train, test, texts, classes, tuning: dict, scoring: dict
) -> tuple[dict[str, np.ndarray], list[float]]:
    """Tune a copy of ``model`` on the training cells; annotate the test cells as zero-shot does."""
    tuned, losses = tune_langcell(model, [sequences[i] for i in train], codes[train], texts, **tuning)
    # Annotation in eval mode is deterministic: no seeding needed.
    class_texts = encode_class_texts(tuned, texts, classes)
    scores = zero_shot_scores(tuned, [sequences[i] for i in test], class_texts, **scoring)
    return {"langcell": scores.predicted}, losses


def _principal_components(features: np.ndarray, labelled: np.ndarray, n_pcs: int, seed: int):
    """PCA of the labelled cells' features (no labels used), as scanpy's ``tl.pca`` would (ARPACK)."""
    from sklearn.decomposition import PCA

    n_components = min(n_pcs, labelled.size - 1, features.shape[1] - 1)
    if n_components < 1:
        raise LangCellError(
            f"too few labelled cells ({labelled.size}) or genes ({features.shape[1]}) for a PCA; "
            "pass baselines=('logistic_regression',) or more data"
        )
    pcs = np.zeros((features.shape[0], n_components))
    pcs[labelled] = PCA(n_components=n_components, svd_solver="arpack", random_state=seed).fit_transform(
        features[labelled]
    )
    return pcs, int(n_components)


def _knn_predict(pcs, codes, train, test, n_per_class: int, n_neighbors: int | None) -> np.ndarray:
    from sklearn.neighbors import KNeighborsClassifier

    k = min(5, n_per_class) if n_neighbors is None else min(n_neighbors, train.size)
    return KNeighborsClassifier(n_neighbors=k).fit(pcs[train], codes[train]).predict(pcs[test])


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _check_shots(shots: Any) -> list[int]:
    if isinstance(shots, int | np.integer) and not isinstance(shots, bool):
        shots = [shots]
    if isinstance(shots, str) or not isinstance(shots, Sequence | np.ndarray) or len(shots) == 0:
        raise LangCellError(
            f"shots must be a list of positive integers (cells per class), got {shots!r}; e.g. (1, 3, 5, 10)"
        )
    values = []
    for value in shots:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise LangCellError(
                f"shots must be positive integers (training cells per class), got {value!r} in "
                f"{list(shots)!r}"
            )
        values.append(int(value))
    if len(set(values)) != len(values):
        raise LangCellError(f"shots repeat a value: {values}; give each number of cells per class once")
    return values


def _check_rates(**values: Any) -> None:
    for name, value in values.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and value > 0 and math.isfinite(value)):
            raise LangCellError(f"{name} must be a positive number, got {value!r}")


def _check_baselines(baselines: Any) -> list[str]:
    if isinstance(baselines, str):
        baselines = [baselines]
    names = list(baselines)
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise LangCellError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)} (or () for none)")
    if len(set(names)) != len(names):
        raise LangCellError(f"baselines repeat a name: {names}; give each once")
    return names


def _classes_and_codes(
    adata: Any, label_key: str, labels: Any
) -> tuple[list[str], np.ndarray, dict[str, str] | None]:
    """The classes, every cell's code (-1: not used) and the user's descriptions, if any."""
    from .tl import _check_names

    present, codes = label_codes(adata, label_key)
    if labels is None:
        return present, codes, None
    if isinstance(labels, str):
        raise LangCellError("labels must be a list of class names, not one string; wrap it: [label]")
    descriptions = dict(labels) if isinstance(labels, Mapping) else None
    names = list(labels)
    _check_names(names)
    missing = [name for name in names if name not in present]
    if missing:
        raise LangCellError(
            f"labels {missing[:5]!r} do not occur in obs[{label_key!r}] (it holds {present[:10]!r}); "
            "pass classes of that column"
        )
    if len(names) < 2:
        raise LangCellError(f"few-shot annotation needs at least two classes, got {names!r}")
    selected = np.full(codes.shape, -1, dtype=np.int64)
    for code, name in enumerate(names):
        selected[codes == present.index(name)] = code
    return names, selected, descriptions

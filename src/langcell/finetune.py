"""LangCell-CE: the LangCell cell encoder with a linear cell-type classifier, fine-tuned on labelled cells.

The paper's LangCell-CE puts a classifier on the cell encoder and trains it with cross-entropy on a
labelled two thirds of a dataset, then reports accuracy and macro-F1 on the held-out third. Here:

:class:`CellTypeClassifier`
    A copy of a LangCell cell encoder plus ``nn.Linear(hidden, n_classes)`` on a pooled cell state
    (``pooling="cls"``: the ``<cls>`` state, which LangCell trains as the cell's summary; ``"mean"``:
    the mean over the cell's real tokens, ``<cls>`` included). The class names, the gene tokenizer and
    the encoder's sizes travel with it; :meth:`~CellTypeClassifier.save` / :meth:`~CellTypeClassifier.load`
    write and read one directory.
:func:`finetune`
    AnnData in: a stratified, seeded split of the labelled cells, then either a *linear probe* (the
    encoder frozen: every cell is encoded once and only the head learns, which is fast) or *full*
    fine-tuning (the head and the encoder learn together, the encoder at a smaller learning rate).
    Predictions, the split and the metrics go back into the AnnData.
:func:`predict`
    A trained classifier applied to new cells.

The pure helpers :func:`stratified_split` and :func:`classification_metrics` take numpy arrays only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_anndata as _check_anndata
from ._checks import check_fraction, check_max_length, check_positive_int
from ._checks import check_key_added as _check_key
from ._checks import gene_tokenizer_of as _gene_tokenizer
from ._labels import label_codes
from ._progress import progress_bar
from .data.batching import as_sequences, pad_sequences, token_budget_batches
from .errors import LangCellError
from .models.classifier import DEFAULT_MAX_TOKENS, POOLINGS, CellTypeClassifier
from .train.optim import param_groups, warmup_cosine_schedule

__all__ = [
    "CellTypeClassifier",
    "classification_metrics",
    "finetune",
    "full_finetuning_epochs",
    "predict",
    "stratified_split",
]

MODES = ("full", "linear")
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
#: Names written to ``obs[key_added + "_split"]``.
SPLIT_NAMES = ("train", "test", "unlabelled")


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Pure helpers: split and metrics
# --------------------------------------------------------------------------------------------------


def stratified_split(
    codes: np.ndarray, train_fraction: float = 2 / 3, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split labelled items into train and test so that every class keeps its share in both.

    Class ``c`` with ``n_c`` items gives ``round(n_c * train_fraction)`` of them, clamped to
    ``[1, n_c - 1]``, to the training set (so each class is seen in training and tested), drawn at
    random; the classes are visited in increasing code order with one ``numpy.random.default_rng(seed)``.

    Parameters
    ----------
    codes
        Integer class code of every item; negative codes mark unlabelled items, left out of both sets.
    train_fraction
        Share of each class that goes to training, in (0, 1).
    seed
        The same seed gives the same split.

    Returns
    -------
    train, test : numpy.ndarray
        Sorted ``int64`` indices into ``codes``.

    Raises
    ------
    LangCellError
        If ``train_fraction`` is outside (0, 1) or a class has fewer than two items.
    """
    codes = np.asarray(codes)
    if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer):
        raise LangCellError("codes must be a 1-D integer array (one class code per item, -1 = unlabelled)")
    check_fraction(train_fraction)
    rng = np.random.default_rng(seed)
    train, test = [], []
    classes, counts = np.unique(codes[codes >= 0], return_counts=True)
    too_small = classes[counts < 2]
    if too_small.size:
        raise LangCellError(
            f"classes {too_small.tolist()} have fewer than 2 items, too few for a train/test split; "
            "drop them or merge them with another class"
        )
    for code, count in zip(classes, counts, strict=True):
        members = rng.permutation(np.flatnonzero(codes == code))
        n_train = min(max(int(round(count * train_fraction)), 1), int(count) - 1)
        train.append(members[:n_train])
        test.append(members[n_train:])
    if not train:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(test)).astype(np.int64)


def classification_metrics(true_codes: np.ndarray, predicted_codes: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class F1 of integer predictions.

    Per class ``c``: ``F1 = 2 TP / (2 TP + FP + FN)`` (0 when the class is present but never
    predicted correctly). Macro-F1 is the unweighted mean of F1 over the classes present in the true
    **or** predicted codes, as scikit-learn's ``f1_score(average="macro")`` computes it.

    Parameters
    ----------
    true_codes, predicted_codes
        Integer class codes in ``[0, n_classes)``, same length (at least 1).
    n_classes
        Number of classes (the length of ``f1_per_class``).

    Returns
    -------
    dict
        ``accuracy`` (float), ``macro_f1`` (float) and ``f1_per_class`` (list of ``n_classes`` floats;
        NaN for a class absent from both arrays).
    """
    true_codes = np.asarray(true_codes, dtype=np.int64)
    predicted_codes = np.asarray(predicted_codes, dtype=np.int64)
    if true_codes.shape != predicted_codes.shape or true_codes.ndim != 1 or true_codes.size == 0:
        raise LangCellError("true and predicted codes must be 1-D arrays of the same, non-zero length")
    for codes in (true_codes, predicted_codes):
        if codes.min() < 0 or codes.max() >= n_classes:
            raise LangCellError(f"class codes must lie in [0, {n_classes}); got {codes.min()}..{codes.max()}")
    true_positive = np.bincount(true_codes[true_codes == predicted_codes], minlength=n_classes)
    n_true = np.bincount(true_codes, minlength=n_classes)
    n_predicted = np.bincount(predicted_codes, minlength=n_classes)
    present = (n_true + n_predicted) > 0
    f1 = np.full(n_classes, np.nan)
    f1[present] = 2.0 * true_positive[present] / (n_true[present] + n_predicted[present])
    return {
        "accuracy": float(np.mean(true_codes == predicted_codes)),
        "macro_f1": float(np.mean(f1[present])),
        "f1_per_class": [float(v) for v in f1],
    }


# --------------------------------------------------------------------------------------------------
# AnnData layer
# --------------------------------------------------------------------------------------------------


def finetune(
    adata: Any,
    model: Any,
    label_key: str,
    *,
    mode: str = "full",
    train_fraction: float = 2 / 3,
    epochs: int | None = None,
    lr: float = 1e-3,
    encoder_lr: float = 5e-5,
    weight_decay: float = 0.01,
    batch_size: int = 256,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch_size: int = 64,
    max_length: int | None = None,
    pooling: str = "cls",
    warmup_fraction: float = 0.1,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    counts_layer: str | None = None,
    gene_column: str | None = None,
    n_counts_key: str | None = "n_counts",
    progress: bool = False,
    key_added: str = "langcell_ce",
    copy: bool = False,
):
    """LangCell-CE: train a cell-type classifier on the cell encoder and test it on held-out cells.

    The labelled cells are split by :func:`stratified_split` (``train_fraction`` of every class for
    training, the rest for testing; seeded). The classifier (:class:`CellTypeClassifier`) starts from a
    copy of ``model``'s cell encoder, so ``model`` itself is never changed. Training minimises the
    cross-entropy with AdamW (no decay on biases and LayerNorms), a linear warm-up over
    ``warmup_fraction`` of the steps and a cosine decay to 0, and gradient clipping.

    ``mode="linear"`` (linear probe)
        The encoder is frozen: every cell is encoded once (pooled states), then only the head learns,
        on shuffled mini-batches of ``batch_size`` cells, at ``lr``. Fast. The head is trained on
        features standardised with the training cells' mean and standard deviation (the usual probe
        recipe), which is then folded into its weights, so the returned classifier reads raw states.
    ``mode="full"`` (full fine-tuning, the paper's LangCell-CE)
        The head (at ``lr``) and the encoder (at ``encoder_lr``) learn together; cells are batched by
        length under ``max_tokens`` and reshuffled every epoch; dropout is active.

    Parameters
    ----------
    adata
        Cells with **raw counts** (in ``X``, or the layer ``counts_layer``).
    model
        A :class:`~langcell.models.langcell.LangCell` with its gene tokenizer.
    label_key
        The obs column with the cell-type labels. Missing values (NaN, "") mark unlabelled cells: they
        are neither trained on nor scored, but they get predictions.
    mode
        ``"full"`` or ``"linear"`` (see above).
    train_fraction
        Share of every class used for training, in (0, 1); the paper's split is 2/3.
    epochs
        Passes over the training cells. Default: 100 for the linear probe; for full fine-tuning, 3, or
        more on a small training set so that training makes at least 200 optimiser steps, and at most
        100 (:func:`full_finetuning_epochs`). The number used is stored in ``uns[key_added]["params"]``.
    lr
        Peak learning rate of the head.
    encoder_lr
        Peak learning rate of the encoder (``mode="full"`` only).
    weight_decay
        AdamW weight decay on the weight matrices.
    batch_size
        Cells per step of the linear probe.
    max_tokens, max_batch_size
        Full fine-tuning: token budget (batch size x padded length) and cap on cells of one step; also
        the budget of every inference pass.
    max_length
        Longest cell in tokens, ``<cls>`` included (default and cap: the encoder's positions).
    pooling
        ``"cls"`` or ``"mean"``: what the head reads (see :class:`CellTypeClassifier`).
    warmup_fraction
        Share of the steps spent warming the learning rate up, in [0, 1).
    max_grad_norm
        Gradient clipping (global L2 norm); 0 turns it off.
    seed
        Seeds the split, the head's initialisation, the batch order and dropout; the global torch
        random state is left as it was.
    counts_layer, gene_column, n_counts_key
        Where the counts, gene names and per-cell totals are (see :meth:`GeneTokenizer.encode`).
    progress
        Show progress bars.
    key_added
        Prefix of the fields written (see Returns); existing fields of those names are overwritten.
    copy
        Annotate a copy instead of ``adata``.

    Returns
    -------
    tuple
        ``(classifier, metrics)``, or ``(classifier, metrics, annotated_copy)`` when ``copy=True``.
        ``classifier`` is the trained :class:`CellTypeClassifier` (eval mode); ``metrics`` is the dict
        stored in ``uns[key_added]["metrics"]``. The fields written are:

        ``obs[key_added]``
            categorical: the predicted class of every test and unlabelled cell; NaN for training cells
            (so that no one scores the classifier on its own training data by accident).
        ``obs[key_added + "_split"]``
            categorical ``"train"`` / ``"test"`` / ``"unlabelled"``.
        ``obs[key_added + "_score"]``
            float: the predicted class's probability; NaN for training cells.
        ``obsm[key_added + "_probs"]``
            ``float32 [n_cells, n_classes]``: class probabilities (columns in the order of
            ``uns[key_added]["classes"]``); NaN rows for training cells.
        ``uns[key_added]``
            ``"params"`` (the settings, with the epochs used and ``n_classes``), ``"classes"`` (class
            names) and ``"metrics"``: ``accuracy``, ``macro_f1`` and ``f1_per_class`` on the test cells
            (:func:`classification_metrics`), ``n_train``, ``n_test``, ``n_unlabelled``,
            ``n_steps`` (optimiser steps) and ``train_loss`` (the mean training cross-entropy of each epoch).

    Raises
    ------
    LangCellError
        For a missing ``label_key``, fewer than two classes, a class with fewer than two cells (named),
        a bad setting, a model without a gene tokenizer, or counts that are not raw counts.
    """
    _check_anndata(adata)
    if mode not in MODES:
        raise LangCellError(f"mode must be one of {MODES}, got {mode!r}; 'linear' is the fast linear probe")
    if pooling not in POOLINGS:
        raise LangCellError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    check_fraction(train_fraction)
    if epochs is not None:
        epochs = check_positive_int(epochs, "epochs")
    elif mode == "linear":
        epochs = LINEAR_EPOCHS
    for name, value in (("lr", lr), ("encoder_lr", encoder_lr)):
        if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
            raise LangCellError(f"{name} must be a positive number, got {value!r}")
    if not (weight_decay >= 0 and max_grad_norm >= 0):
        raise LangCellError("weight_decay and max_grad_norm must be >= 0 (0 turns them off)")
    if not 0 <= warmup_fraction < 1:
        raise LangCellError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens), ("max_batch_size", max_batch_size)):
        check_positive_int(value, name)
    _check_key(key_added)
    tokenizer = _gene_tokenizer(model)
    max_length = check_max_length(max_length, model.config.cell.max_position_embeddings)

    classes, codes = label_codes(adata, label_key)
    try:
        train, test = stratified_split(codes, train_fraction, seed=seed)
    except LangCellError:
        counts = pd.Series(codes[codes >= 0]).value_counts()
        small = [f"{classes[c]!r} ({n} cell{'s' if n != 1 else ''})" for c, n in counts.items() if n < 2]
        raise LangCellError(
            f"obs[{label_key!r}] has classes with fewer than 2 cells, too few for a stratified train/test "
            f"split: {', '.join(small)}; drop those cells or merge the classes"
        ) from None
    cells = tokenizer.encode(
        adata, gene_column=gene_column, counts_layer=counts_layer, n_counts_key=n_counts_key,
        max_length=max_length, progress=progress,
    )
    sequences = as_sequences(cells)
    held_out = np.setdiff1d(np.arange(len(sequences)), train)  # test and unlabelled cells

    with _seeded(seed, _model_device(model)):
        classifier = CellTypeClassifier.from_langcell(model, classes, pooling=pooling)
        if mode == "linear":
            train_loss, held_out_logits, n_steps = _train_linear(
                classifier, sequences, codes, train, held_out, epochs=epochs, lr=lr, weight_decay=weight_decay,
                batch_size=batch_size, max_tokens=max_tokens, max_length=max_length,
                warmup_fraction=warmup_fraction, max_grad_norm=max_grad_norm, seed=seed, progress=progress,
            )
        else:
            train_loss, epochs, n_steps = _train_full(
                classifier, sequences, codes, train, epochs=epochs, lr=lr, encoder_lr=encoder_lr,
                weight_decay=weight_decay, max_tokens=max_tokens, max_batch_size=max_batch_size,
                max_length=max_length, warmup_fraction=warmup_fraction, max_grad_norm=max_grad_norm,
                seed=seed, progress=progress,
            )
            held_out_logits = classifier.predict_logits(
                [sequences[i] for i in held_out], max_tokens=max_tokens, max_length=max_length, progress=progress
            )
    classifier.eval()

    probabilities = np.full((len(sequences), len(classes)), np.nan, dtype=np.float32)
    probabilities[held_out] = _softmax(held_out_logits)
    predicted = np.full(len(sequences), -1, dtype=np.int64)
    predicted[held_out] = probabilities[held_out].argmax(axis=1)
    metrics = classification_metrics(codes[test], predicted[test], len(classes))
    metrics.update(
        n_train=int(train.size),
        n_test=int(test.size),
        n_unlabelled=int(np.sum(codes < 0)),
        n_steps=int(n_steps),
        train_loss=[float(v) for v in train_loss],
    )
    split = np.full(len(sequences), SPLIT_NAMES[2], dtype=object)
    split[train] = SPLIT_NAMES[0]
    split[test] = SPLIT_NAMES[1]

    adata = adata.copy() if copy else adata
    adata.obs[key_added] = pd.Categorical.from_codes(predicted, categories=list(classes))
    adata.obs[key_added + "_split"] = pd.Categorical(split, categories=list(SPLIT_NAMES))
    score = np.full(len(sequences), np.nan)
    score[held_out] = probabilities[held_out].max(axis=1)
    adata.obs[key_added + "_score"] = score
    adata.obsm[key_added + "_probs"] = probabilities
    adata.uns[key_added] = {
        "params": {
            "label_key": label_key,
            "mode": mode,
            "pooling": pooling,
            "train_fraction": float(train_fraction),
            "epochs": int(epochs),
            "lr": float(lr),
            "encoder_lr": float(encoder_lr),
            "weight_decay": float(weight_decay),
            "batch_size": int(batch_size),
            "max_tokens": int(max_tokens),
            "max_batch_size": int(max_batch_size),
            "max_length": int(max_length),
            "warmup_fraction": float(warmup_fraction),
            "max_grad_norm": float(max_grad_norm),
            "seed": int(seed),
            "counts_layer": counts_layer,
            "gene_column": gene_column,
            "n_classes": len(classes),
        },
        "classes": list(classes),
        "metrics": metrics,
    }
    return (classifier, metrics, adata) if copy else (classifier, metrics)


def predict(
    adata: Any,
    classifier: CellTypeClassifier,
    *,
    counts_layer: str | None = None,
    gene_column: str | None = None,
    n_counts_key: str | None = "n_counts",
    max_length: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: bool = False,
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
    counts_layer, gene_column, n_counts_key
        Where the counts, gene names and per-cell totals are (see :meth:`GeneTokenizer.encode`).
    max_length
        Longest cell in tokens (default and cap: the encoder's positions).
    max_tokens
        Token budget of one forward pass.
    progress
        Show progress bars.
    key_added
        Prefix of the fields written; existing fields of those names are overwritten.
    copy
        Return an annotated copy instead of writing into ``adata``.

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
    probabilities = _softmax(
        classifier.predict_logits(cells, max_tokens=max_tokens, max_length=max_length, progress=progress)
    )
    best = probabilities.argmax(axis=1)
    adata = adata.copy() if copy else adata
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


# --------------------------------------------------------------------------------------------------
# Training loops
# --------------------------------------------------------------------------------------------------


def _train_linear(
    classifier, sequences, codes, train, held_out, *, epochs, lr, weight_decay, batch_size, max_tokens,
    max_length, warmup_fraction, max_grad_norm, seed, progress,
) -> tuple[list[float], np.ndarray, int]:
    """Linear probe: encode every cell once with the frozen encoder, then fit the head alone.

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
    features = ((features - mean) / std).astype(np.float32)
    x_train = torch.from_numpy(features[train]).to(device)
    y_train = torch.from_numpy(codes[train]).to(device)
    steps_per_epoch = math.ceil(train.size / batch_size)
    optimizer = torch.optim.AdamW(param_groups(classifier.head, lr, 1.0, weight_decay))
    total = epochs * steps_per_epoch
    scheduler = warmup_cosine_schedule(optimizer, int(warmup_fraction * total), total, 0.0)
    generator = torch.Generator().manual_seed(seed)
    bar = progress_bar(epochs, progress, "linear probe", "epoch")
    losses = []
    classifier.head.train()
    for _ in range(epochs):
        order = torch.randperm(train.size, generator=generator).to(device)
        loss_sum = 0.0
        for start in range(0, train.size, batch_size):
            rows = order[start : start + batch_size]
            loss = F.cross_entropy(classifier.head(x_train[rows]), y_train[rows])
            _step(loss, optimizer, scheduler, list(classifier.head.parameters()), max_grad_norm)
            loss_sum += float(loss.detach()) * rows.numel()
        losses.append(loss_sum / train.size)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    for param in classifier.cell_encoder.parameters():
        param.requires_grad = True
    with torch.inference_mode():
        held_out_logits = classifier.head(torch.from_numpy(features[held_out]).to(device)).float().cpu().numpy()
    _fold_standardisation(classifier.head, mean, std)
    return losses, held_out_logits, total


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


def _train_full(
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
    optimizer = torch.optim.AdamW(
        param_groups(classifier.cell_encoder, encoder_lr, 1.0, weight_decay)
        + param_groups(classifier.head, lr, 1.0, weight_decay)
    )
    scheduler = warmup_cosine_schedule(optimizer, int(warmup_fraction * total), total, 0.0)
    parameters = list(classifier.parameters())
    pad_id = classifier.config.pad_token_id
    bar = progress_bar(total, progress, "fine-tune", "step")
    losses = []
    classifier.train()
    for batches in epoch_batches:
        loss_sum = 0.0
        for rows in batches:
            ids, mask = pad_sequences([sequences[i] for i in rows], pad_id, max_length)
            labels = torch.from_numpy(codes[rows]).to(classifier.device)
            loss = F.cross_entropy(classifier(torch.from_numpy(ids), torch.from_numpy(mask)), labels)
            _step(loss, optimizer, scheduler, parameters, max_grad_norm)
            loss_sum += float(loss.detach()) * len(rows)
            if bar is not None:
                bar.update(1)
        losses.append(loss_sum / train.size)
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    classifier.eval()
    return losses, epochs, total


def _step(loss, optimizer, scheduler, parameters, max_grad_norm: float) -> None:
    if not torch.isfinite(loss.detach()):
        raise LangCellError(
            f"the training loss became non-finite ({float(loss.detach())}); lower lr / encoder_lr"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    scheduler.step()


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch inside the block and restore the caller's random state afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted.astype(np.float64))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)



"""``tl.finetune``: LangCell-CE on AnnData, the paper's fine-tuned annotation.

The paper's LangCell-CE puts a classifier on the cell encoder and trains it with cross-entropy on a
labelled two thirds of a dataset, then reports accuracy and macro-F1 on the held-out third. Here a
stratified, seeded split of the labelled cells (:func:`langcell.data.splits.stratified_split`), then
either a *linear probe* (the encoder frozen: every cell is encoded once and only the head learns, which
is fast) or *full* fine-tuning (the head and the encoder learn together, the encoder at a smaller
learning rate), both in :mod:`langcell.train.finetune`. The classifier itself is
:class:`langcell.models.CellTypeClassifier`; predictions, the split and the metrics go back into the
AnnData, and :func:`langcell.tl.predict` applies the classifier to new cells.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .._checks import check_anndata as _check_anndata
from .._checks import check_fraction, check_max_length, check_positive_int, output_anndata
from .._checks import check_key_added as _check_key
from .._checks import gene_tokenizer_of as _gene_tokenizer
from .._docs import doc_params
from .._labels import label_codes
from ..data.batching import as_sequences
from ..data.splits import stratified_split
from ..errors import LangCellError
from ..inference.zero_shot import encode_class_texts
from ..metrics import classification_metrics, softmax
from ..models.classifier import DEFAULT_MAX_TOKENS, POOLINGS, CellTypeClassifier
from ..ontology.classes import class_texts
from ..train.finetune import LINEAR_EPOCHS, train_full, train_linear_probe
from ..train.optim import check_optimiser_settings
from ..train.supervised import model_device, seeded

__all__ = [
    "finetune",
]

MODES = ("full", "linear")
#: Starts of the linear probe's head: ``"random"`` or ``"text"`` (zero-shot similarity).
HEADS = ("random", "text")
#: Names written to ``obs[key_added + "_split"]``.
SPLIT_NAMES = ("train", "test", "unlabelled")
# --------------------------------------------------------------------------------------------------
# AnnData layer
# --------------------------------------------------------------------------------------------------


@doc_params
def finetune(
    adata: Any,
    model: Any,
    label_key: str,
    *,
    mode: str = "full",
    head: str = "random",
    mapping: Any = None,
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
    progress: bool = True,
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
    head
        ``mode="linear"``: ``"random"`` (default; the head starts at random and decays towards 0) or
        ``"text"``: the head starts at LangCell's zero-shot similarity to the class texts (the labels
        resolved as :func:`langcell.tl.annotate` resolves them; step 0 predicts what similarity
        predicts) and ``weight_decay`` pulls it back towards that start
        (:func:`langcell.train.finetune.text_initialised_head`). Needs ``pooling="cls"``.
    mapping
        ``head="text"``: ``{label: term id}`` (or a JSON/TSV path) for labels the resolver cannot place.
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
    {max_length}
    pooling
        ``"cls"`` or ``"mean"``: what the head reads (see :class:`CellTypeClassifier`).
    warmup_fraction
        Share of the steps spent warming the learning rate up, in [0, 1).
    max_grad_norm
        Gradient clipping (global L2 norm); 0 turns it off.
    seed
        Seeds the split, the head's initialisation, the batch order and dropout; the global torch
        random state is left as it was.
    {counts_options}
    {progress}
    key_added
        Prefix of the fields written (see Returns); existing fields of those names are overwritten.
    {copy}

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
    if head not in HEADS:
        raise LangCellError(f"head must be one of {HEADS}, got {head!r}")
    if head == "text" and (mode != "linear" or pooling != "cls"):
        raise LangCellError("head='text' needs mode='linear' and pooling='cls' (the states the similarity reads)")
    epochs = _check_settings(
        mode=mode, pooling=pooling, train_fraction=train_fraction, epochs=epochs, lr=lr, encoder_lr=encoder_lr,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, warmup_fraction=warmup_fraction,
        batch_size=batch_size, max_tokens=max_tokens, max_batch_size=max_batch_size,
    )
    _check_key(key_added)
    tokenizer = _gene_tokenizer(model)
    max_length = check_max_length(max_length, model.config.cell.max_position_embeddings)

    classes, codes, train, test = _split(adata, label_key, train_fraction, seed)
    anchor = None
    if head == "text":
        texts, _ = class_texts(classes, mapping=mapping)
        embeddings = encode_class_texts(model, texts, classes).embeddings
        anchor = (model.cell_proj, embeddings, float(model.logit_scale.detach().exp()))
    cells = tokenizer.encode(
        adata, gene_column=gene_column, counts_layer=counts_layer, n_counts_key=n_counts_key,
        max_length=max_length, progress=progress,
    )
    sequences = as_sequences(cells)
    held_out = np.setdiff1d(np.arange(len(sequences)), train)  # test and unlabelled cells

    with seeded(seed, model_device(model)):
        classifier = CellTypeClassifier.from_langcell(model, classes, pooling=pooling)
        if mode == "linear":
            train_loss, held_out_logits, n_steps = train_linear_probe(
                classifier, sequences, codes, train, held_out, epochs=epochs, lr=lr, weight_decay=weight_decay,
                batch_size=batch_size, max_tokens=max_tokens, max_length=max_length,
                warmup_fraction=warmup_fraction, max_grad_norm=max_grad_norm, seed=seed, progress=progress,
                anchor=anchor,
            )
        else:
            train_loss, epochs, n_steps = train_full(
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
    probabilities[held_out] = softmax(held_out_logits)
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

    adata = output_anndata(adata, copy)
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
            "head": head,
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


def _check_settings(
    *, mode, pooling, train_fraction, epochs, lr, encoder_lr, weight_decay, max_grad_norm, warmup_fraction,
    batch_size, max_tokens, max_batch_size,
) -> int | None:
    """Refuse bad settings before any work; the number of epochs (``None``: full fine-tuning chooses)."""
    if mode not in MODES:
        raise LangCellError(f"mode must be one of {MODES}, got {mode!r}; 'linear' is the fast linear probe")
    if pooling not in POOLINGS:
        raise LangCellError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    check_fraction(train_fraction)
    check_optimiser_settings(lr=lr, encoder_lr=encoder_lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                             warmup_fraction=warmup_fraction)
    for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens), ("max_batch_size", max_batch_size)):
        check_positive_int(value, name)
    if epochs is not None:
        return check_positive_int(epochs, "epochs")
    return LINEAR_EPOCHS if mode == "linear" else None


def _split(adata: Any, label_key: str, train_fraction: float, seed: int):
    """The classes, every cell's code, and the stratified train / test rows of the labelled cells."""
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
    return classes, codes, train, test

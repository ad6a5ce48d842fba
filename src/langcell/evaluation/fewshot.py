"""Few-shot cell-type annotation: LangCell's protocol next to expression baselines on the same cells.

The LangCell paper tunes the whole model on ``n`` labelled cells per class (n = 1, 3, 5, 10 ...) and
annotates the remaining cells. Here, for every ``n`` and every repeat:

1. :func:`langcell.data.splits.sample_shots` draws ``n`` training cells per class (seeded); every other labelled cell is a
   test cell. Every method sees exactly this split.
2. **LangCell** (:func:`langcell.train.fewshot.tune_langcell`): a copy of the model (the caller's model never changes) is
   tuned on the ``n x K`` training cells, *both* encoders and the heads, with
   ``CE(cos(cell, text_k) / tau) + CE(match score_k)`` over the K class texts (:func:`langcell.train.fewshot.fewshot_loss`);
   the class texts are encoded anew, with gradients, at every step. The test cells are then annotated
   exactly as zero-shot annotation does (:func:`langcell.inference.zero_shot.zero_shot_scores`: the alpha blend
   of the similarity and matching softmaxes) with the tuned model.
3. **Logistic regression** on log-normalised counts, standardised on the training cells
   (:func:`langcell.evaluation.baselines.logistic_regression_predict`, the demo's baseline).
4. **kNN** (scikit-learn ``KNeighborsClassifier``) on the principal components of the log-normalised
   counts.
5. Accuracy and macro-F1 of every method on the test cells (:func:`langcell.metrics.classification_metrics`).

:func:`fewshot` returns a tidy table (scanpy's ``inplace=`` rule); :func:`langcell.pl.fewshot_curves`
draws it.

The loss, and why the matching score is a log-odds, are described in :mod:`langcell.train.fewshot`.

The kNN features are transductive
---------------------------------
The principal components are fitted once on the log-normalised counts of all labelled cells,
training and test together, without their labels, as a scanpy user would run ``sc.tl.pca`` on the
whole dataset before classifying. No label of a test cell is used; their expression shapes the
components, as it shapes the (likewise label-free) pretraining of a foundation model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._checks import (
    check_anndata,
    check_key_added,
    check_max_length,
    check_positive_int,
    gene_tokenizer_of,
    listed,
)
from .._docs import doc_params
from .._labels import label_codes
from .._progress import progress_bar
from ..data.batching import as_sequences
from ..data.splits import run_seed, sample_shots
from ..errors import LangCellError
from ..inference.zero_shot import (
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
from ..metrics import classification_metrics
from ..ontology.classes import class_names, class_texts
from ..train.fewshot import (
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEXT_LR,
    check_match_classes,
    tune_langcell,
)
from ..train.optim import check_optimiser_settings
from .baselines import knn_predict, log_normalised_features, logistic_regression_predict, principal_components

__all__ = [
    "BASELINES",
    "DEFAULT_SHOTS",
    "RESULT_COLUMNS",
    "fewshot",
]

#: Training cells per class in the paper's few-shot experiments.
DEFAULT_SHOTS = (1, 3, 5, 10)
#: The expression baselines :func:`fewshot` can run next to LangCell.
BASELINES = ("logistic_regression", "knn")
#: Columns of the results table, in order.
RESULT_COLUMNS = ("method", "shots", "repeat", "accuracy", "macro_f1", "n_train", "n_test")
# --------------------------------------------------------------------------------------------------
# The AnnData layer
# --------------------------------------------------------------------------------------------------


@doc_params
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
    progress: bool = True,
    key_added: str = "langcell_fewshot",
    inplace: bool = False,
):
    """Few-shot annotation: LangCell tuned on n cells per class, next to baselines on the same split.

    For every ``n`` in ``shots`` and every repeat, :func:`sample_shots` draws ``n`` training cells of
    every class and keeps the other labelled cells for testing; LangCell and every baseline are
    trained on exactly those cells and scored on exactly those test cells. The protocol is described
    in :mod:`langcell.evaluation.fewshot`. ``model`` is never changed: each run tunes a fresh copy.

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
    {max_length}
    match_classes
        ``None`` (the paper's protocol): the matching loss covers every class. An integer m: the own
        class and the m - 1 most similar others per cell (:func:`fewshot_loss`), which makes each
        tuning step's multimodal pass K / m times smaller.
    {progress}
    {inplace}

    Returns
    -------
    pandas.DataFrame or None
        ``inplace=False``: the results, one row per (method, shots, repeat) with the columns ``method``
        (``"langcell"``, ``"logistic_regression"``, ``"knn"``), ``shots``, ``repeat``, ``accuracy``,
        ``macro_f1``, ``n_train`` and ``n_test``. ``inplace=True``: ``None``; the field
        written is ``uns[key_added]``, a dict of:

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
    alpha = check_alpha(alpha)
    _check_tuning(lr=lr, text_lr=text_lr, tau=tau, mode=mode, weight_decay=weight_decay,
                  max_grad_norm=max_grad_norm, warmup_fraction=warmup_fraction, max_tokens=max_tokens,
                  max_batch_size=max_batch_size, max_pair_tokens=max_pair_tokens)
    baselines = _check_baselines(baselines)
    n_pcs = check_positive_int(n_pcs, "n_pcs")
    if n_neighbors is not None:
        n_neighbors = check_positive_int(n_neighbors, "n_neighbors")
    tokenizer = gene_tokenizer_of(model)
    max_length = check_max_length(max_length, model.config.cell.max_position_embeddings)

    classes, codes, descriptions = _classes_and_codes(adata, label_key, labels)
    top_k = check_top_k(top_k, len(classes))
    match_classes = check_match_classes(match_classes, len(classes))
    # Every class must be large enough for the largest n before any work starts.
    sample_shots(codes, max(shots), seed=seed, min_test=min_test, class_names=classes)
    texts, _ = class_texts(classes, descriptions=descriptions, mapping=mapping)

    cells = tokenizer.encode(
        adata, gene_column=gene_column, counts_layer=counts_layer, n_counts_key=n_counts_key,
        max_length=max_length, progress=progress,
    )
    sequences = as_sequences(cells)
    labelled = np.flatnonzero(codes >= 0)
    features = pcs = None
    n_pcs_used = None
    if baselines:
        features = log_normalised_features(adata, counts_layer=counts_layer, n_counts_key=n_counts_key)
        if "knn" in baselines:
            pcs, n_pcs_used = principal_components(features, labelled, n_pcs, seed)

    tuning = dict(
        epochs=epochs, lr=lr, text_lr=text_lr, tau=tau, weight_decay=weight_decay,
        warmup_fraction=warmup_fraction, max_grad_norm=max_grad_norm, max_tokens=max_tokens,
        max_batch_size=max_batch_size, max_pair_tokens=max_pair_tokens, max_length=max_length,
        match_classes=match_classes,
    )
    scoring = dict(
        alpha=alpha, top_k=top_k, mode=mode, max_tokens=max_tokens, max_pair_tokens=max_pair_tokens
    )
    split = dict(codes=codes, classes=classes, shots=shots, repeats=repeats, seed=seed, min_test=min_test)
    baseline_inputs = dict(baselines=baselines, features=features, pcs=pcs, n_neighbors=n_neighbors)
    records, train_cells, train_loss = _run_protocol(
        model, sequences, texts, np.asarray(adata.obs_names, dtype=object), split, baseline_inputs, tuning,
        scoring, progress,
    )
    results = pd.DataFrame.from_records(records, columns=list(RESULT_COLUMNS))
    if not inplace:
        return results
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
    return None


# --------------------------------------------------------------------------------------------------
# One run of each method
# --------------------------------------------------------------------------------------------------


def _run_protocol(
    model: Any,
    sequences: list[np.ndarray],
    texts: list[str],
    obs_names: np.ndarray,
    split: dict[str, Any],
    baseline_inputs: dict[str, Any],
    tuning: dict[str, Any],
    scoring: dict[str, Any],
    progress: bool,
) -> tuple[list[dict[str, Any]], dict[str, list[str]], dict[str, list]]:
    """Every (repeat, n) run: draw the split, tune and score LangCell, run the baselines, score all.

    Returns the result records, each run's training cells and each run's LangCell training losses.
    """
    codes, classes, min_test = split["codes"], split["classes"], split["min_test"]
    shots, repeats, seed = split["shots"], split["repeats"], split["seed"]
    baselines, features = baseline_inputs["baselines"], baseline_inputs["features"]
    records: list[dict[str, Any]] = []
    train_cells: dict[str, list[str]] = {}
    train_loss: dict[str, list] = {"shots": [], "repeat": [], "loss": []}
    bar = progress_bar(len(shots) * repeats, progress, "few-shot runs", "run")
    try:
        for repeat in range(repeats):
            split_seed = run_seed(seed, repeat)
            for n in shots:
                train, test = sample_shots(codes, n, seed=split_seed, min_test=min_test, class_names=classes)
                train_cells[f"{n}_shots_repeat_{repeat}"] = [str(name) for name in obs_names[train]]
                predictions, losses = _langcell_predictions(
                    model, sequences, codes, train, test, texts, classes,
                    {**tuning, "seed": run_seed(seed, repeat, n)}, scoring,
                )
                train_loss["shots"].append(int(n))
                train_loss["repeat"].append(int(repeat))
                train_loss["loss"].append([float(v) for v in losses])
                if "logistic_regression" in baselines:
                    predictions["logistic_regression"] = logistic_regression_predict(
                        features[train], codes[train], features[test], seed
                    )
                if "knn" in baselines:
                    predictions["knn"] = knn_predict(baseline_inputs["pcs"], codes, train, test, n, baseline_inputs["n_neighbors"])
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

    return records, train_cells, train_loss


def _langcell_predictions(
    model, sequences, codes, train, test, texts, classes, tuning: dict, scoring: dict
) -> tuple[dict[str, np.ndarray], list[float]]:
    """Tune a copy of ``model`` on the training cells; annotate the test cells as zero-shot does."""
    tuned, losses = tune_langcell(model, [sequences[i] for i in train], codes[train], texts, **tuning)
    # Annotation in eval mode is deterministic: no seeding needed.
    class_texts = encode_class_texts(tuned, texts, classes)
    scores = zero_shot_scores(tuned, [sequences[i] for i in test], class_texts, **scoring)
    return {"langcell": scores.predicted}, losses


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


def _check_tuning(
    *, lr, text_lr, tau, mode, weight_decay, max_grad_norm, warmup_fraction, max_tokens, max_batch_size,
    max_pair_tokens,
) -> None:
    """Refuse tuning and scoring settings out of range, before any work."""
    check_optimiser_settings(lr=lr, text_lr=text_lr, tau=tau, weight_decay=weight_decay,
                             max_grad_norm=max_grad_norm, warmup_fraction=warmup_fraction)
    if mode not in MODES:
        raise LangCellError(f"mode must be one of {MODES}, got {mode!r}; 'fast' is the default")
    for name, value in (("max_tokens", max_tokens), ("max_batch_size", max_batch_size),
                        ("max_pair_tokens", max_pair_tokens)):
        check_positive_int(value, name)


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
    present, codes = label_codes(adata, label_key)
    if labels is None:
        return present, codes, None
    names, descriptions = class_names(labels)
    missing = [name for name in names if name not in present]
    if missing:
        raise LangCellError(
            f"labels {missing[:5]!r} do not occur in obs[{label_key!r}] (it holds {listed(present)}); "
            "pass classes of that column"
        )
    if len(names) < 2:
        raise LangCellError(f"few-shot annotation needs at least two classes, got {names!r}")
    selected = np.full(codes.shape, -1, dtype=np.int64)
    for code, name in enumerate(names):
        selected[codes == present.index(name)] = code
    return names, selected, descriptions

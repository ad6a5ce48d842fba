"""Few-shot cell-type annotation: LangCell methods, zero-shot and expression baselines on the same cells.

The LangCell paper tunes the whole model on ``n`` labelled cells per class (n = 1, 3, 5, 10 ...) and
annotates the remaining cells. Here, for every ``n`` and every repeat:

1. :func:`langcell.data.splits.sample_shots` draws ``n`` training cells per class (seeded); every other
   labelled cell is a test cell. Every method sees exactly this split, and no method sees a test
   cell's label (:func:`fewshot_predictions` is never given them).
2. **zero-shot**: the frozen model's zero-shot annotation of the test cells
   (:func:`langcell.inference.zero_shot.zero_shot_scores`), the reference every method should not fall
   below. One zero-shot pass over all labelled cells serves every run and the next two methods.
3. The LangCell methods (``method=`` names the ``"langcell"`` row, every other one run gives a row
   ``"langcell:<method>"``):

   ``"full"`` (the paper's protocol, :func:`langcell.train.fewshot.tune_langcell`)
       a copy of the model is tuned on the ``n x K`` training cells, *both* encoders and the heads, with
       ``CE(cos(cell, text_k) / tau) + CE(match score_k)`` over the K class texts; the test cells are
       then annotated exactly as zero-shot annotation does, with the tuned model.
   ``"linear"`` (a text-initialised linear probe, the CLAP / LP++ idea, :mod:`langcell.train.text_head`)
       a linear head on the frozen cell embeddings whose start is the class text embeddings times the
       model's logit scale (at step 0 it predicts what zero-shot similarity predicts), trained with
       cross-entropy plus a pull towards that start whose strength is chosen by cross-validation over
       the training cells (``inf``, i.e. zero-shot similarity, is a candidate). Seconds on a CPU.
   ``"wise"`` (WiSE-FT in output space)
       ``w * p_linear + (1 - w) * p_zero-shot``, the weight ``w`` (0 = zero-shot) chosen by the held-out
       accuracy of the training cells in the linear head's cross-validation folds.
4. **Label shift** (``prior="em"``): the training cells are balanced, the test cells usually are not.
   Every row, zero-shot included, can correct its posteriors with class priors re-estimated on the
   test cells by the EM of Saerens et al. (2002) (:mod:`langcell.inference.calibration`), after a
   temperature fitted on the training cells (the linear and wise heads: on their held-out folds; the
   rows scored with the zero-shot formula: on the similarities, whose corrected softmax then replaces
   ``p_sim`` in the blend). A degenerate or non-converging estimate falls back to uniform, with a
   warning; the priors found are recorded.
5. **Logistic regression** on log-normalised counts, standardised on the training cells
   (:func:`langcell.evaluation.baselines.logistic_regression_predict`, the demo's baseline), and **kNN**
   (scikit-learn ``KNeighborsClassifier``) on the principal components of the log-normalised counts.
6. Accuracy and macro-F1 of every row on the test cells (:func:`langcell.metrics.classification_metrics`),
   and the seconds each method took.

:func:`fewshot` returns a tidy table (scanpy's ``inplace=`` rule); :func:`langcell.pl.fewshot_curves`
draws it. The tuning loss, and why the matching score is a log-odds, are described in
:mod:`langcell.train.fewshot`.

The kNN features are transductive
---------------------------------
The principal components are fitted once on the log-normalised counts of all labelled cells,
training and test together, without their labels, as a scanpy user would run ``sc.tl.pca`` on the
whole dataset before classifying. No label of a test cell is used; their expression shapes the
components, as it shapes the (likewise label-free) pretraining of a foundation model.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from ..inference.calibration import (
    PRIORS,
    check_prior,
    estimate_priors,
    fit_temperature,
    log_softmax,
    zero_shot_prior,
)
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
    check_text_lr,
    tune_langcell,
)
from ..train.optim import check_optimiser_settings
from ..train.text_head import cross_validated_head
from .baselines import knn_predict, log_normalised_features, logistic_regression_predict, principal_components

__all__ = [
    "BASELINES",
    "DEFAULT_METHOD",
    "DEFAULT_SHOTS",
    "METHODS",
    "RESULT_COLUMNS",
    "FewshotInputs",
    "fewshot",
    "fewshot_predictions",
    "servable_shots",
    "shared_inputs",
]

#: Training cells per class in the paper's few-shot experiments.
DEFAULT_SHOTS = (1, 3, 5, 10)
#: The expression baselines :func:`fewshot` can run next to LangCell.
BASELINES = ("logistic_regression", "knn")
#: The LangCell few-shot methods (see the module docstring).
METHODS = ("full", "linear", "wise")
#: The method of the ``"langcell"`` row, chosen by measurement (BENCHMARKS.md, "Few-shot methods").
DEFAULT_METHOD = "wise"
#: Mixing weights of the tuned head that ``"wise"`` chooses from (0 is zero-shot itself).
WISE_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
#: Columns of the results table, in order.
RESULT_COLUMNS = ("method", "shots", "repeat", "accuracy", "macro_f1", "n_train", "n_test", "seconds")
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
    method: str = DEFAULT_METHOD,
    methods: Sequence[str] | None = None,
    prior: str | Sequence[str] = "uniform",
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
    """Few-shot annotation: LangCell methods on n cells per class, zero-shot and baselines on the same split.

    For every ``n`` in ``shots`` and every repeat, :func:`sample_shots` draws ``n`` training cells of
    every class and keeps the other labelled cells for testing; zero-shot annotation, every LangCell
    method and every baseline are scored on exactly those test cells. The protocol and the methods are
    described in :mod:`langcell.evaluation.fewshot`. ``model`` is never changed.

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
        Training cells per class, each a positive integer (the paper: 1, 3, 5, 10). A class with fewer
        than ``min(shots) + min_test`` labelled cells is left out, and an ``n`` that a remaining class
        cannot serve (``n + min_test`` cells) is skipped; both with a warning naming them, recorded in
        ``uns[key_added]["skipped"]``.
    repeats
        Random splits per ``n`` (results are reported per repeat; plot their mean and spread with
        :func:`langcell.pl.fewshot_curves`). For one repeat, a smaller ``n``'s training cells are a
        subset of a larger ``n``'s.
    method
        The method of the ``"langcell"`` row, one of :data:`METHODS`: ``"full"`` (the paper's tuning
        of both encoders), ``"linear"`` (a text-initialised linear head on frozen embeddings) or
        ``"wise"`` (that head's probabilities mixed with zero-shot's). Default chosen by measurement
        (BENCHMARKS.md).
    methods
        The LangCell methods to run, each giving a row ``"langcell:<method>"`` (``method`` itself gives
        ``"langcell"``); ``None``: every method. ``method`` always runs.
    prior
        ``"uniform"`` (no correction) or ``"em"`` (class priors of the test cells re-estimated by EM on
        calibrated posteriors, :mod:`langcell.inference.calibration`), for every row including
        zero-shot. A list runs several: the first names the plain rows, each other adds rows
        ``"<row>+<prior>"``. The priors found are in ``uns[key_added]["priors"]``.
    labels
        ``None``: every class of ``obs[label_key]``, its text from the Cell Ontology
        (:func:`langcell.ontology.label_texts`, as :func:`langcell.tl.annotate` resolves labels). A
        list: only these classes (cells of other classes are left out), resolved the same way. A dict
        ``{label: description}``: these classes with these texts.
    mapping
        ``{label: term id}`` (or a JSON/TSV path) for labels the resolver cannot place.
    min_test
        Test cells every class must keep beyond the ``n`` training cells.
    epochs, lr, text_lr, tau
        Tuning of ``"full"``: passes over the training cells, peak learning rate of the cell encoder,
        the cross-attention and the heads, of the text tower's own weights (0 freezes them: their
        class-text states are then computed once), and the temperature of the similarity cross-entropy (0.05, the release's zero-shot temperature).
    alpha, mode, top_k
        How zero-shot and the tuned model annotate, as in :func:`langcell.tl.annotate`.
    weight_decay, warmup_fraction, max_grad_norm
        AdamW weight decay, share of the steps warming up, gradient clipping (0 turns it off).
    baselines
        Any of ``"logistic_regression"`` and ``"knn"``; ``()`` runs LangCell alone.
    n_pcs
        Principal components of the kNN features (capped by the number of labelled cells and genes).
    n_neighbors
        Neighbours of the kNN vote. ``None``: ``min(5, n)`` at ``n`` shots. An integer is capped at the
        number of training cells.
    seed
        Seeds the splits, the tuning (batch order, dropout), the cross-validation folds and the
        baselines; the global torch random state is left as it was.
    counts_layer, gene_column, n_counts_key
        Where the counts, gene names and per-cell totals are (see :meth:`GeneTokenizer.encode`).
    max_tokens, max_batch_size, max_pair_tokens
        Cell tokens per batch, cells per tuning step, text tokens per matching pass.
    {max_length}
    match_classes
        ``None`` (the paper's protocol): the matching loss of ``"full"`` covers every class; an integer
        m: the own class and the m - 1 most similar others (:func:`fewshot_loss`).
    {progress}
    {inplace}

    Returns
    -------
    pandas.DataFrame or None
        ``inplace=False``: the results, one row per (method, shots, repeat) with the columns of
        :data:`RESULT_COLUMNS`: ``method`` (``"zero-shot"``, ``"langcell"``, ``"langcell:<method>"``,
        ``"logistic_regression"``, ``"knn"``), ``shots``, ``repeat``, ``accuracy``, ``macro_f1``,
        ``n_train``, ``n_test`` and ``seconds`` (that method's time for the run; the zero-shot-based
        rows include their share of the one zero-shot pass). ``inplace=True``: ``None``; the field
        written is ``uns[key_added]``, a dict of ``"params"`` (the settings), ``"results"`` (the table
        as ``{column: list}``), ``"classes"``, ``"texts"``, ``"train_cells"`` (``{"<n>_shots_repeat_<r>":
        obs names}``), ``"train_loss"`` (``{"shots", "repeat", "loss"}`` of every ``"full"`` run),
        ``"priors"`` (one record per ``em`` row and run: the priors used and estimated, status,
        iterations), ``"choices"`` (the penalty of ``"linear"`` and the weight of ``"wise"`` chosen in
        every run) and ``"skipped"`` (classes left out, shots skipped).

    Raises
    ------
    LangCellError
        Before anything is computed or written: for a missing ``label_key``, fewer than two classes,
        labels not in the column, shots that no two classes can serve, bad shots (not positive
        integers, repeated), an unknown method or prior, a bad setting, an unknown baseline, a model
        without a gene tokenizer, or counts that are not raw counts.
    """
    check_anndata(adata)
    check_key_added(key_added)
    shots = _check_shots(shots)
    repeats = check_positive_int(repeats, "repeats")
    epochs = check_positive_int(epochs, "epochs")
    min_test = check_positive_int(min_test, "min_test")
    alpha = check_alpha(alpha)
    method, methods, priors = _check_methods(method, methods, prior)
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
    classes, codes, shots, skipped = servable_shots(classes, codes, shots, min_test)
    top_k = check_top_k(top_k, len(classes))
    match_classes = check_match_classes(match_classes, len(classes))
    if descriptions is not None:
        descriptions = {name: descriptions[name] for name in classes}
    texts, _ = class_texts(classes, descriptions=descriptions, mapping=mapping)

    cells = tokenizer.encode(
        adata, gene_column=gene_column, counts_layer=counts_layer, n_counts_key=n_counts_key,
        max_length=max_length, progress=progress,
    )
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
    scoring = dict(alpha=alpha, top_k=top_k, mode=mode, max_tokens=max_tokens, max_pair_tokens=max_pair_tokens)
    inputs = shared_inputs(model, as_sequences(cells), texts, classes, labelled, tuning, scoring, methods, method,
                           priors)
    split = dict(classes=classes, shots=shots, repeats=repeats, seed=seed, min_test=min_test)
    baseline_inputs = dict(baselines=baselines, features=features, pcs=pcs, n_neighbors=n_neighbors)
    log = _run_protocol(inputs, codes, np.asarray(adata.obs_names, dtype=object), split, baseline_inputs, progress)
    results = pd.DataFrame.from_records(log["records"], columns=list(RESULT_COLUMNS))
    if not inplace:
        return results
    settings = dict(
        label_key=label_key, shots=shots, repeats=repeats, method=method, methods=methods, prior=priors,
        epochs=epochs, lr=lr, text_lr=text_lr, tau=tau, alpha=alpha, mode=mode,
        top_k=int(top_k) if mode == "fast" else len(classes),
        match_classes=len(classes) if match_classes is None else int(match_classes), weight_decay=weight_decay,
        warmup_fraction=warmup_fraction, max_grad_norm=max_grad_norm, max_batch_size=max_batch_size,
        baselines=baselines, n_pcs=n_pcs_used, n_neighbors=n_neighbors, min_test=min_test, seed=seed,
        counts_layer=counts_layer, gene_column=gene_column, max_length=max_length, n_classes=len(classes),
        zero_shot_seconds=round(inputs.zero_shot_seconds, 3),
    )
    adata.uns[key_added] = {
        "params": settings,
        "results": {column: results[column].tolist() for column in RESULT_COLUMNS},
        "classes": list(classes),
        "texts": list(texts),
        "train_cells": log["train_cells"],
        "train_loss": log["train_loss"],
        "priors": _columns(log["priors"]),
        "choices": _columns(log["choices"]),
        "skipped": skipped,
    }
    return None


def _columns(records: list[dict[str, Any]]) -> dict[str, list]:
    """Records as ``{column: list}`` (h5ad stores that; nested dicts become JSON strings)."""
    columns: dict[str, list] = {}
    for record in records:
        for key, value in record.items():
            columns.setdefault(key, []).append(json.dumps(value) if isinstance(value, dict) else value)
    return columns


def servable_shots(
    classes: list[str], codes: np.ndarray, shots: list[int], min_test: int
) -> tuple[list[str], np.ndarray, list[int], dict[str, Any]]:
    """Leave out the classes too small for the smallest ``n`` and the ``n`` the rest cannot serve.

    A class needs ``n + min_test`` labelled cells for ``n`` shots. Classes below ``min(shots) +
    min_test`` are left out (their cells take no part); then every ``n`` that a kept class cannot
    serve is skipped. Each is named in a warning.

    Returns
    -------
    classes, codes, shots, skipped
        The kept classes, every cell's code among them (-1: not used), the shots kept and
        ``{"classes": {name: cells}, "shots": [n, ...]}`` of what was left out.

    Raises
    ------
    LangCellError
        When fewer than two classes can serve even the smallest ``n`` (the classes and sizes named).
    """
    counts = np.bincount(codes[codes >= 0], minlength=len(classes))
    small = counts < min(shots) + min_test
    if (~small).sum() < 2:
        sizes = ", ".join(f"{name!r} ({int(n)} cells)" for name, n in zip(classes, counts, strict=True))
        raise LangCellError(
            f"{min(shots)}-shot sampling needs at least {min(shots) + min_test} cells per class "
            f"({min(shots)} to train, {min_test} to test), and fewer than two classes have them: {sizes}; "
            "lower the shots or label more cells"
        )
    skipped: dict[str, Any] = {"classes": {classes[c]: int(counts[c]) for c in np.flatnonzero(small)}, "shots": []}
    if small.any():
        kept = np.flatnonzero(~small)
        remap = np.full(len(classes), -1, dtype=np.int64)
        remap[kept] = np.arange(kept.size)
        codes = np.where(codes >= 0, remap[np.maximum(codes, 0)], -1)
        classes = [classes[c] for c in kept]
        counts = counts[kept]
        warnings.warn(
            f"few-shot: classes with fewer than {min(shots) + min_test} labelled cells are left out: "
            f"{skipped['classes']}", UserWarning, stacklevel=3,
        )
    kept_shots = [n for n in shots if n + min_test <= counts.min()]
    skipped["shots"] = [n for n in shots if n not in kept_shots]
    if skipped["shots"]:
        smallest = classes[int(counts.argmin())]
        warnings.warn(
            f"few-shot: shots {skipped['shots']} skipped: {smallest!r} has {int(counts.min())} labelled cells "
            f"and n shots need n + {min_test}", UserWarning, stacklevel=3,
        )
    return classes, codes, kept_shots, skipped


# --------------------------------------------------------------------------------------------------
# One run of each method
# --------------------------------------------------------------------------------------------------


@dataclass
class FewshotInputs:
    """Everything the LangCell methods of one few-shot call share, computed once.

    The frozen model's zero-shot pass over every labelled cell gives the zero-shot scores, the cell
    embeddings the linear head reads and the similarities the prior correction calibrates; the class
    texts are embedded once. No label is stored here: labels reach a method only through the training
    cells' codes (:func:`fewshot_predictions`).
    """

    model: Any  # the caller's LangCell (never changed)
    sequences: list[np.ndarray]  # tokenized cells, one per obs row
    texts: list[str]  # class texts, in class order
    class_texts: Any  # ClassTexts of the frozen model (embedded once)
    zero_shot: dict[str, np.ndarray]  # [n_obs, ...] zero-shot arrays (NaN rows: cells not scored)
    scale: float  # the model's logit scale exp(logit_scale): the linear head's start
    tuning: dict[str, Any]  # settings of tune_langcell (method "full")
    scoring: dict[str, Any]  # settings of zero_shot_scores
    methods: list[str]  # LangCell methods to run
    method: str  # the method of the "langcell" row
    priors: list[str]  # prior corrections; the first names the plain rows
    zero_shot_seconds: float  # the one zero-shot pass over all labelled cells


def shared_inputs(model, sequences, texts, classes, labelled, tuning, scoring, methods, method, priors) -> FewshotInputs:
    """Embed the class texts and run the frozen model's zero-shot pass over the labelled cells once."""
    start = time.perf_counter()
    class_embeddings = encode_class_texts(model, texts, classes)
    scores = zero_shot_scores(model, [sequences[i] for i in labelled], class_embeddings, **scoring)
    arrays = {}
    for name in ("cell_embeddings", "similarity", "p_sim", "p_ctm", "scores"):
        value = getattr(scores, name)
        arrays[name] = np.full((len(sequences), value.shape[1]), np.nan, dtype=np.float64)
        arrays[name][labelled] = value
    return FewshotInputs(
        model=model, sequences=sequences, texts=list(texts), class_texts=class_embeddings, zero_shot=arrays,
        scale=float(model.logit_scale.detach().exp()), tuning=tuning, scoring=scoring, methods=list(methods),
        method=method, priors=list(priors), zero_shot_seconds=time.perf_counter() - start,
    )


def fewshot_predictions(
    inputs: FewshotInputs, train: np.ndarray, train_codes: np.ndarray, test: np.ndarray, *, seed: int, where: str = ""
) -> dict[str, Any]:
    """Every LangCell method's predictions for the test cells of one split, from the training cells alone.

    The function is given the test cells' rows, never their labels: no choice (penalty, mixing
    weight, temperature, priors) can depend on them.

    Parameters
    ----------
    inputs
        From :func:`shared_inputs`.
    train, train_codes
        Rows of the training cells and their class codes.
    test
        Rows of the cells to annotate.
    seed
        Seeds the tuning (``"full"``) and the cross-validation folds.
    where
        Names the run in warnings.

    Returns
    -------
    dict
        ``"predicted"``: ``{row name: int64 [n_test]}`` in row order (``"zero-shot"``, ``"langcell"``,
        ``"langcell:<method>"``, each also with ``"+<prior>"`` for every prior after the first);
        ``"seconds"``: ``{row name: seconds}``; ``"priors"``: ``{row name: PriorEstimate record}`` for the
        ``em`` rows; ``"choices"``: ``{method: chosen penalty / weight}``; ``"train_loss"``: the full
        method's epoch losses (or ``None``).
    """
    posteriors: dict[str, tuple[np.ndarray, Any, float]] = {}
    out: dict[str, Any] = {"choices": {}, "train_loss": None}
    share = (train.size + test.size) / max(1, np.isfinite(inputs.zero_shot["scores"][:, 0]).sum())
    shared_seconds = inputs.zero_shot_seconds * share  # this run's share of the one zero-shot pass
    posteriors["zero-shot"] = (
        inputs.zero_shot["scores"][test], ("zero_shot", inputs.zero_shot, train, train_codes, test), shared_seconds
    )
    linear = None
    for method in inputs.methods:
        if method in ("linear", "wise") and linear is None:
            linear = _linear(inputs, train, train_codes, test, seed)
            out["choices"]["linear"] = linear["penalty"]
        start = time.perf_counter()
        if method == "linear":
            result = (linear["test"], ("calibrated", linear["test_logits"], linear["oof_logits"], train_codes))
            seconds = linear["seconds"]
        elif method == "wise":
            weight, mixed, oof_mixed = _wise(inputs, linear, train, train_codes, test)
            out["choices"]["wise"] = weight
            result = (mixed, ("calibrated", np.log(np.maximum(mixed, 1e-12)), np.log(np.maximum(oof_mixed, 1e-12)), train_codes))
            seconds = linear["seconds"] + time.perf_counter() - start
        else:
            tuned_scores, out["train_loss"] = _full(inputs, train, train_codes, test, seed)
            result = (tuned_scores["scores"][train.size:], ("zero_shot", tuned_scores, np.arange(train.size), train_codes,
                                                           np.arange(train.size, train.size + test.size)))
            seconds = time.perf_counter() - start
        name = "langcell" if method == inputs.method else f"langcell:{method}"
        posteriors[name] = (*result, seconds + shared_seconds)
    return _with_priors(inputs, posteriors, out, where)


def _with_priors(inputs: FewshotInputs, posteriors: dict, out: dict, where: str) -> dict[str, Any]:
    """Predictions of every row under every prior correction requested."""
    out.update(predicted={}, seconds={}, priors={})
    for index, prior in enumerate(inputs.priors):
        suffix = "" if index == 0 else f"+{prior}"
        for name, (scores, calibration, seconds) in posteriors.items():
            start = time.perf_counter()
            if prior == "em":
                scores, estimate = _em_scores(inputs, calibration, f"{name}, {where}")
                out["priors"][name + suffix] = estimate.as_dict(inputs.class_texts.names)
            out["predicted"][name + suffix] = np.asarray(scores).argmax(axis=1)
            out["seconds"][name + suffix] = seconds + time.perf_counter() - start
    return out


def _em_scores(inputs: FewshotInputs, calibration: tuple, where: str) -> tuple[np.ndarray, Any]:
    """Label-shift-corrected scores of the test cells (the prior correction of the module docstring)."""
    if calibration[0] == "zero_shot":
        # Scored with the zero-shot formula: EM reads the similarity softmax at a temperature fitted on the
        # training cells, and its corrected posteriors replace p_sim in the blend.
        _, arrays, train, train_codes, test = calibration
        temperature = fit_temperature(arrays["similarity"][train], train_codes)
        return zero_shot_prior(
            arrays["similarity"][test], arrays["p_sim"][test], arrays["p_ctm"][test],
            alpha=inputs.scoring["alpha"], inverse_temperature=1.0 / temperature, where=where,
        )
    # A classifier with held-out logits of its training cells: one temperature fitted on those.
    _, test_logits, oof_logits, train_codes = calibration
    temperature = fit_temperature(oof_logits, train_codes)
    estimate = estimate_priors(np.exp(log_softmax(test_logits / temperature)), where=where)
    return estimate.posteriors, estimate


def _linear(inputs: FewshotInputs, train, train_codes, test, seed: int) -> dict[str, Any]:
    """The text-initialised linear head on the frozen embeddings, its penalty cross-validated on the shots."""
    start = time.perf_counter()
    embeddings = inputs.zero_shot["cell_embeddings"]
    text = inputs.class_texts.embeddings.detach().cpu().double().numpy()
    head, oof_logits, _ = cross_validated_head(embeddings[train], train_codes, text, inputs.scale, seed=seed)
    test_logits = head.logits(embeddings[test])
    return {
        "test": np.exp(log_softmax(test_logits)), "test_logits": test_logits, "oof_logits": oof_logits,
        "penalty": float(head.penalty), "seconds": time.perf_counter() - start,
    }


def _wise(inputs: FewshotInputs, linear: dict, train, train_codes, test) -> tuple[float, np.ndarray, np.ndarray]:
    """WiSE-FT in output space: ``w * p_linear + (1 - w) * p_zero-shot``, w chosen on the shots' held-out folds.

    The weight maximising the held-out accuracy of the training cells wins; ties go to the smaller
    weight (nearer zero-shot).
    """
    oof = np.exp(log_softmax(linear["oof_logits"]))
    zero_train, zero_test = inputs.zero_shot["scores"][train], inputs.zero_shot["scores"][test]
    best = None
    for weight in WISE_WEIGHTS:
        accuracy = float(np.mean((weight * oof + (1 - weight) * zero_train).argmax(axis=1) == train_codes))
        if best is None or accuracy > best[0] + 1e-12:
            best = (accuracy, weight)
    weight = best[1]
    return weight, weight * linear["test"] + (1 - weight) * zero_test, weight * oof + (1 - weight) * zero_train


def _full(inputs: FewshotInputs, train, train_codes, test, seed: int) -> tuple[dict[str, np.ndarray], list[float]]:
    """Tune a copy of the model (the paper's protocol); score the training then the test cells as zero-shot does."""
    sequences = inputs.sequences
    tuned, losses = tune_langcell(inputs.model, [sequences[i] for i in train], train_codes, inputs.texts,
                                  **inputs.tuning, seed=seed)
    class_texts = encode_class_texts(tuned, inputs.texts, inputs.class_texts.names)
    # Annotation in eval mode is deterministic: no seeding needed.
    rows = np.concatenate([train, test])
    scores = zero_shot_scores(tuned, [sequences[i] for i in rows], class_texts, **inputs.scoring)
    arrays = {name: getattr(scores, name).astype(np.float64) for name in ("similarity", "p_sim", "p_ctm", "scores")}
    return arrays, [float(v) for v in losses]


def _run_protocol(
    inputs: FewshotInputs,
    codes: np.ndarray,
    obs_names: np.ndarray,
    split: dict[str, Any],
    baseline_inputs: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    """Every (repeat, n) run: draw the split, run every LangCell method and baseline, score all."""
    classes, min_test = split["classes"], split["min_test"]
    shots, repeats, seed = split["shots"], split["repeats"], split["seed"]
    baselines, features = baseline_inputs["baselines"], baseline_inputs["features"]
    log: dict[str, Any] = {"records": [], "train_cells": {}, "train_loss": {"shots": [], "repeat": [], "loss": []},
                           "priors": [], "choices": []}
    bar = progress_bar(len(shots) * repeats, progress, "few-shot runs", "run")
    try:
        for repeat in range(repeats):
            split_seed = run_seed(seed, repeat)
            for n in shots:
                train, test = sample_shots(codes, n, seed=split_seed, min_test=min_test, class_names=classes)
                log["train_cells"][f"{n}_shots_repeat_{repeat}"] = [str(name) for name in obs_names[train]]
                run = fewshot_predictions(inputs, train, codes[train], test, seed=run_seed(seed, repeat, n),
                                          where=f"{n} shots, repeat {repeat}")
                _log_run(log, run, n, repeat)
                predictions, seconds = run["predicted"], run["seconds"]
                for name in baselines:
                    start = time.perf_counter()
                    if name == "logistic_regression":
                        predictions[name] = logistic_regression_predict(features[train], codes[train], features[test], seed)
                    else:
                        predictions[name] = knn_predict(baseline_inputs["pcs"], codes, train, test, n,
                                                        baseline_inputs["n_neighbors"])
                    seconds[name] = time.perf_counter() - start
                for method, predicted in predictions.items():
                    metrics = classification_metrics(codes[test], np.asarray(predicted), len(classes))
                    log["records"].append({
                        "method": method, "shots": int(n), "repeat": int(repeat),
                        "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                        "n_train": int(train.size), "n_test": int(test.size), "seconds": float(seconds[method]),
                    })
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return log


def _log_run(log: dict, run: dict, n: int, repeat: int) -> None:
    """Keep a run's losses, priors found and choices made."""
    if run["train_loss"] is not None:
        log["train_loss"]["shots"].append(int(n))
        log["train_loss"]["repeat"].append(int(repeat))
        log["train_loss"]["loss"].append(run["train_loss"])
    for name, record in run["priors"].items():
        log["priors"].append({"method": name, "shots": int(n), "repeat": int(repeat), **record})
    for method, value in run["choices"].items():
        log["choices"].append({"method": method, "shots": int(n), "repeat": int(repeat), "value": float(value)})


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
    check_optimiser_settings(lr=lr, tau=tau, weight_decay=weight_decay,
                             max_grad_norm=max_grad_norm, warmup_fraction=warmup_fraction)
    check_text_lr(text_lr)
    if mode not in MODES:
        raise LangCellError(f"mode must be one of {MODES}, got {mode!r}; 'fast' is the default")
    for name, value in (("max_tokens", max_tokens), ("max_batch_size", max_batch_size),
                        ("max_pair_tokens", max_pair_tokens)):
        check_positive_int(value, name)


def _check_methods(method: Any, methods: Any, prior: Any) -> tuple[str, list[str], list[str]]:
    """The ``langcell`` row's method, every method to run (it first) and the prior corrections, checked."""
    if not isinstance(method, str) or method not in METHODS:
        raise LangCellError(f"method must be one of {METHODS}, got {method!r}")
    if methods is None:
        methods = list(METHODS)
    elif isinstance(methods, str):
        methods = [methods]
    methods = list(methods)
    unknown = [name for name in methods if not isinstance(name, str) or name not in METHODS]
    if unknown or len(set(methods)) != len(methods):
        raise LangCellError(f"methods must be distinct names from {METHODS}, got {methods!r}")
    priors = [prior] if isinstance(prior, str) else list(prior) if isinstance(prior, Sequence) else [prior]
    if not priors or len(set(map(str, priors))) != len(priors):
        raise LangCellError(f"prior must be one of {PRIORS} or a list of distinct ones, got {prior!r}")
    priors = [check_prior(value) for value in priors]
    return method, [method] + [name for name in methods if name != method], priors


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

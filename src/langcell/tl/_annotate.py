"""``tl.annotate``: zero-shot annotation of AnnData cells against class texts.

The tensor work lives below (:mod:`langcell.inference.zero_shot`, the models) and the class texts come
from the one resolver (:mod:`langcell.ontology.classes`); this module only turns AnnData into tokens
and class texts, and results back into AnnData fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from .. import _distributed
from .._checks import check_anndata as _check_anndata
from .._checks import check_key_added, check_unit_interval, gene_tokenizer_of, output_anndata
from .._docs import doc_params
from ..errors import LangCellError
from ..inference.calibration import check_prior, zero_shot_prior
from ..inference.embed import corpus_cells, corpus_for
from ..inference.zero_shot import (
    DEFAULT_ALPHA,
    DEFAULT_MAX_PAIR_TOKENS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TOP_K,
    MODES,
    TEMPERATURE,
    THRESHOLD_ON,
    check_alpha,
    check_top_k,
    encode_class_texts,
    scaled_margin,
    zero_shot_scores,
)
from ..ontology.classes import RESOLUTION_COLUMNS, annotation_classes, class_prompts
from ..precision import check_precision
from ._confidence import class_term_ids, lca_answers, write_confidence

__all__ = ["annotate"]


@doc_params
def annotate(
    adata: Any,
    model: Any,
    labels: Any = None,
    *,
    classes_from: str | None = None,
    aspect: str | None = None,
    mapping: Mapping[str, str] | str | None = None,
    texts: Mapping[str, Any] | None = None,
    prompt_ensemble: bool = False,
    alpha: float = DEFAULT_ALPHA,
    top_k: int = DEFAULT_TOP_K,
    mode: str = "fast",
    exact_argmax: bool = False,
    threshold: float | None = None,
    threshold_on: str = "score",
    unknown_label: str = "unknown",
    lca_margin: float | None = None,
    prior: str = "uniform",
    counts_layer: str | None = None,
    gene_column: str | None = None,
    n_counts_key: str | None = "n_counts",
    max_length: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_pair_tokens: int = DEFAULT_MAX_PAIR_TOKENS,
    precision: str = "fp32",
    progress: bool = True,
    distributed: bool = False,
    corpus: Any = None,
    key_added: str = "langcell_cell_type",
    copy: bool = False,
):
    """Zero-shot annotation: score every cell against class texts and keep the best class.

    The class set is either ``labels`` (cell-type names resolved to Cell Ontology text, term ids of
    any aspect, or your own ``{name: description}``) or the distinct terms of an obs column
    (``classes_from``, e.g. disease via MONDO text). The scoring is LangCell's released formula (see
    :mod:`langcell.inference.zero_shot`): ``alpha * softmax(cos / 0.05) + (1 - alpha) * softmax(match prob)``.

    Parameters
    ----------
    adata
        Cells with **raw counts** (in ``X``, or the layer ``counts_layer``).
    model
        A :class:`langcell.models.LangCell` with a gene tokenizer attached (``model.gene_tokenizer``).
    labels
        The candidate classes: a list of cell-type names (resolved to Cell Ontology terms by
        :func:`langcell.ontology.label_texts`; term ids such as ``"CL:0000236"`` work too), a list of
        term ids of ``aspect`` when ``aspect`` is not ``"cell_type"``, or a dict ``{name: description}``
        whose texts are used as given. ``None`` with ``classes_from``.
    classes_from
        Instead of ``labels``: an obs column of ontology term ids (CELLxGENE schema, e.g.
        ``"disease_ontology_term_id"``); its distinct terms (less "unknown"/"na") are the classes and
        :func:`langcell.ontology.term_text` describes them. The class names are the term ids.
    aspect
        The aspect of the terms (``"cell_type"``, ``"disease"``, ``"tissue"``, ...; see
        :data:`langcell.ontology.ASPECTS`). Default: ``"cell_type"`` for ``labels``, read from the
        column name ``<aspect>_ontology_term_id`` for ``classes_from``.
    mapping
        ``{label: term id}`` (or a JSON/TSV path) for cell-type labels the resolver cannot place.
    texts
        Prompt ensembling: ``{class name: [text, ...]}``, further texts describing a class (templates,
        synonyms, marker sentences). A class with several texts is embedded as the normalised mean of
        its texts' normalised embeddings (CLIP's prompt ensembling); the cell-text matching head still
        scores its primary text (the resolved or given one). ``None``: one text per class.
    prompt_ensemble
        Also describe every class that has an ontology term by several texts built from the term
        (label, definition, synonyms, parents: :func:`langcell.ontology.term_prompts`). Off by default:
        with the default alpha it lowered macro-F1 on held-out pbmc68k (0.465 to 0.414) and CBMC (0.348
        to 0.340); BENCHMARKS.md, "Prompt ensembles".
    alpha
        Weight of the similarity score, in [0, 1] (the release: 0.1). At 1 (similarity only) the
        cell-text matching head is not run: its weight is 0.
    top_k
        ``mode="fast"``: classes per cell, ranked by similarity, that the cell-text matching head
        scores; at least 1. A value above the number of classes K is clamped to K (every class
        scored, the same numbers as ``mode="official"``). Ignored by ``mode="official"``.
    mode
        ``"fast"`` (default) or ``"official"`` (CTM for every class: the released computation).
        How the fast mode scores classes outside the top_k is described in
        :mod:`langcell.inference.zero_shot`. Its best class is the official one wherever it can be
        certified; ``uns[key_added]["n_uncertified"]`` counts the cells where it cannot (measured on
        the demo model, 80 held-out pbmc68k cells: 0 answers differed from the official ones at 8
        classes, 7 of 80 at 100 classes; ``BENCHMARKS.md``).
    exact_argmax
        ``mode="fast"``: cells whose fast prediction could differ from the official one (the check is
        described in :mod:`langcell.inference.zero_shot`) get CTM for every class, so that the predictions
        always equal ``mode="official"``; costs up to the official time on cells the model is unsure
        about.
    threshold
        Abstention: cells whose ``threshold_on`` value is below it get ``unknown_label``. ``None``:
        never abstain. The scale of the final scores: they blend two softmaxes over the K classes and
        sum to 1, so the best lies in [1/K, 1] and, with the release's alpha of 0.1, sits not far above
        1/K (the matching softmax is over probabilities in [0, 1], never far from uniform): a score
        threshold means something else for every K. ``threshold_on="margin"`` has a scale that does
        not depend on K.
    threshold_on
        ``"score"`` (default): the best final score. ``"margin"``: the gap between the best and the
        second-best final score divided by the largest gap the formula allows with K classes and this
        alpha (:func:`langcell.inference.zero_shot.scaled_margin`), in [0, 1] for any K: 0 is a tie,
        1 the clearest decision the scores can express.
    unknown_label
        The label of abstaining cells; must not be a class name.
    lca_margin
        Ontology-aware answers, in [0, 1]: a cell whose two best classes are closer than this (score
        margin below it) and resolve to Cell Ontology terms sharing an ancestor other than "cell" is
        answered with their lowest common ancestor (CD4 vs CD8 alpha-beta T cell -> "mature
        alpha-beta T cell"; see :func:`langcell.ontology.lowest_common_ancestor`) in
        ``obs[key_added + "_lca"]``. ``None`` (default): no such column.
    prior
        ``"uniform"`` (default: the released formula as it is) or ``"em"``: re-estimate the class
        frequencies of these cells by EM (Saerens et al. 2002) on the similarity softmax at the model's
        own temperature ``exp(logit_scale)`` and put the corrected similarity posteriors in ``p_sim``'s
        place in the blend (:func:`langcell.inference.calibration.zero_shot_prior`). A degenerate or
        non-converging estimate gives a warning and leaves the scores as they are. The priors found are
        in ``uns[key_added]["prior"]``.
    {counts_options}
    {max_length}
    {max_tokens}
    max_pair_tokens
        Text tokens per cell-text matching pass (bounds memory).
    {precision}
    {progress}
    {distributed}
    {corpus}
    key_added
        Name of the fields written (see Returns). Existing fields of that name are overwritten.
    {copy}

    Returns
    -------
    anndata.AnnData or None
        The annotated copy if ``copy=True``, else ``None``. The fields written are:

        ``obs[key_added]``
            categorical: the best class of each cell (``unknown_label`` where it abstains; that
            category exists only when ``threshold`` is given).
        ``obs[key_added + "_score"]``
            float: the final score of the best class.
        ``obs[key_added + "_margin"]``
            float in [0, 1]: the best final score less the second best (1 with one class); small
            where the cell sits between two classes.
        ``obs[key_added + "_entropy"]``
            float in [0, 1]: the entropy of the final scores divided by ``log K`` (0: all weight on
            one class; 1: uniform over the K classes).
        ``obs[key_added + "_lca"]``
            only with ``lca_margin``: categorical, the ontology-aware answer of each cell (the
            lowest common ancestor's CL label where the two best classes are close, else the
            cell's call in ``obs[key_added]``).
        ``obsm[key_added + "_probs"]``
            ``float32`` cells x K: the final scores of every class; columns in the order of
            ``uns[key_added]["classes"]``.
        ``uns[key_added]``
            dict with ``"params"`` (alpha, top_k used, mode, exact_argmax, temperature, threshold,
            threshold_on, unknown_label, lca_margin, aspect, classes_from, counts_layer, gene_column, max_length,
            n_classes, n_processes, prompt_ensemble, n_prompts, prior),
            ``"classes"`` (class names), ``"texts"`` (the primary text of each class) and ``"resolution"``
            (the table of how each class got its text: columns label, term_id, term_label, how; ""
            where empty), and ``"n_uncertified"``: the number of cells whose best class may differ
            from ``mode="official"``'s (fast mode without ``exact_argmax`` only; 0 otherwise; see
            :attr:`langcell.inference.zero_shot.ZeroShotScores.certified`);
            when some class has several texts, ``"prompts"`` (columns class and text: every text of
            every class, primary first);
            with ``prior="em"`` also ``"prior"``: ``{"priors": {class: prior used},
            "estimated": {class: EM's estimate}, "status": "em" or "fallback: <reason>", "n_iter"}``.

    Raises
    ------
    LangCellError
        For no or duplicated labels, both or neither of ``labels`` and ``classes_from``, a missing
        column, an unknown label or term, ``alpha`` outside [0, 1], ``top_k`` below 1, an unknown
        mode or precision, a ``threshold`` or ``lca_margin`` outside [0, 1], an unknown ``threshold_on``,
        an ``unknown_label`` that is a class, a model without a
        gene tokenizer, counts that are not raw counts, or data sharing no gene with the vocabulary.

    Examples
    --------
    >>> adata = langcell.data.datasets.pbmc68k()                                      # doctest: +SKIP
    >>> langcell.tl.annotate(adata, model, ["B cell", "CD14+ Monocyte", "NK cell"])  # doctest: +SKIP
    >>> adata.obs["langcell_cell_type"].value_counts()                           # doctest: +SKIP
    """
    _check_anndata(adata)
    alpha = check_alpha(alpha)
    if mode not in MODES:
        raise LangCellError(f"mode must be one of {MODES}, got {mode!r}; 'fast' is the default")
    threshold = _check_threshold(threshold, threshold_on)
    if lca_margin is not None:
        lca_margin = check_unit_interval(
            lca_margin, "lca_margin", meaning="a difference of two probabilities",
            fix="pass e.g. 0.1, or None for no ontology-aware answers",
        )
    check_key_added(key_added)
    if not isinstance(prompt_ensemble, bool):
        raise LangCellError(f"prompt_ensemble must be True or False, got {prompt_ensemble!r}")
    prior = check_prior(prior)
    tokenizer = gene_tokenizer_of(model)

    check_precision(precision, model.logit_scale.device)
    names, primary, resolution, aspect = annotation_classes(adata, labels, classes_from, aspect, mapping)
    prompts = class_prompts(
        names, primary, resolution, aspect=aspect or "cell_type", ontology=bool(prompt_ensemble), extra=texts
    )
    top_k = check_top_k(top_k, len(names))
    if threshold is not None and unknown_label in names:
        raise LangCellError(
            f"unknown_label={unknown_label!r} is also a class name; pass another unknown_label "
            "(e.g. 'unassigned')"
        )

    max_positions = int(model.config.cell.max_position_embeddings)
    if max_length is None:
        max_length = max_positions
    elif isinstance(max_length, bool) or not isinstance(max_length, int | np.integer) or max_length < 1:
        raise LangCellError(f"max_length must be a positive integer number of tokens, got {max_length!r}")
    max_length = int(min(max_length, max_positions))
    cells, ctx = _cells_of_this_process(
        adata, tokenizer, model, corpus, distributed, max_length, progress,
        gene_column=gene_column, counts_layer=counts_layer, n_counts_key=n_counts_key,
    )
    classes = encode_class_texts(model, prompts, names, precision=precision)
    scores = zero_shot_scores(
        model,
        cells,
        classes,
        alpha=alpha,
        top_k=top_k,
        mode=mode,
        exact_argmax=exact_argmax,
        max_tokens=max_tokens,
        max_pair_tokens=max_pair_tokens,
        precision=precision,
        progress=progress,
    )

    probs = _distributed.gather_rows(scores.scores, adata.n_obs, ctx) if ctx is not None else scores.scores
    prior_found = None
    if prior == "em":  # EM sees every cell: across processes, the parts it needs are gathered first
        parts = [scores.similarity, scores.p_sim, scores.p_ctm]
        if ctx is not None:
            parts = [_distributed.gather_rows(part, adata.n_obs, ctx) for part in parts]
        probs, estimate = zero_shot_prior(
            *parts, alpha=alpha, inverse_temperature=float(model.logit_scale.detach().exp()), where="annotate",
        )
        probs = probs.astype(np.float32)
        prior_found = estimate.as_dict(list(names))

    adata = output_anndata(adata, copy)
    params = {
        "alpha": alpha,
        "top_k": int(top_k) if mode == "fast" else len(names),
        "mode": mode,
        "exact_argmax": bool(exact_argmax),
        "temperature": TEMPERATURE,
        "threshold": threshold,
        "threshold_on": threshold_on,
        "unknown_label": unknown_label,
        "lca_margin": lca_margin,
        "prior": prior,
        "aspect": aspect,
        "classes_from": classes_from,
        "counts_layer": counts_layer,
        "gene_column": gene_column,
        "max_length": max_length,
        "precision": precision,
        "n_classes": len(names),
        "n_processes": ctx.world_size if ctx is not None else 1,
        "prompt_ensemble": bool(prompt_ensemble),
        "n_prompts": sum(len(p) for p in prompts),
    }
    _write_annotation(adata, key_added, probs, names, primary, prompts, resolution, params, scores.n_uncertified)
    if prior_found is not None:
        adata.uns[key_added]["prior"] = prior_found
    return adata if copy else None


def _write_annotation(adata, key_added, scores, names, texts, prompts, resolution, params, n_uncertified) -> None:
    """Write annotate's fields (see its Returns) from the score matrix of every cell."""
    best = scores.argmax(axis=1)
    best_score = scores[np.arange(best.size), best]
    categories = list(names)
    predicted = np.asarray(names, dtype=object)[best]
    if params["threshold"] is not None:
        categories.append(params["unknown_label"])
        judged = best_score if params["threshold_on"] == "score" else scaled_margin(scores, params["alpha"])
        predicted = np.where(judged < params["threshold"], params["unknown_label"], predicted)
    adata.obs[key_added] = pd.Categorical(predicted, categories=categories)
    adata.obs[key_added + "_score"] = best_score.astype(np.float64)
    write_confidence(adata, key_added, scores)
    adata.obsm[key_added + "_probs"] = scores.astype(np.float32)
    adata.uns[key_added] = {
        "params": params,
        "classes": list(names),
        "texts": list(texts),
        "n_uncertified": int(n_uncertified),
        "resolution": {
            column: ["" if value is None or pd.isna(value) else str(value) for value in resolution[column]]
            for column in RESOLUTION_COLUMNS
        },
    }
    if params["lca_margin"] is not None:
        term_ids = class_term_ids(adata.uns[key_added], len(names))
        answers, _ = lca_answers(scores, term_ids, predicted, params["lca_margin"])
        adata.obs[key_added + "_lca"] = pd.Categorical(answers, categories=list(dict.fromkeys([*categories, *answers])))
    if any(len(p) > 1 for p in prompts):
        adata.uns[key_added]["prompts"] = {
            "class": [name for name, p in zip(names, prompts, strict=True) for _ in p],
            "text": [text for p in prompts for text in p],
        }


def stored_class_texts(entry: Mapping[str, Any], where: str) -> tuple[list[str], list[list[str]]]:
    """The classes and every text of each (primary first) that :func:`annotate` stored in ``uns``.

    ``where`` names the entry in error messages (``"uns['langcell_cell_type']"``).
    """
    if not isinstance(entry, Mapping) or "classes" not in entry or "texts" not in entry:
        raise LangCellError(
            f"{where} is not what langcell.tl.annotate writes (no 'classes' and 'texts'); run tl.annotate first"
        )
    names = [str(name) for name in entry["classes"]]
    prompts = [[str(text)] for text in entry["texts"]]
    if len(prompts) != len(names):
        raise LangCellError(f"{where} holds {len(names)} classes but {len(prompts)} texts; run tl.annotate again")
    if "prompts" in entry:
        by_class: dict[str, list[str]] = {name: [] for name in names}
        for name, text in zip(entry["prompts"]["class"], entry["prompts"]["text"], strict=True):
            by_class[str(name)].append(str(text))
        prompts = [by_class[name] or p for name, p in zip(names, prompts, strict=True)]
    return names, prompts


def _cells_of_this_process(adata, tokenizer, model, corpus, distributed, max_length, progress, **encode_options):
    """The token sequences this process scores, and the process group's context (``None`` on one process).

    Across processes (``distributed=True``) each one takes a contiguous share of the rows; the cells
    come from ``corpus`` when given, else they are tokenized from ``adata``'s counts.
    """
    if corpus is not None:
        corpus = corpus_for(model, corpus, adata.n_obs)
    ctx = _distributed.current_context() if distributed else None
    rows = _distributed.cell_share(adata.n_obs, ctx) if ctx is not None else slice(0, adata.n_obs)
    if corpus is not None:
        return corpus_cells(corpus, rows, max_length), ctx
    part = adata
    if ctx is not None:  # a backed file's share is read into memory (anndata cannot view a view of one)
        part = adata[rows].to_memory() if adata.isbacked else adata[rows]
    return tokenizer.encode(part, max_length=max_length, progress=progress, **encode_options), ctx


def _check_threshold(threshold: Any, threshold_on: Any) -> float | None:
    """The threshold as a float in [0, 1] (or None), after checking what it applies to."""
    if threshold_on not in THRESHOLD_ON:
        raise LangCellError(
            f"threshold_on must be one of {THRESHOLD_ON}, got {threshold_on!r}; 'margin' has a scale that "
            "does not depend on the number of classes"
        )
    if threshold is None:
        return None
    meaning = "final scores are probabilities" if threshold_on == "score" else "the scaled margin lies in [0, 1]"
    return check_unit_interval(threshold, "threshold", meaning=meaning, fix="pass e.g. 0.5, or None to never abstain")

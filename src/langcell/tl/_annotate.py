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

from .._checks import check_anndata as _check_anndata
from .._checks import check_key_added, check_unit_interval, gene_tokenizer_of, output_anndata
from .._docs import doc_params
from ..errors import LangCellError
from ..inference.calibration import check_prior, zero_shot_prior
from ..inference.zero_shot import (
    DEFAULT_ALPHA,
    DEFAULT_MAX_PAIR_TOKENS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TOP_K,
    MODES,
    TEMPERATURE,
    check_alpha,
    check_top_k,
    encode_class_texts,
    zero_shot_scores,
)
from ..ontology.classes import RESOLUTION_COLUMNS, check_aspect, class_names, class_texts, column_classes
from ..precision import check_precision

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
    alpha: float = DEFAULT_ALPHA,
    top_k: int = DEFAULT_TOP_K,
    mode: str = "fast",
    exact_argmax: bool = False,
    threshold: float | None = None,
    unknown_label: str = "unknown",
    prior: str = "uniform",
    counts_layer: str | None = None,
    gene_column: str | None = None,
    n_counts_key: str | None = "n_counts",
    max_length: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_pair_tokens: int = DEFAULT_MAX_PAIR_TOKENS,
    precision: str = "fp32",
    progress: bool = True,
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
    alpha
        Weight of the similarity score, in [0, 1] (the release: 0.1).
    top_k
        ``mode="fast"``: classes per cell, ranked by similarity, that the cell-text matching head
        scores; at least 1. A value above the number of classes K is clamped to K (every class
        scored, the same numbers as ``mode="official"``). Ignored by ``mode="official"``.
    mode
        ``"fast"`` (default) or ``"official"`` (CTM for every class: the released computation).
        How the fast mode scores classes outside the top_k is described in
        :mod:`langcell.inference.zero_shot`.
    exact_argmax
        ``mode="fast"``: cells whose fast prediction could differ from the official one (the check is
        described in :mod:`langcell.inference.zero_shot`) get CTM for every class, so that the predictions
        always equal ``mode="official"``; costs up to the official time on cells the model is unsure
        about.
    threshold
        Abstention: cells whose best final score is below it get ``unknown_label``. Final scores
        sum to 1 over the K classes, so the best lies in [1/K, 1]. ``None``: never abstain.
    unknown_label
        The label of abstaining cells; must not be a class name.
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
        ``obsm[key_added + "_probs"]``
            ``float32`` cells x K: the final scores of every class; columns in the order of
            ``uns[key_added]["classes"]``.
        ``uns[key_added]``
            dict with ``"params"`` (alpha, top_k used, mode, exact_argmax, temperature, threshold,
            unknown_label, prior, aspect, classes_from, counts_layer, gene_column, max_length, n_classes),
            ``"classes"`` (class names), ``"texts"`` (the text of each class) and ``"resolution"``
            (the table of how each class got its text: columns label, term_id, term_label, how; ""
            where empty); with ``prior="em"`` also ``"prior"``: ``{"priors": {class: prior used},
            "estimated": {class: EM's estimate}, "status": "em" or "fallback: <reason>", "n_iter"}``.

    Raises
    ------
    LangCellError
        For no or duplicated labels, both or neither of ``labels`` and ``classes_from``, a missing
        column, an unknown label or term, ``alpha`` outside [0, 1], ``top_k`` below 1, an unknown
        mode or precision, a ``threshold`` outside [0, 1], an ``unknown_label`` that is a class, a model without a
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
    if threshold is not None:
        threshold = check_unit_interval(
            threshold, "threshold", meaning="final scores are probabilities", fix="pass e.g. 0.5, or None to never abstain"
        )
    check_key_added(key_added)
    prior = check_prior(prior)
    tokenizer = gene_tokenizer_of(model)

    check_precision(precision, model.logit_scale.device)
    names, texts, resolution, aspect = _annotation_classes(adata, labels, classes_from, aspect, mapping)
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
    cells = tokenizer.encode(
        adata,
        gene_column=gene_column,
        counts_layer=counts_layer,
        n_counts_key=n_counts_key,
        max_length=max_length,
        progress=progress,
    )
    classes = encode_class_texts(model, texts, names, precision=precision)
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

    final, prior_found = scores.scores, None
    if prior == "em":
        final, estimate = zero_shot_prior(
            scores.similarity, scores.p_sim, scores.p_ctm, alpha=alpha,
            inverse_temperature=float(model.logit_scale.detach().exp()), where="annotate",
        )
        final = final.astype(np.float32)
        prior_found = estimate.as_dict(list(names))
    adata = output_anndata(adata, copy)
    best = final.argmax(axis=1)
    best_score = final[np.arange(best.size), best]
    categories = list(names)
    predicted = np.asarray(names, dtype=object)[best]
    if threshold is not None:
        categories.append(unknown_label)
        predicted = np.where(best_score < threshold, unknown_label, predicted)
    adata.obs[key_added] = pd.Categorical(predicted, categories=categories)
    adata.obs[key_added + "_score"] = best_score.astype(np.float64)
    adata.obsm[key_added + "_probs"] = final.astype(np.float32)
    adata.uns[key_added] = {
        "params": {
            "alpha": alpha,
            "top_k": int(top_k) if mode == "fast" else len(names),
            "mode": mode,
            "exact_argmax": bool(exact_argmax),
            "temperature": TEMPERATURE,
            "threshold": threshold,
            "unknown_label": unknown_label,
            "prior": prior,
            "aspect": aspect,
            "classes_from": classes_from,
            "counts_layer": counts_layer,
            "gene_column": gene_column,
            "max_length": max_length,
            "precision": precision,
            "n_classes": len(names),
        },
        "classes": list(names),
        "texts": list(texts),
        "resolution": {
            column: ["" if value is None or pd.isna(value) else str(value) for value in resolution[column]]
            for column in RESOLUTION_COLUMNS
        },
    }
    if prior_found is not None:
        adata.uns[key_added]["prior"] = prior_found
    return adata if copy else None
# --------------------------------------------------------------------------------------------------
# Embeddings


def _annotation_classes(
    adata: Any, labels: Any, classes_from: str | None, aspect: str | None, mapping: Any
) -> tuple[list[str], list[str], pd.DataFrame, str | None]:
    """Class names, their texts, the resolution table and the aspect actually used."""
    if (labels is None) == (classes_from is None):
        raise LangCellError(
            "pass exactly one of labels (class names, or {name: description}) and classes_from "
            "(an obs column of ontology term ids)"
        )
    check_aspect(aspect)
    if classes_from is not None:
        names, aspect = column_classes(adata, classes_from, aspect)
        texts, table = class_texts(
            names, aspect=aspect, term_ids=True, where=f"obs[{classes_from!r}]", how="obs column"
        )
        return names, texts, table, aspect
    names, descriptions = class_names(labels)
    if descriptions is None:
        aspect = aspect or "cell_type"
    resolved_as = aspect or "cell_type"
    where = None if resolved_as == "cell_type" else "labels"
    texts, table = class_texts(names, aspect=resolved_as, descriptions=descriptions, mapping=mapping, where=where)
    return names, texts, table, aspect

"""TODO docstring."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from .. import ontology
from .._checks import check_class_names
from .._labels import NO_LABEL_VALUES
from ..errors import LangCellError

RESOLUTION_COLUMNS = ["label", "term_id", "term_label", "how"]


def class_texts(
    adata: Any, labels: Any, classes_from: str | None, aspect: str | None, mapping: Any
) -> tuple[list[str], list[str], pd.DataFrame, str | None]:
    """Class names, their texts, the resolution table and the aspect actually used."""
    if (labels is None) == (classes_from is None):
        raise LangCellError(
            "pass exactly one of labels (class names, or {name: description}) and classes_from "
            "(an obs column of ontology term ids)"
        )
    if aspect is not None and aspect not in ontology.ASPECTS:
        raise LangCellError(f"unknown aspect {aspect!r}; use one of {', '.join(ontology.ASPECTS)}")
    if classes_from is not None:
        return _classes_from_column(adata, classes_from, aspect)
    if isinstance(labels, str):
        raise LangCellError("labels must be a list of class names, not one string; wrap it: [label]")
    if isinstance(labels, Mapping):
        names = list(labels)
        check_class_names(names)
        texts, table = ontology.label_texts(names, descriptions=dict(labels))
        return names, [texts[n] for n in names], table, aspect
    names = list(labels.cat.categories) if _is_categorical(labels) else list(labels)
    check_class_names(names)
    if aspect is None or aspect == "cell_type":
        texts, table = ontology.label_texts(names, mapping=mapping)
        return names, [texts[n] for n in names], table, "cell_type"
    texts_list = []
    for term in names:
        texts_list.append(_term_text_or_raise(term, aspect, "labels"))
    table = pd.DataFrame(
        {
            "label": names,
            "term_id": names,
            "term_label": [ontology.term_label(t) for t in names],
            "how": ["term id"] * len(names),
        },
        columns=RESOLUTION_COLUMNS,
    )
    return names, texts_list, table, aspect


def _is_categorical(values: Any) -> bool:
    return isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype)


def _classes_from_column(
    adata: Any, column: str, aspect: str | None
) -> tuple[list[str], list[str], pd.DataFrame, str]:
    if not isinstance(column, str) or column not in adata.obs.columns:
        raise LangCellError(
            f"obs has no column {column!r}; pass classes_from=<an obs column of ontology term ids> "
            f"(columns: {list(adata.obs.columns)[:10]})"
        )
    if aspect is None:
        suffix = "_ontology_term_id"
        inferred = column[: -len(suffix)] if column.endswith(suffix) else None
        if inferred not in ontology.ASPECTS:
            raise LangCellError(
                f"cannot tell which aspect the terms of {column!r} describe; pass aspect= (one of "
                f"{', '.join(ontology.ASPECTS)})"
            )
        aspect = inferred
    values = adata.obs[column]
    present = pd.Series(values.astype(object)).dropna().astype(str).str.strip()
    terms = sorted(set(present) - NO_LABEL_VALUES)
    if not terms:
        raise LangCellError(
            f"obs[{column!r}] holds no ontology term (only missing, 'unknown' or 'na' values); "
            "fill it in or pass labels= instead"
        )
    texts = [_term_text_or_raise(term, aspect, f"obs[{column!r}]") for term in terms]
    table = pd.DataFrame(
        {
            "label": terms,
            "term_id": terms,
            "term_label": [ontology.term_label(t) for t in terms],
            "how": ["obs column"] * len(terms),
        },
        columns=RESOLUTION_COLUMNS,
    )
    return terms, texts, table, aspect


def _term_text_or_raise(term: Any, aspect: str, where: str) -> str:
    try:
        text = ontology.term_text(str(term), aspect)
    except LangCellError as error:
        raise LangCellError(f"{where}: {error}") from None
    if not text:
        raise LangCellError(
            f"{where}: {term!r} has no {aspect} text (it means 'unknown'/'not applicable'); leave it out"
        )
    return text


_TERM_COLUMN_SUFFIX = "_ontology_term_id"


def label_column_texts(
    labels: list[str], label_key: str, texts: Mapping[str, str] | None, mapping: Any
) -> dict[str, str]:
    """One text per label: the user's, a term id's, or a resolved name's."""
    if texts is not None and not isinstance(texts, Mapping):
        raise LangCellError("texts must be a dict {label: text}; leave it out to describe labels from the ontology")
    given = {} if texts is None else {str(k): v for k, v in texts.items()}
    out: dict[str, str] = {}
    for label in labels:
        if label in given:
            text = given[label]
            if not isinstance(text, str) or not text.strip():
                raise LangCellError(f"texts[{label!r}] is empty; write a sentence for it or leave it out")
            out[label] = " ".join(text.split())
    rest = [label for label in labels if label not in out]
    if not rest:
        return out
    if label_key.endswith(_TERM_COLUMN_SUFFIX):
        aspect = label_key[: -len(_TERM_COLUMN_SUFFIX)]
        aspect = aspect if aspect in ontology.ASPECTS else "cell_type"
        for term in rest:
            try:
                out[term] = ontology.term_text(term, aspect)
            except LangCellError as error:
                raise LangCellError(f"obs[{label_key!r}]: {error}") from None
    else:
        resolved, _ = ontology.label_texts(rest, mapping=mapping)
        out.update(resolved)
    return out

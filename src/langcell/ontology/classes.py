"""The one class-name -> text resolver: class names, ``{name: text}`` or a term column -> class texts.

Zero-shot annotation, few-shot tuning, retrieval recall and the evaluation report all need one text
per class. They get it here, so that a class is described the same way everywhere:

* a text the user wrote for it (``descriptions``) is used as written (whitespace collapsed);
* otherwise, for cell types, the name is resolved to a Cell Ontology term
  (:func:`langcell.ontology.resolve.label_texts`) and described by :func:`~langcell.ontology.term_text`;
* for another aspect (disease, tissue, ...) the name must be a term id of that aspect, described by
  :func:`~langcell.ontology.term_text`.

:func:`column_classes` turns an obs column of term ids (CELLxGENE schema) into the class list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from .._checks import check_class_names, listed
from .._labels import NO_LABEL_VALUES
from ..errors import LangCellError
from .resolve import label_texts
from .texts import ASPECTS, term_label, term_prompts, term_text

#: Columns of the resolution table: the class, its term id and label, and how it was found.
RESOLUTION_COLUMNS = ["label", "term_id", "term_label", "how"]
#: CELLxGENE's column name of the terms of an aspect is ``<aspect>_ontology_term_id``.
TERM_COLUMN_SUFFIX = "_ontology_term_id"


def check_aspect(aspect: str | None) -> None:
    """Refuse an aspect that is not one of :data:`langcell.ontology.ASPECTS` (``None`` passes)."""
    if aspect is not None and aspect not in ASPECTS:
        raise LangCellError(f"unknown aspect {aspect!r}; use one of {', '.join(ASPECTS)}")


def aspect_of_column(column: str) -> str | None:
    """The aspect whose terms a ``<aspect>_ontology_term_id`` column holds, or ``None`` for other names."""
    if not column.endswith(TERM_COLUMN_SUFFIX):
        return None
    aspect = column[: -len(TERM_COLUMN_SUFFIX)]
    return aspect if aspect in ASPECTS else None


def class_names(labels: Any) -> tuple[list[str], dict[str, str] | None]:
    """The class names a user passed, and their texts when they passed ``{name: text}``.

    ``labels`` is a list of names, a categorical Series (its categories, in order) or a dict
    ``{name: description}``; the names are checked with :func:`langcell._checks.check_class_names`.
    """
    if isinstance(labels, Mapping):
        names = check_class_names(list(labels))
        return names, {name: labels[name] for name in names}
    if isinstance(labels, pd.Series) and isinstance(labels.dtype, pd.CategoricalDtype):
        labels = list(labels.cat.categories)
    return check_class_names(labels), None


def class_texts(
    names: Sequence[str],
    *,
    aspect: str = "cell_type",
    term_ids: bool = False,
    descriptions: Mapping[str, str] | None = None,
    mapping: Any = None,
    where: str | None = None,
    how: str = "term id",
) -> tuple[list[str], pd.DataFrame]:
    """One text per class name, and the resolution table.

    Parameters
    ----------
    names
        The distinct class names.
    aspect
        The aspect the names belong to (:data:`langcell.ontology.ASPECTS`).
    term_ids
        The names are term ids of ``aspect`` (an obs term column), described as they are. Otherwise
        cell-type names are resolved by :func:`langcell.ontology.resolve.label_texts` (with
        ``mapping``); names of any other aspect must be term ids in any case.
    descriptions
        The user's own texts, ``{name: text}``; a name found here keeps its text and is not resolved.
    mapping
        ``{label: term id}`` (or a JSON/TSV path) for cell-type labels the resolver cannot place.
    where
        Where the names come from, prefixed to error messages (``"labels"``,
        ``"obs['disease_ontology_term_id']"``); ``None``: no prefix.
    how
        The ``how`` of resolved term ids of a non-cell-type aspect (``"term id"``, ``"obs column"``).

    Returns
    -------
    texts : list of str
        The texts, in the order of ``names``.
    table : pandas.DataFrame
        Columns :data:`RESOLUTION_COLUMNS`, one row per name.
    """
    if descriptions is not None and not isinstance(descriptions, Mapping):
        raise LangCellError("texts must be a dict {label: text}; leave it out to describe labels from the ontology")
    given = {} if descriptions is None else {str(k): v for k, v in descriptions.items()}
    for name in names:
        if name in given and (not isinstance(given[name], str) or not given[name].strip()):
            raise LangCellError(f"the text of {name!r} is empty; write a sentence for it or leave it out")
    try:
        if aspect == "cell_type" and not term_ids:
            by_name, table = label_texts(list(names), descriptions=given, mapping=mapping)
            return [by_name[name] for name in names], table
        rows = []
        for name in names:
            if name in given:
                rows.append((" ".join(given[name].split()), (name, None, None, "user description")))
            else:
                rows.append((_term_text_or_raise(name, aspect), (name, name, term_label(name), how)))
    except LangCellError as error:
        if where is None:
            raise
        raise LangCellError(f"{where}: {error}") from None
    table = pd.DataFrame([row for _, row in rows], columns=RESOLUTION_COLUMNS)
    return [text for text, _ in rows], table


def class_prompts(
    names: Sequence[str],
    texts: Sequence[str],
    table: pd.DataFrame,
    *,
    aspect: str = "cell_type",
    ontology: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> list[list[str]]:
    """Several texts per class for prompt ensembling, each class's primary text first.

    Parameters
    ----------
    names, texts, table
        The classes, their primary texts and the resolution table, as :func:`class_texts` returns them.
    aspect
        The aspect of the classes' terms.
    ontology
        Add the texts :func:`langcell.ontology.texts.term_prompts` builds from each class's term
        (label, definition, synonyms, parents); classes with a user description have no term and keep
        their own text.
    extra
        ``{class name: [text, ...]}``: further texts of your own (templates, marker sentences).

    Returns
    -------
    list of list of str
        One list per class, in the order of ``names``, without repeats; ``[text]`` for a class with
        nothing added.
    """
    extra = {} if extra is None else extra
    if not isinstance(extra, Mapping):
        raise LangCellError("texts must be a dict {class name: [text, ...]}; leave it out for one text per class")
    unknown = [name for name in extra if name not in set(names)]
    if unknown:
        raise LangCellError(f"texts names classes {listed(unknown)} that are not among the classes {listed(names)}")
    term_ids = dict(zip(table["label"], table["term_id"], strict=True))
    prompts = []
    for name, text in zip(names, texts, strict=True):
        items = [text]
        term = term_ids.get(name)
        if ontology and isinstance(term, str) and term:
            items += term_prompts(term, aspect)
        added = extra.get(name, [])
        added = [added] if isinstance(added, str) else list(added)
        if not all(isinstance(t, str) and t.strip() for t in added):
            raise LangCellError(f"the texts of {name!r} must be non-empty strings; write a sentence or leave them out")
        items += [" ".join(t.split()) for t in added]
        prompts.append(list(dict.fromkeys(items)))
    return prompts


def label_column_texts(
    labels: Sequence[str], label_key: str, descriptions: Mapping[str, str] | None, mapping: Any
) -> dict[str, str]:
    """``{label: text}`` for the distinct labels of the obs column ``label_key``.

    A ``<aspect>_ontology_term_id`` column holds term ids of that aspect; any other column holds
    cell-type names. ``descriptions`` and ``mapping`` as in :func:`class_texts`.
    """
    term_column = label_key.endswith(TERM_COLUMN_SUFFIX)
    texts, _ = class_texts(
        list(labels),
        aspect=aspect_of_column(label_key) or "cell_type",
        descriptions=descriptions,
        mapping=mapping,
        term_ids=term_column,
        where=f"obs[{label_key!r}]" if term_column else None,
    )
    return dict(zip(labels, texts, strict=True))


def column_classes(adata: Any, column: str, aspect: str | None) -> tuple[list[str], str]:
    """The distinct terms of an obs column of ontology term ids (less "unknown"/"na") and their aspect.

    ``aspect=None`` reads it from the column name ``<aspect>_ontology_term_id``.
    """
    if not isinstance(column, str) or column not in adata.obs.columns:
        raise LangCellError(
            f"obs has no column {column!r}; pass classes_from=<an obs column of ontology term ids> "
            f"(columns: {listed(adata.obs.columns)})"
        )
    if aspect is None:
        aspect = aspect_of_column(column)
        if aspect is None:
            raise LangCellError(
                f"cannot tell which aspect the terms of {column!r} describe; pass aspect= (one of "
                f"{', '.join(ASPECTS)})"
            )
    present = pd.Series(adata.obs[column].astype(object)).dropna().astype(str).str.strip()
    terms = sorted(set(present) - NO_LABEL_VALUES)
    if not terms:
        raise LangCellError(
            f"obs[{column!r}] holds no ontology term (only missing, 'unknown' or 'na' values); "
            "fill it in or pass labels= instead"
        )
    return terms, aspect



def annotation_classes(
    adata: Any, labels: Any, classes_from: str | None, aspect: str | None, mapping: Any
) -> tuple[list[str], list[str], pd.DataFrame, str | None]:
    """The classes of a zero-shot annotation (:func:`langcell.tl.annotate`), resolved without a model.

    Parameters
    ----------
    adata
        The cells (only their ``obs`` is read, for ``classes_from``).
    labels, classes_from, aspect, mapping
        As in :func:`langcell.tl.annotate`: exactly one of ``labels`` and ``classes_from``.

    Returns
    -------
    names, texts : list of str
        The class names and the text of each.
    table : pandas.DataFrame
        How each class got its text (columns :data:`RESOLUTION_COLUMNS`; term id and label ``None``
        for a text the user wrote); :func:`resolution_lines` words it.
    aspect : str or None
        The aspect actually used (``None`` for the user's own descriptions of another aspect).
    """
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


def resolution_lines(table: pd.DataFrame) -> list[str]:
    """One line per class of a resolution table: ``label -> term id (term name) [how]``, or
    ``label -> free text, no term [how]`` for a text with no ontology term behind it."""
    lines = []
    for row in table.itertuples(index=False):
        term = row.term_id
        if term is None or pd.isna(term) or str(term) == "":
            target = "free text, no term"
        else:
            name = row.term_label
            target = str(term) if name is None or pd.isna(name) or str(name) == "" else f"{term} ({name})"
        lines.append(f"{row.label} -> {target} [{row.how}]")
    return lines

def _term_text_or_raise(term: Any, aspect: str) -> str:
    text = term_text(str(term), aspect)
    if not text:
        raise LangCellError(f"{term!r} has no {aspect} text (it means 'unknown'/'not applicable'); leave it out")
    return text

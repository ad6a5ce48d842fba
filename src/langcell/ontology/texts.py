"""Ontology terms to text: the sentences LangCell pairs with cells and classes.

LangCell pairs every cell with text about its identity. That text comes from the ontology terms that
CELLxGENE-schema metadata already carries (``obs["<aspect>_ontology_term_id"]``), turned into plain
sentences from each term's label, definition, synonyms and parents. Zero-shot annotation needs the
reverse too: a user's own labels ("CD14+ Mono", "NK cells") resolved to Cell Ontology (CL) terms so
that each class gets the same kind of text the model was trained on.

Ontology data
-------------
Everything comes from the PyPI package ``cellxgene-ontology-guide``, which ships the ontologies inside
its wheel (no network). One :class:`~cellxgene_ontology_guide.ontology_parser.OntologyParser` is built
per process, lazily, on first use; each ontology file is decompressed the first time one of its terms is
asked for (measured on a 2-core machine: CL 0.02 s, UBERON 0.12 s, MONDO 0.17 s, EFO 0.06 s, the small
ones less). NCBITaxon is the exception: 1.26 million terms, about 16 s and 3 GB of memory, so the
organisms CELLxGENE actually uses are read from the small table :data:`ORGANISMS` (checked against
NCBITaxon by the tests) and only other taxa fall back to the full taxonomy, with a warning.

Aspects and templates
---------------------
:data:`ASPECTS` lists the eight metadata aspects in a fixed order; each is read from the obs column
``<aspect>_ontology_term_id``. :data:`TEMPLATES` holds one template per aspect. A template is a
:meth:`str.format` string with four fields:

``{label}``
    the term's label (for several terms, as in multi-ethnic donors, the labels joined by " and ");
``{definition}``
    the term's definition, whitespace collapsed, ending with a full stop;
``{synonyms}``
    up to ``max_synonyms`` synonyms joined by ", ";
``{parents}``
    the labels of up to ``max_parents`` direct parents (distance-1 ancestors), joined by ", ".

A part in square brackets is optional: it is kept (without the brackets) only when every field inside
it has text, so "[ Also called: {synonyms}.]" disappears for a term without synonyms. Synonyms that
differ from the label or from an earlier synonym only in case, hyphenation or "+" for "-positive"
("B-cell" for "B cell"), and ImmGen-style codes without spaces ("T.4Nve.Sp"), are dropped because they
add tokens, not meaning.
The cell-type text of B cell (CL:0000236) is, for example::

    cell type: B cell. A lymphocyte of B lineage that is capable of B cell mediated immunity.
    Also called: B lymphocyte. A kind of: lymphocyte of B lineage.

CELLxGENE's special values are handled: "unknown" and "na" give no text (the empty string);
"PATO:0000461" (normal) as a disease and "multiethnic" as an ethnicity give the fixed sentences in
:data:`SPECIAL_TEXTS`; a comma-separated list of ethnicity terms is described as one text.

Free-text labels are resolved to terms in :mod:`langcell.ontology.resolve`.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from .._labels import NO_LABEL_VALUES
from ..errors import LangCellError

__all__ = [
    "ASPECTS",
    "ASPECT_ONTOLOGIES",
    "ORGANISMS",
    "SPECIAL_TEXTS",
    "TEMPLATES",
    "cell_description",
    "describe_cells",
    "term_label",
    "term_prompts",
    "term_text",
]

ASPECTS: tuple[str, ...] = (
    "cell_type",
    "tissue",
    "disease",
    "development_stage",
    "sex",
    "assay",
    "organism",
    "self_reported_ethnicity",
)
"""The metadata aspects, in the order used for multi-aspect descriptions."""

TEMPLATES: dict[str, str] = {
    "cell_type": "cell type: {label}.[ {definition}][ Also called: {synonyms}.][ A kind of: {parents}.]",
    # UBERON parents mix is_a and part_of, hence "Belongs to" rather than "A kind of".
    "tissue": "tissue: {label}.[ {definition}][ Also called: {synonyms}.][ Belongs to: {parents}.]",
    "disease": "disease: {label}.[ {definition}][ Also called: {synonyms}.][ A kind of: {parents}.]",
    "development_stage": "development stage: {label}.[ {definition}][ Also called: {synonyms}.]",
    # PATO's definitions of female/male are long-winded and identical across cells: the label says it all.
    "sex": "sex: {label}.",
    "assay": "assay: {label}.[ {definition}][ Also called: {synonyms}.][ A kind of: {parents}.]",
    "organism": "organism: {label}.[ Also called: {synonyms}.]",
    "self_reported_ethnicity": "self-reported ethnicity: {label}.[ {definition}]",
}
"""One text template per aspect; see the module docstring for the fields and the ``[...]`` parts."""

ASPECT_ONTOLOGIES: dict[str, tuple[str, ...]] = {
    "cell_type": ("CL",),
    # CELLxGENE allows CL terms as the tissue of cell cultures and organoids.
    "tissue": ("UBERON", "CL"),
    "disease": ("MONDO", "PATO"),
    # Human, mouse, then the stage ontologies of the other organisms CELLxGENE accepts.
    "development_stage": ("HsapDv", "MmusDv", "UBERON", "ZFS", "FBdv", "WBls"),
    "sex": ("PATO",),
    "assay": ("EFO",),
    "organism": ("NCBITaxon",),
    "self_reported_ethnicity": ("HANCESTRO", "AfPO"),
}
"""The ontology prefixes each aspect accepts (CELLxGENE schema 7)."""


SPECIAL_TEXTS: dict[tuple[str, str], str] = {
    ("disease", "PATO:0000461"): "disease: normal. The donor had no diagnosed disease (healthy tissue).",
    ("self_reported_ethnicity", "multiethnic"): (
        "self-reported ethnicity: multiethnic. The donor reported more than one ethnicity."
    ),
}
"""Fixed texts for CELLxGENE's special values that carry meaning, keyed by (aspect, value)."""

ORGANISMS: dict[str, tuple[str, tuple[str, ...]]] = {
    # term id: (NCBITaxon label, synonyms as NCBITaxon gives them, most common name first)
    "NCBITaxon:9606": ("Homo sapiens", ("human",)),
    "NCBITaxon:10090": ("Mus musculus", ("house mouse", "mouse")),
    "NCBITaxon:10116": ("Rattus norvegicus", ("Norway rat", "brown rat", "rat")),
    "NCBITaxon:9544": ("Macaca mulatta", ("rhesus macaque", "Rhesus monkey")),
    "NCBITaxon:9541": ("Macaca fascicularis", ("crab-eating macaque", "cynomolgus monkey")),
    "NCBITaxon:9598": ("Pan troglodytes", ("chimpanzee",)),
    "NCBITaxon:9483": ("Callithrix jacchus", ("common marmoset",)),
    "NCBITaxon:30608": ("Microcebus murinus", ("gray mouse lemur",)),
    "NCBITaxon:9823": ("Sus scrofa", ("pig", "swine")),
    "NCBITaxon:9913": ("Bos taurus", ("cow", "bovine")),
    "NCBITaxon:7955": ("Danio rerio", ("zebrafish",)),
    "NCBITaxon:7227": ("Drosophila melanogaster", ("fruit fly",)),
    "NCBITaxon:6239": ("Caenorhabditis elegans", ()),
}
"""Organisms described without loading NCBITaxon (1.26 M terms, ~16 s, ~3 GB)."""

# ---------------------------------------------------------------------------------------------------
# Label-resolution tables. Each entry was reviewed against CL (release shipped with
# cellxgene-ontology-guide); keys are lower case.


# ---------------------------------------------------------------------------------------------------
# The parser: one per process, built on first use.


@functools.cache
def ontology_parser():
    """Return the process-wide :class:`OntologyParser` (built on first call, then reused)."""
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    return OntologyParser()


def term_label(term_id: str) -> str:
    """The ontology label of a term id (``"CL:0000236"`` -> ``"B cell"``), or ``""`` when it has none.

    CELLxGENE's special values keep the parser's answer ("unknown" -> "unknown"); ids the bundled
    ontologies do not know give ``""`` rather than an error: callers show the label next to the id.
    """
    try:
        return str(ontology_parser().get_term_label(term_id))
    except Exception:  # the parser raises ValueError for unknown ids and prefixes
        return ""


def ontology_terms(ontology: str) -> dict[str, Any]:
    """The raw term table of one ontology (decompressed once per process by the package's cache)."""
    return ontology_parser().cxg_schema.ontology(ontology)


def term_prefix(term_id: str) -> str:
    return term_id.split(":", 1)[0] if ":" in term_id else ""


# ---------------------------------------------------------------------------------------------------
# Term -> text


def _clean_sentence(text: str | None) -> str:
    """Collapse whitespace and end with a full stop; '' for no text."""
    if not text:
        return ""
    text = " ".join(str(text).split())
    if text and text[-1] not in ".!?":
        text += "."
    return text


def _variant_key(text: str) -> str:
    """What a name says, ignoring case, hyphens and "+" for "-positive" ("CD19+ B cell" = "CD19-positive B cell")."""
    text = re.sub(r"(?<=\w)\+", "-positive", text.lower())
    return " ".join(text.replace("-", " ").split())


def _pick_synonyms(label: str, synonyms: Iterable[str], max_synonyms: int) -> list[str]:
    """Synonyms worth showing: no case/hyphen variants of what is already said, no ImmGen codes."""
    seen = {_variant_key(label)}
    picked: list[str] = []
    for synonym in synonyms:
        if len(picked) >= max_synonyms:
            break
        synonym = " ".join(str(synonym).split())
        key = _variant_key(synonym)
        if not synonym or key in seen:
            continue
        if " " not in synonym and "." in synonym:  # "T.4Nve.Sp", "NK.49D+.Sp": sample codes, not names
            continue
        seen.add(key)
        picked.append(synonym)
    return picked


_OPTIONAL_PART = re.compile(r"\[([^\[\]]*)\]")
_FIELD = re.compile(r"\{(\w+)\}")


def _render(template: str, fields: Mapping[str, str]) -> str:
    """Fill a template, dropping each ``[...]`` part that has an empty field."""

    def optional(match: re.Match) -> str:
        part = match.group(1)
        if all(fields.get(name) for name in _FIELD.findall(part)):
            return part.format(**fields)
        return ""

    return _OPTIONAL_PART.sub(optional, template).format(**fields)


def _check_aspect(aspect: str) -> None:
    if aspect not in TEMPLATES:
        raise LangCellError(f"unknown aspect {aspect!r}; use one of {', '.join(ASPECTS)}")


def _check_term(term_id: str, aspect: str) -> str:
    """Validate one term id for an aspect and return its ontology name."""
    allowed = ASPECT_ONTOLOGIES[aspect]
    prefix = term_prefix(term_id)
    if prefix not in allowed:
        raise LangCellError(
            f"{term_id!r} is not a valid {aspect} term id: {aspect} takes terms of "
            f"{', '.join(allowed)} written as PREFIX:NUMBER (for example {EXAMPLE_TERM_IDS[aspect]!r}), or 'unknown'; "
            f"fix the {aspect}_ontology_term_id values (CELLxGENE schema)"
        )
    if prefix == "NCBITaxon" and term_id in ORGANISMS:
        return prefix
    parser = ontology_parser()
    if not parser.is_valid_term_id(term_id):
        raise LangCellError(
            f"{term_id!r} is not a term of {prefix} (release shipped with cellxgene-ontology-guide); "
            f"check the id for typos, or map it to a current {prefix} term"
        )
    if parser.is_term_deprecated(term_id):
        replacement = parser.get_term_replacement(term_id)
        if replacement:
            fix = f"replace it with {replacement} ({parser.get_term_label(replacement)!r})"
        else:
            consider = [
                _tidy_term_id(other) for other in parser.get_term_metadata(term_id).get("consider") or []
            ]
            named = [
                f"{other} ({parser.get_term_label(other)!r})" if parser.is_valid_term_id(other) else other
                for other in consider
            ]
            fix = f"replace it with one of {', '.join(named)}" if named else f"choose a current {prefix} term"
        raise LangCellError(
            f"{term_id!r} ({parser.get_term_label(term_id)!r}) is deprecated in {prefix}; {fix}"
        )
    return prefix


def _tidy_term_id(raw: str) -> str:
    """'obo.HsapDv_0000226' (as some 'consider' lists write it) -> 'HsapDv:0000226'."""
    match = re.fullmatch(r"(?:obo\.)?([A-Za-z]+)[_:](\d+)", raw.strip())
    return f"{match.group(1)}:{match.group(2)}" if match else raw


EXAMPLE_TERM_IDS = {
    "cell_type": "CL:0000236",
    "tissue": "UBERON:0000178",
    "disease": "MONDO:0005148",
    "development_stage": "HsapDv:0000258",
    "sex": "PATO:0000383",
    "assay": "EFO:0009922",
    "organism": "NCBITaxon:9606",
    "self_reported_ethnicity": "HANCESTRO:0005",
}

_warned_taxonomy = False


def _term_fields(term_id: str, aspect: str, max_synonyms: int, max_parents: int) -> dict[str, str]:
    """Label, definition, synonyms and parents of one validated term, as template fields."""
    global _warned_taxonomy
    if aspect == "organism" and term_id in ORGANISMS:
        label, synonyms = ORGANISMS[term_id]
        return {
            "label": label,
            "definition": "",
            "synonyms": ", ".join(_pick_synonyms(label, synonyms, max_synonyms)),
            "parents": "",
        }
    if term_prefix(term_id) == "NCBITaxon" and not _warned_taxonomy:
        _warned_taxonomy = True
        warnings.warn(
            f"{term_id} is not in langcell.ontology.ORGANISMS: loading the full NCBI taxonomy "
            "(about 16 s and 3 GB of memory, once per process)",
            stacklevel=3,
        )
    parser = ontology_parser()
    label = parser.get_term_label(term_id)
    fields = {
        "label": label,
        "definition": _clean_sentence(parser.get_term_description(term_id)),
        "synonyms": ", ".join(_pick_synonyms(label, parser.get_term_synonyms(term_id), max_synonyms)),
        "parents": "",
    }
    if max_parents > 0 and "{parents}" in TEMPLATES[aspect]:
        parents = [parser.get_term_label(parent) for parent in parser.get_term_parents(term_id)[:max_parents]]
        fields["parents"] = ", ".join(parents)
    return fields


@functools.lru_cache(maxsize=65536)
def _term_text_cached(term_id: str, aspect: str, max_synonyms: int, max_parents: int) -> str:
    special = SPECIAL_TEXTS.get((aspect, term_id))
    if special is not None:
        return special
    if term_id.lower() in NO_LABEL_VALUES:
        return ""
    if aspect == "self_reported_ethnicity" and "," in term_id:
        # Schema 5+: a donor reporting several ethnicities carries a comma-separated list of terms.
        parts = [part.strip() for part in term_id.split(",")]
        labels = []
        for part in parts:
            _check_term(part, aspect)
            labels.append(_term_fields(part, aspect, 0, 0)["label"])
        return _render(
            TEMPLATES[aspect],
            {"label": " and ".join(labels), "definition": "", "synonyms": "", "parents": ""},
        )
    _check_term(term_id, aspect)
    fields = _term_fields(term_id, aspect, max_synonyms, max_parents)
    return _render(TEMPLATES[aspect], fields)


def term_text(term_id: str, aspect: str = "cell_type", *, max_synonyms: int = 3, max_parents: int = 2) -> str:
    """Describe one ontology term in words, using the aspect's template.

    Parameters
    ----------
    term_id
        An ontology term id such as ``"CL:0000236"``, or a CELLxGENE special value ("unknown", "na",
        "multiethnic", "PATO:0000461" for a normal disease state).
    aspect
        One of :data:`ASPECTS`; picks the template and the ontologies allowed.
    max_synonyms
        At most this many synonyms are named.
    max_parents
        At most this many direct parents are named.

    Returns
    -------
    str
        The text, or ``""`` for "unknown"/"na" (no information to describe).

    Raises
    ------
    LangCellError
        For an unknown aspect, a term id of the wrong ontology or unknown to it, or a deprecated term
        (the message names the replacement when the ontology gives one).

    Examples
    --------
    >>> term_text("CL:0000236")  # doctest: +ELLIPSIS
    'cell type: B cell. A lymphocyte of B lineage ... Also called: B lymphocyte. A kind of: ...'
    """
    _check_aspect(aspect)
    if not isinstance(term_id, str):
        raise LangCellError(
            f"term ids must be strings like {EXAMPLE_TERM_IDS[aspect]!r}, got {term_id!r} of type "
            f"{type(term_id).__name__}; convert the column to strings"
        )
    if max_synonyms < 0 or max_parents < 0:
        raise LangCellError("max_synonyms and max_parents must be >= 0; pass 0 to leave them out")
    return _term_text_cached(term_id.strip(), aspect, int(max_synonyms), int(max_parents))


def term_prompts(term_id: str, aspect: str = "cell_type", *, max_synonyms: int = 3, max_parents: int = 2) -> list[str]:
    """Several texts describing one term, for prompt ensembling (CLIP's idea): the full text first.

    The texts are the aspect's template filled with: everything (:func:`term_text`, the primary
    text); the label alone; the label and the definition; each synonym in place of the label; the
    label and each parent. Texts that come out equal are given once.

    Parameters
    ----------
    term_id, aspect, max_synonyms, max_parents
        As in :func:`term_text`.

    Returns
    -------
    list of str
        The texts, the primary one first; ``[term_text(...)]`` alone for CELLxGENE's special values
        (and ``[]`` for "unknown"/"na").

    Examples
    --------
    >>> term_prompts("CL:0000236")[:2]  # doctest: +ELLIPSIS
    ['cell type: B cell. A lymphocyte of B lineage ...', 'cell type: B cell.']
    """
    primary = term_text(term_id, aspect, max_synonyms=max_synonyms, max_parents=max_parents)
    term_id = term_id.strip()
    if not primary or (aspect, term_id) in SPECIAL_TEXTS or (aspect == "self_reported_ethnicity" and "," in term_id):
        return [primary] if primary else []
    fields = _term_fields(term_id, aspect, max_synonyms, max_parents)
    empty = dict.fromkeys(fields, "")
    variants = [
        {**empty, "label": fields["label"]},
        {**empty, "label": fields["label"], "definition": fields["definition"]},
        *({**empty, "label": synonym} for synonym in fields["synonyms"].split(", ") if synonym),
        *({**empty, "label": fields["label"], "parents": parent} for parent in fields["parents"].split(", ") if parent),
    ]
    texts = [primary, *(_render(TEMPLATES[aspect], variant) for variant in variants)]
    return list(dict.fromkeys(texts))


# ---------------------------------------------------------------------------------------------------
# obs -> texts


def _check_aspects(aspects: Iterable[str]) -> tuple[str, ...]:
    if isinstance(aspects, str):
        aspects = (aspects,)
    aspects = tuple(aspects)
    for aspect in aspects:
        _check_aspect(aspect)
    return aspects


def describe_cells(
    obs: pd.DataFrame, aspects: Iterable[str] = ASPECTS, *, strict: bool = False
) -> pd.DataFrame:
    """Texts for every cell, one column per aspect, from CELLxGENE-schema term id columns.

    Each distinct term is described once (:func:`term_text`) and the texts are then spread over the
    cells, so a million cells with a few hundred distinct terms take well under a second.

    Parameters
    ----------
    obs
        Cell metadata with columns ``<aspect>_ontology_term_id`` (CELLxGENE schema), e.g. ``adata.obs``.
    aspects
        The aspects wanted, from :data:`ASPECTS`.
    strict
        Raise when an aspect's column is missing; by default such aspects are skipped.

    Returns
    -------
    pandas.DataFrame
        Same index as ``obs``; one object column per aspect found, named by the aspect
        (``"cell_type"``, ``"tissue"``, ...), holding the text ("" for unknown / missing values).

    Raises
    ------
    LangCellError
        For a missing column when ``strict``, or an invalid or deprecated term id (naming the column).
    """
    if not isinstance(obs, pd.DataFrame):
        raise LangCellError(f"obs must be a pandas DataFrame (adata.obs), got {type(obs).__name__}")
    aspects = _check_aspects(aspects)
    columns: dict[str, np.ndarray] = {}
    for aspect in aspects:
        column = f"{aspect}_ontology_term_id"
        if column not in obs.columns:
            if strict:
                raise LangCellError(
                    f"obs has no column {column!r}; CELLxGENE-schema data stores the {aspect} as ontology term "
                    f"ids in that column: add it (e.g. {EXAMPLE_TERM_IDS[aspect]!r} per cell), or pass strict=False "
                    "or fewer aspects"
                )
            continue
        values = obs[column]
        if isinstance(values.dtype, pd.CategoricalDtype):
            codes = values.cat.codes.to_numpy().astype(np.int64)
            uniques = list(values.cat.categories)
        else:
            codes, uniques = pd.factorize(values, use_na_sentinel=True)
            uniques = list(uniques)
        # Only the terms some cell carries: a subset AnnData keeps unused categories, which need no text.
        used = np.bincount(codes[codes >= 0], minlength=len(uniques)) > 0
        texts = []
        for term_id, is_used in zip(uniques, used, strict=True):
            if not is_used:
                texts.append("")
                continue
            try:
                texts.append(term_text(str(term_id), aspect))
            except LangCellError as error:
                raise LangCellError(f"column {column!r}: {error}") from None
        # One extra slot for missing values (code -1): no text, like "unknown".
        lookup = np.asarray(texts + [""], dtype=object)
        columns[aspect] = lookup[np.where(codes < 0, len(texts), codes)]
    return pd.DataFrame(columns, index=obs.index)


def cell_description(row_or_dict: Mapping[str, Any] | pd.Series, aspects: Iterable[str] = ASPECTS) -> str:
    """One cell's multi-aspect description: the aspect texts joined in :data:`ASPECTS` order.

    Parameters
    ----------
    row_or_dict
        A row of ``obs`` (``obs.iloc[i]``) or a dict, keyed by ``<aspect>_ontology_term_id``.
    aspects
        The aspects to include; missing keys and unknown values are left out.

    Returns
    -------
    str
        The non-empty aspect texts separated by single spaces ("" when none has text).
    """
    aspects = _check_aspects(aspects)
    texts = []
    for aspect in aspects:
        key = f"{aspect}_ontology_term_id"
        if key not in row_or_dict:
            continue
        value = row_or_dict[key]
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        text = term_text(str(value), aspect)
        if text:
            texts.append(text)
    return " ".join(texts)

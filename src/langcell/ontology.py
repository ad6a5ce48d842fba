"""Ontology terms to text, and free-text cell-type labels to Cell Ontology terms.

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

Label resolution
----------------
:func:`resolve_labels` tries, for each label, in order (the first that succeeds names the ``how``):

1. ``"user mapping"``: the label is a key of ``mapping``;
2. ``"term id"``: the label is itself a term id ("CL:0000236");
3. ``"exact label"``: the label equals a live term's label;
4. ``"normalised"`` (curated): the normalised label is a key of :data:`CURATED_LABELS`, a short,
   reviewed table for community shorthands where the ontology's own synonyms point elsewhere;
5. ``"synonym"``: the label equals a synonym of exactly one live term;
6. ``"normalised"``: the label and every live term name are normalised the same way and matched.

Normalisation (CL): markers are parsed out ("CD14+" -> CD14 positive, "CD25-" -> CD25 negative,
"CD56bright"/"hi" -> high, "lo"/"dim" -> low, a bare "CD4" before a cell noun -> positive; gene symbols
such as FCGR3A become their CD names through :data:`GENE_TO_CD`); the rest is lower-cased, split on
"/", singularised ("Monocytes" -> "monocyte"), "T-cell"/"T lymphocyte" become "t cell", and
abbreviations are expanded with :data:`ABBREVIATIONS` ("NK" -> "natural killer cell", "Mono" ->
"monocyte", "T Reg" -> "regulatory t cell", ...). A label without a cell noun gets one: "t cell" when
it carries a T-lineage marker ("CD4+/CD45RO+ Memory" -> memory t cell), the cell type of
:data:`MARKER_ONLY_TYPES` when it is markers only ("CD34+" -> hematopoietic precursor cell), and
"cell" otherwise ("Dendritic" -> dendritic cell). A term matches when its name has the same remaining
words (the qualifiers "alpha-beta", "thymus-derived", "human", "mouse", "mammalian" may be absent from
the label) and all its markers appear in the label with the same sign. The best match has the most
markers in common, then the same words without dropping qualifiers, then is a label rather than a
synonym; when two terms tie, or nothing matches, :func:`resolve_labels` raises
:class:`~langcell.errors.LangCellError` listing the closest term names: never a silent guess.
"""

from __future__ import annotations

import csv
import difflib
import functools
import json
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import LangCellError

__all__ = [
    "ABBREVIATIONS",
    "ASPECTS",
    "ASPECT_ONTOLOGIES",
    "CURATED_LABELS",
    "GENE_TO_CD",
    "MARKER_ONLY_TYPES",
    "ORGANISMS",
    "SPECIAL_TEXTS",
    "TEMPLATES",
    "cell_description",
    "describe_cells",
    "label_texts",
    "resolve_labels",
    "term_label",
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

# CELLxGENE's placeholders for "not known" and "not applicable": no text at all, so that a pretraining
# step never learns that "unknown" is a cell type.
_NO_TEXT_VALUES = frozenset({"unknown", "na", ""})

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

ABBREVIATIONS: dict[str, str] = {
    # cell-type shorthands used in single-cell annotations (Seurat/10x PBMC tutorials, CELLxGENE authors)
    "nk": "natural killer cell",
    "nkt": "nk t cell",
    "nk t": "nk t",  # CL writes "NK T cell": keep "NK" before "T" unexpanded
    "dc": "dendritic cell",
    "pdc": "plasmacytoid dendritic cell",
    "cdc": "conventional dendritic cell",
    "mdc": "myeloid dendritic cell",
    "mono": "monocyte",
    "mk": "megakaryocyte",
    "megak": "megakaryocyte",
    "eryth": "erythrocyte",
    "ery": "erythrocyte",
    "rbc": "erythrocyte",
    "t reg": "regulatory t cell",
    "treg": "regulatory t cell",
    "hsc": "hematopoietic stem cell",
    # "hematopoietic stem and progenitor cell": CL's hematopoietic precursor cell covers both.
    "hspc": "hematopoietic precursor cell",
    "mpp": "hematopoietic multipotent progenitor cell",
    "ilc": "innate lymphoid cell",
    "mait": "mucosal-associated invariant t cell",
    "gdt": "gamma-delta t cell",
    "mac": "macrophage",
    "macro": "macrophage",
    "neut": "neutrophil",
    "neutro": "neutrophil",
    "plt": "platelet",
    "mem": "memory",
    "eff": "effector",
    # single letters only ever mean the lymphocyte lineages in such labels ("CD19+ B", "Naive T")
    "b": "b cell",
    "t": "t cell",
}
"""Abbreviations expanded (whole words, case-insensitive, after singularising) before matching CL."""

GENE_TO_CD: dict[str, str] = {
    # gene symbol: CD name, for markers written as genes ("FCGR3A+ Monocytes")
    "fcgr3a": "cd16",
    "ncam1": "cd56",
    "ms4a1": "cd20",
    "il2ra": "cd25",
    "il3ra": "cd123",
    "ptprc": "cd45",
    "itgam": "cd11b",
    "itgax": "cd11c",
    "kit": "cd117",
    "cd3e": "cd3",
    "cd8a": "cd8",
    "cd79a": "cd79a",
}
"""Gene symbols rewritten to CD names in marker phrases (CL names markers by CD)."""

MARKER_ONLY_TYPES: dict[str, str] = {
    # lineage-defining marker: the cell type a label made of markers only means ("CD34+")
    "cd34": "hematopoietic precursor cell",
    "cd14": "monocyte",
    "cd19": "b cell",
    "cd20": "b cell",
    "cd3": "t cell",
    "cd4": "t cell",
    "cd8": "t cell",
    "cd56": "natural killer cell",
}
"""Cell types implied by a label that is only positive markers, checked in this order."""

CURATED_LABELS: dict[str, str] = {
    # "CD16+ Mono" / "FCGR3A+ Mono" are the non-classical monocytes (CD14-low, CD16-high) in the Seurat and
    # 10x PBMC conventions, and CELLxGENE curators map them to CL:0002396; CL's synonym "CD16+ monocyte"
    # sits on the CD14+CD16+ term CL:0002397 instead, so it must not decide.
    "cd16-positive monocyte": "CL:0002396",
}
"""Normalised labels whose CL term is fixed by review, checked before CL's own synonyms."""

# Labels that are placeholders or exclusions, never cell types; refused with a dedicated message.
_NOT_CELL_TYPES = frozenset(
    {
        "unknown",
        "unassigned",
        "unclassified",
        "na",
        "n/a",
        "nan",
        "none",
        "other",
        "others",
        "doublet",
        "doublets",
        "multiplet",
        "multiplets",
        "low quality",
        "mouse",
        "human",
        "undefined",
        "unlabeled",
        "unlabelled",
        "ambiguous",
        "negative",
    }
)

# Words a CL name may carry that a user's label usually leaves out.
_OPTIONAL_WORDS = frozenset({"alpha-beta", "thymus-derived", "human", "mouse", "mammalian"})

_SPECIES_WORDS = frozenset({"human", "mouse"})

# Modifiers implied by a positive marker: "Naive Cytotoxic" with CD8 means a naive CD8 T cell.
_IMPLIED_BY_MARKER = {"cytotoxic": "cd8", "helper": "cd4"}

_T_LINEAGE_MARKERS = frozenset({"cd3", "cd4", "cd8"})

# ---------------------------------------------------------------------------------------------------
# The parser: one per process, built on first use.


@functools.cache
def _parser():
    """Return the process-wide :class:`OntologyParser` (built on first call, then reused)."""
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    return OntologyParser()


def term_label(term_id: str) -> str:
    """The ontology label of a term id (``"CL:0000236"`` -> ``"B cell"``), or ``""`` when it has none.

    CELLxGENE's special values keep the parser's answer ("unknown" -> "unknown"); ids the bundled
    ontologies do not know give ``""`` rather than an error: callers show the label next to the id.
    """
    try:
        return str(_parser().get_term_label(term_id))
    except Exception:  # the parser raises ValueError for unknown ids and prefixes
        return ""


def _ontology_terms(ontology: str) -> dict[str, Any]:
    """The raw term table of one ontology (decompressed once per process by the package's cache)."""
    return _parser().cxg_schema.ontology(ontology)


def _prefix(term_id: str) -> str:
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
    prefix = _prefix(term_id)
    if prefix not in allowed:
        raise LangCellError(
            f"{term_id!r} is not a valid {aspect} term id: {aspect} takes terms of "
            f"{', '.join(allowed)} written as PREFIX:NUMBER (for example {_EXAMPLES[aspect]!r}), or 'unknown'; "
            f"fix the {aspect}_ontology_term_id values (CELLxGENE schema)"
        )
    if prefix == "NCBITaxon" and term_id in ORGANISMS:
        return prefix
    parser = _parser()
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


_EXAMPLES = {
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
    if _prefix(term_id) == "NCBITaxon" and not _warned_taxonomy:
        _warned_taxonomy = True
        warnings.warn(
            f"{term_id} is not in langcell.ontology.ORGANISMS: loading the full NCBI taxonomy "
            "(about 16 s and 3 GB of memory, once per process)",
            stacklevel=3,
        )
    parser = _parser()
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
    if term_id.lower() in _NO_TEXT_VALUES:
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
            f"term ids must be strings like {_EXAMPLES[aspect]!r}, got {term_id!r} of type "
            f"{type(term_id).__name__}; convert the column to strings"
        )
    if max_synonyms < 0 or max_parents < 0:
        raise LangCellError("max_synonyms and max_parents must be >= 0; pass 0 to leave them out")
    return _term_text_cached(term_id.strip(), aspect, int(max_synonyms), int(max_parents))


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
                    f"ids in that column: add it (e.g. {_EXAMPLES[aspect]!r} per cell), or pass strict=False "
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


# ---------------------------------------------------------------------------------------------------
# Label -> term


@dataclass(frozen=True)
class _ParsedName:
    """A cell-type name split into its markers and the remaining words."""

    markers: frozenset[tuple[str, str]]  # (marker name lower case, sign: positive/negative/low/high/...)
    core: str  # remaining words, normalised, space-separated
    relaxed_core: str  # core without the optional qualifiers of _OPTIONAL_WORDS


_SIGN_WORDS = {
    "positive": "positive",
    "negative": "negative",
    "low": "low",
    "lo": "low",
    "dim": "low",
    "high": "high",
    "hi": "high",
    "bright": "high",
    "intermediate": "intermediate",
    "int": "intermediate",
    "+": "positive",
    "-": "negative",
    "++": "high",
    "+/-": "low",
}
# "CD8-alpha-positive", "Kit-positive", "CD56-bright": the CL style, any marker name.
_WORD_MARKER = re.compile(
    r"(?<![\w.])([a-z][a-z0-9.]*(?:-alpha(?:-beta)?|-beta)?)-(positive|negative|low|high|bright|dim|intermediate)\b"
)
# "CD14+", "CD25-", "CD56bright", "CD14lo", "CD16+CD56+": a name with a digit, then a sign.
_SYMBOL_MARKER = re.compile(
    r"(?<![\w.])([a-z][a-z0-9.]*?\d[a-z0-9.]*?)(\+\+|\+/-|\+|-(?=$|[\s/,;:)+]|cd\d)|lo|low|hi|high|dim|bright|int)"
    r"(?![a-z0-9])"
)
_BARE_CD = re.compile(r"(?<![\w.])(cd\d+[a-z]?)(?![\w+-])")


def _marker_name(name: str) -> str:
    name = name.strip(".")
    return GENE_TO_CD.get(name, name)


@functools.cache
def _singular_vocabulary(ontology: str) -> frozenset[str]:
    words = set()
    for term in _ontology_terms(ontology).values():
        for name in [term["label"], *term.get("synonyms", [])]:
            words.update(re.split(r"[\s,/()]+", name.lower()))
    return frozenset(words)


def _singularise(word: str, vocabulary: frozenset[str]) -> str:
    """'monocytes' -> 'monocyte', 'cells' -> 'cell': a plural whose singular is a word of the ontology.

    Applied to labels and to the ontology's own names alike, so plural synonyms ("... T cells") match too.
    """
    if len(word) < 4 or not word.endswith("s") or word.endswith("ss"):
        return word
    for plural, singular in (("ies", "y"), ("s", ""), ("es", "")):
        if word.endswith(plural) and word[: -len(plural)] + singular in vocabulary:
            return word[: -len(plural)] + singular
    return word


def _words(text: str, vocabulary: frozenset[str]) -> list[str]:
    text = text.replace("naïve", "naive").replace("/", " ").replace(",", " ").replace(";", " ")
    text = re.sub(r"[()\[\]]", " ", text)
    words = [_singularise(word, vocabulary) for word in text.split()]
    joined = " ".join(words)
    # "T-cell", "T lymphocyte", "B-lymphocyte": one spelling for the lymphocyte lineages.
    joined = re.sub(r"\b([tb])[- ](cell|lymphocyte)\b", r"\1 cell", joined)
    return joined.split()


def _expand_abbreviations(words: list[str]) -> list[str]:
    # One pass over all abbreviations, longest first, so that an expansion is never expanded again.
    text = " " + " ".join(words) + " "
    text = _abbreviation_pattern().sub(lambda match: ABBREVIATIONS[match.group(0)], text)
    # "NK cells" -> "natural killer cell cell" -> "natural killer cell"
    text = re.sub(r"\bcell(?: cell)+\b", "cell", text)
    return text.split()


@functools.cache
def _abbreviation_pattern() -> re.Pattern:
    keys = sorted(ABBREVIATIONS, key=len, reverse=True)
    return re.compile(r"(?<=\s)(?:" + "|".join(re.escape(key) for key in keys) + r")(?=\s)")


def _parse_name(name: str, ontology: str, *, query: bool) -> _ParsedName:
    """Split a name into markers and words; ``query`` adds the label-only rules (abbreviations, nouns)."""
    vocabulary = _singular_vocabulary(ontology)
    text = f" {name.lower()} "
    markers: dict[str, str] = {}
    if ontology == "CL":

        def take(match: re.Match) -> str:
            markers[_marker_name(match.group(1))] = _SIGN_WORDS[match.group(2)]
            return " "

        text = _WORD_MARKER.sub(take, text)
        text = _SYMBOL_MARKER.sub(take, text)
        if query:
            # "CD4 T", "CD4+/CD25 T Reg": a CD name without a sign, in a label, means positive.
            def take_bare(match: re.Match) -> str:
                markers.setdefault(_marker_name(match.group(1)), "positive")
                return " "

            text = _BARE_CD.sub(take_bare, text)
    words = _words(text, vocabulary)
    if ontology == "CL" and query:
        words = _expand_abbreviations(words)
        positive = {marker for marker, sign in markers.items() if sign in ("positive", "high")}
        if not words:
            for marker, cell_type in MARKER_ONLY_TYPES.items():
                if marker in positive:
                    words = cell_type.split()
                    break
        elif (kept := [w for w in words if w not in _OPTIONAL_WORDS]) and kept[-1] not in _head_nouns(
            ontology
        ):
            words += ["t", "cell"] if positive & _T_LINEAGE_MARKERS else ["cell"]
    core = " ".join(words)
    relaxed = " ".join(word for word in words if word not in _OPTIONAL_WORDS)
    return _ParsedName(frozenset(markers.items()), core, relaxed)


@functools.cache
def _head_nouns(ontology: str) -> frozenset[str]:
    """Last words of live term names ('cell', 'monocyte', ...): a label ending in one names a cell."""
    nouns = set()
    for entry in _name_index(ontology):
        words = entry.parsed.relaxed_core.split()
        if words:
            nouns.add(words[-1])
    return frozenset(nouns)


@dataclass(frozen=True)
class _IndexEntry:
    term_id: str
    name: str  # the label or synonym as CL writes it
    is_label: bool
    parsed: _ParsedName


@functools.cache
def _name_index(ontology: str) -> tuple[_IndexEntry, ...]:
    """Every label and synonym of the live terms of an ontology, parsed once per process."""
    entries = []
    for term_id, term in _ontology_terms(ontology).items():
        if term.get("deprecated") or not term_id.startswith(f"{ontology}:"):
            continue
        entries.append(
            _IndexEntry(term_id, term["label"], True, _parse_name(term["label"], ontology, query=False))
        )
        for synonym in term.get("synonyms", []):
            entries.append(_IndexEntry(term_id, synonym, False, _parse_name(synonym, ontology, query=False)))
    return tuple(entries)


@functools.cache
def _entries_by_core(ontology: str) -> dict[str, tuple[_IndexEntry, ...]]:
    grouped: dict[str, list[_IndexEntry]] = {}
    for entry in _name_index(ontology):
        grouped.setdefault(entry.parsed.relaxed_core, []).append(entry)
    return {core: tuple(entries) for core, entries in grouped.items()}


@functools.cache
def _exact_maps(ontology: str) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    labels: dict[str, str] = {}
    synonyms: dict[str, set[str]] = {}
    for entry in _name_index(ontology):
        if entry.is_label:
            labels[entry.name] = entry.term_id
        else:
            synonyms.setdefault(entry.name, set()).add(entry.term_id)
    return labels, {name: tuple(sorted(ids)) for name, ids in synonyms.items()}


def _canonical(parsed: _ParsedName) -> str:
    markers = " ".join(f"{name}-{sign}" for name, sign in sorted(parsed.markers))
    return f"{markers} {parsed.core}".strip()


def _match_parsed(parsed: _ParsedName, ontology: str) -> list[str]:
    """Term ids of the best structured matches (one id: resolved; several: a tie)."""
    query_species = _SPECIES_WORDS.intersection(parsed.core.split())
    best_key: tuple[int, int, int] | None = None
    best: set[str] = set()
    for entry in _entries_by_core(ontology).get(parsed.relaxed_core, ()):
        if not entry.parsed.markers <= parsed.markers:
            continue
        entry_species = _SPECIES_WORDS.intersection(entry.parsed.core.split())
        if entry_species and query_species and entry_species != query_species:
            continue  # "..., human" is not the answer to a label that says "mouse"
        key = (len(entry.parsed.markers), int(entry.parsed.core == parsed.core), int(entry.is_label))
        if best_key is None or key > best_key:
            best_key, best = key, {entry.term_id}
        elif key == best_key:
            best.add(entry.term_id)
    return sorted(best)


def _closest_names(label: str, ontology: str, n: int = 5) -> list[str]:
    """Up to ``n`` 'name (id)' strings closest to the label, for error messages."""
    index = _name_index(ontology)
    by_name: dict[str, str] = {}
    for entry in index:
        by_name.setdefault(entry.name.lower(), entry.term_id)
    query = label.lower()
    expanded = _parse_name(label, ontology, query=True).core
    found: list[str] = []
    seen_ids: set[str] = set()
    # Names that contain the label's words ("nk t cell" in "mature nk t cell") first, shortest first: difflib
    # alone ranks short unrelated names ("n cell") above them.
    if expanded:
        pattern = re.compile(rf"(?:^|\s){re.escape(expanded)}(?:\s|$)")
        containing = sorted(
            (entry for entry in index if pattern.search(entry.parsed.core)), key=lambda entry: len(entry.name)
        )
        for entry in containing[:n]:
            if entry.term_id not in seen_ids:
                seen_ids.add(entry.term_id)
                found.append(f"{entry.name.lower()!r} ({entry.term_id})")
    for probe in dict.fromkeys([query, expanded]):
        for name in difflib.get_close_matches(probe, list(by_name), n=3 * n, cutoff=0.4):
            term_id = by_name[name]
            if term_id not in seen_ids:
                seen_ids.add(term_id)
                found.append(f"{name!r} ({term_id})")
    return found[:n]


def _load_mapping(mapping: Mapping[str, str] | str | Path | None, what: str) -> dict[str, str]:
    """A {label: value} dict from a dict, or a JSON / two-column TSV file."""
    if mapping is None:
        return {}
    if isinstance(mapping, Mapping):
        return {str(key): str(value) for key, value in mapping.items()}
    path = Path(mapping)
    if not path.is_file():
        raise LangCellError(
            f"{what} file {str(path)!r} does not exist; pass a dict or the path of a JSON/TSV file"
        )
    if path.suffix.lower() == ".json":
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise LangCellError(
                f"{what} file {str(path)!r} is not valid JSON ({error}); fix the file"
            ) from None
        if not isinstance(loaded, dict):
            raise LangCellError(f"{what} file {str(path)!r} must hold one JSON object {{label: value}}")
        return {str(key): str(value) for key, value in loaded.items()}
    result: dict[str, str] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for line_number, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not row or not "".join(row).strip() or row[0].startswith("#"):
                continue
            if len(row) != 2:
                raise LangCellError(
                    f"{what} file {str(path)!r} line {line_number} has {len(row)} tab-separated fields; "
                    "write two per line: label<TAB>value"
                )
            result[row[0].strip()] = row[1].strip()
    return result


def _check_labels(labels: Iterable[Any]) -> list[str]:
    if isinstance(labels, str):
        raise LangCellError("labels must be a list of labels, not one string; wrap it: [label]")
    if isinstance(labels, pd.Series) and isinstance(labels.dtype, pd.CategoricalDtype):
        labels = labels.cat.categories
    labels = list(labels)
    if not labels:
        raise LangCellError("no labels given; pass at least one cell-type label")
    bad = [label for label in labels if not isinstance(label, str) or not label.strip()]
    if bad:
        raise LangCellError(f"labels must be non-empty strings; got {bad[:5]!r}: drop or name them")
    duplicated = sorted(label for label, count in Counter(labels).items() if count > 1)
    if duplicated:
        raise LangCellError(f"labels are duplicated: {duplicated[:5]!r}; pass each label once (use unique())")
    return labels


_TERM_ID = re.compile(r"^([A-Za-z]+)[:_](\d+)$")


def _checked_mapping_target(label: str, term_id: str, ontology: str) -> str:
    term_id = term_id.strip().replace("_", ":", 1) if _TERM_ID.match(term_id.strip()) else term_id.strip()
    parser = _parser()
    if _prefix(term_id) != ontology or not parser.is_valid_term_id(term_id, ontology):
        raise LangCellError(
            f"mapping gives {term_id!r} for label {label!r}, which is not a {ontology} term id; "
            f"use an id like {_EXAMPLES['cell_type'] if ontology == 'CL' else ontology + ':0000000'!r}"
        )
    if parser.is_term_deprecated(term_id):
        replacement = parser.get_term_replacement(term_id)
        raise LangCellError(
            f"mapping gives the deprecated term {term_id!r} for label {label!r}; "
            + (f"use {replacement} instead" if replacement else f"choose a current {ontology} term")
        )
    return term_id


def _resolve_one(label: str, mapping: dict[str, str], ontology: str) -> tuple[str, str] | str:
    """(term id, how) for one label, or an error message naming the problem."""
    parser = _parser()
    if label in mapping:
        return _checked_mapping_target(label, mapping[label], ontology), "user mapping"
    stripped = label.strip()
    id_match = _TERM_ID.match(stripped)
    if id_match and id_match.group(1).lower() == ontology.lower():
        term_id = f"{ontology}:{id_match.group(2)}"
        if not parser.is_valid_term_id(term_id, ontology):
            return f"{label!r} looks like a term id but is not a {ontology} term"
        if parser.is_term_deprecated(term_id):
            replacement = parser.get_term_replacement(term_id)
            return f"{label!r} is a deprecated {ontology} term" + (
                f" (use {replacement})" if replacement else ""
            )
        return term_id, "term id"
    labels, synonyms = _exact_maps(ontology)
    if stripped in labels:
        return labels[stripped], "exact label"
    if " ".join(stripped.lower().split()) in _NOT_CELL_TYPES:
        return (
            f"{label!r} is a placeholder or exclusion label, not a cell type; drop those cells before annotating, "
            "or give it a text with descriptions={label: text}"
        )
    parsed = _parse_name(stripped, ontology, query=True)
    curated = CURATED_LABELS.get(_canonical(parsed)) if ontology == "CL" else None
    if curated:
        return curated, "normalised"
    if stripped in synonyms:
        ids = synonyms[stripped]
        if len(ids) == 1:
            return ids[0], "synonym"
        names = ", ".join(f"{parser.get_term_label(i)!r} ({i})" for i in ids[:5])
        return f"{label!r} is a synonym of several terms: {names}"
    matches = _match_parsed(parsed, ontology)
    if not matches and ontology == "CL":
        # "naive cytotoxic t cell" with CD8: CL says "naive CD8-positive T cell"; the marker implies the word.
        positive = {name for name, sign in parsed.markers if sign in ("positive", "high")}
        words = [w for w in parsed.core.split() if _IMPLIED_BY_MARKER.get(w) not in positive]
        if len(words) < len(parsed.core.split()):
            core = " ".join(words)
            relaxed = " ".join(w for w in words if w not in _OPTIONAL_WORDS)
            matches = _match_parsed(_ParsedName(parsed.markers, core, relaxed), ontology)
    if len(matches) == 1:
        return matches[0], "normalised"
    if len(matches) > 1:
        names = ", ".join(f"{parser.get_term_label(i)!r} ({i})" for i in matches[:5])
        return f"{label!r} is ambiguous: it matches {names}"
    candidates = _closest_names(stripped, ontology)
    return f"{label!r} matches no {ontology} term" + (
        f"; closest: {', '.join(candidates)}" if candidates else ""
    )


def resolve_labels(
    labels: Iterable[str],
    *,
    mapping: Mapping[str, str] | str | Path | None = None,
    ontology: str = "CL",
) -> pd.DataFrame:
    """Resolve free-text labels to ontology terms (Cell Ontology by default).

    Parameters
    ----------
    labels
        Distinct labels, e.g. ``adata.obs["cell_type"].cat.categories``.
    mapping
        Labels to resolve by hand: a dict ``{label: "CL:..."}`` or the path of a JSON object or a
        two-column TSV file (label, term id). It is consulted first and overrides everything else.
    ontology
        The ontology to resolve into ("CL"; UBERON, MONDO, ... get exact, synonym and case/plural
        matching but not the cell-type abbreviations and marker rules).

    Returns
    -------
    pandas.DataFrame
        One row per label, in the given order, with columns ``label``, ``term_id``, ``term_label`` and
        ``how`` ("term id", "exact label", "synonym", "normalised" or "user mapping").

    Raises
    ------
    LangCellError
        For no labels, duplicated labels, a bad mapping, or any label that is ambiguous or matches
        nothing. The message lists every such label with up to 5 candidate terms and the fix.
    """
    labels = _check_labels(labels)
    if (
        not isinstance(ontology, str)
        or ontology not in _parser().cxg_schema.supported_ontologies
        or ontology in ("NCBITaxon",)
    ):
        raise LangCellError(
            f"cannot resolve labels into ontology {ontology!r}; use 'CL' (cell types), 'UBERON', 'MONDO', ..."
        )
    user_mapping = _load_mapping(mapping, "mapping")
    rows, problems = [], []
    for label in labels:
        outcome = _resolve_one(label, user_mapping, ontology)
        if isinstance(outcome, str):
            problems.append(outcome)
        else:
            term_id, how = outcome
            rows.append(
                {
                    "label": label,
                    "term_id": term_id,
                    "term_label": _parser().get_term_label(term_id),
                    "how": how,
                }
            )
    if problems:
        raise LangCellError(
            f"{len(problems)} of {len(labels)} labels could not be resolved to {ontology} terms: "
            + "; ".join(problems)
            + f". Fix: pass mapping={{label: '{ontology}:...'}} (a dict, or a JSON/TSV file of label -> term id) "
            "for the labels that name a term, and leave out labels that do not"
        )
    return pd.DataFrame(rows, columns=["label", "term_id", "term_label", "how"])


def label_texts(
    labels: Iterable[str],
    *,
    descriptions: Mapping[str, str] | str | Path | None = None,
    mapping: Mapping[str, str] | str | Path | None = None,
) -> tuple[dict[str, str], pd.DataFrame]:
    """Class texts for zero-shot annotation: one cell-type text per label.

    Parameters
    ----------
    labels
        The candidate class labels (distinct).
    descriptions
        The user's own texts, ``{label: text}`` or the path of a JSON object (or a two-column TSV);
        a label found here keeps its text and is not resolved.
    mapping
        Passed to :func:`resolve_labels` for the other labels.

    Returns
    -------
    texts : dict
        ``{label: text}`` in the order of ``labels``.
    table : pandas.DataFrame
        The resolution table of :func:`resolve_labels`; labels with a user text have ``how`` set to
        ``"user description"`` and no term id.

    Raises
    ------
    LangCellError
        As :func:`resolve_labels`, and for an empty user description.
    """
    labels = _check_labels(labels)
    user_texts = _load_mapping(descriptions, "descriptions")
    empty = [label for label in labels if label in user_texts and not user_texts[label].strip()]
    if empty:
        raise LangCellError(
            f"descriptions for {empty[:5]!r} are empty; write a sentence per label or leave it out"
        )
    to_resolve = [label for label in labels if label not in user_texts]
    resolved = resolve_labels(to_resolve, mapping=mapping) if to_resolve else None
    by_label = {} if resolved is None else {row.label: row for row in resolved.itertuples(index=False)}
    texts, rows = {}, []
    for label in labels:
        if label in user_texts:
            texts[label] = " ".join(user_texts[label].split())
            rows.append({"label": label, "term_id": None, "term_label": None, "how": "user description"})
        else:
            row = by_label[label]
            texts[label] = term_text(row.term_id, "cell_type")
            rows.append(row._asdict())
    return texts, pd.DataFrame(rows, columns=["label", "term_id", "term_label", "how"])

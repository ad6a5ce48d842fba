"""Free-text cell-type labels to Cell Ontology terms (and so to the texts of :mod:`.texts`).

Zero-shot annotation needs a user's own labels ("CD14+ Mono", "NK cells") resolved to Cell Ontology (CL)
terms, so that each class gets the same kind of text the model was trained on.

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
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import LangCellError
from .texts import EXAMPLE_TERM_IDS, ontology_parser, ontology_terms, term_prefix, term_text

__all__ = ["ABBREVIATIONS", "CURATED_LABELS", "GENE_TO_CD", "MARKER_ONLY_TYPES", "label_texts", "resolve_labels"]

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
    for term in ontology_terms(ontology).values():
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
    for term_id, term in ontology_terms(ontology).items():
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


def read_label_table(mapping: Mapping[str, str] | str | Path | None, what: str) -> dict[str, str]:
    """A ``{label: value}`` dict from a dict, or a JSON object / two-column TSV file (UTF-8).

    ``what`` names the table in error messages (``"mapping"``, ``"descriptions"``).
    """
    if mapping is None:
        return {}
    if isinstance(mapping, Mapping):
        return {str(key): str(value) for key, value in mapping.items()}
    path = Path(mapping)
    if not path.is_file():
        raise LangCellError(
            f"{what} file {str(path)!r} does not exist or is not a file; pass a dict or the path of a JSON/TSV file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LangCellError(f"{what} file {str(path)!r} is not UTF-8 text; save it as UTF-8 JSON or TSV") from None
    if path.suffix.lower() == ".json":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as error:
            raise LangCellError(
                f"{what} file {str(path)!r} is not valid JSON ({error}); fix the file"
            ) from None
        if not isinstance(loaded, dict):
            raise LangCellError(f"{what} file {str(path)!r} must hold one JSON object {{label: value}}")
        return {str(key): str(value) for key, value in loaded.items()}
    result: dict[str, str] = {}
    for line_number, row in enumerate(csv.reader(io.StringIO(text, newline=""), delimiter="\t"), start=1):
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
    parser = ontology_parser()
    if term_prefix(term_id) != ontology or not parser.is_valid_term_id(term_id, ontology):
        raise LangCellError(
            f"mapping gives {term_id!r} for label {label!r}, which is not a {ontology} term id; "
            f"use an id like {EXAMPLE_TERM_IDS['cell_type'] if ontology == 'CL' else ontology + ':0000000'!r}"
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
    parser = ontology_parser()
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
        or ontology not in ontology_parser().cxg_schema.supported_ontologies
        or ontology in ("NCBITaxon",)
    ):
        raise LangCellError(
            f"cannot resolve labels into ontology {ontology!r}; use 'CL' (cell types), 'UBERON', 'MONDO', ..."
        )
    user_mapping = read_label_table(mapping, "mapping")
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
                    "term_label": ontology_parser().get_term_label(term_id),
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
    user_texts = read_label_table(descriptions, "descriptions")
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

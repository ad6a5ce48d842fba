"""Gene identifiers: detect what a dataset's gene names are, map them to Ensembl gene ids, sum duplicates.

LangCell's gene vocabulary is made of versionless Ensembl gene ids (Geneformer's token dictionary), while
most count matrices name their genes by symbol, by versioned Ensembl id, or by a mix of both, and often
carry features that are not genes at all (ERCC spike-ins, transcript ids). This module turns any of these
into versionless Ensembl gene ids and says exactly what happened to every feature:

* :func:`map_to_ensembl` maps names to ids and returns a :class:`GeneMappingReport`;
* :func:`collapse_columns` sums matrix columns that map to the same id, and restricts a matrix to a
  vocabulary, in one sparse product with :func:`selection_matrix`;
* :func:`load_gene_table` reads the packaged GENCODE symbol tables (v48 human, M37 mouse; see
  ``data/GENE_TABLES.md`` for their provenance).

Symbol lookup rules
-------------------
1. A name that matches :data:`ENSEMBL_PATTERN` is an Ensembl gene id: its version (``.17``) and any
   ``_PAR_Y`` suffix are stripped. It is mapped when its species prefix matches the organism (``ENSG``
   for human, ``ENSMUSG`` for mouse), even when the id is absent from the packaged GENCODE release
   (retired or newer ids are still valid vocabulary keys; they are counted in ``n_ids_not_in_table``).
   An id of another species is unmapped.
2. Any other name is a symbol. It is looked up exactly (case-sensitive) in the organism's table first.
3. Failing that, a name written entirely in upper case or entirely in lower case (the forms a blanket
   case conversion produces, e.g. ``CD3E`` for mouse ``Cd3e`` or ``cd3e`` for human ``CD3E``) is looked
   up case-insensitively. Mixed-case names get no second chance, so mouse symbols such as ``Cd3e`` given
   with ``organism="human"`` stay unmapped instead of silently turning into their human orthologues.
4. A symbol that names several Ensembl ids resolves deterministically to one: ``protein_coding`` genes
   first, then the lowest Ensembl id (ids in ``prefer``, e.g. a model vocabulary, before all others when
   given); it is counted as ambiguous.
5. With a model vocabulary's own name dictionary (``name_dictionary=``, e.g. Geneformer's
   ``gene_name_id_dict``), a symbol is looked up there first, exactly; rules 2-4 then apply only to the
   symbols it lacks, and never map onto an id the dictionary gives another symbol.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import LangCellError

__all__ = [
    "ENSEMBL_PATTERN",
    "NON_GENE_PATTERN",
    "ORGANISMS",
    "GeneMappingReport",
    "collapse_columns",
    "detect_id_kind",
    "detect_organism",
    "load_gene_table",
    "map_to_ensembl",
    "normalize_organism",
    "selection_matrix",
    "strip_version",
]

# An Ensembl *gene* id: "ENS", a species code of up to three capitals ("" human, "MUS" mouse, "DAR"
# zebrafish, ...), "G", eleven digits; then an optional ".version" and the "_PAR_Y" suffix GENCODE put on
# pseudoautosomal copies on chromosome Y before release 44.
ENSEMBL_PATTERN = re.compile(
    r"^(?P<id>ENS(?P<species>[A-Z]{0,3})G\d{11})(?P<version>\.\d+)?(?P<par>_PAR_Y)?$"
)

# Features that are not genes: ERCC spike-in controls (ERCC-00002; note that ERCC1..ERCC8 are real human
# genes and are not matched) and Ensembl transcript (T), protein (P), exon (E) and regulatory (R) ids.
NON_GENE_PATTERN = re.compile(r"^(?:ERCC-\d{5}|ENS[A-Z]{0,3}[TPER]\d{11}(?:\.\d+)?)$")

# Organisms with a packaged table, and the Ensembl species code of their gene ids.
ORGANISMS = ("human", "mouse")
_SPECIES_CODE = {"human": "", "mouse": "MUS"}
_RELEASE = {"human": "GENCODE v48", "mouse": "GENCODE M37"}
_ORGANISM_ALIASES = {
    "human": "human",
    "homo sapiens": "human",
    "homo_sapiens": "human",
    "hsapiens": "human",
    "ncbitaxon:9606": "human",
    "mouse": "mouse",
    "mus musculus": "mouse",
    "mus_musculus": "mouse",
    "mmusculus": "mouse",
    "ncbitaxon:10090": "mouse",
}

# detect_id_kind: among names that are not non-gene features, at least this fraction of Ensembl gene ids
# makes a dataset "ensembl", at most SYMBOL_KIND_MAX_ENSEMBL_FRACTION makes it "symbol", anything between
# is "mixed". The margins tolerate a few odd features (transgenes, unnamed genes written as ids).
ENSEMBL_KIND_MIN_FRACTION = 0.9
SYMBOL_KIND_MAX_ENSEMBL_FRACTION = 0.1

# detect_organism by symbols: the winning table must match at least this fraction of the gene-like names
# exactly, and strictly more names than the other table.
ORGANISM_MIN_SYMBOL_FRACTION = 0.1

# How many example names each report list keeps.
MAX_EXAMPLES = 10

AMBIGUITY_RULE = "protein_coding first, then the lowest Ensembl id"
_KIND_TEXT = {"ensembl": "Ensembl ids", "symbol": "gene symbols", "mixed": "a mix of symbols and Ensembl ids"}


# --------------------------------------------------------------------------------------------------------
# Names and ids
# --------------------------------------------------------------------------------------------------------


def _as_names(names: object, *, what: str = "gene names") -> np.ndarray:
    """Return ``names`` as a 1-D object array of ``str``, missing values as ``""``.

    Raises
    ------
    LangCellError
        If ``names`` is a single string, not one-dimensional, or empty.
    """
    if isinstance(names, str | bytes):
        raise LangCellError(
            f"expected a list of {what}, got the single string {names!r}; pass a list (e.g. adata.var_names)"
        )
    if isinstance(names, pd.Series | pd.Index):
        values = names.to_numpy(dtype=object, na_value=None)
    else:
        values = np.asarray(list(names) if not isinstance(names, np.ndarray) else names, dtype=object)
    if values.ndim != 1:
        raise LangCellError(
            f"expected a one-dimensional list of {what}, got an array of shape {values.shape}; pass "
            "adata.var_names or one column of adata.var"
        )
    if values.size == 0:
        raise LangCellError(
            f"the list of {what} is empty; pass the var names of a dataset with at least one gene"
        )
    out = np.empty(values.size, dtype=object)
    for position, value in enumerate(values):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            out[position] = ""
        elif isinstance(value, bytes):
            out[position] = value.decode("utf-8", errors="replace").strip()
        else:
            out[position] = str(value).strip()
    return out


def _parse_ensembl(names: np.ndarray) -> pd.DataFrame:
    """Split names into the groups of :data:`ENSEMBL_PATTERN` (``id``, ``species``, ``version``, ``par``).

    Rows that are not Ensembl gene ids hold NaN in every column.
    """
    return pd.Series(names, dtype=object).str.extract(ENSEMBL_PATTERN)


def _non_gene_mask(names: np.ndarray) -> np.ndarray:
    """True for features that are not genes: spike-ins, transcript/protein ids and empty names."""
    series = pd.Series(names, dtype=object)
    return (series.str.match(NON_GENE_PATTERN).fillna(False) | (series == "")).to_numpy(dtype=bool)


def strip_version(ids: Iterable[object]) -> np.ndarray:
    """Remove the version (and any ``_PAR_Y`` suffix) from Ensembl gene ids.

    Parameters
    ----------
    ids
        Gene names; anything that does not match :data:`ENSEMBL_PATTERN` (symbols such as
        ``RP11-34P13.7``, transcript ids, missing values) is returned unchanged.

    Returns
    -------
    numpy.ndarray
        Object array aligned with ``ids``; ``"ENSG00000141510.17"`` becomes ``"ENSG00000141510"``.
    """
    if isinstance(ids, str):
        ids = [ids]
    values = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=object).ravel()
    if values.size == 0:
        return values.copy()
    as_text = np.array([value if isinstance(value, str) else "" for value in values], dtype=object)
    base = _parse_ensembl(as_text)["id"].to_numpy(dtype=object)
    is_gene_id = pd.notna(base)
    out = values.copy()
    out[is_gene_id] = base[is_gene_id]
    return out


def detect_id_kind(names: Iterable[object]) -> str:
    """Say whether gene names are Ensembl gene ids, symbols, or a mix.

    Non-gene features (ERCC spike-ins, transcript/protein ids, empty names) are left out of the count.
    Of the rest, a fraction of Ensembl gene ids of at least ``ENSEMBL_KIND_MIN_FRACTION`` (0.9) gives
    ``"ensembl"``, at most ``SYMBOL_KIND_MAX_ENSEMBL_FRACTION`` (0.1) gives ``"symbol"``, and anything
    in between ``"mixed"``. With no gene-like name at all the answer is ``"symbol"`` (nothing looks like
    an id).

    Parameters
    ----------
    names
        Gene names, e.g. ``adata.var_names`` or a column of ``adata.var``.

    Returns
    -------
    str
        ``"ensembl"``, ``"symbol"`` or ``"mixed"``.

    Raises
    ------
    LangCellError
        If ``names`` is empty.
    """
    values = _as_names(names)
    return _id_kind(_parse_ensembl(values)["id"].notna().to_numpy(), _non_gene_mask(values))


def _id_kind(is_ensembl: np.ndarray, is_non_gene: np.ndarray) -> str:
    """:func:`detect_id_kind` on pre-computed masks."""
    n_gene_like = int((~is_non_gene).sum())
    if n_gene_like == 0:
        return "symbol"
    fraction = float((is_ensembl & ~is_non_gene).sum()) / n_gene_like
    if fraction >= ENSEMBL_KIND_MIN_FRACTION:
        return "ensembl"
    if fraction <= SYMBOL_KIND_MAX_ENSEMBL_FRACTION:
        return "symbol"
    return "mixed"


# --------------------------------------------------------------------------------------------------------
# Packaged tables
# --------------------------------------------------------------------------------------------------------


def normalize_organism(organism: str) -> str:
    """Return the canonical organism name (``"human"`` or ``"mouse"``) for ``organism``.

    Accepts the canonical names, the binomials (``"Homo sapiens"``, ``"mus_musculus"``) and the NCBI
    taxon terms CELLxGENE uses (``"NCBITaxon:9606"``, ``"NCBITaxon:10090"``), in any case.

    Raises
    ------
    LangCellError
        If the organism has no packaged gene table.
    """
    key = str(organism).strip().lower()
    if key not in _ORGANISM_ALIASES:
        raise LangCellError(
            f"unknown organism {organism!r}; use one of {', '.join(repr(o) for o in ORGANISMS)} "
            "(gene tables are packaged for human and mouse only)"
        )
    return _ORGANISM_ALIASES[key]


@functools.cache
def _read_table(organism: str) -> pd.DataFrame:
    """Read one packaged table once per process (callers get copies)."""
    resource = resources.files("langcell").joinpath("data", f"genes_{organism}.tsv.gz")
    with resources.as_file(resource) as path:
        if not path.is_file():
            raise LangCellError(
                f"the packaged gene table {path} is missing; reinstall langcell, or rebuild it with "
                "`python scripts/build_gene_tables.py` from a source checkout"
            )
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    return table


def load_gene_table(organism: str) -> pd.DataFrame:
    """Load the packaged GENCODE gene table of an organism.

    Parameters
    ----------
    organism
        ``"human"`` (GENCODE v48) or ``"mouse"`` (GENCODE M37); see :func:`normalize_organism` for the
        accepted spellings.

    Returns
    -------
    pandas.DataFrame
        Columns ``ensembl_id`` (versionless), ``symbol`` (``""`` for genes GENCODE does not name) and
        ``biotype``, one row per gene, sorted by ``ensembl_id``. The file is read once per process; each
        call returns a fresh copy, so callers may modify it.

    Raises
    ------
    LangCellError
        If the organism is unknown.
    """
    return _read_table(normalize_organism(organism)).copy()


@dataclass(frozen=True)
class _SymbolIndex:
    """Symbol lookups for one organism, built once from its table."""

    exact: dict[str, str]  # symbol -> the Ensembl id it resolves to by default
    upper: dict[str, str]  # upper-cased symbol -> the Ensembl id it resolves to by default
    exact_choices: dict[str, tuple[str, ...]]  # symbol -> all its ids in preference order, if more than one
    upper_choices: dict[str, tuple[str, ...]]  # the same for upper-cased symbols
    ids: frozenset[str]  # every Ensembl id in the table


def _resolve(table: pd.DataFrame, key: pd.Series) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """Resolve each key to one id and list the choices of keys that name several ids.

    The order of preference is: ``protein_coding`` genes first, then the lowest Ensembl id (ids have a
    fixed width, so string order is numeric order).
    """
    ordered = table.assign(
        _key=key, _not_coding=(table["biotype"] != "protein_coding").astype(np.int8)
    ).sort_values(["_key", "_not_coding", "ensembl_id"], kind="stable")
    chosen = ordered.drop_duplicates("_key", keep="first")
    several = ordered[ordered["_key"].duplicated(keep=False)]
    choices = {key: tuple(group) for key, group in several.groupby("_key", sort=False)["ensembl_id"]}
    return dict(zip(chosen["_key"], chosen["ensembl_id"], strict=True)), choices


@functools.cache
def _symbol_index(organism: str) -> _SymbolIndex:
    """Build (once per process) the symbol lookups of an organism."""
    table = _read_table(organism)
    named = table[table["symbol"] != ""]
    exact, exact_choices = _resolve(named, named["symbol"])
    upper, upper_choices = _resolve(named, named["symbol"].str.upper())
    return _SymbolIndex(exact, upper, exact_choices, upper_choices, frozenset(table["ensembl_id"]))


def detect_organism(names: Iterable[object]) -> str | None:
    """Guess the organism of a list of gene names.

    Ensembl gene ids decide by their prefix: the most common species code among them wins (``ENSG`` is
    human, ``ENSMUSG`` mouse, any other species gives ``None``). Without Ensembl ids, the organism whose
    table matches more names exactly (case-sensitive) wins, if it matches at least
    ``ORGANISM_MIN_SYMBOL_FRACTION`` (10 %) of the gene-like names; otherwise, or on a tie, ``None``.

    Parameters
    ----------
    names
        Gene names, e.g. ``adata.var_names``.

    Returns
    -------
    str or None
        ``"human"``, ``"mouse"``, or ``None`` when the names do not say.

    Raises
    ------
    LangCellError
        If ``names`` is empty.
    """
    values = _as_names(names)
    return _detect_organism(values, _parse_ensembl(values), _non_gene_mask(values))


def _detect_organism(values: np.ndarray, parsed: pd.DataFrame, is_non_gene: np.ndarray) -> str | None:
    """:func:`detect_organism` on pre-computed parts."""
    species = parsed["species"].dropna()
    if len(species):
        most_common = species.value_counts().sort_index().idxmax()
        for organism, code in _SPECIES_CODE.items():
            if most_common == code:
                return organism
        return None
    symbols = pd.Series(values[~is_non_gene], dtype=object)
    if symbols.empty:
        return None
    matches = {
        organism: int(symbols.isin(_symbol_index(organism).exact.keys()).sum()) for organism in ORGANISMS
    }
    best = max(ORGANISMS, key=lambda organism: matches[organism])
    runner_up = max(matches[organism] for organism in ORGANISMS if organism != best)
    if matches[best] <= runner_up or matches[best] < ORGANISM_MIN_SYMBOL_FRACTION * len(symbols):
        return None
    return best


# --------------------------------------------------------------------------------------------------------
# Mapping
# --------------------------------------------------------------------------------------------------------


@dataclass
class GeneMappingReport:
    """What :func:`map_to_ensembl` did with every feature.

    Every feature is counted in exactly one of ``n_mapped``, ``n_unmapped`` and ``n_non_gene``; the
    other counts describe subsets of the mapped features.
    """

    n_features: int  # number of names given
    id_kind: str  # what the names look like: "ensembl", "symbol" or "mixed" (see detect_id_kind)
    organism: str | None  # organism whose table was used (given or detected); None when it could not be told
    n_mapped: int  # features that got an Ensembl gene id
    n_unmapped: int  # gene-like features that got no id (unknown symbol, or an id of another species)
    unmapped_examples: list[str]  # first few unmapped names, in input order
    n_non_gene: int  # features that are not genes: ERCC spike-ins, ENST/ENSP/ENSE/ENSR ids, empty names
    non_gene_examples: list[str]  # first few non-gene names, in input order
    n_version_stripped: int  # Ensembl gene ids given with a version or _PAR_Y suffix that was removed
    n_duplicated: int  # mapped features whose id an earlier feature already has (collapse_columns sums them)
    duplicated_examples: list[str]  # "name -> id (same as earlier_name)" for the first few duplicates
    n_ambiguous_symbols: int  # mapped symbols naming several ids (protein_coding first, then lowest id)
    ambiguous_examples: list[str]  # "symbol -> chosen id (1 of k)" for the first few ambiguous symbols
    n_in_vocabulary: int | None = None  # filled by the tokenizer: mapped ids present in its vocabulary
    n_case_insensitive: int = 0  # mapped symbols found only by the all-upper/lower case-insensitive lookup
    n_ids_not_in_table: int = 0  # mapped Ensembl ids absent from the packaged GENCODE release (kept)
    n_by_name_dictionary: int | None = None  # symbols mapped by the vocabulary's name dictionary; None: none used
    n_by_gene_table: int | None = None  # symbols the name dictionary lacks, mapped by GENCODE (with a dictionary)
    n_other_spellings: int = 0  # unmapped: GENCODE maps them onto an id the name dictionary gives another symbol

    def summary(self) -> str:
        """Return a human-readable, multi-line account of the mapping.

        Returns
        -------
        str
            One line per count, with examples; printed by ``langcell tokenize``.
        """
        total = max(self.n_features, 1)

        def line(label: str, count: int, note: str = "") -> str:
            text = f"  {label:<30}{count:>9,}  ({100.0 * count / total:5.1f}%)"
            return f"{text}  {note}" if note else text

        def examples(items: list[str]) -> str:
            return "e.g. " + ", ".join(items) if items else ""

        if self.id_kind == "custom":
            # Names matched verbatim: nothing was mapped to Ensembl, so only duplicates and coverage matter.
            return "\n".join(
                [
                    f"Gene matching: {self.n_features:,} features (custom names, matched verbatim)",
                    line("matched by name", self.n_mapped),
                    line("duplicates (summed)", self.n_duplicated, examples(self.duplicated_examples)),
                ]
                + (
                    [line("in the model's vocabulary", self.n_in_vocabulary)]
                    if self.n_in_vocabulary is not None
                    else []
                )
            )
        release = _RELEASE.get(self.organism or "", "no table")
        organism = (
            self.organism if self.organism is not None else "unknown (pass organism='human' or 'mouse')"
        )
        kind = _KIND_TEXT.get(self.id_kind, self.id_kind)
        lines = [
            f"Gene mapping: {self.n_features:,} features ({kind}); organism {organism} ({release})",
            line("mapped to Ensembl gene ids", self.n_mapped),
        ]
        if self.n_by_name_dictionary is not None:
            lines.append(line("  of which by name dictionary", self.n_by_name_dictionary, "the vocabulary's own"))
            lines.append(line(f"  of which by {release}", self.n_by_gene_table or 0, "names the dictionary lacks"))
        if self.n_case_insensitive:
            lines.append(line("  of which by case-insensitive", self.n_case_insensitive))
        if self.n_ids_not_in_table:
            lines.append(line(f"  of which ids not in {release}", self.n_ids_not_in_table, "kept as given"))
        lines += [
            line("unmapped", self.n_unmapped, examples(self.unmapped_examples)),
        ]
        if self.n_other_spellings:
            lines.append(
                line("  of which other spellings", self.n_other_spellings, "of genes the dictionary names otherwise")
            )
        lines += [
            line("non-gene features (dropped)", self.n_non_gene, examples(self.non_gene_examples)),
            line("version suffix stripped", self.n_version_stripped),
            line("duplicates (summed)", self.n_duplicated, examples(self.duplicated_examples)),
            line(
                "ambiguous symbols",
                self.n_ambiguous_symbols,
                (f"resolved {AMBIGUITY_RULE}; " + examples(self.ambiguous_examples))
                if self.ambiguous_examples
                else "",
            ),
        ]
        if self.n_in_vocabulary is not None:
            lines.append(line("in the model's vocabulary", self.n_in_vocabulary))
        if self.organism is None and self.id_kind != "ensembl":
            lines.append(
                "  note: symbols cannot be mapped without an organism; pass organism='human' or 'mouse'"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Return the report as a plain, JSON-serialisable dict."""
        return dataclasses.asdict(self)


def _first(items: Iterable[str], limit: int = MAX_EXAMPLES) -> list[str]:
    """The first ``limit`` items as a list."""
    out: list[str] = []
    for item in items:
        if len(out) >= limit:
            break
        out.append(item)
    return out


def map_to_ensembl(
    names: Iterable[object],
    *,
    organism: str | None = None,
    prefer: Collection[str] | None = None,
    name_dictionary: Mapping[str, str] | None = None,
) -> tuple[np.ndarray, GeneMappingReport]:
    """Map gene names (symbols, Ensembl ids or a mix) to versionless Ensembl gene ids.

    See the module docstring for the lookup rules. Each name is mapped on its own, so a mix of symbols
    and Ensembl ids works. Nothing is dropped silently: every feature is counted as mapped, unmapped or
    non-gene in the report.

    Parameters
    ----------
    names
        ``adata.var_names`` or a column of ``adata.var`` (any 1-D sequence of names).
    organism
        ``"human"`` or ``"mouse"`` (or an alias, see :func:`normalize_organism`). ``None`` detects it with
        :func:`detect_organism`; when that fails, Ensembl gene ids are kept as given and symbols are
        unmapped.
    prefer
        Ensembl ids to choose first when a symbol names several (e.g. a tokenizer's vocabulary, so that
        an ambiguous symbol lands on the id the model knows); among the ids of ``prefer``, and when none
        is in it, the default order applies (protein_coding first, then the lowest id).
    name_dictionary
        A model vocabulary's own ``{symbol: Ensembl id}`` table (Geneformer's ``gene_name_id_dict``),
        looked up exactly, before the GENCODE rules. The GENCODE table then maps only the symbols it
        lacks, and never onto an id the dictionary gives another symbol: such a name (``ZHX1-C8ORF76``
        where the dictionary has ``ZHX1-C8orf76``) stays unmapped, as it does in the release's own
        procedure, and is counted in ``n_other_spellings``. The report says how many symbols each table
        mapped (``n_by_name_dictionary``, ``n_by_gene_table``).

    Returns
    -------
    ids : numpy.ndarray
        Object array aligned with ``names``: the Ensembl gene id of each feature, or ``None`` for unmapped
        and non-gene features. Duplicated ids are left in place; :func:`collapse_columns` sums them.
    report : GeneMappingReport
        The counts and examples.

    Raises
    ------
    LangCellError
        If ``names`` is empty or ``organism`` is unknown.
    """
    values = _as_names(names)
    if organism is not None:
        organism = normalize_organism(organism)
    preferred = frozenset(prefer) if prefer is not None else frozenset()
    parsed = _parse_ensembl(values)
    is_non_gene = _non_gene_mask(values)
    base_id = parsed["id"].to_numpy(dtype=object)
    is_ensembl = pd.notna(base_id) & ~is_non_gene
    id_kind = _id_kind(is_ensembl, is_non_gene)
    if organism is None:
        organism = _detect_organism(values, parsed, is_non_gene)

    n = values.size
    ids = np.full(n, None, dtype=object)
    case_insensitive = np.zeros(n, dtype=bool)
    candidates = np.ones(n, dtype=np.int64)

    # Ensembl gene ids: keep those of the organism (or all of them when the organism is unknown).
    species = parsed["species"].to_numpy(dtype=object)
    if organism is None:
        id_ok = is_ensembl
    else:
        id_ok = is_ensembl & (species == _SPECIES_CODE[organism])
    ids[id_ok] = base_id[id_ok]
    stripped = is_ensembl & (parsed["version"].notna() | parsed["par"].notna()).to_numpy()

    # Symbols: the vocabulary's own name dictionary first (exact), then the GENCODE table.
    is_symbol = ~is_ensembl & ~is_non_gene
    by_dictionary = np.zeros(n, dtype=bool)
    if name_dictionary is not None:
        found = pd.Series(values, dtype=object).map(name_dictionary).to_numpy(dtype=object)
        by_dictionary = is_symbol & pd.notna(found)
        ids[by_dictionary] = found[by_dictionary]
    n_ids_not_in_table = 0
    if organism is not None:
        index = _symbol_index(organism)
        n_ids_not_in_table = sum(1 for gene_id in ids[id_ok] if gene_id not in index.ids)
        case_insensitive = _table_symbols(values, index, ids, is_symbol, preferred, candidates)
    other_spellings = np.zeros(n, dtype=bool)
    if name_dictionary is not None:
        # The dictionary knows these genes by another name: the release's procedure leaves such a
        # spelling out, so GENCODE must not bring it in (it would add or sum a gene the release lacks).
        owned = frozenset(name_dictionary.values())
        by_table = is_symbol & ~by_dictionary & pd.notna(ids)
        other_spellings = by_table & np.fromiter((gene_id in owned for gene_id in ids), dtype=bool, count=n)
        ids[other_spellings] = None
        case_insensitive = case_insensitive & ~other_spellings

    is_mapped = pd.notna(ids)
    is_unmapped = ~is_mapped & ~is_non_gene

    # Duplicates: a mapped feature whose id an earlier feature already has.
    id_series = pd.Series(ids, dtype=object)
    is_duplicate = (id_series.duplicated(keep="first") & id_series.notna()).to_numpy(dtype=bool)
    first_name: dict[str, str] = {}
    for gene_id, name in zip(ids[is_mapped], values[is_mapped], strict=True):
        first_name.setdefault(gene_id, name)
    is_ambiguous = is_mapped & ~is_ensembl & (candidates > 1)

    report = GeneMappingReport(
        n_features=int(n),
        id_kind=id_kind,
        organism=organism,
        n_mapped=int(is_mapped.sum()),
        n_unmapped=int(is_unmapped.sum()),
        unmapped_examples=_first(values[is_unmapped]),
        n_non_gene=int(is_non_gene.sum()),
        non_gene_examples=_first(name if name else "<empty name>" for name in values[is_non_gene]),
        n_version_stripped=int(stripped.sum()),
        n_duplicated=int(is_duplicate.sum()),
        duplicated_examples=_first(
            f"{name} -> {gene_id} (same as {first_name[gene_id]})"
            for name, gene_id in zip(values[is_duplicate], ids[is_duplicate], strict=True)
        ),
        n_ambiguous_symbols=int(is_ambiguous.sum()),
        ambiguous_examples=_first(
            f"{name} -> {gene_id} (1 of {count})"
            for name, gene_id, count in zip(
                values[is_ambiguous], ids[is_ambiguous], candidates[is_ambiguous], strict=True
            )
        ),
        n_case_insensitive=int(case_insensitive.sum()),
        n_ids_not_in_table=int(n_ids_not_in_table),
        n_by_name_dictionary=None if name_dictionary is None else int(by_dictionary.sum()),
        n_by_gene_table=None if name_dictionary is None else int((is_symbol & ~by_dictionary & is_mapped).sum()),
        n_other_spellings=int(other_spellings.sum()),
    )
    return ids, report


def _table_symbols(
    values: np.ndarray,
    index: _SymbolIndex,
    ids: np.ndarray,
    is_symbol: np.ndarray,
    preferred: frozenset,
    candidates: np.ndarray,
) -> np.ndarray:
    """Fill ``ids`` (where still empty) from the GENCODE table: exact lookup, then case-insensitive for
    all-upper / all-lower names; ``candidates`` gets the number of ids of ambiguous symbols.

    Returns the mask of symbols found only case-insensitively.
    """
    case_insensitive = np.zeros(values.size, dtype=bool)
    symbols = pd.Series(values, dtype=object)
    upper_keys = symbols.str.upper()
    uniform_case = ((symbols == upper_keys) | (symbols == symbols.str.lower())).to_numpy(dtype=bool)
    passes = (
        (symbols, index.exact, index.exact_choices, is_symbol),
        (upper_keys, index.upper, index.upper_choices, is_symbol & uniform_case),
    )
    for pass_number, (keys, lookup, choices, eligible) in enumerate(passes):
        found = keys.map(lookup).to_numpy(dtype=object)
        hit = eligible & pd.isna(ids) & pd.notna(found)
        ids[hit] = found[hit]
        if pass_number == 1:
            case_insensitive = hit
        for position in np.flatnonzero(hit & keys.isin(choices.keys()).to_numpy(dtype=bool)):
            options = choices[keys.iat[position]]
            candidates[position] = len(options)
            if preferred:
                ids[position] = next((option for option in options if option in preferred), options[0])
    return case_insensitive


# --------------------------------------------------------------------------------------------------------
# Matrices
# --------------------------------------------------------------------------------------------------------


def _key_positions(column_keys: Iterable[object], keys: Sequence[object]) -> np.ndarray:
    """Output position of each column (``-1`` to drop it), checking that ``keys`` has no repeats."""
    key_index = pd.Index(list(keys), dtype=object)
    if not key_index.is_unique:
        repeated = key_index[key_index.duplicated()].unique()[:5].tolist()
        raise LangCellError(
            f"the output keys repeat ({', '.join(map(str, repeated))}); pass each key once, e.g. "
            "list(dict.fromkeys(keys))"
        )
    column_values = np.asarray(
        list(column_keys) if not isinstance(column_keys, np.ndarray) else column_keys, dtype=object
    ).ravel()
    positions = key_index.get_indexer(pd.Index(column_values, dtype=object)).astype(np.int64)
    positions[pd.isna(column_values)] = -1  # a None key is always dropped, even if keys holds None
    return positions


def selection_matrix(
    column_keys: Iterable[object], keys: Sequence[object], *, dtype: np.dtype | type = np.float32
) -> sp.csr_matrix:
    """Build the 0/1 matrix that sends each column to the position of its key.

    Parameters
    ----------
    column_keys
        The key of each input column (e.g. the Ensembl ids from :func:`map_to_ensembl`); ``None`` or a key
        absent from ``keys`` selects nothing.
    keys
        The output keys, each once (e.g. a tokenizer's vocabulary).
    dtype
        Value type of the matrix.

    Returns
    -------
    scipy.sparse.csr_matrix
        Shape ``(len(column_keys), len(keys))`` with a 1 at ``(j, keys.index(column_keys[j]))``; at most
        one non-zero per row.

    Raises
    ------
    LangCellError
        If ``keys`` repeats a key.
    """
    positions = _key_positions(column_keys, keys)
    rows = np.flatnonzero(positions >= 0)
    data = np.ones(rows.size, dtype=dtype)
    return sp.csr_matrix((data, (rows, positions[rows])), shape=(positions.size, len(keys)), dtype=dtype)


def collapse_columns(
    X: sp.spmatrix | sp.sparray, column_keys: Iterable[object], keys: Sequence[object]
) -> sp.csr_matrix:
    """Sum the columns of ``X`` into one output column per key.

    Column ``j`` of ``X`` is added to output column ``keys.index(column_keys[j])``; columns whose key is
    ``None`` or not in ``keys`` are dropped. This sums duplicated genes and restricts a matrix to a
    vocabulary in one sparse product ``X @ S`` with :func:`selection_matrix`; ``X`` is never densified.

    Parameters
    ----------
    X
        Sparse matrix, cells x features (CSR preferred; other sparse formats are converted).
    column_keys
        The key of each column of ``X``, length ``X.shape[1]``.
    keys
        The output keys, each once.

    Returns
    -------
    scipy.sparse.csr_matrix
        Shape ``(X.shape[0], len(keys))`` with sorted indices. Floats keep their dtype; integers are summed
        in at least 32 bits (booleans are counted as int32) so that summing cannot overflow a small type.

    Raises
    ------
    LangCellError
        If ``X`` is not 2-D sparse, ``column_keys`` does not have one key per column, or ``keys`` repeats.
    """
    if not sp.issparse(X):
        if isinstance(X, np.ndarray) and X.ndim == 2:
            X = sp.csr_matrix(X)
        else:
            raise LangCellError(
                f"expected a 2-D scipy.sparse matrix, got {type(X).__name__}; pass adata.X as a CSR matrix"
            )
    column_values = np.asarray(
        list(column_keys) if not isinstance(column_keys, np.ndarray) else column_keys, dtype=object
    ).ravel()
    if column_values.size != X.shape[1]:
        raise LangCellError(
            f"got {column_values.size} column keys for a matrix with {X.shape[1]} columns; pass one key per "
            "column (e.g. the ids returned by map_to_ensembl(adata.var_names))"
        )
    kind = np.dtype(X.dtype).kind
    if kind == "f":
        value_type = X.dtype
    elif kind in "iu":
        value_type = np.result_type(X.dtype, np.int32)
    elif kind == "b":
        value_type = np.dtype(np.int32)
    else:
        value_type = X.dtype
    selection = selection_matrix(column_values, keys, dtype=value_type)
    product = sp.csr_matrix(sp.csr_matrix(X, dtype=value_type) @ selection)
    product.sum_duplicates()
    product.sort_indices()
    return product

"""Rank-value gene tokenizer (Geneformer style): counts in, ragged sequences of gene tokens out.

A cell becomes the list of its expressed vocabulary genes, most "unusually high" first:

1. ``n_counts`` = the cell's total counts over *all* its genes, taken before anything is filtered to the
   vocabulary (or ``obs['n_counts']`` when that column exists, as Geneformer does);
2. for every vocabulary gene with a count > 0:
   ``value_g = (count_g / n_counts * 10_000) / median_g``, computed in float64 in exactly that order;
3. sort by value, descending, ties broken by token id ascending; keep the top ``max_length - 1``;
4. prepend ``<cls>``.

The vocabulary layout is the released one: ``<pad>=0``, ``<mask>=1``, the genes at ``2..n+1`` in the
given order, ``<cls>=n+2``.

Encoding works on CSR row chunks. :func:`langcell.data.genes.selection_matrix` decides, once per input,
which vocabulary position each input column goes to (duplicated genes are summed); two small numba
kernels then run over the rows in parallel: one checks the values and counts each cell's expressed
vocabulary genes, the other computes the values and sorts them (a radix sort on the high 32 bits of the
float64 bit patterns, then an exact insertion pass over keys that share them; ties by token id). No per-cell Python loop runs and the whole matrix is
never densified, so backed (on-disk) h5ad files stream through in bounded memory. ``fit`` uses the
selection matrix directly, as one sparse product per chunk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._atomic import atomic_file
from ..errors import LangCellError
from . import genes as _genes
from ._medians import MedianAccumulator
from ._rank import ScannedRows, iter_scanned, rank_rows, selection_columns, torch_threads_kept
from .geneformer import read_gene_name_dictionary, read_geneformer_dictionary
from .sources import CountSource, as_source_list, opened_counts

__all__ = [
    "GeneTokenizer",
    "TOKENIZER_FILENAME",
    "TokenizedCells",
]

#: File name written by :meth:`GeneTokenizer.save` inside the chosen directory.
TOKENIZER_FILENAME = "gene_tokenizer.json"
#: Version of the JSON layout; :meth:`GeneTokenizer.load` refuses versions it does not know. Version 2
#: adds the vocabulary's name dictionary; a tokenizer without one is still written as version 1, so that
#: older langcell reads it, and refuses (rather than ignores) a dictionary it would not apply.
FORMAT_VERSION = 2
_FORMAT_NAME = "langcell.GeneTokenizer"
#: Counts are scaled to this total per cell before division by the gene medians (Geneformer's choice).
TARGET_SUM = 10_000.0
#: Cells per chunk when streaming: bounds the memory of one step (a chunk of 8k cells with 2k genes each
#: is ~130 MB of float64 work arrays at worst).
DEFAULT_CHUNK_SIZE = 8192
#: Above this many collected non-zero values, ``fit(exact=None)`` switches from exact medians to the
#: log-binned histogram (each value costs ~12 bytes plus sort scratch: ~25M values is ~0.6 GB).
DEFAULT_MAX_EXACT_VALUES = 25_000_000
# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenizedCells:
    """Ragged rank-value sequences of a set of cells, ``<cls>`` first.

    Attributes
    ----------
    ids
        All sequences one after another (flat ``int32``).
    offsets
        ``int64 [n_cells + 1]``; cell ``i`` is ``ids[offsets[i]:offsets[i + 1]]``.
    report
        How the input's genes were matched to the vocabulary (``n_in_vocabulary`` set).
    cells_without_genes
        Indices of cells that express no vocabulary gene. They are kept (sequence ``[<cls>]``).
    obs_names
        The cells' names, in order.
    """

    ids: np.ndarray  # flat int32 token ids of all cells, <cls> first in each
    offsets: np.ndarray  # int64 [n + 1] start of each cell in ids
    report: Any  # langcell.data.genes.GeneMappingReport with n_in_vocabulary filled in
    cells_without_genes: np.ndarray  # int64 indices of cells with no expressed vocabulary gene
    obs_names: pd.Index  # cell names in order

    @property
    def lengths(self) -> np.ndarray:
        """Length of every sequence (``<cls>`` included), ``int64``."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.offsets.size - 1

    def __getitem__(self, index: int) -> np.ndarray:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"cell index {index} out of range for {n} cells")
        index %= n
        return self.ids[self.offsets[index] : self.offsets[index + 1]]

    def __repr__(self) -> str:
        return f"TokenizedCells(n_cells={len(self)}, n_tokens={self.ids.size})"
# --------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------


@dataclass
class _VocabularyMap:
    """How one source's columns land on the vocabulary."""

    column_map: np.ndarray  # int32 per input column: vocabulary position, -1, or -(p + 2) for a duplicate
    report: Any  # GeneMappingReport with n_in_vocabulary set


def _custom_report(names: np.ndarray) -> Any:
    """A mapping report for names matched verbatim (custom vocabularies)."""
    # Same convention as langcell.data.genes: a duplicate is a name an earlier column already has.
    duplicated = names[pd.Series(names).duplicated(keep="first").to_numpy()]
    return _genes.GeneMappingReport(
        n_features=int(names.size),
        id_kind="custom",
        organism=None,
        n_mapped=int(names.size),
        n_unmapped=0,
        unmapped_examples=[],
        n_non_gene=0,
        non_gene_examples=[],
        n_version_stripped=0,
        n_duplicated=int(duplicated.size),
        duplicated_examples=[str(name) for name in duplicated[: _genes.MAX_EXAMPLES]],
        n_ambiguous_symbols=0,
        ambiguous_examples=[],
        n_in_vocabulary=None,
    )


def _column_keys(
    names: np.ndarray,
    gene_id_kind: str,
    organism: str | None,
    prefer: frozenset | None = None,
    name_dictionary: dict[str, str] | None = None,
) -> tuple[np.ndarray, Any]:
    """Vocabulary keys of the input columns (``None`` where a column has none) and the mapping report.

    ``prefer``: Ensembl IDs an ambiguous symbol should resolve to first (the vocabulary's).
    ``name_dictionary``: the vocabulary's own symbol -> Ensembl id table, looked up first.
    """
    if gene_id_kind == "custom":
        return names, _custom_report(names)
    keys, report = _genes.map_to_ensembl(names, organism=organism, prefer=prefer, name_dictionary=name_dictionary)
    if keys is None:
        keys = np.full(names.size, None, dtype=object)
    return np.asarray(keys, dtype=object), report


class GeneTokenizer:
    """Vocabulary of genes with their non-zero median expression; turns counts into rank-value tokens.

    Parameters
    ----------
    genes
        Vocabulary genes, in token order (token id = position + 2). Ensembl gene IDs (without version)
        for ``gene_id_kind="ensembl"``; any distinct strings for ``"custom"``.
    medians
        Per-gene non-zero median of ``count / n_counts * 10_000`` over the reference data; positive.
    gene_id_kind
        ``"ensembl"``: input gene names (symbols or Ensembl IDs) are mapped to Ensembl IDs through
        :mod:`langcell.data.genes`. ``"custom"``: names are matched verbatim (for data whose genes have no
        standard IDs).
    organism
        Organism of the vocabulary (``"human"``, ``"mouse"``) used to resolve symbols; ``None`` detects
        it from each input.
    name_dictionary
        The vocabulary's own ``{gene symbol: Ensembl id}`` table (Geneformer's ``gene_name_id_dict``,
        read with :func:`langcell.data.geneformer.read_gene_name_dictionary`), ``"ensembl"`` only.
        Symbols are looked up there first and the packaged GENCODE table serves only the symbols it
        lacks (see :func:`langcell.data.genes.map_to_ensembl`), so a released vocabulary sees the genes
        its own procedure maps. It is saved with the tokenizer. ``None``: GENCODE alone.

    Attributes
    ----------
    pad_id, mask_id, cls_id
        Special tokens: 0, 1 and ``n_genes + 2``.
    vocab_size
        ``n_genes + 3``.
    """

    pad_id = 0
    mask_id = 1

    def __init__(
        self,
        genes: Sequence[str],
        medians: Sequence[float],
        *,
        gene_id_kind: str = "ensembl",
        organism: str | None = "human",
        name_dictionary: dict[str, str] | None = None,
    ) -> None:
        if gene_id_kind not in ("ensembl", "custom"):
            raise LangCellError(f"gene_id_kind must be 'ensembl' or 'custom', got {gene_id_kind!r}")
        self.name_dictionary: dict[str, str] | None = _checked_name_dictionary(name_dictionary, gene_id_kind)
        bad_names = [g for g in genes if not isinstance(g, str) or not g.strip()]
        if bad_names:
            raise LangCellError(
                f"gene names must be non-empty strings; got {bad_names[:5]!r}: drop those genes (or name them) "
                "before building the vocabulary"
            )
        genes_list = [str(g) for g in genes]
        medians_arr = np.asarray(medians, dtype=np.float64).ravel()
        if len(genes_list) == 0:
            raise LangCellError("the vocabulary is empty; pass at least one gene with its median")
        if medians_arr.size != len(genes_list):
            raise LangCellError(
                f"{len(genes_list)} genes but {medians_arr.size} medians; pass one median per gene"
            )
        if not (np.isfinite(medians_arr) & (medians_arr > 0)).all():
            bad = [genes_list[i] for i in np.flatnonzero(~(np.isfinite(medians_arr) & (medians_arr > 0)))[:5]]
            raise LangCellError(f"medians must be positive and finite; bad for {bad}; refit the tokenizer")
        index = pd.Index(genes_list)
        if index.has_duplicates:
            raise LangCellError(
                f"the vocabulary repeats genes {index[index.duplicated()].unique()[:5].tolist()}; "
                "list each gene once"
            )
        self.genes: list[str] = genes_list
        self.medians: np.ndarray = medians_arr
        self.gene_id_kind = gene_id_kind
        self.organism = organism
        self._index = index
        self._vocab_keys = np.asarray(genes_list, dtype=object)
        self._vocab_set = frozenset(genes_list)

    # -- layout ----------------------------------------------------------------------------------

    @property
    def n_genes(self) -> int:
        """Number of gene tokens."""
        return len(self.genes)

    @property
    def cls_id(self) -> int:
        """Token id of ``<cls>`` (after the genes, as in the released checkpoint)."""
        return self.n_genes + 2

    @property
    def vocab_size(self) -> int:
        """Number of tokens: ``<pad>``, ``<mask>``, the genes and ``<cls>``."""
        return self.n_genes + 3

    def token_ids(self, genes: Sequence[str], *, allow_missing: bool = False) -> np.ndarray:
        """Token ids of vocabulary genes (``int64``).

        Parameters
        ----------
        genes
            Gene keys as stored in the vocabulary (Ensembl IDs or custom names).
        allow_missing
            Return -1 for genes not in the vocabulary instead of raising.
        """
        positions = self._index.get_indexer([str(g) for g in genes])
        missing = positions < 0
        if missing.any() and not allow_missing:
            examples = [str(g) for g, m in zip(genes, missing, strict=True) if m][:5]
            raise LangCellError(
                f"{int(missing.sum())} genes are not in the vocabulary (e.g. {examples}); "
                "pass vocabulary keys or allow_missing=True"
            )
        return np.where(missing, -1, positions + 2).astype(np.int64)

    def __repr__(self) -> str:
        names = "" if self.name_dictionary is None else f", name_dictionary={len(self.name_dictionary)} names"
        return (
            f"GeneTokenizer(n_genes={self.n_genes}, gene_id_kind={self.gene_id_kind!r}, "
            f"organism={self.organism!r}{names})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GeneTokenizer):
            return NotImplemented
        return (
            self.genes == other.genes
            and np.array_equal(self.medians, other.medians)
            and self.gene_id_kind == other.gene_id_kind
            and self.organism == other.organism
            and self.name_dictionary == other.name_dictionary
        )

    __hash__ = None  # mutable arrays inside: not hashable

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_geneformer(
        cls,
        token_dictionary_path: str | os.PathLike,
        gene_median_dictionary_path: str | os.PathLike,
        gene_name_dictionary_path: str | os.PathLike | None = None,
    ) -> GeneTokenizer:
        """Build the tokenizer of the release from Geneformer's dictionaries.

        Parameters
        ----------
        token_dictionary_path
            ``token_dictionary.pkl``: ``{"<pad>": 0, "<mask>": 1, ensembl_id: token_id, ...}``.
        gene_median_dictionary_path
            ``gene_median_dictionary.pkl``: ``{ensembl_id: median}``.
        gene_name_dictionary_path
            ``gene_name_id_dict.pkl``: ``{symbol: ensembl_id}``, the symbol table the vocabulary was
            built with. Given, it becomes the tokenizer's ``name_dictionary``: symbols are mapped as the
            release maps them. ``None``: symbols go through the packaged GENCODE table alone.

        All are read with restricted unpickling (:mod:`langcell.data.geneformer`).
        """
        tokens = read_geneformer_dictionary(token_dictionary_path)
        medians = read_geneformer_dictionary(gene_median_dictionary_path)
        if tokens.get("<pad>") != 0 or tokens.get("<mask>") != 1:
            raise LangCellError(
                f"{str(token_dictionary_path)!r} does not have <pad>=0 and <mask>=1; pass Geneformer's "
                "token_dictionary.pkl"
            )
        not_ids = [k for k, v in tokens.items() if isinstance(v, bool) or not isinstance(v, int | np.integer)]
        if not_ids:
            raise LangCellError(
                f"{str(token_dictionary_path)!r}: the token ids of {not_ids[:3]!r} are not integers; pass Geneformer's "
                "token_dictionary.pkl"
            )
        gene_items = sorted(((int(v), str(k)) for k, v in tokens.items() if k not in ("<pad>", "<mask>")))
        ids = np.array([token for token, _ in gene_items], dtype=np.int64)
        if not np.array_equal(ids, np.arange(2, 2 + ids.size)):
            raise LangCellError(
                f"{str(token_dictionary_path)!r}: gene token ids are not 2..n+1 without gaps; pass Geneformer's "
                "token_dictionary.pkl"
            )
        genes = [gene for _, gene in gene_items]
        missing = [g for g in genes if g not in medians]
        if missing:
            raise LangCellError(
                f"{len(missing)} vocabulary genes have no median in {str(gene_median_dictionary_path)!r} "
                f"(e.g. {missing[:3]}); pass the gene_median_dictionary.pkl of the same release"
            )
        not_numbers = [g for g in genes if isinstance(medians[g], bool) or not isinstance(medians[g], int | float | np.number)]
        if not_numbers:
            raise LangCellError(
                f"{str(gene_median_dictionary_path)!r}: the medians of {not_numbers[:3]!r} are not numbers; pass "
                "Geneformer's gene_median_dictionary.pkl"
            )
        names = None if gene_name_dictionary_path is None else read_gene_name_dictionary(gene_name_dictionary_path)
        return cls(
            genes, [float(medians[g]) for g in genes], gene_id_kind="ensembl", organism="human", name_dictionary=names
        )

    @classmethod
    def fit(
        cls,
        sources: Any,
        *,
        gene_id_kind: str = "ensembl",
        organism: str | None = None,
        gene_column: str | None = None,
        counts_layer: str | None = None,
        n_counts_key: str | None = "n_counts",
        min_cells: int = 1,
        exact: bool | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_exact_values: int = DEFAULT_MAX_EXACT_VALUES,
        progress: bool = False,
    ) -> GeneTokenizer:
        """Build a vocabulary and per-gene medians from reference data, streaming over row chunks.

        The median of gene ``g`` is taken over the cells that express it (count > 0) of
        ``count_g / n_counts * 10_000``, ``n_counts`` being the cell's total over all its genes (or
        ``obs[n_counts_key]``). Duplicated genes (two columns mapping to one ID) are summed first.

        Parameters
        ----------
        sources
            An AnnData (in memory or backed), an ``.h5ad`` path (read backed), a
            :class:`~langcell.data.soma.SomaSource`, or a list of them.
        gene_id_kind
            ``"ensembl"`` (names mapped through :mod:`langcell.data.genes`; the vocabulary is sorted by
            Ensembl ID) or ``"custom"`` (names verbatim, in order of first appearance).
        organism
            Organism for symbol mapping; ``None`` detects it per source. Stored on the tokenizer when
            given, or when every source was detected as the same organism.
        gene_column
            ``var`` column with the gene names; ``None`` uses ``var_names``.
        counts_layer
            Where the raw counts are: ``None`` for ``X``, a layer name, or ``"raw"`` for ``.raw``.
        n_counts_key
            ``obs`` column with each cell's total counts, used when present; ``None`` always computes
            totals from the matrix.
        min_cells
            Keep genes expressed in at least this many cells.
        exact
            ``True``: exact medians (``np.median`` semantics: the mean of the two middle values for an
            even count). ``False``: approximate medians from a per-gene histogram over log-spaced bins of
            width ``w = 2 ln(1.005)``; each value is represented by its bin's geometric centre, so every
            approximate median is within a relative error of ``exp(w / 2) - 1 = 0.5 %`` of the exact one
            (the guarantee asked for is 1 %). ``None``: exact while at most ``max_exact_values`` non-zero
            values have been seen, then switch to the histogram.
        chunk_size
            Cells per streamed chunk.
        max_exact_values
            Memory budget of ``exact=None``, in collected values (~12 bytes each plus sort scratch).
        progress
            Show a progress bar.

        Returns
        -------
        GeneTokenizer
        """
        if gene_id_kind not in ("ensembl", "custom"):
            raise LangCellError(f"gene_id_kind must be 'ensembl' or 'custom', got {gene_id_kind!r}")
        if min_cells < 1:
            raise LangCellError(f"min_cells must be at least 1, got {min_cells}")
        source_list = as_source_list(sources)
        # Two passes over the metadata only: first the union of keys (the vocabulary candidates), then
        # the counts. Sources are reopened for the second pass so that paths stay backed and closed.
        per_source_keys: list[np.ndarray] = []
        detected: set[str | None] = set()
        for i, source in enumerate(source_list):
            with opened_counts(
                source, f"input #{i}", gene_column=gene_column, counts_layer=counts_layer, n_counts_key=n_counts_key,
                obs_columns=(),
            ) as counts:
                label = counts.label
                keys, report = _column_keys(counts.gene_names, gene_id_kind, organism)
                if gene_id_kind == "ensembl":
                    detected.add(report.organism)
                if not any(k is not None for k in keys):
                    raise LangCellError(
                        f"no gene of {label} could be mapped to an Ensembl ID (id kind {report.id_kind!r}); "
                        "check gene_column, or pass gene_id_kind='custom' for names without standard IDs"
                    )
                per_source_keys.append(keys)
        if gene_id_kind == "ensembl":
            candidates = sorted({k for keys in per_source_keys for k in keys if k is not None})
        else:
            candidates = list(dict.fromkeys(k for keys in per_source_keys for k in keys))
        candidate_keys = np.asarray(candidates, dtype=object)

        accumulator = MedianAccumulator(len(candidates), exact=exact, max_exact_values=max_exact_values)
        n_cells_expressing = np.zeros(len(candidates), dtype=np.int64)
        for i, (source, keys) in enumerate(zip(source_list, per_source_keys, strict=True)):
            with opened_counts(
                source, f"input #{i}", gene_column=gene_column, counts_layer=counts_layer, n_counts_key=n_counts_key,
                obs_columns=(),
            ) as counts_source:
                selection = _genes.selection_matrix(keys, candidate_keys, dtype=np.float64)
                column_map = selection_columns(selection)
                for chunk in iter_scanned(
                    counts_source,
                    column_map,
                    chunk_size=chunk_size,
                    progress=progress,
                    desc="fit",
                    n_counts_key=n_counts_key,
                ):
                    # Restrict to the candidate genes and sum duplicated ones in one sparse product.
                    vocab_counts = (chunk.rows.to_scipy() @ selection).tocsr()
                    vocab_counts.eliminate_zeros()
                    nnz_per_row = np.diff(vocab_counts.indptr)
                    rows = np.repeat(np.arange(nnz_per_row.size), nnz_per_row)
                    values = vocab_counts.data / chunk.n_counts[rows] * TARGET_SUM
                    accumulator.add(vocab_counts.indices, values)
                    n_cells_expressing += np.bincount(vocab_counts.indices, minlength=len(candidates))
        medians = accumulator.medians()
        keep = n_cells_expressing >= min_cells
        if not keep.any():
            raise LangCellError(
                f"no gene is expressed in at least min_cells={min_cells} cells; lower min_cells or pass more cells"
            )
        if organism is None and gene_id_kind == "ensembl" and len(detected) == 1:
            organism = detected.pop()
        return cls(
            candidate_keys[keep].tolist(),
            medians[keep],
            gene_id_kind=gene_id_kind,
            organism=organism if gene_id_kind == "ensembl" else None,
        )

    # -- encoding ---------------------------------------------------------------------------------

    def _vocabulary_map(self, gene_names: np.ndarray, label: str) -> _VocabularyMap:
        """Map a source's columns onto the vocabulary, refusing inputs that share no gene with it."""
        keys, report = _column_keys(
            gene_names, self.gene_id_kind, self.organism, prefer=self._vocab_set, name_dictionary=self.name_dictionary
        )
        selection = _genes.selection_matrix(keys, self._vocab_keys, dtype=np.float64)
        n_in_vocabulary = int(np.count_nonzero(np.diff(selection.indptr)))
        report = dataclasses.replace(report, n_in_vocabulary=n_in_vocabulary)
        if n_in_vocabulary == 0:
            raise LangCellError(self._no_vocabulary_message(gene_names, report, label))
        return _VocabularyMap(selection_columns(selection), report)

    def _no_vocabulary_message(self, gene_names: np.ndarray, report: Any, label: str) -> str:
        examples = ", ".join(map(str, gene_names[:3]))
        head = f"none of the {gene_names.size} genes of {label} (e.g. {examples}) is in the tokenizer's vocabulary"
        if self.gene_id_kind == "custom":
            return (
                f"{head} (custom names, matched verbatim); pass data with the same gene names as the "
                "vocabulary, or gene_column=<var column holding them>"
            )
        data_organism = _genes.detect_organism(gene_names)
        if data_organism is not None and self.organism is not None and data_organism != self.organism:
            return (
                f"{head}: these look like {data_organism} genes but the vocabulary is {self.organism}; "
                f"use a tokenizer built for {data_organism} (GeneTokenizer.fit on {data_organism} data)"
            )
        return (
            f"{head} ({report.n_mapped} of them mapped to Ensembl IDs); pass gene_column=<var column with "
            "gene symbols or Ensembl IDs>, or a tokenizer built for this organism"
        )

    def _encode_source(
        self,
        source: CountSource,
        *,
        max_length: int,
        chunk_size: int,
        progress: bool,
        n_counts_key: str | None,
    ) -> tuple[_VocabularyMap, Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """Map a source onto the vocabulary and return a generator of encoded chunks.

        The generator yields ``(ids int32, lengths int64, rows_without_genes int64)`` per chunk, rows
        relative to the source.
        """
        if max_length < 1:
            raise LangCellError(f"max_length must be at least 1 (the <cls> token), got {max_length}")
        vocabulary_map = self._vocabulary_map(source.gene_names, source.label)

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
            for chunk in iter_scanned(
                source,
                vocabulary_map.column_map,
                chunk_size=chunk_size,
                progress=progress,
                desc="tokenize",
                n_counts_key=n_counts_key,
            ):
                ids, lengths = self._rank(chunk, vocabulary_map.column_map, max_length)
                yield ids, lengths, np.flatnonzero(chunk.n_expressed == 0) + chunk.start

        return vocabulary_map, chunks()

    def _rank(
        self, chunk: ScannedRows, column_map: np.ndarray, max_length: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (flat int32) and lengths of a scanned chunk."""
        lengths = np.minimum(chunk.n_expressed, max_length - 1) + 1
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        rows = chunk.rows
        with torch_threads_kept():
            rank_rows(
                rows.indptr,
                rows.indices,
                rows.data,
                column_map,
                np.ascontiguousarray(chunk.n_counts, dtype=np.float64),
                self.medians,
                chunk.n_expressed,
                chunk.flags,
                offsets,
                ids,
                np.int32(self.cls_id),
            )
        return ids, lengths

    def encode(
        self,
        adata: Any,
        *,
        gene_column: str | None = None,
        counts_layer: str | None = None,
        n_counts_key: str | None = "n_counts",
        max_length: int = 2048,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: bool = False,
    ) -> TokenizedCells:
        """Turn every cell's raw counts into its rank-value token sequence.

        Parameters
        ----------
        adata
            An AnnData (in memory or backed; X dense, CSR or CSC), an ``.h5ad`` path (read backed), or a
            :class:`~langcell.data.soma.SomaSource` (a SOMA experiment, streamed).
        gene_column
            ``var`` column with gene names; ``None`` uses ``var_names``.
        counts_layer
            Where the raw counts are: ``None`` for ``X``, a layer name, or ``"raw"`` for ``.raw``.
        n_counts_key
            ``obs`` column with each cell's total counts, used when present (as Geneformer does);
            ``None`` always takes the total over all genes of the matrix.
        max_length
            Longest sequence, ``<cls>`` included: the top ``max_length - 1`` genes are kept.
        chunk_size
            Cells per chunk: bounds memory; the whole matrix is never densified.
        progress
            Show a progress bar.

        Returns
        -------
        TokenizedCells
            Cells that express no vocabulary gene are kept (sequence ``[<cls>]``), listed in
            ``cells_without_genes`` and announced with a warning.

        Raises
        ------
        LangCellError
            For an empty AnnData, a missing layer or column, values that are not raw counts (NaN/inf,
            negative, non-integer, log-normalised), or genes none of which is in the vocabulary.
        """
        with opened_counts(
            adata, "the AnnData", gene_column=gene_column, counts_layer=counts_layer, n_counts_key=n_counts_key,
            obs_columns=(),
        ) as source:
            label = source.label
            vocabulary_map, chunks = self._encode_source(
                source,
                max_length=max_length,
                chunk_size=chunk_size,
                progress=progress,
                n_counts_key=n_counts_key,
            )
            ids_parts, length_parts, empty_parts = [], [], []
            for ids, lengths, empty in chunks:
                ids_parts.append(ids)
                length_parts.append(lengths)
                empty_parts.append(empty)
            obs_names = pd.Index(source.obs_names).copy()
        lengths = np.concatenate(length_parts)
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        cells_without_genes = np.concatenate(empty_parts)
        _warn_cells_without_genes(cells_without_genes.size, lengths.size, label)
        return TokenizedCells(
            ids=np.concatenate(ids_parts),
            offsets=offsets,
            report=vocabulary_map.report,
            cells_without_genes=cells_without_genes,
            obs_names=obs_names,
        )

    # -- persistence ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The JSON-serialisable content written by :meth:`save`."""
        content = {
            "format": _FORMAT_NAME,
            "format_version": 1 if self.name_dictionary is None else FORMAT_VERSION,
            "gene_id_kind": self.gene_id_kind,
            "organism": self.organism,
            "special_tokens": {"<pad>": self.pad_id, "<mask>": self.mask_id, "<cls>": self.cls_id},
            "genes": self.genes,
            # repr-exact floats: json writes the shortest string that reads back to the same float64.
            "medians": [float(m) for m in self.medians],
        }
        if self.name_dictionary is not None:
            content["name_dictionary"] = self.name_dictionary
        return content

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``<directory>/gene_tokenizer.json`` (genes, medians, id kind, organism, name dictionary,
        format version).

        The directory is created if needed; the file is written atomically.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(directory / TOKENIZER_FILENAME) as tmp:
            tmp.write_text(json.dumps(self.to_dict()), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> GeneTokenizer:
        """Read a tokenizer written by :meth:`save`.

        Parameters
        ----------
        directory
            The directory holding ``gene_tokenizer.json`` (or the file itself).

        Raises
        ------
        LangCellError
            Naming what is wrong: missing file, invalid JSON, another format or a newer version, missing
            fields, genes and medians of different lengths, non-positive medians, special tokens that do
            not match the layout.
        """
        path = Path(directory)
        if path.is_dir():
            path = path / TOKENIZER_FILENAME
        if not path.is_file():
            raise LangCellError(
                f"no tokenizer at {str(path)!r}; pass a directory written by GeneTokenizer.save"
            )
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LangCellError(
                f"{str(path)!r} is not valid JSON ({err}); save the tokenizer again"
            ) from None
        if not isinstance(content, dict) or content.get("format") != _FORMAT_NAME:
            raise LangCellError(
                f"{str(path)!r} is not a langcell gene tokenizer file; pass one written by save"
            )
        version = content.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise LangCellError(
                f"{str(path)!r} has format version {version!r}; this langcell reads versions up to "
                f"{FORMAT_VERSION}: upgrade langcell"
            )
        missing = [
            k for k in ("genes", "medians", "gene_id_kind", "organism", "special_tokens") if k not in content
        ]
        if missing:
            raise LangCellError(f"{str(path)!r} lacks the fields {missing}; save the tokenizer again")
        genes, medians = content["genes"], content["medians"]
        if not isinstance(genes, list) or not isinstance(medians, list) or len(genes) != len(medians):
            raise LangCellError(
                f"{str(path)!r}: genes and medians must be lists of the same length; save the tokenizer again"
            )
        names = content.get("name_dictionary") if version >= 2 else None
        try:
            tokenizer = cls(
                genes,
                medians,
                gene_id_kind=content["gene_id_kind"],
                organism=content["organism"],
                name_dictionary=names,
            )
        except LangCellError as err:
            raise LangCellError(f"{str(path)!r} is invalid: {err}") from None
        except (TypeError, ValueError) as err:
            raise LangCellError(f"{str(path)!r} is invalid: {err}") from None
        expected = {"<pad>": tokenizer.pad_id, "<mask>": tokenizer.mask_id, "<cls>": tokenizer.cls_id}
        if content["special_tokens"] != expected:
            raise LangCellError(
                f"{str(path)!r}: special tokens {content['special_tokens']} do not match the layout {expected}; "
                "save the tokenizer again"
            )
        return tokenizer


def _checked_name_dictionary(names: Any, gene_id_kind: str) -> dict[str, str] | None:
    """``names`` as a plain ``{symbol: id}`` dict, refusing anything else (and custom vocabularies)."""
    if names is None:
        return None
    if gene_id_kind != "ensembl":
        raise LangCellError(
            "a name dictionary maps symbols to Ensembl IDs; it needs gene_id_kind='ensembl' (custom names are "
            "matched verbatim)"
        )
    if not isinstance(names, dict):
        raise LangCellError(f"the name dictionary must be a dict of symbol -> Ensembl ID, got {type(names).__name__}")
    bad = [
        (key, value)
        for key, value in names.items()
        if not isinstance(key, str) or not key.strip() or not isinstance(value, str) or not value.strip()
    ]
    if bad:
        raise LangCellError(
            f"the name dictionary holds entries that are not symbol -> Ensembl ID text ({bad[:3]!r}); "
            "read it with read_gene_name_dictionary"
        )
    return dict(names)


def _warn_cells_without_genes(n_empty: int, n_cells: int, label: str) -> None:
    if n_empty:
        warnings.warn(
            f"{n_empty} of {n_cells} cells of {label} express no vocabulary gene; they are kept as the "
            "sequence [<cls>] and listed in cells_without_genes (filter them out if they are empty droplets)",
            stacklevel=3,
        )

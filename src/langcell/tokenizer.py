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

Encoding works on CSR row chunks. :func:`langcell.genes.selection_matrix` decides, once per input,
which vocabulary position each input column goes to (duplicated genes are summed); two small numba
kernels then run over the rows in parallel: one checks the values and counts each cell's expressed
vocabulary genes, the other computes the values and sorts them (a radix sort on the high 32 bits of the
float64 bit patterns, then an exact insertion pass over keys that share them; ties by token id). No per-cell Python loop runs and the whole matrix is
never densified, so backed (on-disk) h5ad files stream through in bounded memory. ``fit`` uses the
selection matrix directly, as one sparse product per chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import pickle
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from langcell import genes as _genes
from langcell._atomic import atomic_file
from langcell.errors import LangCellError

__all__ = [
    "GeneTokenizer",
    "TokenizedCells",
    "read_geneformer_dictionary",
    "TOKENIZER_FILENAME",
]

#: File name written by :meth:`GeneTokenizer.save` inside the chosen directory.
TOKENIZER_FILENAME = "gene_tokenizer.json"
#: Version of the JSON layout; :meth:`GeneTokenizer.load` refuses versions it does not know.
FORMAT_VERSION = 1
_FORMAT_NAME = "langcell.GeneTokenizer"
#: Counts are scaled to this total per cell before division by the gene medians (Geneformer's choice).
TARGET_SUM = 10_000.0
#: Cells per chunk when streaming: bounds the memory of one step (a chunk of 8k cells with 2k genes each
#: is ~130 MB of float64 work arrays at worst).
DEFAULT_CHUNK_SIZE = 8192
#: Above this many collected non-zero values, ``fit(exact=None)`` switches from exact medians to the
#: log-binned histogram (each value costs ~12 bytes plus sort scratch: ~25M values is ~0.6 GB).
DEFAULT_MAX_EXACT_VALUES = 25_000_000
#: Log-bin width of the approximate medians. A value ``x`` falls into bin ``floor(ln(x) / w)`` and is
#: represented by the bin's geometric centre, so its relative error is at most ``exp(w / 2) - 1``. With
#: ``w = 2 ln(1.005)`` that is 0.5 %, and the mean of two such estimates (even counts) keeps the bound.
_LOG_BIN_WIDTH = 2.0 * math.log(1.005)
#: Values of a matrix whose non-integer entries all lie below this look log-normalised (log1p of
#: counts per 10k rarely exceeds ~12).
_LOG_NORMALISED_MAX = 50.0

_COUNTS_FIX = "pass raw counts, e.g. counts_layer='counts' or use_raw (counts_layer='raw')"


# --------------------------------------------------------------------------------------------------
# Geneformer dictionaries: the one place that unpickles.
# --------------------------------------------------------------------------------------------------


class _RefusedPickle(pickle.UnpicklingError):
    """The pickle names something the dictionary unpickler does not admit (as opposed to a damaged file)."""


def _numpy_scalar(dtype: Any, *args: Any) -> Any:
    """numpy's scalar reconstruction, refusing object dtypes (which could smuggle arbitrary objects)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _RefusedPickle("only numeric numpy scalars are allowed")
    return _NUMPY_SCALAR(dtype, *args)


def _find_numpy_scalar() -> Any:
    # numpy 2 moved the module to numpy._core; pickles written by numpy 1 name numpy.core.
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar


_NUMPY_SCALAR = _find_numpy_scalar()


class _DictionaryUnpickler(pickle.Unpickler):
    """An unpickler that only admits what a plain ``dict`` of ``str -> numpy scalar`` needs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise _RefusedPickle(f"global {module}.{name} is not allowed") from None


def read_geneformer_dictionary(path: str | os.PathLike) -> dict:
    """Read one of Geneformer's pickled dictionaries (token ids, gene medians, name -> id) safely.

    This is the one documented function in langcell that unpickles a file. It uses a restricted
    unpickler whose ``find_class`` admits only numpy's scalar reconstruction function (for numeric
    dtypes) and ``numpy.dtype``: exactly what a plain ``dict`` of ``str -> numpy scalar`` needs. A pickle
    that names anything else (``os.system``, ``builtins.eval``, ...) is refused before it can run.

    Parameters
    ----------
    path
        A ``token_dictionary.pkl``, ``gene_median_dictionary.pkl`` or ``gene_name_id_dict.pkl``.

    Returns
    -------
    dict
        The dictionary, with numpy scalars converted to plain ``int`` / ``float``.

    Raises
    ------
    LangCellError
        If the file is missing, is not a pickle, carries anything but plain data, or is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise LangCellError(f"Geneformer dictionary {str(path)!r} does not exist; check the path")
    data = path.read_bytes()
    try:
        loaded = _DictionaryUnpickler(io.BytesIO(data)).load()
    except _RefusedPickle as err:
        raise LangCellError(
            f"{str(path)!r} was refused: {err}. Only plain dictionaries of names to numbers are read; "
            "use the token_dictionary.pkl / gene_median_dictionary.pkl files of the Geneformer release"
        ) from None
    except Exception as err:  # a corrupt or non-pickle file
        raise LangCellError(
            f"{str(path)!r} is not a readable pickle ({type(err).__name__}: {err}); "
            "check that the file is a Geneformer dictionary and was copied completely"
        ) from None
    if not isinstance(loaded, dict):
        raise LangCellError(
            f"{str(path)!r} holds a {type(loaded).__name__}, not a dictionary; pass a Geneformer dictionary file"
        )
    return {key: (value.item() if isinstance(value, np.generic) else value) for key, value in loaded.items()}


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
    report: Any  # langcell.genes.GeneMappingReport with n_in_vocabulary filled in
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
# Reading counts from AnnData, chunk by chunk
# --------------------------------------------------------------------------------------------------


@dataclass
class _CountSource:
    """One AnnData seen as a row-sliceable count matrix with gene names."""

    matrix: Any  # row-sliceable: scipy sparse, numpy array, h5py dataset or anndata backed dataset
    gene_names: np.ndarray  # object array, one name per column
    obs_names: pd.Index  # cell names
    n_counts: np.ndarray | None  # float64 totals from obs, or None to compute them from the matrix
    label: str  # how messages name this source

    @property
    def n_obs(self) -> int:
        return len(self.obs_names)


def _describe(adata: Any, fallback: str) -> str:
    filename = getattr(adata, "filename", None)
    return str(filename) if filename else fallback


@contextlib.contextmanager
def _opened(source: Any, label: str) -> Iterator[tuple[Any, str]]:
    """Yield ``(AnnData, label)`` for an AnnData or a path (read backed and closed afterwards)."""
    import anndata

    if isinstance(source, anndata.AnnData):
        yield source, _describe(source, label)
        return
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise LangCellError(f"input file {str(path)!r} does not exist; check the path")
        try:
            adata = anndata.read_h5ad(path, backed="r")
        except Exception as err:
            raise LangCellError(
                f"cannot read {str(path)!r} as h5ad ({type(err).__name__}: {err}); pass an .h5ad file "
                "written by anndata"
            ) from None
        try:
            yield adata, str(path)
        finally:
            with contextlib.suppress(Exception):
                adata.file.close()
        return
    raise LangCellError(
        f"cannot read a {type(source).__name__} as cells; pass an AnnData, an .h5ad path, or a list of them"
    )


def _as_source_list(sources: Any) -> list[Any]:
    import anndata

    if isinstance(sources, anndata.AnnData | str | os.PathLike):
        return [sources]
    if isinstance(sources, Sequence):
        if len(sources) == 0:
            raise LangCellError("no input given; pass an AnnData, an .h5ad path, or a list of them")
        return list(sources)
    raise LangCellError(
        f"cannot read a {type(sources).__name__} as cells; pass an AnnData, an .h5ad path, or a list of them"
    )


def _count_source(
    adata: Any, label: str, *, gene_column: str | None, counts_layer: str | None, n_counts_key: str | None
) -> _CountSource:
    """Find the count matrix, gene names and per-cell totals of an AnnData, checking what can be checked."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise LangCellError(
            f"{label} is empty ({adata.n_obs} cells x {adata.n_vars} genes); pass an AnnData with cells and genes"
        )
    if counts_layer is None:
        matrix, var = adata.X, adata.var
        var_names = adata.var_names
        if matrix is None:
            raise LangCellError(f"{label} has no X matrix; pass counts_layer='<layer>' naming the raw counts")
    elif counts_layer == "raw":
        if adata.raw is None:
            raise LangCellError(
                f"counts_layer='raw' but {label} has no .raw; pass counts_layer=None (counts in X) or a layer name"
            )
        matrix, var, var_names = adata.raw.X, adata.raw.var, adata.raw.var_names
    else:
        if counts_layer not in adata.layers:
            available = ", ".join(repr(k) for k in adata.layers) or "none"
            raise LangCellError(
                f"{label} has no layer {counts_layer!r} (layers: {available}); pass one of those, "
                "counts_layer='raw' for .raw, or counts_layer=None for X"
            )
        matrix, var, var_names = adata.layers[counts_layer], adata.var, adata.var_names
    if gene_column is None:
        gene_names = np.asarray(var_names, dtype=object)
    else:
        if gene_column not in var.columns:
            raise LangCellError(
                f"{label} has no var column {gene_column!r} (columns: {', '.join(map(repr, var.columns)) or 'none'}); "
                "pass the column that holds gene symbols or Ensembl IDs, or gene_column=None for var_names"
            )
        gene_names = np.asarray(var[gene_column].astype(str), dtype=object)
    if not sp.issparse(matrix) and getattr(matrix, "format", None) == "csc":
        # A backed CSC matrix has no cheap row slices: every chunk reads all columns from disk.
        warnings.warn(
            f"{label} stores its counts as CSC on disk, so every chunk of cells reads the whole matrix; for "
            "speed, convert it once (adata = adata.to_memory(); adata.X = adata.X.tocsr(); adata.write_h5ad(...))",
            stacklevel=4,
        )
    n_counts = None
    if n_counts_key is not None and n_counts_key in adata.obs.columns:
        n_counts = pd.to_numeric(adata.obs[n_counts_key], errors="coerce").to_numpy(dtype=np.float64)
    return _CountSource(matrix, gene_names, adata.obs_names, n_counts, label)


@dataclass
class _CsrRows:
    """Consecutive rows of a count matrix as raw CSR arrays (views where the input allows)."""

    indptr: np.ndarray  # int64 [n_rows + 1], starting at 0
    indices: np.ndarray  # int32 column of each stored value
    data: np.ndarray  # float32 or float64 stored values (two dtypes: two compiled kernels at most)
    n_columns: int  # columns of the full matrix

    @property
    def n_rows(self) -> int:
        return self.indptr.size - 1

    def to_scipy(self) -> sp.csr_matrix:
        return sp.csr_matrix((self.data, self.indices, self.indptr), shape=(self.n_rows, self.n_columns))

    @classmethod
    def from_scipy(cls, matrix: Any) -> _CsrRows:
        matrix = sp.csr_matrix(matrix)
        return cls._normalised(matrix.indptr, matrix.indices, matrix.data, matrix.shape[1])

    @classmethod
    def _normalised(
        cls, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_columns: int
    ) -> _CsrRows:
        if data.dtype not in (np.float32, np.float64):
            # Integer counts etc. become float64 (exact below 2**53); float32 stays as it is.
            data = data.astype(np.float64)
        return cls(
            indptr=np.asarray(indptr, dtype=np.int64),
            indices=np.asarray(indices, dtype=np.int32),
            data=data,
            n_columns=n_columns,
        )


def _read_rows(matrix: Any, start: int, stop: int) -> _CsrRows:
    """Rows ``start:stop`` of a matrix as CSR arrays; dense and CSC inputs are converted chunk by chunk."""
    if isinstance(matrix, sp.csr_matrix | sp.csr_array):
        # In-memory CSR: views into the matrix, no copy of the values.
        first, last = int(matrix.indptr[start]), int(matrix.indptr[stop])
        return _CsrRows._normalised(
            matrix.indptr[start : stop + 1] - first,
            matrix.indices[first:last],
            matrix.data[first:last],
            matrix.shape[1],
        )
    chunk = matrix[start:stop]
    if not sp.issparse(chunk):
        chunk = sp.csr_matrix(np.asarray(chunk))
    return _CsrRows.from_scipy(chunk)


# Problems the scan kernel can flag per row (bits of a uint8).
_NON_FINITE, _NEGATIVE, _NON_INTEGER, _NON_CANONICAL, _HAS_SECONDARY = 1, 2, 4, 8, 16


def _column_map(selection: sp.csr_matrix) -> np.ndarray:
    """Encode where each input column goes: ``p >= 0`` vocabulary position ``p``; ``-1`` nowhere;
    ``-(p + 2)`` position ``p`` as a *secondary* column (a duplicate of an earlier column, summed in)."""
    selection = selection.tocsr()
    n_columns = selection.shape[0]
    has_key = np.diff(selection.indptr) > 0
    column_map = np.full(n_columns, -1, dtype=np.int32)
    mapped = np.flatnonzero(has_key)
    positions = selection.indices[selection.indptr[mapped]].astype(np.int32)
    column_map[mapped] = positions
    _, first = np.unique(positions, return_index=True)
    secondary = np.ones(mapped.size, dtype=bool)
    secondary[first] = False
    column_map[mapped[secondary]] = -(positions[secondary] + 2)
    return column_map


@numba.njit(parallel=True, cache=True)
def _scan_rows(indptr, indices, data, column_map, totals, n_expressed, row_max, flags):  # pragma: no cover
    # Numba-compiled; covered through GeneTokenizer.encode/fit (coverage cannot see inside).
    # One pass over the stored values: totals, value checks, and how many vocabulary genes each row expresses.
    for row in numba.prange(indptr.size - 1):
        start, stop = indptr[row], indptr[row + 1]
        total, largest, count, flag, previous = 0.0, 0.0, 0, 0, -1
        for j in range(start, stop):
            x = np.float64(data[j])
            if not np.isfinite(x):
                flag |= 1
            elif x < 0:
                flag |= 2
            elif x != np.floor(x):
                flag |= 4
            if indices[j] <= previous:
                flag |= 8
            previous = indices[j]
            total += x
            largest = max(largest, x)
            position = column_map[indices[j]]
            if x > 0 and position >= 0:
                count += 1
            elif x > 0 and position <= -2:
                flag |= 16
                # A duplicated gene adds a token only if neither its primary column nor an earlier duplicate
                # already gave one in this row (rare: a linear search is fine).
                seen = False
                for k in range(start, j):
                    other = column_map[indices[k]]
                    if data[k] > 0 and (other == -position - 2 or other == position):
                        seen = True
                        break
                if not seen:
                    for k in range(j + 1, stop):
                        if data[k] > 0 and column_map[indices[k]] == -position - 2:
                            seen = True
                            break
                if not seen:
                    count += 1
        totals[row] = total
        row_max[row] = largest
        n_expressed[row] = count
        flags[row] = flag


@numba.njit(cache=True)
def _sort_keys(keys, payload):  # pragma: no cover
    # Sort uint64 keys ascending, ties by the int32 payload ascending; returns the sorted (keys, payload),
    # which may be scratch arrays. A stable LSD radix sort (8-bit digits) orders the high 32 bits; keys
    # that share them (values within ~1e-6 of each other, or equal) form short runs that an insertion
    # sort then orders exactly by (key, payload). One pass counts all four digit histograms, and a digit
    # whose values are all equal is skipped.
    n = keys.size
    histograms = np.zeros((4, 256), np.int64)
    mask = np.uint64(0xFF)
    for i in range(n):
        key = keys[i]
        for digit in range(4):
            histograms[digit, (key >> np.uint64(32 + 8 * digit)) & mask] += 1
    scratch_keys = np.empty_like(keys)
    scratch_payload = np.empty_like(payload)
    for digit in range(4):
        shift = np.uint64(32 + 8 * digit)
        starts = histograms[digit]
        if n == 0 or starts[(keys[0] >> shift) & mask] == n:
            continue
        running = 0
        for b in range(256):
            size = starts[b]
            starts[b] = running
            running += size
        for i in range(n):
            b = (keys[i] >> shift) & mask
            target = starts[b]
            scratch_keys[target] = keys[i]
            scratch_payload[target] = payload[i]
            starts[b] = target + 1
        keys, scratch_keys = scratch_keys, keys
        payload, scratch_payload = scratch_payload, payload
    high = np.uint64(32)
    run_start = 0
    for i in range(1, n + 1):
        if i < n and (keys[i] >> high) == (keys[run_start] >> high):
            continue
        for a in range(run_start + 1, i):
            key, item = keys[a], payload[a]
            b = a - 1
            while b >= run_start and (keys[b] > key or (keys[b] == key and payload[b] > item)):
                keys[b + 1] = keys[b]
                payload[b + 1] = payload[b]
                b -= 1
            keys[b + 1] = key
            payload[b + 1] = item
        run_start = i
    return keys, payload


@numba.njit(parallel=True, cache=True)
def _rank_rows(
    indptr, indices, data, column_map, n_counts, medians, n_expressed, flags, out_offsets, out_ids, cls_id
):  # pragma: no cover
    # Numba-compiled; covered through GeneTokenizer.encode (coverage cannot see inside).
    for row in numba.prange(indptr.size - 1):
        start, stop = indptr[row], indptr[row + 1]
        out_start = out_offsets[row]
        out_ids[out_start] = cls_id
        keep = out_offsets[row + 1] - out_start - 1
        if keep == 0:
            continue
        positions = np.empty(n_expressed[row], np.int32)
        counts = np.empty(n_expressed[row], np.float64)
        m = 0
        for j in range(start, stop):
            position = column_map[indices[j]]
            if position >= 0 and data[j] > 0:
                positions[m] = position
                counts[m] = data[j]
                m += 1
        if flags[row] & 16:
            # Duplicated genes: add each secondary column's count to its gene's entry (or start one).
            for j in range(start, stop):
                position = column_map[indices[j]]
                if position <= -2 and data[j] > 0:
                    position = -position - 2
                    found = False
                    for k in range(m):
                        if positions[k] == position:
                            counts[k] += data[j]
                            found = True
                            break
                    if not found:
                        positions[m] = position
                        counts[m] = data[j]
                        m += 1
        values = np.empty(m, np.float64)
        for k in range(m):
            # Same float64 operations, same order as the definition: (count / n_counts * 1e4) / median.
            values[k] = (counts[k] / n_counts[row] * 10000.0) / medians[positions[k]]
        # Positive floats order like their bit patterns; inverting the bits sorts them descending.
        keys = values.view(np.uint64)
        for k in range(m):
            keys[k] = ~keys[k]
        # Descending value; equal values by vocabulary position (= token id - 2) ascending.
        keys, positions = _sort_keys(keys, positions)
        for k in range(keep):
            out_ids[out_start + 1 + k] = positions[k] + 2


@dataclass
class _ScannedRows:
    """A chunk of rows with what the scan kernel found."""

    start: int  # index of the first row in its source
    rows: _CsrRows  # the stored values
    n_counts: np.ndarray  # float64 total counts per cell (matrix totals, or obs[n_counts_key])
    n_expressed: np.ndarray  # int64 number of vocabulary genes each cell expresses
    flags: np.ndarray  # uint8 scan flags per row (_HAS_SECONDARY matters downstream)


def _scan(rows: _CsrRows, column_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    totals = np.empty(rows.n_rows, dtype=np.float64)
    n_expressed = np.empty(rows.n_rows, dtype=np.int64)
    row_max = np.empty(rows.n_rows, dtype=np.float64)
    flags = np.empty(rows.n_rows, dtype=np.uint8)
    with _torch_threads_kept():
        _scan_rows(rows.indptr, rows.indices, rows.data, column_map, totals, n_expressed, row_max, flags)
    return totals, n_expressed, row_max, flags


@contextlib.contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """Run a numba parallel kernel without changing torch's thread count.

    numba's first parallel launch in a process (of a cached kernel) resets the OpenMP thread count that
    torch also reads, which would silently undo a user's ``torch.set_num_threads``. The tokenizer does
    not import torch; it only restores the count when torch is already loaded.
    """
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if torch is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _raise_on_bad_values(flags: np.ndarray, row_max: np.ndarray, label: str) -> None:
    """Refuse values that are not raw counts, with a message that says what to pass instead."""
    seen = np.bitwise_or.reduce(flags) if flags.size else 0
    if seen & _NON_FINITE:
        raise LangCellError(f"{label} contains NaN or infinite values; {_COUNTS_FIX}")
    if seen & _NEGATIVE:
        raise LangCellError(f"{label} contains negative values (scaled or centred data?); {_COUNTS_FIX}")
    if seen & _NON_INTEGER:
        if row_max.max() < _LOG_NORMALISED_MAX:
            raise LangCellError(
                f"{label} looks log-normalised (non-integer values, all below {_LOG_NORMALISED_MAX:g}); "
                f"{_COUNTS_FIX}"
            )
        raise LangCellError(
            f"{label} contains non-integer values (normalised data?); {_COUNTS_FIX}; "
            "if these are counts with rounding noise, round them first (np.rint)"
        )


def _iter_scanned(
    source: _CountSource,
    column_map: np.ndarray,
    *,
    chunk_size: int,
    progress: bool,
    desc: str,
    n_counts_key: str | None,
) -> Iterator[_ScannedRows]:
    """Read a source in row chunks, check the values, and count each cell's vocabulary genes."""
    if chunk_size < 1:
        raise LangCellError(f"chunk_size must be a positive number of cells, got {chunk_size}")
    starts = range(0, source.n_obs, chunk_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="chunk", total=len(starts))
    for start in starts:
        stop = min(start + chunk_size, source.n_obs)
        rows = _read_rows(source.matrix, start, stop)
        totals, n_expressed, row_max, flags = _scan(rows, column_map)
        if (flags & _NON_CANONICAL).any():
            # Unsorted or repeated column indices within a row: let scipy sort and sum them (on a copy,
            # the input stays untouched), then scan again.
            fixed = sp.csr_matrix(
                (rows.data.copy(), rows.indices.copy(), rows.indptr.copy()),
                shape=(stop - start, rows.n_columns),
            )
            fixed.sum_duplicates()
            rows = _CsrRows.from_scipy(fixed)
            totals, n_expressed, row_max, flags = _scan(rows, column_map)
        _raise_on_bad_values(flags, row_max, source.label)
        n_counts = totals if source.n_counts is None else source.n_counts[start:stop]
        bad = (n_expressed > 0) & ~(np.isfinite(n_counts) & (n_counts > 0))
        if bad.any():
            raise LangCellError(
                f"{source.label}: obs[{n_counts_key!r}] is missing, zero or negative for {int(bad.sum())} cells "
                "that have counts; fix that column or pass n_counts_key=None to compute totals from the matrix"
            )
        yield _ScannedRows(start, rows, n_counts, n_expressed, flags)


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
    # Same convention as langcell.genes: a duplicate is a name an earlier column already has.
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
    names: np.ndarray, gene_id_kind: str, organism: str | None, prefer: frozenset | None = None
) -> tuple[np.ndarray, Any]:
    """Vocabulary keys of the input columns (``None`` where a column has none) and the mapping report.

    ``prefer``: Ensembl IDs an ambiguous symbol should resolve to first (the vocabulary's).
    """
    if gene_id_kind == "custom":
        return names, _custom_report(names)
    keys, report = _genes.map_to_ensembl(names, organism=organism, prefer=prefer)
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
        :mod:`langcell.genes`. ``"custom"``: names are matched verbatim (for data whose genes have no
        standard IDs).
    organism
        Organism of the vocabulary (``"human"``, ``"mouse"``) used to resolve symbols; ``None`` detects
        it from each input.

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
    ) -> None:
        if gene_id_kind not in ("ensembl", "custom"):
            raise LangCellError(f"gene_id_kind must be 'ensembl' or 'custom', got {gene_id_kind!r}")
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
        return (
            f"GeneTokenizer(n_genes={self.n_genes}, gene_id_kind={self.gene_id_kind!r}, "
            f"organism={self.organism!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GeneTokenizer):
            return NotImplemented
        return (
            self.genes == other.genes
            and np.array_equal(self.medians, other.medians)
            and self.gene_id_kind == other.gene_id_kind
            and self.organism == other.organism
        )

    __hash__ = None  # mutable arrays inside: not hashable

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_geneformer(
        cls, token_dictionary_path: str | os.PathLike, gene_median_dictionary_path: str | os.PathLike
    ) -> GeneTokenizer:
        """Build the tokenizer of the release from Geneformer's two dictionaries.

        Parameters
        ----------
        token_dictionary_path
            ``token_dictionary.pkl``: ``{"<pad>": 0, "<mask>": 1, ensembl_id: token_id, ...}``.
        gene_median_dictionary_path
            ``gene_median_dictionary.pkl``: ``{ensembl_id: median}``.

        Both are read with :func:`read_geneformer_dictionary` (restricted unpickling).
        """
        tokens = read_geneformer_dictionary(token_dictionary_path)
        medians = read_geneformer_dictionary(gene_median_dictionary_path)
        if tokens.get("<pad>") != 0 or tokens.get("<mask>") != 1:
            raise LangCellError(
                f"{str(token_dictionary_path)!r} does not have <pad>=0 and <mask>=1; pass Geneformer's "
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
        return cls(genes, [float(medians[g]) for g in genes], gene_id_kind="ensembl", organism="human")

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
            An AnnData (in memory or backed), an ``.h5ad`` path (read backed), or a list of them.
        gene_id_kind
            ``"ensembl"`` (names mapped through :mod:`langcell.genes`; the vocabulary is sorted by
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
        source_list = _as_source_list(sources)
        # Two passes over the metadata only: first the union of keys (the vocabulary candidates), then
        # the counts. Sources are reopened for the second pass so that paths stay backed and closed.
        per_source_keys: list[np.ndarray] = []
        detected: set[str | None] = set()
        for i, source in enumerate(source_list):
            with _opened(source, f"input #{i}") as (adata, label):
                counts = _count_source(
                    adata,
                    label,
                    gene_column=gene_column,
                    counts_layer=counts_layer,
                    n_counts_key=n_counts_key,
                )
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

        accumulator = _MedianAccumulator(len(candidates), exact=exact, max_exact_values=max_exact_values)
        n_cells_expressing = np.zeros(len(candidates), dtype=np.int64)
        for i, (source, keys) in enumerate(zip(source_list, per_source_keys, strict=True)):
            with _opened(source, f"input #{i}") as (adata, label):
                counts_source = _count_source(
                    adata,
                    label,
                    gene_column=gene_column,
                    counts_layer=counts_layer,
                    n_counts_key=n_counts_key,
                )
                selection = _genes.selection_matrix(keys, candidate_keys, dtype=np.float64)
                column_map = _column_map(selection)
                for chunk in _iter_scanned(
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
        keys, report = _column_keys(gene_names, self.gene_id_kind, self.organism, prefer=self._vocab_set)
        selection = _genes.selection_matrix(keys, self._vocab_keys, dtype=np.float64)
        n_in_vocabulary = int(np.count_nonzero(np.diff(selection.indptr)))
        report = dataclasses.replace(report, n_in_vocabulary=n_in_vocabulary)
        if n_in_vocabulary == 0:
            raise LangCellError(self._no_vocabulary_message(gene_names, report, label))
        return _VocabularyMap(_column_map(selection), report)

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
        source: _CountSource,
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
            for chunk in _iter_scanned(
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
        self, chunk: _ScannedRows, column_map: np.ndarray, max_length: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (flat int32) and lengths of a scanned chunk."""
        lengths = np.minimum(chunk.n_expressed, max_length - 1) + 1
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        rows = chunk.rows
        with _torch_threads_kept():
            _rank_rows(
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
            An AnnData (in memory or backed; X dense, CSR or CSC) or an ``.h5ad`` path (read backed).
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
        with _opened(adata, "the AnnData") as (opened, label):
            source = _count_source(
                opened, label, gene_column=gene_column, counts_layer=counts_layer, n_counts_key=n_counts_key
            )
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
        return {
            "format": _FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "gene_id_kind": self.gene_id_kind,
            "organism": self.organism,
            "special_tokens": {"<pad>": self.pad_id, "<mask>": self.mask_id, "<cls>": self.cls_id},
            "genes": self.genes,
            # repr-exact floats: json writes the shortest string that reads back to the same float64.
            "medians": [float(m) for m in self.medians],
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``<directory>/gene_tokenizer.json`` (genes, medians, id kind, organism, format version).

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
        try:
            tokenizer = cls(
                genes, medians, gene_id_kind=content["gene_id_kind"], organism=content["organism"]
            )
        except (TypeError, ValueError) as err:
            raise LangCellError(f"{str(path)!r} is invalid: {err}") from None
        expected = {"<pad>": tokenizer.pad_id, "<mask>": tokenizer.mask_id, "<cls>": tokenizer.cls_id}
        if content["special_tokens"] != expected:
            raise LangCellError(
                f"{str(path)!r}: special tokens {content['special_tokens']} do not match the layout {expected}; "
                "save the tokenizer again"
            )
        return tokenizer


def _warn_cells_without_genes(n_empty: int, n_cells: int, label: str) -> None:
    if n_empty:
        warnings.warn(
            f"{n_empty} of {n_cells} cells of {label} express no vocabulary gene; they are kept as the "
            "sequence [<cls>] and listed in cells_without_genes (filter them out if they are empty droplets)",
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------------
# Medians, exact or log-binned
# --------------------------------------------------------------------------------------------------


class _MedianAccumulator:
    """Per-gene medians of streamed values: exact while memory allows, else a sparse log-binned histogram."""

    _BIN_OFFSET = 1 << 31  # shifts signed bin numbers into the low 32 bits of a key

    def __init__(self, n_genes: int, *, exact: bool | None, max_exact_values: int) -> None:
        self.n_genes = n_genes
        self.exact = exact
        self.max_exact_values = max_exact_values
        self._genes: list[np.ndarray] = []  # exact mode: gene index of each collected value
        self._values: list[np.ndarray] = []  # exact mode: the values
        self._n_values = 0
        self._hist_keys: list[np.ndarray] = []  # histogram mode: (gene << 32 | bin) keys, unique per part
        self._hist_counts: list[np.ndarray] = []  # histogram mode: counts of those keys
        self._hist_size = 0
        self.approximate = exact is False

    def add(self, genes: np.ndarray, values: np.ndarray) -> None:
        if self.approximate:
            self._add_histogram(genes, values)
            return
        self._genes.append(genes.astype(np.int32, copy=True))
        self._values.append(values.astype(np.float64, copy=True))
        self._n_values += values.size
        if self.exact is None and self._n_values > self.max_exact_values:
            # Over budget: fold what was collected into the histogram and continue there.
            self.approximate = True
            genes_all, values_all = np.concatenate(self._genes), np.concatenate(self._values)
            self._genes, self._values = [], []
            self._add_histogram(genes_all, values_all)

    def _add_histogram(self, genes: np.ndarray, values: np.ndarray) -> None:
        bins = np.floor(np.log(values) / _LOG_BIN_WIDTH).astype(np.int64) + self._BIN_OFFSET
        keys = (genes.astype(np.int64) << 32) | bins
        unique, counts = np.unique(keys, return_counts=True)
        self._hist_keys.append(unique)
        self._hist_counts.append(counts)
        self._hist_size += unique.size
        if len(self._hist_keys) > 64:
            self._consolidate()

    def _consolidate(self) -> None:
        keys = np.concatenate(self._hist_keys)
        counts = np.concatenate(self._hist_counts)
        unique, inverse = np.unique(keys, return_inverse=True)
        self._hist_keys = [unique]
        self._hist_counts = [np.bincount(inverse, weights=counts, minlength=unique.size).astype(np.int64)]

    def medians(self) -> np.ndarray:
        """Per-gene medians (NaN for genes without values)."""
        if self.approximate:
            return self._histogram_medians()
        if not self._values:
            return np.full(self.n_genes, np.nan)
        genes = np.concatenate(self._genes)
        values = np.concatenate(self._values)
        order = np.lexsort((values, genes))
        sorted_values = values[order]
        n_per_gene = np.bincount(genes, minlength=self.n_genes)
        return _middle_mean(n_per_gene, lambda ranks: sorted_values[ranks])

    def _histogram_medians(self) -> np.ndarray:
        if not self._hist_keys:
            return np.full(self.n_genes, np.nan)
        self._consolidate()
        keys, counts = self._hist_keys[0], self._hist_counts[0]
        genes = (keys >> 32).astype(np.int64)
        bins = (keys & 0xFFFFFFFF) - self._BIN_OFFSET
        centres = np.exp((bins + 0.5) * _LOG_BIN_WIDTH)
        n_per_gene = np.bincount(genes, weights=counts, minlength=self.n_genes).astype(np.int64)
        cumulative = np.cumsum(counts)
        # Keys are sorted gene-major, so global rank r lies in the first bin whose cumulative count exceeds r.
        return _middle_mean(
            n_per_gene, lambda ranks: centres[np.searchsorted(cumulative, ranks, side="right")]
        )


def _middle_mean(n_per_gene: np.ndarray, value_at_rank: Any) -> np.ndarray:
    """Mean of the two middle values of each gene's sorted values (``np.median`` semantics).

    ``value_at_rank`` maps global ranks (over all genes, sorted gene-major then by value) to values.
    """
    medians = np.full(n_per_gene.size, np.nan)
    present = n_per_gene > 0
    starts = np.cumsum(n_per_gene) - n_per_gene
    low = starts[present] + (n_per_gene[present] - 1) // 2
    high = starts[present] + n_per_gene[present] // 2
    # (a + b) / 2 equals np.median's mean of the two middle elements; for odd counts a == b and it is exact.
    medians[present] = (value_at_rank(low) + value_at_rank(high)) / 2.0
    return medians

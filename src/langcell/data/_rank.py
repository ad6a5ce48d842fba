"""The numba kernels of rank-value encoding: scan rows for bad values, compute and sort gene values.

:class:`langcell.data.tokenizer.GeneTokenizer` is the only user. Two kernels run over CSR rows in
parallel: one checks the values and counts each cell's expressed vocabulary genes, the other computes
``count / n_counts * 10_000 / median`` and sorts (radix on the high 32 bits, then an exact pass).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp

from .._progress import progress_bar
from ..errors import LangCellError
from .sources import CountSource, CsrRows, read_rows

#: Values of a matrix whose non-integer entries all lie below this look log-normalised (log1p of
#: counts per 10k rarely exceeds ~12).
_LOG_NORMALISED_MAX = 50.0

_COUNTS_FIX = "pass raw counts, e.g. counts_layer='counts' or use_raw (counts_layer='raw')"

# Problems the scan kernel can flag per row (bits of a uint8).
_NON_FINITE, _NEGATIVE, _NON_INTEGER, _NON_CANONICAL, _HAS_SECONDARY = 1, 2, 4, 8, 16


def selection_columns(selection: sp.csr_matrix) -> np.ndarray:
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
def rank_rows(
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
class ScannedRows:
    """A chunk of rows with what the scan kernel found."""

    start: int  # index of the first row in its source
    rows: CsrRows  # the stored values
    n_counts: np.ndarray  # float64 total counts per cell (matrix totals, or obs[n_counts_key])
    n_expressed: np.ndarray  # int64 number of vocabulary genes each cell expresses
    flags: np.ndarray  # uint8 scan flags per row (_HAS_SECONDARY matters downstream)


def _scan(rows: CsrRows, column_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    totals = np.empty(rows.n_rows, dtype=np.float64)
    n_expressed = np.empty(rows.n_rows, dtype=np.int64)
    row_max = np.empty(rows.n_rows, dtype=np.float64)
    flags = np.empty(rows.n_rows, dtype=np.uint8)
    with torch_threads_kept():
        _scan_rows(rows.indptr, rows.indices, rows.data, column_map, totals, n_expressed, row_max, flags)
    return totals, n_expressed, row_max, flags


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
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


def iter_scanned(
    source: CountSource,
    column_map: np.ndarray,
    *,
    chunk_size: int,
    progress: bool,
    desc: str,
    n_counts_key: str | None,
) -> Iterator[ScannedRows]:
    """Read a source in row chunks, check the values, and count each cell's vocabulary genes."""
    if chunk_size < 1:
        raise LangCellError(f"chunk_size must be a positive number of cells, got {chunk_size}")
    starts = range(0, source.n_obs, chunk_size)
    bar = progress_bar(len(starts), progress, desc, "chunk")
    try:
        for start in starts:
            stop = min(start + chunk_size, source.n_obs)
            rows = read_rows(source.matrix, start, stop)
            totals, n_expressed, row_max, flags = _scan(rows, column_map)
            if (flags & _NON_CANONICAL).any():
                # Unsorted or repeated column indices within a row: let scipy sort and sum them (on a copy,
                # the input stays untouched), then scan again.
                fixed = sp.csr_matrix(
                    (rows.data.copy(), rows.indices.copy(), rows.indptr.copy()),
                    shape=(stop - start, rows.n_columns),
                )
                fixed.sum_duplicates()
                rows = CsrRows.from_scipy(fixed)
                totals, n_expressed, row_max, flags = _scan(rows, column_map)
            _raise_on_bad_values(flags, row_max, source.label)
            n_counts = totals if source.n_counts is None else source.n_counts[start:stop]
            bad = (n_expressed > 0) & ~(np.isfinite(n_counts) & (n_counts > 0))
            if bad.any():
                raise LangCellError(
                    f"{source.label}: obs[{n_counts_key!r}] is missing, zero or negative for {int(bad.sum())} cells "
                    "that have counts; fix that column or pass n_counts_key=None to compute totals from the matrix"
                )
            yield ScannedRows(start, rows, n_counts, n_expressed, flags)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

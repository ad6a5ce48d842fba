"""Where counts come from: AnnData objects, h5ad paths (backed, streamed), SOMA experiments, and CSR
row chunks of any of them.

The tokenizer and the corpus writer read counts through :func:`opened_counts`, so that an in-memory
AnnData, a backed one, a path on disk and a SOMA experiment (:class:`~langcell.data.soma.SomaSource`)
are handled alike and never densified as a whole.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import LangCellError
from .soma import SomaSource, opened_soma, var_gene_names

_INPUTS = "pass an AnnData, an .h5ad path, a SomaSource, or a list of them"


@dataclass
class CountSource:
    """One AnnData seen as a row-sliceable count matrix with gene names."""

    matrix: Any  # row-sliceable: scipy sparse, numpy array, h5py dataset or anndata backed dataset
    gene_names: np.ndarray  # object array, one name per column
    obs_names: pd.Index  # cell names
    n_counts: np.ndarray | None  # float64 totals from obs, or None to compute them from the matrix
    label: str  # how messages name this source
    obs: pd.DataFrame  # cell metadata, one row per matrix row (a reference, not a copy)

    @property
    def n_obs(self) -> int:
        return len(self.obs_names)


def _describe(adata: Any, fallback: str) -> str:
    filename = getattr(adata, "filename", None)
    return str(filename) if filename else fallback


@contextlib.contextmanager
def opened_source(source: Any, label: str) -> Iterator[tuple[Any, str]]:
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
    raise LangCellError(f"cannot read a {type(source).__name__} as cells; {_INPUTS}")


def as_source_list(sources: Any) -> list[Any]:
    import anndata

    if isinstance(sources, anndata.AnnData | str | os.PathLike | SomaSource):
        return [sources]
    if isinstance(sources, Sequence):
        if len(sources) == 0:
            raise LangCellError(f"no input given; {_INPUTS}")
        return list(sources)
    raise LangCellError(f"cannot read a {type(sources).__name__} as cells; {_INPUTS}")


@contextlib.contextmanager
def opened_counts(
    source: Any,
    label: str,
    *,
    gene_column: str | None,
    counts_layer: str | None,
    n_counts_key: str | None,
    obs_columns: Sequence[str] | None = None,
) -> Iterator[CountSource]:
    """Open any input (AnnData, h5ad path, :class:`~langcell.data.soma.SomaSource`) as a :class:`CountSource`.

    ``counts_layer`` applies to AnnData and h5ad inputs; a SOMA experiment's counts are its ``x_layer``.
    ``obs_columns`` limits the obs columns a SOMA experiment reads (``None``: all; h5ad files read their
    obs whole). Files and experiments are closed afterwards.
    """
    if isinstance(source, SomaSource):
        with opened_soma(source, obs_columns=obs_columns, n_counts_key=n_counts_key) as cells:
            n_counts = None
            if n_counts_key is not None and n_counts_key in cells.obs.columns:
                n_counts = pd.to_numeric(cells.obs[n_counts_key], errors="coerce").to_numpy(dtype=np.float64)
            names = var_gene_names(cells.var, gene_column, cells.label)
            yield CountSource(cells.matrix, names, cells.obs.index, n_counts, cells.label, cells.obs)
        return
    with opened_source(source, label) as (adata, described):
        yield count_source(
            adata, described, gene_column=gene_column, counts_layer=counts_layer, n_counts_key=n_counts_key
        )


def count_source(
    adata: Any, label: str, *, gene_column: str | None, counts_layer: str | None, n_counts_key: str | None
) -> CountSource:
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
    return CountSource(matrix, gene_names, adata.obs_names, n_counts, label, adata.obs)


@dataclass
class CsrRows:
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
    def from_scipy(cls, matrix: Any) -> CsrRows:
        matrix = sp.csr_matrix(matrix)
        return cls._normalised(matrix.indptr, matrix.indices, matrix.data, matrix.shape[1])

    @classmethod
    def _normalised(
        cls, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_columns: int
    ) -> CsrRows:
        if data.dtype not in (np.float32, np.float64):
            # Integer counts etc. become float64 (exact below 2**53); float32 stays as it is.
            data = data.astype(np.float64)
        return cls(
            indptr=np.asarray(indptr, dtype=np.int64),
            indices=np.asarray(indices, dtype=np.int32),
            data=data,
            n_columns=n_columns,
        )


def row_nnz(matrix: Any) -> np.ndarray | None:
    """Stored values per row of a matrix, read cheaply (CSR index pointers, or a SOMA experiment's ``nnz``
    obs column); ``None`` when that would mean reading the values."""
    if isinstance(matrix, sp.csr_matrix | sp.csr_array):
        return np.diff(matrix.indptr).astype(np.int64)
    if getattr(matrix, "format", None) == "csr" and hasattr(matrix, "group"):
        # anndata's backed CSR dataset: the index pointers alone (8 bytes a cell) come off the disk.
        return np.diff(np.asarray(matrix.group["indptr"][:], dtype=np.int64))
    return getattr(matrix, "row_nnz", None)


def read_rows(matrix: Any, start: int, stop: int) -> CsrRows:
    """Rows ``start:stop`` of a matrix as CSR arrays; dense and CSC inputs are converted chunk by chunk."""
    if isinstance(matrix, sp.csr_matrix | sp.csr_array):
        # In-memory CSR: views into the matrix, no copy of the values.
        first, last = int(matrix.indptr[start]), int(matrix.indptr[stop])
        return CsrRows._normalised(
            matrix.indptr[start : stop + 1] - first,
            matrix.indices[first:last],
            matrix.data[first:last],
            matrix.shape[1],
        )
    chunk = matrix[start:stop]
    if not sp.issparse(chunk):
        chunk = np.asarray(chunk)
        # scipy has no float16 sparse matrices; counts of that type are exact in float32.
        chunk = sp.csr_matrix(chunk.astype(np.float32) if chunk.dtype == np.float16 else chunk)
    return CsrRows.from_scipy(chunk)

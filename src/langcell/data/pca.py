"""PCA of log-normalised counts: the expression-only view of cells that baselines and kNN graphs use.

One function, below both :mod:`langcell.tl` (the consensus graph on PCA) and :mod:`langcell.evaluation`
(the unintegrated baseline of the integration metrics), so both compute the same components.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._checks import check_anndata as _check_anndata
from .._checks import check_positive_int
from ..errors import LangCellError
from .sources import count_source


def log_normalised_pca(adata: Any, *, n_pcs: int = 50, counts_layer: str | None = None) -> tuple[np.ndarray, int]:
    """PCA of log-normalised counts: counts per 10,000, ``log1p``, ``scanpy.tl.pca`` (ARPACK, seed 0).

    The counts are copied (``adata`` is left alone) and all genes are used. See
    :func:`langcell.evaluation.baseline_pca` for the parameters, returns and errors.
    """
    import anndata
    import scanpy as sc
    import scipy.sparse as sp

    _check_anndata(adata)
    n_pcs = check_positive_int(n_pcs, "n_pcs")
    if adata.isbacked:
        raise LangCellError(
            "the PCA baseline needs the counts in memory but the AnnData is backed; load it with "
            "adata.to_memory(), or put a precomputed baseline in obsm"
        )
    source = count_source(adata, "the AnnData", gene_column=None, counts_layer=counts_layer, n_counts_key=None)
    counts = source.matrix
    counts = sp.csr_matrix(counts, dtype=np.float32, copy=True) if sp.issparse(counts) else np.array(
        counts, dtype=np.float32
    )
    values = counts.data if sp.issparse(counts) else counts
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values != np.rint(values)):
        raise LangCellError(
            "the PCA baseline needs raw counts (finite, non-negative integers) but the matrix holds other values; "
            "pass counts_layer=<the layer of raw counts> (or 'raw'), or put a precomputed baseline in obsm"
        )
    n_comps = min(n_pcs, adata.n_obs - 1, adata.n_vars - 1)
    if n_comps < 1:
        raise LangCellError(
            f"a PCA needs at least 2 cells and 2 genes, got {adata.n_obs} x {adata.n_vars}; pass more data"
        )
    work = anndata.AnnData(X=counts)
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    sc.tl.pca(work, n_comps=n_comps, svd_solver="arpack", random_state=0, mask_var=None)
    return np.asarray(work.obsm["X_pca"], dtype=np.float32), int(n_comps)

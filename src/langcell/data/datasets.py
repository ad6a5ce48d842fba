"""Real single-cell data as AnnData with raw counts and CELLxGENE-schema metadata.

Nothing here downloads anything. :func:`pbmc68k` reads the PBMC sample that ships inside scanpy; the
other loaders read files whose path the user gives (the project's test data live outside the package).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import LangCellError
from ..ontology import resolve_labels

#: obs columns of the CELLxGENE schema that langcell reads, by aspect.
CELLXGENE_TERM_COLUMNS = {
    "cell_type": "cell_type_ontology_term_id",
    "tissue": "tissue_ontology_term_id",
    "disease": "disease_ontology_term_id",
    "development_stage": "development_stage_ontology_term_id",
    "sex": "sex_ontology_term_id",
    "assay": "assay_ontology_term_id",
    "organism": "organism_ontology_term_id",
    "self_reported_ethnicity": "self_reported_ethnicity_ontology_term_id",
}

# What is known about the 68k PBMC study (Zheng et al. 2017, 10x GemCode = 3' v1) for every cell.
_PBMC68K_CONSTANT_TERMS = {
    "organism_ontology_term_id": "NCBITaxon:9606",  # Homo sapiens
    "tissue_ontology_term_id": "UBERON:0000178",  # blood
    "disease_ontology_term_id": "PATO:0000461",  # normal
    "assay_ontology_term_id": "EFO:0009901",  # 10x 3' v1
}


def counts_from_log1p(log_normalised, n_counts: np.ndarray, target_sum: float = 1e4) -> sp.csr_matrix:
    """Undo ``log1p(counts / n_counts * target_sum)`` and round to integer counts.

    Parameters
    ----------
    log_normalised
        Cells x genes matrix (dense or sparse) of ``log1p`` normalised values.
    n_counts
        Each cell's total counts used for the normalisation.
    target_sum
        The normalisation target (scanpy's default 10,000).

    Returns
    -------
    scipy.sparse.csr_matrix
        ``float32`` counts, rounded to the nearest integer.
    """
    matrix = sp.csr_matrix(log_normalised, dtype=np.float64, copy=True)
    n_counts = np.asarray(n_counts, dtype=np.float64)
    scale = np.repeat(n_counts / target_sum, np.diff(matrix.indptr))
    matrix.data = np.rint(np.expm1(matrix.data) * scale)
    matrix.eliminate_zeros()
    return matrix.astype(np.float32)


def pbmc68k():
    """Scanpy's bundled 700 PBMCs (``pbmc68k_reduced``) with raw counts and Cell Ontology labels.

    The bundled ``.raw`` holds ``log1p(counts / n_counts * 1e4)`` for 765 genes, so the counts are
    recovered exactly (to within 0.08 before rounding). Those 765 genes carry only about 20% of each
    cell's counts: ``obs["n_counts"]`` keeps the cell's true total, which the tokenizer uses for the
    normalisation, as Geneformer does.

    Returns
    -------
    anndata.AnnData
        700 cells x 765 genes (symbols), ``X`` = raw counts (``float32`` CSR). obs: ``n_counts``,
        ``author_cell_type`` (the study's ``bulk_labels``), ``cell_type`` and
        ``cell_type_ontology_term_id`` (the labels resolved through the Cell Ontology), and the
        CELLxGENE columns known for the study (organism, tissue, disease, assay). The label resolution
        table is in ``uns["cell_type_resolution"]``.
    """
    import anndata as ad
    import scanpy as sc


    reduced = sc.datasets.pbmc68k_reduced()
    counts = counts_from_log1p(reduced.raw.X, reduced.obs["n_counts"].to_numpy())
    author = reduced.obs["bulk_labels"].astype(str)
    table = resolve_labels(sorted(author.unique()))
    by_label = table.set_index("label")
    obs = pd.DataFrame(index=reduced.obs_names.copy())
    obs["n_counts"] = reduced.obs["n_counts"].to_numpy(dtype=np.float64)
    obs["author_cell_type"] = pd.Categorical(author)
    obs["cell_type_ontology_term_id"] = pd.Categorical(author.map(by_label["term_id"]).to_numpy())
    obs["cell_type"] = pd.Categorical(author.map(by_label["term_label"]).to_numpy())
    for column, term in _PBMC68K_CONSTANT_TERMS.items():
        obs[column] = pd.Categorical([term] * reduced.n_obs)
    var = pd.DataFrame(index=pd.Index(reduced.raw.var_names.astype(str), name=None))
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.uns["cell_type_resolution"] = {k: table[k].astype(str).tolist() for k in table.columns}
    adata.uns["description"] = (
        "scanpy pbmc68k_reduced (Zheng et al. 2017): counts reconstructed from .raw, "
        "bulk_labels resolved to the Cell Ontology by langcell"
    )
    return adata


def load(path: str | os.PathLike, *, backed: bool = False, require: tuple[str, ...] = ()):
    """Read a CELLxGENE-schema h5ad file and check the columns langcell will use.

    Parameters
    ----------
    path
        The h5ad file.
    backed
        Open it backed (read-only, ``X`` stays on disk) for files larger than memory.
    require
        obs columns that must be present, e.g. ``("cell_type_ontology_term_id",)``.

    Returns
    -------
    anndata.AnnData

    Raises
    ------
    LangCellError
        If the file is missing, not a readable h5ad file, or lacks a required column.
    """
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise LangCellError(f"{str(path)!r} does not exist or is not a file; check the path")
    try:
        adata = ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as err:  # h5py/anndata raise many types for a bad file
        raise LangCellError(
            f"{str(path)!r} is not a readable h5ad file ({type(err).__name__}: {err}); it may be truncated or "
            "corrupt: re-export it with anndata's write_h5ad"
        ) from err
    missing = [c for c in require if c not in adata.obs.columns]
    if missing:
        raise LangCellError(
            f"{str(path)!r} lacks the obs column(s) {missing}; add them as in the CELLxGENE schema "
            "(e.g. cell_type_ontology_term_id = 'CL:0000236')"
        )
    return adata


def cbmc(path: str | os.PathLike):
    """The CBMC CITE-seq file (8,617 cells x 500 anonymous genes, 13 author labels).

    Parameters
    ----------
    path
        Path of ``cbmc_citeseq_500genes.h5ad``. The file is not shipped with the package.

    Returns
    -------
    anndata.AnnData
        Raw counts; obs ``author_cell_type``, ``cell_type``, ``cell_type_ontology_term_id``
        (``"unknown"`` for the mouse spike-in and unlabelled cells).
    """
    return load(path, require=("author_cell_type", "cell_type_ontology_term_id"))


def immune_sample(path: str | os.PathLike):
    """The unlabelled immune sample (559 cells x 32,786 gene symbols, raw UMI counts).

    Parameters
    ----------
    path
        Path of ``immune_sample_559cells_counts.h5ad``. The file is not shipped with the package.

    Returns
    -------
    anndata.AnnData
    """
    return load(path)

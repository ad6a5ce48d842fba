"""Dataset loaders: counts reconstructed exactly, CELLxGENE columns, clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from langcell.data import datasets
from langcell.errors import LangCellError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_counts_from_log1p_inverts_the_normalisation():
    counts = sp.random(20, 30, density=0.3, random_state=1, format="csr") * 50
    counts.data = np.ceil(counts.data)
    totals = np.asarray(counts.sum(axis=1)).ravel() * 4  # the kept genes are a part of the total
    logged = counts.multiply(1 / totals[:, None]).tocsr() * 1e4
    logged.data = np.log1p(logged.data)
    recovered = datasets.counts_from_log1p(logged, totals)
    np.testing.assert_array_equal(recovered.toarray(), counts.toarray())
    assert recovered.dtype == np.float32


def test_pbmc68k_has_counts_and_ontology_columns():
    import scanpy as sc

    adata = datasets.pbmc68k()
    reduced = sc.datasets.pbmc68k_reduced()
    assert adata.shape == (700, 765)
    x = adata.X.toarray()
    assert np.all(x == np.rint(x)) and x.min() >= 0
    # Independent reconstruction: log1p(counts / n_counts * 1e4) gives back the bundled .raw values.
    again = np.log1p(x / adata.obs["n_counts"].to_numpy()[:, None] * 1e4)
    np.testing.assert_allclose(again, reduced.raw.X.toarray(), atol=0.06)
    assert adata.obs["cell_type_ontology_term_id"].astype(str).str.startswith("CL:").all()
    assert adata.obs["cell_type"].nunique() == 10
    assert set(adata.uns["cell_type_resolution"]) >= {"label", "term_id", "term_label", "how"}
    assert (adata.obs["organism_ontology_term_id"] == "NCBITaxon:9606").all()


def test_load_checks_the_file_and_columns(tmp_path):
    with pytest.raises(LangCellError, match="does not exist"):
        datasets.load(tmp_path / "missing.h5ad")
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(b"not an h5ad file")
    with pytest.raises(LangCellError, match="not a readable h5ad"):
        datasets.load(bad)
    import anndata as ad

    good = tmp_path / "good.h5ad"
    ad.AnnData(np.ones((2, 3), dtype=np.float32)).write_h5ad(good)
    with pytest.raises(LangCellError, match="cell_type_ontology_term_id"):
        datasets.load(good, require=("cell_type_ontology_term_id",))
    assert datasets.load(good, backed=True).isbacked


@pytest.mark.skipif(not (SHARED / "cbmc_citeseq_500genes.h5ad").is_file(), reason="shared data missing")
def test_shared_file_loaders():
    cbmc = datasets.cbmc(SHARED / "cbmc_citeseq_500genes.h5ad")
    assert cbmc.n_obs == 8617 and "author_cell_type" in cbmc.obs
    immune = datasets.immune_sample(SHARED / "immune_sample_559cells_counts.h5ad")
    assert immune.shape == (559, 32786)

"""langcell.tl.consensus: the graph solve against a dense inverse, majority vote against pandas, the
scanpy contract, and bad input refused before anything is written."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from langcell import tl
from langcell.errors import LangCellError
from langcell.tl._consensus import CG_TOLERANCE, over_cluster_resolution

KEY = "langcell_cell_type"
CLASSES = ["A", "B", "C"]


def annotated(n_cells=40, seed=0, graph=True):
    """Cells as tl.annotate leaves them (calls, scores, classes), two blobs of embeddings, raw counts."""
    rng = np.random.default_rng(seed)
    truth = np.arange(n_cells) % 2
    probs = rng.dirichlet(np.ones(len(CLASSES)), size=n_cells)
    probs[np.arange(n_cells), truth] += 0.6 * (rng.random(n_cells) < 0.7)
    probs /= probs.sum(axis=1, keepdims=True)
    embedding = rng.normal(size=(n_cells, 6)) + 5.0 * truth[:, None]
    counts = rng.poisson(2.0, size=(n_cells, 30)).astype(np.float32)
    counts[:, :10] += 6 * truth[:, None]
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]))
    adata.obs[KEY] = pd.Categorical(np.array(CLASSES)[probs.argmax(axis=1)], categories=CLASSES)
    adata.obsm[KEY + "_probs"] = probs.astype(np.float32)
    adata.obsm["X_langcell"] = embedding.astype(np.float32)
    adata.uns[KEY] = {"classes": list(CLASSES), "params": {}}
    if graph:
        weights = sp.random(n_cells, n_cells, density=0.2, random_state=seed, format="csr")
        weights = weights + weights.T + sp.diags(np.ones(n_cells - 1), 1) + sp.diags(np.ones(n_cells - 1), -1)
        adata.obsp["connectivities"] = sp.csr_matrix(weights)
    return adata


@pytest.mark.parametrize("smoothing", [0.5, 9.0, 100.0])
def test_graph_solve_matches_a_dense_inverse(smoothing):
    adata = annotated()
    tl.consensus(adata, smoothing=smoothing)
    w = adata.obsp["connectivities"].toarray()
    w = (w + w.T) / 2
    np.fill_diagonal(w, 0)
    d = w.sum(axis=1)
    laplacian = np.eye(len(d)) - w / np.sqrt(np.outer(d, d))
    p0 = adata.obsm[KEY + "_probs"].astype(np.float64)
    f = np.linalg.inv(np.eye(len(d)) + smoothing * laplacian) @ p0
    assert f.min() >= -1e-12  # the M-matrix inverse is non-negative
    expected = f / f.sum(axis=1, keepdims=True)
    got = adata.obsm[KEY + "_consensus_probs"]
    np.testing.assert_allclose(got, expected, atol=max(1e-5, 100 * CG_TOLERANCE * smoothing))
    assert (adata.obs[KEY + "_consensus"].astype(str).to_numpy() == np.array(CLASSES)[expected.argmax(axis=1)]).all()
    np.testing.assert_allclose(adata.obs[KEY + "_consensus_score"], expected.max(axis=1), atol=1e-5)
    assert adata.uns[KEY + "_consensus"]["params"]["use_rep"] == "obsp['connectivities']"


def test_graph_smoothing_recovers_the_blobs_from_noisy_calls():
    adata = annotated(n_cells=60, graph=False)
    truth = np.array(CLASSES)[np.arange(60) % 2]
    tl.consensus(adata, use_rep="X_langcell", n_neighbors=8)
    plain = np.mean(adata.obs[KEY].astype(str).to_numpy() == truth)
    smoothed = np.mean(adata.obs[KEY + "_consensus"].astype(str).to_numpy() == truth)
    assert plain < 0.9 and smoothed > plain
    assert "connectivities" not in adata.obsp  # the graph was computed on a scratch object


def test_graph_on_pca_of_counts():
    adata = annotated(graph=False)
    tl.consensus(adata, use_rep="pca", n_pcs=5, key_added="on_pca")
    assert adata.uns["on_pca"]["params"]["use_rep"] == "pca"
    np.testing.assert_allclose(adata.obsm["on_pca_probs"].sum(axis=1), 1.0, atol=1e-5)


def test_majority_vote_matches_pandas_groupby():
    rng = np.random.default_rng(3)
    adata = annotated(n_cells=90, graph=False)
    groups = np.repeat(["g0", "g1", "g2"], 30)
    calls = adata.obs[KEY].astype(str).to_numpy().copy()
    for g, winner in zip(["g0", "g1", "g2"], ["A", "C", "B"], strict=True):
        rows = np.flatnonzero(groups == g)
        calls[rows] = rng.choice(CLASSES, size=rows.size)
        calls[rows[:14]] = winner  # a clear majority: no tie
    adata.obs[KEY] = pd.Categorical(calls, categories=CLASSES)
    adata.obs["cluster"] = groups
    tl.consensus(adata, method="majority", groupby="cluster")
    frame = pd.DataFrame({"g": groups, "call": calls})
    mode = frame.groupby("g")["call"].agg(lambda s: s.value_counts().idxmax())
    share = frame.groupby("g")["call"].agg(lambda s: s.value_counts().max() / s.size)
    assert (adata.obs[KEY + "_consensus"].astype(str).to_numpy() == mode.loc[groups].to_numpy()).all()
    np.testing.assert_allclose(adata.obs[KEY + "_consensus_score"], share.loc[groups].to_numpy())
    assert (adata.obs[KEY].astype(str).to_numpy() == calls).all()  # each cell keeps its own call


def test_majority_ties_go_to_the_first_category():
    adata = annotated(n_cells=4, graph=False)
    adata.obs[KEY] = pd.Categorical(["C", "B", "C", "B"], categories=CLASSES)
    adata.obs["g"] = ["x"] * 4
    tl.consensus(adata, method="majority", groupby="g")
    assert set(adata.obs[KEY + "_consensus"].astype(str)) == {"B"}


def test_majority_over_auto_clusters():
    pytest.importorskip("igraph")
    adata = annotated(n_cells=60, graph=False)
    tl.consensus(adata, method="majority", groupby="auto", use_rep="X_langcell", n_neighbors=8)
    params = adata.uns[KEY + "_consensus"]["params"]
    assert params["resolution"] == over_cluster_resolution(60) == 5.0
    groups = adata.obs[KEY + "_consensus_groups"].astype(str)
    assert params["n_groups"] == groups.nunique() > 1
    calls = adata.obs[KEY + "_consensus"].astype(str)
    assert (calls.groupby(groups.to_numpy()).nunique() == 1).all()


def test_over_cluster_resolution_grows_with_cells():
    assert over_cluster_resolution(100) == 5.0
    assert over_cluster_resolution(20_000) == pytest.approx(10.0)
    assert over_cluster_resolution(10**7) == 30.0


def test_scanpy_contract():
    adata = annotated()
    before = set(adata.obs.columns), set(adata.obsm), set(adata.uns)
    copied = tl.consensus(adata, copy=True, key_added="refined")
    assert isinstance(copied, ad.AnnData)
    assert (set(adata.obs.columns), set(adata.obsm), set(adata.uns)) == before
    assert {"refined", "refined_score"} <= set(copied.obs.columns)
    assert "refined_probs" in copied.obsm and set(copied.uns["refined"]) == {"params", "classes"}
    assert isinstance(copied.obs["refined"].dtype, pd.CategoricalDtype)
    assert tl.consensus(adata) is None and KEY + "_consensus" in adata.obs


def test_fields_survive_h5ad(tmp_path):
    adata = annotated()
    tl.consensus(adata)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert back.uns[KEY + "_consensus"]["params"]["method"] == "graph"
    assert (back.obs[KEY + "_consensus"] == adata.obs[KEY + "_consensus"]).all()


def _isolated():
    adata = annotated()
    graph = adata.obsp["connectivities"].tolil()
    graph[3, :] = 0
    graph[:, 3] = 0
    adata.obsp["connectivities"] = graph.tocsr()
    return adata


def _without_scores():
    adata = annotated()
    del adata.obsm[KEY + "_probs"]
    return adata


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (annotated, {"method": "majority", "groupby": "nope"}, "groupby 'nope' is not an obs column"),
        (annotated, {"method": "majority"}, "pass groupby="),
        (annotated, {"groupby": "auto"}, "groupby is for method='majority'"),
        (_without_scores, {}, "run langcell.tl.annotate"),
        (annotated, {"key": "other"}, "obs has no annotation 'other'"),
        (_isolated, {}, "1 cells have no neighbour"),
        (annotated, {"smoothing": 0}, "smoothing (lambda) must be a positive"),
        (annotated, {"smoothing": -1.0}, "smoothing (lambda) must be a positive"),
        (annotated, {"smoothing": float("nan")}, "smoothing (lambda) must be a positive"),
        (annotated, {"smoothing": float("inf")}, "smoothing (lambda) must be a positive"),
        (annotated, {"smoothing": True}, "smoothing (lambda) must be a positive"),
        (annotated, {"method": "vote"}, "method must be one of"),
        (annotated, {"use_rep": "X_missing"}, "use_rep 'X_missing' is not in obsm"),
        (annotated, {"n_neighbors": 1}, "n_neighbors must lie in"),
        (annotated, {"key_added": KEY}, "would overwrite"),
        (annotated, {"method": "majority", "groupby": "auto", "resolution": -1.0}, "resolution must be"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(make, kwargs, message):
    adata = make()
    before = (list(adata.obs.columns), sorted(adata.obsm), sorted(adata.uns), sorted(adata.obsp))
    with pytest.raises(LangCellError) as error:
        tl.consensus(adata, **kwargs)
    assert message in str(error.value)
    assert (list(adata.obs.columns), sorted(adata.obsm), sorted(adata.uns), sorted(adata.obsp)) == before


def test_score_matrix_that_does_not_match_its_classes():
    adata = annotated()
    adata.uns[KEY]["classes"] = ["A", "B"]
    with pytest.raises(LangCellError, match="annotate again"):
        tl.consensus(adata)


def test_auto_groups_without_igraph_name_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "igraph", None)  # as if igraph were not installed: import fails
    adata = annotated(graph=False)
    with pytest.raises(LangCellError, match=r"langcell\[consensus\]"):
        tl.consensus(adata, method="majority", groupby="auto", use_rep="X_langcell")
    assert KEY + "_consensus" not in adata.obs

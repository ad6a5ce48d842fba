"""langcell.pl: plots are written as PNG files without touching matplotlib's global state."""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest

from langcell import pl
from langcell.errors import LangCellError

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def cells():
    rng = np.random.default_rng(0)
    adata = ad.AnnData(np.zeros((30, 2), dtype=np.float32))
    adata.obsm["X_umap"] = rng.normal(size=(30, 2))
    adata.obs["truth"] = pd.Categorical(rng.choice(["B cell", "T cell", "NK cell"], size=30))
    adata.obs["predicted"] = pd.Categorical(rng.choice(["B cell", "T cell"], size=30))
    return adata


def test_plots_never_switch_the_backend(cells, tmp_path):
    # A notebook runs on an inline backend; switching to Agg on every call broke inline plots.
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # any non-Agg backend: it must survive both plots
    try:
        pl.umap(cells, ["truth", "predicted"], tmp_path / "umap.png")
        counts = pl.confusion_matrix(cells.obs["truth"], cells.obs["predicted"], tmp_path / "confusion.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "umap.png").read_bytes()[:8] == PNG
    assert (tmp_path / "confusion.png").read_bytes()[:8] == PNG
    assert counts.sum() == cells.n_obs
    truth, predicted = cells.obs["truth"].astype(str), cells.obs["predicted"].astype(str)
    labels = sorted(set(truth), key=lambda t: (-(truth == t).sum(), t))  # most frequent true type first
    assert set(predicted) <= set(labels)
    for name in labels:
        assert counts[labels.index(name)].sum() == int((truth == name).sum())
    assert counts[labels.index("B cell"), labels.index("B cell")] == int(((truth == "B cell") & (predicted == "B cell")).sum())



def test_umap_has_one_legend_per_panel_with_its_own_categories(cells):
    fig = pl.umap(cells, ["truth", "predicted"], titles=["true", "LangCell"])
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["true", "LangCell"]
    assert fig.legends == []  # no figure-wide legend
    for ax, column in zip(axes, ["truth", "predicted"], strict=True):
        legend = ax.get_legend()
        assert legend is not None
        shown = [text.get_text() for text in legend.get_texts()]
        assert shown == sorted(set(cells.obs[column].astype(str)))
    # A category keeps its colour from panel to panel.
    colour = [
        {t.get_text(): tuple(h.get_facecolor()[0]) for t, h in zip(ax.get_legend().get_texts(),
                                                                    ax.get_legend().legend_handles, strict=True)}
        for ax in axes
    ]
    assert all(colour[0][name] == colour[1][name] for name in colour[1])

def test_missing_inputs_are_refused(cells, tmp_path):
    with pytest.raises(LangCellError, match="X_pca"):
        pl.umap(cells, ["truth"], tmp_path / "x.png", basis="X_pca")
    with pytest.raises(LangCellError, match="no column"):
        pl.umap(cells, ["nothing"], tmp_path / "x.png")
    with pytest.raises(LangCellError, match="one label per cell"):
        pl.confusion_matrix(["a"], ["a", "b"], tmp_path / "x.png")


def explained_cells():
    """What tl.explain stores: a table of two classes sharing one gene."""
    adata = ad.AnnData(np.zeros((5, 2), dtype=np.float32))
    adata.uns["langcell_cell_type_explain"] = {"params": {}, "table": {
        "class": np.array(["B", "B", "B", "NK", "NK", "NK"]), "rank": np.array([1, 2, 3, 1, 2, 3]),
        "gene": np.array(["MS4A1", "CD79A", "LYZ", "NKG7", "GNLY", "LYZ"]),
        "gene_id": np.array(["a", "b", "c", "d", "e", "c"]),
        "importance": np.array([3.0, 2.0, 1.0, 0.3, 0.2, 0.1]),
        "mean_attribution": np.array([3.0, -2.0, 1.0, 0.3, 0.2, -0.1]),
        "top_fraction": np.array([1.0, 0.5, 0.2, 1.0, 0.5, 0.0]), "n_cells": np.array([3, 3, 3, 2, 2, 2]),
    }}
    return adata


def test_explain_dot_plot(tmp_path):
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        fig = pl.explain(explained_cells(), tmp_path / "explain.png", n_genes=3, title="why")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "explain.png").read_bytes()[:8] == PNG
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["MS4A1", "CD79A", "LYZ", "NKG7", "GNLY"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["B (3)", "NK (2)"]
    colours = ax.collections[0].get_array()
    # Each class scaled to its own largest importance: both classes' rank-1 gene is 1.
    np.testing.assert_allclose(sorted(colours), sorted([1, 2 / 3, 1 / 3, 1, 2 / 3, 1 / 3]))
    fig = pl.explain(explained_cells(), classes=["NK"], n_genes=1)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["NKG7"]


def test_explain_plot_refuses_a_missing_explanation_and_unknown_classes(tmp_path):
    with pytest.raises(LangCellError, match="run langcell.tl.explain first"):
        pl.explain(ad.AnnData(np.zeros((2, 2), dtype=np.float32)))
    with pytest.raises(LangCellError, match="were not explained"):
        pl.explain(explained_cells(), classes=["T"])
    with pytest.raises(LangCellError, match="n_genes"):
        pl.explain(explained_cells(), n_genes=0)
    assert not list(tmp_path.iterdir())

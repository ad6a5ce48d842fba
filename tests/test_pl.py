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

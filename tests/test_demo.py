"""The demo pipeline end to end, with the test-sized recipe (the real one takes minutes)."""

from __future__ import annotations

import json

import anndata as ad
import pytest

from langcell.demo import run_demo


@pytest.mark.slow
def test_demo_writes_its_outputs_and_scores(tmp_path):
    report = run_demo(tmp_path / "demo", seed=0, quiet=True, recipe="tiny")
    out = tmp_path / "demo"
    for name in ("annotated.h5ad", "umap.png", "confusion_matrix.png", "explain.png", "report.json"):
        assert (out / name).is_file(), name
    assert (out / "run" / "model" / "model.safetensors").is_file()
    saved = json.loads((out / "report.json").read_text())
    assert saved["langcell_zero_shot"] == report["langcell_zero_shot"]
    for method in ("langcell_zero_shot", "logistic_regression"):
        assert 0.0 <= report[method]["accuracy"] <= 1.0
        assert 0.0 <= report[method]["macro_f1"] <= 1.0
    # The logistic regression sees labels: on these PBMCs it is far above chance (10 types).
    assert report["logistic_regression"]["accuracy"] > 0.5
    annotated = ad.read_h5ad(out / "annotated.h5ad")
    assert annotated.n_obs == report["cells"]["test"] == 140
    assert {"langcell_cell_type", "langcell_cell_type_score"} <= set(annotated.obs.columns)
    assert "X_langcell" in annotated.obsm and "X_umap" in annotated.obsm
    # The explanations of the B, NK and CD14 monocyte predictions: the table's top genes, in the report.
    from langcell.demo import EXPLAINED_CLASSES
    from langcell.tl import explanation_table

    assert list(saved["explained_genes"]) == list(EXPLAINED_CLASSES)
    table = explanation_table(annotated, "langcell_cell_type_explain")
    for name, genes in saved["explained_genes"].items():
        assert genes == table.loc[table["class"] == name, "gene"].head(10).tolist()

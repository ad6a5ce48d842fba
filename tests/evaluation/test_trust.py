"""Calibration (reliability curve, ECE) and the ontology-aware metric, against hand computations."""

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest

from langcell import evaluation, pl
from langcell.errors import LangCellError
from langcell.metrics import reliability_curve, score_confidence


def test_ece_against_a_hand_computation():
    confidence = np.array([0.05, 0.15, 0.25, 0.3, 0.6, 0.65, 0.95, 1.0, 0.0])
    correct = np.array([0, 0, 1, 0, 1, 1, 1, 1, 0], dtype=bool)
    result = reliability_curve(confidence, correct, n_bins=4)
    # bins (0, .25], (.25, .5], (.5, .75], (.75, 1]; 0 belongs to the first.
    # bin 1: 0.05, 0.15, 0.25, 0.0 -> mean conf 0.1125, accuracy 1/4
    # bin 2: 0.3 -> 0.3, 0;  bin 3: 0.6, 0.65 -> 0.625, 1;  bin 4: 0.95, 1.0 -> 0.975, 1
    ece = (4 * abs(0.25 - 0.1125) + 1 * abs(0 - 0.3) + 2 * abs(1 - 0.625) + 2 * abs(1 - 0.975)) / 9
    assert result["ece"] == pytest.approx(ece)
    assert result["mce"] == pytest.approx(0.375)
    assert result["bins"]["n_cells"] == [4, 1, 2, 2]
    np.testing.assert_allclose(result["bins"]["mean_confidence"], [0.1125, 0.3, 0.625, 0.975])
    np.testing.assert_allclose(result["bins"]["accuracy"], [0.25, 0.0, 1.0, 1.0])
    assert result["accuracy"] == pytest.approx(5 / 9)


def test_empty_bins_and_perfect_calibration():
    result = reliability_curve(np.array([1.0, 1.0]), np.array([True, True]), n_bins=10)
    assert result["ece"] == 0.0 and result["bins"]["n_cells"][-1] == 2
    assert np.isnan(result["bins"]["accuracy"][0])


def test_score_confidence_by_hand():
    margin, entropy = score_confidence(np.array([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    np.testing.assert_allclose(margin, [0.5, 1.0, 0.0], atol=1e-12)
    h = -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1)) / np.log(3)
    np.testing.assert_allclose(entropy, [h, 0.0, 1.0], atol=1e-12)


def labelled():
    truth = ["CD4-positive, alpha-beta T cell"] * 5 + ["B cell"]
    calls = [
        "CD4-positive, alpha-beta T cell",  # exact
        "T cell",  # a correct ancestor
        "B cell",  # wrong
        "unknown",  # abstained
        "CD4-positive, alpha-beta memory T cell",  # more specific than the label: wrong
        "B cell",  # exact
    ]
    adata = ad.AnnData(np.zeros((6, 1), dtype=np.float32))
    adata.obs["truth"] = pd.Categorical(truth)
    adata.obs["calls"] = calls
    adata.obs["calls_score"] = [0.9, 0.4, 0.8, 0.2, 0.6, 0.95]
    return adata


def test_ontology_accuracy_on_real_cl_terms():
    adata = labelled()
    result = evaluation.ontology_accuracy(adata, label_key="truth", prediction_key="calls")
    s = result["summary"]
    assert (s["n_exact"], s["n_ancestor"], s["n_wrong"], s["n_abstained"]) == (2, 1, 2, 1)
    assert s["correct"] == pytest.approx(3 / 6) and s["n_cells"] == 6
    assert result["terms"]["T cell"] == "CL:0000084"
    assert evaluation.ontology_accuracy(adata, label_key="truth", prediction_key="calls", inplace=True) is None
    assert adata.uns["langcell_ontology_accuracy"]["summary"] == s


def test_ontology_accuracy_uses_the_annotation_resolution_and_mapping():
    adata = labelled()
    adata.obs["calls"] = ["CD4 T"] * 6
    adata.uns["ann"] = {"resolution": {"label": ["CD4 T"], "term_id": ["CL:0000624"]}}
    s = evaluation.ontology_accuracy(adata, label_key="truth", prediction_key="calls", annotation_key="ann")["summary"]
    assert s["n_exact"] == 5 and s["n_wrong"] == 1
    s = evaluation.ontology_accuracy(
        adata, label_key="truth", prediction_key="calls", annotation_key=None, mapping={"CD4 T": "CL:0000084"}
    )["summary"]
    assert s["n_ancestor"] == 5


def test_unresolvable_names_are_refused():
    adata = labelled()
    adata.obs["calls"] = ["zzz not a cell"] * 6
    with pytest.raises(LangCellError, match="could not be resolved"):
        evaluation.ontology_accuracy(adata, label_key="truth", prediction_key="calls")


def test_calibration_table_and_plot(tmp_path):
    adata = labelled()
    result = evaluation.calibration(adata, label_key="truth", prediction_key="calls", n_bins=5)
    correct = adata.obs["calls"].astype(str).to_numpy() == adata.obs["truth"].astype(str).to_numpy()
    expected = reliability_curve(adata.obs["calls_score"].to_numpy(), correct, 5)
    assert result["ece"] == pytest.approx(expected["ece"]) and result["params"]["n_bins"] == 5
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        figure = pl.calibration(result, tmp_path / "reliability.png", title="test")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ECE" in figure.axes[0].get_title()
    with pytest.raises(LangCellError, match="evaluation.calibration"):
        pl.calibration({"bins": {}})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"label_key": "nope"}, "obs has no column 'nope'"),
        ({"label_key": "truth", "confidence_key": "nope"}, "no confidence column"),
        ({"label_key": "truth", "n_bins": 0}, "n_bins"),
        ({"label_key": "calls"}, "both"),
    ],
)
def test_calibration_bad_input(kwargs, message):
    adata = labelled()
    with pytest.raises(LangCellError, match=message):
        evaluation.calibration(adata, prediction_key="calls", **kwargs)
    assert "langcell_calibration" not in adata.uns

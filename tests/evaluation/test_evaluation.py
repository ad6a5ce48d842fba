"""Evaluation: scIB integration metrics on real PBMCs (checked against independent computations and
scib-metrics' own Benchmarker), per-type accuracy against a hand count, evaluation.evaluate and the CLI."""

from __future__ import annotations

import json
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from langcell.cli import main
from langcell.errors import LangCellError
from langcell.evaluation.baselines import baseline_pca
from langcell.evaluation.integration import BATCH_METRICS, BIO_METRICS, DEFAULT_METRICS, integration_metrics
from langcell.evaluation.per_type import per_type_accuracy
from langcell.evaluation.report import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")
scib_metrics = pytest.importorskip("scib_metrics", reason='scib-metrics is missing: pip install "langcell[integration]"')

# Four PBMC types: each silhouette_batch label subset is a separate jax compilation, so few types keep
# the module fast.
TYPES = ["B cell, CD19-positive", "CD14-positive monocyte", "dendritic cell",
         "CD4-positive, CD25-positive, alpha-beta regulatory T cell"]
EMBEDDING = "X_scanpy_pca"


@pytest.fixture(scope="module")
def pbmc():
    """45 cells of each of four types, with scanpy's cell-cycle phase as the batch and scanpy's PCA.

    There is no multi-batch real dataset offline: the phase (G1/S/G2M, from pbmc68k_reduced) is a
    stand-in covariate with the structure the metrics need (every type spans several phases).
    """
    import scanpy as sc

    from langcell.data.datasets import pbmc68k

    full = pbmc68k()
    reduced = sc.datasets.pbmc68k_reduced()
    full.obs["phase"] = reduced.obs["phase"].reindex(full.obs_names).astype(str).to_numpy()
    full.obsm[EMBEDDING] = np.asarray(reduced.obsm["X_pca"], dtype=np.float32)
    rng = np.random.default_rng(0)
    rows = np.concatenate([
        rng.choice(np.flatnonzero(full.obs["cell_type"] == name), 45, replace=False) for name in TYPES
    ])
    adata = full[np.sort(rows)].copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.remove_unused_categories()
    return adata


@pytest.fixture(scope="module")
def scored(pbmc):
    adata = pbmc.copy()
    options = dict(batch_key="phase", label_key="cell_type", embeddings=[EMBEDDING])
    table = integration_metrics(adata, **options)
    assert "langcell_integration" not in adata.uns  # inplace=False: the table only
    assert integration_metrics(adata, **options, inplace=True) is None
    return adata, table


@pytest.fixture(scope="module")
def baseline(pbmc):
    return baseline_pca(pbmc, n_pcs=50)[0]


def labels_of(adata, key="cell_type"):
    return adata.obs[key].astype(str).to_numpy()


# --------------------------------------------------------------------------------------------------
# integration_metrics


@pytest.mark.slow
def test_table_rows_columns_and_what_is_stored(pbmc, scored):
    adata, table = scored
    assert list(table.index) == [EMBEDDING, "X_pca"] and table.index.name == "embedding"
    assert list(table.columns) == [*DEFAULT_METRICS, "bio_conservation", "batch_correction", "total"]
    assert np.all(np.isfinite(table.to_numpy())) and table.to_numpy().min() >= 0 and table.to_numpy().max() <= 1
    assert table.loc["X_pca", "pcr_comparison"] == 0.0  # the baseline against itself
    stored = adata.uns["langcell_integration"]
    assert stored["params"]["baseline_computed"] is True and stored["params"]["n_pcs"] == 50
    assert stored["params"]["n_neighbors"] == 90 and stored["params"]["scib_metrics_version"].startswith("0.5")
    assert stored["results"]["embedding"] == [EMBEDDING, "X_pca"]
    np.testing.assert_array_equal(stored["results"]["total"], table["total"].to_numpy())
    # The baseline is computed on a copy: the data and obsm are unchanged.
    assert "X_pca" not in adata.obsm
    assert (adata.X != pbmc.X).nnz == 0


def test_silhouette_label_equals_sklearn(pbmc, scored, baseline):
    from sklearn.metrics import silhouette_score

    _, table = scored
    for key, matrix in ((EMBEDDING, pbmc.obsm[EMBEDDING]), ("X_pca", baseline)):
        expected = (silhouette_score(matrix.astype(np.float64), labels_of(pbmc), metric="euclidean") + 1) / 2
        assert table.loc[key, "silhouette_label"] == pytest.approx(expected, abs=1e-5)


def test_graph_connectivity_equals_a_hand_count_on_the_exact_knn_graph(pbmc, scored):
    from scipy.sparse.csgraph import connected_components
    from sklearn.neighbors import NearestNeighbors

    _, table = scored
    matrix = pbmc.obsm[EMBEDDING].astype(np.float64)
    distances, indices = NearestNeighbors(n_neighbors=15).fit(matrix).kneighbors(matrix)  # self included
    n = matrix.shape[0]
    graph = sp.csr_matrix((distances.ravel() + 1e-9, indices.ravel(), np.arange(0, n * 15 + 1, 15)), shape=(n, n))
    labels = labels_of(pbmc)
    shares = []
    for name in TYPES:
        mask = labels == name
        _, component = connected_components(graph[mask][:, mask], connection="strong")
        shares.append(np.bincount(component).max() / mask.sum())
    assert table.loc[EMBEDDING, "graph_connectivity"] == pytest.approx(np.mean(shares), abs=1e-12)


def test_pcr_comparison_equals_the_between_batch_share_of_variance(pbmc, scored, baseline):
    # With every principal component kept, the variance-weighted R^2 of the batch on the PCs equals the
    # between-batch share of the total sum of squares (it is invariant to rotations).
    _, table = scored
    batches = labels_of(pbmc, "phase")

    def between_share(matrix):
        matrix = matrix.astype(np.float64)
        centred = matrix - matrix.mean(axis=0)
        between = sum(
            (batches == b).sum() * np.sum(centred[batches == b].mean(axis=0) ** 2) for b in np.unique(batches)
        )
        return between / np.sum(centred**2)

    before, after = between_share(baseline), between_share(pbmc.obsm[EMBEDDING])
    expected = max(0.0, (before - after) / before)
    assert table.loc[EMBEDDING, "pcr_comparison"] == pytest.approx(expected, rel=1e-3, abs=1e-5)


def test_aggregates_are_group_means_and_the_scib_weighting(scored):
    _, table = scored
    bio = [m for m in BIO_METRICS if m in DEFAULT_METRICS]
    batch = [m for m in BATCH_METRICS if m in DEFAULT_METRICS]
    for key in table.index:
        row = table.loc[key]
        assert row["bio_conservation"] == pytest.approx(np.mean(row[bio].to_numpy()))
        assert row["batch_correction"] == pytest.approx(np.mean(row[batch].to_numpy()))
        assert row["total"] == pytest.approx(0.6 * row["bio_conservation"] + 0.4 * row["batch_correction"])


@pytest.mark.slow
def test_the_benchmarker_metric_set_matches_scib_metrics_benchmarker(pbmc, baseline):
    """Benchmarker's pipeline (its own PCA replaced by the same baseline, kBET left out) gives our table."""
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation
    from scib_metrics.nearest_neighbors import jax_approx_min_k

    metrics = (*BIO_METRICS, "bras", "ilisi", "graph_connectivity", "pcr_comparison")
    adata = pbmc.copy()
    adata.obsm["X_pca"] = baseline
    ours = integration_metrics(adata, batch_key="phase", label_key="cell_type", embeddings=[EMBEDDING],
                               metrics=metrics)
    bench = Benchmarker(
        adata, batch_key="phase", label_key="cell_type", embedding_obsm_keys=[EMBEDDING, "X_pca"],
        bio_conservation_metrics=BioConservation(), batch_correction_metrics=BatchCorrection(kbet_per_label=False),
        pre_integrated_embedding_obsm_key="X_pca", progress_bar=False,
    )
    bench.prepare(neighbor_computer=jax_approx_min_k)
    bench.benchmark()
    theirs = bench.get_results(min_max_scale=False).drop("Metric Type")
    names = {
        "silhouette_label": "Silhouette label", "isolated_labels": "Isolated labels", "nmi_kmeans": "KMeans NMI",
        "ari_kmeans": "KMeans ARI", "clisi": "cLISI", "bras": "BRAS", "ilisi": "iLISI",
        "graph_connectivity": "Graph connectivity", "pcr_comparison": "PCR comparison",
        "bio_conservation": "Bio conservation", "batch_correction": "Batch correction", "total": "Total",
    }
    assert set(ours.columns) == set(names)
    for key in (EMBEDDING, "X_pca"):
        for column, their_column in names.items():
            assert ours.loc[key, column] == pytest.approx(float(theirs.loc[key, their_column]), abs=1e-6), column


@pytest.mark.slow
def test_a_precomputed_baseline_is_used_as_given(pbmc, scored, baseline):
    _, table = scored
    adata = pbmc.copy()
    adata.obsm["X_mine"] = baseline
    cheap = ("silhouette_label", "graph_connectivity")
    options = dict(batch_key="phase", label_key="cell_type", embeddings=[EMBEDDING], baseline="X_mine", metrics=cheap)
    result = integration_metrics(adata, **options)
    integration_metrics(adata, **options, key_added="mine", inplace=True)
    assert list(result.index) == [EMBEDDING, "X_mine"]
    assert "batch_correction" in result and "bio_conservation" in result and "total" in result
    for metric in cheap:
        assert result.loc["X_mine", metric] == pytest.approx(table.loc["X_pca", metric], abs=1e-6)
    assert adata.uns["mine"]["params"]["baseline_computed"] is False and adata.uns["mine"]["params"]["n_pcs"] is None


@pytest.mark.slow
def test_inplace_stores_the_table_and_returns_nothing(pbmc):
    adata = pbmc.copy()
    options = dict(batch_key="phase", label_key="cell_type", embeddings=[EMBEDDING], metrics=("silhouette_label",))
    table = integration_metrics(adata, **options)
    assert "langcell_integration" not in adata.uns
    annotated = adata.copy()
    assert integration_metrics(annotated, **options, inplace=True) is None
    assert "langcell_integration" in annotated.uns and "langcell_integration" not in adata.uns
    assert list(table.columns) == ["silhouette_label", "bio_conservation"]  # no batch metric: no total


def _bad(adata, **overrides):
    options = dict(batch_key="phase", label_key="cell_type", embeddings=[EMBEDDING])
    options.update(overrides)
    return integration_metrics(adata, **options)


def set_obs(column, make):
    """An edit that sets ``obs[column]`` to ``make(adata)``."""

    def edit(adata):
        adata.obs[column] = make(adata)

    return edit


def one_missing_label(adata):
    labels = adata.obs["cell_type"].astype(str).to_numpy(dtype=object)
    labels[3] = None
    return labels


def nan_in_embedding(adata):
    adata.obsm[EMBEDDING] = adata.obsm[EMBEDDING].copy()
    adata.obsm[EMBEDDING][0, 0] = np.nan


def log_normalised(adata):
    adata.X = np.log1p(adata.X.toarray())


@pytest.mark.parametrize(
    "edit, overrides, message",
    [
        (None, {"batch_key": "nope"}, "no column 'nope'"),
        (None, {"label_key": "nope"}, "no column 'nope'"),
        (None, {"batch_key": "cell_type"}, "two different obs columns"),
        (set_obs("phase", lambda a: "G1"), {}, "at least two"),
        (set_obs("one", lambda a: "B"), {"label_key": "one"}, "at least two"),
        (set_obs("lab", one_missing_label), {"label_key": "lab"}, "1 missing value"),
        (None, {"metrics": ("silhouette_label", "asw")}, "unknown metrics ['asw']"),
        (None, {"metrics": ("ilisi", "ilisi")}, "repeated"),
        (None, {"metrics": "ilisi"}, "non-empty list"),
        (None, {"embeddings": ["X_missing"]}, "no embedding 'X_missing'"),
        (None, {"embeddings": EMBEDDING}, "non-empty list"),
        (None, {"embeddings": [EMBEDDING, "X_pca"]}, "listed twice"),
        (nan_in_embedding, {}, "NaN or infinite"),
        (None, {"neighbors": "annoy"}, "neighbors must be one of"),
        (None, {"n_pcs": 0}, "n_pcs must be a positive integer"),
        (set_obs("phase", lambda a: a.obs["cell_type"].astype(str) + "_batch"), {},
         "no label of obs['cell_type'] occurs in two batches"),
        (log_normalised, {}, "needs raw counts"),
    ],
)
def test_bad_inputs_are_refused_before_anything_is_written(pbmc, edit, overrides, message):
    adata = pbmc.copy()
    if edit is not None:
        edit(adata)
    with pytest.raises(LangCellError) as error:
        _bad(adata, **overrides)
    assert message in str(error.value)
    assert "langcell_integration" not in adata.uns


def test_a_missing_scib_metrics_names_the_extra(pbmc, monkeypatch):
    monkeypatch.setitem(sys.modules, "scib_metrics", None)  # what an uninstalled package looks like to import
    with pytest.raises(LangCellError, match=r'pip install "langcell\[integration\]"'):
        _bad(pbmc.copy())


# --------------------------------------------------------------------------------------------------
# per_type_accuracy


@pytest.fixture
def predictions():
    truth = ["A"] * 4 + ["B"] * 3 + ["C"] * 2 + ["unknown", None]
    predicted = ["A", "A", "B", "A", "B", "C", "C", "A", None, "A", "B"]
    adata = ad.AnnData(np.zeros((len(truth), 1), dtype=np.float32))
    adata.obs["truth"] = pd.Categorical(truth, categories=["C", "B", "A", "unknown"])
    adata.obs["predicted"] = predicted
    return adata


def test_per_type_accuracy_equals_a_hand_count(predictions, tmp_path):
    from sklearn.metrics import f1_score

    options = dict(label_key="truth", prediction_key="predicted", seen=["A", "B", "Z"])
    result = per_type_accuracy(predictions, **options)
    assert "per_type" not in predictions.uns
    assert per_type_accuracy(predictions, **options, key_added="per_type", inplace=True) is None
    rows = {r["cell_type"]: r for r in result["per_type"]}
    assert [r["cell_type"] for r in result["per_type"]] == ["C", "B", "A"]  # category order
    # A: 3 of 4 right; B: 1 of 3 (two called C); C: 0 of 2 (one A, one missing prediction).
    assert (rows["A"]["n_correct"], rows["B"]["n_correct"], rows["C"]["n_correct"]) == (3, 1, 0)
    assert rows["A"]["accuracy"] == 0.75 and rows["B"]["accuracy"] == pytest.approx(1 / 3)
    assert rows["B"]["most_predicted"] == "C" and rows["B"]["most_predicted_share"] == pytest.approx(2 / 3)
    assert rows["C"]["most_predicted"] == "A"  # a tie with a missing prediction: the named class wins
    assert [rows[t]["seen"] for t in "ABC"] == [True, True, False]
    summary = result["summary"]
    assert summary["n_cells"] == 9 and summary["n_excluded"] == 2 and summary["n_types"] == 3
    assert summary["accuracy"] == pytest.approx(4 / 9)
    assert summary["mean_type_accuracy"] == pytest.approx((0.75 + 1 / 3 + 0) / 3)
    assert summary["mean_accuracy_seen"] == pytest.approx((0.75 + 1 / 3) / 2)
    assert summary["mean_accuracy_unseen"] == 0.0
    assert summary["accuracy_seen_cells"] == pytest.approx(4 / 7) and summary["accuracy_unseen_cells"] == 0.0
    assert summary["seen_without_cells"] == ["Z"]
    truth = predictions.obs["truth"].astype(str).to_numpy()[:9]
    predicted = np.array(["" if v is None else v for v in predictions.obs["predicted"][:9]], dtype=object)
    assert summary["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    json.dumps(result)  # JSON-ready as returned
    assert predictions.uns["per_type"]["per_type"]["n_correct"] == [0, 1, 3]
    predictions.write_h5ad(tmp_path / "with_report.h5ad")


def test_without_seen_there_is_no_split(predictions):
    result = per_type_accuracy(predictions, label_key="truth", prediction_key="predicted")
    assert all(r["seen"] is None for r in result["per_type"])
    assert "mean_accuracy_seen" not in result["summary"] and "per_type" not in predictions.uns


@pytest.mark.parametrize(
    "options, message",
    [
        ({"label_key": "nope"}, "no column 'nope'"),
        ({"prediction_key": "truth"}, "both 'truth'"),
        ({"seen": "A"}, "list of cell-type names"),
        ({"seen": ["A", ""]}, "non-empty strings"),
        ({"key_added": ""}, "key_added"),
    ],
)
def test_per_type_accuracy_refuses_bad_inputs(predictions, options, message):
    settings = {"label_key": "truth", "prediction_key": "predicted", **options}
    with pytest.raises(LangCellError) as error:
        per_type_accuracy(predictions, **settings)
    assert message in str(error.value)


def test_per_type_accuracy_needs_a_labelled_cell(predictions):
    predictions.obs["none"] = "unknown"
    with pytest.raises(LangCellError, match="no usable label"):
        per_type_accuracy(predictions, label_key="none", prediction_key="predicted")


# --------------------------------------------------------------------------------------------------
# evaluate and the CLI (a tiny random model: the numbers are checked for consistency, not quality)


@pytest.fixture(scope="module")
def small(pbmc):
    """15 cells of each of the four types, and a tiny model whose vocabulary was fitted on them."""
    import torch

    from langcell.data.tokenizer import GeneTokenizer
    from langcell.models.config import LangCellConfig
    from langcell.models.langcell import LangCell

    rows = np.concatenate([np.flatnonzero(pbmc.obs["cell_type"] == name)[:15] for name in TYPES])
    adata = pbmc[np.sort(rows)].copy()
    del adata.obsm[EMBEDDING]
    tokenizer = GeneTokenizer.fit(adata, gene_id_kind="custom")
    config = LangCellConfig.preset("tiny")
    config.cell.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    return adata, LangCell.from_config(config, gene_tokenizer=tokenizer).eval()


def test_evaluate_reports_annotation_per_type_and_retrieval(small, tmp_path):
    cells, model = small
    adata = cells.copy()
    seen = TYPES[:2]
    report = evaluate(adata, model, label_key="cell_type", seen=seen, inplace=True)
    json.dumps(report)  # JSON-serialisable without help
    assert report["classes"] == present_types(cells)
    assert report["n_cells"] == report["n_scored"] == 60 and report["integration"] is None
    # The annotation section is per_type_accuracy of the predictions written to obs.
    again = per_type_accuracy(adata, label_key="cell_type", prediction_key="langcell_cell_type", seen=seen)
    assert report["annotation"] == again
    predicted = adata.obs["langcell_cell_type"].astype(str).to_numpy()
    assert report["annotation"]["summary"]["accuracy"] == pytest.approx(np.mean(predicted == labels_of(adata)))
    assert report["annotation"]["summary"]["n_seen_types"] == 2
    assert {"cell_to_text_recall@1", "text_to_cell_recall@10"} <= set(report["retrieval"])
    assert report["retrieval"]["reused_embeddings"] is True
    assert adata.obsm["X_langcell"].shape == (60, model.config.projection_dim)
    assert adata.uns["langcell_evaluation"]["annotation"]["summary"] == report["annotation"]["summary"]
    adata.write_h5ad(tmp_path / "evaluated.h5ad")


def present_types(adata):
    return [c for c in adata.obs["cell_type"].cat.categories if c in set(labels_of(adata))]


def test_evaluate_without_inplace_leaves_the_input_alone(small):
    cells, model = small
    adata = cells.copy()
    report = evaluate(adata, model, label_key="cell_type", labels=TYPES[:3])
    assert report["classes"] == TYPES[:3]
    annotated = cells.copy()
    evaluate(annotated, model, label_key="cell_type", labels=TYPES[:3], inplace=True)
    assert "langcell_cell_type" in annotated.obs and "langcell_cell_type" not in adata.obs
    assert "langcell_evaluation" not in adata.uns


@pytest.mark.parametrize(
    "options, message",
    [
        ({"batch_key": "phase", "metrics": ("asw",)}, "unknown metrics"),
        ({"labels": ["B cell", "not a cell type at all"]}, "not a cell type at all"),
        ({"label_key": "nope"}, "no column 'nope'"),
        ({"seen": "B cell"}, "list of cell-type names"),
    ],
)
def test_evaluate_refuses_before_writing(small, options, message):
    cells, model = small
    adata = cells.copy()
    settings = {"label_key": "cell_type", **options}
    with pytest.raises(LangCellError) as error:
        evaluate(adata, model, **settings, inplace=True)
    assert message in str(error.value)
    assert "langcell_cell_type" not in adata.obs and "X_langcell" not in adata.obsm and not adata.uns.get(
        "langcell_evaluation"
    )


def test_evaluate_refuses_a_single_batch_before_the_model_runs(small):
    cells, model = small
    adata = cells.copy()
    adata.obs["phase"] = "G1"
    with pytest.raises(LangCellError, match="at least two"):
        evaluate(adata, model, label_key="cell_type", batch_key="phase", inplace=True)
    assert "langcell_cell_type" not in adata.obs


@pytest.fixture(scope="module")
def saved(small, tmp_path_factory):
    cells, model = small
    root = tmp_path_factory.mktemp("evaluate_cli")
    model.save_pretrained(root / "model")
    cells.write_h5ad(root / "cells.h5ad")
    return root / "model", root / "cells.h5ad"


@pytest.mark.slow
def test_cli_round_trip_with_integration_metrics(saved, tmp_path, capsys):
    model, cells = saved
    report_path, out = tmp_path / "report.json", tmp_path / "evaluated.h5ad"
    code = main([
        "evaluate", str(cells), "--model", str(model), "--label-key", "cell_type", "--batch-key", "phase",
        "--seen-types", ";".join(TYPES[:2]), "--metrics", "silhouette_label,ilisi,graph_connectivity,pcr_comparison",
        "--report", str(report_path), "--out", str(out),
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = captured.out
    assert "mean accuracy seen" in printed and "scIB X_langcell" in printed
    assert not [line for line in captured.err.splitlines() if "TPU" in line or "may be present" in line]
    report = json.loads(report_path.read_text())
    rows = {row["embedding"]: row for row in report["integration"]}
    assert set(rows) == {"X_langcell", "X_pca"} and rows["X_pca"]["pcr_comparison"] == 0.0
    assert rows["X_langcell"]["total"] == pytest.approx(
        0.6 * rows["X_langcell"]["silhouette_label"]
        + 0.4 * np.mean([rows["X_langcell"][m] for m in ("ilisi", "graph_connectivity", "pcr_comparison")])
    )
    assert report["annotation"]["summary"]["n_unseen_types"] == 2
    written = ad.read_h5ad(out)
    assert "langcell_cell_type" in written.obs and "X_langcell" in written.obsm
    assert list(written.uns["langcell_evaluation"]["integration"]["embedding"]) == ["X_langcell", "X_pca"]


def test_cli_prints_the_report_without_report_file(saved, capsys):
    model, cells = saved
    assert main(["evaluate", str(cells), "--model", str(model), "--label-key", "cell_type"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_cells"] == 60 and report["annotation"]["summary"]["n_types"] == 4


def test_cli_refuses_an_output_in_a_missing_directory_before_any_work(saved, tmp_path, capsys):
    model, cells = saved
    code = main(["evaluate", str(cells), "--model", str(model), "--label-key", "cell_type",
                 "--report", str(tmp_path / "no" / "report.json")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("langcell evaluate: error:") and "does not exist" in err[0]
    assert not list(tmp_path.iterdir())


def test_predictions_in_another_vocabulary_are_refused_not_scored_zero():
    adata = ad.AnnData(np.zeros((4, 1), dtype=np.float32))
    adata.obs["truth"] = ["B cell, CD19-positive", "T cell", "B cell, CD19-positive", "T cell"]
    adata.obs["predicted"] = ["B cell", "T cell, alpha-beta", "B cell", "B cell"]
    with pytest.raises(LangCellError, match="no prediction in obs\\['predicted'\\] is a label of obs\\['truth'\\]"):
        per_type_accuracy(adata, label_key="truth", prediction_key="predicted")



def test_jax_platform_probing_is_dropped_and_nothing_else(caplog):
    import logging

    from langcell.evaluation.integration import JAX_PROBE_LOGGER, quiet_jax_probe

    jax_logger = logging.getLogger(JAX_PROBE_LOGGER)
    probe = ("An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not installed. "
             "Falling back to cpu.")
    with caplog.at_level(logging.INFO, logger=JAX_PROBE_LOGGER):
        with quiet_jax_probe():
            jax_logger.warning(probe)
            jax_logger.warning("No GPU/TPU found, falling back to CPU.")
            jax_logger.info("Unable to initialize backend 'tpu': no libtpu")
            jax_logger.warning("something else jax has to say")
        jax_logger.warning("after the block: %s", probe)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["something else jax has to say", f"after the block: {probe}"]
    assert jax_logger.filters == []

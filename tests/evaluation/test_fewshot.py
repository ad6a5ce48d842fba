"""Few-shot annotation on a tiny model and real CBMC cells: sampling, tuning, baselines, results, plot, CLI."""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from langcell import evaluation, pl, tl
from langcell.cli import main
from langcell.data.splits import run_seed, sample_shots
from langcell.data.tokenizer import GeneTokenizer
from langcell.errors import LangCellError
from langcell.evaluation.fewshot import (
    DEFAULT_METHOD,
    METHODS,
    RESULT_COLUMNS,
    fewshot,
    fewshot_predictions,
    shared_inputs,
)
from langcell.inference.calibration import PRIORS
from langcell.models.config import LangCellConfig
from langcell.models.langcell import LangCell
from langcell.train.fewshot import fewshot_loss, tune_langcell

CBMC = Path(__file__).resolve().parents[3] / "shared" / "data" / "cbmc_citeseq_500genes.h5ad"
TYPES = ["B cell", "CD14-positive monocyte", "natural killer cell"]
CELLS_PER_TYPE = 15
N_UNLABELLED = 4
MAX_LENGTH = 64
# A random tiny model needs a high rate to move within a couple of epochs.
FAST = dict(epochs=2, lr=3e-3, text_lr=3e-3, max_length=MAX_LENGTH)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models


@pytest.fixture(scope="module")
def cbmc():
    """15 cells of each of three CBMC types, and 4 T cells whose label is missing (unlabelled)."""
    if not CBMC.is_file():
        pytest.skip(f"{CBMC} is missing")
    full = ad.read_h5ad(CBMC)
    rng = np.random.default_rng(0)
    rows = [rng.permutation(np.flatnonzero(full.obs["cell_type"] == kind))[:CELLS_PER_TYPE] for kind in TYPES]
    rows.append(np.flatnonzero(full.obs["cell_type"] == "CD4-positive, alpha-beta T cell")[:N_UNLABELLED])
    adata = full[np.sort(np.concatenate(rows))].copy()
    labels = adata.obs["cell_type"].astype(str).to_numpy(dtype=object)
    labels[~np.isin(labels, TYPES)] = np.nan
    adata.obs["cell_type"] = pd.Categorical(labels, categories=TYPES)
    return adata


@pytest.fixture(scope="module")
def model(cbmc):
    tokenizer = GeneTokenizer.fit(cbmc, gene_id_kind="custom")
    # The first parallel numba call (in fit) starts OpenMP, which resets torch to every core and so undoes
    # the one_thread fixture; tiny models run ~10x slower on a busy 2-core machine with 2 threads.
    torch.set_num_threads(1)
    config = LangCellConfig.preset("tiny")
    config.cell.vocab_size = tokenizer.vocab_size
    # A random encoder gives every cell nearly the same <cls> state (cells differ by ~1e-3); dropout
    # noise would drown that signal, so the tests train without it to see the objective optimised.
    for part in (config.cell, config.text):
        part.hidden_dropout_prob = part.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    return LangCell.from_config(config, gene_tokenizer=tokenizer).eval()


@pytest.fixture(scope="module")
def run(cbmc, model):
    """shots 1 and 3, two repeats, all methods; the model's weights before the call."""
    adata = cbmc.copy()
    before = copy.deepcopy(model.state_dict())
    rng_state = torch.get_rng_state()
    results = fewshot(adata, model, "cell_type", shots=(1, 3), repeats=2, seed=4, **FAST)
    assert "langcell_fewshot" not in adata.uns  # inplace=False: the table only
    assert fewshot(adata, model, "cell_type", shots=(1, 3), repeats=2, seed=4, inplace=True, **FAST) is None
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's random stream is left alone
    return adata, results, before


def codes_of(adata) -> np.ndarray:
    return adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Sampling


def test_sample_shots_draws_exactly_n_per_class_disjoint_seeded_and_nested():
    codes = np.array([0] * 7 + [-1] * 3 + [1] * 5 + [2] * 9 + [-1] * 2 + [1] * 2)
    labelled = np.flatnonzero(codes >= 0)
    for n in (1, 3, 6):
        train, test = sample_shots(codes, n, seed=11)
        assert np.bincount(codes[train], minlength=3).tolist() == [n, n, n]
        assert np.intersect1d(train, test).size == 0
        np.testing.assert_array_equal(np.union1d(train, test), labelled)  # unlabelled items in neither set
        np.testing.assert_array_equal(train, sample_shots(codes, n, seed=11)[0])
    assert any(not np.array_equal(sample_shots(codes, 3, seed=11)[0], sample_shots(codes, 3, seed=s)[0])
               for s in range(12, 18))
    # One seed: the 1-shot cells are among the 3-shot cells, which are among the 6-shot cells.
    one, three, six = (set(sample_shots(codes, n, seed=2)[0]) for n in (1, 3, 6))
    assert one <= three <= six


def test_sample_shots_names_a_class_that_is_too_small():
    codes = np.array([0] * 6 + [1] * 3 + [2] * 8)
    with pytest.raises(LangCellError, match=r"'rare' \(3 cells\)") as error:
        sample_shots(codes, 3, seed=0, class_names=["common", "rare", "other"])
    assert "common" not in str(error.value)
    sample_shots(codes, 2, seed=0)  # 2 to train, 1 to test
    with pytest.raises(LangCellError, match=r"1 \(3 items\)"):
        sample_shots(codes, 2, seed=0, min_test=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(LangCellError, match="n_per_class"):
            sample_shots(codes, bad, seed=0)
    with pytest.raises(LangCellError, match="integer"):
        sample_shots(np.array([0.0, 1.0]), 1, seed=0)


# --------------------------------------------------------------------------------------------------
# The LangCell objective and tuning


def _training_cells(cbmc, model, n=3):
    codes = codes_of(cbmc)
    train, _ = sample_shots(codes, n, seed=0)
    cells = model.gene_tokenizer.encode(cbmc, max_length=MAX_LENGTH)
    return [cells[int(i)] for i in train], codes[train]


def _eval_loss(model, sequences, labels, texts) -> float:
    from langcell.data.batching import pad_sequences

    ids, mask = pad_sequences(sequences, model.config.cell.pad_token_id, MAX_LENGTH)
    model.eval()
    with torch.no_grad():
        return float(fewshot_loss(
            model, {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)},
            torch.from_numpy(labels), model.tokenize_texts(texts),
        )["loss"])


def test_fewshot_loss_equals_a_pair_by_pair_computation(cbmc, model):
    from langcell.data.batching import pad_sequences

    sequences, labels = _training_cells(cbmc, model)
    texts = [f"cell type: {kind}." for kind in TYPES]
    ids, mask = pad_sequences(sequences, model.config.cell.pad_token_id, MAX_LENGTH)
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    tokens = model.tokenize_texts(texts)
    with torch.no_grad():
        got = fewshot_loss(model, batch, torch.from_numpy(labels), tokens, tau=0.05)
        # Independently: every (cell, class) pair through the paired path of match_logits.
        cell_embeddings, states = model.encode_cells(batch)
        text_embeddings = model.encode_texts(texts)
        n_cells, n_classes = len(sequences), len(texts)
        pair_tokens = {key: value.repeat(n_cells, 1) for key, value in tokens.items()}
        cell_index = torch.arange(n_cells).repeat_interleave(n_classes)
        pair_logits = model.match_logits(states, torch.from_numpy(mask), pair_tokens, cell_index=cell_index)
        log_odds = (pair_logits[:, 1] - pair_logits[:, 0]).view(n_cells, n_classes)
        target = torch.from_numpy(labels)
        expected_similarity = F.cross_entropy(cell_embeddings @ text_embeddings.T / 0.05, target)
        expected_matching = F.cross_entropy(log_odds, target)
    assert float(got["similarity"]) == pytest.approx(float(expected_similarity), rel=1e-5)
    assert float(got["matching"]) == pytest.approx(float(expected_matching), rel=1e-4)
    assert float(got["loss"]) == pytest.approx(float(expected_similarity + expected_matching), rel=1e-4)


def test_match_classes_restricts_the_matching_loss_to_the_own_class_and_hard_negatives(cbmc, model):
    from langcell.data.batching import pad_sequences

    sequences, labels = _training_cells(cbmc, model)
    texts = [f"cell type: {kind}." for kind in TYPES] + ["cell type: platelet.", "cell type: erythrocyte."]
    ids, mask = pad_sequences(sequences, model.config.cell.pad_token_id, MAX_LENGTH)
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    tokens = model.tokenize_texts(texts)
    target = torch.from_numpy(labels)
    with torch.no_grad():
        full = fewshot_loss(model, batch, target, tokens)
        # Independently: all K log-odds, then the own class and the m - 1 most similar others by numpy.
        cell_embeddings, states = model.encode_cells(batch)
        similarity = (cell_embeddings @ model.encode_texts(texts).T).numpy()
        n_cells, n_classes = len(sequences), len(texts)
        pair_tokens = {key: value.repeat(n_cells, 1) for key, value in tokens.items()}
        cell_index = torch.arange(n_cells).repeat_interleave(n_classes)
        pair_logits = model.match_logits(states, torch.from_numpy(mask), pair_tokens, cell_index=cell_index)
        log_odds = (pair_logits[:, 1] - pair_logits[:, 0]).view(n_cells, n_classes).numpy()
        for m in (2, 3):
            got = fewshot_loss(model, batch, target, tokens, match_classes=m)
            losses = []
            for row, own in enumerate(labels):
                others = [k for k in np.argsort(-similarity[row], kind="stable") if k != own][: m - 1]
                scores = log_odds[row, [own, *others]]
                losses.append(np.log(np.exp(scores - scores.max()).sum()) + scores.max() - scores[0])
            assert float(got["matching"]) == pytest.approx(float(np.mean(losses)), rel=1e-4)
            assert float(got["similarity"]) == pytest.approx(float(full["similarity"]), rel=1e-6)
        # m = K is the full loss.
        every = fewshot_loss(model, batch, target, tokens, match_classes=n_classes)
    assert float(every["matching"]) == pytest.approx(float(full["matching"]), rel=1e-6)


@pytest.mark.slow
def test_tuning_lowers_the_loss_moves_both_encoders_and_leaves_the_model_alone(cbmc, model):
    sequences, labels = _training_cells(cbmc, model, n=1)
    texts = [f"cell type: {kind}." for kind in TYPES]
    before = copy.deepcopy(model.state_dict())
    rng_state = torch.get_rng_state()
    loss_before = _eval_loss(model, sequences, labels, texts)
    # One full batch per epoch; the random start needs ~20 steps to separate the cells at all.
    tuned, losses = tune_langcell(
        model, sequences, labels, texts, epochs=40, lr=2e-3, text_lr=2e-3, warmup_fraction=0.0,
        max_batch_size=16, max_length=MAX_LENGTH, seed=1,
    )
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert _eval_loss(tuned, sequences, labels, texts) < 0.6 * loss_before
    assert losses[-1] < 0.6 * losses[0]
    tuned_state = tuned.state_dict()
    for prefix in ("cell_encoder.", "text_encoder.embeddings.", "text_encoder.encoder.layer.0.attention.",
                   "text_encoder.encoder.layer.0.crossattention.", "cell_proj.", "text_proj.", "ctm_head."):
        names = [name for name in before if name.startswith(prefix)]
        assert names and any(not torch.equal(before[name], tuned_state[name]) for name in names), prefix
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} of the input model changed"
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert tuned.gene_tokenizer is model.gene_tokenizer and not tuned.training


# --------------------------------------------------------------------------------------------------
# The AnnData layer


def _split_of(adata, key, n, repeat):
    names = set(adata.uns[key]["train_cells"][f"{n}_shots_repeat_{repeat}"])
    codes = codes_of(adata)
    train = np.flatnonzero(adata.obs_names.isin(names))
    test = np.setdiff1d(np.flatnonzero(codes >= 0), train)
    return codes, train, test


@pytest.mark.slow
def test_results_schema_and_uns(run, model):
    adata, results, before = run
    assert list(results.columns) == list(RESULT_COLUMNS)
    rows = ["zero-shot", "langcell", "langcell:full", "langcell:linear", "logistic_regression", "knn"]
    assert DEFAULT_METHOD == "wise" and len(results) == len(rows) * 2 * 2
    assert list(dict.fromkeys(results["method"])) == rows
    assert (results["seconds"] > 0).all()
    labelled = len(TYPES) * CELLS_PER_TYPE
    for row in results.itertuples():
        assert row.n_train == row.shots * len(TYPES) and row.n_test == labelled - row.n_train
        assert 0 <= row.accuracy <= 1 and 0 <= row.macro_f1 <= 1
    stored = adata.uns["langcell_fewshot"]
    # Two calls: the same numbers, apart from the seconds each took.
    pd.testing.assert_frame_equal(pd.DataFrame(stored["results"]).drop(columns="seconds"),
                                  results.drop(columns="seconds"))
    assert stored["params"]["shots"] == [1, 3] and stored["params"]["n_classes"] == 3
    assert stored["classes"] == TYPES and len(stored["texts"]) == 3
    assert np.array(stored["train_loss"]["loss"]).shape == (4, FAST["epochs"])  # the full method's runs
    assert stored["skipped"] == {"classes": {}, "shots": []} and stored["params"]["method"] == "wise"
    assert stored["choices"]["method"] == ["linear", "wise"] * 4
    assert set(stored["priors"]) == set()  # prior="uniform": nothing estimated
    for n in (1, 3):
        for repeat in (0, 1):
            codes, train, test = _split_of(adata, "langcell_fewshot", n, repeat)
            assert np.bincount(codes[train], minlength=3).tolist() == [n] * 3
    # Different repeats draw different cells; the model was not touched.
    assert set(stored["train_cells"]["3_shots_repeat_0"]) != set(stored["train_cells"]["3_shots_repeat_1"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


@pytest.mark.slow
def test_uns_survives_h5ad_and_feeds_the_plot(run, tmp_path):
    adata, results, _ = run
    adata.write_h5ad(tmp_path / "fewshot.h5ad")
    stored = ad.read_h5ad(tmp_path / "fewshot.h5ad").uns["langcell_fewshot"]
    table = pd.DataFrame(stored["results"])[list(RESULT_COLUMNS)]  # h5ad sorts the keys
    pd.testing.assert_frame_equal(table.astype(results.dtypes.to_dict()).drop(columns="seconds"),
                                  results.drop(columns="seconds"))
    png = tmp_path / "curves.png"
    figure = pl.fewshot_curves(stored, png, metric="accuracy")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = figure.axes[0].get_lines()
    assert len(lines) == 6
    assert [line.get_label() for line in lines][:2] == ["zero-shot", "LangCell (wise)"]
    langcell = results[results["method"] == "langcell"].groupby("shots")["accuracy"].mean()
    np.testing.assert_allclose(lines[1].get_ydata(), langcell.to_numpy())
    assert pl.fewshot_curves(results) is not None  # a DataFrame, nothing written
    with pytest.raises(LangCellError, match="metric"):
        pl.fewshot_curves(results, metric="recall")
    with pytest.raises(LangCellError, match="columns"):
        pl.fewshot_curves(pd.DataFrame({"method": ["knn"]}))


@pytest.mark.slow
def test_baselines_equal_a_direct_sklearn_computation(run, cbmc):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    adata, results, _ = run
    counts = adata.X.toarray().astype(np.float64)
    features = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)  # CBMC has no n_counts column
    labelled_rows = np.flatnonzero(codes_of(adata) >= 0)
    n_components = min(50, labelled_rows.size - 1, features.shape[1] - 1)
    pca = PCA(n_components=n_components, svd_solver="arpack", random_state=4)
    pcs = np.zeros((adata.n_obs, n_components))
    pcs[labelled_rows] = pca.fit_transform(features[labelled_rows])
    for n in (1, 3):
        for repeat in (0, 1):
            codes, train, test = _split_of(adata, "langcell_fewshot", n, repeat)
            scaler = StandardScaler().fit(features[train])
            regression = LogisticRegression(max_iter=2000).fit(scaler.transform(features[train]), codes[train])
            knn = KNeighborsClassifier(n_neighbors=min(5, n)).fit(pcs[train], codes[train])
            for method, predicted in (("logistic_regression", regression.predict(scaler.transform(features[test]))),
                                      ("knn", knn.predict(pcs[test]))):
                row = results[(results["method"] == method) & (results["shots"] == n) & (results["repeat"] == repeat)]
                assert row["accuracy"].item() == pytest.approx(accuracy_score(codes[test], predicted))
                assert row["macro_f1"].item() == pytest.approx(f1_score(codes[test], predicted, average="macro"))
    assert adata.uns["langcell_fewshot"]["params"]["n_pcs"] == n_components


@pytest.mark.slow
def test_same_seed_same_results_copy_and_descriptions(cbmc, model):
    from sklearn.metrics import f1_score

    descriptions = {"B cell": "A lymphocyte that makes antibodies.", "natural killer cell": "A cytotoxic lymphocyte."}
    # Tuned long enough that the predictions are not all one class (a stronger check of the last step).
    tuning = dict(epochs=40, lr=2e-3, text_lr=2e-3, max_length=MAX_LENGTH)
    settings = dict(shots=[2], labels=descriptions, baselines=(), seed=9, method="full", methods=["full"], **tuning)
    adata = cbmc.copy()
    results = fewshot(adata, model, "cell_type", **settings)
    assert "langcell_fewshot" not in adata.uns  # inplace=False leaves the input alone
    annotated = adata.copy()
    fewshot(annotated, model, "cell_type", inplace=True, **settings)
    stored = annotated.uns["langcell_fewshot"]
    assert stored["classes"] == list(descriptions) and stored["texts"] == list(descriptions.values())
    assert results["method"].tolist() == ["zero-shot", "langcell"]
    results = results[results["method"] == "langcell"].reset_index(drop=True)
    assert results["n_test"].item() == 2 * CELLS_PER_TYPE - 4  # monocytes are left out
    fewshot(adata, model, "cell_type", inplace=True, **settings)
    again = pd.DataFrame(adata.uns["langcell_fewshot"]["results"])[list(RESULT_COLUMNS)]
    again = again[again["method"] == "langcell"].reset_index(drop=True)
    pd.testing.assert_frame_equal(results.drop(columns="seconds"),
                                  again.astype(results.dtypes.to_dict()).drop(columns="seconds"))
    assert adata.uns["langcell_fewshot"]["train_loss"]["loss"] == stored["train_loss"]["loss"]

    # The LangCell row is zero-shot annotation (tl.annotate) of the test cells by the tuned model.
    codes = np.full(adata.n_obs, -1)
    for code, name in enumerate(descriptions):
        codes[(adata.obs["cell_type"] == name).to_numpy()] = code
    train = np.flatnonzero(adata.obs_names.isin(stored["train_cells"]["2_shots_repeat_0"]))
    test = np.setdiff1d(np.flatnonzero(codes >= 0), train)
    cells = model.gene_tokenizer.encode(adata, max_length=MAX_LENGTH)
    tuned, _ = tune_langcell(
        model, [cells[int(i)] for i in train], codes[train], list(descriptions.values()),
        seed=run_seed(9, 0, 2), **tuning,
    )
    annotated = tl.annotate(adata[test].copy(), tuned, descriptions, max_length=MAX_LENGTH, copy=True)
    truth = adata.obs["cell_type"].to_numpy()[test].astype(str)
    predicted = annotated.obs["langcell_cell_type"].astype(str).to_numpy()
    assert len(set(predicted)) == 2
    assert results["accuracy"].item() == pytest.approx(np.mean(predicted == truth))
    assert results["macro_f1"].item() == pytest.approx(f1_score(truth, predicted, average="macro"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(label_key="no_such_column"), "no column 'no_such_column'"),
        (dict(shots=[0, 1]), "positive integers"),
        (dict(shots=[-3]), "positive integers"),
        (dict(shots=[1.5]), "positive integers"),
        (dict(shots=["3"]), "positive integers"),
        (dict(shots=[True]), "positive integers"),
        (dict(shots=[]), "list of positive integers"),
        (dict(shots=[3, 3]), "repeat"),
        (dict(shots=[15]), r"'B cell' \(15 cells\)"),
        (dict(shots=[15, 20]), "fewer than two classes"),
        (dict(method="clap"), "method must be one of"),
        (dict(methods=["linear", "lora"]), "methods must be"),
        (dict(prior="balanced"), "prior must be one of"),
        (dict(prior=["em", "em"]), "distinct"),
        (dict(repeats=0), "repeats"),
        (dict(epochs=1.5), "epochs"),
        (dict(lr=-1.0), "lr must be"),
        (dict(baselines=["svm"]), "unknown baseline"),
        (dict(labels=["B cell", "T cell"]), "do not occur"),
        (dict(labels="B cell"), "not one string"),
        (dict(alpha=2.0), "alpha"),
        (dict(match_classes=1), "match_classes"),
        (dict(match_classes=2.5), "match_classes"),
        (dict(key_added=""), "key_added"),
    ],
)
def test_bad_inputs_raise_before_anything_is_written(cbmc, model, kwargs, message):
    adata = cbmc.copy()
    arguments = dict(label_key="cell_type", shots=(1,), **FAST)
    arguments.update(kwargs)
    label_key = arguments.pop("label_key")
    with pytest.raises(LangCellError, match=message):
        fewshot(adata, model, label_key, **arguments)
    assert "langcell_fewshot" not in adata.uns


def test_evaluation_reexports_fewshot():
    assert evaluation.fewshot is fewshot and "fewshot" in evaluation.__all__


# --------------------------------------------------------------------------------------------------
# Command line


@pytest.fixture(scope="module")
def saved(cbmc, model, tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot_cli")
    model.save_pretrained(root / "model")
    cbmc.write_h5ad(root / "cells.h5ad")
    return root / "model", root / "cells.h5ad"


@pytest.mark.slow
def test_cli_round_trip(saved, tmp_path, capsys):
    model_dir, cells = saved
    report, plot, out = tmp_path / "report.json", tmp_path / "curves.png", tmp_path / "out.h5ad"
    code = main([
        "fewshot", str(cells), "--model", str(model_dir), "--label-key", "cell_type", "--shots", "1,2",
        "--epochs", "1", "--max-length", str(MAX_LENGTH), "--labels", "B cell;natural killer cell",
        "--report", str(report), "--plot", str(plot), "--out", str(out),
    ])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "logistic_regression" in printed and "knn" in printed
    data = json.loads(report.read_text())
    assert data["results"]["shots"] == [1] * 6 + [2] * 6 and data["classes"] == ["B cell", "natural killer cell"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    written = ad.read_h5ad(out).uns["langcell_fewshot"]
    np.testing.assert_allclose(written["results"]["macro_f1"], data["results"]["macro_f1"])


def test_cli_refuses_bad_shots_and_missing_output_directories(saved, tmp_path, capsys):
    model_dir, cells = saved
    base = ["fewshot", str(cells), "--model", str(model_dir), "--label-key", "cell_type"]
    assert main([*base, "--shots", "1,x", "--report", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shots" in err[0]
    assert main([*base, "--plot", str(tmp_path / "missing" / "c.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--shots", "0"]) == 2
    assert "positive integers" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# Methods that start from zero-shot, label shift, skipped shots


def _inputs(cbmc, model, methods=METHODS, method="wise", priors=("uniform", "em")):
    from langcell.ontology.classes import class_texts

    cells = model.gene_tokenizer.encode(cbmc, max_length=MAX_LENGTH)
    codes = codes_of(cbmc)
    texts, _ = class_texts(TYPES)
    tuning = dict(epochs=1, lr=3e-3, text_lr=3e-3, tau=0.05, weight_decay=0.01, warmup_fraction=0.1,
                  max_grad_norm=1.0, max_tokens=8192, max_batch_size=8, max_pair_tokens=16384,
                  max_length=MAX_LENGTH, match_classes=None)
    scoring = dict(alpha=0.1, top_k=3, mode="fast", max_tokens=8192, max_pair_tokens=16384)
    sequences = [cells[i] for i in range(cbmc.n_obs)]
    return shared_inputs(model, sequences, texts, TYPES, np.flatnonzero(codes >= 0), tuning, scoring,
                         list(methods), method, list(priors)), codes


@pytest.mark.slow
def test_no_test_label_reaches_any_choice(cbmc, model):
    inputs, codes = _inputs(cbmc, model)
    train, test = sample_shots(codes, 3, seed=5)
    with _quiet():
        first = fewshot_predictions(inputs, train, codes[train], test, seed=1)
    # Permute the test cells' labels (the AnnData's column, then everything rebuilt): nothing changes.
    shuffled = cbmc.copy()
    labels = shuffled.obs["cell_type"].to_numpy().copy()
    labels[test] = np.random.default_rng(0).permutation(labels[test])
    shuffled.obs["cell_type"] = pd.Categorical(labels, categories=TYPES)
    assert not np.array_equal(codes_of(shuffled)[test], codes[test])
    np.testing.assert_array_equal(codes_of(shuffled)[train], codes[train])
    again_inputs, _ = _inputs(shuffled, model)
    with _quiet():
        again = fewshot_predictions(again_inputs, train, codes_of(shuffled)[train], test, seed=1)
    assert set(first["predicted"]) == {
        "zero-shot", "langcell", "langcell:full", "langcell:linear",
        "zero-shot+em", "langcell+em", "langcell:full+em", "langcell:linear+em",
    }
    for name, predicted in first["predicted"].items():
        np.testing.assert_array_equal(predicted, again["predicted"][name], err_msg=name)
    assert first["choices"] == again["choices"] and first["priors"] == again["priors"]


@contextlib.contextmanager
def _quiet():
    """EM on a random tiny model's posteriors may fall back (with a warning): not what these tests check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_the_linear_head_starts_at_zero_shot_similarity(cbmc, model):
    from langcell.inference.zero_shot import encode_class_texts, zero_shot_scores
    from langcell.ontology.classes import class_texts
    from langcell.train.text_head import fit_text_head

    inputs, codes = _inputs(cbmc, model, methods=["linear"], method="linear", priors=["uniform"])
    labelled = np.flatnonzero(codes >= 0)
    texts, _ = class_texts(TYPES)
    cells = model.gene_tokenizer.encode(cbmc, max_length=MAX_LENGTH)
    direct = zero_shot_scores(model, [cells[int(i)] for i in labelled], encode_class_texts(model, texts, TYPES))
    text = inputs.class_texts.embeddings.double().numpy()
    start = fit_text_head(inputs.zero_shot["cell_embeddings"][labelled], codes[labelled], text, inputs.scale,
                          float("inf"))
    logits = start.logits(inputs.zero_shot["cell_embeddings"][labelled])
    np.testing.assert_array_equal(logits.argmax(1), direct.similarity.argmax(1))
    np.testing.assert_allclose(logits, direct.similarity * float(model.logit_scale.exp()), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_em_rows_record_their_priors_and_unservable_shots_are_skipped(cbmc, model):
    adata = cbmc.copy()
    # One small class: natural killer cells keep 4 labelled cells, enough for 1 and 3 shots only.
    labels = adata.obs["cell_type"].astype(object).to_numpy()
    nk = np.flatnonzero(labels == "natural killer cell")
    labels[nk[4:]] = np.nan
    adata.obs["cell_type"] = pd.Categorical(labels, categories=TYPES)
    with pytest.warns(UserWarning, match=r"shots \[5\] skipped: 'natural killer cell' has 4"):
        fewshot(adata, model, "cell_type", shots=(1, 3, 5), methods=["linear", "wise"], prior=["uniform", "em"],
                inplace=True, **FAST)
    stored = adata.uns["langcell_fewshot"]
    assert stored["skipped"]["shots"] == [5] and stored["params"]["shots"] == [1, 3]
    results = pd.DataFrame(stored["results"])
    assert set(results["shots"]) == {1, 3}
    assert {"zero-shot+em", "langcell+em", "langcell:linear+em"} <= set(results["method"])
    priors = stored["priors"]
    assert len(priors["method"]) == 3 * 2
    for status, found in zip(priors["status"], priors["priors"], strict=True):
        values = json.loads(found)
        assert set(values) == set(TYPES) and sum(values.values()) == pytest.approx(1.0)
        assert status == "em" or status.startswith("fallback")
    # A class too small for even the smallest n is left out, named.
    with pytest.warns(UserWarning, match="left out"):
        table = fewshot(adata, model, "cell_type", shots=(5,), methods=["linear"], baselines=(), **FAST)
    assert set(table["n_train"]) == {10}


@pytest.mark.slow
def test_cli_flags_reach_the_function(saved, tmp_path, capsys):
    from langcell.cli import evaluation as cli_evaluation

    assert cli_evaluation.FEWSHOT_METHODS == METHODS and cli_evaluation.PRIORS == PRIORS
    model_dir, cells = saved
    report = tmp_path / "report.json"
    code = main([
        "fewshot", str(cells), "--model", str(model_dir), "--label-key", "cell_type", "--shots", "1,2,40",
        "--method", "linear", "--methods", "linear,wise", "--prior", "uniform,em", "--lr", "2e-3",
        "--text-lr", "3e-4", "--epochs", "1", "--max-length", str(MAX_LENGTH), "--report", str(report), "-q",
    ])
    assert code == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    params = data["params"]
    assert params["method"] == "linear" and params["methods"] == ["linear", "wise"]
    assert params["prior"] == ["uniform", "em"] and params["lr"] == 2e-3 and params["text_lr"] == 3e-4
    assert data["skipped"]["shots"] == [40] and params["shots"] == [1, 2]
    assert "langcell:wise+em" in data["results"]["method"]
    base = ["fewshot", str(cells), "--model", str(model_dir), "--label-key", "cell_type"]
    for flags, word in ((["--prior", "balanced"], "--prior"), (["--methods", "full,lora"], "--methods")):
        assert main([*base, *flags, "--report", str(tmp_path / "bad.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0]
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.slow
def test_frozen_text_tower_is_encoded_once_and_stays_frozen(cbmc, model):
    from langcell.train import fewshot as tuning

    sequences, labels = _training_cells(cbmc, model, n=2)
    tokens = model.tokenize_texts(TYPES)
    calls = []
    original = type(model.text_encoder).forward

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("mode", args[2] if len(args) > 2 else None))
        return original(self, *args, **kwargs)

    type(model.text_encoder).forward = counting
    try:
        tuned, _ = tune_langcell(model, sequences, labels, TYPES, epochs=2, lr=3e-3, text_lr=0, max_length=MAX_LENGTH)
    finally:
        type(model.text_encoder).forward = original
    assert calls.count("text") == 1  # the unimodal class-text pass ran once, not at every step
    before, after = dict(model.text_encoder.named_parameters()), dict(tuned.text_encoder.named_parameters())
    for name, value in after.items():
        if ".crossattention." in name:
            continue
        assert torch.equal(value, before[name]), name
    assert any(not torch.equal(after[n], before[n]) for n in after if ".crossattention." in n)
    # The cached states give the same loss as encoding the texts in the call (no dropout in this model).
    from langcell.data.batching import pad_sequences

    ids, mask = pad_sequences(sequences, model.config.cell.pad_token_id, MAX_LENGTH)
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    with torch.no_grad():
        states = model.text_encoder(tokens["input_ids"], tokens["attention_mask"], mode="text")[:, 0]
        cached = fewshot_loss(model, batch, torch.from_numpy(labels), tokens, text_states=states)["loss"]
        fresh = fewshot_loss(model, batch, torch.from_numpy(labels), tokens)["loss"]
    assert float(cached) == pytest.approx(float(fresh), rel=1e-6)
    with pytest.raises(LangCellError, match="text_lr"):
        tuning.check_text_lr(-1.0)

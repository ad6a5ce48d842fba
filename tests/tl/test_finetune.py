"""LangCell-CE fine-tuning on a tiny model and real CBMC cells: split, metrics, training, save/load, predict."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from langcell.data.splits import stratified_split
from langcell.data.tokenizer import GeneTokenizer
from langcell.errors import LangCellError
from langcell.metrics import classification_metrics
from langcell.models.classifier import CellTypeClassifier
from langcell.models.config import LangCellConfig
from langcell.models.langcell import LangCell
from langcell.tl._finetune import finetune
from langcell.tl._predict import predict
from langcell.train.finetune import full_finetuning_epochs

CBMC = Path(__file__).resolve().parents[3] / "shared" / "data" / "cbmc_citeseq_500genes.h5ad"
TYPES = ["B cell", "CD14-positive monocyte", "natural killer cell"]
needs_cbmc = pytest.mark.skipif(not CBMC.is_file(), reason=f"{CBMC} is missing")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cbmc():
    """30 cells of each of three CBMC types (train/test), and 20 other cells of those types (new data)."""
    full = ad.read_h5ad(CBMC)
    rng = np.random.default_rng(0)
    train_rows, new_rows = [], []
    for cell_type in TYPES:
        rows = rng.permutation(np.flatnonzero(full.obs["cell_type"] == cell_type))
        train_rows.append(rows[:30])
        new_rows.append(rows[30:37])
    labelled = full[np.sort(np.concatenate(train_rows))].copy()
    new = full[np.sort(np.concatenate(new_rows))].copy()
    for adata in (labelled, new):
        adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    return labelled, new


@pytest.fixture(scope="module")
def model(cbmc):
    labelled, _ = cbmc
    tokenizer = GeneTokenizer.fit(labelled, gene_id_kind="custom")
    config = LangCellConfig.preset("tiny")
    config.cell.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    return LangCell.from_config(config, gene_tokenizer=tokenizer).eval()


@pytest.fixture(scope="module")
def linear_run(cbmc, model):
    adata = cbmc[0].copy()
    classifier, metrics = finetune(adata, model, "cell_type", mode="linear", epochs=60, seed=3)
    return adata, classifier, metrics


# A random tiny encoder needs a high rate to move within a few epochs; 64 tokens keep the run under a second.
FULL_SETTINGS = dict(
    mode="full", epochs=8, lr=3e-3, encoder_lr=3e-3, max_batch_size=16, warmup_fraction=0.0, max_length=64
)


@pytest.fixture(scope="module")
def full_run(cbmc, model):
    adata = cbmc[0].copy()
    classifier, metrics = finetune(adata, model, "cell_type", seed=0, **FULL_SETTINGS)
    return adata, classifier, metrics


def codes_of(labels: pd.Series, classes: list[str]) -> np.ndarray:
    return np.array([classes.index(v) for v in labels], dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# Pure helpers


def test_stratified_split_keeps_class_shares_and_is_seeded():
    codes = np.array([0] * 9 + [1] * 6 + [2] * 3 + [-1] * 4 + [1] * 3)
    train, test = stratified_split(codes, 2 / 3, seed=5)
    assert np.intersect1d(train, test).size == 0
    assert set(np.concatenate([train, test])) == set(np.flatnonzero(codes >= 0))
    for code, n in ((0, 9), (1, 9), (2, 3)):
        assert np.sum(codes[train] == code) == round(n * 2 / 3)
        assert np.sum(codes[test] == code) == n - round(n * 2 / 3)
    again = stratified_split(codes, 2 / 3, seed=5)
    np.testing.assert_array_equal(train, again[0])
    others = [stratified_split(codes, 2 / 3, seed=s)[0] for s in range(6, 12)]
    assert any(not np.array_equal(train, o) for o in others)


def test_stratified_split_keeps_one_cell_per_side_and_refuses_singletons():
    train, test = stratified_split(np.array([0, 0, 1, 1, 1]), 0.99, seed=0)
    assert np.sum(np.array([0, 0, 1, 1, 1])[test] == 0) == 1  # 2 * 0.99 rounds to 2, clamped to 1
    with pytest.raises(LangCellError, match=r"\[1\]"):
        stratified_split(np.array([0, 0, 1]), 2 / 3)
    for bad in (0, 1, 1.5, True):
        with pytest.raises(LangCellError, match="train_fraction"):
            stratified_split(np.array([0, 0, 1, 1]), bad)


def test_classification_metrics_equal_sklearn():
    metrics_module = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    for trial in range(20):
        true = rng.integers(0, 5, size=40)
        predicted = np.where(rng.random(40) < 0.6, true, rng.integers(0, 6, size=40))
        if trial % 2:
            true[true == 4] = 3  # class 4 only among the predictions
        result = classification_metrics(true, predicted, 6)
        assert result["accuracy"] == pytest.approx(metrics_module.accuracy_score(true, predicted))
        assert result["macro_f1"] == pytest.approx(
            metrics_module.f1_score(true, predicted, average="macro", zero_division=0)
        )
        per_class = metrics_module.f1_score(true, predicted, labels=list(range(6)), average=None, zero_division=0)
        present = np.isin(np.arange(6), np.concatenate([true, predicted]))
        np.testing.assert_allclose(np.array(result["f1_per_class"])[present], per_class[present])
        assert np.all(np.isnan(np.array(result["f1_per_class"])[~present]))


def test_pooling_ignores_padding():
    config = LangCellConfig.preset("tiny").cell
    for pooling in ("cls", "mean"):
        torch.manual_seed(0)
        classifier = CellTypeClassifier(config, ["a", "b", "c"], pooling=pooling).eval()
        short = torch.tensor([[99, 5, 7, 9]])
        padded = torch.tensor([[99, 5, 7, 9, 0, 0], [99, 3, 4, 5, 6, 8]])
        mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
        with torch.no_grad():
            alone = classifier(short)
            batched = classifier(padded, mask)
            states = classifier.cell_encoder(short, torch.ones_like(short))
        torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
        expected = states[0, 0] if pooling == "cls" else states[0].mean(dim=0)
        torch.testing.assert_close(classifier.features(short)[0], expected, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# finetune


@pytest.mark.slow
@needs_cbmc
def test_linear_probe_learns_and_writes_the_contract(linear_run):
    adata, classifier, metrics = linear_run
    classes = adata.uns["langcell_ce"]["classes"]
    assert sorted(classes) == sorted(TYPES) and classifier.labels == classes
    assert metrics["accuracy"] > 0.6  # chance is 1/3
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]
    assert (metrics["n_train"], metrics["n_test"], metrics["n_unlabelled"]) == (60, 30, 0)

    split = adata.obs["langcell_ce_split"]
    test = (split == "test").to_numpy()
    codes = codes_of(adata.obs["cell_type"], classes)
    expected_train, expected_test = stratified_split(codes, 2 / 3, seed=3)
    np.testing.assert_array_equal(np.flatnonzero(test), expected_test)
    np.testing.assert_array_equal(np.flatnonzero((split == "train").to_numpy()), expected_train)

    predicted = adata.obs["langcell_ce"]
    assert predicted[~test].isna().all() and predicted[test].notna().all()
    probs = adata.obsm["langcell_ce_probs"]
    assert probs.dtype == np.float32 and np.isnan(probs[~test]).all()
    np.testing.assert_allclose(probs[test].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(codes_of(predicted[test], classes), probs[test].argmax(axis=1))
    np.testing.assert_allclose(adata.obs["langcell_ce_score"][test], probs[test].max(axis=1), rtol=1e-6)

    # The metrics are those of the written predictions (independent count, no helper of ours).
    truth, guess = adata.obs["cell_type"][test].to_numpy(), predicted[test].astype(str).to_numpy()
    assert metrics["accuracy"] == pytest.approx(np.mean(truth == guess))
    f1 = []
    for name in classes:
        tp = np.sum((truth == name) & (guess == name))
        f1.append(2 * tp / (np.sum(truth == name) + np.sum(guess == name)))
    assert metrics["macro_f1"] == pytest.approx(np.mean(f1))
    uns = adata.uns["langcell_ce"]
    assert uns["metrics"] is metrics and uns["params"]["mode"] == "linear" and uns["params"]["epochs"] == 60
    assert metrics["n_steps"] == 60  # 60 training cells: one batch of up to 256 per epoch


@pytest.mark.slow
@needs_cbmc
def test_linear_probe_head_predicts_like_the_folded_classifier(linear_run):
    # The head is trained on standardised features and folded back: the saved classifier must give the
    # held-out probabilities that finetune wrote.
    adata, classifier, _ = linear_run
    test = (adata.obs["langcell_ce_split"] == "test").to_numpy()
    again = predict(adata[test].copy(), classifier, copy=True)
    np.testing.assert_allclose(again.obsm["langcell_ce_probs"], adata.obsm["langcell_ce_probs"][test], atol=1e-4)


@pytest.mark.slow
@needs_cbmc
def test_annotated_anndata_writes_to_h5ad(linear_run, tmp_path):
    adata, _, _ = linear_run
    adata.write_h5ad(tmp_path / "out.h5ad")
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    assert back.uns["langcell_ce"]["metrics"]["accuracy"] == pytest.approx(adata.uns["langcell_ce"]["metrics"]["accuracy"])


@pytest.mark.slow
@needs_cbmc
def test_full_finetuning_changes_the_encoder_and_lowers_the_training_loss(cbmc, model, full_run):
    adata, classifier, metrics = full_run
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]
    # The encoder moved away from the LangCell weights, which themselves stayed as they were.
    original = model.cell_encoder.state_dict()
    tuned = classifier.cell_encoder.state_dict()
    moved = [name for name in original if not torch.equal(original[name], tuned[name])]
    assert len(moved) > len(original) // 2
    assert model.training is False

    # Cross-entropy on the training cells, recomputed here: the starting classifier (same seed, so the
    # same head initialisation) against the trained one.
    classes = classifier.labels
    train = (adata.obs["langcell_ce_split"] == "train").to_numpy()
    cells = model.gene_tokenizer.encode(adata[train], max_length=64)
    labels = torch.from_numpy(codes_of(adata.obs["cell_type"][train], classes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        start = CellTypeClassifier.from_langcell(model, classes)

    def loss(c):
        return float(F.cross_entropy(torch.from_numpy(c.predict_logits(cells)), labels))

    assert loss(classifier) < 0.8 * loss(start)


def test_full_finetuning_epochs_make_enough_steps_within_bounds():
    # ceil(200 / steps) clipped to [3, 100]: a large training set keeps 3 passes, a small one gets more.
    expected = {1: 100, 2: 100, 3: 67, 17: 12, 66: 4, 67: 3, 100: 3, 10_000: 3}
    assert {steps: full_finetuning_epochs(steps) for steps in expected} == expected
    for steps in range(1, 300):
        epochs = full_finetuning_epochs(steps)
        assert 3 <= epochs <= 100
        assert epochs * steps >= 200 or epochs == 100  # enough steps, unless capped
        assert epochs == 3 or (epochs - 1) * steps < 200  # and no more passes than needed
    with pytest.raises(LangCellError, match="at least 1"):
        full_finetuning_epochs(0)


@pytest.mark.slow
@needs_cbmc
def test_full_finetuning_default_epochs_follow_the_training_set_size(cbmc, model):
    # 60 training cells in batches of up to 32: 2 steps per pass, so the default makes 100 passes.
    settings = {**FULL_SETTINGS, "epochs": None, "max_batch_size": 32}
    _, metrics, annotated = finetune(cbmc[0], model, "cell_type", seed=0, copy=True, **settings)
    assert metrics["n_train"] == 60
    assert len(metrics["train_loss"]) == full_finetuning_epochs(2) == 100
    assert metrics["n_steps"] == 200
    assert annotated.uns["langcell_ce"]["params"]["epochs"] == 100


@pytest.mark.slow
@needs_cbmc
def test_same_seed_same_result_other_seed_other_split(cbmc, model):
    adata = cbmc[0]
    runs = [finetune(adata, model, "cell_type", mode="linear", epochs=5, seed=s, copy=True) for s in (1, 1, 2)]
    (_, m1, a1), (_, m2, a2), (_, _, a3) = runs
    assert m1 == m2
    np.testing.assert_array_equal(a1.obsm["langcell_ce_probs"], a2.obsm["langcell_ce_probs"])
    assert not a1.obs["langcell_ce_split"].equals(a3.obs["langcell_ce_split"])
    assert "langcell_ce" not in adata.obs  # copy=True leaves the input alone


@pytest.mark.slow
@needs_cbmc
def test_unlabelled_cells_are_predicted_but_not_scored(cbmc, model):
    adata = cbmc[0].copy()
    adata.obs["label"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[:5, adata.obs.columns.get_loc("label")] = np.nan
    adata.obs.iloc[5:7, adata.obs.columns.get_loc("label")] = ""
    _, metrics = finetune(adata, model, "label", mode="linear", epochs=3, key_added="ce")
    unlabelled = (adata.obs["ce_split"] == "unlabelled").to_numpy()
    assert unlabelled.sum() == 7 and metrics["n_unlabelled"] == 7
    assert metrics["n_train"] + metrics["n_test"] == adata.n_obs - 7
    assert adata.obs["ce"][unlabelled].notna().all()


@needs_cbmc
def test_bad_labels_are_refused_with_the_reason(cbmc, model):
    adata = cbmc[0].copy()
    with pytest.raises(LangCellError, match="no column 'celltype'"):
        finetune(adata, model, "celltype", mode="linear")
    adata.obs["one"] = "B cell"
    with pytest.raises(LangCellError, match="at least two"):
        finetune(adata, model, "one", mode="linear")
    adata.obs["rare"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[0, adata.obs.columns.get_loc("rare")] = "megakaryocyte"
    with pytest.raises(LangCellError, match=r"'megakaryocyte' \(1 cell\)"):
        finetune(adata, model, "rare", mode="linear")
    with pytest.raises(LangCellError, match="mode"):
        finetune(adata, model, "cell_type", mode="probe")
    bare = LangCell(model.config, text_tokenizer=model.text_tokenizer)
    with pytest.raises(LangCellError, match="gene tokenizer"):
        finetune(adata, bare, "cell_type", mode="linear")


# --------------------------------------------------------------------------------------------------
# save / load / predict


@pytest.mark.slow
@needs_cbmc
def test_save_load_round_trip_gives_identical_predictions(cbmc, full_run, tmp_path):
    _, classifier, _ = full_run
    new = cbmc[1]
    classifier.save(tmp_path / "clf")
    loaded = CellTypeClassifier.load(tmp_path / "clf")
    assert loaded.labels == classifier.labels and loaded.pooling == classifier.pooling
    assert loaded.gene_tokenizer == classifier.gene_tokenizer
    before = predict(new, classifier, copy=True)
    after = predict(new, loaded, copy=True)
    np.testing.assert_array_equal(before.obsm["langcell_ce_probs"], after.obsm["langcell_ce_probs"])
    assert before.obs["langcell_ce"].equals(after.obs["langcell_ce"])
    with pytest.raises(LangCellError, match="already exists"):
        classifier.save(tmp_path / "clf")
    classifier.save(tmp_path / "clf", overwrite=True)


@pytest.mark.slow
@needs_cbmc
def test_load_is_strict(full_run, tmp_path):
    _, classifier, _ = full_run
    good = tmp_path / "good"
    classifier.save(good)
    with pytest.raises(LangCellError, match="not a directory"):
        CellTypeClassifier.load(tmp_path / "nothing")

    def broken(name, edit_config=None, edit_weights=None):
        path = tmp_path / name
        classifier.save(path)
        if edit_config:
            document = json.loads((path / "config.json").read_text())
            edit_config(document)
            (path / "config.json").write_text(json.dumps(document))
        if edit_weights:
            tensors = load_file(path / "model.safetensors")
            edit_weights(tensors)
            save_file(tensors, path / "model.safetensors")
        return path

    with pytest.raises(LangCellError, match="missing tensors.*head.bias"):
        CellTypeClassifier.load(broken("no_bias", edit_weights=lambda t: t.pop("head.bias")))
    with pytest.raises(LangCellError, match="shape mismatches.*head.weight"):
        CellTypeClassifier.load(broken("labels", edit_config=lambda d: d["labels"].append("extra")))
    with pytest.raises(LangCellError, match="not a langcell cell-type classifier"):
        CellTypeClassifier.load(broken("format", edit_config=lambda d: d.update(format="other")))
    with pytest.raises(LangCellError, match="upgrade langcell"):
        CellTypeClassifier.load(broken("version", edit_config=lambda d: d.update(format_version=99)))
    with pytest.raises(LangCellError, match="duplicated"):
        CellTypeClassifier.load(broken("dupes", edit_config=lambda d: d["labels"].__setitem__(1, d["labels"][0])))
    with pytest.raises(LangCellError, match="pooling"):
        CellTypeClassifier.load(broken("pooling", edit_config=lambda d: d.update(pooling="max")))
    path = broken("truncated")
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:100])
    with pytest.raises(LangCellError, match="truncated or corrupt"):
        CellTypeClassifier.load(path)


@pytest.mark.slow
@needs_cbmc
def test_predict_on_new_cells_matches_one_cell_at_a_time(cbmc, full_run):
    _, classifier, _ = full_run
    new = cbmc[1].copy()
    assert predict(new, classifier, key_added="pred", max_length=64) is None
    probs = new.obsm["pred_probs"]
    assert probs.shape == (new.n_obs, 3) and probs.dtype == np.float32
    tokens = classifier.gene_tokenizer.encode(new, max_length=64)
    with torch.no_grad():
        for i in range(0, new.n_obs, 4):
            ids = torch.as_tensor(tokens[i], dtype=torch.long)[None]
            expected = torch.softmax(classifier(ids), dim=-1)[0].numpy()
            np.testing.assert_allclose(probs[i], expected, atol=1e-5)
    assert list(new.obs["pred"].cat.categories) == classifier.labels
    np.testing.assert_array_equal(codes_of(new.obs["pred"], classifier.labels), probs.argmax(axis=1))
    assert new.uns["pred"]["classes"] == classifier.labels
    # Trained on 60 cells, the fine-tuned classifier does better than chance on cells it never saw.
    assert np.mean(new.obs["pred"].astype(str).to_numpy() == new.obs["cell_type"].to_numpy()) > 0.5
    with pytest.raises(LangCellError, match="CellTypeClassifier"):
        predict(new, object())


def test_text_initialised_head_predicts_like_zero_shot_similarity_at_step_0(cbmc, model):
    from langcell.inference.zero_shot import encode_class_texts, zero_shot_scores
    from langcell.ontology.classes import class_texts
    from langcell.train.finetune import text_initialised_head

    labelled, _ = cbmc
    cells = model.gene_tokenizer.encode(labelled, max_length=64)
    texts, _ = class_texts(TYPES)
    class_embeddings = encode_class_texts(model, texts, TYPES)
    similarity = zero_shot_scores(model, cells, class_embeddings).similarity
    classifier = CellTypeClassifier.from_langcell(model, TYPES)
    features = classifier.encode_features(cells, max_length=64)
    text_initialised_head(classifier.head, model.cell_proj, class_embeddings.embeddings, 20.0, features)
    with torch.no_grad():
        logits = classifier.head(torch.from_numpy(features)).numpy()
    np.testing.assert_array_equal(logits.argmax(1), similarity.argmax(1))
    # Per cell, the logits are the similarities times one positive factor (the cell's projection norm).
    ratio = logits / similarity
    np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-3)


def test_text_head_runs_and_needs_the_linear_probe(cbmc, model):
    adata = cbmc[0].copy()
    _, metrics = finetune(adata, model, "cell_type", mode="linear", head="text", epochs=3, seed=1, max_length=64,
                          progress=False)
    assert adata.uns["langcell_ce"]["params"]["head"] == "text" and 0 <= metrics["accuracy"] <= 1
    for kwargs in (dict(mode="full", head="text"), dict(mode="linear", head="text", pooling="mean"),
                   dict(head="ontology")):
        with pytest.raises(LangCellError, match="head"):
            finetune(adata.copy(), model, "cell_type", **kwargs)

"""langcell.tl.annotate: the scanpy contract, abstention, ontology-column classes and input checks."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from langcell import ontology, tl
from langcell.data.tokenizer import GeneTokenizer
from langcell.errors import LangCellError
from langcell.inference.zero_shot import encode_class_texts, zero_shot_scores
from langcell.models import LangCell

N_GENES = 97  # the tiny preset's vocabulary: 97 genes + <pad>, <mask>, <cls>
GENES = [f"GENE{i}" for i in range(N_GENES)]
KEY = "langcell_cell_type"
DESCRIPTIONS = {
    "B": "cell type: B cell. A lymphocyte of B lineage.",
    "T": "cell type: T cell.",
    "Mono": "cell type: monocyte. A myeloid cell in the blood.",
    "NK": "cell type: natural killer cell.",
}


@pytest.fixture(scope="module")
def tokenizer():
    medians = np.random.default_rng(0).uniform(0.5, 3.0, N_GENES)
    return GeneTokenizer(GENES, medians, gene_id_kind="custom", organism=None)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    model = LangCell.from_config("tiny", gene_tokenizer=tokenizer).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "LayerNorm" not in name and name != "logit_scale":
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def make_adata(n_cells=24, seed=0):
    """Raw counts over the vocabulary genes plus 3 genes outside it; CELLxGENE-style obs columns."""
    rng = np.random.default_rng(seed)
    rates = rng.gamma(0.4, 3.0, size=(n_cells, N_GENES + 3))
    counts = rng.poisson(rates).astype(np.float32)
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    diseases = ["MONDO:0005061", "MONDO:0005097", "PATO:0000461", "unknown"]
    obs["disease_ontology_term_id"] = pd.Categorical([diseases[i % 4] for i in range(n_cells)])
    obs["my_terms"] = obs["disease_ontology_term_id"].astype(str)
    var = pd.DataFrame(index=GENES + ["OTHER1", "OTHER2", "OTHER3"])
    var["symbol"] = list(var.index)
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture(scope="module")
def annotated(model):
    adata = make_adata()
    assert tl.annotate(adata, model, DESCRIPTIONS, top_k=2) is None
    return adata


def test_fields_written(annotated):
    adata = annotated
    names = list(DESCRIPTIONS)
    assert isinstance(adata.obs[KEY].dtype, pd.CategoricalDtype)
    assert list(adata.obs[KEY].cat.categories) == names
    probs = adata.obsm[KEY + "_probs"]
    assert probs.shape == (adata.n_obs, len(names)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    best = probs.argmax(axis=1)
    assert (adata.obs[KEY].astype(str).to_numpy() == np.array(names)[best]).all()
    np.testing.assert_allclose(adata.obs[KEY + "_score"].to_numpy(), probs.max(axis=1), atol=1e-6)
    uns = adata.uns[KEY]
    assert uns["classes"] == names
    assert uns["texts"] == list(DESCRIPTIONS.values())
    params = uns["params"]
    assert params["alpha"] == 0.1 and params["top_k"] == 2 and params["mode"] == "fast"
    assert params["temperature"] == 0.05 and params["threshold"] is None and params["n_classes"] == 4
    assert uns["resolution"]["how"] == ["user description"] * 4
    assert uns["resolution"]["term_id"] == [""] * 4


def test_results_equal_the_tensor_level_scores(model, tokenizer, annotated):
    cells = tokenizer.encode(make_adata(), max_length=128)
    classes = encode_class_texts(model, DESCRIPTIONS)
    expected = zero_shot_scores(model, cells, classes, top_k=2)
    np.testing.assert_allclose(annotated.obsm[KEY + "_probs"], expected.scores, atol=1e-6)


def test_written_fields_survive_h5ad(annotated, tmp_path):
    path = tmp_path / "annotated.h5ad"
    annotated.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert (back.obs[KEY] == annotated.obs[KEY]).all()
    np.testing.assert_array_equal(back.obsm[KEY + "_probs"], annotated.obsm[KEY + "_probs"])
    assert back.uns[KEY]["params"]["mode"] == "fast"


def test_copy_returns_a_new_object_and_leaves_the_input_alone(model):
    adata = make_adata()
    before = adata.copy()
    result = tl.annotate(adata, model, DESCRIPTIONS, copy=True, key_added="pred")
    assert isinstance(result, ad.AnnData) and result is not adata
    assert "pred" in result.obs and "pred_score" in result.obs and "pred_probs" in result.obsm
    assert "pred" in result.uns
    assert list(adata.obs.columns) == list(before.obs.columns) and not adata.obsm and not adata.uns


def test_existing_key_is_overwritten(model):
    adata = make_adata()
    adata.obs[KEY] = "old"
    adata.uns[KEY] = {"stale": 1}
    tl.annotate(adata, model, DESCRIPTIONS, mode="official")
    assert set(adata.obs[KEY].cat.categories) == set(DESCRIPTIONS)
    assert "stale" not in adata.uns[KEY] and adata.uns[KEY]["params"]["mode"] == "official"
    assert adata.uns[KEY]["params"]["top_k"] == 4


def test_official_and_fast_top_k_equal_k_agree(model):
    official = tl.annotate(make_adata(), model, DESCRIPTIONS, mode="official", copy=True)
    fast = tl.annotate(make_adata(), model, DESCRIPTIONS, mode="fast", top_k=4, copy=True)
    clamped = tl.annotate(make_adata(), model, DESCRIPTIONS, mode="fast", top_k=99, copy=True)
    np.testing.assert_allclose(fast.obsm[KEY + "_probs"], official.obsm[KEY + "_probs"], atol=1e-5)
    np.testing.assert_allclose(clamped.obsm[KEY + "_probs"], fast.obsm[KEY + "_probs"], atol=1e-6)
    assert clamped.uns[KEY]["params"]["top_k"] == 4
    exact = tl.annotate(make_adata(), model, DESCRIPTIONS, mode="fast", top_k=1, exact_argmax=True, copy=True)
    assert (exact.obs[KEY] == official.obs[KEY]).all()


def test_abstention(model):
    adata = tl.annotate(make_adata(), model, DESCRIPTIONS, copy=True)
    scores = adata.obs[KEY + "_score"].to_numpy()
    threshold = float(np.median(scores))
    abstained = tl.annotate(make_adata(), model, DESCRIPTIONS, threshold=threshold, copy=True)
    assert list(abstained.obs[KEY].cat.categories) == list(DESCRIPTIONS) + ["unknown"]
    low = scores < threshold
    assert 0 < low.sum() < adata.n_obs
    assert (abstained.obs[KEY].astype(str).to_numpy()[low] == "unknown").all()
    kept = abstained.obs[KEY].astype(str).to_numpy()[~low]
    assert (kept == adata.obs[KEY].astype(str).to_numpy()[~low]).all()
    # The score column keeps the best class's score also for abstaining cells.
    np.testing.assert_allclose(abstained.obs[KEY + "_score"].to_numpy(), scores, atol=1e-7)
    none = tl.annotate(
        make_adata(), model, DESCRIPTIONS, threshold=0.0, unknown_label="unassigned", copy=True
    )
    assert not (none.obs[KEY] == "unassigned").any() and "unassigned" in none.obs[KEY].cat.categories
    everything = tl.annotate(make_adata(), model, DESCRIPTIONS, threshold=1.0, copy=True)
    assert (everything.obs[KEY] == "unknown").all()
    with pytest.raises(LangCellError, match="unknown_label"):
        tl.annotate(make_adata(), model, {**DESCRIPTIONS, "unknown": "no idea"}, threshold=0.5)



def test_abstention_on_the_scaled_margin(model):
    adata = tl.annotate(make_adata(), model, DESCRIPTIONS, copy=True)
    probs = adata.obsm[KEY + "_probs"].astype(np.float64)
    # By hand: best minus second best, over alpha + (1 - alpha)(e - 1)/(e + K - 1).
    ordered = np.sort(probs, axis=1)
    k, alpha = probs.shape[1], 0.1
    margin = (ordered[:, -1] - ordered[:, -2]) / (alpha + (1 - alpha) * (np.e - 1) / (np.e + k - 1))
    assert ((margin >= 0) & (margin <= 1)).all()
    threshold = float(np.median(margin))
    abstained = tl.annotate(make_adata(), model, DESCRIPTIONS, threshold=threshold, threshold_on="margin", copy=True)
    low = margin < threshold
    assert 0 < low.sum() < adata.n_obs
    called = abstained.obs[KEY].astype(str).to_numpy()
    assert (called[low] == "unknown").all()
    assert (called[~low] == adata.obs[KEY].astype(str).to_numpy()[~low]).all()
    assert abstained.uns[KEY]["params"]["threshold_on"] == "margin"
    assert adata.uns[KEY]["params"]["threshold_on"] == "score"  # the default: today's behaviour
    with pytest.raises(LangCellError, match="threshold_on"):
        tl.annotate(make_adata(n_cells=4), model, DESCRIPTIONS, threshold=0.5, threshold_on="entropy")


@pytest.mark.parametrize("n_classes", [2, 3, 8, 40])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.7, 1.0])
def test_the_margin_scale_is_the_largest_gap_the_formula_allows(n_classes, alpha):
    from langcell.inference.zero_shot import combine_scores, max_margin, scaled_margin

    rng = np.random.default_rng(n_classes)
    similarity = torch.tensor(rng.uniform(-1, 1, size=(2000, n_classes)))
    match = torch.tensor(rng.uniform(0, 1, size=(2000, n_classes)) ** rng.uniform(0.05, 20, size=(2000, 1)))
    scores = combine_scores(similarity, match, alpha=alpha)[2].numpy()
    margins = scaled_margin(scores, alpha)
    assert (margins >= 0).all() and (margins <= 1).all()
    # The extreme case reaches 1: one-hot similarity softmax, match probability 1 for one class, 0 elsewhere.
    extreme_sim = torch.full((1, n_classes), -1.0)
    extreme_sim[0, 0] = 1.0
    extreme_match = torch.zeros(1, n_classes, dtype=torch.float64)
    extreme_match[0, 0] = 1.0
    extreme = combine_scores(extreme_sim.double(), extreme_match, alpha=alpha, temperature=1e-3)[2].numpy()
    gap = np.sort(extreme[0])[-1] - np.sort(extreme[0])[-2]
    assert gap == pytest.approx(max_margin(n_classes, alpha), rel=1e-9)
    assert scaled_margin(extreme, alpha)[0] == pytest.approx(1.0)

def test_cell_type_names_are_resolved_through_the_cell_ontology(model):
    labels = ["B cells", "CD14+ Monocytes", "NK cells"]
    adata = tl.annotate(make_adata(), model, labels, copy=True)
    uns = adata.uns[KEY]
    assert uns["classes"] == labels and uns["params"]["aspect"] == "cell_type"
    texts, table = ontology.label_texts(labels)
    assert uns["texts"] == [texts[label] for label in labels]
    assert uns["resolution"]["term_id"] == table["term_id"].tolist()
    assert uns["resolution"]["term_id"][0] == "CL:0000236"


def test_classes_from_an_ontology_column(model):
    adata = tl.annotate(
        make_adata(), model, classes_from="disease_ontology_term_id", key_added="disease", copy=True
    )
    uns = adata.uns["disease"]
    terms = ["MONDO:0005061", "MONDO:0005097", "PATO:0000461"]  # "unknown" names no class
    assert uns["classes"] == terms
    assert uns["texts"] == [ontology.term_text(t, "disease") for t in terms]
    assert (
        uns["params"]["aspect"] == "disease" and uns["params"]["classes_from"] == "disease_ontology_term_id"
    )
    assert uns["resolution"]["term_label"][0] == "lung adenocarcinoma"
    assert set(adata.obs["disease"].cat.categories) == set(terms)
    # Same classes from a column whose name says nothing, with the aspect given; or as a term list.
    other = tl.annotate(
        make_adata(), model, classes_from="my_terms", aspect="disease", key_added="disease", copy=True
    )
    np.testing.assert_allclose(other.obsm["disease_probs"], adata.obsm["disease_probs"], atol=1e-6)
    listed = tl.annotate(make_adata(), model, terms, aspect="disease", key_added="disease", copy=True)
    np.testing.assert_allclose(listed.obsm["disease_probs"], adata.obsm["disease_probs"], atol=1e-6)
    with pytest.raises(LangCellError, match="aspect"):
        tl.annotate(make_adata(), model, classes_from="my_terms")
    with pytest.raises(LangCellError, match="no column"):
        tl.annotate(make_adata(), model, classes_from="tissue_ontology_term_id")


def test_counts_layer_and_gene_column_are_passed_to_the_tokenizer(model, annotated):
    adata = make_adata()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))  # normalised values: not counts
    adata.var_names = [f"id{i}" for i in range(adata.n_vars)]  # the names are in var["symbol"]
    tl.annotate(adata, model, DESCRIPTIONS, top_k=2, counts_layer="counts", gene_column="symbol")
    np.testing.assert_allclose(adata.obsm[KEY + "_probs"], annotated.obsm[KEY + "_probs"], atol=1e-6)
    assert adata.uns[KEY]["params"]["counts_layer"] == "counts"
    with pytest.raises(LangCellError):
        tl.annotate(adata, model, DESCRIPTIONS, gene_column="symbol")  # X holds log values


def test_progress_bar(model, capsys):
    tl.annotate(make_adata(n_cells=5), model, DESCRIPTIONS, progress=True)
    assert "zero-shot" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": []}, "no labels"),
        ({"labels": ["B cell", "T cell", "B cell"]}, "duplicated"),
        ({"labels": "B cell"}, "not one string"),
        ({"labels": {}}, "no labels"),
        ({"labels": None}, "exactly one"),
        ({"labels": DESCRIPTIONS, "classes_from": "disease_ontology_term_id"}, "exactly one"),
        ({"labels": DESCRIPTIONS, "alpha": -0.1}, "alpha"),
        ({"labels": DESCRIPTIONS, "alpha": 1.2}, "alpha"),
        ({"labels": DESCRIPTIONS, "top_k": 0}, "top_k"),
        ({"labels": DESCRIPTIONS, "mode": "quick"}, "mode"),
        ({"labels": DESCRIPTIONS, "threshold": 1.5}, "threshold"),
        ({"labels": DESCRIPTIONS, "threshold": 1.5, "threshold_on": "margin"}, "threshold"),
        ({"labels": DESCRIPTIONS, "threshold_on": "confidence"}, "threshold_on"),
        ({"labels": DESCRIPTIONS, "threshold": -0.1}, "threshold"),
        ({"labels": DESCRIPTIONS, "lca_margin": 1.5}, "lca_margin"),
        ({"labels": DESCRIPTIONS, "lca_margin": -0.2}, "lca_margin"),
        ({"labels": DESCRIPTIONS, "aspect": "colour"}, "aspect"),
        ({"labels": DESCRIPTIONS, "max_length": 0}, "max_length"),
        ({"labels": ["not a real cell type xyz"]}, "could not be resolved"),
        ({"labels": ["MONDO:0005061", "CL:0000236"], "aspect": "disease"}, "not a valid disease term"),
    ],
)
def test_bad_inputs(model, kwargs, message):
    labels = kwargs.pop("labels")
    with pytest.raises(LangCellError, match=message):
        tl.annotate(make_adata(n_cells=4), model, labels, **kwargs)


def test_model_without_gene_tokenizer():
    model = LangCell.from_config("tiny")
    with pytest.raises(LangCellError, match="no gene tokenizer"):
        tl.annotate(make_adata(n_cells=4), model, DESCRIPTIONS)


def test_no_gene_in_the_vocabulary(model):
    adata = make_adata(n_cells=4)
    adata.var_names = [f"unrelated{i}" for i in range(adata.n_vars)]
    with pytest.raises(LangCellError, match="vocabulary"):
        tl.annotate(adata, model, DESCRIPTIONS)


def test_not_an_anndata(model):
    with pytest.raises(LangCellError, match="AnnData"):
        tl.annotate(np.zeros((3, 3)), model, DESCRIPTIONS)


def test_copy_of_a_backed_anndata_is_annotated_and_the_file_is_left_alone(model, tmp_path):
    # anndata cannot copy() a backed AnnData without a new file name; copy=True reads it into memory.
    path = tmp_path / "cells.h5ad"
    make_adata().write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    annotated = tl.annotate(backed, model, DESCRIPTIONS, copy=True)
    assert not annotated.isbacked and annotated.obs[KEY].notna().all()
    assert KEY not in backed.obs
    in_memory = tl.annotate(ad.read_h5ad(path), model, DESCRIPTIONS, copy=True)
    assert annotated.obs[KEY].tolist() == in_memory.obs[KEY].tolist()


def test_long_calls_show_progress_by_default(model, capsys):
    # A biologist's call on many cells is never silent; progress=False silences it.
    tl.annotate(make_adata(), model, DESCRIPTIONS)
    assert "zero-shot" in capsys.readouterr().err
    tl.annotate(make_adata(), model, DESCRIPTIONS, progress=False)
    assert "zero-shot" not in capsys.readouterr().err


def test_confidence_fields_equal_an_independent_computation(annotated):
    probs = annotated.obsm[KEY + "_probs"].astype(np.float64)
    ordered = np.sort(probs, axis=1)[:, ::-1]
    np.testing.assert_allclose(annotated.obs[KEY + "_margin"], ordered[:, 0] - ordered[:, 1], atol=1e-6)
    entropy = np.array([-sum(p * np.log(p) for p in row if p > 0) for row in probs]) / np.log(probs.shape[1])
    np.testing.assert_allclose(annotated.obs[KEY + "_entropy"], entropy, atol=1e-6)
    assert "lca_margin" in annotated.uns[KEY]["params"] and KEY + "_lca" not in annotated.obs


def test_lca_answers_on_real_cell_ontology_terms(model):
    labels = ["CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell", "B cell"]
    adata = make_adata(n_cells=12)
    tl.annotate(adata, model, labels, lca_margin=1.0, threshold=0.0)
    probs = adata.obsm[KEY + "_probs"]
    order = np.argsort(-probs, axis=1, kind="stable")
    pair = {frozenset(labels[:2]): "mature alpha-beta T cell"}  # CL:0000791, their lowest common ancestor
    pair[frozenset([labels[0], "B cell"])] = pair[frozenset([labels[1], "B cell"])] = "lymphocyte"  # CL:0000542
    expected = [pair[frozenset([labels[a], labels[b]])] for a, b in order[:, :2]]
    assert adata.obs[KEY + "_lca"].astype(str).tolist() == expected
    adata = make_adata(n_cells=12)
    tl.annotate(adata, model, labels, lca_margin=0.0)  # no margin is below 0: every cell keeps its call
    assert (adata.obs[KEY + "_lca"].astype(str) == adata.obs[KEY].astype(str)).all()


def test_bad_lca_margin_writes_nothing(model):
    adata = make_adata(n_cells=4)
    columns = list(adata.obs.columns)
    with pytest.raises(LangCellError, match="lca_margin"):
        tl.annotate(adata, model, DESCRIPTIONS, lca_margin=2)
    assert list(adata.obs.columns) == columns and KEY not in adata.uns

# --------------------------------------------------------------------------------------------------
# Prompt ensembles


def test_prompt_ensembles_reach_the_scores_and_are_stored(model, tokenizer, annotated, tmp_path):
    from langcell.tl._annotate import stored_class_texts

    extra = {"B": ["cell type: B lymphocyte.", "an antibody-making cell"], "NK": ["cell type: NK cell."]}
    adata = make_adata()
    tl.annotate(adata, model, DESCRIPTIONS, texts=extra, top_k=2, progress=False)
    prompts = {name: [text, *extra.get(name, [])] for name, text in DESCRIPTIONS.items()}
    expected = zero_shot_scores(model, tokenizer.encode(make_adata(), max_length=128),
                                encode_class_texts(model, prompts), top_k=2)
    np.testing.assert_allclose(adata.obsm[KEY + "_probs"], expected.scores, atol=1e-6)
    assert not np.allclose(adata.obsm[KEY + "_probs"], annotated.obsm[KEY + "_probs"], atol=1e-4)
    uns = adata.uns[KEY]
    assert uns["texts"] == list(DESCRIPTIONS.values())  # the primary texts
    assert uns["params"]["n_prompts"] == sum(len(p) for p in prompts.values())
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert stored_class_texts(back.uns[KEY], "uns") == (list(prompts), list(prompts.values()))
    # One text per class stores no prompt table, and texts={} changes nothing.
    plain = tl.annotate(make_adata(), model, DESCRIPTIONS, texts={}, top_k=2, progress=False, copy=True)
    assert "prompts" not in plain.uns[KEY]
    np.testing.assert_array_equal(plain.obsm[KEY + "_probs"], annotated.obsm[KEY + "_probs"])


def test_prompt_ensemble_from_the_cell_ontology(model):
    adata = tl.annotate(make_adata(), model, ["B cell", "T cell"], prompt_ensemble=True, progress=False, copy=True)
    prompts = adata.uns[KEY]["prompts"]
    b_texts = [t for c, t in zip(prompts["class"], prompts["text"], strict=True) if c == "B cell"]
    assert b_texts == ontology.term_prompts("CL:0000236")
    assert adata.uns[KEY]["params"]["prompt_ensemble"] is True

def test_prior_em_corrects_the_similarity_part_with_priors_estimated_at_the_models_temperature(model, tokenizer):
    import warnings

    from langcell.inference.calibration import em_priors

    adata = make_adata(60, seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        annotated = tl.annotate(adata, model, DESCRIPTIONS, top_k=2, prior="em", copy=True, progress=False)
    stored = annotated.uns[KEY]
    assert stored["params"]["prior"] == "em"
    found = stored["prior"]
    assert set(found["priors"]) == set(DESCRIPTIONS) and sum(found["priors"].values()) == pytest.approx(1.0)
    # Independent computation from the tensor-level scores.
    cells = tokenizer.encode(adata)
    scores = zero_shot_scores(model, cells, encode_class_texts(model, list(DESCRIPTIONS.values()), list(DESCRIPTIONS)),
                              top_k=2)
    scale = float(model.logit_scale.exp())
    calibrated = np.exp(scores.similarity * scale) / np.exp(scores.similarity * scale).sum(1, keepdims=True)
    priors, corrected, _, converged = em_priors(calibrated.astype(np.float64))
    np.testing.assert_allclose(list(found["estimated"].values()), priors, rtol=1e-5, atol=1e-7)
    if found["status"] == "em":
        expected = 0.1 * corrected + 0.9 * scores.p_ctm
    else:  # refused (with a warning): the released scores unchanged
        assert any("falling back" in str(w.message) for w in caught)
        expected = scores.scores
    np.testing.assert_allclose(annotated.obsm[KEY + "_probs"], expected, rtol=1e-5, atol=1e-6)
    assert (annotated.obs[KEY].astype(str).to_numpy() == np.array(list(DESCRIPTIONS))[expected.argmax(1)]).all()
    plain = tl.annotate(adata, model, DESCRIPTIONS, top_k=2, copy=True, progress=False)
    assert "prior" not in plain.uns[KEY] and plain.uns[KEY]["params"]["prior"] == "uniform"
    with pytest.raises(LangCellError, match="prior must be one of"):
        tl.annotate(adata, model, DESCRIPTIONS, prior="balanced")

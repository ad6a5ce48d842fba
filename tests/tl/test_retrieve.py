"""Cell-text retrieval: the metrics against hand-written loops, and the AnnData functions on a tiny model."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from langcell import ontology
from langcell.data.tokenizer import GeneTokenizer
from langcell.errors import LangCellError
from langcell.evaluation.retrieval import retrieval_recall
from langcell.inference.embed import embed_cells
from langcell.metrics import cell_to_text_recall, retrieval_metrics, text_to_cell_metrics, top_k_indices
from langcell.models.config import LangCellConfig
from langcell.models.langcell import LangCell
from langcell.tl._retrieve import retrieve_cells, retrieve_texts

CBMC = Path(__file__).resolve().parents[3] / "shared" / "data" / "cbmc_citeseq_500genes.h5ad"
needs_cbmc = pytest.mark.skipif(not CBMC.is_file(), reason=f"{CBMC} is missing")
TYPES = ["B cell", "CD14-positive monocyte", "natural killer cell", "megakaryocyte"]


# --------------------------------------------------------------------------------------------------
# Metrics against plain loops


def ranked(values):
    """Indices sorted by value, descending, ties by index: written without numpy's sort."""
    return sorted(range(len(values)), key=lambda j: (-values[j], j))


def loop_cell_to_text(similarity, labels, k):
    hits, n = 0, 0
    for i, own in enumerate(labels):
        if own < 0:
            continue
        n += 1
        hits += own in ranked(list(similarity[i]))[:k]
    return hits / n


def loop_text_to_cell(similarity, labels, k):
    recalls, precisions = [], []
    for t in sorted(set(int(v) for v in labels if v >= 0)):
        top = ranked([similarity[i][t] for i in range(len(labels))])[:k]
        found = sum(1 for i in top if labels[i] == t)
        recalls.append(1.0 if found else 0.0)
        precisions.append(found / len(top))
    return sum(recalls) / len(recalls), sum(precisions) / len(precisions)


@pytest.mark.parametrize("seed", range(8))
def test_metrics_equal_hand_written_loops(seed):
    rng = np.random.default_rng(seed)
    n_cells, n_texts = int(rng.integers(3, 30)), int(rng.integers(1, 12))
    # Few distinct values, so that ties are common and their order matters.
    similarity = rng.integers(-3, 4, size=(n_cells, n_texts)).astype(np.float32) / 3
    labels = rng.integers(-1, n_texts, size=n_cells)
    labels[0] = 0  # at least one labelled cell
    ks = (1, 2, 5, 40)
    recall = cell_to_text_recall(similarity, labels, ks)
    text_side = text_to_cell_metrics(similarity, labels, ks)
    flat = retrieval_metrics(similarity, labels, ks)
    for k in ks:
        assert recall[k] == pytest.approx(loop_cell_to_text(similarity, labels, k))
        loop_recall, loop_precision = loop_text_to_cell(similarity, labels, k)
        assert text_side["recall"][k] == pytest.approx(loop_recall)
        assert text_side["precision"][k] == pytest.approx(loop_precision)
        assert flat[f"cell_to_text_recall@{k}"] == recall[k]
        assert flat[f"text_to_cell_precision@{k}"] == text_side["precision"][k]
    assert recall[40] == 1.0  # k beyond the number of texts


def test_metrics_on_a_matrix_worked_by_hand():
    similarity = np.array(
        [
            [0.9, 0.1, 0.0],  # cell 0, label 0: own text first
            [0.5, 0.5, 0.2],  # cell 1, label 1: tie with text 0, which has the lower index -> rank 1
            [0.3, 0.2, 0.1],  # cell 2, label 2: rank 2
            [0.8, 0.0, 0.0],  # cell 3, no label
        ]
    )
    labels = np.array([0, 1, 2, -1])
    assert cell_to_text_recall(similarity, labels, (1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}
    # Text 0 ranks cells 0, 3, 1, 2: top-1 is cell 0 (a hit); top-2 holds one of its cells.
    # Text 1 ranks 1, 2, 0, 3: hit at 1. Text 2 ranks 1, 2, 0, 3: cell 2 at rank 2.
    metrics = text_to_cell_metrics(similarity, labels, (1, 2))
    assert metrics["recall"] == {1: 2 / 3, 2: 1.0}
    assert metrics["precision"] == {1: pytest.approx(2 / 3), 2: pytest.approx((0.5 + 0.5 + 0.5) / 3)}


def test_top_k_indices_orders_ties_by_index_and_clamps():
    scores = np.array([[0.1, 0.5, 0.5, 0.2], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(top_k_indices(scores, 3), [[1, 2, 3], [0, 1, 2]])
    assert top_k_indices(scores, 10).shape == (2, 4)


def test_metric_inputs_are_checked():
    similarity = np.zeros((3, 2))
    with pytest.raises(LangCellError, match="no cell has a label"):
        cell_to_text_recall(similarity, np.array([-1, -1, -1]))
    with pytest.raises(LangCellError, match=r"\[-1, 2\)"):
        text_to_cell_metrics(similarity, np.array([0, 2, 1]))
    with pytest.raises(LangCellError, match="positive integer"):
        retrieval_metrics(similarity, np.array([0, 1, 1]), ks=(0, 1))
    with pytest.raises(LangCellError, match="finite"):
        top_k_indices(np.array([[np.nan, 1.0]]), 1)


# --------------------------------------------------------------------------------------------------
# AnnData functions on a tiny model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cells_and_model():
    full = ad.read_h5ad(CBMC)
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.permutation(np.flatnonzero(full.obs["cell_type"] == t))[:8] for t in TYPES])
    adata = full[np.sort(rows)].copy()
    tokenizer = GeneTokenizer.fit(adata, gene_id_kind="custom")
    config = LangCellConfig.preset("tiny")
    config.cell.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    model = LangCell.from_config(config, gene_tokenizer=tokenizer).eval()
    return adata, model


def embeddings_of(adata, model, texts):
    cells = model.gene_tokenizer.encode(adata, max_length=128)
    cell_emb = embed_cells(model, cells)
    with torch.no_grad():
        text_emb = model.encode_texts(list(texts)).numpy()
    return cell_emb, text_emb


@needs_cbmc
def test_retrieve_cells_matches_brute_force(cells_and_model, tmp_path):
    adata, model = cells_and_model
    texts = {"b": "cell type: B cell.", "mono": "a monocyte", "nk": "natural killer cell"}
    out = retrieve_cells(adata, model, texts, top_n=4, copy=True)
    assert "langcell_retrieval" not in adata.uns
    result = out.uns["langcell_retrieval"]
    cell_emb, text_emb = embeddings_of(adata, model, texts.values())
    similarity = cell_emb @ text_emb.T
    for t in range(3):
        expected = sorted(range(adata.n_obs), key=lambda i: (-similarity[i, t], i))[:4]
        np.testing.assert_allclose(result["scores"][t], similarity[expected, t], atol=1e-5)
        # The brute-force order can swap cells whose similarities differ by float noise only.
        assert np.all(np.diff(result["scores"][t]) <= 1e-7)
        np.testing.assert_allclose(similarity[result["cell_indices"][t], t], result["scores"][t], atol=1e-5)
        assert list(result["cell_names"][t]) == list(adata.obs_names[result["cell_indices"][t]])
    assert result["names"] == ["b", "mono", "nk"] and result["texts"] == list(texts.values())
    assert result["params"]["reused_embeddings"] is False and result["params"]["top_n"] == 4
    out.write_h5ad(tmp_path / "retrieved.h5ad")
    back = ad.read_h5ad(tmp_path / "retrieved.h5ad").uns["langcell_retrieval"]
    np.testing.assert_array_equal(back["cell_indices"], result["cell_indices"])


@needs_cbmc
def test_stored_embeddings_are_reused_and_flagged(cells_and_model):
    adata, model = cells_and_model
    adata = adata.copy()
    width = model.config.projection_dim
    _, text_emb = embeddings_of(adata, model, ["cell type: B cell."])
    # Planted embeddings: cell 5 is the text itself, the rest point elsewhere, so cell 5 must come first.
    rng = np.random.default_rng(0)
    planted = rng.normal(size=(adata.n_obs, width)).astype(np.float32)
    planted -= np.outer(planted @ text_emb[0], text_emb[0])
    planted[5] = 3.0 * text_emb[0]  # not unit length: rows are normalised before use
    adata.obsm["X_langcell"] = planted
    retrieve_cells(adata, model, ["cell type: B cell."], top_n=2)
    result = adata.uns["langcell_retrieval"]
    assert result["params"]["reused_embeddings"] is True
    assert result["cell_indices"][0, 0] == 5 and result["scores"][0, 0] == pytest.approx(1.0, abs=1e-5)
    computed = retrieve_cells(adata, model, ["cell type: B cell."], use_rep=None, copy=True)
    assert computed.uns["langcell_retrieval"]["params"]["reused_embeddings"] is False
    adata.obsm["X_langcell"] = planted[:, :10]
    with pytest.raises(LangCellError, match="another model"):
        retrieve_cells(adata, model, ["B cell"])


@needs_cbmc
def test_retrieve_texts_writes_scores_and_the_best_text(cells_and_model):
    adata, model = cells_and_model
    adata = adata.copy()
    labels = ["B cell", "natural killer cell", "megakaryocyte"]
    retrieve_texts(adata, model, labels, top_n=2, as_labels=True, key_added="rt")
    described, _ = ontology.label_texts(labels)
    texts = [described[label] for label in labels]
    cell_emb, text_emb = embeddings_of(adata, model, texts)
    similarity = cell_emb @ text_emb.T
    np.testing.assert_allclose(adata.obsm["rt_scores"], similarity, atol=1e-5)
    top = adata.obsm["rt_top"]
    assert top.shape == (adata.n_obs, 2)
    np.testing.assert_array_equal(top[:, 0], adata.obsm["rt_scores"].argmax(axis=1))
    chosen = adata.obsm["rt_scores"][np.arange(adata.n_obs)[:, None], top]
    assert np.all(chosen[:, 0] >= chosen[:, 1])
    assert list(adata.obs["rt"].cat.categories) == labels
    assert list(adata.obs["rt"]) == [labels[j] for j in top[:, 0]]
    np.testing.assert_allclose(adata.obs["rt_score"], chosen[:, 0], rtol=1e-6)
    assert adata.uns["rt"]["texts"] == texts and adata.uns["rt"]["names"] == labels
    with pytest.raises(LangCellError, match="not a dict"):
        retrieve_texts(adata, model, {"b": "B cell"}, as_labels=True)


@needs_cbmc
def test_recall_with_planted_embeddings_is_perfect(cells_and_model):
    # Each cell's embedding is its own type's text embedding plus a little noise: every metric is 1.
    adata, model = cells_and_model
    adata = adata.copy()
    terms = adata.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    distinct = sorted(set(terms))
    texts = [ontology.term_text(t) for t in distinct]
    _, text_emb = embeddings_of(adata, model, texts)
    rng = np.random.default_rng(1)
    planted = text_emb[[distinct.index(t) for t in terms]] + 1e-4 * rng.normal(size=(adata.n_obs, text_emb.shape[1]))
    adata.obsm["X_langcell"] = planted.astype(np.float32)
    result = retrieval_recall(adata, model, "cell_type_ontology_term_id", ks=(1, 5))
    assert result["reused_embeddings"] is True and result["n_cells"] == adata.n_obs
    assert sorted(result["texts"]) == sorted(texts)
    for key in ("cell_to_text_recall@1", "text_to_cell_recall@1", "text_to_cell_precision@1",
                "text_to_cell_precision@5"):
        assert result[key] == pytest.approx(1.0), key
    # The same cells by name: the labels resolve to the same Cell Ontology texts.
    by_name = retrieval_recall(adata, model, "cell_type", ks=(1, 5))
    assert sorted(by_name["texts"]) == sorted(texts)
    assert by_name["cell_to_text_recall@1"] == pytest.approx(1.0)


@needs_cbmc
def test_recall_computed_embeddings_equal_the_metric_functions(cells_and_model):
    adata, model = cells_and_model
    adata = adata.copy()
    adata.obs["label"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[adata.obs_names[:3], "label"] = "unknown"
    own = {"B cell": "B lymphocytes make antibodies"}
    result = retrieval_recall(adata, model, "label", ks=(1, 2), texts=own)
    assert result["n_excluded"] == 3 and result["n_cells"] == adata.n_obs - 3
    assert "B lymphocytes make antibodies" in result["texts"]
    kept = adata[3:].copy()
    labels = kept.obs["label"].to_numpy()
    text_of = {label: own.get(label) or ontology.label_texts([label])[0][label] for label in set(labels)}
    order = result["texts"]
    cell_emb, text_emb = embeddings_of(kept, model, order)
    codes = np.array([order.index(text_of[label]) for label in labels])
    expected = retrieval_metrics(cell_emb @ text_emb.T, codes, (1, 2))
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key



@needs_cbmc
def test_recall_at_k_of_at_least_the_number_of_texts_warns_and_leaves_the_default_report(cells_and_model):
    adata, model = cells_and_model
    n_texts = adata.obs["cell_type"].nunique()
    assert 1 < n_texts <= 5  # so that the default ks (1, 5, 10) hold k >= the number of texts
    trivial = [k for k in (1, 5, 10) if k >= n_texts]
    with pytest.warns(UserWarning) as caught:
        default = retrieval_recall(adata, model, "cell_type", progress=False)
    messages = [str(w.message) for w in caught if "by construction" in str(w.message)]
    assert len(messages) == 1
    assert f"k={', '.join(map(str, trivial))}" in messages[0] and f"only {n_texts} candidate texts" in messages[0]
    assert default["ks_left_out"] == trivial and default["n_texts"] == n_texts
    assert {f"cell_to_text_recall@{k}" for k in trivial}.isdisjoint(default)
    assert "cell_to_text_recall@1" in default and "text_to_cell_recall@10" in default
    # Asked for explicitly, they are kept (1.0 whatever the model), with the same warning.
    with pytest.warns(UserWarning, match="by construction"):
        explicit = retrieval_recall(adata, model, "cell_type", ks=(1, 5, 10), progress=False)
    assert explicit["ks_left_out"] == []
    assert all(explicit[f"cell_to_text_recall@{k}"] == 1.0 for k in trivial)
    assert {k: v for k, v in explicit.items() if k not in ("ks_left_out",) and "@" in k and
            not any(k == f"cell_to_text_recall@{t}" for t in trivial)} == {k: v for k, v in default.items() if "@" in k}

@needs_cbmc
def test_bad_input_is_refused(cells_and_model):
    adata, model = cells_and_model
    with pytest.raises(LangCellError, match="no column 'type'"):
        retrieval_recall(adata, model, "type")
    unknown = adata.copy()
    unknown.obs["all_unknown"] = "unknown"
    with pytest.raises(LangCellError, match="no usable label"):
        retrieval_recall(unknown, model, "all_unknown")
    with pytest.raises(LangCellError, match="not one string"):
        retrieve_cells(adata, model, "B cell")
    with pytest.raises(LangCellError, match="no texts"):
        retrieve_texts(adata, model, [])
    with pytest.raises(LangCellError, match="repeated"):
        retrieve_cells(adata, model, ["B cell", "B cell"])
    with pytest.raises(LangCellError, match="top_n"):
        retrieve_cells(adata, model, ["B cell"], top_n=0)
    with pytest.raises(LangCellError, match="ks"):
        retrieval_recall(adata, model, "cell_type", ks=())

"""langcell.tl.explain: a planted signal must be found, the fields and the refusals."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from langcell import tl
from langcell.data.batching import pad_sequences
from langcell.data.tokenizer import GeneTokenizer
from langcell.errors import LangCellError
from langcell.inference.zero_shot import encode_class_texts
from langcell.models import LangCell

pytestmark = pytest.mark.usefixtures("one_thread")

N_GENES = 97  # the tiny preset's vocabulary
GENES = [f"GENE{i}" for i in range(N_GENES)]
PLANTED = "GENE0"
CLASSES = {"alpha": "cell type: alpha cell. A cell that expresses the planted gene.",
           "zeta": "cell type: zeta cell. A cell without it."}
KEY = "langcell_cell_type"


def planted_cells(n_cells, seed):
    """Cells expressing ~25 random genes; half of them also express PLANTED, which alone decides the class.

    PLANTED's counts are drawn like every other gene's, so its rank in a cell is random: only its
    presence tells the classes apart.
    """
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_cells, N_GENES), dtype=np.float32)
    has_gene = np.arange(n_cells) % 2 == 0
    for i in range(n_cells):
        genes = rng.choice(np.arange(1, N_GENES), size=25, replace=False)
        counts[i, genes] = rng.integers(1, 20, size=genes.size)
        if has_gene[i]:
            counts[i, 0] = rng.integers(1, 20)
    obs = pd.DataFrame({"truth": np.where(has_gene, "alpha", "zeta")}, index=[f"c{i}" for i in range(n_cells)])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=GENES))


@pytest.fixture(scope="module")
def tokenizer():
    return GeneTokenizer(GENES, np.ones(N_GENES), gene_id_kind="custom", organism=None)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny model (hidden 32, 2 layers) trained until its cell embeddings separate the classes by PLANTED."""
    torch.manual_seed(0)
    model = LangCell.from_config("tiny", gene_tokenizer=tokenizer)
    text_embeddings = encode_class_texts(model, CLASSES).embeddings.clone()  # out of inference mode
    train = planted_cells(256, seed=1)
    sequences = list(_sequences(tokenizer.encode(train)))
    labels = torch.as_tensor((train.obs["truth"] == "zeta").to_numpy().astype(np.int64))
    parameters = [*model.cell_encoder.parameters(), *model.cell_proj.parameters()]
    optimiser = torch.optim.Adam(parameters, lr=2e-3)
    model.train()
    generator = np.random.default_rng(0)
    for _ in range(100):
        rows = generator.choice(len(sequences), size=32, replace=False)
        ids, mask = pad_sequences([sequences[i] for i in rows], 0)
        embeddings = model.cell_embeddings({"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask)})
        logits = embeddings @ text_embeddings.T / 0.05
        loss = F.cross_entropy(logits, labels[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def _sequences(cells):
    for i in range(len(cells)):
        yield cells[i]


@pytest.mark.slow
def test_the_gene_that_alone_decides_the_class_ranks_first(trained):
    cells = planted_cells(80, seed=7)  # cells the model was not trained on
    # alpha=1: the decision is the similarity, which is what explain attributes (the CTM head is untrained).
    tl.annotate(cells, trained, CLASSES, alpha=1.0, progress=False)
    accuracy = (cells.obs[KEY].astype(str) == cells.obs["truth"]).mean()
    assert accuracy > 0.95  # the model did learn the planted rule; otherwise the test would prove nothing
    tl.explain(cells, trained, n_genes=3, progress=False)
    table = tl.explanation_table(cells)
    alpha = table[table["class"] == "alpha"].sort_values("rank")
    assert alpha["gene"].iloc[0] == PLANTED
    # Not a fluke of averaging: in most alpha cells the planted gene is among the cell's own top 3 of its
    # 26 genes (chance: 3/26), and it stands far above the runner-up.
    assert alpha["top_fraction"].iloc[0] > 0.6
    assert alpha["importance"].iloc[0] > 3 * alpha["importance"].iloc[1]
    top = cells.obs[KEY + "_explain_top_genes"].str.split(";")
    assert top[cells.obs[KEY] == "alpha"].map(lambda genes: PLANTED in genes).mean() > 0.6


@pytest.fixture(scope="module")
def random_model(tokenizer):
    """An untrained model: enough for the refusals (which must come before any work)."""
    torch.manual_seed(0)
    return LangCell.from_config("tiny", gene_tokenizer=tokenizer).eval()


def annotate_with_abstentions(model, n_cells=24):
    cells = planted_cells(n_cells, seed=3)
    scores = tl.annotate(cells, model, CLASSES, alpha=1.0, progress=False, copy=True).obs[KEY + "_score"]
    # A threshold that makes about a quarter of the cells abstain.
    tl.annotate(cells, model, CLASSES, alpha=1.0, threshold=float(np.quantile(scores, 0.25)), progress=False)
    return cells


@pytest.fixture()
def annotated(random_model):
    return annotate_with_abstentions(random_model)


@pytest.fixture()
def annotated_trained(trained):
    cells = annotate_with_abstentions(trained)
    assert (cells.obs[KEY] == "unknown").any() and len(set(cells.obs[KEY]) - {"unknown"}) == 2
    return cells


@pytest.mark.slow
def test_fields_and_table(annotated_trained, trained):
    cells = annotated_trained
    explained = tl.explain(cells, trained, n_genes=4, progress=False, key_added="why", copy=True)
    assert "why" not in cells.uns and explained is not cells
    entry = explained.uns["why"]
    assert entry["params"]["n_genes"] == 4 and entry["params"]["key"] == KEY
    table = tl.explanation_table(explained, "why")
    predicted = cells.obs[KEY].astype(str)
    for name, rows in table.groupby("class"):
        assert list(rows["rank"]) == [1, 2, 3, 4]
        assert (np.diff(rows["importance"].to_numpy()) <= 0).all()
        assert (rows["importance"] >= rows["mean_attribution"].abs() - 1e-12).all()
        assert (rows["n_cells"] == (predicted == name).sum()).all()
        assert ((rows["top_fraction"] >= 0) & (rows["top_fraction"] <= 1)).all()
    # Abstaining cells ("unknown") are not explained.
    per_cell = explained.obs["why_top_genes"]
    assert ((per_cell == "") == (predicted == "unknown")).all()
    assert per_cell[predicted != "unknown"].str.split(";").map(len).eq(4).all()


@pytest.mark.slow
def test_mean_attribution_is_the_mean_over_the_class_cells(annotated_trained, trained, tokenizer):
    """The table's numbers recomputed from the tensor-level attributions, cell by cell."""
    from langcell.inference.explain import contrast_targets, token_attributions

    cells, random_model = annotated_trained, trained
    tl.explain(cells, random_model, n_genes=97, progress=False)
    table = tl.explanation_table(cells)
    names = list(CLASSES)
    predicted = cells.obs[KEY].astype(str).to_numpy()
    keep = np.flatnonzero(predicted != "unknown")
    tokens = tokenizer.encode(cells[keep])
    classes = encode_class_texts(random_model, CLASSES)
    index = torch.as_tensor([names.index(p) for p in predicted[keep]])
    values = token_attributions(random_model, tokens, contrast_targets(classes.embeddings, index).numpy())
    for name in names:
        sums, magnitudes = {}, {}
        members = [i for i in range(len(keep)) if predicted[keep[i]] == name]
        for i in members:
            for token, value in zip(tokens[i][1:], values[i][1:], strict=True):
                sums[GENES[token - 2]] = sums.get(GENES[token - 2], 0.0) + value
                magnitudes[GENES[token - 2]] = magnitudes.get(GENES[token - 2], 0.0) + abs(value)
        rows = table[table["class"] == name].set_index("gene")
        for gene, total in sums.items():
            assert rows.loc[gene, "mean_attribution"] == pytest.approx(total / len(members), rel=1e-5, abs=1e-9)
            assert rows.loc[gene, "importance"] == pytest.approx(magnitudes[gene] / len(members), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("n_genes", [0, -3, 2.5, True, "20"])
def test_n_genes_below_one_is_refused(annotated, random_model, n_genes):
    _refused(annotated, random_model, "n_genes", n_genes=n_genes)


def test_annotate_not_run_is_refused(random_model):
    cells = planted_cells(6, seed=2)
    _refused(cells, random_model, "run tl.annotate first")


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(annotated, random_model):
    other = LangCell.from_config("tiny").eval()
    other.gene_tokenizer = GeneTokenizer(GENES[:50], np.ones(50), gene_id_kind="custom", organism=None)
    _refused(annotated, other, "do not belong together")


def test_data_sharing_no_gene_with_the_vocabulary_is_refused(annotated, random_model):
    cells = annotated.copy()
    cells.var_names = [f"OTHER{i}" for i in range(cells.n_vars)]
    _refused(cells, random_model, "vocabulary")


def _refused(cells, model, message, **kwargs):
    before_obs, before_uns = list(cells.obs.columns), set(cells.uns)
    with pytest.raises(LangCellError, match=message):
        tl.explain(cells, model, progress=False, **kwargs)
    assert list(cells.obs.columns) == before_obs and set(cells.uns) == before_uns

"""Zero-shot scoring: the released formula against a plain pair-by-pair computation, fast vs official."""

import math

import numpy as np
import pytest
import torch

from langcell.errors import LangCellError
from langcell.inference.zero_shot import (
    ClassTexts,
    check_alpha,
    check_top_k,
    combine_scores,
    encode_class_texts,
    uncertified_cells,
    zero_shot_scores,
)
from langcell.models import LangCell

TEXTS = {
    "B cell": "cell type: B cell. A lymphocyte of B lineage.",
    "T cell": "cell type: T cell.",
    "monocyte": "cell type: monocyte. A myeloid cell in the blood.",
    "NK cell": "cell type: natural killer cell. A lymphocyte that kills tumour cells unprompted.",
    "platelet": "platelet",
    "erythrocyte": "cell type: erythrocyte. A red blood cell that carries oxygen.",
    "dendritic cell": "cell type: dendritic cell.",
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = LangCell.from_config("tiny").eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # Large random weights: similarities and match probabilities then differ between cells and
        # classes, so that the comparisons below are not between near-constant numbers.
        for name, parameter in model.named_parameters():
            if "LayerNorm" not in name and name != "logit_scale":
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def cells():
    """Ragged token sequences (<cls> first) of 13 cells, 3 to 60 tokens, vocab of the tiny preset."""
    rng = np.random.default_rng(0)
    lengths = [60, 3, 17, 41, 9, 33, 25, 58, 12, 5, 47, 20, 38]
    sequences = []
    for length in lengths:
        genes = rng.choice(np.arange(2, 99), size=length - 1, replace=False)
        sequences.append(np.concatenate([[99], genes]).astype(np.int64))
    return sequences


@pytest.fixture(scope="module")
def classes(model):
    return encode_class_texts(model, TEXTS)


def plain_scores(model, sequences, texts, alpha=0.1):
    """The released computation one (cell, class) pair at a time, no batching, the formula by hand."""
    scores, match = [], []
    with torch.no_grad():
        text_embeddings = [model.encode_texts([text])[0] for text in texts]
        for sequence in sequences:
            ids = torch.as_tensor(sequence)[None]
            mask = torch.ones_like(ids)
            cell_embedding, states = model.encode_cells({"input_ids": ids, "attention_mask": mask})
            cos = [float(cell_embedding[0] @ t) for t in text_embeddings]
            probs = []
            for text in texts:
                logits = model.match_logits(states, mask, [text])[0, 0]
                no, yes = float(logits[0]), float(logits[1])
                probs.append(math.exp(yes) / (math.exp(no) + math.exp(yes)))
            sim_den = sum(math.exp(c / 0.05) for c in cos)
            ctm_den = sum(math.exp(p) for p in probs)
            scores.append(
                [
                    alpha * math.exp(c / 0.05) / sim_den + (1 - alpha) * math.exp(p) / ctm_den
                    for c, p in zip(cos, probs, strict=True)
                ]
            )
            match.append(probs)
    return np.array(scores), np.array(match)


def test_official_mode_equals_the_plain_pairwise_computation(model, cells, classes):
    expected, expected_match = plain_scores(model, cells, list(TEXTS.values()))
    # A small budget: several batches of mixed lengths, padding inside each.
    result = zero_shot_scores(model, cells, classes, mode="official", max_tokens=100)
    assert result.classes == list(TEXTS)
    np.testing.assert_allclose(result.scores, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(result.match_prob, expected_match, atol=1e-5, rtol=0)
    np.testing.assert_allclose(result.scores.sum(axis=1), 1.0, atol=1e-5)
    assert result.fully_scored.all()
    # The numbers vary: the comparison above is not between constants.
    assert np.ptp(expected_match) > 0.05 and np.ptp(result.similarity) > 0.05



@pytest.mark.parametrize("mode", ["fast", "official"])
def test_alpha_one_skips_the_matching_head_and_keeps_the_scores(model, cells, classes, mode):
    """alpha = 1 gives CTM weight 0: its head never runs, and the scores are those of the formula."""
    calls = []
    hook = model.ctm_head.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
    try:
        similarity_only = zero_shot_scores(model, cells, classes, mode=mode, alpha=1.0, max_tokens=100)
        assert calls == []
        blended = zero_shot_scores(model, cells, classes, mode=mode, alpha=0.5, max_tokens=100)
        assert calls, "the hook sees the matching head when its weight is not 0"
    finally:
        hook.remove()
    expected, _ = plain_scores(model, cells, list(TEXTS.values()), alpha=1.0)
    np.testing.assert_allclose(similarity_only.scores, expected, atol=1e-5, rtol=0)
    # Exactly what 1.0 * p_sim + 0.0 * p_ctm gave when CTM ran.
    np.testing.assert_array_equal(similarity_only.scores, similarity_only.p_sim)
    np.testing.assert_array_equal(similarity_only.similarity, blended.similarity)
    assert np.isnan(similarity_only.match_prob).all() and not similarity_only.fully_scored.any()
    np.testing.assert_array_equal(similarity_only.predicted, expected.argmax(axis=1))

def test_fast_with_top_k_equal_to_k_is_official(model, cells, classes):
    official = zero_shot_scores(model, cells, classes, mode="official")
    fast = zero_shot_scores(model, cells, classes, mode="fast", top_k=len(TEXTS))
    for name in ("similarity", "match_prob", "p_sim", "p_ctm", "scores", "cell_embeddings"):
        np.testing.assert_allclose(
            getattr(fast, name), getattr(official, name), atol=1e-5, rtol=0, err_msg=name
        )
    assert fast.fully_scored.all()
    # A top_k above K is clamped to K: the same numbers.
    clamped = zero_shot_scores(model, cells, classes, mode="fast", top_k=50)
    np.testing.assert_allclose(clamped.scores, fast.scores, atol=1e-6)


def test_fast_scores_only_the_top_k_and_treats_the_rest_as_probability_zero(model, cells, classes):
    top_k = 2
    official = zero_shot_scores(model, cells, classes, mode="official")
    fast = zero_shot_scores(model, cells, classes, mode="fast", top_k=top_k)
    top = np.argsort(-official.similarity, axis=1, kind="stable")[:, :top_k]
    in_top = np.zeros_like(official.scores, dtype=bool)
    np.put_along_axis(in_top, top, True, axis=1)
    assert (~np.isnan(fast.match_prob) == in_top).all()
    np.testing.assert_allclose(fast.match_prob[in_top], official.match_prob[in_top], atol=1e-5)
    assert not fast.fully_scored.any()
    # The formula by hand with the unscored match probabilities set to 0.
    filled = np.where(in_top, official.match_prob, 0.0)
    p_sim = np.exp(official.similarity / 0.05)
    p_sim /= p_sim.sum(axis=1, keepdims=True)
    p_ctm = np.exp(filled) / np.exp(filled).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(fast.scores, 0.1 * p_sim + 0.9 * p_ctm, atol=1e-5)
    # The fast prediction is always one of the top_k classes by similarity.
    assert in_top[np.arange(len(cells)), fast.predicted].all()


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_fast_with_exact_argmax_keeps_the_official_prediction(model, cells, classes, top_k):
    official = zero_shot_scores(model, cells, classes, mode="official")
    fast = zero_shot_scores(model, cells, classes, mode="fast", top_k=top_k, exact_argmax=True)
    np.testing.assert_array_equal(fast.predicted, official.predicted)
    # Cells scored in full carry the official numbers.
    rows = fast.fully_scored
    np.testing.assert_allclose(fast.scores[rows], official.scores[rows], atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_plain_fast_mode_says_which_answers_are_certified(model, cells, classes, top_k):
    # alpha = 0.9: the similarity dominates, so some answers can be certified even with random weights.
    official = zero_shot_scores(model, cells, classes, mode="official", alpha=0.9)
    fast = zero_shot_scores(model, cells, classes, mode="fast", top_k=top_k, alpha=0.9)
    exact = zero_shot_scores(model, cells, classes, mode="fast", top_k=top_k, alpha=0.9, exact_argmax=True)
    # The certificate, recomputed from the fast result's own numbers.
    expected = ~uncertified_cells(torch.tensor(fast.p_sim), torch.tensor(fast.match_prob), alpha=0.9).numpy()
    np.testing.assert_array_equal(fast.certified, expected)
    assert 0 < fast.n_uncertified < len(cells) and fast.n_uncertified == int((~expected).sum())
    # Certified answers are the official ones; exact_argmax re-scores exactly the others.
    assert (fast.predicted[fast.certified] == official.predicted[fast.certified]).all()
    np.testing.assert_array_equal(exact.fully_scored, ~fast.certified)
    assert exact.certified.all() and official.certified.all() and exact.n_uncertified == 0


def test_uncertified_cells_is_sound_and_not_vacuous():
    rng = np.random.default_rng(3)
    n_cells, n_classes, top_k, alpha = 400, 6, 2, 0.1
    # Peaked similarities and spread match probabilities, as a trained model gives.
    similarity = rng.normal(0, 0.08, (n_cells, n_classes))
    match = rng.uniform(0, 1, (n_cells, n_classes))
    match[np.arange(n_cells), similarity.argmax(axis=1)] = rng.uniform(0.8, 1.0, n_cells)
    top = np.argsort(-similarity, axis=1)[:, :top_k]
    scored = np.zeros_like(match, dtype=bool)
    np.put_along_axis(scored, top, True, axis=1)
    partial = np.where(scored, match, np.nan)
    p_sim = torch.softmax(torch.tensor(similarity) / 0.05, dim=1)
    unsure = uncertified_cells(p_sim, torch.tensor(partial), alpha=alpha).numpy()
    assert 0 < unsure.sum() < n_cells
    fast = (
        combine_scores(torch.tensor(similarity), torch.tensor(partial), alpha=alpha)[2].numpy().argmax(axis=1)
    )
    # Certified cells keep their prediction whatever the unscored probabilities are: try the corners
    # (all 0, all 1, each one alone at 1) and random draws.
    trials = [np.zeros(n_classes), np.ones(n_classes)] + [np.eye(n_classes)[j] for j in range(n_classes)]
    trials += list(rng.uniform(0, 1, (50, n_classes)))
    for unscored_values in trials:
        full = np.where(scored, match, unscored_values[None, :])
        official = combine_scores(torch.tensor(similarity), torch.tensor(full), alpha=alpha)[2].numpy()
        assert (official.argmax(axis=1)[~unsure] == fast[~unsure]).all()
    # With every class scored there is nothing left to doubt.
    assert not uncertified_cells(p_sim, torch.tensor(match), alpha=alpha).any()


def test_combine_scores_matches_numpy():
    similarity = torch.tensor([[0.2, -0.1, 0.05], [0.0, 0.0, 0.3]])
    match = torch.tensor([[0.9, float("nan"), 0.1], [0.5, 0.2, 0.7]])
    p_sim, p_ctm, scores = combine_scores(similarity, match, alpha=0.25, temperature=0.1)
    sim = np.exp(similarity.numpy() / 0.1)
    filled = np.nan_to_num(match.numpy(), nan=0.0)
    ctm = np.exp(filled)
    expected = 0.25 * sim / sim.sum(1, keepdims=True) + 0.75 * ctm / ctm.sum(1, keepdims=True)
    np.testing.assert_allclose(scores.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(p_sim.sum(1).numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(p_ctm.sum(1).numpy(), 1.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["fast", "official"])
def test_batching_and_chunking_do_not_change_results(model, cells, classes, mode):
    reference = zero_shot_scores(model, cells, classes, mode=mode, top_k=3, max_tokens=10_000)
    # One cell per batch and one text per multimodal pass.
    tiny_budgets = zero_shot_scores(
        model, cells, classes, mode=mode, top_k=3, max_tokens=1, max_pair_tokens=1
    )
    np.testing.assert_allclose(tiny_budgets.scores, reference.scores, atol=1e-5)
    np.testing.assert_allclose(tiny_budgets.match_prob, reference.match_prob, atol=1e-5)
    # Results come back in input order: scoring a reversed list reverses the rows.
    backwards = zero_shot_scores(model, cells[::-1], classes, mode=mode, top_k=3, max_tokens=90)
    np.testing.assert_allclose(backwards.scores[::-1], reference.scores, atol=1e-5)


def test_tokenized_cells_and_truncation(model, classes):
    from langcell.data.tokenizer import TokenizedCells

    rng = np.random.default_rng(1)
    long_cell = np.concatenate([[99], rng.integers(2, 99, 200)]).astype(np.int32)  # 201 > 128 positions
    short_cell = np.array([99, 5, 7, 9], dtype=np.int32)
    ragged = TokenizedCells(
        ids=np.concatenate([long_cell, short_cell]),
        offsets=np.array([0, long_cell.size, long_cell.size + short_cell.size]),
        report=None,
        cells_without_genes=np.array([], dtype=np.int64),
        obs_names=None,
    )
    result = zero_shot_scores(model, ragged, classes, mode="official")
    truncated = zero_shot_scores(model, [long_cell[:128], short_cell], classes, mode="official")
    np.testing.assert_allclose(result.scores, truncated.scores, atol=1e-6)


def test_model_mode_is_restored(model, cells, classes):
    model.train()
    try:
        zero_shot_scores(model, cells[:2], classes, mode="fast", top_k=1)
        assert model.training
    finally:
        model.eval()


def test_class_texts_are_tokenised_once_and_trimmed(model):
    classes = encode_class_texts(
        model, ["a much longer text about a cell type than the other", "short"], ["x", "y"]
    )
    assert isinstance(classes, ClassTexts) and classes.names == ["x", "y"]
    full = classes.tokens()
    assert full["input_ids"].shape == classes.input_ids.shape
    only_short = classes.tokens(torch.tensor([1]))
    assert only_short["input_ids"].shape[1] == int(classes.attention_mask[1].sum())
    assert bool(only_short["attention_mask"].all())


@pytest.mark.parametrize(
    "texts, names, message",
    [
        ([], None, "no class texts"),
        (["a", "  "], None, "non-empty string"),
        (["a", "b"], ["x", "x"], "repeated"),
        (["a", "b"], ["x"], "one name per text"),
    ],
)
def test_encode_class_texts_rejects_bad_input(model, texts, names, message):
    with pytest.raises(LangCellError, match=message):
        encode_class_texts(model, texts, names)


def test_checks():
    assert check_alpha(0) == 0.0 and check_alpha(1) == 1.0
    for bad in (-0.01, 1.5, "0.1", True, float("nan")):
        with pytest.raises(LangCellError, match="alpha"):
            check_alpha(bad)
    assert check_top_k(3, 8) == 3 and check_top_k(20, 8) == 8
    for bad in (0, -1, 1.5, None):
        with pytest.raises(LangCellError, match="top_k"):
            check_top_k(bad, 8)


def test_zero_shot_scores_rejects_bad_input(model, cells, classes):
    with pytest.raises(LangCellError, match="mode"):
        zero_shot_scores(model, cells, classes, mode="slow")
    with pytest.raises(LangCellError, match="no cells"):
        zero_shot_scores(model, [], classes)
    with pytest.raises(LangCellError, match="1-D array"):
        zero_shot_scores(model, [np.array([1.5, 2.0])], classes)
    with pytest.raises(LangCellError, match="temperature"):
        zero_shot_scores(model, cells, classes, temperature=0)

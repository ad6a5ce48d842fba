"""The text-initialised linear head: its start is zero-shot similarity, its fit is the penalised optimum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from langcell.train.text_head import cross_validated_head, fit_text_head, stratified_folds


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    text = unit(rng.normal(size=(4, 16)))
    labels = np.repeat(np.arange(4), 3)
    # Cells near their class text, but class 3's cells sit nearer class 0's text: zero-shot errs there.
    centres = text.copy()
    centres[3] = unit((text[0] + 0.4 * text[3])[None])[0]
    features = unit(centres[labels] + 0.2 * rng.normal(size=(12, 16)))
    return features, labels, text


def test_infinite_penalty_is_zero_shot_similarity(problem):
    features, _, text = problem
    head = fit_text_head(features, np.zeros(12, int), text, 20.0, math.inf)
    np.testing.assert_allclose(head.logits(features), 20.0 * features @ text.T)
    np.testing.assert_array_equal(head.logits(features).argmax(1), (features @ text.T).argmax(1))


def test_the_fit_is_the_penalised_optimum(problem):
    features, labels, text = problem
    head = fit_text_head(features, labels, text, 20.0, 0.1)
    # An independent gradient of the same objective at the solution (torch autograd): zero.
    delta = torch.tensor(head.delta, requires_grad=True)
    bias = torch.tensor(head.bias, requires_grad=True)
    z, t = torch.tensor(features), torch.tensor(text)
    loss = F.cross_entropy(20.0 * z @ t.T + z @ delta.T + bias, torch.tensor(labels)) + 0.05 * (
        delta.square().sum() + bias.square().sum()
    )
    loss.backward()
    assert float(delta.grad.abs().max()) < 1e-5 and float(bias.grad.abs().max()) < 1e-5
    # It learns what zero-shot gets wrong; a stronger pull stays nearer the start.
    assert np.mean(head.logits(features).argmax(1) == labels) > np.mean((features @ text.T).argmax(1) == labels)
    strong = fit_text_head(features, labels, text, 20.0, 10.0)
    assert np.linalg.norm(strong.delta) < np.linalg.norm(head.delta)
    weight, b = head.weight_and_bias()
    np.testing.assert_allclose(features @ weight.T + b, head.logits(features))


def test_folds_are_stratified_and_seeded():
    labels = np.repeat(np.arange(5), 4)
    folds = stratified_folds(labels, 4, seed=1)
    for fold in range(4):
        assert np.bincount(labels[folds == fold], minlength=5).tolist() == [1] * 5
    np.testing.assert_array_equal(folds, stratified_folds(labels, 4, seed=1))
    one_shot = stratified_folds(np.arange(6), 3, seed=0)
    assert np.bincount(one_shot).tolist() == [2, 2, 2]


def test_cross_validation_chooses_from_the_labelled_cells_alone(problem):
    features, labels, text = problem
    head, out_of_fold, table = cross_validated_head(features, labels, text, 20.0, penalties=(0.01, 1.0, math.inf))
    assert table["penalty"] == [math.inf, 1.0, 0.01]
    assert head.penalty == table["penalty"][int(np.argmin(table["nll"]))]
    assert out_of_fold.shape == (12, 4)
    # Out-of-fold logits at the chosen penalty, recomputed by hand.
    folds = stratified_folds(labels, 5, 0)
    for fold in np.unique(folds):
        inside = folds != fold
        refit = fit_text_head(features[inside], labels[inside], text, 20.0, head.penalty)
        np.testing.assert_allclose(out_of_fold[~inside], refit.logits(features[~inside]), rtol=1e-6, atol=1e-6)

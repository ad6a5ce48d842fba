"""Label-shift correction (EM of Saerens et al. 2002) and temperature calibration against independent computations."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from langcell.errors import LangCellError
from langcell.inference.calibration import (
    check_prior,
    correct_posteriors,
    em_priors,
    estimate_priors,
    fit_temperature,
    zero_shot_prior,
)


def synthetic_posteriors(priors: np.ndarray, n: int, seed: int, separation: float = 1.5):
    """Cells drawn with class frequencies ``priors``; their exact posteriors under *uniform* priors.

    Class k emits x ~ N(mu_k, I) in 2-D; a classifier trained on balanced data gives
    p(k | x) = N(x; mu_k) / sum_j N(x; mu_j), the Bayes posterior with uniform priors.
    """
    rng = np.random.default_rng(seed)
    k = priors.size
    angles = 2 * np.pi * np.arange(k) / k
    means = separation * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = rng.choice(k, size=n, p=priors)
    x = means[labels] + rng.normal(size=(n, 2))
    log_likelihood = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(axis=2)
    posteriors = np.exp(log_likelihood - log_likelihood.max(axis=1, keepdims=True))
    return posteriors / posteriors.sum(axis=1, keepdims=True), labels


def hand_written_em(p: np.ndarray, iterations: int) -> np.ndarray:
    """Saerens et al.'s EM written out loop by loop (uniform training priors)."""
    n, k = p.shape
    pi = [1.0 / k] * k
    for _ in range(iterations):
        new = [0.0] * k
        for i in range(n):
            weights = [pi[j] * k * p[i, j] for j in range(k)]
            total = sum(weights)
            for j in range(k):
                new[j] += weights[j] / total / n
        pi = new
    return np.array(pi)


def test_em_recovers_known_priors_and_matches_a_hand_written_em():
    true = np.array([0.6, 0.25, 0.1, 0.05])
    posteriors, labels = synthetic_posteriors(true, 20_000, seed=0)
    priors, corrected, n_iter, converged = em_priors(posteriors)
    assert converged
    np.testing.assert_allclose(priors, np.bincount(labels, minlength=4) / labels.size, atol=0.02)
    np.testing.assert_allclose(priors, true, atol=0.03)
    # The uncorrected posteriors' mean is biased towards uniform; EM removes that bias.
    assert abs(posteriors.mean(axis=0)[0] - true[0]) > 0.05
    small = posteriors[:400]
    by_hand = hand_written_em(small, 25)
    library, _, _, _ = em_priors(small, tol=0.0, max_iter=25)
    np.testing.assert_allclose(library, by_hand, rtol=1e-10)
    # The corrected posteriors are Bayes' rule with the found priors: q ∝ pi_k p_k.
    expected = posteriors * priors
    np.testing.assert_allclose(corrected, expected / expected.sum(axis=1, keepdims=True), rtol=1e-6)
    # ... and they annotate the unbalanced cells better than the uncorrected ones.
    assert np.mean(corrected.argmax(1) == labels) > np.mean(posteriors.argmax(1) == labels)


def test_correct_posteriors_with_non_uniform_training_priors():
    p = np.array([[0.5, 0.5], [0.8, 0.2]])
    q = correct_posteriors(p, np.array([0.5, 0.5]), np.array([0.8, 0.2]))
    # training priors 0.8/0.2 undone: p / pi0, renormalised
    np.testing.assert_allclose(q[0], [0.2, 0.8])
    np.testing.assert_allclose(q[1], [0.5, 0.5])


def test_fit_temperature_recovers_the_scale_of_calibrated_logits():
    posteriors, labels = synthetic_posteriors(np.full(3, 1 / 3), 5_000, seed=1)
    logits = np.log(posteriors)  # calibrated at temperature 1
    fitted = fit_temperature(logits * 4.0, labels)
    assert fitted == pytest.approx(4.0, rel=0.1)
    # Against a brute-force grid of the likelihood.
    grid = np.exp(np.linspace(np.log(0.5), np.log(20), 2000))
    nll = [-np.mean(np.log(np.exp(logits * 4 / t)[np.arange(labels.size), labels] /
                           np.exp(logits * 4 / t).sum(1))) for t in grid]
    assert fitted == pytest.approx(grid[int(np.argmin(nll))], rel=0.01)


def test_degenerate_or_non_converging_estimates_fall_back_to_uniform_with_a_warning():
    posteriors = np.tile([[0.97, 0.01, 0.02]], (50, 1))
    with pytest.warns(UserWarning, match="one class"):
        estimate = estimate_priors(posteriors, where="test")
    assert estimate.status.startswith("fallback") and estimate.estimated[0] > 0.9
    np.testing.assert_allclose(estimate.priors, 1 / 3)
    np.testing.assert_array_equal(estimate.posteriors, posteriors)
    balanced, _ = synthetic_posteriors(np.array([0.5, 0.3, 0.2]), 500, seed=2)
    with pytest.warns(UserWarning, match="did not converge"):
        estimate = estimate_priors(balanced, max_iter=2)
    assert estimate.status == "fallback: EM did not converge in 2 iterations"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accepted = estimate_priors(balanced)
    assert accepted.status == "em" and accepted.as_dict(["a", "b", "c"])["status"] == "em"


def test_zero_shot_prior_replaces_p_sim_by_the_corrected_similarity_posteriors():
    rng = np.random.default_rng(3)
    similarity = rng.uniform(-1, 1, size=(200, 4))
    similarity[:150, 0] += 0.6  # most cells look like class 0
    p_sim = np.exp(similarity / 0.05) / np.exp(similarity / 0.05).sum(1, keepdims=True)
    p_ctm = rng.dirichlet(np.ones(4), size=200)
    scores, estimate = zero_shot_prior(similarity, p_sim, p_ctm, alpha=0.3, inverse_temperature=5.0)
    calibrated = np.exp(similarity * 5.0) / np.exp(similarity * 5.0).sum(1, keepdims=True)
    priors, corrected, _, _ = em_priors(calibrated)
    assert estimate.status == "em" and priors.argmax() == 0
    np.testing.assert_allclose(scores, 0.3 * corrected + 0.7 * p_ctm, rtol=1e-6)
    # A refused estimate leaves the released blend exactly as it was.
    with pytest.warns(UserWarning):
        same, refused = zero_shot_prior(similarity * 0 + np.eye(4)[np.zeros(200, int)], p_sim, p_ctm, alpha=0.3,
                                        inverse_temperature=50.0)
    assert refused.status.startswith("fallback")
    np.testing.assert_allclose(same, 0.3 * p_sim + 0.7 * p_ctm)


@pytest.mark.parametrize("prior", ["EM", "none", None, 1])
def test_unknown_prior_is_refused(prior):
    with pytest.raises(LangCellError, match="prior must be one of"):
        check_prior(prior)

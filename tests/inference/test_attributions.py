"""Gradient x input attributions (langcell.inference.explain) against finite differences."""

import numpy as np
import pytest
import torch

from langcell.inference.explain import contrast_targets, explain_batch, token_attributions
from langcell.models import LangCell

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = LangCell.from_config("tiny").double().eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.cell_encoder.named_parameters():
            if "LayerNorm" not in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def cells(n=3, seed=0):
    rng = np.random.default_rng(seed)
    cls_id = 99  # tiny preset: 100 tokens, <cls> last
    return [np.concatenate([[cls_id], rng.choice(np.arange(2, 99), size=rng.integers(5, 12), replace=False)])
            for _ in range(n)]


def score_with_scaled_token(model, ids, target, position, factor):
    """<cell_proj(<cls> state), target> with one token's word embedding scaled by ``factor``.

    Runs the encoder's default path (packed on the CPU, one cell), not explain_batch's masked one.
    """
    def scale(module, args, output):
        output = output.clone()
        output[..., position, :] *= factor  # [L, H] packed or [1, L, H]
        return output

    hook = model.cell_encoder.embeddings.word_embeddings.register_forward_hook(scale)
    try:
        with torch.no_grad():
            first = model.cell_encoder(torch.as_tensor(ids)[None], first_token_only=True)
            return float((model.cell_proj(first)[0] * target).sum())
    finally:
        hook.remove()


def test_gradient_x_input_equals_the_finite_difference_of_scaling_the_token(model):
    sequences = cells()
    target = torch.randn(len(sequences), model.config.projection_dim, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(5))
    attributions = token_attributions(model, sequences, target.numpy())
    step = 1e-5
    for i, ids in enumerate(sequences):
        assert attributions[i].shape == (len(ids),)
        for position in range(len(ids)):
            up = score_with_scaled_token(model, ids, target[i], position, 1 + step)
            down = score_with_scaled_token(model, ids, target[i], position, 1 - step)
            finite_difference = (up - down) / (2 * step)
            assert attributions[i][position] == pytest.approx(finite_difference, rel=1e-3, abs=1e-6)


def test_padding_gets_zero_and_batching_changes_nothing(model):
    sequences = cells(6, seed=1)
    target = torch.randn(6, model.config.projection_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    together = token_attributions(model, sequences, target.numpy())
    alone = [token_attributions(model, [s], target[i : i + 1].numpy())[0] for i, s in enumerate(sequences)]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    ids = np.zeros((2, 12), dtype=np.int64)
    mask = np.zeros((2, 12), dtype=np.int64)
    ids[0, :5], mask[0, :5] = sequences[0][:5], 1
    ids[1, : len(sequences[1])], mask[1, : len(sequences[1])] = sequences[1], 1
    values = explain_batch(model, {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask)},
                           target[:2])
    assert (values[0, 5:] == 0).all()
    # The model is unchanged: no weight received a gradient.
    assert all(p.grad is None for p in model.parameters())


def test_contrast_targets_subtract_the_mean_of_the_other_classes():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    targets = contrast_targets(embeddings, torch.tensor([0, 2]))
    np.testing.assert_allclose(targets[0], [1.0 - 0.5, 0.0 - 1.0])
    np.testing.assert_allclose(targets[1], [1.0 - 0.5, 1.0 - 0.5])
    plain = contrast_targets(embeddings, torch.tensor([1]), contrast=False)
    np.testing.assert_allclose(plain[0], [0.0, 1.0])
    np.testing.assert_allclose(contrast_targets(embeddings[:1], torch.tensor([0]))[0], [1.0, 0.0])

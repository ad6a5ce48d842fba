import numpy as np
import pytest

from langcell.data.batching import pad_sequences, token_budget_batches
from langcell.errors import LangCellError


def test_batches_cover_every_index_once_and_respect_the_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    batches = token_budget_batches(lengths, max_tokens=1000)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))
    for b in batches:
        assert len(b) * lengths[b].max() <= 1000 or len(b) == 1


def test_batches_are_longest_first_without_shuffle_and_capped():
    lengths = np.array([5, 50, 10, 50, 1])
    batches = token_budget_batches(lengths, max_tokens=100, max_batch_size=1)
    assert [int(lengths[b[0]]) for b in batches] == [50, 50, 10, 5, 1]


def test_oversized_sequence_gets_its_own_batch():
    batches = token_budget_batches([500, 3, 3], max_tokens=100)
    assert [len(b) for b in batches] == [1, 2]


def test_shuffle_is_seeded():
    lengths = np.random.default_rng(1).integers(1, 100, size=200)
    a = token_budget_batches(lengths, 400, shuffle=True, seed=3)
    b = token_budget_batches(lengths, 400, shuffle=True, seed=3)
    c = token_budget_batches(lengths, 400, shuffle=True, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=False))


def test_drop_last_drops_only_a_smaller_final_batch():
    batches = token_budget_batches([10] * 7, 30, drop_last=True)
    assert [len(b) for b in batches] == [3, 3]


def test_bad_budget_is_refused():
    with pytest.raises(LangCellError, match="max_tokens"):
        token_budget_batches([1, 2], 0)


def test_pad_sequences_matches_a_plain_loop():
    seqs = [np.array([9, 4, 2]), np.array([9]), np.array([9, 8, 7, 6, 5])]
    ids, mask = pad_sequences(seqs, pad_id=0, max_length=4)
    expected = np.zeros((3, 4), dtype=np.int64)
    for i, s in enumerate(seqs):
        expected[i, : min(len(s), 4)] = s[:4]
    assert np.array_equal(ids, expected)
    assert np.array_equal(mask, (np.arange(4)[None, :] < np.array([3, 1, 4])[:, None]).astype(np.int64))


def test_pad_sequences_empty():
    ids, mask = pad_sequences([], pad_id=0)
    assert ids.shape == (0, 0) and mask.shape == (0, 0)

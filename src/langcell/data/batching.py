"""Batching of ragged token sequences: length-bucketed batches under a token budget, and padding.

Cells carry very different numbers of expressed genes (a few hundred to the 2,047 cap). Padding a batch
to its longest cell wastes the compute spent on pad positions; grouping cells of similar length and
sizing each batch by a *token budget* (batch size x padded length) keeps every batch close to the same
cost and nearly free of padding. Both the encoder (inference) and pretraining use these helpers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import LangCellError


def token_budget_batches(
    lengths: Sequence[int] | np.ndarray,
    max_tokens: int,
    *,
    max_batch_size: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> list[np.ndarray]:
    """Group sequence indices into batches of similar length whose padded size fits a token budget.

    Parameters
    ----------
    lengths
        Length of every sequence (tokens, ``<cls>`` included).
    max_tokens
        Budget per batch: ``len(batch) * max(lengths[batch]) <= max_tokens``. A single sequence longer
        than the budget still gets a batch of its own.
    max_batch_size
        Optional cap on the number of sequences per batch.
    shuffle
        Randomise which equal-length sequences share a batch and the order of the batches (for
        training). Without it, batches come longest first, which is best for inference: the peak
        memory is reached at once rather than after minutes.
    seed
        Seed for ``shuffle``; the same seed gives the same batches.
    drop_last
        Drop the final batch when it holds fewer sequences than the batch before it (for training
        loops that want batches of comparable size).

    Returns
    -------
    list of numpy.ndarray
        Index arrays (int64) that together cover every index once (less the dropped batch).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise LangCellError("lengths must be a 1-D array of sequence lengths; pass one length per sequence")
    if max_tokens < 1:
        raise LangCellError(f"max_tokens must be a positive number of tokens, got {max_tokens}; pass e.g. 16384")
    if max_batch_size is not None and max_batch_size < 1:
        raise LangCellError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if lengths.size == 0:
        return []
    rng = np.random.default_rng(seed)
    if shuffle:
        # A random permutation followed by a stable sort: equal lengths end up in random order.
        order = rng.permutation(lengths.size)
        order = order[np.argsort(-lengths[order], kind="stable")]
    else:
        order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]

    batches: list[np.ndarray] = []
    start = 0
    n = order.size
    cap = max_batch_size or n
    while start < n:
        # Sorted descending: the first sequence of a batch is its longest, so the budget fixes the size.
        longest = max(int(sorted_lengths[start]), 1)
        size = max(1, min(cap, max_tokens // longest, n - start))
        batches.append(order[start : start + size])
        start += size
    if drop_last and len(batches) > 1 and len(batches[-1]) < len(batches[-2]):
        batches.pop()
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def pad_sequences(
    sequences: Sequence[np.ndarray], pad_id: int, max_length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stack ragged integer sequences into a padded matrix and an attention mask.

    Parameters
    ----------
    sequences
        One 1-D integer array per sequence.
    pad_id
        Token id written into the padding positions.
    max_length
        Truncate longer sequences to their first ``max_length`` tokens (rank order: the top genes and
        ``<cls>`` are kept). ``None`` keeps them whole.

    Returns
    -------
    input_ids : numpy.ndarray
        ``int64 [B, L]``, ``L`` the longest (truncated) length.
    attention_mask : numpy.ndarray
        ``int64 [B, L]``: 1 on tokens, 0 on padding (Hugging Face convention).
    """
    n = len(sequences)
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=n)
    if max_length is not None:
        lengths = np.minimum(lengths, max_length)
    width = int(lengths.max()) if n else 0
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((n, width), dtype=np.int64)
    if n == 0 or width == 0:
        return input_ids, attention_mask
    # One slice copy per row: cheaper than scattering through row/column index arrays as long as the
    # rows (tokens per cell), not the number of rows, are what is large.
    for row, (sequence, k) in enumerate(zip(sequences, lengths.tolist(), strict=True)):
        input_ids[row, :k] = sequence[:k]
    np.less(np.arange(width), lengths[:, None], out=attention_mask, casting="unsafe")
    return input_ids, attention_mask


def as_sequences(cells: Any) -> list[np.ndarray]:
    """Cells as a list of 1-D integer arrays (TokenizedCells, or any sequence of sequences)."""
    if hasattr(cells, "offsets") and hasattr(cells, "ids"):
        ids, offsets = np.asarray(cells.ids), np.asarray(cells.offsets)
        return [ids[offsets[i] : offsets[i + 1]] for i in range(offsets.size - 1)]
    if isinstance(cells, np.ndarray) and cells.ndim == 2:
        return list(cells)
    if not isinstance(cells, Iterable):
        raise LangCellError(
            f"cells must be TokenizedCells or a list of token id arrays, got {type(cells).__name__}; "
            "tokenize them with GeneTokenizer.encode"
        )
    sequences = [np.asarray(s) for s in cells]
    for s in sequences:
        if s.ndim != 1 or s.size == 0 or not np.issubdtype(s.dtype, np.integer):
            raise LangCellError(
                "every cell must be a non-empty 1-D array of integer token ids (<cls> first); "
                "tokenize the cells with GeneTokenizer.encode"
            )
    return sequences

"""Per-gene medians of normalised expression for :meth:`GeneTokenizer.fit`: exact, or log-binned.

Exact medians keep every non-zero value; above a size limit a log-binned histogram bounds memory with a
relative error of at most 0.5 %.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Log-bin width of the approximate medians. A value ``x`` falls into bin ``floor(ln(x) / w)`` and is
#: represented by the bin's geometric centre, so its relative error is at most ``exp(w / 2) - 1``. With
#: ``w = 2 ln(1.005)`` that is 0.5 %, and the mean of two such estimates (even counts) keeps the bound.
_LOG_BIN_WIDTH = 2.0 * math.log(1.005)


class MedianAccumulator:
    """Per-gene medians of streamed values: exact while memory allows, else a sparse log-binned histogram."""

    _BIN_OFFSET = 1 << 31  # shifts signed bin numbers into the low 32 bits of a key

    def __init__(self, n_genes: int, *, exact: bool | None, max_exact_values: int) -> None:
        self.n_genes = n_genes
        self.exact = exact
        self.max_exact_values = max_exact_values
        self._genes: list[np.ndarray] = []  # exact mode: gene index of each collected value
        self._values: list[np.ndarray] = []  # exact mode: the values
        self._n_values = 0
        self._hist_keys: list[np.ndarray] = []  # histogram mode: (gene << 32 | bin) keys, unique per part
        self._hist_counts: list[np.ndarray] = []  # histogram mode: counts of those keys
        self._hist_size = 0
        self.approximate = exact is False

    def add(self, genes: np.ndarray, values: np.ndarray) -> None:
        if self.approximate:
            self._add_histogram(genes, values)
            return
        self._genes.append(genes.astype(np.int32, copy=True))
        self._values.append(values.astype(np.float64, copy=True))
        self._n_values += values.size
        if self.exact is None and self._n_values > self.max_exact_values:
            # Over budget: fold what was collected into the histogram and continue there.
            self.approximate = True
            genes_all, values_all = np.concatenate(self._genes), np.concatenate(self._values)
            self._genes, self._values = [], []
            self._add_histogram(genes_all, values_all)

    def _add_histogram(self, genes: np.ndarray, values: np.ndarray) -> None:
        bins = np.floor(np.log(values) / _LOG_BIN_WIDTH).astype(np.int64) + self._BIN_OFFSET
        keys = (genes.astype(np.int64) << 32) | bins
        unique, counts = np.unique(keys, return_counts=True)
        self._hist_keys.append(unique)
        self._hist_counts.append(counts)
        self._hist_size += unique.size
        if len(self._hist_keys) > 64:
            self._consolidate()

    def _consolidate(self) -> None:
        keys = np.concatenate(self._hist_keys)
        counts = np.concatenate(self._hist_counts)
        unique, inverse = np.unique(keys, return_inverse=True)
        self._hist_keys = [unique]
        self._hist_counts = [np.bincount(inverse, weights=counts, minlength=unique.size).astype(np.int64)]

    def medians(self) -> np.ndarray:
        """Per-gene medians (NaN for genes without values)."""
        if self.approximate:
            return self._histogram_medians()
        if not self._values:
            return np.full(self.n_genes, np.nan)
        genes = np.concatenate(self._genes)
        values = np.concatenate(self._values)
        order = np.lexsort((values, genes))
        sorted_values = values[order]
        n_per_gene = np.bincount(genes, minlength=self.n_genes)
        return _middle_mean(n_per_gene, lambda ranks: sorted_values[ranks])

    def _histogram_medians(self) -> np.ndarray:
        if not self._hist_keys:
            return np.full(self.n_genes, np.nan)
        self._consolidate()
        keys, counts = self._hist_keys[0], self._hist_counts[0]
        genes = (keys >> 32).astype(np.int64)
        bins = (keys & 0xFFFFFFFF) - self._BIN_OFFSET
        centres = np.exp((bins + 0.5) * _LOG_BIN_WIDTH)
        n_per_gene = np.bincount(genes, weights=counts, minlength=self.n_genes).astype(np.int64)
        cumulative = np.cumsum(counts)
        # Keys are sorted gene-major, so global rank r lies in the first bin whose cumulative count exceeds r.
        return _middle_mean(
            n_per_gene, lambda ranks: centres[np.searchsorted(cumulative, ranks, side="right")]
        )


def _middle_mean(n_per_gene: np.ndarray, value_at_rank: Any) -> np.ndarray:
    """Mean of the two middle values of each gene's sorted values (``np.median`` semantics).

    ``value_at_rank`` maps global ranks (over all genes, sorted gene-major then by value) to values.
    """
    medians = np.full(n_per_gene.size, np.nan)
    present = n_per_gene > 0
    starts = np.cumsum(n_per_gene) - n_per_gene
    low = starts[present] + (n_per_gene[present] - 1) // 2
    high = starts[present] + n_per_gene[present] // 2
    # (a + b) / 2 equals np.median's mean of the two middle elements; for odd counts a == b and it is exact.
    medians[present] = (value_at_rank(low) + value_at_rank(high)) / 2.0
    return medians

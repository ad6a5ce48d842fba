"""Property tests of the rank-value tokenizer and the corpus over random sparse count matrices.

Hypothesis draws small count matrices (sparse, dense or CSC; integer or float storage; explicit stored
zeros; duplicated gene names; empty cells), a vocabulary covering part of the genes with medians
chosen from a few values so that exact ties are common, and a maximum length. Every token sequence
must then:

* start with ``<cls>`` and hold no token twice;
* hold only genes that the cell expresses and that are in the vocabulary;
* be ordered by normalised value ``(count / n_counts * 10,000) / median`` (descending), ties by token
  id (ascending);
* be no longer than ``max_length`` and cut only when the cell expresses more genes;

and the corpus written from the same cells must give back exactly the same sequences.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from langcell.data.corpus import TokenCorpus, write_corpus
from langcell.data.tokenizer import GeneTokenizer

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEDIAN_CHOICES = (0.5, 1.0, 2.0, 3.0, 7.5)  # few values: equal normalised values (ties) are common


@st.composite
def tokenizer_inputs(draw):
    n_cells = draw(st.integers(1, 10))
    n_columns = draw(st.integers(1, 12))
    # Column names: some shared by two columns (duplicated genes, summed by the tokenizer).
    n_names = draw(st.integers(1, n_columns))
    column_names = [f"g{draw(st.integers(0, n_names - 1))}" for _ in range(n_columns)]
    names = sorted(set(column_names))
    in_vocabulary = draw(st.lists(st.booleans(), min_size=len(names), max_size=len(names)))
    if not any(in_vocabulary):
        in_vocabulary[0] = True
    vocabulary = [n for n, keep in zip(names, in_vocabulary, strict=True) if keep]
    vocabulary = draw(st.permutations(vocabulary))  # token order unrelated to column order
    medians = [draw(st.sampled_from(MEDIAN_CHOICES)) for _ in vocabulary]

    density = draw(st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    values = rng.integers(1, draw(st.sampled_from([2, 4, 30, 1000])), size=(n_cells, n_columns))
    present = rng.random((n_cells, n_columns)) < density
    matrix = np.where(present, values, 0)
    storage = draw(st.sampled_from(["csr", "csr_explicit_zeros", "csc", "dense"]))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int32]))
    max_length = draw(st.integers(1, n_columns + 2))
    return matrix, column_names, vocabulary, medians, storage, dtype, max_length


def as_adata(matrix: np.ndarray, column_names: list[str], storage: str, dtype) -> ad.AnnData:
    if storage == "dense":
        x = matrix.astype(dtype)
    elif storage == "csc":
        x = sp.csc_matrix(matrix.astype(dtype))
    elif storage == "csr":
        x = sp.csr_matrix(matrix.astype(dtype))
    else:  # every entry stored, zeros included
        rows, cols = np.indices(matrix.shape)
        x = sp.csr_matrix(
            (matrix.ravel().astype(dtype), (rows.ravel(), cols.ravel())), shape=matrix.shape
        )
        x.sort_indices()
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(matrix.shape[0])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicated var names are the point
        return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=column_names))


def reference_values(matrix, column_names, vocabulary, medians):
    """Per cell: {token id: normalised value} of its expressed vocabulary genes (duplicates summed)."""
    position = {gene: i for i, gene in enumerate(vocabulary)}
    result = []
    for row in np.asarray(matrix, dtype=np.float64):
        total = float(row.sum())
        summed: dict[str, float] = {}
        for name, count in zip(column_names, row, strict=True):
            if name in position:
                summed[name] = summed.get(name, 0.0) + count
        result.append(
            {
                position[g] + 2: (c / total * 10_000.0) / medians[position[g]]
                for g, c in summed.items()
                if c > 0
            }
        )
    return result


@SETTINGS
@given(tokenizer_inputs())
def test_token_sequences_obey_the_rank_value_rules(inputs):
    matrix, column_names, vocabulary, medians, storage, dtype, max_length = inputs
    tokenizer = GeneTokenizer(vocabulary, medians, gene_id_kind="custom")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cells without vocabulary genes are announced
        cells = tokenizer.encode(as_adata(matrix, column_names, storage, dtype), max_length=max_length)
    expected_values = reference_values(matrix, column_names, vocabulary, medians)
    assert len(cells) == matrix.shape[0]
    for i, values in enumerate(expected_values):
        sequence = cells[i].tolist()
        assert sequence[0] == tokenizer.cls_id
        genes = sequence[1:]
        assert len(set(genes)) == len(genes), "a token repeats"
        assert set(genes) <= set(values), "a token of a gene the cell does not express or the vocabulary lacks"
        assert len(sequence) <= max_length
        assert len(genes) == min(len(values), max_length - 1), "cut although the cell has more genes"
        keys = [(-values[t], t) for t in genes]
        assert keys == sorted(keys), "not ordered by value, ties by token id"
        # ...and what was cut was not better than what was kept.
        if genes:
            worst_kept = max(keys)
            assert all((-v, t) > worst_kept for t, v in values.items() if t not in genes)
        if not values:
            assert i in cells.cells_without_genes
    assert set(cells.cells_without_genes.tolist()) == {i for i, v in enumerate(expected_values) if not v}


@pytest.mark.slow
@SETTINGS
@given(tokenizer_inputs(), st.integers(1, 4))
def test_the_corpus_round_trips_exactly(inputs, shard_size):
    matrix, column_names, vocabulary, medians, storage, dtype, max_length = inputs
    tokenizer = GeneTokenizer(vocabulary, medians, gene_id_kind="custom")
    adata = as_adata(matrix, column_names, storage, dtype)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder:
        warnings.simplefilter("ignore")
        encoded = tokenizer.encode(adata, max_length=max_length)
        write_corpus(adata, tokenizer, Path(folder) / "corpus", shard_size=shard_size, max_length=max_length,
                     progress=False)
        corpus = TokenCorpus(Path(folder) / "corpus")
        corpus.verify()
        assert len(corpus) == len(encoded)
        assert corpus.lengths.tolist() == encoded.lengths.tolist()
        for i in range(len(encoded)):
            assert corpus[i].tolist() == encoded[i].tolist()
        assert corpus.obs["obs_name"].astype(str).tolist() == list(adata.obs_names)
        assert corpus.tokenizer == tokenizer
        assert len(corpus.manifest["shards"]) == -(-len(encoded) // shard_size)

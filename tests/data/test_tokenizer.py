"""Tests for langcell.data.tokenizer: rank-value encoding, medians, persistence, input checks.

Every expected sequence is computed by a plain per-cell implementation written here (dense row, mask,
the value formula, ``np.lexsort`` by (token id, -value)), independent of the vectorised code.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from langcell.data import genes
from langcell.data.geneformer import read_geneformer_dictionary
from langcell.data.tokenizer import TOKENIZER_FILENAME, GeneTokenizer, TokenizedCells
from langcell.errors import LangCellError

SHARED = Path(__file__).resolve().parents[3] / "shared"
GENEFORMER = SHARED / "reference" / "geneformer"
IMMUNE = SHARED / "data" / "immune_sample_559cells_counts.h5ad"
CBMC = SHARED / "data" / "cbmc_citeseq_500genes.h5ad"

needs_shared = pytest.mark.skipif(
    not (IMMUNE.is_file() and CBMC.is_file() and GENEFORMER.is_dir()),
    reason=f"shared data not found at {SHARED} (clone the project beside ../shared to run these tests)",
)


# ----------------------------------------------------------------------------------------------------
# The independent reference implementation
# ----------------------------------------------------------------------------------------------------


def plain_encode(
    dense_counts: np.ndarray,
    column_token: np.ndarray,
    medians: np.ndarray,
    cls_id: int,
    max_length: int = 2048,
    n_counts: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Per-cell rank-value encoding, written as plainly as possible.

    ``column_token[j]`` is the token id of input column ``j`` (-1 when not in the vocabulary); columns
    sharing a token are summed. ``medians[t - 2]`` is the median of token ``t``.
    """
    dense_counts = np.asarray(dense_counts, dtype=np.float64)
    n_vocab = medians.size
    in_vocab = column_token >= 0
    sequences = []
    for i, row in enumerate(dense_counts):
        total = row.sum() if n_counts is None else n_counts[i]
        per_token = np.zeros(n_vocab + 2)
        np.add.at(per_token, column_token[in_vocab], row[in_vocab])
        tokens = np.flatnonzero(per_token > 0)
        values = (per_token[tokens] / total * 10_000) / medians[tokens - 2]
        order = np.lexsort((tokens, -values))
        sequences.append(np.concatenate([[cls_id], tokens[order][: max_length - 1]]).astype(np.int64))
    return sequences


def assert_same_sequences(encoded: TokenizedCells, expected: list[np.ndarray]) -> None:
    assert len(encoded) == len(expected)
    for i, sequence in enumerate(expected):
        np.testing.assert_array_equal(encoded[i], sequence, err_msg=f"cell {i}")


def tiny_tokenizer() -> GeneTokenizer:
    # Token ids: a=2, b=3, c=4, d=5, <cls>=6.
    return GeneTokenizer(["a", "b", "c", "d"], [1.0, 2.0, 0.5, 4.0], gene_id_kind="custom", organism=None)


def tiny_adata(rows: list[list[float]], var_names=("a", "b", "c", "d", "x"), **kwargs) -> ad.AnnData:
    X = sp.csr_matrix(np.asarray(rows, dtype=np.float32))
    return ad.AnnData(
        X=X,
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(len(rows))]),
        var=pd.DataFrame(index=list(var_names)),
        **kwargs,
    )


@pytest.fixture(scope="module")
def released() -> GeneTokenizer:
    if not GENEFORMER.is_dir():
        pytest.skip(f"Geneformer dictionaries not found at {GENEFORMER}")
    return GeneTokenizer.from_geneformer(
        GENEFORMER / "token_dictionary.pkl", GENEFORMER / "gene_median_dictionary.pkl"
    )


@pytest.fixture(scope="module")
def immune() -> ad.AnnData:
    if not IMMUNE.is_file():
        pytest.skip(f"{IMMUNE} not found")
    return ad.read_h5ad(IMMUNE)


@pytest.fixture(scope="module")
def cbmc() -> ad.AnnData:
    if not CBMC.is_file():
        pytest.skip(f"{CBMC} not found")
    return ad.read_h5ad(CBMC)


# ----------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_shared
def test_released_dictionaries_match_a_plain_per_cell_implementation(released, immune):
    encoded = released.encode(immune)
    assert released.cls_id == 25426 and released.vocab_size == 25427
    # Our genes module maps the symbols; the plain implementation then does everything else per cell.
    ensembl, _ = genes.map_to_ensembl(immune.var_names, organism="human", prefer=set(released.genes))
    column_token = released.token_ids([g if g is not None else "" for g in ensembl], allow_missing=True)
    expected = plain_encode(immune.X.toarray(), column_token, released.medians, released.cls_id)
    assert_same_sequences(encoded, expected)
    assert encoded.report.n_in_vocabulary == int((column_token >= 0).sum())
    assert encoded.report.n_in_vocabulary > 15_000
    assert encoded.lengths.max() == 2048 and encoded.cells_without_genes.size == 0
    assert list(encoded.obs_names) == list(immune.obs_names)


def test_hand_computed_example():
    # n_counts = 1 + 6 + 2 + 0 + 1 = 10 (the gene x outside the vocabulary counts too).
    # a: 1/10*1e4/1 = 1000; b: 6/10*1e4/2 = 3000; c: 2/10*1e4/0.5 = 4000 -> c, b, a.
    encoded = tiny_tokenizer().encode(tiny_adata([[1, 6, 2, 0, 1]]))
    np.testing.assert_array_equal(encoded[0], [6, 4, 3, 2])
    np.testing.assert_array_equal(encoded.offsets, [0, 4])


def test_ties_are_broken_by_token_id():
    # n_counts = 16: a = 2/16*1e4/1 = 1250, b = 4/16*1e4/2 = 1250, c = 1/16*1e4/0.5 = 1250 (exact ties).
    # Column order reversed in the input so that input order cannot be what decides.
    adata = tiny_adata([[1, 4, 2, 0, 9]], var_names=("c", "b", "a", "d", "x"))
    np.testing.assert_array_equal(tiny_tokenizer().encode(adata)[0], [6, 2, 3, 4])


def test_many_ties_and_near_ties_sort_like_lexsort():
    # Medians from a tiny set, some 1 ulp apart, and small counts: many values are equal or differ only in
    # their last bits, which is where a sort on truncated keys would go wrong.
    rng = np.random.default_rng(7)
    n_genes = 300
    base = np.array([1.0, 2.0, 0.5, 3.0])
    medians = rng.choice(np.concatenate([base, np.nextafter(base, np.inf), base * (1 + 1e-7)]), n_genes)
    names = [f"g{i}" for i in range(n_genes)]
    tokenizer = GeneTokenizer(names, medians, gene_id_kind="custom", organism=None)
    counts = rng.integers(0, 4, size=(40, n_genes)) * (rng.random((40, n_genes)) < 0.6)
    counts[:, :50] *= 2  # repeated values in many columns
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), var=pd.DataFrame(index=names))
    encoded = tokenizer.encode(adata, max_length=150)
    expected = plain_encode(counts, tokenizer.token_ids(names), medians, tokenizer.cls_id, max_length=150)
    assert_same_sequences(encoded, expected)


def test_max_length_keeps_the_top_genes():
    adata = tiny_adata([[1, 6, 2, 0, 1], [0, 1, 0, 0, 0]])
    tokenizer = tiny_tokenizer()
    encoded = tokenizer.encode(adata, max_length=3)
    np.testing.assert_array_equal(encoded[0], [6, 4, 3])
    np.testing.assert_array_equal(encoded[1], [6, 3])
    np.testing.assert_array_equal(tokenizer.encode(adata, max_length=1).lengths, [1, 1])
    with pytest.raises(LangCellError, match="max_length"):
        tokenizer.encode(adata, max_length=0)


def test_n_counts_from_obs_is_used_and_checked():
    adata = tiny_adata([[1, 6, 2, 0, 1]])
    adata.obs["n_counts"] = [0.0]
    with pytest.raises(LangCellError, match="n_counts"):
        tiny_tokenizer().encode(adata)
    # n_counts_key=None ignores the column and takes the matrix total.
    np.testing.assert_array_equal(tiny_tokenizer().encode(adata, n_counts_key=None)[0], [6, 4, 3, 2])
    # A value changes the medians a fit computes: count / n_counts * 1e4.
    adata.obs["n_counts"] = [40.0]
    fitted = GeneTokenizer.fit(adata, gene_id_kind="custom")
    np.testing.assert_allclose(fitted.medians, [1 / 40 * 1e4, 6 / 40 * 1e4, 2 / 40 * 1e4, 1 / 40 * 1e4])
    fitted = GeneTokenizer.fit(adata, gene_id_kind="custom", n_counts_key=None)
    np.testing.assert_allclose(fitted.medians, [1e3, 6e3, 2e3, 1e3])


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicated_genes_are_summed():
    tokenizer = tiny_tokenizer()
    # a appears three times; b twice. Row 0: a = 1 + 3 + 0 = 4 -> 4/10*1e4/1 = 4000 beats c = 2/10*1e4/0.5.
    # Row 1: only a duplicate of b is expressed (its first column is zero). Row 2: two a duplicates only.
    var_names = ["a", "b", "c", "a", "b", "a"]
    rows = [[1, 0, 1, 3, 0, 0], [0, 0, 1, 0, 5, 0], [0, 0, 0, 2, 0, 2]]
    encoded = tokenizer.encode(tiny_adata(rows, var_names=var_names))
    column_token = tokenizer.token_ids(var_names)
    expected = plain_encode(np.asarray(rows), column_token, tokenizer.medians, tokenizer.cls_id)
    assert_same_sequences(encoded, expected)
    np.testing.assert_array_equal(encoded[0], [6, 2, 4])
    np.testing.assert_array_equal(encoded[2], [6, 2])
    assert encoded.report.n_duplicated == 3


def test_cells_without_vocabulary_genes_are_kept_and_reported():
    adata = tiny_adata([[1, 6, 2, 0, 1], [0, 0, 0, 0, 5], [0, 0, 0, 0, 0]])
    with pytest.warns(UserWarning, match="2 of 3 cells"):
        encoded = tiny_tokenizer().encode(adata)
    np.testing.assert_array_equal(encoded.cells_without_genes, [1, 2])
    np.testing.assert_array_equal(encoded.lengths, [4, 1, 1])
    np.testing.assert_array_equal(encoded[1], [6])


@needs_shared
def test_chunking_dense_csc_and_unsorted_inputs_give_the_same(released, immune):
    subset = immune[:120].copy()
    reference = released.encode(subset)
    np.testing.assert_array_equal(released.encode(subset, chunk_size=7).ids, reference.ids)
    dense = ad.AnnData(subset.X.toarray(), obs=subset.obs, var=subset.var)
    np.testing.assert_array_equal(released.encode(dense, chunk_size=50).ids, reference.ids)
    csc = ad.AnnData(sp.csc_matrix(subset.X), obs=subset.obs, var=subset.var)
    np.testing.assert_array_equal(released.encode(csc, chunk_size=50).ids, reference.ids)
    # Non-canonical CSR: a row's entries reversed and one count split over two entries of one column.
    X = subset.X.tocsr()
    first, last = X.indptr[0], X.indptr[1]
    indices = np.concatenate([X.indices[first:last][::-1], X.indices[first : first + 1], X.indices[last:]])
    data = X.data.copy()
    head = data[first:last][::-1].copy()
    split = head[-1] - 1 if head[-1] > 1 else head[-1]
    head[-1] -= split
    data = np.concatenate([head, [split], X.data[last:]])
    indptr = X.indptr.copy()
    indptr[1:] += 1
    messy = sp.csr_matrix((data, indices, indptr), shape=X.shape)
    assert not messy.has_sorted_indices
    encoded = released.encode(ad.AnnData(messy, obs=subset.obs, var=subset.var))
    np.testing.assert_array_equal(encoded.ids, reference.ids)


@needs_shared
def test_backed_h5ad_and_path_give_the_same_as_in_memory(released, immune, tmp_path):
    subset = immune[:80].copy()
    path = tmp_path / "subset.h5ad"
    subset.write_h5ad(path)
    in_memory = released.encode(subset)
    backed = ad.read_h5ad(path, backed="r")
    try:
        from_backed = released.encode(backed, chunk_size=30)
    finally:
        backed.file.close()
    np.testing.assert_array_equal(from_backed.ids, in_memory.ids)
    np.testing.assert_array_equal(from_backed.offsets, in_memory.offsets)
    np.testing.assert_array_equal(released.encode(path, chunk_size=30).ids, in_memory.ids)
    # A CSC matrix on disk works too, with a warning that it is slow.
    csc_path = tmp_path / "csc.h5ad"
    ad.AnnData(sp.csc_matrix(subset.X), obs=subset.obs, var=subset.var).write_h5ad(csc_path)
    with pytest.warns(UserWarning, match="CSC on disk"):
        np.testing.assert_array_equal(released.encode(csc_path, chunk_size=30).ids, in_memory.ids)


def test_counts_from_layers_and_raw():
    counts = [[1, 6, 2, 0, 1]]
    adata = tiny_adata(counts)
    adata.layers["counts"] = adata.X.copy()
    adata.raw = adata.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    tokenizer = tiny_tokenizer()
    np.testing.assert_array_equal(tokenizer.encode(adata, counts_layer="counts")[0], [6, 4, 3, 2])
    np.testing.assert_array_equal(tokenizer.encode(adata, counts_layer="raw")[0], [6, 4, 3, 2])


def test_gene_column_is_used():
    adata = tiny_adata([[1, 6, 2, 0, 1]], var_names=("g1", "g2", "g3", "g4", "g5"))
    adata.var["name"] = ["a", "b", "c", "d", "x"]
    np.testing.assert_array_equal(tiny_tokenizer().encode(adata, gene_column="name")[0], [6, 4, 3, 2])
    with pytest.raises(LangCellError, match="no var column 'symbol'"):
        tiny_tokenizer().encode(adata, gene_column="symbol")


@needs_shared
def test_custom_vocabulary_on_cbmc(cbmc):
    subset = cbmc[::20].copy()
    tokenizer = GeneTokenizer.fit(subset, gene_id_kind="custom")
    assert tokenizer.genes == list(subset.var_names)  # every CBMC gene is expressed somewhere
    encoded = tokenizer.encode(subset)
    expected = plain_encode(
        subset.X.toarray(), tokenizer.token_ids(subset.var_names), tokenizer.medians, tokenizer.cls_id
    )
    assert_same_sequences(encoded, expected)
    assert encoded.report.id_kind == "custom" and encoded.report.n_in_vocabulary == 500


# ----------------------------------------------------------------------------------------------------
# Medians
# ----------------------------------------------------------------------------------------------------


def exact_medians(X: np.ndarray, n_counts: np.ndarray | None = None) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    totals = X.sum(axis=1) if n_counts is None else n_counts
    normalised = X / totals[:, None] * 10_000
    return np.array([np.median(normalised[X[:, j] > 0, j]) for j in range(X.shape[1])])


@needs_shared
def test_fit_exact_medians_equal_numpy(cbmc):
    subset = cbmc[:1500].copy()
    fitted = GeneTokenizer.fit(subset, gene_id_kind="custom", exact=True, chunk_size=400)
    dense = subset.X.toarray()
    expressed = (dense > 0).any(axis=0)
    assert fitted.genes == list(subset.var_names[expressed])
    np.testing.assert_array_equal(fitted.medians, exact_medians(dense)[expressed])
    assert {len(np.flatnonzero(dense[:, j] > 0)) % 2 for j in range(50)} == {0, 1}  # both median kinds


@needs_shared
def test_fit_ensembl_vocabulary_and_min_cells(immune):
    subset = immune[:150].copy()
    fitted = GeneTokenizer.fit(subset, min_cells=10, exact=True)
    assert fitted.gene_id_kind == "ensembl" and fitted.organism == "human"
    assert fitted.genes == sorted(fitted.genes) and all(g.startswith("ENSG") for g in fitted.genes)
    ensembl, _ = genes.map_to_ensembl(subset.var_names, organism="human")
    summed = genes.collapse_columns(subset.X.tocsr().astype(np.float64), ensembl, fitted.genes).toarray()
    totals = np.asarray(subset.X.sum(axis=1), dtype=np.float64).ravel()
    np.testing.assert_array_equal(fitted.medians, exact_medians(summed, totals))
    assert ((summed > 0).sum(axis=0) >= 10).all()


@pytest.mark.slow
@needs_shared
def test_approximate_medians_within_one_percent_on_real_data(immune):
    exact = GeneTokenizer.fit(immune, exact=True)
    approximate = GeneTokenizer.fit(immune, exact=False)
    assert approximate.genes == exact.genes
    relative_error = np.abs(approximate.medians / exact.medians - 1)
    assert relative_error.max() <= 0.01
    assert relative_error.max() > 0  # it really is the histogram
    # exact=None switches to the histogram once the budget is exceeded, part-way through.
    switched = GeneTokenizer.fit(immune, exact=None, max_exact_values=200_000, chunk_size=100)
    assert np.abs(switched.medians / exact.medians - 1).max() <= 0.01
    np.testing.assert_array_equal(GeneTokenizer.fit(immune, exact=None).medians, exact.medians)


@needs_shared
def test_fit_on_several_files_equals_fit_on_their_concatenation(cbmc, tmp_path):
    first, second = cbmc[:300].copy(), cbmc[300:700].copy()
    paths = [tmp_path / "first.h5ad", tmp_path / "second.h5ad"]
    first.write_h5ad(paths[0])
    second.write_h5ad(paths[1])
    from_files = GeneTokenizer.fit(paths, gene_id_kind="custom", exact=True, chunk_size=128)
    together = GeneTokenizer.fit(cbmc[:700].copy(), gene_id_kind="custom", exact=True)
    assert from_files == together


# ----------------------------------------------------------------------------------------------------
# Persistence and the Geneformer dictionaries
# ----------------------------------------------------------------------------------------------------


@needs_shared
def test_save_load_round_trip(released, tmp_path):
    released.save(tmp_path / "tok")
    loaded = GeneTokenizer.load(tmp_path / "tok")
    assert loaded == released
    assert loaded.medians.dtype == np.float64 and loaded.cls_id == released.cls_id
    custom = tiny_tokenizer()
    custom.save(tmp_path / "custom")
    assert GeneTokenizer.load(tmp_path / "custom" / TOKENIZER_FILENAME) == custom


# ----------------------------------------------------------------------------------------------------
# The vocabulary's own name dictionary (Geneformer's gene_name_id_dict) against the release's procedure
# ----------------------------------------------------------------------------------------------------


def release_procedure(adata: ad.AnnData, max_length: int = 2048) -> list[list[int]]:
    """The released model's input, computed the way the release does it, one cell at a time.

    Geneformer's procedure as LangCell's release uses it: gene symbols become Ensembl ids through
    ``gene_name_id_dict`` (exact lookup; a name it lacks is dropped); genes absent from the median
    dictionary are dropped; each cell's counts are divided by the cell's total over ALL its genes, times
    10,000, then by the gene's median; the expressed genes are ranked by that value, highest first,
    mapped to their token ids, cut to ``max_length - 1`` and preceded by ``<cls>`` (the token after the
    genes). The release sorts with ``np.argsort(-values)``, which leaves ties in no defined order; ties
    here go to the lower token id (langcell's documented rule).
    """
    name_to_id = read_geneformer_dictionary(GENEFORMER / "gene_name_id_dict.pkl")
    token_of = read_geneformer_dictionary(GENEFORMER / "token_dictionary.pkl")
    median_of = read_geneformer_dictionary(GENEFORMER / "gene_median_dictionary.pkl")
    cls_id = max(token_of.values()) + 1
    kept = []  # (column, token id, median) of every input column the release keeps
    for column, symbol in enumerate(adata.var_names):
        gene = name_to_id.get(symbol)
        if gene is not None and gene in median_of:
            kept.append((column, token_of[gene], median_of[gene]))
    counts = sp.csr_matrix(adata.X)
    sequences = []
    for i in range(adata.n_obs):
        row = counts.getrow(i)
        total = float(np.sum(row.data, dtype=np.float64))  # over all genes, before any is dropped
        present = dict(zip(row.indices.tolist(), row.data.astype(np.float64).tolist(), strict=True))
        ranked = []
        for column, token, median in kept:
            count = present.get(column, 0.0)
            if count > 0:
                ranked.append((-(count / total * 10_000 / median), token))
        ranked.sort()
        sequences.append([cls_id] + [token for _, token in ranked[: max_length - 1]])
    return sequences


@pytest.mark.slow
@needs_shared
def test_the_stored_name_dictionary_gives_the_release_procedure_cell_for_cell(immune, tmp_path):
    tokenizer = GeneTokenizer.from_geneformer(
        GENEFORMER / "token_dictionary.pkl",
        GENEFORMER / "gene_median_dictionary.pkl",
        GENEFORMER / "gene_name_id_dict.pkl",
    )
    tokenizer.save(tmp_path / "tok")
    stored = GeneTokenizer.load(tmp_path / "tok")  # the dictionary travels with the tokenizer
    assert stored == tokenizer and len(stored.name_dictionary) == 40_247  # the empty name is dropped
    expected = release_procedure(immune)
    encoded = stored.encode(immune)
    assert len(encoded) == len(expected) == 559
    for i, sequence in enumerate(expected):
        np.testing.assert_array_equal(encoded[i], sequence, err_msg=f"cell {i}")
    report = encoded.report
    assert report.n_by_name_dictionary == 19_400  # every symbol the dictionary has
    assert report.n_by_gene_table == report.n_mapped - report.n_by_name_dictionary > 0
    assert report.n_other_spellings > 0  # e.g. ZHX1-C8ORF76, which the dictionary calls ZHX1-C8orf76
    summary = report.summary()
    assert "by name dictionary" in summary and "by GENCODE v48" in summary and "other spellings" in summary
    # The test can fail: GENCODE alone maps some expressed symbols differently from the release.
    gencode_only = GeneTokenizer(tokenizer.genes, tokenizer.medians).encode(immune)
    differing = sum(not np.array_equal(gencode_only[i], expected[i]) for i in range(559))
    assert differing > 0


def test_name_dictionary_maps_first_and_gencode_only_what_it_lacks():
    # Dictionary: OLDNAME -> CD3E's id (a name GENCODE does not know), and "CD4" -> a made-up id in
    # the vocabulary (the dictionary wins over GENCODE's CD4). CD8A is not in it: GENCODE maps it.
    cd3e, cd4, cd8a, made_up = "ENSG00000198851", "ENSG00000010610", "ENSG00000153563", "ENSG00000999999"
    tokenizer = GeneTokenizer(
        [cd3e, cd4, cd8a, made_up], [1.0, 1.0, 1.0, 1.0], name_dictionary={"OLDNAME": cd3e, "CD4": made_up}
    )
    adata = tiny_adata([[1, 2, 3, 4, 5]], var_names=("OLDNAME", "CD4", "CD8A", "NOSUCHGENE", "cd3e"))
    encoded = tokenizer.encode(adata)
    # Values: OLDNAME 1, CD4 -> made_up 2, CD8A 3; "cd3e" is another spelling of the dictionary's CD3E id
    # (OLDNAME): left out as the release leaves it out, not summed into OLDNAME.
    np.testing.assert_array_equal(encoded[0], [tokenizer.cls_id, 4, 5, 2])
    report = encoded.report
    assert (report.n_by_name_dictionary, report.n_by_gene_table, report.n_other_spellings) == (2, 1, 1)
    assert report.n_mapped == 3 and report.n_unmapped == 2
    without = GeneTokenizer(tokenizer.genes, tokenizer.medians).encode(adata)
    assert without.report.n_by_name_dictionary is None and "name dictionary" not in without.report.summary()
    # GENCODE alone: cd3e -> CD3E (case-insensitive, 5), CD8A (3), CD4 -> the real CD4 (2); OLDNAME unmapped.
    np.testing.assert_array_equal(without[0], [tokenizer.cls_id, 2, 4, 3])


def test_a_tokenizer_without_a_name_dictionary_is_still_written_as_version_1(tmp_path):
    plain = GeneTokenizer(["ENSG00000198851"], [1.0])
    plain.save(tmp_path / "plain")
    content = json.loads((tmp_path / "plain" / TOKENIZER_FILENAME).read_text())
    assert content["format_version"] == 1 and "name_dictionary" not in content  # older langcell reads it
    named = GeneTokenizer(["ENSG00000198851"], [1.0], name_dictionary={"CD3E": "ENSG00000198851"})
    named.save(tmp_path / "named")
    path = tmp_path / "named" / TOKENIZER_FILENAME
    content = json.loads(path.read_text())
    assert content["format_version"] == 2 and content["name_dictionary"] == {"CD3E": "ENSG00000198851"}
    assert GeneTokenizer.load(path) == named and GeneTokenizer.load(path) != plain
    path.write_text(json.dumps({**content, "name_dictionary": {"CD3E": 7}}))
    with pytest.raises(LangCellError, match="not symbol -> Ensembl ID text"):
        GeneTokenizer.load(path)
    with pytest.raises(LangCellError, match="gene_id_kind='ensembl'"):
        GeneTokenizer(["a"], [1.0], gene_id_kind="custom", name_dictionary={"A": "a"})


def test_load_names_what_is_wrong(tmp_path):
    with pytest.raises(LangCellError, match="no tokenizer"):
        GeneTokenizer.load(tmp_path)
    tiny_tokenizer().save(tmp_path)
    path = tmp_path / TOKENIZER_FILENAME
    content = json.loads(path.read_text())

    def write(**changes):
        path.write_text(json.dumps({**content, **changes}))

    write(format_version=99)
    with pytest.raises(LangCellError, match="version 99"):
        GeneTokenizer.load(tmp_path)
    write(medians=[1.0, 2.0])
    with pytest.raises(LangCellError, match="same length"):
        GeneTokenizer.load(tmp_path)
    write(medians=[1.0, 2.0, -1.0, 4.0])
    with pytest.raises(LangCellError, match="positive"):
        GeneTokenizer.load(tmp_path)
    write(special_tokens={"<pad>": 0, "<mask>": 1, "<cls>": 2})
    with pytest.raises(LangCellError, match="special tokens"):
        GeneTokenizer.load(tmp_path)
    path.write_text("{not json")
    with pytest.raises(LangCellError, match="not valid JSON"):
        GeneTokenizer.load(tmp_path)


@needs_shared
def test_read_geneformer_dictionary_reads_numpy_scalars():
    tokens = read_geneformer_dictionary(GENEFORMER / "token_dictionary.pkl")
    assert tokens["<pad>"] == 0 and tokens["<mask>"] == 1 and tokens["ENSG00000000003"] == 2
    assert type(tokens["ENSG00000000003"]) is int


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_read_geneformer_dictionary_refuses_code(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ENSG00000000003": _Exploit(target)}))
    with pytest.raises(LangCellError, match="refused"):
        read_geneformer_dictionary(path)
    assert not target.exists()
    # An object-dtype numpy scalar could carry anything: refused as well.
    path.write_bytes(pickle.dumps({"a": np.int16(3)}).replace(b"i2", b"O8"))
    with pytest.raises(LangCellError):
        read_geneformer_dictionary(path)
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(LangCellError, match="not a dictionary"):
        read_geneformer_dictionary(path)


def test_tokenizer_layout_and_token_ids():
    tokenizer = tiny_tokenizer()
    assert (tokenizer.pad_id, tokenizer.mask_id, tokenizer.cls_id, tokenizer.vocab_size) == (0, 1, 6, 7)
    np.testing.assert_array_equal(tokenizer.token_ids(["c", "a"]), [4, 2])
    np.testing.assert_array_equal(tokenizer.token_ids(["zz", "d"], allow_missing=True), [-1, 5])
    with pytest.raises(LangCellError, match="not in the vocabulary"):
        tokenizer.token_ids(["zz"])
    with pytest.raises(LangCellError, match="repeats"):
        GeneTokenizer(["a", "a"], [1.0, 1.0], gene_id_kind="custom")
    with pytest.raises(LangCellError, match="one median per gene"):
        GeneTokenizer(["a", "b"], [1.0], gene_id_kind="custom")


# ----------------------------------------------------------------------------------------------------
# Input checks, for encode and fit alike
# ----------------------------------------------------------------------------------------------------


def run(action: str, adata, **kwargs):
    if action == "encode":
        return tiny_tokenizer().encode(adata, **kwargs)
    return GeneTokenizer.fit(adata, gene_id_kind="custom", **kwargs)


@pytest.mark.parametrize("action", ["encode", "fit"])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (2500.5, "non-integer"),
        (-1.0, "negative"),
        (np.nan, "NaN or infinite"),
        (np.inf, "NaN or infinite"),
    ],
)
def test_bad_values_are_refused(action, value, message):
    adata = tiny_adata([[1, 6, 2, 0, 1], [1, 1, 1, 1, 1]])
    adata.X[1, 2] = value
    with pytest.raises(LangCellError, match=message) as error:
        run(action, adata)
    assert "raw counts" in str(error.value)


@pytest.mark.parametrize("action", ["encode", "fit"])
def test_log_normalised_data_is_refused(action):
    adata = tiny_adata([[1, 6, 2, 0, 1], [3, 1, 0, 2, 7]])
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray() / adata.X.sum(axis=1).A * 1e4))
    with pytest.raises(LangCellError, match="log-normalised") as error:
        run(action, adata)
    assert "counts_layer='counts'" in str(error.value) and "use_raw" in str(error.value)


@pytest.mark.parametrize("action", ["encode", "fit"])
def test_empty_anndata_is_refused(action):
    with pytest.raises(LangCellError, match="empty"):
        run(action, tiny_adata([[1, 6, 2, 0, 1]])[:0].copy())


@pytest.mark.parametrize("action", ["encode", "fit"])
def test_missing_counts_layer_is_refused(action):
    with pytest.raises(LangCellError, match="no layer 'counts'"):
        run(action, tiny_adata([[1, 6, 2, 0, 1]]), counts_layer="counts")
    with pytest.raises(LangCellError, match="no .raw"):
        run(action, tiny_adata([[1, 6, 2, 0, 1]]), counts_layer="raw")


@needs_shared
def test_mouse_genes_given_to_the_human_vocabulary(released):
    mouse = ["Cd3e", "Ptprc", "Actb", "Cd19", "Lyz2", "Cd8a", "Gapdh", "Malat1"]
    adata = ad.AnnData(
        sp.csr_matrix(np.ones((3, len(mouse)), dtype=np.float32)), var=pd.DataFrame(index=mouse)
    )
    with pytest.raises(LangCellError, match="look like mouse genes but the vocabulary is human"):
        released.encode(adata)


def test_no_gene_in_a_custom_vocabulary():
    with pytest.raises(LangCellError, match="none of the 2 genes"):
        tiny_tokenizer().encode(tiny_adata([[1, 2]], var_names=("p", "q")))


def test_no_warning_for_clean_input():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_tokenizer().encode(tiny_adata([[1, 6, 2, 0, 1]]))


@pytest.mark.slow
def test_tokenizing_keeps_the_torch_thread_count():
    # numba's first parallel launch resets OpenMP's thread count, which torch reads; the tokenizer
    # restores it so that a user's torch.set_num_threads survives tokenization.
    import subprocess
    import sys

    code = (
        "import torch, numpy as np, anndata as ad, scipy.sparse as sp\n"
        "torch.set_num_threads(1)\n"
        "assert torch.get_num_threads() == 1\n"  # torch's thread pool is live before numba's first launch
        "from langcell.data.tokenizer import GeneTokenizer\n"
        "x = sp.random(30, 40, density=0.3, format='csr', random_state=0, dtype=np.float64)\n"
        "x.data = np.ceil(x.data * 10)\n"
        "a = ad.AnnData(x)\n"
        "a.var_names = [f'g{i}' for i in range(40)]\n"
        "tok = GeneTokenizer.fit(a, gene_id_kind='custom')\n"
        "tok.encode(a)\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "1"


def test_float16_counts_tokenize_like_float32():
    # scipy has no float16 sparse matrices; the counts are read as float32 (exact for counts up to 2048).
    import anndata as ad

    rng = np.random.default_rng(0)
    counts = (rng.poisson(3.0, size=(10, 8)) + 1).astype(np.float32)
    var = pd.DataFrame(index=[f"gene_{i}" for i in range(8)])
    tokenizer = GeneTokenizer.fit(ad.AnnData(counts, var=var), gene_id_kind="custom")
    half = tokenizer.encode(ad.AnnData(counts.astype(np.float16), var=var))
    full = tokenizer.encode(ad.AnnData(counts, var=var))
    assert np.array_equal(half.ids, full.ids) and np.array_equal(half.offsets, full.offsets)

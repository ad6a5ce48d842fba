"""Tests for langcell.data.corpus: writing a sharded corpus from h5ad files and reading it back."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from langcell.data.corpus import MANIFEST_FILENAME, TokenCorpus, write_corpus
from langcell.data.tokenizer import GeneTokenizer
from langcell.errors import LangCellError

SHARED = Path(__file__).resolve().parents[3] / "shared"
CBMC = SHARED / "data" / "cbmc_citeseq_500genes.h5ad"
IMMUNE = SHARED / "data" / "immune_sample_559cells_counts.h5ad"
GENEFORMER = SHARED / "reference" / "geneformer"

pytestmark = pytest.mark.skipif(
    not CBMC.is_file(), reason=f"shared data not found at {SHARED} (clone the project beside ../shared)"
)


@pytest.fixture(scope="module")
def cbmc() -> ad.AnnData:
    return ad.read_h5ad(CBMC)


@pytest.fixture(scope="module")
def tokenizer(cbmc) -> GeneTokenizer:
    return GeneTokenizer.fit(cbmc, gene_id_kind="custom")


@pytest.fixture()
def two_files(cbmc, tmp_path) -> list[Path]:
    """Two small h5ad files with different obs columns."""
    first = cbmc[:130].copy()
    second = cbmc[500:590].copy()
    second.obs = second.obs[["cell_type", "organism"]].copy()
    second.obs["batch"] = 7
    paths = [tmp_path / "first.h5ad", tmp_path / "second.h5ad"]
    first.write_h5ad(paths[0])
    second.write_h5ad(paths[1])
    return paths


def test_written_corpus_equals_encode(two_files, tokenizer, tmp_path, cbmc):
    out = tmp_path / "corpus"
    # 50 cells per shard: shards split inside a file and straddle the two files.
    corpus = write_corpus(
        two_files, tokenizer, out, shard_size=50, chunk_size=40, max_length=100, progress=False
    )
    expected = [tokenizer.encode(path, max_length=100) for path in two_files]
    sequences = [seq for encoded in expected for seq in (encoded[i] for i in range(len(encoded)))]
    assert len(corpus) == 220 and len(corpus.manifest["shards"]) == 5
    for i, sequence in enumerate(sequences):
        np.testing.assert_array_equal(corpus[i], sequence)
    np.testing.assert_array_equal(corpus.lengths, [len(s) for s in sequences])
    assert corpus.n_tokens == sum(len(s) for s in sequences)
    assert corpus[0].dtype == np.uint16  # smallest dtype that holds the 503-token vocabulary
    assert corpus.tokenizer == tokenizer

    obs = corpus.obs
    assert list(obs["obs_name"]) == list(cbmc.obs_names[:130]) + list(cbmc.obs_names[500:590])
    assert list(obs["source_file"].unique()) == [str(p) for p in two_files]
    assert list(obs["cell_type"]) == list(cbmc.obs["cell_type"][:130]) + list(cbmc.obs["cell_type"][500:590])
    assert obs["author_cell_type"].isna().sum() == 90  # not in the second file
    assert (obs["batch"].iloc[130:] == 7).all()

    manifest = json.loads((out / MANIFEST_FILENAME).read_text())
    assert manifest["format_version"] == 1 and manifest["n_cells"] == 220
    assert [s["n_cells"] for s in manifest["shards"]] == [50, 50, 50, 50, 20]
    assert manifest["sources"][0]["gene_mapping"]["n_in_vocabulary"] == 500
    assert [r.n_in_vocabulary for r in corpus.reports] == [500, 500]
    assert corpus.reports[1].summary() == tokenizer.encode(two_files[1]).report.summary()
    corpus.verify()


def test_random_access_and_batches(two_files, tokenizer, tmp_path):
    corpus = write_corpus(two_files, tokenizer, tmp_path / "corpus", shard_size=64, progress=False)
    encoded = tokenizer.encode(two_files[1])
    rng = np.random.default_rng(0)
    for i in rng.integers(0, 90, size=20):
        np.testing.assert_array_equal(corpus[130 + int(i)], encoded[int(i)])
    np.testing.assert_array_equal(corpus[-1], encoded[89])
    with pytest.raises(IndexError):
        corpus[220]

    indices = [5, 140, 63, 64]
    batch = corpus.batch(indices)
    width = max(len(corpus[i]) for i in indices)
    assert batch["input_ids"].shape == (4, width) and batch["input_ids"].dtype == np.int64
    for row, i in enumerate(indices):
        n = len(corpus[i])
        np.testing.assert_array_equal(batch["input_ids"][row, :n], corpus[i])
        assert (batch["input_ids"][row, n:] == tokenizer.pad_id).all()
        np.testing.assert_array_equal(batch["attention_mask"][row], np.arange(width) < n)
    padded = corpus.batch(indices, pad_to=width + 5)
    assert padded["input_ids"].shape == (4, width + 5) and padded["attention_mask"][:, width:].sum() == 0
    cut = corpus.batch(indices, pad_to=3)
    np.testing.assert_array_equal(cut["input_ids"], np.stack([corpus[i][:3] for i in indices]))


def test_obs_columns_are_selected(two_files, tokenizer, tmp_path):
    corpus = write_corpus(
        two_files, tokenizer, tmp_path / "corpus", obs_columns=["cell_type"], progress=False
    )
    assert list(corpus.obs.columns) == ["cell_type", "source_file", "obs_name"]
    assert isinstance(corpus.obs["cell_type"].dtype, pd.CategoricalDtype)
    with pytest.raises(LangCellError, match="no obs columns \\['tissue'\\]"):
        write_corpus(two_files, tokenizer, tmp_path / "other", obs_columns=["tissue"], progress=False)


def test_read_obs_reads_only_the_columns_asked_for(two_files, tokenizer, tmp_path):
    write_corpus(two_files, tokenizer, tmp_path / "corpus", progress=False)
    fresh = TokenCorpus(tmp_path / "corpus")  # nothing read yet: read_obs goes to the file
    some = fresh.read_obs(["cell_type", "no_such_column", "batch"])
    assert fresh._obs is None and list(some.columns) == ["cell_type", "batch"]
    full = TokenCorpus(tmp_path / "corpus").obs
    for column in ("cell_type", "batch"):
        pd.testing.assert_series_equal(some[column], full[column].reset_index(drop=True))
    assert isinstance(some["cell_type"].dtype, pd.CategoricalDtype) and list(some.index) == list(range(220))
    # obs_name: one string per cell, stored as strings rather than a category per cell.
    assert full["obs_name"].dtype == object and full["obs_name"].is_unique


def test_mixed_metadata_is_stored_as_text(cbmc, tokenizer, tmp_path):
    # In-memory AnnData objects can hold columns h5ad cannot write as they are (str, int and None mixed).
    first, second = cbmc[:3].copy(), cbmc[3:6].copy()
    first.obs["note"] = pd.Series(["x", None, 3], index=first.obs_names, dtype=object)
    corpus = write_corpus([first, second], tokenizer, tmp_path / "corpus", progress=False)
    note = corpus.obs["note"]
    assert list(note.iloc[[0, 2]]) == ["x", "3"]
    assert note.isna().tolist() == [False, True, False, True, True, True]
    assert list(corpus.obs["source_file"].unique()) == ["input #0", "input #1"]


def test_missing_or_damaged_shard_is_named(two_files, tokenizer, tmp_path):
    out = tmp_path / "corpus"
    write_corpus(two_files, tokenizer, out, shard_size=100, progress=False)
    ids_file = out / "shards" / "shard_00001.ids.npy"
    content = ids_file.read_bytes()

    ids_file.write_bytes(content[: len(content) // 2])
    with pytest.raises(LangCellError, match="shard 'shard_00001'.*truncated"):
        TokenCorpus(out)

    ids_file.unlink()
    with pytest.raises(LangCellError, match="shard 'shard_00001' .*missing"):
        TokenCorpus(out)

    damaged = bytearray(content)
    damaged[-1] ^= 0xFF
    ids_file.write_bytes(bytes(damaged))
    corpus = TokenCorpus(out)  # same size: only the checksum can tell
    with pytest.raises(LangCellError, match="shard 'shard_00001'.*checksum"):
        corpus.verify()

    (out / MANIFEST_FILENAME).unlink()
    with pytest.raises(LangCellError, match="not a token corpus"):
        TokenCorpus(out)


def test_an_error_mid_write_leaves_nothing(two_files, tokenizer, tmp_path):
    bad = ad.read_h5ad(two_files[1])
    bad.X = bad.X.copy()
    bad.X.data = np.log1p(bad.X.data)  # log-normalised: refused when its chunk is read
    out = tmp_path / "corpus"
    # The first file is tokenized and its shard written before the second one fails.
    with pytest.raises(LangCellError, match="log-normalised"):
        write_corpus([two_files[0], bad], tokenizer, out, shard_size=50, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.h5ad", "second.h5ad"]


def test_existing_output_needs_overwrite(two_files, tokenizer, tmp_path):
    out = tmp_path / "corpus"
    write_corpus(two_files[0], tokenizer, out, progress=False)
    with pytest.raises(LangCellError, match="already exists"):
        write_corpus(two_files[1], tokenizer, out, progress=False)
    corpus = write_corpus(two_files[1], tokenizer, out, overwrite=True, progress=False)
    assert len(corpus) == 90


@pytest.mark.skipif(not IMMUNE.is_file(), reason=f"{IMMUNE} not found")
def test_released_vocabulary_corpus_from_symbols(tmp_path):
    released = GeneTokenizer.from_geneformer(
        GENEFORMER / "token_dictionary.pkl", GENEFORMER / "gene_median_dictionary.pkl"
    )
    subset = ad.read_h5ad(IMMUNE)[:40].copy()
    corpus = write_corpus(subset, released, tmp_path / "corpus", progress=False)
    encoded = released.encode(subset)
    assert corpus[0].dtype == np.uint16  # 25,427 tokens fit 16 bits
    for i in range(len(subset)):
        np.testing.assert_array_equal(corpus[i], encoded[i])
    assert corpus.manifest["sources"][0]["gene_mapping"]["id_kind"] == "symbol"
    assert corpus.obs["source_file"].iloc[0] == "input #0"

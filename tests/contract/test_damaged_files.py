"""Damaged inputs are refused with one clear line instead of training or writing silently."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from langcell import tl
from langcell._checks import check_key_added
from langcell.data.corpus import TokenCorpus, write_corpus
from langcell.data.tokenizer import GeneTokenizer
from langcell.errors import LangCellError


@pytest.fixture
def corpus(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    adata = ad.AnnData(
        sp.csr_matrix(rng.poisson(3.0, size=(20, 12)).astype(np.float32) + 1),
        obs=pd.DataFrame(index=[f"cell_{i}" for i in range(20)]),
        var=pd.DataFrame(index=[f"gene_{i}" for i in range(12)]),
    )
    tokenizer = GeneTokenizer.fit(adata, gene_id_kind="custom")
    write_corpus(adata, tokenizer, tmp_path / "corpus", shard_size=8, progress=False)
    return tmp_path / "corpus"


def manifest_of(corpus: Path) -> dict:
    return json.loads((corpus / "manifest.json").read_text())


def test_flipped_bytes_in_a_shard_are_found_on_the_first_read(corpus):
    entry = manifest_of(corpus)["shards"][1]["files"]["ids"]
    path = corpus / entry["path"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last token id of the shard, still a valid id
    path.write_bytes(bytes(data))
    opened = TokenCorpus(corpus)  # sizes and offsets still agree: opening is fine
    assert len(opened[0]) > 0  # shard 0 is intact
    with pytest.raises(LangCellError, match="does not match its checksum"):
        opened[10]  # the first read of shard 1
    assert len(TokenCorpus(corpus, verify_on_read=False)[10]) > 0  # the opt-out reads without checking


def test_offsets_that_disagree_with_the_lengths_are_refused_on_open(corpus):
    entry = manifest_of(corpus)["shards"][0]["files"]["lengths"]
    path = corpus / entry["path"]
    lengths = np.load(path)
    lengths[0] += 1
    lengths[1] -= 1
    np.save(path, lengths)  # same size, same token total: only the offsets check sees it
    with pytest.raises(LangCellError, match="offsets do not agree"):
        TokenCorpus(corpus)


def test_a_shard_path_outside_the_corpus_is_refused(corpus, tmp_path):
    manifest = manifest_of(corpus)
    outside = tmp_path / "stolen.npy"
    source = corpus / manifest["shards"][0]["files"]["ids"]["path"]
    outside.write_bytes(source.read_bytes())
    manifest["shards"][0]["files"]["ids"]["path"] = "../stolen.npy"
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LangCellError, match="outside the corpus directory"):
        TokenCorpus(corpus)


def test_a_key_with_a_slash_is_refused_before_any_work():
    with pytest.raises(LangCellError, match="contains '/'.*'a_b'"):
        check_key_added("a/b")
    with pytest.raises(LangCellError, match="contains '/'"):
        tl.annotate(ad.AnnData(np.ones((2, 2), dtype=np.float32)), object(), ["B cell"], key_added="a/b")

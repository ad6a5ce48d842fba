"""tl.embed: the scanpy contract, equality with one-cell-at-a-time encoding, backed streaming."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from langcell import tl
from langcell.data.tokenizer import GeneTokenizer
from langcell.errors import LangCellError
from langcell.models.config import LangCellConfig
from langcell.models.langcell import LangCell

CBMC = Path(__file__).resolve().parents[3] / "shared" / "data" / "cbmc_citeseq_500genes.h5ad"
pytestmark = pytest.mark.skipif(not CBMC.is_file(), reason=f"{CBMC} is missing")


@pytest.fixture(scope="module")
def cells_and_model():
    adata = ad.read_h5ad(CBMC)[:60].copy()
    tokenizer = GeneTokenizer.fit(adata, gene_id_kind="custom")
    config = LangCellConfig.preset("tiny")
    config.cell.vocab_size = tokenizer.vocab_size
    config.cell.max_position_embeddings = 512
    torch.manual_seed(0)
    model = LangCell.from_config(config, gene_tokenizer=tokenizer).eval()
    return adata, model


def test_embeddings_equal_encoding_each_cell_alone(cells_and_model):
    adata, model = cells_and_model
    tl.embed(adata, model, max_tokens=3000, chunk_size=25)
    emb = adata.obsm["X_langcell"]
    assert emb.shape == (60, model.config.projection_dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    tokens = model.gene_tokenizer.encode(adata, max_length=512)
    with torch.no_grad():
        for i in range(0, 60, 7):
            ids = torch.as_tensor(tokens[i], dtype=torch.long)[None]
            alone, _ = model.encode_cells({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            np.testing.assert_allclose(emb[i], alone[0].numpy(), atol=1e-5)
    assert adata.uns["X_langcell"]["params"]["max_length"] == 512


def test_copy_leaves_the_input_alone(cells_and_model):
    adata, model = cells_and_model
    fresh = adata.copy()
    fresh.obsm.clear()
    out = tl.embed(fresh, model, copy=True, key_added="emb")
    assert "emb" in out.obsm and "emb" not in fresh.obsm


def test_backed_file_streams_to_the_same_result(cells_and_model, tmp_path):
    adata, model = cells_and_model
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    tl.embed(backed, model, chunk_size=16)
    in_memory = tl.embed(ad.read_h5ad(path), model, chunk_size=1000, copy=True)
    np.testing.assert_allclose(backed.obsm["X_langcell"], in_memory.obsm["X_langcell"], atol=1e-5)
    backed.file.close()


def test_model_without_gene_tokenizer_is_refused(cells_and_model):
    adata, model = cells_and_model
    bare = LangCell(model.config, text_tokenizer=model.text_tokenizer)
    with pytest.raises(LangCellError, match="gene tokenizer"):
        tl.embed(adata, bare)

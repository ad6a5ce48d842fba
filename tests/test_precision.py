"""Inference precision: name checks, bf16 autocast against fp32 on real cells, refusals before any work."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from langcell import tl
from langcell.cli import main
from langcell.data.tokenizer import GeneTokenizer
from langcell.errors import LangCellError
from langcell.inference.embed import embed_cells
from langcell.inference.zero_shot import encode_class_texts, zero_shot_scores
from langcell.models.config import LangCellConfig
from langcell.models.langcell import LangCell
from langcell.precision import autocast, check_precision

CBMC = Path(__file__).resolve().parents[2] / "shared" / "data" / "cbmc_citeseq_500genes.h5ad"
needs_cbmc = pytest.mark.skipif(not CBMC.is_file(), reason=f"{CBMC} is missing")
TEXTS = {
    "B cell": "a lymphocyte of B lineage that makes antibodies",
    "monocyte": "a myeloid mononuclear phagocyte found in the blood",
    "NK cell": "a lymphocyte that kills virus-infected cells without prior sensitisation",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cells_and_model():
    adata = ad.read_h5ad(CBMC)[:40].copy()
    tokenizer = GeneTokenizer.fit(adata, gene_id_kind="custom")
    config = LangCellConfig.preset("tiny")
    config.cell.vocab_size = tokenizer.vocab_size
    config.cell.max_position_embeddings = 256
    torch.manual_seed(0)
    model = LangCell.from_config(config, gene_tokenizer=tokenizer).eval()
    return adata, model, tokenizer.encode(adata, max_length=256)


def test_precision_names_and_devices():
    assert check_precision("bf16", torch.device("cpu")) == "bf16"
    assert check_precision("fp16") == "fp16"  # no device: name check only
    with pytest.raises(LangCellError, match="one of fp32, bf16, fp16"):
        check_precision("float16")
    with pytest.raises(LangCellError, match="needs a CUDA device"):
        check_precision("fp16", torch.device("cpu"))


def test_autocast_sets_the_matmul_type_and_fp32_is_a_no_op():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("bf16", torch.device("cpu")):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("fp32", torch.device("cpu")):
        assert (a @ b).dtype == torch.float32


@needs_cbmc
def test_bf16_embeddings_agree_with_fp32(cells_and_model):
    _, model, cells = cells_and_model
    full = embed_cells(model, cells)
    half = embed_cells(model, cells, precision="bf16")
    assert half.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(half, axis=1), 1.0, atol=1e-3)
    cosine = np.sum(full * half, axis=1)
    assert cosine.min() > 0.99
    assert not np.array_equal(full, half)  # bf16 really ran: the numbers moved


@needs_cbmc
def test_bf16_zero_shot_scores_are_float32_and_close_to_fp32(cells_and_model):
    _, model, cells = cells_and_model
    results = {}
    for precision in ("fp32", "bf16"):
        classes = encode_class_texts(model, TEXTS, precision=precision)
        assert classes.embeddings.dtype == torch.float32
        results[precision] = zero_shot_scores(model, cells, classes, mode="official", precision=precision)
    full, half = results["fp32"], results["bf16"]
    for name in ("similarity", "match_prob", "scores"):
        assert getattr(half, name).dtype == np.float32
    np.testing.assert_allclose(half.similarity, full.similarity, atol=0.03)
    np.testing.assert_allclose(half.match_prob, full.match_prob, atol=0.03)
    np.testing.assert_allclose(half.scores.sum(axis=1), 1.0, atol=1e-5)


@needs_cbmc
def test_bad_precision_is_refused_before_anything_is_written(cells_and_model):
    adata, model, _ = cells_and_model
    fresh = adata.copy()
    with pytest.raises(LangCellError, match="needs a CUDA device"):
        tl.annotate(fresh, model, TEXTS, precision="fp16")
    with pytest.raises(LangCellError, match="precision must be one of"):
        tl.embed(fresh, model, precision="half")
    assert "langcell_cell_type" not in fresh.obs and "X_langcell" not in fresh.obsm
    tl.embed(fresh, model, precision="bf16")
    assert fresh.uns["X_langcell"]["params"]["precision"] == "bf16"


@needs_cbmc
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_refuses_cuda_without_a_gpu(cells_and_model, tmp_path, capsys):
    adata, model, _ = cells_and_model
    model.save_pretrained(tmp_path / "model")
    adata.write_h5ad(tmp_path / "cells.h5ad")
    status = main(["embed", str(tmp_path / "cells.h5ad"), "--model", str(tmp_path / "model"),
                   "--out", str(tmp_path / "out.h5ad"), "--device", "cuda", "--quiet"])
    assert status == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out.h5ad").exists()

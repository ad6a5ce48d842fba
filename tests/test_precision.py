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
from langcell.precision import autocast, check_precision, cpu_matrix_units, inference_precision
from langcell.train.config import PretrainConfig

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


# ------------------------------------------------------------------------- CPU bf16 weights and int8
def _state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_int8_is_a_cpu_inference_precision():
    assert check_precision("int8", torch.device("cpu")) == "int8"
    with pytest.raises(LangCellError, match="'int8' is for CPUs"):
        check_precision("int8", torch.device("cuda"))
    with pytest.raises(LangCellError, match="inference only"):
        autocast("int8", torch.device("cpu"))
    with pytest.raises(LangCellError, match="inference only"):
        PretrainConfig(precision="int8").validate()


def test_cpu_bf16_holds_linear_and_embedding_weights_in_bf16_and_gives_them_back(cells_and_model):
    _, model, _ = cells_and_model
    before = _state(model)
    with inference_precision(model, "bf16", torch.device("cpu")):
        layers = list(model.modules())
        assert {m.weight.dtype for m in layers if isinstance(m, torch.nn.Linear | torch.nn.Embedding)} == {torch.bfloat16}
        # LayerNorm and the temperature stay fp32: LayerNorm accumulates in fp32, the scores need 20x/0.05.
        assert {m.weight.dtype for m in layers if isinstance(m, torch.nn.LayerNorm)} == {torch.float32}
        assert model.logit_scale.dtype == torch.float32
        with inference_precision(model, "bf16", torch.device("cpu")):  # nesting is harmless
            pass
        assert model.cell_proj.weight.dtype == torch.bfloat16
    after = model.state_dict()
    assert all(torch.equal(after[name], tensor) and after[name].dtype == tensor.dtype for name, tensor in before.items())


def test_bf16_weights_false_autocasts_instead_and_leaves_the_weights_alone(cells_and_model):
    # The choice the GPU measurements make between the two bf16 mechanisms, tried here on the CPU.
    _, model, _ = cells_and_model
    x = torch.randn(3, model.cell_proj.in_features)
    with inference_precision(model, "bf16", torch.device("cpu"), bf16_weights=False):
        assert model.cell_proj.weight.dtype == torch.float32
        assert model.cell_proj(x).dtype == torch.bfloat16  # autocast runs the product in bf16
    with inference_precision(model, "bf16", torch.device("cpu"), bf16_weights=True):
        assert model.cell_proj.weight.dtype == torch.bfloat16


def test_weights_come_back_after_an_exception_in_the_block(cells_and_model):
    _, model, _ = cells_and_model
    before = _state(model)
    for precision in ("bf16", "int8"):
        with pytest.raises(RuntimeError, match="inside"):
            with inference_precision(model, precision, torch.device("cpu")):
                raise RuntimeError("inside")
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert all(type(m) is not torch.nn.Linear or m.weight.dtype == torch.float32 for m in model.modules())


def test_int8_swaps_every_linear_layer_for_the_block_only(cells_and_model):
    _, model, _ = cells_and_model
    linears = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    weight, bias = model.cell_proj.weight.detach().clone(), model.cell_proj.bias.detach().clone()
    with inference_precision(model, "int8", torch.device("cpu")):
        inside = dict(model.named_modules())
        assert linears and all(type(inside[name]) is not torch.nn.Linear for name in linears)
        x = torch.randn(40, model.cell_proj.in_features)
        # Against an independent fp32 product with the original weights: int8 error, not a different layer.
        assert torch.allclose(inside["cell_proj"](x), x @ weight.T + bias,
                              atol=0.05 * float(x.abs().max()))
    assert [name for name, m in model.named_modules() if type(m) is torch.nn.Linear] == linears


def test_int8_annotation_quantises_the_cell_side_and_keeps_the_text_tower_fp32(cells_and_model):
    _, model, cells = cells_and_model
    ran = {"cell": set(), "text": set()}

    def count(side):
        def hook(module, inputs, output):
            ran[side].add("fp32" if type(module) is torch.nn.Linear else "int8")
        return hook

    # torch's swap keeps a layer's hooks on its int8 copy: each hook records which kind of layer ran.
    handles = [m.register_forward_hook(count("cell")) for m in model.cell_modules().modules() if type(m) is torch.nn.Linear]
    handles += [m.register_forward_hook(count("text")) for m in model.text_encoder.modules() if type(m) is torch.nn.Linear]
    try:
        classes = encode_class_texts(model, TEXTS, precision="int8")
        zero_shot_scores(model, cells, classes, precision="int8")
        embed_cells(model, cells, precision="int8")
    finally:
        for handle in handles:
            handle.remove()
    assert ran == {"cell": {"int8"}, "text": {"fp32"}}
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))


@needs_cbmc
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_cpu_low_precision_embeddings_and_answers_agree_with_fp32(cells_and_model, precision):
    _, model, cells = cells_and_model
    full = embed_cells(model, cells)
    low = embed_cells(model, cells, precision=precision)
    assert low.dtype == np.float32 and not np.array_equal(full, low)  # the low precision really ran
    np.testing.assert_allclose(np.linalg.norm(low, axis=1), 1.0, atol=1e-3)
    assert np.sum(full * low, axis=1).min() > 0.99
    results = {}
    for name in ("fp32", precision):
        classes = encode_class_texts(model, TEXTS, precision=name)
        results[name] = zero_shot_scores(model, cells, classes, mode="official", precision=name)
    # Numbers only: a random model's classes are near ties, so whether answers change is measured on
    # trained models (benchmarks/cpu_precision.py), not here.
    for field in ("similarity", "match_prob", "scores"):
        low, full = getattr(results[precision], field), getattr(results["fp32"], field)
        assert low.dtype == np.float32 and not np.array_equal(low, full)
        np.testing.assert_allclose(low, full, atol=0.03)


def test_a_cpu_without_matrix_units_is_warned(monkeypatch):
    import langcell.precision as precision_module

    monkeypatch.setattr(precision_module, "cpu_matrix_units", lambda: frozenset())
    precision_module._warn_if_not_accelerated.cache_clear()
    try:
        with pytest.warns(UserWarning, match="slower than fp32"):
            check_precision("bf16", torch.device("cpu"))
        with pytest.warns(UserWarning, match="avx512_vnni"):
            check_precision("int8", torch.device("cpu"))
    finally:
        precision_module._warn_if_not_accelerated.cache_clear()


def test_matrix_units_are_the_cpu_flags_we_know():
    units = cpu_matrix_units()
    assert units <= {"amx_bf16", "avx512_bf16", "amx_int8", "avx512_vnni", "avx_vnni"}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
        assert all(unit in flags for unit in units)


@needs_cbmc
def test_cli_embeds_in_int8(cells_and_model, tmp_path):
    adata, model, _ = cells_and_model
    model.save_pretrained(tmp_path / "model")
    adata.write_h5ad(tmp_path / "cells.h5ad")
    status = main(["embed", str(tmp_path / "cells.h5ad"), "--model", str(tmp_path / "model"),
                   "--out", str(tmp_path / "out.h5ad"), "--precision", "int8", "--device", "cpu", "--quiet"])
    assert status == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.uns["X_langcell"]["params"]["precision"] == "int8"
    assert np.sum(out.obsm["X_langcell"] * embed_cells(model, model.gene_tokenizer.encode(adata, max_length=256)),
                  axis=1).min() > 0.99

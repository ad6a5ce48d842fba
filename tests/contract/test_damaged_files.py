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


def _set_token_and_rehash(corpus: Path, shard: int, position: int, value: int) -> None:
    """Write ``value`` at ``position`` of a shard's ids and record the new checksum, as a careful forger would."""
    import hashlib

    manifest = manifest_of(corpus)
    entry = manifest["shards"][shard]["files"]["ids"]
    path = corpus / entry["path"]
    ids = np.load(path)
    ids[position] = value
    np.save(path, ids)
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    entry["bytes"] = path.stat().st_size
    (corpus / "manifest.json").write_text(json.dumps(manifest))


def test_a_token_id_outside_the_vocabulary_is_refused_on_the_first_read(corpus):
    vocab_size = TokenCorpus(corpus).tokenizer.vocab_size  # 15: 12 genes + <pad>, <mask>, <cls>
    _set_token_and_rehash(corpus, 1, -1, 200)  # still a uint8, and the checksum matches
    for verify_on_read in (True, False):  # the id check does not depend on the checksum opt-out
        opened = TokenCorpus(corpus, verify_on_read=verify_on_read)
        assert len(opened[0]) > 0  # shard 0 is intact
        with pytest.raises(LangCellError, match=rf"token id 200, outside .* \(ids 0\.\.{vocab_size - 1}\)"):
            opened[10]  # the first read of shard 1
    with pytest.raises(LangCellError, match="token id 200"):
        TokenCorpus(corpus).verify()
    _set_token_and_rehash(corpus, 1, -1, vocab_size - 1)  # the largest id there is: fine
    assert TokenCorpus(corpus)[15][-1] == vocab_size - 1


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "1"])
def test_pretraining_on_a_shard_with_an_id_outside_the_vocabulary_is_one_line(corpus, tmp_path, capsys, workers):
    from langcell.cli import main

    for shard in range(3):  # every shard, so that the first batch meets one
        _set_token_and_rehash(corpus, shard, -1, 200)
    code = main(["pretrain", "--config", "tiny", "--stage", "cell", "--corpus", str(corpus), "--device", "cpu",
                 "--out", str(tmp_path / "run"), "--max-steps", "2", "--num-workers", workers, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("langcell pretrain: error: shard ") and "token id 200" in err[0]


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


# ------------------------------------------------------------------------------------------ models
@pytest.fixture
def saved_model(tmp_path) -> Path:
    import torch

    from langcell.models.config import LangCellConfig
    from langcell.models.langcell import LangCell

    genes = GeneTokenizer([f"gene_{i}" for i in range(12)], np.ones(12), gene_id_kind="custom")
    torch.manual_seed(0)
    LangCell.from_config(LangCellConfig.preset("tiny"), gene_tokenizer=genes).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_a_model_with_nan_weights_is_refused_on_load(saved_model):
    from safetensors.torch import load_file, save_file

    from langcell.models.langcell import LangCell

    tensors = load_file(saved_model / "model.safetensors")
    name = next(k for k in sorted(tensors) if k.endswith("weight"))
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(saved_model / "model.safetensors"))
    with pytest.raises(LangCellError, match="NaN or infinite values"):
        LangCell.from_pretrained(saved_model)


def test_a_config_with_a_negative_layer_norm_eps_is_refused(saved_model):
    from langcell.models.langcell import LangCell

    document = json.loads((saved_model / "config.json").read_text())
    document["config"]["cell"]["layer_norm_eps"] = -1e-12
    (saved_model / "config.json").write_text(json.dumps(document))
    with pytest.raises(LangCellError, match="layer_norm_eps must be a small positive number"):
        LangCell.from_pretrained(saved_model)


def test_a_text_tokenizer_without_a_vocabulary_is_refused(saved_model):
    from langcell.models.langcell import LangCell

    for name in ("vocab.txt", "tokenizer.json"):
        (saved_model / "text_tokenizer" / name).unlink(missing_ok=True)
    with pytest.raises(LangCellError, match="holds no tokenizer vocabulary"):
        LangCell.from_pretrained(saved_model)


@pytest.mark.parametrize("bad", [5, "", "  ", None, float("nan")])
def test_a_gene_name_that_is_no_name_is_refused(bad):
    with pytest.raises(LangCellError, match="gene names must be non-empty strings"):
        GeneTokenizer(["gene_a", bad], [1.0, 1.0], gene_id_kind="custom")


def test_non_finite_scores_are_refused_at_the_end_of_scoring(saved_model):
    import torch

    from langcell.inference.zero_shot import encode_class_texts, zero_shot_scores
    from langcell.models.langcell import LangCell

    model = LangCell.from_pretrained(saved_model)
    classes = encode_class_texts(model, ["a B cell.", "a T cell."], ["B", "T"])
    with torch.no_grad():
        model.cell_proj.weight.fill_(float("nan"))  # damaged in memory after loading
    cells = [np.array([model.gene_tokenizer.cls_id, 3, 4, 5])]
    with pytest.raises(LangCellError, match="NaN or infinite scores for 1 of 1 cells"):
        zero_shot_scores(model, cells, classes)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda shard: shard.update(n_cells="many"), "no whole n_cells"),
        (lambda shard: shard.pop("name"), "has no name"),
        (lambda shard: shard["files"].pop("ids"), "lacks a file entry"),
    ],
)
def test_manifest_entries_with_missing_keys_or_wrong_types_are_refused(corpus, damage, message):
    manifest = manifest_of(corpus)
    damage(manifest["shards"][0])
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LangCellError, match=message):
        TokenCorpus(corpus)


def test_a_corrupt_metadata_file_is_refused(corpus):
    (corpus / manifest_of(corpus)["obs_file"]).write_bytes(b"not an h5ad file")
    with pytest.raises(LangCellError, match="metadata file .* is unreadable"):
        TokenCorpus(corpus).obs  # noqa: B018 (reading the property is the test)


def test_geneformer_dictionaries_with_text_ids_or_medians_are_refused(tmp_path):
    import pickle

    tokens, medians = tmp_path / "tokens.pkl", tmp_path / "medians.pkl"
    pickle.dump({"<pad>": 0, "<mask>": 1, "ENSG00000000003": "two"}, tokens.open("wb"))
    pickle.dump({"ENSG00000000003": 1.5}, medians.open("wb"))
    with pytest.raises(LangCellError, match="token ids .* are not integers"):
        GeneTokenizer.from_geneformer(tokens, medians)
    pickle.dump({"<pad>": 0, "<mask>": 1, "ENSG00000000003": 2}, tokens.open("wb"))
    pickle.dump({"ENSG00000000003": "high"}, medians.open("wb"))
    with pytest.raises(LangCellError, match="medians .* are not numbers"):
        GeneTokenizer.from_geneformer(tokens, medians)

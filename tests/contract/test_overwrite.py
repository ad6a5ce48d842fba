"""--overwrite replaces only what langcell wrote, and no output may replace or delete an input.

The cases a red team found destroying data: ``tokenize IN.h5ad IN.h5ad --overwrite`` replaced the input
with the corpus, ``pretrain --corpus C --out C --overwrite`` deleted the corpus it was to train on, and
``--overwrite`` deleted folders that held no langcell output at all.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from langcell.cli import main
from langcell.data.corpus import write_corpus
from langcell.data.tokenizer import GeneTokenizer
from langcell.errors import LangCellError
from langcell.models.config import LangCellConfig
from langcell.models.langcell import LangCell
from langcell.train import load_recipe, pretrain


def cells_file(path: Path) -> Path:
    rng = np.random.default_rng(0)
    matrix = rng.poisson(3.0, size=(12, 10)).astype(np.float32) + 1
    adata = ad.AnnData(
        sp.csr_matrix(matrix),
        obs=pd.DataFrame(index=[f"cell_{i}" for i in range(12)]),
        var=pd.DataFrame(index=[f"gene_{i}" for i in range(10)]),
    )
    adata.write_h5ad(path)
    return path


def someone_elses_folder(path: Path) -> dict[Path, bytes]:
    path.mkdir()
    (path / "thesis.tex").write_text("five years of work")
    (path / "data").mkdir()
    (path / "data" / "raw.csv").write_text("1,2,3")
    return {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}


def assert_untouched(files: dict[Path, bytes]) -> None:
    for file, content in files.items():
        assert file.read_bytes() == content, file


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main([*argv, "--quiet"])
    return code, capsys.readouterr().err


def test_tokenize_refuses_to_write_the_corpus_over_its_input(tmp_path, capsys):
    source = cells_file(tmp_path / "cells.h5ad")
    before = source.read_bytes()
    code, err = run(["tokenize", str(source), str(source), "--custom-genes", "--overwrite"], capsys)
    assert code == 2 and "is the input" in err and "apart from the inputs" in err
    assert source.read_bytes() == before


def test_a_corpus_inside_an_input_directory_or_around_it_is_refused(tmp_path):
    source = cells_file(tmp_path / "cells.h5ad")
    tokenizer = GeneTokenizer.fit(ad.read_h5ad(source), gene_id_kind="custom")
    with pytest.raises(LangCellError, match="contains the input"):
        write_corpus([source], tokenizer, tmp_path, overwrite=True, progress=False)
    assert source.is_file()


def test_overwrite_replaces_a_corpus_but_not_someone_elses_folder(tmp_path):
    source = cells_file(tmp_path / "cells.h5ad")
    tokenizer = GeneTokenizer.fit(ad.read_h5ad(source), gene_id_kind="custom")
    corpus = tmp_path / "corpus"
    write_corpus([source], tokenizer, corpus, progress=False)
    write_corpus([source], tokenizer, corpus, overwrite=True, progress=False)  # its own: replaced
    files = someone_elses_folder(tmp_path / "papers")
    with pytest.raises(LangCellError, match="not a token corpus langcell wrote"):
        write_corpus([source], tokenizer, tmp_path / "papers", overwrite=True, progress=False)
    assert_untouched(files)


def test_pretrain_refuses_an_out_that_is_its_corpus_or_someone_elses_folder(tmp_path):
    source = cells_file(tmp_path / "cells.h5ad")
    tokenizer = GeneTokenizer.fit(ad.read_h5ad(source), gene_id_kind="custom")
    corpus = tmp_path / "corpus"
    write_corpus([source], tokenizer, corpus, progress=False)
    manifest = (corpus / "manifest.json").read_bytes()
    config = load_recipe("tiny")
    with pytest.raises(LangCellError, match="is the input"):
        pretrain(corpus, corpus, config, overwrite=True, progress=False)
    with pytest.raises(LangCellError, match="lies inside the input"):
        pretrain(corpus, corpus / "run", config, overwrite=True, progress=False)
    assert (corpus / "manifest.json").read_bytes() == manifest
    files = someone_elses_folder(tmp_path / "papers")
    with pytest.raises(LangCellError, match="holds no pretraining run"):
        pretrain(corpus, tmp_path / "papers", config, overwrite=True, progress=False)
    assert_untouched(files)


def test_saving_a_model_over_someone_elses_folder_is_refused(tmp_path):
    config = LangCellConfig.preset("tiny")
    model = LangCell.from_config(config)
    model.save_pretrained(tmp_path / "model")
    model.save_pretrained(tmp_path / "model", overwrite=True)  # its own: replaced
    files = someone_elses_folder(tmp_path / "papers")
    with pytest.raises(LangCellError, match="not a model langcell wrote"):
        model.save_pretrained(tmp_path / "papers", overwrite=True)
    assert_untouched(files)


def test_annotate_refuses_an_output_over_its_input(tmp_path, capsys):
    source = cells_file(tmp_path / "cells.h5ad")
    before = source.read_bytes()
    code, err = run(["annotate", str(source), "--model", str(tmp_path / "no_model"), "--out", str(source),
                     "--labels", "B cell;T cell"], capsys)
    assert code == 2 and "is the input" in err
    assert source.read_bytes() == before


def test_annotate_refuses_a_report_that_is_a_directory_before_any_work(tmp_path, capsys, monkeypatch):
    """The red team found the h5ad written although the command then failed on ``--report DIR``."""
    source = cells_file(tmp_path / "cells.h5ad")
    tokenizer = GeneTokenizer.fit(ad.read_h5ad(source), gene_id_kind="custom")
    config = LangCellConfig.preset("tiny")
    config.cell.vocab_size = tokenizer.vocab_size
    LangCell.from_config(config, gene_tokenizer=tokenizer).save_pretrained(tmp_path / "model")
    (tmp_path / "report").mkdir()
    loaded = []
    monkeypatch.setattr(LangCell, "from_pretrained", lambda *a, **k: loaded.append(1))
    code, err = run(["annotate", str(source), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "a.h5ad"),
                     "--labels", "B cell;T cell", "--report", str(tmp_path / "report")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is a directory" in err, err
    assert loaded == [], "the model was loaded before --report was refused"
    assert not (tmp_path / "a.h5ad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad", "model", "report"]
    assert list((tmp_path / "report").iterdir()) == []

"""The command line: a thin layer over the API, one-line errors, exit codes, nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from langcell.cli import main
from langcell.corpus import TokenCorpus

SHARED = Path(__file__).resolve().parents[2] / "shared"
IMMUNE = SHARED / "data" / "immune_sample_559cells_counts.h5ad"
GENEFORMER = SHARED / "reference" / "geneformer"
needs_shared = pytest.mark.skipif(not IMMUNE.is_file(), reason=f"{IMMUNE} is missing")


@needs_shared
def test_tokenize_fits_a_vocabulary_and_prints_the_mapping_report(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert main(["tokenize", str(IMMUNE), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Gene mapping: 32,786 features (gene symbols)" in printed
    assert "unmapped" in printed and "e.g." in printed
    assert "wrote 559 cells" in printed
    corpus = TokenCorpus(out)
    assert len(corpus) == 559
    assert all(corpus[i][0] == corpus.tokenizer.cls_id for i in range(0, 559, 50))


@needs_shared
def test_tokenize_with_the_released_dictionaries(tmp_path, capsys):
    out = tmp_path / "corpus"
    code = main([
        "tokenize", str(IMMUNE), str(out), "--quiet",
        "--token-dictionary", str(GENEFORMER / "token_dictionary.pkl"),
        "--gene-median-dictionary", str(GENEFORMER / "gene_median_dictionary.pkl"),
        "--max-length", "512",
    ])
    assert code == 0
    assert capsys.readouterr().out == ""  # --quiet
    corpus = TokenCorpus(out)
    assert corpus.tokenizer.vocab_size == 25_427
    assert corpus.lengths.max() == 512
    assert np.all(corpus[0][1:] < 25_426)


def test_missing_input_is_one_line_exit_2_and_no_output(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert main(["tokenize", str(tmp_path / "nope.h5ad"), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("langcell tokenize: error:") and "does not exist" in err[0]
    assert not out.exists()


def test_corrupt_h5ad_is_refused_without_traceback(tmp_path):
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(b"this is not hdf5")
    result = subprocess.run(
        [sys.executable, "-m", "langcell", "tokenize", str(bad), str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "h5ad" in result.stderr
    assert not (tmp_path / "out").exists()


def test_dictionaries_must_come_in_pairs(tmp_path, capsys):
    assert main(["tokenize", "x.h5ad", str(tmp_path / "o"), "--token-dictionary", "t.pkl"]) == 2
    assert "go together" in capsys.readouterr().err


def test_pretrain_reports_a_missing_corpus(tmp_path, capsys):
    code = main(["pretrain", "--config", "tiny", "--corpus", str(tmp_path / "none"), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "langcell pretrain: error:" in capsys.readouterr().err


def test_pretrain_reports_an_unknown_recipe(tmp_path, capsys):
    code = main(["pretrain", "--config", "gigantic", "--corpus", str(tmp_path), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "no pretraining recipe" in capsys.readouterr().err


def test_usage_errors_exit_non_zero():
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code != 0

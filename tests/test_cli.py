"""The command line: a thin layer over the API, one-line errors, exit codes, nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from langcell.cli import main
from langcell.data.corpus import TokenCorpus

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


CBMC = SHARED / "data" / "cbmc_citeseq_500genes.h5ad"


@pytest.fixture(scope="module")
def model_and_cells(tmp_path_factory):
    """A tiny model saved with a vocabulary of 80 labelled CBMC cells (20 of 4 types), and those cells."""
    import anndata as ad
    import torch

    from langcell.data.tokenizer import GeneTokenizer
    from langcell.models.config import LangCellConfig
    from langcell.models.langcell import LangCell

    if not CBMC.is_file():
        pytest.skip(f"{CBMC} is missing")
    root = tmp_path_factory.mktemp("cli_model")
    adata = ad.read_h5ad(CBMC)
    kinds = ["B cell", "natural killer cell", "CD14-positive monocyte", "CD4-positive, alpha-beta T cell"]
    keep = np.concatenate([np.flatnonzero(adata.obs["cell_type"] == kind)[:20] for kind in kinds])
    adata = adata[np.sort(keep)].copy()
    tokenizer = GeneTokenizer.fit(adata, gene_id_kind="custom")
    config = LangCellConfig.preset("tiny")
    config.cell.vocab_size = tokenizer.vocab_size
    config.cell.max_position_embeddings = 512
    torch.manual_seed(0)
    LangCell.from_config(config, gene_tokenizer=tokenizer).save_pretrained(root / "model")
    adata.write_h5ad(root / "cells.h5ad")
    return root / "model", root / "cells.h5ad"


def test_annotate_writes_predictions_and_a_report(model_and_cells, tmp_path, capsys):
    import json

    import anndata as ad

    model, cells = model_and_cells
    out, report = tmp_path / "annotated.h5ad", tmp_path / "report.json"
    code = main([
        "annotate", str(cells), "--model", str(model), "--out", str(out), "--report", str(report),
        "--labels", "B cell;natural killer cell;CD14-positive monocyte", "--truth-key", "cell_type", "--quiet",
    ])
    assert code == 0, capsys.readouterr().err
    annotated = ad.read_h5ad(out)
    assert set(annotated.obs["langcell_cell_type"].astype(str)) <= {
        "B cell", "natural killer cell", "CD14-positive monocyte"
    }
    data = json.loads(report.read_text())
    assert data["n_cells"] == 80 and sum(data["predicted"].values()) == 80
    truth = annotated.obs["cell_type"].astype(str).to_numpy()
    predicted = annotated.obs["langcell_cell_type"].astype(str).to_numpy()
    assert data["accuracy"] == pytest.approx(float(np.mean(truth == predicted)))


def test_annotate_refuses_bad_alpha_and_leaves_no_output(model_and_cells, tmp_path, capsys):
    model, cells = model_and_cells
    out = tmp_path / "annotated.h5ad"
    code = main(["annotate", str(cells), "--model", str(model), "--out", str(out), "--labels", "B cell", "--alpha", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "alpha" in err[0]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_embed_streams_a_backed_file(model_and_cells, tmp_path, capsys):
    import anndata as ad

    model, cells = model_and_cells
    out = tmp_path / "embedded.h5ad"
    assert main(["embed", str(cells), "--model", str(model), "--out", str(out), "--backed", "--quiet"]) == 0
    embedded = ad.read_h5ad(out)
    assert embedded.obsm["X_langcell"].shape == (80, 256)
    np.testing.assert_allclose(np.linalg.norm(embedded.obsm["X_langcell"], axis=1), 1.0, atol=1e-5)


def test_embed_into_a_missing_directory_is_refused(model_and_cells, tmp_path, capsys):
    model, cells = model_and_cells
    code = main(["embed", str(cells), "--model", str(model), "--out", str(tmp_path / "no" / "x.h5ad")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_passes_the_learning_rates_and_refuses_a_bad_one(model_and_cells, tmp_path, capsys):
    import anndata as ad

    model, cells = model_and_cells
    written = tmp_path / "cells.h5ad"
    code = main([
        "finetune", str(cells), "--model", str(model), "--label-key", "cell_type", "--out", str(tmp_path / "c"),
        "--mode", "full", "--epochs", "1", "--lr", "0.002", "--encoder-lr", "0.0001", "--write", str(written),
        "--quiet",
    ])
    assert code == 0, capsys.readouterr().err
    params = ad.read_h5ad(written).uns["langcell_ce"]["params"]
    assert (params["epochs"], params["lr"], params["encoder_lr"]) == (1, 0.002, 0.0001)
    bad = tmp_path / "bad"
    code = main(["finetune", str(cells), "--model", str(model), "--label-key", "cell_type", "--out", str(bad),
                 "--encoder-lr", "-1", "--quiet"])
    assert code == 2
    assert "encoder_lr must be a positive number" in capsys.readouterr().err
    assert not bad.exists()


@pytest.mark.slow
def test_finetune_train_fraction_max_length_and_text_head_flags(model_and_cells, tmp_path, capsys):
    import anndata as ad

    model, cells = model_and_cells
    written = tmp_path / "cells.h5ad"
    code = main([
        "finetune", str(cells), "--model", str(model), "--label-key", "cell_type", "--out", str(tmp_path / "c"),
        "--mode", "linear", "--head", "text", "--epochs", "2", "--train-fraction", "0.5", "--max-length", "48",
        "--write", str(written), "--quiet",
    ])
    assert code == 0, capsys.readouterr().err
    stored = ad.read_h5ad(written).uns["langcell_ce"]
    assert stored["params"]["train_fraction"] == 0.5 and stored["params"]["max_length"] == 48
    assert stored["params"]["head"] == "text" and stored["metrics"]["n_train"] == 40
    for value in ("0", "1", "1.5", "-0.2"):
        out = tmp_path / f"bad{value}"
        code = main(["finetune", str(cells), "--model", str(model), "--label-key", "cell_type", "--out", str(out),
                     "--train-fraction", value, "--report", str(tmp_path / "r.json"), "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "--train-fraction" in err[0]
        assert not out.exists() and not (tmp_path / "r.json").exists()


def test_annotate_prior_em_reports_the_priors_found(model_and_cells, tmp_path, capsys):
    import json

    model, cells = model_and_cells
    report = tmp_path / "report.json"
    code = main(["annotate", str(cells), "--model", str(model), "--labels", "B cell;natural killer cell",
                 "--prior", "em", "--out", str(tmp_path / "a.h5ad"), "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "prior em (" in printed
    found = json.loads(report.read_text())["prior"]
    assert set(found["priors"]) == {"B cell", "natural killer cell"}
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses a choice not offered
        main(["annotate", str(cells), "--model", str(model), "--labels", "B cell", "--prior", "flat",
              "--out", str(tmp_path / "b.h5ad")])
    assert exit_info.value.code == 2
    assert "--prior" in capsys.readouterr().err and not (tmp_path / "b.h5ad").exists()


@pytest.mark.slow
def test_finetune_predict_and_retrieve_commands(model_and_cells, tmp_path, capsys):
    import json

    import anndata as ad

    model, cells = model_and_cells
    classifier = tmp_path / "classifier"
    report = tmp_path / "metrics.json"
    code = main([
        "finetune", str(cells), "--model", str(model), "--label-key", "cell_type", "--out", str(classifier),
        "--mode", "linear", "--report", str(report), "--quiet",
    ])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads(report.read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    predicted = tmp_path / "predicted.h5ad"
    assert main(["predict", str(cells), "--classifier", str(classifier), "--out", str(predicted), "--quiet"]) == 0
    assert "langcell_ce" in ad.read_h5ad(predicted).obs
    retrieved = tmp_path / "retrieved.json"
    code = main(["retrieve", str(cells), "--model", str(model), "--texts", "B cell;natural killer cell",
                 "--top-n", "3", "--report", str(retrieved)])
    assert code == 0
    assert len(json.loads(retrieved.read_text())["cell_names"]) == 2
    assert "B cell:" in capsys.readouterr().out


def test_device_typos_metrics_without_batches_and_a_demo_file_get_one_line(tmp_path, capsys):
    import anndata as ad
    import numpy as np

    cells = tmp_path / "cells.h5ad"
    ad.AnnData(np.ones((2, 2), dtype=np.float32)).write_h5ad(cells)
    model = tmp_path / "model"
    model.mkdir()
    for argv, words in (
        (["annotate", str(cells), "--model", str(model), "--out", str(tmp_path / "o.h5ad"), "--labels", "B cell",
          "--device", "cdua"], ("--device 'cdua' is not a device",)),
        (["demo", "--out", str(cells)], ("is a file, not a folder",)),
    ):
        code = main([*argv, "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert all(w in err[0] for w in words), err


def test_evaluate_refuses_metrics_without_a_batch_key():
    import anndata as ad
    import numpy as np
    import pandas as pd
    import pytest

    from langcell.errors import LangCellError
    from langcell.evaluation import evaluate

    adata = ad.AnnData(np.ones((4, 3), dtype=np.float32), obs=pd.DataFrame({"cell_type": ["B cell", "T cell"] * 2}))
    model = type("NoModel", (), {"gene_tokenizer": object()})()
    with pytest.raises(LangCellError, match="metrics were given without batch_key"):
        evaluate(adata, model, label_key="cell_type", metrics=["silhouette_label", "telepathy"])


def test_errors_name_the_command_lines_flags_not_python_keywords(tmp_path, capsys):
    import anndata as ad
    import numpy as np

    cells = tmp_path / "cells.h5ad"
    normalised = np.log1p(np.random.default_rng(0).poisson(3.0, size=(6, 4)) + 0.5).astype(np.float32)
    ad.AnnData(normalised).write_h5ad(cells)
    code = main(["tokenize", str(cells), str(tmp_path / "corpus"), "--custom-genes", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--counts-layer" in err and "counts_layer" not in err and "use_raw" not in err, err
    ad.AnnData(np.ones((3, 2), dtype=np.float32), var={"x": ["a", "b"]}).write_h5ad(cells)
    code = main(["tokenize", str(cells), str(tmp_path / "corpus2"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "gene_id_kind" not in err, err


def test_files_that_are_folders_or_not_utf8_and_bad_recipes_get_one_line(tmp_path, capsys):
    import anndata as ad
    import numpy as np

    cells = tmp_path / "cells.h5ad"
    ad.AnnData(np.ones((2, 2), dtype=np.float32)).write_h5ad(cells)
    folder = tmp_path / "folder"
    folder.mkdir()
    latin1 = tmp_path / "descriptions.json"
    latin1.write_bytes('{"B cell": "Lymphozyt f\xfcr Antik\xf6rper"}'.encode("latin-1"))
    listed = tmp_path / "recipe.json"
    listed.write_text("[1, 2]")
    model = tmp_path / "model"
    model.mkdir()
    annotate = ["annotate", str(cells), "--model", str(model), "--out", str(tmp_path / "o.h5ad")]
    for argv, words in (
        ([*annotate, "--labels", "B cell", "--report", str(folder)], ("is a directory", "file to write")),
        ([*annotate, "--descriptions", str(latin1)], ("not UTF-8",)),
        ([*annotate, "--descriptions", str(folder)], ("is not a file",)),
        (["pretrain", "--corpus", str(folder), "--out", str(tmp_path / "run"), "--config", str(listed)],
         ("holds a JSON list",)),
    ):
        code = main([*argv, "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert all(w in err[0] for w in words), err

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
    assert main(["tokenize", "x.h5ad", str(tmp_path / "o"), "--gene-name-dictionary", "n.pkl"]) == 2
    assert "--gene-name-dictionary goes with --token-dictionary" in capsys.readouterr().err


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
    assert data["n_uncertified"] == annotated.uns["langcell_cell_type"]["n_uncertified"]


def test_annotate_reports_the_cells_whose_fast_answer_is_not_certified(model_and_cells, tmp_path, capsys):
    import json

    import anndata as ad

    model, cells = model_and_cells
    labels = "B cell;natural killer cell;CD14-positive monocyte;CD4-positive, alpha-beta T cell"
    runs = {}
    for name, extra in {"fast": [], "exact": ["--exact-argmax"], "official": ["--mode", "official"]}.items():
        out, report = tmp_path / f"{name}.h5ad", tmp_path / f"{name}.json"
        code = main(["annotate", str(cells), "--model", str(model), "--out", str(out), "--report", str(report),
                     "--labels", labels, "--top-k", "2", *extra])
        assert code == 0, capsys.readouterr().err
        runs[name] = (json.loads(report.read_text()), ad.read_h5ad(out).obs["langcell_cell_type"].astype(str),
                      capsys.readouterr().out)
    (fast, fast_labels, printed), (exact, exact_labels, exact_printed) = runs["fast"], runs["exact"]
    # The untrained tiny model is unsure about most cells: the fast mode says how many, in both places.
    assert fast["n_uncertified"] > 0
    assert f"the top class of {fast['n_uncertified']} of 80 cells is not certified" in printed
    # The cells whose answer changes with --exact-argmax are among those counted.
    assert int((fast_labels != exact_labels).sum()) <= fast["n_uncertified"]
    assert exact["n_uncertified"] == runs["official"][0]["n_uncertified"] == 0
    assert "not certified" not in exact_printed
    assert (exact_labels == runs["official"][1]).all() and exact["params"]["exact_argmax"] is True



def test_annotate_report_per_class_confusion_and_label_resolution(model_and_cells, tmp_path, capsys):
    import json

    import anndata as ad
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    model, cells = model_and_cells
    adata = ad.read_h5ad(cells)
    # Unequal type sizes (20, 15, 10, 5 cells) so that "most frequent first" is not alphabetical.
    order = ["natural killer cell", "CD4-positive, alpha-beta T cell", "B cell", "CD14-positive monocyte"]
    keep = np.concatenate([np.flatnonzero(adata.obs["cell_type"] == t)[:n] for t, n in zip(order, (20, 15, 10, 5),
                                                                                          strict=True)])
    adata = adata[np.sort(keep)].copy()
    cells = tmp_path / "unequal.h5ad"
    adata.write_h5ad(cells)
    out, report = tmp_path / "annotated.h5ad", tmp_path / "report.json"
    labels = "B cell;natural killer cell;CD14-positive monocyte;CD4-positive, alpha-beta T cell"
    code = main(["annotate", str(cells), "--model", str(model), "--out", str(out), "--report", str(report),
                 "--labels", labels, "--truth-key", "cell_type", "--threshold-on", "margin"])
    printed = capsys.readouterr().out
    assert code == 0
    data = json.loads(report.read_text())
    annotated = ad.read_h5ad(out)
    truth = annotated.obs["cell_type"].astype(str).to_numpy()
    predicted = annotated.obs["langcell_cell_type"].astype(str).to_numpy()
    expected_order = order + sorted(set(predicted) - set(order))  # labels only predicted come last
    assert 0 < np.mean(truth == predicted) < 1  # numbers worth comparing
    assert data["confusion"]["labels"] == expected_order
    np.testing.assert_array_equal(data["confusion"]["counts"],
                                  confusion_matrix(truth, predicted, labels=expected_order))
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=expected_order, zero_division=0
    )
    assert [row["label"] for row in data["per_class"]] == expected_order
    for i, row in enumerate(data["per_class"]):
        assert row["precision"] == pytest.approx(precision[i]) and row["recall"] == pytest.approx(recall[i])
        assert row["f1"] == pytest.approx(f1[i]) and row["support"] == support[i]
        assert row["n_predicted"] == int((predicted == row["label"]).sum())
    assert data["params"]["threshold_on"] == "margin"
    # Every label's resolution is stored and was printed before the scores.
    assert [r["label"] for r in data["resolution"]] == labels.split(";")
    by_label = {r["label"]: r for r in data["resolution"]}
    assert by_label["B cell"]["term_id"] == "CL:0000236" and by_label["B cell"]["term_label"] == "B cell"
    assert printed.index("B cell -> CL:0000236 (B cell) [") < printed.index("macro-F1")
    # The summary has one line per class, most frequent true type first.
    lines = [line.strip() for line in printed.splitlines()]
    assert [line.split("  ")[0] for line in lines if line.split("  ")[0] in order] == order


def test_annotate_prints_the_resolution_before_loading_the_model(model_and_cells, tmp_path, capsys):
    import json

    _, cells = model_and_cells
    descriptions = tmp_path / "descriptions.json"
    descriptions.write_text(json.dumps({"killers": "a lymphocyte that kills infected cells"}))
    code = main(["annotate", str(cells), "--model", str(tmp_path / "no_model"), "--out", str(tmp_path / "o.h5ad"),
                 "--descriptions", str(descriptions)])
    captured = capsys.readouterr()
    assert code == 2 and "no_model" in captured.err
    assert "killers -> free text, no term [user description]" in captured.out

def test_annotate_refuses_bad_alpha_and_leaves_no_output(model_and_cells, tmp_path, capsys):
    model, cells = model_and_cells
    out = tmp_path / "annotated.h5ad"
    code = main(["annotate", str(cells), "--model", str(model), "--out", str(out), "--labels", "B cell", "--alpha", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "alpha" in err[0]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_annotate_with_consensus_and_lca_answers(model_and_cells, tmp_path, capsys):
    import json

    import anndata as ad

    model, cells = model_and_cells
    out, report = tmp_path / "annotated.h5ad", tmp_path / "report.json"
    labels = "B cell;natural killer cell;CD14-positive monocyte;CD4-positive, alpha-beta T cell"
    code = main([
        "annotate", str(cells), "--model", str(model), "--out", str(out), "--report", str(report),
        "--labels", labels, "--truth-key", "cell_type", "--consensus", "graph", "--smoothing", "3",
        "--lca-margin", "0.5", "--quiet",
    ])
    assert code == 0, capsys.readouterr().err
    annotated = ad.read_h5ad(out)
    for column in ("langcell_cell_type_consensus", "langcell_cell_type_lca", "langcell_cell_type_margin"):
        assert column in annotated.obs
    assert "X_langcell" in annotated.obsm
    data = json.loads(report.read_text())
    truth = annotated.obs["cell_type"].astype(str).to_numpy()
    refined = annotated.obs["langcell_cell_type_consensus"].astype(str).to_numpy()
    assert data["consensus"]["accuracy"] == pytest.approx(float(np.mean(truth == refined)))
    assert data["consensus"]["params"]["smoothing"] == 3.0
    summary = data["ontology"]["langcell_cell_type_lca"]
    assert summary["n_cells"] == 80 and summary["exact"] + summary["ancestor"] + summary["wrong"] == pytest.approx(1)
    assert 0 <= data["confidence"]["mean_margin"] <= 1 and "ece" in data


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--consensus", "graph", "--smoothing", "0"], ("--smoothing", "positive")),
        (["--consensus", "majority"], ("--groupby",)),
        (["--consensus", "majority", "--groupby", "nope"], ("--groupby 'nope'", "not an obs column")),
        (["--groupby", "auto"], ("--groupby is for --consensus majority",)),
        (["--lca-margin", "2"], ("--lca-margin", "[0, 1]")),
        (["--threshold", "-1"], ("--threshold", "[0, 1]")),
    ],
)
def test_annotate_refuses_bad_refinement_flags(model_and_cells, tmp_path, capsys, flags, words):
    model, cells = model_and_cells
    out = tmp_path / "annotated.h5ad"
    code = main(["annotate", str(cells), "--model", str(model), "--out", str(out), "--labels", "B cell", *flags])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(word in err[0] for word in words), err

def test_annotate_with_prompt_ensembles_then_explain_with_a_csv(model_and_cells, tmp_path, capsys):
    import json

    import anndata as ad
    import pandas as pd

    model, cells = model_and_cells
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps({"B cell": ["cell type: B lymphocyte."]}))
    annotated = tmp_path / "annotated.h5ad"
    labels = "B cell;natural killer cell;CD14-positive monocyte"
    code = main(["annotate", str(cells), "--model", str(model), "--out", str(annotated), "--labels", labels,
                 "--prompt-ensemble", "--texts", str(texts), "--quiet"])
    assert code == 0, capsys.readouterr().err
    prompts = ad.read_h5ad(annotated).uns["langcell_cell_type"]["prompts"]
    assert "cell type: B lymphocyte." in list(prompts["text"]) and len(prompts["text"]) > 3 + 1
    out, csv = tmp_path / "explained.h5ad", tmp_path / "table.csv"
    code = main(["explain", str(annotated), "--model", str(model), "--out", str(out), "--n-genes", "5",
                 "--csv", str(csv)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    table = pd.read_csv(csv)
    explained = ad.read_h5ad(out)
    stored = pd.DataFrame({k: np.asarray(v) for k, v in explained.uns["langcell_cell_type_explain"]["table"].items()})
    assert table["gene"].tolist() == stored["gene"].tolist() and (table["rank"] <= 5).all()
    assert set(table["class"]) == set(explained.obs["langcell_cell_type"].astype(str))
    assert "explained 80 cells" in printed


@pytest.mark.parametrize(("argv", "flag"), [(["--n-genes", "0"], "--n-genes"), (["--key", "nope"], "--key")])
def test_explain_refuses_bad_input_in_one_line_and_writes_nothing(model_and_cells, tmp_path, capsys, argv, flag):
    model, cells = model_and_cells
    out = tmp_path / "explained.h5ad"
    code = main(["explain", str(cells), "--model", str(model), "--out", str(out), *argv])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]
    assert not list(tmp_path.iterdir())


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

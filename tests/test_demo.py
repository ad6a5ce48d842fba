"""The demo pipeline end to end, with the test-sized recipe (the real one takes minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import pytest

from langcell.cli import main
from langcell.demo import INTERMEDIATE, is_demo_output, remove_intermediate, run_demo


@pytest.mark.slow
def test_demo_writes_its_outputs_and_scores(tmp_path):
    report = run_demo(tmp_path / "demo", seed=0, quiet=True, recipe="tiny")
    out = tmp_path / "demo"
    for name in ("annotated.h5ad", "umap.png", "confusion_matrix.png", "explain.png", "report.json"):
        assert (out / name).is_file(), name
    assert (out / "run" / "model" / "model.safetensors").is_file()
    # What a user needs stays; the checkpoints (optimiser state) and the corpus are gone, and no temporary.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["annotated.h5ad", "umap.png", "confusion_matrix.png", "explain.png", "report.json", "run"])
    run = {p.name for p in (out / "run").iterdir()}
    assert {"log.csv", "model", "recipe.json"} <= run <= {"log.csv", "model", "recipe.json", "tensorboard"}, run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["langcell_zero_shot"] == report["langcell_zero_shot"]
    for method in ("langcell_zero_shot", "logistic_regression"):
        assert 0.0 <= report[method]["accuracy"] <= 1.0
        assert 0.0 <= report[method]["macro_f1"] <= 1.0
    # The logistic regression sees labels: on these PBMCs it is far above chance (10 types).
    assert report["logistic_regression"]["accuracy"] > 0.5
    annotated = ad.read_h5ad(out / "annotated.h5ad")
    assert annotated.n_obs == report["cells"]["test"] == 140
    assert {"langcell_cell_type", "langcell_cell_type_score"} <= set(annotated.obs.columns)
    assert "X_langcell" in annotated.obsm and "X_umap" in annotated.obsm
    # The label-free refinements and the ontology-aware metric are in the report, from the written calls.
    assert set(saved["consensus"]) == {"graph", "majority"}
    truth = annotated.obs["cell_type"].astype(str)
    graph = annotated.obs["langcell_cell_type_graph"].astype(str)
    assert saved["consensus"]["graph"]["accuracy"] == pytest.approx(float((truth == graph).mean()), abs=1e-4)
    for name in ("zero-shot", "LCA answers"):
        s = saved["ontology_aware"][name]
        assert s["n_exact"] + s["n_ancestor"] + s["n_wrong"] + s["n_abstained"] == 140
    assert saved["ontology_aware"]["zero-shot"]["n_ancestor"] == 0  # the calls are classes: none is an ancestor
    # The explanations of the B, NK and CD14 monocyte predictions: the table's top genes, in the report.
    from langcell.demo import EXPLAINED_CLASSES
    from langcell.tl import explanation_table

    assert list(saved["explained_genes"]) == list(EXPLAINED_CLASSES)
    table = explanation_table(annotated, "langcell_cell_type_explain")
    for name, genes in saved["explained_genes"].items():
        assert genes == table.loc[table["class"] == name, "gene"].head(10).tolist()


def demo_layout(out: Path) -> int:
    """A demo directory as the demo leaves it before its clean-up (real names, small stand-in contents);
    return the bytes of its intermediate files."""
    files = {
        "corpus/manifest.json": b"{}", "corpus/obs.h5ad": b"o" * 3000, "corpus/gene_tokenizer.json": b"{}",
        "corpus/shards/shard_00000.ids.npy": b"i" * 5000,
        "run/recipe.json": b"{}", "run/log.csv": b"step,loss\n", "run/model/model.safetensors": b"m" * 7000,
        "run/model/config.json": b"{}", "run/checkpoints/latest.json": b'{"checkpoint": "joint-0000220"}',
        "run/checkpoints/cell-0000020/model/model.safetensors": b"m" * 7000,
        "run/checkpoints/cell-0000020/training_state.pt": b"s" * 11000,
        "run/checkpoints/joint-0000220/training_state.pt": b"s" * 11000,
        "annotated.h5ad": b"a" * 100, "umap.png": b"png", "confusion_matrix.png": b"png", "report.json": b"{}",
    }
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)
    return sum(len(content) for name, content in files.items() if name.startswith(tuple(INTERMEDIATE)))


def test_the_demo_keeps_what_a_user_needs_and_removes_the_intermediate_results(tmp_path):
    out = tmp_path / "demo"
    intermediate = demo_layout(out)
    assert is_demo_output(out)
    assert remove_intermediate(out) == intermediate
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == ["annotated.h5ad", "confusion_matrix.png", "report.json", "run/log.csv",
                    "run/model/config.json", "run/model/model.safetensors", "run/recipe.json", "umap.png"]
    assert remove_intermediate(out) == 0  # nothing left to remove


def test_the_demo_refuses_an_earlier_demo_without_overwrite_and_other_folders_always(tmp_path, capsys):
    earlier = tmp_path / "earlier"
    demo_layout(earlier)
    before = {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()}
    code = main(["demo", "--out", str(earlier), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "holds an earlier demo" in err[0] and "--overwrite" in err[0], err

    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    (thesis / "report.json").write_text("{}")  # a demo's file name among the user's files is not enough
    for extra in ([], ["--overwrite"]):
        code = main(["demo", "--out", str(thesis), *extra, "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "is not a demo's output" in err[0], err
    assert sorted(p.name for p in thesis.iterdir()) == ["chapter1.tex", "report.json"]
    assert {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "thesis"]  # no temporary either
    assert not is_demo_output(thesis) and not is_demo_output(tmp_path / "missing")


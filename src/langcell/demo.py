"""``langcell demo``: the whole LangCell pipeline on scanpy's bundled PBMCs, in minutes on a laptop CPU.

1. 700 PBMCs with raw counts (reconstructed from scanpy's ``pbmc68k_reduced``), their 10 labels resolved
   to Cell Ontology terms;
2. a stratified 80/20 split (seeded);
3. a gene vocabulary and medians fitted on the training cells; the training cells tokenized into a corpus;
4. the ``small`` model pretrained on the training cells and their ontology texts, both stages (recipe
   ``demo``);
5. the test cells annotated zero-shot from the 10 type descriptions, refined without labels over their
   LangCell kNN graph (:func:`langcell.tl.consensus`, graph and majority), with ontology-aware answers;
6. accuracy and macro-F1 printed next to a logistic regression trained on the same training cells, and
   the ontology-aware metric (exact / correct at an ancestor / wrong);
7. the annotations explained (:func:`langcell.tl.explain`): the top genes of the cells predicted B
   cell, NK cell and CD14 monocyte printed and stored in the report, all classes drawn in explain.png;
8. the annotated h5ad, a UMAP coloured by predicted and true type, and a confusion matrix written.

The whole output directory is written under a temporary name and appears complete (an interrupted demo
leaves nothing, and an earlier demo stays until the new one is whole). What a user needs stays: the
model (``run/model``), the training log and recipe, the annotated cells, the figures and ``report.json``.
The training checkpoints (with the optimiser's state) and the token corpus are intermediate and are
removed unless ``keep_intermediate=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ._atomic import atomic_directory, atomic_file, check_output_parent
from .data.splits import held_out_split
from .errors import LangCellError
from .evaluation.baselines import logistic_regression_baseline

DEMO_KEY = "langcell_cell_type"
#: What a finished demo directory holds (an interrupted one of an older version: a subset).
DEMO_ENTRIES = frozenset({"corpus", "run", "annotated.h5ad", "umap.png", "confusion_matrix.png", "explain.png",
                          "report.json"})
#: Intermediate results, removed unless ``keep_intermediate``: relative path -> what it is.
INTERMEDIATE = {"run/checkpoints": "training checkpoints with the optimiser's state", "corpus": "token corpus"}
#: Margin below which the demo answers with the lowest common Cell Ontology ancestor of the two best classes.
LCA_MARGIN = 0.1
#: The classes whose explanations the demo prints and reports (issue 14's marker check).
EXPLAINED_CLASSES = ("B cell, CD19-positive", "natural killer cell", "CD14-positive monocyte")


def _say(quiet: bool, *parts: object) -> None:
    if not quiet:
        print(*parts, flush=True)


def is_demo_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory that ``langcell demo`` wrote: only the demo's own entries (and
    hidden temporaries), with its report, its run's recipe or its corpus's manifest among them. Only such
    a directory may be replaced with ``overwrite``."""
    path = Path(path)
    if not path.is_dir():
        return False
    visible = {entry.name for entry in path.iterdir() if not entry.name.startswith(".")}
    signature = ("report.json", "run/recipe.json", "corpus/manifest.json")
    return bool(visible) and visible <= DEMO_ENTRIES and any((path / name).is_file() for name in signature)


def remove_intermediate(out: str | os.PathLike) -> int:
    """Delete the demo's intermediate results (:data:`INTERMEDIATE`) inside ``out``; return the bytes freed."""
    freed = 0
    for relative in INTERMEDIATE:
        path = Path(out) / relative
        if path.is_dir():
            freed += sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
            shutil.rmtree(path)
    return freed


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an ``out`` that is a file, an earlier demo without ``overwrite``, or a
    folder of other files (even with ``overwrite``)."""
    check_output_parent(out)
    if out.exists() and not out.is_dir():
        raise LangCellError(f"{str(out)!r} is a file, not a folder; pass --out <a folder for the demo's outputs>")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_demo_output(out):
        raise LangCellError(
            f"{str(out)!r} is not empty and is not a demo's output, so the demo will not write into it or replace "
            "it (overwrite=True replaces only an earlier demo); choose another --out"
        )
    if not overwrite:
        raise LangCellError(
            f"{str(out)!r} holds an earlier demo; pass overwrite=True (--overwrite on the command line) to replace "
            "it, or choose another --out"
        )


def _refinements(test, labels: list[str], seed: int) -> dict:
    """Label-free refinements of the zero-shot calls and the ontology-aware metric, for the report.

    Graph smoothing over the LangCell kNN graph, majority vote within Leiden over-clusters (when igraph
    is installed), and the exact / ancestor / wrong shares of the plain calls and of their lowest-common-
    ancestor answers (``obs[DEMO_KEY + "_lca"]``).
    """
    from sklearn.metrics import accuracy_score, f1_score

    from . import evaluation, tl

    truth = test.obs["cell_type"].astype(str).to_numpy()
    methods = {"graph": {"method": "graph"}, "majority": {"method": "majority", "groupby": "auto"}}
    consensus = {}
    for name, arguments in methods.items():
        try:
            tl.consensus(test, key=DEMO_KEY, use_rep="X_langcell", random_state=seed,
                         key_added=f"{DEMO_KEY}_{name}", **arguments)
        except LangCellError:  # majority over auto clusters needs igraph (langcell[consensus])
            continue
        calls = test.obs[f"{DEMO_KEY}_{name}"].astype(str).to_numpy()
        consensus[name] = {
            "accuracy": round(float(accuracy_score(truth, calls)), 4),
            "macro_f1": round(float(f1_score(truth, calls, average="macro", labels=labels, zero_division=0)), 4),
        }
    ontology = {
        name: {k: round(v, 4) if isinstance(v, float) else v for k, v in evaluation.ontology_accuracy(
            test, label_key="cell_type", prediction_key=column, annotation_key=DEMO_KEY)["summary"].items()}
        for name, column in (("zero-shot", DEMO_KEY), ("LCA answers", DEMO_KEY + "_lca"))
    }
    return {"consensus": consensus, "ontology_aware": ontology, "lca_margin": LCA_MARGIN}


def run_demo(
    out_dir: str | os.PathLike = "langcell_demo",
    *,
    seed: int = 0,
    quiet: bool = False,
    recipe: str = "demo",
    overwrite: bool = False,
    keep_intermediate: bool = False,
) -> dict:
    """Run the demo end to end; return the report written to ``OUT/report.json``.

    Parameters
    ----------
    out_dir
        Output directory. It appears once the demo is complete.
    seed
        Seed of the split, the weights and the training; the same seed gives the same numbers.
    quiet
        Print nothing.
    recipe
        Pretraining recipe (the packaged ``demo``; tests pass ``tiny``).
    overwrite
        Replace an earlier demo in ``out_dir``. A non-empty folder that is not a demo's output is
        refused all the same.
    keep_intermediate
        Keep the training checkpoints (with the optimiser's state) and the token corpus.

    Returns
    -------
    dict
        ``accuracy``, ``macro_f1`` of LangCell zero-shot, of its label-free consensus refinements
        (``"consensus"``: ``"graph"``, ``"majority"``) and of the logistic regression; the
        ontology-aware metric (``"ontology_aware"``: exact / ancestor / wrong shares of the zero-shot
        calls and of their lowest-common-ancestor answers); and timings.
    """
    import torch

    start = time.perf_counter()
    out = Path(out_dir)
    _check_out(out, overwrite)
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    with atomic_directory(out, overwrite=overwrite, ours=is_demo_output, what="demo output") as tmp:
        report = _run_steps(tmp, seed, quiet, recipe, timings)
        if keep_intermediate:
            report["intermediate"] = "kept"
        else:
            freed = remove_intermediate(tmp)
            report["intermediate"] = f"removed ({freed / 1e6:.0f} MB)"
            _say(quiet, f"      removed the intermediate results ({', '.join(INTERMEDIATE.values())}: "
                        f"{freed / 1e6:.0f} MB); --keep-intermediate keeps them")
        timings["total"] = round(time.perf_counter() - start, 1)
        report["seconds"] = timings
        with atomic_file(tmp / "report.json") as file:
            file.write_text(json.dumps(report, indent=2))
    _print_summary(out, report, quiet)
    return report


def _run_steps(out: Path, seed: int, quiet: bool, recipe_name: str, timings: dict[str, float]) -> dict:
    """Steps 1 to 7 into ``out``; return the report (without its timings' total)."""
    from sklearn.metrics import accuracy_score, f1_score

    from . import tl
    from .data.corpus import write_corpus
    from .data.datasets import pbmc68k
    from .data.tokenizer import GeneTokenizer
    from .train import load_recipe, pretrain

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    t = time.perf_counter()
    _say(quiet, "[1/7] loading scanpy's PBMC sample (700 cells, 10 labelled types) ...")
    adata = pbmc68k()
    train, test = held_out_split(adata, "cell_type", seed=seed)
    resolution = adata.uns["cell_type_resolution"]
    for label, term, name in zip(resolution["label"], resolution["term_id"], resolution["term_label"], strict=True):
        _say(quiet, f"      {label:<30} -> {term} {name}")
    _say(quiet, f"      split: {train.n_obs} training cells, {test.n_obs} test cells (stratified, seed {seed})")
    t = lap("load", t)

    _say(quiet, "[2/7] fitting the gene vocabulary and tokenizing the training cells ...")
    tokenizer = GeneTokenizer.fit(train)
    recipe = load_recipe(recipe_name)
    recipe.seed = seed
    corpus = write_corpus([train], tokenizer, out / "corpus", max_length=recipe.max_length, progress=False)
    _say(quiet, corpus.reports[0].summary())
    t = lap("tokenize", t)

    _say(quiet, f"[3/7] pretraining the small model, both stages ({recipe.cell_steps} + {recipe.joint_steps} steps) ...")
    model = pretrain(corpus, out / "run", recipe, progress=not quiet)
    model.eval()
    t = lap("pretrain", t)

    _say(quiet, f"[4/7] zero-shot annotation of the {test.n_obs} test cells from the 10 type descriptions ...")
    labels = sorted(test.obs["cell_type"].astype(str).unique())
    tl.annotate(test, model, labels, key_added=DEMO_KEY, lca_margin=LCA_MARGIN, progress=not quiet)
    truth = test.obs["cell_type"].astype(str).to_numpy()
    predicted = test.obs[DEMO_KEY].astype(str).to_numpy()
    tl.embed(test, model, key_added="X_langcell", progress=not quiet)
    refined = _refinements(test, labels, seed)
    t = lap("annotate", t)

    _say(quiet, "[5/7] logistic regression on the same split ...")
    baseline = logistic_regression_baseline(train, test, "cell_type", seed)
    t = lap("baseline", t)

    def scores(prediction) -> dict[str, float]:
        return {
            "accuracy": round(float(accuracy_score(truth, prediction)), 4),
            "macro_f1": round(float(f1_score(truth, prediction, average="macro", labels=labels, zero_division=0)), 4),
        }

    report = {
        "cells": {"train": int(train.n_obs), "test": int(test.n_obs)},
        "langcell_zero_shot": scores(predicted),
        "logistic_regression": scores(baseline),
        **refined,
        "seed": seed,
        "recipe": recipe.to_dict(),
    }
    report["explained_genes"] = _explain(test, model, quiet)
    t = lap("explain", t)
    _write_figures_and_cells(out, test, model, truth, predicted, labels, seed, quiet)
    lap("write", t)
    return report


def _write_figures_and_cells(out: Path, test, model, truth, predicted, labels, seed: int, quiet: bool) -> None:
    """Steps 6 and 7: the embedding, UMAP and figures; the annotated h5ad."""
    import scanpy as sc

    from . import pl

    _say(quiet, f"[6/7] UMAP of the {test.n_obs} test cells and figures ...")
    _say(quiet, "      neighbours and UMAP of the embeddings (computed in step 4) ...")
    sc.pp.neighbors(test, use_rep="X_langcell", random_state=seed)
    sc.tl.umap(test, random_state=seed)
    _say(quiet, "      drawing umap.png and confusion_matrix.png ...")
    pl.umap(test, ["cell_type", DEMO_KEY], out / "umap.png", titles=["true type", "LangCell zero-shot"])
    pl.confusion_matrix(truth, predicted, out / "confusion_matrix.png", labels=labels,
                        title="LangCell zero-shot, held-out PBMCs")
    pl.explain(test, out / "explain.png", key_added=DEMO_KEY + "_explain", n_genes=5,
               title="genes that drive each prediction (gradient x input)")
    _say(quiet, "[7/7] writing annotated.h5ad and report.json ...")
    with atomic_file(out / "annotated.h5ad") as tmp:
        test.write_h5ad(tmp)


def _print_summary(out: Path, report: dict, quiet: bool) -> None:
    z, b = report["langcell_zero_shot"], report["logistic_regression"]
    n_test = report["cells"]["test"]
    _say(quiet, "")
    _say(quiet, f"                           accuracy   macro-F1   ({n_test} held-out cells, 10 types)")
    _say(quiet, f"LangCell zero-shot           {z['accuracy']:.3f}      {z['macro_f1']:.3f}")
    for name, row in report["consensus"].items():
        _say(quiet, f"  + consensus, {name:<13}{row['accuracy']:.3f}      {row['macro_f1']:.3f}   (no labels used)")
    _say(quiet, f"logistic regression          {b['accuracy']:.3f}      {b['macro_f1']:.3f}   (trained on labels)")
    for name, s in report["ontology_aware"].items():
        _say(quiet, f"ontology-aware, {name}: exact {s['exact']:.3f}, correct at an ancestor {s['ancestor']:.3f}, "
                    f"wrong {s['wrong']:.3f}")
    _say(quiet, f"\nwrote {out}/annotated.h5ad, umap.png, confusion_matrix.png, explain.png, report.json, run/model "
                f"in {report['seconds']['total']:.0f} s")


def _explain(test, model, quiet: bool) -> dict:
    """Explain the test cells' predictions; the top 10 genes of :data:`EXPLAINED_CLASSES`, printed."""
    from . import tl

    _say(quiet, "      explaining the predictions (which genes drive each cell's match) ...")
    tl.explain(test, model, key=DEMO_KEY, progress=False)
    table = tl.explanation_table(test, DEMO_KEY + "_explain")
    explained = {}
    for name in EXPLAINED_CLASSES:
        genes = table.loc[table["class"] == name, "gene"].head(10).tolist()
        explained[name] = genes
        _say(quiet, f"      {name:<24} {', '.join(genes) if genes else '(no cell predicted)'}")
    return explained

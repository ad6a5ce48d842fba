"""``langcell demo``: the whole LangCell pipeline on scanpy's bundled PBMCs, in minutes on a laptop CPU.

1. 700 PBMCs with raw counts (reconstructed from scanpy's ``pbmc68k_reduced``), their 10 labels resolved
   to Cell Ontology terms;
2. a stratified 80/20 split (seeded);
3. a gene vocabulary and medians fitted on the training cells; the training cells tokenized into a corpus;
4. the ``small`` model pretrained on the training cells and their ontology texts, both stages (recipe
   ``demo``);
5. the test cells annotated zero-shot from the 10 type descriptions;
6. accuracy and macro-F1 printed next to a logistic regression trained on the same training cells;
7. the annotations explained (:func:`langcell.tl.explain`): the top genes of the cells predicted B
   cell, NK cell and CD14 monocyte printed and stored in the report, all classes drawn in explain.png;
8. the annotated h5ad, a UMAP coloured by predicted and true type, and a confusion matrix written.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ._atomic import atomic_file, check_output_parent
from .data.splits import held_out_split
from .errors import LangCellError
from .evaluation.baselines import logistic_regression_baseline

DEMO_KEY = "langcell_cell_type"
#: The classes whose explanations the demo prints and reports (issue 14's marker check).
EXPLAINED_CLASSES = ("B cell, CD19-positive", "natural killer cell", "CD14-positive monocyte")


def _say(quiet: bool, *parts: object) -> None:
    if not quiet:
        print(*parts, flush=True)


def run_demo(
    out_dir: str | os.PathLike = "langcell_demo", *, seed: int = 0, quiet: bool = False, recipe: str = "demo"
) -> dict:
    """Run the demo end to end; return the report written to ``OUT/report.json``.

    Parameters
    ----------
    out_dir
        Output directory (created; an earlier demo there is replaced).
    seed
        Seed of the split, the weights and the training; the same seed gives the same numbers.
    quiet
        Print nothing.
    recipe
        Pretraining recipe (the packaged ``demo``; tests pass ``tiny``).

    Returns
    -------
    dict
        ``accuracy``, ``macro_f1`` of LangCell zero-shot and of the logistic regression, and timings.
    """
    import scanpy as sc
    import torch
    from sklearn.metrics import accuracy_score, f1_score

    from . import pl, tl
    from .data.corpus import write_corpus
    from .data.datasets import pbmc68k
    from .data.tokenizer import GeneTokenizer
    from .train import load_recipe, pretrain

    start = time.perf_counter()
    out = Path(out_dir)
    check_output_parent(out)
    if out.exists() and not out.is_dir():
        raise LangCellError(f"{str(out)!r} is a file, not a folder; pass --out <a folder for the demo's outputs>")
    out.mkdir(exist_ok=True)
    torch.manual_seed(seed)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    t = time.perf_counter()
    _say(quiet, "[1/6] loading scanpy's PBMC sample (700 cells, 10 labelled types) ...")
    adata = pbmc68k()
    train, test = held_out_split(adata, "cell_type", seed=seed)
    resolution = adata.uns["cell_type_resolution"]
    for label, term, name in zip(resolution["label"], resolution["term_id"], resolution["term_label"], strict=True):
        _say(quiet, f"      {label:<30} -> {term} {name}")
    _say(quiet, f"      split: {train.n_obs} training cells, {test.n_obs} test cells (stratified, seed {seed})")
    t = lap("load", t)

    _say(quiet, "[2/6] fitting the gene vocabulary and tokenizing the training cells ...")
    tokenizer = GeneTokenizer.fit(train)
    recipe_name = recipe
    recipe = load_recipe(recipe_name)
    recipe.seed = seed
    corpus = write_corpus(
        [train], tokenizer, out / "corpus", max_length=recipe.max_length, overwrite=True, progress=False
    )
    _say(quiet, corpus.reports[0].summary())
    t = lap("tokenize", t)

    _say(quiet, f"[3/6] pretraining the small model, both stages ({recipe.cell_steps} + {recipe.joint_steps} steps) ...")
    model = pretrain(corpus, out / "run", recipe, overwrite=True, progress=not quiet)
    model.eval()
    t = lap("pretrain", t)

    _say(quiet, "[4/6] zero-shot annotation of the test cells from the 10 type descriptions ...")
    labels = sorted(test.obs["cell_type"].astype(str).unique())
    tl.annotate(test, model, labels, key_added=DEMO_KEY, progress=False)
    truth = test.obs["cell_type"].astype(str).to_numpy()
    predicted = test.obs[DEMO_KEY].astype(str).to_numpy()
    t = lap("annotate", t)

    _say(quiet, "[5/6] logistic regression on the same split ...")
    baseline = logistic_regression_baseline(train, test, "cell_type", seed)
    t = lap("baseline", t)

    report = {
        "cells": {"train": int(train.n_obs), "test": int(test.n_obs)},
        "langcell_zero_shot": {
            "accuracy": round(float(accuracy_score(truth, predicted)), 4),
            "macro_f1": round(float(f1_score(truth, predicted, average="macro", labels=labels, zero_division=0)), 4),
        },
        "logistic_regression": {
            "accuracy": round(float(accuracy_score(truth, baseline)), 4),
            "macro_f1": round(float(f1_score(truth, baseline, average="macro", labels=labels, zero_division=0)), 4),
        },
        "seed": seed,
        "recipe": recipe.to_dict(),
    }
    report["explained_genes"] = _explain(test, model, quiet)
    t = lap("explain", t)

    _say(quiet, "[6/6] writing the annotated cells and figures ...")
    tl.embed(test, model, key_added="X_langcell", progress=False)
    sc.pp.neighbors(test, use_rep="X_langcell", random_state=seed)
    sc.tl.umap(test, random_state=seed)
    pl.umap(test, ["cell_type", DEMO_KEY], out / "umap.png", titles=["true type", "LangCell zero-shot"])
    pl.confusion_matrix(truth, predicted, out / "confusion_matrix.png", labels=labels,
                        title="LangCell zero-shot, held-out PBMCs")
    pl.explain(test, out / "explain.png", key_added=DEMO_KEY + "_explain", n_genes=5,
               title="genes that drive each prediction (gradient x input)")
    with atomic_file(out / "annotated.h5ad") as tmp:
        test.write_h5ad(tmp)
    lap("write", t)
    timings["total"] = round(time.perf_counter() - start, 1)
    report["seconds"] = timings
    with atomic_file(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))

    z, b = report["langcell_zero_shot"], report["logistic_regression"]
    _say(quiet, "")
    _say(quiet, f"                           accuracy   macro-F1   ({test.n_obs} held-out cells, 10 types)")
    _say(quiet, f"LangCell zero-shot           {z['accuracy']:.3f}      {z['macro_f1']:.3f}")
    _say(quiet, f"logistic regression          {b['accuracy']:.3f}      {b['macro_f1']:.3f}   (trained on labels)")
    _say(quiet, f"\nwrote {out}/annotated.h5ad, umap.png, confusion_matrix.png, explain.png, report.json, run/model "
                f"in {timings['total']:.0f} s")
    return report


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

"""Cell identity on held-out cells: zero-shot, few-shot and fine-tuned LangCell next to expression baselines.

The record script of the paper's cell-identity experiments for a pretrained langcell model. Every number
comes from cells the model never saw in pretraining:

``--data cbmc``
    ``../shared/data/cbmc_citeseq_500genes.h5ad`` (or ``--data-path``), the 'Mouse' and 'Unknown' cells
    left out, split 80/20 stratified by ``cell_type`` with the seed (0), exactly as
    ``benchmarks/pretrain_cbmc.py`` splits before pretraining; the held-out 20 % is used.
``--data pbmc68k``
    scanpy's 700 PBMCs (:func:`langcell.data.datasets.pbmc68k`), split as ``langcell demo`` splits them
    (:func:`langcell.demo.held_out_split`); the held-out 20 % is used.

On the held-out cells:

1. **zero-shot** annotation (:func:`langcell.tl.annotate`, default fast mode) against every cell type
   present, and against the few-shot classes only (the like-for-like reference for the curves);
2. **few-shot** curves (:func:`langcell.evaluation.fewshot`): LangCell tuned on n cells per class (both encoders)
   vs logistic regression and kNN on the same cells, for n in ``--shots``, ``--repeats`` random splits.
   Classes with fewer than ``max(shots) + --min-test`` held-out cells are left out of this part and of
   the next (listed in the report);
3. **LangCell-CE** (:func:`langcell.tl.finetune`, linear probe and full fine-tuning, the paper's 2:1
   split of the same classes) next to a logistic regression on exactly that split.

Writes ``OUT/report.json`` and ``OUT/fewshot.png`` (macro-F1 curves) and prints Markdown tables.

    python benchmarks/cell_identity.py --model runs/cbmc/run/model --data cbmc --out runs/cell_identity_cbmc
    python benchmarks/cell_identity.py --model DIR --data pbmc68k --quick     # smoke run, a minute on a CPU
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from langcell import evaluation, pl, tl
from langcell._atomic import write_json  # atomic JSON writer (numpy values included)
from langcell.data.datasets import pbmc68k
from langcell.data.splits import held_out_split
from langcell.evaluation.baselines import log_normalised_features, logistic_regression_predict
from langcell.metrics import classification_metrics
from langcell.models.langcell import LangCell

CBMC = Path(__file__).resolve().parents[2] / "shared" / "data" / "cbmc_citeseq_500genes.h5ad"
LABEL_KEY = "cell_type"
METHOD_NAMES = {"langcell": "LangCell", "logistic_regression": "logistic regression", "knn": "kNN (PCA)"}


def held_out_cells(data: str, path: str, seed: int) -> ad.AnnData:
    """The held-out 20 % of the dataset, split as its pretraining run split it."""
    if data == "cbmc":
        adata = ad.read_h5ad(path)
        adata = adata[~adata.obs["author_cell_type"].isin(["Mouse", "Unknown"])].copy()
    else:
        adata = pbmc68k()
    # benchmarks/pretrain_cbmc.py calls train_test_split(arange(n), test_size=0.2, random_state=seed,
    # stratify=<cell_type as str>); held_out_split makes the same call, as the demo does for pbmc68k.
    _, test = held_out_split(adata, LABEL_KEY, test_size=0.2, seed=seed)
    test.obs[LABEL_KEY] = test.obs[LABEL_KEY].astype(str)
    return test


def add_held_out_arguments(parser, *, required: bool = True, model_help: str | None = None) -> None:
    """Add ``--model``, ``--data`` and ``--data-path``: a model and the data of :func:`held_out_cells`.

    ``required=False`` makes ``--model`` optional and ``--data`` default to pbmc68k.
    """
    parser.add_argument("--model", required=required, help=model_help or "a pretrained langcell model directory")
    parser.add_argument("--data", choices=["cbmc", "pbmc68k"], required=required,
                        default=None if required else "pbmc68k")
    parser.add_argument("--data-path", default=str(CBMC), help="cbmc_citeseq_500genes.h5ad (--data cbmc)")


def quick_subset(adata: ad.AnnData, per_class: int, seed: int) -> ad.AnnData:
    """At most ``per_class`` cells of every class (seeded), for a smoke run."""
    rng = np.random.default_rng(seed)
    labels = adata.obs[LABEL_KEY].to_numpy()
    rows = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in sorted(set(labels))]
    return adata[np.sort(np.concatenate(rows))].copy()


def metrics_of(truth: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    index = {name: code for code, name in enumerate(classes)}
    codes = np.array([index[t] for t in truth])
    predicted_codes = np.array([index[p] for p in predicted])
    result = classification_metrics(codes, predicted_codes, len(classes))
    return {"accuracy": round(result["accuracy"], 4), "macro_f1": round(result["macro_f1"], 4), "n_cells": len(truth)}


def zero_shot(adata: ad.AnnData, model, classes: list[str], max_length: int | None) -> dict:
    annotated = tl.annotate(adata, model, classes, max_length=max_length, copy=True)
    truth = adata.obs[LABEL_KEY].to_numpy()
    return metrics_of(truth, annotated.obs["langcell_cell_type"].astype(str).to_numpy(), classes)


def logistic_regression_on_split(adata: ad.AnnData, key_added: str, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """A logistic regression on log-normalised counts, on the train/test split ``tl.finetune`` wrote.

    Returns its :func:`classification_metrics` on the test cells and the train and test rows.
    """
    split = adata.obs[key_added + "_split"].astype(str).to_numpy()
    classes = list(adata.uns[key_added]["classes"])
    codes = np.array([classes.index(v) for v in adata.obs[LABEL_KEY]])
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    features = log_normalised_features(adata)
    predicted = logistic_regression_predict(features[train], codes[train], features[test], seed)
    return classification_metrics(codes[test], predicted, len(classes)), train, test


def fine_tuned(adata: ad.AnnData, model, seed: int, max_length: int | None, epochs: dict) -> dict:
    """LangCell-CE (linear and full) and a logistic regression on the same 2:1 split."""
    out = {}
    for mode in ("linear", "full"):
        start = time.perf_counter()
        _, metrics = tl.finetune(adata, model, LABEL_KEY, mode=mode, epochs=epochs[mode], seed=seed,
                                 max_length=max_length, key_added=f"ce_{mode}")
        out[f"langcell_ce_{mode}"] = {
            "accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4),
            "n_train": metrics["n_train"], "n_test": metrics["n_test"],
            "seconds": round(time.perf_counter() - start, 1),
        }
    split = adata.obs["ce_full_split"].astype(str).to_numpy()
    assert np.array_equal(split, adata.obs["ce_linear_split"].astype(str).to_numpy())  # one split, one seed
    metrics, train, test = logistic_regression_on_split(adata, "ce_full", seed)
    out["logistic_regression"] = {
        "accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4),
        "n_train": int(train.size), "n_test": int(test.size),
    }
    return out


def markdown_tables(report: dict) -> str:
    """One table per metric: methods as rows; zero-shot, n-shot and fine-tuned as columns."""
    shots = report["settings"]["shots"]
    results = pd.DataFrame(report["fewshot"]["results"])
    summary = results.groupby(["method", "shots"])[["accuracy", "macro_f1"]].agg(["mean", "std"])
    lines = []
    for metric, title in (("macro_f1", "macro-F1"), ("accuracy", "accuracy")):
        header = ["method", "zero-shot", *[f"{n}-shot" for n in shots], "fine-tuned (2:1)"]
        lines += [f"\n{title} on held-out {report['data']} cells "
                  f"({len(report['fewshot']['classes'])} classes; mean ± std over {report['settings']['repeats']} "
                  "repeat(s))\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method in ("langcell", "logistic_regression", "knn"):
            cells = [METHOD_NAMES[method]]
            cells.append(f"{report['zero_shot']['fewshot_classes'][metric]:.3f}" if method == "langcell" else "")
            for n in shots:
                mean, std = summary.loc[(method, n), (metric, "mean")], summary.loc[(method, n), (metric, "std")]
                cells.append(f"{mean:.3f}" + (f" ± {std:.3f}" if np.isfinite(std) else ""))
            tuned = report["fine_tuned"]
            if method == "langcell":
                cells.append(f"{tuned['langcell_ce_full'][metric]:.3f} (CE full), "
                             f"{tuned['langcell_ce_linear'][metric]:.3f} (CE linear)")
            elif method == "logistic_regression":
                cells.append(f"{tuned['logistic_regression'][metric]:.3f}")
            else:
                cells.append("")
            lines.append("| " + " | ".join(cells) + " |")
    all_classes = report["zero_shot"]["all_classes"]
    lines.append(f"\nzero-shot against all {len(all_classes['classes'])} types: accuracy "
                 f"{all_classes['accuracy']:.3f}, macro-F1 {all_classes['macro_f1']:.3f} "
                 f"({all_classes['n_cells']} cells)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_held_out_arguments(parser)
    parser.add_argument("--out", help="output directory (default runs/cell_identity_<data>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 80/20 split and of every method")
    parser.add_argument("--shots", default="1,3,5,10", help="training cells per class, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="random few-shot splits per n")
    parser.add_argument("--epochs", type=int, default=20, help="few-shot tuning epochs of LangCell")
    parser.add_argument("--min-test", type=int, default=3,
                        help="held-out cells a class keeps beyond max(shots) to take part in few-shot/fine-tuning")
    parser.add_argument("--max-length", type=int, help="longest cell in tokens (default: the model's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: <= 25 cells per class, shots 1,3, one repeat, 2 epochs, 64 tokens")
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out or f"runs/cell_identity_{args.data}")
    out.mkdir(parents=True, exist_ok=True)
    shots = [int(n) for n in args.shots.split(",")]
    repeats, epochs, max_length = args.repeats, args.epochs, args.max_length
    ce_epochs = {"linear": None, "full": None}  # finetune's defaults
    if args.quick:
        shots, repeats, epochs, max_length = [1, 3], 1, 2, 64
        ce_epochs = {"linear": 20, "full": 1}
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = LangCell.from_pretrained(args.model, map_location=device).eval()

    cells = held_out_cells(args.data, args.data_path, args.seed)
    if args.quick:
        cells = quick_subset(cells, 25, args.seed)
    counts = cells.obs[LABEL_KEY].value_counts()
    all_classes = sorted(counts.index)
    kept = [c for c in all_classes if counts[c] >= max(shots) + args.min_test]
    dropped = {c: int(counts[c]) for c in all_classes if c not in kept}
    print(f"{args.data}: {cells.n_obs} held-out cells, {len(all_classes)} types; few-shot and fine-tuning on "
          f"{len(kept)} types with >= {max(shots) + args.min_test} cells (left out: {dropped or 'none'})", flush=True)
    subset = cells[cells.obs[LABEL_KEY].isin(kept).to_numpy()].copy()

    timings = {}
    t = time.perf_counter()
    zero = {"all_classes": {**zero_shot(cells, model, all_classes, max_length), "classes": all_classes}}
    zero["fewshot_classes"] = (
        zero["all_classes"] if kept == all_classes
        else {**zero_shot(subset, model, kept, max_length), "classes": kept}
    )
    timings["zero_shot"] = round(time.perf_counter() - t, 1)
    for name, result in zero.items():
        print(f"zero-shot ({name}): accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f}", flush=True)

    t = time.perf_counter()
    results = evaluation.fewshot(subset, model, LABEL_KEY, shots=shots, repeats=repeats, labels=kept, epochs=epochs,
                         seed=args.seed, max_length=max_length, progress=True)
    timings["fewshot"] = round(time.perf_counter() - t, 1)
    fewshot_uns = subset.uns["langcell_fewshot"]

    t = time.perf_counter()
    tuned = fine_tuned(subset, model, args.seed, max_length, ce_epochs)
    timings["fine_tuned"] = round(time.perf_counter() - t, 1)
    timings["total"] = round(time.perf_counter() - start, 1)

    report = {
        "data": args.data,
        "model": str(args.model),
        "cells": {"held_out": int(cells.n_obs), "fewshot_and_fine_tuned": int(subset.n_obs),
                  "per_class": {c: int(n) for c, n in counts.items()}, "left_out_classes": dropped},
        "settings": {"seed": args.seed, "shots": shots, "repeats": repeats, "epochs": epochs,
                     "min_test": args.min_test, "max_length": max_length, "quick": args.quick,
                     "ce_epochs": ce_epochs, "device": device, "torch_threads": torch.get_num_threads()},
        "zero_shot": zero,
        "fewshot": {"results": {k: list(v) for k, v in fewshot_uns["results"].items()},
                    "classes": list(fewshot_uns["classes"]), "params": fewshot_uns["params"],
                    "train_loss": fewshot_uns["train_loss"]},
        "fine_tuned": tuned,
        "seconds": timings,
    }
    write_json(str(out / "report.json"), report)
    pl.fewshot_curves(results, out / "fewshot.png",
                      title=f"few-shot annotation, held-out {args.data} cells ({len(kept)} types)")
    print(markdown_tables(report))
    print(f"\nwrote {out}/report.json and {out}/fewshot.png in {timings['total']:.0f} s", flush=True)


if __name__ == "__main__":
    main()

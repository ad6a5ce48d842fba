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
import json
import os
import time
import warnings
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


def fine_tuned(adata: ad.AnnData, model, seed: int, max_length: int | None, epochs: dict, modes) -> dict:
    """LangCell-CE (linear probe with a random or a text-initialised head, full) and a logistic regression,
    all on the same 2:1 split."""
    out = {}
    for name, mode, head in (("linear", "linear", "random"), ("linear_text", "linear", "text"), ("full", "full", "random")):
        if name not in modes:
            continue
        start = time.perf_counter()
        _, metrics = tl.finetune(adata, model, LABEL_KEY, mode=mode, head=head, epochs=epochs[mode], seed=seed,
                                 max_length=max_length, key_added=f"ce_{name}", progress=False)
        out[f"langcell_ce_{name}"] = {
            "accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4),
            "n_train": metrics["n_train"], "n_test": metrics["n_test"],
            "seconds": round(time.perf_counter() - start, 1),
        }
    metrics, train, test = logistic_regression_on_split(adata, f"ce_{modes[0]}", seed)
    out["logistic_regression"] = {
        "accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4),
        "n_train": int(train.size), "n_test": int(test.size),
    }
    return out


def fewshot_all_methods(subset, model, shots, repeats, seed, max_length, full_epochs, full_repeats) -> tuple:
    """Every few-shot method on the same splits, in one process.

    The cheap methods (with zero-shot and the baselines) run ``repeats`` splits; the full tuning runs the
    first ``full_repeats`` of the same splits (same seed: repeat r draws the same cells) with
    ``full_epochs``. Rows are named by method (``langcell:<method>``), each also with the EM prior
    correction (``+em``).
    """
    common = dict(shots=shots, labels=sorted(set(subset.obs[LABEL_KEY])), seed=seed, max_length=max_length,
                  prior=["uniform", "em"], progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cheap = subset.copy()
        start = time.perf_counter()
        evaluation.fewshot(cheap, model, LABEL_KEY, repeats=repeats, method="wise", methods=["wise", "linear"],
                           inplace=True, **common)
        seconds = {"cheap": time.perf_counter() - start}
        stored = cheap.uns["langcell_fewshot"]
        table = pd.DataFrame(stored["results"]).replace(
            {"method": {"langcell": "langcell:wise", "langcell+em": "langcell:wise+em"}})
        if full_repeats:
            full = subset.copy()
            start = time.perf_counter()
            evaluation.fewshot(full, model, LABEL_KEY, repeats=full_repeats, method="full", methods=["full"],
                               epochs=full_epochs, baselines=(), inplace=True, **common)
            seconds["full"] = time.perf_counter() - start
            rows = pd.DataFrame(full.uns["langcell_fewshot"]["results"])
            rows = rows[rows["method"].str.startswith("langcell")].replace(
                {"method": {"langcell": "langcell:full", "langcell+em": "langcell:full+em"}})
            table = pd.concat([table, rows], ignore_index=True)
    fallbacks = [str(w.message) for w in caught if "falling back" in str(w.message)]
    skipped = [str(w.message) for w in caught if "few-shot:" in str(w.message)]
    return table, {"priors": stored["priors"], "choices": stored["choices"], "em_fallbacks": fallbacks,
                   "skipped": skipped, "zero_shot_seconds": stored["params"]["zero_shot_seconds"],
                   "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def fewshot_tables(table: pd.DataFrame, data: str) -> str:
    """Mean ± std over the repeats of every row, per shot count; then seconds and cells/s per method."""
    shots = sorted(set(table["shots"]))
    summary = table.groupby(["method", "shots"]).agg(
        accuracy=("accuracy", "mean"), accuracy_std=("accuracy", "std"), macro_f1=("macro_f1", "mean"),
        macro_f1_std=("macro_f1", "std"), seconds=("seconds", "mean"), n_test=("n_test", "mean"),
        repeats=("repeat", "count"))
    lines = []
    for metric, title in (("macro_f1", "macro-F1"), ("accuracy", "accuracy")):
        lines += [f"\n{title}, held-out {data} cells (mean ± std over the repeats, n = repeats)\n",
                  "| row | " + " | ".join(f"{n}-shot" for n in shots) + " |", "|---|" + "---:|" * len(shots)]
        for method in dict.fromkeys(table["method"]):
            cells = [method]
            for n in shots:
                row = summary.loc[(method, n)]
                std = "" if not np.isfinite(row[f"{metric}_std"]) else f" ± {row[f'{metric}_std']:.3f}"
                cells.append(f"{row[metric]:.3f}{std} (n={int(row['repeats'])})")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["\ncost: seconds per run (one shot count, one repeat; zero-shot-based rows include their share of "
              "the one zero-shot pass) and test cells per second\n",
              "| row | " + " | ".join(f"{n}-shot s (cells/s)" for n in shots) + " |", "|---|" + "---:|" * len(shots)]
    for method in dict.fromkeys(table["method"]):
        if method.endswith("+em"):
            continue
        cells = [method]
        for n in shots:
            row = summary.loc[(method, n)]
            cells.append(f"{row['seconds']:.2f} ({row['n_test'] / max(row['seconds'], 1e-9):.0f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_held_out_arguments(parser)
    parser.add_argument("--out", help="output directory (default runs/cell_identity_<data>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 80/20 split and of every method")
    parser.add_argument("--shots", default="1,3,5,10", help="training cells per class, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="random few-shot splits per n")
    parser.add_argument("--epochs", type=int, default=20, help="few-shot tuning epochs of the full method")
    parser.add_argument("--full-repeats", type=int, help="repeats of the full method (default --repeats; 0: skip)")
    parser.add_argument("--min-test", type=int, default=3,
                        help="held-out cells a class keeps beyond max(shots) to take part in few-shot/fine-tuning")
    parser.add_argument("--max-length", type=int, help="longest cell in tokens (default: the model's)")
    parser.add_argument("--ce", default="linear,linear_text,full",
                        help="LangCell-CE variants to run: linear (random head), linear_text, full ('' for none)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: <= 25 cells per class, shots 1,3, one repeat, 2 epochs, 64 tokens")
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out or f"runs/cell_identity_{args.data}")
    out.mkdir(parents=True, exist_ok=True)
    shots = [int(n) for n in args.shots.split(",")]
    repeats, epochs, max_length = args.repeats, args.epochs, args.max_length
    full_repeats = repeats if args.full_repeats is None else args.full_repeats
    ce_modes = [mode for mode in args.ce.split(",") if mode]
    ce_epochs = {"linear": None, "full": None}  # finetune's defaults
    if args.quick:
        shots, repeats, epochs, max_length, full_repeats = [1, 3], 1, 2, 64, 1
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
    timings["zero_shot"] = round(time.perf_counter() - t, 1)
    print(f"zero-shot (all classes): accuracy {zero['all_classes']['accuracy']:.3f}, "
          f"macro-F1 {zero['all_classes']['macro_f1']:.3f}", flush=True)
    # Zero-shot against the class set with the EM prior (no labels: the model's own temperature).
    annotated = tl.annotate(subset, model, kept, max_length=max_length, prior="em", copy=True, progress=False)
    zero["fewshot_classes_em"] = {
        **metrics_of(subset.obs[LABEL_KEY].to_numpy(), annotated.obs["langcell_cell_type"].astype(str).to_numpy(),
                     kept), "prior": annotated.uns["langcell_cell_type"]["prior"]}

    t = time.perf_counter()
    table, extra = fewshot_all_methods(subset, model, shots, repeats, args.seed, max_length, epochs, full_repeats)
    timings["fewshot"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    tuned = fine_tuned(subset, model, args.seed, max_length, ce_epochs, ce_modes) if ce_modes else {}
    timings["fine_tuned"] = round(time.perf_counter() - t, 1)
    timings["total"] = round(time.perf_counter() - start, 1)

    report = {
        "data": args.data,
        "model": str(args.model),
        "cells": {"held_out": int(cells.n_obs), "fewshot_and_fine_tuned": int(subset.n_obs),
                  "per_class": {c: int(n) for c, n in counts.items()}, "left_out_classes": dropped},
        "settings": {"seed": args.seed, "shots": shots, "repeats": repeats, "full_repeats": full_repeats,
                     "epochs": epochs, "min_test": args.min_test, "max_length": max_length, "quick": args.quick,
                     "ce_epochs": ce_epochs, "device": device, "torch_threads": torch.get_num_threads(),
                     "load_average": list(os.getloadavg())},
        "zero_shot": zero,
        "fewshot": {"results": table.to_dict(orient="list"), "classes": kept, **extra},
        "fine_tuned": tuned,
        "seconds": timings,
    }
    write_json(str(out / "report.json"), report)
    pl.fewshot_curves(table, out / "fewshot.png",
                      title=f"few-shot annotation, held-out {args.data} cells ({len(kept)} types)")
    print(fewshot_tables(table, args.data))
    print("\nLangCell-CE (2:1 split):", json.dumps(tuned, indent=1))
    print("zero-shot + EM prior on the few-shot classes:", json.dumps(zero["fewshot_classes_em"], indent=1))
    print(f"EM fallbacks: {len(extra['em_fallbacks'])}; load average at the end {os.getloadavg()}")
    print(f"\nwrote {out}/report.json and {out}/fewshot.png in {timings['total']:.0f} s", flush=True)


if __name__ == "__main__":
    main()

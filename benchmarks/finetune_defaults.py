"""LangCell-CE full fine-tuning: the default number of epochs, old (3) against new (>= 200 steps).

Full fine-tuning with 3 epochs makes a handful of optimiser steps on a training set of a few hundred cells
(2 steps per epoch for 84 cells in batches of 64), which leaves the classifier close to where it started.
``finetune(..., epochs=None)`` now makes at least 200 steps (:func:`langcell.train.finetune.full_finetuning_epochs`).
This script measures what that changes, in one process, on the same held-out cells and the same 2:1 split:

1. the cells the model never saw in pretraining, split as :mod:`benchmarks.cell_identity` splits them
   (``--data cbmc`` or ``pbmc68k``), the classes with at least ``--min-cells`` held-out cells;
2. LangCell-CE linear probe (its defaults), full fine-tuning with 3 epochs (the previous default), full
   fine-tuning with ``epochs=None`` (the new default), each with every other setting at its default;
3. a logistic regression on log-normalised counts of the same training cells.

Prints a Markdown table (macro-F1, accuracy, epochs, optimiser steps, seconds) for each ``--seeds``
value, and the new default's macro-F1 against the old one as a ratio.

    python benchmarks/finetune_defaults.py --model runs/pbmc68k_demo/run/model --data pbmc68k
    python benchmarks/finetune_defaults.py --model runs/cbmc/run/model --data cbmc
"""

from __future__ import annotations

import argparse
import time

import torch
from cell_identity import (  # benchmarks/ is on sys.path when run as a script
    LABEL_KEY,
    add_held_out_arguments,
    held_out_cells,
    logistic_regression_on_split,
)

from langcell import tl
from langcell.models.langcell import LangCell

#: Classes kept by default: those that take part in the fine-tuned column of benchmarks/cell_identity.py
#: (max(shots) + 3 held-out cells: shots up to 10 on CBMC, up to 5 on pbmc68k).
MIN_CELLS = {"cbmc": 13, "pbmc68k": 8}
SETTINGS = {
    "CE linear (default)": {"mode": "linear"},
    "CE full, 3 epochs (old default)": {"mode": "full", "epochs": 3},
    "CE full, epochs=None (new default)": {"mode": "full"},
}


def one_seed(adata, model, seed: int, max_length: int | None) -> list[dict]:
    rows = []
    for name, setting in SETTINGS.items():
        start = time.perf_counter()
        _, metrics = tl.finetune(adata, model, LABEL_KEY, seed=seed, max_length=max_length, key_added="ce",
                                 **setting)
        seconds = time.perf_counter() - start
        epochs = adata.uns["ce"]["params"]["epochs"]
        rows.append({"method": name, "macro_f1": metrics["macro_f1"], "accuracy": metrics["accuracy"],
                     "epochs": epochs, "steps": metrics["n_steps"], "seconds": seconds,
                     "n_train": metrics["n_train"], "n_test": metrics["n_test"]})
    start = time.perf_counter()  # the split finetune wrote: one seeded split for every setting
    metrics, train, test = logistic_regression_on_split(adata, "ce", seed)
    rows.append({"method": "logistic regression", "macro_f1": metrics["macro_f1"], "accuracy": metrics["accuracy"],
                 "epochs": None, "steps": None, "seconds": time.perf_counter() - start,
                 "n_train": int(train.size), "n_test": int(test.size)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | macro-F1 | accuracy | epochs | steps | seconds |", "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        cells = [row["method"], f"{row['macro_f1']:.3f}", f"{row['accuracy']:.3f}",
                 "" if row["epochs"] is None else str(row["epochs"]),
                 "" if row["steps"] is None else str(row["steps"]), f"{row['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_held_out_arguments(parser)
    parser.add_argument("--seeds", default="0,1", help="seeds of the 2:1 split and training, comma-separated")
    parser.add_argument("--min-cells", type=int, help="held-out cells a class needs to take part (default by data)")
    parser.add_argument("--max-length", type=int, default=128, help="longest cell in tokens (the recipes' 128)")
    args = parser.parse_args()
    model = LangCell.from_pretrained(args.model).eval()
    cells = held_out_cells(args.data, args.data_path, 0)  # the pretraining split's held-out 20 %
    counts = cells.obs[LABEL_KEY].value_counts()
    min_cells = args.min_cells or MIN_CELLS[args.data]
    cells = cells[cells.obs[LABEL_KEY].isin(counts.index[counts >= min_cells]).to_numpy()].copy()
    print(f"{args.data}: {cells.n_obs} held-out cells of {cells.obs[LABEL_KEY].nunique()} types "
          f"(>= {min_cells} cells each); torch threads {torch.get_num_threads()}", flush=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        rows = one_seed(cells, model, seed, args.max_length)
        by_name = {row["method"]: row for row in rows}
        old, new = (by_name[name]["macro_f1"] for name in list(SETTINGS)[1:])
        print(f"\nseed {seed}: {rows[0]['n_train']} training cells, {rows[0]['n_test']} test cells")
        print(markdown(rows))
        print(f"new default / old default, macro-F1: {new / old:.2f}x", flush=True)


if __name__ == "__main__":
    main()

"""Few-shot tuning cost: the matching loss over every class against ``match_classes`` hard negatives.

``evaluation.fewshot``'s LangCell tuning (:func:`langcell.train.fewshot.tune_langcell`) runs the multimodal text tower
over (cell, class) pairs at every step. By default (the paper's protocol) that is every class, K pairs
per cell; ``match_classes=m`` scores the cell's own class and its m - 1 most similar others, m pairs
per cell. This script times both on the same cells, model and split, in one process, and prints the
ratio. It times the tuning only (what the option changes); annotating the test cells afterwards is the
same in both.

Cells: scanpy's bundled PBMCs (``langcell.data.datasets.pbmc68k``: 700 cells, 10 Cell Ontology types), 5
cells per class (seeded), each cut to its top ``--max-length`` genes. Model: the ``small`` preset (the
packaged all-MiniLM-L6-v2 text tower, a random cell encoder: speed does not depend on the cell weights).

Run from the repository root::

    python benchmarks/fewshot_matching.py                 # K = 10, m = 3, 5 shots, 2 epochs
    python benchmarks/fewshot_matching.py --match-classes 5 --shots 10

**Accuracy** (``--model DIR --data pbmc68k|cbmc``): what m does to the few-shot scores. A pretrained model
is tuned by :func:`langcell.evaluation.fewshot` (LangCell alone, no baselines) twice, the matching loss over
every class and over m classes, on the same held-out cells, shots, repeats and seeds (every run's
training cells are the same in both), as :mod:`benchmarks.cell_identity` runs it. Prints accuracy and
macro-F1 (mean and std over repeats) per n for both, the paired difference, and the seconds of each::

    python benchmarks/fewshot_matching.py --model runs/pbmc68k_demo/run/model --data pbmc68k \
        --shots 1,3,5 --repeats 3 --epochs 20 --max-length 128
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from cell_identity import (  # benchmarks/ is on sys.path when run as a script
    LABEL_KEY,
    add_held_out_arguments,
    held_out_cells,
)

from langcell import evaluation, ontology
from langcell.data import datasets
from langcell.data.splits import sample_shots
from langcell.data.tokenizer import GeneTokenizer
from langcell.models import LangCell
from langcell.models.config import LangCellConfig
from langcell.train.fewshot import tune_langcell


def speed(args: argparse.Namespace) -> None:
    """Tune twice (all classes, then m) on a random ``small`` model; print seconds and the ratio."""
    if len(args.shots) != 1:
        raise SystemExit("the speed run takes one --shots value (several are for --model runs)")
    shots, epochs = args.shots[0], args.epochs or 2
    max_length = args.max_length or 256
    adata = datasets.pbmc68k()
    classes = sorted(adata.obs["cell_type"].astype(str).unique())
    codes = adata.obs["cell_type"].astype(str).map({name: i for i, name in enumerate(classes)}).to_numpy()
    train, _ = sample_shots(codes, shots, seed=0)
    tokenizer = GeneTokenizer.fit(adata)
    cells = tokenizer.encode(adata[train], max_length=max_length)
    text_of, _ = ontology.label_texts(classes)
    texts = [text_of[name] for name in classes]
    config = LangCellConfig.preset("small")
    config.cell.vocab_size = tokenizer.vocab_size  # the vocabulary fitted on these cells
    config.cell.max_position_embeddings = max_length
    torch.manual_seed(0)
    model = LangCell.from_config(config, gene_tokenizer=tokenizer)
    print(
        f"pbmc68k: {len(classes)} classes, {train.size} training cells ({shots} per class), "
        f"{max_length} tokens at most; small model; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []
    for match_classes in (None, args.match_classes):
        # One untimed epoch first, so that one-time allocation and kernel set-up are not timed.
        tune_langcell(model, cells, codes[train], texts, epochs=1, max_length=max_length,
                      match_classes=match_classes)
        start = time.perf_counter()
        tune_langcell(model, cells, codes[train], texts, epochs=epochs, max_length=max_length,
                      match_classes=match_classes)
        seconds = time.perf_counter() - start
        rows.append((len(classes) if match_classes is None else match_classes, seconds))
        print(f"  match_classes={match_classes}: {seconds:.1f} s", flush=True)
    print()
    print("| matching loss over | tuning seconds | cells x epochs / s | speed-up |")
    print("|---|---:|---:|---:|")
    base_seconds = rows[0][1]
    for m, seconds in rows:
        label = f"all {m} classes (protocol)" if m == len(classes) else f"own + {m - 1} hardest"
        rate = train.size * epochs / seconds
        print(f"| {label} | {seconds:.1f} | {rate:.2f} | {base_seconds / seconds:.2f}x |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


def accuracy(args: argparse.Namespace) -> None:
    """``evaluation.fewshot`` with the matching loss over every class, then over m; print scores and seconds."""
    epochs = args.epochs or 20
    model = LangCell.from_pretrained(args.model, map_location="cpu").eval()
    cells = held_out_cells(args.data, args.data_path, args.seed)
    counts = cells.obs[LABEL_KEY].value_counts()
    kept = sorted(c for c in counts.index if counts[c] >= max(args.shots) + args.min_test)
    cells = cells[cells.obs[LABEL_KEY].isin(kept).to_numpy()].copy()
    print(
        f"{args.data}: {cells.n_obs} held-out cells of the {len(kept)} types with >= "
        f"{max(args.shots) + args.min_test} cells; shots {args.shots}, {args.repeats} repeats, {epochs} epochs, "
        f"{args.max_length or 'all'} tokens; torch {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if args.match_classes >= len(kept):
        raise SystemExit(f"--match-classes {args.match_classes} is not below the {len(kept)} classes kept")
    tables, seconds = {}, {}
    for m in (len(kept), args.match_classes):
        start = time.perf_counter()
        tables[m] = evaluation.fewshot(
            cells, model, LABEL_KEY, shots=args.shots, repeats=args.repeats, labels=kept, epochs=epochs,
            seed=args.seed, max_length=args.max_length, baselines=(), progress=True,
            match_classes=None if m == len(kept) else m, key_added=f"fewshot_m{m}",
        )
        seconds[m] = time.perf_counter() - start
        print(f"  matching over {m} classes: {seconds[m]:.0f} s", flush=True)
    # The two runs share their training cells (same seed, shots and repeats): compare them pairwise.
    runs = [cells.uns[f"fewshot_m{m}"]["train_cells"] for m in (len(kept), args.match_classes)]
    assert runs[0] == runs[1]
    full, cheap = (tables[m].set_index(["shots", "repeat"]) for m in (len(kept), args.match_classes))
    print()
    print(f"| shots | metric | all {len(kept)} classes | own + {args.match_classes - 1} hardest | "
          f"paired difference |")
    print("|---:|---|---:|---:|---:|")
    for n in args.shots:
        for metric in ("macro_f1", "accuracy"):
            a, b = full.loc[n][metric], cheap.loc[n][metric]
            diff = (b - a).to_numpy()
            print(f"| {n} | {metric} | {a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0:.3f} | "
                  f"{b.mean():.3f} ± {b.std(ddof=1) if len(b) > 1 else 0:.3f} | "
                  f"{diff.mean():+.3f} ({np.sum(diff > 0)} up, {np.sum(diff < 0)} down) |")
    print(f"\nall runs: macro-F1 {full['macro_f1'].mean():.3f} (all classes) vs {cheap['macro_f1'].mean():.3f} "
          f"(m = {args.match_classes}); {len(full)} paired runs")
    print(f"seconds: {seconds[len(kept)]:.0f} vs {seconds[args.match_classes]:.0f} "
          f"({seconds[len(kept)] / seconds[args.match_classes]:.2f}x); load average {os.getloadavg()[0]:.1f}")


def main() -> None:
    """Parse arguments; time the tuning (no ``--model``) or compare the scores (``--model``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", default="5",
                        help="training cells per class; comma-separated with --model (default 5)")
    parser.add_argument("--match-classes", type=int, default=3, help="m of the cheaper run (default 3)")
    parser.add_argument("--epochs", type=int, help="tuning epochs per run (default 2; 20 with --model)")
    parser.add_argument("--max-length", type=int, help="tokens per cell (default 256; the model's with --model)")
    add_held_out_arguments(parser, required=False,
                           model_help="a pretrained model directory: compare scores instead of timing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split and of the runs")
    parser.add_argument("--repeats", type=int, default=3, help="random few-shot splits per n (--model)")
    parser.add_argument("--min-test", type=int, default=3,
                        help="held-out cells a class keeps beyond max(shots) to take part (--model)")
    args = parser.parse_args()
    args.shots = [int(n) for n in args.shots.split(",")]
    if args.model:
        accuracy(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()

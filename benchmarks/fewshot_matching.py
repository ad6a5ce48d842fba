"""Few-shot tuning cost: the matching loss over every class against ``match_classes`` hard negatives.

``tl.fewshot``'s LangCell tuning (:func:`langcell.fewshot.tune_langcell`) runs the multimodal text tower
over (cell, class) pairs at every step. By default (the paper's protocol) that is every class, K pairs
per cell; ``match_classes=m`` scores the cell's own class and its m - 1 most similar others, m pairs
per cell. This script times both on the same cells, model and split, in one process, and prints the
ratio. It times the tuning only (what the option changes); annotating the test cells afterwards is the
same in both.

Cells: scanpy's bundled PBMCs (``langcell.datasets.pbmc68k``: 700 cells, 10 Cell Ontology types), 5
cells per class (seeded), each cut to its top ``--max-length`` genes. Model: the ``small`` preset (the
packaged all-MiniLM-L6-v2 text tower, a random cell encoder: speed does not depend on the cell weights).

Run from the repository root::

    python benchmarks/fewshot_matching.py                 # K = 10, m = 3, 5 shots, 2 epochs
    python benchmarks/fewshot_matching.py --match-classes 5 --shots 10
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from langcell import datasets, ontology
from langcell.config import LangCellConfig
from langcell.fewshot import sample_shots, tune_langcell
from langcell.models import LangCell
from langcell.tokenizer import GeneTokenizer


def main() -> None:
    """Parse arguments, tune twice (all classes, then m), print seconds per step and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, default=5, help="training cells per class (default 5)")
    parser.add_argument("--match-classes", type=int, default=3, help="m of the cheaper run (default 3)")
    parser.add_argument("--epochs", type=int, default=2, help="tuning epochs per run (default 2)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per cell (default 256)")
    args = parser.parse_args()

    adata = datasets.pbmc68k()
    classes = sorted(adata.obs["cell_type"].astype(str).unique())
    codes = adata.obs["cell_type"].astype(str).map({name: i for i, name in enumerate(classes)}).to_numpy()
    train, _ = sample_shots(codes, args.shots, seed=0)
    tokenizer = GeneTokenizer.fit(adata)
    cells = tokenizer.encode(adata[train], max_length=args.max_length)
    text_of, _ = ontology.label_texts(classes)
    texts = [text_of[name] for name in classes]
    config = LangCellConfig.preset("small")
    config.cell.vocab_size = tokenizer.vocab_size  # the vocabulary fitted on these cells
    config.cell.max_position_embeddings = args.max_length
    torch.manual_seed(0)
    model = LangCell.from_config(config, gene_tokenizer=tokenizer)
    print(
        f"pbmc68k: {len(classes)} classes, {train.size} training cells ({args.shots} per class), "
        f"{args.max_length} tokens at most; small model; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []
    for match_classes in (None, args.match_classes):
        # One untimed epoch first, so that one-time allocation and kernel set-up are not timed.
        tune_langcell(model, cells, codes[train], texts, epochs=1, max_length=args.max_length,
                      match_classes=match_classes)
        start = time.perf_counter()
        tune_langcell(model, cells, codes[train], texts, epochs=args.epochs,
                                  max_length=args.max_length, match_classes=match_classes)
        seconds = time.perf_counter() - start
        rows.append((len(classes) if match_classes is None else match_classes, seconds))
        print(f"  match_classes={match_classes}: {seconds:.1f} s", flush=True)
    print()
    print("| matching loss over | tuning seconds | cells x epochs / s | speed-up |")
    print("|---|---:|---:|---:|")
    base_seconds = rows[0][1]
    for m, seconds in rows:
        label = f"all {m} classes (protocol)" if m == len(classes) else f"own + {m - 1} hardest"
        rate = train.size * args.epochs / seconds
        print(f"| {label} | {seconds:.1f} | {rate:.2f} | {base_seconds / seconds:.2f}x |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

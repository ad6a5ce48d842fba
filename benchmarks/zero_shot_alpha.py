"""What skipping the matching head at ``alpha = 1`` saves: ``zero_shot_scores`` at alpha 0.1 against alpha 1.

Both runs are the fast mode (CTM for each cell's ``top_k`` classes) on the same cells, classes and random
weights, in one process, taking turns (0.1, 1, 0.1, 1, ...) so that load from other processes hits them
alike; the script prints each run's cells/s, the ratio of the medians, and checks that the alpha = 1
predictions are the similarity argmax (what ``1.0 * p_sim + 0.0 * p_ctm`` gave when the head still ran).
With alpha = 1 the cell encoder and one similarity product are left; everything the matching head did
(projecting every cell's cross-attention keys/values, the multimodal text passes) is gone.

Cells: the first ``--cells`` cells of the immune sample, tokenized with Geneformer's dictionaries (2,048
tokens at most); classes: the release's 8 PBMC labels through the Cell Ontology.

Run from the repository root::

    python benchmarks/zero_shot_alpha.py                 # base, 16 cells, 3 turns each
    python benchmarks/zero_shot_alpha.py --size small --cells 64
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from langcell import ontology
from langcell.data.tokenizer import GeneTokenizer
from langcell.inference.zero_shot import encode_class_texts, zero_shot_scores
from langcell.models import LangCell
from langcell.models.config import LangCellConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
SAMPLE = SHARED / "data" / "immune_sample_559cells_counts.h5ad"
GENEFORMER = SHARED / "reference" / "geneformer"
LABELS = ["B cells", "CD8 T cells", "CD14+ Monocytes", "Dendritic Cells", "NK cells", "Megakaryocytes",
          "FCGR3A+ Monocytes", "CD4 T cells"]  # the released notebook's PBMC10K labels


def main() -> None:
    """Time the fast mode at alpha 0.1 and 1 in turns and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base", choices=["small", "base"], help="model preset (default base)")
    parser.add_argument("--cells", type=int, default=16, help="cells per run (default 16)")
    parser.add_argument("--turns", type=int, default=3, help="runs of each alpha (default 3)")
    args = parser.parse_args()
    if not SAMPLE.is_file():
        raise SystemExit(f"the immune sample is missing: {SAMPLE}")
    import anndata

    tokenizer = GeneTokenizer.from_geneformer(GENEFORMER / "token_dictionary.pkl",
                                              GENEFORMER / "gene_median_dictionary.pkl")
    cells = tokenizer.encode(anndata.read_h5ad(SAMPLE)[: args.cells].copy(), max_length=2048, progress=False)
    config = LangCellConfig.preset(args.size)
    config.text.init_from = None  # random weights: speed does not depend on them
    torch.manual_seed(0)
    model = LangCell(config, gene_tokenizer=tokenizer).eval()
    texts, _ = ontology.label_texts(LABELS)
    classes = encode_class_texts(model, texts)
    print(f"{args.cells} cells, mean {np.mean([len(c) for c in cells]):.0f} tokens; size {args.size}; K = 8; "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    seconds: dict[float, list[float]] = {0.1: [], 1.0: []}
    results = {}
    for _ in range(args.turns):
        for alpha in seconds:
            start = time.perf_counter()
            results[alpha] = zero_shot_scores(model, cells, classes, alpha=alpha, mode="fast", top_k=3)
            seconds[alpha].append(time.perf_counter() - start)
    assert np.array_equal(results[1.0].predicted, results[1.0].similarity.argmax(axis=1))
    assert np.array_equal(results[1.0].similarity, results[0.1].similarity)
    for alpha, times in seconds.items():
        print(f"alpha {alpha}: {args.cells / np.median(times):.2f} cells/s (median of {len(times)}: "
              + ", ".join(f"{t:.1f}" for t in times) + " s)")
    print(f"alpha 1 / alpha 0.1 speed: {np.median(seconds[0.1]) / np.median(seconds[1.0]):.2f}x; "
          f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

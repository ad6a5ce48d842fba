"""Does prompt ensembling help zero-shot annotation? One text per class vs several, same cells, same model.

Issue 14: a class may be described by several texts (label, definition, synonyms, parent terms); its
embedding is then the normalised mean of its texts' embeddings (CLIP's prompt ensembling) and the
cell-text matching head scores the primary text. ``tl.annotate(..., prompt_ensemble=True)`` builds the
texts from the Cell Ontology (:func:`langcell.ontology.term_prompts`). It becomes the default only if
it helps on both datasets.

On the held-out cells of ``benchmarks/cell_identity.py`` (pbmc68k with the demo model, CBMC with the
``cbmc`` recipe's model), against every cell type present, default fast mode, this prints the
accuracy and macro-F1 of: the primary text alone (today's default), the ontology ensemble, and (to
separate the two parts of the score) both with ``alpha=1`` (similarity only, where the ensemble acts
alone; the CTM head scores the primary text in every run).

    python benchmarks/prompt_ensembles.py --model /work/models/demo/run/model --data pbmc68k
    python benchmarks/prompt_ensembles.py --model /work/models/cbmc/run/model --data cbmc
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from cell_identity import (  # benchmarks/ on sys.path
    LABEL_KEY,
    add_held_out_arguments,
    held_out_cells,
    metrics_of,
)

from langcell import tl
from langcell._atomic import write_json
from langcell.models.langcell import LangCell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_held_out_arguments(parser)
    parser.add_argument("--out", help="output directory (default runs/prompt_ensembles_<data>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, help="longest cell in tokens (default: the model's)")
    args = parser.parse_args()
    out = Path(args.out or f"runs/prompt_ensembles_{args.data}")
    out.mkdir(parents=True, exist_ok=True)
    model = LangCell.from_pretrained(args.model).eval()
    cells = held_out_cells(args.data, args.data_path, args.seed)
    classes = sorted(cells.obs[LABEL_KEY].unique())
    truth = cells.obs[LABEL_KEY].to_numpy()
    rows = {}
    for alpha in (0.1, 1.0):
        for ensemble in (False, True):
            start = time.perf_counter()
            annotated = tl.annotate(cells, model, classes, prompt_ensemble=ensemble, alpha=alpha, progress=False,
                                    max_length=args.max_length, copy=True)
            name = f"{'ensemble' if ensemble else 'primary text'}, alpha={alpha}"
            rows[name] = {**metrics_of(truth, annotated.obs["langcell_cell_type"].astype(str).to_numpy(), classes),
                          "n_prompts": annotated.uns["langcell_cell_type"]["params"]["n_prompts"],
                          "seconds": round(time.perf_counter() - start, 1)}
    report = {"data": args.data, "model": args.model, "max_length": args.max_length, "n_cells": int(cells.n_obs),
              "classes": classes, "results": rows, "torch_threads": torch.get_num_threads()}
    write_json(str(out / "report.json"), report)
    print(f"{args.data}: {cells.n_obs} held-out cells, {len(classes)} types\n")
    print("| texts per class | accuracy | macro-F1 | texts | seconds |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['accuracy']:.3f} | {row['macro_f1']:.3f} | {row['n_prompts']} | {row['seconds']} |")


if __name__ == "__main__":
    main()

"""Do explanations name the known markers? ``tl.explain`` next to a Wilcoxon test on the same cells.

Issue 14's measurement: on scanpy's PBMCs held out from the demo's pretraining (the demo's seeded
80/20 split, :func:`langcell.data.splits.held_out_split`), the cells are annotated zero-shot against
the 10 types with the demo model, then explained (:func:`langcell.tl.explain`, top 20 genes per
predicted class). The targets: the top 20 genes of the cells predicted

* B cell (``B cell, CD19-positive``) include >= 2 of MS4A1, CD79A, CD79B;
* NK cell (``natural killer cell``) include >= 2 of NKG7, GNLY, GZMB;
* CD14 monocyte (``CD14-positive monocyte``) include >= 2 of LYZ, S100A8, S100A9, CST3.

The baseline a user would try first runs in the same process on the same cells and the same predicted
labels: scanpy's ``rank_genes_groups`` (Wilcoxon, log-normalised counts), its top 20 per group. Both
the contrastive explanation (the default: similarity to the predicted class minus the mean over the
others) and the plain one are reported, with every per-class table.

Writes ``OUT/report.json`` (every table) and ``OUT/explain.png`` (:func:`langcell.pl.explain`, top 5 genes
per predicted class).

    python benchmarks/explain_markers.py --model /work/models/demo/run/model --out runs/explain_markers
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import scanpy as sc
import torch

from langcell import pl, tl
from langcell._atomic import write_json
from langcell.data.datasets import pbmc68k
from langcell.data.splits import held_out_split
from langcell.models.langcell import LangCell

MARKERS = {
    "B cell, CD19-positive": ["MS4A1", "CD79A", "CD79B"],
    "natural killer cell": ["NKG7", "GNLY", "GZMB"],
    "CD14-positive monocyte": ["LYZ", "S100A8", "S100A9", "CST3"],
}
KEY = "langcell_cell_type"


def wilcoxon_top(adata, n_genes: int) -> dict[str, list[str]]:
    """scanpy's rank_genes_groups (Wilcoxon) on log-normalised counts, grouped by the predicted labels."""
    data = adata.copy()
    sc.pp.normalize_total(data, target_sum=1e4)
    sc.pp.log1p(data)
    groups = data.obs[KEY].astype(str)
    sizes = groups.value_counts()
    data.obs["predicted"] = groups.astype("category")
    usable = [g for g in sizes.index if sizes[g] >= 2]  # a group of one cell has no variance to test
    sc.tl.rank_genes_groups(data, "predicted", groups=usable, method="wilcoxon", n_genes=n_genes)
    names = data.uns["rank_genes_groups"]["names"]
    return {group: [str(g) for g in names[group]] for group in usable}


def hits(genes: list[str], markers: list[str]) -> list[str]:
    return [m for m in markers if m in genes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the demo model directory (OUT/run/model of `langcell demo`)")
    parser.add_argument("--out", default="runs/explain_markers", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo's split")
    parser.add_argument("--n-genes", type=int, default=20)
    parser.add_argument("--max-length", type=int, help="longest cell in tokens (default: the model's, as the demo)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    model = LangCell.from_pretrained(args.model).eval()
    adata = pbmc68k()
    _, test = held_out_split(adata, "cell_type", seed=args.seed)
    labels = sorted(test.obs["cell_type"].astype(str).unique())
    missing = {name: [m for m in markers if m not in set(test.var_names)] for name, markers in MARKERS.items()}
    tl.annotate(test, model, labels, max_length=args.max_length, progress=False)
    accuracy = float((test.obs[KEY].astype(str) == test.obs["cell_type"].astype(str)).mean())
    timings = {}
    tables = {}
    for contrast in (True, False):
        t = time.perf_counter()
        key_added = "explain_contrast" if contrast else "explain_plain"
        tl.explain(test, model, n_genes=args.n_genes, contrast=contrast, progress=False, key_added=key_added)
        timings[key_added] = round(time.perf_counter() - t, 1)
        tables[key_added] = tl.explanation_table(test, key_added)
    t = time.perf_counter()
    wilcoxon = wilcoxon_top(test, args.n_genes)
    timings["wilcoxon"] = round(time.perf_counter() - t, 1)

    predicted = test.obs[KEY].astype(str)
    report = {"model": args.model, "n_cells": int(test.n_obs), "zero_shot_accuracy": round(accuracy, 4),
              "markers_missing_from_the_data": missing, "classes": {}, "seconds": timings,
              "torch_threads": torch.get_num_threads()}
    for name, markers in MARKERS.items():
        entry = {"n_predicted": int((predicted == name).sum()),
                 "n_true_among_predicted": int(((predicted == name) & (test.obs["cell_type"] == name)).sum())}
        for method, table in tables.items():
            genes = table.loc[table["class"] == name, "gene"].tolist()
            entry[method] = {"top_genes": genes, "markers_found": hits(genes, markers),
                             "target_met": len(hits(genes, markers)) >= 2}
        genes = wilcoxon.get(name, [])
        entry["wilcoxon"] = {"top_genes": genes, "markers_found": hits(genes, markers),
                             "target_met": len(hits(genes, markers)) >= 2}
        report["classes"][name] = entry
    report["all_tables"] = {method: table.to_dict(orient="list") for method, table in tables.items()}
    report["seconds"]["total"] = round(time.perf_counter() - start, 1)
    write_json(str(out / "report.json"), report)
    pl.explain(test, out / "explain.png", key_added="explain_contrast", n_genes=5,
               title="held-out PBMCs, demo model: genes that drive each zero-shot prediction")
    print(markdown(report))
    print(f"\nwrote {out}/report.json and explain.png in {report['seconds']['total']:.0f} s")


def markdown(report: dict) -> str:
    lines = [f"held-out pbmc68k cells: {report['n_cells']}, zero-shot accuracy {report['zero_shot_accuracy']:.3f}",
             "", "| predicted class (cells, of them truly) | markers | LangCell explain (contrast) | "
             "LangCell explain (plain) | Wilcoxon on predicted labels |", "|---|---|---|---|---|"]
    for name, entry in report["classes"].items():
        cells = [f"{name} ({entry['n_predicted']}, {entry['n_true_among_predicted']})", ", ".join(MARKERS[name])]
        for method in ("explain_contrast", "explain_plain", "wilcoxon"):
            found = entry[method]["markers_found"]
            cells.append(f"{len(found)}: {', '.join(found) or '-'} ({'met' if entry[method]['target_met'] else 'not met'})")
        lines.append("| " + " | ".join(cells) + " |")
    for name, entry in report["classes"].items():
        lines.append(f"\n{name}, top 20:")
        for method in ("explain_contrast", "explain_plain", "wilcoxon"):
            lines.append(f"  {method:<17} {', '.join(entry[method]['top_genes'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Annotation quality: plain zero-shot next to each label-free refinement, on held-out cells.

On the held-out 20 % of pbmc68k (the demo model, split as ``langcell demo`` splits) and of CBMC (the
``cbmc`` recipe's model, split as ``benchmarks/pretrain_cbmc.py`` splits; see
``benchmarks/cell_identity.py``), in one process and on the same cells:

1. **plain zero-shot**: :func:`langcell.tl.annotate` (fast mode) against every cell type present;
2. **graph, LangCell**: :func:`langcell.tl.consensus` ``method="graph"`` on the kNN graph of the
   LangCell embeddings (:func:`langcell.tl.embed`);
3. **graph, PCA**: the same on PCA of log-normalised counts;
4. **majority, auto clusters**: majority vote within Leiden over-clusters of the LangCell graph, and of
   the PCA graph;
5. the **ontology-aware metric** (:func:`langcell.evaluation.ontology_accuracy`: exact / correct at an
   ancestor / wrong) of plain zero-shot, of its lowest-common-ancestor answers (``lca_margin``), and of
   the best refinement; and the **calibration** (ECE) of plain and graph-smoothed scores.

No label is used at prediction time: the labels only score the calls. The graph method's ``lambda``
is the library default (fixed before this benchmark was run); ``--sweep`` adds rows for other values,
as a sensitivity check that is not used to choose the default.

    python benchmarks/annotation_quality.py                       # both datasets, the /work/models paths
    python benchmarks/annotation_quality.py --data pbmc68k --pbmc-model DIR
"""

from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

import torch
from cell_identity import (  # benchmarks/ is on sys.path as a script
    CBMC,
    LABEL_KEY,
    held_out_cells,
    metrics_of,
)

from langcell import evaluation, tl
from langcell._atomic import write_json
from langcell.models.langcell import LangCell

KEY = "langcell_cell_type"
#: The graph method's lambda that the main rows use: the library default.
DEFAULT_SMOOTHING = inspect.signature(tl.consensus).parameters["smoothing"].default
MODELS = {"pbmc68k": "/work/models/demo/run/model", "cbmc": "/work/models/cbmc/run/model"}


def refinements(sweep: list[float]) -> list[tuple[str, dict]]:
    """(row name, tl.consensus arguments) of every refinement measured."""
    rows = [
        ("graph, LangCell kNN", {"method": "graph", "use_rep": "X_langcell"}),
        ("graph, PCA kNN", {"method": "graph", "use_rep": "pca"}),
        ("majority, auto clusters (LangCell)", {"method": "majority", "groupby": "auto", "use_rep": "X_langcell"}),
        ("majority, auto clusters (PCA)", {"method": "majority", "groupby": "auto", "use_rep": "pca"}),
    ]
    for value in sweep:
        rows.append((f"graph, LangCell kNN, lambda={value:g} (sweep)",
                     {"method": "graph", "use_rep": "X_langcell", "smoothing": value}))
    return rows


def measure(data: str, model_dir: str, data_path: str, seed: int, lca_margin: float, sweep: list[float],
            device: str) -> dict:
    """Every row of one dataset, on its held-out cells."""
    model = LangCell.from_pretrained(model_dir, map_location=device).eval()
    cells = held_out_cells(data, data_path, seed)
    classes = sorted(set(cells.obs[LABEL_KEY]))
    truth = cells.obs[LABEL_KEY].to_numpy()
    start = time.perf_counter()
    tl.annotate(cells, model, classes, lca_margin=lca_margin, progress=False)
    tl.embed(cells, model, key_added="X_langcell", progress=False)
    seconds = {"annotate_and_embed": round(time.perf_counter() - start, 1)}
    rows = {"plain zero-shot": metrics_of(truth, cells.obs[KEY].astype(str).to_numpy(), classes)}
    for name, arguments in refinements(sweep):
        start = time.perf_counter()
        key_added = f"refined_{len(rows)}"
        tl.consensus(cells, key=KEY, key_added=key_added, random_state=seed, **arguments)
        rows[name] = metrics_of(truth, cells.obs[key_added].astype(str).to_numpy(), classes)
        rows[name]["seconds"] = round(time.perf_counter() - start, 2)
        rows[name]["key"] = key_added
        if cells.uns[key_added]["params"]["n_groups"]:
            rows[name]["n_groups"] = cells.uns[key_added]["params"]["n_groups"]
    plain = rows["plain zero-shot"]
    for row in rows.values():
        row["delta_macro_f1"] = round(row["macro_f1"] - plain["macro_f1"], 4)
        row["delta_accuracy"] = round(row["accuracy"] - plain["accuracy"], 4)
    main = [name for name in rows if name != "plain zero-shot" and "sweep" not in name]
    best = max(main, key=lambda name: rows[name]["macro_f1"])
    ontology = {
        "plain zero-shot": evaluation.ontology_accuracy(cells, label_key=LABEL_KEY, prediction_key=KEY)["summary"],
        f"plain + LCA answers (margin {lca_margin})": evaluation.ontology_accuracy(
            cells, label_key=LABEL_KEY, prediction_key=KEY + "_lca")["summary"],
        best: evaluation.ontology_accuracy(cells, label_key=LABEL_KEY, prediction_key=rows[best]["key"])["summary"],
    }
    calibration = {
        "plain zero-shot": evaluation.calibration(cells, label_key=LABEL_KEY, prediction_key=KEY),
        "graph, LangCell kNN": evaluation.calibration(cells, label_key=LABEL_KEY, prediction_key=rows[main[0]]["key"]),
    }
    return {
        "data": data, "model": model_dir, "n_cells": int(cells.n_obs), "classes": classes, "rows": rows,
        "best_refinement": best, "ontology": ontology,
        "calibration": {name: {k: c[k] for k in ("ece", "mce", "accuracy", "mean_confidence")}
                        for name, c in calibration.items()},
        "mean_margin": round(float(cells.obs[KEY + "_margin"].mean()), 4),
        "mean_entropy": round(float(cells.obs[KEY + "_entropy"].mean()), 4),
        "seconds": seconds,
    }


def markdown(result: dict) -> str:
    """The rows of one dataset as a Markdown table, then the ontology-aware metric and the ECE."""
    lines = [f"\n{result['data']}: {result['n_cells']} held-out cells, {len(result['classes'])} types "
             f"(model {result['model']})\n",
             "| method | accuracy | macro-F1 | Δ macro-F1 | s |", "|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        groups = f" ({row['n_groups']} clusters)" if "n_groups" in row else ""
        lines.append(f"| {name}{groups} | {row['accuracy']:.3f} | {row['macro_f1']:.3f} | "
                     f"{row['delta_macro_f1']:+.3f} | {row.get('seconds', '')} |")
    lines += ["", "| calls | exact | correct at an ancestor | wrong | abstained |", "|---|---|---|---|---|"]
    for name, s in result["ontology"].items():
        lines.append(f"| {name} | {s['exact']:.3f} | {s['ancestor']:.3f} | {s['wrong']:.3f} | {s['abstained']:.3f} |")
    lines.append("")
    for name, c in result["calibration"].items():
        lines.append(f"ECE {name}: {c['ece']:.3f} (accuracy {c['accuracy']:.3f}, mean confidence "
                     f"{c['mean_confidence']:.3f})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["pbmc68k", "cbmc", "both"], default="both")
    parser.add_argument("--pbmc-model", default=MODELS["pbmc68k"], help="the demo model directory")
    parser.add_argument("--cbmc-model", default=MODELS["cbmc"], help="the cbmc recipe's model directory")
    parser.add_argument("--data-path", default=str(CBMC), help="cbmc_citeseq_500genes.h5ad")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 80/20 split, neighbours and Leiden")
    parser.add_argument("--lca-margin", type=float, default=0.1, help="margin below which LCA answers are given")
    parser.add_argument("--sweep", default="1,3,30", help="extra lambda values (sensitivity rows); '' for none")
    parser.add_argument("--out", default="runs/annotation_quality", help="output directory (report.json)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    args = parser.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    sweep = [float(v) for v in args.sweep.split(",") if v.strip()]
    datasets = ["pbmc68k", "cbmc"] if args.data == "both" else [args.data]
    models = {"pbmc68k": args.pbmc_model, "cbmc": args.cbmc_model}
    report = {"settings": {"seed": args.seed, "lca_margin": args.lca_margin, "sweep": sweep,
                           "default_smoothing": DEFAULT_SMOOTHING, "device": device}, "results": {}}
    for data in datasets:
        result = measure(data, models[data], args.data_path, args.seed, args.lca_margin, sweep, device)
        report["results"][data] = result
        print(markdown(result), flush=True)
    main_rows = {name for r in report["results"].values() for name in r["rows"]
                 if name != "plain zero-shot" and "sweep" not in name}
    wins = sorted(name for name in main_rows
                  if all(r["rows"][name]["delta_macro_f1"] >= 0.05 for r in report["results"].values()))
    report["wins_on_all"] = wins
    print(f"\nrefinements adding >= 5 points of macro-F1 on every dataset measured: {wins or 'none'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    print(f"wrote {out / 'report.json'}")


if __name__ == "__main__":
    main()

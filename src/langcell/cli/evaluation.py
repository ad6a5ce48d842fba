"""Commands that measure a model on labelled cells: ``fewshot`` (the paper's few-shot protocol) and
``evaluate`` (per-type accuracy, retrieval, scIB metrics)."""

from __future__ import annotations

import argparse

from .._atomic import write_json
from ..errors import LangCellError
from ._common import (
    add_compute_options,
    add_counts_options,
    add_input,
    add_mapping,
    check_outputs,
    load_model,
    read_descriptions,
    read_input,
    say,
    split_names,
    write_h5ad,
)

# The choices of evaluation.fewshot, written out so that `langcell --help` loads no torch (a test checks
# they match langcell.evaluation.fewshot.METHODS and langcell.inference.calibration.PRIORS).
FEWSHOT_METHODS = ("full", "linear", "wise")
PRIORS = ("uniform", "em")


def add_fewshot(sub: argparse._SubParsersAction) -> None:
    """Register ``langcell fewshot`` and its options."""
    p = sub.add_parser(
        "fewshot",
        help="few-shot annotation curves: LangCell methods on n cells per class vs zero-shot, logistic "
             "regression and kNN",
        description=(
            "For every n in --shots (and every repeat): n labelled cells per class train the LangCell methods "
            "(full: both encoders, the paper's protocol; linear: a text-initialised head on frozen embeddings; "
            "wise: that head mixed with zero-shot), a logistic regression and a kNN classifier; the other "
            "labelled cells test them all and zero-shot annotation. Shot counts or types the data cannot "
            "serve are skipped with a warning. Prints accuracy and macro-F1 per method and n."
        ),
    )
    add_input(p, labelled=True, label_help="obs column with the cell labels")
    p.add_argument("--shots", default="1,3,5,10", metavar="N,N,...",
                   help="training cells per class, comma-separated (default 1,3,5,10)")
    p.add_argument("--repeats", type=int, default=1, help="random splits per number of shots (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits and the tuning")
    classes = p.add_mutually_exclusive_group()
    classes.add_argument("--labels", metavar="'A;B;C'", help="only these classes of --label-key, separated by ';'")
    classes.add_argument("--descriptions", metavar="JSON", help="JSON file {class name: description}")
    add_mapping(p)
    p.add_argument("--method", choices=FEWSHOT_METHODS,
                   help="method of the 'langcell' row (default: evaluation.fewshot's, chosen by measurement)")
    p.add_argument("--methods", metavar="M,M,...",
                   help="LangCell methods to run, comma-separated (default: all of " + ",".join(FEWSHOT_METHODS) + ")")
    p.add_argument("--prior", default="uniform", metavar="P[,P]",
                   help="class-prior correction: uniform (default), em (EM on the test cells), or uniform,em for both")
    p.add_argument("--epochs", type=int, help="tuning epochs of the full method (default 20)")
    p.add_argument("--lr", type=float, help="full method: peak learning rate of the cell encoder and heads (default 1e-4)")
    p.add_argument("--text-lr", type=float, help="full method: peak learning rate of the text tower (default 1e-5)")
    p.add_argument("--match-classes", type=int, metavar="M",
                   help="matching loss over the own class and the M-1 most similar others (default: every class)")
    p.add_argument("--max-length", type=int, metavar="N", help="longest cell in tokens (default: the model's)")
    p.add_argument("--report", metavar="REPORT.json", help="write the results and settings as JSON")
    p.add_argument("--plot", metavar="CURVES.png", help="write the few-shot curves (macro-F1)")
    p.add_argument("--out", metavar="OUT.h5ad", help="write a copy of the input with uns['langcell_fewshot']")
    add_counts_options(p)
    add_compute_options(p, precision=False)
    p.set_defaults(func=run_fewshot)


def run_fewshot(args: argparse.Namespace) -> int:
    """Run ``langcell fewshot`` with the parsed arguments; return the exit status."""
    import pandas as pd

    from .. import evaluation, pl

    check_outputs(args, args.report, args.plot, args.out)
    try:
        shots = [int(part) for part in args.shots.split(",") if part.strip()]
    except ValueError:
        raise LangCellError(f"--shots {args.shots!r} must be integers separated by commas, e.g. 1,3,5,10") from None
    labels = None
    if args.labels is not None:
        labels = [part.strip() for part in args.labels.split(";") if part.strip()]
        if not labels:
            raise LangCellError("--labels holds no class name; pass names separated by ';'")
    elif args.descriptions is not None:
        labels = read_descriptions(args.descriptions)
    methods = None if args.methods is None else [part.strip() for part in args.methods.split(",") if part.strip()]
    priors = [part.strip() for part in args.prior.split(",") if part.strip()]
    for name, values, allowed in (("--methods", methods or [], FEWSHOT_METHODS), ("--prior", priors, PRIORS)):
        unknown = [value for value in values if value not in allowed]
        if unknown or (name == "--prior" and not values):
            raise LangCellError(f"{name} {unknown or args.prior!r}: choose from {', '.join(allowed)}")
    adata = read_input(args.input)
    model = load_model(args.model, args.device)
    evaluation.fewshot(
        adata, model, args.label_key, shots=shots, repeats=args.repeats, labels=labels, mapping=args.mapping,
        methods=methods, prior=priors, seed=args.seed, max_length=args.max_length, match_classes=args.match_classes,
        **{name: value for name, value in (("method", args.method), ("lr", args.lr), ("text_lr", args.text_lr),
                                           ("epochs", args.epochs)) if value is not None},
        counts_layer=args.counts_layer, gene_column=args.gene_column, progress=not args.quiet, inplace=True,
    )
    stored = adata.uns["langcell_fewshot"]
    results = pd.DataFrame(stored["results"])
    if args.report:
        write_json(args.report, {key: stored[key] for key in ("params", "results", "classes", "train_loss", "priors",
                                                               "choices", "skipped")})
    if args.plot:
        pl.fewshot_curves(results, args.plot, title=f"few-shot annotation, {adata.n_obs} cells")
    if args.out:
        write_h5ad(adata, args.out)
    means = results.groupby(["method", "shots"])[["accuracy", "macro_f1"]].mean()
    say(args, f"{'method':<22}{'shots':>6}{'accuracy':>10}{'macro-F1':>10}   (mean of {args.repeats} repeat(s))")
    for method in dict.fromkeys(results["method"]):
        for n in stored["params"]["shots"]:
            accuracy, macro_f1 = means.loc[(method, n)]
            say(args, f"{method:<22}{n:>6}{accuracy:>10.3f}{macro_f1:>10.3f}")
    skipped = stored["skipped"]
    if skipped["classes"] or skipped["shots"]:
        say(args, f"skipped (too few labelled cells): classes {skipped['classes'] or 'none'}, shots "
                  f"{skipped['shots'] or 'none'}")
    return 0


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    """Register ``langcell evaluate`` and its options."""
    p = sub.add_parser(
        "evaluate",
        help="score a model on labelled cells: zero-shot accuracy per type (seen/unseen), retrieval, scIB metrics",
        description=(
            "Zero-shot annotation scored per true type (split into --seen-types and unseen, novel types), "
            "cell-text retrieval recall@1/5/10 and, with --batch-key, the scIB integration metrics of the "
            "LangCell embedding next to a PCA baseline (needs scib-metrics: pip install \"langcell[integration]\"). "
            "Prints the JSON report, or writes it with --report."
        ),
    )
    add_input(p, labelled=True, label_help="obs column with the true cell types")
    p.add_argument("--batch-key", metavar="COL", help="obs column with the batch: adds the scIB integration metrics")
    p.add_argument("--labels", metavar="'A;B;C'",
                   help="candidate classes separated by ';' (default: the labels of --label-key)")
    p.add_argument("--seen-types", metavar="'A;B'",
                   help="types seen in training, separated by ';': accuracy is reported for seen and unseen types")
    add_mapping(p)
    p.add_argument("--metrics", metavar="M,M,...",
                   help="scIB metrics, comma-separated (default: silhouette_label, isolated_labels, nmi_kmeans, "
                        "ari_kmeans, clisi, silhouette_batch, ilisi, graph_connectivity, pcr_comparison; also bras, kbet)")
    p.add_argument("--neighbors", choices=["exact", "pynndescent"], default="exact",
                   help="neighbour search of the scIB metrics (default exact)")
    p.add_argument("--report", metavar="REPORT.json", help="write the report as JSON (default: print it)")
    p.add_argument("--out", metavar="OUT.h5ad", help="write a copy of the input with the predictions and embeddings")
    add_counts_options(p)
    add_compute_options(p)
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``langcell evaluate`` with the parsed arguments; return the exit status."""
    import json

    from .. import evaluation

    check_outputs(args, args.report, args.out)
    labels = split_names(args.labels, "--labels")
    seen = split_names(args.seen_types, "--seen-types")
    metrics = None
    if args.metrics is not None:
        metrics = [part.strip() for part in args.metrics.split(",") if part.strip()]
        if not metrics:
            raise LangCellError("--metrics holds no metric name; pass names separated by ','")
    adata = read_input(args.input)
    model = load_model(args.model, args.device)
    report = evaluation.evaluate(
        adata, model, label_key=args.label_key, batch_key=args.batch_key, labels=labels, seen=seen,
        mapping=args.mapping, metrics=metrics, neighbors=args.neighbors, counts_layer=args.counts_layer,
        gene_column=args.gene_column, precision=args.precision, progress=not args.quiet, inplace=True,
    )
    if args.out:
        write_h5ad(adata, args.out)
    if not args.report:
        say(args, json.dumps(report, indent=2))
        return 0
    write_json(args.report, report)
    summary = report["annotation"]["summary"]
    say(args, f"{'cell type':<45}{'cells':>7}{'accuracy':>10}  seen")
    for row in report["annotation"]["per_type"]:
        seen_text = "" if row["seen"] is None else ("yes" if row["seen"] else "no")
        say(args, f"{row['cell_type']:<45}{row['n_cells']:>7}{row['accuracy']:>10.3f}  {seen_text}")
    say(args, f"accuracy {summary['accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f} ({summary['n_cells']} cells)")
    for name in ("mean_accuracy_seen", "mean_accuracy_unseen"):
        if summary.get(name) is not None:
            say(args, f"{name.replace('_', ' ')} {summary[name]:.3f}")
    for row in report["integration"] or []:
        scores = ", ".join(
            f"{name.replace('_', ' ')} {row[name]:.3f}"
            for name in ("bio_conservation", "batch_correction", "total") if row.get(name) is not None
        )
        say(args, f"scIB {row['embedding']}: {scores}")
    say(args, f"report -> {args.report}")
    return 0

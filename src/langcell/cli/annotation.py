"""Commands that annotate cells: ``annotate`` (zero-shot), ``embed``, ``finetune`` / ``predict``
(LangCell-CE) and ``retrieve``."""

from __future__ import annotations

import argparse

from .._atomic import write_json
from .._checks import listed
from ..errors import LangCellError
from ._common import (
    add_compute_options,
    add_counts_options,
    add_input,
    add_mapping,
    check_outputs,
    load_model,
    read_cells,
    read_descriptions,
    read_input,
    say,
    torchrun_processes,
    write_h5ad,
)


def add_annotate(sub: argparse._SubParsersAction) -> None:
    """Register ``langcell annotate`` and its options."""
    p = sub.add_parser(
        "annotate",
        help="zero-shot cell-type annotation from label names or descriptions",
        description=(
            "Score every cell against class texts (cell-type names resolved to the Cell Ontology, your own "
            "descriptions, or the terms of an obs column) and write the best class into obs. On several "
            "processes: torchrun --nproc_per_node N -m langcell annotate ..."
        ),
    )
    add_input(p, corpus=True)
    p.add_argument("--out", required=True, metavar="OUT.h5ad", help="annotated copy of the input (written atomically)")
    classes = p.add_mutually_exclusive_group(required=True)
    classes.add_argument("--labels", metavar="'A;B;C'", help="class names separated by ';'")
    classes.add_argument("--descriptions", metavar="JSON", help="JSON file {class name: description}")
    classes.add_argument("--classes-from", metavar="COL", help="obs column of ontology term ids to use as classes")
    add_mapping(p)
    p.add_argument("--alpha", type=float, default=0.1, help="weight of the similarity score (default 0.1)")
    p.add_argument("--top-k", type=int, default=3, help="classes per cell reranked by matching (fast mode)")
    p.add_argument("--mode", choices=["fast", "official"], default="fast",
                   help="scoring mode (default fast: CTM for each cell's --top-k classes only; its answer is the "
                        "official one wherever it can be certified, and the report counts the cells where it "
                        "cannot; official: CTM for every class, the release's computation)")
    p.add_argument("--exact-argmax", action="store_true",
                   help="fast mode: run CTM for every class of the cells whose answer is not certified, so that "
                        "every prediction equals --mode official's. Measured on the demo model (80 cells): without "
                        "it 0 cells differ at 8 classes and 7 of 80 at 100; with it scoring takes 3.1x (8 classes) "
                        "and 7.8x (100) the fast time")
    p.add_argument(
        "--threshold", type=float,
        help="cells whose best final score (or, with --threshold-on margin, scaled margin) is below this become "
             "'unknown'. Final scores blend two softmaxes over the K classes and sum to 1: the best lies in "
             "[1/K, 1] and sits not far above 1/K, so a score threshold depends on K",
    )
    p.add_argument(
        "--threshold-on", choices=["score", "margin"], default="score",
        help="what --threshold applies to: 'score' (default, the best final score) or 'margin' (best minus "
             "second-best score over the largest gap possible with K classes: in [0, 1] whatever K)",
    )
    add_refinement_options(p)
    p.add_argument("--prompt-ensemble", action="store_true",
                   help="describe each ontology class by several texts (label, definition, synonyms, parents) "
                        "and embed it as their normalised mean")
    p.add_argument("--texts", metavar="JSON", help="JSON file {class name: [extra text, ...]}: more texts per class "
                                                   "(prompt ensembling)")
    p.add_argument("--prior", choices=["uniform", "em"], default="uniform",
                   help="class frequencies: uniform (default), or em: re-estimated on these cells by EM "
                        "(Saerens et al. 2002) and used to correct the similarity part of the scores")
    p.add_argument("--key-added", default="langcell_cell_type", help="obs column for the prediction")
    p.add_argument("--truth-key", metavar="COL",
                   help="obs column of true labels: adds accuracy, macro-F1, per-class precision/recall/F1/support "
                        "and the confusion matrix (most frequent true type first) to the report")
    p.add_argument("--report", metavar="REPORT.json",
                   help="write a JSON report (how each label was resolved, counts per class, metrics)")
    add_counts_options(p)
    add_compute_options(p)
    p.set_defaults(func=run_annotate)


#: ``--consensus`` when not given. The rule: a refinement becomes the default only when it adds >= 5 points of
#: macro-F1 on both datasets of benchmarks/annotation_quality.py; none did (BENCHMARKS.md, "Refining zero-shot
#: annotation": every refinement lost macro-F1 on held-out pbmc68k), so the calls are left as they are.
DEFAULT_CONSENSUS = "none"


def add_refinement_options(p: argparse.ArgumentParser) -> None:
    """--consensus, --groupby, --consensus-rep, --smoothing and --lca-margin of ``langcell annotate``."""
    g = p.add_argument_group("refining and trusting the calls (see langcell.tl.consensus)")
    g.add_argument("--consensus", choices=["graph", "majority", "none"], default=DEFAULT_CONSENSUS,
                   help="refine the calls with the cells' neighbours: label propagation of the scores over a "
                        "kNN graph, majority vote within --groupby groups, or none "
                        f"(default {DEFAULT_CONSENSUS}); written to obs[KEY_consensus]")
    g.add_argument("--groupby", metavar="COL|auto",
                   help="--consensus majority: obs column of groups, or 'auto' for Leiden over-clusters")
    g.add_argument("--consensus-rep", default="langcell", metavar="langcell|pca|OBSM",
                   help="the kNN graph's cells: LangCell embeddings (computed if absent), PCA of "
                        "log-normalised counts, or an obsm key (default langcell)")
    g.add_argument("--smoothing", type=float, metavar="LAMBDA",
                   help="--consensus graph: lambda, the weight of agreement with the neighbours (> 0; default 9)")
    g.add_argument("--lca-margin", type=float, metavar="MARGIN",
                   help="answer with the lowest common Cell Ontology ancestor of the two best classes when "
                        "their score margin is below this (in [0, 1]); written to obs[KEY_lca]")


def check_refinement_options(args: argparse.Namespace) -> None:
    """Refuse inconsistent or out-of-range refinement flags before any reading (one line, the flag named)."""
    import math

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise LangCellError(f"--threshold must lie in [0, 1] (scores are probabilities), got {args.threshold}")
    if args.lca_margin is not None and not 0.0 <= args.lca_margin <= 1.0:
        raise LangCellError(f"--lca-margin must lie in [0, 1] (a difference of probabilities), got {args.lca_margin}")
    if args.smoothing is not None and not (math.isfinite(args.smoothing) and args.smoothing > 0):
        raise LangCellError(f"--smoothing must be a positive, finite number, got {args.smoothing}; e.g. 9")
    if args.consensus == "majority" and not args.groupby:
        raise LangCellError("--consensus majority votes within groups: pass --groupby COL or --groupby auto")
    if args.groupby and args.consensus != "majority":
        raise LangCellError("--groupby is for --consensus majority; drop it or pass --consensus majority")
    if args.smoothing is not None and args.consensus != "graph":
        raise LangCellError("--smoothing is for --consensus graph; drop it or pass --consensus graph")


def run_consensus(args: argparse.Namespace, adata, model) -> None:
    """``tl.consensus`` as the flags ask (embedding the cells first for ``--consensus-rep langcell``)."""
    from .. import tl

    rep = {"langcell": "X_langcell", "pca": "pca"}.get(args.consensus_rep, args.consensus_rep)
    if rep == "X_langcell" and rep not in adata.obsm:
        tl.embed(adata, model, counts_layer=args.counts_layer, gene_column=args.gene_column,
                 precision=args.precision, progress=not args.quiet, key_added=rep)
    options = {"smoothing": args.smoothing} if args.smoothing is not None else {}
    tl.consensus(adata, key=args.key_added, method=args.consensus, groupby=args.groupby, use_rep=rep,
                 counts_layer=args.counts_layer, **options)


def run_annotate(args: argparse.Namespace) -> int:
    """Run ``langcell annotate`` with the parsed arguments; return the exit status."""
    from .. import tl
    from ..ontology.classes import annotation_classes, resolution_lines

    check_outputs(args, args.out, args.report)
    check_refinement_options(args)
    # The class names first: a bad --labels or --descriptions costs no reading of cells or weights.
    labels = None
    if args.labels is not None:
        labels = [part.strip() for part in args.labels.split(";") if part.strip()]
        if not labels:
            raise LangCellError("--labels holds no class name; pass names separated by ';'")
    elif args.descriptions is not None:
        labels = read_descriptions(args.descriptions)
    texts = _read_texts(args.texts) if args.texts else None
    adata, corpus = read_cells(args.input)
    for column, flag in ((args.truth_key, "--truth-key"), (None if args.groupby == "auto" else args.groupby, "--groupby")):
        if column is not None and column not in adata.obs:
            raise LangCellError(f"{flag} {column!r} is not an obs column; pass one of {listed(adata.obs.columns)}")
    if args.consensus != "none" and args.consensus_rep not in ("langcell", "pca") and args.consensus_rep not in adata.obsm:
        raise LangCellError(f"--consensus-rep {args.consensus_rep!r} is not in obsm; pass langcell, pca or one of "
                            f"{listed(adata.obsm)}")
    with torchrun_processes(args, adata.n_obs) as ctx:  # torchrun: each process scores a share
        if ctx is None or ctx.is_main:
            # How every class gets its text, before the model is loaded and anything is scored.
            _, _, resolution, _ = annotation_classes(adata, labels, args.classes_from, None, args.mapping)
            say(args, "classes (label -> ontology term used for its text):")
            for line in resolution_lines(resolution):
                say(args, f"  {line}")
        model = load_model(args.model, args.device)
        tl.annotate(
            adata, model, labels, classes_from=args.classes_from, mapping=args.mapping, texts=texts,
            prompt_ensemble=args.prompt_ensemble, alpha=args.alpha,
            top_k=args.top_k, mode=args.mode, exact_argmax=args.exact_argmax, threshold=args.threshold,
            prior=args.prior, threshold_on=args.threshold_on, lca_margin=args.lca_margin, counts_layer=args.counts_layer,
            gene_column=args.gene_column, precision=args.precision, progress=not args.quiet,
            key_added=args.key_added, distributed=ctx is not None, corpus=corpus,
        )
        if ctx is not None and not ctx.is_main:
            return 0  # rank 0 refines and writes the one result
        if args.consensus != "none":
            run_consensus(args, adata, model)
    report = _annotation_report(adata, args.key_added, args.truth_key)
    write_h5ad(adata, args.out)
    if args.report:
        write_json(args.report, report)
    _print_summary(args, report)
    if report["n_uncertified"]:
        say(args, f"fast mode: the top class of {report['n_uncertified']} of {adata.n_obs} cells is not certified to "
                  "be --mode official's and may differ from it (--exact-argmax re-scores those cells in full)")
    for name in ("consensus", "lca"):
        if name in report and "accuracy" in report[name]:
            say(args, f"{name}: accuracy {report[name]['accuracy']:.3f}, macro-F1 {report[name]['macro_f1']:.3f}")
    s = report.get("ontology", {}).get(args.key_added, {})
    if "exact" in s:
        say(args, f"ontology-aware: exact {s['exact']:.3f}, correct at an ancestor {s['ancestor']:.3f}, "
                  f"wrong {s['wrong']:.3f}, abstained {s['abstained']:.3f}")
    if "prior" in report:
        found = report["prior"]
        priors = ", ".join(f"{name} {value:.3f}" for name, value in found["estimated"].items())
        say(args, f"prior em ({found['status']}, {found['n_iter']} iterations): {priors}")
    say(args, f"annotated {adata.n_obs} cells -> {args.out}")
    return 0


def _read_texts(path: str) -> dict[str, list[str]]:
    """``--texts``: a JSON object ``{class name: text or [text, ...]}``."""
    import json

    try:
        with open(path, encoding="utf-8") as handle:
            texts = json.load(handle)
    except OSError as error:
        raise LangCellError(f"--texts {path!r} cannot be read ({error.strerror}); pass a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LangCellError(f"--texts {path!r} is not valid JSON ({error}); write {{class: [text, ...]}}") from None
    valid = isinstance(texts, dict) and all(
        isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) for t in v)) for v in texts.values()
    )
    if not valid:
        raise LangCellError(f"--texts {path!r} must hold a JSON object {{class name: [text, ...]}}")
    return {str(k): [v] if isinstance(v, str) else v for k, v in texts.items()}


def add_explain(sub: argparse._SubParsersAction) -> None:
    """Register ``langcell explain`` and its options."""
    p = sub.add_parser(
        "explain",
        help="the genes that drive each annotated cell towards its predicted class",
        description=(
            "Reads cells annotated by `langcell annotate` (same model), attributes each cell's match with its "
            "predicted class to its gene tokens (gradient x input) and writes a ranked table per class."
        ),
    )
    add_input(p)
    p.add_argument("--out", required=True, metavar="OUT.h5ad", help="copy of the input with the explanation (atomic)")
    p.add_argument("--key", default="langcell_cell_type", help="the --key-added of the annotate run")
    p.add_argument("--n-genes", type=int, default=20, help="genes per class (and per cell) to keep (default 20)")
    p.add_argument("--no-contrast", action="store_true",
                   help="explain the plain similarity, not its excess over the other classes")
    p.add_argument("--csv", metavar="TABLE.csv", help="also write the per-class table as CSV")
    p.add_argument("--key-added", help="uns key of the result (default KEY_explain)")
    add_compute_options(p)
    p.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    """Run ``langcell explain`` with the parsed arguments; return the exit status."""
    from .. import tl
    from .._atomic import atomic_file

    check_outputs(args, args.out, args.csv)
    if args.n_genes < 1:
        raise LangCellError(f"--n-genes must be at least 1, got {args.n_genes}; e.g. --n-genes 20")
    adata = read_input(args.input)
    if args.key not in adata.obs:
        raise LangCellError(
            f"--key {args.key!r}: the input has no such obs column; run `langcell annotate` first, or pass the "
            f"--key-added it used (obs columns: {listed(adata.obs.columns)})"
        )
    model = load_model(args.model, args.device)
    key_added = args.key_added or args.key + "_explain"
    tl.explain(adata, model, key=args.key, n_genes=args.n_genes, contrast=not args.no_contrast,
               precision=args.precision, progress=not args.quiet, key_added=key_added)
    table = tl.explanation_table(adata, key_added)
    write_h5ad(adata, args.out)
    if args.csv:
        with atomic_file(args.csv) as tmp:
            table.to_csv(tmp, index=False)
    for name, rows in table.groupby("class", sort=False):
        say(args, f"  {name:<40} ({int(rows['n_cells'].iloc[0])} cells): {', '.join(rows['gene'].head(8))}")
    say(args, f"explained {int(table.groupby('class')['n_cells'].first().sum())} cells -> {args.out}")
    return 0


def _print_summary(args: argparse.Namespace, report: dict) -> None:
    """Cells per predicted class, or, with a truth column, one line per class with its metrics."""
    if "per_class" not in report:
        for name, count in report["predicted"].items():
            say(args, f"  {name:<45}{count:>8}")
        return
    say(args, f"  {'class':<40}{'true':>7}{'called':>8}{'prec':>7}{'recall':>7}{'F1':>7}")
    for row in report["per_class"]:
        say(args, f"  {row['label'][:39]:<40}{row['support']:>7}{row['n_predicted']:>8}"
                  f"{row['precision']:>7.3f}{row['recall']:>7.3f}{row['f1']:>7.3f}")
    say(args, f"accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f} against {args.truth_key}")


def _annotation_report(adata, key: str, truth_key: str | None) -> dict:
    """annotate's report: how each class was resolved, counts per call, confidence, the consensus and
    LCA calls, and (with a truth column) accuracy, macro-F1, per-class precision/recall/F1/support, the
    confusion matrix, the ontology-aware metric and the calibration of each call."""
    predicted = adata.obs[key].astype(str)
    stored = adata.uns[key]
    resolution = stored["resolution"]
    report: dict = {
        "n_cells": int(adata.n_obs),
        "predicted": predicted.value_counts().to_dict(),
        # Fast mode without --exact-argmax: cells whose top class may differ from --mode official's.
        "n_uncertified": int(stored.get("n_uncertified", 0)),
        "resolution": [
            {column: (values[i] or None) for column, values in resolution.items()}
            for i in range(len(stored["classes"]))
        ],
        "confidence": {
            "mean_score": float(adata.obs[key + "_score"].mean()),
            "mean_margin": float(adata.obs[key + "_margin"].mean()),
            "mean_entropy": float(adata.obs[key + "_entropy"].mean()),
        },
    }
    if truth_key is not None:
        from ..metrics import per_class_report

        truth = adata.obs[truth_key].astype(str)
        report.update(_scores_against(adata, key, truth_key))
        table = per_class_report(truth.to_numpy(), predicted.to_numpy())
        report["per_class"] = table["per_class"]
        report["confusion"] = {"labels": table["labels"], "counts": table["confusion"],
                               "rows": "true label", "columns": "predicted label"}
    for name, column in (("consensus", key + "_consensus"), ("lca", key + "_lca")):
        if column in adata.obs:
            report[name] = {"predicted": adata.obs[column].astype(str).value_counts().to_dict()}
            if name == "consensus":
                report[name]["params"] = {k: v for k, v in adata.uns[column]["params"].items() if v is not None}
            if truth_key is not None:
                report[name].update(_scores_against(adata, column, truth_key))
    if truth_key is not None:
        report["ontology"] = _ontology_report(adata, key, truth_key)
    report["params"] = {k: v for k, v in stored["params"].items() if v is not None}
    if "prior" in stored:
        report["prior"] = stored["prior"]
    return report


def _scores_against(adata, column: str, truth_key: str) -> dict:
    """Accuracy and macro-F1 of a call column against the truth; the ECE where the column has a score."""
    from sklearn.metrics import accuracy_score, f1_score

    from .. import evaluation

    truth, predicted = adata.obs[truth_key].astype(str), adata.obs[column].astype(str)
    out = {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
    }
    if column + "_score" in adata.obs and set(predicted) & set(truth):
        out["ece"] = evaluation.calibration(adata, label_key=truth_key, prediction_key=column)["ece"]
    return out


def _ontology_report(adata, key: str, truth_key: str) -> dict:
    """The ontology-aware metric of every call column, or the reason it could not be computed."""
    from .. import evaluation

    out = {}
    for column in (key, key + "_consensus", key + "_lca"):
        if column in adata.obs:
            try:
                out[column] = evaluation.ontology_accuracy(
                    adata, label_key=truth_key, prediction_key=column, annotation_key=key
                )["summary"]
            except LangCellError as error:  # labels that name no CL term: the rest of the report stands
                out[column] = {"error": str(error)}
    return out


def add_embed(sub: argparse._SubParsersAction) -> None:
    """Register ``langcell embed`` and its options."""
    p = sub.add_parser("embed", help="LangCell cell embeddings into obsm (streams backed files)",
                       description="On several processes: torchrun --nproc_per_node N -m langcell embed ...")
    add_input(p, corpus=True)
    p.add_argument("--out", required=True, metavar="OUT.h5ad", help="copy of the input with obsm[KEY] (atomic)")
    p.add_argument("--key-added", default="X_langcell", help="obsm key (default X_langcell)")
    p.add_argument("--backed", action="store_true", help="read the input backed (files larger than memory)")
    add_counts_options(p)
    add_compute_options(p)
    p.set_defaults(func=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    """Run ``langcell embed`` with the parsed arguments; return the exit status."""
    from .. import tl
    check_outputs(args, args.out)
    adata, corpus = read_cells(args.input, backed=args.backed)
    with torchrun_processes(args, adata.n_obs) as ctx:  # torchrun: each process embeds a share
        model = load_model(args.model, args.device)
        tl.embed(adata, model, counts_layer=args.counts_layer, gene_column=args.gene_column,
                 precision=args.precision, progress=not args.quiet, key_added=args.key_added,
                 distributed=ctx is not None, corpus=corpus)
    if ctx is not None and not ctx.is_main:
        return 0  # rank 0 writes the one result
    if adata.isbacked:
        embedding, params = adata.obsm[args.key_added], adata.uns[args.key_added]
        adata = adata.to_memory()
        adata.obsm[args.key_added], adata.uns[args.key_added] = embedding, params
    write_h5ad(adata, args.out)
    say(args, f"embedded {adata.n_obs} cells ({model.config.projection_dim}-d) -> {args.out}")
    return 0


def add_finetune(sub: argparse._SubParsersAction) -> None:
    """Register ``langcell finetune`` and its options."""
    p = sub.add_parser(
        "finetune",
        help="LangCell-CE: fine-tune the cell encoder + a linear classifier on labelled cells",
        description=("Stratified split (default 2:1, --train-fraction), training on the first part, accuracy and "
                     "macro-F1 on the held-out rest."),
    )
    add_input(p, labelled=True, label_help="obs column with the cell labels")
    p.add_argument("--out", required=True, metavar="DIR", help="classifier directory to create")
    p.add_argument("--mode", choices=["full", "linear"], default="full", help="full fine-tuning or linear probe")
    p.add_argument("--epochs", type=int,
                   help="training epochs (default: 100 for linear; for full, 3 or more to make >= 200 steps)")
    p.add_argument("--lr", type=float, help="peak learning rate of the classifier head (default 1e-3)")
    p.add_argument("--encoder-lr", type=float,
                   help="peak learning rate of the cell encoder, full mode only (default 5e-5)")
    p.add_argument("--train-fraction", type=float, default=2 / 3, metavar="F",
                   help="share of every class used for training, in (0, 1) (default 2/3, the paper's split)")
    p.add_argument("--max-length", type=int, metavar="N", help="longest cell in tokens (default: the model's)")
    p.add_argument("--head", choices=["random", "text"], default=None,
                   help="linear mode: start the head at random (default) or from the class texts")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and training")
    p.add_argument("--write", metavar="OUT.h5ad", help="also write the cells with predictions and split")
    p.add_argument("--report", metavar="REPORT.json", help="write the metrics as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_counts_options(p)
    add_compute_options(p, precision=False)
    p.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    """Run ``langcell finetune`` with the parsed arguments; return the exit status."""

    from .. import tl
    check_outputs(args, args.write, args.report, directories=(args.out,))
    if not 0 < args.train_fraction < 1:
        raise LangCellError(f"--train-fraction must lie strictly between 0 and 1, got {args.train_fraction}; e.g. 0.67")
    if args.max_length is not None and args.max_length < 1:
        raise LangCellError(f"--max-length must be a positive number of tokens, got {args.max_length}")
    adata = read_input(args.input)
    model = load_model(args.model, args.device)
    classifier, metrics = tl.finetune(
        adata, model, args.label_key, mode=args.mode, epochs=args.epochs, seed=args.seed,
        train_fraction=args.train_fraction, max_length=args.max_length,
        **{name: value for name, value in (("lr", args.lr), ("encoder_lr", args.encoder_lr), ("head", args.head))
           if value is not None},
        counts_layer=args.counts_layer, gene_column=args.gene_column, progress=not args.quiet,
    )
    classifier.save(args.out, overwrite=args.overwrite)
    if args.write:
        write_h5ad(adata, args.write)
    summary = {k: metrics[k] for k in ("accuracy", "macro_f1", "n_train", "n_test") if k in metrics}
    if args.report:
        write_json(args.report, metrics)
    say(args, f"held-out accuracy {summary['accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f} "
                 f"({summary['n_test']} cells); classifier -> {args.out}")
    return 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    """Register ``langcell predict`` and its options."""
    p = sub.add_parser("predict", help="cell types from a fine-tuned LangCell-CE classifier")
    add_input(p, model=False)
    p.add_argument("--classifier", required=True, metavar="DIR", help="directory written by `langcell finetune`")
    p.add_argument("--out", required=True, metavar="OUT.h5ad", help="copy of the input with predictions (atomic)")
    p.add_argument("--key-added", default="langcell_ce", help="obs column for the prediction")
    add_counts_options(p)
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    """Run ``langcell predict`` with the parsed arguments; return the exit status."""
    from .. import tl
    from ..models.classifier import CellTypeClassifier

    check_outputs(args, args.out)
    adata = read_input(args.input)
    classifier = CellTypeClassifier.load(args.classifier)
    tl.predict(adata, classifier, counts_layer=args.counts_layer, gene_column=args.gene_column,
               progress=not args.quiet, key_added=args.key_added)
    write_h5ad(adata, args.out)
    say(args, f"predicted {adata.n_obs} cells -> {args.out}")
    return 0


def add_retrieve(sub: argparse._SubParsersAction) -> None:
    """Register ``langcell retrieve`` and its options."""
    p = sub.add_parser(
        "retrieve",
        help="text -> top cells, or recall@k of cell-text retrieval on labelled cells",
    )
    add_input(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--texts", metavar="'A;B'", help="queries separated by ';' (cell-type names or descriptions)")
    what.add_argument("--label-key", metavar="COL", help="evaluate recall@1/5/10 against this obs column (cell -> text recall@k is left out for k >= the number of types: it is 1.0 by construction)")
    p.add_argument("--top-n", type=int, default=10, help="cells per query (default 10)")
    p.add_argument("--report", metavar="REPORT.json", help="write the result as JSON")
    add_counts_options(p)
    add_compute_options(p)
    p.set_defaults(func=run_retrieve)


def run_retrieve(args: argparse.Namespace) -> int:
    """Run ``langcell retrieve`` with the parsed arguments; return the exit status."""
    import json

    from .. import evaluation, tl
    check_outputs(args, args.report)
    adata = read_input(args.input)
    model = load_model(args.model, args.device)
    if args.label_key:
        result = evaluation.retrieval_recall(adata, model, args.label_key, counts_layer=args.counts_layer,
                                     gene_column=args.gene_column, precision=args.precision,
                                     progress=not args.quiet)
        say(args, json.dumps(result, indent=2, default=float))
    else:
        texts = [t.strip() for t in args.texts.split(";") if t.strip()]
        if not texts:
            raise LangCellError("--texts holds no query; pass texts separated by ';'")
        tl.retrieve_cells(adata, model, texts, top_n=args.top_n, counts_layer=args.counts_layer,
                          gene_column=args.gene_column, precision=args.precision, progress=not args.quiet)
        result = adata.uns["langcell_retrieval"]
        for text, cells, scores in zip(texts, result["cell_names"], result["scores"], strict=True):
            top = ", ".join(f"{name} ({score:.3f})" for name, score in zip(cells, scores, strict=True))
            say(args, f"{text}: {top}")
    if args.report:
        write_json(args.report, result)
    return 0

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
    read_descriptions,
    read_input,
    say,
    write_h5ad,
)


def add_annotate(sub: argparse._SubParsersAction) -> None:
    """Register ``langcell annotate`` and its options."""
    p = sub.add_parser(
        "annotate",
        help="zero-shot cell-type annotation from label names or descriptions",
        description=(
            "Score every cell against class texts (cell-type names resolved to the Cell Ontology, your own "
            "descriptions, or the terms of an obs column) and write the best class into obs."
        ),
    )
    add_input(p)
    p.add_argument("--out", required=True, metavar="OUT.h5ad", help="annotated copy of the input (written atomically)")
    classes = p.add_mutually_exclusive_group(required=True)
    classes.add_argument("--labels", metavar="'A;B;C'", help="class names separated by ';'")
    classes.add_argument("--descriptions", metavar="JSON", help="JSON file {class name: description}")
    classes.add_argument("--classes-from", metavar="COL", help="obs column of ontology term ids to use as classes")
    add_mapping(p)
    p.add_argument("--alpha", type=float, default=0.1, help="weight of the similarity score (default 0.1)")
    p.add_argument("--top-k", type=int, default=3, help="classes per cell reranked by matching (fast mode)")
    p.add_argument("--mode", choices=["fast", "official"], default="fast", help="scoring mode (default fast)")
    p.add_argument("--threshold", type=float, help="cells whose best score is below this become 'unknown'")
    p.add_argument("--prior", choices=["uniform", "em"], default="uniform",
                   help="class frequencies: uniform (default), or em: re-estimated on these cells by EM "
                        "(Saerens et al. 2002) and used to correct the similarity part of the scores")
    p.add_argument("--key-added", default="langcell_cell_type", help="obs column for the prediction")
    p.add_argument("--truth-key", metavar="COL", help="obs column of true labels: adds accuracy/macro-F1 to the report")
    p.add_argument("--report", metavar="REPORT.json", help="write a JSON report (counts per class, metrics)")
    add_counts_options(p)
    add_compute_options(p)
    p.set_defaults(func=run_annotate)


def run_annotate(args: argparse.Namespace) -> int:
    """Run ``langcell annotate`` with the parsed arguments; return the exit status."""
    from .. import tl

    check_outputs(args, args.out, args.report)
    # The class names first: a bad --labels or --descriptions costs no reading of cells or weights.
    labels = None
    if args.labels is not None:
        labels = [part.strip() for part in args.labels.split(";") if part.strip()]
        if not labels:
            raise LangCellError("--labels holds no class name; pass names separated by ';'")
    elif args.descriptions is not None:
        labels = read_descriptions(args.descriptions)
    adata = read_input(args.input)
    model = load_model(args.model, args.device)
    tl.annotate(
        adata, model, labels, classes_from=args.classes_from, mapping=args.mapping, alpha=args.alpha,
        top_k=args.top_k, mode=args.mode, threshold=args.threshold, prior=args.prior, counts_layer=args.counts_layer,
        gene_column=args.gene_column, precision=args.precision, progress=not args.quiet,
        key_added=args.key_added,
    )
    report = _annotation_report(adata, args.key_added, args.truth_key)
    write_h5ad(adata, args.out)
    if args.report:
        write_json(args.report, report)
    for name, count in report["predicted"].items():
        say(args, f"  {name:<45}{count:>8}")
    if "prior" in report:
        found = report["prior"]
        priors = ", ".join(f"{name} {value:.3f}" for name, value in found["estimated"].items())
        say(args, f"prior em ({found['status']}, {found['n_iter']} iterations): {priors}")
    if "accuracy" in report:
        say(args, f"accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f} against {args.truth_key}")
    say(args, f"annotated {adata.n_obs} cells -> {args.out}")
    return 0


def _annotation_report(adata, key: str, truth_key: str | None) -> dict:
    """Counts per predicted class and, with a truth column, accuracy and macro-F1: annotate's report."""
    predicted = adata.obs[key].astype(str)
    report: dict = {"n_cells": int(adata.n_obs), "predicted": predicted.value_counts().to_dict()}
    if truth_key is not None:
        from sklearn.metrics import accuracy_score, f1_score

        if truth_key not in adata.obs:
            raise LangCellError(f"--truth-key {truth_key!r} is not an obs column; pass one of {listed(adata.obs.columns)}")
        truth = adata.obs[truth_key].astype(str)
        report["accuracy"] = float(accuracy_score(truth, predicted))
        report["macro_f1"] = float(f1_score(truth, predicted, average="macro", zero_division=0))
    report["params"] = {k: v for k, v in adata.uns[key]["params"].items() if v is not None}
    if "prior" in adata.uns[key]:
        report["prior"] = adata.uns[key]["prior"]
    return report


def add_embed(sub: argparse._SubParsersAction) -> None:
    """Register ``langcell embed`` and its options."""
    p = sub.add_parser("embed", help="LangCell cell embeddings into obsm (streams backed files)")
    add_input(p)
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
    adata = read_input(args.input, backed=args.backed)
    model = load_model(args.model, args.device)
    tl.embed(adata, model, counts_layer=args.counts_layer, gene_column=args.gene_column,
             precision=args.precision, progress=not args.quiet, key_added=args.key_added)
    if args.backed:
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
    what.add_argument("--label-key", metavar="COL", help="evaluate recall@1/5/10 against this obs column")
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

"""The ``langcell`` command line: a thin layer over the Python API.

Every subcommand parses its arguments, calls one public function and prints what it returns. A
:class:`~langcell.errors.LangCellError` (a problem the user can fix) is printed on one line, without a
traceback, and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from .errors import LangCellError

# Commands never reach the network: the text tower and tokenizer come from installed packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EXIT_USER_ERROR = 2


def _print(args: argparse.Namespace, *parts: object) -> None:
    if not getattr(args, "quiet", False):
        print(*parts, flush=True)


# ----------------------------------------------------------------------------------------- tokenize
def _add_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="turn h5ad files of raw counts into an on-disk corpus of rank-ordered gene tokens",
        description=(
            "Tokenize one or more h5ad files of raw counts into a corpus directory. The gene vocabulary "
            "and medians come from a saved tokenizer (--tokenizer), from the released Geneformer "
            "dictionaries (--token-dictionary/--gene-median-dictionary), or are fitted on the inputs."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="IN.h5ad", help="h5ad files with raw counts")
    p.add_argument("out", metavar="OUT_DIR", help="corpus directory to create")
    p.add_argument("--tokenizer", metavar="DIR", help="directory holding gene_tokenizer.json (or a model dir)")
    p.add_argument("--token-dictionary", metavar="PKL", help="Geneformer token_dictionary.pkl")
    p.add_argument("--gene-median-dictionary", metavar="PKL", help="Geneformer gene_median_dictionary.pkl")
    p.add_argument(
        "--custom-genes",
        action="store_true",
        help="fit a vocabulary of the var names verbatim (genes without public IDs) instead of Ensembl IDs",
    )
    p.add_argument("--organism", choices=["human", "mouse"], help="organism of the gene symbols (default: detect)")
    p.add_argument("--gene-column", metavar="COL", help="var column holding gene IDs/symbols (default: var names)")
    p.add_argument("--counts-layer", metavar="LAYER", help="layer with raw counts, or 'raw' for .raw (default: X)")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per cell including <cls> (default 2048)")
    p.add_argument("--shard-size", type=int, default=100_000, help="cells per shard (default 100000)")
    p.add_argument("--obs-columns", metavar="COL", nargs="*", help="obs columns to keep (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=_run_tokenize)


def _run_tokenize(args: argparse.Namespace) -> int:
    from .data.corpus import write_corpus
    from .data.tokenizer import GeneTokenizer

    if bool(args.token_dictionary) != bool(args.gene_median_dictionary):
        raise LangCellError(
            "--token-dictionary and --gene-median-dictionary go together; pass both Geneformer files or neither"
        )
    if args.tokenizer and args.token_dictionary:
        raise LangCellError("pass either --tokenizer or the Geneformer dictionaries, not both")
    if args.tokenizer:
        tokenizer = GeneTokenizer.load(args.tokenizer)
        _print(args, f"tokenizer: {args.tokenizer} ({tokenizer.vocab_size} tokens)")
    elif args.token_dictionary:
        tokenizer = GeneTokenizer.from_geneformer(args.token_dictionary, args.gene_median_dictionary)
        _print(args, f"tokenizer: Geneformer dictionaries ({tokenizer.vocab_size} tokens)")
    else:
        _print(args, f"fitting a gene vocabulary and medians on {len(args.inputs)} file(s) ...")
        tokenizer = GeneTokenizer.fit(
            args.inputs,
            gene_id_kind="custom" if args.custom_genes else "ensembl",
            organism=args.organism,
            gene_column=args.gene_column,
            counts_layer=args.counts_layer,
            progress=not args.quiet,
        )
        _print(args, f"tokenizer: fitted, {tokenizer.vocab_size} tokens")
    corpus = write_corpus(
        args.inputs,
        tokenizer,
        args.out,
        obs_columns=args.obs_columns,
        shard_size=args.shard_size,
        gene_column=args.gene_column,
        counts_layer=args.counts_layer,
        max_length=args.max_length,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    for report in corpus.reports:
        _print(args, report.summary())
    lengths = corpus.lengths
    _print(
        args,
        f"wrote {len(corpus)} cells, {int(lengths.sum())} tokens "
        f"(median {int(_median(lengths))} per cell) to {args.out}",
    )
    return 0


def _median(values) -> float:
    import numpy as np

    return float(np.median(values)) if len(values) else 0.0


# ---------------------------------------------------------------------------------- import-official
def _add_import_official(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-official",
        help="convert the released LangCell checkpoint (five modules) into a langcell model directory",
    )
    p.add_argument("ckpt", metavar="CKPT_DIR", help="released checkpoint: cell_bert/, text_bert/, *_proj.bin, ctm_head.bin")
    p.add_argument("out", metavar="OUT_DIR", help="model directory to create")
    p.add_argument("--text-tokenizer", required=True, metavar="DIR", help="the released text tokenizer directory")
    p.add_argument("--token-dictionary", required=True, metavar="PKL", help="Geneformer token_dictionary.pkl")
    p.add_argument("--gene-median-dictionary", required=True, metavar="PKL", help="gene_median_dictionary.pkl")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=_run_import_official)


def _run_import_official(args: argparse.Namespace) -> int:
    from .convert import import_official

    model = import_official(
        args.ckpt,
        args.out,
        text_tokenizer_dir=args.text_tokenizer,
        token_dictionary=args.token_dictionary,
        gene_median_dictionary=args.gene_median_dictionary,
        overwrite=args.overwrite,
    )
    n_params = sum(p.numel() for p in model.parameters())
    _print(args, f"imported {n_params / 1e6:.1f}M parameters into {args.out}")
    return 0


# ----------------------------------------------------------------------------------------- pretrain
def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a LangCell model on a tokenized corpus (one process, or under torchrun)",
        description=(
            "Pretrain with masked gene modelling, cell-cell and cell-text contrastive learning and "
            "cell-text matching, in two stages. On several processes: "
            "torchrun --nproc_per_node N -m langcell pretrain ..."
        ),
    )
    p.add_argument("--config", required=True, metavar="CFG",
                   help="recipe: a packaged name (tiny, small, base) or a JSON recipe file")
    p.add_argument("--corpus", required=True, metavar="DIR", help="corpus directory from `langcell tokenize`")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (checkpoints, log.csv, model/)")
    p.add_argument("--stage", choices=["cell", "joint", "both"], help="override the recipe's stage")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimiser steps per stage (overrides the recipe)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    p.add_argument("--seed", type=int, help="override the recipe's seed")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: CUDA when available")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="override the recipe's precision")
    p.add_argument("--num-workers", type=int, metavar="N", help="data-loader workers per process")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (exact resumes)")
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from .train import load_recipe, pretrain

    config = load_recipe(args.config)
    overrides = {
        "stage": args.stage,
        "seed": args.seed,
        "device": args.device,
        "precision": args.precision,
        "num_workers": args.num_workers,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    if args.max_steps is not None:
        config.cell_steps = config.joint_steps = args.max_steps
    if args.deterministic:
        config.deterministic = True
    config.validate()
    pretrain(args.corpus, args.out, config, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        _print(args, f"model written to {os.path.join(args.out, 'model')}")
    return 0


# ----------------------------------------------------------------------------------- annotate / embed
def _read_input(path: str, *, backed: bool = False):
    from .data.datasets import load

    return load(path, backed=backed)


def _check_outputs(*paths: str | None) -> None:
    """Refuse, before any work, output paths whose folder does not exist (``None`` = not requested)."""
    from ._atomic import check_output_parent

    for path in paths:
        if path:
            check_output_parent(path)


def _write_h5ad(adata, path: str) -> None:
    from ._atomic import atomic_file

    with atomic_file(path) as tmp:
        adata.write_h5ad(tmp)


def _load_model(path: str, device: str | None = None):
    """The model in ``path``, on ``device`` ("auto" or None: CUDA when available, else CPU)."""
    import torch

    from .models.langcell import LangCell

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise LangCellError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return LangCell.from_pretrained(path, map_location=device)


def _add_compute_options(p: argparse.ArgumentParser, *, precision: bool = True) -> None:
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="cpu, cuda, cuda:N, or auto (default: CUDA when available)")
    if precision:
        p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                       help="autocast of the model passes (default fp32; bf16 is faster on GPUs; fp16 needs CUDA)")


def _add_counts_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--counts-layer", metavar="LAYER", help="layer with raw counts, or 'raw' for .raw (default: X)")
    p.add_argument("--gene-column", metavar="COL", help="var column holding gene IDs/symbols (default: var names)")


def _add_annotate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "annotate",
        help="zero-shot cell-type annotation from label names or descriptions",
        description=(
            "Score every cell against class texts (cell-type names resolved to the Cell Ontology, your own "
            "descriptions, or the terms of an obs column) and write the best class into obs."
        ),
    )
    p.add_argument("input", metavar="IN.h5ad", help="cells with raw counts")
    p.add_argument("--model", required=True, metavar="DIR", help="a langcell model directory")
    p.add_argument("--out", required=True, metavar="OUT.h5ad", help="annotated copy of the input (written atomically)")
    classes = p.add_mutually_exclusive_group(required=True)
    classes.add_argument("--labels", metavar="'A;B;C'", help="class names separated by ';'")
    classes.add_argument("--descriptions", metavar="JSON", help="JSON file {class name: description}")
    classes.add_argument("--classes-from", metavar="COL", help="obs column of ontology term ids to use as classes")
    p.add_argument("--mapping", metavar="FILE", help="JSON/TSV {label: term id} for labels that do not resolve")
    p.add_argument("--alpha", type=float, default=0.1, help="weight of the similarity score (default 0.1)")
    p.add_argument("--top-k", type=int, default=3, help="classes per cell reranked by matching (fast mode)")
    p.add_argument("--mode", choices=["fast", "official"], default="fast", help="scoring mode (default fast)")
    p.add_argument("--threshold", type=float, help="cells whose best score is below this become 'unknown'")
    p.add_argument("--key-added", default="langcell_cell_type", help="obs column for the prediction")
    p.add_argument("--truth-key", metavar="COL", help="obs column of true labels: adds accuracy/macro-F1 to the report")
    p.add_argument("--report", metavar="REPORT.json", help="write a JSON report (counts per class, metrics)")
    _add_counts_options(p)
    _add_compute_options(p)
    p.set_defaults(func=_run_annotate)


def _run_annotate(args: argparse.Namespace) -> int:

    from . import tl
    _check_outputs(args.out, args.report)
    adata = _read_input(args.input)
    model = _load_model(args.model, args.device)
    labels = None
    if args.labels is not None:
        labels = [part.strip() for part in args.labels.split(";") if part.strip()]
        if not labels:
            raise LangCellError("--labels holds no class name; pass names separated by ';'")
    elif args.descriptions is not None:
        labels = _read_descriptions(args.descriptions)
    tl.annotate(
        adata, model, labels, classes_from=args.classes_from, mapping=args.mapping, alpha=args.alpha,
        top_k=args.top_k, mode=args.mode, threshold=args.threshold, counts_layer=args.counts_layer,
        gene_column=args.gene_column, precision=args.precision, progress=not args.quiet,
        key_added=args.key_added,
    )
    report = _annotation_report(adata, args.key_added, args.truth_key)
    _write_h5ad(adata, args.out)
    if args.report:
        _write_json(args.report, report)
    for name, count in report["predicted"].items():
        _print(args, f"  {name:<45}{count:>8}")
    if "accuracy" in report:
        _print(args, f"accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f} against {args.truth_key}")
    _print(args, f"annotated {adata.n_obs} cells -> {args.out}")
    return 0


def _read_descriptions(path: str) -> dict[str, str]:
    import json

    try:
        with open(path) as handle:
            data = json.load(handle)
    except FileNotFoundError as err:
        raise LangCellError(f"descriptions file {path!r} does not exist; check the path") from err
    except json.JSONDecodeError as err:
        raise LangCellError(f"descriptions file {path!r} is not valid JSON ({err}); fix the file") from err
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise LangCellError(f"descriptions file {path!r} must hold a JSON object {{class name: description}}")
    return data


def _annotation_report(adata, key: str, truth_key: str | None) -> dict:
    predicted = adata.obs[key].astype(str)
    report: dict = {"n_cells": int(adata.n_obs), "predicted": predicted.value_counts().to_dict()}
    if truth_key is not None:
        from sklearn.metrics import accuracy_score, f1_score

        if truth_key not in adata.obs:
            raise LangCellError(f"--truth-key {truth_key!r} is not an obs column; pass one of {list(adata.obs.columns)}")
        truth = adata.obs[truth_key].astype(str)
        report["accuracy"] = float(accuracy_score(truth, predicted))
        report["macro_f1"] = float(f1_score(truth, predicted, average="macro", zero_division=0))
    report["params"] = {k: v for k, v in adata.uns[key]["params"].items() if v is not None}
    return report


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="LangCell cell embeddings into obsm (streams backed files)")
    p.add_argument("input", metavar="IN.h5ad", help="cells with raw counts")
    p.add_argument("--model", required=True, metavar="DIR", help="a langcell model directory")
    p.add_argument("--out", required=True, metavar="OUT.h5ad", help="copy of the input with obsm[KEY] (atomic)")
    p.add_argument("--key-added", default="X_langcell", help="obsm key (default X_langcell)")
    p.add_argument("--backed", action="store_true", help="read the input backed (files larger than memory)")
    _add_counts_options(p)
    _add_compute_options(p)
    p.set_defaults(func=_run_embed)


def _run_embed(args: argparse.Namespace) -> int:
    from . import tl
    _check_outputs(args.out)
    adata = _read_input(args.input, backed=args.backed)
    model = _load_model(args.model, args.device)
    tl.embed(adata, model, counts_layer=args.counts_layer, gene_column=args.gene_column,
             precision=args.precision, progress=not args.quiet, key_added=args.key_added)
    if args.backed:
        embedding, params = adata.obsm[args.key_added], adata.uns[args.key_added]
        adata = adata.to_memory()
        adata.obsm[args.key_added], adata.uns[args.key_added] = embedding, params
    _write_h5ad(adata, args.out)
    _print(args, f"embedded {adata.n_obs} cells ({model.config.projection_dim}-d) -> {args.out}")
    return 0


# ------------------------------------------------------------------------- finetune / predict / retrieve
def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="LangCell-CE: fine-tune the cell encoder + a linear classifier on labelled cells",
        description="Stratified 2:1 split, training on two thirds, accuracy and macro-F1 on the held-out third.",
    )
    p.add_argument("input", metavar="IN.h5ad", help="labelled cells with raw counts")
    p.add_argument("--model", required=True, metavar="DIR", help="a langcell model directory")
    p.add_argument("--label-key", required=True, metavar="COL", help="obs column with the cell labels")
    p.add_argument("--out", required=True, metavar="DIR", help="classifier directory to create")
    p.add_argument("--mode", choices=["full", "linear"], default="full", help="full fine-tuning or linear probe")
    p.add_argument("--epochs", type=int,
                   help="training epochs (default: 100 for linear; for full, 3 or more to make >= 200 steps)")
    p.add_argument("--lr", type=float, help="peak learning rate of the classifier head (default 1e-3)")
    p.add_argument("--encoder-lr", type=float,
                   help="peak learning rate of the cell encoder, full mode only (default 5e-5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and training")
    p.add_argument("--write", metavar="OUT.h5ad", help="also write the cells with predictions and split")
    p.add_argument("--report", metavar="REPORT.json", help="write the metrics as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_counts_options(p)
    _add_compute_options(p, precision=False)
    p.set_defaults(func=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:

    from . import tl
    _check_outputs(args.out, args.write, args.report)
    adata = _read_input(args.input)
    model = _load_model(args.model, args.device)
    classifier, metrics = tl.finetune(
        adata, model, args.label_key, mode=args.mode, epochs=args.epochs, seed=args.seed,
        **{name: value for name, value in (("lr", args.lr), ("encoder_lr", args.encoder_lr)) if value is not None},
        counts_layer=args.counts_layer, gene_column=args.gene_column, progress=not args.quiet,
    )
    classifier.save(args.out, overwrite=args.overwrite)
    if args.write:
        _write_h5ad(adata, args.write)
    summary = {k: metrics[k] for k in ("accuracy", "macro_f1", "n_train", "n_test") if k in metrics}
    if args.report:
        _write_json(args.report, metrics)
    _print(args, f"held-out accuracy {summary['accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f} "
                 f"({summary['n_test']} cells); classifier -> {args.out}")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="cell types from a fine-tuned LangCell-CE classifier")
    p.add_argument("input", metavar="IN.h5ad", help="cells with raw counts")
    p.add_argument("--classifier", required=True, metavar="DIR", help="directory written by `langcell finetune`")
    p.add_argument("--out", required=True, metavar="OUT.h5ad", help="copy of the input with predictions (atomic)")
    p.add_argument("--key-added", default="langcell_ce", help="obs column for the prediction")
    _add_counts_options(p)
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from . import tl
    from .models.classifier import CellTypeClassifier

    _check_outputs(args.out)
    adata = _read_input(args.input)
    classifier = CellTypeClassifier.load(args.classifier)
    tl.predict(adata, classifier, counts_layer=args.counts_layer, gene_column=args.gene_column,
               progress=not args.quiet, key_added=args.key_added)
    _write_h5ad(adata, args.out)
    _print(args, f"predicted {adata.n_obs} cells -> {args.out}")
    return 0


def _add_retrieve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrieve",
        help="text -> top cells, or recall@k of cell-text retrieval on labelled cells",
    )
    p.add_argument("input", metavar="IN.h5ad", help="cells with raw counts")
    p.add_argument("--model", required=True, metavar="DIR", help="a langcell model directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--texts", metavar="'A;B'", help="queries separated by ';' (cell-type names or descriptions)")
    what.add_argument("--label-key", metavar="COL", help="evaluate recall@1/5/10 against this obs column")
    p.add_argument("--top-n", type=int, default=10, help="cells per query (default 10)")
    p.add_argument("--report", metavar="REPORT.json", help="write the result as JSON")
    _add_counts_options(p)
    _add_compute_options(p)
    p.set_defaults(func=_run_retrieve)


def _run_retrieve(args: argparse.Namespace) -> int:
    import json

    from . import evaluation, tl
    _check_outputs(args.report)
    adata = _read_input(args.input)
    model = _load_model(args.model, args.device)
    if args.label_key:
        result = evaluation.retrieval_recall(adata, model, args.label_key, counts_layer=args.counts_layer,
                                     gene_column=args.gene_column, precision=args.precision,
                                     progress=not args.quiet)
        _print(args, json.dumps(result, indent=2, default=float))
    else:
        texts = [t.strip() for t in args.texts.split(";") if t.strip()]
        if not texts:
            raise LangCellError("--texts holds no query; pass texts separated by ';'")
        tl.retrieve_cells(adata, model, texts, top_n=args.top_n, counts_layer=args.counts_layer,
                          gene_column=args.gene_column, precision=args.precision, progress=not args.quiet)
        result = adata.uns["langcell_retrieval"]
        for text, cells, scores in zip(texts, result["cell_names"], result["scores"], strict=True):
            top = ", ".join(f"{name} ({score:.3f})" for name, score in zip(cells, scores, strict=True))
            _print(args, f"{text}: {top}")
    if args.report:
        _write_json(args.report, result)
    return 0


def _write_json(path: str, data) -> None:
    """Write a JSON report atomically (numpy arrays and scalars become lists and numbers)."""
    import json

    from ._atomic import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default))


def _json_default(value):
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


# ----------------------------------------------------------------------------------------- fewshot
def _add_fewshot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fewshot",
        help="few-shot annotation curves: LangCell tuned on n cells per class vs logistic regression and kNN",
        description=(
            "For every n in --shots (and every repeat): n labelled cells per class train LangCell (both "
            "encoders, the paper's few-shot protocol), a logistic regression and a kNN classifier; the other "
            "labelled cells test all three. Prints accuracy and macro-F1 per method and n."
        ),
    )
    p.add_argument("input", metavar="IN.h5ad", help="labelled cells with raw counts")
    p.add_argument("--model", required=True, metavar="DIR", help="a langcell model directory")
    p.add_argument("--label-key", required=True, metavar="COL", help="obs column with the cell labels")
    p.add_argument("--shots", default="1,3,5,10", metavar="N,N,...",
                   help="training cells per class, comma-separated (default 1,3,5,10)")
    p.add_argument("--repeats", type=int, default=1, help="random splits per number of shots (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits and the tuning")
    classes = p.add_mutually_exclusive_group()
    classes.add_argument("--labels", metavar="'A;B;C'", help="only these classes of --label-key, separated by ';'")
    classes.add_argument("--descriptions", metavar="JSON", help="JSON file {class name: description}")
    p.add_argument("--mapping", metavar="FILE", help="JSON/TSV {label: term id} for labels that do not resolve")
    p.add_argument("--epochs", type=int, default=20, help="tuning epochs of LangCell (default 20)")
    p.add_argument("--match-classes", type=int, metavar="M",
                   help="matching loss over the own class and the M-1 most similar others (default: every class)")
    p.add_argument("--max-length", type=int, metavar="N", help="longest cell in tokens (default: the model's)")
    p.add_argument("--report", metavar="REPORT.json", help="write the results and settings as JSON")
    p.add_argument("--plot", metavar="CURVES.png", help="write the few-shot curves (macro-F1)")
    p.add_argument("--out", metavar="OUT.h5ad", help="write a copy of the input with uns['langcell_fewshot']")
    _add_counts_options(p)
    _add_compute_options(p, precision=False)
    p.set_defaults(func=_run_fewshot)


def _run_fewshot(args: argparse.Namespace) -> int:
    import pandas as pd

    from . import evaluation, pl

    _check_outputs(args.report, args.plot, args.out)
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
        labels = _read_descriptions(args.descriptions)
    adata = _read_input(args.input)
    model = _load_model(args.model, args.device)
    evaluation.fewshot(
        adata, model, args.label_key, shots=shots, repeats=args.repeats, labels=labels, mapping=args.mapping,
        epochs=args.epochs, seed=args.seed, max_length=args.max_length, match_classes=args.match_classes,
        counts_layer=args.counts_layer, gene_column=args.gene_column, progress=not args.quiet, inplace=True,
    )
    stored = adata.uns["langcell_fewshot"]
    results = pd.DataFrame(stored["results"])
    if args.report:
        _write_json(args.report, {key: stored[key] for key in ("params", "results", "classes", "train_loss")})
    if args.plot:
        pl.fewshot_curves(results, args.plot, title=f"few-shot annotation, {adata.n_obs} cells")
    if args.out:
        _write_h5ad(adata, args.out)
    means = results.groupby(["method", "shots"])[["accuracy", "macro_f1"]].mean()
    _print(args, f"{'method':<22}{'shots':>6}{'accuracy':>10}{'macro-F1':>10}   (mean of {args.repeats} repeat(s))")
    for method in dict.fromkeys(results["method"]):
        for n in shots:
            accuracy, macro_f1 = means.loc[(method, n)]
            _print(args, f"{method:<22}{n:>6}{accuracy:>10.3f}{macro_f1:>10.3f}")
    return 0


# ----------------------------------------------------------------------------------------- evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("input", metavar="IN.h5ad", help="labelled cells with raw counts")
    p.add_argument("--model", required=True, metavar="DIR", help="a langcell model directory")
    p.add_argument("--label-key", required=True, metavar="COL", help="obs column with the true cell types")
    p.add_argument("--batch-key", metavar="COL", help="obs column with the batch: adds the scIB integration metrics")
    p.add_argument("--labels", metavar="'A;B;C'",
                   help="candidate classes separated by ';' (default: the labels of --label-key)")
    p.add_argument("--seen-types", metavar="'A;B'",
                   help="types seen in training, separated by ';': accuracy is reported for seen and unseen types")
    p.add_argument("--mapping", metavar="FILE", help="JSON/TSV {label: term id} for labels that do not resolve")
    p.add_argument("--metrics", metavar="M,M,...",
                   help="scIB metrics, comma-separated (default: silhouette_label, isolated_labels, nmi_kmeans, "
                        "ari_kmeans, clisi, silhouette_batch, ilisi, graph_connectivity, pcr_comparison; also bras, kbet)")
    p.add_argument("--neighbors", choices=["exact", "pynndescent"], default="exact",
                   help="neighbour search of the scIB metrics (default exact)")
    p.add_argument("--report", metavar="REPORT.json", help="write the report as JSON (default: print it)")
    p.add_argument("--out", metavar="OUT.h5ad", help="write a copy of the input with the predictions and embeddings")
    _add_counts_options(p)
    _add_compute_options(p)
    p.set_defaults(func=_run_evaluate)


def _split_names(text: str | None, option: str) -> list[str] | None:
    """``'a;b'`` -> ``['a', 'b']``; None stays None; an option holding no name is refused."""
    if text is None:
        return None
    names = [part.strip() for part in text.split(";") if part.strip()]
    if not names:
        raise LangCellError(f"{option} holds no name; pass names separated by ';'")
    return names


def _run_evaluate(args: argparse.Namespace) -> int:
    import json

    from . import evaluation
    from .evaluation.integration import DEFAULT_METRICS

    _check_outputs(args.report, args.out)
    labels = _split_names(args.labels, "--labels")
    seen = _split_names(args.seen_types, "--seen-types")
    metrics = DEFAULT_METRICS
    if args.metrics is not None:
        metrics = [part.strip() for part in args.metrics.split(",") if part.strip()]
        if not metrics:
            raise LangCellError("--metrics holds no metric name; pass names separated by ','")
    adata = _read_input(args.input)
    model = _load_model(args.model, args.device)
    report = evaluation.evaluate(
        adata, model, label_key=args.label_key, batch_key=args.batch_key, labels=labels, seen=seen,
        mapping=args.mapping, metrics=metrics, neighbors=args.neighbors, counts_layer=args.counts_layer,
        gene_column=args.gene_column, precision=args.precision, progress=not args.quiet, inplace=True,
    )
    if args.out:
        _write_h5ad(adata, args.out)
    if not args.report:
        _print(args, json.dumps(report, indent=2))
        return 0
    _write_json(args.report, report)
    summary = report["annotation"]["summary"]
    _print(args, f"{'cell type':<45}{'cells':>7}{'accuracy':>10}  seen")
    for row in report["annotation"]["per_type"]:
        seen_text = "" if row["seen"] is None else ("yes" if row["seen"] else "no")
        _print(args, f"{row['cell_type']:<45}{row['n_cells']:>7}{row['accuracy']:>10.3f}  {seen_text}")
    _print(args, f"accuracy {summary['accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f} ({summary['n_cells']} cells)")
    for name in ("mean_accuracy_seen", "mean_accuracy_unseen"):
        if summary.get(name) is not None:
            _print(args, f"{name.replace('_', ' ')} {summary[name]:.3f}")
    for row in report["integration"] or []:
        scores = ", ".join(
            f"{name.replace('_', ' ')} {row[name]:.3f}"
            for name in ("bio_conservation", "batch_correction", "total") if row.get(name) is not None
        )
        _print(args, f"scIB {row['embedding']}: {scores}")
    _print(args, f"report -> {args.report}")
    return 0


# ------------------------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on scanpy's bundled PBMC cells")
    p.add_argument("--out", default="langcell_demo", metavar="DIR", help="output directory (default ./langcell_demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same numbers)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, seed=args.seed, quiet=args.quiet)
    return 0


# ------------------------------------------------------------------------------------------- main
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo,
    _add_tokenize,
    _add_import_official,
    _add_pretrain,
    _add_annotate,
    _add_embed,
    _add_finetune,
    _add_fewshot,
    _add_predict,
    _add_retrieve,
    _add_evaluate,
]


def build_parser() -> argparse.ArgumentParser:
    """Return the ``langcell`` argument parser with every subcommand registered."""
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="langcell",
        description="LangCell: language-cell pre-training and zero-shot cell-type annotation.",
    )
    parser.add_argument("--version", action="version", version=f"langcell {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # Each subcommand inherits --quiet, so `langcell tokenize ... --quiet` works anywhere on the line.
    original_add = sub.add_parser

    def add_parser(name: str, **kwargs):
        kwargs.setdefault("parents", [common])
        return original_add(name, **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except LangCellError as err:
        print(f"langcell {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"langcell {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

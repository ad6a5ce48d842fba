"""Commands that build things: ``tokenize`` (corpora), ``import-official`` (the released checkpoint),
``pretrain`` and ``demo``."""

from __future__ import annotations

import argparse
import os

from ..errors import LangCellError
from ._common import say


def add_tokenize(sub: argparse._SubParsersAction) -> None:
    """Register ``langcell tokenize`` and its options."""
    p = sub.add_parser(
        "tokenize",
        help="turn h5ad files or SOMA experiments of raw counts into an on-disk corpus of rank-ordered gene tokens",
        description=(
            "Tokenize h5ad files and/or SOMA experiments (a local directory or a remote URI such as the "
            "CELLxGENE Census's s3://cellxgene-census-public-us-west-2/cell-census/<release>/soma/census_data/"
            "homo_sapiens) of raw counts into a corpus directory. The gene vocabulary and medians come from "
            "a saved tokenizer (--tokenizer), from the released Geneformer dictionaries "
            "(--token-dictionary/--gene-median-dictionary), or are fitted on the inputs."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="IN", help="h5ad files, or SOMA experiment directories / URIs")
    p.add_argument("out", metavar="OUT_DIR", help="corpus directory to create")
    p.add_argument("--tokenizer", metavar="DIR", help="directory holding gene_tokenizer.json (or a model dir)")
    p.add_argument("--token-dictionary", metavar="PKL", help="Geneformer token_dictionary.pkl")
    p.add_argument("--gene-median-dictionary", metavar="PKL", help="Geneformer gene_median_dictionary.pkl")
    p.add_argument(
        "--gene-name-dictionary",
        metavar="PKL",
        help="Geneformer gene_name_id_dict.pkl (with --token-dictionary): map gene symbols as the release does",
    )
    p.add_argument(
        "--custom-genes",
        action="store_true",
        help="fit a vocabulary of the var names verbatim (genes without public IDs) instead of Ensembl IDs",
    )
    p.add_argument("--organism", choices=["human", "mouse"], help="organism of the gene symbols (default: detect)")
    p.add_argument("--gene-column", metavar="COL", help="var column holding gene IDs/symbols (default: var names)")
    p.add_argument("--counts-layer", metavar="LAYER",
                   help="h5ad inputs: layer with raw counts, or 'raw' for .raw (default: X)")
    p.add_argument("--obs-filter", metavar="EXPR",
                   help="SOMA inputs: obs value filter, e.g. \"tissue_general == 'blood' and is_primary_data == True\"")
    p.add_argument("--measurement", metavar="NAME", help="SOMA inputs: measurement of the genes (default RNA)")
    p.add_argument("--x-layer", metavar="NAME", help="SOMA inputs: X layer of raw counts (default raw)")
    p.add_argument("--keep-free", type=float, default=0.0, metavar="GB",
                   help="GB that must stay free on the output's disk (default 0)")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per cell including <cls> (default 2048)")
    p.add_argument("--shard-size", type=int, default=100_000, help="cells per shard (default 100000)")
    p.add_argument("--obs-columns", metavar="COL", nargs="*", help="obs columns to keep (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=run_tokenize)


def run_tokenize(args: argparse.Namespace) -> int:
    """Run ``langcell tokenize`` with the parsed arguments; return the exit status."""
    from .._atomic import check_apart_from_inputs
    from ..data.corpus import write_corpus
    from ..data.tokenizer import GeneTokenizer

    # Before fitting a vocabulary: an output over an input would replace it (write_corpus checks too).
    check_apart_from_inputs(args.out, [*args.inputs, *([args.tokenizer] if args.tokenizer else [])])

    if bool(args.token_dictionary) != bool(args.gene_median_dictionary):
        raise LangCellError(
            "--token-dictionary and --gene-median-dictionary go together; pass both Geneformer files or neither"
        )
    if args.tokenizer and args.token_dictionary:
        raise LangCellError("pass either --tokenizer or the Geneformer dictionaries, not both")
    if args.gene_name_dictionary and not args.token_dictionary:
        raise LangCellError(
            "--gene-name-dictionary goes with --token-dictionary and --gene-median-dictionary (a saved "
            "--tokenizer or model carries its own)"
        )
    sources = tokenize_sources(args)
    if args.tokenizer:
        tokenizer = GeneTokenizer.load(args.tokenizer)
        say(args, f"tokenizer: {args.tokenizer} ({tokenizer.vocab_size} tokens)")
    elif args.token_dictionary:
        tokenizer = GeneTokenizer.from_geneformer(
            args.token_dictionary, args.gene_median_dictionary, args.gene_name_dictionary
        )
        say(args, f"tokenizer: Geneformer dictionaries ({tokenizer.vocab_size} tokens)")
    else:
        say(args, f"fitting a gene vocabulary and medians on {len(args.inputs)} input(s) ...")
        tokenizer = GeneTokenizer.fit(
            sources,
            gene_id_kind="custom" if args.custom_genes else "ensembl",
            organism=args.organism,
            gene_column=args.gene_column,
            counts_layer=args.counts_layer,
            progress=not args.quiet,
        )
        say(args, f"tokenizer: fitted, {tokenizer.vocab_size} tokens")
    corpus = write_corpus(
        sources,
        tokenizer,
        args.out,
        obs_columns=args.obs_columns,
        shard_size=args.shard_size,
        gene_column=args.gene_column,
        counts_layer=args.counts_layer,
        max_length=args.max_length,
        overwrite=args.overwrite,
        progress=not args.quiet,
        keep_free=int(args.keep_free * 1e9),
    )
    for report in corpus.reports:
        say(args, report.summary())
    lengths = corpus.lengths
    say(
        args,
        f"wrote {len(corpus)} cells, {int(lengths.sum())} tokens "
        f"(median {int(_median(lengths))} per cell) to {args.out}",
    )
    return 0


def tokenize_sources(args: argparse.Namespace) -> list:
    """The inputs of ``langcell tokenize``: h5ad paths as they are, SOMA experiments as SomaSource."""
    from ..data.soma import SomaSource, is_soma_uri

    soma = {"obs_filter": args.obs_filter, "measurement": args.measurement, "x_layer": args.x_layer}
    given = {name: value for name, value in soma.items() if value is not None}
    if args.keep_free < 0:
        raise LangCellError(f"--keep-free must be a number of GB >= 0, got {args.keep_free}")
    sources = []
    for text in args.inputs:
        if is_soma_uri(text):
            sources.append(SomaSource(text, **given))
        elif not os.path.exists(text):
            raise LangCellError(
                f"input {text!r} does not exist (neither an h5ad file nor a SOMA experiment directory); check "
                "the path, or give a remote experiment as a URI (s3://...)"
            )
        else:
            sources.append(text)
    if given and not any(isinstance(s, SomaSource) for s in sources):
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise LangCellError(f"{flags} apply to SOMA experiments, and no input is one; drop {flags} or pass one")
    return sources


def _median(values) -> float:
    import numpy as np

    return float(np.median(values)) if len(values) else 0.0


def add_import_official(sub: argparse._SubParsersAction) -> None:
    """Register ``langcell import-official`` and its options."""
    p = sub.add_parser(
        "import-official",
        help="convert the released LangCell checkpoint (five modules) into a langcell model directory",
    )
    p.add_argument("ckpt", metavar="CKPT_DIR", help="released checkpoint: cell_bert/, text_bert/, *_proj.bin, ctm_head.bin")
    p.add_argument("out", metavar="OUT_DIR", help="model directory to create")
    p.add_argument("--text-tokenizer", required=True, metavar="DIR", help="the released text tokenizer directory")
    p.add_argument("--token-dictionary", required=True, metavar="PKL", help="Geneformer token_dictionary.pkl")
    p.add_argument("--gene-median-dictionary", required=True, metavar="PKL", help="gene_median_dictionary.pkl")
    p.add_argument(
        "--gene-name-dictionary",
        metavar="PKL",
        help="Geneformer gene_name_id_dict.pkl, stored with the model: gene symbols are then mapped as the release "
        "maps them (GENCODE only for symbols it lacks). Recommended: without it some genes map differently",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=run_import_official)


def run_import_official(args: argparse.Namespace) -> int:
    """Run ``langcell import-official`` with the parsed arguments; return the exit status."""
    from ..convert import import_official

    model = import_official(
        args.ckpt,
        args.out,
        text_tokenizer_dir=args.text_tokenizer,
        token_dictionary=args.token_dictionary,
        gene_median_dictionary=args.gene_median_dictionary,
        gene_name_dictionary=args.gene_name_dictionary,
        overwrite=args.overwrite,
    )
    n_params = sum(p.numel() for p in model.parameters())
    say(args, f"imported {n_params / 1e6:.1f}M parameters into {args.out}")
    names = model.gene_tokenizer.name_dictionary
    if names is not None:
        say(args, f"gene symbols will be mapped through the stored name dictionary ({len(names):,} names) first")
    else:
        say(args, "no --gene-name-dictionary: gene symbols will be mapped by GENCODE alone, which differs from "
                  "the release for some genes; pass gene_name_id_dict.pkl to map them as the release does")
    return 0


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    """Register ``langcell pretrain`` and its options."""
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
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to TensorBoard in OUT/tensorboard (needs: pip install 'langcell[tensorboard]')")
    p.add_argument("--eval-every", type=int, metavar="N",
                   help="zero-shot accuracy/macro-F1 of held-out cells every N steps, in the log (0: off)")
    p.add_argument("--eval-cells", type=int, metavar="N", help="labelled cells held out for that evaluation")
    p.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    """Run ``langcell pretrain`` with the parsed arguments; return the exit status."""
    from ..train import load_recipe, pretrain

    config = load_recipe(args.config)
    overrides = {
        "stage": args.stage,
        "seed": args.seed,
        "device": args.device,
        "precision": args.precision,
        "num_workers": args.num_workers,
        "eval_every": args.eval_every,
        "eval_cells": args.eval_cells,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    if args.max_steps is not None:
        config.cell_steps = config.joint_steps = args.max_steps
    if args.deterministic:
        config.deterministic = True
    if args.tensorboard:
        config.tensorboard = True
    config.validate()
    pretrain(args.corpus, args.out, config, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        say(args, f"model written to {os.path.join(args.out, 'model')}")
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    """Register ``langcell demo`` and its options."""
    p = sub.add_parser("demo", help="run the whole pipeline on scanpy's bundled PBMC cells")
    p.add_argument("--out", default="langcell_demo", metavar="DIR", help="output directory (default ./langcell_demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same numbers)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in DIR (never another folder)")
    p.add_argument("--keep-intermediate", action="store_true",
                   help="keep the training checkpoints (with optimiser state) and the token corpus")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Run ``langcell demo`` with the parsed arguments; return the exit status."""
    from ..demo import run_demo

    run_demo(args.out, seed=args.seed, quiet=args.quiet, overwrite=args.overwrite,
             keep_intermediate=args.keep_intermediate)
    return 0

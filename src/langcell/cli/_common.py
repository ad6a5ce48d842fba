"""What every ``langcell`` command shares: reading the input, checking output paths, loading the model,
the common options, and printing."""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Iterator

from ..errors import LangCellError


def say(args: argparse.Namespace, *parts: object) -> None:
    """Print a line of the command's output, unless ``--quiet``."""
    if not getattr(args, "quiet", False):
        print(*parts, flush=True)


def read_input(path: str, *, backed: bool = False):
    """The command's IN.h5ad (``backed``: read lazily from disk), with one clear error for a bad file."""
    from ..data.datasets import load

    return load(path, backed=backed)


def read_cells(path: str, *, backed: bool = False):
    """The cells of IN: an h5ad file (``backed``: read lazily), or a corpus directory from ``langcell
    tokenize``; returns ``(adata, corpus)``, where for a corpus ``adata`` holds only its obs and for a
    file ``corpus`` is ``None``."""
    from pathlib import Path

    if Path(path).is_dir():
        import anndata

        from ..data.corpus import TokenCorpus

        corpus = TokenCorpus(path)
        return anndata.AnnData(obs=corpus.obs), corpus
    return read_input(path, backed=backed), None


@contextlib.contextmanager
def torchrun_processes(args: argparse.Namespace, n_cells: int) -> Iterator:
    """Under ``torchrun --nproc_per_node N``: join the process group, check that every process gets a
    cell, and yield its context (leaving the group afterwards); as one process: yield ``None``.

    With ``--device auto`` or ``cuda`` each process takes the GPU of its local rank.
    """
    from .. import _distributed

    if not _distributed.launched_by_torchrun():
        yield None
        return
    device = None if args.device in (None, "auto") else args.device.split(":")[0]
    ctx = _distributed.setup(device)
    try:
        _distributed.cell_share(n_cells, ctx)  # more processes than cells: the same error on every rank
        args.device = str(ctx.device)
        if not ctx.is_main:  # one process prints and writes
            args.quiet = True
        yield ctx
    finally:
        _distributed.teardown()


def check_outputs(args: argparse.Namespace, *files: str | None, directories: tuple[str | None, ...] = ()) -> None:
    """Refuse, before any work, output paths (``None`` = not requested) whose folder does not exist, that
    are, contain or lie inside an input of the command (its IN.h5ad, --model, --corpus), or, for the
    ``files``, that name an existing directory."""
    from pathlib import Path

    from .._atomic import check_apart_from_inputs, check_free_space, check_output_parent

    inputs = [getattr(args, name, None) for name in ("input", "inputs", "model", "corpus")]
    inputs = [path for value in inputs if value for path in (value if isinstance(value, list) else [value])]
    for path in (*files, *directories):
        if path:
            check_output_parent(path)
            check_apart_from_inputs(path, inputs)
    for path in files:
        if path and Path(path).is_dir():
            raise LangCellError(f"{path!r} is a directory; pass the path of a file to write")
    h5ad_out = [path for path in files if path and str(path).endswith(".h5ad")]
    source = getattr(args, "input", None)
    if h5ad_out and isinstance(source, str) and Path(source).is_file():
        # An annotated copy of the input is at least as large as the input: refuse a disk that cannot
        # take it now, not after the work.
        for path in h5ad_out:
            check_free_space(path, Path(source).stat().st_size)


def write_h5ad(adata, path: str) -> None:
    """Write ``adata`` to ``path`` atomically: the old file, if any, stays until the new one is complete;
    a disk too small for it is refused before writing, a disk that fills is one clear error."""
    from .._atomic import atomic_file

    with atomic_file(path, needed_bytes=h5ad_bytes(adata)) as tmp:
        adata.write_h5ad(tmp)


def h5ad_bytes(adata) -> int:
    """About how many bytes ``adata`` takes in an h5ad (its in-memory arrays and tables; a lower bound,
    as HDF5 adds little on top of uncompressed arrays)."""
    import numpy as np
    import pandas as pd

    def size(value) -> int:
        if isinstance(value, np.ndarray):
            return value.nbytes
        if isinstance(value, pd.DataFrame):
            return int(value.memory_usage(deep=True).sum())
        parts = [getattr(value, name, None) for name in ("data", "indices", "indptr")]
        return sum(part.nbytes for part in parts if isinstance(part, np.ndarray))

    arrays = [adata.obs, adata.var] + ([] if adata.isbacked else [adata.X])
    for mapping in (adata.layers, adata.obsm, adata.varm, adata.obsp):
        arrays += list(mapping.values())
    if adata.raw is not None and not adata.isbacked:
        arrays.append(adata.raw.X)
    return sum(size(value) for value in arrays)


def load_model(path: str, device: str | None = None):
    """The model in ``path``, on ``device`` ("auto" or None: CUDA when available, else CPU)."""
    import torch

    from ..models.langcell import LangCell

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise LangCellError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LangCellError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return LangCell.from_pretrained(path, map_location=device)


def add_compute_options(p: argparse.ArgumentParser, *, precision: bool = True) -> None:
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="cpu, cuda, cuda:N, or auto (default: CUDA when available)")
    if precision:
        p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "int8"], default="fp32",
                       help="precision of the model passes (default fp32; bf16 is faster on GPUs and on CPUs with "
                            "AMX or AVX512-BF16; fp16 needs CUDA; int8: CPU only, int8 linear layers)")


def add_input(p: argparse.ArgumentParser, *, labelled: bool = False, model: bool = True,
               label_help: str | None = None, corpus: bool = False) -> None:
    """The positional IN.h5ad (``corpus``: or a corpus directory), --model, and (with ``label_help``) a
    required --label-key."""
    if corpus:
        p.add_argument("input", metavar="IN", help="h5ad file of cells with raw counts, or a corpus directory "
                       "from `langcell tokenize` (tokenized with the model's vocabulary)")
    else:
        p.add_argument("input", metavar="IN.h5ad", help=("labelled " if labelled else "") + "cells with raw counts")
    if model:
        p.add_argument("--model", required=True, metavar="DIR", help="a langcell model directory")
    if label_help is not None:
        p.add_argument("--label-key", required=True, metavar="COL", help=label_help)


def add_mapping(p: argparse.ArgumentParser) -> None:
    """--mapping: a label -> term id table for labels the resolver cannot place."""
    p.add_argument("--mapping", metavar="FILE", help="JSON/TSV {label: term id} for labels that do not resolve")


def add_counts_options(p: argparse.ArgumentParser) -> None:
    """--counts-layer and --gene-column: where the raw counts and the gene names are."""
    p.add_argument("--counts-layer", metavar="LAYER", help="layer with raw counts, or 'raw' for .raw (default: X)")
    p.add_argument("--gene-column", metavar="COL", help="var column holding gene IDs/symbols (default: var names)")


def read_descriptions(path: str) -> dict[str, str]:
    """``--descriptions``: a JSON object (or two-column TSV) ``{class name: description}``."""
    from ..ontology.resolve import read_label_table

    return read_label_table(path, "descriptions")


def split_names(text: str | None, option: str) -> list[str] | None:
    """``'a;b'`` -> ``['a', 'b']``; None stays None; an option holding no name is refused."""
    if text is None:
        return None
    names = [part.strip() for part in text.split(";") if part.strip()]
    if not names:
        raise LangCellError(f"{option} holds no name; pass names separated by ';'")
    return names


#: Library errors name Python keyword arguments; on the command line they are these flags. Longest first.
_FLAGS_FOR_KEYWORDS = (
    ("e.g. counts_layer='counts' or use_raw (counts_layer='raw')", "e.g. --counts-layer counts, or --counts-layer raw for .raw"),
    ("overwrite=True (--overwrite on the command line)", "--overwrite"),
    ("counts_layer=<the layer of raw counts> (or 'raw')", "--counts-layer LAYER (or raw)"),
    ("counts_layer='<layer>'", "--counts-layer LAYER"),
    ("counts_layer='raw'", "--counts-layer raw"),
    ("counts_layer=None", "no --counts-layer"),
    ("gene_column=None", "no --gene-column"),
    ("gene_column=<", "--gene-column <"),
    ("gene_id_kind='custom'", "--custom-genes"),
    ("organism='human' or 'mouse'", "--organism human or mouse"),
    ("label_key=<", "--label-key <"),
    ("measurement=<", "--measurement <"),
    ("classes_from=<", "--classes-from <"),
    ("precision='fp32'", "--precision fp32"),
    ("precision='fp16'", "--precision fp16"),
)
#: Bare argument names that are flags of the same name on the command line.
_FLAG_WORDS = re.compile(
    r"(?<![\w-])(counts_layer|gene_column|label_key|key_added|max_length|batch_key|classes_from|obs_filter|"
    r"x_layer|groupby|lca_margin|smoothing)\b"
)


def cli_wording(message: str) -> str:
    """A library error message with the Python keyword arguments it names replaced by the CLI's flags."""
    for keyword, flag in _FLAGS_FOR_KEYWORDS:
        message = message.replace(keyword, flag)
    return _FLAG_WORDS.sub(lambda match: "--" + match.group(1).replace("_", "-"), message)

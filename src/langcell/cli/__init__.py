"""The ``langcell`` command line: a thin layer over the Python API.

Every subcommand parses its arguments, calls one public function and prints what it returns. A
:class:`~langcell.errors.LangCellError` (a problem the user can fix) is printed on one line, without a
traceback, and the command exits with status 2.

The commands live in :mod:`.build` (tokenize, import-official, pretrain, demo), :mod:`.annotation`
(annotate, explain, embed, finetune, predict, retrieve) and :mod:`.evaluation` (fewshot, evaluate); what they
share is in :mod:`._common`. Each command imports the library inside its ``run_*`` function, so that
``langcell --help`` and argument errors answer without loading torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from ..errors import LangCellError
from . import annotation, build, evaluation
from ._common import cli_wording

# Commands never reach the network: the text tower and tokenizer come from installed packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EXIT_USER_ERROR = 2


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    build.add_demo,
    build.add_tokenize,
    build.add_import_official,
    build.add_pretrain,
    annotation.add_annotate,
    annotation.add_explain,
    annotation.add_embed,
    annotation.add_finetune,
    evaluation.add_fewshot,
    annotation.add_predict,
    annotation.add_retrieve,
    evaluation.add_evaluate,
]


def build_parser() -> argparse.ArgumentParser:
    """Return the ``langcell`` argument parser with every subcommand registered."""
    from .._version import __version__

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
        print(f"langcell {args.command}: error: {cli_wording(str(err))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"langcell {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``langcell`` command line: a thin layer over the Python API.

Every subcommand parses its arguments, calls one public function and prints what it returns. A
:class:`~langcell.errors.LangCellError` (a problem the user can fix) is printed on one line, without a
traceback, and the command exits with status 2. SIGINT and SIGTERM stop a command cleanly: the
temporary files of the outputs being written are removed, one line says which outputs were left
unwritten, and the exit status is 128 + the signal's number (130, 143).

The commands live in :mod:`.build` (tokenize, import-official, pretrain, demo), :mod:`.annotation`
(annotate, explain, embed, finetune, predict, retrieve) and :mod:`.evaluation` (fewshot, evaluate); what they
share is in :mod:`._common`. Each command imports the library inside its ``run_*`` function, so that
``langcell --help`` and argument errors answer without loading torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from ..errors import LangCellError
from . import annotation, build, evaluation
from ._common import cli_wording

# Commands never reach the network: the text tower and tokenizer come from installed packages, and
# every load puts Hugging Face offline for its own duration only (langcell.models.serialization.hub_offline),
# so that `main` called from Python leaves the caller's environment as it was.

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
    from .._atomic import interrupts_remove_temporaries, raise_if_interrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    # Only the command line takes over SIGINT/SIGTERM (and gives the previous handlers back): the
    # Python API removes its temporaries on KeyboardInterrupt through try/finally alone.
    with interrupts_remove_temporaries():
        try:
            remove_stale_outputs(args)
            status = int(args.func(args) or 0)
            raise_if_interrupted()  # a signal whose exception a destructor swallowed is not a success
            return status
        except LangCellError as err:
            print(f"langcell {args.command}: error: {cli_wording(str(err))}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt as err:
            return _interrupted(args.command, getattr(err, "signum", signal.SIGINT))


def remove_stale_outputs(args: argparse.Namespace) -> None:
    """Before any work, remove the temporaries that dead langcell processes left beside this command's
    outputs (and inside an output directory: a run's ``model/``, a demo's files)."""
    from pathlib import Path

    from .._atomic import remove_stale_temporaries

    for name in ("out", "write", "report", "plot"):
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            path = Path(value)
            remove_stale_temporaries(path.parent if str(path.parent) else ".")
            if path.is_dir():
                remove_stale_temporaries(path)
                remove_stale_temporaries(path / "checkpoints")


def _interrupted(command: str, signum: int) -> int:
    """Remove what an interrupted command was writing; print one line; return 128 + the signal."""
    from .._atomic import remove_live_temporaries

    removed = remove_live_temporaries()
    name = signal.Signals(signum).name
    if removed:
        outputs = ", ".join(repr(str(path)) for path in removed)
        print(f"langcell {command}: interrupted by {name}; removed the partial output {outputs} (the previous "
              "content, if any, is unchanged)", file=sys.stderr)
    elif int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line for the job, not one per process
        print(f"langcell {command}: interrupted by {name}; no output was being written", file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

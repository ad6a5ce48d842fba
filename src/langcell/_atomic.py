"""Atomic writes: a file or directory appears under its final name only once it is complete.

Everything langcell writes for a user (h5ad files, corpus shards, checkpoints, reports) goes through
these helpers, so a process killed at any point leaves either the old result or the new one, never a
half-written one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import LangCellError


def _default_mode(directory: bool) -> int:
    """The mode a plain ``open``/``mkdir`` would give under the current umask (mkstemp/mkdtemp use 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def check_output_parent(path: str | os.PathLike) -> Path:
    """Return ``path`` as a :class:`~pathlib.Path` after checking that its parent can take it.

    Raises
    ------
    LangCellError
        If the parent directory does not exist or is not writable.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LangCellError(
            f"cannot write {str(path)!r}: the directory {str(parent)!r} does not exist; create it first or "
            "choose another output path"
        )
    if not os.access(parent, os.W_OK):
        raise LangCellError(
            f"cannot write {str(path)!r}: the directory {str(parent)!r} is not writable; choose a directory "
            "you can write to"
        )
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = check_output_parent(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, _default_mode(directory=False))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; move it to ``path`` when the block succeeds.

    Parameters
    ----------
    path
        The final directory.
    overwrite
        Replace an existing directory at ``path``. Without it an existing non-empty directory is an
        error (so a user never loses a result by accident).
    """
    path = check_output_parent(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise LangCellError(
            f"{str(path)!r} already exists and is not empty; remove it, choose another path, or pass "
            "overwrite=True (--overwrite on the command line)"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _default_mode(directory=True))
        if path.exists():
            # Move the old result aside first so that the swap is two renames, never a partial tree.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

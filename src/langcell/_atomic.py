"""Atomic writes: a file or directory appears under its final name only once it is complete.

Everything langcell writes for a user (h5ad files, corpus shards, checkpoints, reports) goes through
these helpers, so a process killed at any point leaves either the old result or the new one, never a
half-written one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

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


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the system or file system cannot do it, so that the caller falls back to two
    renames.
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library without renameat2
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Put the finished directory ``tmp`` at ``path``, which exists; the old content is deleted.

    At every instant ``path`` holds either the old content or the new one: with an atomic exchange
    where the system has one, else by moving the old one aside and moving it back if the second
    rename does not happen.
    """
    if _exchange(tmp, path):
        # tmp now holds the previous result.
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink()
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.replace(path, old / "previous")
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old / "previous", path)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    ours: Callable[[Path], bool] | None = None,
    what: str = "result",
) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; move it to ``path`` when the block succeeds.

    Parameters
    ----------
    path
        The final directory.
    overwrite
        Replace an existing directory at ``path``. Without it an existing non-empty directory is an
        error (so a user never loses a result by accident).
    ours
        Recognises a directory this kind of writer made (by its own files). With it, ``overwrite``
        replaces only such a directory, never a folder of other files.
    what
        The name of what is written (``"model"``, ``"corpus"``), for error messages.
    """
    path = check_output_parent(path)
    occupied = path.exists() and (not path.is_dir() or any(path.iterdir()))
    if occupied and not overwrite:
        raise LangCellError(
            f"{str(path)!r} already exists and is not empty; remove it, choose another path, or pass "
            "overwrite=True (--overwrite on the command line)"
        )
    if occupied and ours is not None and not (path.is_dir() and ours(path)):
        raise LangCellError(
            f"{str(path)!r} is not a {what} langcell wrote, so overwrite will not replace it (it would delete "
            "files langcell did not make); remove it yourself or choose another path"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _default_mode(directory=True))
        if path.exists():
            _swap_into_place(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_apart_from_inputs(output: str | os.PathLike, inputs: Iterable[Any], *, option: str = "output") -> None:
    """Refuse an ``output`` path that is, contains or lies inside one of the ``inputs`` (paths; other
    objects, such as in-memory AnnData, are skipped): writing it would replace or delete the input."""
    target = Path(output).resolve()
    for source in inputs:
        if not isinstance(source, str | os.PathLike):
            continue
        source_path = Path(source).resolve()
        if target == source_path:
            relation = "is"
        elif source_path.is_relative_to(target):
            relation = "contains"
        elif target.is_relative_to(source_path):
            relation = "lies inside"
        else:
            continue
        raise LangCellError(
            f"the {option} {str(output)!r} {relation} the input {str(source)!r}: writing it would replace or "
            "delete the input; choose an output path apart from the inputs"
        )


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (numpy arrays and scalars become lists and numbers)."""
    import json

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)

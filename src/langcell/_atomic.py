"""Atomic writes: a file or directory appears under its final name only once it is complete.

Everything langcell writes for a user (h5ad files, corpus shards, checkpoints, reports) goes through
these helpers, so a process killed at any point leaves either the old result or the new one, never a
half-written one.

What is left over is handled here too:

- every temporary this process is writing is registered while it exists, so that an interruption
  (SIGINT/SIGTERM, see :func:`interrupts_remove_temporaries`, which only the command line installs)
  removes them and can say which outputs were left unwritten;
- an exception in the block (KeyboardInterrupt included) removes the block's temporary, for the Python
  API as for the command line;
- a temporary's name records the host and the process that writes it, ``.NAME.HHHHHH-PID.XXXXXXXX.tmp``,
  so that one left by a process that no longer runs (killed with SIGKILL, a power cut) is recognised and
  removed at the next write into the same folder (:func:`remove_stale_temporaries`);
- a full disk (ENOSPC/EDQUOT, also when h5py wraps it) becomes one :class:`~langcell.errors.LangCellError`
  naming the output, after the partial output is removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import zlib
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


# ------------------------------------------------------------------------------ temporaries we write
def _host_tag() -> str:
    """A short tag of this host and process-id namespace: a process id in a temporary's name can be
    checked only from the same host and namespace (containers sharing a host name and a volume differ
    in their namespace)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: the host name alone
        namespace = ""
    return format(zlib.crc32(f"{socket.gethostname()}|{namespace}".encode()) & 0xFFFFFF, "06x")


#: The tag of this host (and pid namespace) in temporary names.
_HOST = _host_tag()
#: ``.NAME.HHHHHH-PID.XXXXXXXX.tmp`` (or ``.old``, a replaced result being deleted): a temporary of ours.
_OURS = re.compile(r"\.(?P<name>.+)\.(?P<host>[0-9a-f]{6})-(?P<pid>[0-9]+)\.[a-z0-9_]{8}\.(?:tmp|old)")
#: A temporary of another host is stale once nothing in it changed for this long: its process cannot
#: be asked, and no langcell write leaves a temporary untouched for a day.
STALE_AFTER_S = 24 * 3600

#: Temporaries this process is writing now: temporary -> (the output it becomes, whether it holds a
#: partial output rather than a replaced old one being deleted).
_LIVE: dict[Path, tuple[Path, bool]] = {}
#: Outputs whose partial temporary was removed because a KeyboardInterrupt (or :class:`Interrupted`)
#: stopped their write; the command line reports them.
_INTERRUPTED_WRITES: list[tuple[Path, Path]] = []

log = logging.getLogger("langcell")


def _temporary(path: Path, *, directory: bool, suffix: str = ".tmp", partial: bool = True) -> Path:
    """Create and register a temporary file or directory beside ``path``, named as ours."""
    raise_if_interrupted()
    remove_stale_temporaries(path.parent)
    prefix = f".{path.name}.{_HOST}-{os.getpid()}."
    with _signals_deferred():  # registered the moment it exists, so an interruption cannot miss it
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
            os.close(fd)
            tmp = Path(name)
        _LIVE[tmp] = (path, partial)
    return tmp


def _remove(tmp: Path) -> bool:
    """Delete a temporary and unregister it once it is gone; return whether there was something."""
    existed = os.path.lexists(tmp)
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    if not os.path.lexists(tmp):
        _LIVE.pop(tmp, None)
    return existed


def _discard(tmp: Path, error: BaseException) -> None:
    """The block failed: remove its temporary; remember an interrupted output for the command line."""
    output, partial = _LIVE.get(tmp, (None, False))
    interrupted = isinstance(error, KeyboardInterrupt) and _signal_state.installed
    with _signals_held():
        removed = _remove(tmp)
    if removed and partial and output is not None and interrupted:
        _INTERRUPTED_WRITES.append((output, tmp))


def remove_live_temporaries() -> list[Path]:
    """Remove every temporary this process still has, and return the outputs left unwritten by an
    interruption (those removed here and those the interrupted blocks removed), outermost only."""
    with _signals_held():
        for tmp, (output, partial) in list(_LIVE.items()):
            if _remove(tmp) and partial:
                _INTERRUPTED_WRITES.append((output, tmp))
    found = list(_INTERRUPTED_WRITES)
    _INTERRUPTED_WRITES.clear()
    # A file written inside a temporary directory (a corpus's tokenizer file) is part of that output.
    temporaries = [tmp for _, tmp in found]
    outputs = [out for out, _ in found if not any(out.is_relative_to(tmp) for tmp in temporaries)]
    return list(dict.fromkeys(outputs))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a pid of this system
        return True
    return True


def _untouched_for(path: Path) -> float:
    """Seconds since anything in ``path`` (a file, or a directory tree) last changed."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return time.time() - newest


def is_stale_temporary(path: Path) -> bool:
    """Whether ``path`` is a temporary of ours that no process will finish: written on this host (and
    process-id namespace) by a process that no longer runs, or elsewhere and untouched for
    :data:`STALE_AFTER_S`. The tag is 24 bits, so two hosts may share one: then a temporary of a live
    process elsewhere whose id is unused here could be taken for stale; the odds are 1 in 16.7 million per
    pair of hosts writing into the same folder."""
    match = _OURS.fullmatch(path.name)
    if match is None or path in _LIVE:
        return False
    try:
        if match["host"] == _HOST:
            return int(match["pid"]) != os.getpid() and not _pid_alive(int(match["pid"]))
        return _untouched_for(path) > STALE_AFTER_S
    except OSError:  # removed meanwhile
        return False


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the stale temporaries of ours (:func:`is_stale_temporary`) in ``directory``; say so in one
    log line; return what was removed. Anything not named as ours is never touched."""
    directory = Path(directory)
    try:
        candidates = [entry for entry in directory.iterdir() if entry.name.startswith(".")]
    except OSError:  # missing or unreadable: nothing of ours to clean there
        return []
    removed = []
    for entry in candidates:
        if is_stale_temporary(entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            if not os.path.lexists(entry):
                removed.append(entry)
    if removed:
        names = ", ".join(entry.name for entry in removed)
        log.warning(f"langcell: removed {len(removed)} temporary file(s) left in {str(directory)!r} by an "
                    f"interrupted langcell process that no longer runs: {names}")
    return removed


# ------------------------------------------------------------------------------------ interruptions
class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while :func:`interrupts_remove_temporaries` was active.

    A :class:`KeyboardInterrupt`, so that every ``try``/``finally`` and ``except BaseException`` on the
    way out runs (and removes its temporary), and ``except Exception`` does not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        """``"SIGINT"`` or ``"SIGTERM"``."""
        return signal.Signals(self.signum).name


class _SignalState(threading.local):
    installed = False  # inside interrupts_remove_temporaries
    deferring = 0  # depth of _signals_deferred blocks: a signal there is raised at the block's end
    holding = 0  # depth of clean-ups after an interruption: a signal there is noted, not raised
    pending: int | None = None
    # The signal received, kept: Python may run the handler inside a destructor or a weakref callback,
    # where the exception it raises is swallowed, so it is raised again at the next commit point.
    signalled: int | None = None


_signal_state = _SignalState()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold an interruption until the block ends (a temporary and its registration, a rename and its
    unregistration happen together). Only acts while :func:`interrupts_remove_temporaries` is active."""
    state = _signal_state
    state.deferring += 1
    try:
        yield
    finally:
        state.deferring -= 1
    if state.deferring == 0 and state.pending is not None:
        signum, state.pending = state.pending, None
        raise Interrupted(signum)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """A clean-up that a second Ctrl-C must not cut short: signals in the block are noted only."""
    _signal_state.holding += 1
    try:
        yield
    finally:
        _signal_state.holding -= 1


def _on_signal(signum: int, frame: Any) -> None:
    state = _signal_state
    state.signalled = signum
    if state.holding:
        return
    if state.deferring:
        state.pending = signum
        return
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    """A commit point: raise :class:`Interrupted` if a signal arrived whose exception was swallowed on
    the way (by a destructor, a callback, an ``except BaseException`` of another library)."""
    state = _signal_state
    if state.installed and state.signalled is not None and not state.deferring and not state.holding:
        raise Interrupted(state.signalled)


def _ignore_swallowed_interruptions(previous_hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable hook that stays silent about an :class:`Interrupted` that Python could not raise
    (it is raised again at the next commit point) and passes everything else on."""

    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, Interrupted):
            previous_hook(unraisable)

    return hook


@contextlib.contextmanager
def interrupts_remove_temporaries(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Turn ``signals`` into :class:`Interrupted` inside the block; restore the previous handlers after.

    For a program's entry point (the command line): a library call must not take over a process's
    signals. The caller catches :class:`Interrupted`, calls :func:`remove_live_temporaries`, and checks
    :func:`raise_if_interrupted` before reporting success. Outside the main thread (where Python cannot
    set handlers) the block runs without them.
    """
    import sys

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in signals}
    previous_hook = sys.unraisablehook
    state = _signal_state
    state.pending, state.signalled, state.installed = None, None, True
    sys.unraisablehook = _ignore_swallowed_interruptions(previous_hook)
    for signum in signals:
        signal.signal(signum, _on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook = previous_hook
        state.pending, state.signalled, state.installed = None, None, False


# ------------------------------------------------------------------------------------- a full disk
_ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)")  # how HDF5 reports a failed write through h5py
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, is a full disk or quota (by errno, or the errno
    that HDF5 writes into the message of the OSError that h5py raises)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            if error.errno in _DISK_FULL:
                return True
            match = _ERRNO_IN_MESSAGE.search(str(error))
            if match and int(match.group(1)) in _DISK_FULL:
                return True
        error = error.__cause__ or error.__context__
    return False


def _megabytes(n_bytes: float) -> str:
    """A size for a person: ``3.2 GB``, ``410.0 MB``, ``12.5 kB``, ``100 bytes``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:,.1f} {unit}"
    return f"{int(n_bytes)} bytes"


def _size_of(path: Path) -> int:
    if path.is_dir():
        return sum(os.lstat(os.path.join(root, name)).st_size for root, _, names in os.walk(path) for name in names)
    return path.stat().st_size if path.exists() else 0


def _disk_full_error(path: Path, tmp: Path, needed_bytes: int | None) -> LangCellError:
    written = 0
    with contextlib.suppress(OSError):
        written = _size_of(tmp)
    free = shutil.disk_usage(path.parent if str(path.parent) else ".").free
    need = (f"it needs about {_megabytes(needed_bytes)}; " if needed_bytes else
            f"it needed more than the {_megabytes(written)} written before the disk filled; ")
    return LangCellError(
        f"no space left on the device while writing {str(path)!r}: {need}{_megabytes(free)} free there now; "
        "the partial output was removed; free some space or choose an output on another disk"
    )


def check_free_space(path: str | os.PathLike, needed_bytes: int) -> None:
    """Refuse, before writing, an output of about ``needed_bytes`` that the disk under ``path`` cannot take."""
    path = Path(path)
    free = shutil.disk_usage(path.parent if str(path.parent) else ".").free
    if needed_bytes > free:
        raise LangCellError(
            f"not enough space to write {str(path)!r}: it needs about {_megabytes(needed_bytes)} and "
            f"{_megabytes(free)} are free there; free some space or choose an output on another disk"
        )


# ------------------------------------------------------------------------------------ atomic writes
@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    On an exception (KeyboardInterrupt included) the temporary file is removed and ``path`` is left as
    it was; a full disk becomes a :class:`~langcell.errors.LangCellError` naming ``path``.

    Parameters
    ----------
    path
        The final file.
    needed_bytes
        The expected size, where known: refused before writing when the disk has less free space, and
        named in the error if the disk fills all the same.
    """
    path = check_output_parent(path)
    if needed_bytes:
        check_free_space(path, needed_bytes)
    tmp = _temporary(path, directory=False)
    try:
        yield tmp
        raise_if_interrupted()
        if tmp.exists():
            os.chmod(tmp, _default_mode(directory=False))
        with _signals_deferred():
            os.replace(tmp, path)
            _LIVE.pop(tmp, None)
    except BaseException as error:
        full = is_disk_full(error) and _disk_full_error(path, tmp, needed_bytes)
        _discard(tmp, error)
        if full:
            raise full from None
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
    rename does not happen. Interruptions wait until both sides are consistent; the old content, once
    replaced, is registered as a temporary to delete (not a partial output).
    """
    with _signals_deferred():
        exchanged = _exchange(tmp, path)
        if exchanged:
            _LIVE[tmp] = (path, False)  # tmp now holds the previous result
    if exchanged:
        _remove(tmp)
        return
    old = _temporary(path, directory=True, suffix=".old", partial=False)
    with _signals_deferred():
        os.replace(path, old / "previous")
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old / "previous", path)
            _remove(old)
            raise
        _LIVE.pop(tmp, None)
    _remove(old)


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    ours: Callable[[Path], bool] | None = None,
    what: str = "result",
) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; move it to ``path`` when the block succeeds.

    On an exception (KeyboardInterrupt included) the temporary directory is removed and ``path`` is left
    as it was; a full disk becomes a :class:`~langcell.errors.LangCellError` naming ``path``.

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
    tmp = _temporary(path, directory=True)
    try:
        yield tmp
        raise_if_interrupted()
        os.chmod(tmp, _default_mode(directory=True))
        # Libraries that write through their own temporaries (safetensors) leave files 0600: give every
        # file the mode a plain open() would have, so that a shared model or corpus is readable as usual.
        for root, _, files in os.walk(tmp):
            for name in files:
                os.chmod(os.path.join(root, name), _default_mode(directory=False))
        if path.exists():
            _swap_into_place(tmp, path)
        else:
            with _signals_deferred():
                os.replace(tmp, path)
                _LIVE.pop(tmp, None)
    except BaseException as error:
        full = is_disk_full(error) and _disk_full_error(path, tmp, None)
        _discard(tmp, error)
        if full:
            raise full from None
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

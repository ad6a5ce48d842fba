"""Interrupted commands: SIGINT/SIGTERM remove what was being written, say so in one line, exit 128 + signal.

Each test runs a real ``python -m langcell`` process on a small input and signals it while it writes. The
moment is made deterministic without any hook in langcell: the test polls for the command's temporary
(langcell names them ``.OUT.HHHHHH-PID.XXXXXXXX.tmp`` beside the output), freezes the process with SIGSTOP the
moment one appears, checks that the write is still under way, then sends the signal and SIGCONT. The
outputs are written in many pieces (layers of an h5ad, shards of a corpus), so the process is still
writing when Python runs the handler.

Stale temporaries (left by a process killed with SIGKILL) are removed at the next write; a process that
still runs keeps its own. Under torchrun, a SIGTERM to the launcher stops every rank without deadlock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from langcell import _atomic
from langcell.data.tokenizer import GeneTokenizer
from langcell.models import LangCell
from langcell.models.config import LangCellConfig

SHARED = Path(__file__).resolve().parents[3] / "shared"
CBMC = SHARED / "data" / "cbmc_citeseq_500genes.h5ad"
needs_cbmc = pytest.mark.skipif(not CBMC.is_file(), reason=f"{CBMC} is missing")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def langcell(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "langcell", *args, "--quiet"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ours(directory: Path) -> list[Path]:
    """langcell's temporaries in ``directory`` (by their name)."""
    if not directory.is_dir():
        return []
    return [entry for entry in directory.iterdir() if _atomic._OURS.fullmatch(entry.name)]


def wait_until_stopped(process: subprocess.Popen, timeout: float = 10) -> None:
    """Return once the kernel shows ``process`` stopped (SIGSTOP is delivered asynchronously)."""
    if not Path("/proc/self/stat").is_file():  # not Linux: give the signal time to land
        time.sleep(0.05)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{process.pid}/stat").read_text().rpartition(")")[2].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.0005)
    raise AssertionError("the process did not stop")


def signal_while_writing(process: subprocess.Popen, directory: Path, signum: int, timeout: float = 120) -> bool:
    """Send ``signum`` to ``process`` while one of its temporaries exists in ``directory``; True if it
    was caught there (frozen with SIGSTOP, checked, signalled, resumed), False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if ours(directory):
            process.send_signal(signal.SIGSTOP)
            wait_until_stopped(process)
            if ours(directory):  # frozen mid-write
                process.send_signal(signum)
                process.send_signal(signal.SIGCONT)
                return True
            process.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    process.kill()
    raise AssertionError("the command neither wrote a temporary nor ended")


def assert_interrupted(process: subprocess.Popen, signum: int, output: Path) -> str:
    """Exit 128 + signum, one line on stderr naming the removed partial ``output``, no temporary left."""
    _, err = process.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert process.returncode == 128 + signum, f"exit {process.returncode}\n{err}"
    assert len(lines) == 1, err
    name = signal.Signals(signum).name
    assert f"interrupted by {name}" in lines[0] and "removed the partial output" in lines[0], lines[0]
    assert str(output) in lines[0], lines[0]
    assert not ours(output.parent), ours(output.parent)
    return lines[0]


@pytest.fixture(scope="module")
def annotate_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """300 CBMC cells with 20 layers (so the output is written in many pieces) and a tiny model for them."""
    if not CBMC.is_file():
        pytest.skip(f"{CBMC} is missing")
    folder = tmp_path_factory.mktemp("signals")
    cells = ad.read_h5ad(CBMC)[:300].copy()
    rng = np.random.default_rng(0)
    for i in range(20):
        cells.layers[f"noise_{i}"] = rng.random(cells.shape, dtype=np.float32)
    cells.write_h5ad(folder / "cells.h5ad")
    tokenizer = GeneTokenizer.fit(cells, gene_id_kind="custom")
    config = LangCellConfig.preset("tiny")
    config.cell.vocab_size = tokenizer.vocab_size
    config.cell.max_position_embeddings = 512
    torch.manual_seed(0)
    LangCell.from_config(config, gene_tokenizer=tokenizer).save_pretrained(folder / "model")
    return folder / "cells.h5ad", folder / "model"


@needs_cbmc
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_annotate_interrupted_while_writing_removes_its_partial_h5ad(annotate_inputs, tmp_path, signum):
    cells, model = annotate_inputs
    out = tmp_path / "annotated.h5ad"
    out.write_bytes(b"the previous result")
    process = langcell("annotate", str(cells), "--model", str(model), "--out", str(out),
                       "--labels", "B cell;natural killer cell")
    assert signal_while_writing(process, tmp_path, signum), "annotate ended before it wrote its output"
    assert_interrupted(process, signum, out)
    assert out.read_bytes() == b"the previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotated.h5ad"]


@needs_cbmc
@pytest.mark.slow
def test_tokenize_interrupted_while_writing_removes_its_partial_corpus(tmp_path):
    # All 8,617 CBMC cells in shards of 20: hundreds of shard files, so the write takes a while.
    out = tmp_path / "corpus"
    process = langcell("tokenize", str(CBMC), str(out), "--custom-genes", "--shard-size", "20")
    assert signal_while_writing(process, tmp_path, signal.SIGTERM), "tokenize ended before it wrote"
    assert_interrupted(process, signal.SIGTERM, out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_interrupted_python_call_removes_its_temporary_without_touching_signal_handlers(tmp_path):
    """The Python API: a KeyboardInterrupt in a write removes the temporary (try/finally); no handler is
    installed behind the user's back."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with _atomic.atomic_directory(tmp_path / "result") as tmp:
            (tmp / "half.txt").write_text("half")
            assert ours(tmp_path) == [tmp]
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert not _atomic._LIVE


def test_the_command_line_gives_the_previous_signal_handlers_back(tmp_path, capsys):
    from langcell.cli import main

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        code = main(["annotate", str(tmp_path / "missing.h5ad"), "--model", str(tmp_path), "--out",
                     str(tmp_path / "o.h5ad"), "--labels", "B cell", "--quiet"])
        assert code == 2
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_interruption_swallowed_by_a_destructor_is_raised_at_the_next_commit(tmp_path, capsys):
    """Python may run the signal handler inside a destructor or weakref callback, where its exception is
    swallowed (seen on annotate: the command then finished with exit 0); the write must not commit."""

    class Collected:
        def __del__(self):
            _atomic._on_signal(signal.SIGTERM, None)  # the handler, run where Python ignores its exception

    with _atomic.interrupts_remove_temporaries():
        with pytest.raises(_atomic.Interrupted):
            with _atomic.atomic_file(tmp_path / "out.txt") as tmp:
                tmp.write_text("half")
                Collected()  # collected at once: the Interrupted it raises is swallowed
                tmp.write_text("all of it")  # the block goes on ...
        removed = _atomic.remove_live_temporaries()  # ... but the rename onto out.txt never happens
    assert removed == [tmp_path / "out.txt"]
    assert list(tmp_path.iterdir()) == []
    assert "Interrupted" not in capsys.readouterr().err  # no "Exception ignored in ..." noise


# ------------------------------------------------------------------------------------- stale temporaries
def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_of_dead_processes_are_removed_and_nothing_else(tmp_path, caplog):
    host = _atomic._HOST
    dead = dead_pid()
    stale_file = tmp_path / f".out.h5ad.{host}-{dead}.abcd1234.tmp"
    stale_file.write_bytes(b"half an h5ad")
    stale_dir = tmp_path / f".corpus.{host}-{dead}.x_y0z9ab.tmp"
    (stale_dir / "shards").mkdir(parents=True)
    (stale_dir / "shards" / "shard_00000.ids.npy").write_bytes(b"ids")
    live = tmp_path / f".run.{host}-{os.getppid()}.abcdefgh.tmp"  # a process that still runs
    live.mkdir()
    other_host = "000000" if host != "000000" else "ffffff"
    recent_elsewhere = tmp_path / f".model.{other_host}-{dead}.abcdefgh.tmp"
    recent_elsewhere.mkdir()
    old_elsewhere = tmp_path / f".model.{other_host}-{dead}.zzzzzzzz.tmp"
    old_elsewhere.write_text("untouched for two days")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old_elsewhere, (two_days_ago, two_days_ago))
    not_ours = [tmp_path / ".out.h5ad.abcd1234.tmp", tmp_path / ".hidden", tmp_path / "notes.tmp"]
    for path in not_ours:
        path.write_text("someone else's")

    with caplog.at_level("WARNING", logger="langcell"):
        removed = _atomic.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale_file, stale_dir, old_elsewhere])
    assert sorted(tmp_path.iterdir()) == sorted([live, recent_elsewhere, *not_ours])
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and "removed 3 temporary file(s)" in messages[0], messages


def test_a_writing_command_removes_stale_temporaries_first_with_one_line(tmp_path, capsys, caplog):
    from langcell.cli import main

    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / f".o.h5ad.{_atomic._HOST}-{dead_pid()}.abcd1234.tmp"
    stale.write_bytes(b"left by a process killed with SIGKILL")
    with caplog.at_level("WARNING", logger="langcell"):
        code = main(["annotate", str(tmp_path / "missing.h5ad"), "--model", str(tmp_path / "model"), "--out",
                     str(tmp_path / "out" / "o.h5ad"), "--labels", "B cell", "--quiet"])
    assert code == 2 and "missing.h5ad" in capsys.readouterr().err  # refused; the debris is gone all the same
    assert not stale.exists()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and "removed 1 temporary file(s)" in messages[0] and stale.name in messages[0]


def test_a_write_removes_stale_temporaries_beside_it(tmp_path):
    stale = tmp_path / f".cell-0000002.{_atomic._HOST}-{dead_pid()}.abcd1234.tmp"
    (stale / "model").mkdir(parents=True)
    with _atomic.atomic_file(tmp_path / "latest.json") as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json"]


# ---------------------------------------------------------------------------------------------- pretrain
@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """200 labelled CBMC cells, tokenized (128 tokens) with a vocabulary of their genes."""
    from langcell.data.corpus import write_corpus

    if not CBMC.is_file():
        pytest.skip(f"{CBMC} is missing")
    cells = ad.read_h5ad(CBMC)
    cells = cells[cells.obs["cell_type_ontology_term_id"] != "unknown"][:200].copy()
    folder = tmp_path_factory.mktemp("signals_corpus")
    tokenizer = GeneTokenizer.fit(cells, gene_id_kind="custom")
    write_corpus(cells, tokenizer, folder / "corpus", max_length=128, progress=False)
    return folder / "corpus"


@pytest.mark.slow
def test_pretrain_interrupted_while_checkpointing_removes_the_partial_checkpoint(small_corpus, tmp_path):
    run = tmp_path / "run"
    process = langcell("pretrain", "--config", "tiny", "--corpus", str(small_corpus), "--out", str(run))
    assert signal_while_writing(process, run / "checkpoints", signal.SIGINT), "pretrain ended first"
    line = assert_interrupted(process, signal.SIGINT, run / "checkpoints" / "cell-0000002")
    assert "cell-0000002" in line
    assert not [p for p in run.rglob(".*")], "temporaries were left in the run"


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_without_deadlock_or_debris(small_corpus, tmp_path):
    run = tmp_path / "run"
    env = dict(ENV, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "langcell",
         "pretrain", "--config", "tiny", "--corpus", str(small_corpus), "--out", str(run), "--device", "cpu",
         "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert signal_while_writing(process, run / "checkpoints", signal.SIGTERM), "torchrun ended first"
    try:
        _, err = process.communicate(timeout=90)  # torchrun's own grace period is 30 s: well within
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("a rank did not stop: torchrun was still running 90 s after SIGTERM") from None
    assert process.returncode != 0
    assert "interrupted by SIGTERM" in err, err[-3000:]
    assert not [p for p in run.rglob(".*")], "temporaries were left in the run"
    assert not (run / "model").exists()

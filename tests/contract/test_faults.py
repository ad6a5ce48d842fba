"""Faults: a process killed at any point leaves the old result or the new one, never half of one.

``tokenize`` and ``pretrain`` are run as real processes (``python -m langcell ...``) and killed with
SIGKILL while they write; then the outputs are inspected, and ``pretrain --resume`` must finish with
the same weights as a run that was never interrupted. Smaller in-process tests inject an exception at
the worst moment of each atomic write (tokenizer file, model directory, corpus, directory swap).

A non-finite loss stopping training with the last good checkpoint kept is tested in
tests/train/test_pretrain.py.
"""

from __future__ import annotations

import json
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
from safetensors.torch import load_file

from langcell import _atomic
from langcell.data.corpus import TokenCorpus, write_corpus
from langcell.data.tokenizer import TOKENIZER_FILENAME, GeneTokenizer
from langcell.models import LangCell

SHARED = Path(__file__).resolve().parents[3] / "shared"
CBMC = SHARED / "data" / "cbmc_citeseq_500genes.h5ad"
needs_cbmc = pytest.mark.skipif(not CBMC.is_file(), reason=f"{CBMC} is missing")

# One thread per process: the runs are tiny, and the machine may be shared (and its cores oversubscribed).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
POLL_S = 0.002


def langcell(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "langcell", *args, "--quiet"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 240) -> None:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"exit {process.returncode}\n{out}\n{err}"


def kill_when(process: subprocess.Popen, condition, timeout: float = 240) -> bool:
    """SIGKILL ``process`` as soon as ``condition()`` holds; False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            process.send_signal(signal.SIGKILL)
            process.communicate()
            return True
        if process.poll() is not None:
            process.communicate()
            return False
        time.sleep(POLL_S)
    process.kill()
    process.communicate()
    raise AssertionError("the process neither reached the kill point nor ended")


def hidden_entries(directory: Path, prefix: str = ".") -> list[Path]:
    return [p for p in directory.iterdir() if p.name.startswith(prefix)] if directory.is_dir() else []


def shard_files_in_progress(parent: Path, name: str) -> bool:
    """A temporary corpus directory beside ``parent / name`` already holds shard files."""
    for tmp in hidden_entries(parent, f".{name}."):
        shards = tmp / "shards"
        try:
            if shards.is_dir() and any(shards.iterdir()):
                return True
        except FileNotFoundError:  # renamed away between the two calls
            pass
    return False


# ---------------------------------------------------------------------------------------- tokenize
@needs_cbmc
@pytest.mark.slow
def test_killed_tokenize_leaves_no_corpus_or_the_old_one(tmp_path):
    # All 8,617 CBMC cells in shards of 20: ~1,300 shard files, so there is time to kill mid-write.
    args = [str(CBMC), str(tmp_path / "corpus"), "--custom-genes", "--shard-size", "20"]

    # 1. No earlier corpus: a kill mid-write leaves no corpus at all.
    killed = kill_when(langcell("tokenize", *args), lambda: shard_files_in_progress(tmp_path, "corpus"))
    assert killed, "tokenize ended before it could be killed mid-write"
    assert not (tmp_path / "corpus").exists()
    assert hidden_entries(tmp_path, ".corpus."), "the kill did not happen mid-write"

    # 2. A complete corpus, then an --overwrite killed mid-write: the old corpus is intact.
    finish(langcell("tokenize", *args))
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "corpus").rglob("*") if p.is_file()}
    killed = kill_when(
        langcell("tokenize", *args, "--overwrite"),
        lambda: shard_files_in_progress(tmp_path, "corpus"),
    )
    assert killed, "tokenize --overwrite ended before it could be killed mid-write"
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "corpus").rglob("*") if p.is_file()}
    assert after == before
    corpus = TokenCorpus(tmp_path / "corpus")
    corpus.verify()
    assert len(corpus) == ad.read_h5ad(CBMC, backed="r").n_obs


# ---------------------------------------------------------------------------------------- pretrain
@pytest.fixture(scope="module")
def cbmc_corpus(tmp_path_factory) -> Path:
    """300 labelled CBMC cells, tokenized (max 128 tokens) with a vocabulary of their 500 genes."""
    if not CBMC.is_file():
        pytest.skip(f"{CBMC} is missing")
    adata = ad.read_h5ad(CBMC)
    adata = adata[adata.obs["cell_type_ontology_term_id"] != "unknown"]
    keep = np.sort(np.random.default_rng(0).choice(adata.n_obs, 300, replace=False))
    folder = tmp_path_factory.mktemp("faults")
    adata[keep].copy().write_h5ad(folder / "cbmc300.h5ad")
    finish(
        langcell("tokenize", str(folder / "cbmc300.h5ad"), str(folder / "corpus"), "--custom-genes",
                 "--max-length", "128")
    )
    return folder / "corpus"


def checkpoint_is_complete(path: Path) -> None:
    """A checkpoint directory whose model loads strictly and whose training state reads back."""
    model = LangCell.from_pretrained(path / "model")
    assert model.gene_tokenizer is not None
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    assert state["stage"] in ("cell", "joint") and state["step"] >= 1


def assert_run_is_consistent(run: Path) -> None:
    """Every visible checkpoint is complete; latest.json names one of them; model/ is complete or absent."""
    checkpoints = run / "checkpoints"
    visible = [p for p in checkpoints.iterdir() if not p.name.startswith(".")]
    done = sorted(p for p in visible if p.is_dir())
    assert done, "no checkpoint survived"
    for path in done:
        checkpoint_is_complete(path)
    latest = json.loads((checkpoints / "latest.json").read_text())["checkpoint"]
    assert (checkpoints / latest).is_dir()
    if (run / "model").exists():
        LangCell.from_pretrained(run / "model")


def in_checkpoint_write(run: Path) -> bool:
    """A first checkpoint exists and another is being written (its temporary directory is there)."""
    checkpoints = run / "checkpoints"
    return (checkpoints / "latest.json").is_file() and bool(hidden_entries(checkpoints, ".cell-") +
                                                            hidden_entries(checkpoints, ".joint-"))


@pytest.mark.slow
def test_killed_pretrain_keeps_whole_checkpoints_and_resumes_to_the_same_weights(cbmc_corpus, tmp_path):
    common = ["--config", "tiny", "--corpus", str(cbmc_corpus), "--deterministic"]
    reference = langcell("pretrain", *common, "--out", str(tmp_path / "uninterrupted"))

    # Kill the second run while it writes a checkpoint (a temporary directory exists next to a finished one);
    # if it writes too fast to be caught there, kill it as soon as its first checkpoint exists.
    interrupted = tmp_path / "interrupted"
    killed = kill_when(langcell("pretrain", *common, "--out", str(interrupted)),
                       lambda: in_checkpoint_write(interrupted))
    if not killed:
        import shutil

        shutil.rmtree(interrupted)
        killed = kill_when(langcell("pretrain", *common, "--out", str(interrupted)),
                           lambda: (interrupted / "checkpoints" / "latest.json").is_file())
    assert killed, "pretrain ended before it could be killed"
    assert not (interrupted / "model").exists()
    assert_run_is_consistent(interrupted)

    finish(langcell("pretrain", *common, "--out", str(interrupted), "--resume"))
    finish(reference)
    assert_run_is_consistent(interrupted)
    expected = load_file(tmp_path / "uninterrupted" / "model" / "model.safetensors")
    resumed = load_file(interrupted / "model" / "model.safetensors")
    assert sorted(resumed) == sorted(expected)
    different = [name for name in expected if not torch.equal(resumed[name], expected[name])]
    assert not different, f"tensors differ after the resume: {different[:5]}"


# ---------------------------------------------------------------------------- in-process fault injection
def small_tokenizer(n: int = 5, scale: float = 1.0) -> GeneTokenizer:
    return GeneTokenizer([f"g{i}" for i in range(n)], np.linspace(1.0, 2.0, n) * scale, gene_id_kind="custom")


class Boom(Exception):
    """The injected fault."""


def test_tokenizer_save_failing_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    small_tokenizer().save(tmp_path)
    before = (tmp_path / TOKENIZER_FILENAME).read_bytes()

    def write_half_then_fail(self, text, *args, **kwargs):
        Path.write_bytes(self, text[: len(text) // 2].encode())
        raise Boom

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(Boom):
        small_tokenizer(7, 3.0).save(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / TOKENIZER_FILENAME).read_bytes() == before
    assert GeneTokenizer.load(tmp_path) == small_tokenizer()
    assert os.listdir(tmp_path) == [TOKENIZER_FILENAME]


def test_model_save_failing_mid_write_keeps_the_old_model(tmp_path, monkeypatch):
    import safetensors.torch

    tokenizer = small_tokenizer(97)
    old = LangCell.from_config("tiny", gene_tokenizer=tokenizer)
    old.save_pretrained(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir() if p.is_file()}
    new = LangCell.from_config("tiny", gene_tokenizer=tokenizer)
    real_save = safetensors.torch.save_file

    def save_then_fail(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(Path(filename).read_bytes()[:1000])  # a half-written file, then the fault
        raise Boom

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    with pytest.raises(Boom):
        new.save_pretrained(tmp_path / "model", overwrite=True)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir() if p.is_file()}
    assert after == before
    loaded = LangCell.from_pretrained(tmp_path / "model")
    for name, tensor in old.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_corpus_overwrite_failing_mid_write_keeps_the_old_corpus(tmp_path, monkeypatch):
    import langcell.data.corpus as corpus_module

    rng = np.random.default_rng(0)
    adata = ad.AnnData(rng.poisson(2.0, size=(30, 5)).astype(np.float32) + np.eye(30, 5, dtype=np.float32))
    adata.var_names = [f"g{i}" for i in range(5)]
    tokenizer = small_tokenizer()
    write_corpus(adata, tokenizer, tmp_path / "corpus", shard_size=10, progress=False)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "corpus").rglob("*") if p.is_file()}

    real_add = corpus_module._ShardWriter.add
    calls = []

    def add_then_fail(self, ids, lengths):
        real_add(self, ids, lengths)
        calls.append(len(self.shards))
        raise Boom  # after some shards of the new corpus are on disk

    monkeypatch.setattr(corpus_module._ShardWriter, "add", add_then_fail)
    with pytest.raises(Boom):
        write_corpus(adata[::-1].copy(), tokenizer, tmp_path / "corpus", shard_size=10, overwrite=True,
                     progress=False)
    monkeypatch.undo()
    assert calls and calls[0] >= 1, "the fault came before any new shard was written"
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "corpus").rglob("*") if p.is_file()}
    assert after == before
    TokenCorpus(tmp_path / "corpus").verify()
    assert sorted(os.listdir(tmp_path)) == ["corpus"]


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
def test_directory_swap_interrupted_keeps_the_old_directory(exchange, tmp_path, monkeypatch):
    # The last step of an overwrite puts the new directory where the old one was. If the process is
    # interrupted right there (here: the rename onto the final name fails), the old directory must still
    # be in place under its name, not moved aside to a hidden temporary name.
    target = tmp_path / "result"
    target.mkdir()
    (target / "file.txt").write_text("old")
    real_replace = os.replace
    interrupted = []

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == target and not interrupted:  # once: the interrupt arrives at that moment only
            interrupted.append(src)
            raise KeyboardInterrupt
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    if not exchange:  # as on systems without renameat2
        monkeypatch.setattr(_atomic, "_exchange", lambda first, second: False)
    swapped = False
    try:
        with _atomic.atomic_directory(target, overwrite=True) as tmp:
            (tmp / "file.txt").write_text("new")
        swapped = True
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert (target / "file.txt").read_text() == ("new" if swapped else "old")
    assert swapped == exchange  # only the exchange needs no rename onto the final name
    assert sorted(os.listdir(tmp_path)) == ["result"], "temporary directories were left behind"


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
def test_directory_swap_replaces_old_content(exchange, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(_atomic, "_exchange", lambda first, second: False)
    target = tmp_path / "result"
    for content in ("first", "second", "third"):
        with _atomic.atomic_directory(target, overwrite=True) as tmp:
            (tmp / "file.txt").write_text(content)
            (tmp / content).mkdir()
        assert (target / "file.txt").read_text() == content
        assert sorted(os.listdir(target)) == sorted(["file.txt", content])
    assert sorted(os.listdir(tmp_path)) == ["result"]
    # A file replaced by a directory, as the final name allows with overwrite.
    (tmp_path / "plain").write_text("a file")
    with _atomic.atomic_directory(tmp_path / "plain", overwrite=True) as tmp:
        (tmp / "inside.txt").write_text("x")
    assert (tmp_path / "plain" / "inside.txt").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["plain", "result"]


# ------------------------------------------------------------------------------------------ source scan
WRITERS = {"write_h5ad", "write_text", "write_bytes", "save", "save_file", "savefig", "to_csv", "dump"}
# Writes that land inside a temporary directory without naming it ``tmp``: (file, function) -> why.
WRITES_INTO_A_TEMPORARY_DIRECTORY = {
    ("corpus.py", "flush"): "_ShardWriter writes into the corpus's temporary shard directory",
}


def writes_outside_atomic_blocks(source: str, filename: str) -> list[str]:
    """Calls that write a file neither inside ``with atomic_file/atomic_directory`` nor to a ``tmp`` path."""
    import ast

    problems: list[str] = []

    def visit(node: ast.AST, function: str, guarded: bool) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.With | ast.AsyncWith):
            for item in node.items:
                call = item.context_expr
                if isinstance(call, ast.Call) and ast.unparse(call.func).endswith(("atomic_file", "atomic_directory")):
                    guarded = True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITERS:
            target = ast.unparse(node.func.value) + " " + " ".join(ast.unparse(a) for a in node.args[:2])
            receiver = ast.unparse(node.func.value)
            is_write = node.func.attr != "save" or receiver in {"np", "numpy", "torch"}
            is_write = is_write and not (node.func.attr == "dump" and receiver != "json")
            allowed = (Path(filename).name, function) in WRITES_INTO_A_TEMPORARY_DIRECTORY
            if is_write and not guarded and "tmp" not in target and not allowed:
                problems.append(f"{filename}:{node.lineno} in {function}(): {ast.unparse(node)[:80]}")
        for child in ast.iter_child_nodes(node):
            visit(child, function, guarded)

    visit(ast.parse(source), "<module>", False)
    return problems


def test_the_write_scan_catches_a_direct_write():
    source = "def f(path, adata):\n    adata.write_h5ad(path)\n    np.save(path, x)\n"
    assert len(writes_outside_atomic_blocks(source, "x.py")) == 2
    guarded = "def f(path, adata):\n    with atomic_file(path) as tmp:\n        adata.write_h5ad(tmp)\n"
    assert writes_outside_atomic_blocks(guarded, "x.py") == []


def test_every_output_file_is_written_under_a_temporary_name():
    package = Path(__file__).resolve().parents[2] / "src" / "langcell"
    if not package.is_dir():
        import langcell

        package = Path(langcell.__file__).resolve().parent
    problems = [
        problem
        for file in sorted(package.rglob("*.py"))
        for problem in writes_outside_atomic_blocks(file.read_text(encoding="utf-8"), str(file))
    ]
    assert not problems, "files written in place (a kill leaves them half-written):\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------- annotate
@needs_cbmc
@pytest.mark.slow
def test_killed_annotate_leaves_the_old_result_or_the_complete_new_one(tmp_path):
    """SIGKILL `annotate` while its output is being written: OUT.h5ad is the old file or a whole new one."""
    from langcell.models.config import LangCellConfig

    cells = ad.read_h5ad(CBMC)
    cells = cells[cells.obs["cell_type_ontology_term_id"] != "unknown"][:300].copy()
    tokenizer = GeneTokenizer.fit(cells, gene_id_kind="custom")
    config = LangCellConfig.preset("tiny")
    config.cell.vocab_size = tokenizer.vocab_size
    config.cell.max_position_embeddings = 512
    torch.manual_seed(0)
    LangCell.from_config(config, gene_tokenizer=tokenizer).save_pretrained(tmp_path / "model")
    cells.write_h5ad(tmp_path / "cells.h5ad")
    out = tmp_path / "annotated.h5ad"
    out.write_bytes(b"the previous result")
    args = ["annotate", str(tmp_path / "cells.h5ad"), "--model", str(tmp_path / "model"), "--out", str(out),
            "--labels", "B cell;natural killer cell"]

    # Killed once its temporary output exists: the previous result must still be there, unchanged.
    killed = kill_when(langcell(*args), lambda: bool(hidden_entries(tmp_path, ".annotated.h5ad.")))
    assert killed, "annotate ended before its temporary output appeared"
    assert out.read_bytes() == b"the previous result"
    # An uninterrupted run replaces it with a complete, readable file.
    finish(langcell(*args))
    annotated = ad.read_h5ad(out)
    assert annotated.n_obs == 300 and "langcell_cell_type" in annotated.obs

"""A full disk: one line naming the output (and the space it needs, where known), exit 2, no partial output.

Fault injection: a test process cannot fill a real disk without root (no tmpfs of its own) and
``RLIMIT_FSIZE`` gives a different error (EFBIG/SIGXFSZ). So the disk fills inside the test process, at
the lowest write that Python reaches: HDF5's own failed-write error as h5py raises it (an ``OSError``
whose errno is only in the message, the form that a real full disk produces) for the h5ad, and
``numpy.save`` failing with ``ENOSPC`` after half a shard for the corpus. langcell's handling is generic,
by errno, so the same code serves a real full disk. A disk that is already too small is measured by
``shutil.disk_usage``, replaced here by one that reports almost nothing free.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from langcell import _atomic
from langcell.cli import main
from langcell.data.tokenizer import GeneTokenizer
from langcell.models import LangCell
from langcell.models.config import LangCellConfig

#: HDF5's error for a write that hit a full disk, as h5py raises it (OSError, errno only in the text).
HDF5_DISK_FULL = (
    "Can't write data (file write failed: time = Sat Dec  5 12:00:00 2026\n, filename = '{name}', file "
    "descriptor = 7, errno = 28, error message = 'No space left on device', buf = 0x55d0c3a1e000, total "
    "write size = 480000, bytes this sub-write = 480000, bytes actually written = 18446744073709551615, "
    "offset = 4096)"
)


def cells(path: Path, n_cells: int = 40, n_genes: int = 12) -> Path:
    rng = np.random.default_rng(0)
    adata = ad.AnnData(
        sp.csr_matrix(rng.poisson(3.0, size=(n_cells, n_genes)).astype(np.float32) + 1),
        obs=pd.DataFrame(index=[f"cell_{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"gene_{i}" for i in range(n_genes)]),
    )
    adata.layers["extra"] = rng.random((n_cells, n_genes), dtype=np.float32)
    adata.write_h5ad(path)
    return path


@pytest.fixture
def annotate_args(tmp_path) -> list[str]:
    source = cells(tmp_path / "cells.h5ad")
    tokenizer = GeneTokenizer.fit(ad.read_h5ad(source), gene_id_kind="custom")
    config = LangCellConfig.preset("tiny")
    config.cell.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    LangCell.from_config(config, gene_tokenizer=tokenizer).save_pretrained(tmp_path / "model")
    (tmp_path / "out").mkdir()
    return ["annotate", str(source), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out" / "a.h5ad"),
            "--labels", "B cell;T cell", "--quiet"]


def test_disk_full_during_annotates_h5ad_write(annotate_args, tmp_path, monkeypatch, capsys):
    real = h5py.Group.create_dataset
    written: list[str] = []

    def create_dataset(self, name, *args, **kwargs):
        if len(written) == 3:  # a few datasets are on disk, then the disk is full
            raise OSError(HDF5_DISK_FULL.format(name=self.file.filename))
        written.append(name)
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
    code = main(annotate_args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "no space left on the device while writing" in err[0] and "a.h5ad" in err[0], err
    assert "it needs about" in err[0] and "kB" in err[0], err
    assert len(written) == 3
    assert os.listdir(tmp_path / "out") == []  # no partial file, no temporary


def test_an_h5ad_the_disk_cannot_take_is_refused_before_any_work(annotate_args, tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(_atomic.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    loaded = []
    monkeypatch.setattr(LangCell, "from_pretrained", lambda *a, **k: loaded.append(1))
    code = main(annotate_args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not enough space to write" in err[0], err
    assert "100 bytes are free" in err[0]
    assert loaded == [], "the model was loaded before the output was refused"
    assert os.listdir(tmp_path / "out") == []


def test_disk_full_during_tokenize(tmp_path, monkeypatch, capsys):
    import langcell.data.corpus as corpus_module

    source = cells(tmp_path / "cells.h5ad", n_cells=60)
    real_save = np.save
    saved = []

    def save(path, array, *args, **kwargs):
        if len(saved) == 4:  # some shards are whole; this one is cut off half-way by the full disk
            Path(path).write_bytes(array.tobytes()[: array.nbytes // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        saved.append(path)
        return real_save(path, array, *args, **kwargs)

    monkeypatch.setattr(corpus_module.np, "save", save)
    (tmp_path / "out").mkdir()
    code = main(["tokenize", str(source), str(tmp_path / "out" / "corpus"), "--custom-genes", "--shard-size", "10",
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "no space left on the device while writing" in err[0] and "corpus" in err[0], err
    assert "written before the disk filled" in err[0], err
    assert len(saved) == 4
    assert os.listdir(tmp_path / "out") == []


def test_disk_full_is_recognised_by_errno_in_any_form():
    assert _atomic.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert _atomic.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert _atomic.is_disk_full(OSError(HDF5_DISK_FULL.format(name="x.h5ad")))
    try:  # a library re-raising it as something else keeps it in the chain
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("write failed") from inner
    except RuntimeError as outer:
        assert _atomic.is_disk_full(outer)
    assert not _atomic.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not _atomic.is_disk_full(OSError("Can't write data (errno = 13, error message = 'Permission denied')"))
    assert not _atomic.is_disk_full(ValueError("errno = 28"))

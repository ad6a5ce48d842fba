"""The pretraining log: CSV columns, resuming an older log, TensorBoard's optional package."""

from __future__ import annotations

import csv
import sys

import pytest

from langcell.errors import LangCellError
from langcell.train.log import RunLog, check_tensorboard


def read(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_rows_fill_their_columns_and_leave_the_others_empty(tmp_path):
    log = RunLog(tmp_path, enabled=True)
    log.write({"stage": "cell", "step": 1, "loss": 2.5}, 1)
    log.write({"stage": "cell", "step": 2, "loss": 2.0, "eval_accuracy": 0.25, "eval_macro_f1": 0.125}, 2)
    log.close()
    rows = read(tmp_path / "log.csv")
    assert list(rows[0]) == RunLog.FIELDS
    assert rows[0]["eval_accuracy"] == "" and rows[1]["eval_accuracy"] == "0.25" and rows[1]["eval_macro_f1"] == "0.125"


def test_a_resumed_log_keeps_the_columns_it_started_with(tmp_path):
    (tmp_path / "log.csv").write_text("stage,step,loss\ncell,1,2.5\n")
    log = RunLog(tmp_path, enabled=True)
    log.write({"stage": "cell", "step": 2, "loss": 2.0, "eval_accuracy": 0.5}, 2)
    log.close()
    assert (tmp_path / "log.csv").read_text().splitlines() == ["stage,step,loss", "cell,1,2.5", "cell,2,2.0"]


def test_other_ranks_write_nothing(tmp_path):
    log = RunLog(tmp_path, enabled=False, tensorboard=True)
    log.write({"stage": "cell", "step": 1}, 1)
    log.close()
    assert not list(tmp_path.iterdir())


def test_tensorboard_without_its_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what importing a missing package finds
    with pytest.raises(LangCellError, match=r'pip install "langcell\[tensorboard\]"'):
        check_tensorboard()

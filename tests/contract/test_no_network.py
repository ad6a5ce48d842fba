"""No network at run time: the demo's core path runs with every socket refused.

Tokenizer fitted on scanpy's bundled PBMCs, the ``small`` model (its text tower is the all-MiniLM-L6-v2
packaged on disk), zero-shot annotation of a handful of cells with two labels: none of it may open a
connection. The Hugging Face offline switches are removed first, so the test also proves that the
library does not depend on the CLI having set them.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

from langcell import tl
from langcell.data.datasets import pbmc68k
from langcell.data.tokenizer import GeneTokenizer
from langcell.models import LangCell
from langcell.models.config import LangCellConfig


class NetworkUsed(RuntimeError):
    """Raised by every socket entry point while the network is off."""


@pytest.fixture()
def no_network(monkeypatch):
    """Refuse sockets, connections and name lookups; record every attempt."""
    attempts: list[str] = []

    def refuse(name):
        def refused(*args, **kwargs):
            attempts.append(f"{name}{args[:2]}")
            raise NetworkUsed(f"{name} called with the network off")

        return refused

    monkeypatch.setattr(socket, "socket", refuse("socket.socket"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    return attempts


def test_the_guard_refuses_sockets(no_network):
    with pytest.raises(NetworkUsed):
        socket.create_connection(("example.org", 443), timeout=1)
    with pytest.raises(NetworkUsed):
        socket.socket()
    assert len(no_network) == 2
    no_network.clear()


@pytest.mark.slow
def test_demo_core_path_runs_offline(no_network):
    adata = pbmc68k()
    tokenizer = GeneTokenizer.fit(adata)
    config = LangCellConfig.preset("small")
    config.cell.vocab_size = tokenizer.vocab_size
    model = LangCell.from_config(config, gene_tokenizer=tokenizer).eval()
    cells = adata[:6].copy()
    tl.annotate(cells, model, ["B cell", "natural killer cell"], max_length=256)

    assert no_network == []
    assert set(cells.obs["langcell_cell_type"]) <= {"B cell", "natural killer cell"}
    probabilities = cells.obsm["langcell_cell_type_probs"]
    assert probabilities.shape == (6, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert cells.uns["langcell_cell_type"]["classes"] == ["B cell", "natural killer cell"]

"""Inference across processes: contiguous shares, the gathered result, and torchrun on 2 gloo processes.

The torchrun tests compare ``torchrun --nproc_per_node 2 -m langcell embed|annotate`` with the same
call on one process, run here in the test. What each process computes for a cell does not depend on
the other cells of a forward pass in exact arithmetic, but the batches differ: each process groups
only the cells of its own share into length-bucketed batches, so a cell may sit in a batch of another
padded width than on one process. Padding is masked out, yet the attention sums then run over another
number of (zero-weighted) positions, and float32 sums in another blocking may differ in the last bits.
So embeddings and scores are compared within float tolerance (1e-5), and the predicted classes
exactly. (On this CPU the embeddings came out bitwise equal; the test does not rely on it.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from langcell import _distributed, tl
from langcell.data.corpus import write_corpus
from langcell.data.tokenizer import GeneTokenizer
from langcell.errors import LangCellError
from langcell.models.config import LangCellConfig
from langcell.models.langcell import LangCell

CBMC = Path(__file__).resolve().parents[3] / "shared" / "data" / "cbmc_citeseq_500genes.h5ad"
LABELS = ["B cell", "natural killer cell", "CD14-positive monocyte", "CD4-positive, alpha-beta T cell"]


def context(rank: int, world_size: int) -> _distributed.DistributedContext:
    return _distributed.DistributedContext(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))


@pytest.mark.parametrize(("n_cells", "world_size"), [(10, 3), (7, 7), (1000, 8), (5, 1)])
def test_shares_are_contiguous_cover_every_cell_once_and_differ_by_at_most_one(n_cells, world_size):
    shares = [_distributed.cell_share(n_cells, context(r, world_size)) for r in range(world_size)]
    assert shares[0].start == 0 and shares[-1].stop == n_cells
    assert all(a.stop == b.start for a, b in zip(shares, shares[1:], strict=False))
    sizes = [s.stop - s.start for s in shares]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_more_processes_than_cells_is_refused_on_every_rank():
    for rank in range(3):
        with pytest.raises(LangCellError, match=r"3 processes share 2 cell\(s\).*nproc_per_node"):
            _distributed.cell_share(2, context(rank, 3))


def test_gathering_on_one_process_returns_the_rows_and_distributed_needs_a_group():
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert _distributed.gather_rows(rows, 4, context(0, 1)) is rows
    with pytest.raises(LangCellError, match="initialised process group"):
        _distributed.current_context()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model (hidden 32, 2 layers) saved with a vocabulary of 40 labelled CBMC cells, the cells as
    an h5ad file, and the same cells as a corpus tokenized with the model's vocabulary."""
    if not CBMC.is_file():
        pytest.skip(f"{CBMC} is missing")
    root = tmp_path_factory.mktemp("distributed")
    adata = ad.read_h5ad(CBMC)
    keep = np.concatenate([np.flatnonzero(adata.obs["cell_type"] == kind)[:10] for kind in LABELS])
    adata = adata[np.sort(keep)].copy()
    tokenizer = GeneTokenizer.fit(adata, gene_id_kind="custom")
    config = LangCellConfig.preset("tiny")
    config.cell.vocab_size = tokenizer.vocab_size
    config.cell.max_position_embeddings = 256
    torch.manual_seed(0)
    LangCell.from_config(config, gene_tokenizer=tokenizer).save_pretrained(root / "model")
    adata.write_h5ad(root / "cells.h5ad")
    write_corpus([adata], tokenizer, root / "corpus", max_length=256, progress=False)
    return root


def torchrun(n: int, *arguments: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "langcell", *arguments, "--device", "cpu", "--quiet"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_embed_a_backed_file_as_one_process_does(saved, tmp_path):
    out = tmp_path / "embedded.h5ad"
    result = torchrun(2, "embed", str(saved / "cells.h5ad"), "--model", str(saved / "model"), "--out", str(out),
                      "--backed")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedded.h5ad"]  # one result, no temporary left
    two = ad.read_h5ad(out)
    one = ad.read_h5ad(saved / "cells.h5ad")
    tl.embed(one, LangCell.from_pretrained(saved / "model"), progress=False)
    assert list(two.obs_names) == list(one.obs_names)
    np.testing.assert_allclose(two.obsm["X_langcell"], one.obsm["X_langcell"], rtol=0, atol=1e-5)
    assert two.uns["X_langcell"]["params"]["n_processes"] == 2
    np.testing.assert_array_equal(two.X.toarray() if hasattr(two.X, "toarray") else two.X,
                                  one.X.toarray() if hasattr(one.X, "toarray") else one.X)


@pytest.mark.slow
def test_two_processes_annotate_a_corpus_as_one_process_annotates_the_file(saved, tmp_path):
    out = tmp_path / "annotated.h5ad"
    result = torchrun(2, "annotate", str(saved / "corpus"), "--model", str(saved / "model"), "--out", str(out),
                      "--labels", ";".join(LABELS), "--report", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    two = ad.read_h5ad(out)
    one = ad.read_h5ad(saved / "cells.h5ad")
    tl.annotate(one, LangCell.from_pretrained(saved / "model"), LABELS, progress=False)
    # The corpus keeps each cell's name in obs "obs_name"; its rows are the file's, in order.
    assert list(two.obs["obs_name"]) == list(one.obs_names)
    np.testing.assert_allclose(two.obsm["langcell_cell_type_probs"], one.obsm["langcell_cell_type_probs"],
                               rtol=0, atol=1e-5)
    np.testing.assert_array_equal(two.obs["langcell_cell_type"].astype(str), one.obs["langcell_cell_type"].astype(str))
    assert (tmp_path / "report.json").is_file()


@pytest.mark.slow
def test_more_processes_than_cells_fails_on_every_rank_and_writes_nothing(saved, tmp_path):
    two_cells = tmp_path / "in" / "two.h5ad"
    two_cells.parent.mkdir()
    ad.read_h5ad(saved / "cells.h5ad")[:2].copy().write_h5ad(two_cells)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = torchrun(3, "embed", str(two_cells), "--model", str(saved / "model"), "--out", str(out_dir / "e.h5ad"))
    assert result.returncode != 0
    # Every rank refuses before any collective call, with the same line; torchrun stops the other ranks
    # as soon as the first exits, so how many of the lines are printed (and whether two interleave) varies.
    message = ("langcell embed: error: 3 processes share 2 cell(s): every process needs at least one cell; "
               "start at most 2 processes (torchrun --nproc_per_node)")
    assert 1 <= result.stderr.count(message) <= 3, result.stderr[-3000:]
    # No traceback from langcell's own code (torchrun prints its own for the failed child).
    assert not [line for line in result.stderr.splitlines() if line.strip().startswith('File "') and "/langcell/" in line]
    assert not list(out_dir.iterdir())


def test_a_corpus_gives_the_embeddings_and_annotation_of_its_file(saved):
    from langcell.data.corpus import TokenCorpus

    model = LangCell.from_pretrained(saved / "model")
    corpus = TokenCorpus(saved / "corpus")
    from_counts = ad.read_h5ad(saved / "cells.h5ad")
    from_corpus = ad.AnnData(obs=corpus.obs)
    tl.embed(from_counts, model, progress=False)
    tl.embed(from_corpus, model, corpus=saved / "corpus", progress=False)
    np.testing.assert_array_equal(from_corpus.obsm["X_langcell"], from_counts.obsm["X_langcell"])
    tl.annotate(from_counts, model, LABELS, progress=False)
    tl.annotate(from_corpus, model, LABELS, corpus=corpus, progress=False)
    np.testing.assert_array_equal(from_corpus.obsm["langcell_cell_type_probs"],
                                  from_counts.obsm["langcell_cell_type_probs"])


def test_a_corpus_of_other_cells_or_another_vocabulary_is_refused(saved, tmp_path):
    from langcell.data.corpus import TokenCorpus

    model = LangCell.from_pretrained(saved / "model")
    corpus = TokenCorpus(saved / "corpus")
    with pytest.raises(LangCellError, match="holds 40 cells but adata has 39 rows"):
        tl.embed(ad.AnnData(obs=corpus.obs.iloc[:39]), model, corpus=corpus, progress=False)
    cells = ad.read_h5ad(saved / "cells.h5ad")[:, :300].copy()  # fewer genes: another vocabulary
    write_corpus([cells], GeneTokenizer.fit(cells, gene_id_kind="custom"), tmp_path / "other", progress=False)
    with pytest.raises(LangCellError, match="another gene vocabulary than the model's"):
        tl.annotate(ad.AnnData(obs=corpus.obs), model, LABELS, corpus=tmp_path / "other", progress=False)

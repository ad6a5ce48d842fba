"""Benchmark: the pretraining data path at atlas scale (0.1, 0.5 and 2 million real cells; 10M on request).

What it measures, for each size, every figure in its own fresh subprocess (so that one size's memory
never hides another's):

* ``langcell tokenize`` of N backed h5ad files into a corpus: cells/s and peak RSS;
* opening the corpus (``TokenCorpus``: manifest, shard checks, lengths): seconds and RSS;
* building the pretraining text table (``CellTextTable.from_corpus``: the term id columns of obs) and the batch stream
  (``PretrainStream``) for rank 0 of 8 at the ``base`` recipe's sizes: seconds and RSS;
* the stream's steady throughput in cells/s with 0, 2 and 4 data-loader workers (``base`` lengths:
  up to 2,048 tokens a cell, 65,536 tokens and 64 cells a micro-batch), and the same with 0 workers on
  the cells that fill all 2,048 tokens (15% of this collection: immune cells that express more than
  2,047 vocabulary genes);
* the time to the first batch when resuming at step 0 and at a late step (one million micro-batches
  in, over many epochs): resuming must not replay the steps already done.

The last table prints the growth of each figure from the smallest to the largest size.

The collection (written once under ``--data``, reused by later runs) is made of real cells resampled
with replacement, each file 100,000 cells in one union gene space (CSR float32 raw counts, backed-readable):

===================================  =======================================================================
column                               where it comes from
===================================  =======================================================================
X (raw counts)                       the cell's real counts: 40% of cells from the 559-cell immune sample
                                     (../shared/data, 32,786 genes, ~1,840 expressed per cell), 30% from
                                     scanpy's pbmc68k (``langcell.data.datasets.pbmc68k``, counts rebuilt
                                     from its .raw, 765 genes), 30% from CBMC CITE-seq (../shared/data,
                                     500 anonymous genes)
n_counts                             pbmc68k: the study's true totals; others: the matrix totals
cell_type_ontology_term_id,          pbmc68k: its labels resolved to CL by langcell (10 types); CBMC: the
cell_type                            file's CL terms (11 types + 'unknown'); immune: 'unknown' (unlabelled)
tissue_ontology_term_id              pbmc68k: blood (UBERON:0000178); CBMC: umbilical cord blood
                                     (UBERON:0012168); immune: blood (assumed: the sample does not say)
assay_ontology_term_id               pbmc68k: 10x 3' v1 (EFO:0009901); CBMC: CITE-seq (EFO:0009294);
                                     immune: 10x 3' v3 (EFO:0009922, assumed)
disease, organism                    normal (PATO:0000461), Homo sapiens (NCBITaxon:9606): true of all three
donor_id, sex, development_stage,    SYNTHETIC: 4 donors per file, each with a sex (PATO), an adult stage
self_reported_ethnicity              (HsapDv) and an ancestry (HANCESTRO) drawn from fixed lists, so that the
                                     text table has the many distinct texts of an atlas
is_primary_data, suspension_type,    True, 'cell', and the tissue's general term (the Census's columns)
tissue_general
===================================  =======================================================================

The tokenizer is fitted once on the three base files (custom gene names: the CBMC genes have no public
IDs) and given to ``langcell tokenize --tokenizer``. Disk: about 7.3 GB of h5ad and 1.5 GB of corpus per
million cells (measured: 2M cells are 14 GB of h5ad and a 2.9 GB corpus; 10M need about 90 GB). The
script refuses to start when the disk holds less. Run from
the repository root::

    python benchmarks/scale.py --data /work/scale-data                  # 0.1, 0.5 and 2 million cells
    python benchmarks/scale.py --data /work/scale-data --sizes 0.1 0.5  # quicker
    python benchmarks/scale.py --data /data/scale --ten-million          # adds 10M (about 90 GB of disk)
    python benchmarks/scale.py --data /work/scale-data --clean          # delete the collection afterwards
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
IMMUNE = SHARED / "data" / "immune_sample_559cells_counts.h5ad"
CBMC = SHARED / "data" / "cbmc_citeseq_500genes.h5ad"
FILE_CELLS = 100_000
#: Measured bytes per cell: h5ad (CSR float32 + int32 indices, ~915 stored values a cell) and corpus.
H5AD_BYTES_PER_CELL, CORPUS_BYTES_PER_CELL = 7_300, 1_500
#: The base recipe's data sizes (src/langcell/configs/base.json).
BASE = {"max_tokens": 65_536, "max_batch_size": 64, "max_length": 2048}
WORLD_SIZE, RANK = 8, 0
LATE_STEP = 1_000_000
SOURCE_SHARES = {"immune": 0.4, "pbmc68k": 0.3, "cbmc": 0.3}
DONOR_SEXES = ["PATO:0000383", "PATO:0000384"]
DONOR_STAGES = ["HsapDv:0000160", "HsapDv:0000226", "HsapDv:0000258"]
DONOR_ANCESTRIES = ["HANCESTRO:0005", "HANCESTRO:0008", "unknown"]


def max_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    ``VmHWM`` of /proc, not ``ru_maxrss``: on Linux a child started by fork + exec inherits its parent's
    ``ru_maxrss``, so the driver's own peak (building the collection) would show in every child.
    """
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def anon_rss_mib() -> float:
    """Anonymous resident memory now (``RssAnon``), in MiB: RSS less the pages of mapped files.

    Reading a memory-mapped corpus puts its pages in RSS too; those belong to the page cache, are
    shared by every process on the machine that maps the corpus, and the kernel drops them under
    pressure. What the data path itself holds is the anonymous part.
    """
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024


def current_rss_mib() -> float:
    """Resident memory now, in MiB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- the collection -----------------------------------------------------------------------------------


def base_cells():
    """The three real sources in one union gene space, with their CELLxGENE columns and a source label."""
    import anndata as ad
    import pandas as pd

    from langcell.data.datasets import pbmc68k

    immune = ad.read_h5ad(IMMUNE)
    immune.obs = pd.DataFrame(index=immune.obs_names)
    immune.obs["n_counts"] = np.asarray(immune.X.sum(axis=1)).ravel().astype(np.float64)
    immune.obs["cell_type_ontology_term_id"] = "unknown"
    immune.obs["cell_type"] = "unknown"
    immune.obs["tissue_ontology_term_id"] = "UBERON:0000178"
    immune.obs["assay_ontology_term_id"] = "EFO:0009922"
    pbmc = pbmc68k()
    pbmc.obs = pbmc.obs[["n_counts", "cell_type_ontology_term_id", "cell_type", "tissue_ontology_term_id",
                         "assay_ontology_term_id"]].astype({"cell_type_ontology_term_id": str, "cell_type": str,
                                                            "tissue_ontology_term_id": str, "assay_ontology_term_id": str})
    cbmc = ad.read_h5ad(CBMC)
    cbmc.obs = pd.DataFrame({
        "n_counts": np.asarray(cbmc.X.sum(axis=1)).ravel().astype(np.float64),
        "cell_type_ontology_term_id": cbmc.obs["cell_type_ontology_term_id"].astype(str),
        "cell_type": cbmc.obs["cell_type"].astype(str),
        "tissue_ontology_term_id": "UBERON:0012168",
        "assay_ontology_term_id": "EFO:0009294",
    }, index=cbmc.obs_names)
    parts = {"immune": immune, "pbmc68k": pbmc, "cbmc": cbmc}
    for name, part in parts.items():
        part.obs["base_source"] = name
        part.var_names_make_unique()
    return ad.concat(list(parts.values()), join="outer", index_unique=None, merge=None)


def write_collection_file(base, path: Path, number: int, n_cells: int) -> None:
    """One file of ``n_cells`` resampled cells with CELLxGENE-schema obs (see the module docstring)."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng([20260, number])
    source = base.obs["base_source"].to_numpy()
    weights = np.zeros(base.n_obs)
    for name, share in SOURCE_SHARES.items():
        weights[source == name] = share / np.count_nonzero(source == name)
    rows = rng.choice(base.n_obs, size=n_cells, p=weights / weights.sum())
    obs = base.obs.iloc[rows].drop(columns="base_source").reset_index(drop=True)
    donors = rng.integers(0, 4, size=n_cells)
    obs["donor_id"] = pd.Categorical.from_codes(donors, [f"donor_{number:03d}_{d}" for d in range(4)])
    for column, choices, salt in (("sex_ontology_term_id", DONOR_SEXES, 1),
                                  ("development_stage_ontology_term_id", DONOR_STAGES, 2),
                                  ("self_reported_ethnicity_ontology_term_id", DONOR_ANCESTRIES, 3)):
        per_donor = np.random.default_rng([20260, number, salt]).integers(0, len(choices), size=4)
        obs[column] = pd.Categorical(np.asarray(choices, dtype=object)[per_donor[donors]])
    obs["disease_ontology_term_id"] = "PATO:0000461"
    obs["organism_ontology_term_id"] = "NCBITaxon:9606"
    obs["is_primary_data"] = True
    obs["suspension_type"] = "cell"
    obs["tissue_general"] = np.where(obs["tissue_ontology_term_id"] == "UBERON:0012168", "umbilical cord blood",
                                     "blood")
    for column in obs.columns:
        if obs[column].dtype == object:
            obs[column] = obs[column].astype("category")
    obs.index = pd.Index([f"f{number:03d}_{i}" for i in range(n_cells)])
    adata = ad.AnnData(X=base.X[rows], obs=obs, var=pd.DataFrame(index=base.var_names))
    tmp = path.with_suffix(".tmp.h5ad")
    adata.write_h5ad(tmp)
    tmp.rename(path)


def build_collection(data: Path, n_files: int) -> list[Path]:
    """Write the files that are missing (earlier runs' files are reused) and the fitted tokenizer."""
    from langcell.data.tokenizer import GeneTokenizer

    files = [data / "h5ad" / f"cells_{k:03d}.h5ad" for k in range(n_files)]
    (data / "h5ad").mkdir(parents=True, exist_ok=True)
    missing = [k for k, f in enumerate(files) if not f.is_file()]
    if missing or not (data / "tokenizer").is_dir():
        base = base_cells()
        base.X = base.X.tocsr().astype(np.float32)
        if not (data / "tokenizer").is_dir():
            GeneTokenizer.fit(base, gene_id_kind="custom").save(data / "tokenizer")
        for k in missing:
            start = time.perf_counter()
            write_collection_file(base, files[k], k, FILE_CELLS)
            print(f"  wrote {files[k].name} ({time.perf_counter() - start:.1f} s)", flush=True)
    return files


def check_disk(data: Path, sizes: list[float]) -> None:
    """Refuse to start when the collection and the corpora cannot fit on the disk of ``data``."""
    existing = sum(f.stat().st_size for f in data.glob("h5ad/*.h5ad")) if data.is_dir() else 0
    need = max(max(sizes) * 1e6 * H5AD_BYTES_PER_CELL - existing, 0) + max(sizes) * 1e6 * CORPUS_BYTES_PER_CELL
    probe = data if data.exists() else data.parent
    free = shutil.disk_usage(probe).free
    print(f"disk: {need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free on {probe}")
    if need > 0.95 * free:
        sys.exit(f"not enough disk under {probe}: the run needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB are free")


# -- measurements, each run in its own process ---------------------------------------------------------------


def measure_tokenize(files: list[str], tokenizer: str, out: str) -> dict:
    """``langcell tokenize`` of the files (in this process, so ru_maxrss is its peak)."""
    from langcell.cli import main

    start = time.perf_counter()
    status = main(["tokenize", *files, out, "--tokenizer", tokenizer, "--overwrite", "--quiet"])
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"langcell tokenize failed with status {status}")
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    return {"seconds": seconds, "cells_per_s": manifest["n_cells"] / seconds, "peak_rss_mib": max_rss_mib(),
            "n_cells": manifest["n_cells"], "mean_tokens": manifest["n_tokens"] / manifest["n_cells"]}


def _stream(corpus, table, num_workers: int, cells=None):
    from langcell.train.data import PretrainStream

    cells = table.cells_with_cell_type_text() if cells is None else cells
    return PretrainStream(corpus, cells, max_tokens=BASE["max_tokens"],
                          max_batch_size=BASE["max_batch_size"], max_length=BASE["max_length"], rank=RANK,
                          world_size=WORLD_SIZE, seed=0, table=table, num_workers=num_workers)


def measure_stream(corpus_dir: str, seconds: float) -> dict:
    """Open the corpus, build the text table and rank 0's stream, then time batches and resumes."""
    from langcell.data.corpus import TokenCorpus
    from langcell.train.data import CellTextTable

    result = {"rss_start_mib": current_rss_mib()}
    start = time.perf_counter()
    corpus = TokenCorpus(corpus_dir)
    result.update(open_s=time.perf_counter() - start, open_rss_mib=current_rss_mib(), open_anon_mib=anon_rss_mib())
    start = time.perf_counter()
    table = CellTextTable.from_corpus(corpus)  # as langcell.train.pretrain does
    stream = _stream(corpus, table, 0)
    result.update(table_stream_s=time.perf_counter() - start, table_stream_rss_mib=current_rss_mib(),
                  table_stream_anon_mib=anon_rss_mib(),
                  n_texts=len(table.texts), batches_per_epoch=stream.batches_per_epoch)
    anon = [result["open_anon_mib"], result["table_stream_anon_mib"]]
    for workers in (0, 2, 4):
        result[f"cells_per_s_{workers}w"] = _throughput(_stream(corpus, table, workers), seconds)
        anon.append(anon_rss_mib())
    long_cells = np.flatnonzero(corpus.lengths >= BASE["max_length"])
    result["cells_per_s_2048"] = _throughput(_stream(corpus, table, 0, long_cells), seconds)
    for name, step in (("resume_0_s", 0), ("resume_late_s", LATE_STEP)):
        start = time.perf_counter()
        next(iter(stream.iterate(start=step)))
        result[name] = time.perf_counter() - start
    anon.append(anon_rss_mib())
    result.update(peak_rss_mib=max_rss_mib(), anon_peak_mib=max(anon))
    return result


def _throughput(stream, seconds: float) -> float:
    """Cells/s over ``seconds`` of batches, after 20 warm-up batches (worker start, first reads)."""
    batches = stream.iterate(start=0)
    for _ in range(20):
        next(batches)
    cells, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        cells += len(next(batches)["cell_index"])
    rate = cells / (time.perf_counter() - start)
    batches.close()
    return rate


# -- driver ----------------------------------------------------------------------------------------------------


def run_child(stage: str, **kwargs) -> dict:
    """Run one measurement in a fresh Python process and return its JSON result."""
    command = [sys.executable, __file__, "--child", stage, "--child-args", json.dumps(kwargs)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


ROWS = [
    ("tokenize cells/s", "tokenize", "cells_per_s"),
    ("tokenize peak RSS (MiB)", "tokenize", "peak_rss_mib"),
    ("open corpus (s)", "stream", "open_s"),
    ("RSS after open (MiB)", "stream", "open_rss_mib"),
    ("text table + stream (s)", "stream", "table_stream_s"),
    ("RSS after table + stream (MiB)", "stream", "table_stream_rss_mib"),
    ("stream cells/s, 0 workers", "stream", "cells_per_s_0w"),
    ("stream cells/s, 2 workers", "stream", "cells_per_s_2w"),
    ("stream cells/s, 4 workers", "stream", "cells_per_s_4w"),
    ("stream cells/s, 2,048-token cells, 0 workers", "stream", "cells_per_s_2048"),
    ("first batch at step 0 (s)", "stream", "resume_0_s"),
    (f"first batch at step {LATE_STEP:,} (s)", "stream", "resume_late_s"),
    ("data path peak RSS, mapped corpus pages included (MiB)", "stream", "peak_rss_mib"),
    ("data path anonymous memory, largest sample (MiB)", "stream", "anon_peak_mib"),
]


def print_table(results: dict[float, dict]) -> None:
    sizes = sorted(results)
    head = "| figure | " + " | ".join(f"{s:g}M cells" for s in sizes) + f" | growth {sizes[0]:g}M -> {sizes[-1]:g}M |"
    print(head)
    print("|---|" + "---:|" * (len(sizes) + 1))
    for label, stage, key in ROWS:
        if any(stage not in results[s] for s in sizes):
            continue
        values = [results[s][stage][key] for s in sizes]
        growth = values[-1] / values[0] if values[0] else float("nan")
        cells = " | ".join(f"{v:,.2f}" if v < 100 else f"{v:,.0f}" for v in values)
        print(f"| {label} | {cells} | {growth:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/scale-data"), help="where the collection goes")
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 0.5, 2.0], help="millions of cells")
    parser.add_argument("--ten-million", action="store_true", help="add 10M cells (~90 GB of disk)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of batches per throughput figure")
    parser.add_argument("--clean", action="store_true", help="delete the collection and corpora at the end")
    parser.add_argument("--keep", action="store_true", help="keep each size's corpus (corpus_<size>M)")
    parser.add_argument("--stream-only", action="store_true",
                        help="measure the stream on the corpora a --keep run left, without tokenizing again")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kwargs = json.loads(args.child_args)
        measure = {"tokenize": measure_tokenize, "stream": measure_stream}[args.child]
        print(json.dumps(measure(**kwargs)))
        return
    sizes = sorted(set(args.sizes) | ({10.0} if args.ten_million else set()))
    check_disk(args.data, sizes)
    print(f"load before: {os.getloadavg()}")
    files = build_collection(args.data, int(round(max(sizes) * 1e6 / FILE_CELLS)))
    results = {}
    for size in sizes:
        n_files = int(round(size * 1e6 / FILE_CELLS))
        out = args.data / f"corpus_{size:g}M"
        results[size] = {}
        if not args.stream_only:
            results[size]["tokenize"] = run_child("tokenize", files=[str(f) for f in files[:n_files]],
                                                  tokenizer=str(args.data / "tokenizer"), out=str(out))
        results[size]["stream"] = run_child("stream", corpus_dir=str(out), seconds=args.seconds)
        results[size]["load"] = os.getloadavg()
        print(f"{size:g}M cells (load {os.getloadavg()[0]:.1f}): {json.dumps(results[size])}", flush=True)
        if not (args.keep or args.stream_only):
            shutil.rmtree(out)
    print(f"\nload after: {os.getloadavg()}; base recipe {BASE}, rank {RANK} of {WORLD_SIZE}\n")
    print_table(results)
    if args.clean:
        shutil.rmtree(args.data)


if __name__ == "__main__":
    main()

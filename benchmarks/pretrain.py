"""Pretraining throughput: length-bucketed token-budget batches vs a pad-to-longest fp32 loop.

Both loops run the same :class:`~langcell.train.pretrain.PretrainObjective` (forward, backward, AdamW
step) on the same model size and real cells, for the same number of cells:

* baseline: fixed batches of ``--batch-size`` cells in random order, padded to the batch's longest
  cell, fp32 (how a plain PyTorch/HF training loop feeds variable-length cells);
* langcell: :class:`~langcell.train.data.PretrainStream` batches (similar lengths together, sized by a
  token budget), fp32 on CPU (bf16 autocast on CUDA).

The cell stage runs on the immune sample (full transcriptome, ~1,100 genes per cell at the median); the
joint stage on CBMC cells with their Cell Ontology texts. Each measurement runs in its own subprocess
so that peak memory (max RSS; CUDA max allocated on a GPU) is its own.

    python benchmarks/pretrain.py                       # small, CPU
    python benchmarks/pretrain.py --size base --device cuda

``--bundle DIR`` trains on the corpora, texts and text tokenizer that ``benchmarks/gpu_bundle.py`` wrote
(a GPU machine has neither ``../shared`` nor the ontology and MiniLM packages); the text tower then starts
from random weights, which changes nothing for speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def build_corpora(workdir: Path, max_length: int) -> dict[str, Path]:
    import anndata as ad
    import numpy as np

    from langcell.data.corpus import write_corpus
    from langcell.data.tokenizer import GeneTokenizer

    corpora = {}
    immune = ad.read_h5ad(SHARED / "immune_sample_559cells_counts.h5ad")
    tok = GeneTokenizer.fit(immune)
    corpora["cell"] = workdir / "immune"
    write_corpus([immune], tok, corpora["cell"], max_length=max_length, progress=False)
    cbmc = ad.read_h5ad(SHARED / "cbmc_citeseq_500genes.h5ad")
    cbmc = cbmc[cbmc.obs["cell_type_ontology_term_id"] != "unknown"]
    cbmc = cbmc[np.random.default_rng(0).permutation(cbmc.n_obs)[:1000]].copy()
    tok = GeneTokenizer.fit(cbmc, gene_id_kind="custom")
    corpora["joint"] = workdir / "cbmc"
    write_corpus([cbmc], tok, corpora["joint"], max_length=max_length, progress=False)
    return corpora


def measure(args: argparse.Namespace) -> dict:
    """One mode, one stage, in this process: cells/s and peak memory."""
    import numpy as np
    import torch

    from langcell.data.batching import pad_sequences
    from langcell.data.corpus import TokenCorpus
    from langcell.models.langcell import LangCell
    from langcell.precision import autocast
    from langcell.train import load_recipe
    from langcell.train.data import CellTextTable, PretrainStream
    from langcell.train.objective import PretrainObjective
    from langcell.train.pretrain import set_trainable

    torch.manual_seed(0)
    device = torch.device(args.device)
    corpus = TokenCorpus(args.corpus)
    config = load_recipe(args.size if args.size != "base" else "base")
    config.max_length = args.max_length
    config.gene_dropout = 0.0
    model_config = config.model_config_for(corpus.tokenizer)
    if args.bundle:  # no MiniLM package there: its tokenizer files from the bundle, random text weights
        model_config.text.tokenizer_from = str(Path(args.bundle) / "text_tokenizer")
        model_config.text.init_from = None
    model = LangCell.from_config(model_config, gene_tokenizer=corpus.tokenizer).to(device)
    set_trainable(model, args.stage, False)
    model.train()
    objective = PretrainObjective(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    table = None
    if args.stage == "joint" and args.bundle:
        from gpu_bundle import read_text_table  # benchmarks/ is on sys.path when run as a script

        table = read_text_table(Path(args.bundle) / "corpora" / "cbmc_texts.json")
    elif args.stage == "joint":
        table = CellTextTable.from_obs(corpus.obs)
    cells = np.arange(len(corpus)) if table is None else table.cells_with_cell_type_text()
    precision = "fp32"
    if args.mode == "langcell":
        stream = PretrainStream(
            corpus, cells, max_tokens=args.max_tokens, max_batch_size=args.batch_size * 4,
            max_length=args.max_length, seed=0, table=table,
        )
        batches = stream.iterate(0)
        precision = "bf16" if device.type == "cuda" else "fp32"
    else:
        rng = np.random.default_rng(0)

        def plain():
            while True:
                order = rng.permutation(cells)
                for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
                    idx = order[start : start + args.batch_size]
                    ids, mask = pad_sequences([corpus[int(i)] for i in idx], corpus.tokenizer.pad_id, args.max_length)
                    item = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask)}
                    if table is not None:
                        item["text_ids"] = torch.as_tensor(table.text_ids[idx, 0].astype(np.int64))
                    yield item

        batches = plain()

    def step(batch, generator):
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        text_tokens = None
        if table is not None:
            inputs["text_group"] = batch["text_ids"].to(device)
            unique = torch.unique(batch["text_ids"]).tolist()
            text_tokens = model.tokenize_texts([table.texts[i] for i in unique], config.text_max_length)
            text_tokens = {k: v.to(device) for k, v in text_tokens.items()}
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            losses = objective(inputs, args.stage, generator, text_tokens)
            loss = sum(losses.values())
        loss.backward()
        optimizer.step()
        return int(inputs["input_ids"].shape[0])

    generator = torch.Generator(device=device).manual_seed(0)
    step(next(batches), generator)  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    n_cells, start = 0, time.perf_counter()
    while n_cells < args.cells:
        n_cells += step(next(batches), generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {"cells": n_cells, "seconds": elapsed, "cells_per_s": n_cells / elapsed, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cells", type=int, default=96, help="cells per measurement")
    parser.add_argument("--batch-size", type=int, default=8, help="baseline batch size")
    parser.add_argument("--max-tokens", type=int, default=8192, help="langcell token budget per batch")
    parser.add_argument("--max-length", type=int, default=1024, help="cells cut to their top genes")
    parser.add_argument("--stages", default="cell,joint")
    parser.add_argument("--bundle", help="corpora, texts and text tokenizer from benchmarks/gpu_bundle.py's folder")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # child process: one measurement
        print(json.dumps(measure(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle:
            corpora = {"cell": Path(args.bundle) / "corpora" / "immune", "joint": Path(args.bundle) / "corpora" / "cbmc"}
        else:
            corpora = build_corpora(Path(tmp), args.max_length)
        rows = []
        for stage in args.stages.split(","):
            results = {}
            for mode in ("baseline", "langcell"):
                command = [sys.executable, __file__, "--mode", mode, "--stage", stage,
                           "--corpus", str(corpora[stage])] + [
                    f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                    if k in ("size", "device", "cells", "batch_size", "max_tokens", "max_length", "bundle")
                    and v is not None
                ]
                out = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), check=False)
                if out.returncode != 0:
                    sys.exit(f"{mode}/{stage} measurement failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
                results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((stage, results))
    unit = "GiB (CUDA max allocated)" if args.device.startswith("cuda") else "GiB (max RSS)"
    print(f"\npretraining throughput, model {args.size}, device {args.device}, {args.cells} cells per measurement")
    print(f"{'stage':<7}{'mode':<10}{'cells/s':>10}{'peak ' + unit:>30}{'ratio':>8}")
    for stage, results in rows:
        base = results["baseline"]["cells_per_s"]
        for mode in ("baseline", "langcell"):
            r = results[mode]
            print(f"{stage:<7}{mode:<10}{r['cells_per_s']:>10.2f}{r['peak_gib']:>30.2f}{r['cells_per_s'] / base:>7.2f}x")


if __name__ == "__main__":
    main()

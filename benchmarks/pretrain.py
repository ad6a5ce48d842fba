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

Tuning rows: ``--variant SPEC`` (repeatable) adds a langcell row with settings changed, ``SPEC`` being
``key=value`` pairs joined by commas: ``adamw`` (``foreach`` or ``fused``: torch's AdamW implementations),
``attention`` (the cell encoder's path: ``packed``, ``masked``, ``nested``, ``varlen``),
``attention_dropout`` (both encoders'; ``varlen`` needs 0), ``compile`` (1: ``torch.compile`` of each cell
encoder layer, dynamic shapes; compile time is excluded by the warm-up step only in part, so give it
enough ``--cells``), ``max_tokens`` (the token budget), ``precision`` (``fp32``, ``bf16``). E.g.
``--variant adamw=fused --variant attention=varlen,attention_dropout=0 --variant precision=fp32``.
``--no-baseline`` skips the pad-to-longest loop (ratios are then left out).

Model FLOPs utilisation (``--count-flops``): after the timed steps, the same batches run forward and
backward again, untimed (once, in the langcell row; a variant with the same token budget trains on the
same batches and shares the count), under :class:`torch.utils.flop_counter.FlopCounterMode`, with the cell encoder on
its ``packed`` path so that only real tokens are counted (no padding). The count is PyTorch's per operator:
``2 m n k`` per matrix product of the cell encoder, text tower and heads, ``4 b h s_q s_k d`` per attention
forward and 2.5 times that backward; the backward of a matrix product counts twice its forward. Loss
arithmetic, softmax, LayerNorm and the optimiser step are not counted. MFU = counted FLOPs / timed seconds
/ the device's peak (``--peak-tflops``; default: 989 dense bf16 TFLOP/s for an H100/H200, 67 fp32 on those,
or none). ``--loss-steps N`` records the first N steps' losses of every langcell row and prints them,
with the largest relative difference of each row's total loss from the first row's (the same seed, cells
and masking: a bf16 row against a ``precision=fp32`` variant shows whether bf16 training follows fp32).
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


PEAK_TFLOPS = {  # dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, by precision
    "bf16": {"H100": 989.0, "H200": 989.0, "A100": 312.0},
    "fp32": {"H100": 67.0, "H200": 67.0, "A100": 19.5},  # plain fp32 (TF32 is off in PyTorch by default)
}


def register_cpu_attention_flops() -> None:
    """Teach FlopCounterMode the CPU flash-attention operators (it counts only the CUDA ones), once."""
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten
    forward = aten._scaled_dot_product_flash_attention_for_cpu
    if forward in flop_counter.flop_registry or forward.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(forward, get_raw=True)
    def _forward(query, key, value, *args, out_val=None, **kwargs):
        return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
    def _backward(grad_out, query, key, value, *args, out_val=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def parse_variant(spec: str) -> dict:
    """``"adamw=fused,max_tokens=131072"`` -> settings for :func:`measure` (values checked there)."""
    known = {"adamw", "attention", "attention_dropout", "compile", "max_tokens", "precision"}
    settings = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in known or not value:
            raise SystemExit(f"bad --variant item {item!r}: use key=value with key one of {sorted(known)}")
        settings[key] = value
    return settings


def measure(args: argparse.Namespace) -> dict:
    """One mode, one stage, in this process: cells/s, peak memory, and optionally losses and FLOPs."""
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

    variant = parse_variant(args.settings or "")
    torch.manual_seed(0)
    device = torch.device(args.device)
    corpus = TokenCorpus(args.corpus)
    config = load_recipe(args.size if args.size != "base" else "base")
    config.max_length = args.max_length
    config.gene_dropout = 0.0
    if "attention_dropout" in variant:
        config.attention_dropout = float(variant["attention_dropout"])
    max_tokens = int(variant.get("max_tokens", args.max_tokens))
    model_config = config.model_config_for(corpus.tokenizer)
    if args.bundle:  # no MiniLM package there: its tokenizer files from the bundle, random text weights
        model_config.text.tokenizer_from = str(Path(args.bundle) / "text_tokenizer")
        model_config.text.init_from = None
    model = LangCell.from_config(model_config, gene_tokenizer=corpus.tokenizer).to(device)
    if "attention" in variant:
        model.cell_encoder.attention = variant["attention"]
    if variant.get("compile") == "1":
        for layer in model.cell_encoder.encoder.layer:
            layer.compile(dynamic=True)
    set_trainable(model, args.stage, False)
    model.train()
    objective = PretrainObjective(model, config)
    adamw = variant.get("adamw")
    if adamw not in (None, "foreach", "fused"):
        raise SystemExit(f"adamw={adamw}: use foreach or fused")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  **({adamw: True} if adamw else {}))
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
            corpus, cells, max_tokens=max_tokens, max_batch_size=args.batch_size * 4,
            max_length=args.max_length, seed=0, table=table,
        )
        batches = stream.iterate(0)
        precision = variant.get("precision", "bf16" if device.type == "cuda" else "fp32")
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

    def forward_backward(batch, generator):
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
        return int(inputs["input_ids"].shape[0]), losses

    losses_seen: list[dict] = []

    def step(batch, generator):
        n, losses = forward_backward(batch, generator)
        optimizer.step()
        if len(losses_seen) < args.loss_steps:  # .item() waits for the GPU: only the first steps
            losses_seen.append({name: float(value) for name, value in losses.items()})
        return n

    generator = torch.Generator(device=device).manual_seed(0)
    step(next(batches), generator)  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    n_cells, timed_batches, start = 0, [], time.perf_counter()
    while n_cells < args.cells:
        batch = next(batches)
        timed_batches.append(batch)
        n_cells += step(batch, generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    result = {"cells": n_cells, "seconds": elapsed, "cells_per_s": n_cells / elapsed, "peak_gib": peak,
              "precision": precision, "losses": losses_seen,
              "tokens": int(sum(int(b["attention_mask"].sum()) for b in timed_batches))}
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        register_cpu_attention_flops()
        model.cell_encoder.attention = "packed"  # real tokens only: padding is not model FLOPs
        counter = FlopCounterMode(display=False)
        with counter:
            for batch in timed_batches:
                forward_backward(batch, generator)
        result["flops"] = counter.get_total_flops()
    return result


def peak_tflops(args: argparse.Namespace, precision: str) -> float | None:
    """The device's peak for ``precision``: ``--peak-tflops``, else the data-sheet table by GPU name."""
    if args.peak_tflops:
        return args.peak_tflops
    if not args.device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    table = PEAK_TFLOPS["bf16" if precision == "bf16" else "fp32"]
    return next((peak for gpu, peak in table.items() if gpu in name), None)


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
    parser.add_argument("--variant", action="append", default=[], help="a tuning row (module docstring)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the pad-to-longest loop")
    parser.add_argument("--count-flops", action="store_true", help="count model FLOPs and report MFU")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for the MFU column")
    parser.add_argument("--loss-steps", type=int, default=0, help="record and print the first N losses")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # child process: one measurement
        print(json.dumps(measure(args)))
        return
    for spec in args.variant:
        parse_variant(spec)  # refuse a bad spec before anything runs

    passed = ("size", "device", "cells", "batch_size", "max_tokens", "max_length", "bundle", "loss_steps")
    runs = ([] if args.no_baseline else [("baseline", "baseline", "")]) + [("langcell", "langcell", "")]
    runs += [("langcell", spec, spec) for spec in args.variant]
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle:
            corpora = {"cell": Path(args.bundle) / "corpora" / "immune", "joint": Path(args.bundle) / "corpora" / "cbmc"}
        else:
            corpora = build_corpora(Path(tmp), args.max_length)
        rows = []
        for stage in args.stages.split(","):
            for mode, label, spec in runs:
                command = [sys.executable, __file__, "--mode", mode, "--stage", stage,
                           "--corpus", str(corpora[stage]), f"--settings={spec}"]
                command += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in passed and v is not None]
                # A variant that keeps the token budget trains on the very same batches as the langcell
                # row, so it has the same model FLOPs: counted once, for the langcell row.
                if args.count_flops and mode == "langcell" and (label == "langcell" or "max_tokens" in spec):
                    command.append("--count-flops")
                out = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), check=False)
                if out.returncode != 0:  # report and go on: one failing variant must not cost the others
                    print(f"{label}/{stage} measurement failed (exit {out.returncode}):\n{out.stderr[-3000:]}",
                          flush=True)
                    continue
                result = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append((stage, label, result))
                print(f"{stage} {label}: {result['cells_per_s']:.2f} cells/s", flush=True)
    unit = "GiB (CUDA max allocated)" if args.device.startswith("cuda") else "GiB (max RSS)"
    print(f"\npretraining throughput, model {args.size}, device {args.device}, {args.cells} cells per measurement")
    print(f"| stage | run | precision | cells/s | tokens/s | peak {unit} | / baseline | model TFLOP/s | MFU |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for stage, label, r in rows:
        base = next((b["cells_per_s"] for s_, lab, b in rows if s_ == stage and lab == "baseline"), None)
        ratio = f"{r['cells_per_s'] / base:.2f}x" if base else ""
        tflops = mfu = ""
        flops = r.get("flops")
        if flops is None and label != "baseline":
            flops = next((b.get("flops") for s_, lab, b in rows if s_ == stage and lab == "langcell"), None)
        if flops is not None:
            achieved = flops / r["seconds"] / 1e12
            tflops = f"{achieved:.3g}"
            peak = peak_tflops(args, r["precision"])
            mfu = f"{achieved / peak:.1%}" if peak else ""
        print(f"| {stage} | {label} | {r['precision']} | {r['cells_per_s']:.2f} | {r['tokens'] / r['seconds']:.0f} "
              f"| {r['peak_gib']:.2f} | {ratio} | {tflops} | {mfu} |")
    if args.loss_steps:
        print("\nlosses of the first steps (same seed, cells and masking in every langcell row):")
        for stage in args.stages.split(","):
            series = [(label, r["losses"]) for s_, label, r in rows if s_ == stage and label != "baseline"]
            if not series:
                continue
            reference = [sum(step.values()) for step in series[0][1]]
            for label, losses in series:
                totals = [sum(step.values()) for step in losses]
                worst = max((abs(a - b) / abs(b) for a, b in zip(totals, reference, strict=False) if b), default=0.0)
                shown = " ".join(f"{t:.4f}" for t in totals)
                print(f"{stage} {label}: {shown}  (largest relative difference from {series[0][0]}: {worst:.2e})")


if __name__ == "__main__":
    main()

"""CPU low precision: ``precision="bf16"`` and ``"int8"`` against this project's fp32 and the release's loop.

Three parts, in one process, on this machine's CPU (its ``lscpu`` model name and matrix-unit flags are
printed first and stored with every row of the JSON report):

1. **Speed of ``base`` cell embeddings** (random weights: speed does not depend on them) on the first
   ``--cells`` cells of the immune sample (full transcriptome, the released gene vocabulary, 2,048 tokens
   at most, as ``benchmarks/encode.py``): :func:`langcell.inference.embed.embed_cells` in fp32 (the
   baseline of the ratios), in bf16 as shipped (weights of the linear and embedding layers held in bf16,
   activations in bf16), under plain bf16 autocast (what ``precision="bf16"`` did before: fp32 weights
   cast at every call), and in int8 (torch's dynamic int8 linear layers on the cell side, the text tower in
   fp32); plus the release-shaped loop (``transformers.BertModel`` eager fp32, batches of 32 padded to
   their longest cell) on
   ``--baseline-cells`` cells. The settings take turns in ``--rounds`` rounds (shared machine: load hits
   them alike); the median round is reported.
2. **Speed of zero-shot annotation** (``base``, random weights, fast mode with top_k = 3) at K = 8 and
   K = 100 on the same cells: :func:`langcell.inference.zero_shot.zero_shot_scores` at each precision,
   the class texts embedded once per precision, and the release-shaped loop of
   ``benchmarks/zero_shot.py`` on one cell per K (padded to the longest cell of its batch of 32).
3. **Agreement on trained models** (``--model DIR --data pbmc68k|cbmc``, repeatable): on the held-out
   cells of the model's dataset (as ``benchmarks/cell_identity.py`` splits them), zero-shot in fast
   mode with the dataset's classes (K = its number of types) and with 100 classes (padded with other
   leukocyte types of the Cell Ontology, as ``benchmarks/exact_argmax.py``): the largest absolute
   difference of the final scores from fp32, the share of cells whose predicted class changes, and the
   accuracy at each precision.

After part 1, one batch of bf16 embeddings (the first 8 cells) runs under ``torch.profiler`` and the share
of its CPU time per kind of operation is printed: where the time goes that bf16 does not remove.

Run from the repository root::

    python benchmarks/cpu_precision.py --model /path/demo/model --data pbmc68k \\
        --model /path/cbmc/model --data cbmc --json cpu_precision.json
    python benchmarks/cpu_precision.py --quick       # speed only, fewer cells
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from cell_identity import CBMC, LABEL_KEY, held_out_cells  # sibling scripts: run as `python benchmarks/...`
from encode import RELEASE_BATCH_SIZE, hf_twin, run_baseline, tokenized_cells
from exact_argmax import class_sets as padded_class_sets
from zero_shot import ALPHA, class_sets, padded_cell_encoder, release_loop

from langcell import ontology
from langcell._atomic import write_json
from langcell.inference.embed import embed_cells
from langcell.inference.zero_shot import encode_class_texts, zero_shot_scores
from langcell.models import LangCell
from langcell.models.config import LangCellConfig
from langcell.precision import autocast, cpu_matrix_units

#: The settings of ours, by the name printed in the tables.
SETTINGS = ("fp32", "bf16", "bf16 autocast", "int8")
FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni")


def machine() -> dict:
    """lscpu's model name, the low-precision flags this CPU has, the core count and torch's version."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model_name = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model_name = "unknown"
    try:
        cpu_flags = next(
            line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        cpu_flags = sorted(cpu_matrix_units())
    return {
        "model_name": model_name,
        "flags": [flag for flag in FLAGS if flag in cpu_flags],
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def ours(setting: str):
    """``(precision, context)`` of a setting: the precision argument and a context around the call."""
    if setting == "bf16 autocast":  # the old behaviour: fp32 passes under autocast, weights cast per call
        return "fp32", autocast("bf16", torch.device("cpu"))
    return setting, torch.autocast("cpu", enabled=False)


def take_turns(functions: dict, rounds: int) -> tuple[dict, dict]:
    """Run every function once per round, in a rotating order; return (median seconds, last results)."""
    seconds = {name: [] for name in functions}
    results = {}
    names = list(functions)
    for round_index in range(rounds):
        turn = round_index % len(names)
        for name in names[turn:] + names[:turn]:
            start = time.perf_counter()
            results[name] = functions[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}, results


def embedding_speed(model: LangCell, sequences, args) -> list[dict]:
    """Part 1: cells/s of each setting and of the release loop; max abs difference from ours fp32."""
    hf = hf_twin(model)

    def call(setting):
        precision, context = ours(setting)

        def run():
            with context:
                return embed_cells(model, sequences, max_tokens=args.max_tokens, precision=precision)
        return run

    functions = {setting: call(setting) for setting in SETTINGS}
    baseline_cells = sequences[: args.baseline_cells]
    functions["release loop"] = lambda: run_baseline(hf, model.cell_proj, baseline_cells)[1].numpy()
    for precision in ("fp32", "bf16", "int8"):  # warm-up: one-time allocation and kernel selection
        embed_cells(model, sequences[:1], precision=precision)
    median, results = take_turns(functions, args.rounds)
    rows = []
    base_rate = args.baseline_cells / median["release loop"]
    fp32_rate = len(sequences) / median["fp32"]
    for setting in SETTINGS:
        rate = len(sequences) / median[setting]
        rows.append({
            "part": "embeddings", "size": args.size, "setting": setting, "cells": len(sequences),
            "cells_per_s": rate, "over_fp32": rate / fp32_rate, "over_release_loop": rate / base_rate,
            "max_abs_diff_vs_fp32": float(np.abs(results[setting] - results["fp32"]).max()),
        })
    rows.append({"part": "embeddings", "size": args.size, "setting": "release loop (HF eager fp32, batches of 32)",
                 "cells": args.baseline_cells, "cells_per_s": base_rate, "over_fp32": base_rate / fp32_rate,
                 "over_release_loop": 1.0, "max_abs_diff_vs_fp32": None})
    return rows


#: Kinds of operation in the bf16 profile, by the ATen names that belong to each (first match wins).
OPERATION_KINDS = {
    "attention (SDPA)": ("scaled_dot_product", "flash_attention"),
    "matrix products (linear layers)": ("aten::addmm", "aten::mm", "aten::linear", "aten::bmm", "aten::matmul"),
    "LayerNorm": ("layer_norm",),
    "GELU": ("gelu",),
    "copies (bias into addmm output, dtype casts)": ("aten::to", "aten::_to_copy", "aten::copy_", "aten::contiguous", "aten::clone"),
}


def bf16_profile(model: LangCell, sequences, args) -> list[dict]:
    """Share of the CPU time of one bf16 embedding batch per kind of operation (self time, top level)."""
    from torch.profiler import ProfilerActivity, profile

    batch = sequences[:8]
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        embed_cells(model, batch, max_tokens=args.max_tokens, precision="bf16")
    self_time = {}
    for event in profiler.key_averages():
        kind = next((kind for kind, names in OPERATION_KINDS.items() if any(n in event.key for n in names)), "other")
        self_time[kind] = self_time.get(kind, 0.0) + event.self_cpu_time_total
    total = sum(self_time.values())
    rows = [{"part": "bf16 profile", "kind": kind, "share": seconds / total}
            for kind, seconds in sorted(self_time.items(), key=lambda item: -item[1])]
    print("  bf16 embedding batch, share of CPU time: "
          + "; ".join(f"{row['kind']} {row['share']:.0%}" for row in rows), flush=True)
    return rows


def zero_shot_speed(model: LangCell, sequences, pad_to: int, args) -> list[dict]:
    """Part 2: fast-mode cells/s per precision at K = 8 and 100, and the release loop on one cell."""
    rows = []
    baseline_encoder = padded_cell_encoder(model, "hf-eager")
    for n_classes, labels in class_sets().items():
        texts, _ = ontology.label_texts(labels)
        texts = [texts[label] for label in labels]

        def call(setting, texts=texts, labels=labels):
            precision, context = ours(setting)

            def run():
                with context:
                    classes = encode_class_texts(model, texts, labels, precision=precision)
                    return zero_shot_scores(model, sequences, classes, alpha=ALPHA, top_k=3, mode="fast",
                                            max_tokens=args.max_tokens, precision=precision).scores
            return run

        median, results = take_turns({setting: call(setting) for setting in SETTINGS}, args.rounds)
        text_seconds, cell_seconds, _ = release_loop(model, baseline_encoder, [sequences[0]], pad_to, texts)
        release_per_cell = text_seconds / RELEASE_BATCH_SIZE + cell_seconds  # texts are per batch of 32
        fp32_rate = len(sequences) / median["fp32"]
        for setting in SETTINGS:
            rate = len(sequences) / median[setting]
            changed = results[setting].argmax(axis=1) != results["fp32"].argmax(axis=1)
            rows.append({
                "part": "zero-shot fast", "size": args.size, "K": n_classes, "setting": setting,
                "cells": len(sequences), "cells_per_s": rate, "over_fp32": rate / fp32_rate,
                "over_release_loop": rate * release_per_cell,
                "max_abs_diff_vs_fp32": float(np.abs(results[setting] - results["fp32"]).max()),
                "changed": float(changed.mean()),
            })
        print(f"  zero-shot K={n_classes} done", flush=True)
    return rows


def agreement(model_dir: str, data: str, args) -> list[dict]:
    """Part 3: final scores and predictions of bf16 and int8 against fp32 on a trained model."""
    model = LangCell.from_pretrained(model_dir).eval()
    test = held_out_cells(data, args.data_path, seed=0)
    types = test.obs[LABEL_KEY].value_counts().index.tolist()
    truth = test.obs[LABEL_KEY].astype(str).to_numpy()
    cells = model.gene_tokenizer.encode(test, max_length=int(model.config.cell.max_position_embeddings))
    rows = []
    for k, (names, texts) in padded_class_sets(types).items():
        scores, seconds = {}, {}
        for setting in ("fp32", "bf16", "int8"):
            start = time.perf_counter()
            classes = encode_class_texts(model, texts, names, precision=setting)
            scores[setting] = zero_shot_scores(model, cells, classes, top_k=3, precision=setting).scores
            seconds[setting] = time.perf_counter() - start
        names_array = np.asarray(names, dtype=object)
        for setting in ("bf16", "int8"):
            changed = scores[setting].argmax(axis=1) != scores["fp32"].argmax(axis=1)
            rows.append({
                "part": "agreement", "data": data, "model": model_dir, "K": k, "cells": len(cells),
                "setting": setting, "max_abs_diff_vs_fp32": float(np.abs(scores[setting] - scores["fp32"]).max()),
                "changed": float(changed.mean()), "n_changed": int(changed.sum()),
                "accuracy_fp32": float((names_array[scores["fp32"].argmax(axis=1)] == truth).mean()),
                "accuracy": float((names_array[scores[setting].argmax(axis=1)] == truth).mean()),
                "over_fp32": seconds["fp32"] / seconds[setting],
            })
        print(f"  agreement {data} K={k} done", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    """The three tables of BENCHMARKS.md."""
    lines = ["| part | K | ours | cells | cells/s | / ours fp32 | / release loop | max abs diff vs fp32 | changed class |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["part"] in ("agreement", "bf16 profile"):
            continue
        diff = "" if row["max_abs_diff_vs_fp32"] is None else f"{row['max_abs_diff_vs_fp32']:.1e}"
        changed = f"{row['changed']:.1%}" if "changed" in row else ""
        lines.append(f"| {row['part']} ({row['size']}) | {row.get('K', '')} | {row['setting']} | {row['cells']} "
                     f"| {row['cells_per_s']:.3f} | {row['over_fp32']:.2f}x | {row['over_release_loop']:.1f}x "
                     f"| {diff} | {changed} |")
    agreement_rows = [row for row in rows if row["part"] == "agreement"]
    if agreement_rows:
        lines += ["", "| data | K | cells | ours | max abs diff of final scores | cells changing class "
                  "| accuracy fp32 -> this | time / fp32 |", "|---|---|---|---|---|---|---|---|"]
        for row in agreement_rows:
            lines.append(f"| {row['data']} | {row['K']} | {row['cells']} | {row['setting']} "
                         f"| {row['max_abs_diff_vs_fp32']:.1e} | {row['n_changed']} ({row['changed']:.2%}) "
                         f"| {row['accuracy_fp32']:.3f} -> {row['accuracy']:.3f} | {1 / row['over_fp32']:.2f} |")
    profile_rows = [row for row in rows if row["part"] == "bf16 profile"]
    if profile_rows:
        lines += ["", "bf16 embedding batch (8 cells), share of CPU time: "
                  + "; ".join(f"{row['kind']} {row['share']:.0%}" for row in profile_rows)]
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run the three parts, print the tables and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base", choices=["small", "base"], help="preset timed (default base)")
    parser.add_argument("--cells", type=int, default=48, help="cells timed per setting (default 48)")
    parser.add_argument("--baseline-cells", type=int, default=8, help="cells of the release loop (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds the settings take turns in (default 3)")
    parser.add_argument("--max-tokens", type=int, default=16_384, help="cell tokens per batch for ours")
    parser.add_argument("--model", action="append", default=[], help="a trained model for part 3 (repeatable)")
    parser.add_argument("--data", action="append", default=[], choices=["pbmc68k", "cbmc"],
                        help="the dataset of each --model, in the same order")
    parser.add_argument("--data-path", default=str(CBMC), help="cbmc_citeseq_500genes.h5ad (--data cbmc)")
    parser.add_argument("--quick", action="store_true", help="16 cells, 4 baseline cells, 1 round, no part 3")
    parser.add_argument("--skip-speed", action="store_true", help="only part 3")
    parser.add_argument("--json", help="write every row and the machine here")
    args = parser.parse_args()
    if len(args.model) != len(args.data):
        parser.error("give one --data per --model")
    if args.quick:
        args.cells, args.baseline_cells, args.rounds, args.model, args.data = 16, 4, 1, [], []
    info = machine()
    print(f"CPU: {info['model_name']}; flags: {', '.join(info['flags']) or 'none'}; {info['cpus']} CPUs, "
          f"{info['torch_threads']} torch threads; torch {info['torch']}; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    rows = []
    if not args.skip_speed:
        sequences, gene_tokenizer = tokenized_cells(max(args.cells, RELEASE_BATCH_SIZE))
        pad_to = int(max(len(s) for s in sequences[:RELEASE_BATCH_SIZE]))  # the release pads batch 1 to this
        sequences = sequences[: args.cells]
        config = LangCellConfig.preset(args.size)
        config.text.init_from = None  # random weights: speed does not depend on them
        torch.manual_seed(0)
        model = LangCell(config, gene_tokenizer=gene_tokenizer).eval()
        rows += embedding_speed(model, sequences, args)
        print("  embeddings done", flush=True)
        rows += bf16_profile(model, sequences, args)
        rows += zero_shot_speed(model, sequences, pad_to, args)
    for model_dir, data in zip(args.model, args.data, strict=True):
        rows += agreement(model_dir, data, args)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}\n")
    print(markdown(rows))
    if args.json:
        write_json(args.json, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()

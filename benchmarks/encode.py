"""Cell encoding throughput: ``LangCell.encode_cells`` against the released pipeline's way.

Baseline (what the released notebook does): ``transformers.BertModel`` with eager attention in fp32,
batches of 32 cells in file order, each padded to its longest cell, ``torch.no_grad``; the embedding is
``cell_proj`` of the first token, L2-normalised.

Ours: the same weights in :class:`langcell.models.LangCell`, through the library's
:func:`langcell.inference.embed.embed_cells` (what ``tl.embed`` runs): cells grouped by length into batches under
a token budget, SDPA attention, ``torch.inference_mode``; ``--bf16`` adds its ``precision="bf16"``.

The cells are real: the first ``--cells`` cells of the immune sample
(``../shared/data/immune_sample_559cells_counts.h5ad``), tokenized with the released gene vocabulary
(``GeneTokenizer.from_geneformer`` over Geneformer's dictionaries), 2,048 tokens at most. Weights are
random (speed does not depend on them); both sides get identical weights and the script checks that
their embeddings agree.

Run from the repository root::

    python benchmarks/encode.py            # small and base, 96 cells each
    python benchmarks/encode.py --quick    # 32 cells each (about 5 minutes on 2 cores)
    python benchmarks/encode.py --bf16     # add a row for ours with precision='bf16' (other numerics)
    python benchmarks/encode.py --device cuda --bf16 --cells 559   # on a GPU: both sides there

``--attention PATH ...`` adds rows for the cell encoder called directly on the same batches with each
attention path forced (``CellEncoder.forward(attention=...)``: ``packed``, ``masked``, ``nested``,
``varlen``; the default packs on the CPU only), in fp32 and, with ``--bf16``, in bf16 both ways
(autocast, and the weights held in bf16: ``inference_precision(bf16_weights=...)``), to measure which
path and which bf16 mechanism pay on the device. A path that fails there (``varlen`` needs CUDA and
bf16) prints its error and the next one runs. ``nested`` is very slow on the CPU. ``--bundle DIR`` reads the cells
tokenized by ``benchmarks/gpu_bundle.py`` instead of the h5ad (on a GPU machine without anndata or ``../shared``); ``--cells`` beyond the 559 cells
of the sample repeats them, so that a GPU run lasts long enough to time.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from langcell.data.batching import pad_sequences, token_budget_batches
from langcell.data.tokenizer import GeneTokenizer
from langcell.inference.embed import embed_cells
from langcell.models import LangCell
from langcell.models.config import LangCellConfig
from langcell.precision import inference_precision

SHARED = Path(__file__).resolve().parents[2] / "shared"
SAMPLE = SHARED / "data" / "immune_sample_559cells_counts.h5ad"
GENEFORMER = SHARED / "reference" / "geneformer"
RELEASE_BATCH_SIZE = 32


def tokenized_cells(n_cells: int, bundle: str | None = None) -> tuple[list[np.ndarray], GeneTokenizer]:
    """The first ``n_cells`` cells of the immune sample as rank-value token sequences (<cls> first).

    Read from ``bundle`` (``benchmarks/gpu_bundle.py``) when given. Beyond the sample's cells, the sample
    is repeated in order.
    """
    if bundle is not None:
        from gpu_bundle import read_cells  # benchmarks/ is on sys.path when run as a script

        cells, tokenizer = read_cells(Path(bundle) / "immune")
    else:
        import anndata

        tokenizer = GeneTokenizer.from_geneformer(
            GENEFORMER / "token_dictionary.pkl", GENEFORMER / "gene_median_dictionary.pkl"
        )
        encoded = tokenizer.encode(anndata.read_h5ad(SAMPLE), max_length=2048)
        cells = [np.asarray(encoded[i], dtype=np.int64) for i in range(len(encoded))]
    return [cells[i % len(cells)] for i in range(n_cells)], tokenizer


def hf_twin(model: LangCell):
    """A ``transformers.BertModel`` (eager attention) holding the cell encoder's weights."""
    from transformers import BertConfig, BertModel

    cell = model.config.cell
    hf = BertModel(
        BertConfig(
            vocab_size=cell.vocab_size,
            hidden_size=cell.hidden_size,
            num_hidden_layers=cell.num_hidden_layers,
            num_attention_heads=cell.num_attention_heads,
            intermediate_size=cell.intermediate_size,
            hidden_act=cell.hidden_act,
            max_position_embeddings=cell.max_position_embeddings,
            type_vocab_size=cell.type_vocab_size,
            layer_norm_eps=cell.layer_norm_eps,
            attn_implementation="eager",
        ),
        add_pooling_layer=False,
    )
    hf.load_state_dict(model.cell_encoder.state_dict(), strict=True)
    return hf.eval()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that the clock measures it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_baseline(hf, cell_proj, sequences) -> tuple[float, torch.Tensor]:
    """Release-style encoding; returns (seconds, embeddings in input order)."""
    device = cell_proj.weight.device
    out = []
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(sequences), RELEASE_BATCH_SIZE):
            ids, mask = pad_sequences(sequences[first : first + RELEASE_BATCH_SIZE], pad_id=0)
            ids, mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
            states = hf(input_ids=ids, attention_mask=mask).last_hidden_state
            out.append(F.normalize(cell_proj(states[:, 0]), dim=-1).cpu())
    synchronize(device)
    return time.perf_counter() - start, torch.cat(out)


def run_ours(model: LangCell, sequences, max_tokens: int, *, bf16: bool = False) -> tuple[float, torch.Tensor]:
    """The library's :func:`langcell.inference.embed.embed_cells`; returns (seconds, embeddings in input order).

    Length-bucketed under a token budget, inference mode, SDPA. ``bf16`` passes ``precision="bf16"``
    (the library's bf16 for the device: weights in bf16 on a CPU, autocast on a GPU; other numerics).
    """
    synchronize(model.logit_scale.device)
    start = time.perf_counter()
    out = embed_cells(model, sequences, max_tokens=max_tokens, precision="bf16" if bf16 else "fp32")
    return time.perf_counter() - start, torch.from_numpy(out)  # embed_cells returns host arrays: synced


def run_encoder(
    model: LangCell, sequences, max_tokens: int, *, attention: str, precision: str, bf16_weights: bool = False
) -> tuple[float, torch.Tensor]:
    """The cell encoder called directly on ``attention``'s path; same batches as ``embed_cells``.

    ``precision`` is ``"fp32"`` or ``"bf16"``; with bf16, ``bf16_weights`` holds the cell side's weights
    in bf16 instead of autocasting.
    """
    device = model.logit_scale.device
    lengths = np.array([len(s) for s in sequences])
    batches = token_budget_batches(lengths, max_tokens)
    out = torch.zeros(len(sequences), model.config.projection_dim)
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode(), inference_precision(
        model, precision, device, part=model.cell_modules(), bf16_weights=bf16_weights
    ):
        for index in batches:
            ids, mask = pad_sequences([sequences[int(i)] for i in index], pad_id=0)
            ids, mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
            first = model.cell_encoder(ids, mask, first_token_only=True, attention=attention)
            out[torch.from_numpy(index)] = F.normalize(model.cell_proj(first).float(), dim=-1).cpu()
    synchronize(device)
    return time.perf_counter() - start, out


def main() -> None:
    """Parse arguments, time both pipelines per preset, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["small", "base"], choices=LangCellConfig.preset_names())
    parser.add_argument("--cells", type=int, default=96, help="first N cells of the sample (default 96)")
    parser.add_argument("--max-tokens", type=int, default=16_384, help="token budget per batch for ours")
    parser.add_argument("--quick", action="store_true", help="32 cells per preset")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="where both sides run, e.g. cuda (default cpu)")
    parser.add_argument(
        "--bf16", action="store_true", help="also time ours with precision='bf16' (other numerics)"
    )
    parser.add_argument(
        "--attention", nargs="+", default=[], choices=["packed", "masked", "nested", "varlen"],
        help="also time the cell encoder directly on these attention paths (module docstring)",
    )
    parser.add_argument("--bundle", help="cells and text tokenizer from benchmarks/gpu_bundle.py's folder")
    args = parser.parse_args()
    if args.bundle is None and not SAMPLE.is_file():
        raise SystemExit(f"the immune sample is missing: {SAMPLE}")
    if args.threads:
        torch.set_num_threads(args.threads)
    n_cells = 32 if args.quick else args.cells
    sequences, gene_tokenizer = tokenized_cells(n_cells, args.bundle)
    lengths = np.array([len(s) for s in sequences])
    print(
        f"{len(sequences)} cells of {SAMPLE.name}: tokens per cell mean {lengths.mean():.0f}, median "
        f"{np.median(lengths):.0f}, max {lengths.max()}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {os.cpu_count()} CPUs"
    )
    rows = []
    for preset in args.presets:
        config = LangCellConfig.preset(preset)
        config.text.init_from = None  # the text tower is not used here: random init is enough
        if args.bundle:
            config.text.tokenizer_from = str(Path(args.bundle) / "text_tokenizer")
        torch.manual_seed(0)
        model = LangCell(config, gene_tokenizer=gene_tokenizer).eval().to(args.device)
        hf = hf_twin(model).to(args.device)
        # Warm-up on one short cell each, so that one-time allocation is not timed.
        run_baseline(hf, model.cell_proj, sequences[:1])
        run_ours(model, sequences[:1], args.max_tokens)
        base_seconds, base_emb = run_baseline(hf, model.cell_proj, sequences)
        ours_seconds, ours_emb = run_ours(model, sequences, args.max_tokens)
        difference = float((base_emb - ours_emb).abs().max())
        rows.append((preset, "fp32", len(sequences) / base_seconds, len(sequences) / ours_seconds, difference))
        print(f"  {preset}: baseline {base_seconds:.1f} s, ours {ours_seconds:.1f} s", flush=True)
        if args.bf16:
            run_ours(model, sequences[:1], args.max_tokens, bf16=True)
            bf16_seconds, bf16_emb = run_ours(model, sequences, args.max_tokens, bf16=True)
            difference = float((base_emb - bf16_emb).abs().max())
            rows.append((preset, "bf16 (library default)", len(sequences) / base_seconds, len(sequences) / bf16_seconds,
                         difference))
            print(f"  {preset}: ours in bf16 {bf16_seconds:.1f} s", flush=True)
        settings = [("fp32", False)] + ([("bf16", False), ("bf16", True)] if args.bf16 else [])
        for precision, bf16_weights in settings:
            for attention in args.attention:
                label = (f"{precision}{' weights' if bf16_weights else ' autocast' if precision == 'bf16' else ''}"
                         f", cell encoder attention={attention}")
                try:  # warm-up on one batch's worth of cells: kernels chosen, memory allocated
                    run_encoder(model, sequences[:32], args.max_tokens, attention=attention,
                                precision=precision, bf16_weights=bf16_weights)
                    seconds, emb = run_encoder(model, sequences, args.max_tokens, attention=attention,
                                               precision=precision, bf16_weights=bf16_weights)
                except Exception as error:  # noqa: BLE001 - report the path's failure, time the others
                    print(f"  {preset}: {label} FAILED: {type(error).__name__}: {error}", flush=True)
                    continue
                difference = float((base_emb - emb).abs().max())
                rows.append((preset, label, len(sequences) / base_seconds, len(sequences) / seconds, difference))
                print(f"  {preset}: {label} {seconds:.2f} s", flush=True)
        del model, hf

    print()
    print("| preset | cells | ours in | HF BertModel eager fp32, batches of 32 (cells/s) "
          "| langcell encode_cells (cells/s) | speed-up | max abs diff of embeddings |")
    print("|---|---|---|---|---|---|---|")
    for preset, precision, base_rate, ours_rate, difference in rows:
        print(
            f"| {preset} | {len(sequences)} | {precision} | {base_rate:.3f} | {ours_rate:.3f} "
            f"| {ours_rate / base_rate:.2f}x | {difference:.1e} |"
        )


if __name__ == "__main__":
    main()

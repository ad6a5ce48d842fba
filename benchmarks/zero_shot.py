"""Zero-shot annotation throughput: ``langcell.tl.annotate`` against a loop shaped like the released notebook.

Baseline (the released ``zero-shot.ipynb``): fixed batches of 32 cells in file order, each padded to its
longest cell, fp32, ``torch.no_grad``. Per batch: every class text is tokenised and embedded again (one
text at a time), the cells are encoded by ``transformers.BertModel`` with eager attention holding our cell
encoder's weights (the release's ``cell_bert`` is such a model; ``--baseline-cell-encoder sdpa`` uses our
own encoder instead, padded the same way, on its masked SDPA path), and for every class the text is
tokenised again, repeated once per cell and run through the multimodal tower as (cell, text) pairs
(``match_logits(..., cell_index=arange(B))``): each cell's cross-attention keys/values are projected anew
for every class. Then ``p_sim = softmax(cos / 0.05)``,
``p_ctm = softmax(match probabilities)``, ``0.1 * p_sim + 0.9 * p_ctm``.

Ours: what ``langcell.tl.annotate`` does, in ``mode="fast"`` (CTM for each cell's ``top_k`` classes by
similarity) and ``mode="official"`` (CTM for every class): tokenise the AnnData and the class texts once,
embed the texts once, then :func:`langcell.inference.zero_shot.zero_shot_scores` (keys/values projected once per
cell, cells grouped by length under a token budget, ``torch.inference_mode``). The one-time work is
charged per cell over the ``--cells`` cells in both modes. The script checks that these pieces give
``annotate``'s own output.

The baseline is slow, so it is timed on a few cells only (``--baseline-cells``): the first rows of the
first batch of 32, padded to the longest cell *of that whole batch* (as the release pads them), so that
their cost per cell is the cost per cell of the full batch; its per-batch text work is charged at 1/32
per cell. The official mode is timed on the same cells, and the script checks that the baseline's
scores equal the official mode's there (same weights, same cells). This machine is shared, so the
methods take turns (fast cells, one official cell, one baseline cell, fast cells, ...) and load from
other processes hits them alike; the load average is printed.

Cells: the first ``--cells`` cells of the immune sample (``../shared/data/immune_sample_559cells_counts.h5ad``,
full transcriptome, raw counts) tokenized with the released gene vocabulary (``GeneTokenizer.from_geneformer``
over Geneformer's dictionaries), 2,048 tokens at most. Classes: K = 8 (the release's PBMC labels, resolved
through the Cell Ontology) and K = 100 (those 8 and the first 92 other leukocyte types of CL, by term id,
that have a definition). Weights are random (speed does not depend on them).

``--device cuda`` runs the model, the baseline and ours there (every clock is read after the GPU's
queued work is done, and each method runs once untimed first, so that CUDA's start-up is not timed).
``--bundle DIR`` reads the cells (tokenized) and the two class sets (texts rendered) from the folder
``benchmarks/gpu_bundle.py`` writes, for a GPU machine without anndata, the ontology package or
``../shared``; ``--cells`` beyond the sample's 559 cells repeats them. The AnnData is then neither
tokenised nor annotated: the one-time cost charged per cell is the class texts only, and the
end-to-end check against ``annotate`` is skipped (the baseline-against-official check stays). One cell
at a time leaves a GPU mostly idle (the release feeds it batches of 32): ``--batched`` gives the
baseline and the official mode all their ``--baseline-cells`` cells in one call per K (one round), so
that ``--baseline-cells 32`` times the release's first batch as it runs.

Run from the repository root::

    python benchmarks/zero_shot.py                 # base size, about 8 minutes on 2 idle cores
    python benchmarks/zero_shot.py --quick         # fewer cells
    python benchmarks/zero_shot.py --size small
    python benchmarks/zero_shot.py --precision bf16 # ours in bf16 (the baseline stays fp32)
    python benchmarks/zero_shot.py --device cuda --bundle .gpu --cells 512 --baseline-cells 32 8 --precision bf16
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

# encode is the sibling script: run this one as `python benchmarks/zero_shot.py`.
from encode import hf_twin, synchronize
from gpu_bundle import ZERO_SHOT_CLASSES, read_cells, read_zero_shot_classes

from langcell import ontology, tl
from langcell.data.batching import pad_sequences
from langcell.data.tokenizer import GeneTokenizer
from langcell.inference.zero_shot import encode_class_texts, zero_shot_scores
from langcell.models import LangCell
from langcell.models.config import LangCellConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
SAMPLE = SHARED / "data" / "immune_sample_559cells_counts.h5ad"
GENEFORMER = SHARED / "reference" / "geneformer"
RELEASE_BATCH_SIZE = 32
ALPHA = 0.1
# langcell.ontology and langcell.tl import neither the ontology package nor anndata until they are used, so
# that the --bundle run works on a machine without them.
# The PBMC10K labels of the released notebook.
RELEASE_LABELS = [
    "B cells",
    "CD8 T cells",
    "CD14+ Monocytes",
    "Dendritic Cells",
    "NK cells",
    "Megakaryocytes",
    "FCGR3A+ Monocytes",
    "CD4 T cells",
]


def class_sets() -> dict[int, list[str]]:
    """K = 8 (release labels) and K = 100 (CL term ids) class lists."""
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    parser = OntologyParser()
    release_terms = ontology.resolve_labels(RELEASE_LABELS)["term_id"].tolist()
    leukocytes = sorted(parser.get_term_descendants("CL:0000738"))
    others = [
        term
        for term in leukocytes
        if term not in release_terms
        and parser.get_term_description(term)
        and not parser.is_term_deprecated(term)
    ]
    return {8: list(RELEASE_LABELS), 100: release_terms + others[: 100 - len(release_terms)]}


def classes_with_texts() -> dict[int, tuple[list[str], list[str]]]:
    """``{K: (labels, texts)}``: :func:`class_sets` with each label's Cell Ontology text, in label order.

    What ``benchmarks/gpu_bundle.py`` writes for ``--bundle``, so that both modes score the same texts.
    """
    out = {}
    for n_classes, labels in class_sets().items():
        texts, _ = ontology.label_texts(labels)
        out[n_classes] = (labels, [texts[label] for label in labels])
    return out


def bundle_cells(bundle: str | Path, n_cells: int) -> tuple[list[np.ndarray], GeneTokenizer]:
    """The first ``n_cells`` bundled immune cells (the sample repeated in order beyond its end)."""
    cells, tokenizer = read_cells(Path(bundle) / "immune")
    return [cells[i % len(cells)] for i in range(n_cells)], tokenizer


def padded_cell_encoder(model: LangCell, kind: str):
    """The baseline's cell encoder: ``ids, mask -> last-layer states`` over the padded batch.

    ``"hf-eager"``: ``transformers.BertModel`` (eager attention) with the cell encoder's weights, as the
    release runs it. ``"sdpa"``: our own encoder on its masked path (every pad position computed).
    """
    if kind == "hf-eager":
        hf = hf_twin(model).to(model.logit_scale.device)
        return lambda ids, mask: hf(input_ids=ids, attention_mask=mask).last_hidden_state
    return lambda ids, mask: model.cell_encoder(ids, mask, attention="masked")


def release_loop(model: LangCell, cell_encoder, sequences, pad_to: int, texts: list[str]):
    """The notebook's computation for one batch, timed in two parts.

    ``cell_encoder`` is from :func:`padded_cell_encoder`. Returns (seconds of the per-batch text work,
    seconds of the per-cell work, scores [B, K] as a host array).
    """
    device = model.logit_scale.device
    with torch.no_grad():
        synchronize(device)
        start = time.perf_counter()
        # Per batch: every class text tokenised and embedded again, one at a time.
        text_embeddings = torch.cat([model.encode_texts([text]) for text in texts])
        synchronize(device)
        text_seconds = time.perf_counter() - start

        start = time.perf_counter()
        ids, mask = pad_sequences(sequences, pad_id=0)
        width = ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad_to - width)))  # padded as the whole batch of 32 would be
        mask = np.pad(mask, ((0, 0), (0, pad_to - width)))
        ids, mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
        states = cell_encoder(ids, mask)
        cell_embeddings = torch.nn.functional.normalize(model.cell_proj(states[:, 0]), dim=-1)
        p_sim = torch.softmax(cell_embeddings @ text_embeddings.T / 0.05, dim=-1)
        match = torch.zeros_like(p_sim)
        pairs = torch.arange(len(sequences), device=device)
        for k, text in enumerate(texts):
            tokens = model.tokenize_texts([text] * len(sequences))  # re-tokenised for every batch
            logits = model.match_logits(states, mask, tokens, cell_index=pairs)  # no key/value reuse
            match[:, k] = torch.softmax(logits, dim=-1)[:, 1]
        p_ctm = torch.softmax(match, dim=-1)
        scores = ALPHA * p_sim + (1 - ALPHA) * p_ctm
        synchronize(device)
        cell_seconds = time.perf_counter() - start
    return text_seconds, cell_seconds, scores.cpu().numpy()


def timed(device: torch.device, function, *args, **kwargs):
    """(seconds, result) of one call, with the GPU work queued before and by it finished on either side."""
    synchronize(device)
    start = time.perf_counter()
    result = function(*args, **kwargs)
    synchronize(device)
    return time.perf_counter() - start, result


def warm_up(model: LangCell, cell_encoder, cell: np.ndarray, labels: list[str], texts: list[str], args) -> None:
    """Run every timed piece once on ``cell`` and two classes, untimed.

    On a GPU the first calls pay for CUDA's start-up (context, cuBLAS handles, kernel loading), which
    would otherwise land on whichever method runs first.
    """
    classes = encode_class_texts(model, texts[:2], labels[:2], precision=args.precision)
    for mode in ("official", "fast"):
        zero_shot_scores(model, [cell], classes, alpha=ALPHA, top_k=1, mode=mode, max_tokens=args.max_tokens,
                         precision=args.precision)
    release_loop(model, cell_encoder, [cell], len(cell), texts[:2])
    synchronize(model.logit_scale.device)


def main() -> None:
    """Parse arguments, time the baseline and annotate's two modes for K = 8 and 100, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", default="base", choices=["small", "base"], help="model preset (default base)"
    )
    parser.add_argument("--cells", type=int, default=64, help="cells for the fast mode (default 64)")
    parser.add_argument(
        "--baseline-cells",
        type=int,
        nargs=2,
        default=(4, 1),
        metavar=("K8", "K100"),
        help="cells the baseline and the official mode are timed on at K = 8 and K = 100 (default 4 1)",
    )
    parser.add_argument("--top-k", type=int, default=3, help="fast mode's top_k (default 3)")
    parser.add_argument("--max-tokens", type=int, default=16_384, help="cell tokens per batch for annotate")
    parser.add_argument("--quick", action="store_true", help="32 cells fast, 2 and 1 baseline cells")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="precision of ours (fast and official); the baseline stays fp32 (default fp32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--baseline-cell-encoder", choices=["hf-eager", "sdpa"], default="hf-eager",
        help="the baseline's cell encoder: HF BertModel eager as the release (default), or ours padded",
    )
    parser.add_argument("--device", default="cpu", help="where the model, the baseline and ours run (default cpu)")
    parser.add_argument("--bundle", help="cells and class texts from benchmarks/gpu_bundle.py's folder")
    parser.add_argument("--batched", action="store_true",
                        help="baseline and official mode: all their cells in one call per K, not one per round")
    args = parser.parse_args()
    if args.bundle is None and not SAMPLE.is_file():
        raise SystemExit(f"the immune sample is missing: {SAMPLE}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.cells, args.baseline_cells = 32, (2, 1)
    if not 1 <= min(args.baseline_cells) <= max(args.baseline_cells) <= RELEASE_BATCH_SIZE:
        raise SystemExit(
            f"--baseline-cells must lie in 1..{RELEASE_BATCH_SIZE}: they are rows of the release's first batch, "
            f"padded to its longest cell; got {' '.join(map(str, args.baseline_cells))}"
        )
    # Each round gives the fast mode two parts of the --cells cells, and each part must hold a cell.
    rounds = 1 if args.batched else max(args.baseline_cells)
    if args.cells < 2 * rounds:
        raise SystemExit(
            f"--cells {args.cells} is too few for {rounds} rounds (two parts of the fast mode's cells per round): "
            f"pass --cells {2 * rounds} or more, fewer --baseline-cells, or --batched"
        )
    device = torch.device(args.device)

    n_cells = max(args.cells, RELEASE_BATCH_SIZE)
    if args.bundle:
        sequences, gene_tokenizer = bundle_cells(args.bundle, n_cells)
        classes_by_k = read_zero_shot_classes(Path(args.bundle) / ZERO_SHOT_CLASSES)
        source = f"{SAMPLE.name} (bundled in {args.bundle})"
    else:
        import anndata

        gene_tokenizer = GeneTokenizer.from_geneformer(
            GENEFORMER / "token_dictionary.pkl", GENEFORMER / "gene_median_dictionary.pkl"
        )
        full = anndata.read_h5ad(SAMPLE)
        if n_cells > full.n_obs:
            raise SystemExit(
                f"--cells {args.cells} is more than the sample's {full.n_obs} cells; --bundle repeats them"
            )
        adata = full[:n_cells].copy()
        tokenized = gene_tokenizer.encode(adata, max_length=2048)
        sequences = [np.asarray(tokenized[i], dtype=np.int64) for i in range(len(tokenized))]
        classes_by_k = classes_with_texts()
        source = SAMPLE.name
    lengths = np.array([len(s) for s in sequences])
    pad_to = int(lengths[:RELEASE_BATCH_SIZE].max())  # the release pads the first batch to this
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )
    print(
        f"{args.cells} cells of {source}: tokens per cell mean {lengths[: args.cells].mean():.0f}, "
        f"median {np.median(lengths[: args.cells]):.0f}, max {lengths[: args.cells].max()}; first batch of "
        f"32 padded to {pad_to}; size {args.size}; torch {torch.__version__} on {device} ({where}); load "
        f"average {os.getloadavg()[0]:.1f}; baseline cell encoder {args.baseline_cell_encoder}; "
        f"{'batched' if args.batched else 'one cell per round'}",
        flush=True,
    )

    config = LangCellConfig.preset(args.size)
    config.text.init_from = None  # random weights: speed does not depend on them
    if args.bundle:
        config.text.tokenizer_from = str(Path(args.bundle) / "text_tokenizer")  # no packaged MiniLM there
    torch.manual_seed(0)
    model = LangCell(config, gene_tokenizer=gene_tokenizer).eval().to(device)
    baseline_encoder = padded_cell_encoder(model, args.baseline_cell_encoder)

    labels, texts = classes_by_k[8]
    warm_up(model, baseline_encoder, min(sequences[:RELEASE_BATCH_SIZE], key=len), labels, texts, args)
    if args.bundle:
        print("  bundle: cells read tokenized, so the one-time cost per call is the class texts only; the "
              "end-to-end check against annotate is skipped (no AnnData here)", flush=True)
    else:
        # annotate end to end once, on a few cells: the timed pieces below must give its numbers.
        check = adata[:3].copy()
        tl.annotate(check, model, labels, alpha=ALPHA, top_k=args.top_k, max_tokens=args.max_tokens)

    rows = []
    for n_classes, (labels, texts) in classes_by_k.items():
        n_base = args.baseline_cells[0 if n_classes == 8 else 1]
        n_rounds = 1 if args.batched else n_base
        # The cells each round gives the official mode and the baseline.
        round_cells = np.array_split(np.arange(n_base), n_rounds)
        # What one annotate call does once: tokenise the AnnData, tokenise and embed the class texts.
        tokenize_seconds = 0.0
        if not args.bundle:
            tokenize_seconds, _ = timed(
                device, gene_tokenizer.encode, adata[: args.cells].copy(), max_length=2048
            )
        texts_seconds, classes = timed(
            device, encode_class_texts, model, texts, labels, precision=args.precision
        )
        if n_classes == 8 and args.precision == "fp32" and not args.bundle:
            # bf16 has other numerics: no equality check
            piece = zero_shot_scores(model, sequences[:3], classes, alpha=ALPHA, top_k=args.top_k)
            np.testing.assert_allclose(piece.scores, check.obsm["langcell_cell_type_probs"], atol=1e-5)
        once = f"class texts {texts_seconds:.2f} s"
        if not args.bundle:
            once = f"tokenise {tokenize_seconds:.2f} s, " + once
        print(f"  K={n_classes}: once per call: {once}", flush=True)

        # The methods take turns, so that load from other processes hits them alike: each round runs
        # half of its share of fast cells, its cells through the official mode, then through the
        # baseline, then the other half of the fast cells.
        fast_parts = np.array_split(np.arange(args.cells), 2 * n_rounds)
        fast_seconds = official_seconds = base_text_seconds = base_cell_seconds = 0.0
        difference = 0.0
        for round_index, cells in enumerate(round_cells):
            round_sequences = [sequences[i] for i in cells]
            seconds, _ = timed(
                device,
                zero_shot_scores,
                model,
                [sequences[i] for i in fast_parts[2 * round_index]],
                classes,
                alpha=ALPHA,
                top_k=args.top_k,
                mode="fast",
                max_tokens=args.max_tokens,
                precision=args.precision,
            )
            fast_seconds += seconds
            seconds, official = timed(
                device,
                zero_shot_scores,
                model,
                round_sequences,
                classes,
                alpha=ALPHA,
                mode="official",
                max_tokens=args.max_tokens,
                precision=args.precision,
            )
            official_seconds += seconds
            text_s, cell_s, base_scores = release_loop(model, baseline_encoder, round_sequences, pad_to, texts)
            base_text_seconds += text_s
            base_cell_seconds += cell_s
            difference = max(difference, float(np.abs(official.scores - base_scores).max()))
            seconds, _ = timed(
                device,
                zero_shot_scores,
                model,
                [sequences[i] for i in fast_parts[2 * round_index + 1]],
                classes,
                alpha=ALPHA,
                top_k=args.top_k,
                mode="fast",
                max_tokens=args.max_tokens,
                precision=args.precision,
            )
            fast_seconds += seconds
            print(f"  K={n_classes}: round {round_index + 1}/{n_rounds} done", flush=True)

        # Per cell: the per-batch text work of the release (once per round) is shared by its 32 cells.
        base_per_cell = base_text_seconds / n_rounds / RELEASE_BATCH_SIZE + base_cell_seconds / n_base
        official_per_cell = official_seconds / n_base + (texts_seconds + tokenize_seconds) / args.cells
        fast_per_cell = (fast_seconds + texts_seconds + tokenize_seconds) / args.cells
        rows.append((n_classes, n_base, base_per_cell, official_per_cell, fast_per_cell, difference))

    print()
    print(
        f"| K | baseline (release loop) cells/s | official cells/s | fast (top_k={args.top_k}) cells/s "
        "| official / baseline | fast / baseline | max abs diff baseline vs official |"
    )
    print("|---|---|---|---|---|---|---|")
    for n_classes, n_base, base, official, fast, difference in rows:
        print(
            f"| {n_classes} | {1 / base:.4f} ({n_base} cells) | {1 / official:.4f} ({n_base} cells) "
            f"| {1 / fast:.3f} ({args.cells} cells) | {base / official:.1f}x | {base / fast:.1f}x "
            f"| {difference:.1e} |"
        )
    print(f"\nfast: time per cell at K=100 / at K=8 = {rows[1][4] / rows[0][4]:.2f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes slow every timing)")


if __name__ == "__main__":
    main()

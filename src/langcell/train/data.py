"""Pretraining data: corpus cells in length-bucketed batches, each cell with one text per step.

The texts come from the corpus's own cell metadata (CELLxGENE-schema ontology term ids), turned into
sentences once per distinct term by :func:`langcell.ontology.describe_cells`. Each batch samples one
*aspect* (cell type most often, tissue, disease, ...) so the text tower learns every kind of metadata;
a cell without text for the sampled aspect falls back to its cell-type text.

Every random choice is a function of ``(seed, epoch, batch index)``: the batch order, the aspect, and
(in the trainer) masking and dropout. A run resumed at batch ``k`` therefore sees exactly what an
uninterrupted run would, whatever the number of data-loader workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.batching import pad_sequences, token_budget_batches
from ..data.corpus import TokenCorpus
from ..errors import LangCellError
from ..ontology import ASPECTS, describe_cells

#: Default probability of each aspect being the batch's text; aspects absent from the corpus are
#: dropped and the rest renormalised. Cell type dominates because zero-shot annotation asks about it.
DEFAULT_ASPECT_WEIGHTS = {
    "cell_type": 0.6,
    "tissue": 0.1,
    "disease": 0.1,
    "development_stage": 0.05,
    "sex": 0.05,
    "assay": 0.05,
    "organism": 0.025,
    "self_reported_ethnicity": 0.025,
}


@dataclass
class CellTextTable:
    """Every distinct text once, and for every cell the id of its text per aspect."""

    aspects: list[str]  # aspects with text for at least one cell; "cell_type" first
    texts: list[str]  # distinct texts; a text's index is its global id (the C-T loss's text_group)
    text_ids: np.ndarray  # int32 [n_cells, n_aspects]; -1 where the cell has no text for that aspect

    @classmethod
    def from_obs(cls, obs: pd.DataFrame, aspects=ASPECTS) -> CellTextTable:
        """Describe the cells of ``obs`` (CELLxGENE-schema term id columns).

        Each aspect's column is reduced to codes (its categories, or a factorisation) and only the
        distinct terms are described, so a corpus of millions of cells costs a few integer arrays, never
        a text per cell.
        """
        per_aspect = {}
        for aspect in aspects:
            coded = _aspect_texts(obs, aspect)
            if coded is not None and (coded[1] != "").any():
                per_aspect[aspect] = coded
        if "cell_type" not in per_aspect and "cell_type_ontology_term_id" not in obs.columns:
            raise LangCellError(
                "the corpus has no cell_type_ontology_term_id column, so its cells have no text; tokenize "
                "h5ad files with CELLxGENE-schema obs (cell_type_ontology_term_id = 'CL:...'), or run only "
                "the 'cell' stage (--stage cell)"
            )
        kept = ["cell_type"] + [a for a in per_aspect if a != "cell_type"]
        texts: list[str] = []
        index: dict[str, int] = {}
        text_ids = np.full((len(obs), len(kept)), -1, dtype=np.int32)
        for j, aspect in enumerate(kept):
            codes, code_texts = per_aspect.get(aspect, (np.full(len(obs), -1), np.zeros(0, dtype=object)))
            # Texts get their global ids in sorted order within each aspect (as np.unique would give).
            mapped = np.full(code_texts.size + 1, -1, dtype=np.int32)  # the last slot: missing values
            for text in sorted(set(code_texts.tolist()) - {""}):
                index.setdefault(text, len(index))
                if index[text] == len(texts):
                    texts.append(text)
            for code, text in enumerate(code_texts):
                mapped[code] = index[text] if text != "" else -1
            text_ids[:, j] = mapped[np.where(codes < 0, code_texts.size, codes)]
        return cls(aspects=kept, texts=texts, text_ids=text_ids)

    @classmethod
    def from_corpus(cls, corpus: TokenCorpus, aspects=ASPECTS) -> CellTextTable:
        """Describe a corpus's cells, reading only its ontology term id columns (not every cell's name)."""
        return cls.from_obs(corpus.read_obs([f"{aspect}_ontology_term_id" for aspect in aspects]), aspects)

    def cells_with_cell_type_text(self) -> np.ndarray:
        """Indices of the cells that have a cell-type text (the only ones the joint stage uses)."""
        return np.flatnonzero(self.text_ids[:, 0] >= 0)

    def aspect_probabilities(self, weights: Mapping[str, float] | None) -> np.ndarray:
        """Normalised sampling probabilities over :attr:`aspects`."""
        weights = dict(DEFAULT_ASPECT_WEIGHTS if weights is None else weights)
        unknown = sorted(set(weights) - set(ASPECTS))
        if unknown:
            raise LangCellError(f"unknown aspect(s) {unknown} in aspect_weights; choose from {list(ASPECTS)}")
        p = np.array([max(float(weights.get(a, 0.0)), 0.0) for a in self.aspects])
        if p.sum() <= 0:
            raise LangCellError(
                f"aspect_weights give no weight to any aspect this corpus has ({self.aspects}); "
                "give cell_type a positive weight"
            )
        return p / p.sum()


def _aspect_texts(obs: pd.DataFrame, aspect: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(codes per cell, text per code)`` of one aspect's term column; ``None`` when obs lacks it.

    Codes are -1 for missing values; the text of an unknown or unused term is "".
    """
    column = f"{aspect}_ontology_term_id"
    if column not in obs.columns:
        return None
    values = obs[column]
    if isinstance(values.dtype, pd.CategoricalDtype):
        codes, uniques = values.cat.codes.to_numpy().astype(np.int64), values.cat.categories
    else:
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        codes = codes.astype(np.int64)
    used = np.flatnonzero(np.bincount(codes[codes >= 0], minlength=len(uniques)) > 0)
    # describe_cells on one row per used term: its texts, errors and "unknown" rules, once per term.
    terms = pd.DataFrame({column: pd.Categorical.from_codes(np.arange(used.size), categories=uniques[used])})
    code_texts = np.full(len(uniques), "", dtype=object)
    code_texts[used] = describe_cells(terms, [aspect])[aspect].astype(str).to_numpy()
    return codes, code_texts


class EpochBatches(Dataset):
    """One epoch of one process's batches; item ``k`` is a whole padded batch (numpy arrays)."""

    def __init__(
        self,
        corpus: TokenCorpus,
        batches: list[np.ndarray],
        batch_numbers: np.ndarray,
        *,
        seed: int,
        epoch: int,
        max_length: int,
        table: CellTextTable | None,
        aspect_probabilities: np.ndarray | None,
    ) -> None:
        self.corpus = corpus
        self.batches = batches
        self.batch_numbers = batch_numbers  # global batch number in the epoch: seeds the aspect draw
        self.seed = seed
        self.epoch = epoch
        self.max_length = max_length
        self.table = table
        self.aspect_probabilities = aspect_probabilities
        self.pad_id = corpus.tokenizer.pad_id

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict:
        indices = self.batches[k]
        input_ids, attention_mask = pad_sequences(
            [self.corpus[int(i)] for i in indices], self.pad_id, self.max_length
        )
        item = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "cell_index": indices.astype(np.int64),
        }
        if self.table is not None:
            rng = np.random.default_rng([self.seed, self.epoch, int(self.batch_numbers[k]), 7])
            aspect = int(rng.choice(len(self.table.aspects), p=self.aspect_probabilities))
            ids = self.table.text_ids[indices, aspect]
            # A cell without text for this aspect falls back to its cell-type text.
            ids = np.where(ids >= 0, ids, self.table.text_ids[indices, 0]).astype(np.int64)
            item["text_ids"] = ids
            item["aspect"] = aspect
        return item


class PretrainStream:
    """The endless, resumable sequence of micro-batches one process trains on.

    Parameters
    ----------
    corpus
        The tokenized corpus.
    cells
        Corpus indices this stage trains on.
    max_tokens, max_batch_size
        Token budget and size cap of each micro-batch (per process).
    rank, world_size
        This process's share: every epoch's batch list is cut to a multiple of ``world_size`` and
        process ``r`` takes batches ``r, r + world_size, ...``, so all processes step together.
    seed
        Seeds the batch order of every epoch (``seed + epoch``) and the aspect draws.
    table, aspect_weights
        Texts for the joint stage; ``None`` for the cell-only stage.
    num_workers
        Data-loader worker processes (0: load in the training process).
    """

    def __init__(
        self,
        corpus: TokenCorpus,
        cells: np.ndarray,
        *,
        max_tokens: int,
        max_batch_size: int | None,
        max_length: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        table: CellTextTable | None = None,
        aspect_weights: Mapping[str, float] | None = None,
        num_workers: int = 0,
    ) -> None:
        if len(cells) == 0:
            raise LangCellError("no cells to train on; check the corpus and the stage's cell selection")
        self.corpus = corpus
        self.cells = np.asarray(cells, dtype=np.int64)
        self.lengths = np.minimum(corpus.lengths[self.cells], max_length)
        self.max_tokens = max_tokens
        self.max_batch_size = max_batch_size
        self.max_length = max_length
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.table = table
        self.aspect_probabilities = None if table is None else table.aspect_probabilities(aspect_weights)
        self.num_workers = num_workers
        self.batches_per_epoch = len(self._epoch_batches(0)[0])
        if self.batches_per_epoch == 0:
            raise LangCellError(
                f"the corpus holds too few cells ({len(self.cells)}) for {world_size} process(es) at this "
                "batch size; lower max_tokens/max_batch_size or use fewer processes"
            )

    def _epoch_batches(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        local = token_budget_batches(
            self.lengths,
            self.max_tokens,
            max_batch_size=self.max_batch_size,
            shuffle=True,
            seed=self.seed + epoch,
            drop_last=True,
        )
        usable = len(local) - len(local) % self.world_size
        numbers = np.arange(self.rank, usable, self.world_size)
        return [self.cells[local[i]] for i in numbers], numbers

    def iterate(self, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Yield micro-batches from stream position ``start`` (counted from 0 over all epochs)."""
        epoch, offset = divmod(start, self.batches_per_epoch)
        if self.num_workers > 0:
            # Check the shards here, once: forked workers inherit that, instead of every worker of every
            # epoch hashing the whole corpus again on its first reads.
            self.corpus.verify(again=False)
        while True:
            batches, numbers = self._epoch_batches(epoch)
            dataset = EpochBatches(
                self.corpus,
                batches[offset:],
                numbers[offset:],
                seed=self.seed,
                epoch=epoch,
                max_length=self.max_length,
                table=self.table,
                aspect_probabilities=self.aspect_probabilities,
            )
            loader = DataLoader(
                dataset,
                batch_size=None,  # items are whole batches already
                shuffle=False,
                num_workers=self.num_workers,
                persistent_workers=False,
            )
            try:
                yield from loader
            except LangCellError as error:
                raise LangCellError(_worker_message(error)) from None
            epoch, offset = epoch + 1, 0


def _worker_message(error: LangCellError) -> str:
    """The message of a LangCellError, without the traceback a DataLoader worker wraps around it.

    torch re-raises a worker's exception as the same type whose message is "Caught LangCellError in
    DataLoader worker process N. Original Traceback ...", ending with the original "...LangCellError:
    message" line; the one line the user should see is that last one.
    """
    text = str(error)
    if "DataLoader worker" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split("LangCellError: ", 1)[-1]

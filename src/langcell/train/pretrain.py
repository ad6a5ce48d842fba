"""LangCell pretraining: masked gene modelling, cell-cell, cell-text contrastive and cell-text matching.

Read top to bottom:

1. :class:`PretrainConfig` holds every setting (a recipe file is this dataclass as JSON).
2. :class:`PretrainObjective` runs one micro-batch through the model and returns the named losses;
   the model itself computes no loss. It is the module DDP wraps, so each step is one ``forward``.
3. :func:`pretrain` is the loop: stages, optimiser, schedule, accumulation, clipping, checkpoints,
   logging, resume.

Two stages, as in the paper:

``cell``
    MGM + C-C on every corpus cell; only the cell encoder, ``cell_proj`` and the MGM head learn.
``joint``
    all four losses on the cells that have a cell-type text; optionally the pretrained text tower is
    locked except its cross-attention layers (``freeze_text``).

One micro-batch of the joint stage makes two cell passes and one text pass:

* pass A: the cell with 15% of its genes masked (and, optionally, genes dropped) -> MGM logits at the
  masked positions, and embedding ``a``;
* pass B: the clean cell -> embedding ``b`` and the token states for matching;
* C-C contrasts ``a`` with ``b`` (two dropout views, SimCSE; masking is a further augmentation);
* the batch's distinct texts are encoded once -> C-T between ``b`` and each cell's text, with cells of
  the same text counted as positives;
* CTM scores, with the multimodal text tower, every cell with its own text, one hard-negative text per
  cell and one hard-negative cell per text, drawn from the C-T similarities of this process's batch
  (mining across processes would mean moving token states between GPUs, which BLIP also avoids).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._atomic import atomic_directory, atomic_file
from .._progress import progress_bar
from ..data.corpus import TokenCorpus
from ..errors import LangCellError
from ..losses import (
    IGNORE_INDEX,
    CellCellContrastiveLoss,
    CellTextContrastiveLoss,
    CellTextMatchingLoss,
    LossWeights,
    MaskedGeneLoss,
    combine,
    ctm_pairs,
    gene_dropout,
    mask_genes,
    sample_hard_negatives,
)
from ..models.config import LangCellConfig
from ..models.langcell import LangCell
from ..precision import autocast, check_precision
from . import distributed
from .data import CellTextTable, PretrainStream

log = logging.getLogger("langcell.pretrain")

STAGES = ("cell", "joint")
RECIPE_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs besides the corpus; a recipe file is this as JSON."""

    model: str | dict = "small"  # model preset name ("tiny", "small", "base") or a LangCellConfig dict
    stage: str = "both"  # "cell", "joint" or "both" (cell, then joint)
    cell_steps: int = 200  # optimiser steps of the cell stage
    joint_steps: int = 200  # optimiser steps of the joint stage
    max_tokens: int = 16_384  # token budget of one micro-batch on one process (batch x padded length)
    max_batch_size: int = 64  # cap on cells per micro-batch
    max_length: int = 2_048  # longest cell, <cls> included (longer cells are cut to their top genes)
    text_max_length: int = 128  # longest text in word-piece tokens
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 2e-4  # peak learning rate of the cell stage
    joint_lr: float = 1e-4  # peak learning rate of the joint stage
    text_lr_scale: float = 0.1  # the pretrained text tower learns at this fraction of the joint lr
    weight_decay: float = 0.01  # AdamW decay (not on biases, LayerNorms or logit_scale)
    warmup_steps: int = 20  # linear warm-up steps at the start of each stage
    min_lr_ratio: float = 0.1  # the cosine schedule ends at this fraction of the peak
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm); 0 turns it off
    loss_weights: dict = field(default_factory=lambda: dataclasses.asdict(LossWeights()))  # mgm, cc, ct, ctm
    ctm_cells: int | None = None  # cells per micro-batch that CTM scores (3 pairs each); None = all. CTM
    # runs the text tower once per pair, so on a CPU it dominates the step: a subset keeps it affordable
    mask_prob: float = 0.15  # share of gene tokens masked for MGM
    cc_temperature: float = 0.05  # temperature of the cell-cell InfoNCE
    gene_dropout: float = 0.0  # share of genes dropped from pass A before ranking (0: off)
    freeze_text: bool = False  # joint stage: lock the text tower except cross-attention (heads still learn)
    aspect_weights: dict | None = None  # sampling weight per metadata aspect (None: cell type 0.6, rest 0.4)
    precision: str = "fp32"  # "fp32", "bf16" (autocast; CUDA or CPU) or "fp16" (CUDA, with a grad scaler)
    attention_dropout: float | None = None  # override both encoders' attention dropout (None keeps the
    # model's); 0 lets SDPA use its fused kernel instead of materialising the attention matrix
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    num_workers: int = 0  # data-loader worker processes per training process
    seed: int = 0  # seeds the weights, the batch order, masking and dropout
    deterministic: bool = False  # torch deterministic algorithms (bitwise-repeatable runs and resumes)
    checkpoint_every: int = 100  # optimiser steps between checkpoints (and at each stage's end)
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    log_every: int = 10  # optimiser steps between log lines
    device: str | None = None  # "cpu", "cuda" or None (CUDA when available)

    def validate(self) -> None:
        """Raise :class:`LangCellError` naming the first bad setting."""
        if self.stage not in ("cell", "joint", "both"):
            raise LangCellError(f"stage must be 'cell', 'joint' or 'both', got {self.stage!r}")
        check_precision(self.precision)
        for name in ("cell_steps", "joint_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise LangCellError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_tokens", "max_batch_size", "max_length", "text_max_length", "grad_accum",
                     "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise LangCellError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_dropout is not None and not 0 <= self.attention_dropout < 1:
            raise LangCellError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
        if self.ctm_cells is not None and self.ctm_cells < 2:
            raise LangCellError(f"ctm_cells must be at least 2 (or null for all), got {self.ctm_cells}")
        for name in ("lr", "joint_lr"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise LangCellError(f"{name} must be a positive number, got {getattr(self, name)}")
        if not 0 < self.mask_prob <= 1:
            raise LangCellError(f"mask_prob must be in (0, 1], got {self.mask_prob}")
        if not 0 <= self.gene_dropout < 1:
            raise LangCellError(f"gene_dropout must be in [0, 1), got {self.gene_dropout}")
        names = [f.name for f in dataclasses.fields(LossWeights)]
        unknown = sorted(set(self.loss_weights) - set(names))
        if unknown:
            raise LangCellError(f"unknown loss weight(s) {unknown}; valid names are {names}")
        weights = LossWeights(**self.loss_weights)
        if any(not (w >= 0) for w in dataclasses.astuple(weights)):
            raise LangCellError(f"loss weights must be >= 0, got {self.loss_weights}")
        if "cell" in self.stages() and weights.mgm == 0 and weights.cc == 0:
            raise LangCellError("the cell stage needs a positive mgm or cc loss weight; set one above 0")
        self.model_config()

    def stages(self) -> list[str]:
        """The stages this run goes through, in order."""
        return list(STAGES) if self.stage == "both" else [self.stage]

    def steps(self, stage: str) -> int:
        """Optimiser steps of ``stage``."""
        return self.cell_steps if stage == "cell" else self.joint_steps

    def model_config(self) -> LangCellConfig:
        """The model's :class:`LangCellConfig`."""
        if isinstance(self.model, str):
            return LangCellConfig.preset(self.model)
        return LangCellConfig.from_dict(self.model)

    def model_config_for(self, gene_tokenizer) -> LangCellConfig:
        """The model's config with this recipe's vocabulary, cell length, attention dropout and checkpointing.

        The cell encoder gets no more positions than the recipe's ``max_length``: positions past it would
        never see a token in training and keep their random initial values, yet inference
        (``tl.annotate``, ``tl.embed``) reads cells up to the encoder's positions. With the table cut to
        what was trained, inference cuts cells to the same length the model learned on.
        """
        model_config = self.model_config()
        model_config.cell.vocab_size = gene_tokenizer.vocab_size
        model_config.cell.max_position_embeddings = min(model_config.cell.max_position_embeddings, self.max_length)
        if self.attention_dropout is not None:
            model_config.cell.attention_probs_dropout_prob = self.attention_dropout
            model_config.text.attention_probs_dropout_prob = self.attention_dropout
        model_config.cell.gradient_checkpointing = self.gradient_checkpointing
        model_config.text.gradient_checkpointing = self.gradient_checkpointing
        return model_config

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (what a recipe file holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        """Build from a recipe dictionary, rejecting unknown fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LangCellError(f"unknown pretraining setting(s) {unknown}; valid ones are {sorted(known)}")
        try:
            config = cls(**data)
            config.validate()
        except TypeError as err:
            raise LangCellError(f"bad pretraining recipe: {err}") from err
        return config


def load_recipe(name_or_path: str | os.PathLike) -> PretrainConfig:
    """A pretraining recipe: a packaged name (``tiny``, ``small``, ``base``) or a JSON file path."""
    path = Path(name_or_path)
    if not path.suffix and (RECIPE_DIR / f"{name_or_path}.json").is_file():
        path = RECIPE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        names = sorted(p.stem for p in RECIPE_DIR.glob("*.json"))
        raise LangCellError(
            f"no pretraining recipe {str(name_or_path)!r}: pass one of {names} or the path of a JSON recipe file"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LangCellError(f"recipe {str(path)!r} is not valid JSON ({err}); fix the file") from err
    data.pop("_comment", None)
    return PretrainConfig.from_dict(data)


# ----------------------------------------------------------------------------------------- objective
class PretrainObjective(nn.Module):
    """One micro-batch through the model; returns the named losses of the stage.

    Holds the model so that DDP can wrap this module and see each training step as one ``forward``.
    """

    def __init__(self, model: LangCell, config: PretrainConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        tokenizer = model.gene_tokenizer
        self.mask_id = tokenizer.mask_id
        self.special_ids = (tokenizer.pad_id, tokenizer.mask_id, tokenizer.cls_id)
        self.gene_id_range = (0, tokenizer.vocab_size)
        self.mgm_loss = MaskedGeneLoss()
        self.cc_loss = CellCellContrastiveLoss(temperature=config.cc_temperature)
        self.ct_loss = CellTextContrastiveLoss()
        self.ctm_loss = CellTextMatchingLoss()
        self.weights = LossWeights(**config.loss_weights)

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        stage: str,
        generator: torch.Generator,
        text_tokens: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        model = self.model
        weights = self.weights
        ids, mask = batch["input_ids"], batch["attention_mask"]
        losses: dict[str, torch.Tensor] = {}
        emb_a = None
        # Losses weighted 0 are not computed at all (a joint stage with mgm=cc=0 skips pass A).
        if weights.mgm > 0 or weights.cc > 0:
            view_ids, view_mask = ids, mask
            if self.config.gene_dropout > 0:
                view_ids, view_mask = gene_dropout(
                    ids, mask, self.config.gene_dropout, keep_ids=self.special_ids,
                    pad_id=self.special_ids[0], generator=generator,
                )
            masked_ids, labels = mask_genes(
                view_ids, view_mask, mask_id=self.mask_id, special_ids=self.special_ids,
                gene_id_range=self.gene_id_range, mask_prob=self.config.mask_prob, generator=generator,
            )
            emb_a, states_a = model.encode_cells({"input_ids": masked_ids, "attention_mask": view_mask})
            if weights.mgm > 0:
                predicted = labels != IGNORE_INDEX
                # The LM head runs only at the masked positions: 15% of the tokens, not [B, L, V].
                losses |= self.mgm_loss(model.mgm_logits(states_a[predicted]), labels[predicted])
        if stage == "cell" and weights.cc == 0:
            return losses
        emb_b, states_b = model.encode_cells({"input_ids": ids, "attention_mask": mask})
        if weights.cc > 0:
            losses |= self.cc_loss(emb_a, emb_b)
        if stage == "cell":
            return losses

        text_group = batch["text_group"]  # [B] global text ids
        unique_ids, position = torch.unique(text_group, return_inverse=True)
        text_emb = model.encode_texts(text_tokens)[position]  # each distinct text encoded once
        if weights.ct > 0:
            losses |= self.ct_loss(emb_b, text_emb, model.logit_scale, text_group)
        if weights.ctm == 0:
            return losses

        # CTM on the first ctm_cells cells of the (already shuffled) batch: their texts, and hard
        # negatives drawn among them.
        n = len(text_group) if self.config.ctm_cells is None else min(self.config.ctm_cells, len(text_group))
        with torch.no_grad():
            sim = model.logit_scale.exp().clamp(max=100) * emb_b[:n].float() @ text_emb[:n].float().T
        neg_text, neg_cell = sample_hard_negatives(sim, text_group[:n], generator=generator)
        cell_index, text_index, match = ctm_pairs(n, neg_text, neg_cell)
        pair_tokens = {k: v[position[text_index]] for k, v in text_tokens.items()}
        logits = model.match_logits(states_b, mask, pair_tokens, cell_index=cell_index)
        losses |= self.ctm_loss(logits, match)
        return losses


# -------------------------------------------------------------------------------------- parameters
def _set_trainable(model: LangCell, stage: str, freeze_text: bool) -> None:
    """Choose what learns in ``stage`` (see the module docstring)."""
    for name, param in model.named_parameters():
        if stage == "cell":
            param.requires_grad = name.startswith(("cell_encoder.", "cell_proj.", "mgm_head."))
        elif freeze_text and name.startswith("text_encoder."):
            param.requires_grad = ".crossattention." in name
        else:
            param.requires_grad = True


def _param_groups(model: LangCell, lr: float, text_lr_scale: float, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, LayerNorms and the scale; the pretrained text tower slower."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or "LayerNorm" in name or name == "logit_scale"
        # Cross-attention is new in every preset: it learns at the full rate like the heads.
        slow_text = name.startswith("text_encoder.") and ".crossattention." not in name
        groups.setdefault((no_decay, slow_text), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "lr": lr * (text_lr_scale if slow_text else 1.0),
        }
        for (no_decay, slow_text), params in sorted(groups.items())
    ]


def _schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float):
    """Linear warm-up to the peak, then cosine down to ``min_ratio`` of it."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -------------------------------------------------------------------------------------- checkpoints
def _checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def _latest_checkpoint(out: Path) -> Path | None:
    pointer = _checkpoint_dir(out) / "latest.json"
    if not pointer.is_file():
        return None
    name = json.loads(pointer.read_text())["checkpoint"]
    path = _checkpoint_dir(out) / name
    if not path.is_dir():
        raise LangCellError(
            f"{str(pointer)!r} names checkpoint {name!r}, which is missing; remove latest.json to start over "
            "or restore the checkpoint"
        )
    return path


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [int(v) if np.isscalar(v) else v.tolist() for v in np.random.get_state()[1:]],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save_checkpoint(
    out: Path, model: LangCell, optimizer, scheduler, scaler, *, stage: str, step: int,
    config: PretrainConfig, world_size: int,
) -> Path:
    """Write ``checkpoints/<stage>-<step>`` atomically, point ``latest.json`` at it, prune old ones."""
    name = f"{stage}-{step:07d}"
    target = _checkpoint_dir(out) / name
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp / "model")
        torch.save(
            {
                "stage": stage,
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": _rng_state(),
                "config": config.to_dict(),
                "world_size": world_size,
            },
            tmp / "training_state.pt",
        )
    with atomic_file(_checkpoint_dir(out) / "latest.json") as tmp:
        tmp.write_text(json.dumps({"checkpoint": name}))
    done = sorted(p for p in _checkpoint_dir(out).iterdir() if p.is_dir() and not p.name.startswith("."))
    for old in done[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _load_training_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise LangCellError(
            f"checkpoint {str(path)!r} is unreadable ({type(err).__name__}: {err}); delete it and point "
            "latest.json at an older one, or start over without --resume"
        ) from err


# ---------------------------------------------------------------------------------------------- log
class _RunLog:
    """CSV (always) and TensorBoard (when installed) on rank 0."""

    FIELDS = ["stage", "step", "lr", "loss", "mgm_loss", "cc_loss", "ct_loss", "ctm_loss",
              "cells_per_s", "tokens_per_s", "elapsed_s"]

    def __init__(self, out: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.path = out / "log.csv"
        fresh = not self.path.exists()
        self.file = self.path.open("a", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        if fresh:
            self.csv.writeheader()
        with contextlib.suppress(Exception):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, row: dict[str, Any], global_step: int) -> None:
        if not self.enabled:
            return
        self.csv.writerow({k: row.get(k, "") for k in self.FIELDS})
        self.file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, float):
                    self.writer.add_scalar(key, value, global_step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


# --------------------------------------------------------------------------------------------- loop
def _step_seed(seed: int, stage: str, step: int, micro: int, rank: int) -> int:
    """A seed for masking and dropout that depends only on where the run is: resumes repeat exactly."""
    return int(np.random.SeedSequence([seed, STAGES.index(stage), step, micro, rank]).generate_state(1)[0])


def pretrain(
    corpus: str | os.PathLike | TokenCorpus,
    out_dir: str | os.PathLike,
    config: PretrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> LangCell:
    """Pretrain a LangCell model on a tokenized corpus (one process, or every process of torchrun).

    Parameters
    ----------
    corpus
        A corpus directory written by ``langcell tokenize`` (or a :class:`TokenCorpus`). Its obs must
        carry ``cell_type_ontology_term_id`` (and any other CELLxGENE term columns) for the joint stage.
    out_dir
        The run directory: ``checkpoints/``, ``log.csv``, ``recipe.json`` and, at the end, ``model/``
        (load it with :meth:`LangCell.from_pretrained`).
    config
        The recipe (:class:`PretrainConfig`); the default trains ``small``.
    resume
        Continue from the latest checkpoint in ``out_dir``. The result equals that of an uninterrupted
        run (exactly, with ``deterministic=True`` on CPU).
    overwrite
        Start over in an ``out_dir`` that already holds a run.
    progress
        Show a progress bar (rank 0).
    stop_after_steps
        Stop (after checkpointing) once this many optimiser steps ran in this call; for tests and for
        splitting a long run into jobs.

    Returns
    -------
    LangCell
        The trained model (also saved to ``out_dir/model`` by rank 0).
    """
    config = config or PretrainConfig()
    config.validate()
    ctx = distributed.setup(config.device)
    try:
        return _pretrain(corpus, Path(out_dir), config, ctx, resume, overwrite, progress, stop_after_steps)
    finally:
        distributed.teardown()


def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse a run directory that cannot be used, touching nothing; return whether it holds a run."""
    if out.exists() and not out.is_dir():
        raise LangCellError(f"{str(out)!r} exists and is not a directory; choose another --out")
    has_run = out.is_dir() and any(out.iterdir())
    if has_run and not resume and not overwrite:
        raise LangCellError(
            f"{str(out)!r} already holds a run; pass --resume to continue it, --overwrite to start over, "
            "or choose another --out"
        )
    if resume and not has_run:
        raise LangCellError(f"nothing to resume in {str(out)!r}; run without --resume first")
    if not out.parent.is_dir():
        raise LangCellError(f"the directory {str(out.parent)!r} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise LangCellError(f"the directory {str(out.parent)!r} is not writable; choose another --out")
    return has_run


def _create_out_dir(out: Path, config: PretrainConfig, resume: bool, has_run: bool) -> None:
    if has_run and not resume:  # --overwrite, checked by _check_out_dir
        shutil.rmtree(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if not (out / "recipe.json").exists():
        with atomic_file(out / "recipe.json") as tmp:
            tmp.write_text(json.dumps(config.to_dict(), indent=2))


def _pretrain(corpus, out: Path, config: PretrainConfig, ctx, resume, overwrite, progress, stop_after_steps):
    # Everything that can refuse the input runs before the run directory is created, so a refused
    # command leaves nothing behind and can be re-run as it is once the input is fixed.
    has_run = _check_out_dir(out, resume, overwrite)
    if not isinstance(corpus, TokenCorpus):
        corpus = TokenCorpus(corpus)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(config.seed)

    model_config = config.model_config_for(corpus.tokenizer)
    if model_config.cell.max_position_embeddings < config.max_length:
        raise LangCellError(
            f"max_length={config.max_length} exceeds the model's {model_config.cell.max_position_embeddings} "
            "positions; lower max_length in the recipe"
        )
    model = LangCell.from_config(model_config, gene_tokenizer=corpus.tokenizer).to(ctx.device)

    stages = config.stages()
    table = None
    if "joint" in stages:
        table = CellTextTable.from_obs(corpus.obs)
        if len(table.cells_with_cell_type_text()) == 0:
            raise LangCellError(
                "no corpus cell has a cell-type text (all cell_type_ontology_term_id values are unknown); "
                "tokenize labelled cells or run --stage cell"
            )

    if ctx.is_main:
        _create_out_dir(out, config, resume, has_run)
    distributed.barrier(ctx)

    start_stage, start_step, state = stages[0], 0, None
    if resume:
        latest = _latest_checkpoint(out)
        if latest is not None:
            state = _load_training_state(latest)
            if state["world_size"] != ctx.world_size:
                raise LangCellError(
                    f"the checkpoint was written by {state['world_size']} process(es) but this run has "
                    f"{ctx.world_size}; resume with the same --nproc_per_node (the data order depends on it)"
                )
            loaded = LangCell.from_pretrained(latest / "model")
            if loaded.gene_tokenizer != corpus.tokenizer:
                raise LangCellError(
                    f"the checkpoint {str(latest)!r} was trained on another gene vocabulary than this corpus; "
                    "resume with the corpus the run was started on, or start a new run (another --out)"
                )
            model.load_state_dict(loaded.state_dict(), strict=True)
            start_stage, start_step = state["stage"], state["step"]
            if start_step >= config.steps(start_stage) and start_stage != stages[-1]:
                start_stage, start_step, state = stages[stages.index(start_stage) + 1], 0, None

    run_log = _RunLog(out, ctx.is_main)
    steps_this_call = 0
    try:
        for stage in stages[stages.index(start_stage):]:
            first_step = start_step if stage == start_stage else 0
            steps_this_call = _train_stage(
                model, corpus, table, config, ctx, out, stage, first_step,
                state if stage == start_stage else None, run_log, progress, stop_after_steps, steps_this_call,
            )
            if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                return model
    finally:
        run_log.close()
    if ctx.is_main:
        model.save_pretrained(out / "model", overwrite=True)
    distributed.barrier(ctx)
    return model


def _train_stage(model, corpus, table, config, ctx, out, stage, first_step, state, run_log, progress,
                 stop_after_steps, steps_this_call) -> int:
    total = config.steps(stage)
    if first_step >= total:
        return steps_this_call
    _set_trainable(model, stage, config.freeze_text)
    model.train()
    lr = config.lr if stage == "cell" else config.joint_lr
    optimizer = torch.optim.AdamW(_param_groups(model, lr, config.text_lr_scale, config.weight_decay))
    scheduler = _schedule(optimizer, config.warmup_steps, total, config.min_lr_ratio)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])

    objective = PretrainObjective(model, config)
    wrapped: nn.Module = objective
    if ctx.distributed:
        wrapped = DistributedDataParallel(
            objective, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None
        )
    cells = np.arange(len(corpus)) if stage == "cell" else table.cells_with_cell_type_text()
    stream = PretrainStream(
        corpus, cells, max_tokens=config.max_tokens, max_batch_size=config.max_batch_size,
        max_length=config.max_length, rank=ctx.rank, world_size=ctx.world_size,
        seed=config.seed + 1000 * STAGES.index(stage), table=table if stage == "joint" else None,
        aspect_weights=config.aspect_weights, num_workers=config.num_workers,
    )
    batches = stream.iterate(first_step * config.grad_accum)
    weights = LossWeights(**config.loss_weights)
    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = progress_bar(
        total, progress and ctx.is_main, f"pretrain {stage}", "step", initial=first_step, dynamic_ncols=True
    )
    window = {"cells": 0.0, "tokens": 0.0, "steps": 0, "time": time.perf_counter()}
    sums: dict[str, float] = {}
    run_start = time.perf_counter()
    offset = sum(config.steps(s) for s in STAGES[: STAGES.index(stage)] if s in config.stages())

    for step in range(first_step, total):
        optimizer.zero_grad(set_to_none=True)
        for micro in range(config.grad_accum):
            batch = next(batches)
            seed = _step_seed(config.seed, stage, step, micro, ctx.rank)
            torch.manual_seed(seed)  # dropout
            generator = torch.Generator(device=ctx.device).manual_seed(seed)  # masking, negatives
            inputs = {k: batch[k].to(ctx.device) for k in ("input_ids", "attention_mask")}
            text_tokens = None
            if stage == "joint":
                inputs["text_group"] = batch["text_ids"].to(ctx.device)
                unique = torch.unique(batch["text_ids"]).tolist()
                text_tokens = model.tokenize_texts([table.texts[i] for i in unique], config.text_max_length)
                text_tokens = {k: v.to(ctx.device) for k, v in text_tokens.items()}
            sync = (micro == config.grad_accum - 1) or not ctx.distributed
            with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast(config.precision, ctx.device):
                losses = wrapped(inputs, stage, generator, text_tokens)
                loss = combine(losses, weights) / config.grad_accum
            if not distributed.all_ranks_agree(ctx, bool(torch.isfinite(loss.detach()))):
                latest = _latest_checkpoint(out) if ctx.is_main else None
                raise LangCellError(
                    f"the {stage} loss became non-finite at step {step} "
                    f"({', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())}); the last good "
                    f"checkpoint is {str(latest) if latest else 'none yet'}: resume from it with a lower "
                    "learning rate or precision='fp32'"
                )
            (scaler.scale(loss) if scaler is not None else loss).backward()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / config.grad_accum
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            window["cells"] += float(inputs["input_ids"].shape[0])
            window["tokens"] += float(inputs["attention_mask"].sum())
        if scaler is not None:
            scaler.unscale_(optimizer)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        window["steps"] += 1
        done = step + 1
        steps_this_call += 1
        if bar is not None:
            bar.update(1)

        if done % config.log_every == 0 or done == total:
            n_steps = window["steps"]  # fewer than log_every after a resume or at a stage's end
            means = distributed.mean_over_ranks(ctx, {k: v / n_steps for k, v in sums.items()})
            counts = distributed.sum_over_ranks(ctx, {"cells": window["cells"], "tokens": window["tokens"]})
            elapsed = time.perf_counter() - window["time"]
            row = {"stage": stage, "step": done, "lr": scheduler.get_last_lr()[0], **means,
                   "cells_per_s": counts["cells"] / elapsed, "tokens_per_s": counts["tokens"] / elapsed,
                   "elapsed_s": time.perf_counter() - run_start}
            run_log.write(row, offset + done)
            if bar is not None:
                bar.set_postfix({k: f"{v:.3f}" for k, v in means.items() if k.endswith("loss")})
            sums = {}
            window = {"cells": 0.0, "tokens": 0.0, "steps": 0, "time": time.perf_counter()}

        stopping = stop_after_steps is not None and steps_this_call >= stop_after_steps
        if done % config.checkpoint_every == 0 or done == total or stopping:
            if ctx.is_main:
                _save_checkpoint(out, model, optimizer, scheduler, scaler, stage=stage, step=done,
                                 config=config, world_size=ctx.world_size)
            distributed.barrier(ctx)
        if stopping:
            break
    if bar is not None:
        bar.close()
    return steps_this_call

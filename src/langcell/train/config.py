"""Pretraining settings: :class:`PretrainConfig` (a recipe file is this dataclass as JSON) and recipes.

The packaged recipes live in ``langcell/configs/*.json``; :func:`load_recipe` reads one by name or path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LangCellError
from ..models.config import LangCellConfig
from ..precision import check_precision
from .losses import LossWeights

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
    tensorboard: bool = False  # also log to TensorBoard event files in <run>/tensorboard (rank 0); needs
    # the tensorboard package: pip install "langcell[tensorboard]"
    eval_every: int = 0  # optimiser steps between held-out zero-shot evaluations (and at each stage's end);
    # 0 turns it off. Needs cell-type texts in the corpus; accuracy and macro-F1 go into the log
    eval_cells: int = 256  # labelled cells carved out of the corpus for that evaluation (a seeded draw),
    # never trained on; only when eval_every > 0
    device: str | None = None  # "cpu", "cuda" or None (CUDA when available)

    def validate(self) -> None:
        """Raise :class:`LangCellError` naming the first bad setting."""
        if self.stage not in ("cell", "joint", "both"):
            raise LangCellError(f"stage must be 'cell', 'joint' or 'both', got {self.stage!r}")
        check_precision(self.precision)
        if self.precision == "int8":
            raise LangCellError("precision 'int8' is for inference only; train in 'bf16' or 'fp32'")
        for name in ("cell_steps", "joint_steps", "warmup_steps", "num_workers", "seed", "eval_every"):
            if getattr(self, name) < 0:
                raise LangCellError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_tokens", "max_batch_size", "max_length", "text_max_length", "grad_accum",
                     "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise LangCellError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every > 0 and self.eval_cells < 1:
            raise LangCellError(f"eval_cells must be >= 1 when eval_every > 0, got {self.eval_cells}")
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
        if self.eval_every > 0 and self.eval_cells < 1:
            raise LangCellError(f"eval_cells must be >= 1 when eval_every > 0, got {self.eval_cells}")
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
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LangCellError(f"recipe {str(path)!r} is not valid JSON ({err}); fix the file") from None
    except UnicodeDecodeError:
        raise LangCellError(f"recipe {str(path)!r} is not UTF-8 text; save it as UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise LangCellError(
            f"recipe {str(path)!r} holds a JSON {type(data).__name__}, not an object of settings "
            '({"model": "small", "cell_steps": ...}); fix the file'
        )
    data.pop("_comment", None)
    return PretrainConfig.from_dict(data)

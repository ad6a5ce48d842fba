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
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._atomic import atomic_file, check_apart_from_inputs
from .._progress import progress_bar
from ..data.corpus import TokenCorpus
from ..errors import LangCellError
from ..models.langcell import LangCell
from ..precision import autocast
from . import distributed
from .checkpoint import check_resumable, latest_checkpoint, load_training_state, save_checkpoint
from .config import STAGES, PretrainConfig
from .data import CellTextTable, PretrainStream
from .heldout import HeldOutEvaluation, held_out_cells
from .log import RunLog, check_tensorboard
from .losses import LossWeights, combine
from .objective import PretrainObjective
from .optim import param_groups, repeatable_step, set_trainable, warmup_cosine_schedule

log = logging.getLogger("langcell.pretrain")


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
        (load it with :meth:`LangCell.from_pretrained`). ``log.csv`` holds one row per logging window
        with its ``stage``, ``step`` (within the stage), mean losses, throughput and ``elapsed_s``
        (one clock for the whole run, continued across resumes; :class:`langcell.train.log.RunLog`).
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
        model = _pretrain(corpus, Path(out_dir), config, ctx, resume, overwrite, progress, stop_after_steps)
    except KeyboardInterrupt:
        # Interrupted (Ctrl-C, or torchrun passing on a SIGTERM): a peer may be stopped inside a
        # collective, and leaving the group politely could wait for it for ever (NCCL); the process
        # is ending, so it leaves without the goodbye.
        raise
    except BaseException:
        distributed.teardown()
        raise
    distributed.teardown()
    return model


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
    if has_run and not (out / "recipe.json").is_file():
        # --overwrite deletes the directory: only ever one that a pretraining run wrote.
        raise LangCellError(
            f"{str(out)!r} is not empty and holds no pretraining run (no recipe.json), so neither --overwrite "
            "nor --resume may use it; choose another --out or empty it yourself"
        )
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
    started = time.perf_counter()  # the run's one clock (log.csv's elapsed_s), for every stage
    # Everything that can refuse the input runs before the run directory is created, so a refused
    # command leaves nothing behind and can be re-run as it is once the input is fixed.
    check_apart_from_inputs(out, [corpus.directory if isinstance(corpus, TokenCorpus) else corpus], option="--out")
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
    if config.tensorboard:
        check_tensorboard()
    table = None
    if "joint" in stages or config.eval_every > 0:
        table = CellTextTable.from_corpus(corpus)
        if len(table.cells_with_cell_type_text()) == 0:
            raise LangCellError(
                "no corpus cell has a cell-type text (all cell_type_ontology_term_id values are unknown); "
                "tokenize labelled cells, or run --stage cell without the held-out evaluation (eval_every 0)"
            )
    evaluation = None
    if config.eval_every > 0:  # the held-out cells are carved out here, the same on every rank and resume
        evaluation = HeldOutEvaluation(corpus, table, held_out_cells(table, config.eval_cells, config.seed),
                                       max_length=config.max_length, precision=config.precision)

    if ctx.is_main:
        _create_out_dir(out, config, resume, has_run)
    distributed.barrier(ctx)

    start_stage, start_step, state = stages[0], 0, None
    if resume:
        latest = latest_checkpoint(out)
        if latest is not None:
            state = load_training_state(latest)
            check_resumable(state, config, ctx.world_size)
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

    run_log = RunLog(out, ctx.is_main, started, tensorboard=config.tensorboard)
    steps_this_call = 0
    try:
        for stage in stages[stages.index(start_stage):]:
            first_step = start_step if stage == start_stage else 0
            steps_this_call = _train_stage(
                model, corpus, table, config, ctx, out, stage, first_step,
                state if stage == start_stage else None, run_log, progress, stop_after_steps, steps_this_call,
                evaluation,
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
                 stop_after_steps, steps_this_call, evaluation) -> int:
    """Train one stage from ``first_step`` (resuming ``state`` when given) to its last step, or until
    ``stop_after_steps`` steps of this call; returns the steps made in this call so far. ``evaluation``
    (a :class:`HeldOutEvaluation` or ``None``): its cells are never trained on, and rank 0 runs it every
    ``eval_every`` steps."""
    total = config.steps(stage)
    if first_step >= total:
        return steps_this_call
    set_trainable(model, stage, config.freeze_text)
    model.train()
    lr = config.lr if stage == "cell" else config.joint_lr
    optimizer = torch.optim.AdamW(param_groups(model, lr, config.text_lr_scale, config.weight_decay))
    scheduler = warmup_cosine_schedule(optimizer, config.warmup_steps, total, config.min_lr_ratio)
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
    if evaluation is not None:
        cells = np.setdiff1d(cells, evaluation.indices)  # sorted, like cells: nothing else changes
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
    offset = sum(config.steps(s) for s in STAGES[: STAGES.index(stage)] if s in config.stages())

    for step in range(first_step, total):
        optimizer.zero_grad(set_to_none=True)
        for micro in range(config.grad_accum):
            losses, loss, inputs = _micro_step(
                wrapped, model, next(batches), table, config, ctx, stage, step, micro, weights, scaler, out
            )
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / config.grad_accum
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            window["cells"] += float(inputs["input_ids"].shape[0])
            window["tokens"] += float(inputs["attention_mask"].sum())
        if scaler is not None:
            scaler.unscale_(optimizer)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        with repeatable_step(optimizer):
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

        evaluating = evaluation is not None and (done % config.eval_every == 0 or done == total)
        if done % config.log_every == 0 or done == total or evaluating:
            scores = _evaluate(evaluation, model, window) if evaluating and ctx.is_main else {}
            _log_window(run_log, ctx, stage, done, offset, scheduler.get_last_lr()[0], sums, window, bar,
                        scores)
            sums = {}
            window = {"cells": 0.0, "tokens": 0.0, "steps": 0, "time": time.perf_counter()}

        stopping = stop_after_steps is not None and steps_this_call >= stop_after_steps
        if done % config.checkpoint_every == 0 or done == total or stopping:
            if ctx.is_main:
                save_checkpoint(out, model, optimizer, scheduler, scaler, stage=stage, step=done,
                                 config=config, world_size=ctx.world_size)
            distributed.barrier(ctx)
        if stopping:
            break
    if bar is not None:
        bar.close()
    return steps_this_call


def _micro_step(wrapped, model, batch, table, config, ctx, stage, step, micro, weights, scaler, out):
    """One micro-batch: a seeded forward pass, the combined loss (refused on every rank when it is not
    finite on one), and its backward pass. Returns the named losses, the scaled loss and the inputs."""
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
        latest = latest_checkpoint(out) if ctx.is_main else None
        raise LangCellError(
            f"the {stage} loss became non-finite at step {step} "
            f"({', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())}); the last good "
            f"checkpoint is {str(latest) if latest else 'none yet'}: resume from it with a lower "
            "learning rate or precision='fp32'"
        )
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return losses, loss, inputs


def _evaluate(evaluation, model, window) -> dict[str, float]:
    """The held-out scores of ``model`` now; the time they take is kept out of the window's throughput."""
    start = time.perf_counter()
    scores = evaluation(model)
    window["time"] += time.perf_counter() - start
    return scores


def _log_window(run_log, ctx, stage, done, offset, lr, sums, window, bar, scores) -> None:
    """Write one log row: the window's mean losses over its steps and ranks, its throughput, and the
    held-out ``scores`` (rank 0's, when this step evaluated)."""
    n_steps = window["steps"]  # fewer than log_every after a resume or at a stage's end
    means = distributed.mean_over_ranks(ctx, {k: v / n_steps for k, v in sums.items()})
    counts = distributed.sum_over_ranks(ctx, {"cells": window["cells"], "tokens": window["tokens"]})
    elapsed = time.perf_counter() - window["time"]
    row = {"stage": stage, "step": done, "lr": lr, **means,
           "cells_per_s": counts["cells"] / elapsed, "tokens_per_s": counts["tokens"] / elapsed,
           "elapsed_s": run_log.elapsed(), **scores}
    run_log.write(row, offset + done)
    if bar is not None:
        bar.set_postfix({k: f"{v:.3f}" for k, v in means.items() if k.endswith("loss")})

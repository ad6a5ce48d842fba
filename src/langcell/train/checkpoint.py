"""Pretraining checkpoints: where they live, writing one atomically, finding the latest, resuming.

A checkpoint holds the model, the optimiser and scheduler, every RNG state and the step, so a resumed
run continues the same sequence of batches; resuming reads only the newest checkpoint (O(1) in steps).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_directory, atomic_file
from ..errors import LangCellError
from ..models.langcell import LangCell
from .config import PretrainConfig


# -------------------------------------------------------------------------------------- checkpoints
def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


#: Every entry :func:`save_checkpoint` writes into ``training_state.pt``.
TRAINING_STATE_KEYS = ("stage", "step", "optimizer", "scheduler", "scaler", "rng", "config", "world_size")
_CHECKPOINT_NAME = re.compile(r"(cell|joint)-\d{7}")


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint ``latest.json`` names, or ``None`` before the first one; refuses a damaged pointer
    and any name that is not a checkpoint of this run directory (no path leaves it)."""
    pointer = checkpoint_dir(out) / "latest.json"
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise LangCellError(
            f"{str(pointer)!r} is damaged (not {{\"checkpoint\": NAME}}); remove it to start over, or write the "
            "name of a checkpoint in that folder into it"
        ) from None
    if not isinstance(name, str) or not _CHECKPOINT_NAME.fullmatch(name):
        raise LangCellError(
            f"{str(pointer)!r} names {name!r}, which is not a checkpoint of this run (STAGE-NNNNNNN inside "
            f"{str(checkpoint_dir(out))!r}); remove latest.json to start over"
        )
    path = checkpoint_dir(out) / name
    if not path.is_dir():
        raise LangCellError(
            f"{str(pointer)!r} names checkpoint {name!r}, which is missing; remove latest.json to start over "
            "or restore the checkpoint"
        )
    return path


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [int(v) if np.isscalar(v) else v.tolist() for v in np.random.get_state()[1:]],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(
    out: Path, model: LangCell, optimizer, scheduler, scaler, *, stage: str, step: int,
    config: PretrainConfig, world_size: int,
) -> Path:
    """Write ``checkpoints/<stage>-<step>`` atomically, point ``latest.json`` at it, prune old ones."""
    name = f"{stage}-{step:07d}"
    target = checkpoint_dir(out) / name
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp / "model")
        torch.save(
            {
                "stage": stage,
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_state(),
                "config": config.to_dict(),
                "world_size": world_size,
            },
            tmp / "training_state.pt",
        )
    with atomic_file(checkpoint_dir(out) / "latest.json") as tmp:
        tmp.write_text(json.dumps({"checkpoint": name}))
    done = sorted(p for p in checkpoint_dir(out).iterdir() if p.is_dir() and not p.name.startswith("."))
    for old in done[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_training_state(path: Path) -> dict[str, Any]:
    """The optimiser, schedule, RNG and step of a checkpoint; refuses an unreadable or incomplete one."""
    redo = "delete it and point latest.json at an older one, or start over without --resume"
    try:
        state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's own message may advise weights_only=False (running pickled code): not relayed.
        raise LangCellError(f"checkpoint {str(path)!r} is unreadable ({type(err).__name__}); {redo}") from None
    missing = [key for key in TRAINING_STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise LangCellError(f"checkpoint {str(path)!r} lacks {', '.join(missing)}; {redo}")
    return state


def check_resumable(state: dict[str, Any], config: PretrainConfig, world_size: int) -> None:
    """Refuse to continue a run with settings that change what it computes (seed, process count)."""
    saved = state["config"]
    if isinstance(saved, dict) and saved.get("seed") != config.seed:
        raise LangCellError(
            f"the run was started with seed {saved.get('seed')!r} but this call has seed {config.seed}; resuming "
            "would mix two random streams: resume with the run's recipe (its recipe.json), or start a new run"
        )
    if isinstance(saved, dict):
        # The held-out cells are left out of training: other ones would change the data the run sees.
        held = (int(saved.get("eval_every", 0)) > 0, int(saved.get("eval_cells", 256)))
        if held[0] != (config.eval_every > 0) or (held[0] and held[1] != config.eval_cells):
            raise LangCellError(
                f"the run was started with eval_every={saved.get('eval_every', 0)}, eval_cells="
                f"{saved.get('eval_cells', 256)} but this call has eval_every={config.eval_every}, eval_cells="
                f"{config.eval_cells}; the held-out cells change the training data: resume with the run's "
                "recipe (its recipe.json; eval_every may change, but not between 0 and above 0)"
            )
    if state["world_size"] != world_size:
        raise LangCellError(
            f"the checkpoint was written by {state['world_size']} process(es) but this run has "
            f"{world_size}; resume with the same --nproc_per_node (the data order depends on it)"
        )

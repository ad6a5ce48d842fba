"""Pretraining checkpoints: where they live, writing one atomically, finding the latest, resuming.

A checkpoint holds the model, the optimiser and scheduler, every RNG state and the step, so a resumed
run continues the same sequence of batches; resuming reads only the newest checkpoint (O(1) in steps).
"""

from __future__ import annotations

import json
import random
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


def latest_checkpoint(out: Path) -> Path | None:
    pointer = checkpoint_dir(out) / "latest.json"
    if not pointer.is_file():
        return None
    name = json.loads(pointer.read_text())["checkpoint"]
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
    try:
        return torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise LangCellError(
            f"checkpoint {str(path)!r} is unreadable ({type(err).__name__}: {err}); delete it and point "
            "latest.json at an older one, or start over without --resume"
        ) from err

"""Fingerprint a short pretraining run: hashes of gradients, clip norms, AdamW moments and weights per step.

A diagnostic for the repeatability of training (MODEL_CARD.md: the same seed gives the same numbers on an
idle machine, and rarely other numbers beside heavy concurrent load). Run it several times, idle and
beside other work, and compare the printed fingerprints. When two runs differ, ``--out`` files compared
step by step show where the difference is born (which parameter's gradient, moment or updated weight).

    python scripts/training_fingerprint.py CORPUS --recipe demo --steps 3 --out /tmp/fp1.json
    python scripts/training_fingerprint.py CORPUS --recipe demo --steps 3 --out /tmp/fp2.json
    python scripts/training_fingerprint.py --compare /tmp/fp1.json /tmp/fp2.json

CORPUS is a ``langcell tokenize`` corpus (``langcell demo --out DIR`` leaves one in ``DIR/corpus``).
Only the cell stage runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile


def _digest(tensor) -> str:
    return hashlib.md5(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:10]


def fingerprint(corpus: str, recipe: str, steps: int) -> list[dict]:
    """Train ``steps`` cell-stage steps and return one record per optimiser step."""
    import torch

    from langcell.train import load_recipe, pretrain

    records: list[dict] = []
    norms: list[float] = []
    original_step = torch.optim.AdamW.step
    original_clip = torch.nn.utils.clip_grad_norm_

    def step(self, *args, **kwargs):
        record = {"clip_norm": repr(norms[-1]) if norms else None}
        for g, group in enumerate(self.param_groups):
            for i, param in enumerate(group["params"]):
                if param.grad is not None:
                    record[f"grad {g}.{i}"] = _digest(param.grad)
        result = original_step(self, *args, **kwargs)
        for g, group in enumerate(self.param_groups):
            for i, param in enumerate(group["params"]):
                record[f"weight {g}.{i}"] = _digest(param)
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in self.state[param]:
                        record[f"{key} {g}.{i}"] = _digest(self.state[param][key])
        records.append(record)
        return result

    def clip(parameters, max_norm, *args, **kwargs):
        total = original_clip(parameters, max_norm, *args, **kwargs)
        norms.append(float(total))
        return total

    torch.optim.AdamW.step = step
    torch.nn.utils.clip_grad_norm_ = clip
    try:
        config = load_recipe(recipe)
        config.stage, config.cell_steps, config.log_every = "cell", steps, 1
        with tempfile.TemporaryDirectory() as tmp:
            pretrain(corpus, f"{tmp}/run", config, progress=False)
    finally:
        torch.optim.AdamW.step = original_step
        torch.nn.utils.clip_grad_norm_ = original_clip
    return records


def compare(first: list[dict], second: list[dict]) -> None:
    """Print, per step, the entries that differ between two fingerprints."""
    for number, (a, b) in enumerate(zip(first, second, strict=False), start=1):
        differ = [key for key in a if a[key] != b.get(key)]
        print(f"step {number}: {len(differ)} of {len(a)} entries differ" + (f": {differ[:12]}" if differ else ""))


def main() -> None:
    """Fingerprint a run, or compare two saved fingerprints."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", nargs="?", help="a tokenized corpus directory")
    parser.add_argument("--recipe", default="demo", help="recipe name or JSON file (default demo)")
    parser.add_argument("--steps", type=int, default=3, help="cell-stage optimiser steps (default 3)")
    parser.add_argument("--out", help="write the per-step records as JSON")
    parser.add_argument("--compare", nargs=2, metavar="JSON", help="compare two --out files instead")
    args = parser.parse_args()
    if args.compare:
        first, second = (json.load(open(path, encoding="utf-8")) for path in args.compare)
        compare(first, second)
        return
    if not args.corpus:
        parser.error("give a corpus directory, or --compare A.json B.json")
    records = fingerprint(args.corpus, args.recipe, args.steps)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(records, handle)
    print(hashlib.md5(json.dumps(records).encode()).hexdigest()[:10])


if __name__ == "__main__":
    main()

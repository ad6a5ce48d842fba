"""Fingerprint a short pretraining run: hashes of gradients, clip norms, AdamW moments and weights per step.

A diagnostic for the repeatability of training (MODEL_CARD.md: the same seed gives the same numbers on an
idle machine, and rarely other numbers beside heavy concurrent load). Run it several times, idle and
beside other work, and compare the printed fingerprints. When two runs differ, ``--out`` files compared
step by step show where the difference is born (which parameter's gradient, moment or updated weight).

    python scripts/training_fingerprint.py CORPUS --recipe demo --steps 3 --out /tmp/fp1.json
    python scripts/training_fingerprint.py CORPUS --recipe demo --steps 3 --out /tmp/fp2.json
    python scripts/training_fingerprint.py --compare /tmp/fp1.json /tmp/fp2.json

CORPUS is a ``langcell tokenize`` corpus (``langcell demo --out DIR`` leaves one in ``DIR/corpus``).
Only the cell stage runs. ``--adamw fused`` or ``--adamw foreach`` builds the optimiser with that
implementation instead of the default per-tensor loop, and ``--step-threads N`` runs each optimiser step
with N intra-op threads: the two candidate remedies tried for the difference born in the AdamW update.
Pretraining now steps the optimiser on one thread itself (``langcell.train.optim.repeatable_step``, the
remedy adopted; MODEL_CARD.md), so ``--step-threads 2`` on a 2-core machine brings back the old step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile


def _digest(tensor) -> str:
    return hashlib.md5(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:10]


def fingerprint(corpus: str, recipe: str, steps: int, adamw: str = "loop", step_threads: int = 0) -> list[dict]:
    """Train ``steps`` cell-stage steps and return one record per optimiser step.

    ``adamw``: ``"loop"`` (torch's default on the CPU), ``"foreach"`` or ``"fused"``; ``step_threads``:
    intra-op threads during each optimiser step (0: unchanged).
    """
    import torch

    from langcell.train import load_recipe, pretrain

    records: list[dict] = []
    norms: list[float] = []
    original_step = torch.optim.AdamW.step
    original_init = torch.optim.AdamW.__init__
    original_clip = torch.nn.utils.clip_grad_norm_

    def init(self, *args, **kwargs):
        if adamw != "loop":
            kwargs[adamw] = True
        original_init(self, *args, **kwargs)

    def step(self, *args, **kwargs):
        record = {"clip_norm": repr(norms[-1]) if norms else None}
        for g, group in enumerate(self.param_groups):
            for i, param in enumerate(group["params"]):
                if param.grad is not None:
                    record[f"grad {g}.{i}"] = _digest(param.grad)
        threads = torch.get_num_threads()
        if step_threads:
            torch.set_num_threads(step_threads)
        try:
            result = original_step(self, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)
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
    torch.optim.AdamW.__init__ = init
    torch.nn.utils.clip_grad_norm_ = clip
    try:
        config = load_recipe(recipe)
        config.stage, config.cell_steps, config.log_every = "cell", steps, 1
        with tempfile.TemporaryDirectory() as tmp:
            pretrain(corpus, f"{tmp}/run", config, progress=False)
    finally:
        torch.optim.AdamW.step = original_step
        torch.optim.AdamW.__init__ = original_init
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
    parser.add_argument("--adamw", default="loop", choices=["loop", "foreach", "fused"],
                        help="AdamW implementation (default loop: torch's default on the CPU)")
    parser.add_argument("--step-threads", type=int, default=0, help="intra-op threads per optimiser step (0: as is)")
    parser.add_argument("--out", help="write the per-step records as JSON")
    parser.add_argument("--compare", nargs=2, metavar="JSON", help="compare two --out files instead")
    args = parser.parse_args()
    if args.compare:
        first, second = (json.load(open(path, encoding="utf-8")) for path in args.compare)
        compare(first, second)
        return
    if not args.corpus:
        parser.error("give a corpus directory, or --compare A.json B.json")
    records = fingerprint(args.corpus, args.recipe, args.steps, args.adamw, args.step_threads)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(records, handle)
    print(hashlib.md5(json.dumps(records).encode()).hexdigest()[:10])


if __name__ == "__main__":
    main()

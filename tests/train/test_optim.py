"""The optimiser step's thread count (repeatable_step) and the loops that use it."""

from __future__ import annotations

import pytest
import torch

from langcell.train.optim import repeatable_step, warmup_cosine_schedule
from langcell.train.supervised import optimizer_step


def _threads_during_steps(monkeypatch) -> list[int]:
    """Record torch's intra-op thread count inside every AdamW step from now on."""
    seen: list[int] = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


@pytest.fixture
def two_threads():
    """Run the test with 2 intra-op threads (what the step must not use), restoring the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_cpu_step_runs_on_one_thread_and_the_count_comes_back(two_threads):
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param])
    with repeatable_step(optimizer):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="inside"), repeatable_step(optimizer):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


def test_one_thread_gives_the_same_update_as_two(two_threads):
    # The remedy must not change what a normal run computes (MODEL_CARD: the demo's numbers stand).
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(1000, 256, generator=generator)
    grads = [torch.randn(1000, 256, generator=generator) * 1e-3 for _ in range(3)]
    results = []
    for use_one_thread in (False, True):
        param = torch.nn.Parameter(start.clone())
        optimizer = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.01)
        for grad in grads:
            param.grad = grad.clone()
            if use_one_thread:
                with repeatable_step(optimizer):
                    optimizer.step()
            else:
                optimizer.step()
        results.append(param.detach())
    assert torch.equal(results[0], results[1])


def test_the_supervised_loops_step_on_one_thread(two_threads, monkeypatch):
    seen = _threads_during_steps(monkeypatch)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = warmup_cosine_schedule(optimizer, 1, 4, 0.0)
    loss = model(torch.randn(5, 3)).square().mean()
    optimizer_step(loss, optimizer, scheduler, list(model.parameters()), max_grad_norm=1.0)
    assert seen == [1] and torch.get_num_threads() == 2

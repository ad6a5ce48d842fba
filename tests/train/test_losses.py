"""Tests for langcell.train.losses: every number is checked against an independent computation written here."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from scipy import stats

from langcell.errors import LangCellError
from langcell.train.losses import (
    CellCellContrastiveLoss,
    CellTextContrastiveLoss,
    CellTextMatchingLoss,
    LossWeights,
    MaskedGeneLoss,
    combine,
    ctm_pairs,
    gather_with_grad,
    gather_without_grad,
    sample_hard_negatives,
)
from langcell.train.masking import IGNORE_INDEX, gene_dropout, mask_genes

# A Geneformer-like layout: <pad>=0, <mask>=1, genes 2..999, <cls>=1000; id 7 is an extra special token
# placed inside the gene range to check that specials are excluded even there.
PAD, MASK, CLS, EXTRA_SPECIAL = 0, 1, 1000, 7
GENE_RANGE = (2, 1000)
SPECIALS = (PAD, MASK, CLS, EXTRA_SPECIAL)
REAL_GENES = set(range(2, 1000)) - {EXTRA_SPECIAL}


def _token_batch(
    n_cells: int, max_len: int, seed: int, min_genes: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded cells: <cls>, distinct genes (with the extra special sprinkled in), then <pad>."""
    rng = np.random.default_rng(seed)
    ids = np.full((n_cells, max_len), PAD, dtype=np.int64)
    mask = np.zeros((n_cells, max_len), dtype=np.int64)
    for row in range(n_cells):
        n_genes = int(rng.integers(min_genes, max_len))
        genes = rng.choice(np.arange(2, 1000), size=n_genes, replace=False)  # may include EXTRA_SPECIAL
        ids[row, 0] = CLS
        ids[row, 1 : 1 + n_genes] = genes
        mask[row, : 1 + n_genes] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


# ----------------------------------------------------------------------------------------------------------
# MGM
# ----------------------------------------------------------------------------------------------------------


def test_mask_genes_statistics_on_a_large_batch():
    ids, mask = _token_batch(600, 120, seed=0, min_genes=60)
    generator = torch.Generator().manual_seed(1)
    masked, labels = mask_genes(
        ids, mask, mask_id=MASK, special_ids=SPECIALS, gene_id_range=GENE_RANGE, generator=generator
    )
    assert masked.shape == ids.shape and masked.dtype == ids.dtype and labels.dtype == torch.long

    eligible = (mask == 1) & (ids >= 2) & (ids < 1000) & (ids != EXTRA_SPECIAL)
    selected = labels != IGNORE_INDEX
    # Only eligible tokens are selected, and labels hold the original ids there.
    assert not (selected & ~eligible).any()
    assert torch.equal(labels[selected], ids[selected])
    # Specials and padding are never touched.
    assert torch.equal(masked[~eligible], ids[~eligible])
    assert torch.equal(masked[~selected], ids[~selected])

    rate = selected.sum().item() / eligible.sum().item()
    assert abs(rate - 0.15) < 0.005, rate

    n_selected = selected.sum().item()
    became_mask = (masked == MASK) & selected
    became_other = selected & (masked != MASK) & (masked != ids)
    unchanged = selected & (masked == ids)
    n_genes = len(REAL_GENES)
    # A random replacement equals the original with probability 1/n_genes: it then counts as unchanged.
    assert abs(became_mask.sum().item() / n_selected - 0.8) < 0.015
    assert abs(became_other.sum().item() / n_selected - 0.1 * (1 - 1 / n_genes)) < 0.01
    assert abs(unchanged.sum().item() / n_selected - (0.1 + 0.1 / n_genes)) < 0.01
    # Random replacements are real genes only (never a special id, not even the one inside the range).
    replaced_with = set(masked[became_other].tolist())
    assert replaced_with <= REAL_GENES
    assert len(replaced_with) > 500  # drawn from the whole gene set, not a few ids


def test_mask_genes_masks_at_least_one_gene_per_cell_and_none_in_empty_cells():
    ids, mask = _token_batch(300, 5, seed=2, min_genes=0)  # 0..3 genes per cell
    _, labels = mask_genes(
        ids,
        mask,
        mask_id=MASK,
        special_ids=SPECIALS,
        gene_id_range=GENE_RANGE,
        generator=torch.Generator().manual_seed(3),
    )
    eligible = (mask == 1) & (ids >= 2) & (ids < 1000) & (ids != EXTRA_SPECIAL)
    n_eligible = eligible.sum(1)
    n_labels = (labels != IGNORE_INDEX).sum(1)
    assert (n_labels[n_eligible > 0] >= 1).all()
    assert (n_labels[n_eligible == 0] == 0).all()
    assert (n_eligible == 0).any() and (n_eligible > 0).any()  # both cases occur in this batch


def test_mask_genes_is_reproducible_with_a_generator_and_validates_arguments():
    ids, mask = _token_batch(8, 30, seed=4)
    kwargs = dict(mask_id=MASK, special_ids=SPECIALS, gene_id_range=GENE_RANGE)
    first = mask_genes(ids, mask, generator=torch.Generator().manual_seed(5), **kwargs)
    second = mask_genes(ids, mask, generator=torch.Generator().manual_seed(5), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    with pytest.raises(LangCellError, match="mask_prob"):
        mask_genes(ids, mask, mask_prob=0.0, **kwargs)
    with pytest.raises(LangCellError, match="attention_mask"):
        mask_genes(ids, mask[:, :-1], **kwargs)


def test_masked_gene_loss_equals_full_cross_entropy_with_ignore_index():
    torch.manual_seed(0)
    ids, mask = _token_batch(6, 20, seed=6, min_genes=3)
    _, labels = mask_genes(ids, mask, mask_id=MASK, special_ids=SPECIALS, gene_id_range=(2, 1000))
    logits = torch.randn(6, 20, 1001, requires_grad=True)
    got = MaskedGeneLoss()(logits, labels)["mgm_loss"]
    expected = F.cross_entropy(logits.reshape(-1, 1001), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, expected)

    # The pre-gathered form [M, V] / [M] gives the same value.
    keep = labels != IGNORE_INDEX
    torch.testing.assert_close(MaskedGeneLoss()(logits[keep], labels[keep])["mgm_loss"], expected)

    got.backward()
    assert logits.grad is not None
    # Only masked positions receive gradient.
    assert logits.grad[~keep].abs().sum() == 0 and logits.grad[keep].abs().sum() > 0


def test_masked_gene_loss_without_targets_is_a_differentiable_zero():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = MaskedGeneLoss()(logits, torch.full((2, 3), IGNORE_INDEX))["mgm_loss"]
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ----------------------------------------------------------------------------------------------------------
# Gene dropout
# ----------------------------------------------------------------------------------------------------------


def test_gene_dropout_repacks_in_order_and_keeps_cls():
    ids, mask = _token_batch(50, 40, seed=7, min_genes=1)
    new_ids, new_mask = gene_dropout(
        ids, mask, 0.3, keep_ids=[CLS], pad_id=PAD, generator=torch.Generator().manual_seed(8)
    )
    assert new_ids.shape == ids.shape and new_mask.dtype == mask.dtype
    total_before = total_after = 0
    for row in range(ids.shape[0]):
        before = ids[row][mask[row] == 1].tolist()
        after = new_ids[row][new_mask[row] == 1].tolist()
        n_after = len(after)
        # The mask is a prefix and everything after it is padding.
        assert new_mask[row, :n_after].all() and not new_mask[row, n_after:].any()
        assert (new_ids[row, n_after:] == PAD).all()
        assert after[0] == CLS
        # `after` is a subsequence of `before` (order kept), with at least one gene left.
        iterator = iter(before)
        assert all(token in iterator for token in after)
        assert len(after) >= 2
        total_before += len(before) - 1
        total_after += n_after - 1
    assert abs(1 - total_after / total_before - 0.3) < 0.04


def test_gene_dropout_never_empties_a_cell_and_p_zero_is_identity():
    ids = torch.tensor([[CLS, 5, PAD], [CLS, 6, 9]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    for seed in range(20):
        new_ids, new_mask = gene_dropout(
            ids, mask, 0.99, keep_ids=[CLS], pad_id=PAD, generator=torch.Generator().manual_seed(seed)
        )
        assert new_mask.sum(1).min() >= 2
        assert new_ids[0, 1] == 5 and new_ids[1, 1] in (6, 9)
    same_ids, same_mask = gene_dropout(ids, mask, 0.0, keep_ids=[CLS], pad_id=PAD)
    assert torch.equal(same_ids, ids) and torch.equal(same_mask, mask)


# ----------------------------------------------------------------------------------------------------------
# C-C and C-T
# ----------------------------------------------------------------------------------------------------------


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def _loop_infonce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> float:
    a, b = _unit(a.double()), _unit(b.double())
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        row = [math.exp(float(a[i] @ b[j]) / temperature) for j in range(n)]
        col = [math.exp(float(b[i] @ a[j]) / temperature) for j in range(n)]
        total += -math.log(row[i] / sum(row)) - math.log(col[i] / sum(col))
    return total / (2 * n)


def test_cell_cell_loss_equals_a_loop_infonce_and_backpropagates():
    torch.manual_seed(1)
    a = torch.randn(7, 12, requires_grad=True)
    b = torch.randn(7, 12, requires_grad=True)
    loss = CellCellContrastiveLoss(temperature=0.05)(a, b)["cc_loss"]
    assert loss.item() == pytest.approx(_loop_infonce(a.detach(), b.detach(), 0.05), rel=1e-5)
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    assert torch.isfinite(a.grad).all()


def _loop_multi_positive(cells, texts, scale, groups) -> float:
    cells, texts = _unit(cells.double()), _unit(texts.double())
    n = cells.shape[0]
    total = 0.0
    for direction in ("c2t", "t2c"):
        for i in range(n):
            query = cells[i] if direction == "c2t" else texts[i]
            keys = texts if direction == "c2t" else cells
            logits = [scale * float(query @ keys[j]) for j in range(n)]
            log_norm = math.log(sum(math.exp(value) for value in logits))
            positives = [j for j in range(n) if groups[j] == groups[i]]
            total += -sum(logits[j] - log_norm for j in positives) / len(positives)
    return total / (2 * n)


def test_cell_text_loss_multi_positive_equals_a_loop_over_rows():
    torch.manual_seed(2)
    cells = torch.randn(9, 8, requires_grad=True)
    texts = torch.randn(9, 8, requires_grad=True)
    groups = torch.tensor([0, 3, 0, 1, 1, 1, 2, 0, 4])
    logit_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = CellTextContrastiveLoss()(cells, texts, logit_scale, groups)["ct_loss"]
    expected = _loop_multi_positive(cells.detach(), texts.detach(), 1 / 0.07, groups.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert cells.grad.abs().sum() > 0 and texts.grad.abs().sum() > 0 and logit_scale.grad != 0


def test_cell_text_loss_reduces_to_clip_when_all_texts_differ_and_clamps_the_scale():
    torch.manual_seed(3)
    cells, texts = torch.randn(6, 5), torch.randn(6, 5)
    scale = 1 / 0.07
    logits = scale * _unit(cells) @ _unit(texts).T
    target = torch.arange(6)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    module = CellTextContrastiveLoss()
    torch.testing.assert_close(module(cells, texts, math.log(scale), torch.arange(6) * 10)["ct_loss"], clip)
    torch.testing.assert_close(module(cells, texts, math.log(scale))["ct_loss"], clip)

    # exp(log 1000) is clamped to 100.
    clamped = module(cells, texts, torch.tensor(math.log(1000.0)), torch.tensor([0, 0, 1, 2, 2, 2]))
    expected = _loop_multi_positive(cells, texts, 100.0, [0, 0, 1, 2, 2, 2])
    assert clamped["ct_loss"].item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_losses_reject_mismatched_shapes():
    with pytest.raises(LangCellError, match="same shape"):
        CellCellContrastiveLoss()(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(LangCellError, match="text_group"):
        CellTextContrastiveLoss()(torch.randn(3, 4), torch.randn(3, 4), 1.0, torch.arange(4))


# ----------------------------------------------------------------------------------------------------------
# CTM
# ----------------------------------------------------------------------------------------------------------

HARD_NEGATIVE_GROUPS = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5])


def _expected_negative_distribution(sim: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Row-wise softmax with identical-text pairs zeroed, renormalised."""
    weights = np.exp(sim - sim.max(axis=1, keepdims=True))
    weights[groups[:, None] == groups[None, :]] = 0.0
    return weights / weights.sum(axis=1, keepdims=True)


def test_hard_negatives_never_pick_identical_texts_and_follow_the_softmax():
    torch.manual_seed(4)
    n = HARD_NEGATIVE_GROUPS.numel()
    sim = torch.randn(n, n) * 1.2 + 3.0 * torch.eye(n)
    generator = torch.Generator().manual_seed(5)
    trials = 3000
    text_counts = np.zeros((n, n))
    cell_counts = np.zeros((n, n))
    groups = HARD_NEGATIVE_GROUPS
    for _ in range(trials):
        neg_text, neg_cell = sample_hard_negatives(sim, groups, generator=generator)
        assert (groups[neg_text] != groups).all()
        assert (groups[neg_cell] != groups).all()
        text_counts[np.arange(n), neg_text.numpy()] += 1
        cell_counts[np.arange(n), neg_cell.numpy()] += 1

    group_array = groups.numpy()
    for counts, matrix in ((text_counts, sim.numpy()), (cell_counts, sim.numpy().T)):
        expected = _expected_negative_distribution(matrix.astype(np.float64), group_array) * trials
        for row in range(n):
            support = expected[row] > 0
            assert counts[row][~support].sum() == 0
            p_value = stats.chisquare(counts[row][support], expected[row][support]).pvalue
            assert p_value > 1e-4, (row, counts[row], expected[row])


def test_hard_negatives_survive_a_dominant_positive_and_return_minus_one_when_impossible():
    # The identical-text pairs dominate so strongly that a plain softmax underflows everywhere else.
    sim = torch.tensor([[500.0, 0.0, 1.0], [0.0, 500.0, 1.0], [1.0, 0.0, 500.0]])
    neg_text, neg_cell = sample_hard_negatives(sim, torch.tensor([0, 0, 1]))
    assert neg_text.tolist()[:2] == [2, 2] and neg_text[2] in (0, 1)
    assert neg_cell.tolist()[:2] == [2, 2] and neg_cell[2] in (0, 1)

    neg_text, neg_cell = sample_hard_negatives(torch.randn(4, 4), torch.full((4,), 7))
    assert neg_text.tolist() == [-1] * 4 and neg_cell.tolist() == [-1] * 4

    with pytest.raises(LangCellError, match="square"):
        sample_hard_negatives(torch.randn(3, 4), torch.arange(3))


def test_ctm_pairs_lists_positives_then_negatives_and_skips_minus_one():
    neg_text = torch.tensor([2, -1, 0])
    neg_cell = torch.tensor([-1, 2, 1])
    cell_index, text_index, labels = ctm_pairs(3, neg_text, neg_cell)
    got = list(zip(cell_index.tolist(), text_index.tolist(), labels.tolist(), strict=True))
    assert got == [(0, 0, 1), (1, 1, 1), (2, 2, 1), (0, 2, 0), (2, 0, 0), (2, 1, 0), (1, 2, 0)]

    cell_index, text_index, labels = ctm_pairs(2, torch.tensor([5, 0]), torch.tensor([1, -1]), row_offset=4)
    got = list(zip(cell_index.tolist(), text_index.tolist(), labels.tolist(), strict=True))
    assert got == [(4, 4, 1), (5, 5, 1), (4, 5, 0), (5, 0, 0), (1, 4, 0)]


def test_ctm_loss_equals_cross_entropy_and_backpropagates():
    torch.manual_seed(6)
    logits = torch.randn(10, 2, requires_grad=True)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1, 0, 0])
    loss = CellTextMatchingLoss()(logits, labels)["ctm_loss"]
    expected = -np.mean(
        [float(torch.log_softmax(logits[i].detach().double(), 0)[labels[i]]) for i in range(10)]
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(LangCellError, match="logits"):
        CellTextMatchingLoss()(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------


def test_combine_weights_named_losses():
    losses = {"mgm_loss": torch.tensor(2.0), "cc_loss": torch.tensor(3.0), "ctm_loss": torch.tensor(5.0)}
    total = combine(losses, LossWeights(mgm=0.5, cc=2.0, ct=7.0, ctm=0.0))
    assert total.item() == pytest.approx(0.5 * 2 + 2 * 3)
    assert combine(losses, {"mgm": 1.0, "cc": 1.0, "ct": 1.0, "ctm": 1.0}).item() == pytest.approx(10.0)
    assert combine({"ct_loss": torch.tensor(float("nan"))} | losses, LossWeights(ct=0.0)).item() == 10.0
    with pytest.raises(LangCellError, match="no weight"):
        combine({"foo_loss": torch.tensor(1.0)}, LossWeights())
    with pytest.raises(LangCellError, match="unknown"):
        combine(losses, {"mlm": 1.0})


def test_gather_is_identity_on_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    assert gather_without_grad(x) is x


# ----------------------------------------------------------------------------------------------------------
# Two processes (gloo, CPU): the gathered losses equal the single-process losses on the whole batch
# ----------------------------------------------------------------------------------------------------------

WORLD_SIZE = 2
CASES = {"equal": (4, 4), "ragged": (3, 5)}
MODES = ("full", "local")


def _global_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return {
        "a": torch.randn(8, 6, generator=generator),
        "b": torch.randn(8, 6, generator=generator),
        "cells": torch.randn(8, 6, generator=generator),
        "texts": torch.randn(8, 6, generator=generator),
        "groups": torch.tensor([0, 1, 0, 2, 1, 3, 3, 0]),
        "logit_scale": torch.tensor(2.5),
    }


def _run_losses(inputs, rows: slice, *, gather: bool, local_loss: bool) -> dict[str, torch.Tensor]:
    """C-C and C-T on the given rows; returns values and input gradients."""
    a = inputs["a"][rows].clone().requires_grad_()
    b = inputs["b"][rows].clone().requires_grad_()
    cells = inputs["cells"][rows].clone().requires_grad_()
    texts = inputs["texts"][rows].clone().requires_grad_()
    scale = inputs["logit_scale"].clone().requires_grad_()
    cc = CellCellContrastiveLoss(temperature=0.1, gather=gather, local_loss=local_loss)(a, b)["cc_loss"]
    ct = CellTextContrastiveLoss(gather=gather, local_loss=local_loss)(
        cells, texts, scale, inputs["groups"][rows]
    )
    ct = ct["ct_loss"]
    (cc + ct).backward()
    return {
        "cc": cc.detach(),
        "ct": ct.detach(),
        "a": a.grad,
        "b": b.grad,
        "cells": cells.grad,
        "texts": texts.grad,
        "scale": scale.grad,
    }


def _distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        inputs = _global_inputs()
        results = {}
        for case, sizes in CASES.items():
            start = sum(sizes[:rank])
            rows = slice(start, start + sizes[rank])
            local = inputs["cells"][rows].clone().requires_grad_()
            gathered = gather_with_grad(local)
            (gathered * torch.arange(1.0, 9.0)[:, None]).sum().backward()
            results[(case, "gather")] = (
                gathered.detach(),
                local.grad,
                gather_without_grad(inputs["groups"][rows]),
            )
            for mode in MODES:
                results[(case, mode)] = _run_losses(inputs, rows, gather=True, local_loss=mode == "local")
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn_and_wait(tmp_path: Path, timeout_s: float = 90.0) -> None:
    context = mp.start_processes(
        _distributed_worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail("the 2-process gloo test did not finish in time (a collective hung)")


@pytest.mark.slow
def test_two_process_gather_matches_the_single_process_losses_and_gradients(tmp_path, monkeypatch):
    # Gloo binds to the loopback interface: the test needs no network.
    if "GLOO_SOCKET_IFNAME" not in os.environ and Path("/sys/class/net/lo").exists():
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    _spawn_and_wait(tmp_path)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    inputs = _global_inputs()
    reference = _run_losses(inputs, slice(0, 8), gather=False, local_loss=False)

    for case, sizes in CASES.items():
        bounds = [(sum(sizes[:rank]), sum(sizes[: rank + 1])) for rank in range(WORLD_SIZE)]
        for rank, (start, stop) in enumerate(bounds):
            gathered, local_grad, groups = per_rank[rank][(case, "gather")]
            torch.testing.assert_close(gathered, inputs["cells"])
            torch.testing.assert_close(groups, inputs["groups"])
            # Each rank's weighted sum sends grad i to row i; backward sums over both ranks.
            expected_grad = WORLD_SIZE * torch.arange(1.0, 9.0)[start:stop, None].expand(-1, 6)
            torch.testing.assert_close(local_grad, expected_grad)

        for mode in MODES:
            results = [per_rank[rank][(case, mode)] for rank in range(WORLD_SIZE)]
            for name in ("cc", "ct"):
                if mode == "full":
                    values = [result[name] for result in results]
                    for value in values:
                        torch.testing.assert_close(value, reference[name])
                else:
                    # Each rank reports the mean over its own rows: weighting by rows gives the global mean.
                    weighted = (
                        sum(result[name] * size for result, size in zip(results, sizes, strict=True)) / 8
                    )
                    torch.testing.assert_close(weighted, reference[name])
            if mode == "local" and case == "ragged":
                continue  # ranks are weighted equally, not rows: the gradient is not the global one
            # Every rank computes the global loss (or rows averaging to it), and the gather's backward sums
            # over ranks: a rank's input gradient is WORLD_SIZE x the single-process gradient of its rows.
            # DDP averages parameter gradients over ranks, which cancels the factor.
            for rank, (start, stop) in enumerate(bounds):
                for name in ("a", "b", "cells", "texts"):
                    torch.testing.assert_close(
                        results[rank][name] / WORLD_SIZE, reference[name][start:stop], rtol=1e-4, atol=1e-6
                    )
            # logit_scale is not gathered: averaging its per-rank gradients (as DDP does) gives the reference.
            mean_scale_grad = sum(result["scale"] for result in results) / WORLD_SIZE
            torch.testing.assert_close(mean_scale_grad, reference["scale"], rtol=1e-4, atol=1e-6)

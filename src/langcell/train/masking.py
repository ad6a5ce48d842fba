"""Input corruption for pretraining: BERT-style gene masking (MGM labels) and gene dropout.

Both work on right-padded token batches and never touch ``<cls>`` or padding; masked positions carry
their true token id as label, all others :data:`IGNORE_INDEX`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..errors import LangCellError

#: Label of a position that the MGM loss does not predict (the PyTorch cross-entropy convention).
IGNORE_INDEX = -100


def _check_token_batch(input_ids: Tensor, attention_mask: Tensor, caller: str) -> None:
    if input_ids.dim() != 2:
        raise LangCellError(
            f"{caller}: input_ids must be [batch, length], got shape {tuple(input_ids.shape)}; "
            "pass a padded batch of token ids."
        )
    if attention_mask.shape != input_ids.shape:
        raise LangCellError(
            f"{caller}: attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
            f"{tuple(input_ids.shape)}; pass the mask that came with these ids."
        )
    if input_ids.dtype.is_floating_point:
        raise LangCellError(f"{caller}: input_ids must be an integer tensor, got {input_ids.dtype}.")


def mask_genes(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    mask_id: int,
    special_ids: Iterable[int],
    gene_id_range: tuple[int, int],
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Corrupt gene tokens for masked gene modelling (BERT's 80/10/10 recipe).

    A token is *eligible* when it is a real token (``attention_mask`` true) whose id is a gene id: inside
    ``gene_id_range`` and not in ``special_ids``. ``<cls>``, ``<pad>``, ``<mask>`` and any other special id
    are never selected or changed. In each cell about ``mask_prob`` of the eligible tokens are selected;
    of those, 80% become ``mask_id``, 10% a uniformly random gene id and 10% stay unchanged.

    Parameters
    ----------
    input_ids
        Token ids ``[B, L]`` (integer).
    attention_mask
        ``[B, L]``, true / 1 for real tokens, false / 0 for padding.
    mask_id
        Id of the ``<mask>`` token.
    special_ids
        Ids that are never masked nor drawn as random replacements (``<cls>``, ``<pad>``, ...). ``mask_id``
        is always treated as special.
    gene_id_range
        ``(lo, hi)``: real gene ids are ``lo <= id < hi`` minus ``special_ids``. Random replacements are
        drawn uniformly from exactly that set.
    mask_prob
        Fraction of eligible tokens to select, in ``(0, 1]``.
    generator
        Random generator on ``input_ids.device`` for reproducible masking; ``None`` uses the global one.

    Returns
    -------
    masked_input_ids : Tensor
        ``[B, L]``, same dtype as ``input_ids``: the corrupted ids to feed the cell encoder.
    labels : Tensor
        ``[B, L]`` long: the original id at selected positions, :data:`IGNORE_INDEX` (-100) elsewhere.

    Notes
    -----
    The number selected in a cell with ``n`` eligible tokens is ``floor(mask_prob * n + u)`` with
    ``u ~ U[0, 1)`` (stochastic rounding, so its mean is exactly ``mask_prob * n``), raised to **at least
    one** when ``n >= 1``: every cell with a gene contributes a prediction, so very short cells are masked
    at a higher rate than ``mask_prob`` (a cell with 3 genes has 1 of them masked). Which tokens are
    selected is uniform among the eligible ones. Cells with no gene get no label.
    """
    _check_token_batch(input_ids, attention_mask, "mask_genes")
    if not 0.0 < mask_prob <= 1.0:
        raise LangCellError(
            f"mask_genes: mask_prob must be in (0, 1], got {mask_prob}; the usual value is 0.15."
        )
    lo, hi = int(gene_id_range[0]), int(gene_id_range[1])
    device = input_ids.device
    specials = torch.tensor(sorted({int(i) for i in special_ids} | {int(mask_id)}), dtype=torch.long)
    candidate_genes = torch.arange(lo, max(lo, hi), dtype=torch.long)
    gene_ids = candidate_genes[~torch.isin(candidate_genes, specials)].to(device)
    if gene_ids.numel() == 0:
        raise LangCellError(
            f"mask_genes: gene_id_range {gene_id_range} contains no gene id outside special_ids; pass the "
            "half-open range (lo, hi) of the vocabulary's gene ids."
        )
    specials = specials.to(device)

    ids = input_ids.long()
    batch_size, length = ids.shape
    eligible = attention_mask.bool() & (ids >= lo) & (ids < hi) & ~torch.isin(ids, specials)
    n_eligible = eligible.sum(dim=1)

    # How many to select per cell: stochastic rounding keeps the expected rate exact; at least one if any.
    rounding = torch.rand(batch_size, generator=generator, device=device)
    n_select = torch.floor(mask_prob * n_eligible.float() + rounding).long()
    n_select = torch.where(n_eligible > 0, n_select.clamp(min=1), torch.zeros_like(n_select))
    n_select = torch.minimum(n_select, n_eligible)

    # Which ones: rank eligible tokens by a uniform score (ineligible ones sort last) and take the first k.
    scores = torch.rand(batch_size, length, generator=generator, device=device)
    scores = scores.masked_fill(~eligible, 2.0)
    order = scores.argsort(dim=1)
    score_rank = torch.empty_like(order)
    score_rank.scatter_(1, order, torch.arange(length, device=device).expand(batch_size, length))
    selected = (score_rank < n_select[:, None]) & eligible

    action = torch.rand(batch_size, length, generator=generator, device=device)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)  # the remaining 10% stay unchanged

    masked = ids.clone()
    masked[to_mask] = int(mask_id)
    n_random = int(to_random.sum())
    if n_random:
        draw = torch.randint(0, gene_ids.numel(), (n_random,), generator=generator, device=device)
        masked[to_random] = gene_ids[draw]
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    return masked.to(input_ids.dtype), labels


def gene_dropout(
    input_ids: Tensor,
    attention_mask: Tensor,
    p: float,
    *,
    keep_ids: Iterable[int],
    pad_id: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Drop genes from each cell's rank list at random and re-pack it (a light augmentation for C-C).

    Every real token whose id is not in ``keep_ids`` is dropped independently with probability ``p``. The
    survivors keep their order and move left to close the gaps (so the genes below a dropped one move up a
    rank); the freed tail is filled with ``pad_id`` and masked out. The shape stays ``[B, L]``.

    Parameters
    ----------
    input_ids
        Token ids ``[B, L]``.
    attention_mask
        ``[B, L]``, true / 1 for real tokens.
    p
        Drop probability per gene, in ``[0, 1)``.
    keep_ids
        Ids that are never dropped: at least ``<cls>``.
    pad_id
        Id written into the freed positions.
    generator
        Random generator on ``input_ids.device``; ``None`` uses the global one.

    Returns
    -------
    input_ids : Tensor
        ``[B, L]`` re-packed ids (same dtype).
    attention_mask : Tensor
        ``[B, L]`` mask of the re-packed ids (same dtype as the given mask), true on a prefix of each row.

    Notes
    -----
    A cell never loses all of its genes: if every droppable token of a row was drawn, its first (highest
    ranked) gene is kept.
    """
    _check_token_batch(input_ids, attention_mask, "gene_dropout")
    if not 0.0 <= p < 1.0:
        raise LangCellError(
            f"gene_dropout: p must be in [0, 1), got {p}; a light augmentation uses about 0.1."
        )
    device = input_ids.device
    batch_size, length = input_ids.shape
    keep_tensor = torch.tensor(sorted({int(i) for i in keep_ids}), dtype=input_ids.dtype, device=device)
    real = attention_mask.bool()
    droppable = real & ~torch.isin(input_ids, keep_tensor)
    drop = droppable & (torch.rand(batch_size, length, generator=generator, device=device) < p)

    emptied = droppable.any(dim=1) & ~(droppable & ~drop).any(dim=1)
    if emptied.any():
        first_gene = droppable.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximal index
        rows = emptied.nonzero(as_tuple=True)[0]
        drop[rows, first_gene[rows]] = False

    kept = real & ~drop
    new_position = kept.long().cumsum(dim=1) - 1
    row_index = torch.arange(batch_size, device=device)[:, None].expand(batch_size, length)
    packed = torch.full_like(input_ids, int(pad_id))
    packed[row_index[kept], new_position[kept]] = input_ids[kept]
    n_kept = kept.sum(dim=1)
    packed_mask = torch.arange(length, device=device)[None, :] < n_kept[:, None]
    return packed, packed_mask.to(attention_mask.dtype)

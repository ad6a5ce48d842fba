"""Packing right-padded cells so that no work is spent on pad positions.

A batch ``[B, L_max]`` whose cells are prefixes of their rows becomes ``[T, H]`` states of the real
tokens only (one cell after another); attention then runs once per run of equal-length cells, without a
mask. See :mod:`langcell.models.cell_encoder` for when packing is used.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import LangCellError

PACKED_KERNELS = ("runs", "nested", "varlen")  # how packed cells attend (module docstring)


@dataclass
class PackedCells:
    """Where the real tokens of a right-padded batch lie once packed (see the module docstring).

    Built by :func:`pack_cells`. Packed states are ``[T, H]``: the ``lengths[0]`` tokens of cell 0,
    then those of cell 1, and so on; ``T = lengths.sum()``.
    """

    batch_size: int  # B, cells in the batch
    padded_length: int  # L_max, the width of the padded [B, L_max] batch
    lengths: torch.Tensor  # [B] long: real tokens of each cell
    starts: torch.Tensor  # [B] long: packed row of each cell's first token (its <cls>)
    token_index: torch.Tensor | None  # [T] long: flat index into [B * L_max] of each packed token; None = no padding
    runs: list[tuple[int, int, int, int]]  # (first cell, cells, first packed row, length) of equal-length cells in a row
    kernel: str = "runs"  # how attention runs, one of PACKED_KERNELS (module docstring)

    # Cached: the variable-length kernels read these once per layer.
    @functools.cached_property
    def offsets(self) -> torch.Tensor:
        """``[B + 1]`` packed row where each cell starts, then ``T`` (the variable-length kernels' input)."""
        return torch.cat([self.starts, self.starts.new_tensor([self.num_tokens])])

    @functools.cached_property
    def max_length(self) -> int:
        """The longest cell's length."""
        return max(length for _, _, _, length in self.runs)

    @property
    def num_tokens(self) -> int:
        """T, the number of real tokens."""
        first_cell, cells, first_row, length = self.runs[-1]
        return first_row + cells * length

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """The real entries ``[T, ...]`` of a padded ``[B, L_max, ...]`` tensor."""
        flat = padded.reshape(self.batch_size * self.padded_length, *padded.shape[2:])
        return flat if self.token_index is None else flat[self.token_index]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed states ``[T, H]`` back to ``[B, L_max, H]``, zeros at the pad positions."""
        if self.token_index is not None:
            full = packed.new_zeros(self.batch_size * self.padded_length, packed.shape[-1])
            packed = full.index_copy(0, self.token_index, packed)
        return packed.view(self.batch_size, self.padded_length, packed.shape[-1])


def pack_cells(
    attention_mask: torch.Tensor | None,
    batch_size: int,
    padded_length: int,
    device: torch.device | str | None = None,
    kernel: str = "runs",
) -> PackedCells | None:
    """Describe how to pack a batch, or ``None`` when its mask is not plain right padding.

    Parameters
    ----------
    attention_mask
        ``[B, L_max]`` HF-style mask (1 = real token) or ``None`` (nothing padded).
    batch_size, padded_length
        ``B`` and ``L_max`` of the batch.
    device
        Where the index tensors go when ``attention_mask`` is ``None`` (otherwise: the mask's device).
    kernel
        How attention will run, one of ``PACKED_KERNELS`` (module docstring).

    Returns
    -------
    PackedCells or None
        ``None`` when some row is not a prefix of ones followed by zeros, or has no token at all: such
        batches take the masked path.
    """
    if kernel not in PACKED_KERNELS:
        raise LangCellError(f"unknown packed attention kernel {kernel!r}; use one of {', '.join(PACKED_KERNELS)}")
    if attention_mask is None:
        lengths = torch.full((batch_size,), padded_length, dtype=torch.long, device=device)
        token_index = None
    else:
        keep = attention_mask.bool()
        lengths = keep.sum(dim=1)
        prefix = torch.arange(padded_length, device=keep.device)[None, :] < lengths[:, None]
        if not torch.equal(keep, prefix) or bool((lengths == 0).any()):
            return None
        token_index = torch.nonzero(keep.flatten()).flatten()
    sizes = lengths.tolist()
    if min(sizes, default=padded_length) == padded_length:
        token_index = None  # nothing padded: the packed rows are the batch's rows, no gather needed
    runs, cell, row = [], 0, 0
    while cell < batch_size:
        end = cell + 1
        while end < batch_size and sizes[end] == sizes[cell]:
            end += 1
        runs.append((cell, end - cell, row, sizes[cell]))
        row += (end - cell) * sizes[cell]
        cell = end
    starts = torch.cumsum(lengths, dim=0) - lengths
    return PackedCells(batch_size, padded_length, lengths, starts, token_index, runs, kernel)


def packed_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    packed: PackedCells,
    num_heads: int,
    *,
    first_token_only: bool = False,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Self-attention of packed cells, each cell attending to its own tokens only.

    Parameters
    ----------
    queries
        ``[T, H]`` packed queries, or ``[B, H]`` (one per cell, its first token) with ``first_token_only``.
    keys, values
        ``[T, H]`` packed keys and values (may be column slices of one fused projection).
    packed
        The layout, from :func:`pack_cells`.
    num_heads
        Attention heads; ``H`` must be divisible by it.
    first_token_only
        ``queries`` holds one row per cell.
    dropout
        Attention dropout probability (pass 0 outside training).

    The kernel is ``packed.kernel`` (module docstring); all three give the same result up to rounding.

    Returns
    -------
    torch.Tensor
        The context, shaped like ``queries``.
    """
    width = queries.shape[-1]
    head_dim = width // num_heads
    if packed.kernel == "nested":
        return _nested_attention(queries, keys, values, packed, num_heads, first_token_only, dropout)
    if packed.kernel == "varlen":
        return _varlen_attention(queries, keys, values, packed, num_heads, first_token_only, dropout)
    context = queries.new_empty(queries.shape)
    for first_cell, cells, first_row, length in packed.runs:
        rows = slice(first_row, first_row + cells * length)
        # A run of equal-length cells is a plain [cells, heads, length, d] batch: no mask, no padding.
        k = keys[rows].view(cells, length, num_heads, head_dim).transpose(1, 2)
        v = values[rows].view(cells, length, num_heads, head_dim).transpose(1, 2)
        query_rows = slice(first_cell, first_cell + cells) if first_token_only else rows
        query_length = 1 if first_token_only else length
        q = queries[query_rows].view(cells, query_length, num_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        context[query_rows].view(cells, query_length, num_heads, head_dim).copy_(out.transpose(1, 2))
    return context


def _query_offsets(packed: PackedCells, first_token_only: bool) -> torch.Tensor:
    """Where each cell's queries start in the packed queries: one per cell with ``first_token_only``."""
    if first_token_only:
        return torch.arange(packed.batch_size + 1, device=packed.starts.device)
    return packed.offsets


def _nested_attention(queries, keys, values, packed, num_heads, first_token_only, dropout):
    """``packed_attention`` as one SDPA call on jagged nested tensors ``[B, heads, j, d]``."""
    head_dim = queries.shape[-1] // num_heads

    def jagged(rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # contiguous(): the column slices of the fused projection are strided, and SDPA's nested-tensor
        # backends want dense per-head rows.
        rows = rows.contiguous().view(-1, num_heads, head_dim)
        return torch.nested.nested_tensor_from_jagged(rows, offsets).transpose(1, 2)

    offsets = packed.offsets
    out = F.scaled_dot_product_attention(
        jagged(queries, _query_offsets(packed, first_token_only)),
        jagged(keys, offsets),
        jagged(values, offsets),
        dropout_p=dropout,
    )
    return out.transpose(1, 2).values().reshape(queries.shape)


def _varlen_attention(queries, keys, values, packed, num_heads, first_token_only, dropout):
    """``packed_attention`` as one call of PyTorch's variable-length Flash Attention."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        raise LangCellError(
            f"attention 'varlen' needs PyTorch >= 2.10 (this is {torch.__version__}); use 'nested' or 'packed'"
        ) from None
    if queries.device.type != "cuda" or queries.dtype not in (torch.float16, torch.bfloat16):
        raise LangCellError(
            f"attention 'varlen' runs on CUDA in bf16 or fp16 only (got {queries.device.type}, {queries.dtype}); "
            "use precision='bf16' on a GPU, or attention 'nested' or 'packed'"
        )
    if dropout > 0:
        raise LangCellError(
            "attention 'varlen' has no attention dropout; set the cell encoder's attention_probs_dropout_prob "
            "to 0 for training, or use attention 'nested'"
        )
    head_dim = queries.shape[-1] // num_heads
    key_offsets = packed.offsets.to(torch.int32)  # Flash Attention takes int32 offsets
    query_offsets = _query_offsets(packed, first_token_only).to(torch.int32)
    out = varlen_attn(
        queries.reshape(-1, num_heads, head_dim),
        keys.reshape(-1, num_heads, head_dim),
        values.reshape(-1, num_heads, head_dim),
        query_offsets,
        key_offsets,
        1 if first_token_only else packed.max_length,
        packed.max_length,
    )
    return out.reshape(queries.shape)

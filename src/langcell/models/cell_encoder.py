"""The cell encoder: a BERT over rank-ordered gene tokens, in one file.

A cell arrives as ``<cls>`` followed by its expressed genes sorted by normalised expression, so the
position of a token *is* its rank. The network is the original post-LayerNorm BERT encoder (what
Geneformer and the released LangCell checkpoint use), written with
:func:`torch.nn.functional.scaled_dot_product_attention` so that PyTorch can pick a fused kernel.

Parameter names follow Hugging Face ``BertModel`` (``embeddings.word_embeddings``,
``encoder.layer.N.attention.self.query``, ``encoder.layer.N.output.LayerNorm``, ...) so that a BERT
checkpoint loads by name. As in HF BERT, the token-type embedding's row 0 is added to every token: the
released weights were trained that way.

Padding costs nothing. A batch of right-padded cells (every cell's tokens a prefix of its row, the
layout :func:`langcell.data.batching.pad_sequences` makes) is *packed* before the first layer: the real tokens
of all cells, one cell after another, ``[T, H]`` with no padding row. Every per-token operation
(embeddings, projections, feed-forward, LayerNorm) runs once over those T rows, and attention runs
per run of equal-length cells (one SDPA call without a mask for each run), so neither the linear
layers nor attention ever spend work on a pad position: ``sum(L_i)`` and ``sum(L_i^2)`` instead of
``B x L_max`` and ``B x L_max^2``. Only the final states are scattered back into ``[B, L_max, H]``
(zeros at pad positions). Any other mask (holes, left padding, an empty cell) goes through the
ordinary masked path, which gives the same states on real tokens.

``forward(..., first_token_only=True)`` returns only the ``<cls>`` states: the last layer then
computes keys and values for every token but queries, attention output and feed-forward for the
first token of each cell only (what cell embeddings need; about 1/num_layers of the work saved).

The building blocks here (:class:`QueryKeyValue`, :class:`AttentionOutput`, :class:`Intermediate`,
:class:`Output`) are reused by the text encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import CellEncoderConfig, TextEncoderConfig
from ..errors import LangCellError

BertSizes = CellEncoderConfig | TextEncoderConfig


def activation(name: str):
    """The activation function BERT configs call ``name``."""
    functions = {
        "gelu": F.gelu,
        "relu": F.relu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
        "tanh": torch.tanh,
    }
    return functions[name]


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Turn an HF-style ``[B, L]`` 0/1 mask into the boolean ``[B, 1, 1, L]`` mask SDPA takes.

    Returns ``None`` when nothing is padded, which lets SDPA use its fastest kernel.
    """
    if attention_mask is None:
        return None
    keep = attention_mask.bool()
    if bool(keep.all()):
        return None
    return keep[:, None, None, :]


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

    Returns
    -------
    PackedCells or None
        ``None`` when some row is not a prefix of ones followed by zeros, or has no token at all: such
        batches take the masked path.
    """
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
    return PackedCells(batch_size, padded_length, lengths, starts, token_index, runs)


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

    Returns
    -------
    torch.Tensor
        The context, shaped like ``queries``.
    """
    width = queries.shape[-1]
    head_dim = width // num_heads
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


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, L, H]`` -> ``[B, heads, L, H / heads]``."""
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, L, d]`` -> ``[B, L, heads * d]``."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


class QueryKeyValue(nn.Module):
    """The ``query``/``key``/``value`` projections of one attention block (HF's ``attention.self``).

    ``key_width`` is the width of the states keys and values are computed from: the same as the
    hidden size for self-attention, the cell encoder's hidden size for cross-attention.
    """

    def __init__(self, hidden_size: int, num_heads: int, key_width: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(key_width, hidden_size)
        self.value = nn.Linear(key_width, hidden_size)

    def keys_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, heads, L, d]`` of ``states`` ``[B, L, key_width]``."""
        return split_heads(self.key(states), self.num_heads), split_heads(self.value(states), self.num_heads)

    def attend(
        self,
        hidden: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Queries from ``hidden`` ``[B, T, H]`` attend to ``keys``/``values``; returns ``[B, T, H]``."""
        queries = split_heads(self.query(hidden), self.num_heads)
        context = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return merge_heads(context)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Self-attention of ``hidden`` ``[B, L, H]`` under the boolean key mask ``mask``."""
        keys, values = self.keys_values(hidden)
        return self.attend(hidden, keys, values, mask)

    def packed(self, hidden: torch.Tensor, packed: PackedCells, first_token_only: bool = False) -> torch.Tensor:
        """Self-attention of packed cells ``[T, H]`` (see :func:`packed_attention`).

        Query, key and value come from one fused matrix product (one pass over the T rows instead of
        three); with ``first_token_only`` only each cell's first token gets a query, and the result is
        ``[B, H]``.
        """
        dropout = self.dropout if self.training else 0.0
        if first_token_only:
            queries = self.query(hidden[packed.starts])
            weight = torch.cat([self.key.weight, self.value.weight])
            bias = torch.cat([self.key.bias, self.value.bias])
            keys, values = F.linear(hidden, weight, bias).chunk(2, dim=-1)
        else:
            weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
            bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
            queries, keys, values = F.linear(hidden, weight, bias).chunk(3, dim=-1)
        return packed_attention(
            queries, keys, values, packed, self.num_heads, first_token_only=first_token_only, dropout=dropout
        )


class AttentionOutput(nn.Module):
    """Projection, dropout, residual and post-LayerNorm after attention (HF's ``attention.output``)."""

    def __init__(self, config: BertSizes):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``LayerNorm(dropout(dense(context)) + residual)``."""
        return self.LayerNorm(self.dropout(self.dense(context)) + residual)


class Attention(nn.Module):
    """Self-attention block: ``self`` (query/key/value) then ``output`` (dense + LayerNorm)."""

    def __init__(self, config: BertSizes, key_width: int | None = None):
        super().__init__()
        self.self = QueryKeyValue(
            config.hidden_size,
            config.num_attention_heads,
            key_width or config.hidden_size,
            config.attention_probs_dropout_prob,
        )
        self.output = AttentionOutput(config)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Self-attention sublayer of ``hidden`` ``[B, L, H]``, residual and LayerNorm included."""
        return self.output(self.self(hidden, mask), hidden)


class Intermediate(nn.Module):
    """First half of the feed-forward block (HF's ``intermediate``): dense + activation."""

    def __init__(self, config: BertSizes):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``act(dense(hidden))``: ``[..., H]`` -> ``[..., intermediate]``."""
        return self.act(self.dense(hidden))


class Output(nn.Module):
    """Second half of the feed-forward block (HF's ``output``): dense, dropout, residual, LayerNorm."""

    def __init__(self, config: BertSizes):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``LayerNorm(dropout(dense(hidden)) + residual)``: back to ``[..., H]``."""
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class EncoderLayer(nn.Module):
    """One post-LayerNorm transformer layer: self-attention, then feed-forward."""

    def __init__(self, config: BertSizes):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = Output(config)

    def feed_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The feed-forward half of the layer, residual and LayerNorm included."""
        return self.output(self.intermediate(hidden), hidden)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, first_token_only: bool = False
    ) -> torch.Tensor:
        """One layer over ``hidden`` ``[B, L, H]`` with boolean key mask ``mask`` (or ``None``).

        With ``first_token_only`` only the first token's new state is computed: ``[B, H]``.
        """
        if not first_token_only:
            return self.feed_forward(self.attention(hidden, mask))
        attention = self.attention
        keys, values = attention.self.keys_values(hidden)
        first = hidden[:, :1]
        context = attention.self.attend(first, keys, values, mask)
        return self.feed_forward(attention.output(context, first))[:, 0]

    def packed(self, hidden: torch.Tensor, packed: PackedCells, first_token_only: bool = False) -> torch.Tensor:
        """One layer over packed cells ``[T, H]``; ``[B, H]`` first-token states with ``first_token_only``."""
        residual = hidden[packed.starts] if first_token_only else hidden
        context = self.attention.self.packed(hidden, packed, first_token_only)
        return self.feed_forward(self.attention.output(context, residual))


class Embeddings(nn.Module):
    """Token + absolute position (+ token-type row 0) embeddings, LayerNorm, dropout."""

    def __init__(self, config: BertSizes):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        # BERT adds token_type_embeddings[0] to every token when no token types are given; keeping the
        # table (rather than folding it into the position table) lets HF checkpoints load unchanged.
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size > 0 else None
        )
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.max_positions = config.max_position_embeddings

    def check_length(self, length: int) -> None:
        """Refuse sequences longer than the position table, saying how to fix it."""
        if length > self.max_positions:
            # A user can hand us over-long sequences; say so instead of an opaque index error.
            raise LangCellError(
                f"sequences of {length} tokens are longer than the model's {self.max_positions} positions; "
                "truncate them (e.g. max_length=...) before encoding"
            )

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Embedded, normalised tokens ``[..., H]`` of ``input_ids`` at ``positions`` (same shape or broadcast)."""
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if self.token_type_embeddings is not None:
            hidden = hidden + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(hidden))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embedded, normalised tokens ``[B, L, H]`` of ``input_ids`` ``[B, L]`` (position = index)."""
        self.check_length(input_ids.shape[1])
        return self.embed(input_ids, torch.arange(input_ids.shape[1], device=input_ids.device)[None])

    def packed(self, input_ids: torch.Tensor, packed: PackedCells) -> torch.Tensor:
        """Packed embeddings ``[T, H]`` of the real tokens of a right-padded ``input_ids`` ``[B, L_max]``."""
        self.check_length(input_ids.shape[1])
        # Position of each packed token within its cell: its packed row minus its cell's first row.
        first_rows = torch.repeat_interleave(packed.starts, packed.lengths)
        positions = torch.arange(first_rows.numel(), device=input_ids.device) - first_rows
        return self.embed(packed.pack(input_ids), positions)


class Encoder(nn.Module):
    """The stack of layers (HF's ``encoder``), with optional gradient checkpointing."""

    def __init__(self, config: CellEncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(
        self,
        hidden: torch.Tensor,
        layout: torch.Tensor | PackedCells | None,
        first_token_only: bool = False,
    ) -> torch.Tensor:
        """Run every layer over ``hidden``.

        ``hidden`` is ``[B, L, H]`` with ``layout`` the boolean key mask (or ``None``), or packed
        ``[T, H]`` with ``layout`` its :class:`PackedCells`. ``first_token_only``: the last layer
        computes only each cell's first-token state, ``[B, H]``.
        """
        last = len(self.layer) - 1
        for number, layer in enumerate(self.layer):
            run = layer.packed if isinstance(layout, PackedCells) else layer
            first_only = first_token_only and number == last
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(run, hidden, layout, first_only, use_reentrant=False)
            else:
                hidden = run(hidden, layout, first_only)
        return hidden


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, unit LayerNorm, zero padding row."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.padding_idx is not None:
                with torch.no_grad():
                    sub.weight[sub.padding_idx].zero_()
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


class CellEncoder(nn.Module):
    """BERT over gene tokens.

    Parameters
    ----------
    config
        Sizes; see :class:`~langcell.config.CellEncoderConfig`.

    Notes
    -----
    ``forward(input_ids, attention_mask)`` returns the last layer's token states ``[B, L, hidden]``;
    position 0 (``<cls>``) is the cell's summary. Pad positions hold zeros on the packed path and
    meaningless states on the masked path; nothing reads them (other tokens and the heads ignore them).
    """

    def __init__(self, config: CellEncoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        init_bert_weights(self, config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        first_token_only: bool = False,
        pack: bool | None = None,
    ) -> torch.Tensor:
        """Token states of a batch of cells.

        Parameters
        ----------
        input_ids
            ``[B, L]`` token ids, ``<cls>`` first.
        attention_mask
            ``[B, L]``, 1 = real token, 0 = padding (``None``: nothing padded).
        first_token_only
            Return only the ``<cls>`` states ``[B, hidden]`` (the last layer then skips the other tokens'
            queries and feed-forward).
        pack
            Pack the real tokens (module docstring). ``None`` (default) packs on the CPU, where it was
            measured (BENCHMARKS.md) and an SDPA call costs microseconds to launch. On a GPU the default
            is the masked path, one fused kernel per layer, because packing launches one kernel per
            distinct cell length per layer; whether packing pays there is not yet measured (no GPU so
            far), so ``pack=True`` is there to try it. Rows that are not right padding always take the
            masked path. Both paths give the same states on real tokens.

        Returns
        -------
        torch.Tensor
            ``[B, L, hidden]`` last-layer states, or ``[B, hidden]`` with ``first_token_only``.
        """
        if pack is None:
            pack = input_ids.device.type == "cpu"
        packed = pack_cells(attention_mask, *input_ids.shape, device=input_ids.device) if pack else None
        if packed is None:
            return self.encoder(self.embeddings(input_ids), padding_mask(attention_mask), first_token_only)
        states = self.encoder(self.embeddings.packed(input_ids, packed), packed, first_token_only)
        return states if first_token_only else packed.unpack(states)

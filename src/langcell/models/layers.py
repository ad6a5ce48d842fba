"""The BERT blocks both towers share, with Hugging Face ``BertModel`` parameter names.

Self-attention (query/key/value in one fused projection, SDPA, and a packed path for cells), the
post-LayerNorm output blocks, the feed-forward block, the embeddings, and BERT's initialisation. The
cell encoder stacks them as they are; the text encoder adds cross-attention on top.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LangCellError
from .config import CellEncoderConfig, TextEncoderConfig
from .packing import PackedCells, packed_attention

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


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, L, H]`` -> ``[B, heads, L, H / heads]``."""
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, L, d]`` -> ``[B, L, heads * d]``."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def fused_linear(hidden: torch.Tensor, layers: tuple[nn.Module, ...]) -> torch.Tensor:
    """The outputs of ``layers`` on ``hidden``, concatenated along the last axis.

    Plain :class:`torch.nn.Linear` layers run as one matrix product over the concatenated weights (one
    pass over the rows of ``hidden`` instead of one per layer); any other layer (e.g. the int8 copies of
    :mod:`langcell.precision`) runs on its own.
    """
    if all(type(layer) is nn.Linear for layer in layers):
        weight = torch.cat([layer.weight for layer in layers])
        bias = torch.cat([layer.bias for layer in layers])
        return F.linear(hidden, weight, bias)
    return torch.cat([layer(hidden) for layer in layers], dim=-1)


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
            keys, values = fused_linear(hidden, (self.key, self.value)).chunk(2, dim=-1)
        else:
            queries, keys, values = fused_linear(hidden, (self.query, self.key, self.value)).chunk(3, dim=-1)
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

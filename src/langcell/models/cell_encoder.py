"""The cell encoder: a BERT over rank-ordered gene tokens, in one file.

A cell arrives as ``<cls>`` followed by its expressed genes sorted by normalised expression, so the
position of a token *is* its rank. The network is the original post-LayerNorm BERT encoder (what
Geneformer and the released LangCell checkpoint use), written with
:func:`torch.nn.functional.scaled_dot_product_attention` so that PyTorch can pick a fused kernel.

Parameter names follow Hugging Face ``BertModel`` (``embeddings.word_embeddings``,
``encoder.layer.N.attention.self.query``, ``encoder.layer.N.output.LayerNorm``, ...) so that a BERT
checkpoint loads by name. As in HF BERT, the token-type embedding's row 0 is added to every token: the
released weights were trained that way.

The building blocks here (:class:`SelfAttention`, :class:`AttentionOutput`, :class:`FeedForward`) are
reused by the text encoder.
"""

from __future__ import annotations

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

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One layer over ``hidden`` ``[B, L, H]`` with boolean key mask ``mask`` (or ``None``)."""
        return self.feed_forward(self.attention(hidden, mask))


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

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embedded, normalised tokens ``[B, L, H]`` of ``input_ids`` ``[B, L]`` (position = index)."""
        length = input_ids.shape[1]
        if length > self.max_positions:
            # A user can hand us over-long sequences; say so instead of an opaque index error.
            raise LangCellError(
                f"sequences of {length} tokens are longer than the model's {self.max_positions} positions; "
                "truncate them (e.g. max_length=...) before encoding"
            )
        positions = torch.arange(length, device=input_ids.device)
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        if self.token_type_embeddings is not None:
            hidden = hidden + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(hidden))


class Encoder(nn.Module):
    """The stack of layers (HF's ``encoder``), with optional gradient checkpointing."""

    def __init__(self, config: CellEncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Run every layer over ``hidden`` ``[B, L, H]``."""
        for layer in self.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, mask, use_reentrant=False)
            else:
                hidden = layer(hidden, mask)
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
    position 0 (``<cls>``) is the cell's summary. Padded positions get states too (they are ignored by
    every other token and by the heads).
    """

    def __init__(self, config: CellEncoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        init_bert_weights(self, config.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token states ``[B, L, hidden]`` of ``input_ids`` ``[B, L]`` (1 in ``attention_mask`` = real token)."""
        return self.encoder(self.embeddings(input_ids), padding_mask(attention_mask))

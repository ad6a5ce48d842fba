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

Which path runs is the encoder's ``attention`` (``ATTENTION_PATHS``), set on the module or per call:

``"packed"``
    the packing above, attention per run of equal-length cells (the default on the CPU, measured there);
``"masked"``
    the padded ``[B, L_max]`` batch with a key mask, one SDPA call per layer (the default elsewhere);
``"nested"`` and ``"varlen"``
    packed tokens with one variable-length attention call per layer, through jagged nested tensors or
    PyTorch's variable-length Flash Attention (:mod:`langcell.models.packing`): candidates for GPUs,
    where a call per distinct cell length is many kernel launches. ``"nested"`` runs anywhere but is
    slow on the CPU; ``"varlen"`` needs CUDA and bf16/fp16.

``"auto"`` picks the device's default. All paths give the same states on real tokens, up to rounding.

``forward(..., first_token_only=True)`` returns only the ``<cls>`` states: the last layer then
computes keys and values for every token but queries, attention output and feed-forward for the
first token of each cell only (what cell embeddings need; about 1/num_layers of the work saved).

The building blocks here (:class:`QueryKeyValue`, :class:`AttentionOutput`, :class:`Intermediate`,
:class:`Output`) are reused by the text encoder.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import LangCellError
from .config import CellEncoderConfig
from .layers import Attention, BertSizes, Embeddings, Intermediate, Output, init_bert_weights, padding_mask
from .packing import PackedCells, pack_cells

ATTENTION_PATHS = ("auto", "packed", "masked", "nested", "varlen")  # the encoder's attention (module docstring)


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
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and isinstance(layout, PackedCells) and layout.kernel == "nested":
            raise LangCellError(
                "attention 'nested' cannot be combined with gradient checkpointing (PyTorch's checkpoint "
                "cannot recompute nested tensors); use attention 'packed' or 'varlen', or set the cell "
                "encoder's gradient_checkpointing to false"
            )
        for number, layer in enumerate(self.layer):
            run = layer.packed if isinstance(layout, PackedCells) else layer
            first_only = first_token_only and number == last
            if checkpointing:
                hidden = checkpoint(run, hidden, layout, first_only, use_reentrant=False)
            else:
                hidden = run(hidden, layout, first_only)
        return hidden


class CellEncoder(nn.Module):
    """BERT over gene tokens.

    Parameters
    ----------
    config
        Sizes; see :class:`~langcell.models.config.CellEncoderConfig`.

    Attributes
    ----------
    attention : str
        The attention path calls use unless they name one, one of ``ATTENTION_PATHS`` (module
        docstring); ``"auto"`` at construction. Not saved with the model: it is a property of the
        machine, not of the weights.

    Notes
    -----
    ``forward(input_ids, attention_mask)`` returns the last layer's token states ``[B, L, hidden]``;
    position 0 (``<cls>``) is the cell's summary. Pad positions hold zeros on the packed paths and
    meaningless states on the masked path; nothing reads them (other tokens and the heads ignore them).
    """

    def __init__(self, config: CellEncoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.attention = "auto"
        init_bert_weights(self, config.initializer_range)

    @property
    def attention(self) -> str:
        """The attention path of calls that name none (class docstring)."""
        return self._attention

    @attention.setter
    def attention(self, path: str) -> None:
        self._attention = check_attention_path(path)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        first_token_only: bool = False,
        attention: str | None = None,
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
        attention
            The attention path, one of ``ATTENTION_PATHS`` (module docstring); ``None``: the module's
            :attr:`attention`. ``"auto"`` packs on the CPU, where that was measured (BENCHMARKS.md), and
            takes the masked path on other devices. Rows that are not right padding always take the
            masked path.

        Returns
        -------
        torch.Tensor
            ``[B, L, hidden]`` last-layer states, or ``[B, hidden]`` with ``first_token_only``.
        """
        path = self._attention if attention is None else check_attention_path(attention)
        if path == "auto":
            path = "packed" if input_ids.device.type == "cpu" else "masked"
        packed = None
        if path != "masked":
            kernel = "runs" if path == "packed" else path
            packed = pack_cells(attention_mask, *input_ids.shape, device=input_ids.device, kernel=kernel)
        if packed is None:
            return self.encoder(self.embeddings(input_ids), padding_mask(attention_mask), first_token_only)
        states = self.encoder(self.embeddings.packed(input_ids, packed), packed, first_token_only)
        return states if first_token_only else packed.unpack(states)


def check_attention_path(path: str) -> str:
    """``path`` if it is one of ``ATTENTION_PATHS``, else a :class:`LangCellError` naming them."""
    if path not in ATTENTION_PATHS:
        raise LangCellError(f"unknown cell-encoder attention {path!r}; use one of {', '.join(ATTENTION_PATHS)}")
    return path

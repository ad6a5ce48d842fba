"""The text encoder: BERT whose layers can also cross-attend to a cell's token states.

One set of weights, two modes (as BLIP's "med" BERT that LangCell uses):

``mode="text"`` (unimodal, the paper's g1)
    Plain BERT. ``[CLS]`` -> ``text_proj`` gives the text embedding.
``mode="multimodal"`` (the paper's g2)
    After self-attention, each layer that has a ``crossattention`` block lets the text tokens attend to
    the cell encoder's token states; the first token's final state feeds the cell-text matching head.

Parameter names follow HF BERT and BLIP med: ``encoder.layer.N.attention.self.query``,
``encoder.layer.N.crossattention.self.{query,key,value}``, ``encoder.layer.N.crossattention.output.
{dense,LayerNorm}``, ``intermediate.dense``, ``output.dense``, ... Cross-attention key/value are
``Linear(cell hidden -> text hidden)``.

Many texts per cell (zero-shot scoring with K classes, or CTM pairs in pre-training) never copy the
cell's keys and values: every cross-attention layer projects each cell's states once
(``[cells, heads, L, d]``) and the queries of all texts scored against that cell are laid side by side
along the sequence axis (``[cells, heads, texts x T, d]``). Self-attention stays per text.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import LangCellError
from .config import TextEncoderConfig
from .layers import (
    Attention,
    AttentionOutput,
    Embeddings,
    Intermediate,
    Output,
    QueryKeyValue,
    init_bert_weights,
    padding_mask,
)
from .serialization import read_weights, resolve_hf_directory


class CrossAttention(nn.Module):
    """Text queries attend to cell keys/values; ``self`` and ``output`` named as in BLIP med."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.self = QueryKeyValue(
            config.hidden_size, config.num_attention_heads, config.encoder_width, config.attention_probs_dropout_prob
        )
        self.output = AttentionOutput(config)

    def forward(
        self,
        hidden: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``hidden`` ``[G, S, H]`` attends to ``keys``/``values`` ``[G, heads, L, d]`` of G cells."""
        return self.output(self.self.attend(hidden, keys, values, mask), hidden)


class TextLayer(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; post-LayerNorm throughout."""

    def __init__(self, config: TextEncoderConfig, with_cross_attention: bool):
        super().__init__()
        self.attention = Attention(config)
        self.crossattention = CrossAttention(config) if with_cross_attention else None
        self.intermediate = Intermediate(config)
        self.output = Output(config)

    def forward(
        self,
        hidden: torch.Tensor,
        self_mask: torch.Tensor | None,
        cells: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """One layer.

        Parameters
        ----------
        hidden
            ``[G * C, T, H]``: C texts for each of G cells (G = 1 group of all texts in text mode).
        self_mask
            Boolean ``[G * C, 1, 1, T]`` key mask for self-attention, or ``None``.
        cells
            ``(cell_states [G, L, H_cell], cell_mask [G, 1, 1, L] or None)`` in multimodal mode.
        """
        hidden = self.attention(hidden, self_mask)
        if cells is not None and self.crossattention is not None:
            cell_states, cell_mask = cells
            groups = cell_states.shape[0]
            texts_x_tokens, width = hidden.shape[0] * hidden.shape[1], hidden.shape[2]
            # Keys/values once per cell; the texts of one cell side by side as one long query sequence.
            keys, values = self.crossattention.self.keys_values(cell_states)
            side_by_side = hidden.reshape(groups, texts_x_tokens // groups, width)
            hidden = self.crossattention(side_by_side, keys, values, cell_mask).reshape(hidden.shape)
        return self.output(self.intermediate(hidden), hidden)


class TextEncoderLayers(nn.Module):
    """The stack of layers (HF's ``encoder``)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        first_cross = config.first_cross_attention_layer
        self.layer = nn.ModuleList(TextLayer(config, i >= first_cross) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, hidden, self_mask, cells=None):
        """Run every layer; ``cells`` as in :meth:`TextLayer.forward`."""
        for layer in self.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, self_mask, cells, use_reentrant=False)
            else:
                hidden = layer(hidden, self_mask, cells)
        return hidden


class TextEncoder(nn.Module):
    """BERT with optional cross-attention to cell token states.

    Parameters
    ----------
    config
        Sizes; see :class:`~langcell.models.config.TextEncoderConfig`. Weights start random (BERT init); use
        :meth:`load_hf_bert` to start from a pretrained BERT (cross-attention stays freshly initialised).
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = TextEncoderLayers(config)
        init_bert_weights(self, config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        mode: str = "text",
        cell_states: torch.Tensor | None = None,
        cell_mask: torch.Tensor | None = None,
        cell_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token states of M texts, alone or read against cells.

        Parameters
        ----------
        input_ids, attention_mask
            ``[M, T]`` tokenized texts (HF convention: 1 = real token).
        mode
            ``"text"`` (unimodal BERT) or ``"multimodal"`` (with cross-attention to ``cell_states``).
        cell_states, cell_mask
            ``[B, L, H_cell]`` cell encoder outputs and their ``[B, L]`` 0/1 mask (multimodal only).
        cell_index
            Multimodal only. ``None``: every text against every cell. A LongTensor ``[M]``: text m
            against cell ``cell_index[m]`` only.

        Returns
        -------
        torch.Tensor
            ``[M, T, H]`` in text mode and for ``cell_index`` pairs; ``[B, M, T, H]`` for all pairs.
        """
        if mode == "text":
            return self.encoder(self.embeddings(input_ids), padding_mask(attention_mask))
        if mode != "multimodal":
            raise LangCellError(f"unknown text encoder mode {mode!r}; use 'text' or 'multimodal'")
        if cell_states is None:
            raise LangCellError("mode='multimodal' needs cell_states (the cell encoder's token states)")
        return self._multimodal(input_ids, attention_mask, cell_states, cell_mask, cell_index)

    def _multimodal(self, input_ids, attention_mask, cell_states, cell_mask, cell_index):
        if self.config.multimodal_first_token_id is not None:
            # BLIP's convention: an [ENC] token in place of [CLS] tells the model it is matching.
            input_ids = input_ids.clone()
            input_ids[:, 0] = self.config.multimodal_first_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if cell_mask is None:
            cell_mask = torch.ones(cell_states.shape[:2], dtype=torch.long, device=cell_states.device)
        texts = self.embeddings(input_ids)  # [M, T, H]; the embedding does not depend on the cell
        num_texts, length, width = texts.shape

        if cell_index is None:
            # Group g = cell g; slot c = text c.
            groups, slots = cell_states.shape[0], num_texts
            hidden = texts[None].expand(groups, slots, length, width)
            slot_mask = attention_mask[None].expand(groups, slots, length)
            group_of_text = slot_of_text = None
        else:
            cell_index = torch.as_tensor(cell_index, dtype=torch.long, device=texts.device)
            if cell_index.shape != (num_texts,):
                raise LangCellError(
                    f"cell_index must hold one cell index per text ({num_texts}), got shape "
                    f"{tuple(cell_index.shape)}"
                )
            if num_texts and (int(cell_index.min()) < 0 or int(cell_index.max()) >= cell_states.shape[0]):
                raise LangCellError(
                    f"cell_index values must lie in 0..{cell_states.shape[0] - 1} (the cells given)"
                )
            # Only the cells that are referenced; each gets a group holding its texts in slots 0..count-1.
            used_cells, group_of_text = torch.unique(cell_index, return_inverse=True)
            cell_states, cell_mask = cell_states[used_cells], cell_mask[used_cells]
            groups = used_cells.numel()
            order = torch.argsort(group_of_text, stable=True)
            counts = torch.bincount(group_of_text, minlength=groups)
            group_start = torch.cumsum(counts, 0) - counts
            slot_of_text = torch.empty_like(group_of_text)
            slot_of_text[order] = torch.arange(num_texts, device=texts.device) - group_start[group_of_text[order]]
            slots = int(counts.max()) if num_texts else 0
            hidden = texts.new_zeros(groups, slots, length, width)
            hidden[group_of_text, slot_of_text] = texts
            # Empty slots attend to their first position only, so that no softmax row is all masked.
            slot_mask = attention_mask.new_zeros(groups, slots, length)
            slot_mask[..., 0] = 1
            slot_mask[group_of_text, slot_of_text] = attention_mask

        hidden = hidden.reshape(groups * slots, length, width)
        self_mask = padding_mask(slot_mask.reshape(groups * slots, length))
        out = self.encoder(hidden, self_mask, (cell_states, padding_mask(cell_mask)))
        out = out.view(groups, slots, length, width)
        if cell_index is None:
            return out
        return out[group_of_text, slot_of_text]

    # ------------------------------------------------------------------ pretrained
    def load_hf_bert(self, path: str | os.PathLike) -> None:
        """Copy the weights of a local Hugging Face BERT directory into this encoder.

        Every parameter except cross-attention must be present with the same shape; cross-attention
        (which a plain BERT lacks) keeps its fresh initialisation. A pooler and MLM/NSP heads in the
        file are ignored.

        Parameters
        ----------
        path
            A directory with ``model.safetensors`` or ``pytorch_model.bin`` (or :data:`PACKAGED_MINILM`).
        """
        directory = resolve_hf_directory(path)
        source = read_weights(directory)
        source = {k.removeprefix("bert."): v for k, v in source.items()}
        ignored_prefixes = ("pooler.", "cls.", "embeddings.position_ids")
        own = self.state_dict()
        wanted = {k for k in own if ".crossattention." not in k}
        problems = []
        missing = sorted(wanted - set(source))
        if missing:
            problems.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        unexpected = sorted(k for k in set(source) - wanted if not k.startswith(ignored_prefixes))
        if unexpected:
            problems.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        for key in sorted(wanted & set(source)):
            if tuple(source[key].shape) != tuple(own[key].shape):
                problems.append(f"{key}: file {tuple(source[key].shape)} vs model {tuple(own[key].shape)}")
        if problems:
            raise LangCellError(
                f"the BERT weights in {str(directory)!r} do not fit this text encoder ({'; '.join(problems)}); "
                "make the text config's sizes match that model (TextEncoderConfig.from_hf_config)"
            )
        with torch.no_grad():
            for key in wanted:
                own[key].copy_(source[key].to(own[key].dtype))

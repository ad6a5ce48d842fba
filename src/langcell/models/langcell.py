"""LangCell: the cell encoder, the text encoder and the heads that join them. No loss inside.

>>> model = LangCell.from_config("tiny")
>>> cell_emb, states = model.encode_cells({"input_ids": ids, "attention_mask": mask})   # doctest: +SKIP
>>> text_emb = model.encode_texts(["cell type: B cell."])                              # doctest: +SKIP
>>> logits = model.match_logits(states, mask, ["cell type: B cell.", "cell type: T cell."])  # doctest: +SKIP

Heads (sizes from :class:`~langcell.models.config.LangCellConfig`):

``cell_proj``  Linear(H_cell, 256): ``<cls>`` state -> shared space (then L2-normalised).
``text_proj``  Linear(H_text, 256): ``[CLS]`` state of the unimodal pass -> shared space (L2-normalised).
``ctm_head``   Linear(H_text, 2): first-token state of the multimodal pass -> (no match, match) logits.
``mgm_head``   BERT's LM head for masked gene modelling: dense + activation + LayerNorm, then the
               gene word embeddings (tied) plus an own bias.
``logit_scale`` learnable log inverse temperature for the contrastive losses.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LangCellError
from .cell_encoder import CellEncoder
from .config import LangCellConfig
from .layers import activation, init_bert_weights
from .serialization import load_pretrained, load_text_tokenizer, save_pretrained
from .text_encoder import TextEncoder

TextsOrTokens = Sequence[str] | Mapping[str, torch.Tensor]


class MaskedGeneHead(nn.Module):
    """BERT's LM prediction head over the gene vocabulary; the decoder is the (tied) word embedding.

    The decoder weight is not a parameter of this module: :meth:`forward` takes the gene word
    embedding matrix, so the tie can never be broken by loading or saving.
    """

    def __init__(self, hidden_size: int, vocab_size: int, hidden_act: str, layer_norm_eps: float):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(hidden_size, hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.act = activation(hidden_act)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, token_states: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., vocab]`` of token states ``[..., H]``; ``word_embeddings`` is the tied decoder."""
        hidden = self.transform.LayerNorm(self.act(self.transform.dense(token_states)))
        return F.linear(hidden, word_embeddings, self.bias)


class LangCell(nn.Module):
    """Cell and text encoders in one embedding space, with a cell-text matching head.

    Parameters
    ----------
    config
        The sizes (:class:`~langcell.models.config.LangCellConfig`). Weights start random; use
        :meth:`from_config` (which also loads a pretrained text tower when the config names one) or
        :meth:`from_pretrained`.
    text_tokenizer
        A Hugging Face tokenizer for the text tower. ``None`` loads the one the config names
        (``config.text.tokenizer_from``; by default the packaged all-MiniLM-L6-v2 tokenizer).
    gene_tokenizer
        Optional :class:`langcell.data.tokenizer.GeneTokenizer`; kept as a plain attribute and saved with
        the model. Its vocabulary size must equal ``config.cell.vocab_size``.
    """

    def __init__(self, config: LangCellConfig, *, text_tokenizer: Any = None, gene_tokenizer: Any = None):
        super().__init__()
        config.validate()
        self.config = config
        self.cell_encoder = CellEncoder(config.cell)
        self.text_encoder = TextEncoder(config.text)
        self.cell_proj = nn.Linear(config.cell.hidden_size, config.projection_dim)
        self.text_proj = nn.Linear(config.text.hidden_size, config.projection_dim)
        self.ctm_head = nn.Linear(config.text.hidden_size, 2)
        self.mgm_head = MaskedGeneHead(
            config.cell.hidden_size, config.cell.vocab_size, config.cell.hidden_act, config.cell.layer_norm_eps
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        for head in (self.cell_proj, self.mgm_head):
            init_bert_weights(head, config.cell.initializer_range)
        for head in (self.text_proj, self.ctm_head):
            init_bert_weights(head, config.text.initializer_range)
        self.text_tokenizer = text_tokenizer if text_tokenizer is not None else load_text_tokenizer(
            config.text.tokenizer_from
        )
        self.gene_tokenizer = None
        self.set_gene_tokenizer(gene_tokenizer)
        self._check_text_tokenizer()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(
        cls,
        config: str | LangCellConfig,
        *,
        text_tokenizer: Any = None,
        gene_tokenizer: Any = None,
    ) -> LangCell:
        """A fresh model from a preset name (``"tiny"``, ``"small"``, ``"base"``) or a config.

        When ``config.text.init_from`` names pretrained BERT weights (the ``small`` preset names the
        packaged all-MiniLM-L6-v2), the text tower starts from them and its tokenizer is that model's;
        cross-attention and all heads are freshly initialised. With a ``gene_tokenizer`` the cell
        vocabulary is sized for it (``cell.vocab_size = gene_tokenizer.vocab_size``; a config you pass is
        copied, not changed).
        """
        if isinstance(config, str):
            config = LangCellConfig.preset(config)
        elif not isinstance(config, LangCellConfig):
            raise LangCellError(
                f"config must be a preset name or a LangCellConfig, got {type(config).__name__}"
            )
        else:
            config = copy.deepcopy(config)
        if gene_tokenizer is not None:
            # A fresh model is built for the tokenizer it is given (a fitted one rarely has the preset's size).
            config.cell.vocab_size = int(gene_tokenizer.vocab_size)
        if text_tokenizer is None and config.text.init_from is not None and config.text.tokenizer_from is None:
            text_tokenizer = load_text_tokenizer(config.text.init_from)
        model = cls(config, text_tokenizer=text_tokenizer, gene_tokenizer=gene_tokenizer)
        if config.text.init_from is not None:
            model.text_encoder.load_hf_bert(config.text.init_from)
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> LangCell:
        """Load a model written by :meth:`save_pretrained` (strict; clear errors on any mismatch)."""
        return load_pretrained(cls, path, map_location=map_location)

    def save_pretrained(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write config, weights and tokenizers to the directory ``path`` (atomically)."""
        save_pretrained(self, path, overwrite=overwrite)

    def set_gene_tokenizer(self, gene_tokenizer: Any) -> None:
        """Attach a gene tokenizer, checking that its vocabulary matches the cell encoder."""
        if gene_tokenizer is not None and int(gene_tokenizer.vocab_size) != self.config.cell.vocab_size:
            raise LangCellError(
                f"the gene tokenizer has {gene_tokenizer.vocab_size} tokens but the cell encoder's vocabulary "
                f"has {self.config.cell.vocab_size}; build the model with cell.vocab_size="
                f"{gene_tokenizer.vocab_size} or use the tokenizer the model was trained with"
            )
        self.gene_tokenizer = gene_tokenizer

    def _check_text_tokenizer(self) -> None:
        size = len(self.text_tokenizer)
        if size > self.config.text.vocab_size:
            raise LangCellError(
                f"the text tokenizer has {size} tokens but the text encoder's embedding has only "
                f"{self.config.text.vocab_size} rows; use the tokenizer the text tower was trained with or "
                "set text.vocab_size to at least the tokenizer size"
            )

    # ------------------------------------------------------------------ cells
    def encode_cells(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch of tokenized cells.

        Parameters
        ----------
        batch
            ``{"input_ids": LongTensor [B, L], "attention_mask": [B, L]}``, ``<cls>`` first (HF convention:
            1 marks a real token, 0 padding).

        Returns
        -------
        embeddings : torch.Tensor
            ``[B, projection_dim]``, L2-normalised ``cell_proj(<cls> state)``.
        token_states : torch.Tensor
            ``[B, L, H_cell]`` last-layer states (for :meth:`match_logits` and :meth:`mgm_logits`).
        """
        input_ids, attention_mask = self._cell_tokens(batch)
        states = self.cell_encoder(input_ids, attention_mask)
        return F.normalize(self.cell_proj(states[:, 0]), dim=-1), states

    def cell_modules(self) -> nn.ModuleList:
        """The modules a cell's embedding runs through: the cell encoder and ``cell_proj``.

        For :func:`langcell.precision.inference_precision`: what embedding cells casts, and the only part
        whose linear layers go int8 (the text tower's do not survive it; BENCHMARKS.md).
        """
        return nn.ModuleList([self.cell_encoder, self.cell_proj])

    def cell_embeddings(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The embeddings of :meth:`encode_cells` alone, ``[B, projection_dim]``, for less work.

        The last encoder layer computes only the ``<cls>`` state (keys and values of every token, the
        rest for one token per cell), which saves most of that layer.
        """
        input_ids, attention_mask = self._cell_tokens(batch)
        first = self.cell_encoder(input_ids, attention_mask, first_token_only=True)
        return F.normalize(self.cell_proj(first), dim=-1)

    def _cell_tokens(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, attention_mask = _ids_and_mask(batch, "cells")
        device = self.logit_scale.device
        return input_ids.to(device), attention_mask.to(device)

    def mgm_logits(self, token_states: torch.Tensor) -> torch.Tensor:
        """Masked-gene-modelling logits ``[..., vocab]`` for cell token states ``[..., H_cell]``."""
        return self.mgm_head(token_states, self.cell_encoder.embeddings.word_embeddings.weight)

    # ------------------------------------------------------------------ texts
    def tokenize_texts(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenize texts for the text tower: padded to the longest, truncated to ``max_length``.

        ``max_length`` defaults to (and may not exceed) the text encoder's number of positions.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise LangCellError("texts must be a non-empty list of strings")
        limit = self.config.text.max_position_embeddings
        max_length = limit if max_length is None else min(int(max_length), limit)
        encoded = self.text_tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def _text_tokens(self, texts: TextsOrTokens) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = texts if isinstance(texts, Mapping) else self.tokenize_texts(texts)
        input_ids, attention_mask = _ids_and_mask(tokens, "texts")
        device = self.logit_scale.device
        return input_ids.to(device), attention_mask.to(device)

    def encode_texts(self, texts: TextsOrTokens) -> torch.Tensor:
        """L2-normalised ``text_proj([CLS] state)`` ``[M, projection_dim]`` of the unimodal pass."""
        input_ids, attention_mask = self._text_tokens(texts)
        states = self.text_encoder(input_ids, attention_mask, mode="text")
        return F.normalize(self.text_proj(states[:, 0]), dim=-1)

    # ------------------------------------------------------------------ matching
    def match_logits(
        self,
        cell_states: torch.Tensor,
        cell_mask: torch.Tensor | None,
        texts: TextsOrTokens,
        *,
        cell_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cell-text matching logits from the multimodal pass (index 1 = "match").

        Parameters
        ----------
        cell_states, cell_mask
            ``[B, L, H_cell]`` from :meth:`encode_cells` and the cells' ``[B, L]`` attention mask.
        texts
            M strings or a tokenized dict (``input_ids``/``attention_mask`` ``[M, T]``).
        cell_index
            ``None``: score every (cell, text) pair, returning ``[B, M, 2]``. A LongTensor ``[M]``:
            score only the pairs ``(cell_index[m], text m)``, returning ``[M, 2]`` (pre-training's CTM).

        Notes
        -----
        Each cell's cross-attention keys/values are computed once per layer, however many texts are
        scored against it. The first token of each text is ``[CLS]`` as in the released zero-shot
        code, unless ``config.text.multimodal_first_token_id`` names a replacement (BLIP's ``[ENC]``).
        """
        input_ids, attention_mask = self._text_tokens(texts)
        states = self.text_encoder(
            input_ids,
            attention_mask,
            mode="multimodal",
            cell_states=cell_states,
            cell_mask=cell_mask,
            cell_index=cell_index,
        )
        return self.ctm_head(states[..., 0, :])

    def similarity(self, cell_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarities ``[B, M]`` of L2-normalised cell and text embeddings."""
        return cell_embeddings @ text_embeddings.T


def _ids_and_mask(batch: Mapping[str, torch.Tensor], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise LangCellError(
            f"{what} must be given as a dict with 'input_ids' (and 'attention_mask') tensors, got "
            f"{type(batch).__name__}"
        )
    input_ids = torch.as_tensor(batch["input_ids"])
    if input_ids.ndim != 2:
        raise LangCellError(f"{what}: input_ids must be 2-D [batch, length], got shape {tuple(input_ids.shape)}")
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask)
    if mask.shape != input_ids.shape:
        raise LangCellError(
            f"{what}: attention_mask shape {tuple(mask.shape)} differs from input_ids shape {tuple(input_ids.shape)}"
        )
    return input_ids.long(), mask

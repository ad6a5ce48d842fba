"""The pretraining objective: one micro-batch through the model, the four losses returned by name.

:class:`PretrainObjective` is the module DDP wraps (so each step is one ``forward``); the model itself
computes features only, never a loss (open_clip's split).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.langcell import LangCell
from .config import PretrainConfig
from .losses import (
    CellCellContrastiveLoss,
    CellTextContrastiveLoss,
    CellTextMatchingLoss,
    LossWeights,
    MaskedGeneLoss,
    ctm_pairs,
    sample_hard_negatives,
)
from .masking import IGNORE_INDEX, gene_dropout, mask_genes


# ----------------------------------------------------------------------------------------- objective
class PretrainObjective(nn.Module):
    """One micro-batch through the model; returns the named losses of the stage.

    Holds the model so that DDP can wrap this module and see each training step as one ``forward``.
    """

    def __init__(self, model: LangCell, config: PretrainConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        tokenizer = model.gene_tokenizer
        self.mask_id = tokenizer.mask_id
        self.special_ids = (tokenizer.pad_id, tokenizer.mask_id, tokenizer.cls_id)
        self.gene_id_range = (0, tokenizer.vocab_size)
        self.mgm_loss = MaskedGeneLoss()
        self.cc_loss = CellCellContrastiveLoss(temperature=config.cc_temperature)
        self.ct_loss = CellTextContrastiveLoss()
        self.ctm_loss = CellTextMatchingLoss()
        self.weights = LossWeights(**config.loss_weights)

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        stage: str,
        generator: torch.Generator,
        text_tokens: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        model = self.model
        weights = self.weights
        ids, mask = batch["input_ids"], batch["attention_mask"]
        losses: dict[str, torch.Tensor] = {}
        emb_a = None
        # Losses weighted 0 are not computed at all (a joint stage with mgm=cc=0 skips pass A).
        if weights.mgm > 0 or weights.cc > 0:
            view_ids, view_mask = ids, mask
            if self.config.gene_dropout > 0:
                view_ids, view_mask = gene_dropout(
                    ids, mask, self.config.gene_dropout, keep_ids=self.special_ids,
                    pad_id=self.special_ids[0], generator=generator,
                )
            masked_ids, labels = mask_genes(
                view_ids, view_mask, mask_id=self.mask_id, special_ids=self.special_ids,
                gene_id_range=self.gene_id_range, mask_prob=self.config.mask_prob, generator=generator,
            )
            emb_a, states_a = model.encode_cells({"input_ids": masked_ids, "attention_mask": view_mask})
            if weights.mgm > 0:
                predicted = labels != IGNORE_INDEX
                # The LM head runs only at the masked positions: 15% of the tokens, not [B, L, V].
                losses |= self.mgm_loss(model.mgm_logits(states_a[predicted]), labels[predicted])
        if stage == "cell" and weights.cc == 0:
            return losses
        emb_b, states_b = model.encode_cells({"input_ids": ids, "attention_mask": mask})
        if weights.cc > 0:
            losses |= self.cc_loss(emb_a, emb_b)
        if stage == "cell":
            return losses

        text_group = batch["text_group"]  # [B] global text ids
        unique_ids, position = torch.unique(text_group, return_inverse=True)
        text_emb = model.encode_texts(text_tokens)[position]  # each distinct text encoded once
        if weights.ct > 0:
            losses |= self.ct_loss(emb_b, text_emb, model.logit_scale, text_group)
        if weights.ctm == 0:
            return losses

        # CTM on the first ctm_cells cells of the (already shuffled) batch: their texts, and hard
        # negatives drawn among them.
        n = len(text_group) if self.config.ctm_cells is None else min(self.config.ctm_cells, len(text_group))
        with torch.no_grad():
            sim = model.logit_scale.exp().clamp(max=100) * emb_b[:n].float() @ text_emb[:n].float().T
        neg_text, neg_cell = sample_hard_negatives(sim, text_group[:n], generator=generator)
        cell_index, text_index, match = ctm_pairs(n, neg_text, neg_cell)
        pair_tokens = {k: v[position[text_index]] for k, v in text_tokens.items()}
        logits = model.match_logits(states_b, mask, pair_tokens, cell_index=cell_index)
        losses |= self.ctm_loss(logits, match)
        return losses

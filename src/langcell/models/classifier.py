"""LangCell-CE: a LangCell cell encoder with a linear head over cell types, and its file format.

The classifier is a plain torch module (features, logits, save/load); training it lives in
:mod:`langcell.train.finetune`, and AnnData in/out in :func:`langcell.tl.finetune` / :func:`langcell.tl.predict`.

Its directory holds ``config.json`` (format, labels, pooling, cell-encoder config, gene tokenizer name)
and ``model.safetensors``; loading is strict like :func:`langcell.models.serialization.load_pretrained`.
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_directory
from .._checks import check_class_names, check_max_length, check_positive_int
from ..data.batching import as_sequences
from ..data.tokenizer import TOKENIZER_FILENAME, GeneTokenizer
from ..errors import LangCellError
from .batched import forward_in_batches
from .cell_encoder import CellEncoder
from .config import CellEncoderConfig, dataclass_from_dict
from .layers import init_bert_weights
from .serialization import load_state_strict, read_format_document, read_weights, written_by_langcell

#: ``format`` of the classifier's config.json; :meth:`CellTypeClassifier.load` refuses any other.
FORMAT_NAME = "langcell.CellTypeClassifier"
#: Newest ``format_version`` written and read.
FORMAT_VERSION = 1
CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.safetensors"
#: How a cell's token states become one feature vector: the ``<cls>`` state or the mean over genes.
POOLINGS = ("cls", "mean")
#: Cell tokens (batch size x padded length) per forward pass.
DEFAULT_MAX_TOKENS = 8_192

_REDO = "save the classifier again"


class CellTypeClassifier(nn.Module):
    """A LangCell cell encoder with a linear head over cell types.

    Parameters
    ----------
    cell_config
        Sizes of the cell encoder (:class:`~langcell.models.config.CellEncoderConfig`); weights start random
        (use :meth:`from_langcell` to start from a LangCell model).
    labels
        The class names, one per output of the head, in order.
    pooling
        ``"cls"`` (default): the head reads the ``<cls>`` state, the state LangCell trains as the cell's
        summary (its ``cell_proj`` reads it too). ``"mean"``: the mean of the last-layer states over the
        cell's real tokens (``<cls>`` included, padding excluded).
    gene_tokenizer
        The :class:`~langcell.data.tokenizer.GeneTokenizer` whose token ids the encoder reads; needed by
        :func:`predict` and saved with the classifier. Its vocabulary must match ``cell_config``.

    Attributes
    ----------
    cell_encoder : CellEncoder
        The BERT over gene tokens (parameter names as in LangCell's ``cell_encoder``).
    head : torch.nn.Linear
        ``hidden_size -> n_classes``.
    labels : list of str
        The class names.
    """

    def __init__(
        self,
        cell_config: CellEncoderConfig,
        labels: Sequence[str],
        *,
        pooling: str = "cls",
        gene_tokenizer: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(cell_config, CellEncoderConfig):
            raise LangCellError(
                f"cell_config must be a CellEncoderConfig, got {type(cell_config).__name__}; use "
                "CellTypeClassifier.from_langcell(model, labels) to start from a LangCell model"
            )
        cell_config.validate()
        self.labels = check_class_names(labels, minimum=2)
        if pooling not in POOLINGS:
            raise LangCellError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if gene_tokenizer is not None and int(gene_tokenizer.vocab_size) != cell_config.vocab_size:
            raise LangCellError(
                f"the gene tokenizer has {gene_tokenizer.vocab_size} tokens but the cell encoder's vocabulary "
                f"has {cell_config.vocab_size}; pass the tokenizer the encoder was trained with"
            )
        self.config = cell_config
        self.pooling = pooling
        self.gene_tokenizer = gene_tokenizer
        self.cell_encoder = CellEncoder(cell_config)
        self.head = nn.Linear(cell_config.hidden_size, len(self.labels))
        init_bert_weights(self.head, cell_config.initializer_range)

    @classmethod
    def from_langcell(cls, model: Any, labels: Sequence[str], *, pooling: str = "cls") -> CellTypeClassifier:
        """A classifier whose encoder is a copy of ``model``'s cell encoder and whose head is new.

        The copy is independent: fine-tuning the classifier leaves ``model`` unchanged.

        Parameters
        ----------
        model
            A :class:`~langcell.models.langcell.LangCell` (its gene tokenizer is carried over).
        labels, pooling
            As in the constructor.
        """
        encoder = getattr(model, "cell_encoder", None)
        config = getattr(getattr(model, "config", None), "cell", None)
        if not isinstance(encoder, CellEncoder) or not isinstance(config, CellEncoderConfig):
            raise LangCellError(
                f"model must be a LangCell model (with a cell_encoder), got {type(model).__name__}; load one "
                "with LangCell.from_pretrained(path)"
            )
        classifier = cls(
            copy_module.deepcopy(config), labels, pooling=pooling, gene_tokenizer=model.gene_tokenizer
        )
        classifier.cell_encoder.load_state_dict(encoder.state_dict())
        return classifier.to(next(encoder.parameters()).device)

    # ------------------------------------------------------------------ forward
    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.head.weight.device

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled cell states ``[B, hidden]`` of tokenized cells ``[B, L]`` (``<cls>`` first)."""
        input_ids = torch.as_tensor(input_ids).long().to(self.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask).to(self.device)
        if self.pooling == "cls":
            return self.cell_encoder(input_ids, mask, first_token_only=True)
        states = self.cell_encoder(input_ids, mask)
        weights = mask.to(states.dtype)[..., None]
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits ``[B, n_classes]`` of tokenized cells ``[B, L]``."""
        return self.head(self.features(input_ids, attention_mask))

    def encode_features(
        self,
        cells: Any,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_length: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Pooled states ``float32 [n_cells, hidden]`` of token sequences, in input order (eval mode)."""
        return self._run(cells, self.features, self.config.hidden_size, max_tokens, max_length, progress, "encode")

    def predict_logits(
        self,
        cells: Any,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_length: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Class logits ``float32 [n_cells, n_classes]`` of token sequences, in input order (eval mode).

        Parameters
        ----------
        cells
            A :class:`~langcell.data.tokenizer.TokenizedCells` or a list of 1-D token id arrays, ``<cls>`` first.
        max_tokens
            Token budget of one forward pass (cells of similar length are batched together).
        max_length
            Cut cells to their first ``max_length`` tokens (default and cap: the encoder's positions).
        progress
            Show a progress bar.
        """
        return self._run(cells, self.forward, self.n_classes, max_tokens, max_length, progress, "predict")

    def _run(self, cells, function, width, max_tokens, max_length, progress, what) -> np.ndarray:
        sequences = as_sequences(cells)
        max_length = check_max_length(max_length, self.config.max_position_embeddings)
        return forward_in_batches(
            self, sequences, function, width, pad_id=self.config.pad_token_id,
            max_tokens=check_positive_int(max_tokens, "max_tokens"), max_length=max_length, progress=progress,
            description=what,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the classifier to the directory ``path``, atomically.

        Layout: ``config.json`` (format, version, encoder sizes, pooling, class names),
        ``model.safetensors`` (``cell_encoder.*`` and ``head.*``) and ``gene_tokenizer.json`` (when the
        classifier has one).

        Parameters
        ----------
        path
            Output directory; it must not exist or be empty unless ``overwrite``.
        overwrite
            Replace an existing directory.
        """
        from safetensors.torch import save_file

        document = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "cell": dataclasses.asdict(self.config),
            "pooling": self.pooling,
            "labels": list(self.labels),
        }
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.state_dict().items()}
        with atomic_directory(path, overwrite=overwrite, ours=written_by_langcell, what="classifier") as tmp:
            (tmp / CONFIG_FILENAME).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
            save_file(tensors, str(tmp / WEIGHTS_FILENAME), metadata={"format": "pt"})
            if self.gene_tokenizer is not None:
                self.gene_tokenizer.save(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> CellTypeClassifier:
        """Read a classifier written by :meth:`save`; strict about every field and tensor.

        Raises
        ------
        LangCellError
            For a missing directory or file, another format or a newer version, bad encoder sizes,
            missing or duplicated class names, an unknown pooling, a gene tokenizer whose vocabulary does
            not match the encoder, or missing / unexpected / misshapen / corrupt weights.
        """
        path = Path(path)
        if not path.is_dir():
            raise LangCellError(f"{str(path)!r} is not a directory; pass the directory the classifier was saved to")
        file = path / CONFIG_FILENAME
        document = read_format_document(
            file,
            format_name=FORMAT_NAME,
            max_version=FORMAT_VERSION,
            missing=f"no {CONFIG_FILENAME} in {str(path)!r}; pass a directory written by CellTypeClassifier.save",
            wrong_format=(
                "is not a langcell cell-type classifier (a LangCell model directory is loaded with "
                "LangCell.from_pretrained); pass a directory written by CellTypeClassifier.save"
            ),
            redo=_REDO,
        )
        missing = [key for key in ("cell", "pooling", "labels") if key not in document]
        if missing:
            raise LangCellError(f"{str(file)!r} lacks the fields {missing}; {_REDO}")
        config = dataclass_from_dict(CellEncoderConfig, document["cell"], "cell.")
        labels = document["labels"]
        if not isinstance(labels, list):
            raise LangCellError(f"{str(file)!r}: 'labels' must be a list of class names; {_REDO}")
        gene_tokenizer = None
        if (path / TOKENIZER_FILENAME).is_file():
            gene_tokenizer = GeneTokenizer.load(path)
        try:
            classifier = cls(config, labels, pooling=document["pooling"], gene_tokenizer=gene_tokenizer)
        except LangCellError as error:
            raise LangCellError(f"{str(path)!r}: {error}") from None
        weights = path / WEIGHTS_FILENAME
        if not weights.is_file():
            raise LangCellError(f"no {WEIGHTS_FILENAME} in {str(path)!r}; {_REDO}")
        load_state_strict(classifier, read_weights(weights, map_location), str(weights))
        return classifier.to(map_location).eval()

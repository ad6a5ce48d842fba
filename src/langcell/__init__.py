"""langcell: language-cell pre-training for cell identity (LangCell, Zhao et al., ICML 2024).

The public API is flat::

    import langcell
    tok = langcell.GeneTokenizer.fit(adata)
    model = langcell.LangCell.from_config("small", gene_tokenizer=tok)
    langcell.tl.annotate(adata, model, ["B cell", "NK cell"])

Names are imported lazily, so ``import langcell`` (and the command line) starts fast and torch is only
loaded when a model is used. The package is layered (README, "How the code is laid out"): ``errors``,
``_checks`` and friends, then ``ontology`` and ``data``, ``models``, ``train`` and ``inference``, ``tl``,
``evaluation`` / ``convert`` / ``pl``, and last ``demo`` and ``cli``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

# public name -> module that defines it
_EXPORTS = {
    "LangCellError": "errors",
    "LangCell": "models.langcell",
    "LangCellConfig": "models.config",
    "CellEncoderConfig": "models.config",
    "TextEncoderConfig": "models.config",
    "CellTypeClassifier": "models.classifier",
    "GeneTokenizer": "data.tokenizer",
    "TokenizedCells": "data.tokenizer",
    "read_geneformer_dictionary": "data.geneformer",
    "TokenCorpus": "data.corpus",
    "write_corpus": "data.corpus",
    "map_to_ensembl": "data.genes",
    "GeneMappingReport": "data.genes",
    "resolve_labels": "ontology",
    "term_text": "ontology",
    "describe_cells": "ontology",
    "label_texts": "ontology",
    "import_official": "convert",
    "PretrainConfig": "train.config",
    "pretrain": "train.pretrain",
    "load_recipe": "train.config",
}
# public submodule name -> its module. The short names of the first, flat layout (langcell.genes,
# langcell.tokenizer, langcell.io, ...) stay valid as attributes.
_SUBMODULES = {
    "tl": "tl",
    "pl": "pl",
    "evaluation": "evaluation",
    "inference": "inference",
    "models": "models",
    "ontology": "ontology",
    "data": "data",
    "train": "train",
    "convert": "convert",
    "metrics": "metrics",
    "datasets": "data.datasets",
    "genes": "data.genes",
    "tokenizer": "data.tokenizer",
    "corpus": "data.corpus",
    "losses": "train.losses",
    "io": "models.serialization",
}

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    else:
        raise AttributeError(f"module 'langcell' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from . import convert, data, evaluation, inference, metrics, models, ontology, pl, tl, train  # noqa: F401
    from .data import corpus, datasets, genes, tokenizer  # noqa: F401
    from .data.corpus import TokenCorpus, write_corpus  # noqa: F401
    from .data.geneformer import read_geneformer_dictionary  # noqa: F401
    from .data.genes import GeneMappingReport, map_to_ensembl  # noqa: F401
    from .data.tokenizer import GeneTokenizer, TokenizedCells  # noqa: F401
    from .errors import LangCellError  # noqa: F401
    from .models import serialization as io  # noqa: F401
    from .models.classifier import CellTypeClassifier  # noqa: F401
    from .models.config import CellEncoderConfig, LangCellConfig, TextEncoderConfig  # noqa: F401
    from .models.langcell import LangCell  # noqa: F401
    from .ontology import describe_cells, label_texts, resolve_labels, term_text  # noqa: F401
    from .train import losses  # noqa: F401
    from .train.config import PretrainConfig, load_recipe  # noqa: F401
    from .train.pretrain import pretrain  # noqa: F401

"""Argument checks shared across layers: AnnData inputs, keys, counts, class names.

Each raises :class:`~langcell.errors.LangCellError` naming the problem and the fix, before any work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .errors import LangCellError


def check_anndata(adata: Any) -> None:
    """Refuse anything but an AnnData with at least one cell."""
    import anndata

    if not isinstance(adata, anndata.AnnData):
        raise LangCellError(
            f"adata must be an AnnData, got {type(adata).__name__}; read one with anndata.read_h5ad(path)"
        )
    if adata.n_obs == 0:
        raise LangCellError("the AnnData has no cells; pass data with at least one cell")


def check_key_added(key_added: Any) -> None:
    """Refuse a ``key_added`` that is not a non-empty string, or that h5ad cannot store (a ``/``)."""
    if not isinstance(key_added, str) or not key_added:
        raise LangCellError(f"key_added must be a non-empty string, got {key_added!r}")
    if "/" in key_added:
        raise LangCellError(
            f"key_added {key_added!r} contains '/', which h5ad files cannot store as a key (the file would "
            f"not read back); use another character, e.g. {key_added.replace('/', '_')!r}"
        )


def gene_tokenizer_of(model: Any) -> Any:
    """The model's gene tokenizer, or a clear error when it has none (it cannot turn counts into tokens)."""
    tokenizer = getattr(model, "gene_tokenizer", None)
    if tokenizer is None:
        raise LangCellError(
            "the model has no gene tokenizer, so it cannot turn counts into tokens; load the model with "
            "LangCell.from_pretrained, which restores it, or attach the one it was trained with "
            "(model.set_gene_tokenizer(GeneTokenizer.load(...)))"
        )
    return tokenizer


def check_class_names(labels: Any, *, minimum: int = 1) -> list[str]:
    """The class names as a list: at least ``minimum`` distinct, non-empty strings.

    One check for every place that takes class names (annotation labels, classifier classes, few-shot
    classes), so each gets the same messages.
    """
    if isinstance(labels, str):
        raise LangCellError("labels must be a list of class names, not one string; wrap it: [label]")
    if not isinstance(labels, Sequence | np.ndarray | pd.Index | pd.Series):
        raise LangCellError(f"labels must be a list of class names, got {type(labels).__name__}")
    names = list(labels)
    if not names:
        raise LangCellError("no labels given; pass at least one class (a list of names or {name: description})")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise LangCellError(f"class names must be non-empty strings; got {bad[:5]!r}: drop or name them")
    duplicated = pd.Index(names)[pd.Index(names).duplicated()].unique().tolist()
    if duplicated:
        raise LangCellError(f"labels are duplicated: {duplicated[:5]!r}; pass each class once (use unique())")
    if len(names) < minimum:
        raise LangCellError(f"at least {minimum} classes are needed, got {names!r}")
    return names


def check_fraction(train_fraction: Any) -> None:
    """Refuse a training fraction outside the open interval (0, 1)."""
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, int | float) or not 0 < train_fraction < 1:
        raise LangCellError(f"train_fraction must lie strictly between 0 and 1, got {train_fraction!r}; e.g. 2/3")


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` when it is a positive integer (not a bool), else an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise LangCellError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_max_length(max_length: Any, limit: int) -> int:
    """A token-length cap: ``limit`` for ``None``, else the positive ``max_length`` clamped to ``limit``."""
    if max_length is None:
        return int(limit)
    return min(check_positive_int(max_length, "max_length"), int(limit))


def output_anndata(adata: Any, copy: bool) -> Any:
    """The AnnData a ``tl`` function writes its results to: ``adata`` itself, or a copy for ``copy=True``.

    A backed AnnData is read into memory once for the copy (anndata cannot ``copy()`` it without a new
    file name), so ``copy=True`` works on backed data too.
    """
    if not copy:
        return adata
    return adata.to_memory() if adata.isbacked else adata.copy()


def listed(names: Any, limit: int = 10) -> str:
    """Up to ``limit`` names for an error message, saying how many more there are (never a silent cut)."""
    names = [str(name) for name in names]
    shown = ", ".join(repr(name) for name in names[:limit])
    more = len(names) - limit
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def check_unit_interval(value: Any, name: str, *, meaning: str, fix: str) -> float:
    """``value`` as a float in [0, 1]; otherwise an error naming ``name``, what it ``means`` and the ``fix``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise LangCellError(f"{name} must be a number in [0, 1], got {value!r}; {fix}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise LangCellError(f"{name} must lie in [0, 1] ({meaning}), got {value}; {fix}")
    return value

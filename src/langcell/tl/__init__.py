"""Tools on AnnData, following scanpy's contract.

Every function takes the AnnData first, then keyword-only options ending with ``key_added=`` and
``copy=False``; results go to ``obs`` / ``obsm`` / ``uns[key_added]`` (with the call's settings in
``uns[key_added]["params"]``); ``copy=True`` returns an annotated copy and leaves the input alone,
otherwise the input is annotated in place and ``None`` is returned. Each docstring's Returns section
names every field written.

Each tool lives in its own private module; this package only re-exports them. :func:`finetune` is
loaded on first use, so that annotating, embedding and retrieving never import :mod:`langcell.train`.
Functions that return a table (per-type accuracy, retrieval recall, integration metrics, few-shot
curves, ``evaluate``) are in :mod:`langcell.evaluation`; :func:`explanation_table` only reads back, as a
DataFrame, the table :func:`explain` stored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._annotate import annotate
from ._consensus import consensus
from ._embed import embed
from ._explain import explain, explanation_table
from ._predict import predict
from ._retrieve import retrieve_cells, retrieve_texts

__all__ = [
    "annotate",
    "consensus",
    "embed",
    "explain",
    "explanation_table",
    "finetune",
    "predict",
    "retrieve_cells",
    "retrieve_texts",
]


def __getattr__(name: str) -> Any:
    # finetune trains: it needs langcell.train, which nothing else in tl loads.
    if name == "finetune":
        from ._finetune import finetune

        globals()["finetune"] = finetune
        return finetune
    raise AttributeError(f"module 'langcell.tl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from ._finetune import finetune  # noqa: F401

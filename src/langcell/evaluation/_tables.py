"""Small helpers the evaluation modules share: obs columns as strings, obsm matrices, and tables as
h5ad- and JSON-writable plain values."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._checks import listed
from ..errors import LangCellError


def obs_strings(adata: Any, key: Any, argument: str) -> np.ndarray:
    """An obs column as stripped strings ('' for missing values)."""
    if not isinstance(key, str) or key not in adata.obs.columns:
        raise LangCellError(
            f"obs has no column {key!r}; pass {argument}=<an obs column> (columns: {listed(adata.obs.columns)})"
        )
    column = adata.obs[key]
    return np.array(["" if pd.isna(v) else str(v).strip() for v in column.astype(object)], dtype=object)


def obsm_matrix(adata: Any, key: str) -> np.ndarray:
    if not isinstance(key, str) or key not in adata.obsm:
        raise LangCellError(
            f"obsm has no embedding {key!r} (obsm keys: {listed(adata.obsm)}); compute it first, e.g. "
            "langcell.tl.embed(adata, model)"
        )
    matrix = np.asarray(adata.obsm[key])
    if matrix.ndim != 2 or matrix.shape[1] == 0 or not np.issubdtype(matrix.dtype, np.number):
        raise LangCellError(f"obsm[{key!r}] must be a numeric cells x dimensions matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise LangCellError(f"obsm[{key!r}] holds NaN or infinite values; recompute it")
    return matrix.astype(np.float32)


def table_columns(table: pd.DataFrame) -> dict[str, list]:
    """A table as ``{column: list}`` of plain Python values (h5ad- and JSON-writable)."""
    return {str(column): [plain_value(v) for v in table[column].tolist()] for column in table.columns}


def plain_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    return value


def table_records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """A table as a list of row dicts with JSON values (NaN becomes None)."""
    out = []
    for row in table.to_dict(orient="records"):
        out.append({str(k): json_value(v) for k, v in row.items()})
    return out


def json_value(value: Any) -> Any:
    value = plain_value(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_name_list(names: Any, argument: str) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence | np.ndarray | pd.Index | set | frozenset):
        raise LangCellError(f"{argument} must be a list of cell-type names, got {names!r}")
    names = list(names)
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise LangCellError(f"{argument} must hold non-empty strings; got {bad[:5]!r}")
    return [n.strip() for n in names]

"""Cell labels in obs: the values that mean "no label", and a label column as classes and integer codes.

CELLxGENE writes "unknown" (not known) and "na" (not applicable) where a term is missing; langcell
treats them, and the empty string, as no label everywhere: they get no text, are no class, and are
never scored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ._checks import listed
from .errors import LangCellError

#: Values of a label or ``*_ontology_term_id`` column that name no class (compared after ``str.strip``).
NO_LABEL_VALUES = frozenset({"unknown", "na", ""})


def label_codes(adata: Any, label_key: str) -> tuple[list[str], np.ndarray]:
    """Class names (category order for a categorical column, else sorted) and each cell's code (-1: none)."""
    if not isinstance(label_key, str) or label_key not in adata.obs.columns:
        raise LangCellError(
            f"obs has no column {label_key!r}; pass label_key=<the obs column with cell-type labels> "
            f"(columns: {listed(adata.obs.columns)})"
        )
    column = adata.obs[label_key]
    values = column.astype(object).where(column.notna(), None)
    text = np.array(["" if v is None else str(v).strip() for v in values], dtype=object)
    labelled = text != ""
    present = set(text[labelled])
    if isinstance(column.dtype, pd.CategoricalDtype):
        classes = [str(c).strip() for c in column.cat.categories if str(c).strip() in present]
        classes = list(dict.fromkeys(classes))
    else:
        classes = sorted(present)
    if len(classes) < 2:
        raise LangCellError(
            f"obs[{label_key!r}] holds {len(classes)} class{'es' if len(classes) != 1 else ''} "
            f"({classes!r}); a classifier needs at least two: pass a column with several cell types"
        )
    index = {name: code for code, name in enumerate(classes)}
    codes = np.array([index[t] if t else -1 for t in text], dtype=np.int64)
    return classes, codes

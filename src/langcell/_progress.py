"""The one progress bar of langcell: a tqdm bar when the caller asked for progress, else nothing.

Every long loop (tokenizing, encoding, training, few-shot runs) takes ``progress: bool`` and calls
:func:`progress_bar`; tqdm is imported only when a bar is shown.
"""

from __future__ import annotations

from typing import Any


def progress_bar(total: int | None, progress: bool, description: str, unit: str, **options: Any) -> Any:
    """A ``tqdm.auto`` bar over ``total`` units, or ``None`` when ``progress`` is false.

    Parameters
    ----------
    total
        How many units the loop will run (``None``: unknown).
    progress
        Show the bar; ``False`` returns ``None`` (callers write ``if bar is not None: bar.update(n)``).
    description
        The bar's label ("zero-shot (fast)", "fine-tune", ...).
    unit
        What one step counts ("cell", "step", "chunk", ...).
    **options
        Further ``tqdm`` arguments (``initial=``, ``dynamic_ncols=``).
    """
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit, **options)

"""Plots of LangCell results, saved as PNG files (matplotlib, no display needed).

Figures are built with matplotlib's object API (:class:`matplotlib.figure.Figure`), never through
pyplot's global state: no call switches the backend (inline plots in a notebook keep working) and no
figure needs closing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ._atomic import atomic_file
from .errors import LangCellError


def _save(fig, path: str | os.PathLike) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")


def umap(
    adata,
    color: Sequence[str],
    path: str | os.PathLike,
    *,
    basis: str = "X_umap",
    titles: Sequence[str] | None = None,
) -> None:
    """Scatter plots of a 2-D embedding, one panel per obs column, side by side, saved as PNG.

    Parameters
    ----------
    adata
        AnnData with ``obsm[basis]`` (2 columns) and the obs columns in ``color``.
    color
        Categorical obs columns, e.g. ``["cell_type", "langcell_cell_type"]``: predicted and true type
        share one colour per category.
    path
        The PNG file to write.
    basis
        The obsm key of the embedding.
    titles
        Panel titles (default: the column names).
    """
    if basis not in adata.obsm:
        raise LangCellError(f"adata.obsm has no {basis!r}; compute it first (e.g. scanpy.tl.umap)")
    missing = [c for c in color if c not in adata.obs]
    if missing:
        raise LangCellError(f"adata.obs has no column(s) {missing}; pass existing obs columns as color")
    import matplotlib
    from matplotlib.figure import Figure

    coords = np.asarray(adata.obsm[basis])[:, :2]
    categories = sorted({str(v) for c in color for v in adata.obs[c].astype(str)})
    cmap = matplotlib.colormaps["tab20" if len(categories) > 10 else "tab10"]
    colours = {cat: cmap(i % cmap.N) for i, cat in enumerate(categories)}
    fig = Figure(figsize=(6.2 * len(color), 5.2))
    axes = fig.subplots(1, len(color), squeeze=False)
    for ax, column, title in zip(axes[0], color, titles or color, strict=False):
        values = adata.obs[column].astype(str).to_numpy()
        for cat in categories:
            sel = values == cat
            if sel.any():
                ax.scatter(coords[sel, 0], coords[sel, 1], s=10, color=colours[cat], label=cat, linewidths=0)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2)
    fig.tight_layout()
    _save(fig, path)


def confusion_matrix(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    path: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    title: str = "",
) -> np.ndarray:
    """Row-normalised confusion matrix (true type x predicted type), saved as PNG.

    Parameters
    ----------
    y_true, y_pred
        True and predicted labels per cell.
    path
        The PNG file to write.
    labels
        Row/column order (default: sorted union of both).
    title
        Figure title.

    Returns
    -------
    numpy.ndarray
        The raw counts ``[n_labels, n_labels]`` (rows true, columns predicted).
    """
    y_true = np.asarray(y_true, dtype=str)
    y_pred = np.asarray(y_pred, dtype=str)
    if y_true.shape != y_pred.shape:
        raise LangCellError("y_true and y_pred must have one label per cell each")
    labels = list(labels) if labels is not None else sorted(set(y_true) | set(y_pred))
    index = {lab: i for i, lab in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        if t in index and p in index:
            counts[index[t], index[p]] += 1
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    from matplotlib.figure import Figure

    size = 2.0 + 0.55 * len(labels)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if fractions[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true type")
    fig.tight_layout()
    _save(fig, path)
    return counts


#: How :func:`fewshot_curves` names the methods of :func:`langcell.evaluation.fewshot`.
_FEWSHOT_METHOD_NAMES = {"langcell": "LangCell", "logistic_regression": "logistic regression", "knn": "kNN (PCA)",
                         "zero-shot": "zero-shot"}


def _fewshot_label(method: str, default: str | None) -> str:
    """``"langcell:linear+em"`` -> ``"LangCell linear + EM prior"``; the default row names its method."""
    name, _, prior = method.partition("+")
    if name == "langcell" and default:
        label = f"LangCell ({default})"
    elif name.startswith("langcell:"):
        label = "LangCell " + name.split(":", 1)[1]
    else:
        label = _FEWSHOT_METHOD_NAMES.get(name, name)
    return label + (f" + {prior.upper() if prior == 'em' else prior} prior" if prior else "")


def fewshot_curves(results, path: str | os.PathLike | None = None, *, metric: str = "macro_f1", title: str = ""):
    """Few-shot curves: a metric against the training cells per class, one line per row of the table.

    Zero-shot (the same test cells, no training) is drawn dashed; every LangCell method, prior
    correction and baseline of the table gets its own line.

    Each point is the mean over the repeats, with a band of one standard deviation (when there are
    several repeats); the x axis is logarithmic, with a tick at every number of shots.

    Parameters
    ----------
    results
        The table returned by :func:`langcell.evaluation.fewshot`, or what it stores in ``adata.uns[key]``
        (the dict with ``"results"``, or the ``"results"`` dict itself).
    path
        The PNG file to write (atomically); ``None`` writes nothing.
    metric
        ``"macro_f1"`` or ``"accuracy"``.
    title
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        The figure (not registered with pyplot, so it needs no closing).
    """
    import pandas as pd
    from matplotlib.figure import Figure

    default = None
    if isinstance(results, dict) and "results" in results:
        default = results.get("params", {}).get("method")
        results = results["results"]
    try:
        table = pd.DataFrame(results)
    except (TypeError, ValueError) as error:
        raise LangCellError(
            f"results must be the table from evaluation.fewshot or adata.uns[key] ({error}); pass one of those"
        ) from None
    if metric not in ("macro_f1", "accuracy"):
        raise LangCellError(f"metric must be 'macro_f1' or 'accuracy', got {metric!r}")
    missing = [column for column in ("method", "shots", metric) if column not in table.columns]
    if missing or table.empty:
        raise LangCellError(
            f"the results lack the columns {missing} or hold no row; pass the table from evaluation.fewshot or "
            "adata.uns[key]"
        )
    table = table.astype({"method": str, "shots": int, metric: float})
    summary = table.groupby(["method", "shots"], sort=True)[metric].agg(["mean", "std"]).fillna(0.0)
    fig = Figure(figsize=(5.6, 4.2))
    ax = fig.add_subplot()
    methods = list(dict.fromkeys(table["method"]))  # first-seen order: LangCell first
    for method in methods:
        rows = summary.loc[method]
        shots, mean, std = rows.index.to_numpy(), rows["mean"].to_numpy(), rows["std"].to_numpy()
        # Zero-shot is the reference the others should not fall below: drawn dashed, in grey.
        style = dict(color="0.35", linestyle="--") if method.startswith("zero-shot") else {}
        line = ax.plot(shots, mean, marker="o", label=_fewshot_label(method, default), **style)[0]
        if np.any(std > 0):
            ax.fill_between(shots, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    all_shots = sorted(set(table["shots"]))
    ax.set_xscale("log")
    ax.set_xticks(all_shots, [str(n) for n in all_shots])
    ax.minorticks_off()
    ax.set_xlabel("training cells per class")
    ax.set_ylabel("macro-F1" if metric == "macro_f1" else "accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        _save(fig, path)
    return fig

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
from .metrics import frequency_order


def _save(fig, path: str | os.PathLike) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")


def umap(
    adata,
    color: Sequence[str],
    path: str | os.PathLike | None = None,
    *,
    basis: str = "X_umap",
    titles: Sequence[str] | None = None,
):
    """Scatter plots of a 2-D embedding, one panel per obs column, side by side, saved as PNG.

    Every panel has its own legend, listing the categories of its own column; a category has the
    same colour in every panel, so that a predicted and a true type can be compared by eye.

    Parameters
    ----------
    adata
        AnnData with ``obsm[basis]`` (2 columns) and the obs columns in ``color``.
    color
        Categorical obs columns, e.g. ``["cell_type", "langcell_cell_type"]``: predicted and true type
        share one colour per category.
    path
        The PNG file to write (atomically); ``None`` writes nothing.
    basis
        The obsm key of the embedding.
    titles
        Panel titles (default: the column names).

    Returns
    -------
    matplotlib.figure.Figure
        The figure (not registered with pyplot, so it needs no closing); its axes are the panels, in
        the order of ``color``.
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
    fig = Figure(figsize=(8.4 * len(color), 5.2))
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
        # This panel's own categories only: a shared legend listed types a panel does not show.
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2, frameon=False)
    fig.tight_layout()
    if path is not None:
        _save(fig, path)
    return fig


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
        Row/column order (default: the true labels, most frequent first, then the labels only
        predicted: :func:`langcell.metrics.frequency_order`).
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
    labels = list(labels) if labels is not None else frequency_order(y_true, y_pred)
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


def calibration(result, path: str | os.PathLike | None = None, *, title: str = ""):
    """Reliability diagram: accuracy against mean confidence per bin, over the diagonal, with the counts.

    The upper panel draws each non-empty bin's accuracy as a bar over its confidence interval, the
    bin's mean confidence as a dot and the diagonal of perfect calibration; the title gives the expected
    calibration error. The lower panel shows how many cells fall in each bin.

    Parameters
    ----------
    result
        The dict returned by :func:`langcell.evaluation.calibration` (or stored by it in ``adata.uns``).
    path
        The PNG file to write (atomically); ``None`` writes nothing.
    title
        Figure title (the ECE is added to it).

    Returns
    -------
    matplotlib.figure.Figure
        The figure (not registered with pyplot, so it needs no closing).
    """
    from matplotlib.figure import Figure

    bins = result.get("bins") if isinstance(result, dict) else None
    needed = ("lower", "upper", "n_cells", "mean_confidence", "accuracy")
    if not isinstance(bins, dict) or any(column not in bins for column in needed) or "ece" not in result:
        raise LangCellError("result must be the dict from langcell.evaluation.calibration; pass that (or its uns entry)")
    lower, upper = np.asarray(bins["lower"], float), np.asarray(bins["upper"], float)
    counts = np.asarray(bins["n_cells"], float)
    accuracy = np.asarray(bins["accuracy"], float)
    confidence = np.asarray(bins["mean_confidence"], float)
    filled = counts > 0
    fig = Figure(figsize=(4.8, 5.4))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(lower[filled], accuracy[filled], width=(upper - lower)[filled], align="edge", color="tab:blue",
            alpha=0.7, edgecolor="white", label="accuracy")
    top.plot(confidence[filled], accuracy[filled], "o", color="tab:orange", markersize=4, label="mean confidence")
    top.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="calibrated")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{title + ': ' if title else ''}ECE {result['ece']:.3f}")
    bottom.bar(lower, counts, width=upper - lower, align="edge", color="grey", edgecolor="white")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("cells")
    fig.tight_layout()
    if path is not None:
        _save(fig, path)
    return fig


def explain(
    adata,
    path: str | os.PathLike | None = None,
    *,
    key_added: str = "langcell_cell_type_explain",
    n_genes: int = 5,
    classes: Sequence[str] | None = None,
    title: str = "",
):
    """Dot plot of :func:`langcell.tl.explain`: predicted classes (rows) x their top explained genes.

    The columns are each class's ``n_genes`` highest-ranked genes, class after class (a gene shared by
    several classes appears once). A dot's colour is the gene's importance in that class, divided by
    the class's largest (so classes with different score scales compare); its size is the fraction
    of the class's cells that have the gene among their own top genes. No dot: the gene is not among
    the class's stored top genes.

    Parameters
    ----------
    adata
        Cells explained by :func:`langcell.tl.explain`.
    path
        The PNG file to write (atomically); ``None`` writes nothing.
    key_added
        The ``key_added`` of the explain call.
    n_genes
        Genes per class to show (at most those stored).
    classes
        Classes to show, in this order (default: every explained class, largest first).
    title
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        The figure (not registered with pyplot, so it needs no closing).
    """
    import pandas as pd
    from matplotlib.figure import Figure

    from ._checks import check_positive_int

    n_genes = check_positive_int(n_genes, "n_genes")
    entry = adata.uns.get(key_added)
    if not isinstance(entry, dict) or "table" not in entry:
        raise LangCellError(f"uns has no explanation under {key_added!r}; run langcell.tl.explain first")
    table = pd.DataFrame({column: np.asarray(values) for column, values in entry["table"].items()})
    sizes = table.groupby("class", sort=False)["n_cells"].first().sort_values(ascending=False, kind="stable")
    if classes is None:
        classes = list(sizes.index)
    unknown = [name for name in classes if name not in sizes.index]
    if unknown or not classes:
        raise LangCellError(f"classes {unknown} were not explained; pick among {list(sizes.index)}")
    shown = table[table["class"].isin(classes) & (table["rank"] <= n_genes)]
    genes = list(dict.fromkeys(gene for name in classes for gene in shown.loc[shown["class"] == name, "gene"]))
    labels = [f"{name} ({int(sizes[name])})" for name in classes]
    # Room for the longest class label on the left (~0.065 inch per character at 8 pt).
    width = 2.0 + 0.32 * len(genes) + 0.065 * max(len(label) for label in labels)
    fig = Figure(figsize=(width, 1.2 + 0.38 * len(classes)))
    ax = fig.add_subplot()
    rows, columns, colours, areas = [], [], [], []
    for i, name in enumerate(classes):
        part = table[table["class"] == name].set_index("gene")
        top = float(part["importance"].max()) or 1.0
        for j, gene in enumerate(genes):
            if gene in part.index:
                rows.append(i)
                columns.append(j)
                colours.append(float(part.loc[gene, "importance"]) / top)
                areas.append(20 + 180 * float(part.loc[gene, "top_fraction"]))
    points = ax.scatter(columns, rows, s=areas, c=colours, cmap="Reds", vmin=0, vmax=1, edgecolors="grey",
                        linewidths=0.4)
    ax.set_xticks(range(len(genes)), genes, rotation=90, fontsize=8)
    ax.set_yticks(range(len(classes)), labels, fontsize=8)
    ax.set_xlim(-0.6, len(genes) - 0.4)
    ax.set_ylim(len(classes) - 0.5, -0.5)
    ax.grid(alpha=0.2)
    fig.colorbar(points, ax=ax, fraction=0.03, pad=0.01, label="importance / class max")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        _save(fig, path)
    return fig

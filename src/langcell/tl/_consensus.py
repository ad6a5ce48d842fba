"""``tl.consensus``: refine per-cell zero-shot calls with the cells' neighbours.

Two methods, both using no label:

``"graph"``
    Label propagation of the score matrix over a kNN graph of the cells (Zhou et al., "Learning with
    local and global consistency", NeurIPS 2003). With ``W`` the symmetric kNN affinities,
    ``D`` their row sums and ``L = I - D^-1/2 W D^-1/2`` the normalised graph Laplacian, the smoothed
    scores ``F`` solve ``(I + lambda L) F = P0`` for the zero-shot scores ``P0``: the minimiser of
    ``||F - P0||^2 + lambda * sum_ij W_ij ||F_i / sqrt(D_ii) - F_j / sqrt(D_jj)||^2 / 2``, a
    trade-off between each cell's own scores and agreement with its neighbours. ``I + lambda L`` is
    symmetric positive definite with eigenvalues in [1, 1 + 2 lambda], so conjugate gradients converge
    in a few dozen iterations; each of the K columns is solved to a relative residual of
    :data:`CG_TOLERANCE`. The matrix is also an M-matrix, so ``F`` is non-negative; its rows are
    rescaled to sum to 1.
``"majority"``
    CellTypist's majority voting: every cell of a group gets the group's commonest call. The groups are
    an obs column, or (``groupby="auto"``) an over-clustering by Leiden on the kNN graph, whose
    resolution grows with the number of cells (:func:`over_cluster_resolution`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._checks import check_anndata as _check_anndata
from .._checks import check_key_added, check_positive_int, listed, output_anndata
from .._docs import doc_params
from ..data.pca import log_normalised_pca
from ..errors import LangCellError

__all__ = ["consensus", "over_cluster_resolution"]

METHODS = ("graph", "majority")
#: Default ``lambda`` of the graph method: ``alpha = lambda / (1 + lambda) = 0.9`` in Zhou et al.'s terms.
DEFAULT_SMOOTHING = 9.0
#: Relative residual ``||b - A x|| / ||b||`` each conjugate-gradient solve reaches.
CG_TOLERANCE = 1e-8
#: The obsm key of LangCell embeddings written by :func:`langcell.tl.embed`.
LANGCELL_REP = "X_langcell"


def over_cluster_resolution(n_cells: int) -> float:
    """Leiden resolution for over-clustering ``n_cells`` cells: ``5 * sqrt(n / 5000)``, clipped to [5, 30].

    Over-clusters should stay small (tens of cells) however many cells there are, so the resolution
    grows with the data. CellTypist steps it 5, 10, 15, 20, 25, 30 at 5k, 20k, 40k, 100k and 200k
    cells; this continuous curve passes near those steps (5 at 5k, 10 at 20k, 15 at 45k, 20 at 80k,
    30 from 180k cells) without jumps at the thresholds.
    """
    return float(min(30.0, max(5.0, 5.0 * math.sqrt(n_cells / 5000.0))))


@doc_params
def consensus(
    adata: Any,
    *,
    key: str = "langcell_cell_type",
    method: str = "graph",
    groupby: str | None = None,
    use_rep: str | None = None,
    n_neighbors: int = 15,
    smoothing: float = DEFAULT_SMOOTHING,
    resolution: float | None = None,
    n_pcs: int = 50,
    counts_layer: str | None = None,
    random_state: int = 0,
    key_added: str | None = None,
    copy: bool = False,
):
    """Refine zero-shot calls with each cell's neighbours: graph smoothing or majority vote.

    The methods are described in :mod:`langcell.tl._consensus` (label propagation solved exactly;
    CellTypist-style majority voting). Neither uses any label: only the scores or calls of
    :func:`langcell.tl.annotate` and the cells' own data.

    Parameters
    ----------
    adata
        Cells annotated by :func:`langcell.tl.annotate` (``obs[key]``, ``obsm[key + "_probs"]``,
        ``uns[key]["classes"]``).
    key
        The ``key_added`` of the annotation to refine.
    method
        ``"graph"`` (smooth the scores ``obsm[key + "_probs"]`` over the kNN graph) or ``"majority"``
        (majority vote of the calls ``obs[key]`` within groups).
    groupby
        ``method="majority"`` only: an obs column of groups (e.g. ``"leiden"``), or ``"auto"`` to
        over-cluster the cells with Leiden on the kNN graph (needs ``igraph``: ``pip install
        'langcell[consensus]'``).
    use_rep
        The cells' kNN graph (the graph method, and ``groupby="auto"``): an obsm key (e.g.
        ``"X_langcell"`` from :func:`langcell.tl.embed`), or ``"pca"`` for a PCA of log-normalised counts
        (:func:`langcell.data.pca.log_normalised_pca`, ``n_pcs`` components). ``None`` (default): reuse
        ``obsp["connectivities"]`` of ``scanpy.pp.neighbors`` when present, else ``"X_langcell"``. An obsm
        key whose scanpy neighbours are already in ``obsp`` (same ``use_rep`` and ``n_neighbors`` in
        ``uns["neighbors"]``) reuses them; otherwise scanpy's neighbours are computed on a scratch
        object (``adata`` gains no graph).
    n_neighbors
        Neighbours per cell of a computed graph (at least 2, below the number of cells).
    smoothing
        ``lambda`` of the graph method: a positive, finite weight of agreement with the neighbours
        (0.9 = ``lambda / (1 + lambda)`` of the default 9 is Zhou et al.'s ``alpha``).
    resolution
        ``groupby="auto"``: the Leiden resolution; ``None`` picks :func:`over_cluster_resolution`.
    n_pcs
        ``use_rep="pca"``: principal components.
    counts_layer
        ``use_rep="pca"``: where the raw counts are (``None`` = ``X``, a layer, or ``"raw"``).
    random_state
        Seed of the neighbour search and of Leiden.
    key_added
        Name of the fields written; default ``key + "_consensus"``.
    {copy}

    Returns
    -------
    anndata.AnnData or None
        The annotated copy if ``copy=True``, else ``None``. ``obs[key]`` (each cell's own call) is left
        as it is. The fields written are:

        ``obs[key_added]``
            categorical: the refined call of each cell.
        ``obs[key_added + "_score"]``
            float: graph, the smoothed score of the refined class; majority, the share of the cell's
            group that voted for it.
        ``obsm[key_added + "_probs"]``
            graph only, ``float32`` cells x K: the smoothed scores (rows sum to 1), columns in the order
            of ``uns[key_added]["classes"]``.
        ``obs[key_added + "_groups"]``
            ``groupby="auto"`` only, categorical: the Leiden over-clusters.
        ``uns[key_added]``
            dict with ``"params"`` (key, method, groupby, use_rep used, n_neighbors, smoothing,
            tolerance, resolution, n_groups, random_state) and ``"classes"``.

    Raises
    ------
    LangCellError
        Before anything is written: for an unknown method, no annotation under ``key`` (annotate not
        run), a score matrix that does not match its classes, a ``groupby`` that is missing, not an
        obs column or given to the graph method, a missing ``use_rep``, ``smoothing`` not positive and
        finite, a bad ``n_neighbors`` / ``resolution``, a graph in which some cells have no neighbour,
        or ``groupby="auto"`` without igraph.

    Examples
    --------
    >>> langcell.tl.annotate(adata, model, labels)                         # doctest: +SKIP
    >>> langcell.tl.embed(adata, model)                                    # doctest: +SKIP
    >>> langcell.tl.consensus(adata, method="graph", use_rep="X_langcell")  # doctest: +SKIP
    >>> adata.obs["langcell_cell_type_consensus"].value_counts()           # doctest: +SKIP
    """
    _check_anndata(adata)
    settings = _check_settings(adata, key, method, groupby, use_rep, n_neighbors, smoothing, resolution, key_added)
    key_added = settings["key_added"]
    groups = None
    if method == "majority" and groupby != "auto":
        groups = adata.obs[groupby]
        graph, rep_used = None, None
    else:
        graph, rep_used = _cell_graph(adata, use_rep, n_neighbors, n_pcs, counts_layer, random_state)
        _check_no_isolated(adata, graph)
    if method == "graph":
        scores = smooth_scores(settings["probs"], graph, smoothing)
        best = np.argmax(scores, axis=1)
        classes = settings["classes"]
        calls = pd.Categorical(np.asarray(classes, dtype=object)[best], categories=classes)
        call_score = scores[np.arange(best.size), best]
    else:
        if groups is None:
            resolution = over_cluster_resolution(adata.n_obs) if resolution is None else float(resolution)
            groups = _leiden(graph, resolution, random_state, adata.obs_names)
        calls, call_score = majority_vote(adata.obs[key], groups)
    adata = output_anndata(adata, copy)
    adata.obs[key_added] = calls
    adata.obs[key_added + "_score"] = np.asarray(call_score, dtype=np.float64)
    if method == "graph":
        adata.obsm[key_added + "_probs"] = scores.astype(np.float32)
    elif groupby == "auto":
        adata.obs[key_added + "_groups"] = groups
    adata.uns[key_added] = {
        "params": {
            "key": key, "method": method, "groupby": groupby, "use_rep": rep_used, "n_neighbors": int(n_neighbors),
            "smoothing": float(smoothing) if method == "graph" else None,
            "tolerance": CG_TOLERANCE if method == "graph" else None,
            "resolution": resolution if groupby == "auto" else None,
            "n_groups": None if groups is None else int(pd.Series(groups).nunique()),
            "random_state": int(random_state),
        },
        "classes": [str(c) for c in calls.categories],
    }
    return adata if copy else None


def _check_settings(adata, key, method, groupby, use_rep, n_neighbors, smoothing, resolution, key_added) -> dict:
    """Every argument check of :func:`consensus`, before any work; the score matrix and classes for the graph."""
    if method not in METHODS:
        raise LangCellError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(key, str) or key not in adata.obs.columns:
        raise LangCellError(
            f"obs has no annotation {key!r}; run langcell.tl.annotate(adata, model, labels, key_added={key!r}) "
            "first, or pass key=<the key_added of your annotation>"
        )
    key_added = key + "_consensus" if key_added is None else key_added
    check_key_added(key_added)
    if key_added == key:
        raise LangCellError(f"key_added={key_added!r} would overwrite the calls it refines; pass another name")
    out: dict = {"key_added": key_added}
    if method == "graph":
        if groupby is not None:
            raise LangCellError("groupby is for method='majority'; the graph method smooths over the kNN graph")
        out["probs"], out["classes"] = annotation_scores(adata, key)
        if isinstance(smoothing, bool) or not isinstance(smoothing, int | float | np.integer | np.floating) or not (
            math.isfinite(smoothing) and smoothing > 0
        ):
            raise LangCellError(f"smoothing (lambda) must be a positive, finite number, got {smoothing!r}; e.g. 9")
    elif groupby is None:
        raise LangCellError("method='majority' votes within groups: pass groupby=<an obs column> or groupby='auto'")
    elif groupby != "auto" and (not isinstance(groupby, str) or groupby not in adata.obs.columns):
        raise LangCellError(
            f"groupby {groupby!r} is not an obs column; pass one of {listed(adata.obs.columns)}, or 'auto' to "
            "over-cluster the cells"
        )
    if method == "graph" or groupby == "auto":
        if use_rep not in (None, "pca") and (not isinstance(use_rep, str) or use_rep not in adata.obsm):
            raise LangCellError(
                f"use_rep {use_rep!r} is not in obsm (keys: {listed(adata.obsm)}); run langcell.tl.embed(adata, "
                "model) for 'X_langcell', or pass use_rep='pca'"
            )
        n_neighbors = check_positive_int(n_neighbors, "n_neighbors")
        if not 2 <= n_neighbors < adata.n_obs:
            raise LangCellError(f"n_neighbors must lie in [2, {adata.n_obs}) (the number of cells), got {n_neighbors}")
        if resolution is not None and (
            isinstance(resolution, bool) or not isinstance(resolution, int | float) or not resolution > 0
            or not math.isfinite(resolution)
        ):
            raise LangCellError(f"resolution must be a positive number or None, got {resolution!r}")
        if groupby == "auto":
            _import_igraph()
    return out


def annotation_scores(adata: Any, key: str) -> tuple[np.ndarray, list[str]]:
    """``obsm[key + "_probs"]`` and ``uns[key]["classes"]`` as :func:`langcell.tl.annotate` wrote them, checked."""
    probs_key = key + "_probs"
    entry = adata.uns.get(key)
    if probs_key not in adata.obsm or not isinstance(entry, dict) or "classes" not in entry:
        raise LangCellError(
            f"no score matrix obsm[{probs_key!r}] with its classes in uns[{key!r}]; run "
            f"langcell.tl.annotate(adata, model, labels, key_added={key!r}) first"
        )
    probs = np.asarray(adata.obsm[probs_key], dtype=np.float64)
    classes = [str(c) for c in entry["classes"]]
    if probs.ndim != 2 or probs.shape != (adata.n_obs, len(classes)):
        raise LangCellError(
            f"obsm[{probs_key!r}] has shape {probs.shape} but there are {adata.n_obs} cells and {len(classes)} "
            f"classes in uns[{key!r}]['classes']; annotate again"
        )
    if not np.all(np.isfinite(probs)) or probs.min() < 0:
        raise LangCellError(f"obsm[{probs_key!r}] holds negative, NaN or infinite scores; annotate again")
    return probs, classes


def smooth_scores(scores: np.ndarray, graph: sp.spmatrix, smoothing: float) -> np.ndarray:
    """Solve ``(I + smoothing * L) F = scores`` (``L`` the normalised Laplacian of ``graph``), rows of F summed to 1.

    ``graph`` is a symmetric, non-negative cells x cells affinity matrix in which every cell has a
    neighbour; each column is solved by conjugate gradients to :data:`CG_TOLERANCE`.
    """
    from scipy.sparse.linalg import cg

    n = graph.shape[0]
    inv_sqrt_degree = 1.0 / np.sqrt(np.asarray(graph.sum(axis=1)).ravel())
    normalised = sp.diags(inv_sqrt_degree) @ graph @ sp.diags(inv_sqrt_degree)
    system = ((1.0 + smoothing) * sp.identity(n, format="csr") - smoothing * normalised).tocsr()
    smoothed = np.empty_like(scores, dtype=np.float64)
    for column in range(scores.shape[1]):
        rhs = scores[:, column]
        if not rhs.any():
            smoothed[:, column] = 0.0
            continue
        solution, info = cg(system, rhs, rtol=CG_TOLERANCE, atol=0.0, maxiter=10 * n)
        if info != 0:  # cannot happen for this SPD system with a finite lambda; never return an unsolved F
            raise LangCellError(f"the graph solve did not converge (scipy cg info {info}); pass a smaller smoothing")
        smoothed[:, column] = solution
    smoothed = np.clip(smoothed, 0.0, None)  # exact F >= 0; CG's rounding may leave -1e-12
    totals = smoothed.sum(axis=1, keepdims=True)
    return smoothed / np.where(totals > 0, totals, 1.0)


def majority_vote(calls: pd.Series, groups: Any) -> tuple[pd.Categorical, np.ndarray]:
    """Each cell's group's commonest call, and the share of the group that made it.

    Ties go to the call listed first among the categories of ``calls`` (sorted names when it is not
    categorical). A cell whose group is missing (NaN) keeps its own call with share 1.
    """
    calls = pd.Series(calls).reset_index(drop=True)
    categories = (
        [str(c) for c in calls.cat.categories] if isinstance(calls.dtype, pd.CategoricalDtype)
        else sorted({str(c) for c in calls})
    )
    rank = {name: i for i, name in enumerate(categories)}
    names = calls.astype(str).to_numpy()
    group_values = pd.Series(groups).reset_index(drop=True)
    result, share = names.astype(object).copy(), np.ones(names.size)
    for _, rows in group_values.groupby(group_values.astype(str).where(group_values.notna()), sort=False).groups.items():
        rows = np.asarray(rows)
        counts = pd.Series(names[rows]).value_counts()
        top = min(counts.index[counts == counts.max()], key=lambda name: rank[name])
        result[rows] = top
        share[rows] = counts[top] / rows.size
    return pd.Categorical(result, categories=categories), share


def _cell_graph(adata, use_rep, n_neighbors, n_pcs, counts_layer, random_state) -> tuple[sp.csr_matrix, str]:
    """The symmetric kNN affinities of the cells, and what they were computed from."""
    import anndata
    import scanpy as sc

    neighbors = adata.uns.get("neighbors", {}) if isinstance(adata.uns.get("neighbors"), dict) else {}
    params = neighbors.get("params", {}) or {}
    if "connectivities" in adata.obsp:
        reused = use_rep is None or (
            params.get("use_rep") == use_rep and int(params.get("n_neighbors", -1)) == int(n_neighbors)
        )
        if reused:
            graph = sp.csr_matrix(adata.obsp["connectivities"], dtype=np.float64)
            return _symmetric(graph), "obsp['connectivities']"
    if use_rep is None:
        if LANGCELL_REP not in adata.obsm:
            raise LangCellError(
                "no kNN graph for the consensus: run langcell.tl.embed(adata, model) (obsm['X_langcell']) or "
                "scanpy.pp.neighbors, or pass use_rep='pca' (PCA of log-normalised counts) or another obsm key"
            )
        use_rep = LANGCELL_REP
    if use_rep == "pca":
        rep, _ = log_normalised_pca(adata, n_pcs=n_pcs, counts_layer=counts_layer)
    else:
        rep = np.asarray(adata.obsm[use_rep], dtype=np.float32)
        if rep.ndim != 2 or not np.all(np.isfinite(rep)):
            raise LangCellError(f"obsm[{use_rep!r}] must be a finite cells x dimensions matrix; recompute it")
    scratch = anndata.AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()), obsm={"rep": rep})
    sc.pp.neighbors(scratch, n_neighbors=n_neighbors, use_rep="rep", random_state=random_state)
    return _symmetric(sp.csr_matrix(scratch.obsp["connectivities"], dtype=np.float64)), use_rep


def _symmetric(graph: sp.csr_matrix) -> sp.csr_matrix:
    """``(W + W^T) / 2`` without self-loops, refusing negative or non-finite weights."""
    if graph.shape[0] != graph.shape[1] or not np.all(np.isfinite(graph.data)) or np.any(graph.data < 0):
        raise LangCellError("the neighbour graph must be a square, non-negative, finite matrix; recompute it")
    graph = ((graph + graph.T) * 0.5).tocsr()
    graph.setdiag(0.0)
    graph.eliminate_zeros()
    return graph


def _check_no_isolated(adata: Any, graph: sp.csr_matrix) -> None:
    """Refuse a graph in which a cell has no neighbour: its normalised Laplacian is undefined."""
    isolated = np.flatnonzero(np.asarray(graph.sum(axis=1)).ravel() <= 0)
    if isolated.size:
        raise LangCellError(
            f"{isolated.size} cells have no neighbour in the graph (e.g. {listed(adata.obs_names[isolated], 5)}), "
            "so nothing can be propagated to them; recompute the neighbours (scanpy.pp.neighbors, or drop "
            "obsp['connectivities'] and pass use_rep=...) or leave those cells out"
        )


def _import_igraph() -> Any:
    try:
        import igraph
    except ImportError:
        raise LangCellError(
            "groupby='auto' over-clusters with igraph's Leiden, which is not installed; "
            "pip install 'langcell[consensus]' (or igraph), or pass groupby=<an obs column>"
        ) from None
    return igraph


def _leiden(graph: sp.csr_matrix, resolution: float, random_state: int, names) -> pd.Categorical:
    """Leiden clusters of the graph (scanpy, igraph flavour: no leidenalg needed)."""
    import anndata
    import scanpy as sc

    scratch = anndata.AnnData(obs=pd.DataFrame(index=names.copy()))
    sc.tl.leiden(scratch, resolution=resolution, adjacency=graph, flavor="igraph", n_iterations=2,
                 directed=False, random_state=random_state, key_added="groups")
    return pd.Categorical(scratch.obs["groups"].astype(str).to_numpy())

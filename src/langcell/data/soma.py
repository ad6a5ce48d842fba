"""Cells from a SOMA experiment (TileDB-SOMA; the CELLxGENE Census is one), streamed by row chunks.

:class:`SomaSource` names an experiment (a local directory or a remote URI such as the Census's S3
location), an obs value filter, the measurement and its X layer of raw counts. :func:`opened_soma`
opens it, checks all of that before any counts are read, and yields a :class:`SomaCells`: the filtered
cells' obs table, the measurement's var table, and a matrix whose row slices read just those cells from
the experiment, so the tokenizer and the corpus writer stream it exactly as they stream a backed h5ad
file (:mod:`langcell.data.sources`).

``tiledbsoma`` is an optional dependency (``pip install "langcell[census]"``); it is imported only when
an experiment is opened.
"""

from __future__ import annotations

import ast
import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import LangCellError

__all__ = ["SomaSource", "SomaCells", "opened_soma", "census_uri", "is_soma_uri"]

#: The public Census's S3 bucket and region (anonymous reads).
CENSUS_BUCKET = "s3://cellxgene-census-public-us-west-2/cell-census"
CENSUS_REGION = "us-west-2"
#: The Census's long-term-supported release this langcell was written against.
CENSUS_LTS_RELEASE = "2025-11-08"
#: obs columns that name a cell in an experiment written by ``tiledbsoma.io.from_h5ad`` (the h5ad's
#: obs_names), in order of preference; without one, a cell's name is its ``soma_joinid``.
_OBS_ID_COLUMNS = ("obs_id",)
#: var columns holding gene identifiers when no gene column is given: ``from_h5ad``'s var_names, then
#: the Census's Ensembl IDs.
_VAR_ID_COLUMNS = ("var_id", "feature_id")
_INSTALL = 'reading a SOMA experiment needs tiledbsoma: pip install "langcell[census]"'


@dataclass(frozen=True)
class SomaSource:
    """A SOMA experiment as a source of cells for :func:`~langcell.data.corpus.write_corpus`.

    Parameters
    ----------
    uri
        The experiment: a local directory, or a remote URI (``s3://...``; :func:`census_uri` gives the
        public Census's).
    obs_filter
        A SOMA value filter on obs, e.g. ``"tissue_general == 'blood' and is_primary_data == True"``;
        ``None`` takes every cell.
    measurement
        The measurement holding the genes (``"RNA"`` in the Census and in ``tiledbsoma.io.from_h5ad``).
    x_layer
        The X layer with raw counts (``"raw"`` in the Census).
    tiledb_config
        TileDB settings (e.g. ``{"vfs.s3.region": "us-west-2"}``); ``None`` uses :func:`default_config`.
    """

    uri: str  # local directory or remote URI of the experiment
    obs_filter: str | None = None  # SOMA value filter on obs; None: all cells
    measurement: str = "RNA"  # measurement whose var are the genes
    x_layer: str = "raw"  # X layer of raw counts
    tiledb_config: Mapping[str, str] | None = field(default=None, compare=False)  # None: default_config(uri)

    def __str__(self) -> str:
        return self.uri


def census_uri(release: str = CENSUS_LTS_RELEASE, organism: str = "homo_sapiens") -> str:
    """The S3 URI of one organism's experiment in a public Census release.

    Parameters
    ----------
    release
        The release tag (a build date such as ``"2025-11-08"``; see the Census's release list).
    organism
        ``"homo_sapiens"`` or ``"mus_musculus"`` (and the other organisms a release holds).

    Returns
    -------
    str
        ``s3://cellxgene-census-public-us-west-2/cell-census/<release>/soma/census_data/<organism>``.
    """
    if not release or "/" in release or not organism or "/" in organism:
        raise LangCellError(
            f"census_uri needs a release tag such as {CENSUS_LTS_RELEASE!r} and an organism such as "
            f"'homo_sapiens', got {release!r} and {organism!r}"
        )
    return f"{CENSUS_BUCKET}/{release}/soma/census_data/{organism}"


def default_config(uri: str) -> dict[str, str]:
    """TileDB settings for ``uri``: S3 URIs read in ``AWS_REGION`` (default the Census's region), anonymously
    unless AWS credentials are set in the environment; other URIs need none."""
    if not uri.startswith("s3://"):
        return {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or CENSUS_REGION
    signed = bool(os.environ.get("AWS_ACCESS_KEY_ID"))
    return {"vfs.s3.region": region, "vfs.s3.no_sign_request": "false" if signed else "true"}


def is_soma_uri(text: str | os.PathLike) -> bool:
    """Whether a command-line input names a SOMA experiment (a URI, or a directory) rather than an h5ad file."""
    text = os.fspath(text)
    return "://" in text or os.path.isdir(text)


@dataclass
class SomaCells:
    """An opened experiment, restricted to the filtered cells."""

    matrix: Any  # _SomaRows: rows i:j are the filtered cells i:j, as CSR
    var: pd.DataFrame  # the measurement's var table, one row per matrix column
    obs: pd.DataFrame  # the filtered cells' obs (without soma_joinid), indexed by cell name
    label: str  # how messages and the corpus name the source (the URI)


class _SomaRows:
    """Row slices of the filtered cells of an X layer, read from the experiment as CSR."""

    def __init__(
        self, array: Any, obs_joinids: np.ndarray, var_joinids: np.ndarray, row_nnz: np.ndarray | None
    ) -> None:
        self.array = array
        self.obs_joinids = obs_joinids  # sorted int64: matrix row i is soma_joinid obs_joinids[i]
        self.row_nnz = row_nnz  # stored values per row when obs records them (the Census's nnz), else None
        # Column of each var joinid (joinids are usually 0..n-1, but need not be).
        self.column_of = np.full(int(var_joinids.max()) + 1 if var_joinids.size else 0, -1, dtype=np.int64)
        self.column_of[var_joinids] = np.arange(var_joinids.size)
        self.shape = (obs_joinids.size, var_joinids.size)

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        start, stop, _ = rows.indices(self.shape[0])
        joinids = self.obs_joinids[start:stop]
        table = self.array.read(coords=(joinids,)).tables().concat()
        dim0 = table.column("soma_dim_0").to_numpy()
        dim1 = table.column("soma_dim_1").to_numpy()
        data = table.column("soma_data").to_numpy()
        columns = self.column_of[dim1]
        keep = columns >= 0  # values of genes outside var (none in a valid experiment) are dropped
        # COO -> CSR sorts each row's columns (the order TileDB returns cells in is not fixed).
        return sp.csr_matrix(
            (data[keep], (np.searchsorted(joinids, dim0[keep]), columns[keep])), shape=(joinids.size, self.shape[1])
        )


def _filter_columns(obs_filter: str, label: str) -> set[str]:
    """The column names a value filter uses (it is a Python-like expression)."""
    try:
        tree = ast.parse(obs_filter, mode="eval")
    except SyntaxError:
        raise LangCellError(
            f"obs_filter {obs_filter!r} for {label} is not a valid filter; write it like "
            "\"tissue_general == 'blood' and is_primary_data == True\""
        ) from None
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and id(node) not in called}


def _open_experiment(tiledbsoma: Any, source: SomaSource) -> Any:
    config = default_config(source.uri) if source.tiledb_config is None else dict(source.tiledb_config)
    context = tiledbsoma.SOMATileDBContext(tiledb_config=config)
    try:
        return tiledbsoma.Experiment.open(source.uri, context=context)
    except tiledbsoma.DoesNotExistError:
        raise LangCellError(
            f"no SOMA experiment at {source.uri!r}; check the URI (for the Census: "
            f"{census_uri()!r}, or another release's)"
        ) from None
    except (tiledbsoma.SOMAError, TypeError) as err:
        raise LangCellError(
            f"cannot open {source.uri!r} as a SOMA experiment ({type(err).__name__}: {err}); pass the URI of "
            "an experiment (the Census's is <release>/soma/census_data/<organism>)"
        ) from None


def _layer(experiment: Any, source: SomaSource) -> tuple[Any, Any]:
    """The measurement and its X layer, refused with the names that exist."""
    if source.measurement not in experiment.ms:
        names = ", ".join(map(repr, experiment.ms.keys())) or "none"
        raise LangCellError(
            f"{source.uri!r} has no measurement {source.measurement!r} (measurements: {names}); pass "
            "measurement=<one of them>"
        )
    measurement = experiment.ms[source.measurement]
    layers = list(measurement.X.keys()) if "X" in measurement else []
    if source.x_layer not in layers:
        raise LangCellError(
            f"measurement {source.measurement!r} of {source.uri!r} has no X layer {source.x_layer!r} (layers: "
            f"{', '.join(map(repr, layers)) or 'none'}); pass the layer of raw counts as x_layer"
        )
    return measurement, measurement.X[source.x_layer]


def _wanted_columns(names: list[str], columns: Sequence[str] | None, n_counts_key: str | None) -> list[str] | None:
    """The obs columns to read: ``columns`` and those the reader itself uses (None: all)."""
    if columns is None:
        return None
    own = ["soma_joinid", *_OBS_ID_COLUMNS, "nnz", *([n_counts_key] if n_counts_key else [])]
    return list(dict.fromkeys([c for c in own if c in names] + list(columns)))


def _read_obs(
    tiledbsoma: Any, experiment: Any, source: SomaSource, columns: Sequence[str] | None, n_counts_key: str | None
) -> pd.DataFrame:
    """The filtered cells' obs (the ``columns`` wanted), in soma_joinid order, after checking the filter."""
    names = list(experiment.obs.schema.names)
    listed = ", ".join(c for c in names if c != "soma_joinid")
    missing = [c for c in columns or () if c not in names]
    if missing:
        raise LangCellError(
            f"{source.uri!r} has no obs columns {missing} (columns: {listed}); pass existing column names in "
            "obs_columns, or obs_columns=None for all"
        )
    if source.obs_filter is not None:
        unknown = sorted(_filter_columns(source.obs_filter, source.uri) - set(names))
        if unknown:
            raise LangCellError(
                f"obs_filter {source.obs_filter!r} names obs columns {unknown} that {source.uri!r} does not have "
                f"(columns: {listed}); fix the obs_filter"
            )
    try:
        table = experiment.obs.read(
            value_filter=source.obs_filter, column_names=_wanted_columns(names, columns, n_counts_key)
        ).concat()
    except (tiledbsoma.SOMAError, ValueError, TypeError) as err:
        raise LangCellError(
            f"obs_filter {source.obs_filter!r} cannot be applied to {source.uri!r} ({err}); fix the obs_filter, "
            "e.g. \"tissue_general == 'blood' and is_primary_data == True\""
        ) from None
    obs = table.to_pandas().sort_values("soma_joinid", kind="stable")
    if len(obs) == 0:
        what = "holds no cell" if source.obs_filter is None else f"has no cell that obs_filter {source.obs_filter!r} selects"
        raise LangCellError(f"{source.uri!r} {what}; widen the obs_filter or check the experiment")
    return obs


def _cell_names(obs: pd.DataFrame) -> pd.Index:
    for column in _OBS_ID_COLUMNS:
        if column in obs.columns:
            return pd.Index(obs[column].astype(str).to_numpy(), dtype=object)
    return pd.Index(obs["soma_joinid"].astype(str).to_numpy(), dtype=object)


@contextlib.contextmanager
def opened_soma(
    source: SomaSource, *, obs_columns: Sequence[str] | None = None, n_counts_key: str | None = None
) -> Iterator[SomaCells]:
    """Open an experiment, check everything that can be checked, and yield its filtered cells.

    Parameters
    ----------
    source
        The experiment, filter, measurement and layer.
    obs_columns
        obs columns to read besides those the reader uses (cell names, ``nnz``, ``n_counts_key``);
        ``None`` reads all. The Census's obs has ~30 columns, some a string per cell: what needs no
        metadata passes ``()``.
    n_counts_key
        obs column of per-cell totals, read when present.

    Raises
    ------
    LangCellError
        Without tiledbsoma (naming the extra to install); for a URI that holds no experiment, a missing
        measurement or X layer, a filter that is not valid, names unknown columns or selects no cell.
    """
    try:
        import tiledbsoma
    except ImportError:
        raise LangCellError(_INSTALL) from None
    experiment = _open_experiment(tiledbsoma, source)
    try:
        measurement, array = _layer(experiment, source)
        obs = _read_obs(tiledbsoma, experiment, source, obs_columns, n_counts_key)
        var = measurement.var.read().concat().to_pandas().sort_values("soma_joinid", kind="stable")
        joinids = obs["soma_joinid"].to_numpy(dtype=np.int64)
        nnz = obs["nnz"].to_numpy(dtype=np.int64) if "nnz" in obs.columns else None
        matrix = _SomaRows(array, joinids, var["soma_joinid"].to_numpy(dtype=np.int64), nnz)
        names = _cell_names(obs)
        obs = obs.drop(columns=["soma_joinid", *[c for c in _OBS_ID_COLUMNS if c in obs.columns]])
        obs.index = names
        yield SomaCells(matrix, var.drop(columns="soma_joinid").reset_index(drop=True), obs, source.uri)
    finally:
        experiment.close()


def var_gene_names(var: pd.DataFrame, gene_column: str | None, label: str) -> np.ndarray:
    """Gene identifiers of an experiment's var: ``gene_column``, else its id column (var_id, feature_id)."""
    candidates = (gene_column,) if gene_column is not None else _VAR_ID_COLUMNS
    for column in candidates:
        if column in var.columns:
            return np.asarray(var[column].astype(str), dtype=object)
    raise LangCellError(
        f"{label} has no var column {' or '.join(map(repr, candidates))} (columns: "
        f"{', '.join(map(repr, var.columns)) or 'none'}); pass gene_column=<the var column with gene symbols or "
        "Ensembl IDs>"
    )

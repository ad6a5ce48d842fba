"""Geneformer's pickled dictionaries (token, median, gene-name), read without running pickled code.

The one place in langcell that unpickles: a restricted unpickler accepts only the dict/str/int/float
objects these files hold and refuses anything else (globals, reduce calls) with a clear error.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LangCellError


class _RefusedPickle(pickle.UnpicklingError):
    """The pickle names something the dictionary unpickler does not admit (as opposed to a damaged file)."""


def _numpy_scalar(dtype: Any, *args: Any) -> Any:
    """numpy's scalar reconstruction, refusing object dtypes (which could smuggle arbitrary objects)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _RefusedPickle("only numeric numpy scalars are allowed")
    return _NUMPY_SCALAR(dtype, *args)


def _find_numpy_scalar() -> Any:
    # numpy 2 moved the module to numpy._core; pickles written by numpy 1 name numpy.core.
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar


_NUMPY_SCALAR = _find_numpy_scalar()


class _DictionaryUnpickler(pickle.Unpickler):
    """An unpickler that only admits what a plain ``dict`` of ``str -> numpy scalar`` needs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise _RefusedPickle(f"global {module}.{name} is not allowed") from None


def read_geneformer_dictionary(path: str | os.PathLike) -> dict:
    """Read one of Geneformer's pickled dictionaries (token ids, gene medians, name -> id) safely.

    This is the one documented function in langcell that unpickles a file. It uses a restricted
    unpickler whose ``find_class`` admits only numpy's scalar reconstruction function (for numeric
    dtypes) and ``numpy.dtype``: exactly what a plain ``dict`` of ``str -> numpy scalar`` needs. A pickle
    that names anything else (``os.system``, ``builtins.eval``, ...) is refused before it can run.

    Parameters
    ----------
    path
        A ``token_dictionary.pkl``, ``gene_median_dictionary.pkl`` or ``gene_name_id_dict.pkl``.

    Returns
    -------
    dict
        The dictionary, with numpy scalars converted to plain ``int`` / ``float``.

    Raises
    ------
    LangCellError
        If the file is missing, is not a pickle, carries anything but plain data, or is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise LangCellError(f"Geneformer dictionary {str(path)!r} does not exist; check the path")
    data = path.read_bytes()
    try:
        loaded = _DictionaryUnpickler(io.BytesIO(data)).load()
    except _RefusedPickle as err:
        raise LangCellError(
            f"{str(path)!r} was refused: {err}. Only plain dictionaries of names to numbers are read; "
            "use the token_dictionary.pkl / gene_median_dictionary.pkl files of the Geneformer release"
        ) from None
    except Exception as err:  # a corrupt or non-pickle file
        raise LangCellError(
            f"{str(path)!r} is not a readable pickle ({type(err).__name__}: {err}); "
            "check that the file is a Geneformer dictionary and was copied completely"
        ) from None
    if not isinstance(loaded, dict):
        raise LangCellError(
            f"{str(path)!r} holds a {type(loaded).__name__}, not a dictionary; pass a Geneformer dictionary file"
        )
    return {key: (value.item() if isinstance(value, np.generic) else value) for key, value in loaded.items()}


def read_gene_name_dictionary(path: str | os.PathLike) -> dict[str, str]:
    """Read Geneformer's ``gene_name_id_dict.pkl`` (gene symbol -> Ensembl id) safely.

    The file is read with :func:`read_geneformer_dictionary` (restricted unpickling); every key and value
    must be text. The one entry with an empty name in the release's file is dropped: an empty name is
    never a gene (:mod:`langcell.data.genes` counts it as a non-gene feature).

    Parameters
    ----------
    path
        The ``gene_name_id_dict.pkl`` that goes with the ``token_dictionary.pkl`` of the vocabulary.

    Returns
    -------
    dict
        ``{symbol: Ensembl id}``, in the file's order.

    Raises
    ------
    LangCellError
        If the file cannot be read safely, or a name or an id is not text.
    """
    loaded = read_geneformer_dictionary(path)
    bad = [
        (key, value)
        for key, value in loaded.items()
        if not isinstance(key, str) or not isinstance(value, str) or not value.strip()
    ]
    if bad:
        raise LangCellError(
            f"{str(path)!r}: the entries {bad[:3]!r} are not gene symbol -> Ensembl id text; pass Geneformer's "
            "gene_name_id_dict.pkl"
        )
    return {key: value for key, value in loaded.items() if key.strip()}

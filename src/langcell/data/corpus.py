"""On-disk tokenized corpus: rank-value sequences of many cells, sharded, ragged, memory-mapped.

:func:`write_corpus` streams one or many h5ad files (read backed, chunk by chunk) through a
:class:`~langcell.data.tokenizer.GeneTokenizer` and writes::

    out_dir/
      manifest.json            format version, n_cells, n_tokens, shards (files, sizes, sha256), sources
      gene_tokenizer.json      the tokenizer used (GeneTokenizer.save)
      obs.h5ad                 cell metadata only (no matrix): chosen obs columns + source_file + obs_name
      shards/shard_00000.ids.npy      flat token ids, smallest unsigned dtype that holds the vocabulary
      shards/shard_00000.offsets.npy  int64 [n + 1], cell i = ids[offsets[i]:offsets[i + 1]]
      shards/shard_00000.lengths.npy  sequence lengths (<cls> included)

The directory appears only when complete (written in a temporary directory, then renamed).
:class:`TokenCorpus` opens it, checks every shard against the manifest, and serves cells by index
straight from memory-mapped files, alone or as padded batches.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._atomic import atomic_directory, check_apart_from_inputs
from .._version import __version__
from ..errors import LangCellError
from .batching import pad_sequences
from .genes import GeneMappingReport
from .soma import SomaSource
from .sources import CountSource, as_source_list, opened_counts, row_nnz
from .tokenizer import DEFAULT_CHUNK_SIZE, GeneTokenizer

__all__ = ["TokenCorpus", "write_corpus", "MANIFEST_FILENAME"]

#: Name of the manifest inside a corpus directory.
MANIFEST_FILENAME = "manifest.json"
#: Version of the corpus layout; :class:`TokenCorpus` refuses versions it does not know.
FORMAT_VERSION = 1
_FORMAT_NAME = "langcell.TokenCorpus"
_OBS_FILENAME = "obs.h5ad"
_SHARD_DIR = "shards"
_SHARD_ARRAYS = ("ids", "offsets", "lengths")
#: Metadata columns the corpus adds to every cell.
SOURCE_COLUMN = "source_file"
OBS_NAME_COLUMN = "obs_name"


def _smallest_unsigned(max_value: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds ``max_value``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class _ShardWriter:
    """Buffers encoded chunks and writes them as shards of ``shard_size`` cells."""

    directory: Path  # where the shard files go
    shard_size: int  # cells per shard (the last one may hold fewer)
    ids_dtype: np.dtype  # dtype of the stored token ids
    lengths_dtype: np.dtype  # dtype of the stored lengths
    shards: list[dict] = field(default_factory=list)  # manifest entries of the shards written so far
    _ids: list[np.ndarray] = field(default_factory=list)  # buffered ids of the current shard
    _lengths: list[np.ndarray] = field(default_factory=list)  # buffered lengths of the current shard
    _n_buffered: int = 0  # cells in the current shard

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append consecutive cells (flat ids and their lengths), splitting across shards as needed."""
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        start = 0
        while start < lengths.size:
            take = min(self.shard_size - self._n_buffered, lengths.size - start)
            stop = start + take
            # Narrow the dtype at once: the buffer of a 100k-cell shard then holds 2 bytes per token, not 4.
            self._ids.append(ids[offsets[start] : offsets[stop]].astype(self.ids_dtype))
            self._lengths.append(lengths[start:stop])
            self._n_buffered += take
            start = stop
            if self._n_buffered == self.shard_size:
                self.flush()

    def flush(self) -> None:
        """Write the buffered cells as one shard (nothing when the buffer is empty)."""
        if self._n_buffered == 0:
            return
        name = f"shard_{len(self.shards):05d}"
        lengths = np.concatenate(self._lengths).astype(np.int64)
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        arrays = {
            "ids": np.concatenate(self._ids),
            "offsets": offsets,
            "lengths": lengths.astype(self.lengths_dtype),
        }
        files = {}
        for kind, array in arrays.items():
            path = self.directory / f"{name}.{kind}.npy"
            np.save(path, array, allow_pickle=False)
            files[kind] = {
                "path": f"{_SHARD_DIR}/{path.name}",
                "bytes": path.stat().st_size,
                "sha256": _sha256(path),
            }
        self.shards.append(
            {"name": name, "n_cells": int(lengths.size), "n_tokens": int(offsets[-1]), "files": files}
        )
        self._ids, self._lengths, self._n_buffered = [], [], 0


def _select_obs(obs: pd.DataFrame, obs_columns: Sequence[str] | None, label: str) -> pd.DataFrame:
    if obs_columns is None:
        selected = obs.copy()
    else:
        missing = [c for c in obs_columns if c not in obs.columns]
        if missing:
            raise LangCellError(
                f"{label} has no obs columns {missing} (columns: {list(obs.columns)}); pass existing "
                "column names in obs_columns, or obs_columns=None for all"
            )
        selected = obs[list(obs_columns)].copy()
    clashes = [c for c in (SOURCE_COLUMN, OBS_NAME_COLUMN) if c in selected.columns]
    if clashes:
        raise LangCellError(
            f"{label} has obs columns {clashes}, names the corpus uses for the source file and the original "
            "cell name; rename them or leave them out with obs_columns=[...]"
        )
    return selected


def _as_text(value: Any) -> str | None:
    """A metadata value as text; missing values (None, NaN) stay missing."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return str(value)


def _storable_obs(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate per-source metadata into one frame that h5ad can store."""
    obs = pd.concat(parts, axis=0, ignore_index=True, sort=False)
    for column in obs.columns:
        # Object columns (strings, or categoricals whose categories differed between sources) are
        # stored as categoricals: compact, and h5ad writes them whatever mix of str/None they hold. Not
        # obs_name: one distinct string per cell gains nothing from codes, and reading millions of
        # categories back would hash them all.
        if obs[column].dtype == object and column != OBS_NAME_COLUMN:
            obs[column] = obs[column].map(_as_text).astype("category")
        elif column == OBS_NAME_COLUMN:
            obs[column] = obs[column].astype(str).to_numpy(dtype=object)
    obs.index = pd.Index([str(i) for i in range(len(obs))])
    return obs


def write_corpus(
    sources: Any,
    tokenizer: GeneTokenizer,
    out_dir: str | os.PathLike,
    *,
    obs_columns: Sequence[str] | None = None,
    shard_size: int = 100_000,
    gene_column: str | None = None,
    counts_layer: str | None = None,
    n_counts_key: str | None = "n_counts",
    max_length: int = 2048,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    keep_free: int = 0,
) -> TokenCorpus:
    """Tokenize one or many datasets into an on-disk corpus, streaming chunk by chunk.

    Parameters
    ----------
    sources
        ``.h5ad`` paths (read backed, so files larger than memory stream through), AnnData objects,
        SOMA experiments (:class:`~langcell.data.soma.SomaSource`: a local or remote URI such as the
        CELLxGENE Census, an obs value filter, the X layer of raw counts; streamed in row chunks), or a
        list mixing them. All cells of all sources go into one corpus, in order. A SOMA experiment's
        cells keep all their obs columns; their ``obs_name`` is the ``obs_id`` column when there is one
        (experiments written by ``tiledbsoma.io.from_h5ad``), else the ``soma_joinid``.
    tokenizer
        The :class:`~langcell.data.tokenizer.GeneTokenizer`; it is saved inside the corpus.
    out_dir
        The corpus directory. It appears only once complete.
    obs_columns
        ``obs`` columns to keep (all by default). The corpus adds ``source_file`` and ``obs_name``.
    shard_size
        Cells per shard file.
    gene_column, counts_layer, n_counts_key, max_length, chunk_size
        As in :meth:`GeneTokenizer.encode`.
    overwrite
        Replace an existing ``out_dir``.
    progress
        Show progress bars.
    keep_free
        Bytes that must stay free on the output's disk once the corpus is written.

    Returns
    -------
    TokenCorpus
        The corpus, opened.

    Raises
    ------
    LangCellError
        Before anything is written: for inputs that cannot be read (see
        :meth:`~langcell.data.tokenizer.GeneTokenizer.encode` and :func:`~langcell.data.soma.opened_soma`),
        and when the corpus may not fit on the output's disk (the message says how many bytes it needs:
        an upper bound from the number of stored values of every cell).
    """
    if not isinstance(tokenizer, GeneTokenizer):
        raise LangCellError(
            f"tokenizer must be a GeneTokenizer, got {type(tokenizer).__name__}; build one with "
            "GeneTokenizer.from_geneformer, GeneTokenizer.fit or GeneTokenizer.load"
        )
    if shard_size < 1:
        raise LangCellError(f"shard_size must be a positive number of cells, got {shard_size}")
    source_list = as_source_list(sources)
    check_apart_from_inputs(
        out_dir, [s.uri if isinstance(s, SomaSource) and "://" not in s.uri else s for s in source_list]
    )
    reading = {"gene_column": gene_column, "counts_layer": counts_layer, "n_counts_key": n_counts_key}
    ids_dtype = _smallest_unsigned(tokenizer.vocab_size - 1)
    lengths_dtype = _smallest_unsigned(max_length)
    _check_disk_space(source_list, reading, out_dir, max_length, ids_dtype, lengths_dtype, keep_free)
    with atomic_directory(
        out_dir, overwrite=overwrite, ours=lambda path: (path / MANIFEST_FILENAME).is_file(), what="token corpus"
    ) as tmp:
        shard_dir = tmp / _SHARD_DIR
        shard_dir.mkdir()
        writer = _ShardWriter(
            shard_dir,
            shard_size,
            ids_dtype=ids_dtype,
            lengths_dtype=lengths_dtype,
        )
        obs_parts: list[pd.DataFrame] = []
        source_entries: list[dict] = []
        for i, source in enumerate(source_list):
            with opened_counts(source, f"input #{i}", obs_columns=obs_columns, **reading) as counts:
                label = counts.label
                obs = _select_obs(counts.obs, obs_columns, label)
                obs[SOURCE_COLUMN] = label
                obs[OBS_NAME_COLUMN] = np.asarray(counts.obs_names, dtype=object)
                vocabulary_map, chunks = tokenizer._encode_source(
                    counts,
                    max_length=max_length,
                    chunk_size=chunk_size,
                    progress=progress,
                    n_counts_key=n_counts_key,
                )
                n_without_genes = 0
                for ids, lengths, empty in chunks:
                    writer.add(ids, lengths)
                    n_without_genes += empty.size
            if n_without_genes:
                warnings.warn(
                    f"{n_without_genes} of {counts.n_obs} cells of {label} express no vocabulary gene; they are "
                    "kept as the sequence [<cls>] (length 1 in the corpus)",
                    stacklevel=2,
                )
            obs_parts.append(obs)
            source_entries.append(
                {
                    "source": label,
                    **_soma_entry(source),
                    "n_cells": counts.n_obs,
                    "n_cells_without_genes": n_without_genes,
                    "gene_mapping": vocabulary_map.report.to_dict(),
                }
            )
        writer.flush()

        import anndata

        anndata.AnnData(obs=_storable_obs(obs_parts)).write_h5ad(tmp / _OBS_FILENAME)
        tokenizer.save(tmp)
        manifest = {
            "format": _FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "langcell_version": __version__,
            "n_cells": sum(s["n_cells"] for s in writer.shards),
            "n_tokens": sum(s["n_tokens"] for s in writer.shards),
            "max_length": max_length,
            "ids_dtype": writer.ids_dtype.name,
            "obs_file": _OBS_FILENAME,
            "shards": writer.shards,
            "sources": source_entries,
        }
        (tmp / MANIFEST_FILENAME).write_text(
            json.dumps(manifest, indent=1, default=_json_default), encoding="utf-8"
        )
    return TokenCorpus(out_dir)


def _soma_entry(source: Any) -> dict:
    """What the manifest records of a SOMA source beyond its URI (nothing for other sources)."""
    if not isinstance(source, SomaSource):
        return {}
    return {"obs_filter": source.obs_filter, "measurement": source.measurement, "x_layer": source.x_layer}


def _upper_bound_bytes(counts: CountSource, max_length: int, ids_dtype: np.dtype, lengths_dtype: np.dtype) -> int:
    """The most bytes one source's cells can take in the corpus: a cell has at most one token per stored
    value (plus <cls>), and never more than ``max_length``."""
    nnz = row_nnz(counts.matrix)
    n_columns = counts.gene_names.size
    tokens = (
        np.minimum(nnz + 1, max_length).sum()
        if nnz is not None
        else counts.n_obs * min(n_columns + 1, max_length)
    )
    per_cell = 8 + lengths_dtype.itemsize + 64  # offsets, lengths, and the cell's row of obs (generous)
    return int(tokens) * ids_dtype.itemsize + counts.n_obs * per_cell


def _check_disk_space(
    source_list: list, reading: dict, out_dir: Any, max_length: int, ids_dtype: np.dtype,
    lengths_dtype: np.dtype, keep_free: int,
) -> None:
    """Refuse, before writing anything, a corpus that may not fit on the output's disk."""
    needed = 1 << 20  # manifest, tokenizer, obs header
    for i, source in enumerate(source_list):
        with opened_counts(source, f"input #{i}", obs_columns=(), **reading) as counts:
            needed += _upper_bound_bytes(counts, max_length, ids_dtype, lengths_dtype)
    probe = Path(out_dir).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + keep_free > free:
        kept = f" and {keep_free / 1e9:.2f} GB must stay free" if keep_free else ""
        raise LangCellError(
            f"the corpus needs up to {needed / 1e9:.2f} GB ({needed} bytes) on the disk of {str(probe)!r}, which "
            f"has {free / 1e9:.2f} GB free{kept}; free some space, write the corpus to another disk, or pass "
            "fewer cells or a smaller max_length"
        )


def _json_default(value: Any) -> Any:
    # Mapping reports may carry numpy scalars or arrays.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in the manifest")


def _check_shard_entry(shard: Any, number: int, manifest_path: Path) -> None:
    """Refuse a manifest shard entry without the fields :func:`write_corpus` writes, or with wrong types."""
    problem = None
    if not isinstance(shard, dict):
        problem = "is not an object"
    elif not isinstance(shard.get("name"), str):
        problem = "has no name"
    elif any(isinstance(shard.get(k), bool) or not isinstance(shard.get(k), int) or shard[k] < 0
             for k in ("n_cells", "n_tokens")):
        problem = "has no whole n_cells / n_tokens"
    elif not isinstance(shard.get("files"), dict) or any(
        not isinstance(shard["files"].get(kind), dict)
        or not isinstance(shard["files"][kind].get("path"), str)
        or not isinstance(shard["files"][kind].get("bytes"), int)
        or not isinstance(shard["files"][kind].get("sha256"), str)
        for kind in _SHARD_ARRAYS
    ):
        problem = "lacks a file entry (path, bytes, sha256) of " + "/".join(_SHARD_ARRAYS)
    if problem:
        raise LangCellError(f"{str(manifest_path)!r}: shard entry {number} {problem}; write the corpus again")


class TokenCorpus:
    """A corpus written by :func:`write_corpus`, opened for random access.

    Parameters
    ----------
    directory
        The corpus directory. On opening, the manifest is validated, every shard file is checked to lie
        inside the directory and to have the size the manifest records, and each shard's offsets must
        agree with its lengths and its token count (cheap: one pass over the per-cell arrays).
    verify_on_read
        Check a shard's sha256 checksums the first time this object reads a cell of it (default), so
        that flipped bytes never train silently; it reads each shard file once more (about a second per
        100,000 cells of 2,048 tokens). :meth:`verify` checks every shard at once. Whatever this says,
        the first read of a shard also checks that its token ids lie inside the vocabulary of the
        corpus's tokenizer (one pass over the ids, a small part of the checksum's cost), so that an id
        the model has no embedding for is refused here, not met as an IndexError inside the model.

    Raises
    ------
    LangCellError
        For a missing or invalid manifest, or a missing, truncated, misplaced or inconsistent shard (named
        in the message); on reading, for a shard whose content no longer matches its checksum or that
        holds a token id outside the vocabulary.
    """

    def __init__(self, directory: str | os.PathLike, *, verify_on_read: bool = True) -> None:
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST_FILENAME
        if not manifest_path.is_file():
            raise LangCellError(
                f"{str(self.directory)!r} is not a token corpus (no {MANIFEST_FILENAME}); pass a directory "
                "written by write_corpus (langcell tokenize)"
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LangCellError(
                f"{str(manifest_path)!r} is not valid JSON ({err}); write the corpus again"
            ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT_NAME:
            raise LangCellError(
                f"{str(manifest_path)!r} is not a langcell corpus manifest; write the corpus again"
            )
        version = manifest.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise LangCellError(
                f"{str(manifest_path)!r} has format version {version!r}; this langcell reads versions up to "
                f"{FORMAT_VERSION}: upgrade langcell"
            )
        missing = [k for k in ("n_cells", "n_tokens", "shards", "obs_file") if k not in manifest]
        if missing:
            raise LangCellError(f"{str(manifest_path)!r} lacks the fields {missing}; write the corpus again")
        self.manifest: dict = manifest

        self._ids: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        lengths = []
        if not isinstance(manifest["shards"], list):
            raise LangCellError(f"{str(manifest_path)!r}: 'shards' is not a list; write the corpus again")
        for number, shard in enumerate(manifest["shards"]):
            _check_shard_entry(shard, number, manifest_path)
            arrays = {kind: self._open_shard_array(shard, kind) for kind in _SHARD_ARRAYS}
            if arrays["offsets"].size != shard["n_cells"] + 1 or arrays["ids"].size != shard["n_tokens"]:
                raise LangCellError(
                    f"shard {shard['name']!r} of {str(self.directory)!r} does not match the manifest "
                    f"({arrays['offsets'].size - 1} cells, {arrays['ids'].size} tokens); write the corpus again"
                )
            if not np.issubdtype(arrays["ids"].dtype, np.integer):
                raise LangCellError(
                    f"shard {shard['name']!r} of {str(self.directory)!r}: its token ids are stored as "
                    f"{arrays['ids'].dtype}, not integers (damaged or not written by langcell); write the corpus again"
                )
            offsets = np.asarray(arrays["offsets"], dtype=np.int64)
            shard_lengths = np.asarray(arrays["lengths"], dtype=np.int64)
            if offsets.size == 0 or offsets[0] != 0 or offsets[-1] != arrays["ids"].size or not np.array_equal(
                np.diff(offsets), shard_lengths
            ):
                raise LangCellError(
                    f"shard {shard['name']!r} of {str(self.directory)!r}: its offsets do not agree with its "
                    "lengths and token count (damaged); restore it or write the corpus again"
                )
            # A plain ndarray view of the memory map: the same pages, without np.memmap's cost per slice.
            self._ids.append(np.asarray(arrays["ids"]))
            self._offsets.append(offsets)
            lengths.append(shard_lengths)
        self._lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        if self._lengths.size != manifest["n_cells"]:
            raise LangCellError(
                f"{str(manifest_path)!r} says {manifest['n_cells']} cells but its shards hold "
                f"{self._lengths.size}; write the corpus again"
            )
        self._shard_starts = np.zeros(len(self._ids) + 1, dtype=np.int64)
        np.cumsum([s["n_cells"] for s in manifest["shards"]], out=self._shard_starts[1:])
        self._shard_start_list = self._shard_starts.tolist()  # for bisect: a cell's shard without numpy calls
        self.tokenizer: GeneTokenizer = GeneTokenizer.load(self.directory)
        self._obs: pd.DataFrame | None = None
        # Shards whose checksums this object has checked (all of them when verify_on_read is off).
        self._verified = set() if verify_on_read else set(range(len(self._ids)))
        # Shards checked on their first read: checksum (above) and token ids inside the vocabulary.
        self._checked: set[int] = set()

    def _shard_file(self, shard: dict, kind: str) -> tuple[Path, dict]:
        try:
            entry = shard["files"][kind]
            path = self.directory / entry["path"]
        except (KeyError, TypeError):
            raise LangCellError(
                f"the manifest of {str(self.directory)!r} lists no {kind} file for shard "
                f"{shard.get('name', '?')!r}; write the corpus again"
            ) from None
        if not path.resolve().is_relative_to(self.directory.resolve()):
            raise LangCellError(
                f"the manifest of {str(self.directory)!r} points shard {shard.get('name', '?')!r} at "
                f"{entry['path']!r}, outside the corpus directory; refusing to read it: write the corpus again"
            )
        return path, entry

    def _open_shard_array(self, shard: dict, kind: str) -> np.ndarray:
        path, entry = self._shard_file(shard, kind)
        name = shard["name"]
        if not path.is_file():
            raise LangCellError(
                f"shard {name!r} of {str(self.directory)!r} is missing its {kind} file {entry['path']!r}; "
                "restore it or write the corpus again"
            )
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise LangCellError(
                f"shard {name!r} of {str(self.directory)!r}: {entry['path']!r} has {size} bytes, the manifest "
                f"says {entry['bytes']} (truncated or replaced); restore it or write the corpus again"
            )
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise LangCellError(
                f"shard {name!r} of {str(self.directory)!r}: cannot read {entry['path']!r} ({err}); "
                "write the corpus again"
            ) from None

    def verify(self, *, again: bool = True) -> None:
        """Recompute the sha256 of every shard file and compare with the manifest.

        Parameters
        ----------
        again
            Also check the shards this object has checked already. ``False`` checks only the others: what
            a process does once before it forks data-loader workers, so that they inherit the checked
            state instead of each hashing the corpus again.

        Raises
        ------
        LangCellError
            Naming the first shard file whose content changed, or that holds a token id outside the
            vocabulary.
        """
        for number in range(len(self.manifest["shards"])):
            if again or number not in self._verified:
                self._verify_shard(number)
            if again or number not in self._checked:
                self._check_token_range(number)
                self._checked.add(number)

    def _verify_shard(self, number: int) -> None:
        shard = self.manifest["shards"][number]
        for kind in _SHARD_ARRAYS:
            path, entry = self._shard_file(shard, kind)
            if _sha256(path) != entry["sha256"]:
                raise LangCellError(
                    f"shard {shard['name']!r} of {str(self.directory)!r}: {entry['path']!r} does not match "
                    "its checksum (corrupted); restore it or write the corpus again"
                )
        self._verified.add(number)

    def _check_token_range(self, number: int) -> None:
        """Refuse a shard holding a token id the tokenizer (and so the model's embedding) does not have.

        A shard whose checksum was recomputed after its ids were changed passes :meth:`_verify_shard`;
        this one pass over its ids keeps such an id from reaching the embedding lookup.
        """
        ids = self._ids[number]
        if ids.size == 0:
            return
        high = int(ids.max())
        low = int(ids.min()) if np.issubdtype(ids.dtype, np.signedinteger) else 0  # unsigned: no second pass
        vocab_size = self.tokenizer.vocab_size
        if low < 0 or high >= vocab_size:
            bad = high if high >= vocab_size else low
            raise LangCellError(
                f"shard {self.manifest['shards'][number]['name']!r} of {str(self.directory)!r} holds token id {bad}, "
                f"outside the vocabulary of its gene tokenizer (ids 0..{vocab_size - 1}): the shard is damaged "
                "or was written with another tokenizer; write the corpus again"
            )

    def _first_read(self, shard: int) -> None:
        """The checks a shard gets the first time this object reads it: checksum, token id range."""
        if shard not in self._verified:
            self._verify_shard(shard)
        self._check_token_range(shard)
        self._checked.add(shard)

    def __len__(self) -> int:
        return int(self._lengths.size)

    def __getitem__(self, index: int) -> np.ndarray:
        """Token ids of cell ``index`` (a read-only view into the memory-mapped shard)."""
        n = len(self)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"cell index {index} out of range for a corpus of {n} cells")
        index %= n
        shard = bisect.bisect_right(self._shard_start_list, index) - 1
        if shard not in self._checked:
            self._first_read(shard)
        local = index - self._shard_start_list[shard]
        offsets = self._offsets[shard]
        return self._ids[shard][offsets[local] : offsets[local + 1]]

    @property
    def lengths(self) -> np.ndarray:
        """Sequence length of every cell (``<cls>`` included), ``int64``."""
        return self._lengths

    @property
    def reports(self) -> list:
        """How each source's genes were matched to the vocabulary (:class:`~langcell.data.genes.GeneMappingReport`)."""
        known = {f.name for f in dataclasses.fields(GeneMappingReport)}
        return [
            GeneMappingReport(**{k: v for k, v in entry["gene_mapping"].items() if k in known})
            for entry in self.manifest.get("sources", [])
        ]

    @property
    def n_tokens(self) -> int:
        """Total number of tokens stored."""
        return int(self.manifest["n_tokens"])

    @property
    def obs(self) -> pd.DataFrame:
        """Cell metadata: the chosen obs columns plus ``source_file`` and ``obs_name`` (read on first use)."""
        if self._obs is None:
            import anndata

            path = self.directory / self.manifest["obs_file"]
            if not path.is_file():
                raise LangCellError(
                    f"{str(self.directory)!r} is missing its metadata file {path.name!r}; write the corpus again"
                )
            try:
                self._obs = anndata.read_h5ad(path).obs
            except (OSError, ValueError, KeyError) as err:
                raise LangCellError(
                    f"{str(self.directory)!r}: its metadata file {path.name!r} is unreadable ({type(err).__name__}); "
                    "write the corpus again"
                ) from None
        return self._obs

    def read_obs(self, columns: Sequence[str]) -> pd.DataFrame:
        """Only some columns of the cell metadata, read from disk without the rest.

        :attr:`obs` holds every column, among them one name per cell (``obs_name``): millions of Python
        strings in a large corpus. What needs a few columns (the ontology term ids of the pretraining
        texts) reads just those: category codes, a byte or two a cell.

        Parameters
        ----------
        columns
            Column names; those the corpus does not have are left out of the result.

        Returns
        -------
        pandas.DataFrame
            One row per cell in corpus order (a ``RangeIndex``), the columns found, in the order given.
        """
        if self._obs is not None:
            return self._obs[[c for c in columns if c in self._obs.columns]].reset_index(drop=True)
        import h5py
        from anndata.io import read_elem

        path = self.directory / self.manifest["obs_file"]
        if not path.is_file():
            raise LangCellError(
                f"{str(self.directory)!r} is missing its metadata file {path.name!r}; write the corpus again"
            )
        try:
            with h5py.File(path, "r") as handle:
                group = handle["obs"]
                stored = set(group.attrs["column-order"])
                data = {c: read_elem(group[c]) for c in columns if c in stored}
        except (OSError, ValueError, KeyError) as err:
            raise LangCellError(
                f"{str(self.directory)!r}: its metadata file {path.name!r} is unreadable ({type(err).__name__}); "
                "write the corpus again"
            ) from None
        return pd.DataFrame(data, index=pd.RangeIndex(len(self)))

    def batch(
        self, indices: Sequence[int] | np.ndarray, *, pad_to: int | None = None
    ) -> dict[str, np.ndarray]:
        """Padded model inputs for the given cells.

        Parameters
        ----------
        indices
            Cell indices.
        pad_to
            Give every row exactly this width: longer sequences are cut to their first ``pad_to``
            tokens (``<cls>`` and the top genes), shorter ones padded. ``None`` pads to the longest.

        Returns
        -------
        dict
            ``"input_ids"`` and ``"attention_mask"``, both ``int64 [len(indices), width]``.
        """
        if pad_to is not None and pad_to < 1:
            raise LangCellError(f"pad_to must be a positive width, got {pad_to}")
        sequences = [self[i] for i in np.asarray(indices, dtype=np.int64).ravel()]
        input_ids, attention_mask = pad_sequences(sequences, self.tokenizer.pad_id, max_length=pad_to)
        if pad_to is not None and input_ids.shape[1] < pad_to:
            extra = pad_to - input_ids.shape[1]
            input_ids = np.pad(input_ids, ((0, 0), (0, extra)), constant_values=self.tokenizer.pad_id)
            attention_mask = np.pad(attention_mask, ((0, 0), (0, extra)), constant_values=0)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __repr__(self) -> str:
        return (
            f"TokenCorpus({str(self.directory)!r}, n_cells={len(self)}, n_tokens={self.n_tokens}, "
            f"shards={len(self._ids)})"
        )

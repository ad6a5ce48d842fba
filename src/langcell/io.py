"""Saving and loading LangCell models, and importing the released LangCell checkpoint.

Our format (a directory, written atomically)::

    config.json            {"format": "langcell.LangCell", "format_version": 1, "config": LangCellConfig}
    model.safetensors      every parameter once (the masked-gene decoder *is* the gene word embedding,
                           so there is no tied copy to store)
    gene_tokenizer.json    the GeneTokenizer, when the model has one
    text_tokenizer/        the Hugging Face text tokenizer files

Loading is strict: a missing or unexpected tensor, a shape that differs from the config, a gene
tokenizer whose vocabulary does not match the embedding, or a truncated file is an error that says what
is wrong.

The released checkpoint (Zhao et al. 2024) is five modules (``cell_bert/``, ``text_bert/``,
``cell_proj.bin``, ``text_proj.bin``, ``ctm_head.bin``); :func:`import_official` maps them by an explicit
name table into our format.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._atomic import atomic_directory
from .config import CellEncoderConfig, LangCellConfig, TextEncoderConfig
from .errors import LangCellError

if TYPE_CHECKING:
    from .models.langcell import LangCell

FORMAT_NAME = "langcell.LangCell"
FORMAT_VERSION = 1
CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.safetensors"
TEXT_TOKENIZER_DIRNAME = "text_tokenizer"
GENE_TOKENIZER_FILENAME = "gene_tokenizer.json"

_REDOWNLOAD = "re-save or re-download it"


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
                f"({_first_line(error)}); {_REDOWNLOAD}"
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
            f"({type(error).__name__}: {_first_line(error)}); {_REDOWNLOAD}"
        ) from error
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise LangCellError(f"{str(path)!r} does not hold a state dict of tensors; {_REDOWNLOAD}")
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
def save_pretrained(model: LangCell, path: str | os.PathLike, *, overwrite: bool = False) -> None:
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
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILENAME).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS_FILENAME), metadata={"format": "pt"})
        if model.gene_tokenizer is not None:
            model.gene_tokenizer.save(tmp)
        model.text_tokenizer.save_pretrained(str(tmp / TEXT_TOKENIZER_DIRNAME))


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
        redo=_REDOWNLOAD,
    )
    return LangCellConfig.from_dict(document.get("config"))


def load_pretrained(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> LangCell:
    """Load a model written by :func:`save_pretrained`; strict about every tensor.

    Raises
    ------
    LangCellError
        Listing missing/unexpected tensors, shape mismatches (file vs config), a gene tokenizer whose
        vocabulary does not match, or a truncated/corrupt weights file.
    """
    from .models.langcell import LangCell
    from .models.text_encoder import load_text_tokenizer

    path = Path(path)
    if not path.is_dir():
        raise LangCellError(f"{str(path)!r} is not a directory; pass the directory the model was saved to")
    config = read_config(path)
    gene_tokenizer = None
    if (path / GENE_TOKENIZER_FILENAME).is_file():
        from .data.tokenizer import GeneTokenizer

        gene_tokenizer = GeneTokenizer.load(path)
        if gene_tokenizer.vocab_size != config.cell.vocab_size:
            raise LangCellError(
                f"the gene tokenizer in {str(path)!r} has {gene_tokenizer.vocab_size} tokens but the model's "
                f"gene vocabulary (cell.vocab_size) is {config.cell.vocab_size}; the directory mixes files "
                f"of different models: {_REDOWNLOAD}"
            )
    if not (path / TEXT_TOKENIZER_DIRNAME).is_dir():
        raise LangCellError(f"no {TEXT_TOKENIZER_DIRNAME}/ in {str(path)!r}; {_REDOWNLOAD}")
    text_tokenizer = load_text_tokenizer(path / TEXT_TOKENIZER_DIRNAME)
    model = LangCell(config, text_tokenizer=text_tokenizer, gene_tokenizer=gene_tokenizer)
    weights_file = path / WEIGHTS_FILENAME
    if not weights_file.is_file():
        raise LangCellError(f"no {WEIGHTS_FILENAME} in {str(path)!r}; {_REDOWNLOAD}")
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
        problems.append(f"missing tensors {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_short_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_short_list(mismatched)}")
    if problems:
        raise LangCellError(
            f"the weights in {source!r} do not match the model's config ({'; '.join(problems)}); the files "
            f"belong to different models or were edited: {_REDOWNLOAD}"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)


def _short_list(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > limit else ''}]"


# ---------------------------------------------------------------------------------------------
# Import of the released checkpoint
# ---------------------------------------------------------------------------------------------
# Parameter name table: released name -> our name. "{n}" stands for a layer index. Both towers use
# HF BERT names, so the mapping is mostly a prefix; it is written out so that every tensor the
# importer touches is visible here and nothing is matched by accident.
_EMBEDDING_PARTS = [
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",  # cell_bert only: the med text BERT has none
    "embeddings.LayerNorm.weight",
    "embeddings.LayerNorm.bias",
]
_LAYER_PARTS = [
    f"encoder.layer.{{n}}.{module}.{kind}"
    for module in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    )
    for kind in ("weight", "bias")
]
_CROSS_ATTENTION_PARTS = [
    f"encoder.layer.{{n}}.{module}.{kind}"
    for module in (
        "crossattention.self.query",
        "crossattention.self.key",  # Linear(encoder_width = cell hidden -> text hidden)
        "crossattention.self.value",
        "crossattention.output.dense",
        "crossattention.output.LayerNorm",
    )
    for kind in ("weight", "bias")
]
CELL_BERT_TABLE: list[tuple[str, str]] = (
    [(name, f"cell_encoder.{name}") for name in _EMBEDDING_PARTS + _LAYER_PARTS]
    # Present only when cell_bert was saved from a masked-LM model: the MGM head (decoder tied).
    + [
        ("cls.predictions.transform.dense.weight", "mgm_head.transform.dense.weight"),
        ("cls.predictions.transform.dense.bias", "mgm_head.transform.dense.bias"),
        ("cls.predictions.transform.LayerNorm.weight", "mgm_head.transform.LayerNorm.weight"),
        ("cls.predictions.transform.LayerNorm.bias", "mgm_head.transform.LayerNorm.bias"),
        ("cls.predictions.bias", "mgm_head.bias"),
    ]
)
TEXT_BERT_TABLE: list[tuple[str, str]] = [
    (name, f"text_encoder.{name}") for name in _EMBEDDING_PARTS + _LAYER_PARTS + _CROSS_ATTENTION_PARTS
]
HEAD_TABLE: dict[str, str] = {  # file stem -> our module; each file is an nn.Linear state dict
    "cell_proj": "cell_proj",
    "text_proj": "text_proj",
    "ctm_head": "ctm_head",
}
# Released tensors deliberately not imported, with the reason.
IGNORED_SOURCE_TENSORS: dict[str, str] = {
    "pooler.dense.weight": "BERT pooler: the release replaces it by cell_proj/text_proj on the first token",
    "pooler.dense.bias": "BERT pooler (see pooler.dense.weight)",
    "embeddings.position_ids": "a buffer holding 0..max_positions-1, recomputed on the fly",
    "cls.predictions.decoder.weight": "tied to the gene word embeddings (imported once, as those)",
    "cls.predictions.decoder.bias": "the same tensor as cls.predictions.bias",
    "cls.seq_relationship.weight": "next-sentence head, unused by LangCell",
    "cls.seq_relationship.bias": "next-sentence head, unused by LangCell",
}
# Our tensors the release does not contain; they keep their initialisation.
NOT_IN_RELEASE = {
    "logit_scale": "set to log(1 / 0.05), the temperature of the released zero-shot notebook",
    "mgm_head.*": "freshly initialised unless cell_bert holds a masked-LM head (cls.predictions.*)",
}
RELEASE_ZERO_SHOT_TEMPERATURE = 0.05


def _expand(table: list[tuple[str, str]], num_layers: int) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for source, target in table:
        if "{n}" in source:
            for n in range(num_layers):
                mapping[source.format(n=n)] = target.format(n=n)
        else:
            mapping[source] = target
    return mapping


def _normalise_source_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``bert.`` prefix and rename TF-era ``LayerNorm.gamma/beta`` to ``weight/bias``."""
    out = {}
    for name, tensor in tensors.items():
        name = name.removeprefix("bert.")
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
        name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        out[name] = tensor
    return out


def _layer_indices(tensors: dict[str, torch.Tensor], module: str = "") -> list[int]:
    pattern = re.compile(r"^encoder\.layer\.(\d+)\." + re.escape(module))
    return sorted({int(m.group(1)) for name in tensors if (m := pattern.match(name))})


def _map_tower(tensors: dict[str, torch.Tensor], table: list[tuple[str, str]], num_layers: int, tower: str):
    """Rename ``tensors`` by ``table``; every source tensor must be mapped or deliberately ignored."""
    mapping = _expand(table, num_layers)
    mapped = {mapping[name]: tensor for name, tensor in tensors.items() if name in mapping}
    unknown = sorted(name for name in tensors if name not in mapping and name not in IGNORED_SOURCE_TENSORS)
    if unknown:
        raise LangCellError(
            f"the released {tower} holds tensors this importer does not know: {_short_list(unknown)}; "
            "it is not the LangCell release layout (cell_bert = HF BertModel, text_bert = BLIP med BertModel)"
        )
    return mapped


def _read_hf_config(directory: Path) -> dict[str, Any]:
    file = directory / "config.json"
    if not file.is_file():
        raise LangCellError(f"no config.json in {str(directory)!r}; {_REDOWNLOAD} (the release ships one)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LangCellError(f"{str(file)!r} is not valid JSON ({error}); {_REDOWNLOAD}") from None
    # The head count cannot be read from the weights, so it must come from here.
    if not isinstance(config, dict) or not isinstance(config.get("num_attention_heads"), int):
        raise LangCellError(f"{str(file)!r} does not give num_attention_heads; {_REDOWNLOAD}")
    return config


def _require(tensors: dict[str, torch.Tensor], name: str, tower: str) -> torch.Tensor:
    if name not in tensors:
        raise LangCellError(f"the released {tower} lacks {name!r}; {_REDOWNLOAD}")
    return tensors[name]


def _bert_sizes_from_weights(tensors: dict[str, torch.Tensor], tower: str) -> dict[str, int]:
    """Sizes of a BERT read from its tensors (the weights win over config.json)."""
    words = _require(tensors, "embeddings.word_embeddings.weight", tower)
    positions = _require(tensors, "embeddings.position_embeddings.weight", tower)
    layers = _layer_indices(tensors)
    if not layers or layers != list(range(len(layers))):
        raise LangCellError(f"the released {tower} has layers {layers}; expected 0..N-1. {_REDOWNLOAD}")
    token_types = tensors.get("embeddings.token_type_embeddings.weight")
    return {
        "vocab_size": int(words.shape[0]),
        "hidden_size": int(words.shape[1]),
        "max_position_embeddings": int(positions.shape[0]),
        "type_vocab_size": 0 if token_types is None else int(token_types.shape[0]),
        "num_hidden_layers": len(layers),
        "intermediate_size": int(_require(tensors, "encoder.layer.0.intermediate.dense.weight", tower).shape[0]),
    }


def _read_linear(ckpt: Path, stem: str) -> dict[str, torch.Tensor]:
    for suffix in (".bin", ".safetensors", ".pt", ".pth"):
        if (ckpt / f"{stem}{suffix}").is_file():
            tensors = read_weights(ckpt / f"{stem}{suffix}")
            break
    else:
        raise LangCellError(f"no {stem}.bin (or .safetensors) in {str(ckpt)!r}; pass the released ckpt directory")
    if set(tensors) != {"weight", "bias"}:
        raise LangCellError(
            f"{stem} in {str(ckpt)!r} should be an nn.Linear state dict (weight, bias), found {sorted(tensors)}; "
            f"{_REDOWNLOAD}"
        )
    return tensors


def import_official(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    text_tokenizer_dir: str | os.PathLike,
    token_dictionary: str | os.PathLike,
    gene_median_dictionary: str | os.PathLike,
    overwrite: bool = False,
) -> LangCell:
    """Convert the released five-module LangCell checkpoint into a langcell model directory.

    Parameters
    ----------
    ckpt_dir
        The released ``ckpt/`` directory: ``cell_bert/`` (HF BertModel), ``text_bert/`` (BLIP med
        BertModel with cross-attention), ``cell_proj.bin``, ``text_proj.bin``, ``ctm_head.bin``.
        Weights may be ``.safetensors`` or ``.bin`` (read with ``torch.load(weights_only=True)``).
    out_dir
        Where to write the converted model (:func:`save_pretrained` format).
    text_tokenizer_dir
        Local directory of the release's text tokenizer (PubMedBERT uncased ``vocab.txt``). When the
        text embedding has two more rows than the vocabulary, ``[DEC]`` and ``[ENC]`` are added as the
        release does, so token ids match.
    token_dictionary, gene_median_dictionary
        Geneformer's ``token_dictionary.pkl`` and ``gene_median_dictionary.pkl`` (the release's gene
        vocabulary), read by :meth:`GeneTokenizer.from_geneformer`.
    overwrite
        Replace an existing ``out_dir``.

    Returns
    -------
    LangCell
        The imported model (in eval mode), also saved to ``out_dir``.

    Notes
    -----
    The import reproduces the release's inference:

    * cell embedding = L2-normalised ``cell_proj`` of the ``<cls>`` state of ``cell_bert`` (an HF
      ``BertModel``, so token-type row 0 is added to every token);
    * text embedding = L2-normalised ``text_proj`` of the ``[CLS]`` state of ``text_bert`` in text mode;
    * match = ``ctm_head`` of the *first token* of ``text_bert`` in multimodal mode. The released
      zero-shot and few-shot code feed the tokenizer output unchanged, so that token is ``[CLS]``, not
      BLIP's ``[ENC]``: ``multimodal_first_token_id`` is left unset.

    Every released tensor is mapped by :data:`CELL_BERT_TABLE`, :data:`TEXT_BERT_TABLE` and
    :data:`HEAD_TABLE`, or listed in :data:`IGNORED_SOURCE_TENSORS`; anything else is an error.
    Sizes are read from the weights (the text embedding may have more rows than the vocabulary file);
    head counts and activations from the towers' ``config.json``.
    """
    from .data.tokenizer import GeneTokenizer
    from .models.langcell import LangCell
    from .models.text_encoder import load_text_tokenizer

    ckpt = Path(ckpt_dir)
    for sub in ("cell_bert", "text_bert"):
        if not (ckpt / sub).is_dir():
            raise LangCellError(
                f"{str(ckpt)!r} has no {sub}/ directory; pass the released ckpt directory (cell_bert/, "
                "text_bert/, cell_proj.bin, text_proj.bin, ctm_head.bin)"
            )

    # --- cell tower
    cell_tensors = _normalise_source_names(read_weights(ckpt / "cell_bert"))
    cell_sizes = _bert_sizes_from_weights(cell_tensors, "cell_bert")
    cell_config = CellEncoderConfig.from_hf_config({**_read_hf_config(ckpt / "cell_bert"), **cell_sizes})
    cell_mapped = _map_tower(cell_tensors, CELL_BERT_TABLE, cell_sizes["num_hidden_layers"], "cell_bert")

    # --- text tower
    text_tensors = _normalise_source_names(read_weights(ckpt / "text_bert"))
    text_sizes = _bert_sizes_from_weights(text_tensors, "text_bert")
    cross_layers = _layer_indices(text_tensors, "crossattention.")
    num_text_layers = text_sizes["num_hidden_layers"]
    if not cross_layers:
        raise LangCellError(
            f"text_bert in {str(ckpt)!r} has no cross-attention layers; the release's text tower is a BLIP med "
            f"BERT with crossattention in every layer. {_REDOWNLOAD}"
        )
    if cross_layers != list(range(num_text_layers - len(cross_layers), num_text_layers)):
        raise LangCellError(
            f"text_bert has cross-attention in layers {cross_layers}; only the last N layers (or all) are supported"
        )
    encoder_width = int(_require(text_tensors, f"encoder.layer.{cross_layers[0]}.crossattention.self.key.weight",
                                 "text_bert").shape[1])
    text_config = TextEncoderConfig.from_hf_config({**_read_hf_config(ckpt / "text_bert"), **text_sizes})
    text_config.encoder_width = encoder_width
    text_config.cross_attention_layers = None if len(cross_layers) == num_text_layers else len(cross_layers)
    text_mapped = _map_tower(text_tensors, TEXT_BERT_TABLE, num_text_layers, "text_bert")

    # --- heads
    heads = {stem: _read_linear(ckpt, stem) for stem in HEAD_TABLE}
    projection_dim = int(heads["cell_proj"]["weight"].shape[0])
    expected_shapes = {
        "cell_proj": (projection_dim, cell_config.hidden_size),
        "text_proj": (projection_dim, text_config.hidden_size),
        "ctm_head": (2, text_config.hidden_size),
    }
    for stem, shape in expected_shapes.items():
        if tuple(heads[stem]["weight"].shape) != shape:
            raise LangCellError(
                f"{stem} weight has shape {tuple(heads[stem]['weight'].shape)}, expected {shape} from the towers' "
                f"sizes; the files come from different checkpoints: {_REDOWNLOAD}"
            )
    head_mapped = {f"{HEAD_TABLE[stem]}.{kind}": t for stem, tensors in heads.items() for kind, t in tensors.items()}

    config = LangCellConfig(
        cell=cell_config,
        text=text_config,
        projection_dim=projection_dim,
        init_temperature=RELEASE_ZERO_SHOT_TEMPERATURE,
    )
    try:
        config.validate()
    except LangCellError as error:
        raise LangCellError(f"the released checkpoint's sizes are inconsistent: {error}") from None

    # --- tokenizers
    gene_tokenizer = GeneTokenizer.from_geneformer(token_dictionary, gene_median_dictionary)
    if gene_tokenizer.vocab_size != cell_config.vocab_size:
        raise LangCellError(
            f"the Geneformer dictionaries give {gene_tokenizer.vocab_size} gene tokens (with <cls>) but cell_bert's "
            f"embedding has {cell_config.vocab_size} rows; pass the token_dictionary.pkl / "
            "gene_median_dictionary.pkl the release was trained with"
        )
    text_tokenizer = load_text_tokenizer(text_tokenizer_dir)
    if len(text_tokenizer) + 2 <= text_config.vocab_size:
        # The release's tokenizer: PubMedBERT + bos [DEC] + additional special [ENC] (BLIP convention).
        text_tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        text_tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(text_tokenizer) > text_config.vocab_size:
        raise LangCellError(
            f"the text tokenizer in {str(text_tokenizer_dir)!r} has {len(text_tokenizer)} tokens but text_bert's "
            f"embedding has {text_config.vocab_size} rows; pass the release's tokenizer (PubMedBERT uncased)"
        )

    # --- assemble: every tensor of ours comes from the release except those in NOT_IN_RELEASE
    model = LangCell(config, text_tokenizer=text_tokenizer, gene_tokenizer=gene_tokenizer)
    state = model.state_dict()
    imported = {**cell_mapped, **text_mapped, **head_mapped}
    mismatched = [
        f"{name}: release {tuple(t.shape)} vs model {tuple(state[name].shape)}"
        for name, t in imported.items()
        if tuple(t.shape) != tuple(state[name].shape)
    ]
    if mismatched:
        raise LangCellError(
            f"released tensors do not fit the sizes read from the checkpoint: {_short_list(mismatched)}; "
            f"{_REDOWNLOAD}"
        )
    not_imported = sorted(set(state) - set(imported))
    unexplained = [name for name in not_imported if name != "logit_scale" and not name.startswith("mgm_head.")]
    if unexplained:
        raise LangCellError(f"the released checkpoint lacks the tensors {_short_list(unexplained)}; {_REDOWNLOAD}")
    with torch.no_grad():
        for name, tensor in imported.items():
            state[name].copy_(tensor.to(state[name].dtype))
        model.logit_scale.fill_(math.log(1.0 / RELEASE_ZERO_SHOT_TEMPERATURE))
    model.eval()
    save_pretrained(model, out_dir, overwrite=overwrite)
    return model

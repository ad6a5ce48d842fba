"""The text encoder: unimodal = HF BertModel; multimodal many-texts-per-cell = one pair at a time."""

import pytest
import torch
from transformers import BertConfig, BertModel

from langcell.errors import LangCellError
from langcell.models.config import TextEncoderConfig
from langcell.models.text_encoder import TextEncoder


def _config(**overrides):
    sizes = dict(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=30,
        encoder_width=24,
    )
    sizes.update(overrides)
    return TextEncoderConfig(**sizes)


def _texts(lengths, vocab_size=50, seed=3):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, vocab_size, (length,), generator=generator)
        mask[row, :length] = 1
    return ids, mask


def _cells(batch=3, length=11, width=24, seed=4):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, width, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return states, mask


def _randomised(model):
    torch.manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def test_text_mode_equals_hf_bert():
    config = _config()
    hf = BertModel(
        BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=30, attn_implementation="eager",
        ),
        add_pooling_layer=False,
    )
    hf = _randomised(hf)
    ours = TextEncoder(config).eval()
    missing = ours.load_state_dict(hf.state_dict(), strict=False)
    assert missing.unexpected_keys == []
    assert all(".crossattention." in k for k in missing.missing_keys) and missing.missing_keys
    ids, mask = _texts([9, 4, 7])
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask, mode="text")
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cross_attention_layers", [None, 1])
def test_all_pairs_equal_one_pair_at_a_time(cross_attention_layers):
    model = _randomised(TextEncoder(_config(cross_attention_layers=cross_attention_layers)))
    ids, mask = _texts([9, 4, 7, 2])
    cells, cell_mask = _cells()
    with torch.no_grad():
        all_pairs = model(ids, mask, mode="multimodal", cell_states=cells, cell_mask=cell_mask)
        assert all_pairs.shape == (3, 4, 9, 32)
        for b in range(3):
            for m in range(4):
                length = int(mask[m].sum())
                alone = model(
                    ids[m : m + 1, :length],
                    None,
                    mode="multimodal",
                    cell_states=cells[b : b + 1, : int(cell_mask[b].sum())],
                    cell_mask=None,
                )
                assert torch.allclose(all_pairs[b, m, :length], alone[0], atol=1e-5), (b, m)


def test_indexed_pairs_equal_all_pairs():
    model = _randomised(TextEncoder(_config()))
    ids, mask = _texts([9, 4, 7, 2, 5])
    cells, cell_mask = _cells()
    cell_index = torch.tensor([2, 0, 2, 2, 0])  # cell 1 unused; cell 2 three times
    with torch.no_grad():
        all_pairs = model(ids, mask, mode="multimodal", cell_states=cells, cell_mask=cell_mask)
        pairs = model(ids, mask, mode="multimodal", cell_states=cells, cell_mask=cell_mask, cell_index=cell_index)
    assert pairs.shape == (5, 9, 32)
    for m, b in enumerate(cell_index.tolist()):
        length = int(mask[m].sum())
        assert torch.allclose(pairs[m, :length], all_pairs[b, m, :length], atol=1e-5)


def test_cross_attention_only_in_the_last_layers():
    model = TextEncoder(_config(cross_attention_layers=2))
    assert [layer.crossattention is not None for layer in model.encoder.layer] == [False, True, True]
    names = model.state_dict().keys()
    assert "encoder.layer.2.crossattention.self.key.weight" in names
    assert model.state_dict()["encoder.layer.2.crossattention.self.key.weight"].shape == (32, 24)
    assert "encoder.layer.0.crossattention.self.key.weight" not in names


def test_cross_attention_changes_the_output_and_text_mode_ignores_cells():
    model = _randomised(TextEncoder(_config()))
    ids, mask = _texts([6, 3])
    cells, cell_mask = _cells()
    with torch.no_grad():
        text = model(ids, mask, mode="text")
        multi = model(ids, mask, mode="multimodal", cell_states=cells, cell_mask=cell_mask)
    assert not torch.allclose(text, multi[0], atol=1e-3)
    assert not torch.allclose(multi[0], multi[1], atol=1e-3)


def test_first_token_replacement_in_multimodal_mode():
    model = _randomised(TextEncoder(_config(multimodal_first_token_id=7)))
    ids, mask = _texts([6, 3])
    cells, cell_mask = _cells()
    replaced = ids.clone()
    replaced[:, 0] = 7
    reference = _randomised(TextEncoder(_config()))
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        got = model(ids, mask, mode="multimodal", cell_states=cells, cell_mask=cell_mask)
        expected = reference(replaced, mask, mode="multimodal", cell_states=cells, cell_mask=cell_mask)
    assert torch.allclose(got, expected, atol=1e-6)


def test_bad_arguments_are_clear_errors():
    model = TextEncoder(_config())
    ids, mask = _texts([4])
    with pytest.raises(LangCellError, match="mode"):
        model(ids, mask, mode="fusion")
    with pytest.raises(LangCellError, match="cell_states"):
        model(ids, mask, mode="multimodal")
    cells, cell_mask = _cells()
    with pytest.raises(LangCellError, match="cell_index"):
        model(ids, mask, mode="multimodal", cell_states=cells, cell_mask=cell_mask, cell_index=torch.tensor([5]))

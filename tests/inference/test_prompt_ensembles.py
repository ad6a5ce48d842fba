"""Prompt ensembles: several texts per class, the class embedding their normalised mean (CLIP)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from langcell import ontology
from langcell.errors import LangCellError
from langcell.inference.zero_shot import encode_class_texts
from langcell.models import LangCell
from langcell.ontology.classes import class_prompts, class_texts

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = {
    "B": ["cell type: B cell. A lymphocyte of B lineage.", "cell type: B lymphocyte.", "a B cell"],
    "T": ["cell type: T cell."],
    "Mono": ["cell type: monocyte.", "cell type: monocyte. A myeloid cell in the blood, the precursor of macrophages."],
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LangCell.from_config("tiny").eval()


def test_one_text_per_class_gives_exactly_todays_classes(model):
    plain = encode_class_texts(model, {name: texts[0] for name, texts in PROMPTS.items()})
    listed = encode_class_texts(model, {name: texts[:1] for name, texts in PROMPTS.items()})
    assert torch.equal(plain.embeddings, listed.embeddings)
    assert torch.equal(plain.input_ids, listed.input_ids) and plain.texts == listed.texts
    assert listed.prompts is None


def test_several_texts_give_the_normalised_mean_of_the_normalised_embeddings(model):
    classes = encode_class_texts(model, PROMPTS)
    assert classes.names == list(PROMPTS) and classes.prompts == list(PROMPTS.values())
    # The cell-text matching head scores the primary texts only.
    assert classes.texts == [texts[0] for texts in PROMPTS.values()]
    primary_tokens = model.tokenize_texts(classes.texts)
    assert torch.equal(classes.input_ids, primary_tokens["input_ids"])
    with torch.no_grad():
        for k, texts in enumerate(PROMPTS.values()):
            each = torch.stack([F.normalize(model.encode_texts([text])[0], dim=-1) for text in texts])
            expected = F.normalize(each.mean(dim=0), dim=-1)
            np.testing.assert_allclose(classes.embeddings[k].numpy(), expected.numpy(), atol=1e-6)
            if len(texts) > 1:  # the ensemble differs from the primary text alone
                assert not torch.allclose(classes.embeddings[k], each[0], atol=1e-4)


def test_class_prompts_from_the_ontology_and_the_users_texts():
    names = ["B cell", "my cells"]
    texts, table = class_texts(names, descriptions={"my cells": "cells of mine."})
    prompts = class_prompts(names, texts, table, ontology=True, extra={"my cells": ["more of mine.", "cells of mine."]})
    assert prompts[0] == ontology.term_prompts("CL:0000236")
    assert prompts[0][0] == texts[0] == ontology.term_text("CL:0000236")
    assert len(prompts[0]) > 3 and "cell type: B cell." in prompts[0] and "cell type: B lymphocyte." in prompts[0]
    assert prompts[1] == ["cells of mine.", "more of mine."]  # repeats dropped
    assert class_prompts(names, texts, table) == [[t] for t in texts]
    with pytest.raises(LangCellError, match="not among the classes"):
        class_prompts(names, texts, table, extra={"NK cell": ["x"]})
    with pytest.raises(LangCellError, match="non-empty strings"):
        class_prompts(names, texts, table, extra={"B cell": [" "]})

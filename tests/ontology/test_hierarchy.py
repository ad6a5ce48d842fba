"""Cell Ontology ancestry on real CL terms: lowest common ancestors and exact / ancestor / wrong."""

import pytest

from langcell.errors import LangCellError
from langcell.ontology import ancestors, lowest_common_ancestor, term_label, term_relation

CD4 = "CL:0000624"  # CD4-positive, alpha-beta T cell
CD8 = "CL:0000625"  # CD8-positive, alpha-beta T cell
T_CELL = "CL:0000084"
B_CELL = "CL:0000236"
NK = "CL:0000623"
MONOCYTE = "CL:0000576"


def test_ancestors_include_the_term_and_its_is_a_chain():
    chain = ancestors(CD4)
    assert chain[CD4] == 0
    assert chain["CL:0000791"] == 1  # mature alpha-beta T cell
    assert chain[T_CELL] > 1 and "CL:0000542" in chain and "CL:0000000" in chain  # lymphocyte, cell


@pytest.mark.parametrize(
    "first, second, expected",
    [
        (CD4, CD8, "mature alpha-beta T cell"),
        (CD8, CD4, "mature alpha-beta T cell"),
        (B_CELL, NK, "lymphocyte"),
        (B_CELL, MONOCYTE, "mononuclear leukocyte"),
        (T_CELL, CD4, "T cell"),  # one is an ancestor of the other: it is the answer
        (CD4, CD4, "CD4-positive, alpha-beta T cell"),
    ],
)
def test_lowest_common_ancestor(first, second, expected):
    assert term_label(lowest_common_ancestor(first, second)) == expected


def test_the_lowest_common_ancestor_is_common_and_no_lower_one_exists():
    lca = lowest_common_ancestor(B_CELL, NK)
    common = ancestors(B_CELL).keys() & ancestors(NK).keys()
    assert lca in common
    assert not [t for t in common if t != lca and lca in ancestors(t)]  # nothing common lies below it


def test_only_the_root_in_common_gives_none():
    assert lowest_common_ancestor("CL:0000000", B_CELL) is None


def test_term_relation():
    assert term_relation(CD4, CD4) == "exact"
    assert term_relation(T_CELL, CD4) == "ancestor"
    assert term_relation(CD4, T_CELL) == "wrong"  # more specific than the truth
    assert term_relation(B_CELL, CD4) == "wrong"


def test_not_a_cl_term():
    with pytest.raises(LangCellError, match="not a Cell Ontology term"):
        ancestors("MONDO:0005061")
    with pytest.raises(LangCellError, match="not a term of the bundled Cell Ontology"):
        ancestors("CL:9999999")

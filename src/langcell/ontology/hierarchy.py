"""Cell Ontology ancestry: lowest common ancestors and how a predicted term relates to the true one.

The ancestry is the one ``cellxgene-ontology-guide`` ships with each CL term (its ``ancestors`` table:
every superclass with its distance in steps, computed from the ontology's is_a axioms; CL's own
terms only). Two uses:

* an **ontology-aware answer**: when a cell's two best classes are close, answer with their lowest
  common ancestor (CD4-positive vs CD8-positive alpha-beta T cell -> mature alpha-beta T cell), see
  :func:`lowest_common_ancestor`;
* an **ontology-aware metric**: a prediction is *exact* (the true term), *an ancestor* (a correct but
  coarser term: "T cell" for a CD4 T cell) or *wrong* (anything else, including a more specific term
  than the truth, which claims what the label does not say), see :func:`term_relation`.
"""

from __future__ import annotations

import functools

from ..errors import LangCellError
from .texts import ontology_terms, term_prefix

__all__ = ["ROOT_TERM", "ancestors", "lowest_common_ancestor", "term_relation"]

#: CL's root, "cell": a common ancestor of every pair, so never an informative answer.
ROOT_TERM = "CL:0000000"

#: The relations :func:`term_relation` returns.
RELATIONS = ("exact", "ancestor", "wrong")


def _check_cl(term_id: str) -> dict:
    if not isinstance(term_id, str) or term_prefix(term_id) != "CL":
        raise LangCellError(f"{term_id!r} is not a Cell Ontology term id; pass an id such as 'CL:0000236'")
    terms = ontology_terms("CL")
    if term_id not in terms:
        raise LangCellError(f"{term_id!r} is not a term of the bundled Cell Ontology; check the id")
    return terms[term_id]


@functools.cache
def ancestors(term_id: str) -> dict[str, int]:
    """``{ancestor id: distance}`` of a CL term, the term itself included at distance 0.

    Raises
    ------
    LangCellError
        For an id that is not a term of the bundled Cell Ontology.
    """
    entry = _check_cl(term_id)
    return {term_id: 0, **{str(k): int(v) for k, v in entry.get("ancestors", {}).items()}}


def lowest_common_ancestor(first: str, second: str) -> str | None:
    """The most specific term that both CL terms are (is_a, transitively, or themselves), or ``None``.

    Among the common ancestors other than the root "cell" (:data:`ROOT_TERM`), the lowest ones are
    those that are no ancestor of another common ancestor; when CL's multiple inheritance leaves
    several, the one closest to the two terms (smallest summed distance, then the smaller id) wins.
    When one term is an ancestor of the other, it is the answer. ``None`` when only the root is shared.
    """
    mine, theirs = ancestors(first), ancestors(second)
    common = {term: mine[term] + theirs[term] for term in mine.keys() & theirs.keys() if term != ROOT_TERM}
    if not common:
        return None
    # A common ancestor that is an ancestor of another common ancestor is not lowest.
    above = {term for c in common for term in ancestors(c) if term != c}
    lowest = [term for term in common if term not in above]
    return min(lowest, key=lambda term: (common[term], term))


def term_relation(predicted: str, truth: str) -> str:
    """How a predicted CL term relates to the true one: ``"exact"``, ``"ancestor"`` or ``"wrong"``.

    ``"ancestor"``: the prediction is a strict ancestor of the truth (correct, but coarser). A more
    specific prediction than the truth, or an unrelated term, is ``"wrong"``.
    """
    if predicted == truth:
        _check_cl(truth)
        return "exact"
    return "ancestor" if predicted in ancestors(truth) else "wrong"

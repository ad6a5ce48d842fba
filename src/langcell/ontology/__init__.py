"""Ontologies: terms to text (:mod:`.texts`), free-text labels to Cell Ontology terms (:mod:`.resolve`) and
Cell Ontology ancestry (:mod:`.hierarchy`: lowest common ancestors, exact / ancestor / wrong).

Everything comes from the ontologies shipped inside the ``cellxgene-ontology-guide`` wheel: no network.
This package imports nothing of torch, the data layer or the models.
"""

from .hierarchy import ancestors, lowest_common_ancestor, term_relation
from .resolve import ABBREVIATIONS, CURATED_LABELS, GENE_TO_CD, MARKER_ONLY_TYPES, label_texts, resolve_labels
from .texts import (
    ASPECT_ONTOLOGIES,
    ASPECTS,
    ORGANISMS,
    SPECIAL_TEXTS,
    TEMPLATES,
    cell_description,
    describe_cells,
    term_label,
    term_prompts,
    term_text,
)

__all__ = [
    "ABBREVIATIONS",
    "ASPECTS",
    "ASPECT_ONTOLOGIES",
    "CURATED_LABELS",
    "GENE_TO_CD",
    "MARKER_ONLY_TYPES",
    "ORGANISMS",
    "SPECIAL_TEXTS",
    "TEMPLATES",
    "ancestors",
    "cell_description",
    "describe_cells",
    "label_texts",
    "lowest_common_ancestor",
    "resolve_labels",
    "term_label",
    "term_relation",
    "term_prompts",
    "term_text",
]

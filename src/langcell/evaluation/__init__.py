"""Measuring models on labelled cells: tables, not annotations.

Each function here returns a table or a report (scanpy's ``inplace=`` rule: ``inplace=True`` also
stores it in ``adata.uns``), next to the simplest baselines a user would try instead
(:mod:`.baselines`: logistic regression and kNN on log-normalised expression, PCA).

:func:`per_type_accuracy`
    Accuracy of each cell type, and the means over seen and novel types.
:func:`retrieval_recall`
    Cell -> text and text -> cell recall@k on labelled cells.
:func:`integration_metrics`
    scIB bio-conservation and batch-correction metrics of embeddings against a PCA baseline.
:func:`fewshot`
    The paper's few-shot protocol: LangCell tuned on n cells per class next to the baselines.
:func:`calibration`
    Reliability curve and expected calibration error of the calls' confidence.
:func:`ontology_accuracy`
    Calls that are the true Cell Ontology term, a correct ancestor of it, wrong, or abstentions.
:func:`evaluate`
    All of it in one JSON-ready report (``langcell evaluate``).
"""

from .baselines import baseline_pca
from .fewshot import fewshot
from .integration import integration_metrics
from .per_type import per_type_accuracy
from .report import evaluate
from .retrieval import retrieval_recall
from .trust import calibration, ontology_accuracy

__all__ = [
    "baseline_pca",
    "calibration",
    "evaluate",
    "fewshot",
    "integration_metrics",
    "ontology_accuracy",
    "per_type_accuracy",
    "retrieval_recall",
]

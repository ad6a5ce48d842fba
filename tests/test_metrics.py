"""langcell.metrics.per_class_report against scikit-learn, on labels with unequal frequencies."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from langcell.errors import LangCellError
from langcell.metrics import frequency_order, per_class_report


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_report_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    types = np.array(["T cell", "B cell", "NK cell", "monocyte", "platelet"])
    truth = rng.choice(types, size=300, p=[0.4, 0.25, 0.2, 0.1, 0.05])
    predicted = np.where(rng.random(300) < 0.6, truth, rng.choice([*types[:4], "unknown"], size=300))
    report = per_class_report(truth, predicted)
    counts = {t: int((truth == t).sum()) for t in set(truth)}
    expected = sorted(counts, key=lambda t: (-counts[t], t))
    if "unknown" in set(predicted):
        expected.append("unknown")
    assert report["labels"] == expected
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=expected, zero_division=0)
    for i, row in enumerate(report["per_class"]):
        assert row["label"] == expected[i]
        assert row["precision"] == pytest.approx(precision[i])
        assert row["recall"] == pytest.approx(recall[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == support[i]
    np.testing.assert_array_equal(report["confusion"], confusion_matrix(truth, predicted, labels=expected))


def test_frequency_order_breaks_ties_alphabetically_and_puts_predicted_only_labels_last():
    truth = ["b", "a", "c", "c", "b", "c", "a"]
    predicted = ["z", "y", "y", "c", "b", "a", "z"]
    assert frequency_order(truth, predicted) == ["c", "a", "b", "y", "z"]  # a and b tie, y and z tie


def test_per_class_report_refuses_mismatched_lengths():
    with pytest.raises(LangCellError, match="one label per cell"):
        per_class_report(["a", "b"], ["a"])

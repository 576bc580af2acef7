"""Confusion-matrix, precision and calibration metrics against scikit-learn and by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, balanced_accuracy_score, brier_score_loss, f1_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from medvision.metrics import (
    MetricWarning,
    average_precision,
    balanced_accuracy,
    brier_score,
    confusion_matrix,
    expected_calibration_error,
    per_class_metrics,
)


@pytest.mark.parametrize("seed", range(4))
def test_confusion_balanced_accuracy_and_per_class_against_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.6, y, rng.integers(0, 4, 200))
    cm = confusion_matrix(y, pred, 4)
    np.testing.assert_array_equal(cm, sk_confusion_matrix(y, pred, labels=range(4)))
    assert balanced_accuracy(y, pred, 4) == pytest.approx(balanced_accuracy_score(y, pred))
    per = per_class_metrics(cm)
    np.testing.assert_allclose([m["f1"] for m in per], f1_score(y, pred, average=None, labels=range(4)))
    for k, m in enumerate(per):
        yk, pk = y == k, pred == k
        assert m["sensitivity"] == pytest.approx((yk & pk).sum() / yk.sum())
        assert m["specificity"] == pytest.approx((~yk & ~pk).sum() / (~yk).sum())
        assert m["ppv"] == pytest.approx((yk & pk).sum() / pk.sum())
        assert m["npv"] == pytest.approx((~yk & ~pk).sum() / (~pk).sum())


@pytest.mark.parametrize("seed", range(4))
def test_average_precision_with_ties_against_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    score = np.round(rng.random(300) * 0.7 + 0.3 * y, 1)
    assert average_precision(y, score) == pytest.approx(average_precision_score(y, score), abs=1e-12)


def test_brier_and_ece() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(rng.random(500) * 0.5 + 0.4 * y, 0, 1)
    assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p))
    probs = np.stack([1 - p, p], axis=1)
    assert brier_score(y, probs) == pytest.approx(2 * brier_score_loss(y, p))  # multiclass form sums both columns
    # ECE by hand: all predictions at confidence 0.8 and 60% correct -> |0.6 - 0.8| = 0.2
    conf = np.tile([[0.8, 0.2]], (10, 1))
    labels = np.array([0] * 6 + [1] * 4)
    assert expected_calibration_error(labels, conf) == pytest.approx(0.2)
    perfect = np.tile([[1.0, 0.0]], (5, 1))
    assert expected_calibration_error(np.zeros(5, int), perfect) == 0.0


def test_degenerate_inputs_warn_and_give_nan() -> None:
    with pytest.warns(MetricWarning):
        assert np.isnan(average_precision(np.zeros(4), np.linspace(0, 1, 4)))
    cm = confusion_matrix(np.zeros(3, int), np.zeros(3, int), 2)
    with pytest.warns(MetricWarning, match="class 1 sensitivity"):
        per = per_class_metrics(cm)
    assert np.isnan(per[1]["sensitivity"]) and per[0]["sensitivity"] == 1.0

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, roc_auc_score

from medvision.metrics import (
    MetricAccumulator,
    MetricWarning,
    binary_auc,
    compute_accuracy,
    compute_auc,
)


@pytest.mark.parametrize("seed", range(6))
def test_binary_auc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    score = np.round(rng.random(300) + 0.3 * y, 1)  # rounding makes many ties
    assert binary_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


@pytest.mark.parametrize("k", [3, 8])
def test_macro_ovr_auc_matches_sklearn(k: int) -> None:
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 500)
    logits = rng.normal(size=(500, k)) + 1.5 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert compute_auc(y, probs) == pytest.approx(expected, abs=1e-12)


def test_two_column_probs_use_positive_class() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    p1 = np.clip(rng.random(100) * 0.6 + 0.3 * y, 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    assert compute_auc(y, probs) == pytest.approx(roc_auc_score(y, p1))
    assert compute_accuracy(y, probs) == pytest.approx(accuracy_score(y, probs.argmax(1)))
    assert compute_accuracy(y, p1) == pytest.approx(accuracy_score(y, p1 > 0.5))


def test_single_class_is_nan_with_a_warning_not_a_crash_or_half() -> None:
    with pytest.warns(MetricWarning, match="only one class"):
        assert np.isnan(binary_auc(np.ones(10), np.linspace(0, 1, 10)))
    with pytest.warns(MetricWarning):
        assert np.isnan(compute_auc(np.zeros(5, int), np.full((5, 3), 1 / 3)))
    with pytest.warns(MetricWarning, match="NaN"):
        assert np.isnan(binary_auc(np.array([0, 1]), np.array([0.1, np.nan])))


def test_macro_auc_leaves_out_absent_class_with_warning() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1], [0.6, 0.3, 0.1],
                      [0.1, 0.8, 0.1]])  # fmt: skip
    with pytest.warns(MetricWarning, match=r"class\(es\) \[2\]"):
        auc = compute_auc(y, probs)
    assert auc == pytest.approx(np.mean([roc_auc_score(y == 0, probs[:, 0]), roc_auc_score(y == 1, probs[:, 1])]))


def test_accumulator_softmaxes_logits() -> None:
    acc = MetricAccumulator()
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 4)).astype(np.float32)
    y = rng.integers(0, 4, 40)
    for i in range(0, 40, 16):
        acc.update(torch.from_numpy(logits[i : i + 16]), torch.from_numpy(y[i : i + 16]))
    probs, _ = acc.probs_and_labels()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    out = acc.compute()
    assert out["n"] == 40
    assert out["acc"] == pytest.approx(accuracy_score(y, logits.argmax(1)))
    assert out["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=1e-6)

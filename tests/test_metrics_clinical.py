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
    assert brier_score(y, probs) == pytest.approx(brier_score_loss(y, p))  # two columns: the binary score
    assert brier_score(1 - y, probs[:, ::-1]) == pytest.approx(brier_score_loss(y, p))  # either class
    three = np.stack([0.5 * (1 - p), 0.5 * (1 - p), p], axis=1)  # more classes: summed over the one-hot columns
    onehot = np.eye(3)[2 * y]
    assert brier_score(2 * y, three) == pytest.approx(float(np.mean(np.sum((three - onehot) ** 2, axis=1))))
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


def test_bootstrap_ci_covers_the_true_auc() -> None:
    from math import erf

    from medvision.intervals import bootstrap_ci
    from medvision.metrics import compute_auc

    d = 1.0
    true_auc = 0.5 * (1 + erf(d / 2))  # binormal: Phi(d / sqrt 2)
    rng = np.random.default_rng(0)
    hits = 0
    trials = 40
    for t in range(trials):
        y = np.r_[np.ones(60, int), np.zeros(90, int)]
        score = np.r_[rng.normal(d, 1, 60), rng.normal(0, 1, 90)]
        lo, hi = bootstrap_ci(y, score, compute_auc, n_resamples=200, seed=t)
        hits += lo <= true_auc <= hi
    assert 0.85 <= hits / trials <= 1.0  # nominal 95%


def _delong_by_midranks(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An independent DeLong: Sun & Xu (2014) fast midrank formulation."""
    from scipy.stats import rankdata

    pos, neg = y == 1, y == 0
    m, n = pos.sum(), neg.sum()
    aucs, v01s, v10s = [], [], []
    for s in (a, b):
        tx, ty, tz = rankdata(s[pos]), rankdata(s[neg]), rankdata(np.r_[s[pos], s[neg]])
        aucs.append((tz[:m].sum() / m - (m + 1) / 2) / n)
        v01s.append((tz[:m] - tx) / n)
        v10s.append(1 - (tz[m:] - ty) / m)
    cov = np.cov(np.stack(v01s)) / m + np.cov(np.stack(v10s)) / n
    return np.array(aucs), cov


def test_delong_matches_an_independent_implementation() -> None:
    from medvision.intervals import delong_test

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 250)
    a = np.round(rng.normal(1.0 * y, 1), 2)
    b = np.round(a + rng.normal(0, 0.8, 250), 2)
    out = delong_test(y, a, b)
    aucs, cov = _delong_by_midranks(y, a, b)
    assert out["auc_a"] == pytest.approx(aucs[0]) and out["auc_b"] == pytest.approx(aucs[1])
    z = (aucs[0] - aucs[1]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert out["z"] == pytest.approx(z)
    assert 0 < out["p"] < 1
    assert out["ci_a"][0] < out["auc_a"] < out["ci_a"][1]
    from scipy.stats import norm

    for level in (0.95, 0.8):  # evaluation.ci_level: the interval's coverage, as for the bootstrap CIs
        low, high = delong_test(y, a, b, level)["ci_b"]
        half = norm.ppf(0.5 + level / 2) * np.sqrt(cov[1, 1])
        assert (low, high) == pytest.approx((aucs[1] - half, aucs[1] + half), rel=1e-9)


def test_operating_points_by_hand() -> None:
    from medvision.metrics import operating_point

    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    assert operating_point(y, s, "youden") == 0.7  # sens 0.75, spec 1.0
    assert operating_point(y, s, "sensitivity", 1.0) == 0.4  # the highest threshold catching every positive
    assert operating_point(y, s, "specificity", 1.0) == 0.7  # the lowest threshold with no false positive
    with pytest.raises(ValueError, match="needs a target"):
        operating_point(y, s, "sensitivity")


def test_temperature_scaling_recovers_the_temperature_and_lowers_ece() -> None:
    from medvision.evaluation import fit_temperature

    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (6000, 4))
    true_t = 2.0
    p = np.exp(z / true_t) / np.exp(z / true_t).sum(1, keepdims=True)
    y = np.array([rng.choice(4, p=row) for row in p])
    t = fit_temperature(z, y)
    assert t == pytest.approx(true_t, rel=0.1)
    raw = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    scaled = np.exp(z / t) / np.exp(z / t).sum(1, keepdims=True)
    assert expected_calibration_error(y, scaled) < expected_calibration_error(y, raw) / 2

"""Confusion-matrix, precision and calibration metrics against scikit-learn and by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, balanced_accuracy_score, brier_score_loss, f1_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from medvision.evaluation import SplitOutputs
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
    # each rule's validation score, and the threshold halfway down to the next one: the same validation calls
    assert operating_point(y, s, "youden") == pytest.approx(0.65)  # from 0.7: sens 0.75, spec 1.0
    assert operating_point(y, s, "sensitivity", 1.0) == pytest.approx(0.35)  # from 0.4, catching every positive
    assert operating_point(y, s, "specificity", 1.0) == pytest.approx(0.65)  # from 0.7, the first false positive 0.6
    assert operating_point(y, s, "sensitivity", 0.0) == pytest.approx(0.85)  # from 0.9, the fewest false alarms
    saturated = np.array([1e-4, 2e-4, 0.9999999, 0.99999995])  # an ABMIL head that separates validation
    t = operating_point(np.array([0, 0, 1, 1]), saturated, "youden")
    assert t == pytest.approx(0.5, abs=1e-3) and t <= 0.9999998  # a new slide at 0.9999998 is still called tumour
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


def _wilson(k: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """statsmodels' ``proportion_confint(k, n, method="wilson")``, written out (statsmodels is not a dependency)."""
    p = k / n
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def test_share_ci_is_wilson_for_independent_cases_and_at_the_effective_sample_size_for_patients() -> None:
    from scipy.stats import binomtest

    from medvision.intervals import share_ci

    for k, n in ((10, 10), (0, 7), (114, 156), (3, 40)):
        hits = np.arange(n) < k
        low, high = share_ci(hits)
        assert (low, high) == pytest.approx(_wilson(k, n), abs=1e-12)
        ref = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert (low, high) == pytest.approx((ref.low, ref.high), abs=1e-12) and high - low > 0
    assert share_ci(np.ones(10, bool))[1] == 1.0 and share_ci(np.zeros(10, bool))[0] == 0.0  # exact ends
    # 10 patients of 3 images, all hits: the bootstrap's point (1, 1) tells nothing; Wilson of 10 patients, not 30
    patients = np.repeat(np.arange(10), 3)
    assert share_ci(np.ones(30, bool), patients, (1.0, 1.0)) == pytest.approx(_wilson(10, 10))
    # 18 of 30: the bootstrap's width gives the standard error, n_eff = p (1 - p) / se^2, kept within [10, 30]
    z, hits = 1.959963984540054, np.arange(30) < 18
    se = (0.8 - 0.4) / (2 * z)
    n_eff = 0.6 * 0.4 / se**2  # 23.0: images of a patient partly alike
    assert 10 < n_eff < 30 and share_ci(hits, patients, (0.4, 0.8)) == pytest.approx(_wilson(0.6 * n_eff, n_eff))
    assert share_ci(hits, patients, (0.1, 0.99)) == pytest.approx(_wilson(6, 10))  # wider: as alike as can be
    assert share_ci(hits, patients, (0.55, 0.65)) == pytest.approx(_wilson(18, 30))  # narrower: independent
    assert all(np.isnan(share_ci(np.zeros(0, bool))))


def test_balanced_accuracy_ci_is_a_proportions_never_zero_wide_and_covers() -> None:
    """A mean of K recalls is worth K^2 / sum 1/n_k cases: 2n for two classes of n (the accuracy's Wilson interval);
    a head right on every case gets Wilson's interval, not the stratified bootstrap's point [1, 1]; a rare class
    widens it; and over simulated cohorts the 95% interval holds the true balanced accuracy about 95% of the time."""
    from medvision.intervals import balanced_accuracy_ci

    y = np.r_[np.zeros(20, int), np.ones(20, int)]
    perfect = 5 * np.eye(2)[y]
    assert balanced_accuracy_ci(y, perfect, 0, 0, 0.95, None) == pytest.approx(_wilson(40, 40))
    half = perfect.copy()
    half[[0, 1, 2, 20, 21, 22]] = half[[0, 1, 2, 20, 21, 22]][:, ::-1]  # 17 of 20 right in each class
    assert balanced_accuracy_ci(y, half, 0, 0, 0.95, None) == pytest.approx(_wilson(34, 40))
    rare = np.r_[np.zeros(90, int), np.ones(10, int)]  # n_eff = 4 / (1/90 + 1/10) = 36
    assert balanced_accuracy_ci(rare, 5 * np.eye(2)[rare], 0, 0, 0.95, None) == pytest.approx(_wilson(36, 36))
    three = np.r_[np.zeros(5, int), np.ones(5, int)]
    assert all(np.isnan(balanced_accuracy_ci(three, 5 * np.eye(3)[three], 0, 0, 0.95, None)))  # a class absent
    # 12 patients of 3 slides each, every slide right: the bootstrap cannot tell, so each class counts patients
    patients = np.repeat(np.arange(12), 3)
    y3 = np.repeat(np.arange(12) % 2, 3)
    assert balanced_accuracy_ci(y3, 5 * np.eye(2)[y3], 100, 0, 0.95, patients) == pytest.approx(_wilson(12, 12))
    rng, hits = np.random.default_rng(0), 0
    recall = np.array([0.9, 0.6, 0.75])
    for _ in range(400):
        yy = rng.choice(3, 120, p=[0.6, 0.3, 0.1])
        right = rng.random(120) < recall[yy]
        pred = np.where(right, yy, (yy + rng.integers(1, 3, 120)) % 3)
        low, high = balanced_accuracy_ci(yy, np.eye(3)[pred], 0, 0, 0.95, None)
        hits += low <= recall.mean() <= high
    assert 0.91 <= hits / 400 <= 0.99


def _split(labels: np.ndarray, logits: np.ndarray, groups: list[str]) -> SplitOutputs:

    return SplitOutputs(logits.astype(np.float32), labels, groups)


def test_clinical_cis_of_proportions_are_never_zero_wide_and_accuracy_carries_the_class_mix() -> None:
    from medvision.evaluation import clinical_metrics, fit_decision
    from medvision.recipe import EvalConfig

    rng = np.random.default_rng(0)
    cfg = EvalConfig(bootstrap=300)
    val_y = np.r_[np.zeros(50, int), np.ones(50, int)]
    val = _split(val_y, rng.normal(size=(100, 2)) + 2 * np.eye(2)[val_y], [f"v{i}" for i in range(100)])
    decision = fit_decision(val, ["n", "p"], cfg)
    # every one of 10 positives and 10 negatives right: a percentile bootstrap gives [1, 1], Wilson does not
    ty = np.r_[np.zeros(10, int), np.ones(10, int)]
    perfect = clinical_metrics({"test": _split(ty, 5 * np.eye(2)[ty], [f"t{i}" for i in range(20)])}, ["n", "p"],
                               cfg, decision)["image"]["test"]  # fmt: skip
    assert perfect["per_class"]["p"]["sensitivity_ci"] == pytest.approx(_wilson(10, 10))
    assert perfect["acc_ci"] == pytest.approx(_wilson(20, 20))
    assert perfect["ci_methods"]["sensitivity"].startswith("Wilson")
    # a constant predictor right on 114 of 156: its accuracy CI is Wilson's, not the point 0.731
    ty2 = np.r_[np.zeros(114, int), np.ones(42, int)]
    const = np.tile([2.0, 0.0], (156, 1)) + rng.normal(0, 0.01, (156, 2))
    t2 = clinical_metrics({"test": _split(ty2, const, [f"t{i}" for i in range(156)])}, ["n", "p"], cfg,
                          decision)["image"]["test"]  # fmt: skip
    assert t2["acc"] == pytest.approx(114 / 156) and t2["acc_ci"] == pytest.approx(_wilson(114, 156))
    assert t2["per_class"]["p"]["sensitivity_ci"] == pytest.approx(_wilson(0, 42))
    # the same constant predictor on 52 patients of 3 images, each patient's images of one class: the cluster
    # bootstrap over all patients (the class mix varies) sees 52 independent units, so the interval is Wilson's
    # near 52, never beyond the bounds of 52 patients and 156 images
    patients = [f"pt{i // 3}" for i in range(156)]
    t3 = clinical_metrics({"test": _split(ty2, const, patients)}, ["n", "p"], cfg, decision)["image"]["test"]
    low, high = t3["acc_ci"]
    by_patients, by_images = _wilson(114 / 156 * 52, 52), _wilson(114, 156)
    width = high - low
    assert low < 114 / 156 < high
    assert by_images[1] - by_images[0] - 1e-9 <= width <= by_patients[1] - by_patients[0] + 1e-9
    assert width > 0.8 * (by_patients[1] - by_patients[0])  # images of a patient alike: n_eff near 52
    assert "not stratified" in t3["ci_methods"]["accuracy"] and "cluster" in t3["ci_methods"]["sensitivity"]
    assert t3["per_class"]["p"]["sensitivity_ci"] == pytest.approx(_wilson(0, 14))  # 14 positive patients

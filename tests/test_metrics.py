from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, mean_absolute_error, mean_squared_error, r2_score, roc_auc_score

from medvision.intervals import bootstrap_ci, bootstrap_cis
from medvision.metrics import (
    PROB_DIGITS,
    MetricAccumulator,
    MetricWarning,
    aggregate_by_group,
    binary_auc,
    compute_accuracy,
    compute_auc,
    compute_mae,
    compute_mse,
    compute_r2,
    multilabel_auc,
    round_significant,
    softmax,
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


def test_macro_metrics_need_every_class_as_in_sklearn() -> None:
    """One definition across medvision (metrics.NEEDS_EVERY_CLASS): a class with no case makes macro AUC and
    balanced accuracy NaN with a warning naming it, never an average over the
    classes present; the weighted AUC gives the absent class its weight, zero."""
    from medvision.metrics import balanced_accuracy

    y = np.array([0, 0, 1, 1, 0, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1], [0.6, 0.3, 0.1],
                      [0.1, 0.8, 0.1]])  # fmt: skip
    with pytest.warns(MetricWarning, match=r"macro AUC is undefined: class\(es\) \[2\]"):
        assert np.isnan(compute_auc(y, probs))
    with pytest.warns(MetricWarning, match=r"balanced accuracy is undefined: class\(es\) \[2\]"):
        assert np.isnan(balanced_accuracy(y, probs.argmax(1), 3))
    with pytest.warns(MetricWarning, match=r"class\(es\) \[2\]"):
        weighted = compute_auc(y, probs, "weighted")
    assert weighted == pytest.approx(np.mean([roc_auc_score(y == k, probs[:, k]) for k in (0, 1)]))  # 3 cases each
    full = np.r_[y, 2]
    p_full = np.r_[probs, [[0.1, 0.1, 0.8]]]
    assert compute_auc(full, p_full) == pytest.approx(roc_auc_score(full, p_full, multi_class="ovr"))


def test_accumulator_softmaxes_logits() -> None:
    acc = MetricAccumulator()
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 4)).astype(np.float32)
    y = rng.integers(0, 4, 40)
    for i in range(0, 40, 16):
        acc.update(torch.from_numpy(logits[i : i + 16]), torch.from_numpy(y[i : i + 16]))
    kept, labels = acc.logits_and_labels()
    np.testing.assert_array_equal(kept, logits)
    np.testing.assert_array_equal(labels, y)
    probs = softmax(kept)
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits).double(), 1).numpy(), rtol=1e-12)
    out = acc.compute()
    assert out["n"] == 40
    assert out["acc"] == pytest.approx(accuracy_score(y, logits.argmax(1)))
    assert out["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=1e-6)


@pytest.mark.parametrize("k", [3, 6])
def test_weighted_ovr_auc_matches_sklearn(k: int) -> None:
    rng = np.random.default_rng(k)
    y = rng.choice(k, size=400, p=np.linspace(1, 3, k) / np.linspace(1, 3, k).sum())
    probs = softmax(rng.normal(size=(400, k)) + 1.5 * np.eye(k)[y])
    expected = roc_auc_score(y, probs, multi_class="ovr", average="weighted")
    assert compute_auc(y, probs, "weighted") == pytest.approx(expected, abs=1e-12)
    assert compute_auc(y, probs, "macro") != pytest.approx(expected, abs=1e-6)  # the weights matter here
    with pytest.raises(ValueError, match="micro"):
        compute_auc(y, probs, "micro")


@pytest.mark.parametrize("average", ["macro", "weighted", "micro"])
def test_multilabel_auc_matches_sklearn(average: str) -> None:
    rng = np.random.default_rng(3)
    labels = (rng.random((300, 5)) < np.array([0.1, 0.3, 0.5, 0.2, 0.4])).astype(int)
    scores = np.round(rng.random((300, 5)) + 0.6 * labels, 2)  # with ties
    expected = roc_auc_score(labels, scores, average=average)
    assert multilabel_auc(labels, scores, average) == pytest.approx(expected, abs=1e-12)


def test_multilabel_auc_leaves_out_a_single_class_label_with_a_warning() -> None:
    rng = np.random.default_rng(4)
    labels = (rng.random((100, 3)) < 0.4).astype(int)
    labels[:, 2] = 0  # no positives in the last label
    scores = rng.random((100, 3)) + labels
    with pytest.warns(MetricWarning, match=r"class\(es\) \[2\]"):
        auc = multilabel_auc(labels, scores)
    assert auc == pytest.approx(roc_auc_score(labels[:, :2], scores[:, :2]))
    with pytest.raises(ValueError, match="shape"):
        multilabel_auc(labels, scores[:, :2])


def test_softmax_is_stable_and_tempered() -> None:
    logits = np.array([[1000.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    p = softmax(logits)
    assert np.all(np.isfinite(p)) and p[0, 0] == 1.0 and p[1, 0] == 0.5
    assert softmax(logits, 2.0)[2, 0] == pytest.approx(1 / (1 + np.exp(-1.0)))


def test_patient_aggregation_mean_max_topk() -> None:
    groups = ["a", "a", "a", "b", "b", "c"]
    y = np.array([0, 1, 0, 0, 0, 1])
    p1 = np.array([0.1, 0.9, 0.5, 0.2, 0.4, 0.7])
    probs = np.stack([1 - p1, p1], axis=1)
    ids, yp, mean, mixed = aggregate_by_group(groups, y, probs, "mean")
    assert ids == ["a", "b", "c"] and list(yp) == [1, 0, 1] and mixed == 1  # any positive image -> positive patient
    np.testing.assert_allclose(mean[:, 1], [0.5, 0.3, 0.7])
    np.testing.assert_allclose(mean.sum(1), 1.0)
    _, _, mx, _ = aggregate_by_group(groups, y, probs, "max")
    np.testing.assert_allclose(mx[:, 1], [0.9, 0.4, 0.7])
    _, _, top2, _ = aggregate_by_group(groups, y, probs, "topk", top_k=2)
    np.testing.assert_allclose(top2[:, 1], [0.7, 0.3, 0.7])
    with pytest.raises(ValueError, match="median"):
        aggregate_by_group(groups, y, probs, "median")


def test_patient_aggregation_is_about_the_positive_class_whichever_it_is() -> None:
    """``positive=0`` (BreastMNIST's positive_class: malignant, the first class): ``max`` takes the most suspicious
    image's P(malignant), and a patient with one malignant image is malignant; the same as class 1 mirrored."""
    groups = ["a", "a", "b", "b"]
    y = np.array([0, 1, 1, 1])  # a: one malignant (0) image and one benign (1)
    p0 = np.array([0.95, 0.05, 0.3, 0.1])
    probs = np.stack([p0, 1 - p0], axis=1)
    _, yp, mx, mixed = aggregate_by_group(groups, y, probs, "max", positive=0)
    assert list(yp) == [0, 1] and mixed == 1
    np.testing.assert_allclose(mx, [[0.95, 0.05], [0.3, 0.7]])
    mirrored = aggregate_by_group(groups, 1 - y, probs[:, ::-1], "max", positive=1)
    np.testing.assert_array_equal(mirrored[1], 1 - yp)
    np.testing.assert_allclose(mirrored[2], mx[:, ::-1])
    for method in ("mean", "topk"):
        a = aggregate_by_group(groups, y, probs, method, top_k=1, positive=0)
        b = aggregate_by_group(groups, 1 - y, probs[:, ::-1], method, top_k=1, positive=1)
        np.testing.assert_allclose(a[2], b[2][:, ::-1])
    with pytest.raises(ValueError, match="positive class index 2"):
        aggregate_by_group(groups, y, probs, "max", positive=2)


def test_patient_aggregation_multiclass_renormalises_and_votes() -> None:
    groups = ["a", "a", "a", "b"]
    y = np.array([2, 2, 0, 1])
    probs = np.array([[0.1, 0.2, 0.7], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    _, yp, mx, mixed = aggregate_by_group(groups, y, probs, "max")
    assert list(yp) == [2, 1] and mixed == 1  # majority label
    np.testing.assert_allclose(mx[0], np.array([0.6, 0.3, 0.7]) / 1.6)
    np.testing.assert_allclose(mx.sum(1), 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_regression_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.normal(50.0, 10.0, 200)
    pred = y + rng.normal(0.0, 4.0, 200) + 2.0
    for p in (pred, pred[:, None]):  # a regression head's (n, 1) output as well as (n,)
        assert compute_mse(y, p) == pytest.approx(mean_squared_error(y, pred), rel=1e-12)
        assert compute_mae(y, p) == pytest.approx(mean_absolute_error(y, pred), rel=1e-12)
        assert compute_r2(y, p) == pytest.approx(r2_score(y, pred), rel=1e-12)
    assert compute_r2(y, np.full(200, y.mean())) == pytest.approx(0.0, abs=1e-12)
    assert compute_r2(y, y - 100.0) < 0  # worse than the mean


def test_regression_metrics_undefined_are_nan_with_a_warning() -> None:
    for metric in (compute_mse, compute_mae, compute_r2):
        with pytest.warns(MetricWarning, match="empty set"):
            assert np.isnan(metric(np.array([]), np.zeros((0, 1))))
        with pytest.warns(MetricWarning, match="NaN or Inf"):
            assert np.isnan(metric(np.array([1.0, 2.0]), np.array([1.0, np.nan])))
    with pytest.warns(MetricWarning, match="constant target"):
        assert np.isnan(compute_r2(np.full(5, 3.0), np.arange(5.0)))
    with pytest.raises(ValueError, match=r"pred has shape \(3, 2\) for 3 targets"):
        compute_mse(np.zeros(3), np.zeros((3, 2)))


def test_bootstrap_ci_of_mse_unstratified_for_continuous_targets() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(0.0, 1.0, 120)
    pred = (y + rng.normal(0.0, 0.5, 120))[:, None]
    point = compute_mse(y, pred)
    lo, hi = bootstrap_ci(y, pred, compute_mse, n_resamples=500, stratify=False)
    assert lo < point < hi and hi - lo > 0.05
    # Stratified by "class", every distinct continuous value is its own stratum: the CI collapses to the point.
    assert bootstrap_ci(y, pred, compute_mse, n_resamples=50) == pytest.approx((point, point))
    cis = bootstrap_cis(y, pred, {"mse": compute_mse, "r2": compute_r2}, n_resamples=200, stratify=False)
    assert cis["r2"][0] < compute_r2(y, pred) < cis["r2"][1]
    assert bootstrap_cis(np.array([]), np.zeros((0, 1)), {"mse": compute_mse}, stratify=False)["mse"] == (
        pytest.approx((np.nan, np.nan), nan_ok=True)
    )


def test_probabilities_are_rounded_as_the_predictions_file_writes_them() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.random(20000), 10 ** rng.uniform(-30, 0, 20000), rng.dirichlet(np.ones(8), 2000).ravel(),
                        [1.0, 0.5, 1e-6, 1e-3, 0.0099999996, 0.99999996, 0.0, 1e-300]])  # fmt: skip
    rounded = round_significant(x, PROB_DIGITS)
    assert rounded.tolist() == [float(f"{v:.{PROB_DIGITS}g}") for v in x]
    # two images whose probabilities differ only beyond the written digits are tied, in the AUC as in the file
    y, p = np.array([0, 1, 0, 1]), np.array([0.1234567801, 0.1234567809, 0.2, 0.9])
    assert compute_auc(y, p) == 0.75 and compute_auc(y, round_significant(p)) == 0.625


def _patients_with_four_slides(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """40 patients, 4 slides each with the patient's label and nearly the patient's score: slides that are not
    independent, so a bootstrap of slides sees 160 cases where there are 40."""
    rng = np.random.default_rng(seed)
    label = (np.arange(40) % 2).astype(np.int64)
    score = rng.normal(0.0, 1.0, 40) + 1.0 * label
    patients = np.repeat([f"P{i:02d}" for i in range(40)], 4)
    return np.repeat(label, 4), np.repeat(score, 4) + rng.normal(0.0, 0.05, 160), patients


def test_a_cluster_bootstrap_resamples_whole_patients_and_is_wider() -> None:
    from medvision.intervals import bootstrap_indices, paired_bootstrap

    y, score, patients = _patients_with_four_slides(0)
    rows_of = {p: np.flatnonzero(patients == p) for p in np.unique(patients)}
    for idx in bootstrap_indices(y, 50, 3, groups=patients):
        drawn = np.bincount(idx, minlength=len(y))
        for rows in rows_of.values():  # a patient comes with all four of its slides, as often as it is drawn
            assert len(set(drawn[rows].tolist())) == 1
        assert (y[idx] == 1).sum() == 80 and len(idx) == 160  # stratified: 20 positive patients in every resample
    slide_lo, slide_hi = bootstrap_ci(y, score, compute_auc, n_resamples=400, seed=1)
    lo, hi = bootstrap_ci(y, score, compute_auc, n_resamples=400, seed=1, groups=patients)
    assert lo <= compute_auc(y, score) <= hi
    assert hi - lo > 1.5 * (slide_hi - slide_lo), ((lo, hi), (slide_lo, slide_hi))  # about 2x: 4 slides a patient
    # one group per row is the bootstrap of rows, draw for draw
    ids = [f"slide{i}" for i in range(len(y))]
    for stratify in (True, False):
        plain = list(bootstrap_indices(y, 30, 5, stratify))
        grouped = list(bootstrap_indices(y, 30, 5, stratify, groups=ids))
        assert all(np.array_equal(a, b) for a, b in zip(plain, grouped, strict=True))
    metrics = {"auc": compute_auc, "acc": compute_accuracy}
    assert bootstrap_cis(y, score, metrics, 100, 2, groups=ids) == bootstrap_cis(y, score, metrics, 100, 2)
    other = score + np.random.default_rng(9).normal(0, 0.5, len(y))
    assert paired_bootstrap(y, score, other, metrics, 100, 2, groups=ids) == paired_bootstrap(
        y, score, other, metrics, 100, 2
    )
    with pytest.raises(ValueError, match="159 group ids for 160 rows"):
        bootstrap_ci(y, score, compute_auc, groups=patients[:-1])


def test_a_patient_with_mixed_labels_is_stratified_by_its_most_common_label() -> None:
    from medvision.intervals import bootstrap_indices

    y = np.array([1, 1, 0, 0, 0, 1, 1, 0, 0])  # A: 1, 1, 0 (class 1); B: 0, 0; C: 1, 1; E: 0; F: 0
    groups = np.array(["A", "A", "A", "B", "B", "C", "C", "E", "F"])
    for idx in bootstrap_indices(y, 40, 0, groups=groups):
        draws = {g: int((idx == np.flatnonzero(groups == g)[0]).sum()) for g in "ABCEF"}
        assert draws["A"] + draws["C"] == 2  # the two class-1 groups are drawn from their own stratum
        assert draws["B"] + draws["E"] + draws["F"] == 3

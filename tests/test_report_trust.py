"""Reports that do not mislead: checkpoint selection that ignores noise-level AUC gains, and the rules behind it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medvision.evaluation import (
    Decision,
    SplitOutputs,
    clinical_metrics,
    fit_decision,
    judged_temperature,
    shift_warnings,
)
from medvision.metrics import proportion_ci
from medvision.recipe import EvalConfig
from medvision.report import _at_point
from medvision.training.loop import FitState


def _select(history: list[tuple[float, float]], tolerance: float, monitor: str = "val_auc") -> int:
    """The epoch the loop keeps, replaying its bookkeeping (training.loop.fit) on (value, val_loss) pairs."""
    state = FitState()
    for epoch, (value, loss) in enumerate(history):
        if state.improved(value, loss, monitor, tolerance):
            state.best, state.best_loss, state.best_epoch = value, loss, epoch
        if monitor != "val_loss" and math.isfinite(value):
            state.peak = max(value, state.peak if state.peak is not None else -math.inf)
    return state.best_epoch


def test_a_noise_level_auc_gain_does_not_pick_the_worse_model() -> None:
    # the case seen in the demo: 0.9591 at val loss 0.578 was kept over 0.9583 at 0.194
    history = [(0.9400, 0.700), (0.9591, 0.578), (0.9575, 0.301), (0.9583, 0.194)]
    assert _select(history, tolerance=0.0) == 1  # exact comparison: the old rule
    assert _select(history, tolerance=0.002) == 3  # within the tolerance: the lower loss wins


def test_a_real_gain_wins_and_ties_cannot_drift_down() -> None:
    assert _select([(0.90, 0.2), (0.95, 0.9)], tolerance=0.002) == 1  # +0.05 AUC beats a lower loss
    assert _select([(0.95, 0.20), (0.9505, 0.30)], tolerance=0.002) == 0  # +0.0005 is noise; the loss decides
    # each step is within the tolerance of the last, but the third is more than it below the peak
    drift = [(0.9600, 0.5), (0.9585, 0.4), (0.9570, 0.3), (0.9555, 0.2)]
    assert _select(drift, tolerance=0.002) == 1
    assert _select([(0.5, 0.9), (0.4, 0.7), (0.45, 0.8)], tolerance=0.0, monitor="val_loss") == 1
    assert _select([(1.0, 0.3), (1.0, 0.1)], tolerance=0.0) == 1  # AUC saturates: the loss breaks the tie


def _logits(n: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary logits whose true temperature is ``scale`` (over-confident by that factor when > 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    return np.stack([np.zeros(n), z * scale], axis=1), y


def test_temperature_is_kept_only_when_it_lowers_the_cross_fitted_validation_ece() -> None:
    logits, y = _logits(2000, 3.0, 0)
    t, record = judged_temperature(logits, y)
    assert 2.0 < t < 4.5 and record["val_ece_after"] < record["val_ece_before"] and "kept_t1" not in record
    for seed in range(6):  # already calibrated: a fitted T near 1 may or may not help; the rule must hold
        logits, y = _logits(300, 1.0, seed)
        t, record = judged_temperature(logits, y)
        if record.get("kept_t1"):
            assert t == 1.0 and record["val_ece_after"] >= record["val_ece_before"]
        else:
            assert t == record["temperature_fitted"] and record["val_ece_after"] < record["val_ece_before"]
    # the decision records the judgement, and the report says why T = 1 when it was kept
    decision = Decision(temperature=1.0, calibration={"kept_t1": "temperature 0.9 raised the ECE; T = 1 kept"})
    back = Decision.from_json(decision.to_json())
    assert back.calibration["kept_t1"].endswith("T = 1 kept")


def test_headline_accuracy_is_reported_at_the_validation_threshold_next_to_argmax() -> None:
    rng = np.random.default_rng(1)
    logits, y = _logits(400, 1.0, 2)
    val = SplitOutputs(logits=logits[:200], labels=y[:200], groups=[f"p{i // 2}" for i in range(200)])
    test = SplitOutputs(logits=logits[200:] + rng.normal(0, 0.1, (200, 2)), labels=y[200:],
                        groups=[f"q{i // 2}" for i in range(200)])  # fmt: skip
    cfg = EvalConfig(bootstrap=200)
    decision = fit_decision(val, ["neg", "pos"], cfg)
    clinical = clinical_metrics({"val": val, "test": test}, ["neg", "pos"], cfg, decision)
    op = clinical["image"]["test"]["operating_points"][0]
    p = test.probs(decision.temperature)[:, 1]
    assert op["accuracy"] == pytest.approx(float(np.mean((p >= op["threshold"]) == (test.labels == 1))))
    assert op["accuracy_ci"][0] <= op["accuracy"] <= op["accuracy_ci"][1]
    text = _at_point(clinical["image"]["test"])
    assert text.startswith(f"{op['accuracy']:.3f}") and "Youden J" in text


def test_wilson_interval_matches_the_closed_form_reference() -> None:
    from scipy.stats import binomtest

    for k, n in ((12, 40), (0, 25), (25, 25), (512, 1000)):
        ref = binomtest(k, n).proportion_ci(0.9, method="wilson")
        assert proportion_ci(k, n, 0.9) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert all(math.isnan(v) for v in proportion_ci(0, 0))


def test_a_shift_between_validation_and_test_is_a_plain_warning() -> None:
    val = {"auc": 0.994, "auc_ci": [0.990, 0.997], "n_per_class": {"normal": 500, "pneumonia": 500}}
    test = {"auc": 0.962, "auc_ci": [0.950, 0.972], "n_per_class": {"normal": 700, "pneumonia": 300}}
    found = shift_warnings(val, test, "image")
    assert len(found) == 3 and "AUC 0.994" in found[0] and "test AUC 0.962" in found[0]
    assert any("class pneumonia is 50.0% of validation and 30.0% of test" in w for w in found)
    same = {"auc": 0.990, "auc_ci": [0.985, 0.995], "n_per_class": {"normal": 480, "pneumonia": 520}}
    assert shift_warnings(val, same, "image") == []

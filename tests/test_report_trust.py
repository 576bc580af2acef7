"""Reports that do not mislead: checkpoint selection that ignores noise-level AUC gains, and the rules behind it."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import tiny_recipe

from medvision.data.dataset import measure_image
from medvision.evaluation import (
    TEMPERATURE_RANGE,
    Decision,
    SplitOutputs,
    clinical_metrics,
    fit_decision,
    image_shift_warnings,
    image_summary,
    judged_temperature,
    shift_warnings,
    temperature_at_bound,
)
from medvision.intervals import mean_ci, proportion_ci
from medvision.metrics import MetricWarning
from medvision.recipe import EvalConfig, recipe_from_dict
from medvision.report import _at_point, _metric_rows, build_report, ci_note, roc_markers, temperature_fact
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


def test_a_temperature_at_the_end_of_its_range_is_flagged_in_the_record_the_log_and_the_report() -> None:
    """Logits 100x too timid ask for T = 0.01, below the range searched: the record, a warning and the report's
    facts and warnings say the temperature is the range's limit and what that does to new images."""
    logits, y = _logits(400, 0.01, 3)
    with pytest.warns(MetricWarning, match="lower end of the range searched"):
        t, record = judged_temperature(logits, y)
    assert t == pytest.approx(TEMPERATURE_RANGE[0]) and temperature_at_bound(t) == "lower"
    assert "errors can be confident" in record["at_bound"] and "kept_t1" not in record
    with pytest.warns(MetricWarning, match="upper end"):
        t, record = judged_temperature(*_logits(400, 100.0, 3))
    assert t == pytest.approx(TEMPERATURE_RANGE[1]) and "right answers can look unsure" in record["at_bound"]
    for scale in (0.5, 1.0, 3.0):  # an inside optimum: nothing flagged
        t, record = judged_temperature(*_logits(2000, scale, 4))
        assert not temperature_at_bound(t) and "at_bound" not in record
    decision = Decision(temperature=0.05, calibration={"temperature_fitted": 0.05, "at_bound": "the fitted x"})
    assert temperature_fact(decision).endswith("Warning: the fitted x")
    assert Decision.from_json(decision.to_json()).calibration["at_bound"] == "the fitted x"


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


def test_a_single_class_test_split_reads_undefined_not_a_number_in_the_report() -> None:
    logits, y = _logits(200, 1.0, 2)
    val = SplitOutputs(logits=logits[:100], labels=y[:100], groups=[f"p{i}" for i in range(100)])
    ones = y[100:] == 1
    test = SplitOutputs(
        logits=logits[100:][ones], labels=y[100:][ones], groups=[f"q{i}" for i in range(int(ones.sum()))]
    )
    cfg = EvalConfig(bootstrap=50)
    decision = fit_decision(val, ["neg", "pos"], cfg)
    clinical = clinical_metrics({"val": val, "test": test}, ["neg", "pos"], cfg, decision)
    assert any("AUC is undefined" in w for w in clinical["image"]["test"]["warnings"])  # the report lists why
    rows = {r[1]: r for r in _metric_rows(clinical)}
    assert rows["test"][3] == "undefined" and rows["test"][4].startswith("0.")  # no AUC; accuracy still has one
    assert rows["val (selection split: optimistic)"][3] != "undefined"
    assert "Wilson's interval" in ci_note(clinical, cfg)


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


def test_t_interval_of_a_mean_matches_scipy() -> None:
    from scipy.stats import ttest_1samp

    x = np.random.default_rng(0).normal(0.4, 0.1, 37)
    ref = ttest_1samp(x, 0.0).confidence_interval(0.9)
    assert mean_ci(x, 0.9) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert mean_ci(np.full(5, 28.0)) == (28.0, 28.0)
    assert all(math.isnan(v) for v in mean_ci(np.array([0.5])))


def _images(n: int, intensity: tuple[float, float], size: float = 64.0, size_sd: float = 0.0,
            seed: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
    rng = np.random.default_rng(seed)
    side = np.round(rng.normal(size, size_sd, n)) if size_sd else np.full(n, size)
    return {"mean_intensity": rng.normal(*intensity, n), "height": side, "width": side.copy()}


def _shifts(val: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> list[str]:
    return image_shift_warnings(image_summary(val), image_summary(test))


def test_darker_test_images_are_a_shift_that_names_the_measure() -> None:
    found = _shifts(_images(300, (0.512, 0.06)), _images(300, (0.431, 0.06), seed=1))
    assert len(found) == 1 and found[0].startswith("shift, images: mean intensity 0.5")
    assert "on validation vs 0.4" in found[0] and "beyond their 95% CIs" in found[0] and "darker" in found[0]


def test_the_same_distribution_is_no_shift() -> None:
    assert _shifts(_images(300, (0.5, 0.1), 512, 40), _images(300, (0.5, 0.1), 512, 40, seed=1)) == []


def test_a_difference_of_a_hundredth_of_an_sd_in_10000_images_is_no_shift() -> None:
    val, test = _images(10_000, (0.5, 0.1)), _images(10_000, (0.5, 0.1), seed=1)
    test["mean_intensity"] = val["mean_intensity"] + 0.001  # 1% of the SD
    assert _shifts(val, test) == []
    test["mean_intensity"] = val["mean_intensity"] + 0.005  # the CIs part at 5% of an SD, but it is not material
    a, b = image_summary(val)["mean_intensity"]["ci"], image_summary(test)["mean_intensity"]["ci"]
    assert a[1] < b[0] and _shifts(val, test) == []
    flat = {**val, "mean_intensity": np.random.default_rng(2).normal(0.5, 0.0005, 10_000)}
    assert _shifts(flat, {**flat, "mean_intensity": flat["mean_intensity"] + 0.005}) == []  # d 10, under 0.01


def test_constant_sizes_never_warn_and_different_sizes_do() -> None:
    assert _shifts(_images(500, (0.5, 0.1)), _images(40, (0.5, 0.1), seed=1)) == []  # MedMNIST: all 64 x 64
    assert _shifts(_images(500, (0.5, 0.1), 512), _images(500, (0.5, 0.1), 511, seed=1)) == []  # a 1 px crop
    found = _shifts(_images(200, (0.5, 0.1), 64), _images(200, (0.5, 0.1), 96, seed=1))
    assert [w.split(" 64")[0] for w in found] == ["shift, images: height", "shift, images: width"]
    assert "64 px (64–64) on validation vs 96 px (96–96) on test" in found[0] and "larger" in found[0]
    found = _shifts(_images(200, (0.5, 0.1), 512, 40), _images(200, (0.5, 0.1), 420, 40, seed=1))
    assert len(found) == 2 and "Cohen's d -2." in found[0] and "smaller" in found[0]


def test_a_patients_images_count_once_for_the_image_shift() -> None:
    rng = np.random.default_rng(0)
    patients = [f"p{i}" for i in range(4) for _ in range(50)]

    def split(means: list[float]) -> dict[str, np.ndarray]:  # 4 patients (scanners, stains), 50 images each
        return {**_images(200, (0.0, 0.01)), "mean_intensity": np.repeat(means, 50) + rng.normal(0, 0.01, 200)}

    val, test = split([0.47, 0.52, 0.57, 0.62]), split([0.44, 0.49, 0.54, 0.59])
    assert len(_shifts(val, test)) == 1  # 200 independent images each would be a shift
    grouped = image_summary(val, 0.95, patients), image_summary(test, 0.95, patients)
    assert grouped[0]["mean_intensity"]["n"] == 4 and grouped[0]["mean_intensity"]["images"] == 200
    assert image_shift_warnings(*grouped) == []  # 4 patients each are not
    test = split([0.24, 0.29, 0.34, 0.39])
    assert "(means of 4 and 4 patients, Cohen's d" in image_shift_warnings(
        grouped[0], image_summary(test, 0.95, patients))[0]  # fmt: skip


def test_image_measures_are_on_the_0_1_scale_before_resizing() -> None:
    grey16 = np.full((30, 40), 65535 // 4, np.uint16)
    assert measure_image(grey16, "dtype") == pytest.approx({"mean_intensity": 0.25, "height": 30, "width": 40},
                                                           abs=1e-4)  # fmt: skip
    rgba = np.zeros((8, 6, 4), np.uint8)
    rgba[..., 3] = 255  # alpha is not intensity
    assert measure_image(rgba, "dtype") == {"mean_intensity": 0.0, "height": 8, "width": 6}


def test_darker_larger_test_images_warn_in_metrics_log_and_report(tiles_manifest: Path, tmp_path: Path) -> None:
    from medvision.tasks.train import train

    with tiles_manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    (tmp_path / "test").mkdir()
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "patient_id", "split"])
        for row in rows:
            p = int(row["patient_id"][1:])
            split, path = ("train" if p < 6 else "val" if p < 9 else "test"), tiles_manifest.parent / row["path"]
            if split == "test":  # another scanner: darker, and 96 px instead of 64
                image = cv2.imread(str(path))
                path = tmp_path / "test" / path.name
                cv2.imwrite(str(path), cv2.resize((image * 0.6).astype(np.uint8), (96, 96)))
            writer.writerow([str(path), row["label"], row["patient_id"], split])
    phases = [{"name": "head", "epochs": 1, "trainable": "head", "lr": 1e-2}]
    run = train(recipe_from_dict(tiny_recipe(manifest, tmp_path / "runs", phases=phases)))
    metrics = json.loads((run / "metrics.json").read_text())
    shifts = [w for w in metrics["image"]["test"]["warnings"] if w.startswith("shift, images")]
    assert [w.split(" ")[2] for w in shifts] == ["mean", "height", "width"]
    assert "on validation vs 96 px (96–96) on test" in shifts[1]
    stats = metrics["image"]["val"]["image_stats"]
    assert stats["height"]["mean"] == 64 and stats["mean_intensity"]["images"] == 18  # of 3 patients
    assert stats["mean_intensity"]["n"] == 3 and "means of 3 and 3 patients" in shifts[0]
    assert metrics["image"]["test"]["image_stats"]["mean_intensity"]["mean"] < stats["mean_intensity"]["mean"] - 0.1
    log, html = (run / "train.log").read_text(), (run / "report.html").read_text()
    for warning in shifts:
        assert warning in log and warning.split(";")[0] in html


def test_the_ci_note_says_which_levels_intervals_to_quote() -> None:
    """Image (tile) level CIs draw a patient's images (a slide's tiles) together; with several images a patient
    the report says so and points at the patient (slide) level, where each patient counts once."""
    cfg = EvalConfig()
    several = {"patient": {"aggregate": "mean", "test": {"images_per_patient": 6.0}}, "unit": "patient"}
    text = ci_note(several, cfg)
    assert "image-level CIs resample patients, not images" in text and "quote the patient level" in text
    one = {"patient": {"aggregate": "mean", "test": {"images_per_patient": 1}}, "unit": "patient"}
    assert "not shown" in ci_note(one, cfg) and "quote" not in ci_note(one, cfg)
    slides = {"patient": {"aggregate": "mean", "test": {"images_per_patient": 40.0}}, "unit": "slide"}
    text = ci_note(slides, cfg)
    assert "tile-level CIs resample slides, not tiles" in text and "quote the slide level" in text
    assert "`mean` of its tile probabilities" in text


def test_nan_probabilities_make_every_metric_of_their_split_nan_and_warnings_name_split_and_level() -> None:
    """An arg-max of NaN is class 0: accuracy 0.4, AP and ECE looked real where 9 of 10 probabilities were NaN."""
    y = np.array([0, 1] * 5)
    logits = np.full((10, 2), np.nan)
    logits[0] = (1.0, 0.0)
    outputs = {"test": SplitOutputs(logits=logits, labels=y, groups=[f"p{i}" for i in range(10)])}
    decision = Decision(temperature=1.0, positive=1, points={"image": [], "patient": []})
    clinical = clinical_metrics(outputs, ["neg", "pos"], EvalConfig(bootstrap=20), decision)
    test = clinical["image"]["test"]
    assert test["n"] == 10 and math.isnan(test["auc"]) and math.isnan(test["acc"])
    assert set(test) <= {"n", "auc", "acc", "warnings"}  # nothing else that could read as a result
    assert test["warnings"] == ["test split, per image: the probabilities of 9 of 10 cases are NaN or Inf; every "
                                "metric is NaN"]  # fmt: skip


def test_mixed_label_patients_are_a_warning_and_one_class_splits_say_nan_for_ap() -> None:
    logits, y = _logits(40, 2.0, 2)
    groups = [f"p{i // 4}" for i in range(40)]  # 10 patients of 4 images
    y = np.tile([0, 0, 0, 1], 10)  # every patient has both classes
    outputs = {"test": SplitOutputs(logits=logits, labels=y, groups=groups)}
    decision = Decision(temperature=1.0, positive=1, points={"image": [], "patient": []})
    clinical = clinical_metrics(outputs, ["neg", "pos"], EvalConfig(bootstrap=20), decision)  # warnings recorded
    patient = clinical["patient"]["test"]
    assert patient["mixed_label_patients"] == 10
    assert "test split, per patient: 10 of the 10 patients have images of more than one class; each takes the " \
           "positive class `pos`" in patient["warnings"]  # fmt: skip
    assert math.isnan(patient["auc"]) and math.isnan(patient["average_precision"])  # every patient positive


def test_an_unreachable_specificity_calls_every_case_negative_and_says_so() -> None:
    from medvision.metrics import operating_point, roc_points

    y = np.array([0, 1, 0, 1, 0])
    score = np.array([0.99, 0.8, 0.5, 0.4, 0.1])  # the top case is a negative: no observed score gives 0.97
    with pytest.warns(MetricWarning, match="no score reaches specificity 0.97 on validation"):
        t = operating_point(y, score, "specificity", 0.97)
    assert t > 0.99 and not (score >= t).any()  # specificity 1.0 on validation, not 0.67 at t = 0.99
    _, _, spec = roc_points(y, score)
    assert spec[0] < 0.97


def test_delong_cis_stay_in_0_1_and_calibration_off_is_said() -> None:
    from medvision.intervals import delong_test

    y = np.array([0] * 5 + [1] * 5)
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.85, 0.8, 0.9, 0.95, 0.97, 0.99])
    out = delong_test(y, score, score)
    assert 0.0 <= out["ci_a"][0] <= out["auc_a"] <= out["ci_a"][1] <= 1.0
    off = temperature_fact(Decision(temperature=1.0, positive=1, points={}, calibration={}))
    assert "not calibrated" in off and "fitted" not in off


def test_tta_fact_and_reliability_caption_say_no_temperature_when_none_was_fitted(tmp_path: Path) -> None:
    """With evaluation.calibrate off, or T = 1 kept, the report neither says the averaged probabilities are calibrated
    nor captions the reliability figure as before and after a temperature scaling that did not happen."""
    logits, y = _logits(200, 3.0, 5)
    val = SplitOutputs(logits=logits[:100], labels=y[:100], groups=[f"p{i}" for i in range(100)])
    test = SplitOutputs(logits=logits[100:], labels=y[100:], groups=[f"q{i}" for i in range(100)])
    classes = ["neg", "pos"]
    meta = {"name": "tta", "classes": classes, "model": "m", "in_chans": 3, "image_size": 32,
            "split_sizes": {"val": 100, "test": 100}}  # fmt: skip

    def said(cfg: EvalConfig, decision: Decision) -> tuple[str, str]:
        clinical = clinical_metrics({"val": val, "test": test}, classes, cfg, decision)
        blocks = build_report(tmp_path, meta, {}, clinical, test, "test", decision, [], cfg)
        facts = next(body for kind, body in blocks if kind == "ul")
        caption = next(body[1] for kind, body in blocks if kind == "img" and body[0] == "plots/reliability.png")
        return next(f for f in facts if f.startswith("test-time augmentation")), caption

    off = EvalConfig(bootstrap=0, tta=["hflip"], calibrate=False)
    fitted = fit_decision(val, classes, EvalConfig(bootstrap=0, tta=["hflip"]))
    assert "kept_t1" not in fitted.calibration and fitted.temperature != 1.0
    kept = Decision(temperature=1.0, positive=fitted.positive, points=fitted.points,
                    calibration={"kept_t1": "temperature 0.9 raised the ECE; T = 1 kept"})  # fmt: skip
    for decision in (fit_decision(val, classes, off), kept):
        tta, caption = said(off, decision)
        assert "probabilities averaged over the image and its hflip (2 views), the thresholds fitted" in tta
        assert "calibrated" not in tta and "temperature" not in tta
        assert caption == "Reliability (not calibrated: T = 1)"
    tta, caption = said(EvalConfig(bootstrap=0, tta=["hflip"]), fitted)  # a fitted temperature is still said
    assert "calibrated probabilities averaged" in tta and "the temperature and thresholds fitted" in tta
    assert caption == f"Reliability before and after temperature scaling (T = {fitted.temperature:.3f})"


def test_a_multiclass_operating_point_is_marked_as_its_class_against_the_rest() -> None:
    ops = [{"rule": "youden", "target": None, "sensitivity": 0.804, "specificity": 0.9},
           {"rule": "sensitivity", "target": 0.95, "sensitivity": math.nan, "specificity": 0.5}]  # fmt: skip
    assert roc_markers(ops, ["a", "b", "c"], 2) == [{"label": "c vs rest, Youden J", "fpr": pytest.approx(0.1),
                                                      "tpr": 0.804}]  # fmt: skip
    assert roc_markers(ops, ["neg", "pos"], 1)[0]["label"] == "Youden J"  # binary: the plot is the class's own

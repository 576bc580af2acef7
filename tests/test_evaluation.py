"""Clinical evaluation: decisions come from validation only; summaries at image and patient level."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from medvision.evaluation import Decision, SplitOutputs, clinical_metrics, fit_decision, positive_index
from medvision.metrics import MetricWarning, expected_calibration_error, softmax
from medvision.recipe import EvalConfig


def _binary_split(n: int, seed: int, scale: float = 3.0, per_patient: int = 1) -> SplitOutputs:
    """Over-confident binary logits (true temperature ``scale``) with ``per_patient`` images per patient."""
    rng = np.random.default_rng(seed)
    n_pat = n // per_patient
    y_pat = rng.integers(0, 2, n_pat)
    y = np.repeat(y_pat, per_patient)
    margin = 2.4 * (rng.normal(size=n) + 1.2 * (2 * y - 1)) * scale  # calibrated log-odds are 2.4 x
    logits = np.stack([-margin / 2, margin / 2], axis=1)
    groups = [f"p{i // per_patient}" for i in range(n)]
    return SplitOutputs(logits=logits, labels=y, groups=groups)


def test_decision_comes_from_validation_only() -> None:
    cfg = EvalConfig(bootstrap=0)
    val = _binary_split(400, 0)
    decision = fit_decision(val, ["benign", "malignant"], cfg)
    assert decision.positive == 1 and 2.0 < decision.temperature < 4.5  # over-confident by 3x
    thresholds = [op["threshold"] for op in decision.points["image"]]
    assert [op["rule"] for op in decision.points["image"]] == ["youden", "sensitivity", "specificity"]
    # the sensitivity point reaches >= 0.95 on validation, the specificity point >= 0.95 specificity
    p = val.probs(decision.temperature)[:, 1]
    assert (p[val.labels == 1] >= thresholds[1]).mean() >= 0.95
    assert (p[val.labels == 0] < thresholds[2]).mean() >= 0.95
    # test data goes through the same thresholds; changing test does not move them
    test_a, test_b = _binary_split(300, 1), _binary_split(300, 2)
    m_a = clinical_metrics({"test": test_a}, ["benign", "malignant"], cfg, decision)
    m_b = clinical_metrics({"test": test_b}, ["benign", "malignant"], cfg, decision)
    th_a = [op["threshold"] for op in m_a["image"]["test"]["operating_points"]]
    th_b = [op["threshold"] for op in m_b["image"]["test"]["operating_points"]]
    assert th_a == th_b == thresholds


def test_summary_matches_sklearn_and_calibration_improves() -> None:
    cfg = EvalConfig(bootstrap=200, bootstrap_seed=3)
    classes = ["benign", "malignant"]
    val, test = _binary_split(600, 10), _binary_split(600, 11)
    decision = fit_decision(val, classes, cfg)
    m = clinical_metrics({"val": val, "test": test}, classes, cfg, decision)
    s = m["image"]["test"]
    p = softmax(test.logits, decision.temperature)
    assert s["auc"] == pytest.approx(roc_auc_score(test.labels, p[:, 1]))
    assert s["acc"] == pytest.approx(accuracy_score(test.labels, p.argmax(1)))
    assert s["auc_ci"][0] < s["auc"] < s["auc_ci"][1]
    assert s["auc_ci_delong"][0] < s["auc"] < s["auc_ci_delong"][1]
    assert s["calibration"]["ece_after"] < s["calibration"]["ece_before"]
    assert s["calibration"]["ece_before"] == pytest.approx(
        expected_calibration_error(test.labels, softmax(test.logits))
    )
    for op in s["operating_points"]:
        assert op["sensitivity_ci"][0] <= op["sensitivity"] <= op["sensitivity_ci"][1]
        tn, fp = op["confusion_matrix"][0]
        assert op["specificity"] == pytest.approx(tn / (tn + fp))
    assert set(s["per_class"]) == set(classes) and "sensitivity_ci" in s["per_class"]["malignant"]
    assert m["bootstrap"] == {"resamples": 200, "seed": 3, "level": 0.95}
    # same seed, same CIs
    again = clinical_metrics({"test": test}, classes, cfg, decision)["image"]["test"]
    assert again["auc_ci"] == s["auc_ci"]


def test_patient_level_aggregates_images() -> None:
    cfg = EvalConfig(bootstrap=50, patient_aggregate="max")
    classes = ["benign", "malignant"]
    val, test = _binary_split(400, 20, per_patient=4), _binary_split(400, 21, per_patient=4)
    decision = fit_decision(val, classes, cfg)
    m = clinical_metrics({"test": test}, classes, cfg, decision)
    patient = m["patient"]["test"]
    assert patient["n"] == 100 and patient["images_per_patient"] == 4 and patient["mixed_label_patients"] == 0
    assert m["patient"]["aggregate"] == "max"
    p = softmax(test.logits, decision.temperature)[:, 1].reshape(100, 4).max(1)
    assert patient["auc"] == pytest.approx(roc_auc_score(test.labels[::4], p))
    assert decision.points["patient"] != decision.points["image"]  # chosen on patient-level validation scores


def test_multiclass_has_no_operating_points_unless_a_positive_class_is_named() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + 2 * np.eye(3)[y]
    out = SplitOutputs(logits, y, [str(i) for i in range(300)])
    classes = ["a", "b", "c"]
    plain = clinical_metrics({"test": out}, classes, EvalConfig(bootstrap=20), fit_decision(out, classes,
                                                                                            EvalConfig()))  # fmt: skip
    assert "operating_points" not in plain["image"]["test"]
    assert plain["image"]["test"]["auc_weighted"] == pytest.approx(
        roc_auc_score(y, softmax(logits, fit_decision(out, classes, EvalConfig()).temperature), multi_class="ovr",
                      average="weighted"))  # fmt: skip
    cfg = EvalConfig(bootstrap=20, positive_class="c")
    decision = fit_decision(out, classes, cfg)
    assert positive_index(classes, cfg) == 2 and decision.positive == 2
    named = clinical_metrics({"test": out}, classes, cfg, decision)["image"]["test"]
    assert named["positive_class"] == "c" and len(named["operating_points"]) == 3
    with pytest.raises(ValueError, match="'d' is not one of the classes"):
        positive_index(classes, EvalConfig(positive_class="d"))


def test_degenerate_splits_give_nan_and_warnings_not_crashes() -> None:
    classes = ["benign", "malignant"]
    cfg = EvalConfig(bootstrap=20)
    val = _binary_split(200, 30)
    decision = fit_decision(val, classes, cfg)
    only_negatives = SplitOutputs(val.logits[val.labels == 0], val.labels[val.labels == 0],
                                  [g for g, y in zip(val.groups, val.labels, strict=True) if y == 0])  # fmt: skip
    s = clinical_metrics({"test": only_negatives}, classes, cfg, decision)["image"]["test"]
    assert math.isnan(s["auc"]) and s["auc"] != 0.5
    assert any("one class" in w for w in s["warnings"])
    assert all(math.isnan(op["sensitivity"]) for op in s["operating_points"])
    nan_logits = SplitOutputs(np.full((10, 2), np.nan), np.array([0, 1] * 5), [str(i) for i in range(10)])
    s = clinical_metrics({"test": nan_logits}, classes, cfg, decision)["image"]["test"]
    assert math.isnan(s["auc"]) and any("NaN" in w for w in s["warnings"])
    empty = SplitOutputs(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), [])
    s = clinical_metrics({"test": empty}, classes, cfg, decision)["image"]["test"]
    assert s["n"] == 0 and math.isnan(s["auc"])
    with pytest.warns(MetricWarning, match="single class"):
        single_class_val = fit_decision(only_negatives, classes, cfg)
    assert all(math.isnan(op["threshold"]) for op in single_class_val.points["image"])


def test_decision_round_trips_through_json() -> None:
    decision = fit_decision(_binary_split(100, 40), ["a", "b"], EvalConfig())
    assert Decision.from_json(decision.to_json()) == decision
    assert Decision.from_json(None) == Decision()


def test_undefined_thresholds_survive_the_json_null() -> None:
    import json

    decision = Decision(temperature=1.5, positive=1, points={"image": [{"rule": "youden", "target": None,
                                                                         "threshold": math.nan}]})  # fmt: skip
    from medvision.report import _clean

    back = Decision.from_json(json.loads(json.dumps(_clean(decision.to_json()))))
    assert math.isnan(back.points["image"][0]["threshold"]) and back.temperature == 1.5


def test_a_first_positive_class_is_what_ap_and_operating_points_are_about() -> None:
    from sklearn.metrics import average_precision_score

    classes = ["malignant", "benign"]  # MedMNIST's BreastMNIST order: the finding is label 0
    cfg = EvalConfig(bootstrap=0, positive_class="malignant")
    val, test = _binary_split(300, 50), _binary_split(300, 51)
    decision = fit_decision(val, classes, cfg)
    assert decision.positive == 0
    s = clinical_metrics({"test": test}, classes, cfg, decision)["image"]["test"]
    p = softmax(test.logits, decision.temperature)
    assert s["average_precision"] == pytest.approx(average_precision_score(test.labels == 0, p[:, 0]))
    youden = s["operating_points"][0]
    called = p[:, 0] >= youden["threshold"]
    assert youden["sensitivity"] == pytest.approx(called[test.labels == 0].mean())


def test_image_level_cis_draw_whole_patients_and_equal_the_image_bootstrap_with_one_image_each() -> None:
    """A patient's images are not independent: the image-level bootstrap draws patients whole (a cluster
    bootstrap), so 8 near-copies of each patient's image do not narrow the interval as 8 patients would. With one
    image a patient it draws exactly the resamples of images one by one."""
    from medvision.intervals import bootstrap_cis
    from medvision.metrics import compute_auc

    cfg, classes = EvalConfig(bootstrap=300, bootstrap_seed=5), ["benign", "malignant"]
    one = _binary_split(48, 21)
    rng = np.random.default_rng(0)  # each patient's image 8 times, barely changed: 48 patients, 384 images
    copies = SplitOutputs(logits=np.repeat(one.logits, 8, axis=0) + rng.normal(0, 0.01, (384, 2)),
                          labels=np.repeat(one.labels, 8), groups=list(np.repeat(one.groups, 8)))  # fmt: skip
    decision = Decision(positive=1)
    s_one = clinical_metrics({"test": one}, classes, cfg, decision)["image"]["test"]
    s_copies = clinical_metrics({"test": copies}, classes, cfg, decision)["image"]["test"]
    p = copies.probs()
    assert s_copies["auc_ci"] == pytest.approx(list(bootstrap_cis(copies.labels, p, {"auc": compute_auc}, 300, 5,
                                                                    groups=copies.groups)["auc"]))  # fmt: skip
    by_image = bootstrap_cis(copies.labels, p, {"auc": compute_auc}, 300, 5)["auc"]
    width = {"one": np.diff(s_one["auc_ci"])[0], "copies": np.diff(s_copies["auc_ci"])[0],
             "copies, images one by one": by_image[1] - by_image[0]}  # fmt: skip
    assert width["copies"] > 2 * width["copies, images one by one"]  # sqrt(8) narrower when counted as 384
    assert width["copies"] == pytest.approx(width["one"], rel=0.25)  # as wide as the 48 patients it has
    plain = bootstrap_cis(one.labels, one.probs(), {"auc": compute_auc}, 300, 5)["auc"]
    assert s_one["auc_ci"] == pytest.approx(list(plain))  # one image a patient: the same resamples


def test_a_patients_slides_are_drawn_together_at_the_tile_and_the_slide_level() -> None:
    """Tiles aggregate to slides, and a patient has two slides: the slide-level bootstrap draws a patient's slides
    together, the tile-level one a patient's tiles; a slide run without patient ids draws slides whole."""
    from medvision.intervals import bootstrap_cis
    from medvision.metrics import aggregate_by_group, compute_auc

    rng = np.random.default_rng(3)
    n_pat, tiles = 20, 5
    y_pat = np.arange(n_pat) % 2
    slides = [f"s{i // tiles}" for i in range(n_pat * 2 * tiles)]  # 40 slides of 5 tiles
    patients = [f"p{i // (2 * tiles)}" for i in range(n_pat * 2 * tiles)]  # two slides a patient
    y = np.repeat(y_pat, 2 * tiles)
    margin = rng.normal(size=len(y)) + np.repeat(rng.normal(size=n_pat), 2 * tiles) + 0.8 * (2 * y - 1)
    out = SplitOutputs(np.stack([-margin / 2, margin / 2], 1), y, slides, patients=patients)
    cfg, classes = EvalConfig(bootstrap=200, bootstrap_seed=2, patient_aggregate="mean"), ["normal", "tumour"]
    m = clinical_metrics({"test": out}, classes, cfg, Decision(positive=1), unit="slide")
    p = out.probs()
    tile_ci = bootstrap_cis(y, p, {"auc": compute_auc}, 200, 2, groups=patients)["auc"]
    assert m["image"]["test"]["auc_ci"] == pytest.approx(list(tile_ci))
    ids, y_slide, p_slide, _ = aggregate_by_group(slides, y, p, "mean")
    slide_patients = [f"p{int(s[1:]) // 2}" for s in ids]
    slide_ci = bootstrap_cis(y_slide, p_slide, {"auc": compute_auc}, 200, 2, groups=slide_patients)
    assert m["patient"]["test"]["auc_ci"] == pytest.approx(list(slide_ci["auc"]))
    assert 0.6 < m["patient"]["test"]["auc"] < 1 and out.bootstrap_groups("patient") == slide_patients
    one_by_one = bootstrap_cis(y_slide, p_slide, {"auc": compute_auc}, 200, 2)["auc"]
    assert m["patient"]["test"]["auc_ci"] != pytest.approx(list(one_by_one))
    no_patients = SplitOutputs(out.logits, y, slides)
    assert no_patients.bootstrap_groups("image") == slides and no_patients.bootstrap_groups("patient") is None

"""From model outputs to the numbers a clinician asks for: CIs, operating points, calibration, patients.

Everything that is *chosen* is chosen on the validation split and then applied, unchanged, to test
(and later to ``evaluate`` and ``score``): the softmax temperature and the operating-point
thresholds. They form a ``Decision`` that is stored in the run's ``run.json``. Test data never
influences a threshold.

Every summary is computed twice: per image (or patch) and per patient (or slide), after
aggregating each patient's probabilities as the recipe says. The functions here are pure: arrays
and the recipe's ``evaluation`` section in, JSON-ready dicts out.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medvision.intervals import (
    Rate,
    accuracy_rate,
    bootstrap_cis,
    ci_methods,
    delong_test,
    mean_ci,
    proportion_ci,
    proportion_cis,
)
from medvision.metrics import (
    MetricWarning,
    aggregate_by_group,
    average_precision,
    balanced_accuracy,
    brier_score,
    compute_accuracy,
    compute_auc,
    confusion_matrix,
    expected_calibration_error,
    lacks_a_class,
    operating_point,
    per_class_metrics,
    round_significant,
    tta_softmax,
)
from medvision.recipe import EvalConfig, RecipeError

LEVELS = ("image", "patient")
MIN_CLASS_COUNT = 10
"""A split with fewer samples than this of a class gets a warning in metrics.json and the report."""
IMAGE_MEASURES = ("mean_intensity", "height", "width")
"""What :func:`image_shift_warnings` compares: each image's mean intensity on the 0-1 scale the model reads
(after ``data.intensity``, before resizing and normalisation), and its height and width in pixels as decoded."""
MIN_EFFECT = 0.2
"""|Cohen's d| below this is no image shift, however many images show it (Cohen's "small" effect)."""
MIN_INTENSITY_CHANGE = 0.01
"""Mean intensities closer than this (1% of the 0-1 range, 2.5 grey levels of 8 bits) are no shift."""
MIN_SIZE_CHANGE = 0.01
"""Mean heights or widths closer than this fraction of the larger one (5 px of 512) are no shift."""


@dataclass
class SplitOutputs:
    """A split's raw model outputs: logits (N, K), labels (N,), and each row's patient (or slide) id."""

    logits: np.ndarray
    labels: np.ndarray
    groups: list[str]
    unit_probs: np.ndarray | None = None
    """Per-group probabilities made by a model of their own (attention MIL over a slide's tiles), in the
    groups' first-seen order; they replace the aggregation of the image probabilities."""
    views: np.ndarray | None = None
    """With test-time augmentation: (N, V, K) logits of the image (``logits``) and its transformed views."""
    patients: list[str] | None = None
    """Each row's patient where rows aggregate to something else (a tile's slide, in ``groups``), so that every
    bootstrap draws a patient's rows, and slides, together. None: ``groups`` are the patients."""

    def bootstrap_groups(self, level: str) -> list[str] | None:
        """What the bootstrap of ``level`` draws whole (:func:`bootstrap_groups`)."""
        return bootstrap_groups(self.groups, self.patients, level)

    def probs(self, temperature: float = 1.0) -> np.ndarray:
        """Calibrated probabilities (N, K): softmax(logits / T), averaged over the TTA views when there are any, to
        the digits ``predictions.csv`` keeps (:data:`~medvision.metrics.PROB_DIGITS`): the metrics are the file's."""
        return round_significant(tta_softmax(self.views if self.views is not None else self.logits, temperature))


def bootstrap_groups(groups: list[str], patients: list[str] | None, level: str) -> list[str] | None:
    """What the bootstrap of ``level`` draws whole, from each row's unit (``groups``: its patient, or its slide)
    and, where the units are slides, its patient: at the image level each row's patient; at the unit level each
    unit's patient (units in first-seen order, as :func:`~medvision.metrics.aggregate_by_group` lists them), or
    None where the units are the patients themselves."""
    if level == "image":
        return patients if patients is not None else groups
    if patients is None:
        return None
    first: dict[str, str] = {}
    for unit, patient in zip(groups, patients, strict=True):
        first.setdefault(unit, patient)
    return list(first.values())


@dataclass
class Decision:
    """What validation decided, stored in ``run.json`` and reused by ``evaluate`` and ``score``."""

    temperature: float = 1.0
    positive: int | None = None
    points: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Per level (``image``, ``patient``): ``{rule, target, threshold}`` on the positive-class probability."""
    calibration: dict[str, Any] = field(default_factory=dict)
    """How the temperature was judged: the validation ECE before and after it, cross-fitted, and why T = 1
    was kept when it made things worse."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Decision:
        """Reads ``run.json``'s record back; an undefined threshold was written as null and is NaN again."""
        if not data:
            return cls()
        points = {level: [{**op, "threshold": math.nan if op["threshold"] is None else op["threshold"]} for op in ops]
                  for level, ops in data.get("points", {}).items()}  # fmt: skip
        return cls(
            temperature=data["temperature"],
            positive=data["positive"],
            points=points,
            calibration=data.get("calibration", {}),
        )


def positive_index(classes: list[str], cfg: EvalConfig) -> int | None:
    """The class operating points are about: ``evaluation.positive_class``, else the second of two."""
    if cfg.positive_class is None:
        return 1 if len(classes) == 2 else None
    if cfg.positive_class not in classes:
        raise RecipeError(f"evaluation.positive_class {cfg.positive_class!r} is not one of the classes {classes}")
    return classes.index(cfg.positive_class)


def level_arrays(
    out: SplitOutputs, temperature: float, level: str, cfg: EvalConfig, positive: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(labels, calibrated probs, uncalibrated probs, patients with mixed labels) at image or patient level; two
    classes are aggregated for ``positive`` (:func:`positive_index`; None: the second class)."""
    calibrated, raw = out.probs(temperature), out.probs()
    if level == "image":
        return out.labels, calibrated, raw, 0
    if out.unit_probs is not None:  # a slide-level model: its probabilities, the slides' labels
        _, y, _, mixed = aggregate_by_group(out.groups, out.labels, calibrated, "mean", positive=positive)
        return y, out.unit_probs, out.unit_probs, mixed
    how = (cfg.patient_aggregate, cfg.top_k, positive)
    _, y, p_cal, mixed = aggregate_by_group(out.groups, out.labels, calibrated, *how)
    _, _, p_raw, _ = aggregate_by_group(out.groups, out.labels, raw, *how)
    return y, p_cal, p_raw, mixed


def fit_decision(val: SplitOutputs, classes: list[str], cfg: EvalConfig) -> Decision:
    """Temperature and operating-point thresholds, all from the validation split."""
    temperature, calibration = 1.0, dict[str, Any]()
    if cfg.calibrate and len(val.labels) > 0:
        temperature, calibration = judged_temperature(val.views if val.views is not None else val.logits, val.labels)
    positive = positive_index(classes, cfg)
    points: dict[str, list[dict[str, Any]]] = {}
    if positive is not None:
        for level in LEVELS:
            y, p, _, _ = level_arrays(val, temperature, level, cfg, positive)
            is_pos = y == positive
            both = bool(is_pos.any() and not is_pos.all())
            if not both:
                warnings.warn(
                    f"{level}-level validation split has a single class; operating points are undefined (NaN)",
                    MetricWarning,
                    stacklevel=2,
                )
            points[level] = [
                {"rule": op.rule, "target": op.target,
                 "threshold": operating_point(is_pos, p[:, positive], op.rule, op.target) if both else math.nan}
                for op in cfg.operating_points
            ]  # fmt: skip
    return Decision(temperature=temperature, positive=positive, points=points, calibration=calibration)


TEMPERATURE_RANGE = (0.05, 20.0)
"""Where :func:`fit_temperature` searches: a temperature at either end is the range's limit, not an optimum."""


def temperature_at_bound(t: float) -> str:
    """``"lower"`` or ``"upper"`` when a fitted temperature is (within the search's precision) an end of
    :data:`TEMPERATURE_RANGE`, else ``""``."""
    for end, name in zip(TEMPERATURE_RANGE, ("lower", "upper"), strict=True):
        if abs(np.log(t) - np.log(end)) < 1e-6:
            return name
    return ""


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature T > 0 minimising validation NLL of softmax(logits / T) (golden-section on log T).

    (N, V, K) logits of test-time-augmentation views are fitted as they are used: the NLL of the
    views' averaged calibrated probabilities (:func:`tta_softmax`).
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true).ravel()

    def nll(log_t: float) -> float:
        if z.ndim == 3:
            p = tta_softmax(z, float(np.exp(log_t)))[np.arange(len(y)), y]
            return float(-np.log(np.maximum(p, 1e-300)).mean())
        scaled = z / np.exp(log_t)
        scaled -= scaled.max(axis=1, keepdims=True)
        logp = scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean())

    lo, hi = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(80):
        m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(m1) < nll(m2):
            hi = m2
        else:
            lo = m1
    return float(np.exp((lo + hi) / 2))


def judged_temperature(logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[float, dict[str, Any]]:
    """A temperature fitted on validation, kept only if it lowers the validation ECE when judged honestly.

    The validation set is cut in two halves, stratified by label; a temperature fitted on each half is judged
    by the ECE of the other half before and after it (cross-fitting: never on the cases it was fitted to).
    When the mean ECE after is not lower than before, temperature scaling would make the probabilities worse,
    so T = 1 is kept and the record says why; otherwise T is fitted on the whole validation split.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    half = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        half[idx[: len(idx) // 2]] = True
    full = fit_temperature(logits, labels)
    if half.sum() < 10 or (~half).sum() < 10:
        return full, _flag_bound(full, {"temperature_fitted": full,
                                        "rule": "fitted on validation (too few cases to cross-fit)"})  # fmt: skip
    before, after = [], []
    for fit_part, judge in ((half, ~half), (~half, half)):
        t = fit_temperature(logits[fit_part], labels[fit_part])
        before.append(expected_calibration_error(labels[judge], tta_softmax(logits[judge], 1.0)))
        after.append(expected_calibration_error(labels[judge], tta_softmax(logits[judge], t)))
    record: dict[str, Any] = {"temperature_fitted": full, "val_ece_before": float(np.mean(before)),
                              "val_ece_after": float(np.mean(after)),
                              "rule": "2-fold cross-fitted on validation"}  # fmt: skip
    if not record["val_ece_after"] < record["val_ece_before"]:
        ece = f"{record['val_ece_before']:.3f} to {record['val_ece_after']:.3f}"
        record["kept_t1"] = f"temperature {full:.3f} raised the cross-fitted validation ECE from {ece}; T = 1 kept"
        return 1.0, record
    return full, _flag_bound(full, record)


def _flag_bound(t: float, record: dict[str, Any]) -> dict[str, Any]:
    """Adds ``at_bound`` (and warns) when the kept temperature is an end of the range it was searched in.

    Validation then asked for more sharpening (or softening) than the range allows: the model's confidence differs
    so much from image to image that one temperature cannot calibrate it, and on new images its errors can be
    confident (lower end) or its right answers timid (upper end)."""
    end = temperature_at_bound(t)
    if end:
        lo, hi = TEMPERATURE_RANGE
        record["at_bound"] = (
            f"the fitted temperature {t:.3g} is the {end} end of the range searched ({lo:g} to {hi:g}); one "
            f"temperature cannot calibrate this model on validation, and its probabilities on new images are "
            + ("sharpened that much: its errors can be confident" if end == "lower"
               else "flattened that much: its right answers can look unsure")
        )  # fmt: skip
        warnings.warn(f"calibration: {record['at_bound']}", MetricWarning, stacklevel=3)
    return record


def _at_threshold(y_pos: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, Any]:
    """Binary metrics when ``score >= threshold`` calls positive; the matrix is [[TN, FP], [FN, TP]].

    An undefined threshold (validation had a single class) leaves every metric NaN, not 0."""
    if not math.isfinite(threshold):
        nan = math.nan
        return {
            "sensitivity": nan,
            "specificity": nan,
            "ppv": nan,
            "npv": nan,
            "f1": nan,
            "accuracy": nan,
            "confusion_matrix": None,
        }
    pred = (score >= threshold).astype(np.int64)
    cm = confusion_matrix(y_pos.astype(np.int64), pred, 2)
    m = per_class_metrics(cm)[1]
    accuracy = float(np.trace(cm) / cm.sum()) if cm.sum() else math.nan
    return {"sensitivity": m["sensitivity"], "specificity": m["specificity"], "ppv": m["ppv"], "npv": m["npv"],
            "f1": m["f1"], "accuracy": accuracy, "confusion_matrix": cm.tolist()}  # fmt: skip


def _recall_of(k: int) -> Rate:
    return lambda y, p: (y == k, p.argmax(axis=1) == k)


def _specificity_of(k: int) -> Rate:
    return lambda y, p: (y != k, p.argmax(axis=1) != k)


def _threshold_rate(positive: int, threshold: float, of_positives: bool) -> Rate:
    def rate(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = ((y == positive) if of_positives else (y != positive)) & math.isfinite(threshold)
        called = p[:, positive] >= threshold
        return mask, called if of_positives else ~called

    return rate


def _accuracy_at(positive: int, threshold: float) -> Rate:
    def rate(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = np.full(len(y), math.isfinite(threshold))
        return mask, (p[:, positive] >= threshold) == (y == positive)

    return rate


def split_summary(
    y: np.ndarray,
    probs: np.ndarray,
    probs_uncalibrated: np.ndarray,
    classes: list[str],
    cfg: EvalConfig,
    decision: Decision,
    level: str,
    groups: list[str] | None = None,
) -> dict[str, Any]:
    """Every metric of one split at one level, with bootstrap CIs; warnings are collected, not lost. ``groups``
    (each row's patient or slide) makes the bootstrap draw whole groups: a patient's images are not independent."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        out = _summary(y, probs, probs_uncalibrated, classes, cfg, decision, level, groups)
    messages = sorted({str(w.message) for w in caught if issubclass(w.category, MetricWarning)})
    if messages:
        out["warnings"] = messages
    return out


def _summary(
    y: np.ndarray, probs: np.ndarray, raw: np.ndarray, classes: list[str], cfg: EvalConfig, decision: Decision,
    level: str, groups: list[str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    k = len(classes)
    n = len(y)
    if n == 0:
        warnings.warn(f"{level}-level split is empty; every metric is NaN", MetricWarning, stacklevel=3)
        return {"n": 0, "auc": math.nan, "acc": math.nan}
    if not np.all(np.isfinite(probs)):  # an arg-max of NaN is class 0: accuracy and the rest would look real
        bad = int((~np.isfinite(probs)).any(axis=1).sum())
        warnings.warn(f"the probabilities of {bad} of {n} cases are NaN or Inf; every metric is NaN", MetricWarning,
                      stacklevel=3)  # fmt: skip
        return {"n": n, "auc": math.nan, "acc": math.nan}
    pos = decision.positive
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, k)
    per = per_class_metrics(cm)
    out: dict[str, Any] = {
        "n": n,
        "n_per_class": {c: int((y == i).sum()) for i, c in enumerate(classes)},
        "auc": compute_auc(y, probs),
        "acc": compute_accuracy(y, probs),
        "balanced_acc": balanced_accuracy(y, pred, k),
    }
    if k > 2:
        out["auc_weighted"] = compute_auc(y, probs, "weighted")
        out["average_precision"] = (
            math.nan
            if lacks_a_class(y, k, "macro average precision")
            else float(np.mean([average_precision(y == i, probs[:, i]) for i in range(k)]))
        )
    else:
        p_pos = 1 if pos is None else pos
        out["average_precision"] = average_precision(y == p_pos, probs[:, p_pos])
        if groups is None or len(set(groups)) == len(groups):  # DeLong takes the cases as independent: not a
            delong = delong_test(y == p_pos, probs[:, p_pos], probs[:, p_pos], cfg.ci_level)  # patient's images
            out["auc_ci_delong"] = list(delong["ci_a"])
    out["calibration"] = {
        "temperature": decision.temperature,
        "ece_before": expected_calibration_error(y, raw),
        "ece_after": expected_calibration_error(y, probs),
        "brier_before": brier_score(y, raw),
        "brier_after": brier_score(y, probs),
    }
    out["per_class"] = {c: dict(per[i]) for i, c in enumerate(classes)}
    out["confusion_matrix"] = cm.tolist()

    rates: dict[str, Rate] = {"acc": accuracy_rate}
    for i in range(k):
        rates[f"sens{i}"], rates[f"spec{i}"] = _recall_of(i), _specificity_of(i)
    points = []
    if pos is not None:
        for j, op in enumerate(decision.points.get(level, [])):
            thr = op["threshold"]
            row = {**op, **_at_threshold(y == pos, probs[:, pos], thr)}
            points.append(row)
            rates[f"op{j}_sens"] = _threshold_rate(pos, thr, True)
            rates[f"op{j}_spec"] = _threshold_rate(pos, thr, False)
            rates[f"op{j}_acc"] = _accuracy_at(pos, thr)
    if cfg.bootstrap:
        cis = bootstrap_cis(y, probs, {"auc": compute_auc}, cfg.bootstrap, cfg.bootstrap_seed, cfg.ci_level,
                            groups=groups)  # fmt: skip
        every = {"acc", *(f"op{j}_acc" for j in range(len(points)))}  # over every case, not one class's
        cis.update(proportion_cis(y, probs, rates, every, cfg.bootstrap, cfg.bootstrap_seed, cfg.ci_level, groups))
        out["auc_ci"], out["acc_ci"] = list(cis["auc"]), list(cis["acc"])
        for i, c in enumerate(classes):
            out["per_class"][c]["sensitivity_ci"] = list(cis[f"sens{i}"])
            out["per_class"][c]["specificity_ci"] = list(cis[f"spec{i}"])
        for j, row in enumerate(points):
            row["sensitivity_ci"], row["specificity_ci"] = list(cis[f"op{j}_sens"]), list(cis[f"op{j}_spec"])
            row["accuracy_ci"] = list(cis[f"op{j}_acc"])
        out["ci_methods"] = ci_methods(groups)
    if pos is not None:
        out["positive_class"] = classes[pos]
        out["operating_points"] = points
    return out


def clinical_metrics(
    outputs: dict[str, SplitOutputs], classes: list[str], cfg: EvalConfig, decision: Decision, unit: str = "patient"
) -> dict[str, Any]:
    """``{"image": {split: summary}, "patient": {split: summary, ...}}`` for every split given.

    ``unit`` names what the second level aggregates to: ``patient``, or ``slide`` for whole-slide tiles
    (the key stays ``patient`` so that every run's metrics.json reads the same way)."""
    result: dict[str, Any] = {"image": {}, "patient": {"aggregate": cfg.patient_aggregate}, "unit": unit}
    if cfg.patient_aggregate == "topk":
        result["patient"]["top_k"] = cfg.top_k
    for split, out in outputs.items():
        for level in LEVELS:
            y, p_cal, p_raw, mixed = level_arrays(out, decision.temperature, level, cfg, decision.positive)
            # a row's patient (a slide's, for the slide level): the bootstrap draws them whole; one image a patient
            # draws exactly the resamples of images one by one
            summary = split_summary(y, p_cal, p_raw, classes, cfg, decision, level, out.bootstrap_groups(level))
            counted = "images" if level == "image" else f"{unit}s"
            where = f"{split} split, per {level if level == 'image' else unit}"
            if summary.get("warnings"):  # which split and level each is about, once the report lists them together
                summary["warnings"] = [f"{where}: {w}" for w in summary["warnings"]]
            if level == "patient" and mixed:
                rule = (f"takes the positive class `{classes[1 if decision.positive is None else decision.positive]}`"
                        if len(classes) == 2 else "takes its most common label")  # fmt: skip
                items = "tiles" if unit == "slide" else "images"
                summary.setdefault("warnings", []).append(
                    f"{where}: {mixed} of the {len(y)} {unit}s have {items} of more than one class; each {rule}"
                )
            few = {c: n for c, n in summary.get("n_per_class", {}).items() if n < MIN_CLASS_COUNT}
            if few:
                listed = ", ".join(f"{c} ({n})" for c, n in few.items())
                summary.setdefault("warnings", []).append(
                    f"{where}: fewer than {MIN_CLASS_COUNT} {counted} of class {listed}; its sensitivity, PPV and "
                    "their CIs rest on too few cases to trust"
                )
            if level == "patient":
                summary["images_per_patient"] = len(out.labels) / max(1, len(y))
                summary["mixed_label_patients"] = mixed
            result[level][split] = summary
    for level in LEVELS:
        val, test = result[level].get("val"), result[level].get("test")
        if isinstance(val, dict) and isinstance(test, dict):
            name = "image" if level == "image" else unit
            shifts = shift_warnings(val, test, name, cfg.ci_level)
            if shifts:
                test.setdefault("warnings", []).extend(shifts)
    result["bootstrap"] = {"resamples": cfg.bootstrap, "seed": cfg.bootstrap_seed, "level": cfg.ci_level}
    return result


def _apart(a: list[float] | None, b: list[float] | None) -> bool:
    """Whether two intervals are given, finite and do not overlap."""
    if not a or not b or not all(math.isfinite(v) for v in (*a, *b)):
        return False
    return a[1] < b[0] or b[1] < a[0]


def shift_warnings(val: dict[str, Any], test: dict[str, Any], level: str, ci_level: float = 0.95) -> list[str]:
    """Plain warnings when validation and test differ beyond their CIs: on AUC (bootstrap CIs), or in the share of
    a class (Wilson intervals). Either means the numbers chosen on validation (checkpoint, temperature,
    thresholds) may not carry over to test, or to the data the model will meet."""
    out = []
    if _apart(val.get("auc_ci"), test.get("auc_ci")):
        vc, tc = val["auc_ci"], test["auc_ci"]
        out.append(f"shift, per {level}: validation AUC {val['auc']:.3f} ({vc[0]:.3f}–{vc[1]:.3f}) and test AUC "
                   f"{test['auc']:.3f} ({tc[0]:.3f}–{tc[1]:.3f}) differ beyond their {ci_level:.0%} CIs; choices "
                   "made on validation may not carry over to test")  # fmt: skip
    nv, nt = val.get("n_per_class") or {}, test.get("n_per_class") or {}
    n_val, n_test = sum(nv.values()), sum(nt.values())
    for c in nv:
        if c not in nt or not n_val or not n_test:
            continue
        a, b = proportion_ci(nv[c], n_val, ci_level), proportion_ci(nt[c], n_test, ci_level)
        if _apart(list(a), list(b)):
            out.append(f"shift, per {level}: class {c} is {nv[c] / n_val:.1%} of validation and {nt[c] / n_test:.1%} "
                       f"of test, beyond their {ci_level:.0%} intervals; thresholds and PPV chosen on validation "
                       "assume its prevalence")  # fmt: skip
    return out


def image_summary(measures: dict[str, np.ndarray], ci_level: float = 0.95,
                  groups: list[str] | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """``{measure: {images, n, mean, sd, ci}}`` of a split's per-image measures (:data:`IMAGE_MEASURES`).

    With ``groups`` (each image's patient, or slide for tiles) each group's images are averaged first, and
    ``n``, the mean, SD and CI are over the groups: a patient's images, a slide's tiles, share a scanner and a
    stain, so counting them as independent would make the CI too narrow. The CI is the Student-t interval of
    the mean; values that are not finite (an image that did not decode) are left out.
    """
    out = {}
    for name, values in measures.items():
        x = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(x)
        images, x = int(ok.sum()), x[ok]
        if groups is not None and images:
            _, inverse = np.unique(np.asarray(groups)[ok], return_inverse=True)
            x = np.bincount(inverse, x) / np.bincount(inverse)
        out[name] = {
            "images": images,
            "n": len(x),
            "mean": float(x.mean()) if len(x) else math.nan,
            "sd": float(x.std(ddof=1)) if len(x) > 1 else math.nan,
            "ci": list(mean_ci(x, ci_level)),
        }
    return out


def cohens_d(a: dict[str, Any], b: dict[str, Any]) -> float:
    """(mean b - mean a) over the pooled SD of two :func:`image_summary` entries; ±inf when both splits are
    constant and differ, 0 when they are constant and equal."""
    n1, n2, diff = a["n"], b["n"], b["mean"] - a["mean"]
    pooled = math.sqrt(((n1 - 1) * a["sd"] ** 2 + (n2 - 1) * b["sd"] ** 2) / (n1 + n2 - 2)) if n1 + n2 > 2 else math.nan
    if pooled == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / pooled


def image_shift_warnings(val: dict[str, Any], test: dict[str, Any], what: str = "images", unit: str = "patient",
                         ci_level: float = 0.95) -> list[str]:  # fmt: skip
    """Plain warnings when validation and test images differ in mean intensity, height or width.

    A measure has shifted when all three hold: the CIs of the two means do not overlap (the difference is
    not noise); |Cohen's d| is at least :data:`MIN_EFFECT` (it is material: with 10,000 in each split the CIs part
    at a difference of 4% of an SD, which no one would call a shift); and the means differ by at least
    :data:`MIN_INTENSITY_CHANGE` on the 0-1 scale, or by :data:`MIN_SIZE_CHANGE` of the larger size (a
    1 px crop of otherwise constant sizes is no shift). Sizes that are all the same never warn.
    ``val`` and ``test`` are :func:`image_summary` results; ``what`` names the items (``images``, ``tiles``) and
    ``unit`` the groups they were averaged over (``patient``, ``slide``).
    """
    out = []
    for name in IMAGE_MEASURES:
        a, b = val.get(name), test.get(name)
        if not a or not b or not a["n"] or not b["n"] or not _apart(a["ci"], b["ci"]):
            continue
        d, diff = cohens_d(a, b), b["mean"] - a["mean"]
        intensity = name == "mean_intensity"
        floor = MIN_INTENSITY_CHANGE if intensity else MIN_SIZE_CHANGE * max(a["mean"], b["mean"])
        if abs(d) < MIN_EFFECT or abs(diff) < floor:
            continue
        fmt, px = (".3f", "") if intensity else (".0f", " px")
        shown = [f"{s['mean']:{fmt}}{px} ({s['ci'][0]:{fmt}}–{s['ci'][1]:{fmt}})" for s in (a, b)]
        effect = f"Cohen's d {d:+.2f}" if math.isfinite(d) else "no spread within either split"
        if a["images"] > a["n"] or b["images"] > b["n"]:  # the CIs are over groups of images
            effect = f"means of {a['n']} and {b['n']} {unit}s, {effect}"
        why = (f"test {what} are {'darker' if diff < 0 else 'brighter'} (0-1 scale, before normalisation)" if intensity
               else f"test {what} are {'smaller' if diff < 0 else 'larger'} before resizing, so structures appear at "
               "another scale")  # fmt: skip
        out.append(f"shift, {what}: {name.replace('_', ' ')} {shown[0]} on validation vs {shown[1]} on test, beyond "
                   f"their {ci_level:.0%} CIs ({effect}); {why}, and choices made on validation may not carry "
                   "over")  # fmt: skip
    return out

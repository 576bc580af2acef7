"""The numbers and the report of a cross-validated MIL run (:mod:`medvision.tasks.mil`).

Three views, all on out-of-fold predictions (a slide is only ever predicted by the head that did not see its
patient):

- every fold: its metrics with stratified bootstrap CIs, accuracy's as ``evaluate`` makes it
  (:func:`~medvision.intervals.accuracy_ci`) and balanced accuracy's as a proportion's too
  (:func:`~medvision.intervals.balanced_accuracy_ci`), so neither is ever zero-wide (few slides a fold: the CIs
  are wide, and say so);
- across folds: the mean ± SD of each fold metric (how much the result depends on the split), with a
  t-interval of the mean over the k folds, clipped to the metric's range (:func:`fold_summary`);
- pooled: the metric of all out-of-fold predictions together, with its bootstrap CI.

Every bootstrap resamples patients, not slides (``groups=`` of :func:`~medvision.intervals.bootstrap_cis`): a
patient's slides are drawn together, as the folds keep them together, because they are not independent; drawn
one by one they would make the intervals too narrow. Classes: AUC (one-vs-rest macro for more than two),
accuracy and balanced accuracy, the patients stratified by label. A fold whose test slides lack a class of the
cohort has no AUC or balanced accuracy (NaN, with a warning in ``train.log``): one class's recall, or a macro AUC
over fewer classes, is not the metric the other folds report, so the mean over folds leaves that fold out
(:data:`~medvision.metrics.NEEDS_EVERY_CLASS`, as everywhere in medvision); its accuracy is kept, and the pooled
metrics are over all slides. A continuous target: MSE, MAE and R², resampled without stratification.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medvision.data.slide_features import FeatureCohort
from medvision.evaluation import positive_index
from medvision.intervals import accuracy_ci, balanced_accuracy_ci, bootstrap_cis, mean_ci
from medvision.metrics import (
    NEEDS_EVERY_CLASS,
    MetricWarning,
    balanced_accuracy,
    compute_accuracy,
    compute_auc,
    compute_mae,
    compute_mse,
    compute_r2,
)
from medvision.models.mil_fit import kept_epoch
from medvision.plots import for_positive, plot_roc
from medvision.recipe import EvalConfig, Recipe
from medvision.report import Block, to_html, to_markdown

log = logging.getLogger("medvision")


def metrics_positive(cohort: FeatureCohort, cfg: EvalConfig) -> int | None:
    """The class the operating threshold is about (the second of two, or ``evaluation.positive_class``)."""
    return None if cohort.classes is None else positive_index(cohort.classes, cfg)


def _balanced(y: np.ndarray, p: np.ndarray) -> float:
    return balanced_accuracy(y, p.argmax(axis=1), p.shape[1]) if len(y) else math.nan


def metric_functions(continuous: bool) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    """The report's metrics, by name, as pure (y, prediction) functions."""
    if continuous:
        return {"mse": compute_mse, "mae": compute_mae, "r2": compute_r2}
    return {"auc": compute_auc, "acc": compute_accuracy, "balanced_acc": _balanced}


#: Metrics whose CI is a proportion's (Wilson's interval, at an effective sample size), not a percentile bootstrap
PROPORTIONS = ("acc", "balanced_acc")

#: The range each metric can take: a t-interval of the fold mean is clipped to it (an AUC interval never
#: reaches past 1, an MSE interval never below 0).
METRIC_RANGE = {"auc": (0.0, 1.0), "acc": (0.0, 1.0), "balanced_acc": (0.0, 1.0), "mse": (0.0, math.inf),
                "mae": (0.0, math.inf), "r2": (-math.inf, 1.0)}  # fmt: skip


def fold_summary(values: list[float], level: float, bounds: tuple[float, float]) -> dict[str, Any]:
    """Mean, SD and the t-interval of the mean (:func:`~medvision.intervals.mean_ci`) of one metric over the folds
    where it is defined, the interval clipped to ``bounds`` (the metric's range). The SD and the interval are NaN
    with fewer than two such folds."""
    vals = np.asarray(values, np.float64)
    vals = vals[np.isfinite(vals)]
    mean = float(vals.mean()) if len(vals) else math.nan
    sd = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
    low, high = mean_ci(vals, level)
    ci = [max(bounds[0], low), min(bounds[1], high)] if len(vals) > 1 else [math.nan, math.nan]
    return {"mean": mean, "sd": sd, "ci": ci, "folds": len(vals)}


def _with_cis(y: np.ndarray, p: np.ndarray, patients: list[str], continuous: bool, cfg: EvalConfig,
              seed: int) -> dict[str, Any]:  # fmt: skip
    """The metrics of one set of slides, with CIs that resample their ``patients`` (one per slide) whole."""
    fns = metric_functions(continuous)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        row: dict[str, Any] = {"n": len(y), **{k: fn(y, p) for k, fn in fns.items()}}
        if cfg.bootstrap and len(y) > 1:
            boot = {k: fn for k, fn in fns.items() if k not in PROPORTIONS}  # proportions: their own CIs below
            cis = bootstrap_cis(y, p, boot, cfg.bootstrap, seed, cfg.ci_level, stratify=not continuous,
                                groups=patients)  # fmt: skip
            if not continuous:  # never a zero-wide percentile interval (a head right on every slide)
                cis["acc"] = accuracy_ci(y, p, cfg.bootstrap, seed, cfg.ci_level, patients)
                cis["balanced_acc"] = balanced_accuracy_ci(y, p, cfg.bootstrap, seed, cfg.ci_level, patients)
            row.update({f"{k}_ci": list(v) for k, v in cis.items()})
    return row


def _undefined_without(row: dict[str, Any], fold: int, missing: list[str]) -> None:
    """Sets a fold row's metrics that need every class (:data:`~medvision.metrics.NEEDS_EVERY_CLASS`) to NaN,
    without CIs, when its test slides lack the ``missing`` classes, and says so in the log."""
    if not missing:
        return
    for name in (n for n in NEEDS_EVERY_CLASS if n in row):
        row[name] = math.nan
        row.pop(f"{name}_ci", None)
    log.warning("fold %d: its test slides hold no slide of class %s: its AUC and balanced accuracy are undefined "
                "(NaN) and left out of the mean over folds; its accuracy is kept", fold,
                ", ".join(map(repr, missing)))  # fmt: skip


def cv_metrics(cohort: FeatureCohort, folds: np.ndarray, records: list[dict[str, Any]],
               cfg: EvalConfig) -> dict[str, Any]:  # fmt: skip
    """Per-fold, across-fold and pooled metrics of the out-of-fold predictions (see the module docstring)."""
    continuous = cohort.continuous
    index = {rel: i for i, rel in enumerate(cohort.slides)}
    per_fold = []
    all_y, all_p, all_patients = [], [], []
    for r in records:
        idx = np.asarray([index[s] for s in r["test"]], np.int64)
        y, p = cohort.labels[idx], np.asarray(r["predictions"], np.float64)
        patients = [cohort.patients[i] for i in idx]
        row = _with_cis(y, p, patients, continuous, cfg, cfg.bootstrap_seed + r["fold"])
        if cohort.classes is not None:
            _undefined_without(row, r["fold"], [c for i, c in enumerate(cohort.classes) if i not in set(y.tolist())])
        row.update(fold=r["fold"], patients=len(set(patients)), best_epoch=r["best_epoch"] + 1, seconds=r["seconds"],
                   fit_patients=r.get("fit_patients"), val_patients=r.get("val_patients"),
                   no_validation=r.get("no_validation") or "")  # fmt: skip
        per_fold.append(row)
        all_y.append(y)
        all_p.append(p)
        all_patients += patients
    y, p = np.concatenate(all_y), np.concatenate(all_p)
    pooled = _with_cis(y, p, all_patients, continuous, cfg, cfg.bootstrap_seed)
    across: dict[str, Any] = {}
    for name in metric_functions(continuous):
        across[name] = fold_summary([r[name] for r in per_fold], cfg.ci_level, METRIC_RANGE[name])
    return {"target": "continuous" if continuous else "class", "classes": cohort.classes, "folds": per_fold,
            "across_folds": across, "pooled": pooled, "slides": len(cohort.slides),
            "patients": len(set(cohort.patients)), "ci_level": cfg.ci_level, "bootstrap": cfg.bootstrap,
            "bootstrap_unit": "patient", "positive_index": metrics_positive(cohort, cfg)}  # fmt: skip


#: Metrics in the target's own units (squared for MSE), written to 4 significant digits: an area in mm² of
#: about 1e-4 must not read 0.000. The others are fractions (AUC, accuracy, R²), written to 3 decimals.
IN_UNITS = ("mse", "mae")


def _f(v: Any, name: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.4g}" if name in IN_UNITS else f"{v:.3f}"


def _ci(row: dict[str, Any], name: str) -> str:
    ci = row.get(f"{name}_ci")
    return f"{_f(row[name], name)} [{_f(ci[0], name)}, {_f(ci[1], name)}]" if ci else _f(row[name], name)


def _across(summary: dict[str, Any], name: str, folds: int) -> list[str]:
    """The summary table's mean ± SD and t-interval of one metric; the folds it was defined in, when not all."""
    low, high = summary["ci"]
    cell = f"{_f(summary['mean'], name)} ± {_f(summary['sd'], name)}"
    if summary["folds"] < folds:
        cell += f" ({summary['folds']} of {folds} folds: undefined in the others)"
    return [cell, f"[{_f(low, name)}, {_f(high, name)}]"]


def validation_note(folds: list[dict[str, Any]], val_fraction: float) -> str:
    """What the report says about early stopping: the share of each fold's training patients that was held out
    to validate, measured from the folds' rows (``fit_patients``, ``val_patients``), not ``val_fraction`` (which
    :func:`~medvision.data.slide_features.validation_split` meets only as one of ``round(1 / val_fraction)``
    patient folds), and the folds that held none out, with why when their rows say (``no_validation``)."""
    known = [r for r in folds if r.get("val_patients") is not None and r.get("fit_patients") is not None]
    held = [r for r in known if r["val_patients"]]
    empty = [str(r["fold"]) for r in known if not r["val_patients"]]
    why = sorted({r["no_validation"] for r in known if not r["val_patients"] and r.get("no_validation")})
    asked = f"mil.val_fraction {val_fraction:g}"
    reasons = "; ".join(why) if why else "each fold had too few training patients to split"
    if known and not held:
        return (f"No fold held out validation patients ({asked}; {reasons}): every head trained all mil.epochs and "
                "kept the last epoch.")  # fmt: skip
    if not known:
        return f"Early stopping used a share of each fold's training patients ({asked}), never its test slides."
    shares = [r["val_patients"] / (r["val_patients"] + r["fit_patients"]) for r in held]
    counts = sorted({f"{r['val_patients']} of {r['val_patients'] + r['fit_patients']}" for r in held})
    low, high = f"{min(shares):.0%}", f"{max(shares):.0%}"
    text = (f"Early stopping used {low if low == high else f'{low}-{high}'} of each fold's training patients "
            f"({', '.join(counts)}; {asked}), never its test slides.")  # fmt: skip
    if empty and why:
        text += (f" Fold{'s' if len(empty) > 1 else ''} {', '.join(empty)} held no validation patients out "
                 f"({'; '.join(why)}): trained all mil.epochs and kept the last epoch.")  # fmt: skip
    elif empty:
        text += (f" Fold{'s' if len(empty) > 1 else ''} {', '.join(empty)} had too few training patients to hold "
                 "any out: trained all mil.epochs and kept the last epoch.")  # fmt: skip
    return text


def write_cv_report(run_dir: Path, recipe: Recipe, cohort: FeatureCohort, metrics: dict[str, Any],
                    spec: dict[str, Any], oof: np.ndarray) -> None:  # fmt: skip
    """``report.md`` and the self-contained ``report.html`` of a cross-validated MIL run; ``oof`` holds each
    slide's out-of-fold probabilities in the cohort's slide order (what ``predictions.csv`` holds), for the ROC."""
    names = list(metric_functions(cohort.continuous))
    level = f"{metrics['ci_level']:.0%}"
    ext = cohort.extraction
    blocks: list[Block] = [("h1", f"{recipe.name}: {recipe.mil.head} on {ext['encoder']} features, "
                                  f"{recipe.mil.folds}-fold cross-validation")]  # fmt: skip
    blocks.append(("p", f"{metrics['slides']} slides of {metrics['patients']} patients; folds grouped by patient"
                        f"{'' if cohort.continuous else ' and stratified by label'} (seed {recipe.seed}). Features: "
                        f"`{ext['encoder']}` (checkpoint SHA-256 `{str(ext['encoder_sha256'])[:16]}…`, "
                        f"{ext['dim']}-d), "
                        f"{ext['tile_size']}-px tiles at {ext['target_mpp']} µm/px."))  # fmt: skip
    head = ["fold", "slides", "patients", *[f"{n} ({level} CI)" for n in names], "epoch kept", "s"]
    rows = [[str(r["fold"]), str(r["n"]), str(r["patients"]), *[_ci(r, n) for n in names],
             kept_epoch(r["best_epoch"] - 1, r.get("val_patients") != 0), f"{r['seconds']:.1f}"]
            for r in metrics["folds"]]  # fmt: skip
    blocks += [("h2", "Every fold (out-of-fold test slides)"), ("table", (head, rows))]
    across, pooled = metrics["across_folds"], metrics["pooled"]
    k = len(metrics["folds"])
    summary = [[n, *_across(across[n], n, k), _ci(pooled, n)] for n in names]
    blocks += [("h2", "Summary"), ("table", (["metric", "mean ± SD over folds", f"{level} t-interval of the mean",
                                             f"pooled out-of-fold ({level} bootstrap CI)"], summary))]  # fmt: skip
    notes = [
        "Each slide is predicted by the one fold head that never saw its patient. "
        + validation_note(metrics["folds"], recipe.mil.val_fraction),
        f"Every bootstrap CI resamples patients, not slides: a patient's slides are drawn together"
        f"{'' if cohort.continuous else ' (stratified by label)'}, since they are not independent.",
        f"With about {metrics['slides'] / recipe.mil.folds:.0f} slides a fold, a fold's CI is wide: read the pooled "
        "interval and the spread across folds together.",
    ]
    if spec.get("threshold") is not None:
        notes.append(f"score's 0/1 call uses the Youden threshold {spec['threshold']:.3f} of the pooled out-of-fold "
                     "probabilities: chosen on these same slides, so its sensitivity and specificity here are "
                     "optimistic; check them on new slides.")  # fmt: skip
    blocks += [("h2", "How to read this"), ("ul", notes)]
    if cohort.classes is not None and metrics["pooled"]["n"] > 1 and len(set(cohort.labels.tolist())) > 1:
        (run_dir / "plots").mkdir(exist_ok=True)
        cfg = recipe.evaluation
        y, p, classes = for_positive(cohort.labels, oof, cohort.classes, metrics["positive_index"])
        band = min(cfg.bootstrap, 200)  # as the training report's: 0 turns the band off with the CIs
        plot_roc(run_dir / "plots" / "roc_oof.png", y, p, classes, n_resamples=band, seed=cfg.bootstrap_seed,
                 level=cfg.ci_level, groups=cohort.patients)  # fmt: skip
        caption = "ROC of the pooled out-of-fold predictions"
        if band:
            caption += f", with its {level} bootstrap band ({band} resamples of whole patients, as the pooled CIs)"
        blocks.append(("img", ("plots/roc_oof.png", caption)))
    (run_dir / "report.md").write_text(to_markdown(blocks))
    (run_dir / "report.html").write_text(to_html(blocks, run_dir))

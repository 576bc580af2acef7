"""``medvision train`` with ``data.source: slide_features``: a MIL head on cached tile features, cross-validated.

The slides' tile features were made once by ``medvision features``; training a MIL head on them takes seconds a
fold, so every run is a k-fold cross-validation grouped by patient
(:func:`medvision.data.slide_features.patient_folds`):

1. fold ``f``'s test slides are its patients'; of the other patients, about ``mil.val_fraction`` validate (early
   stopping; :func:`medvision.data.slide_features.validation_split`) and the rest fit the head
   (:func:`medvision.models.mil_fit.fit_mil`);
2. the head predicts its test slides (out-of-fold), and is kept as ``folds/fold<f>.safetensors``, with its record
   ``folds/fold<f>.json``: the test slides and their predictions, the fit and validation slide and patient
   counts, the epoch kept (``best_epoch``, 0-based there; logs, the report and ``metrics.json`` count from 1, as
   fine-tuning's ``best_epoch`` does), and
   each test slide's top tile (:func:`medvision.models.mil_fit.top_tiles`);
3. the report gives every fold's metrics with bootstrap CIs, their mean ± SD across folds, and the pooled
   out-of-fold metric with its CI, every CI resampling whole patients (:mod:`medvision.tasks.mil_report`).

``score`` on a slide folder with such a run embeds each slide's tiles with the same encoder and weights
(checked by SHA-256) and averages the k fold heads' probabilities and attention (:mod:`medvision.tasks.score.mil`).
The run folder: ``recipe.yaml``, ``run.json``, ``mil.json`` (what scoring needs), ``folds.csv`` (each slide's
patient, as a pseudonym, and fold), ``folds/``, ``predictions.csv`` (out-of-fold), ``metrics.json``,
``report.md``/``.html``, ``data_audit.csv`` and ``train.log``. ``--resume`` keeps finished folds, each of which
records a fingerprint of what shaped its head (:func:`fold_settings`): a resume whose recipe or features differ from
a finished fold's is refused, so the run never claims settings some of its folds were not trained with. With
``tracking.mlflow`` (``--track``) or ``tracking.tensorboard`` on, the run is tracked: every fold's metrics at its
index as the step, the summary over the folds, and the run folder's files
(:func:`medvision.tasks.track.log_mil_run`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from medvision.data.audit import write_audit
from medvision.data.slide_features import (
    FeatureCohort,
    class_patients,
    load_feature_cohort,
    patient_folds,
    validation_split,
)
from medvision.io.files import atomic_write, atomic_write_text, remove_temporaries
from medvision.metrics import PROB_DIGITS, operating_point, round_significant, softmax
from medvision.models.mil_fit import MILConfig, fit_mil, kept_epoch, predict_mil, save_mil, top_tiles
from medvision.recipe import Recipe, dump_recipe, tree_changes
from medvision.report import write_json
from medvision.runs import RunError, nothing_to_resume, run_log, versions
from medvision.runtime import setup
from medvision.tasks.mil_report import cv_metrics, metrics_positive, write_cv_report
from medvision.tasks.track import log_mil_run
from medvision.tracking import Tracker

log = logging.getLogger("medvision")

RESULTS = ("metrics.json", "predictions.csv", "report.md", "report.html", "folds.csv", "mil.json")
MIL_RUN = "mil.json"


def mil_config(recipe: Recipe, seed: int) -> MILConfig:
    """The fit settings of the recipe's ``mil`` section (same seed, same data: same head)."""
    m = recipe.mil
    return MILConfig(head=m.head, epochs=m.epochs, lr=m.lr, weight_decay=m.weight_decay, patience=m.patience,
                     seed=seed, hidden=m.hidden, attention=m.attention, dropout=m.dropout, heads=m.heads, k=m.k,
                     bag_weight=m.bag_weight, subtyping=m.subtyping, max_tiles_train=m.max_tiles_train,
                     task="regression" if recipe.data.target == "continuous" else "classification")  # fmt: skip


def fold_settings(recipe: Recipe, cohort: FeatureCohort) -> dict[str, Any]:
    """Everything that shapes a fold's head, as a fold record keeps it: the ``mil`` section, the seed, the cohort
    (the target, the classes and a SHA-256 of every slide's path, label and patient, which fix the folds and
    what the heads learn) and the features' extraction (encoder and its SHA-256, tiling, preprocessing). A
    resumed run keeps a finished fold only when these are the same (:func:`settings_sha256`)."""
    labels = cohort.labels.tolist() if cohort.classes is None else [cohort.classes[int(y)] for y in cohort.labels]
    rows = json.dumps([cohort.slides, labels, cohort.patients], separators=(",", ":"))
    return {"mil": recipe.mil.model_dump(mode="json"), "seed": recipe.seed,
            "data": {"target": recipe.data.target, "classes": cohort.classes,
                     "slides_sha256": hashlib.sha256(rows.encode()).hexdigest()},
            "features": dict(sorted(cohort.extraction.items()))}  # fmt: skip


def settings_sha256(settings: dict[str, Any]) -> str:
    """The SHA-256 of ``settings`` as canonical JSON (sorted keys, no spaces): equal settings, equal hash."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}…"


def _check_kept_fold(run_dir: Path, done: Path, settings: dict[str, Any]) -> None:
    """Refuses to resume ``run_dir`` when the finished fold record ``done`` was trained with other settings than
    ``settings`` (the resumed recipe's, :func:`fold_settings`), or does not say which it was trained with.

    Raises:
        RunError: naming every setting that differs, and how to go on.
    """
    record = json.loads(done.read_text())
    go_on = ("a resumed run continues with the recipe it started with (medvision train --resume RUN_DIR); to "
             "train with these settings pass --overwrite to replace the run, or --set name=<new name> for a new "
             "one")  # fmt: skip
    if "settings_sha256" not in record or not isinstance(record.get("settings"), dict):
        raise RunError(f"cannot resume {run_dir}: {done} does not record the settings its head was trained with "
                       f"(written before fold records kept them), so it cannot be checked against this recipe; "
                       f"{go_on}")  # fmt: skip
    if record["settings_sha256"] == settings_sha256(settings):
        return
    differ = [f"{k} {_short(was)} -> {_short(now)}" for k, was, now in tree_changes(record["settings"], settings)
              ] or ["the settings' fingerprint"]  # fmt: skip
    raise RunError(f"cannot resume {run_dir}: its finished fold {done.name} was trained with other settings than "
                   f"this recipe's ({'; '.join(differ)}); {go_on}")  # fmt: skip


def _fold(cohort: FeatureCohort, folds: np.ndarray, f: int, recipe: Recipe) -> tuple[Any, dict[str, Any]]:
    """Fits fold ``f``'s head and predicts its test slides: (head, record)."""
    start = time.perf_counter()
    stratify = not cohort.continuous
    train = np.flatnonzero(folds != f)
    test = np.flatnonzero(folds == f)
    fit, val, why = validation_split(cohort.labels, cohort.patients, train, recipe.mil.val_fraction,
                                     recipe.seed + 1000 + f, stratify, cohort.classes)  # fmt: skip
    if why:
        log.info("fold %d: no validation patients (%s): the head trains all %d mil.epochs and keeps the last", f,
                 why, recipe.mil.epochs)  # fmt: skip
    cfg = mil_config(recipe, recipe.seed + f)
    n_out = 1 if cohort.continuous else len(cohort.classes or [])
    if cohort.classes is not None:
        missing = [cohort.classes[c] for c in sorted(set(range(n_out)) - set(cohort.labels[fit].tolist()))]
        if missing:
            counts = class_patients(cohort.labels, cohort.patients, cohort.classes)
            raise RunError(f"fold {f}: its fit patients hold no slide of class {', '.join(map(repr, missing))} "
                           f"(patients of each class in the cohort: "
                           f"{', '.join(f'{c!r} {n}' for c, n in counts.items())}); a class needs patients in "
                           "more than one fold: add patients of that class, or use fewer mil.folds")  # fmt: skip
    head, history = fit_mil([cohort.bags[i] for i in fit], cohort.labels[fit], [cohort.bags[i] for i in val],
                            cohort.labels[val], n_out, cfg)  # fmt: skip
    bags = [cohort.bags[i] for i in test]
    out, attention = predict_mil(head, bags)
    # probabilities at the digits predictions.csv keeps: the metrics, the threshold and the file agree
    scores = out[:, 0] if cohort.continuous else round_significant(softmax(out))
    top = [cohort.coords[i][t].tolist() for i, t in zip(test, top_tiles(head, bags, attention), strict=True)]
    record = {"fold": f, "test": [cohort.slides[i] for i in test], "fit_slides": len(fit), "val_slides": len(val),
              "fit_patients": len({cohort.patients[i] for i in fit}),
              "val_patients": len({cohort.patients[i] for i in val}),
              "predictions": scores.tolist(), "best_epoch": history["best_epoch"],
              "epochs_run": history["epochs_run"], "seconds": round(time.perf_counter() - start, 3),
              "top_tiles": top, "no_validation": why}  # fmt: skip
    return head, record


def train_mil(recipe: Recipe, resume: bool = False, overwrite: bool = False, parent: Tracker | None = None) -> Path:
    """Cross-validates the recipe's MIL head on its slides' cached features; see the module docstring. With
    ``recipe.tracking`` on, the run is tracked (a child run of ``parent``, see :mod:`medvision.tracking`).

    Examples:
        >>> run = train_mil(load_recipe("recipes/slides_uni_abmil.yaml"))
        >>> json.loads((run / "metrics.json").read_text())["summary"]["auc"]
    """
    d, _ = setup("cpu")
    if d.world_size > 1:
        raise RunError("data.source slide_features trains a MIL head in seconds a fold on one process; run it "
                       "without torchrun / --nproc")  # fmt: skip
    run_dir = Path(recipe.output_dir) / recipe.name
    fold_dir = run_dir / "folds"
    if resume and not fold_dir.is_dir():
        raise nothing_to_resume(run_dir, fold_dir, "first fold")
    if not resume and not overwrite and (run_dir / "recipe.yaml").exists():
        raise RunError(f"run folder {run_dir} already holds a run; pass --resume to continue it, --overwrite to "
                       "replace it, or --set name=<new name>")  # fmt: skip
    with run_log(run_dir, d, recipe, parent, kind="mil", resume=resume) as tracker:
        if not resume:
            for stale in RESULTS:
                (run_dir / stale).unlink(missing_ok=True)
            for old in fold_dir.glob("fold*") if fold_dir.is_dir() else []:
                old.unlink()
            atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
        fold_dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(run_dir, fold_dir)
        cohort = load_feature_cohort(Path(recipe.data.path), recipe.data)
        k = recipe.mil.folds
        settings = fold_settings(recipe, cohort)
        finished = [f for f in range(k) if (fold_dir / f"fold{f}.safetensors").is_file()]
        for f in finished if resume else []:  # before anything is rewritten: a refused resume leaves the run as it was
            if (fold_dir / f"fold{f}.json").is_file():
                _check_kept_fold(run_dir, fold_dir / f"fold{f}.json", settings)
        if resume:
            atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
        write_audit(run_dir, cohort.audit)
        folds = patient_folds(cohort.labels, cohort.patients, k, recipe.seed, stratify=not cohort.continuous,
                              classes=cohort.classes)  # fmt: skip
        _write_folds(run_dir / "folds.csv", cohort, folds)
        log.info("%s: %d slides of %d patients, %s features (%s), %d-fold CV of %s", recipe.name,
                 len(cohort.slides), len(set(cohort.patients)), cohort.extraction["encoder"],
                 str(cohort.extraction["encoder_sha256"])[:12], k, recipe.mil.head)  # fmt: skip
        records = []
        meta = {"classes": cohort.classes, "target": recipe.data.target, "encoder": cohort.extraction["encoder"],
                "encoder_sha256": cohort.extraction["encoder_sha256"], "recipe": recipe.name}  # fmt: skip
        for f in range(k):
            weights, done = fold_dir / f"fold{f}.safetensors", fold_dir / f"fold{f}.json"
            if resume and weights.is_file() and done.is_file():
                record = json.loads(done.read_text())
                if record["test"] == [cohort.slides[i] for i in np.flatnonzero(folds == f)]:
                    records.append(record)
                    log.info("fold %d: kept from the interrupted run", f)
                    continue
            head, record = _fold(cohort, folds, f, recipe)
            record.update(settings_sha256=settings_sha256(settings), settings=settings)
            save_mil(head, weights, {**meta, "fold": f})
            atomic_write_text(done, json.dumps(record))
            records.append(record)
            log.info("fold %d: %d test slides, %s, %.1f s", f, len(record["test"]),
                     kept_epoch(record["best_epoch"], record["val_patients"] > 0), record["seconds"])  # fmt: skip
        metrics = cv_metrics(cohort, folds, records, recipe.evaluation)
        oof = _oof(cohort, records)
        threshold = _threshold(cohort, oof, metrics)
        _write_predictions(run_dir / "predictions.csv", cohort, folds, oof)
        write_json(run_dir / "metrics.json", metrics)
        spec = _scoring_record(recipe, cohort, k, threshold)
        write_json(run_dir / MIL_RUN, spec)
        write_json(run_dir / "run.json", {"kind": "mil", "versions": versions(), "classes": cohort.classes,
                                          "target": recipe.data.target, "folds": k, "head": recipe.mil.head,
                                          "extraction": cohort.extraction})  # fmt: skip
        write_cv_report(run_dir, recipe, cohort, metrics, spec, oof)
        log_mil_run(tracker, run_dir)
    return run_dir


def _oof(cohort: FeatureCohort, records: list[dict[str, Any]]) -> np.ndarray:
    """Each slide's out-of-fold prediction in the cohort's slide order: (slides, classes) probabilities, or
    (slides,) values for a continuous target."""
    by_slide = {rel: p for r in records for rel, p in zip(r["test"], r["predictions"], strict=True)}
    return np.asarray([by_slide[rel] for rel in cohort.slides], np.float64)


def _threshold(cohort: FeatureCohort, oof: np.ndarray, metrics: dict[str, Any]) -> float | None:
    """The Youden threshold of the pooled out-of-fold probabilities (binary classes), for score's 0/1 call."""
    positive = metrics.get("positive_index")
    if cohort.classes is None or positive is None:
        return None
    p = oof[:, positive]
    y = (cohort.labels == positive).astype(np.int64)
    if len(set(y.tolist())) < 2:
        return None
    return float(operating_point(y, p, "youden"))


def pseudonyms(patients: list[str]) -> list[str]:
    """Each slide's patient as ``p1``, ``p2``, ... in the manifest's order: which slides share a patient (what the
    folds keep together), never who; the manifest's ``patient_id`` (an MRN, in practice) stays out of the run's
    files."""
    names: dict[str, str] = {}
    return [names.setdefault(p, f"p{len(names) + 1}") for p in patients]


def _write_folds(path: Path, cohort: FeatureCohort, folds: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["slide_path", "patient", "label", "fold"])
            for rel, pat, y, f in zip(cohort.slides, pseudonyms(cohort.patients), cohort.labels.tolist(),
                                      folds.tolist(), strict=True):  # fmt: skip
                w.writerow([rel, pat, y if cohort.classes is None else cohort.classes[int(y)], f])

    atomic_write(path, write)


def _write_predictions(path: Path, cohort: FeatureCohort, folds: np.ndarray, oof: np.ndarray) -> None:
    cols = ["prediction"] if cohort.classes is None else [f"prob_{c}" for c in cohort.classes]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["slide_path", "patient", "fold", "label", *cols])
            for rel, pat, y, f, p in zip(cohort.slides, pseudonyms(cohort.patients), cohort.labels.tolist(),
                                         folds.tolist(), oof.tolist(), strict=True):  # fmt: skip
                vals = [f"{p:.9g}"] if cohort.classes is None else [f"{v:.{PROB_DIGITS}g}" for v in p]
                w.writerow([rel, pat, f, y if cohort.classes is None else cohort.classes[int(y)], *vals])

    atomic_write(path, write)


def recorded_slides(extraction: dict[str, Any]) -> dict[str, Any]:
    """The ``slides`` section of ``mil.json`` rebuilt from what the feature files record, for a feature folder
    without ``features.json``: the tiling (``tile_size``, ``target_mpp``), the tissue threshold and method, and the
    stain reference and ``jpeg_shrink`` of their preprocessing, so ``score`` tiles and normalises new slides as
    the features' were. A setting a file does not record is left out: its default then applies, except
    ``jpeg_shrink``, which :meth:`~medvision.recipe_nodes.SlidesConfig.recorded` reads as false (tiles read
    before that setting existed)."""
    pre = extraction.get("preprocessing") or {}
    found = {"tile_size": extraction.get("tile_size"), "target_mpp": extraction.get("target_mpp"),
             "min_tissue": extraction.get("min_tissue"), "tissue_method": extraction.get("tissue_method"),
             "stain_reference": pre.get("stain_reference"), "jpeg_shrink": pre.get("jpeg_shrink")}  # fmt: skip
    return {k: v for k, v in found.items() if v is not None}


def _scoring_record(recipe: Recipe, cohort: FeatureCohort, k: int, threshold: float | None) -> dict[str, Any]:
    """``mil.json``: what ``score`` needs to embed new slides alike and apply the fold heads."""
    features = Path(recipe.data.features or "")
    made = json.loads((features / "features.json").read_text()) if (features / "features.json").is_file() else {}
    return {"classes": cohort.classes, "target": recipe.data.target, "head": recipe.mil.head,
            "heads": [f"folds/fold{f}.safetensors" for f in range(k)], "encoder": cohort.extraction["encoder"],
            "encoder_sha256": cohort.extraction["encoder_sha256"], "dim": cohort.extraction["dim"],
            "slides": made.get("slides") or recorded_slides(cohort.extraction),
            "precision": (cohort.extraction.get("preprocessing") or {}).get("precision", "none"),
            "stain_reference_sha256": (cohort.extraction.get("preprocessing") or {}).get("stain_reference_sha256"),
            "positive_index": metrics_positive(cohort, recipe.evaluation), "threshold": threshold,
            "threshold_rule": "youden on the pooled out-of-fold probabilities"}  # fmt: skip

"""``data.source: slide_features``: a manifest of slides over their cached tile features, as bags for MIL.

The manifest is the one ``source: slides`` reads (``slide_path,label[,patient_id]``, paths relative to the
CSV); ``data.features`` is the folder ``medvision features`` wrote, whose ``features.csv`` says which ``.h5``
file holds each slide (the slides were embedded from a folder: ``slide_path`` is matched on its path relative
to that folder, or, failing that, on its file name when that is unique). Every manifest line is accounted
for in the audit: a slide whose features are missing, failed, belong to another slide (the file's ``slide``
attribute), or were made with another encoder, weights or tiling than the rest is an error row (``data.on_error``
decides whether the run stops).

Labels are class names (``data.target: class``) or numbers (``continuous``). The folds of the
cross-validation are whole patients (a slide without ``patient_id`` is its own patient), stratified by
label for classes (scikit-learn's ``StratifiedGroupKFold``).

Examples:
    >>> cohort = load_feature_cohort(Path("slides/manifest.csv"), recipe.data)
    >>> folds = patient_folds(cohort.labels, cohort.patients, k=5, seed=0, stratify=True)
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from medvision.data.audit import settle
from medvision.data.table import AuditRow, DataSourceError, class_index, read_manifest, slide_rows
from medvision.recipe import DataConfig
from medvision.wsi.features import EXTRACTION_KEYS, FeatureFileError, read_features, same_extraction


@dataclass
class FeatureCohort:
    """The usable slides of a manifest: one bag of tile features each, with its label and patient."""

    slides: list[str]
    bags: list[np.ndarray]
    coords: list[np.ndarray]
    labels: np.ndarray
    """Class indices (int64) or continuous targets (float64)."""
    patients: list[str]
    classes: list[str] | None
    """Class names, or None for a continuous target."""
    extraction: dict[str, Any]
    """The feature files' shared settings: encoder, checkpoint SHA-256, dim, tiling, preprocessing."""
    audit: list[AuditRow] = field(default_factory=list)

    @property
    def continuous(self) -> bool:
        return self.classes is None


def _feature_index(folder: Path) -> dict[str, dict[str, str]]:
    table = folder / "features.csv"
    if not table.is_file():
        raise DataSourceError(f"data.features {folder}: no features.csv; run `medvision features SLIDES --out "
                              f"{folder}` first")  # fmt: skip
    with table.open(newline="") as fh:
        return {row["path"]: row for row in csv.DictReader(fh)}


def _match(rel: str, index: dict[str, dict[str, str]], by_name: dict[str, list[str]], listed: Counter[str],
           table: Path) -> tuple[dict[str, str] | None, str]:  # fmt: skip
    """The ``table`` (``features.csv``) row of the manifest's slide ``rel``, by path, else by file name when that
    name is the only one of its kind in both the table and the manifest (``listed``: how many manifest lines have
    each name); None and why not otherwise. Two slides of one name (``siteA/s1.svs``, ``siteB/s1.svs``) never share
    one bag of features."""
    if rel in index:
        return index[rel], ""
    name = Path(rel).name
    names = by_name.get(name, [])
    if len(names) == 1 and listed[name] == 1:
        return index[names[0]], ""
    if not names:
        return None, f"{rel} is not in {table}"
    return None, (
        f"{rel} is not in {table} by its path, and its file name {name!r} names {len(names)} slide(s) "
        f"there and {listed[name]} in the manifest: give the path relative to the folder that was embedded"
    )


def load_feature_cohort(manifest: Path, cfg: DataConfig) -> FeatureCohort:
    """The manifest's slides as bags; see the module docstring.

    Raises:
        DataSourceError: a bad label or a slide listed twice (naming the line); with ``data.on_error: stop``,
            any slide without usable features; or no usable slide at all.
    """
    assert cfg.features is not None
    folder = Path(cfg.features)
    rows = read_manifest(manifest, ("slide_path", "label"), optional=",patient_id")
    continuous = cfg.target == "continuous"
    classes = None if continuous else (cfg.classes or sorted({(r["label"] or "").strip() for r in rows}))
    index = _feature_index(folder)
    by_name: dict[str, list[str]] = {}
    for rel in index:
        by_name.setdefault(Path(rel).name, []).append(rel)
    listed = Counter(Path(rel).name for _, _, rel, _ in slide_rows(manifest, rows))
    out = FeatureCohort([], [], [], np.zeros(0), [], classes, {})
    labels: list[float] = []
    for line, where, rel, row in slide_rows(manifest, rows):
        text = (row["label"] or "").strip()
        if continuous:
            try:
                label = float(text)
            except ValueError:
                raise DataSourceError(f"{where}: label {text!r} is not a number (data.target is continuous)") from None
            if not math.isfinite(label):
                raise DataSourceError(f"{where}: label {text!r} is not a finite number")
        else:
            assert classes is not None
            label = class_index(classes, text, where)
        name = f"{manifest.name}, line {line}"
        hit, why = _match(rel, index, by_name, listed, folder / "features.csv")
        if hit is None:
            out.audit.append(AuditRow(rel, "error", f"{name}: {why}"))
            continue
        if hit["status"] != "ok":
            out.audit.append(AuditRow(rel, "error", f"{name}: its features were not made ({hit['reason']})"))
            continue
        try:
            bag = read_features(folder / hit["file"])
        except FeatureFileError as err:
            out.audit.append(AuditRow(rel, "error", f"{name}: {err}"))
            continue
        if (
            str(bag.attrs["slide"]) != hit["path"]
        ):  # two slides' paths flattened to one file name: one overwrote the other
            out.audit.append(AuditRow(rel, "error", f"{name}: {folder / hit['file']} holds the features of slide "
                                                    f"{bag.attrs['slide']!r}, not of {hit['path']!r}"))  # fmt: skip
            continue
        if not out.extraction:
            out.extraction = {k: bag.attrs.get(k) for k in EXTRACTION_KEYS}
        differ = same_extraction(out.extraction, bag.attrs)
        if differ:
            out.audit.append(AuditRow(rel, "error", f"{name}: features made differently from the first slide's "
                                                    f"({'; '.join(differ)})"))  # fmt: skip
            continue
        out.slides.append(rel)
        out.bags.append(bag.features)
        out.coords.append(bag.coords)
        labels.append(label)
        out.patients.append((row.get("patient_id") or "").strip() or rel)
        out.audit.append(AuditRow(rel, "used", "", len(bag.features)))
    settle(out.audit, cfg.on_error, str(manifest), "slides have no usable features")
    if not out.slides:
        raise DataSourceError(f"{manifest}: no slide with usable features in {folder}", audit=out.audit)
    out.labels = np.asarray(labels, np.float64 if continuous else np.int64)
    return out


def class_patients(labels: np.ndarray, patients: list[str], classes: list[str] | None = None) -> dict[str, int]:
    """How many patients hold a slide of each class (by name when ``classes`` is given, else by index), in class
    order: what a split stratified by label can spread over its folds."""
    n = len(classes) if classes is not None else int(labels.max()) + 1 if len(labels) else 0
    names = classes if classes is not None else [str(i) for i in range(n)]
    return {names[c]: len({p for p, y in zip(patients, labels.tolist(), strict=True) if y == c}) for c in range(n)}


def patient_folds(labels: np.ndarray, patients: list[str], k: int, seed: int, stratify: bool,
                  classes: list[str] | None = None) -> np.ndarray:  # fmt: skip
    """The fold (0..k-1) of each slide: whole patients, label-stratified when ``stratify``, shuffled by ``seed``.

    Raises:
        DataSourceError: fewer patients than folds, or (stratified) classes too small for scikit-learn to
            spread over ``k`` folds; the message gives each class's patients (named by ``classes``).
    """
    n_patients = len(set(patients))
    if n_patients < k:
        raise DataSourceError(f"{k}-fold cross-validation needs at least {k} patients; the cohort has {n_patients}")
    folds = np.full(len(labels), -1, np.int64)
    x = np.zeros((len(labels), 1))
    if stratify:
        splitter: Any = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(x, labels, groups=patients)
    else:  # GroupKFold balances fold sizes; the patients are shuffled first so the seed matters
        order = {p: i for i, p in enumerate(np.random.default_rng(seed).permutation(sorted(set(patients))))}
        parts = GroupKFold(n_splits=k).split(x, groups=[order[p] for p in patients])
    try:
        for f, (_, test) in enumerate(parts):
            folds[test] = f
    except ValueError as err:  # scikit-learn checks the classes lazily, when the folds are drawn
        if not stratify:
            raise
        counts = class_patients(labels, patients, classes)
        least = min(counts.values())
        fix = f"use mil.folds {least} or fewer" if least >= 2 else "add patients of the smallest class"
        raise DataSourceError(
            f"mil.folds {k}: the slides cannot be split into {k} folds stratified by label (scikit-learn: {err}); "
            f"patients of each class: {', '.join(f'{c!r} {n}' for c, n in counts.items())}. Every class needs "
            f"patients to spread over the folds: {fix}, or add patients"
        ) from None
    return folds


def validation_split(labels: np.ndarray, patients: list[str], train: np.ndarray, fraction: float, seed: int,
                     stratify: bool, classes: list[str] | None = None
                     ) -> tuple[np.ndarray, np.ndarray, str]:  # fmt: skip
    """Splits a fold's training slides into (fit, validation) by whole patients for early stopping, and says why
    nothing was held out when nothing was ("" otherwise); the fold's test slides are never seen.

    The validation patients are one of ``k = max(2, round(1 / fraction))`` patient folds (stratified when
    ``stratify``), so the share held out is about ``1 / k``, not ``fraction`` itself: 0.2 holds out a fifth, 0.3 a
    third, 0.4 a half. Stratified, ``k`` is at most the patients of the training slides' smallest class, and the
    validation fold is the first whose patients and the remaining fit patients both hold every class of the
    training slides: early stopping on a set without a class, or fitting without one, would judge or learn the
    wrong task. Nothing is held out (an empty validation set: :func:`~medvision.models.mil_fit.fit_mil` then
    trains all ``mil.epochs`` and keeps the last) with fewer than ``max(4, k)`` patients, when a class has fewer
    than two training patients, or when no fold leaves every class on both sides; the report says so, and
    gives the share each fold held out as measured (:func:`medvision.tasks.mil_report.validation_note`)."""
    sub_patients = [patients[i] for i in train]
    k = max(2, round(1 / fraction))
    if len(set(sub_patients)) < max(4, k):
        return train, train[:0], f"too few training patients ({len(set(sub_patients))}) to hold any out"
    sub_labels = labels[train]
    if stratify:
        present = sorted(set(sub_labels.tolist()))
        counts = class_patients(sub_labels, sub_patients, classes)
        names = list(counts)
        held = {names[c]: counts[names[c]] for c in present}
        least = min(held, key=lambda c: held[c])
        if held[least] < 2:
            return train, train[:0], (f"class {least!r} has {held[least]} training patient: none can be held out "
                                       "to validate without leaving it out of the fit patients")  # fmt: skip
        k = min(k, held[least])
    sub = patient_folds(sub_labels, sub_patients, k, seed, stratify, classes)
    every = set(sub_labels.tolist())
    for f in range(k):  # the first fold whose validation and fit patients both hold every class validates
        if not stratify or (
            set(sub_labels[sub == f].tolist()) == every and set(sub_labels[sub != f].tolist()) == every
        ):
            return train[sub != f], train[sub == f], ""
    return train, train[:0], (f"no split of the training patients into {k} folds left every class in both the fit "
                              "and the validation patients")  # fmt: skip

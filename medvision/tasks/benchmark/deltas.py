"""Paired differences between runs tested on the same images: each pair of runs (one seed) scored on its own test
rows, a stratified bootstrap shared by both runs of a pair, over whole patients where the runs' data tables tell
them. Used by ``benchmark labels`` (each init against the reference) and ``benchmark medmnist`` (each variant
against the reference)."""

from __future__ import annotations

import csv
import functools
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvision.intervals import bootstrap_indices
from medvision.metrics import MetricWarning
from medvision.recipe import load_recipe
from medvision.runs import RunError, read_metrics_json
from medvision.tasks.benchmark.speed import BenchmarkError
from medvision.tasks.compare import patient_table

log = logging.getLogger("medvision")


def _test_probs(run_dir: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Ids, labels and calibrated probabilities of a run's test rows (its predictions.csv)."""
    with (Path(run_dir) / "predictions.csv").open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = [r for r in reader if r[0] == "test"]
    classes = [h[len("prob_") :] for h in header[4:]]
    labels = np.array([classes.index(r[2]) for r in rows], dtype=np.int64)
    return [r[1] for r in rows], labels, np.array([[float(v) for v in r[4:]] for r in rows])


def patient_groups(run_dir: str, ids: list[str]) -> list[str] | None:
    """Each test row's patient, as the run's own CIs draw them (:mod:`medvision.evaluation`), or None where each
    patient has one test image or the run folder cannot say (then the images are the unit).

    ``predictions.csv`` holds no patient ids (they stay out of every output): they come from the run's own data
    table, rebuilt from its ``recipe.yaml`` as training built it, and only where ``metrics.json`` says a
    patient has several test images.
    """
    stamp = tuple(f.stat().st_mtime_ns if f.is_file() else 0 for f in (Path(run_dir) / "recipe.yaml",
                                                                        Path(run_dir) / "metrics.json"))  # fmt: skip
    patient = _run_patients(run_dir, stamp)  # once per run (the reference of every variant), until retrained
    if patient is None:
        return None
    if any(i not in patient for i in ids):
        log.warning("%s: its test images are not all in its data table any more; the paired delta resamples test "
                    "images, not patients", run_dir)  # fmt: skip
        return None
    return [patient[i] for i in ids]


@functools.cache
def _run_patients(run_dir: str, stamp: tuple[int, ...]) -> dict[str, str] | None:
    """Each image's patient in a run's data table (:func:`~medvision.tasks.compare.patient_table`: no pixel
    decoded), once per run folder however many deltas use it; None where each patient has one test image or the
    table cannot be rebuilt."""
    run = Path(run_dir)
    try:
        per_patient = float(read_metrics_json(run)["patient"]["test"]["images_per_patient"])
    except (RunError, KeyError, TypeError, ValueError):
        return None
    if per_patient <= 1:
        return None
    try:
        table = patient_table(load_recipe(run / "recipe.yaml"), str(run / "recipe.yaml"))
    except Exception as err:  # the data moved since: the delta is still computed, over images, and says so
        log.warning("%s: cannot rebuild its data table (%s: %s); the paired delta resamples test images, not "
                    "patients", run, type(err).__name__, str(err).splitlines()[0][:200])  # fmt: skip
        return None
    return dict(zip(table.ids, table.groups, strict=True))


@dataclass(frozen=True)
class PairedDelta:
    """A paired difference with its 95% CI and the unit the bootstrap drew: ``images``, ``patients``, or ``patients
    and images`` (some pairs' runs could not tell their patients)."""

    value: float
    lo: float
    hi: float
    unit: str


def delta_unit(deltas: list[dict[str, Any]]) -> str:
    """What a table of deltas resampled (:class:`PairedDelta`'s ``unit``): one unit, or ``patients and images``."""
    units = {d.get("unit") or "images" for d in deltas}
    return units.pop() if len(units) == 1 else "patients and images"


def paired_bootstrap(
    pairs: list[tuple[str, str]],
    metrics: dict[str, Callable[[np.ndarray, np.ndarray], float]],
    resamples: int,
    seed: int,
) -> dict[str, PairedDelta]:
    """Each of ``metrics`` of the second run of each pair minus the first's, on their test rows, averaged over the
    pairs (every metric over the same runs read once and the same resamples),
    with a 95% CI from a stratified bootstrap over the test images, or over whole patients where a patient has
    several test images (:func:`patient_groups`): a patient's images are not independent, and the runs' own CIs
    draw patients too, so a delta CI over images would be narrower than it should.

    Each pair (a seed) is scored on its own test rows and labels: a seed's split may test other images. The two
    runs of a pair share each resample, so the test-set noise they share cancels and what is left is the
    difference of the models; pairs tested on the same images draw the same resamples (one seed). The two runs
    of a pair tested on different images are an error.
    """
    tested: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    groups: list[list[str] | None] = []
    for base, other in pairs:
        ids_a, y_a, p_a = _test_probs(base)
        ids_b, y_b, p_b = _test_probs(other)
        if ids_a != ids_b or not np.array_equal(y_a, y_b):
            raise BenchmarkError(f"{base} and {other} were tested on different images")
        tested.append((y_a, p_a, p_b))
        groups.append(patient_groups(base, ids_a))
    have = [g is not None for g in groups]  # each pair draws patients where its run's table tells them
    unit = "patients" if all(have) else "patients and images" if any(have) else "images"
    if not tested:
        raise BenchmarkError("paired_bootstrap needs at least one pair of runs")

    def delta(rows: list[np.ndarray | slice]) -> list[float]:
        return [float(np.mean([fn(y[i], b[i]) - fn(y[i], a[i]) for (y, a, b), i in zip(tested, rows, strict=True)]))
                for fn in metrics.values()]  # fmt: skip

    values = delta([slice(None)] * len(tested))
    spread = np.zeros((0, len(metrics)))
    if resamples:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricWarning)
            draws = zip(*(bootstrap_indices(y, resamples, seed, groups=g) for (y, _, _), g in zip(tested, groups,
                                                                                                strict=True)),
                        strict=True)  # fmt: skip
            spread = np.asarray([delta(list(rows)) for rows in draws])
    out = {}
    for k, (name, value) in enumerate(zip(metrics, values, strict=True)):
        kept = spread[:, k][np.isfinite(spread[:, k])]
        lo, hi = (float(np.quantile(kept, 0.025)), float(np.quantile(kept, 0.975))) if kept.size else (math.nan,) * 2
        out[name] = PairedDelta(value, lo, hi, unit)
    return out

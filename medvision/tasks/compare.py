"""``medvision compare RUN_A RUN_B [RUN_C ...]``: is one recipe better than another on the same test set?

Nothing is re-scored: each run's ``predictions.csv`` already holds the (calibrated) probabilities of every
image of the split. The runs must have been tested on the same cases, the same image ids with the same
labels and classes, or the comparison is refused with an error that says how the sets differ.

For each run: AUC (binary, or macro one-vs-rest) with its stratified bootstrap CI, and accuracy with the
CI ``evaluate`` gives it (:func:`~medvision.intervals.accuracy_ci`). For each run
against the first (the reference): the paired-bootstrap difference of both (the same resampled cases
score both runs, so what they share cancels out), with its CI and two-sided p-value, and for two classes
DeLong's test of the AUCs; then a verdict in words. Where the runs' recipes give patients several images
(or slides several tiles), the same again per patient, each run's image probabilities aggregated as its
own recipe says (``evaluation.patient_aggregate``), as its own report does.

Files in ``--out``: ``compare.md`` (with ``plots/*.png``), the self-contained ``compare.html`` and
``compare.json`` (every number above).
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvision import plots
from medvision.data.sources import load_table
from medvision.data.table import SampleTable
from medvision.errors import MedvisionError
from medvision.evaluation import bootstrap_groups
from medvision.intervals import accuracy_ci, bootstrap_cis, delong_test, paired_bootstrap
from medvision.metrics import MetricWarning, aggregate_by_group, compute_accuracy, compute_auc
from medvision.recipe import Recipe, load_recipe
from medvision.report import SELECTION_LABEL, SELECTION_SPLIT, Block, to_html, to_markdown, write_json
from medvision.runs import cache_dir, read_run_json

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"auc": compute_auc, "acc": compute_accuracy}
NAMES = {"auc": "AUC", "acc": "ACC"}
FIRST = 5
"""How many differing ids an error lists."""

log = logging.getLogger("medvision")


class CompareError(MedvisionError, ValueError):
    """Runs that cannot be compared: fewer than two, a folder without per-image predictions, different
    classes, or different test sets. The message names the runs and how they differ."""


@dataclass
class RunPredictions:
    """One run's predictions of one split, as ``predictions.csv`` holds them."""

    name: str
    folder: Path
    classes: list[str]
    ids: list[str]
    labels: list[str]
    probs: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    """The run's ``run.json`` (empty for a folder without one, such as an ``evaluate`` output)."""
    positive: str | None = None
    """Two classes: the run's positive class (``evaluation.positive_class``; default its second class)."""


@dataclass
class Level:
    """The cases one comparison is made on: images (or tiles), or patients (or slides)."""

    name: str
    labels: np.ndarray
    probs: dict[str, np.ndarray]
    """Run name -> (N, K) probabilities, rows in the same order for every run."""
    how: str = ""
    groups: list[str] | None = None
    """Each row's patient (or slide) where rows of one are not independent (images of a patient): every bootstrap
    then draws them whole. None: the rows are the units."""


@dataclass
class CompareResult:
    markdown: str
    files: list[Path]
    data: dict[str, Any]


# ------------------------------------------------------------------------------------------ reading


def read_predictions(folder: Path, split: str, name: str) -> RunPredictions:
    """The rows of ``split`` in ``folder/predictions.csv``; every problem names the file (and line)."""
    path = folder / "predictions.csv"
    if not folder.is_dir():
        raise CompareError(f"{folder}: not a folder; expected a run folder of medvision train (or an evaluate "
                           "output folder) holding predictions.csv")  # fmt: skip
    if not path.is_file():
        raise CompareError(f"{path}: no predictions.csv; is {folder} a finished medvision run?")
    ids: list[str] = []
    labels: list[str] = []
    rows: list[list[float]] = []
    seen: set[str] = set()
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        classes = [c.removeprefix("prob_") for c in header if c.startswith("prob_")]
        if not {"split", "id", "label"} <= set(header) or len(classes) < 2:
            raise CompareError(f"{path}: columns {','.join(header)}; expected split,id,label,pred,prob_<class>,... "
                               "(per-image predictions as medvision train writes them)")  # fmt: skip
        col = {c: i for i, c in enumerate(header)}
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise CompareError(f"{path}, line {line}: {len(row)} fields; expected {len(header)}")
            seen.add(row[col["split"]])
            if row[col["split"]] != split:
                continue
            if row[col["label"]] not in classes:
                raise CompareError(f"{path}, line {line}: label {row[col['label']]!r} is not one of {classes}")
            try:
                values = [float(row[col[f"prob_{c}"]]) for c in classes]
            except ValueError:
                raise CompareError(f"{path}, line {line}: a probability is not a number: {row}") from None
            bad = next((f"prob_{c} = {v}" for c, v in zip(classes, values, strict=True) if not 0.0 <= v <= 1.0), None)
            if bad is not None:  # NaN fails both comparisons
                raise CompareError(f"{path}, line {line}: {bad}; expected a probability in [0, 1]")
            rows.append(values)
            ids.append(row[col["id"]])
            labels.append(row[col["label"]])
    if not ids:
        raise CompareError(f"{path}: no rows of split {split!r}; it has {', '.join(sorted(seen)) or 'none'} "
                           "(choose one with --split)")  # fmt: skip
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        raise CompareError(f"{path}: {len(repeated)} id(s) appear more than once in split {split!r}, e.g. "
                           f"{repeated[0]!r}; expected one row per image")  # fmt: skip
    meta = read_run_json(folder) if (folder / "run.json").is_file() else {}
    positive = None
    if len(classes) == 2:  # Decision.positive indexes the run's classes, the columns' order
        index = (meta.get("decision") or {}).get("positive")
        positive = classes[1 if index is None else int(index)]
    return RunPredictions(name, folder, classes, ids, labels, np.asarray(rows, dtype=np.float64), meta, positive)


def _listed(items: list[str]) -> str:
    return ", ".join(items[:FIRST]) + (", ..." if len(items) > FIRST else "")


def align(runs: list[RunPredictions], split: str) -> list[RunPredictions]:
    """Every run's rows in the first run's order and its classes in the first run's order.

    Raises:
        CompareError: the runs have different classes, images or labels.
    """
    ref = runs[0]
    out, in_ref = [ref], set(ref.ids)
    for run in runs[1:]:
        if set(run.classes) != set(ref.classes):
            raise CompareError(f"{run.folder} has classes {run.classes} but {ref.folder} has {ref.classes}; only "
                               "runs of the same classes can be compared")  # fmt: skip
        where = {item: i for i, item in enumerate(run.ids)}
        only_ref = [i for i in ref.ids if i not in where]
        only_run = [i for i in run.ids if i not in in_ref]
        if only_ref or only_run:
            differ = [f"{len(ids)} id(s) only in the {which} ({_listed(ids)})"
                      for which, ids in (("first", only_ref), ("second", only_run)) if ids]  # fmt: skip
            raise CompareError(
                f"{ref.folder} ({len(ref.ids)} {split} images) and {run.folder} ({len(run.ids)}) were not tested on "
                f"the same {split} set: {' and '.join(differ)}; compare runs of the same data, seed and split fractions"
            )
        order = [where[i] for i in ref.ids]
        labels = [run.labels[i] for i in order]
        differ = [i for i, a, b in zip(ref.ids, ref.labels, labels, strict=True) if a != b]
        if differ:
            first = differ[0]
            raise CompareError(
                f"{ref.folder} and {run.folder} label {len(differ)} of the {len(ref.ids)} {split} images differently "
                f"({_listed(differ)}; e.g. {first!r} is {ref.labels[ref.ids.index(first)]!r} in the first, "
                f"{labels[ref.ids.index(first)]!r} in the second); compare runs tested on the same labels"
            )
        columns = [run.classes.index(c) for c in ref.classes]
        out.append(RunPredictions(run.name, run.folder, list(ref.classes), list(ref.ids), labels,
                                  run.probs[order][:, columns], run.meta, run.positive))  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------ patients


@dataclass
class Patients:
    groups: list[str]
    unit: str
    aggregate: str
    top_k: int
    patients: list[str] | None = None
    """Each image's patient where ``groups`` are slides; None where they are the patients."""


def patient_table(recipe: Recipe, origin: str, classes: list[str] | None = None) -> SampleTable:
    """A run's data table rebuilt for its patients only: nothing preloaded, no DICOM pixel cache (paths and headers
    tell the patients; no pixel needs decoding). ``classes``: the run's, where its recipe did not list them."""
    changes: dict[str, Any] = {"data.preload": False}
    if classes is not None:
        changes["data.classes"] = classes
    if recipe.data.source == "dicom":
        changes["data.dicom.cache"] = False
    recipe = recipe.changed(changes, origin=origin)
    return load_table(recipe.data, recipe.seed, cache_dir(recipe))


def read_patients(run: RunPredictions) -> Patients | str:
    """Each image's patient (or slide) from the run's recipe and data, with its aggregation; or why not."""
    recipe_path = run.folder / "recipe.yaml"
    if not recipe_path.is_file():
        return f"{run.folder} has no recipe.yaml, so its patients are unknown"
    try:
        recipe = load_recipe(recipe_path)
        cfg = recipe.evaluation
        if recipe.data.source == "npz":  # a MedMNIST-style .npz has one image per patient
            return Patients(list(run.ids), "patient", cfg.patient_aggregate, cfg.top_k)
        log.info("%s: reading its patients from %s", run.name, recipe.data.path)
        table = patient_table(recipe, str(recipe_path), run.classes)
    except (MedvisionError, OSError) as err:
        return f"the patients of {run.name} could not be read from its data ({' '.join(str(err).split())})"
    group_of = dict(zip(table.ids, table.aggregates_to, strict=True))
    missing = [i for i in run.ids if i not in group_of]
    if missing:
        return f"{len(missing)} of the images of {run.name} are no longer in its data ({_listed(missing)})"
    groups = [group_of[i] for i in run.ids]
    if table.units is None:
        return Patients(groups, "patient", cfg.patient_aggregate, cfg.top_k)
    patient_of = dict(zip(table.ids, table.groups, strict=True))
    return Patients(groups, "slide", cfg.patient_aggregate, cfg.top_k, [patient_of[i] for i in run.ids])


def agreed_patients(found: list[Patients | str]) -> Patients | str:
    """The first run's :class:`Patients` when every run whose data tell them gives the same image groups, or why
    not (no run's data tell them; they disagree)."""
    known = [p for p in found if isinstance(p, Patients)]
    if not known:
        return next(p for p in found if isinstance(p, str))
    if any(p.groups != known[0].groups for p in known[1:]):
        return "the runs' data assign some images to different patients"
    return known[0]


def image_groups(found: list[Patients | str]) -> tuple[list[str] | None, str]:
    """Each image's patient, what the image-level bootstrap draws whole, from whichever runs' data tell it (the
    runs hold the same images), whether or not a patient level can be built; or None and why not."""
    ref = agreed_patients(found)
    if isinstance(ref, str):
        return None, ref
    return bootstrap_groups(ref.groups, ref.patients, "image"), ""


def patient_level(runs: list[RunPredictions], labels: np.ndarray, found: list[Patients | str]) -> Level | str:
    """The patient (or slide) level of aligned runs, each aggregated as its recipe says (``found``: each run's
    :func:`read_patients`), or why there is none. For slides, the slide level's bootstrap draws a patient's slides
    together."""
    for run, patients in zip(runs, found, strict=True):
        if isinstance(patients, str):
            return patients
        if patients.aggregate == "abmil":
            return (f"{run.name} makes slide probabilities with an attention head (patient_aggregate abmil), which "
                    "predictions.csv does not hold")  # fmt: skip
    known = [p for p in found if isinstance(p, Patients)]
    ref = agreed_patients(found)
    if isinstance(ref, str):
        return ref
    if len(set(ref.groups)) == len(ref.groups):
        return f"every {ref.unit} has one image here, so the {ref.unit} level equals the image level"
    positives = {run.name: run.positive for run in runs}
    if len(set(positives.values())) > 1:  # a patient with images of both classes takes the positive label
        return ("the runs name different positive classes (" + ", ".join(f"{k} `{v}`" for k, v in positives.items())
                + f"), so a {ref.unit} with images of both classes has a different label in each; compare runs "
                "with the same evaluation.positive_class")  # fmt: skip
    probs, y = {}, None
    for run, p in zip(runs, known, strict=True):
        positive = run.classes.index(run.positive) if run.positive is not None else None  # in the aligned order
        _, y, probs[run.name], _ = aggregate_by_group(p.groups, labels, run.probs, p.aggregate, p.top_k, positive)
    assert y is not None
    how = {f"`{p.aggregate}`" + (f" (k = {p.top_k})" if p.aggregate == "topk" else "") for p in known}
    text = f"each {ref.unit}'s image probabilities aggregated by " + ", ".join(sorted(how))
    if len(how) > 1:
        text = (f"each {ref.unit}'s image probabilities aggregated as each run's recipe says: "
                + ", ".join(f"{r.name} `{p.aggregate}`" for r, p in zip(runs, known, strict=True))
                + "; the difference includes that choice")  # fmt: skip
    how_text = text + f" ({len(labels) / len(y):.1f} images a {ref.unit} on average)"
    return Level(ref.unit, y, probs, how_text, bootstrap_groups(ref.groups, ref.patients, "patient"))


# ------------------------------------------------------------------------------------------ statistics


def compare_level(level: Level, n_resamples: int, seed: int, ci_level: float) -> dict[str, Any]:
    """Every number of one level: per run, and per run against the first; MetricWarnings are collected."""
    y, names = level.labels, list(level.probs)
    binary = next(iter(level.probs.values())).shape[1] == 2
    enough = binary and min(int((y == 1).sum()), int((y != 1).sum())) >= 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        runs = {}
        for name, p in level.probs.items():
            auc_ci = bootstrap_cis(y, p, {"auc": compute_auc}, n_resamples, seed, ci_level, groups=level.groups)
            runs[name] = {"n": len(y), "auc": compute_auc(y, p), "acc": compute_accuracy(y, p),
                          "auc_ci": auc_ci["auc"],
                          "acc_ci": accuracy_ci(y, p, n_resamples, seed, ci_level, level.groups)}  # fmt: skip
        ref, pairs = names[0], []
        for name in names[1:]:
            pa, pb = level.probs[ref], level.probs[name]
            pair: dict[str, Any] = {"reference": ref, "run": name,
                                    **paired_bootstrap(y, pa, pb, METRICS, n_resamples, seed, ci_level,
                                                       groups=level.groups)}  # fmt: skip
            pair["delong_p"] = None  # more than two classes: DeLong does not apply
            if binary:  # its variance needs two cases of each class
                pair["delong_p"] = delong_test(y == 1, pa[:, 1], pb[:, 1])["p"] if enough else math.nan
            pair["verdicts"] = [verdict(ref, name, m, pair[m], pair["delong_p"] if m == "auc" else None, ci_level)
                                for m in METRICS]  # fmt: skip
            pairs.append(pair)
    messages = sorted({str(w.message) for w in caught if issubclass(w.category, MetricWarning)})
    return {"level": level.name, "n": len(y), "how": level.how, "runs": runs, "pairs": pairs, "warnings": messages}


def _p(p: float | None, resamples: int = 0) -> str:
    """A p-value for a table cell; a bootstrap p at its floor, 2 / (resamples + 1), is only known to be at most that."""
    if p is None or not math.isfinite(p):
        return "n/a"
    if resamples and p <= 2 / (resamples + 1) + 1e-12:
        return f"≤{p:.3f}" if p >= 0.001 else "<0.001"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _p_is(p: float | None, resamples: int = 0) -> str:
    """``p=0.012``, ``p≤0.002`` or ``p<0.001`` for a sentence."""
    text = _p(p, resamples)
    return "p" + (text if text[0] in "<≤" else f"={text}")


def _delta(metric: str, d: dict[str, Any]) -> str:
    lo, hi = d["ci"]
    return f"Δ{NAMES[metric]} {d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def verdict(ref: str, run: str, metric: str, d: dict[str, Any], delong_p: float | None, ci_level: float) -> str:
    """One sentence: whether ``run`` is shown better or worse than ``ref`` on ``metric``, and on what evidence.

    The paired-bootstrap CI of the difference decides; DeLong's p (binary AUC) is quoted beside it, and
    where it disagrees the verdict says the result is borderline."""
    name, (lo, hi) = NAMES[metric], d["ci"]
    if not (math.isfinite(d["diff"]) and math.isfinite(lo) and math.isfinite(hi)):
        return f"{run} vs {ref}: {name} difference undefined (see the warnings)"
    tests = f"bootstrap {_p_is(d['p'], d['resamples'])}" + (
        f", DeLong {_p_is(delong_p)}" if delong_p is not None else ""
    )
    shown = lo > 0 or hi < 0
    if shown:
        text = f"{run} is {'better' if lo > 0 else 'worse'} than {ref} on {name} ({_delta(metric, d)}, {tests})"
    else:
        text = f"{run} vs {ref}: no difference shown on {name} (CI of Δ{name} includes 0: {_delta(metric, d)}, {tests})"
    if delong_p is not None and math.isfinite(delong_p) and (delong_p < 1 - ci_level) != shown:
        text += "; DeLong's test disagrees with the bootstrap, so the difference is borderline"
    return text


# ------------------------------------------------------------------------------------------ report


def _ci(value: float, ci: tuple[float, float]) -> str:
    if not math.isfinite(value):
        return "n/a"
    text = f"{value:.3f}"
    return text + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if all(math.isfinite(v) for v in ci) else "")


def level_blocks(stats: dict[str, Any], split: str, ci_level: float, figure: str) -> list[Block]:
    level, pct = stats["level"], f"{ci_level:.0%}"
    runs = [[name, str(r["n"]), _ci(r["auc"], r["auc_ci"]), _ci(r["acc"], r["acc_ci"])]
            for name, r in stats["runs"].items()]  # fmt: skip
    pairs = [[f"{p['run']} − {p['reference']}", _delta("auc", p["auc"]).split(" ", 1)[1],
              _p(p["auc"]["p"], p["auc"]["resamples"]),
              _p(p["delong_p"]) if p["delong_p"] is not None else "n/a (binary only)",
              _delta("acc", p["acc"]).split(" ", 1)[1], _p(p["acc"]["p"], p["acc"]["resamples"])]
             for p in stats["pairs"]]  # fmt: skip
    blocks: list[Block] = [("h2", f"Per {level} ({split} split, n = {stats['n']})")]
    if stats["how"]:
        blocks.append(("p", stats["how"][0].upper() + stats["how"][1:] + "."))
    header = ["comparison", f"ΔAUC [{pct} CI]", "p (bootstrap)", "p (DeLong)", f"ΔACC [{pct} CI]", "p (bootstrap)"]
    blocks += [
        ("table", (["run", "n", f"AUC ({pct} CI)", f"accuracy, argmax ({pct} CI)"], runs)),
        ("table", (header, pairs)),
        ("ul", [v for p in stats["pairs"] for v in p["verdicts"]]),
        ("img", (figure, f"ROC curves of every run on the same {stats['n']} {level}s")),
    ]
    if stats["warnings"]:
        blocks.append(("ul", [f"warning: {w}" for w in stats["warnings"]]))
    return blocks


def _run_fact(run: RunPredictions) -> str:
    meta = run.meta
    model = f" ({meta['model']}, {meta.get('image_size', '?')} px)" if "model" in meta else ""
    return f"`{run.name}`: `{run.folder}`{model}"


def _names(folders: list[Path]) -> list[str]:
    """Folder names, or the paths as given where two runs share a name."""
    names = [f.resolve().name for f in folders]
    return names if len(set(names)) == len(names) else [str(f) for f in folders]


SELECTION_NOTE = ("every run chose its checkpoint, temperature and thresholds on this split: its numbers are "
                  "optimistic, and a difference between runs favours the one that fitted its choices to these images "
                  "more; compare on `test` for the numbers to report")  # fmt: skip


def build_blocks(
    out: Path, runs: list[RunPredictions], levels: list[Level], stats: list[dict[str, Any]], split: str,
    ci_level: float, notes: list[str],
) -> list[Block]:  # fmt: skip
    """The report as blocks (see :mod:`medvision.report`); draws each level's ROC curves into ``out/plots``."""
    classes, labels, ref = runs[0].classes, levels[0].labels, runs[0].name
    binary = len(classes) == 2
    # the reference's evaluation.positive_class (AUC is the same either way; the ROC curves are drawn for it)
    flip = binary and runs[0].positive == classes[0]
    counts = ", ".join(f"{c} {int((labels == k).sum())}" for k, c in enumerate(classes))
    shown = SELECTION_LABEL.format(split=split) if split == SELECTION_SPLIT else split
    facts = [*(_run_fact(r) for r in runs), f"reference: `{ref}` (every other run is compared with it)",
             f"{shown} split: {len(labels)} images ({counts}), the same ids and labels in every run",
             f"AUC: {f'binary, positive class `{classes[0 if flip else 1]}`' if binary else 'macro one-vs-rest'}; "
             "accuracy: of the arg-max class"]  # fmt: skip
    if split == SELECTION_SPLIT:
        facts.append(SELECTION_NOTE)
    blocks: list[Block] = [("h1", f"Comparison of {', '.join(r.name for r in runs)}"), ("ul", facts)]
    for level, s in zip(levels, stats, strict=True):
        figure = f"plots/roc_{level.name}.png"
        y, probs, names = level.labels, level.probs, classes
        if flip:
            y, probs, names = 1 - y, {k: p[:, ::-1] for k, p in probs.items()}, classes[::-1]
        plots.plot_roc_curves(out / figure, y, probs, names, title=f"ROC per {level.name}")
        blocks += level_blocks(s, shown, ci_level, figure)
    files = "Files: `compare.md`, `compare.html` (self-contained), `compare.json` (every number), `plots/`."
    return [*blocks, ("h2", "How to read this"), ("ul", notes), ("p", files)]


def different_data(runs: list[RunPredictions]) -> str | None:
    """A note where the runs' ``run.json`` name different data folders or files; None where they agree."""
    sources = {r.name: r.meta["data"] for r in runs if r.meta.get("data")}
    if len(set(sources.values())) < 2:
        return None
    return ("The runs read their images from different data (" + "; ".join(f"{k}: `{v}`" for k, v in sources.items())
            + "): their ids and labels agree, but nothing here checks that the images are the same pixels (a copy, "
            "another site's scans, a different preprocessing).")  # fmt: skip


def reading_notes(
    runs: list[RunPredictions],
    levels: list[Level],
    patients: Level | str,
    n_resamples: int,
    seed: int,
    stats: list[dict[str, Any]],
    unknown: str = "",
) -> list[str]:
    """How the numbers were made and what they cannot say; ``unknown``: why the images' patients are unknown."""
    classes = runs[0].classes
    binary = len(classes) == 2
    delong = "it is quoted beside the bootstrap." if binary else (
        f"with {len(classes)} classes it does not apply, and the macro one-vs-rest AUC difference is judged by the "
        "paired bootstrap alone.")  # fmt: skip
    notes = [
        f"CIs: percentile bootstrap, {n_resamples} resamples stratified by class, seed {seed}; a run's accuracy CI "
        "is Wilson's interval (at the effective sample size the patient bootstrap tells, where patients have "
        "several images), as in the run's own report; every difference is computed on the "
        "same resampled cases. Δ is the run minus the reference. The p-value of a "
        "difference is two-sided: twice the share of resampled differences on the other side of 0.",
        f"DeLong's test (DeLong et al. 1988) compares two correlated AUCs of binary labels; {delong}",
        "'No difference shown' is not evidence that the runs are equivalent: the CI of Δ says how large a "
        "difference these cases cannot rule out.",
    ]
    groups = levels[0].groups
    if isinstance(patients, str):
        notes.append(f"No patient level: {patients}.")
        if groups is None:
            notes.append(f"The image-level CIs and Δ treat the images as independent, as each image's patient is "
                         f"unknown ({unknown}): where a patient has several images, they are too narrow.")  # fmt: skip
        elif len(set(groups)) < len(groups):
            notes.append("The images of one patient are not independent, so the image-level CIs and Δ resample "
                         "patients, not images (a patient's images are drawn together); DeLong's test still counts "
                         "images as independent.")  # fmt: skip
    else:
        unit, item = patients.name, levels[0].name
        notes.append(f"The {item}s of one {unit} are not independent, so the {item}-level CIs and Δ resample "
                     f"{unit}s, not {item}s (a {unit}'s {item}s are drawn together); DeLong's test at the {item} "
                     f"level still counts {item}s as independent, and each {unit} weighs as many {item}s as it has: "
                     f"the per-{unit} comparison is the one to trust.")  # fmt: skip
    for level in stats:
        kept = min((p[m]["resamples"] for p in level["pairs"] for m in METRICS), default=n_resamples)
        if kept < n_resamples:
            notes.append(f"Per {level['level']}: only {kept} of the {n_resamples} resamples gave every difference "
                         f"(a resample without both classes has no AUC; {level['level']}s drawn whole keep the class "
                         "mix only roughly), so those CIs and p-values are over these and hold given that a resample "
                         "has both classes.")  # fmt: skip
    if (differ := different_data(runs)) is not None:
        notes.append(differ)
    if len(runs) > 2:
        notes.append(f"The {len(runs) - 1} comparisons' p-values are not adjusted for multiple testing.")
    return notes


def compare_runs(
    folders: list[Path], split: str = "test", out: Path = Path("compare"), n_resamples: int = 1000, seed: int = 0,
    ci_level: float = 0.95,
) -> CompareResult:  # fmt: skip
    """Compares runs on the same ``split`` from their predictions; writes compare.md/.html/.json to ``out``.

    Raises:
        CompareError: fewer than two runs, a folder without per-image predictions, or runs with different
            classes, images or labels.

    Examples:
        >>> result = compare_runs([Path("runs/a"), Path("runs/b")], out=Path("a-vs-b"))
        >>> print(result.markdown)  # doctest: +SKIP
    """
    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise CompareError(f"compare needs at least two runs; got {len(folders)}: {', '.join(map(str, folders))}")
    twice = [str(f) for f, n in Counter(f.resolve() for f in folders).items() if n > 1]
    if twice:
        raise CompareError(f"{twice[0]} is given more than once; compare different runs")
    if n_resamples < 1:
        raise CompareError(f"--resamples is {n_resamples}; expected at least 1 (1000 or more for a decision)")
    runs = align([read_predictions(f, split, n) for f, n in zip(folders, _names(folders), strict=True)], split)
    classes = runs[0].classes
    labels = np.asarray([classes.index(c) for c in runs[0].labels], dtype=np.int64)
    levels = [Level("image", labels, {r.name: r.probs for r in runs})]
    found = [read_patients(run) for run in runs]
    levels[0].groups, unknown = image_groups(found)  # a patient's images are drawn together, patient level or not
    patients = patient_level(runs, labels, found)
    if not isinstance(patients, str):
        levels.append(patients)
        if patients.name == "slide":  # a slide run's images are its tiles
            levels[0].name = "tile"
    stats = [compare_level(level, n_resamples, seed, ci_level) for level in levels]

    out.mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(exist_ok=True)
    notes = reading_notes(runs, levels, patients, n_resamples, seed, stats, unknown)
    if (differ := different_data(runs)) is not None:
        log.warning("%s", differ)
    if split == SELECTION_SPLIT:
        log.warning("compare --split %s: %s", split, SELECTION_NOTE)
    blocks = build_blocks(out, runs, levels, stats, split, ci_level, notes)
    data = {"split": split, "classes": classes, "reference": runs[0].name,
            "runs": {r.name: str(r.folder) for r in runs},
            "bootstrap": {"resamples": n_resamples, "seed": seed, "level": ci_level},
            "levels": {s["level"]: s for s in stats}, "notes": notes}  # fmt: skip
    markdown = to_markdown(blocks)
    files = [out / "compare.md", out / "compare.html", out / "compare.json"]
    files[0].write_text(markdown)
    files[1].write_text(to_html(blocks, out))
    write_json(files[2], data)
    return CompareResult(markdown, files, data)

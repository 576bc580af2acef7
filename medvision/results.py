"""A trained model on its splits, to the files a person reads: metrics.json, predictions.csv and the report.

Shared by ``train`` (on validation and test, after fitting the decision on validation) and ``evaluate``
(on any split, with the run's decision as it is): clinical metrics with CIs, the calibrated predictions,
the Grad-CAM panel of the most confident errors, and for slide runs the slide-level head (ABMIL) and the
comparison of tile aggregations.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medvision.data.audit import counts as audit_counts
from medvision.data.dataset import ImageDataset, ImageMeasures
from medvision.data.table import SampleTable, subset_indices
from medvision.data.transforms import normalize_batch
from medvision.evaluation import (
    IMAGE_MEASURES,
    Decision,
    SplitOutputs,
    clinical_metrics,
    image_shift_warnings,
    image_summary,
)
from medvision.gradcam import (
    ExplainError,
    cams_and_logits,
    check_method,
    coarse_note,
    confident_errors,
    display_image,
    overlay,
)
from medvision.metrics import softmax
from medvision.models.heads import extract_features
from medvision.models.mil_fit import load_mil, predict_mil
from medvision.models.slide_head import MIL_FILE, bags, compare_aggregations, fit_slide_head
from medvision.recipe import EvalConfig, Recipe
from medvision.report import write_json, write_predictions, write_report
from medvision.runs import RunError, mean_count
from medvision.runtime import (
    make_loader,
    resolve_workers,
)
from medvision.training.build import ModelBundle, model_inputs, split_dataset

log = logging.getLogger("medvision")

MEASURED_PER_SPLIT = 1000
"""Images of a split whose size and intensity the shift check measures (a seeded sample of a larger split):
enough for two splits' CIs to part at an eighth of an SD, below the material 0.2 SD
(:data:`~medvision.evaluation.MIN_EFFECT`), and few enough that a split of 100,000 large PNGs is not decoded again
at the end of the run."""


def _headline(clinical: dict[str, Any], split: str, loss: float) -> dict[str, float]:
    image = clinical["image"][split]
    return {"auc": image["auc"], "acc": image["acc"], "n": image["n"], "loss": loss}


def explain_panel(
    bundle: ModelBundle, ds: ImageDataset, out: SplitOutputs, decision: Decision, classes: list[str],
    cfg: EvalConfig, device: torch.device,
) -> list[tuple[tuple[int, str, float], np.ndarray, str]]:  # fmt: skip
    """Grad-CAM overlays of the split's most confident false positives and negatives (or wrong classes).

    One ``((index, kind, confidence), overlay, title)`` per image; none when the split has no errors.
    Heatmaps from fewer than 4 x 4 feature cells (a small image through a stride-32 model) say so in
    each title (:func:`~medvision.gradcam.coarse_note`): such a map is a blend of a few numbers, and
    the panel's only caption a reader sees beside each picture is its title.

    Raises:
        ExplainError: Grad-CAM cannot be computed for this model.
    """
    probs = out.probs(decision.temperature)
    if len(probs) == 0:
        return []
    chosen = confident_errors(out.labels, probs, cfg.explain, decision.positive if decision.positive is not None else 1)
    if not chosen:
        return []
    images = normalize_batch(torch.stack([ds[i][0] for i, _, _ in chosen]).to(device), bundle.mean, bundle.std)
    target = torch.as_tensor([int(probs[i].argmax()) for i, _, _ in chosen], device=device)
    heat, _, grid = cams_and_logits(bundle.model, images, target, check_method(cfg.explain_method))
    note = coarse_note(grid, (int(images.shape[-2]), int(images.shape[-1])))
    panel = []
    for (i, kind, conf), img, h in zip(chosen, images, heat, strict=True):
        title = f"{kind}: {classes[int(out.labels[i])]} → {classes[int(probs[i].argmax())]} ({conf:.2f})"
        title += f"; {note}" if note else ""
        panel.append(((i, kind, conf), overlay(display_image(img, bundle.mean, bundle.std), h), title))
    return panel


def write_results(
    out_dir: Path,
    bundle: ModelBundle,
    recipe: Recipe,
    table: SampleTable,
    meta: dict[str, Any],
    splits: dict[str, tuple[SplitOutputs, list[str], float]],
    decision: Decision,
    extra: dict[str, Any],
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """metrics.json, predictions.csv (calibrated probabilities), report.md/.html with plots and Grad-CAM."""
    classes = meta["classes"]
    outputs = {split: out for split, (out, _, _) in splits.items()}
    clinical = clinical_metrics(outputs, classes, recipe.evaluation, decision,
                                "slide" if table.units is not None else "patient")  # fmt: skip
    if "val" in splits and "test" in splits:
        try:
            image_shift(recipe, table, clinical, device)
        except Exception as err:  # a check after training must not cost the run its results
            log.warning("the image-statistics shift check could not run (%s: %s); metrics.json has no image_stats",
                        type(err).__name__, err)  # fmt: skip
    headline = {split: _headline(clinical, split, loss) for split, (_, _, loss) in splits.items()}
    for split, m in headline.items():
        log.info("%s: AUC %.4f  accuracy %.4f  (n=%d)", split, m["auc"], m["acc"], m["n"])
    unit, item = ("slide", "tiles") if table.units is not None else ("patient", "images")
    for split, summary in clinical["patient"].items():
        if isinstance(summary, dict) and summary.get("images_per_patient", 1) > 1:
            log.info("%s, per %s (%s of %s %s): AUC %.4f  accuracy %.4f  (n=%d)", split, unit,
                     recipe.evaluation.patient_aggregate, mean_count(summary["images_per_patient"]), item,
                     summary["auc"], summary["acc"], summary["n"])  # fmt: skip
    for level in ("image", "patient"):
        for split, summary in clinical[level].items():
            messages = summary.get("warnings", []) if isinstance(summary, dict) else []
            shifts = [m for m in messages if m.startswith("shift")]  # each in full: they name the measure
            others = [m for m in messages if m not in shifts]
            for message in shifts:
                log.warning("%s, %s level: %s", split, level, message)
            if others:
                more = f" (and {len(others) - 1} more; see metrics.json)" if len(others) > 1 else ""
                log.warning("%s, %s level: %s%s", split, level, others[0], more)
    if table.audit:  # what the data source met: files used, skipped, and unreadable ones left out
        extra = {**extra, "data_audit": {**audit_counts(table.audit), "on_error": recipe.data.on_error}}
    write_json(out_dir / "metrics.json", {**headline, **clinical, "decision": decision.to_json(), **extra})
    rows = [(split, ids, out.labels, out.probs(decision.temperature))
            for split, (out, ids, _) in splits.items()]  # fmt: skip
    write_predictions(out_dir / "predictions.csv", rows, classes)
    focus = "test" if "test" in splits else next(iter(splits))
    panel = []
    if recipe.evaluation.explain:
        ds = split_dataset(recipe, table, bundle, focus, train=False)
        try:
            errors = explain_panel(bundle, ds, outputs[focus], decision, classes, recipe.evaluation, device)
            panel = [(picture, title) for _, picture, title in errors]
        except ExplainError as err:  # the report is complete without its Grad-CAM panel
            log.warning("no Grad-CAM panel: %s", err)
    write_report(out_dir, meta, extra, clinical, outputs[focus], focus, decision, panel, recipe.evaluation)
    return headline


def image_measures(recipe: Recipe, table: SampleTable, split: str,
                   device: torch.device) -> tuple[dict[str, np.ndarray], list[str]]:  # fmt: skip
    """Height, width and mean intensity (:data:`~medvision.evaluation.IMAGE_MEASURES`) of the split's evaluated
    rows, at most :data:`MEASURED_PER_SPLIT` of them, decoded in the run's loader workers; and each row's unit
    (its patient, or its slide for tiles).

    Pixels come from the table's loader: the arrays of an npz file, the preload or the DICOM decode cache
    where there is one, else the image files, read once more.
    """
    idx = subset_indices(table, split, recipe.data.limit, recipe.seed)
    if len(idx) > MEASURED_PER_SPLIT:
        idx = np.sort(np.random.default_rng(recipe.seed).choice(idx, MEASURED_PER_SPLIT, replace=False))
    loader = DataLoader(ImageMeasures(table, idx, recipe.data.intensity), batch_size=64,
                        num_workers=resolve_workers(recipe.data.num_workers, device))  # fmt: skip
    batches = list(loader)
    measures = {name: np.concatenate([b[name].numpy() for b in batches]) if batches else np.zeros(0)
                for name in IMAGE_MEASURES}  # fmt: skip
    units = table.aggregates_to
    return measures, [units[i] for i in idx]


def image_shift(recipe: Recipe, table: SampleTable, clinical: dict[str, Any], device: torch.device) -> None:
    """Validation's and test's image statistics into ``clinical`` (``image_stats`` of each image-level split), and a
    test warning for each measure that differs (:func:`~medvision.evaluation.image_shift_warnings`)."""
    level = recipe.evaluation.ci_level
    stats = {}
    for split in ("val", "test"):
        measures, units = image_measures(recipe, table, split, device)
        stats[split] = image_summary(measures, level, units)
    for split, summary in stats.items():
        clinical["image"][split]["image_stats"] = summary
    what, unit = ("tiles", "slide") if table.units is not None else ("images", "patient")
    shifts = image_shift_warnings(stats["val"], stats["test"], what, unit, level)
    if shifts:
        clinical["image"]["test"].setdefault("warnings", []).extend(shifts)


def slide_head(recipe: Recipe, bundle: ModelBundle, table: SampleTable, splits: dict[str, Any],
                device: torch.device, run_dir: Path, fit: bool) -> None:  # fmt: skip
    """Attention MIL: slide probabilities for every split in ``splits`` (set as their ``unit_probs``).

    ``fit`` trains the head on the training slides' frozen tile features and saves it in ``run_dir``;
    otherwise the run's saved head is applied.
    """
    workers = resolve_workers(recipe.data.num_workers, device)
    inputs = model_inputs(recipe, bundle)
    features, outputs = {}, {}
    for split in ("train", *splits) if fit else tuple(splits):
        ds = split_dataset(recipe, table, bundle, split, train=False)
        loader = make_loader(ds, recipe.data.eval_batch_size, workers, device)
        features[split] = extract_features(bundle.model, loader, device, recipe.train.amp, inputs)
        outputs[split] = splits[split][0] if split in splits else SplitOutputs(
            np.zeros((len(ds), len(table.classes))), table.labels[ds.indices], ds.groups,
            patients=ds.patients)  # fmt: skip
    if fit:
        probs, _ = fit_slide_head(features, outputs, len(table.classes), recipe.seed, run_dir,
                                  {"model": recipe.model.name})  # fmt: skip
    else:
        if not (run_dir / MIL_FILE).is_file():
            raise RunError(f"{run_dir}: evaluation.patient_aggregate is abmil but {MIL_FILE} is missing")
        try:
            head, _ = load_mil(run_dir / MIL_FILE, len(table.classes))
        except ValueError as err:
            raise RunError(f"{run_dir}: {err}") from None
        probs = {}
        for split in splits:
            _, split_bags, _ = bags(features[split], outputs[split].groups, outputs[split].labels)
            probs[split] = softmax(predict_mil(head, split_bags)[0])
    for split, p in probs.items():
        splits[split][0].unit_probs = p


def slide_comparison(recipe: Recipe, splits: dict[str, Any], decision: Decision) -> dict[str, Any]:
    """Whole-slide runs: mean / max / top-k (/ ABMIL) on the test (else validation) slides, side by side."""
    split = "test" if "test" in splits else "val"
    if split not in splits or recipe.data.source != "slides":
        return {}
    out = splits[split][0]
    return {"slide_aggregates": compare_aggregations(out, decision.temperature, recipe.evaluation, out.unit_probs,
                                                     decision.positive)}  # fmt: skip

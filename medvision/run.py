"""A run end to end: recipe -> run folder (train), and run folder -> fresh metrics (evaluate).

A run folder holds everything needed to reproduce or reuse it: ``recipe.yaml`` (resolved, absolute
paths), ``run.json`` (classes, channels, normalisation, versions), ``model.safetensors`` (best
weights), ``last.pt`` (resume state), ``metrics.json``, ``predictions.csv``, ``report.md`` and
``train.log``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import platform
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import timm
import torch
from torch import nn

import medvision
from medvision.data.dataset import ImageDataset
from medvision.data.sources import SampleTable, load_table
from medvision.data.transforms import normalize_batch
from medvision.evaluation import Decision, SplitOutputs, clinical_metrics, fit_decision
from medvision.explain import ExplainError, confident_errors, display_image, grad_cam, overlay
from medvision.metrics import MetricWarning, softmax
from medvision.models.backbone import create_backbone
from medvision.models.backbone import load_state as load_model_state
from medvision.models.heads import extract_features, fit_state
from medvision.plots import plot_image_grid
from medvision.recipe import EvalConfig, Recipe, dump_recipe, load_recipe
from medvision.report import write_json, write_predictions, write_report
from medvision.runtime import (
    SINGLE,
    Dist,
    EpochSampler,
    barrier,
    broadcast,
    current,
    local_part,
    make_loader,
    resolve_amp,
    resolve_workers,
    seed_everything,
    setup,
)
from medvision.train.build import ModelBundle, build_model, model_inputs, split_dataset
from medvision.train.checkpoint import save_weights
from medvision.train.loop import class_weights, classification_loss, evaluate, fit, gather_outputs
from medvision.train.protocols import fit_frozen_head

log = logging.getLogger("medvision")


class RunError(RuntimeError):
    """A run folder that cannot be created, resumed or evaluated as asked."""


def cache_dir(recipe: Recipe) -> Path:
    """Where decoded DICOM pixels are cached: shared by the runs of one output folder."""
    return Path(recipe.output_dir) / ".cache" / "dicom"


def attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler


def versions() -> dict[str, str]:
    """Library versions, recorded in run.json and in scoring provenance."""
    return {
        "medvision": medvision.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def mean_count(value: float) -> str:
    """A mean number of things for a log line: ``12`` when it is whole, else one decimal (``2.5``)."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _split_outputs(
    bundle: ModelBundle, recipe: Recipe, table: SampleTable, split: str, device: torch.device, workers: int,
    d: Dist = SINGLE,
) -> tuple[SplitOutputs, list[str], float] | None:  # fmt: skip
    """A split's logits, labels and patients, its item ids, and its mean (uncalibrated) cross-entropy.

    On several ranks each evaluates its contiguous shard (no sample repeated, none left out) and
    rank 0 gets the whole split, in order; the other ranks get None.
    """
    ds = split_dataset(recipe, table, bundle, split, train=False)
    loader = make_loader(local_part(ds, d), recipe.data.eval_batch_size, workers, device)
    tta = tuple(recipe.evaluation.tta)
    logits, labels = evaluate(bundle.model, loader, device, recipe.train.amp, model_inputs(recipe, bundle), tta=tta)
    whole = gather_outputs(logits, labels, d)
    if whole is None:
        return None
    logits, labels = whole
    if tta:  # (N, 1 + views, K): the image's own logits first
        out = SplitOutputs(logits[:, 0], labels, ds.groups, views=logits)
    else:
        out = SplitOutputs(logits, labels, ds.groups)
    probs = out.probs()  # the TTA average when there are views
    loss = float(-np.log(probs[np.arange(len(labels)), labels] + 1e-300).mean()) if len(labels) else float("nan")
    return out, ds.ids, loss


def _headline(clinical: dict[str, Any], split: str, loss: float) -> dict[str, float]:
    image = clinical["image"][split]
    return {"auc": image["auc"], "acc": image["acc"], "n": image["n"], "loss": loss}


def _explain_panel(
    bundle: ModelBundle, ds: ImageDataset, out: SplitOutputs, decision: Decision, classes: list[str],
    cfg: EvalConfig, device: torch.device,
) -> list[tuple[tuple[int, str, float], np.ndarray, str]]:  # fmt: skip
    """Grad-CAM overlays of the split's most confident false positives and negatives (or wrong classes).

    One ``((index, kind, confidence), overlay, title)`` per image; none when the split has no errors.

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
    heat = grad_cam(bundle.model, images, target, cfg.explain_method)
    panel = []
    for (i, kind, conf), img, h in zip(chosen, images, heat, strict=True):
        title = f"{kind}: {classes[int(out.labels[i])]} → {classes[int(probs[i].argmax())]} ({conf:.2f})"
        panel.append(((i, kind, conf), overlay(display_image(img, bundle.mean, bundle.std), h), title))
    return panel


def _write_results(
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
            if messages:
                more = f" (and {len(messages) - 1} more; see metrics.json)" if len(messages) > 1 else ""
                log.warning("%s, %s level: %s%s", split, level, messages[0], more)
    write_json(out_dir / "metrics.json", {**headline, **clinical, "decision": decision.to_json(), **extra})
    rows = [(split, ids, out.labels, out.probs(decision.temperature))
            for split, (out, ids, _) in splits.items()]  # fmt: skip
    write_predictions(out_dir / "predictions.csv", rows, classes)
    focus = "test" if "test" in splits else next(iter(splits))
    panel = []
    if recipe.evaluation.explain:
        ds = split_dataset(recipe, table, bundle, focus, train=False)
        try:
            errors = _explain_panel(bundle, ds, outputs[focus], decision, classes, recipe.evaluation, device)
            panel = [(picture, title) for _, picture, title in errors]
        except ExplainError as err:  # the report is complete without its Grad-CAM panel
            log.warning("no Grad-CAM panel: %s", err)
    write_report(out_dir, meta, extra, clinical, outputs[focus], focus, decision, panel, recipe.evaluation)
    return headline


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> Path:
    """Trains a recipe into ``<output_dir>/<name>`` and writes metrics, predictions and the report.

    Under ``torchrun`` every rank calls this: each trains on its slice of every global batch, and
    rank 0 alone writes the run folder (see :mod:`medvision.runtime`).

    Examples:
        >>> run_dir = train(load_recipe("recipes/bloodmnist_effnet_lite0.yaml"))
    """
    d, device = setup(recipe.train.device)
    run_dir = Path(recipe.output_dir) / recipe.name
    if resume and not (run_dir / "last.pt").is_file():
        raise RunError(f"cannot resume: {run_dir / 'last.pt'} does not exist")
    if not resume and not overwrite and (run_dir / "recipe.yaml").exists():
        raise RunError(
            f"run folder {run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            "or --set name=<new name>"
        )
    if recipe.train.protocol == "finetune" and not recipe.train.phases:
        raise RunError("train.phases is empty; protocol finetune needs at least one phase, e.g. "
                       "[{epochs: 5, lr: 1e-3}], or set train.protocol to linear_probe or knn")  # fmt: skip
    if recipe.data.batch_size % d.world_size:
        raise RunError(
            f"data.batch_size {recipe.data.batch_size} is the global batch and must divide by the world size "
            f"{d.world_size}; use a multiple of {d.world_size}, e.g. "
            f"{d.world_size * max(1, recipe.data.batch_size // d.world_size)}"
        )
    barrier(d)  # every rank has checked the folder before rank 0 starts writing into it
    with run_log(run_dir, d):
        return _train(recipe, run_dir, resume, d, device)


@contextlib.contextmanager
def run_log(run_dir: Path, d: Dist) -> Iterator[None]:
    """Rank 0 logs at INFO into ``run_dir/train.log`` (complete even when the console shows only warnings);
    the other ranks log warnings only, so there is one log: rank 0's."""
    level = log.level
    handler = None
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = attach_log_file(run_dir)
        log.setLevel(logging.INFO)
    else:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _train(recipe: Recipe, run_dir: Path, resume: bool, d: Dist, device: torch.device) -> Path:
    start = time.perf_counter()
    if d.is_main:
        if not resume:
            for stale in ("model.safetensors", "last.pt", "metrics.json", "predictions.csv", "report.md",
                          "report.html"):  # fmt: skip
                (run_dir / stale).unlink(missing_ok=True)
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    seed_everything(recipe.seed)
    recipe.train.amp = resolve_amp(recipe.train.amp, device)  # type: ignore[assignment]
    log.info("device %s, amp %s, channels_last %s", device, recipe.train.amp, recipe.train.channels_last)
    workers = resolve_workers(recipe.data.num_workers, device)
    table = load_table(recipe.data, recipe.seed, cache_dir(recipe))
    bundle = build_model(recipe, table)
    model: nn.Module = bundle.model
    if recipe.train.sync_bn and d.world_size > 1:
        if device.type != "cuda":
            raise RunError("train.sync_bn: torch's SyncBatchNorm runs on GPUs only; on CPU ranks set it to false "
                           "(and consider bn: frozen phases, which need no batch statistics)")  # fmt: skip
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log.info("BatchNorm -> SyncBatchNorm: statistics over the global batch of %d ranks", d.world_size)
    model = model.to(device)
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bundle.model = model
    datasets = {s: split_dataset(recipe, table, bundle, s, train=s == "train") for s in ("train", "val", "test")}
    sizes = {s: len(ds) for s, ds in datasets.items()}
    log.info("data %s: %d classes, split sizes %s", table.origin, len(table.classes), sizes)
    for split in ("train", "val"):
        if sizes[split] == 0:
            raise RunError(f"the {split} split of {table.origin} is empty; adjust data.val_fraction or the split")
    meta = {
        "name": recipe.name,
        "classes": table.classes,
        "in_chans": bundle.in_chans,
        "mean": bundle.mean,
        "std": bundle.std,
        "image_size": recipe.data.image_size,
        "model": recipe.model.name,
        "split_sizes": sizes,
        "transfer": datasets["val"].transfer,  # how evaluation batches travelled; score and export do the same
        "device": str(device),
        "world_size": d.world_size,
        "protocol": recipe.train.protocol,
        "train_fraction": recipe.data.train_fraction,
        "tta": list(recipe.evaluation.tta),
        "versions": versions(),
    }
    if d.is_main:
        write_json(run_dir / "run.json", meta)

    train_labels = table.labels[datasets["train"].indices]
    if recipe.data.train_fraction < 1.0:
        counts = np.bincount(train_labels, minlength=len(table.classes)).tolist()
        log.info("data.train_fraction %g: %d training images with labels (per class %s)",
                 recipe.data.train_fraction, sizes["train"], counts)  # fmt: skip
    if recipe.train.protocol != "finetune":
        return _train_frozen(recipe, run_dir, bundle, table, meta, datasets, d, device, workers, start)
    per_rank = recipe.data.batch_size // d.world_size
    weights = None
    if recipe.train.balance == "sampler":
        weights = class_weights(train_labels, len(table.classes)).numpy()[train_labels]
        log.info("train.balance sampler: each epoch draws %d training images class-balanced, with replacement",
                 sizes["train"])  # fmt: skip
    sampler = EpochSampler(sizes["train"], recipe.seed, recipe.data.batch_size, d.rank, d.world_size,
                           datasets["train"].groups, recipe.data.tiles_per_slide, weights)  # fmt: skip
    criterion = None
    if recipe.train.balance == "loss" or recipe.train.focal_gamma > 0:
        cw = class_weights(train_labels, len(table.classes)) if recipe.train.balance == "loss" else None
        criterion = classification_loss(recipe.train, cw)
        log.info("loss: %s%s", f"focal (gamma {recipe.train.focal_gamma:g})" if recipe.train.focal_gamma > 0
                 else "cross-entropy", f", class weights {[round(w, 3) for w in cw.tolist()]}" if cw is not None
                 else "")  # fmt: skip
    if recipe.data.tiles_per_slide is not None:
        log.info("training on at most %d tiles per slide per epoch: %d of %d tiles", recipe.data.tiles_per_slide,
                 sampler.n, sizes["train"])  # fmt: skip
    train_loader = make_loader(datasets["train"], per_rank, workers, device, sampler)
    val_loader = make_loader(local_part(datasets["val"], d), recipe.data.eval_batch_size, workers, device)
    inputs = model_inputs(recipe, bundle)
    if d.world_size > 1:
        dropped = sizes["train"] - sampler.used
        log.info("distributed: %d ranks (%s), global batch %d = %d per rank; validation in %d shards gathered on "
                 "rank 0%s", d.world_size, "nccl" if device.type == "cuda" else "gloo", recipe.data.batch_size,
                 per_rank, d.world_size,
                 f"; the last {dropped} training sample(s) of each epoch are dropped (fewer than the ranks)"
                 if dropped else "")  # fmt: skip
    log.info("loader: %d worker(s), batches travel as %s and are normalised on %s%s", workers,
             datasets["train"].transfer, device, ", flips/rot90 on the device" if inputs.flips else "")  # fmt: skip
    state = fit(model, train_loader, val_loader, recipe.train, device, run_dir, recipe.seed, resume, inputs, d,
                criterion)  # fmt: skip

    barrier(d)  # rank 0 has written model.safetensors
    best = run_dir / "model.safetensors"
    if best.is_file():
        model.load_state_dict(load_model_state(best))
    elif d.is_main:
        log.warning("%s was never finite; keeping the last weights as model.safetensors", recipe.train.monitor)
        save_weights(model, best)
    extra = {"best_epoch": state.best_epoch, "monitor": recipe.train.monitor, "history": state.history}
    _evaluate_splits(recipe, run_dir, bundle, table, meta, sizes, d, device, workers, start, extra)
    return run_dir


def _train_frozen(recipe: Recipe, run_dir: Path, bundle: ModelBundle, table: SampleTable, meta: dict[str, Any],
                  datasets: dict[str, ImageDataset], d: Dist, device: torch.device, workers: int,
                  start: float) -> Path:  # fmt: skip
    """``linear_probe`` / ``knn``: rank 0 fits the head on frozen features; every rank then loads it."""
    info: dict[str, Any] = {}
    plain_train = split_dataset(recipe, table, bundle, "train", train=False)  # features without augmentation
    if d.is_main:
        info = fit_frozen_head(bundle.model, recipe, plain_train, datasets["val"], len(table.classes), device,
                               workers, model_inputs(recipe, bundle), run_dir)  # fmt: skip
    barrier(d)
    if not d.is_main:
        state = load_model_state(run_dir / "model.safetensors")
        fit_state(bundle.model, state, len(table.classes), recipe.train.knn_k, recipe.train.knn_temperature)
        bundle.model.load_state_dict(state)
        bundle.model.to(device)
    sizes = {s: len(ds) for s, ds in datasets.items()}
    extra: dict[str, Any] = {"best_epoch": 0, "monitor": None, "history": [], "protocol": info}
    _evaluate_splits(recipe, run_dir, bundle, table, meta, sizes, d, device, workers, start, extra)
    return run_dir


def _evaluate_splits(recipe: Recipe, run_dir: Path, bundle: ModelBundle, table: SampleTable, meta: dict[str, Any],
                     sizes: dict[str, int], d: Dist, device: torch.device, workers: int, start: float,
                     extra: dict[str, Any]) -> None:  # fmt: skip
    """The trained model on validation and test (sharded over the ranks), then rank 0 writes the results."""
    splits = {}
    for split in ("val", "test"):
        if sizes[split] == 0:
            log.warning("no %s split; skipping its metrics", split)
            continue
        outputs = _split_outputs(bundle, recipe, table, split, device, workers, d)
        if outputs is not None:
            splits[split] = outputs
    if d.is_main:
        _finish(recipe, run_dir, bundle, table, meta, splits, extra, start, device)
    barrier(d)  # no rank returns before the run folder is complete


def _finish(recipe: Recipe, run_dir: Path, bundle: ModelBundle, table: SampleTable, meta: dict[str, Any],
            splits: dict[str, Any], extra: dict[str, Any], start: float, device: torch.device) -> None:  # fmt: skip
    """Rank 0: calibration and operating points on validation, then metrics, predictions and the report."""
    if recipe.evaluation.patient_aggregate == "abmil":
        _slide_head(recipe, bundle, table, splits, device, run_dir, fit=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        decision = fit_decision(splits["val"][0], table.classes, recipe.evaluation)
    for w in caught:
        log.warning("%s", w.message)
    log.info("calibration: temperature %.3f fitted on validation", decision.temperature)
    meta["decision"] = decision.to_json()
    write_json(run_dir / "run.json", meta)
    seconds = time.perf_counter() - start
    weights = recipe.model.pretrained if isinstance(recipe.model.pretrained, str) else (
        "timm hub weights" if recipe.model.pretrained else
        f"init_from {recipe.model.init_from}" if recipe.model.init_from else "random init")  # fmt: skip
    meta["weights"] = weights
    meta["data"], meta["source"] = table.origin, recipe.data.source
    extra = {**extra, "seconds": seconds, "tta": list(recipe.evaluation.tta)}
    extra.update(_slide_comparison(recipe, splits, decision))
    _write_results(run_dir, bundle, recipe, table, meta, splits, decision, extra, device)
    log.info("run folder: %s (%.0f s)", run_dir, seconds)


def _slide_head(recipe: Recipe, bundle: ModelBundle, table: SampleTable, splits: dict[str, Any],
                device: torch.device, run_dir: Path, fit: bool) -> None:  # fmt: skip
    """Attention MIL: slide probabilities for every split in ``splits`` (set as their ``unit_probs``).

    ``fit`` trains the head on the training slides' frozen tile features and saves it in ``run_dir``;
    otherwise the run's saved head is applied.
    """
    from medvision.wsi.aggregate import MIL_FILE, bags, fit_slide_head
    from medvision.wsi.mil import load_abmil, predict_abmil

    workers = resolve_workers(recipe.data.num_workers, device)
    inputs = model_inputs(recipe, bundle)
    features, outputs = {}, {}
    for split in ("train", *splits) if fit else tuple(splits):
        ds = split_dataset(recipe, table, bundle, split, train=False)
        loader = make_loader(ds, recipe.data.eval_batch_size, workers, device)
        features[split] = extract_features(bundle.model, loader, device, recipe.train.amp, inputs)
        outputs[split] = splits[split][0] if split in splits else SplitOutputs(
            np.zeros((len(ds), len(table.classes))), table.labels[ds.indices], ds.groups)  # fmt: skip
    if fit:
        probs, _ = fit_slide_head(features, outputs, len(table.classes), recipe.seed, run_dir,
                                  {"model": recipe.model.name})  # fmt: skip
    else:
        if not (run_dir / MIL_FILE).is_file():
            raise RunError(f"{run_dir}: evaluation.patient_aggregate is abmil but {MIL_FILE} is missing")
        head, _ = load_abmil(run_dir / MIL_FILE)
        probs = {}
        for split in splits:
            _, split_bags, _ = bags(features[split], outputs[split].groups, outputs[split].labels)
            probs[split] = softmax(predict_abmil(head, split_bags)[0])
    for split, p in probs.items():
        splits[split][0].unit_probs = p


def _slide_comparison(recipe: Recipe, splits: dict[str, Any], decision: Decision) -> dict[str, Any]:
    """Whole-slide runs: mean / max / top-k (/ ABMIL) on the test (else validation) slides, side by side."""
    split = "test" if "test" in splits else "val"
    if split not in splits or recipe.data.source != "slides":
        return {}
    from medvision.wsi.aggregate import compare_aggregations

    out = splits[split][0]
    return {"slide_aggregates": compare_aggregations(out, decision.temperature, recipe.evaluation, out.unit_probs)}


def load_run(run_dir: Path, device: torch.device) -> tuple[Recipe, dict[str, Any], ModelBundle]:
    """The recipe, metadata and best model of a finished run (weights read as safetensors)."""
    for needed in ("recipe.yaml", "run.json", "model.safetensors"):
        if not (run_dir / needed).is_file():
            raise RunError(f"{run_dir} is not a finished medvision run: {needed} is missing")
    recipe = load_recipe(run_dir / "recipe.yaml")
    meta = json.loads((run_dir / "run.json").read_text())
    recipe.model.pretrained = False
    recipe.model.init_from = None
    recipe.model.in_chans = meta["in_chans"]
    model = create_backbone(recipe.model, num_classes=len(meta["classes"]), in_chans=meta["in_chans"])
    state = load_model_state(run_dir / "model.safetensors")
    fit_state(model, state, len(meta["classes"]), recipe.train.knn_k, recipe.train.knn_temperature)  # a knn run's bank
    model.load_state_dict(state)
    model.to(device)
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bundle = ModelBundle(model=model, in_chans=meta["in_chans"], mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    return recipe, meta, bundle


def _open_split(
    run_dir: Path, data: str | None, source: str | None, split: str | None
) -> tuple[torch.device, Recipe, dict[str, Any], ModelBundle, SampleTable, str]:
    """A finished run and the table it is to be applied to: its own, or ``data`` with the same classes."""
    _, device = setup("auto")  # under torchrun: this rank's device, and the process group
    recipe, meta, bundle = load_run(run_dir, device)
    recipe.train.amp = resolve_amp(recipe.train.amp, device)  # type: ignore[assignment]
    if data is not None:
        path = Path(data).resolve()
        recipe.data.path = str(path)
        folder_kind = "dicom" if recipe.data.source == "dicom" else "folder"
        guessed = "npz" if path.suffix == ".npz" else "csv" if path.suffix == ".csv" else folder_kind
        if recipe.data.source == "slides":  # a slide run evaluates slide manifests
            guessed = "slides"
        recipe.data.source = source or guessed  # type: ignore[assignment]
        recipe.data.limit = None
    recipe.data.classes = meta["classes"]
    split = split or ("test" if data is None else "all")
    table = load_table(recipe.data, recipe.seed, cache_dir(recipe))
    if split != "all" and len(table.indices(split)) == 0:
        raise RunError(f"{table.origin} has no '{split}' split; use --split all, train, val or test")
    return device, recipe, meta, bundle, table, split


def evaluate_run(
    run_dir: Path, data: str | None = None, source: str | None = None, split: str | None = None,
    out: Path | None = None,
) -> tuple[Path, dict[str, float]]:  # fmt: skip
    """Re-scores a run on its own test split, or on another dataset (``data``) with the same classes.

    The run's temperature and operating-point thresholds (chosen on its validation split) are
    applied as they are; nothing is refitted on the data being evaluated.
    """
    device, recipe, meta, bundle, table, split = _open_split(run_dir, data, source, split)
    d = current()
    workers = resolve_workers(recipe.data.num_workers, device)
    out = out or run_dir / "eval" / (f"{Path(table.origin).stem}-{split}" if data else split)
    decision = Decision.from_json(meta.get("decision"))
    meta.update(data=table.origin, source=recipe.data.source, weights=f"run {run_dir}")
    outputs = _split_outputs(bundle, recipe, table, split, device, workers, d)  # sharded across ranks
    metrics: dict[str, float] | None = None
    if outputs is not None:  # rank 0
        out.mkdir(parents=True, exist_ok=True)
        if recipe.evaluation.patient_aggregate == "abmil":
            _slide_head(recipe, bundle, table, {split: outputs}, device, run_dir, fit=False)
        extra = {"run": str(run_dir), "data": table.origin, "world_size": d.world_size,
                 "tta": list(recipe.evaluation.tta)}  # fmt: skip
        extra.update(_slide_comparison(recipe, {split: outputs}, decision))
        metrics = _write_results(out, bundle, recipe, table, meta, {split: outputs}, decision, extra, device)[split]
    metrics = broadcast(metrics, d)
    assert metrics is not None  # rank 0 always has them
    return out, metrics


def explain_errors(
    run_dir: Path, out: Path | None = None, split: str = "test", method: str | None = None, n: int | None = None
) -> list[Path]:
    """Grad-CAM overlays of a run's most confident errors on one split, one PNG each plus a panel.

    Writes ``<out>/errors.csv`` (item id, label, call, confidence, kind, file): item ids only, no
    patient identifiers. Returns the PNG paths, the panel last; none (and a header-only CSV) when
    the model makes no error on the split.

    Raises:
        ExplainError: Grad-CAM cannot be computed for this model.
    """
    device, recipe, meta, bundle, table, split = _open_split(run_dir, None, None, split)
    method = method or recipe.evaluation.explain_method
    cfg = recipe.evaluation.model_copy(
        update={"explain": n or recipe.evaluation.explain or 4, "explain_method": method}
    )
    workers = resolve_workers(recipe.data.num_workers, device)
    split_outputs = _split_outputs(bundle, recipe, table, split, device, workers)
    assert split_outputs is not None  # one process: always the whole split
    outputs, ids, _ = split_outputs
    decision = Decision.from_json(meta.get("decision"))
    ds = split_dataset(recipe, table, bundle, split, train=False)
    classes = meta["classes"]
    panel = _explain_panel(bundle, ds, outputs, decision, classes, cfg, device)
    out = out or run_dir / "explain"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    calls = outputs.probs(decision.temperature).argmax(axis=1)
    with (out / "errors.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label", "call", "confidence", "kind", "file"])
        for k, ((i, kind, conf), picture, _) in enumerate(panel):
            file = out / f"{k:02d}_{kind.replace(' ', '_')}_{cfg.explain_method}.png"
            if not cv2.imwrite(str(file), picture[:, :, ::-1]):
                raise RunError(f"{file}: OpenCV could not write the overlay PNG")
            written.append(file)
            call = int(calls[i])
            writer.writerow([ids[i], classes[int(outputs.labels[i])], classes[call], f"{conf:.4f}", kind, file.name])
    if panel:
        written.append(plot_image_grid(out / f"errors_{cfg.explain_method}.png", [p for _, p, _ in panel],
                                       [t for _, _, t in panel]))  # fmt: skip
    return written

"""A run end to end: recipe -> run folder (train), and run folder -> fresh metrics (evaluate).

A run folder holds everything needed to reproduce or reuse it: ``recipe.yaml`` (resolved, absolute
paths), ``run.json`` (classes, channels, normalisation, versions), ``model.safetensors`` (best
weights), ``last.pt`` (resume state), ``metrics.json``, ``predictions.csv``, ``report.md`` and
``train.log``.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

import medvision
from medvision.data.sources import SampleTable, load_table
from medvision.metrics import compute_metrics
from medvision.models.backbone import create_backbone
from medvision.models.backbone import load_state as load_model_state
from medvision.recipe import Recipe, dump_recipe, load_recipe
from medvision.report import write_json, write_predictions, write_report
from medvision.train.build import (
    EpochSampler,
    ModelBundle,
    build_model,
    make_loader,
    resolve_amp,
    resolve_device,
    resolve_workers,
    seed_everything,
    split_dataset,
)
from medvision.train.checkpoint import save_weights
from medvision.train.loop import evaluate, fit

log = logging.getLogger("medvision")


class RunError(RuntimeError):
    """A run folder that cannot be created, resumed or evaluated as asked."""


def cache_dir(recipe: Recipe) -> Path:
    """Where decoded DICOM pixels are cached: shared by the runs of one output folder."""
    return Path(recipe.output_dir) / ".cache" / "dicom"


def _attach_log_file(run_dir: Path) -> logging.Handler:
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


def _score_split(
    bundle: ModelBundle, recipe: Recipe, table: SampleTable, split: str, device: torch.device, workers: int
) -> tuple[dict[str, float], tuple[str, list[str], np.ndarray, np.ndarray]]:
    ds = split_dataset(recipe, table, bundle, split, train=False)
    loader = make_loader(ds, recipe.data.eval_batch_size, workers, device)
    probs, labels, loss = evaluate(bundle.model, loader, device, recipe.train.amp, recipe.train.channels_last)
    metrics = {**compute_metrics(labels, probs), "loss": loss}
    return metrics, (split, ds.ids, labels, probs)


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> Path:
    """Trains a recipe into ``<output_dir>/<name>`` and writes metrics, predictions and the report.

    Examples:
        >>> run_dir = train(load_recipe("recipes/bloodmnist_effnet_lite0.yaml"))
    """
    run_dir = Path(recipe.output_dir) / recipe.name
    if resume and not (run_dir / "last.pt").is_file():
        raise RunError(f"cannot resume: {run_dir / 'last.pt'} does not exist")
    if not resume and not overwrite and (run_dir / "recipe.yaml").exists():
        raise RunError(
            f"run folder {run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            "or --set name=<new name>"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _attach_log_file(run_dir)
    level = log.level
    log.setLevel(logging.INFO)  # train.log is complete even when the caller's console shows only warnings
    try:
        return _train(recipe, run_dir, resume)
    finally:
        log.setLevel(level)
        log.removeHandler(handler)
        handler.close()


def _train(recipe: Recipe, run_dir: Path, resume: bool) -> Path:
    start = time.perf_counter()
    if not resume:
        for stale in ("model.safetensors", "last.pt", "metrics.json", "predictions.csv", "report.md"):
            (run_dir / stale).unlink(missing_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    seed_everything(recipe.seed)
    device = resolve_device(recipe.train.device)
    recipe.train.amp = resolve_amp(recipe.train.amp, device)  # type: ignore[assignment]
    log.info("device %s, amp %s, channels_last %s", device, recipe.train.amp, recipe.train.channels_last)
    workers = resolve_workers(recipe.data.num_workers, device)
    table = load_table(recipe.data, recipe.seed, cache_dir(recipe))
    bundle = build_model(recipe, table)
    model = bundle.model.to(device)
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    datasets = {s: split_dataset(recipe, table, bundle, s, train=s == "train") for s in ("train", "val", "test")}
    sizes = {s: len(d) for s, d in datasets.items()}
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
        "device": str(device),
        "versions": versions(),
    }
    write_json(run_dir / "run.json", meta)

    train_loader = make_loader(
        datasets["train"], recipe.data.batch_size, workers, device, EpochSampler(sizes["train"], recipe.seed)
    )
    val_loader = make_loader(datasets["val"], recipe.data.eval_batch_size, workers, device)
    state = fit(model, train_loader, val_loader, recipe.train, device, run_dir, recipe.seed, resume)

    best = run_dir / "model.safetensors"
    if best.is_file():
        model.load_state_dict(load_model_state(best))
    else:
        log.warning("%s was never finite; keeping the last weights as model.safetensors", recipe.train.monitor)
        save_weights(model, best)
    results = {}
    rows = []
    for split in ("val", "test"):
        if sizes[split] == 0:
            log.warning("no %s split; skipping its metrics", split)
            continue
        results[split], row = _score_split(bundle, recipe, table, split, device, workers)
        rows.append(row)
    seconds = time.perf_counter() - start
    write_json(run_dir / "metrics.json", {**results, "best_epoch": state.best_epoch, "monitor": recipe.train.monitor,
                                          "history": state.history, "seconds": seconds})  # fmt: skip
    write_predictions(run_dir / "predictions.csv", rows, table.classes)
    weights = recipe.model.pretrained if isinstance(recipe.model.pretrained, str) else (
        "timm hub weights" if recipe.model.pretrained else
        f"init_from {recipe.model.init_from}" if recipe.model.init_from else "random init")  # fmt: skip
    write_report(run_dir / "report.md", {
        "name": recipe.name, "model": recipe.model.name, "weights": weights, "in_chans": bundle.in_chans,
        "image_size": recipe.data.image_size, "data": table.origin, "source": recipe.data.source,
        "classes": table.classes, "split_sizes": sizes, "best_epoch": state.best_epoch,
        "monitor": recipe.train.monitor, "seconds": seconds, "device": str(device), "metrics": results,
        "history": state.history,
    })  # fmt: skip
    for split, m in results.items():
        log.info("%s: AUC %.4f  accuracy %.4f  (n=%d)", split, m["auc"], m["acc"], m["n"])
    log.info("run folder: %s (%.0f s)", run_dir, seconds)
    return run_dir


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
    model.load_state_dict(load_model_state(run_dir / "model.safetensors"))
    model.to(device)
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bundle = ModelBundle(model=model, in_chans=meta["in_chans"], mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    return recipe, meta, bundle


def evaluate_run(
    run_dir: Path, data: str | None = None, source: str | None = None, split: str | None = None,
    out: Path | None = None,
) -> tuple[Path, dict[str, float]]:  # fmt: skip
    """Re-scores a run on its own test split, or on another dataset (``data``) with the same classes."""
    device = resolve_device("auto")
    recipe, meta, bundle = load_run(run_dir, device)
    recipe.train.amp = resolve_amp(recipe.train.amp, device)  # type: ignore[assignment]
    if data is not None:
        path = Path(data).resolve()
        recipe.data.path = str(path)
        folder_kind = "dicom" if recipe.data.source == "dicom" else "folder"
        guessed = "npz" if path.suffix == ".npz" else "csv" if path.suffix == ".csv" else folder_kind
        recipe.data.source = source or guessed  # type: ignore[assignment]
        recipe.data.limit = None
    recipe.data.classes = meta["classes"]
    split = split or ("test" if data is None else "all")
    table = load_table(recipe.data, recipe.seed, cache_dir(recipe))
    if split != "all" and len(table.indices(split)) == 0:
        raise RunError(f"{table.origin} has no '{split}' split; use --split all, train, val or test")
    workers = resolve_workers(recipe.data.num_workers, device)
    metrics, row = _score_split(bundle, recipe, table, split, device, workers)
    out = out or run_dir / "eval" / (f"{Path(table.origin).stem}-{split}" if data else split)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", {split: metrics, "run": str(run_dir), "data": table.origin})
    write_predictions(out / "predictions.csv", [row], meta["classes"])
    return out, metrics

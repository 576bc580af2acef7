"""What a finished ``train``, cross-validated MIL or ``pretrain`` run hands to experiment tracking
(:mod:`medvision.tracking`).

The run log starts the tracker and feeds it the epochs; these functions, called by the tasks once
the run folder is complete, log the final metrics, the folder's files and the model. The model of a
``train`` run is its ONNX export (:func:`medvision.tasks.export.export_run`, written to
``RUN/export/model.onnx`` and checked against PyTorch on the run's test images), logged as an MLflow
model whose pyfunc maps the raw NCHW batch to calibrated probabilities, as ``medvision score`` does.
A MIL run logs no model (see :func:`log_mil_run`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from medvision.errors import ExportError
from medvision.io.files import sha256
from medvision.recipe import Recipe
from medvision.runs import read_json, read_metrics_json, read_run_json
from medvision.tasks.export import export_run
from medvision.tracking import Tracker, flat_metrics, run_metrics, tracked

log = logging.getLogger("medvision")

TRAIN_FILES = ("recipe.yaml", "run.json", "metrics.json", "report.html", "report.md", "plots")
PRETRAIN_FILES = ("recipe.yaml", "run.json", "pretrain.json", "plots", "model.safetensors")
MIL_FILES = ("recipe.yaml", "run.json", "mil.json", "metrics.json", "report.html", "report.md", "plots")
"""A MIL run's files that tracking uploads (:mod:`medvision.tasks.mil`), besides its fold heads
(:func:`mil_uploads`): ``mil.json`` is its scoring record. ``folds.csv`` stays in the run folder: it names every
slide's path (patients only by pseudonym, :func:`medvision.tasks.mil.pseudonyms`), and paths can name patients."""
NAMING_FILES = ("predictions.csv", "data_audit.csv", "train.log")
"""Files that name input files: uploaded only with ``tracking.log_predictions``, since an archive's paths can name
patients (``DOE_JANE_MRN1234/IM0001.dcm``). ``predictions.csv`` and ``data_audit.csv`` list every file; ``train.log``
names the files a run left out or found odd (``data.on_error skip: ... left out: DOE_JANE_MRN1234/IM0015.png``)."""


def uploaded(run_dir: Path, files: tuple[str, ...], log_predictions: bool) -> list[Path]:
    """The run folder's files that tracking uploads."""
    return [run_dir / f for f in (*files, *(NAMING_FILES if log_predictions else ()))]


def mil_uploads(run_dir: Path, log_predictions: bool) -> list[Path]:
    """A MIL run's files that tracking uploads: :data:`MIL_FILES`, the fold heads ``folds/fold<k>.safetensors``
    (what ``score`` applies) and, only with ``tracking.log_predictions``, the fold records ``folds/fold<k>.json``
    and the :data:`NAMING_FILES`. A fold record lists its test slides' paths with their predictions and top tiles
    (every slide of the cohort over the k records), which can name patients; each fold's metrics reach the
    tracking server without it, from ``metrics.json``."""
    folds = run_dir / "folds"
    heads = sorted(folds.glob("fold*.safetensors"))
    records = sorted(folds.glob("fold*.json")) if log_predictions else []
    return [*uploaded(run_dir, MIL_FILES, log_predictions), *heads, *records]


def log_trained_run(tracker: Tracker, run_dir: Path) -> None:
    """A finished ``train`` run: the metrics of ``metrics.json`` with their CIs, its files, and (unless
    ``tracking.log_model`` is off) the calibrated model; an export that fails leaves the model out, with a
    warning that says why."""
    if not tracker.active:
        return
    metrics, tags = run_metrics(read_metrics_json(run_dir))
    meta = read_run_json(run_dir)
    tags = {**tags, "medvision.model": str(meta.get("model", "")), "medvision.classes": ",".join(meta["classes"])}
    model, model_meta = None, {"classes": meta["classes"], "input": "raw NCHW batch", "output": "probabilities"}
    if tracker.log_model and tracker.run_id is not None:
        try:
            model = checked_onnx(run_dir)
        except (ExportError, RuntimeError, ValueError, OSError) as err:
            log.warning("tracking: the model is not logged: its ONNX export failed (%s: %s)", type(err).__name__,
                        str(err).splitlines()[0] if str(err) else "")  # fmt: skip
    tracker.finish(run_dir, metrics, tags, uploaded(run_dir, TRAIN_FILES, tracker.log_predictions), model, model_meta)


def log_mil_run(tracker: Tracker, run_dir: Path) -> None:
    """A finished cross-validated MIL run (``data.source: slide_features``): each fold's metrics with their CIs
    at the fold's index as the step (``fold_auc``, ``fold_auc_ci_low``, ``fold_acc``, ... or ``fold_mae``,
    ``fold_mse``, ``fold_r2``; ``fold_slides``, ``fold_patients``, ``fold_best_epoch``, ``fold_seconds``, and the
    training patients that fitted and validated it, ``fold_fit_patients`` and ``fold_val_patients``), the
    summary over the folds and the pooled out-of-fold metrics as final metrics and tags (:func:`run_metrics`),
    and its files (:func:`mil_uploads`): the fold heads and the scoring record ``mil.json`` among them; the fold
    records, which list the slides' paths, only with ``tracking.log_predictions``.

    No MLflow model: a fold head maps a slide's bag of tile features, not an image, to its prediction, and
    scoring a new slide needs the encoder that made the features (named, with its SHA-256, in ``mil.json``)
    and all k heads; ``medvision score SLIDES --model RUN`` does that from the run folder.
    """
    if not tracker.active:
        return
    record = read_metrics_json(run_dir)
    for row in record.get("folds") or []:
        fold = flat_metrics({**row, "slides": row.get("n")}, "fold", skip=["fold", "n"])
        tracker.log_metrics(fold, step=int(row["fold"]))
    metrics, tags = run_metrics(record)
    meta = read_json(run_dir / "run.json", "run.json")
    extraction = meta.get("extraction") or {}
    tags = {**tags, "medvision.mil_head": str(meta.get("head", "")),
            "medvision.encoder": str(extraction.get("encoder", "")),
            "medvision.encoder_sha256": str(extraction.get("encoder_sha256", ""))}  # fmt: skip
    if meta.get("classes"):
        tags["medvision.classes"] = ",".join(meta["classes"])
    tracker.finish(run_dir, metrics, tags, mil_uploads(run_dir, tracker.log_predictions))


def checked_onnx(run_dir: Path) -> Path:
    """The run's ONNX export: ``RUN/export/model.onnx`` when its record says it was made, and checked, from the
    run's present weights (a benchmark's reused run, a second tracking), else a new export."""
    path = run_dir / "export" / "model.onnx"
    try:
        record = json.loads(path.with_name("model.onnx.json").read_text())
        if (record.get("parity") and record["sha256"] == sha256(path)
                and record["model_sha256"] == sha256(run_dir / "model.safetensors")):  # fmt: skip
            log.info("tracking: the checked ONNX export %s is of the present weights; logging it", path)
            return path
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return export_run(run_dir, "onnx").path


def log_pretrained_run(tracker: Tracker, run_dir: Path) -> None:
    """A finished ``pretrain`` run: the last epoch's loss and kNN accuracy, its files and the backbone's weights
    (``model.safetensors``, what ``model.init_from`` loads)."""
    if not tracker.active:
        return
    record = read_json(run_dir / "pretrain.json", "pretrain.json")
    history: list[dict[str, Any]] = record.get("history") or []
    last = history[-1] if history else {}
    metrics = {f"final_{k}": v for k, v in last.items() if k in ("train_loss", "knn_acc")}
    metrics["run_seconds"] = record.get("seconds")
    first = history[0].get("knn_acc") if history else None
    if first is not None:
        metrics["start_knn_acc"] = first
    tags = {"medvision.model": str(read_json(run_dir / "run.json", "run.json").get("model", ""))}
    tracker.finish(run_dir, metrics, tags, uploaded(run_dir, PRETRAIN_FILES, tracker.log_predictions))


def log_reused_run(parent: Tracker, run_dir: Path, recipe: Recipe) -> None:
    """A run a benchmark found finished, as a child run of ``parent``: its recipe, its epochs (from
    ``metrics.json``'s history), then as :func:`log_trained_run`. TensorBoard already has its epochs; the folder's
    ``tracking.json`` keeps naming the run that trained it (which ``train --resume`` reopens)."""
    if parent.run_id is None:
        return
    with tracked(run_dir, recipe.changed({"tracking.tensorboard": False}), parent, record=False) as child:
        for row in read_metrics_json(run_dir).get("history") or []:
            child.log_epoch(int(row["epoch"]), row)
        log_trained_run(child, run_dir)

"""Tiles to slides: frozen tile features, the attention-MIL head, and the comparison of aggregations.

With ``evaluation.patient_aggregate: abmil`` a run fine-tunes the backbone on tiles (each with its
slide's label) as usual, then embeds every tile with the fine-tuned backbone (timm's pre-logits
features, frozen) and trains an ABMIL head (:mod:`medvision.models.mil`) on the training slides' bags,
stopping early on the validation slides. Its slide probabilities replace the aggregated tile
probabilities in the slide-level metrics, operating points and report; the head is saved as
``abmil.safetensors`` in the run folder and ``score`` uses it.

Every slide run also tabulates mean, max and top-k (and ABMIL when trained) on the test slides
side by side, so the choice of aggregation rests on a measurement.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from medvision.evaluation import SplitOutputs
from medvision.intervals import bootstrap_cis
from medvision.metrics import aggregate_by_group, compute_accuracy, compute_auc, softmax
from medvision.models.mil_fit import MILConfig, fit_mil, kept_epoch, predict_mil, save_mil
from medvision.recipe import EvalConfig

log = logging.getLogger("medvision")
MIL_FILE = "abmil.safetensors"


def bags(features: np.ndarray, units: list[str], labels: np.ndarray) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """Slides in first-seen order, each slide's (n_tiles, F) bag, and its label (the tiles share it)."""
    index: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        index.setdefault(u, []).append(i)
    names = list(index)
    return names, [features[index[u]] for u in names], np.asarray([labels[index[u][0]] for u in names], np.int64)


def fit_slide_head(
    features: dict[str, np.ndarray], outputs: dict[str, SplitOutputs], num_classes: int, seed: int, out: Path,
    meta: dict[str, Any],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:  # fmt: skip
    """Trains ABMIL on the train slides (early stopping on val) and returns slide probabilities per split.

    ``features`` and ``outputs`` are keyed by split and must include ``train``; the head is written to
    ``out`` (``abmil.safetensors``) with ``meta``.
    """
    train = outputs["train"]
    _, train_bags, train_y = bags(features["train"], train.groups, train.labels)
    val_bags: list[np.ndarray] = []
    val_y = np.zeros(0, np.int64)
    if "val" in outputs:
        _, val_bags, val_y = bags(features["val"], outputs["val"].groups, outputs["val"].labels)
    cfg = MILConfig(seed=seed)
    model, history = fit_mil(train_bags, train_y, val_bags, val_y, num_classes, cfg)
    save_mil(model, out / MIL_FILE, meta)
    probs = {}
    for split, o in outputs.items():
        if split == "train":
            continue
        _, split_bags, _ = bags(features[split], o.groups, o.labels)
        logits, _ = predict_mil(model, split_bags)
        probs[split] = softmax(logits)
    kept = kept_epoch(history["best_epoch"], bool(history["val_loss"]))
    log.info("ABMIL head: %d training slides, %s", len(train_bags), kept)
    return probs, history


def compare_aggregations(out: SplitOutputs, temperature: float, cfg: EvalConfig, mil_probs: np.ndarray | None = None,
                         positive: int | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Slide-level AUC (with a bootstrap CI: a patient's slides drawn together where the data names patients) and
    accuracy of mean, max, top-k, and ABMIL when given."""
    p_tiles = out.probs(temperature)
    rows: dict[str, dict[str, Any]] = {}
    methods: list[tuple[str, str]] = [("mean", "mean"), ("max", "max"), (f"top-{cfg.top_k} mean", "topk")]
    y = np.zeros(0, np.int64)
    patients = out.bootstrap_groups("patient")
    for name, method in methods:
        _, y, p, _ = aggregate_by_group(out.groups, out.labels, p_tiles, method, cfg.top_k, positive)
        rows[name] = _row(y, p, cfg, patients)
    if mil_probs is not None:
        rows["ABMIL (attention MIL)"] = _row(y, mil_probs, cfg, patients)
    return rows


def _row(y: np.ndarray, p: np.ndarray, cfg: EvalConfig, patients: list[str] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"n": len(y), "auc": compute_auc(y, p), "acc": compute_accuracy(y, p)}
    if cfg.bootstrap and len(y) and math.isfinite(row["auc"]):
        cis = bootstrap_cis(y, p, {"auc": compute_auc}, cfg.bootstrap, cfg.bootstrap_seed, cfg.ci_level,
                            groups=patients)  # fmt: skip
        row["auc_ci"] = list(cis["auc"])
    return row

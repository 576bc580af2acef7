"""The frozen-feature protocols: ``train.protocol: linear_probe`` and ``knn``.

Both embed the training and validation images once, without augmentation, with the frozen backbone
(its starting weights: ImageNet, random, or an ``init_from`` run such as a ``medvision pretrain``
folder), fit only a head on those cached features (:mod:`medvision.models.heads`), and put the head
into the model as its classifier. From there a run is like any other: ``model.safetensors`` is a
whole timm model, and the same calibration, metrics, report, ``evaluate``, ``score`` and
``export`` follow. ``train.balance`` other than ``none`` weighs the probe's logistic regression by
inverse class frequency; k-NN votes are not re-weighted.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medvision.data.dataset import ImageDataset
from medvision.models.heads import KNNClassifier, extract_features, fit_linear_probe, set_classifier
from medvision.recipe import Recipe
from medvision.runtime import Inputs, make_loader
from medvision.training.checkpoint import save_weights

log = logging.getLogger("medvision")


def fit_frozen_head(
    model: nn.Module, recipe: Recipe, train_ds: ImageDataset, val_ds: ImageDataset, num_classes: int,
    device: torch.device, workers: int, inputs: Inputs, run_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    """Fits the protocol's head on frozen features, installs it in ``model``, writes ``model.safetensors``.

    ``train_ds`` must be the training split without augmentation. Returns what the run records
    about the fit (in metrics.json under ``protocol``).
    """
    cfg = recipe.train
    start = time.perf_counter()
    feats = {}
    for split, ds in (("train", train_ds), ("val", val_ds)):
        loader = make_loader(ds, recipe.data.eval_batch_size, workers, device)
        feats[split] = extract_features(model, loader, device, cfg.amp, inputs)
    y_train = train_ds.table.labels[train_ds.indices]
    y_val = val_ds.table.labels[val_ds.indices]
    embed_s = time.perf_counter() - start
    log.info("%s: %d training and %d validation images embedded by the frozen backbone (%d features, %.0f s)",
             cfg.protocol, len(y_train), len(y_val), feats["train"].shape[1], embed_s)  # fmt: skip
    info: dict[str, Any] = {"name": cfg.protocol, "train_images": len(y_train), "features": feats["train"].shape[1],
                            "embed_seconds": embed_s}  # fmt: skip
    head: nn.Module
    if cfg.protocol == "linear_probe":
        head, grid = fit_linear_probe(feats["train"], y_train, feats["val"], y_val, num_classes,
                                      cfg.balance != "none", recipe.seed)  # fmt: skip
        best = min(grid, key=lambda row: row["val_loss"])
        info.update(grid=grid, C=best["C"], balanced=cfg.balance != "none")
        log.info("linear probe: C %g chosen on validation log-loss", best["C"])
    elif cfg.protocol == "knn":
        head = KNNClassifier(torch.from_numpy(feats["train"]), torch.from_numpy(y_train), num_classes, cfg.knn_k,
                             cfg.knn_temperature)  # fmt: skip
        info.update(k=head.k, temperature=cfg.knn_temperature)
        if cfg.balance != "none":
            log.warning("train.balance %r does not re-weight k-NN votes", cfg.balance)
    else:
        raise ValueError(f"train.protocol {cfg.protocol!r} has no frozen head; finetune trains the phases")
    set_classifier(model, head.to(device))
    save_weights(model, run_dir / "model.safetensors", {"protocol": cfg.protocol})
    info["seconds"] = time.perf_counter() - start
    return info

"""``medvision demo``: a complete run on a synthetic H&E-like dataset, offline, in about a minute.

The tiles are drawn by :func:`synthetic_tile`: pink eosin-stained stroma with purple haematoxylin
nuclei. "tumor" tiles have many large, crowded nuclei; "stroma" tiles have few small, elongated
ones. Forty "patients" contribute tiles of both classes, so the patient-grouped split is exercised
too. The demo asks for ImageNet weights from the hub and, when this machine is offline, says so
and continues from random initialisation.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from medvision.models.backbone import PretrainedUnavailable, create_backbone
from medvision.recipe import Recipe, recipe_from_dict
from medvision.run import train

log = logging.getLogger("medvision")
CLASSES = ("stroma", "tumor")


def synthetic_tile(rng: np.random.Generator, tumor: bool, size: int = 64) -> np.ndarray:
    """An RGB uint8 H&E-like tile: eosin background, haematoxylin nuclei (dense and large if ``tumor``)."""
    eosin = np.array([236, 170, 200], dtype=np.float32) + rng.normal(0, 8, 3)
    noise = rng.normal(0, 10, (size, size, 1)).astype(np.float32)
    fibres = 12 * np.sin(np.linspace(0, rng.uniform(4, 12), size))[None, :, None] * rng.uniform(0.5, 1.0)
    tile = np.clip(eosin + noise + fibres, 0, 255).astype(np.uint8)
    n_nuclei = int(rng.integers(22, 36) if tumor else rng.integers(3, 9))
    for _ in range(n_nuclei):
        centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        if tumor:
            axes = (int(rng.integers(3, 6)), int(rng.integers(3, 6)))
        else:
            axes = (int(rng.integers(3, 7)), int(rng.integers(1, 3)))
        shade = np.array([95, 55, 140]) + rng.normal(0, 12, 3) - (25 if tumor else 0)
        colour = tuple(int(c) for c in np.clip(shade, 0, 255))
        cv2.ellipse(tile, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    return cv2.GaussianBlur(tile, (3, 3), 0.6)


def make_dataset(root: Path, patients: int = 40, tiles_per_patient: int = 12, seed: int = 0) -> Path:
    """Writes PNG tiles and ``manifest.csv`` (path,label,patient_id); returns the manifest path.

    Like slides, every other patient has no tumour at all; the others have tumour in about 75% of
    their tiles, so a patient-level call ("tumour anywhere on the slide") is meaningful.
    """
    rng = np.random.default_rng(seed)
    (root / "tiles").mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "patient_id"])
        for p in range(patients):
            for t in range(tiles_per_patient):
                tumor = p % 2 == 0 and bool(rng.random() < 0.75)
                rel = f"tiles/P{p:03d}_{t:02d}.png"
                rgb = synthetic_tile(rng, tumor)
                cv2.imwrite(str(root / rel), rgb[:, :, ::-1])
                writer.writerow([rel, CLASSES[tumor], f"P{p:03d}"])
    return manifest


def demo_recipe(manifest: Path, out: Path) -> dict[str, Any]:
    return {
        "name": "demo",
        "seed": 0,
        "output_dir": str(out / "runs"),
        "data": {"source": "csv", "path": str(manifest), "image_size": 64, "batch_size": 32,
                 "val_fraction": 0.2, "test_fraction": 0.2},
        "augment": {"preset": "pathology"},
        "model": {"name": "resnet18", "pretrained": True},
        "train": {
            "amp": "auto",
            "phases": [
                {"name": "head", "epochs": 1, "trainable": "head", "lr": 3e-3, "bn": "frozen"},
                {"name": "full", "epochs": 5, "trainable": "all", "lr": 2e-3, "warmup": 0.1},
            ],
        },
        "evaluation": {"patient_aggregate": "max"},  # a slide has tumour if any of its tiles has
    }  # fmt: skip


def run_demo(out: Path) -> Path:
    """Generates the data, trains the demo recipe and returns the run folder."""
    out = out.resolve()
    manifest = make_dataset(out / "data")
    log.info("demo data: %s (%d tiles, 40 patients)", manifest, sum(1 for _ in manifest.open()) - 1)
    recipe: Recipe = recipe_from_dict(demo_recipe(manifest, out), origin="demo")
    try:
        create_backbone(recipe.model, num_classes=len(CLASSES), in_chans=3)
    except PretrainedUnavailable as err:
        log.warning("pretrained weights unavailable: %s", err)
        log.warning("continuing from random initialisation (the demo data is easy enough to learn from scratch)")
        recipe.model.pretrained = False
    return train(recipe, overwrite=True)

"""``medvision demo``: a complete run on a synthetic H&E-like dataset, offline, in about a minute.

The tiles are drawn by :func:`synthetic_tile`: pink eosin-stained stroma with purple haematoxylin
nuclei. The classes overlap the way tissue does, and some labels are wrong the way annotations
are, so the report shows what a real one does: an imperfect model (from random initialisation,
test AUC 0.94-0.98 per image over data seeds 0-4 in fp32), confidence intervals, operating points inside
(0, 1), a moderate temperature, and confident errors worth a Grad-CAM look:

- "tumor" tiles hold large, round, pleomorphic nuclei with pale (vesicular) chromatin and a
  nucleolus; a quarter of them hold only three to six such cells in one corner of stroma (the
  edge of a tumour).
- "stroma" tiles hold spindle-shaped fibroblast nuclei. Some are crowded with inflammatory cells
  (as many nuclei as tumour, but small, round and dense), from none to half of a patient's stroma
  tiles; about a third hold plump reactive fibroblasts the size of small tumour nuclei, a few of
  them with a nucleolus.
- Stain colour and strength vary between patients (slides), as between stain batches and scanners.
- ``MISLABELLED`` (4%) of the tiles of tumour patients carry the other label, about 2% of all
  tiles: annotation outlines that bleed into the stroma next to a tumour or miss a small focus.
  The most confident "errors" in the report are often these, as in real data.

The patients mimic slides: every other patient has no tumour at all (and no tumour label); the
others have tumour in 35-95% of their tiles, or, for a fifth of them (``SMALL_TUMOURS``), in one
or two tiles of a few cells only: the slides a patient-level call ("tumour anywhere on the slide",
max aggregation) can miss. The split is grouped by patient. The demo asks for ImageNet
weights from the hub and, when this machine is offline, says so and continues from random
initialisation.
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
from medvision.tasks.train import train

log = logging.getLogger("medvision")
CLASSES = ("stroma", "tumor")
EOSIN = (236.0, 170.0, 200.0)
HAEMATOXYLIN = (95.0, 55.0, 140.0)
MISLABELLED = 0.04
"""Share of the tiles of tumour patients whose label is flipped (annotation noise)."""
SMALL_TUMOURS = 0.2
"""Share of tumour patients whose tumour is small: one or two tiles, each with a few tumour cells."""


def slide_stain(rng: np.random.Generator) -> np.ndarray:
    """One slide's (2, 3) eosin and haematoxylin RGB colours: stain batches and scanners differ."""
    eosin = np.asarray(EOSIN) + rng.normal(0, 10, 3)
    haematoxylin = np.asarray(HAEMATOXYLIN) * rng.uniform(0.85, 1.15) + rng.normal(0, 10, 3)
    return np.stack([eosin, haematoxylin]).astype(np.float32)


def _ellipse(tile: np.ndarray, centre: np.ndarray, axes: tuple[float, float], angle: float, colour: np.ndarray) -> None:
    # 4 fractional bits (shift=4): small nuclei come out round rather than as diamonds
    c = (int(centre[0] * 16), int(centre[1] * 16))
    a = (max(int(axes[0] * 16), 16), max(int(axes[1] * 16), 16))
    cv2.ellipse(tile, c, a, angle, 0, 360, tuple(float(v) for v in np.clip(colour, 0, 255)), -1, cv2.LINE_AA, 4)


def _nucleus(tile: np.ndarray, rng: np.random.Generator, centre: np.ndarray, axes: tuple[float, float],
             colour: np.ndarray, eosin: np.ndarray | None = None) -> None:  # fmt: skip
    """A filled nucleus; with ``eosin``, a vesicular one: pale chromatin inside a dark rim, and a nucleolus."""
    angle = float(rng.uniform(0, 180))
    _ellipse(tile, centre, axes, angle, colour)
    if eosin is not None and min(axes) >= 2.5:
        _ellipse(tile, centre, (axes[0] - 1.2, axes[1] - 1.2), angle, 0.45 * colour + 0.55 * eosin)
        _ellipse(tile, centre + rng.normal(0, 0.6, 2), (0.9, 0.9), 0.0, colour - 25)


def synthetic_tile(
    rng: np.random.Generator,
    tumor: bool,
    size: int = 64,
    stain: np.ndarray | None = None,
    inflammation: float = 0.25,
    edge: float = 0.25,
) -> np.ndarray:
    """An RGB uint8 H&E-like tile: eosin background, fibroblasts, and tumour or inflammatory nuclei.

    ``stain`` is the slide's :func:`slide_stain` (a fresh one when omitted); ``inflammation`` is the
    chance that a stroma tile is crowded with inflammatory cells, ``edge`` the chance that a tumour
    tile holds only a few tumour cells, in one corner of stroma (the edge of a tumour).
    """
    eosin, haem = slide_stain(rng) if stain is None else stain
    noise = rng.normal(0, 10, (size, size, 1))
    fibres = 12 * np.sin(np.linspace(0, rng.uniform(4, 12), size))[None, :, None] * rng.uniform(0.5, 1.0)
    tile = np.clip(eosin + noise + fibres, 0, 255).astype(np.float32)

    def anywhere() -> np.ndarray:
        return rng.uniform(0, size, 2)

    for _ in range(int(rng.integers(3, 10))):  # spindle-shaped fibroblasts, in every tile
        _nucleus(tile, rng, anywhere(), (rng.uniform(3, 6.5), rng.uniform(1, 2.2)), haem + rng.normal(0, 12, 3))
    if tumor:
        few = rng.random() < edge
        centre = anywhere()
        for _ in range(int(rng.integers(3, 7) if few else rng.integers(9, 22))):
            where = np.clip(centre + rng.normal(0, 8, 2), 0, size - 1) if few else anywhere()
            r = rng.uniform(2.8, 6.0)  # large, round-ish, pleomorphic, vesicular
            _nucleus(tile, rng, where, (r * rng.uniform(0.85, 1.15), r * rng.uniform(0.7, 1.0)),
                     haem - 15 + rng.normal(0, 14, 3), eosin)  # fmt: skip
    else:
        if rng.random() < inflammation:  # inflammatory crowding: as many nuclei as tumour, but small, round, dense
            for _ in range(int(rng.integers(12, 32))):
                r = rng.uniform(1.5, 3.0)
                _nucleus(tile, rng, anywhere(), (r, r * rng.uniform(0.85, 1.0)), haem - 30 + rng.normal(0, 10, 3))
        if rng.random() < 0.3:  # plump reactive fibroblasts, the size of small tumour nuclei, some with a nucleolus
            for _ in range(int(rng.integers(2, 6))):
                where, axes = anywhere(), (rng.uniform(3, 4.5), rng.uniform(2.2, 3.2))
                colour = haem - 10 + rng.normal(0, 12, 3)
                _nucleus(tile, rng, where, axes, colour, eosin if rng.random() < 0.3 else None)
    return cv2.GaussianBlur(np.clip(tile, 0, 255).astype(np.uint8), (3, 3), 0.6)


def make_dataset(root: Path, patients: int = 120, tiles_per_patient: int = 6, seed: int = 0) -> Path:
    """Writes PNG tiles and ``manifest.csv`` (path,label,patient_id); returns the manifest path.

    Like slides, every other patient has no tumour at all. The others have tumour in 35-95% of
    their tiles, or in just one or two edge-of-tumour tiles (a share ``SMALL_TUMOURS`` of them),
    so a patient-level call ("tumour anywhere on the slide") is meaningful and not trivial. Each
    patient has one stain (:func:`slide_stain`) and its own degree of inflammation. In tumour
    patients a share ``MISLABELLED`` of the tiles carry the other label, though never all of a
    patient's tumour tiles; tumour-free patients keep clean labels, so every slide-level label is
    right. The same ``seed`` writes the same tiles.
    """
    rng = np.random.default_rng(seed)
    (root / "tiles").mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "patient_id"])
        for p in range(patients):
            stain, inflammation = slide_stain(rng), rng.uniform(0.0, 0.5)
            truth, small = np.zeros(tiles_per_patient, dtype=bool), False
            if p % 2 == 0:
                small, share = rng.random() < SMALL_TUMOURS, rng.uniform(0.35, 0.95)
                n_tumor = int(rng.integers(1, 3)) if small else max(1, int(rng.binomial(tiles_per_patient, share)))
                truth[rng.choice(tiles_per_patient, n_tumor, replace=False)] = True
                labels = truth ^ (rng.random(tiles_per_patient) < MISLABELLED)
                labels = labels if labels.any() else truth  # the noise never hides a whole tumour
            else:
                labels = truth
            for t, (tumor, label) in enumerate(zip(truth, labels, strict=True)):
                rel = f"tiles/P{p:03d}_{t:02d}.png"
                rgb = synthetic_tile(
                    rng, bool(tumor), stain=stain, inflammation=inflammation, edge=1.0 if small else 0.25
                )
                cv2.imwrite(str(root / rel), rgb[:, :, ::-1])
                writer.writerow([rel, CLASSES[int(label)], f"P{p:03d}"])
    return manifest


def demo_recipe(manifest: Path, out: Path, amp: str = "auto") -> dict[str, Any]:
    return {
        "name": "demo",
        "seed": 0,
        "output_dir": str(out / "runs"),
        "data": {"source": "csv", "path": str(manifest), "image_size": 64, "batch_size": 32,
                 "val_fraction": 0.2, "test_fraction": 0.2},
        "augment": {"preset": "pathology"},
        "model": {"name": "resnet18", "pretrained": True},
        "train": {
            "amp": amp,
            "phases": [
                {"name": "head", "epochs": 1, "trainable": "head", "lr": 3e-3, "bn": "frozen"},
                {"name": "full", "epochs": 8, "trainable": "all", "lr": 2e-3, "warmup": 0.1},
            ],
        },
        "evaluation": {"patient_aggregate": "max"},  # a slide has tumour if any of its tiles has
    }  # fmt: skip


def run_demo(out: Path, amp: str = "auto") -> Path:
    """Generates the data, trains the demo recipe and returns the run folder.

    ``amp``: ``auto`` trains in bf16 on a CPU with native bf16 (and fp32 elsewhere), so figures differ by
    machine; ``none`` pins fp32, the precision of the figures in the README and docs."""
    out = out.resolve()
    manifest = make_dataset(out / "data")
    rows = list(csv.DictReader(manifest.open()))
    log.info("demo data: %s (%d tiles, %d patients)", manifest, len(rows), len({r["patient_id"] for r in rows}))
    recipe: Recipe = recipe_from_dict(demo_recipe(manifest, out, amp), origin="demo")
    try:
        create_backbone(recipe.model, num_classes=len(CLASSES), in_chans=3)
    except PretrainedUnavailable as err:
        log.warning("pretrained weights unavailable: %s", err)
        log.warning("continuing from random initialisation (the demo data can be learnt from scratch, if less well)")
        recipe = recipe.changed({"model.pretrained": False})
    return train(recipe, overwrite=True)

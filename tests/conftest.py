"""Shared fixtures: a tiny synthetic H&E dataset, a tiny recipe, and the ../shared folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from medvision.tasks.demo import make_dataset

SHARED = Path(os.environ.get("MEDVISION_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"shared data folder {SHARED} is absent (set MEDVISION_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def tiles_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """72 synthetic H&E-like tiles from 12 patients, with a CSV manifest (path,label,patient_id)."""
    return make_dataset(tmp_path_factory.mktemp("tiles"), patients=12, tiles_per_patient=6, seed=1)


def tiny_recipe(manifest: Path, out: Path, **train: Any) -> dict[str, Any]:
    """A recipe that trains timm's 100k-parameter test_efficientnet at 32 px in about a second an epoch."""
    phases = train.pop("phases", [
        {"name": "head", "epochs": 1, "trainable": "head", "lr": 1e-2, "bn": "frozen"},
        {"name": "full", "epochs": 1, "trainable": "all", "lr": 3e-3},
    ])  # fmt: skip
    return {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(out),
        "data": {"source": "csv", "path": str(manifest), "image_size": 32, "batch_size": 16,
                 "val_fraction": 0.25, "test_fraction": 0.25},
        "augment": {"preset": "pathology"},
        "model": {"name": "test_efficientnet"},
        "train": {"amp": "none", "phases": phases, "log_interval": 2, **train},
        "evaluation": {"bootstrap": 50},
    }  # fmt: skip


@pytest.fixture(scope="session")
def dicom_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained on real pydicom CT and MR images (greyscale, percentile window), for scoring tests."""
    pytest.importorskip("pydicom")
    from test_dicom_source import make_dicom_folder

    from medvision.recipe import recipe_from_dict
    from medvision.tasks.train import train

    root = tmp_path_factory.mktemp("train_dicom")
    make_dicom_folder(root, per_class=6)
    tree = tiny_recipe(root, tmp_path_factory.mktemp("runs"))
    tree["data"].update(source="dicom", path=str(root), dicom={"windows": ["percentile"], "cache": False})
    tree["augment"] = {"preset": "radiology"}
    return train(recipe_from_dict(tree))

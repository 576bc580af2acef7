"""What every export format shares: the run's calibrated model and spec, real parity images, the checks.

The parity images are the first images of the run's test split (else validation) as
:func:`medvision.training.build.split_dataset` yields them: read from disk, mapped to [0, 1], resized
and compacted to the run's transfer dtype, i.e. exactly what the loader feeds the model in
evaluate and score. An exported model is compared with :class:`CalibratedClassifier` on them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvision.data.dataset import ImageDataset
from medvision.data.sources import load_table
from medvision.data.table import DataSourceError
from medvision.errors import ExportError
from medvision.inference import load_run
from medvision.io.files import atomic_write
from medvision.io.image import ImageReadError
from medvision.models.deploy import CalibratedClassifier
from medvision.recipe import Recipe
from medvision.runs import ScoringSpec, cache_dir, versions
from medvision.training.build import ModelBundle, split_dataset

log = logging.getLogger("medvision")

FORMATS = ("onnx", "monai-bundle")


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and what it checked."""

    format: str
    path: Path
    """``model.onnx`` or the bundle folder."""
    record: Path
    """JSON record of the export: checks, figures, file hashes and versions."""
    parity: float | None
    """max |p_export - p_torch| on the parity images (None when the check was skipped with 0 images)."""
    images: int
    split: str | None
    checks: list[str] = field(default_factory=list)
    """One human-readable line per check that passed, in the order they ran."""

    def lines(self) -> list[str]:
        return [f"{self.format}: {self.path}", *self.checks, f"record: {self.record}"]


PARITY_ATOL = 1e-4
"""Largest max |p_export - p_torch| an export may show on the parity images (fp32 throughout)."""


@dataclass
class ExportSource:
    """A finished run opened for export, on the CPU: the calibrated model and the spec that goes with it."""

    run_dir: Path
    recipe: Recipe
    meta: dict[str, Any]
    bundle: ModelBundle
    spec: ScoringSpec
    model: CalibratedClassifier
    """In eval mode, contiguous memory format (the exported graph carries no layout transposes)."""

    @property
    def input_dtype(self) -> torch.dtype:
        """What an exported model takes: uint8 for uint8 transfer, float32 otherwise (float16 batches are widened)."""
        return torch.uint8 if self.spec.transfer == "uint8" else torch.float32

    def example(self, batch: int = 2) -> torch.Tensor:
        """A zero batch of the exported input's shape and dtype (batch 2, so that tracing keeps the batch dynamic)."""
        size = self.spec.image_size
        return torch.zeros((batch, self.spec.in_chans, size, size), dtype=self.input_dtype)


def open_run(run_dir: Path) -> ExportSource:
    """Loads a finished run on the CPU (``RunError`` names a missing file) and wraps it for export."""
    run_dir = Path(run_dir)
    recipe, meta, bundle = load_run(run_dir, torch.device("cpu"))
    bundle.model = bundle.model.to(memory_format=torch.contiguous_format).eval()
    spec = ScoringSpec.from_run(run_dir, recipe, meta)
    model = CalibratedClassifier(bundle.model, spec.mean, spec.std, spec.temperature, spec.tta).eval()
    return ExportSource(run_dir, recipe, meta, bundle, spec, model)


@dataclass
class ParityImages:
    """Up to n images of one split of the run's own data, as the loader yields them."""

    dataset: ImageDataset
    split: str
    batch: torch.Tensor
    """(n, C, H, W) in the run's transfer dtype."""

    def __len__(self) -> int:
        return len(self.batch)


def load_parity_images(source: ExportSource, n: int) -> ParityImages | None:
    """The first ``n`` images of the run's test split, else of its validation split; None for ``n == 0``.

    Raises :class:`ExportError` when the run's data cannot be read (moved or deleted): without it
    the export cannot be checked.
    """
    if n < 0:
        raise ExportError(f"--parity-images must be >= 0, got {n}")
    if n == 0:
        log.warning("export: parity check skipped (0 images); the exported model is NOT checked against the run")
        return None
    recipe = source.recipe
    try:
        table = load_table(recipe.data, recipe.seed, cache_dir(recipe))
        for split in ("test", "val"):
            ds = split_dataset(recipe, table, source.bundle, split, train=False)
            if len(ds):
                k = min(n, len(ds))
                return ParityImages(ds, split, torch.stack([ds[i][0] for i in range(k)]))
    except (DataSourceError, ImageReadError, FileNotFoundError) as err:
        raise ExportError(
            f"the parity check needs {source.run_dir}'s own images, which cannot be read: {err}. "
            "Restore the data (recipe.yaml data.path) or pass --parity-images 0 to export unchecked"
        ) from None
    raise ExportError(f"{source.run_dir}: the run's test and validation splits are both empty; nothing to check on")


def torch_probabilities(model: torch.nn.Module, batch: torch.Tensor, chunk: int = 64) -> np.ndarray:
    """Probabilities of ``model`` on ``batch`` (float32 numpy), in chunks."""
    with torch.inference_mode():
        parts = [model(batch[i : i + chunk]).float().numpy() for i in range(0, len(batch), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def chunk_sizes(n: int, largest: int = 16) -> list[int]:
    """Batch sizes that cover ``n`` images: one alone first, then up to ``largest`` at a time.

    Running an export on batches of 1 and of several checks that its batch dimension is really dynamic.
    """
    sizes = [1] if n else []
    rest = n - 1
    while rest > 0:
        sizes.append(min(largest, rest))
        rest -= sizes[-1]
    return sizes


def check_parity(what: str, exported: np.ndarray, reference: np.ndarray, atol: float, images: ParityImages) -> float:
    """max |exported - reference|; raises :class:`ExportError` when it is above ``atol`` or not finite."""
    if exported.shape != reference.shape:
        raise ExportError(f"{what} returned shape {exported.shape}, the PyTorch model {reference.shape}")
    diff = float(np.max(np.abs(exported.astype(np.float64) - reference))) if exported.size else 0.0
    if not math.isfinite(diff) or diff > atol:
        raise ExportError(
            f"parity check failed: on {len(images)} {images.split} images of the run, max |p_{what} - p_torch| = "
            f"{diff:.3g} > {atol:g}; the exported model does not compute what the run's model computes, so it "
            "was not written"
        )
    return diff


def parity_line(what: str, diff: float | None, images: ParityImages | None, atol: float) -> str:
    if diff is None or images is None:
        return "parity: NOT CHECKED (--parity-images 0)"
    return f"parity on {len(images)} {images.split} images: max |p_{what} - p_torch| = {diff:.2e} (limit {atol:.0e})"


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A scratch folder next to ``final`` (same filesystem, so renames out of it are atomic), always removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def replace_dir(stage: Path, final: Path) -> None:
    """Moves a finished folder into place, replacing an older one only once the new one is complete."""
    os.chmod(stage, 0o755)  # mkdtemp made it private
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(stage, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Writes a JSON record atomically, world-readable like the model beside it (mkstemp would leave it 0600)."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")
        os.chmod(tmp, 0o644)

    atomic_write(path, write)


def export_versions(*modules: str) -> dict[str, str]:
    """medvision, torch, timm, python, plus the named packages' versions."""
    out = versions()
    for name in modules:
        module = __import__(name)
        out[name] = str(getattr(module, "__version__", "unknown"))
    out["numpy"] = np.__version__
    return out


def spec_summary(spec: ScoringSpec) -> dict[str, Any]:
    """The human-readable facts of a spec, shared by the ONNX metadata and the bundle's metadata."""
    decision = spec.decision or {}
    positive = decision.get("positive")
    summary: dict[str, Any] = {
        "classes": spec.classes,
        "image_size": spec.image_size,
        "channels": spec.in_chans,
        "inputs": spec.inputs,
        "intensity": spec.intensity,
        "input_dtype": "uint8" if spec.transfer == "uint8" else "float32",
        "transfer": spec.transfer,
        "temperature": spec.temperature,
        "positive_class": spec.classes[positive] if isinstance(positive, int) else None,
        "operating_points": decision.get("points", {}),
        "model_sha256": spec.model_sha256,
        "medvision_version": spec.medvision_version,
    }
    if spec.inputs == "dicom":
        summary["dicom_windows"] = spec.dicom.get("windows")
        summary["dicom_voi_function"] = spec.dicom.get("voi_function")
        summary["dicom_frames"] = spec.dicom.get("frames")
    return summary


@contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Silences third-party chatter around a call: torch's deprecation notices for ``torch.jit`` (still
    the format MONAI bundles use), MONAI's notes about GPU DICOM decoding it cannot find, and the named
    loggers below ERROR (onnxscript logs every optimiser pass at INFO)."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    try:
        for name in loggers:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning, UserWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)

"""The run-folder contract: what a run folder holds, how it is named, and how it is read back.

A run folder (``<output_dir>/<name>``) holds ``recipe.yaml`` (resolved, absolute paths), ``run.json``
(classes, channels, normalisation, decision, versions), ``model.safetensors`` (best weights),
``last.pt`` (resume state), ``metrics.json``, ``predictions.csv``, ``data_audit.csv``, ``report.md``/
``report.html`` and ``train.log``. Every task reads a run through this module, so they agree on it:
:func:`read_run_json` and :func:`read_metrics_json` check what they read and name the file and key at
fault, and :class:`ScoringSpec` is everything scoring needs besides the weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import timm
import torch

import medvision
from medvision.errors import MedvisionError
from medvision.io.files import sha256
from medvision.recipe import Recipe
from medvision.tracking import Tracker, tracked

if TYPE_CHECKING:
    from medvision.runtime import Dist

log = logging.getLogger("medvision")


class RunError(MedvisionError, RuntimeError):
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


EPOCH_ROW = "epoch_row"
"""Key of an epoch's metrics in a log record's ``extra``: the loop logs ``log.info(..., extra={EPOCH_ROW: row})``
with ``row["epoch"]`` the step, and the run log hands the row to the run's tracker."""


class _EpochRows(logging.Handler):
    """Hands each epoch row that reaches the run log to the tracker (:mod:`medvision.tracking`)."""

    def __init__(self, tracker: Tracker) -> None:
        super().__init__(logging.INFO)
        self.tracker = tracker

    def emit(self, record: logging.LogRecord) -> None:
        row = getattr(record, EPOCH_ROW, None)
        if isinstance(row, dict) and "epoch" in row:
            self.tracker.log_epoch(int(row["epoch"]), row)


@contextlib.contextmanager
def run_log(run_dir: Path, d: Dist, recipe: Recipe | None = None, parent: Tracker | None = None,
            kind: str = "train") -> Iterator[Tracker]:  # fmt: skip
    """Rank 0 logs at INFO into ``run_dir/train.log`` (complete even when the console shows only warnings);
    the other ranks log warnings only, so there is one log: rank 0's.

    With a ``recipe``, rank 0 also tracks the run as ``recipe.tracking`` asks (a child of ``parent``): the
    tracker is started here, receives every epoch row logged with ``extra={EPOCH_ROW: row}``, is yielded for
    the task to :meth:`~medvision.tracking.Tracker.finish`, and ends with the run (FAILED on an error). Other
    ranks, and runs without a recipe, get an idle tracker.
    """
    level = log.level
    handler = None
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = attach_log_file(run_dir)
        log.setLevel(logging.INFO)
    else:
        log.setLevel(logging.WARNING)
    try:
        if recipe is None or not d.is_main:
            yield Tracker()
            return
        with tracked(run_dir, recipe, parent, kind) as tracker:
            rows = _EpochRows(tracker)
            log.addHandler(rows)
            try:
                yield tracker
            finally:
                log.removeHandler(rows)
    finally:
        log.setLevel(level)
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


RUN_JSON_KEYS = ("classes", "in_chans", "mean", "std")


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a run folder; a missing or damaged file is a :class:`RunError` that names it."""
    if not path.is_file():
        raise RunError(f"{path}: no {what}; is {path.parent} a finished medvision run?")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{path}: not a readable {what} ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def read_run_json(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of a run folder, checked: classes, channels and normalisation are present and typed."""
    path = run_dir / "run.json"
    meta = read_json(path, "run.json")
    missing = [k for k in RUN_JSON_KEYS if k not in meta]
    if missing:
        raise RunError(f"{path}: missing {', '.join(missing)}; expected a run.json written by medvision train")
    if not (isinstance(meta["classes"], list) and all(isinstance(c, str) for c in meta["classes"])):
        raise RunError(f"{path}: 'classes' is {meta['classes']!r}; expected a list of class names")
    if not isinstance(meta["in_chans"], int) or len(meta["mean"]) != len(meta["std"]):
        raise RunError(f"{path}: in_chans {meta['in_chans']!r}, mean {meta['mean']!r}, std {meta['std']!r} do not fit")
    return meta


def read_metrics_json(run_dir: Path) -> dict[str, Any]:
    """``metrics.json`` of a finished run (headline metrics per split, clinical metrics, the decision)."""
    return read_json(run_dir / "metrics.json", "metrics.json")


InputKind = Literal["dicom", "images", "slides"]
Transfer = Literal["uint8", "float16", "float32"]


@dataclass(frozen=True)
class ScoringSpec:
    """Everything scoring needs about a model besides its weights (see the module docstring)."""

    name: str
    classes: list[str]
    image_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    inputs: InputKind
    """Which files are scored: DICOM (a run trained on DICOM) or PNG/JPEG/TIFF/BMP images (any other source)."""
    intensity: str
    """``data.intensity`` of the recipe: how native pixel values map to [0, 1]."""
    dicom: dict[str, Any] = field(default_factory=dict)
    """The recipe's ``data.dicom`` section (windows, VOI function, frames)."""
    slides: dict[str, Any] = field(default_factory=dict)
    """The recipe's ``data.slides`` section (magnification, tile size, tissue rule, stain) for slide runs."""
    aggregate: str = "mean"
    """``evaluation.patient_aggregate``: how a slide's tile probabilities become the slide's."""
    top_k: int = 3
    transfer: Transfer = "float32"
    """Dtype of the unnormalised batches: uint8 for 8-bit sources, float otherwise (DICOM windows, 16-bit)."""
    decision: dict[str, Any] = field(default_factory=dict)
    """:class:`medvision.evaluation.Decision` as JSON: temperature, positive class, operating points."""
    tta: list[str] = field(default_factory=list)
    """``evaluation.tta``: the transforms whose calibrated probabilities are averaged with the image's own."""
    model_sha256: str = ""
    """SHA-256 of the run's ``model.safetensors``: the weights every exported format was made from."""
    recipe_sha256: str = ""
    medvision_version: str = ""

    @property
    def temperature(self) -> float:
        return float(self.decision.get("temperature", 1.0)) if self.decision else 1.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, origin: str = "<json>") -> ScoringSpec:
        """Reads :meth:`to_json` back; ``origin`` names the file in the error for a foreign or damaged record."""
        try:
            data = json.loads(text)
            data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
            return cls(**data)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{origin}: not a medvision scoring spec ({type(err).__name__}: {err})") from None

    @classmethod
    def from_run(cls, run_dir: Path, recipe: Any, meta: dict[str, Any]) -> ScoringSpec:
        """The spec of a finished run, from its resolved recipe and ``run.json``.

        The batches are made in the dtype the run's evaluation used (``run.json``'s ``transfer``: a DICOM run
        trained with ``data.transfer: uint8`` is scored in uint8 too). Runs written before ``run.json`` recorded it
        score in float32 (exact for any depth) for images, and as the recipe says for DICOM.
        """
        source = recipe.data.source
        inputs: InputKind = "dicom" if source == "dicom" else "slides" if source == "slides" else "images"
        transfer: Transfer
        if meta.get("transfer"):
            transfer = meta["transfer"]
        elif inputs == "dicom":
            transfer = "float16" if recipe.data.transfer == "float16" else "float32"
        else:
            transfer = recipe.data.transfer if recipe.data.transfer != "auto" else "float32"
        return cls(
            name=str(meta.get("name", run_dir.name)),
            classes=list(meta["classes"]),
            image_size=int(meta.get("image_size", recipe.data.image_size)),
            in_chans=int(meta["in_chans"]),
            mean=tuple(float(v) for v in meta["mean"]),
            std=tuple(float(v) for v in meta["std"]),
            inputs=inputs,
            intensity=recipe.data.intensity,
            dicom=recipe.data.dicom.model_dump(mode="json"),
            slides=recipe.data.slides.model_dump(mode="json") if inputs == "slides" else {},
            aggregate=recipe.evaluation.patient_aggregate,
            top_k=recipe.evaluation.top_k,
            transfer=transfer,
            decision=dict(meta.get("decision") or {}),
            tta=list(recipe.evaluation.tta),
            model_sha256=sha256(run_dir / "model.safetensors"),
            recipe_sha256=sha256(run_dir / "recipe.yaml"),
            medvision_version=medvision.__version__,
        )

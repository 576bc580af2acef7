"""The run-folder contract: what a run folder holds, how it is named, and how it is read back.

A run folder (``<output_dir>/<name>``) holds ``recipe.yaml`` (resolved, absolute paths), ``run.json``
(classes, channels, normalisation, decision, versions), ``model.safetensors`` (best weights),
``last.pt`` (resume state), ``splits.csv`` (the id of every image the run trained, validated and tested on, and
its split), ``metrics.json``, ``predictions.csv``, ``data_audit.csv``, ``report.md``/``report.html`` and
``train.log``. Every task reads a run through this module, so they agree on it:
:func:`read_run_json` and :func:`read_metrics_json` check what they read and name the file and key at
fault, and :class:`ScoringSpec` is everything scoring needs besides the weights.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import platform
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import timm
import torch
from pydantic import ValidationError

import medvision
from medvision.errors import MedvisionError
from medvision.io.files import atomic_write, sha256
from medvision.io.image import Intensity
from medvision.recipe import EvalConfig, Recipe
from medvision.recipe_nodes import DicomConfig, SlidesConfig
from medvision.tracking import Tracker, tracked

if TYPE_CHECKING:
    from medvision.runtime import Dist

log = logging.getLogger("medvision")


class RunError(MedvisionError, RuntimeError):
    """A run folder that cannot be created, resumed or evaluated as asked."""


def nothing_to_resume(run_dir: Path, missing: Path, first: str) -> RunError:
    """The error of a resume that finds no ``missing`` (``last.pt``, ``folds/``): a run that stopped before its
    ``first`` (checkpoint, fold) has nothing to continue and starts again with ``--overwrite``; a folder without
    ``recipe.yaml`` was never a run."""
    if (run_dir / "recipe.yaml").is_file():
        return RunError(f"cannot resume {run_dir}: it stopped before its {first} (no {missing}), so there is nothing "
                        "to continue; start it again with --overwrite")  # fmt: skip
    return RunError(f"cannot resume: {missing} does not exist")


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
            kind: str = "train", resume: bool = False) -> Iterator[Tracker]:  # fmt: skip
    """Rank 0 logs at INFO into ``run_dir/train.log`` (complete even when the console shows only warnings);
    the other ranks log warnings only, so there is one log: rank 0's.

    With a ``recipe``, rank 0 also tracks the run as ``recipe.tracking`` asks (a child of ``parent``): the
    tracker is started here, receives every epoch row logged with ``extra={EPOCH_ROW: row}``, is yielded for
    the task to :meth:`~medvision.tracking.Tracker.finish`, and ends with the run (FAILED on an error, KILLED on
    Ctrl-C or SIGTERM). A ``resume`` continues the MLflow run the folder's ``tracking.json`` names. Other ranks,
    and runs without a recipe, get an idle tracker.
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
        with tracked(run_dir, recipe, parent, kind, resume=resume) as tracker:
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
    intensity: Intensity
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
    stain_reference_sha256: str = ""
    """SHA-256 of ``slides.stain_reference`` when the run trained (empty: none, or a run from before it was pinned):
    new slides are normalised to the same pixels, not to whatever the path holds now."""
    recipe_sha256: str = ""
    medvision_version: str = ""

    @property
    def temperature(self) -> float:
        return float(self.decision.get("temperature", 1.0)) if self.decision else 1.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, origin: str = "<json>") -> ScoringSpec:
        """Reads :meth:`to_json` back, checked (:func:`check_spec`); ``origin`` names the file in the error for a
        foreign or damaged record."""
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{origin}: not a medvision scoring spec (not JSON: {err})") from None
        check_spec(data, origin)
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        return cls(**data)

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
            stain_reference_sha256=str(meta.get("stain_reference_sha256") or "") if inputs == "slides" else "",
            recipe_sha256=sha256(run_dir / "recipe.yaml"),
            medvision_version=medvision.__version__,
        )


SPLITS_FILE = "splits.csv"
"""The run's split: one row (``id,split``) per image it trained, validated or tested on, in the table's ids
(paths relative to the data, or ``npz:split:index``; never a patient identifier)."""


def write_splits(run_dir: Path, held: dict[str, list[str]]) -> Path:
    """``splits.csv`` of a run, written atomically: ``held`` maps each split to the ids of its images."""
    path = run_dir / SPLITS_FILE

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["id", "split"])
            out.writerows((i, split) for split, ids in held.items() for i in ids)

    atomic_write(path, write)
    return path


def read_splits(run_dir: Path) -> dict[str, str] | None:
    """``splits.csv`` of a run as {id: split}; None for a run from before it was written.

    Raises:
        RunError: a damaged file, naming it, the line and the value.
    """
    path = run_dir / SPLITS_FILE
    if not path.is_file():
        return None
    held: dict[str, str] = {}
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header != ["id", "split"]:
            raise RunError(f"{path}: header {header!r}; expected ['id', 'split'] (a splits.csv written by medvision)")
        for line, row in enumerate(reader, start=2):
            if len(row) != 2 or row[1] not in ("train", "val", "test") or row[0] in held:
                raise RunError(f"{path}, line {line}: {row!r}; expected an id not listed before and its split "
                               "(train, val or test)")  # fmt: skip
            held[row[0]] = row[1]
    return held


def _choices(annotation: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` (or of the ``Literal`` items of ``list[Literal[...]]``)."""
    args = get_args(annotation)
    return get_args(args[0]) if len(args) == 1 and get_args(args[0]) else args


SPEC_CHOICES: dict[str, tuple[str, ...]] = {
    "inputs": get_args(InputKind),
    "intensity": get_args(Intensity),
    "transfer": get_args(Transfer),
    "aggregate": _choices(EvalConfig.model_fields["patient_aggregate"].annotation),
}
"""The values each enumerated spec field may take: the very ``Literal`` types the code that reads it uses."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_spec(data: Any, origin: str) -> None:
    """A :class:`ScoringSpec` record (``run.json``-derived JSON, an ONNX file's metadata, a MONAI bundle's
    ``metadata.json``) checked field by field, before any file is read with it: a hand-edited or foreign record
    is one :class:`ValueError` naming ``origin``, the field, its value and what is allowed.

    Without it, a misspelt intensity fell back to min-max, ``inputs: DICOM`` read DICOM files as images, and
    ``transfer: uint16`` became an error row on every file, so the damage showed as results, not as an error.
    """

    def bad(name: str, allowed: str) -> ValueError:
        value = data.get(name, "<missing>") if isinstance(data, dict) else data
        return ValueError(f"{origin}: scoring spec field {name!r} is {value!r}; expected {allowed}")

    if not isinstance(data, dict):
        raise ValueError(f"{origin}: not a medvision scoring spec (a JSON {type(data).__name__}, expected an object)")
    names = {f.name for f in fields(ScoringSpec)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{origin}: scoring spec field(s) {', '.join(map(repr, unknown))} unknown; expected only "
                         f"{', '.join(sorted(names))}")  # fmt: skip
    required = [f.name for f in fields(ScoringSpec) if f.default is MISSING and f.default_factory is MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ValueError(f"{origin}: scoring spec misses {', '.join(missing)}; expected a spec written by medvision")
    for name, allowed in SPEC_CHOICES.items():
        if name in data and data[name] not in allowed:
            raise bad(name, f"one of {', '.join(allowed)}")
    for name in ("name", "model_sha256", "recipe_sha256", "medvision_version", "stain_reference_sha256"):
        if name in data and not isinstance(data[name], str):
            raise bad(name, "a string")
    classes = data["classes"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
        raise bad("classes", "a list of class names")
    for name in ("image_size", "in_chans", "top_k"):
        if name in data and not (_is_int(data[name]) and data[name] >= 1):
            raise bad(name, "a whole number >= 1")
    for name in ("mean", "std"):
        value = data[name]
        if not (isinstance(value, list | tuple) and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                        for v in value)):  # fmt: skip
            raise bad(name, "a list of numbers")
        if len(value) != data["in_chans"]:
            raise bad(name, f"one value per input channel ({data['in_chans']}, in_chans)")
    if any(v <= 0 for v in data["std"]):
        raise bad("std", "positive numbers")
    tta = _choices(EvalConfig.model_fields["tta"].annotation)
    if not (isinstance(data.get("tta", []), list) and all(t in tta for t in data.get("tta", []))):
        raise bad("tta", f"a list of {', '.join(tta)}")
    if not isinstance(data.get("decision", {}), dict):
        raise bad("decision", "an object (temperature, operating points)")
    for name, section in (("dicom", DicomConfig), ("slides", SlidesConfig)):
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise bad(name, f"an object, the recipe's data.{name} section")
        if value:
            try:
                section.model_validate(value)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"{origin}: scoring spec field {name!r}: {where or name} is "
                                 f"{first.get('input')!r}; {first['msg']} (as the recipe's data.{name} "
                                 "allows)") from None  # fmt: skip

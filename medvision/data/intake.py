"""Intake of untrusted files: one file from an archive becomes model input, or a row with the reason it cannot.

:func:`read_file` is what ``medvision score`` runs, in its crash-isolated worker processes
(:mod:`medvision.workers`), on each regular file found under the scanned folder (:mod:`medvision.io.archive`):

- for a model trained on DICOM: the file is parsed with its pixel data left on disk, refused before any
  decoding when it is larger than ``max_file_bytes`` or its header declares more than ``max_pixels``
  values, then decoded and preprocessed frame by frame exactly as the run was trained;
- for a model trained on images: PNG/JPEG/TIFF/BMP by suffix, with the same limits from the image header.

What is clearly not an input (no DICM magic, not parseable and no DICOM suffix; DICOM without pixel data)
is ``skipped``; anything that looks like an input and fails is an ``error``, with a reason that names the
file relative to the folder and never holds a patient identifier. That sorting is :mod:`medvision.io.triage`'s,
which training's data audit shares.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch

from medvision.data.dataset import prepare
from medvision.data.transforms import build_transforms
from medvision.io.archive import Entry
from medvision.io.dicom import DicomSpec, declared_values, frame_count, parse_window, read_dicom, select_frames
from medvision.io.image import read_image_raw
from medvision.io.triage import IDENTIFYING_TAGS as IDENTIFYING_TAGS  # re-exported: score names them
from medvision.io.triage import open_dicom, read_head, redact, triage_image
from medvision.options import MAX_FILE_BYTES, MAX_PIXELS
from medvision.runs import ScoringSpec

Status = Literal["ok", "error", "skipped"]


class TooLarge(ValueError):
    """A header that declares more pixel values than ``--max-pixels``: the file is refused before decoding."""


def _reason(err: Exception) -> str:
    """An error row's reason: our own refusal as it is, anything else with its type (the decoder's words)."""
    return str(err) if isinstance(err, TooLarge) else f"{type(err).__name__}: {err}"


@dataclass(frozen=True)
class ReadConfig:
    """How a worker turns one file into model input: the model's preprocessing plus the safety limits."""

    spec: ScoringSpec
    tags: tuple[str, ...] = ()
    max_pixels: int = MAX_PIXELS
    max_file_bytes: int = MAX_FILE_BYTES

    @functools.cached_property
    def dicom(self) -> DicomSpec:
        cfg = self.spec.dicom
        frames = "tiled" if cfg.get("frames") == "tiled" else "first"  # otherwise each row names its frame
        windows = tuple(parse_window(w) for w in cfg.get("windows", ["file"]))
        return DicomSpec(windows=windows, voi_function=cfg.get("voi_function"), frames=frames)  # type: ignore[arg-type]


@dataclass
class FileResult:
    """One file's outcome; ``arrays`` are its preprocessed frames (C, H, W) in the spec's transfer dtype."""

    rel: str
    status: Status
    reason: str = ""
    uids: tuple[str, str, str] = ("", "", "")
    tags: dict[str, str] = field(default_factory=dict)
    frames: list[int] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)


Reader = Callable[[Path, str, ReadConfig], FileResult]


@functools.lru_cache(maxsize=4)
def _transform(image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    return build_transforms(None, image_size, mean, std, normalize=False)


def preprocess(raw: np.ndarray, spec: ScoringSpec) -> np.ndarray:
    """The one preprocessing of scoring: a decoded image (H, W[, C], native values) -> the model's raw input
    (C, H, W) in the spec's transfer dtype, exactly as the run's evaluation batches were made.

    Files (:func:`read_file`) and slide tiles (``score`` on slides) both come through here; the engines
    (PyTorch, or the ONNX graph) then take it from there, normalisation and calibration included.
    """
    transform = _transform(spec.image_size, spec.mean, spec.std)
    return prepare(raw, spec.intensity, spec.in_chans, transform, spec.transfer).numpy()


def read_file(path: Path, rel: str, cfg: ReadConfig) -> FileResult:
    """Classifies and preprocesses one file: DICOM for a DICOM-trained model, else PNG/JPEG/TIFF/BMP.

    Never raises for a bad file: every failure is a ``FileResult`` with status ``error`` (or
    ``skipped`` for what is clearly not an input) and a reason that names the file relative to the
    scanned folder. Limits are checked from the header, before any pixel data is read.
    """
    try:
        head = read_head(path)
        size = os.path.getsize(path)
    except OSError as err:
        return FileResult(rel, "error", f"cannot open ({type(err).__name__}: {err.strerror or err})")
    if cfg.spec.inputs == "dicom":
        return _read_dicom_file(path, rel, cfg, head, size)
    return _read_image_file(path, rel, cfg, head, size)


def _verdict(entry: Entry) -> FileResult:
    return FileResult(entry.rel, "error" if entry.outcome == "error" else "skipped", entry.reason)


def _read_dicom_file(path: Path, rel: str, cfg: ReadConfig, head: bytes, size: int) -> FileResult:
    ds = open_dicom(path, rel, head, size, cfg.max_file_bytes)  # skipped and error verdicts: medvision.io.triage
    if isinstance(ds, Entry):
        return _verdict(ds)
    result = FileResult(rel, "ok")
    try:
        result.uids = (str(ds.get("SOPInstanceUID", "")), str(ds.get("StudyInstanceUID", "")),
                       str(ds.get("SeriesInstanceUID", "")))  # fmt: skip
        result.tags = {t: str(ds.get(t, "")) for t in cfg.tags}
        values = declared_values(ds, cfg.dicom.frames)
        if values > cfg.max_pixels:
            rows, cols, spp = ds.get("Rows"), ds.get("Columns"), ds.get("SamplesPerPixel", 1)
            raise TooLarge(f"header declares {rows} x {cols} x {spp} = {values:,} pixel values per decode, above "
                             f"--max-pixels {cfg.max_pixels:,}; not decoded")  # fmt: skip
        policy = cfg.spec.dicom.get("frames", "first")
        for frame in select_frames(frame_count(ds, rel), policy):
            whole = policy == "tiled"  # one image from all tiles
            pixels, _ = read_dicom(path, cfg.dicom, frame=None if whole else frame, dataset=ds)
            result.arrays.append(preprocess(pixels[0], cfg.spec))
            result.frames.append(frame)
        if not result.frames:  # an ok file has at least one row, for every reader of FileResult (score, bundles)
            raise ValueError(f"{rel}: no frame to score (frames {policy!r})")
    except Exception as err:  # one bad file is one error row; the rest of the folder is still scored
        result.status, result.arrays, result.frames = "error", [], []
        result.reason = redact(_reason(err), path, rel, ds)
    return result


def _image_values(path: Path) -> int:
    """Width x height x channels from the file's header, or 0 when the header cannot tell (the reader will)."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return int(np.prod(tif.pages[0].shape))
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # our own limit applies, with our own message
        with Image.open(path) as img:
            return img.size[0] * img.size[1] * len(img.getbands())
    except Exception:
        return 0


def _read_image_file(path: Path, rel: str, cfg: ReadConfig, head: bytes, size: int) -> FileResult:
    verdict = triage_image(rel, head, size, cfg.max_file_bytes, "this model was trained on PNG/JPEG/TIFF/BMP images")
    if verdict is not None:
        return _verdict(verdict)
    try:
        values = _image_values(path)
        if values > cfg.max_pixels:
            raise TooLarge(f"header declares {values:,} pixel values, above --max-pixels {cfg.max_pixels:,}; "
                             "not decoded")  # fmt: skip
        return FileResult(rel, "ok", frames=[0], arrays=[preprocess(read_image_raw(path), cfg.spec)])
    except Exception as err:
        return FileResult(rel, "error", redact(_reason(err), path, rel))


# ------------------------------------------------------------------ the worker side of the pool

_WORKER: dict[str, Any] = {}


def init_worker(root: str, cfg: ReadConfig, reader: Reader) -> None:
    """Runs once in each (re)started worker: its settings, and one thread each for torch and OpenCV.

    pydicom's warnings about damaged files are silenced, and so are the backtraces of Rust decoders that
    panic: each such file gets its row, with the panic's message, instead.
    """
    if multiprocessing.parent_process() is not None:  # a worker process, not the in-process (workers=0) path
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        logging.getLogger("pydicom").setLevel(logging.ERROR)
        os.environ["RUST_BACKTRACE"] = "0"
    _WORKER.update(root=Path(root), cfg=cfg, reader=reader)


def read_chunk(rels: list[str]) -> list[FileResult]:
    """Reads a chunk of files; any exception, even a BaseException such as a Rust decoder's panic, is a row."""
    out = []
    for rel in rels:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append(_WORKER["reader"](_WORKER["root"] / rel, rel, _WORKER["cfg"]))
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # pyo3's PanicException derives from BaseException
            out.append(FileResult(rel, "error", f"decoder failed: {type(err).__name__}: {err}"))
    return out

"""Intake of untrusted files: one file from an archive becomes model input, or a row with the reason it cannot.

:func:`read_file` is what ``medvision score`` runs, in its crash-isolated worker processes
(:mod:`medvision.workers`), on each regular file found under the scanned folder (:mod:`medvision.io.archive`):

- for a model trained on DICOM: the file is parsed with its pixel data left on disk, refused before any
  decoding when it is larger than ``max_file_bytes`` or its header declares more than ``max_pixels``
  values, then decoded and preprocessed frame by frame exactly as the run was trained;
- for a model trained on images: PNG/JPEG/TIFF/BMP by suffix, with the same limits from the image header.

What is clearly not an input (no DICM magic, not parseable and no DICOM suffix; DICOM without pixel data)
is ``skipped``; anything that looks like an input and fails is an ``error``, with a reason that names the
file relative to the folder and never holds a patient identifier.
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
from medvision.io.archive import DICOM_SUFFIXES, looks_like_dicom, sniff
from medvision.io.dicom import (
    DicomParseError,
    DicomSpec,
    NotADicomImage,
    NotDicom,
    declared_values,
    parse_window,
    read_dataset,
    read_dicom,
    select_frames,
)
from medvision.io.image import IMAGE_SUFFIXES, read_image_raw
from medvision.runs import ScoringSpec

Status = Literal["ok", "error", "skipped"]

#: Tags that identify a patient; never written unless the user names them in ``--include-tags``.
IDENTIFYING_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs")
#: Default ``--max-pixels``: values one decoded frame may hold (about 1 GiB as float32), e.g. 16k x 16k RGB.
MAX_PIXELS = 1 << 28
#: Default ``--max-file-size``: bytes; a larger file is an error row, never read into memory.
MAX_FILE_BYTES = 4 << 30


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


def _prepare(raw: np.ndarray, cfg: ReadConfig) -> np.ndarray:
    spec = cfg.spec
    tensor = prepare(raw, spec.intensity, spec.in_chans, _transform(spec.image_size, spec.mean, spec.std),  # type: ignore[arg-type]
                     spec.transfer)  # fmt: skip
    return tensor.numpy()


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(132)


def _size_text(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def read_file(path: Path, rel: str, cfg: ReadConfig) -> FileResult:
    """Classifies and preprocesses one file: DICOM for a DICOM-trained model, else PNG/JPEG/TIFF/BMP.

    Never raises for a bad file: every failure is a ``FileResult`` with status ``error`` (or
    ``skipped`` for what is clearly not an input) and a reason that names the file relative to the
    scanned folder. Limits are checked from the header, before any pixel data is read.
    """
    try:
        head = _head(path)
        size = os.path.getsize(path)
    except OSError as err:
        return FileResult(rel, "error", f"cannot open ({type(err).__name__}: {err.strerror or err})")
    if cfg.spec.inputs == "dicom":
        return _read_dicom_file(path, rel, cfg, head, size)
    return _read_image_file(path, rel, cfg, head, size)


def _redact(text: str, path: Path, rel: str, ds: Any = None) -> str:
    """An error message with the absolute path shortened to ``rel`` and any patient identifier removed."""
    text = text.replace(str(path), rel)
    for tag in IDENTIFYING_TAGS if ds is not None else ():
        value = str(ds.get(tag, "") or "")
        if len(value) >= 3:
            text = text.replace(value, f"<{tag}>")
    return text


def _read_dicom_file(path: Path, rel: str, cfg: ReadConfig, head: bytes, size: int) -> FileResult:
    expected = looks_like_dicom(rel, head)
    kind = sniff(head)
    if size == 0:
        return FileResult(rel, "error", "empty file (0 bytes)") if expected else (
            FileResult(rel, "skipped", "empty file; not DICOM"))  # fmt: skip
    if size > cfg.max_file_bytes:
        status: Status = "error" if expected else "skipped"
        return FileResult(rel, status, f"file is {_size_text(size)}, above --max-file-size "
                                       f"{_size_text(cfg.max_file_bytes)}; not read")  # fmt: skip
    try:
        try:
            ds = read_dataset(path, defer_size=1 << 16)
        except NotDicom:
            if not rel.lower().endswith(DICOM_SUFFIXES) or kind:
                raise
            ds = read_dataset(path, defer_size=1 << 16, force=True)  # a .dcm without preamble: older files
    except (NotDicom, DicomParseError) as err:
        if not expected:
            what = f"it is {kind}" if kind else "no DICM magic, not parseable"
            return FileResult(rel, "skipped", f"not DICOM ({what})")
        if kind and kind != "DICOM":
            return FileResult(rel, "error", f"not DICOM: the file is {kind} (renamed?)")
        if isinstance(err, NotDicom):
            return FileResult(rel, "error", "not a readable DICOM file: no DICM preamble, and read without one it "
                                            "is not a DICOM dataset")  # fmt: skip
        return FileResult(rel, "error", _redact(f"not a readable DICOM file: {err}", path, rel))
    except NotADicomImage as err:  # a valid DICOM object without an image: SR, RT plan, presentation state
        return FileResult(rel, "skipped", _redact(str(err), path, rel))
    except Exception as err:
        return FileResult(rel, "error", _redact(f"{type(err).__name__}: {err}", path, rel))
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
        for frame in select_frames(int(ds.get("NumberOfFrames", 1) or 1), policy):
            whole = policy == "tiled"  # one image from all tiles
            pixels, _ = read_dicom(path, cfg.dicom, frame=None if whole else frame, dataset=ds)
            result.arrays.append(_prepare(pixels[0], cfg))
            result.frames.append(frame)
    except Exception as err:  # one bad file is one error row; the rest of the folder is still scored
        result.status, result.arrays, result.frames = "error", [], []
        result.reason = _redact(_reason(err), path, rel, ds)
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
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        kind = sniff(head)
        if kind == "DICOM" or suffix in DICOM_SUFFIXES:
            return FileResult(rel, "skipped", "a DICOM file; this model was trained on PNG/JPEG/TIFF/BMP images")
        return FileResult(rel, "skipped", f"not an image file (suffix {suffix or 'none'}{', ' + kind if kind else ''})")
    if size == 0:
        return FileResult(rel, "error", "empty file (0 bytes)")
    if size > cfg.max_file_bytes:
        return FileResult(rel, "error", f"file is {_size_text(size)}, above --max-file-size "
                                        f"{_size_text(cfg.max_file_bytes)}; not read")  # fmt: skip
    try:
        values = _image_values(path)
        if values > cfg.max_pixels:
            raise TooLarge(f"header declares {values:,} pixel values, above --max-pixels {cfg.max_pixels:,}; "
                             "not decoded")  # fmt: skip
        return FileResult(rel, "ok", frames=[0], arrays=[_prepare(read_image_raw(path), cfg)])
    except Exception as err:
        return FileResult(rel, "error", _redact(_reason(err), path, rel))


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

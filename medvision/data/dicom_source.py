"""DICOM folders as sample tables: labels from class folders or a CSV, patients from PatientID.

The folder is searched recursively. Files that are not DICOM, or are DICOM without an image (SR,
RTDOSE, SEG ...), are skipped and counted. Each sample is a (file, frame) pair, so a multi-frame
file can give one sample (``frames: first`` or ``middle``) or one per frame (``frames: all``).
Decoded, windowed pixels can be cached as float16 ``.npy`` files, so that epoch 2 does not decode
JPEG 2000 again.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pydicom

from medvision.data.table import DataSourceError, SampleTable, class_index
from medvision.io.dicom import (
    DicomSpec,
    FramePolicy,
    NotADicomImage,
    parse_window,
    read_dataset,
    read_dicom,
    select_frames,
)
from medvision.recipe import DicomConfig

log = logging.getLogger("medvision")


def dicom_spec(cfg: DicomConfig) -> DicomSpec:
    """The reader's settings from the recipe's ``data.dicom`` section (one frame per sample)."""
    frames: FramePolicy = "tiled" if cfg.frames == "tiled" else "first"  # otherwise each sample names its frame
    return DicomSpec(windows=tuple(parse_window(w) for w in cfg.windows), voi_function=cfg.voi_function, frames=frames)


def walk_files(root: Path) -> list[Path]:
    """Every regular file under ``root``, sorted, hidden folders skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return out


class DicomLoader:
    """Loads sample ``i`` (a frame of a file) as float32 (H, W, C) in [0, 1], through an optional cache."""

    def __init__(self, paths: list[str], frames: list[int], spec: DicomSpec, cache_dir: Path | None) -> None:
        self.paths = paths
        self.frames = frames
        self.spec = spec
        self.cache_dir = cache_dir

    def _cache_path(self, i: int) -> Path | None:
        if self.cache_dir is None:
            return None
        st = os.stat(self.paths[i])
        key = f"{os.path.abspath(self.paths[i])}|{st.st_size}|{st.st_mtime_ns}|{self.frames[i]}|{self.spec!r}"
        return self.cache_dir / f"{hashlib.sha1(key.encode()).hexdigest()}.npy"

    def __call__(self, i: int) -> np.ndarray:
        cached = self._cache_path(i)
        if cached is not None and cached.is_file():
            return np.load(cached).astype(np.float32)
        frame = None if self.spec.frames == "tiled" else self.frames[i]
        pixels, _ = read_dicom(self.paths[i], self.spec, frame=frame)
        image = pixels[0]
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, image.astype(np.float16))
            os.replace(tmp, cached)
        return image


def _read_labels(path: Path) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """label by relative path, label by SOPInstanceUID, split by either key."""
    if not path.is_file():
        raise FileNotFoundError(f"data.dicom.labels: {path} does not exist")
    by_path: dict[str, str] = {}
    by_uid: dict[str, str] = {}
    splits: dict[str, str] = {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "label" not in cols or not ({"path", "sop_instance_uid"} & set(cols)):
            raise ValueError(f"{path}: needs a 'label' column and 'path' or 'sop_instance_uid'; found {cols}")
        for row in reader:
            key_path = (row.get("path") or "").strip()
            key_uid = (row.get("sop_instance_uid") or "").strip()
            if key_path:
                by_path[key_path] = row["label"].strip()
            if key_uid:
                by_uid[key_uid] = row["label"].strip()
            if (row.get("split") or "").strip():
                splits[key_path or key_uid] = row["split"].strip()
    return by_path, by_uid, splits


def load_dicom_folder(root: Path, cfg: DicomConfig, classes: list[str] | None, cache_dir: Path | None) -> SampleTable:
    """Builds the sample table of a DICOM folder (see the module docstring)."""
    if not root.is_dir():
        raise DataSourceError(f"{root}: DICOM folder does not exist")
    labels_csv = _read_labels(Path(cfg.labels)) if cfg.labels else None
    paths, frames, labels_text, groups, ids, splits = [], [], [], [], [], []
    skipped = unlabelled = 0
    for f in walk_files(root):
        rel = f.relative_to(root).as_posix()
        try:
            ds = read_dataset_header(f)
        except NotADicomImage:
            skipped += 1
            continue
        uid = str(ds.get("SOPInstanceUID", ""))
        if labels_csv is not None:
            by_path, by_uid, split_of = labels_csv
            label = by_path.get(rel) or by_uid.get(uid)
            split = split_of.get(rel) or split_of.get(uid, "")
        else:
            label = rel.split("/")[0] if "/" in rel else None
            split = ""
        if label is None:
            unlabelled += 1
            continue
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        for frame in select_frames(n_frames, cfg.frames):
            paths.append(str(f))
            frames.append(frame)
            labels_text.append(label)
            groups.append(str(ds.get("PatientID", "")) or rel)
            ids.append(rel if n_frames == 1 or cfg.frames != "all" else f"{rel}#{frame}")
            splits.append(split)
    log.info("DICOM folder %s: %d samples; skipped %d non-image files, %d unlabelled", root, len(paths), skipped,
             unlabelled)  # fmt: skip
    if not paths:
        raise DataSourceError(f"{root}: no labelled DICOM images found ({skipped} non-image, {unlabelled} unlabelled)")
    if classes is None:
        classes = sorted(set(labels_text))
    label_idx = [class_index(classes, t, f"{root}/{i}") for t, i in zip(labels_text, ids, strict=True)]
    if any(splits) and not all(splits):
        raise DataSourceError(f"{cfg.labels}: 'split' is set for some images and not others; fill all or none")
    spec = dicom_spec(cfg)
    loader = DicomLoader(paths, frames, spec, cache_dir if cfg.cache else None)
    grayscale = len(cfg.windows) == 1 and loader(0).shape[-1] == 1
    return SampleTable(
        ids=ids,
        labels=np.asarray(label_idx, dtype=np.int64),
        groups=groups,
        splits=splits,
        classes=classes,
        loader=loader,
        grayscale=grayscale,
        origin=str(root),
    )


def read_dataset_header(path: Path) -> pydicom.Dataset:
    """Reads tags only (no pixel data); raises :class:`NotADicomImage` for non-DICOM and non-image files."""
    try:
        ds = pydicom.dcmread(str(path), defer_size=1024)
    except Exception as err:
        raise NotADicomImage(f"{path}: not a DICOM file ({type(err).__name__})") from None
    if "PixelData" not in ds:
        return read_dataset(path)  # raises with the right reason (non-image, or truncated image)
    return ds

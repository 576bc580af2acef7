"""DICOM folders as sample tables: labels from class folders or a CSV, patients from PatientID.

The folder is searched recursively and every file in it is accounted for in the table's audit
(:mod:`medvision.data.audit`): files that are not DICOM, DICOM without an image (SR, RTDOSE, SEG ...)
and unlabelled files are skipped; a DICOM-looking file that cannot be read (it does not parse, its pixel
data is cut short or does not decode) is an error, which stops the run unless ``data.on_error`` is
``skip``. Patient identifiers group the samples and never reach a message. Each sample is a
(file, frame) pair, so a multi-frame file can give one sample (``frames: first`` or ``middle``) or
one per frame (``frames: all``).
Decoded, windowed pixels can be cached as float32 ``.npy`` files, so that epoch 2 does not decode
JPEG 2000 again. They are the decoded pixels exactly (float16 changed probabilities by up to 0.007 against
``score``, which decodes afresh).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from tqdm import tqdm

from medvision.data.audit import clean_reason, counts
from medvision.data.table import (
    AuditRow,
    DataSourceError,
    SampleTable,
    check_split,
    class_index,
    is_hidden_folder,
    listed_rows,
    read_manifest,
)
from medvision.io.archive import Entry, scan
from medvision.io.dicom import (
    READER_VERSION,
    DicomReadError,
    DicomSpec,
    FramePolicy,
    frame_count,
    parse_window,
    read_dicom,
    select_frames,
)
from medvision.io.triage import IDENTIFYING_TAGS, open_dicom, pixel_data_problem, read_head, redact
from medvision.recipe import DicomConfig
from medvision.workers import Failure, isolated_map

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
        key = (
            f"{os.path.abspath(self.paths[i])}|{st.st_size}|{st.st_mtime_ns}|{self.frames[i]}|{self.spec!r}|f32"
            f"|reader{READER_VERSION}"
        )  # pixels of an older reader are decoded again
        return self.cache_dir / f"{hashlib.sha1(key.encode()).hexdigest()}.npy"

    def __call__(self, i: int) -> np.ndarray:
        cached = self._cache_path(i)
        if cached is not None and cached.is_file():
            return np.load(cached)
        frame = None if self.spec.frames == "tiled" else self.frames[i]
        pixels, _ = read_dicom(self.paths[i], self.spec, frame=frame)
        image = pixels[0]
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, image.astype(np.float32))  # the decoded pixels exactly: what score reads, every epoch
            os.replace(tmp, cached)
        return image


@dataclass(frozen=True)
class _Listed:
    """A row of ``data.dicom.labels``: the label and split it gives, and its line (for errors naming it)."""

    label: str
    split: str
    line: int


def _read_labels(path: Path, root: Path) -> tuple[dict[str, _Listed], dict[str, _Listed]]:
    """The labels CSV's rows by path relative to ``root`` (normalised: ``./ct/a.dcm`` is ``ct/a.dcm``; one file
    under two names is refused) and by SOPInstanceUID.

    Read and checked like a CSV manifest (:func:`read_manifest`, :func:`listed_rows`, :func:`check_split`): a
    split other than train/val/test, an empty label, a row with neither key or a file listed twice is a
    :class:`DataSourceError` naming the line, because such a row would otherwise drop out of every split.
    """
    if not path.is_file():
        raise DataSourceError(f"data.dicom.labels: {path} does not exist; expected a CSV with columns path,label")
    rows = read_manifest(path, ("label",), optional=",path,sop_instance_uid,split")
    if not {"path", "sop_instance_uid"} & set(rows[0]):
        raise DataSourceError(
            f"{path}: needs a 'path' or 'sop_instance_uid' column beside 'label'; found {list(rows[0])}"
        )
    by_path: dict[str, _Listed] = {}
    by_uid: dict[str, _Listed] = {}
    uids = listed_rows(path, rows, "sop_instance_uid", "SOP instance UID", required=False)
    for (line, where, key_path, row), (_, _, key_uid, _) in zip(
        listed_rows(path, rows, "path", "file", required=False, base=root), uids, strict=True
    ):
        if not key_path and not key_uid:
            raise DataSourceError(f"{where}: both 'path' and 'sop_instance_uid' are empty; expected one of them")
        label = row["label"].strip()
        if not label:
            raise DataSourceError(f"{where}: empty 'label'; every listed file needs one")
        listed = _Listed(label, check_split(row.get("split"), where), line)
        if key_path:
            by_path[key_path] = listed
        if key_uid:
            by_uid[key_uid] = listed
    return by_path, by_uid


def _labelled(labels_csv: Path, listed: tuple[dict[str, _Listed], dict[str, _Listed]], rel: str, uid: str
              ) -> _Listed | None:  # fmt: skip
    """The row giving ``rel`` its label: by path or by UID; two rows that disagree are an error naming both."""
    by_path, by_uid = listed[0].get(rel), listed[1].get(uid)
    if by_path and by_uid and (by_path.label, by_path.split) != (by_uid.label, by_uid.split):
        raise DataSourceError(f"{labels_csv}: {rel} is listed twice with different labels or splits: line "
                              f"{by_path.line} (by path) and line {by_uid.line} (by sop_instance_uid)")  # fmt: skip
    return by_path or by_uid


def load_dicom_folder(root: Path, cfg: DicomConfig, classes: list[str] | None, cache_dir: Path | None) -> SampleTable:
    """Builds the sample table of a DICOM folder, with its audit (see the module docstring).

    Every header is parsed. With the decode cache on (``cfg.cache`` and a ``cache_dir``) every image is
    also decoded once, into the cache, so that damaged pixel data is an audit error now rather than a
    crash in epoch 1; with it off, only what the header shows is checked (:func:`pixel_data_problem`).

    Raises:
        DataSourceError: no labelled image, or a bad labels CSV (unreadable images are audit errors).
    """
    if not root.is_dir():
        raise DataSourceError(f"{root}: DICOM folder does not exist")
    labels_csv = _read_labels(Path(cfg.labels), root) if cfg.labels else None
    spec = dicom_spec(cfg)
    cache = cache_dir if cfg.cache else None
    audit: list[AuditRow] = []
    found: list[_Found] = []
    for entry in tqdm(scan(root), desc="check", unit="file", leave=False, disable=None):
        rel = entry.rel
        if entry.outcome != "candidate":  # hidden files among them: scan skips them for every task alike
            audit.append(AuditRow(rel, entry.outcome, entry.reason))
            continue
        path = root / rel
        try:
            opened = open_dicom(path, rel, read_head(path), entry.size)
        except OSError as err:
            opened = Entry(rel, "error", f"cannot open ({type(err).__name__}: {err.strerror or err})")
        if isinstance(opened, Entry):
            audit.append(AuditRow(rel, "error" if opened.outcome == "error" else "skipped",
                                  clean_reason(opened.reason, path, rel)))  # fmt: skip
            continue
        ds = opened
        uid = str(ds.get("SOPInstanceUID", ""))
        if labels_csv is not None:
            listed = _labelled(Path(cfg.labels or ""), labels_csv, rel, uid)
            label, split = (listed.label, listed.split) if listed else (None, "")
        else:
            top = rel.split("/")[0]
            label = top if "/" in rel and not is_hidden_folder(top) else None
            split = ""
        if label is None:
            why = "not in data.dicom.labels" if labels_csv is not None else "not in a class folder"
            audit.append(AuditRow(rel, "skipped", f"no label: {why}"))
            continue
        problem = pixel_data_problem(ds, entry.size)
        if problem:
            audit.append(AuditRow(rel, "error", problem))
            continue
        try:
            n_frames = frame_count(ds, rel)
        except DicomReadError as err:  # a header of -1 frames: an error row, not a file with no frame
            audit.append(AuditRow(rel, "error", str(err)))
            continue
        found.append(_Found(rel, str(path), label, split, str(ds.get("PatientID", "")) or rel,
                            select_frames(n_frames, cfg.frames), n_frames, _identifiers(ds)))  # fmt: skip
    found = _decodable(found, spec, cache, audit)
    paths, frames, labels_text, groups, ids, splits = [], [], [], [], [], []
    for f in found:
        audit.append(AuditRow(f.rel, "used", "", len(f.frames)))
        for frame in f.frames:
            paths.append(f.path)
            frames.append(frame)
            labels_text.append(f.label)
            groups.append(f.group)
            ids.append(f.rel if f.n_frames == 1 or cfg.frames != "all" else f"{f.rel}#{frame}")
            splits.append(f.split)
    if not paths:
        n = counts(audit)
        raise DataSourceError(f"{root}: no labelled DICOM images found ({n['skipped']} skipped: non-image or "
                              f"unlabelled; {n['errors']} unreadable)", audit=audit)  # fmt: skip
    if classes is None:
        classes = sorted(set(labels_text))
    label_idx = [class_index(classes, t, f"{root}/{i}") for t, i in zip(labels_text, ids, strict=True)]
    if any(splits) and not all(splits):
        raise DataSourceError(f"{cfg.labels}: 'split' is set for some images and not others; fill all or none")
    loader = DicomLoader(paths, frames, spec, cache)
    grayscale = len(cfg.windows) == 1 and loader(0).shape[-1] == 1
    return SampleTable(
        ids=ids,
        labels=np.asarray(label_idx, dtype=np.int64),
        groups=groups,
        splits=splits,
        classes=classes,
        loader=loader,
        grayscale=grayscale,
        pixel_dtypes=frozenset({"float32"}),  # DicomLoader's frames: windowed float32 in [0, 1]
        origin=str(root),
        audit=audit,
    )


@dataclass(frozen=True)
class _Found:
    """A labelled DICOM image whose header is sound: its samples, once its pixels are known to decode."""

    rel: str
    path: str
    label: str
    split: str
    group: str
    frames: list[int]
    n_frames: int
    identifiers: dict[str, str]


def _identifiers(ds: pydicom.Dataset) -> dict[str, str]:
    """The patient identifiers of a file, kept only to remove them from a decoder's error message."""
    return {tag: str(ds.get(tag, "") or "") for tag in IDENTIFYING_TAGS}


#: Seconds one file may take to decode all its frames in the audit's worker; then it is an audit error.
DECODE_TIMEOUT = 300.0

_DECODER: dict[str, Any] = {}


def _init_decoder(spec: DicomSpec, cache: Path | None) -> None:
    _DECODER.update(spec=spec, cache=cache)


def _decode_chunk(items: list[tuple[str, list[int]]]) -> list[str]:
    """Decodes each file's frames (into the cache when there is one); ``""`` or the reason it failed."""
    out = []
    for path, frames in items:
        loader = DicomLoader([path] * len(frames), frames, _DECODER["spec"], _DECODER["cache"])
        try:
            for i in range(len(frames)):
                loader(i)
            out.append("")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # a damaged stream; a Rust decoder's panic is a BaseException (pyo3)
            out.append(f"{type(err).__name__}: {err}" if isinstance(err, Exception) else f"decoder failed: {err!r}")
    return out


def _decodable(found: list[_Found], spec: DicomSpec, cache: Path | None, audit: list[AuditRow]) -> list[_Found]:
    """The files whose samples decode; the others become audit errors.

    Decoding runs in crash-isolated worker processes (:func:`medvision.workers.isolated_map`), so a decoder
    that raises, panics, segfaults or hangs on one file makes that file an audit error naming it, never a
    dead run. With a cache, every sample is decoded into it (what epoch 1 would do). Without one, files are
    decoded only until the first one succeeds: the table needs one image to tell grey from colour.
    """
    if not found:
        return []
    workers = min(2, os.cpu_count() or 1)
    results = isolated_map(_decode_chunk, [(f.path, f.frames) for f in found], workers=workers,
                           timeout=DECODE_TIMEOUT, chunk=4 if cache is not None else 1, initializer=_init_decoder,
                           initargs=(spec, cache))  # fmt: skip
    kept: list[_Found] = []
    with contextlib.closing(results):
        for k, (f, (_, result)) in enumerate(zip(found, tqdm(results, total=len(found), desc="decode", unit="file",
                                                             leave=False, disable=None), strict=False)):  # fmt: skip
            why = result.reason if isinstance(result, Failure) else result
            if why:
                text = redact(why, Path(f.path), f.rel, f.identifiers)
                audit.append(AuditRow(f.rel, "error", clean_reason(text, Path(f.path), f.rel)))
            else:
                kept.append(f)
            if cache is None and kept:  # one image decodes: the rest are checked by their headers only
                return kept + found[k + 1 :]
    return kept

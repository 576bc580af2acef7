"""The sample table every data source produces, and the split logic that works on it.

A :class:`SampleTable` is (item id, label, patient/group, split) rows plus a loader of pixels, and
the audit of how it was made: one :class:`AuditRow` per file the source met. The sources
(:mod:`medvision.data.sources`) build one; everything downstream (datasets, training, evaluation,
the data audit) reads only this.
"""

from __future__ import annotations

import csv
import hashlib
import posixpath
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from medvision.errors import MedvisionError
from medvision.io.image import read_image_raw

SPLITS = ("train", "val", "test")


Outcome = Literal["used", "skipped", "error"]


@dataclass(frozen=True)
class AuditRow:
    """One file a source met: ``used`` (giving ``samples`` rows), ``skipped`` (not an image), or ``error``.

    ``path`` is relative to the data folder (or as the CSV manifest names it); ``reason`` never holds a
    patient identifier.
    """

    path: str
    outcome: Outcome
    reason: str = ""
    samples: int = 0


class DataSourceError(MedvisionError, ValueError):
    """A data source that cannot be used; the message names the file, row or value at fault.

    ``audit`` holds the source's files so far when the failure came after they were looked at (so that
    the run folder's ``data_audit.csv`` lists every file even when the run stops).
    """

    def __init__(self, message: str, audit: list[AuditRow] | None = None) -> None:
        super().__init__(message)
        self.audit = audit or []


class FileLoader:
    """Loads item ``i`` from disk at native bit depth (picklable, for DataLoader workers)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __call__(self, i: int) -> np.ndarray:
        return read_image_raw(self.paths[i])


class ArrayLoader:
    """Serves item ``i`` from an in-memory uint8/uint16 array of shape (N, H, W[, C])."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __call__(self, i: int) -> np.ndarray:
        return self.images[i]


@dataclass
class SampleTable:
    """One row per image: its id (relative path or ``npz:split:index``), label, patient and split."""

    ids: list[str]
    labels: np.ndarray
    groups: list[str]
    splits: list[str]
    classes: list[str]
    loader: Callable[[int], np.ndarray]
    grayscale: bool
    origin: str
    units: list[str] | None = None
    """The unit each row's prediction is aggregated to when it is not the patient: the slide of a tile."""
    audit: list[AuditRow] = field(default_factory=list)
    """Every file the source met, each once: used, skipped (not an image) or error (unreadable, left out)."""
    pixel_dtypes: frozenset[str] | None = None
    """The dtypes (``uint8``, ``uint16``...) the loader gives, from every image's header (or the ``.npz`` arrays);
    ``data.transfer: auto`` is uint8 only when this is ``{"uint8"}``. ``None``: the source does not record them."""

    def __len__(self) -> int:
        return len(self.ids)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.splits) == split)

    @property
    def aggregates_to(self) -> list[str]:
        """Each row's unit of aggregation: its slide for whole-slide tiles (``units``), else its patient."""
        return self.units if self.units is not None else self.groups


def is_hidden_folder(name: str) -> bool:
    """A folder that is never a class: hidden (``.git``) or the ``__MACOSX`` metadata a macOS zip adds."""
    return name.startswith(".") or name == "__MACOSX"


def class_index(classes: list[str], value: str, where: str) -> int:
    try:
        return classes.index(value)
    except ValueError:
        raise DataSourceError(f"{where}: label {value!r} is not one of the classes {classes}") from None


def check_split(value: str | None, where: str) -> str:
    """A row's split, stripped: empty or exactly one of :data:`SPLITS`. Anything else (``Test``, ``validation``)
    is an error naming ``where``, because a row in no known split would silently drop out of every split."""
    split = (value or "").strip()
    if split not in ("", *SPLITS):
        raise DataSourceError(f"{where}: split {split!r} is not one of {SPLITS} (or empty)")
    return split


def _column_key(name: str) -> str:
    return name.strip().lower()


def read_manifest(path: Path, required: tuple[str, ...], optional: str = ",patient_id,split") -> list[dict[str, str]]:
    """The rows of a CSV manifest that has the ``required`` columns; errors name the file and the columns.

    Read as ``utf-8-sig``, so the byte-order mark Excel writes does not become part of the first column's
    name. A column that matches a known one (``required`` or ``optional``) only up to case and spaces
    (``Patient_ID``, `` label``) is an error, not an extra column: ignoring it would silently drop the
    patients (and leak them across splits) or the split. Other extra columns are allowed. A row with fewer or
    more fields than the header is an error naming its line (a path with an unquoted comma shifted the label).
    """
    need = ",".join(required)
    known = [*required, *(c for c in optional.split(",") if c)]
    if not path.is_file():
        raise DataSourceError(f"{path}: CSV manifest does not exist; expected a CSV with columns {need}")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        for col in columns:
            near = [k for k in known if _column_key(k) == _column_key(col)]
            if col not in known and near:
                raise DataSourceError(f"{path}: column {col!r} is not a known column; expected {near[0]!r} "
                                      "(column names are exact: lower case, no spaces)")  # fmt: skip
        missing_cols = [c for c in required if c not in columns]
        if missing_cols:
            raise DataSourceError(f"{path}: missing column(s) {missing_cols}; found {columns}, need {need}[{optional}]")
        rows = list(reader)
    if not rows:
        raise DataSourceError(f"{path}: manifest has a header but no rows")
    for line, row in enumerate(rows, start=2):
        # csv fills the missing fields of a short row with None, and keeps a long row's extra ones under None
        extra = row.get(None) or []
        if any(row.get(c) is None for c in columns) or extra:
            n = sum(row.get(c) is not None for c in columns) + len(extra)
            raise DataSourceError(f"{path}, line {line}: {n} field(s) where the header has {len(columns)} "
                                  f"({','.join(columns)}); expected one value per column (quote a value that "
                                  "holds a comma)")  # fmt: skip
    return rows


def file_identity(path: Path) -> tuple[int, int] | str:
    """What makes two names one file: its (device, inode) when it exists, so a link and a hard link are found;
    else its resolved path (``base/../base/a.png``, an absolute and a relative route to one place)."""
    try:
        st = path.stat()
    except OSError:
        return str(path.resolve())
    return st.st_dev, st.st_ino


def listed_rows(
    path: Path, rows: Iterable[dict[str, str]], column: str, noun: str, required: bool = True,
    base: Path | None = None,
) -> Iterator[tuple[int, str, str, dict[str, str]]]:  # fmt: skip
    """A manifest's rows as (line, where, rel, row), ``rel`` the row's ``column`` checked: not listed twice
    (a :class:`DataSourceError` naming both lines otherwise) and normalised (``./a/s1.svs`` and ``a//s1.svs`` are
    ``a/s1.svs``: one file, so it cannot be in two splits or have two labels). With ``base`` (the folder relative
    paths start from) a file listed under two names (relative and absolute, through a link, a hard link) is found
    by :func:`file_identity` too. An empty value is an error naming the line when ``required``, else ``rel`` is
    ``""``."""
    seen: dict[str, int] = {}
    files: dict[tuple[int, int] | str, tuple[int, str]] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{path}, line {line}"
        rel = (row.get(column) or "").strip()
        if not rel:
            if required:
                raise DataSourceError(f"{where}: empty {column!r}")
            yield line, where, rel, row
            continue
        rel = posixpath.normpath(rel)
        if rel in seen:
            raise DataSourceError(f"{where}: {noun} {rel!r} is listed twice (first on line {seen[rel]})")
        seen[rel] = line
        if base is not None:
            key = file_identity(base / rel)  # an absolute rel replaces base
            if key in files:
                first, name = files[key]
                raise DataSourceError(f"{where}: {noun} {rel!r} is the file listed as {name!r} on line {first} "
                                      "(another name for it: a link, or an absolute path); list each file once, "
                                      "or it could sit in two splits")  # fmt: skip
            files[key] = line, rel
        yield line, where, rel, row


def slide_rows(path: Path, rows: Iterable[dict[str, str]]) -> Iterator[tuple[int, str, str, dict[str, str]]]:
    """A slide manifest's rows (:func:`listed_rows` over ``slide_path``, relative to the manifest's folder;
    ``a/s1.svs`` as features.csv names it): a slide listed under two names (a link, an absolute path) is refused
    as one listed twice, or it could sit in two splits with two labels."""
    return listed_rows(path, rows, "slide_path", "slide", base=path.parent)


def check_patient_disjoint(table: SampleTable) -> None:
    """Raises when one patient appears in two splits (a leak that inflates every test metric). The message names
    two of the patient's items, never the patient: the id may be a DICOM PatientID."""
    seen: dict[str, tuple[str, int]] = {}
    for i, (group, split) in enumerate(zip(table.groups, table.splits, strict=True)):
        first, j = seen.setdefault(group, (split, i))
        if first != split:
            raise DataSourceError(
                f"{table.origin}: {table.ids[j]} ('{first}') and {table.ids[i]} ('{split}') belong to one patient; "
                "a patient must be in exactly one split"
            )


def patient_order(patients: Iterable[str], seed: int) -> list[str]:
    """``patients`` in a seeded order where each patient's place depends only on its own id and ``seed``.

    The order sorts by a keyed BLAKE2b hash of the id, so adding or removing a patient (a new scan, a file that
    no longer reads) leaves every other patient's order unchanged, where a shuffle would deal them all afresh.
    """
    key = str(seed).encode()
    return sorted(set(patients), key=lambda p: (hashlib.blake2b(p.encode(), key=key, digest_size=16).digest(), p))


def grouped_stratified_split(
    labels: np.ndarray, groups: list[str], val_fraction: float, test_fraction: float, seed: int
) -> list[str]:
    """Assigns whole patients to train/val/test so each label keeps roughly its share in every split.

    Patients are bucketed by their most frequent label, put in their :func:`patient_order`, and dealt to test,
    then val, until each split holds its fraction of that label's images; the rest is train. A patient's split
    therefore survives changes to the others: adding or dropping one patient (or one image) moves at most the
    patients dealt next to a split's boundary in its label, never the whole cohort, so runs on one dataset before
    and after a file fails to read test on nearly the same patients.
    """
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    buckets: dict[int, list[str]] = defaultdict(list)
    for g in patient_order(by_group, seed):
        majority = int(np.bincount(labels[by_group[g]]).argmax())
        buckets[majority].append(g)
    out = [""] * len(groups)
    for label in sorted(buckets):
        members = buckets[label]
        total = sum(len(by_group[g]) for g in members)
        targets = [("test", test_fraction * total), ("val", (test_fraction + val_fraction) * total)]
        filled = 0
        for g in members:
            size = len(by_group[g])
            split = "train"
            for name, upto in targets:
                # a patient goes to a split while that split is below its share of this label
                if filled + size / 2 <= upto:
                    split = name
                    break
            filled += size
            for i in by_group[g]:
                out[i] = split
    return out


def subset_indices(table: SampleTable, split: str, limit: int | None, seed: int, fraction: float = 1.0) -> np.ndarray:
    """Indices of one split, optionally a seeded random subset of at most ``limit`` (kept in order).

    ``fraction`` below 1 then keeps that share of the rows as :func:`label_subset` chooses them.
    """
    idx = np.arange(len(table)) if split == "all" else table.indices(split)
    if limit is not None and len(idx) > limit:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(idx, size=limit, replace=False))
    if fraction < 1.0:
        idx = label_subset(table.labels, table.groups, idx, fraction, seed)
    return idx


def label_subset(labels: np.ndarray, groups: list[str], idx: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """About ``fraction`` of the rows ``idx``: whole patients, stratified by label, nested across fractions.

    Patients are bucketed by their most frequent label and put in a seeded order that does not
    depend on ``fraction``; each bucket contributes its first patients until it holds its share of
    that label's rows, and at least one patient. A class that is no patient's most frequent (tumour tiles
    on slides mostly of stroma) has no bucket: the first patient in that order who holds it comes too, so
    every class of ``idx`` keeps a labelled example. The same seed therefore gives nested subsets: the 1%
    rows are among the 10% rows.
    """
    by_group: dict[str, list[int]] = defaultdict(list)
    for i in idx:
        by_group[groups[int(i)]].append(int(i))
    buckets: dict[int, list[str]] = defaultdict(list)
    for g in sorted(by_group):
        buckets[int(np.bincount(labels[by_group[g]]).argmax())].append(g)
    rng = np.random.default_rng([seed, 0x1ABE1])
    # each bucket was filled in sorted order: the seeded permutation of it
    ordered = {label: [buckets[label][int(j)] for j in rng.permutation(len(buckets[label]))]
               for label in sorted(buckets)}  # fmt: skip
    kept: list[str] = []
    for members in ordered.values():
        target = fraction * sum(len(by_group[g]) for g in members)
        taken = 0
        for g in members:
            if taken and taken + len(by_group[g]) / 2 > target:
                break
            kept.append(g)
            taken += len(by_group[g])
    everyone = [g for members in ordered.values() for g in members]
    for label in sorted(set(labels[idx].tolist()) - set(ordered)):  # in no bucket: its first holder, at any fraction
        first = next(g for g in everyone if label in labels[by_group[g]])
        if first not in kept:
            kept.append(first)
    keep = [i for g in kept for i in by_group[g]]
    return np.sort(np.asarray(keep, dtype=np.int64))

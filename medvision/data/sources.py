"""Sample tables: every source becomes (item, label, patient, split) rows plus a way to load pixels.

Sources are a folder of class subfolders, a CSV manifest (``path,label[,patient_id][,split]``) and
MedMNIST-style ``.npz`` files. When the source has no split, :func:`assign_splits` makes one that is
stratified by label and grouped by patient, so that no patient is in two splits. Every source
accounts for each file it meets in the table's audit (:mod:`medvision.data.audit`): used, skipped,
or an unreadable image that stops the run unless ``data.on_error`` is ``skip``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medvision.data.audit import check_image, clean_reason, counts, settle, write_audit
from medvision.data.dicom_source import load_dicom_folder
from medvision.data.table import (
    SPLITS,
    ArrayLoader,
    AuditRow,
    DataSourceError,
    FileLoader,
    SampleTable,
    check_patient_disjoint,
    check_split,
    class_index,
    grouped_stratified_split,
    is_hidden_folder,
    listed_rows,
    read_manifest,
)
from medvision.io.archive import scan
from medvision.io.image import IMAGE_SUFFIXES, ImageReadError, RawFormat, is_grayscale, read_image_raw
from medvision.recipe import DataConfig, check_patient_regex
from medvision.wsi.source import load_slide_table

log = logging.getLogger("medvision")

# ------------------------------------------------------------------------------------ sources


def load_npz(path: Path, classes: list[str] | None) -> SampleTable:
    """MedMNIST layout: ``{train,val,test}_images`` and ``_labels``; labels may be (N,) or (N, 1).

    Label ``k`` is class ``str(k)`` when every name in ``classes`` is a whole number (a run trained on this file
    stores ``['0', '1', ...]``; one trained on a folder or CSV of numbered classes stores them sorted as text,
    ``['0', '1', '10', '2', ...]``), else the ``k``-th name (a recipe naming the file's classes in label order).
    """
    try:
        npz = np.load(path)
    except (OSError, ValueError) as err:
        raise DataSourceError(f"{path}: cannot read as .npz ({err})") from None
    present = [s for s in SPLITS if f"{s}_images" in npz.files]
    if not present:
        raise DataSourceError(f"{path}: no '<split>_images' arrays; found keys {npz.files}, expected train_images, ...")
    images, labels, ids, splits = [], [], [], []
    for split in present:
        imgs = npz[f"{split}_images"]
        if f"{split}_labels" not in npz.files:
            raise DataSourceError(f"{path}: has {split}_images but no {split}_labels")
        lab = np.asarray(npz[f"{split}_labels"])
        if lab.ndim == 2 and lab.shape[1] == 1:
            lab = lab[:, 0]
        if lab.ndim != 1:
            raise DataSourceError(
                f"{path}: {split}_labels has shape {lab.shape}; expected (N,) or (N, 1) single-label classes"
            )
        if len(lab) != len(imgs):
            raise DataSourceError(f"{path}: {split} has {len(imgs)} images but {len(lab)} labels")
        # integer and bool labels are whole; float ones must be (astype(int64) truncated 1.7 to 1 without a word)
        bad = np.flatnonzero(lab != np.round(lab)) if lab.dtype.kind == "f" else [] if lab.dtype.kind in "biu" else [0]
        if len(bad):
            at = int(bad[0])
            raise DataSourceError(f"{path}: {split}_labels holds {lab[at].item()!r} (sample npz:{split}:{at}, dtype "
                                  f"{lab.dtype}); expected whole class indices")  # fmt: skip
        images.append(imgs)
        labels.append(lab.astype(np.int64))
        ids += [f"npz:{split}:{i}" for i in range(len(imgs))]
        splits += [split] * len(imgs)
    all_images = np.concatenate(images)
    all_labels = np.concatenate(labels)
    n_classes = int(all_labels.max()) + 1
    if classes is None:
        classes = [str(i) for i in range(n_classes)]
    else:
        all_labels = _npz_class_indices(path, all_labels, classes, ids)
    bad = np.flatnonzero((all_labels < 0) | (all_labels >= len(classes)))
    if bad.size:
        raise DataSourceError(
            f"{path}: sample {ids[bad[0]]} has label {all_labels[bad[0]]}, outside 0..{len(classes) - 1} "
            f"({bad.size} such samples)"
        )
    if all_images.dtype not in (np.uint8, np.uint16):
        raise DataSourceError(f"{path}: images have dtype {all_images.dtype}; expected uint8 or uint16")
    grayscale = all_images.ndim == 3 or all_images.shape[-1] == 1
    return SampleTable(
        ids=ids,
        labels=all_labels,
        groups=list(ids),
        splits=splits,
        classes=classes,
        loader=ArrayLoader(all_images),
        grayscale=grayscale,
        origin=str(path),
        audit=[AuditRow(path.name, "used", "", len(ids))],
        pixel_dtypes=frozenset({all_images.dtype.name}),
    )


def _npz_class_indices(path: Path, labels: np.ndarray, classes: list[str], ids: list[str]) -> np.ndarray:
    """The npz's labels as indices into ``classes`` (see :func:`load_npz`): by name when every class is a number."""
    numbered = [bool(re.fullmatch(r"-?[0-9]+", c)) for c in classes]
    if not any(numbered):
        return labels  # names in label order
    if not all(numbered):
        raise DataSourceError(f"{path}: data.classes {classes} mixes numbers and names; expected all numbers (label "
                              "k is class 'k') or all names (label k is the k-th name)")  # fmt: skip
    index = {int(c): i for i, c in enumerate(classes)}
    if len(index) < len(classes):
        raise DataSourceError(f"{path}: data.classes {classes} names one number twice (as '1' and '01'); expected "
                              "each label once")  # fmt: skip
    out = np.asarray([index.get(int(k), -1) for k in labels], dtype=np.int64)
    missing = np.flatnonzero(out < 0)
    if missing.size:
        at = int(missing[0])
        raise DataSourceError(f"{path}: sample {ids[at]} has label {int(labels[at])}, which is not one of the classes "
                              f"{classes} ({missing.size} such samples)")  # fmt: skip
    return out


def decide_grayscale(origin: str, ids: list[str], formats: list[RawFormat]) -> bool:
    """Whether the model reads one channel: every image grey. Grey images among colour ones (X-rays with a few RGB
    screenshots) make it 3 channels, each grey image repeated into all three, with a warning that counts both kinds
    and names one of each: deciding on the first image alone turned a folder of RGB tiles into brightness."""
    grey = [i for i, f in enumerate(formats) if f.grey]
    if len(grey) in (0, len(formats)):
        return bool(grey)
    colour = next(i for i, f in enumerate(formats) if not f.grey)
    log.warning("%s: %d grey and %d colour images (e.g. %s grey, %s colour); the model reads 3 channels, grey images "
                "repeated into each; set model.in_chans: 1 to read every image as grey (colour ones as luma)", origin,
                len(grey), len(formats) - len(grey), ids[grey[0]], ids[colour])  # fmt: skip
    return False


def _used_format(path: Path, rel: str, found: RawFormat | None) -> RawFormat | str:
    """What :func:`read_image_raw` gives for ``path`` (dtype, grey): ``found``, its header's answer
    (:func:`~medvision.data.audit.check_image`), else by decoding it; or the reason it has none (its audit error)."""
    if found is not None:
        return found
    try:
        image = read_image_raw(path)
    except ImageReadError as err:
        return clean_reason(str(err), path, rel)
    return RawFormat(image.dtype.name, is_grayscale(image))


UNLABELLED = "unlabelled"
"""The one class of a source read without labels (``medvision pretrain`` on a flat folder or a path-only CSV)."""


def patient_of(pattern: re.Pattern[str], path: Path) -> str:
    """The patient id in ``path``'s file name: the group ``patient`` of ``pattern`` if it names one, else its first.

    A name the pattern does not match, or whose group matches nothing (an optional group), is an error
    naming the file: grouping it under ``None`` or ``''`` would put unrelated patients in one group.
    """
    match = pattern.search(path.name)
    group = None if match is None else match.group("patient" if "patient" in pattern.groupindex else 1)
    if not group:
        what = "does not match" if match is None else "matches, but its patient group is empty in"
        raise DataSourceError(f"{path}: data.patient_regex {pattern.pattern!r} {what} the file name; expected "
                              "every image's file name to contain its patient id")  # fmt: skip
    return group


def load_folder(root: Path, classes: list[str] | None, patient_regex: str | None, labelled: bool = True) -> SampleTable:
    """``root/<class>/**/<image>``; the patient is the group of ``patient_regex`` in the file name (:func:`patient_of`).

    With ``labelled=False`` a folder without class subfolders is read as one ``unlabelled`` class.
    Hidden folders and ``__MACOSX`` are never classes (a macOS zip would otherwise add an empty one).
    Every file under ``root`` gets an audit row: an image whose header is damaged is an error
    (:func:`medvision.data.audit.check_image`); other files, hidden files and files outside the class
    folders are skipped.
    """
    if not root.is_dir():
        raise DataSourceError(f"{root}: folder does not exist")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not is_hidden_folder(d.name))
    if not found and not labelled:
        found, classes, flat = [UNLABELLED], [UNLABELLED], True
    else:
        flat = False
    if classes is None:
        classes = found
    else:
        for name in found:
            class_index(classes, name, f"{root}/{name}")
    if not classes:
        raise DataSourceError(f"{root}: no class subfolders; expected {root}/<class>/<image>.png")
    try:
        pattern = re.compile(check_patient_regex(patient_regex) or "") if patient_regex else None
    except ValueError as err:
        raise DataSourceError(f"data.patient_regex: {err}") from None
    by_class: list[list[tuple[str, str, RawFormat]]] = [[] for _ in classes]  # (path, group, format) by class
    audit: list[AuditRow] = []
    for entry in tqdm(scan(root), desc="check", unit="file", leave=False, disable=None):
        rel, parts = entry.rel, entry.rel.split("/")
        if entry.outcome != "candidate":  # hidden files among them: scan skips them for every task alike
            audit.append(AuditRow(rel, entry.outcome, entry.reason))
            continue
        if not flat and (len(parts) == 1 or parts[0] not in classes):
            audit.append(AuditRow(rel, "skipped", "no label: not in a class folder"))
            continue
        p = root / rel
        outcome, reason, header = check_image(p, rel)
        fmt = _used_format(p, rel, header) if outcome == "used" else reason
        if isinstance(fmt, str):
            audit.append(AuditRow(rel, outcome if outcome != "used" else "error", fmt))
            continue
        group = patient_of(pattern, p) if pattern else rel
        by_class[0 if flat else classes.index(parts[0])].append((str(p), group, fmt))
        audit.append(AuditRow(rel, "used", "", 1))
    paths = [path for members in by_class for path, _, _ in members]
    groups = [group for members in by_class for _, group, _ in members]
    formats = [fmt for members in by_class for _, _, fmt in members]
    labels = [label for label, members in enumerate(by_class) for _ in members]
    if not paths:
        raise DataSourceError(f"{root}: no images with suffixes {IMAGE_SUFFIXES} under the class folders "
                              f"({counts(audit)['errors']} unreadable)", audit=audit)  # fmt: skip
    ids = [str(Path(p).relative_to(root)) for p in paths]
    return SampleTable(
        ids=ids,
        labels=np.asarray(labels, dtype=np.int64),
        groups=groups,
        splits=[""] * len(paths),
        classes=classes,
        loader=FileLoader(paths),
        grayscale=decide_grayscale(str(root), ids, formats),
        origin=str(root),
        audit=audit,
        pixel_dtypes=frozenset(f.dtype for f in formats),
    )


def load_csv(path: Path, classes: list[str] | None, labelled: bool = True) -> SampleTable:
    """A manifest with columns ``path,label`` and optional ``patient_id``, ``split``; paths relative to it.

    With ``labelled=False`` the ``label`` column may be absent or partly empty: every row is then
    ``unlabelled`` (pretraining reads no labels, so a partly labelled manifest is still usable). A row
    whose file is missing or not a whole image is an audit error that names the row (``m.csv, line 6``).
    Labels are stripped and an empty one is an error naming its line (nothing documents empty as
    unlabelled, and a class ``''`` would be a phantom class). Paths are normalised, so ``./a.png`` is
    ``a.png``, and a file listed twice is an error naming both lines: it could otherwise sit in two splits.
    Twice means under any two names: relative and absolute, through a link or a hard link.
    """
    optional = ",patient_id,split" if labelled else ",label,patient_id,split"
    rows = read_manifest(path, ("path",) if not labelled else ("path", "label"), optional)
    if "label" not in rows[0] or (not labelled and any(not r["label"].strip() for r in rows)):
        rows = [{**r, "label": UNLABELLED} for r in rows]
        classes = [UNLABELLED]
    for line, row in enumerate(rows, start=2):
        if not row["label"].strip():
            raise DataSourceError(f"{path}, line {line}: empty 'label'; every listed image needs one")
    if classes is None:
        classes = sorted({r["label"].strip() for r in rows})
    base = path.parent
    paths, labels, groups, splits, all_splits = [], [], [], [], []
    formats: list[RawFormat] = []
    audit: list[AuditRow] = []
    progress = tqdm(rows, desc="check", unit="file", leave=False, disable=None)
    for line, where, rel, row in listed_rows(path, progress, "path", "image", base=base):
        full = (base / rel) if not Path(rel).is_absolute() else Path(rel)
        label = class_index(classes, row["label"].strip(), where)
        split = check_split(row.get("split"), where)
        all_splits.append(split)
        shown = str(full.relative_to(base)) if full.is_relative_to(base) else rel
        outcome, reason, header = check_image(full, shown) if full.is_file() else ("error", "file not found", None)
        found = _used_format(full, shown, header) if outcome == "used" else reason
        if isinstance(found, str):  # the manifest lists it as an image: anything else is an error
            audit.append(AuditRow(shown, "error", f"{path.name}, line {line}: {found}"))
            continue
        formats.append(found)
        audit.append(AuditRow(shown, "used", "", 1))
        paths.append(str(full))
        labels.append(label)
        groups.append((row.get("patient_id") or "").strip() or rel)
        splits.append(split)
    if any(all_splits) and not all(all_splits):
        blank = all_splits.index("") + 2
        raise DataSourceError(f"{path}, line {blank}: 'split' is empty while other rows have one; fill all or none")
    if not paths:
        raise DataSourceError(f"{path}: no readable image in the manifest", audit=audit)
    ids = [str(Path(p).relative_to(base)) if Path(p).is_relative_to(base) else p for p in paths]
    return SampleTable(
        ids=ids,
        labels=np.asarray(labels, dtype=np.int64),
        groups=groups,
        splits=splits,
        classes=classes,
        loader=FileLoader(paths),
        grayscale=decide_grayscale(str(path), ids, formats),
        origin=str(path),
        audit=audit,
        pixel_dtypes=frozenset(f.dtype for f in formats),
    )


# ------------------------------------------------------------------------------------- splits


def preload(table: SampleTable, max_fraction: float = 0.5) -> SampleTable:
    """Decodes every image once and serves it from memory from then on.

    Called before the DataLoader forks its workers, so they share the decoded arrays instead of
    decoding PNG/JPEG/TIFF again every epoch. A file that fails to decode keeps failing the same way
    (its error is stored), so one bad file is still one error, not a crash of the preload. Refuses,
    naming the sizes, when the estimate exceeds ``max_fraction`` of the available memory.
    """
    n = len(table)
    if n == 0:
        return table
    first = table.loader(0)
    estimate = first.nbytes * n
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if estimate > max_fraction * available:
        raise DataSourceError(
            f"{table.origin}: data.preload would hold about {estimate / 2**30:.1f} GiB of decoded images, more than "
            f"{max_fraction:.0%} of the {available / 2**30:.1f} GiB available; set data.preload: false"
        )
    decode = table.loader
    cache: list[np.ndarray | Exception] = [first]
    for i in tqdm(range(1, n), desc="preload", unit="img", leave=False, disable=None):
        try:
            cache.append(decode(i))
        except Exception as err:  # re-raised when that sample is read, like an uncached bad file
            cache.append(err)

    def cached(i: int) -> np.ndarray:
        item = cache[i]
        if isinstance(item, Exception):
            raise item
        return item

    table.loader = cached
    return table


Source = Callable[[Path, DataConfig, Path | None, bool], SampleTable]
"""(path, the recipe's data section, the decode cache folder, labelled) -> the source's sample table."""

#: ``data.source`` -> the function that reads it. Each names the file at fault in its DataSourceError and
#: records every file it met in the table's audit (unreadable images left out of the samples, as errors);
#: :func:`load_table` then applies ``data.on_error`` to them, once for every source.
SOURCES: dict[str, Source] = {
    "npz": lambda path, cfg, cache, labelled: load_npz(path, cfg.classes),
    "folder": lambda path, cfg, cache, labelled: load_folder(path, cfg.classes, cfg.patient_regex, labelled),
    "csv": lambda path, cfg, cache, labelled: load_csv(path, cfg.classes, labelled),
    "dicom": lambda path, cfg, cache, labelled: load_dicom_folder(path, cfg.dicom, cfg.classes, cache),
    "slides": lambda path, cfg, cache, labelled: load_slide_table(path, cfg, cache),
}


def load_table(cfg: DataConfig, seed: int, cache_dir: Path | None = None, labelled: bool = True,
               audit_dir: Path | None = None) -> SampleTable:  # fmt: skip
    """Builds the sample table for a recipe's data section, with every row assigned to a split.

    ``labelled=False`` (self-supervised pretraining) also accepts a flat folder and a CSV without
    a ``label`` column, read as one ``unlabelled`` class. ``audit_dir`` (a run folder) gets
    ``data_audit.csv``, every file the source met with its outcome, also when unreadable images stop
    the run (``data.on_error: stop``).

    Examples:
        >>> table = load_table(recipe.data, recipe.seed, cache_dir(recipe), audit_dir=run_dir)
    """
    try:
        try:
            table = SOURCES[cfg.source](Path(cfg.path), cfg, cache_dir, labelled)
        except DataSourceError as err:  # e.g. nothing usable: unreadable images, if any, are said first
            if err.audit:
                settle(err.audit, cfg.on_error, cfg.path)
            raise
        settle(table.audit, cfg.on_error, table.origin)
    except DataSourceError as err:
        if audit_dir is None or not err.audit:
            raise
        written = write_audit(audit_dir, err.audit)
        raise DataSourceError(f"{err}; every file's outcome: {written}", err.audit) from None
    if audit_dir is not None:
        write_audit(audit_dir, table.audit)
    if not any(table.splits):
        table.splits = grouped_stratified_split(table.labels, table.groups, cfg.val_fraction, cfg.test_fraction, seed)
    check_patient_disjoint(table)
    if cfg.preload and cfg.source in ("folder", "csv"):
        preload(table)
    return table

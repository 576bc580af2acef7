"""The data audit: every file a source meets is used, skipped (not an image) or an error (an unreadable image).

Each source (:mod:`medvision.data.sources`) records one :class:`~medvision.data.table.AuditRow` per file,
leaving unreadable images out of its samples; :func:`~medvision.data.sources.load_table` then calls
:func:`settle`, once for every source, which logs the counts and applies ``data.on_error``: ``stop`` raises a
:class:`~medvision.data.table.DataSourceError` that names the first unreadable files, ``skip`` leaves them
out with a warning. :func:`write_audit` writes the rows as ``data_audit.csv`` into the run folder.

What is checked while the table is built, before any training step:

- ``dicom``: every header is parsed; a DICOM-looking file (DICM magic or a DICOM suffix) that does not
  parse, and uncompressed Pixel Data that the header shows to be cut short, are errors. With the decode
  cache on (``data.dicom.cache``, the default) every image is decoded once, filling the cache that the
  first epoch would fill anyway, so damaged compressed pixel data is found too; the decoding runs in
  crash-isolated workers, so a decoder that panics, segfaults or hangs costs its file an audit error, not
  the run. With the cache off only
  the header checks run (and the first image is decoded): damage inside a compressed stream then shows
  when that image is read in training, which stops the run with its name.
- ``folder`` and ``csv``: each image file's header is checked without decoding (PNG chunk checksums, the
  JPEG end marker, TIFF strips inside the file), see :func:`~medvision.io.image.check_image_header`.
  A CSV row whose file is missing or unreadable is an error that names the row.
- ``npz``: the arrays are read whole; one row for the file.
- ``slides``: a slide that cannot be opened, or has no tile with enough tissue, is an error.

Paths are relative to the data folder and reasons never hold a patient identifier.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Literal

from medvision.data.table import AuditRow, DataSourceError, Outcome
from medvision.io.files import atomic_write
from medvision.io.image import ImageReadError, RawFormat, check_image_header
from medvision.io.triage import read_head, redact, triage_image

log = logging.getLogger("medvision")

AUDIT_FILE = "data_audit.csv"
OnError = Literal["stop", "skip"]


def clean_reason(text: str, path: Path, rel: str) -> str:
    """One line, with the file's absolute path and its repetition as a prefix removed (the row names it)."""
    text = redact(text, path, rel).replace(f"{rel}: ", "")
    return " ".join(text.split())


def check_image(path: Path, rel: str) -> tuple[Outcome, str, RawFormat | None]:
    """``("used", "", format)`` for an image file whose header is whole, else ``("skipped" | "error", reason,
    None)``; the format is :func:`~medvision.io.image.check_image_header`'s (``None`` when only decoding tells)."""
    try:
        head, size = read_head(path), path.stat().st_size
    except OSError as err:
        return "error", f"cannot open ({type(err).__name__}: {err.strerror or err})", None
    verdict = triage_image(rel, head, size, dicom_note="this source reads PNG/JPEG/TIFF/BMP images")
    if verdict is not None:
        return "error" if verdict.outcome == "error" else "skipped", verdict.reason, None
    try:
        return "used", "", check_image_header(path)
    except ImageReadError as err:
        return "error", clean_reason(str(err), path, rel), None


def counts(rows: list[AuditRow]) -> dict[str, int]:
    """Files met, used (and the samples they give), skipped and errors: what metrics.json records."""
    by = {o: [r for r in rows if r.outcome == o] for o in ("used", "skipped", "error")}
    return {"files": len(rows), "used": len(by["used"]), "samples": sum(r.samples for r in by["used"]),
            "skipped": len(by["skipped"]), "errors": len(by["error"])}  # fmt: skip


def summary(rows: list[AuditRow]) -> str:
    """``data: 21 files: 16 used (16 samples), 4 skipped (not images or unlabelled), 1 error``."""
    n = counts(rows)
    return (f"data: {n['files']} files: {n['used']} used ({n['samples']} samples), {n['skipped']} skipped (not "
            f"images or unlabelled), {n['errors']} error{'' if n['errors'] == 1 else 's'}")  # fmt: skip


def first_errors(rows: list[AuditRow], limit: int = 3) -> str:
    """``a.dcm (reason); b.png (reason)`` for the first ``limit`` errors, reasons shortened to one line."""
    errors = [r for r in rows if r.outcome == "error"]
    shown = [f"{r.path} ({r.reason if len(r.reason) <= 160 else r.reason[:157] + '...'})" for r in errors[:limit]]
    more = f"; and {len(errors) - limit} more" if len(errors) > limit else ""
    return "; ".join(shown) + more


def settle(rows: list[AuditRow], on_error: OnError, origin: str, errors: str = "files are unreadable images") -> None:
    """Logs the counts, then stops on unreadable images (``stop``) or leaves them out with a warning (``skip``).
    ``errors`` says what the error rows are (``slides have no usable features``).

    Raises:
        DataSourceError: ``on_error`` is ``stop`` and some file is an error; the message names the count
            and the first files with their reasons, and carries the rows (``err.audit``).
    """
    rows.sort(key=lambda r: r.path)
    log.info("%s", summary(rows))
    n_errors = sum(r.outcome == "error" for r in rows)
    if not n_errors:
        return
    if on_error == "stop":
        raise DataSourceError(
            f"{origin}: {n_errors} of {len(rows)} {errors}: {first_errors(rows)}; fix or remove "
            "them, or leave them out with --set data.on_error=skip",
            audit=rows,
        )
    log.warning("data.on_error skip: %d of %d %s, left out: %s", n_errors, len(rows), errors, first_errors(rows))


def write_audit(folder: Path, rows: list[AuditRow]) -> Path:
    """``folder/data_audit.csv``: path, outcome, reason, samples; one row per file the source met."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "outcome", "reason", "samples"])
            writer.writerows([r.path, r.outcome, r.reason, r.samples] for r in rows)

    path = folder / AUDIT_FILE
    atomic_write(path, write)
    return path

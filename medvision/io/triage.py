"""One file found in a folder: an input to decode, or the reason it is skipped or an error.

Scoring (``medvision score``) and training (the sample table's audit) sort files the same way, here:

- ``skipped``: clearly not an input. Not DICOM at all (no DICM magic, no DICOM suffix, not parseable);
  a DICOM object without image pixel data (SR, RT plan, presentation state ...); a file without a
  PNG/JPEG/TIFF/BMP suffix in an image folder.
- ``error``: a file that looks like an input and cannot be read. A DICOM-looking file (DICM magic or a
  DICOM suffix, :func:`~medvision.io.archive.looks_like_dicom`) that is empty, another format renamed,
  does not parse, or whose Pixel Data is missing or cut short; an image file that is empty.

What decoding finds (a damaged compressed stream) is the caller's to report. Reasons never hold a patient
identifier (:func:`redact`); callers give paths relative to the scanned folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.pixels.utils import get_expected_length

from medvision.io.archive import DICOM_SUFFIXES, Entry, looks_like_dicom, sniff
from medvision.io.dicom import DicomParseError, NotADicomImage, NotDicom, read_dataset
from medvision.io.image import IMAGE_SUFFIXES

#: Tags that identify a patient; never written unless the user names them in ``--include-tags``.
IDENTIFYING_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs")


def read_head(path: Path) -> bytes:
    """The first 132 bytes: enough for :func:`~medvision.io.archive.sniff` to see the DICM magic."""
    with open(path, "rb") as fh:
        return fh.read(132)


def size_text(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def redact(text: str, path: Path, rel: str, ds: Any = None) -> str:
    """An error message with the absolute path shortened to ``rel`` and any patient identifier removed."""
    text = text.replace(str(path), rel)
    for tag in IDENTIFYING_TAGS if ds is not None else ():
        value = str(ds.get(tag, "") or "")
        if len(value) >= 3:
            text = text.replace(value, f"<{tag}>")
    return text


def _too_large(size: int, max_file_bytes: int) -> str:
    return f"file is {size_text(size)}, above --max-file-size {size_text(max_file_bytes)}; not read"


def open_dicom(path: Path, rel: str, head: bytes, size: int, max_file_bytes: int | None = None) -> Dataset | Entry:
    """The file's dataset with large values (Pixel Data) left on disk, or an :class:`Entry` saying why not.

    A file larger than ``max_file_bytes`` is refused unread. A file with a DICOM suffix but no preamble is
    read without one (older files). The entry's outcome is ``skipped`` for what is clearly not a DICOM
    image and ``error`` for what looks like one and is not readable (see the module docstring).
    """
    expected = looks_like_dicom(rel, head)
    kind = sniff(head)
    if size == 0:
        if expected:
            return Entry(rel, "error", "empty file (0 bytes)")
        return Entry(rel, "skipped", "empty file; not DICOM")
    if max_file_bytes is not None and size > max_file_bytes:
        return Entry(rel, "error" if expected else "skipped", _too_large(size, max_file_bytes))
    try:
        try:
            return read_dataset(path, defer_size=1 << 16)
        except NotDicom:
            if not rel.lower().endswith(DICOM_SUFFIXES) or kind:
                raise
            return read_dataset(path, defer_size=1 << 16, force=True)  # a .dcm without preamble: older files
    except (NotDicom, DicomParseError) as err:
        if not expected:
            what = f"it is {kind}" if kind else "no DICM magic, not parseable"
            return Entry(rel, "skipped", f"not DICOM ({what})")
        if kind and kind != "DICOM":
            return Entry(rel, "error", f"not DICOM: the file is {kind} (renamed?)")
        if isinstance(err, NotDicom):
            return Entry(rel, "error", "not a readable DICOM file: no DICM preamble, and read without one it "
                                       "is not a DICOM dataset")  # fmt: skip
        return Entry(rel, "error", redact(f"not a readable DICOM file: {err}", path, rel))
    except NotADicomImage as err:  # a valid DICOM object without an image: SR, RT plan, presentation state
        return Entry(rel, "skipped", redact(str(err), path, rel))
    except Exception as err:
        return Entry(rel, "error", redact(f"{type(err).__name__}: {err}", path, rel))


def pixel_data_problem(ds: Dataset, size: int) -> str:
    """What the header alone says is wrong with uncompressed Pixel Data, or ``""``; nothing is decoded.

    Catches Pixel Data that runs past the end of the file (a truncated copy) and a declared length shorter
    than Rows x Columns x samples x bits x frames. Compressed Pixel Data cut short already fails to parse
    (:func:`open_dicom`); damage inside a compressed stream shows only when it is decoded.
    """
    elem: Any = ds.get_item("PixelData", keep_deferred=True)  # a RawDataElement: value_tell, length as declared
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    declared = getattr(elem, "length", None)
    if declared is None or declared == 0xFFFFFFFF or (syntax is not None and syntax.is_encapsulated):
        return ""
    if syntax is not None and syntax.is_deflated:  # positions in the file are not positions in the dataset
        return ""
    value, tell = elem.value, getattr(elem, "value_tell", None)
    held = len(value) if value is not None else (min(declared, size - tell) if tell is not None else declared)
    if held < declared:
        return f"Pixel Data is cut short: the header declares {declared:,} bytes, the file holds {held:,}"
    try:
        needed = int(get_expected_length(ds, "bytes"))
    except Exception:  # sizes the header cannot state; the decoder reports them
        return ""
    if held < needed:
        return (f"Pixel Data holds {held:,} bytes; Rows x Columns x samples x bits x frames in the header need "
                f"{needed:,}")  # fmt: skip
    return ""


def triage_image(rel: str, head: bytes, size: int, max_file_bytes: int | None = None,
                 dicom_note: str = "not a PNG/JPEG/TIFF/BMP image") -> Entry | None:  # fmt: skip
    """``None`` for a file to read as a PNG/JPEG/TIFF/BMP image, else an :class:`Entry` saying why not.

    Without an image suffix the file is ``skipped`` (``dicom_note`` says what a DICOM file is to the
    caller); an empty or too large image file is an ``error``.
    """
    suffix = Path(rel).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        kind = sniff(head)
        if kind == "DICOM" or suffix in DICOM_SUFFIXES:
            return Entry(rel, "skipped", f"a DICOM file; {dicom_note}")
        return Entry(rel, "skipped", f"not an image file (suffix {suffix or 'none'}{', ' + kind if kind else ''})")
    if size == 0:
        return Entry(rel, "error", "empty file (0 bytes)")
    if max_file_bytes is not None and size > max_file_bytes:
        return Entry(rel, "error", _too_large(size, max_file_bytes))
    return None

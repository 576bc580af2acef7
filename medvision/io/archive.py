"""A folder as an inventory: every entry under it, each either a file to read or a row with its reason.

Real archives (a PACS export, a folder copied off a scanner) hold more than images: broken and looping
symbolic links, directories named ``x.dcm``, FIFOs that block whoever opens them, folders that cannot
be listed. :func:`scan` walks such a tree without ever opening a file, so nothing in it can hang or
crash the walk, and returns one :class:`Entry` for each thing found, in a stable order:

- a regular file (or a link to one) is a ``candidate``, to be read and classified by its content;
- a broken link, a link loop or a directory that cannot be listed is an ``error`` (something the
  user expected to be there is not readable);
- a FIFO, socket or device, a directory named like a file (its contents are still scanned), a
  hidden file or directory (not read, not entered, as the training sources skip them) and a second route to a
  directory or a file already scanned (a link, a hard link) are ``skipped``.

That bookkeeping is the same whatever is read: what differs is the unit (:class:`Units`). The image scan reads every
regular file; the slide search (:func:`medvision.tasks.score.slides.find_slides`) reads files with a slide suffix
and DICOM series folders as whole slides, through this same walk.

:func:`sniff` names common non-DICOM formats from a file's first bytes, so that a PNG renamed
``.dcm`` is reported as exactly that.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: Suffixes that say "this is meant to be a DICOM file": such a file that fails is an error, never a skip.
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
#: Suffixes that make a directory look like a file.
FILE_LIKE_SUFFIXES = (*DICOM_SUFFIXES, ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: The reason of a directory named like a file (``file_like``), whose contents are scanned.
FILE_LIKE_DIRECTORY = "a directory named like a file; its contents are scanned"

Outcome = Literal["candidate", "error", "skipped"]

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
)


@dataclass(frozen=True)
class Entry:
    """One thing found under the scanned folder: ``rel`` is its POSIX path relative to the folder."""

    rel: str
    outcome: Outcome
    reason: str = ""
    size: int = 0


@dataclass(frozen=True)
class Units:
    """What a walk reads as one unit; the rest (links, loops, hidden names, folders that cannot be listed, second
    routes) is :func:`scan`'s, whatever the unit. The default is the image scan's: every regular file, every
    directory entered.

    - ``file(rel)``: why a regular, non-hidden file is not a unit (a skipped row), or ``""`` (a candidate); only
      candidates are matched against files already listed;
    - ``whole(path)``: a directory that is one unit (a DICOM WSI series): a candidate, not entered;
    - ``parts(names)``: of a directory's entry names, those of directories that belong to a file beside them (a
      MIRAX slide's data folder): no row, not entered;
    - ``file_like``: suffixes that make a directory look like a file: a skipped row says so, and it is entered.
    """

    file: Callable[[str], str] = lambda rel: ""
    whole: Callable[[str], bool] = lambda path: False
    parts: Callable[[list[str]], set[str]] = lambda names: set()
    file_like: tuple[str, ...] = FILE_LIKE_SUFFIXES


#: The image scan's unit: every regular file.
EVERY_FILE = Units()


def sniff(head: bytes) -> str:
    """What a file's first bytes say it is: ``"DICOM"`` (DICM at offset 128), a known format, or ``""``."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "DICOM"
    return next((name for magic, name in _MAGIC if head.startswith(magic)), "")


def looks_like_dicom(rel: str, head: bytes) -> bool:
    """A DICOM suffix or the DICM magic: such a file is expected to be a DICOM image, so failing is an error."""
    return rel.lower().endswith(DICOM_SUFFIXES) or sniff(head) == "DICOM"


def _link_problem(path: str, err: OSError) -> tuple[Outcome, str]:
    if err.errno == errno.ELOOP:
        return "error", "symbolic link loop: the link resolves to itself"
    if err.errno == errno.ENOENT:
        target = os.readlink(path)  # an absolute target is a path outside the folder, which may name a patient
        shown = f"its target {target!r}" if not os.path.isabs(target) else "its target, outside the folder,"
        return "error", f"broken symbolic link: {shown} does not exist"
    return "error", f"cannot stat the link target ({type(err).__name__}: {err.strerror or err})"


def scan(root: Path, units: Units = EVERY_FILE) -> list[Entry]:
    """Every entry under ``root`` (see the module docstring), depth first, names sorted; ``units``: what is read.

    Each directory is scanned once, by the first route the sorted walk takes to it: a link back to a directory
    that contains it (a loop), and a second route to one already scanned (a link, or the real directory after a
    link to it), are skipped rows that name the route taken, rather than an endless walk or rows counted twice.
    So is each file (same device and inode): a link to an image in another class folder would otherwise be a
    second sample of it, with another label and perhaps in another split.

    Examples:
        >>> [e for e in scan(Path("/data/export")) if e.outcome != "candidate"]
    """
    out: list[Entry] = []
    top = os.stat(root)
    key = (top.st_dev, top.st_ino)
    _scan_dir(str(root), "", out, {key: "."}, frozenset({key}), {}, units)
    return [text_entry(e) for e in out]


def text_entry(entry: Entry) -> Entry:
    """An entry whose path is not valid UTF-8 (a Latin-1 name from an old share: ``caf\\xe9.dcm``) as an error row
    that names it with its bytes escaped: a row is text, and such a name cannot be written, sharded or resumed as
    it is. Its file is not read."""
    try:
        entry.rel.encode("utf-8")
    except UnicodeEncodeError:
        shown = entry.rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return Entry(shown, "error", "its path is not valid UTF-8 (shown here with its bytes escaped); rename it to "
                                     "read it")  # fmt: skip
    return entry


def _scan_dir(
    path: str, rel: str, out: list[Entry], visited: dict[tuple[int, int], str], above: frozenset[tuple[int, int]],
    files: dict[tuple[int, int], tuple[str, bool]], units: Units,
) -> None:  # fmt: skip
    """Appends the entries under ``path``; ``visited`` maps each directory scanned to the route it was scanned by,
    ``above`` holds the directories that contain this one, ``files`` maps each unit file listed to (its route,
    whether that route is a link)."""
    try:
        with os.scandir(path) as it:
            names = sorted(it, key=lambda e: e.name)
    except OSError as err:
        out.append(Entry(rel or ".", "error", f"cannot list directory ({type(err).__name__}: {err.strerror or err})"))
        return
    parts = units.parts([e.name for e in names])
    for entry in names:
        sub = f"{rel}/{entry.name}" if rel else entry.name
        try:
            st = os.stat(entry.path)  # follows links
        except OSError as err:
            outcome, reason = _link_problem(entry.path, err) if entry.is_symlink() else (
                "error", f"cannot stat ({type(err).__name__}: {err.strerror or err})")  # fmt: skip
            out.append(Entry(sub, outcome, reason))
            continue
        if stat.S_ISREG(st.st_mode) and entry.name.startswith("."):  # as training's sources skip them
            out.append(Entry(sub, "skipped", "hidden file (a macOS ._ resource fork, .DS_Store...); not read"))
        elif stat.S_ISREG(st.st_mode) and (why := units.file(sub)):
            out.append(Entry(sub, "skipped", why))
        elif stat.S_ISREG(st.st_mode):
            key, link = (st.st_dev, st.st_ino), entry.is_symlink()
            if key in files:
                first, first_link = files[key]
                route = ("link to a file already listed as" if link else "file already listed through the link"
                         if first_link else "another name (a hard link) of the file already listed as")  # fmt: skip
                out.append(Entry(sub, "skipped", f"{route} {first!r}; not read twice"))
            else:
                files[key] = sub, link
                out.append(Entry(sub, "candidate", size=st.st_size))
        elif stat.S_ISDIR(st.st_mode) and entry.name in parts:
            continue
        elif stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in above:
                out.append(Entry(sub, "skipped", "link to a directory that contains it (a loop); not followed"))
            elif key in visited:
                route = "link to a directory already scanned as" if entry.is_symlink() else \
                    "directory already scanned through the link"  # fmt: skip
                out.append(Entry(sub, "skipped", f"{route} {visited[key]!r}; not scanned twice"))
            elif entry.name.startswith("."):
                out.append(Entry(sub, "skipped", "hidden directory; not scanned"))
            elif units.whole(entry.path):
                visited[key] = sub
                out.append(Entry(sub, "candidate"))
            else:
                visited[key] = sub
                if entry.name.lower().endswith(units.file_like):
                    out.append(Entry(sub, "skipped", FILE_LIKE_DIRECTORY))
                _scan_dir(entry.path, sub, out, visited, above | {key}, files, units)
        else:
            kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device"
            out.append(Entry(sub, "skipped", f"not a regular file ({kind}); not opened"))

"""File plumbing every part of medvision shares: atomic writes and content hashes.

A file written with :func:`atomic_write` is either the old one or the complete new one, whatever
kills the process; :func:`sha256` names the exact weights, recipe or exported model in every
provenance record.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("medvision")


def _umask() -> int:
    """The process's umask: read from ``/proc/self/status`` on Linux (setting it to read it back is not thread-safe)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # no /proc: set and restore it, with a strict mask in the moment between
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp_path)`` and renames the result to ``path`` (atomic on POSIX).

    The file gets the mode a plain ``open`` would give it (``0o666`` less the umask), whatever it replaces.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 is for secret files; these are results, like open() makes
    finally:
        os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_temporaries(*folders: Path) -> int:
    """Removes what :func:`atomic_write` left in ``folders`` when a kill stopped it between writing and renaming
    (``.<name>.XXXXXXXX.tmp``, as large as the file it was to become), logs how many, and returns it. Only for
    folders whose files are all one job's, while that job holds them: another writer's temporary would be in flight."""
    removed = 0
    for folder in map(Path, folders):
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("removed %d temporary file(s) that an interrupted run left unfinished in %s", removed,
                 ", ".join(map(str, folders)))  # fmt: skip
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` as the whole of ``path``, written atomically (:func:`atomic_write`)."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    atomic_write(path, write)


def sha256(*paths: Path) -> str:
    """Hex SHA-256 of a file, for provenance records; of several, of their bytes one after another (a sharded
    checkpoint, a run's spec and its fold heads), so one file's hash is the same either way."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()

"""The output table of a scoring job: one job at a time, rows appended, resumed, merged and counted.

:mod:`medvision.tasks.score.job` runs the job; this is what it does to the table:

- :func:`lock_output`: one job writes an output at a time. Rank 0 (or the only process) holds an exclusive
  ``flock`` on ``<out>.lock`` for the run's life, and a second job into the same output is refused on every rank;
- :class:`RowWriter` appends an entry's rows with one write and a flush;
- :func:`resume` keeps the finished entries of an earlier run and removes the rows to redo: a row cut short by
  a kill, the rows of the last entry of a unit whose entries have several rows (a file's frames), error rows of
  a reader that crashed or timed out (:func:`transient`: not the file's fault, so tried again), and the rows a
  caller's check finds stale (a feature row whose ``.h5`` is missing or does not match it);
- :func:`merge_parts` merges the ranks' parts, and :func:`tally` counts every entry found once: a path with
  two rows for one item (two jobs wrote it) is counted once and makes the output not reconciled.
"""

from __future__ import annotations

import csv
import fcntl
import io
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from medvision.io.files import atomic_write
from medvision.options import EXIT_FILE_ERRORS, EXIT_NO_IMAGES, EXIT_OK
from medvision.runs import RunError
from medvision.runtime import Dist, broadcast
from medvision.workers import CRASHED, TIMED_OUT, UNREAD

log = logging.getLogger("medvision")

#: What a reason says when the worker that read the entry crashed (:mod:`medvision.workers`), as opposed to what
#: the entry's own content caused: such an error row is retried on resume (an out-of-memory kill, a killed or
#: overloaded machine are not the file's fault; a file that crashes its reader again costs little).
_CRASHED = (CRASHED, UNREAD)
#: The reason's own timeout (``x.dcm: decoder timed out after 300 s``), under the limit the run sets; not one inside
#: a slide's "tiles could not be read (...)", whose tile-batch limit is fixed and so no longer on a resume.
_TIMED_OUT = re.compile(rf"(?:^|: ){TIMED_OUT} ([0-9.eE+-]+) s$")


def transient(row: dict[str, str], timeout: float | None = None) -> bool:
    """Whether ``row`` is an error row to try again: its reader crashed (:data:`~medvision.workers.CRASHED`), or it
    timed out after fewer seconds than this run's ``timeout`` allows. A timeout under the same limit is kept: a file
    that hangs its decoder would cost every resume that limit again (5 minutes a file by default), for the same
    answer."""
    if row.get("status") != "error":
        return False
    reason = row.get("reason") or ""
    if any(t in reason for t in _CRASHED):
        return True
    waited = _TIMED_OUT.search(reason.strip())
    return waited is not None and timeout is not None and timeout > float(waited.group(1))


def lock_output(out: Path, table: Path, d: Dist) -> IO[str] | None:
    """Takes the one-job-at-a-time lock of ``out`` (``<out>.lock``, kept beside it) on rank 0 and returns its open
    file, which holds the lock until it is closed (or the process ends); None on the other ranks. Under torchrun the
    ranks of one job write their own parts, so only rank 0 takes it, and tells the others whether it could.

    Raises:
        RunError: on every rank, when another job holds the lock (naming the output, the lock and its holder), or
            the lock cannot be written (a read-only folder).
    """
    held, why = None, None
    if d.is_main:
        path = Path(f"{out}.lock")
        fh = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = path.open("a+")
            held = _take(fh)
        except OSError as err:  # a read-only folder, no flock here: every rank stops with this, not rank 0 alone
            if fh is not None:
                fh.close()
            why = (
                f"{path}: cannot write the output's lock, or take it ({type(err).__name__}: "
                f"{err.strerror or err}); expected a folder this job can write, on a file system with flock"
            )
        else:
            why = None if held is not None else _holder(fh, path, table)
    why = broadcast(why, d)
    if why:
        raise RunError(why)
    return held


def _take(fh: IO[str]) -> IO[str] | None:
    """``fh`` holding the lock, with this process's id in it; None when another job holds it."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held; any other OSError (no flock on this file system) names its own cause
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def _holder(fh: IO[str], path: Path, table: Path) -> str:
    """Why this job cannot write ``table``: the job that holds ``path``, named by its process id."""
    fh.seek(0)
    holder = fh.read().strip()
    fh.close()
    return (f"{table}: another job is writing this output (it holds {path}"
            f"{f', process {holder}' if holder else ''}); two jobs into one output would both write its rows: wait "
            "for it to end, or give another --out")  # fmt: skip


@dataclass
class ScoreSummary:
    """Counts and speed of one scoring run (over the whole output, resumed parts included): of the folder's entries,
    or under ``--shard i/n`` of the shard's."""

    files_found: int = 0
    folder_files: int = 0
    """Entries of the whole folder, before ``--shard i/n`` kept the shard's ``files_found`` of them."""
    ok_files: int = 0
    ok_images: int = 0
    error_files: int = 0
    skipped_files: int = 0
    duplicate_files: int = 0
    """Paths with more than one row for one item (two jobs wrote them): the output is not reconciled."""
    scored_now: int = 0
    images_now: int = 0
    already_done: int = 0
    lost_chunks: int = 0
    crashed_files: int = 0
    timed_out_files: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    engine: str = "torch"
    shard: str = "0/1"
    out: str = ""
    item: str = "image"
    """What ``ok_images`` and ``images_now`` count: images (frames), or the tiles of whole slides."""

    @property
    def reconciled(self) -> bool:
        found = self.ok_files + self.error_files + self.skipped_files
        return self.files_found == found and not self.duplicate_files

    @property
    def exit_code(self) -> int:
        """0: every input scored, or a shard that the hash gave none of a non-empty folder's entries (the other shards
        hold them: an array job's empty shard is not a failure); 3: some entries are error rows, have no row at all
        or two rows for one item (the table does not account for every entry found once: never a success); 4: no
        input at all (nothing to score)."""
        if self.error_files or not self.reconciled:
            return EXIT_FILE_ERRORS
        return EXIT_OK if self.ok_files or self.empty_shard else EXIT_NO_IMAGES

    @property
    def empty_shard(self) -> bool:
        """Under ``--shard i/n``: the folder has entries and the hash of each path put every one in another shard."""
        return self.shard != "0/1" and not self.files_found and self.folder_files > 0

    def line(self) -> str:
        """The counts in one line; under ``--shard i/n`` they are the shard's, and the line says so."""
        rowless = self.files_found - self.ok_files - self.error_files - self.skipped_files
        return (
            f"{self.files_found} file(s) found{'' if self.shard == '0/1' else f' in shard {self.shard}'}: "
            f"{self.ok_files} scored ({self.ok_images} {self.item}(s)), "
            f"{self.error_files} error(s), {self.skipped_files} skipped; {self.already_done} were already in "
            f"{self.out}; {self.images_now} {self.item}(s) in {self.seconds:.1f} s ({self.images_per_second:.1f} "
            f"{'img' if self.item == 'image' else self.item + 's'}/s)"
            + (f"; {rowless} file(s) found have no row" if rowless else "")
            + (f"; {self.duplicate_files} file(s) have two rows for one item" if self.duplicate_files else "")
            + (
                f"; the folder's {self.folder_files} file(s) are all in other shards (--shard puts each path in one "
                "shard by a hash of it)"
                if self.empty_shard
                else ""
            )
        )


class RowWriter:
    """Appends an entry's rows with one write and a flush, so that finished entries survive a kill."""

    def __init__(self, table: Path, columns: list[str]) -> None:
        new = not table.is_file() or table.stat().st_size == 0
        table.parent.mkdir(parents=True, exist_ok=True)
        self.fh = table.open("a", newline="")
        if new:
            self.write(csv_line(columns))

    def write(self, text: str) -> None:
        self.fh.write(text)
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def csv_line(*rows: list[Any]) -> str:
    """Rows as CSV text, each ``reason`` already one line (see :func:`one_line`)."""
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def one_line(reason: str) -> str:
    """A reason as one CSV-friendly line: its non-blank lines joined with `` | ``."""
    return " | ".join(line.strip() for line in reason.splitlines() if line.strip())


@dataclass
class Resumed:
    """What :func:`resume` kept and removed."""

    done: set[str] = field(default_factory=set)
    """The paths finished in the earlier run(s), whose rows stay."""
    redo: Counter[str] = field(default_factory=Counter)
    """Why rows of paths to do again were removed, with how many paths each."""


def resume(table: Path, several_rows: bool = True, stale: Callable[[dict[str, str]], str | None] | None = None,
           timeout: float | None = None) -> Resumed:  # fmt: skip
    """Paths already finished in a previous output, the table cut back to them.

    Removed: a row cut short by a kill (no line end yet, or inside a quoted field); with ``several_rows`` (an entry
    may have several rows, e.g. a file's frames) the rows of the last entry too, as the kill may have come between
    two of them; error rows of a reader that crashed, or timed out under a shorter limit than this run's
    ``timeout`` (:func:`transient`); and the rows for which ``stale(row)`` gives a reason (an ``ok`` row whose
    output file is missing or does not match). Rows are read as
    CSV records, so a quoted path that holds a line break is one row; kept rows keep their bytes.
    """
    out = Resumed()
    if not table.is_file():
        return out
    data = table.read_bytes()
    pieces = data.decode("utf-8", "surrogateescape").split("\n")  # a kill may cut a character in two
    lines = [p + "\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    records: list[tuple[list[str], int, int]] = []  # each complete record, its first line and the line after it
    reader = csv.reader(lines, strict=True)
    try:
        for record in reader:
            if lines[reader.line_num - 1].endswith("\n"):
                records.append((record, records[-1][2] if records else 0, reader.line_num))
    except csv.Error:  # the file ends inside a quoted field: the record was cut short
        pass
    header, rows = (records[0][0], records[1:]) if records else ([], [])
    if several_rows and rows:  # the rows of the last path dropped
        last = rows[-1][0][0] if rows[-1][0] else ""
        while rows and (rows[-1][0][0] if rows[-1][0] else "") == last:
            rows.pop()
    again: dict[str, str] = {}
    for record, _, _ in rows:
        row = dict(zip(header, record, strict=False))
        why = ("error rows of a reader that crashed or timed out under a shorter limit" if transient(row, timeout)
               else stale(row) if stale else None)  # fmt: skip
        if why and row.get("path", "") not in again:
            again[row.get("path", "")] = why
    kept = [(r, a, b) for r, a, b in rows if (r[0] if r else "") not in again]
    keep = "".join(lines[: records[0][2] if records else 0]) + "".join("".join(lines[a:b]) for _, a, b in kept)
    raw = keep.encode("utf-8", "surrogateescape")
    if raw != data:
        if data.startswith(raw):
            with table.open("r+b") as fh:
                fh.truncate(len(raw))
        else:  # rows to redo sat before others: the table without them, atomically

            def write(tmp: str) -> None:
                Path(tmp).write_bytes(raw)

            atomic_write(table, write)
    out.done = {r[0] for r, _, _ in kept if r and r[0]}
    out.redo = Counter(again.values())
    for why, n in out.redo.items():
        log.info("%s: %d entr%s to do again (%s)", table, n, "y" if n == 1 else "ies", why)
    return out


def part_path(out: Path, rank: int, world_size: int) -> Path:
    """Rank ``rank``'s own output under torchrun: ``<out>.parts/rank<r>-of-<W>.csv``, kept for resume."""
    return Path(f"{out}.parts") / f"rank{rank}-of-{world_size}.csv"


def merge_parts(parts: list[Path], order: list[str], merged: Path) -> None:
    """The ranks' part files as one table, rows in the folder's order, written atomically over ``merged``.

    The parts hold disjoint entries (hash shards), so nothing is duplicated; an entry without rows in
    any part would show up as a reconciliation mismatch in the tally.
    """
    rank = {rel: k for k, rel in enumerate(order)}
    header: list[str] | None = None
    rows: list[tuple[int, int, list[str]]] = []
    for part in parts:
        with part.open(newline="") as fh:
            reader = csv.reader(fh)
            head = next(reader, None)
            if head is None:
                continue
            if header is not None and head != header:
                raise RunError(f"{part}: its columns differ from the other parts' ({head} vs {header})")
            header = head
            rows.extend((rank[r[0]], k, r) for k, r in enumerate(reader) if r and r[0] in rank)
    rows.sort(key=lambda t: (t[0], t[1]))  # the folder's order; an entry's frames stay in their order

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header or [])
            writer.writerows(r for _, _, r in rows)

    atomic_write(merged, write)


def tally(table: Path, found: set[str], summary: ScoreSummary, items: Callable[[dict[str, str]], int]) -> None:
    """Counts outcomes over the whole output (earlier, resumed parts too) for the entries found now, each path once.

    A path with two rows for one item (the same ``frame``, or rows of two statuses: two jobs wrote it) counts by
    its first rows and is one of ``summary.duplicate_files``, which makes the output not reconciled.
    """
    status: dict[str, str] = {}
    counted: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    twice: set[str] = set()
    with table.open(newline="") as fh:
        for row in csv.DictReader(fh):
            path = row["path"]
            if path not in found:
                continue
            key = (path, row.get("frame") or "")
            if key in seen or status.get(path, row["status"]) != row["status"]:
                twice.add(path)
                continue
            seen.add(key)
            status.setdefault(path, row["status"])
            counted[path] = counted.get(path, 0) + items(row)
    summary.files_found = len(found)
    summary.ok_images = sum(counted.values())
    summary.ok_files = sum(s == "ok" for s in status.values())
    summary.error_files = sum(s == "error" for s in status.values())
    summary.skipped_files = sum(s == "skipped" for s in status.values())
    summary.duplicate_files = len(twice)
    if twice:
        log.warning("%s: %d path(s) have more than one row for one item (two jobs wrote them), e.g. %s", table,
                    len(twice), sorted(twice)[0])  # fmt: skip

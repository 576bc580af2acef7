"""The one scoring job: shard, per-rank parts, resume, rows, merge, tally and provenance, for any unit.

A :class:`Unit` says what one entry of the folder is and how it becomes rows: a file gives frames
(:mod:`medvision.tasks.score.files`), a slide gives tiles (:mod:`medvision.tasks.score.slides`). Everything
else is here, once:

- the entries are sharded by a hash of their relative path (``--shard i/n``), and under ``torchrun`` rank
  ``r`` of ``W`` takes the part of shard ``i/n`` whose hash is ``i + n*r`` modulo ``n*W``, writing its own
  ``<out>.parts/rank<r>-of-<W>.csv``;
- rows are appended and flushed one entry at a time (:class:`RowWriter`), in the folder's order; re-running
  with the same ``--out`` resumes after the last complete entry (:func:`resume`), into a table with the same
  columns only (:func:`same_columns`);
- rank 0 merges the parts in the folder's order, counts every entry found (:func:`tally`: found = ok +
  error + skipped), and writes ``<out>.json``: the model's and recipe's SHA-256, versions, calibration,
  operating points, precision, counts and speed, plus what the unit adds.

The probabilities themselves come from the engine (:mod:`medvision.inference`), never from here.
"""

from __future__ import annotations

import csv
import datetime
import glob
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from medvision.evaluation import Decision
from medvision.inference import Engine, load_scorer
from medvision.io.archive import Entry
from medvision.io.files import atomic_write, atomic_write_text
from medvision.metrics import PROB_DIGITS, round_significant
from medvision.options import EXIT_FILE_ERRORS, EXIT_NO_IMAGES, EXIT_OK
from medvision.runs import RunError, ScoringSpec, versions
from medvision.runtime import barrier, broadcast, gather, setup
from medvision.workers import PoolStats, isolated_map

log = logging.getLogger("medvision")

#: How long a rank waits for the others at the merge: ranks of one archive can finish hours apart.
RANK_TIMEOUT = datetime.timedelta(hours=72)


def in_shard(rel: str, shard: tuple[int, int]) -> bool:
    """Deterministic, overlap-free split of entries across ``n`` workers by a hash of the relative path."""
    i, n = shard
    return int(hashlib.sha1(rel.encode()).hexdigest()[:12], 16) % n == i


@dataclass
class ScoreSummary:
    """Counts and speed of one scoring run (over the whole output, resumed parts included)."""

    files_found: int = 0
    ok_files: int = 0
    ok_images: int = 0
    error_files: int = 0
    skipped_files: int = 0
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
        return self.files_found == self.ok_files + self.error_files + self.skipped_files

    @property
    def exit_code(self) -> int:
        """0: every input scored; 3: some entries are error rows, or have no row at all (the table does not account
        for every entry found: never a success); 4: no input at all (nothing to score)."""
        if self.error_files or not self.reconciled:
            return EXIT_FILE_ERRORS
        return EXIT_OK if self.ok_files else EXIT_NO_IMAGES

    def line(self) -> str:
        rowless = self.files_found - self.ok_files - self.error_files - self.skipped_files
        return (
            f"{self.files_found} file(s) found: {self.ok_files} scored ({self.ok_images} {self.item}(s)), "
            f"{self.error_files} error(s), {self.skipped_files} skipped; {self.already_done} were already in "
            f"{self.out}; {self.images_now} {self.item}(s) in {self.seconds:.1f} s ({self.images_per_second:.1f} "
            f"{'img' if self.item == 'image' else self.item + 's'}/s)"
            + ("" if self.reconciled else f"; {rowless} file(s) found have no row")
        )


def operating_calls(decision: Decision, level: str = "image") -> list[tuple[str, float]]:
    """(column name, threshold) of each operating point of ``level`` (``image``, or ``patient`` for slides)
    with a finite threshold."""
    calls = []
    for op in decision.points.get(level, []) if decision.positive is not None else []:
        name = "call_youden" if op["rule"] == "youden" else f"call_{op['rule']}_{op['target']:g}"
        if op["threshold"] is not None and np.isfinite(op["threshold"]):
            calls.append((name, float(op["threshold"])))
    return calls


def prediction_cells(p: np.ndarray, classes: list[str], positive: int | None, calls: list[tuple[str, float]]
                     ) -> list[str]:  # fmt: skip
    """A scored row's predicted class, class probabilities and 0/1 call at each operating point. The probabilities
    are written with the digits ``predictions.csv`` keeps (:data:`~medvision.metrics.PROB_DIGITS` significant), and
    the calls compare exactly those values with the thresholds the run's report chose on them: a validation image at
    a threshold is called as it was there, a written probability is never on the other side of its call's
    threshold, and a confident 3e-09 is not written 0 (which would tie it with every other confident image).
    """
    p = round_significant(np.asarray(p))
    flags = [str(int(p[positive] >= thr)) for _, thr in calls] if positive is not None else []
    return [classes[int(p.argmax())], *[f"{v:.{PROB_DIGITS}g}" for v in p], *flags]


def csv_line(*rows: list[Any]) -> str:
    """Rows as CSV text, each ``reason`` already one line (see :func:`one_line`)."""
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def one_line(reason: str) -> str:
    """A reason as one CSV-friendly line: its non-blank lines joined with `` | ``."""
    return " | ".join(line.strip() for line in reason.splitlines() if line.strip())


class Unit(Protocol):
    """What one entry of the scanned folder is, and how it becomes rows (see the module docstring)."""

    item: str
    """What an ok row's ``items`` count: ``image`` (frames) or ``tile``."""
    columns: list[str]
    """The output's header; the first column is ``path``, the relative path of the entry."""
    operating_level: str
    """Whose operating points give the 0/1 calls: ``image``, or ``patient`` (the slide level)."""

    def entries(self, folder: Path) -> list[Entry]:
        """Every entry under ``folder`` in a stable order, each a ``candidate`` or already an error/skip."""
        ...

    def score(self, folder: Path, todo: list[Entry], stats: PoolStats) -> Iterator[tuple[str, int]]:
        """Scores ``todo`` in order with the unit's own model; yields, per entry and once its rows are final, the
        rows' CSV text and how many items (images or tiles) were scored for it now."""
        ...

    def items(self, row: dict[str, str]) -> int:
        """How many items an output row counts for the tally (0 for error and skipped rows)."""
        ...

    def finish(self, out: Path, table: Path) -> None:
        """After the merge, on rank 0: any further output (Parquet, the merged tile table)."""
        ...

    def provenance(self) -> dict[str, Any]:
        """What this unit adds to ``<out>.json`` (limits, tags, aggregation, slide settings)."""
        ...


def isolated(folder: Path, todo: list[Entry], read: Callable[[list[str]], list[Any]], stats: PoolStats,
             **pool: Any) -> Iterator[tuple[Entry, Any]]:  # fmt: skip
    """Each entry of ``todo`` in order, with what ``read`` made of it in the crash-isolated pool
    (:func:`medvision.workers.isolated_map`; a :class:`~medvision.workers.Failure` when its worker died or hung),
    or ``None`` for an entry the scan already decided (an error or a skip)."""
    results = isolated_map(read, [e.rel for e in todo if e.outcome == "candidate"], stats=stats, **pool)
    for entry in todo:
        yield entry, (next(results)[1] if entry.outcome == "candidate" else None)


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


def resume(table: Path) -> set[str]:
    """Paths already finished in a previous output. A row cut short by a kill and the rows of the last
    entry (it may have been cut between two of its frames) are removed, so that entry is scored again. Rows are
    read as CSV records, so a quoted path that holds a line break is one row."""
    if not table.is_file():
        return set()
    data = table.read_bytes()
    pieces = data.decode("utf-8", "surrogateescape").split("\n")  # a kill may cut a character in two
    lines = [p + "\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    ends: list[tuple[str, int]] = []  # each complete record's first field and the line it ends on
    reader = csv.reader(lines, strict=True)
    try:
        for record in reader:
            if lines[reader.line_num - 1].endswith("\n"):
                ends.append((record[0] if record else "", reader.line_num))
    except csv.Error:  # the file ends inside a quoted field: the record was cut short
        pass
    if len(ends) > 1:  # the header, and the rows of the last path dropped
        last = ends[-1][0]
        while len(ends) > 1 and ends[-1][0] == last:
            ends.pop()
    keep = "".join(lines[: ends[-1][1]] if ends else []).encode("utf-8", "surrogateescape")
    if keep != data:  # keep is a prefix of data
        with table.open("r+b") as raw:
            raw.truncate(len(keep))
    with table.open(newline="") as fh:
        return {row["path"] for row in csv.DictReader(fh) if row.get("path")}


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
    """Counts outcomes over the whole output (earlier, resumed parts too) for the entries found now."""
    status: dict[str, str] = {}
    counted: dict[str, int] = {}
    with table.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["path"] in found:
                status[row["path"]] = row["status"]
                counted[row["path"]] = counted.get(row["path"], 0) + items(row)
    summary.files_found = len(found)
    summary.ok_images = sum(counted.values())
    summary.ok_files = sum(s == "ok" for s in status.values())
    summary.error_files = sum(s == "error" for s in status.values())
    summary.skipped_files = sum(s == "skipped" for s in status.values())


UnitFactory = Callable[[ScoringSpec, Path, Engine], Unit]
"""``(spec, model path, engine) -> unit``: a unit is built once the model is loaded, and keeps the engine."""


def run_job(
    folder: Path, model: Path, out: Path, make_unit: UnitFactory, shard: tuple[int, int], engine: str, amp: str,
    workers: int, table_path: Path | None = None, turns: bool = False,
) -> ScoreSummary:  # fmt: skip
    """Scores every entry under ``folder`` with ``model`` into ``out``; see the module docstring.

    ``make_unit(spec, model, engine)`` builds the unit once the model is loaded. ``workers`` decode processes keep
    their cores: the engine's CPU threads are the rest; unless they take turns with a model on the CPU (``turns``:
    a slide stream, :class:`~medvision.tasks.score.slides.SlideScan`), which then keeps every core.
    ``table_path``: where the rows go when that is not ``out`` itself (a Parquet output is written from a CSV
    beside it).
    """
    if out.is_dir():
        raise RunError(f"--out {out} is a folder; expected the table's file, e.g. {out / 'scores.csv'}")
    start = time.perf_counter()
    setup("auto", timeout=RANK_TIMEOUT)  # under torchrun: this rank's device, and the process group
    busy = 0 if turns else workers  # decode processes that run while the model computes keep their cores
    cpu_threads = max(1, (os.cpu_count() or 1) - busy) if workers > 0 else None
    scorer, spec, provenance = load_scorer(model, engine, cpu_threads, amp)
    unit = make_unit(spec, model, scorer)
    decision = Decision.from_json(spec.decision)
    record = {
        **provenance,
        "engine": scorer.name,
        "model_sha256": spec.model_sha256,
        "recipe_sha256": spec.recipe_sha256,
        "versions": versions(),
        "calibration_temperature": decision.temperature,
        "tta": spec.tta,
        "operating_points": decision.points.get(unit.operating_level, []),
    }
    on_cpu = scorer.name == "torch" and provenance["device"] == "cpu"
    return run_units(folder, out, unit, shard, record, cpu_threads if on_cpu else None, table_path, start)


def run_units(
    folder: Path, out: Path, unit: Unit, shard: tuple[int, int], record: dict[str, Any], torch_threads: int | None,
    table_path: Path | None = None, start: float | None = None,
) -> ScoreSummary:  # fmt: skip
    """The job itself, for a unit that holds its own model: shard, resume, rows, merge, tally, ``<out>.json``.

    ``record``: what ``<out>.json`` says about the model (hashes, versions, device, precision), before the unit's
    own provenance and the counts. ``torch_threads``: PyTorch's CPU threads while scoring (None: unchanged).
    """
    start = time.perf_counter() if start is None else start
    d, _ = setup("auto", timeout=RANK_TIMEOUT)
    merged = table_path or out
    entries = [e for e in unit.entries(folder) if in_shard(e.rel, shard)]
    if d.world_size > 1:
        i, n = shard
        mine = [e for e in entries if in_shard(e.rel, (i + n * d.rank, n * d.world_size))]
        table = part_path(out, d.rank, d.world_size)
    else:
        mine, table = entries, merged
    job = {**record, **unit.provenance(), "shard": f"{shard[0]}/{shard[1]}"}
    same_job(out, job, table)
    same_columns(table, unit.columns)
    barrier(d)  # every rank has checked the record before rank 0 writes this job's
    if d.is_main:
        write_record(out, {**job, "finished": False})
    done = resume(table)
    todo = [e for e in mine if e.rel not in done]
    summary = ScoreSummary(already_done=len(done & {e.rel for e in mine}), shard=f"{shard[0]}/{shard[1]}",
                           out=str(out), engine=str(record.get("engine", "torch")), item=unit.item)  # fmt: skip
    stats = PoolStats()
    rows = RowWriter(table, unit.columns)
    threads = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        for text, items in unit.score(folder, todo, stats):
            rows.write(text)
            summary.scored_now += 1
            summary.images_now += items
    finally:
        torch.set_num_threads(threads)
        rows.close()
    counts = (summary.images_now, summary.scored_now, summary.already_done, stats.lost_chunks, stats.crashed_files,
              stats.timed_out_files)  # fmt: skip
    per_rank = gather(counts, d)
    if per_rank is not None:  # rank 0 (or the only process): the whole output
        (summary.images_now, summary.scored_now, summary.already_done, summary.lost_chunks, summary.crashed_files,
         summary.timed_out_files) = (sum(c) for c in zip(*per_rank, strict=True))  # fmt: skip
        if d.world_size > 1:
            parts = [part_path(out, r, d.world_size) for r in range(d.world_size)]
            merge_parts(parts, [e.rel for e in entries], merged)
            record = {**record, "world_size": d.world_size}
        summary.seconds = time.perf_counter() - start
        summary.images_per_second = summary.images_now / summary.seconds if summary.seconds else 0.0
        tally(merged, {e.rel for e in entries}, summary, unit.items)
        if not summary.reconciled:
            log.warning("accounting mismatch: %d found, %d ok + %d error + %d skipped", summary.files_found,
                        summary.ok_files, summary.error_files, summary.skipped_files)  # fmt: skip
        unit.finish(out, merged)
        write_provenance(out, record, summary, unit)
    summary = broadcast(summary, d)
    barrier(d)  # no rank returns before the merged output is written
    return summary


#: What a resumed job may change: the machine and the software around the model, not the model, its settings, its
#: engine and precision, or the shard (a row is one job's answer, whichever run wrote it).
RESUMABLE = frozenset({"versions", "device", "model_file", "limits", "world_size", "finished"})


def same_job(out: Path, job: dict[str, Any], table: Path) -> None:
    """Refuses to add rows to a table that another job began (``<out>.json``, written when a job starts and when it
    ends): another model, settings, engine, precision or shard would leave rows of two jobs under one record.

    Raises:
        RunError: naming what differs, and what to do.
    """
    path = Path(f"{out}.json")
    if not table.is_file() or table.stat().st_size == 0:
        return
    if not path.is_file():  # written before any row: rows without it are another job's, its record removed
        raise RunError(f"{table} holds rows but {path}, the record of the job that wrote them, is missing, so they "
                       f"cannot be told from another model's; delete {table}{_side_outputs(out, table)} to score "
                       "afresh, or give another --out")  # fmt: skip
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise RunError(f"{path} cannot be read, so the rows of {table} cannot be told apart from another job's; "
                       "give another --out") from None  # fmt: skip
    new = json.loads(json.dumps(job))  # as it reads back: tuples are lists
    differ = sorted(k for k in new if k not in RESUMABLE and k in old and old[k] != new[k])
    if differ:
        raise RunError(f"{table} holds rows of another job ({', '.join(differ)} differ from {path}): resume with the "
                       "same model, settings and --shard, or give another --out")  # fmt: skip


def same_columns(table: Path, columns: list[str]) -> None:
    """Refuses to append rows to a table whose header is not the one this job writes (other ``--uids`` or
    ``--include-tags``, or a table an earlier version wrote): its rows would sit under the wrong column names.
    A header cut short by a kill (no line end yet) is left to :func:`resume`, which starts that table afresh.

    Raises:
        RunError: naming the table, the columns it has and the ones asked for, and what to do.
    """
    if not table.is_file():
        return
    with table.open("rb") as fh:
        first = fh.readline()
    if not first.endswith(b"\n"):
        return
    header = next(csv.reader([first.decode("utf-8", "replace")]), [])
    if header != columns:
        differ = [
            f"lacks {', '.join(c for c in columns if c not in header)}" if set(columns) - set(header) else "",
            f"has {', '.join(c for c in header if c not in columns)}" if set(header) - set(columns) else "",
        ]
        what = " and ".join(d for d in differ if d) or "has them in another order"
        raise RunError(f"{table}: cannot resume: its header is not the one asked for (it {what}); score with the "
                       "options that wrote it (--uids, --include-tags), or give another --out")  # fmt: skip


def _side_outputs(out: Path, table: Path) -> str:
    """`` (and ...)``: what else of the job's lies beside ``out`` (its parts, a slide job's ``.tiles/``, ``.geojson/``,
    ``.heatmaps/`` and merged tile table), named so that scoring afresh also starts without an earlier job's files."""
    found = sorted(p for p in out.parent.glob(f"{glob.escape(out.name)}.*") if p not in (table, Path(f"{out}.json")))
    names = [f"{p}/" if p.is_dir() else str(p) for p in found]
    return f" (and {', '.join(names)})" if names else ""


def write_record(out: Path, record: dict[str, Any]) -> None:
    """``<out>.json``, written atomically: when a job starts, and with what came of it when it ends."""
    atomic_write_text(Path(f"{out}.json"), json.dumps(record, indent=2) + "\n")


def write_provenance(out: Path, record: dict[str, Any], summary: ScoreSummary, unit: Unit) -> None:
    """``<out>.json``: what scored, with which weights, settings and precision, and what came of it."""
    write_record(out, {**record, **unit.provenance(), **asdict(summary), "reconciled": summary.reconciled,
                       "exit_code": summary.exit_code, "finished": True})  # fmt: skip

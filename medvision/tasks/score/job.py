"""The one scoring job: shard, per-rank parts, resume, rows, merge, tally and provenance, for any unit.

A :class:`Unit` says what one entry of the folder is and how it becomes rows: a file gives frames
(:mod:`medvision.tasks.score.files`), a slide gives tiles (:mod:`medvision.tasks.score.slides`). Everything
else is here, once:

- the entries are sharded by a hash of their relative path (``--shard i/n``), and under ``torchrun`` rank
  ``r`` of ``W`` takes the part of shard ``i/n`` whose hash is ``i + n*r`` modulo ``n*W``, writing its own
  ``<out>.parts/rank<r>-of-<W>.csv``;
- one job writes an output at a time: rank 0 holds ``<out>.lock`` for the run's life, and a second job into
  the same ``--out`` is refused;
- rows are appended and flushed one entry at a time (:class:`RowWriter`), in the folder's order; re-running
  with the same ``--out`` resumes after the finished entries (:func:`resume`: error rows of a reader that crashed
  or timed out are tried again), into a table with the same columns only (:func:`same_columns`);
- rank 0 merges the parts in the folder's order, counts every entry found once (:func:`tally`: found = ok +
  error + skipped, and no entry with two rows for one item), and writes ``<out>.json``: the model's and
  recipe's SHA-256, versions, calibration, operating points, precision, counts and speed, plus what the unit adds.

What is done to the table itself (the lock, rows, resume, merge, tally) is :mod:`medvision.tasks.score.table`.
The probabilities themselves come from the engine (:mod:`medvision.inference`), never from here.
"""

from __future__ import annotations

import csv
import datetime
import glob
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from medvision.evaluation import Decision
from medvision.inference import Engine, load_scorer
from medvision.io.archive import Entry
from medvision.io.files import atomic_write_text, remove_temporaries
from medvision.metrics import PROB_DIGITS, round_significant
from medvision.runs import RunError, ScoringSpec, versions
from medvision.runtime import Dist, barrier, broadcast, gather, setup
from medvision.tasks.score.table import (  # noqa: F401  # csv_line, one_line, RowWriter: the units' and tests' names
    RowWriter,
    ScoreSummary,
    csv_line,
    lock_output,
    merge_parts,
    one_line,
    part_path,
    resume,
    tally,
)
from medvision.workers import PoolStats, isolated_map

log = logging.getLogger("medvision")

#: How long a rank waits for the others at the merge: ranks of one archive can finish hours apart.
RANK_TIMEOUT = datetime.timedelta(hours=72)


def in_shard(rel: str, shard: tuple[int, int]) -> bool:
    """Deterministic, overlap-free split of entries across ``n`` workers by a hash of the relative path."""
    i, n = shard
    return int(hashlib.sha1(rel.encode()).hexdigest()[:12], 16) % n == i


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


class Unit(Protocol):
    """What one entry of the scanned folder is, and how it becomes rows (see the module docstring)."""

    item: str
    """What an ok row's ``items`` count: ``image`` (frames) or ``tile``."""
    columns: list[str]
    """The output's header; the first column is ``path``, the relative path of the entry."""
    operating_level: str
    """Whose operating points give the 0/1 calls: ``image``, or ``patient`` (the slide level)."""
    timeout: float
    """Seconds a reader may take on one entry (``--file-timeout``, ``--slide-timeout``): resume tries an entry
    that timed out again only under a longer one."""

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

    def owned(self) -> list[Path]:
        """Folders whose every file is this job's (per-slide outputs): what a killed write left there is removed
        when the job starts (:func:`~medvision.io.files.remove_temporaries`)."""
        ...


def isolated(folder: Path, todo: list[Entry], read: Callable[[list[str]], list[Any]], stats: PoolStats,
             **pool: Any) -> Iterator[tuple[Entry, Any]]:  # fmt: skip
    """Each entry of ``todo`` in order, with what ``read`` made of it in the crash-isolated pool
    (:func:`medvision.workers.isolated_map`; a :class:`~medvision.workers.Failure` when its worker died or hung),
    or ``None`` for an entry the scan already decided (an error or a skip)."""
    results = isolated_map(read, [e.rel for e in todo if e.outcome == "candidate"], stats=stats, **pool)
    for entry in todo:
        yield entry, (next(results)[1] if entry.outcome == "candidate" else None)


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
    stale: Callable[[dict[str, str]], str | None] | None = None,
) -> ScoreSummary:  # fmt: skip
    """The job itself, for a unit that holds its own model: shard, resume, rows, merge, tally, ``<out>.json``.

    ``record``: what ``<out>.json`` says about the model (hashes, versions, device, precision), before the unit's
    own provenance and the counts. ``torch_threads``: PyTorch's CPU threads while scoring (None: unchanged).
    ``stale(row)``: why a finished row of an earlier run must be done again (its output file is missing or does not
    match it), or None (:func:`~medvision.tasks.score.table.resume`).

    Raises:
        RunError: another job is writing ``out`` (:func:`~medvision.tasks.score.table.lock_output`), or the rows
            already there are another job's.
    """
    start = time.perf_counter() if start is None else start
    d, _ = setup("auto", timeout=RANK_TIMEOUT)
    merged = table_path or out
    lock = lock_output(out, merged, d)  # one job at a time into this output, for the whole run
    try:
        return _run_locked(folder, out, merged, unit, shard, record, torch_threads, d, start, stale)
    finally:
        if lock is not None:
            lock.close()


def _run_locked(
    folder: Path, out: Path, merged: Path, unit: Unit, shard: tuple[int, int], record: dict[str, Any],
    torch_threads: int | None, d: Dist, start: float, stale: Callable[[dict[str, str]], str | None] | None,
) -> ScoreSummary:  # fmt: skip
    """:func:`run_units` once this job holds its output."""
    everything = unit.entries(folder)
    entries = [e for e in everything if in_shard(e.rel, shard)]
    if d.world_size > 1:
        i, n = shard
        mine = [e for e in entries if in_shard(e.rel, (i + n * d.rank, n * d.world_size))]
        table = part_path(out, d.rank, d.world_size)
    else:
        mine, table = entries, merged
    job = {**record, **unit.provenance(), "shard": f"{shard[0]}/{shard[1]}"}
    same_job(out, job, table)
    same_columns(table, unit.columns)
    if d.is_main:  # before the barrier: no rank writes yet
        remove_temporaries(*unit.owned())
    barrier(d)  # every rank has checked the record before rank 0 writes this job's
    if d.is_main:
        write_record(out, {**job, "finished": False})
    # only a file's frames make several rows an entry; a timeout is tried again only under a longer limit
    done = resume(table, "frame" in unit.columns, stale, unit.timeout).done
    todo = [e for e in mine if e.rel not in done]
    summary = ScoreSummary(already_done=len(done & {e.rel for e in mine}), shard=f"{shard[0]}/{shard[1]}",
                           out=str(out), engine=str(record.get("engine", "torch")), item=unit.item,
                           folder_files=len(everything))  # fmt: skip
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
    own = (table, Path(f"{out}.json"), Path(f"{out}.lock"))  # the lock stays: deleting it races with a new job
    found = sorted(p for p in out.parent.glob(f"{glob.escape(out.name)}.*") if p not in own)
    names = [f"{p}/" if p.is_dir() else str(p) for p in found]
    return f" (and {', '.join(names)})" if names else ""


def write_record(out: Path, record: dict[str, Any]) -> None:
    """``<out>.json``, written atomically: when a job starts, and with what came of it when it ends."""
    atomic_write_text(Path(f"{out}.json"), json.dumps(record, indent=2) + "\n")


def write_provenance(out: Path, record: dict[str, Any], summary: ScoreSummary, unit: Unit) -> None:
    """``<out>.json``: what scored, with which weights, settings and precision, and what came of it."""
    write_record(out, {**record, **unit.provenance(), **asdict(summary), "reconciled": summary.reconciled,
                       "exit_code": summary.exit_code, "finished": True})  # fmt: skip

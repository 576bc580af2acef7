"""Batch scoring of archives: ``medvision score DIR --model RUN_DIR --out scores.csv``.

Every entry found under ``DIR`` ends up in exactly one outcome, written as rows of the output:

- ``ok``: one row per scored image (per frame of a multi-frame DICOM), with calibrated probabilities
  and a 0/1 call at each of the run's operating points;
- ``error``: a file that should have been an image and could not be scored, with the reason (a
  damaged, truncated, empty or renamed DICOM; a decoder that raised, crashed or hung; a header that
  declares more pixels than ``--max-pixels``; a broken or looping link);
- ``skipped``: clearly not an input, with the reason (no DICM magic, not parseable and no DICOM
  suffix; a DICOM object without pixel data such as SR, RT plan or presentation state; a FIFO; a
  directory named like a file).

Files are read and preprocessed in worker processes that may die (see :mod:`medvision.workers`): a
decoder that panics, segfaults, aborts or hangs costs the one file it was reading. Rows are written
in the folder's order and flushed batch by batch; re-running with the same ``--out`` resumes (the
last file of a killed run is redone, and a row cut short is dropped). The preprocessing is the
trained run's own; a run trained on DICOM scores DICOM files, any other run scores PNG, JPEG, TIFF
and BMP images. The model runs in PyTorch or, exported, in ONNX Runtime (``--engine onnxruntime``).

No patient identifiers are written unless asked for with ``--include-tags``. A sidecar
``<out>.json`` records the model's SHA-256, the recipe hash, versions, counts (which reconcile:
files found = ok + error + skipped files) and speed.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from medvision.data.intake import (
    IDENTIFYING_TAGS,
    MAX_FILE_BYTES,
    MAX_PIXELS,
    FileResult,
    ReadConfig,
    Reader,
    init_worker,
    read_chunk,
    read_file,
)
from medvision.errors import EnvironmentProblem
from medvision.evaluation import Decision
from medvision.inference import Engine, load_scorer
from medvision.io.archive import Entry, scan
from medvision.io.files import atomic_write
from medvision.runs import RunError, ScoringSpec, versions
from medvision.runtime import barrier, broadcast, gather, setup
from medvision.workers import Failure, PoolStats, isolated_map

log = logging.getLogger("medvision")
BASE_COLUMNS = ["path", "sop_instance_uid", "study_instance_uid", "series_instance_uid", "frame", "pred"]
#: Default ``--file-timeout``: seconds one file may take to read and preprocess in its worker.
FILE_TIMEOUT = 300.0

#: Modules the decode workers' forkserver imports once. A new worker (at the start, or in place of one a
#: decoder killed) re-runs the program's main module: for the CLI that imports all of medvision and timm,
#: 3.5 s a worker on 2 cores unless they are already loaded in the forkserver it is forked from (0.05 s).
WORKER_PRELOAD = ("medvision.data.intake", "medvision.tasks.score", "medvision.cli")

#: How long a rank waits for the others at the merge: ranks of one archive can finish hours apart.
RANK_TIMEOUT = datetime.timedelta(hours=72)

#: Exit codes of ``medvision score`` (documented in the README).
EXIT_OK, EXIT_MODEL, EXIT_FILE_ERRORS, EXIT_NO_IMAGES = 0, 2, 3, 4


def in_shard(rel: str, shard: tuple[int, int]) -> bool:
    """Deterministic, overlap-free split of files across ``n`` workers by a hash of the relative path."""
    i, n = shard
    return int(hashlib.sha1(rel.encode()).hexdigest()[:12], 16) % n == i


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` with 0 <= i < n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


# ---------------------------------------------------------------------------------- engines


# ------------------------------------------------------------------------------- the run


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
        """0: every image file scored; 3: some files are error rows; 4: no image file at all (nothing to score)."""
        if self.error_files:
            return EXIT_FILE_ERRORS
        return EXIT_OK if self.ok_files else EXIT_NO_IMAGES

    def line(self) -> str:
        return (
            f"{self.files_found} file(s) found: {self.ok_files} scored ({self.ok_images} {self.item}(s)), "
            f"{self.error_files} error(s), {self.skipped_files} skipped; {self.already_done} were already in "
            f"{self.out}; {self.images_now} {self.item}(s) in {self.seconds:.1f} s ({self.images_per_second:.1f} "
            f"{'img' if self.item == 'image' else self.item + 's'}/s)"
        )


def _resume(table: Path) -> set[str]:
    """Paths already finished in a previous output. A row cut short by a kill and the rows of the last
    file (it may have been cut between two of its frames) are removed, so that file is scored again."""
    if not table.is_file():
        return set()
    data = table.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    lines = keep.splitlines(keepends=True)
    if len(lines) > 1:
        last = next(csv.reader([lines[-1].decode()]))[0]
        while len(lines) > 1 and next(csv.reader([lines[-1].decode()]))[0] == last:
            lines.pop()
        keep = b"".join(lines)
    if keep != data:  # keep is a prefix of data
        with table.open("r+b") as fh:
            fh.truncate(len(keep))
    with table.open(newline="") as fh:
        return {row["path"] for row in csv.DictReader(fh) if row.get("path")}


def operating_calls(decision: Decision, level: str = "image") -> list[tuple[str, float]]:
    """(column name, threshold) of each operating point of ``level`` (``image``, or ``patient`` for slides)
    with a finite threshold."""
    calls = []
    for op in decision.points.get(level, []) if decision.positive is not None else []:
        name = "call_youden" if op["rule"] == "youden" else f"call_{op['rule']}_{op['target']:g}"
        if op["threshold"] is not None and np.isfinite(op["threshold"]):
            calls.append((name, float(op["threshold"])))
    return calls


class _Rows:
    """Formats a file's rows and appends them with one write and a flush, so finished files survive a kill."""

    def __init__(self, table: Path, spec: ScoringSpec, tags: list[str]) -> None:
        self.classes, self.tags = spec.classes, tags
        self.decision = Decision.from_json(spec.decision)
        self.calls = operating_calls(self.decision)
        self.columns = [*BASE_COLUMNS, *[f"prob_{c}" for c in self.classes], *[n for n, _ in self.calls], "status",
                        "reason", *[f"tag_{t}" for t in tags]]  # fmt: skip
        new = not table.is_file() or table.stat().st_size == 0
        table.parent.mkdir(parents=True, exist_ok=True)
        self.fh = table.open("a", newline="")
        if new:
            self.write([], header=True)

    def write(self, files: list[FileResult], header: bool = False) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf)
        if header:
            writer.writerow(self.columns)
        blank = [""] * (len(self.classes) + len(self.calls))
        for f in files:
            extra = [f.tags.get(t, "") for t in self.tags]
            if f.status != "ok":
                reason = " | ".join(line.strip() for line in f.reason.splitlines() if line.strip())  # one line a row
                writer.writerow([f.rel, *f.uids, "", "", *blank, f.status, reason, *extra])
                continue
            for frame, p in zip(f.frames, f.probs, strict=True):
                flags = [str(int(p[self.decision.positive] >= thr)) for _, thr in self.calls]
                writer.writerow([f.rel, *f.uids, frame, self.classes[int(p.argmax())], *[f"{v:.6f}" for v in p],
                                 *flags, "ok", "", *extra])  # fmt: skip
        self.fh.write(buf.getvalue())
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _outcomes(
    folder: Path, todo: list[Entry], cfg: ReadConfig, reader: Reader, workers: int, timeout: float, stats: PoolStats
) -> Iterator[FileResult]:
    """Each entry's result, in order: rows the scan already decided, and files read in the isolated pool."""
    candidates = [e.rel for e in todo if e.outcome == "candidate"]
    read = isolated_map(read_chunk, candidates, workers=workers, timeout=timeout,
                        initializer=init_worker, initargs=(str(folder), cfg, reader), preload=WORKER_PRELOAD,
                        stats=stats)  # fmt: skip
    for entry in todo:
        if entry.outcome != "candidate":
            yield FileResult(entry.rel, entry.outcome, entry.reason)
            continue
        rel, result = next(read)
        yield FileResult(rel, "error", result.reason) if isinstance(result, Failure) else result


def score_folder(
    folder: Path,
    model: Path,
    out: Path,
    include_tags: list[str] | None = None,
    shard: tuple[int, int] = (0, 1),
    batch_size: int | None = None,
    workers: int | None = None,
    engine: str = "torch",
    file_timeout: float = FILE_TIMEOUT,
    max_pixels: int = MAX_PIXELS,
    max_file_bytes: int = MAX_FILE_BYTES,
    reader: Reader = read_file,
) -> ScoreSummary:
    """Scores every image under ``folder`` with a run (or its ONNX export); see the module docstring.

    ``workers`` decode processes (default min(4, cores)); ``0`` decodes in this process, without crash
    isolation (for debugging). ``reader`` turns one file into a :class:`FileResult`; the default is
    :func:`read_file`.

    Examples:
        >>> score_folder(Path("/data/cr"), Path("runs/chest"), Path("scores.csv")).line()
    """
    start = time.perf_counter()
    d, _ = setup("auto", timeout=RANK_TIMEOUT)  # under torchrun: this rank's device, and the process group
    tags = list(include_tags or [])
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    cpu_threads = max(1, (os.cpu_count() or 1) - n_workers) if n_workers > 0 else None  # the workers keep their cores
    scorer, spec, provenance = load_scorer(model, engine, cpu_threads)
    parquet = out.suffix == ".parquet"
    merged = out.with_suffix(".partial.csv") if parquet else out
    entries = [e for e in scan(folder) if in_shard(e.rel, shard)]
    if d.world_size > 1:  # rank r of W scores the part of the user's shard i/n with hash % nW == i + n*r
        i, n = shard
        mine = [e for e in entries if in_shard(e.rel, (i + n * d.rank, n * d.world_size))]
        table = part_path(out, d.rank, d.world_size)
    else:
        mine, table = entries, merged
    done = _resume(table)
    todo = [e for e in mine if e.rel not in done]
    summary = ScoreSummary(already_done=len(done & {e.rel for e in mine}), shard=f"{shard[0]}/{shard[1]}",
                           out=str(out), engine=scorer.name)  # fmt: skip
    cfg = ReadConfig(spec, tuple(tags), max_pixels, max_file_bytes)
    stats = PoolStats()
    rows = _Rows(table, spec, tags)
    threads = torch.get_num_threads()
    if cpu_threads and scorer.name == "torch" and provenance["device"] == "cpu":
        torch.set_num_threads(cpu_threads)
    try:
        outcomes = _outcomes(folder, todo, cfg, reader, n_workers, file_timeout, stats)
        _score(outcomes, scorer, rows, batch_size or 16, summary, len(todo))
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
            provenance["world_size"] = d.world_size
        summary.seconds = time.perf_counter() - start
        summary.images_per_second = summary.images_now / summary.seconds if summary.seconds else 0.0
        _tally(merged, {e.rel for e in entries}, summary)
        if not summary.reconciled:
            log.warning("accounting mismatch: %d found, %d ok + %d error + %d skipped", summary.files_found,
                        summary.ok_files, summary.error_files, summary.skipped_files)  # fmt: skip
        if parquet:
            _to_parquet(merged, out)
        _write_provenance(out, spec, provenance, summary, tags, cfg, file_timeout)
    summary = broadcast(summary, d)
    barrier(d)  # no rank returns before the merged output is written
    return summary


def part_path(out: Path, rank: int, world_size: int) -> Path:
    """Rank ``rank``'s own output under torchrun: ``<out>.parts/rank<r>-of-<W>.csv``, kept for resume."""
    return Path(f"{out}.parts") / f"rank{rank}-of-{world_size}.csv"


def merge_parts(parts: list[Path], order: list[str], merged: Path) -> None:
    """The ranks' part files as one table, rows in the folder's order, written atomically over ``merged``.

    The parts hold disjoint files (hash shards), so nothing is duplicated; a file without rows in
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
    rows.sort(key=lambda t: (t[0], t[1]))  # the folder's order; a file's frames stay in their order

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header or [])
            writer.writerows(r for _, _, r in rows)

    atomic_write(merged, write)


def _score(outcomes: Iterator[FileResult], engine: Engine, rows: _Rows, batch_size: int, summary: ScoreSummary,
           n_files: int) -> None:  # fmt: skip
    """Batches the files' images through the engine and writes each file's rows once all its images are scored.

    Every batch holds exactly ``batch_size`` images (the last one is padded with zeros), so that an
    image's probabilities do not depend on which other files happened to share its batch.
    """
    pending: deque[FileResult] = deque()
    images: list[tuple[FileResult, np.ndarray]] = []

    def run(n: int) -> None:
        batch = np.stack([a for _, a in images[:n]])
        if n < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
        probs = engine.predict(batch)
        for (owner, _), p in zip(images[:n], probs, strict=False):
            owner.probs.append(p)
        del images[:n]
        summary.images_now += n

    def flush() -> None:
        ready = []
        while pending and len(pending[0].probs) == len(pending[0].frames):
            ready.append(pending.popleft())
        if ready:
            rows.write(ready)
            summary.scored_now += len(ready)

    with tqdm(total=n_files, desc="score", unit="file", dynamic_ncols=True, disable=None) as bar:
        for result in outcomes:
            pending.append(result)
            images.extend((result, a) for a in result.arrays)
            result.arrays = []
            while len(images) >= batch_size:
                run(batch_size)
            flush()
            bar.update(1)
        while images:
            run(min(batch_size, len(images)))
        flush()


def _tally(table: Path, found: set[str], summary: ScoreSummary) -> None:
    """Counts outcomes over the whole output (earlier, resumed parts too) for the entries found now."""
    status: dict[str, str] = {}
    images = 0
    with table.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["path"] in found:
                status[row["path"]] = row["status"]
                images += row["status"] == "ok"
    summary.files_found = len(found)
    summary.ok_images = images
    summary.ok_files = sum(s == "ok" for s in status.values())
    summary.error_files = sum(s == "error" for s in status.values())
    summary.skipped_files = sum(s == "skipped" for s in status.values())


def _to_parquet(table_path: Path, out: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
    except ImportError:
        raise EnvironmentProblem(
            f"Parquet output needs pyarrow (pip install pyarrow); the rows are in {table_path}"
        ) from None
    text = ("path", "sop_instance_uid", "study_instance_uid", "series_instance_uid", "pred", "status", "reason")
    string_columns = {c: pa.string() for c in text}
    table = pacsv.read_csv(table_path, convert_options=pacsv.ConvertOptions(column_types=string_columns))
    pq.write_table(table, out)


def _write_provenance(out: Path, spec: ScoringSpec, provenance: dict[str, Any], summary: ScoreSummary,
                      tags: list[str], cfg: ReadConfig, file_timeout: float) -> None:  # fmt: skip
    decision = Decision.from_json(spec.decision)
    record = {
        **provenance,
        "model_sha256": spec.model_sha256,
        "recipe_sha256": spec.recipe_sha256,
        "versions": versions(),
        "calibration_temperature": decision.temperature,
        "tta": spec.tta,
        "operating_points": decision.points.get("image", []),
        "included_identifying_tags": [t for t in tags if t in IDENTIFYING_TAGS],
        "included_tags": tags,
        "limits": {"max_pixels": cfg.max_pixels, "max_file_bytes": cfg.max_file_bytes, "file_timeout_s": file_timeout},
        **asdict(summary),
        "reconciled": summary.reconciled,
        "exit_code": summary.exit_code,
    }
    Path(str(out) + ".json").write_text(json.dumps(record, indent=2) + "\n")

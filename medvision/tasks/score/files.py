"""The file unit of scoring: a file gives frames, each frame a row (DICOM first; PNG/JPEG/TIFF/BMP).

Every entry under the folder (:func:`medvision.io.archive.scan`) is one outcome:

- ``ok``: one row per scored image (per frame of a multi-frame DICOM), with calibrated probabilities and a
  0/1 call at each of the run's operating points;
- ``error``: a file that should have been an image and could not be scored, with the reason (a damaged,
  truncated, empty or renamed DICOM; a decoder that raised, crashed or hung; a header that declares more
  pixels than ``--max-pixels``; a broken or looping link);
- ``skipped``: clearly not an input, with the reason (no DICM magic, not parseable and no DICOM suffix; a
  DICOM object without pixel data such as SR, RT plan or presentation state; a FIFO; a directory named
  like a file).

Files are read and preprocessed by :func:`medvision.data.intake.read_file` in worker processes that may
die (:mod:`medvision.workers`): a decoder that panics, segfaults, aborts or hangs costs the one file it was
reading. Every batch the engine sees has the same size (the last one is padded with zeros), so a file's
probabilities do not depend on which other files shared its batch. No patient identifiers are written
unless asked for: ``--include-tags`` adds DICOM tags, and ``--uids`` the SOP, Study and Series Instance UIDs,
which link a row to the patient's study in a PACS (DICOM PS3.15's confidentiality profile replaces them).
"""

from __future__ import annotations

import csv
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medvision.data.intake import IDENTIFYING_TAGS, FileResult, ReadConfig, Reader, init_worker, read_chunk
from medvision.errors import EnvironmentProblem
from medvision.evaluation import Decision
from medvision.inference import Engine
from medvision.io.archive import Entry, scan
from medvision.runs import ScoringSpec
from medvision.tasks.score.job import csv_line, isolated, one_line, operating_calls, prediction_cells
from medvision.workers import Failure, PoolStats

#: The columns every row starts with; ``UID_COLUMNS`` follow ``path`` only when asked for (``--uids``).
BASE_COLUMNS = ["path", "frame", "pred"]
UID_COLUMNS = ["sop_instance_uid", "study_instance_uid", "series_instance_uid"]


class FileUnit:
    """Files to frames to rows (see the module docstring)."""

    item = "image"
    operating_level = "image"

    def __init__(self, spec: ScoringSpec, engine: Engine, cfg: ReadConfig, reader: Reader, workers: int,
                 timeout: float, batch_size: int, parquet: bool, uids: bool = False) -> None:  # fmt: skip
        self.spec, self.engine, self.cfg, self.reader = spec, engine, cfg, reader
        self.workers, self.timeout, self.batch_size, self.parquet = workers, timeout, batch_size, parquet
        self.tags = list(cfg.tags)
        self.uids = uids
        self.decision = Decision.from_json(spec.decision)
        self.calls = operating_calls(self.decision)
        path, *rest = BASE_COLUMNS
        self.columns = [path, *(UID_COLUMNS if uids else []), *rest, *[f"prob_{c}" for c in spec.classes],
                        *[n for n, _ in self.calls], "status", "reason", *[f"tag_{t}" for t in self.tags]]  # fmt: skip

    def entries(self, folder: Path) -> list[Entry]:
        return scan(folder)

    def items(self, row: dict[str, str]) -> int:
        return int(row["status"] == "ok")

    def rows(self, f: FileResult) -> str:
        """A file's rows: one per frame when it was scored, else one with its status and reason."""
        extra = [f.tags.get(t, "") for t in self.tags]
        uids = list(f.uids) if self.uids else []
        if f.status != "ok" or not f.frames:  # an ok file with no frame would have no row: it is an error
            status, reason = (f.status, f.reason) if f.status != "ok" else ("error", f"{f.rel}: no frame was read")
            blank = [""] * (len(self.spec.classes) + len(self.calls))
            return csv_line([f.rel, *uids, "", "", *blank, status, one_line(reason), *extra])
        out = []
        for frame, p in zip(f.frames, f.probs, strict=True):
            cells = prediction_cells(p, self.spec.classes, self.decision.positive, self.calls)
            out.append([f.rel, *uids, frame, *cells, "ok", "", *extra])
        return csv_line(*out)

    def _outcomes(self, folder: Path, todo: list[Entry], stats: PoolStats) -> Iterator[FileResult]:
        """Each entry's result, in order: rows the scan already decided, and files read in the isolated pool."""
        for entry, result in isolated(folder, todo, read_chunk, stats, workers=self.workers, timeout=self.timeout,
                                      initializer=init_worker,
                                      initargs=(str(folder), self.cfg, self.reader)):  # fmt: skip
            if result is None:  # the scan's own verdict
                yield FileResult(entry.rel, "error" if entry.outcome == "error" else "skipped", entry.reason)
            else:
                yield FileResult(entry.rel, "error", result.reason) if isinstance(result, Failure) else result

    def score(self, folder: Path, todo: list[Entry], stats: PoolStats) -> Iterator[tuple[str, int]]:
        """Batches the files' images through the engine; a file's rows are yielded once all its images are scored."""
        engine = self.engine
        pending: deque[FileResult] = deque()
        images: list[tuple[FileResult, np.ndarray]] = []
        size = self.batch_size

        def run(n: int) -> None:
            batch = np.stack([a for _, a in images[:n]])
            if n < size:
                batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), batch.dtype)])
            for (owner, _), p in zip(images[:n], engine.predict(batch), strict=False):
                owner.probs.append(p)
            del images[:n]

        def ready() -> Iterator[tuple[str, int]]:
            while pending and len(pending[0].probs) == len(pending[0].frames):
                done = pending.popleft()
                yield self.rows(done), len(done.frames) if done.status == "ok" else 0  # no frame: an error row

        with tqdm(total=len(todo), desc="score", unit="file", dynamic_ncols=True, disable=None) as bar:
            for result in self._outcomes(folder, todo, stats):
                pending.append(result)
                images.extend((result, a) for a in result.arrays)
                result.arrays = []
                while len(images) >= size:
                    run(size)
                yield from ready()
                bar.update(1)
            while images:
                run(min(size, len(images)))
            yield from ready()

    def finish(self, out: Path, table: Path) -> None:
        if self.parquet:
            to_parquet(table, out)

    def owned(self) -> list[Path]:
        return []  # one table, appended to: no per-file outputs

    def provenance(self) -> dict[str, Any]:
        return {
            "included_identifying_tags": [t for t in self.tags if t in IDENTIFYING_TAGS],
            "included_tags": self.tags,
            "included_uids": self.uids,
            "limits": {"max_pixels": self.cfg.max_pixels, "max_file_bytes": self.cfg.max_file_bytes,
                       "file_timeout_s": self.timeout},
        }  # fmt: skip


def to_parquet(table_path: Path, out: Path) -> None:
    """The CSV table as Parquet, its text columns typed as strings."""
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
    except ImportError:
        raise EnvironmentProblem(
            f"Parquet output needs pyarrow (pip install pyarrow); the rows are in {table_path}"
        ) from None
    with table_path.open(newline="") as fh:
        header = next(csv.reader(fh), [])
    text = ("path", "sop_instance_uid", "study_instance_uid", "series_instance_uid", "pred", "status", "reason")
    # --include-tags values are text too: AccessionNumber 0004217 must not become the number 4217
    string_columns = {c: pa.string() for c in header if c in text or c.startswith("tag_")}
    table = pacsv.read_csv(table_path, convert_options=pacsv.ConvertOptions(column_types=string_columns))
    pq.write_table(table, out)

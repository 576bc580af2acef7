"""The slide unit of scoring: a whole slide gives tiles, the tiles give one row for the slide.

Every entry under the folder is one row:

- ``ok``: the slide's probabilities (its tiles aggregated as the run was evaluated: mean, max, top-k or
  the run's MIL head), a 0/1 call at each of the run's slide-level operating points, the number of tiles
  used, the tissue area in mm² and the MPP used (with where it came from);
- ``error``: a slide that cannot be read (unknown format, damaged file, no MPP, no tissue, a reader that
  raised, crashed or hung), with the reason;
- ``skipped``: not a slide (a file without a slide suffix), with the reason.

A slide is a file with a slide suffix (``.svs``, ``.ndpi``, ``.mrxs``, ``.tif``, ...) or a folder of DICOM
instances (a DICOM WSI series; not searched further). Opening a slide and finding its tissue run in an
isolated worker process (:mod:`medvision.workers`), so a reader that segfaults or hangs on one file costs
that slide only. Its tiles then join one stream of tile batches for the whole run (:meth:`SlideScan.stream`):
one pool of reader processes, started once, reads ahead across slide boundaries while the model works, so
a new slide's first batches are usually read before the model needs them. The batches are drawn by a thread
of their own, so a slide that is slow to open holds back nothing already read. A batch whose reader raises,
crashes or hangs (one timeout) costs its slide only: its other batches are not read. A reader hands its batch
back through a file in RAM that this process names and removes (``isolated_map(hand_off=True)``), not
through the pool's pipe. Beside a model on the CPU the readers read while it waits, not while it computes.
Tiles are preprocessed in the readers by :func:`medvision.data.intake.preprocess` (the same function as for
files) and scored by the engine, TTA and the MIL head's features included.

Besides the table: ``<out>.tiles.parquet`` (one row per tile: slide, level-0 x and y, tile side at level 0,
tissue fraction, probabilities), ``<out>.heatmaps/<slide>.png`` and ``<out>.geojson/<slide>.geojson``
(:class:`~medvision.tasks.score.outputs.SlideOutputs`; ``<slide>`` is the slide's path flattened, and of two
slides that flatten to one name the later is an error row naming both). A slide's files are written before its
row, its tile file last, and a slide that ends as an error row has them removed, so a row means the slide is
complete; the merged tile table holds the table's ok slides only. Nothing from the slides' metadata is written
but geometry and MPP: no Aperio ``Filename``/``User``, no DICOM patient tags.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from medvision.data.intake import preprocess
from medvision.evaluation import Decision
from medvision.handoff import HANDOFF_DIR
from medvision.inference import Engine
from medvision.io.archive import FILE_LIKE_DIRECTORY, Entry, Units, scan
from medvision.metrics import aggregate_by_group, softmax
from medvision.models.mil import MILHead
from medvision.models.mil_fit import load_mil, predict_mil
from medvision.models.slide_head import MIL_FILE
from medvision.recipe import SlidesConfig
from medvision.runs import RunError, ScoringSpec
from medvision.runtime import reuse_freed_memory
from medvision.tasks.score.job import csv_line, isolated, one_line, operating_calls, prediction_cells
from medvision.tasks.score.outputs import PlannedSlide, SlideOutputs, SlideTiles, attention_measure, tile_classes
from medvision.workers import Failure, PoolStats, isolated_map, wait_turn
from medvision.wsi.geojson import tissue_polygons
from medvision.wsi.slide import SLIDE_SUFFIXES, SlideError, is_dicom_slide_dir
from medvision.wsi.source import check_stain_reference, plan_slide, stain_transform
from medvision.wsi.tiles import SlideRef, TileReader, grid_from_json, grid_to_json, subsample

log = logging.getLogger("medvision")

#: Seconds one batch of a slide's tiles may take to be read (a slide's opening: ``--slide-timeout``).
TILE_BATCH_TIMEOUT = 300.0
THUMBNAIL = 1024
ABMIL_NEEDS_TORCH = "this run aggregates tiles with its ABMIL head, which needs tile features: use --engine torch"


def find_slides(folder: Path) -> list[Entry]:
    """Every entry, sorted: ``candidate`` slides, ``skipped`` others and ``error`` rows for what cannot be read.

    The walk is :func:`medvision.io.archive.scan`'s, with slides as its unit: links, loops, hidden names, FIFOs,
    folders that cannot be listed and second routes to a folder or a slide file (a link, a hard link) are its rows.
    A folder of DICOM instances is one slide, not searched further, and a MIRAX slide's data folder belongs to its
    ``.mrxs`` file. A folder named like a slide (``x.svs``) that is not a DICOM series is searched; with nothing in
    it, it is a skipped row.
    """
    if not folder.is_dir():
        raise RunError(f"{folder}: slides folder does not exist")
    root_is_series = _is_series(str(folder))  # once: it lists the folder and opens files

    def not_a_slide(rel: str) -> str:
        if root_is_series and "/" not in rel:
            return "the folder itself is one DICOM series; pass its parent folder"
        if rel.lower().endswith(SLIDE_SUFFIXES):
            return ""
        suffix = Path(rel).suffix or "none"
        return f"not a slide (suffix {suffix!r}; expected one of {', '.join(SLIDE_SUFFIXES)} or a DICOM series folder)"

    found = scan(folder, Units(file=not_a_slide, whole=_is_series, parts=_mirax_data, file_like=SLIDE_SUFFIXES))
    holding = {rel for e in found for rel in _folders_above(e.rel)}
    out = []
    for e in found:  # a folder named like a slide is a row only when nothing came of searching it
        if e.reason == FILE_LIKE_DIRECTORY and e.rel not in holding:
            why = "a folder named like a slide, but not a DICOM series and with nothing in it (searched)"
            out.append(Entry(e.rel, "skipped", why))
        elif e.reason != FILE_LIKE_DIRECTORY:
            out.append(e)
    return sorted(out, key=lambda e: e.rel)


def _is_series(path: str) -> bool:
    """A DICOM WSI series folder; one that cannot be listed is not, and the walk makes it an error row."""
    try:
        return is_dicom_slide_dir(Path(path))
    except OSError:
        return False


def _mirax_data(names: list[str]) -> set[str]:
    """The data folders of the MIRAX slides among ``names`` (``x.mrxs`` keeps its tiles in ``x/``)."""
    return {n[: -len(".mrxs")] for n in names if n.lower().endswith(".mrxs")}


def _folders_above(rel: str) -> Iterator[str]:
    """``a/b/c`` -> ``a``, ``a/b``."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


_PLAN: dict[str, Any] = {}


def _init_planner(root: str, slides: dict[str, Any], drawn: bool) -> None:
    if multiprocessing.parent_process() is not None:  # a worker, not the in-process (workers=0) path
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
    _PLAN.update(root=Path(root), cfg=SlidesConfig.model_validate(slides), drawn=drawn)


def _plan_chunk(rels: list[str]) -> list[dict[str, Any] | str]:
    """Opens each slide and finds its tissue (and, for a unit that draws the slide, its thumbnail and tissue
    contours); an error of any kind is that slide's reason, as a string."""
    out: list[dict[str, Any] | str] = []
    for rel in rels:
        try:
            slide, grid = plan_slide(_PLAN["root"] / rel, _PLAN["cfg"])
            try:
                drawn = _PLAN["drawn"]
                thumb = slide.thumbnail(THUMBNAIL) if drawn else None
                tissue = []
                if drawn and grid.mask is not None:  # the mask's own x and y scales (its sides are rounded apart)
                    tissue = tissue_polygons(grid.mask, grid.mask_scales)
                info = {"grid": grid_to_json(grid), "thumbnail": thumb, "size0": slide.level_dimensions[0],
                        "mpp_source": slide.mpp_source, "tissue": tissue}  # fmt: skip
            finally:
                slide.close()
            out.append(info)
        except KeyboardInterrupt:
            raise
        except SlideError as err:
            out.append(str(err).replace(str(_PLAN["root"] / rel), rel))
        except BaseException as err:
            out.append(f"{rel}: slide reader failed ({type(err).__name__}: {err})")
    return out


def planned_slides(folder: Path, todo: list[Entry], cfg: SlidesConfig, stats: PoolStats, workers: int,
                   timeout: float, drawn: bool = True) -> Iterator[PlannedSlide]:  # fmt: skip
    """Each entry of ``todo`` in order, opened and its tissue found in the crash-isolated pool (at most two
    processes: tissue detection is light next to the tiles' model). ``drawn``: also the thumbnail and the
    tissue contours, for the heatmap and the GeoJSON."""
    initargs = (str(folder), cfg.model_dump(mode="json"), drawn)
    for entry, result in isolated(folder, todo, _plan_chunk, stats, workers=min(workers, 2), timeout=timeout,
                                  chunk=1, initializer=_init_planner, initargs=initargs):  # fmt: skip
        rel = entry.rel
        if result is None:
            yield PlannedSlide(rel, entry.outcome, entry.reason)
        elif isinstance(result, Failure):
            yield PlannedSlide(rel, "error", f"{rel}: {result.reason}")
        elif isinstance(result, str):
            yield PlannedSlide(rel, "error", result)
        else:
            yield PlannedSlide(rel, "ok", info=result)


@dataclass
class TileJob:
    """One batch of a slide's tiles for the reader pool: the level-0 ``coords`` to read with ``reader`` (which
    holds the slide, not its tiles: a job pickles a few hundred bytes). ``key`` is the slide's place in the run's
    stream; ``last`` ends the slide. A job without a reader (:meth:`empty`) ends a slide with nothing (more) to read."""

    key: int
    reader: TileReader | None
    coords: np.ndarray
    last: bool

    @classmethod
    def empty(cls, key: int) -> TileJob:
        return cls(key, None, np.zeros((0, 2), np.int64), True)


_READ: dict[str, Any] = {}


def _init_reader(prepare: Callable[[np.ndarray], np.ndarray] | None) -> None:
    if multiprocessing.parent_process() is not None:  # a worker, not the in-process (workers=0) path
        torch.set_num_threads(1)  # one core a reader: the model's threads have the others
        cv2.setNumThreads(1)
        reuse_freed_memory()  # a tile's kernel time: 0.16-0.23 -> 0.05 ms (benchmarks/RESULTS.md)
    _close_readers()
    _READ.update(prepare=prepare, open={})


def _close_readers() -> None:
    for reader in _READ.get("open", {}).values():
        reader.close()
    _READ["open"] = {}


def _read_batches(jobs: list[TileJob]) -> list[np.ndarray | str | None]:
    """Each job's tiles, prepared and stacked; a reader that raised gives its reason instead, whatever it raised
    (a Rust decoder's ``PanicException`` is a ``BaseException``): the batch's slide is lost, not the run. A worker
    keeps the slides of its last two keys open (a slide's batches come in a row), closing older ones."""
    out: list[np.ndarray | str | None] = []
    prepare, readers = _READ["prepare"], _READ["open"]
    for job in jobs:
        if job.reader is None:
            out.append(None)
            continue
        reader = readers.setdefault(job.key, job.reader)
        for key in [k for k in readers if k < job.key - 1]:
            readers.pop(key).close()
        try:
            tiles = []
            for x, y in job.coords:
                wait_turn()  # a model on these cores computes: read while it waits (SlideScan.turns)
                tiles.append(reader.read_at(0, int(x), int(y)))
            out.append(np.stack(tiles if prepare is None else [prepare(t) for t in tiles]))
        except (KeyboardInterrupt, SystemExit):  # the worker is being stopped
            raise
        except BaseException as err:
            text = f"{type(err).__name__}: {err}"
            for slide in getattr(reader, "slides", None) or []:  # the row names the slide: not the folders above it
                text = text.replace(f"{Path(slide.path).parent}/", "")
            out.append(text)
    return out


class TileReadError(Exception):
    """A batch of a slide's tiles could not be read (its reader raised, crashed or hung)."""


class SlideBatches:
    """One slide's tile batches, in order, from the run's stream; iterating past a batch that could not be read
    raises :class:`TileReadError` and adds the slide's key to ``failed`` (the stream then reads no more of it).
    :meth:`drain` skips what the unit did not take and returns the next slide's first result."""

    def __init__(self, head: tuple[TileJob, Any], results: Iterator[tuple[TileJob, Any]], failed: set[int]) -> None:
        self.head: tuple[TileJob, Any] | None = head
        self.results, self.failed, self.done = results, failed, False

    def _next(self) -> tuple[TileJob, Any]:
        result = self.head if self.head is not None else next(self.results, None)
        if result is None:
            raise RuntimeError("the tile stream ended before the slide's last batch")
        self.head, self.done = None, result[0].last
        return result

    def __iter__(self) -> Iterator[np.ndarray]:
        while not self.done:
            job, value = self._next()
            if isinstance(value, Failure | str):
                self.failed.add(job.key)
                raise TileReadError(value.reason if isinstance(value, Failure) else value)
            if value is not None:
                yield value

    def drain(self) -> tuple[TileJob, Any] | None:
        while not self.done:
            self._next()
        return next(self.results, None)


class SlideScan:
    """What every slide unit shares (scoring, feature extraction): the scan, planning in the isolated pool, the
    kept tiles, the run's one stream of tile batches, and a row a slide whatever happens to it. A unit sets
    ``batch_size`` and ``prepare`` (what a reader makes of a tile; None: the tile as read,
    RGB uint8 (H, W, 3), for an encoder that does its own resize and normalisation) and adds
    :meth:`process` (what it makes of a slide's batches) and :meth:`row`."""

    item = "tile"
    operating_level = "patient"  # the slide level's points, chosen on validation slides
    drawn = True  # the unit draws each slide (heatmap over its thumbnail, tissue contours for QuPath)
    columns: list[str]
    batch_size: int
    outputs: SlideOutputs | None = None
    """The files a unit writes per slide besides its row (scoring units); removed when a slide ends an error."""

    def __init__(self, cfg: SlidesConfig, workers: int, timeout: float, turns: bool = False) -> None:
        """``turns``: the readers take turns with a model on this machine's CPU (``isolated_map(turns=True)``):
        they read while it waits for a batch, not while it computes."""
        self.cfg, self.workers, self.timeout, self.turns = cfg, workers, timeout, turns
        self.stain = stain_transform(cfg)  # fitted once, to the reference tile
        self.prepare: Callable[[np.ndarray], np.ndarray] | None = None

    def entries(self, folder: Path) -> list[Entry]:
        """The scan's entries; for a unit that writes files per slide, a slide whose files would have another
        slide's name made an error entry (:meth:`SlideOutputs.unique`)."""
        found = find_slides(folder)
        return found if self.outputs is None else self.outputs.unique(found)

    def items(self, row: dict[str, str]) -> int:
        return int(row["tiles"] or 0) if row["status"] == "ok" else 0

    def score(self, folder: Path, todo: list[Entry], stats: PoolStats) -> Iterator[tuple[str, int]]:
        stream = self.stream(folder, todo, stats)
        for item, tiles, batches in tqdm(stream, total=len(todo), desc="slides", unit="slide", disable=None):
            start = time.perf_counter()
            if item.status == "ok" and tiles is not None:
                try:
                    self.process(item, tiles, batches)
                except TileReadError as err:
                    item.status, item.reason = "error", f"{item.rel}: tiles could not be read ({err})"
                except Exception as err:
                    item.status, item.reason = "error", f"{item.rel}: failed ({type(err).__name__}: {err})"
            if item.status == "error" and self.outputs is not None:
                self.outputs.discard(item.rel)  # with those a run killed before this slide's row left behind
            n = int(item.info["n_tiles"]) if item.status == "ok" and item.info else 0
            yield self.row(item, time.perf_counter() - start), n

    def stream(self, folder: Path, todo: list[Entry],
               stats: PoolStats) -> Iterator[tuple[PlannedSlide, SlideTiles | None, SlideBatches]]:  # fmt: skip
        """Each entry of ``todo`` in order, planned, with its kept tiles (None: nothing to read) and its batches.

        Every slide's batches go through one pool of ``workers`` reader processes for the whole run (each batch
        at most ``TILE_BATCH_TIMEOUT`` s; ``workers=0`` reads in this process, without isolation). The pool
        works ahead across slides, so the next slide's first batches are read while this one's last are used.
        After a batch that could not be read, the slide's other batches are not read, and those already handed to a
        reader are cancelled (a hung one costs its slide one timeout, not one a batch).
        """
        opened: deque[tuple[int, PlannedSlide, SlideTiles | None]] = deque()
        failed: set[int] = set()
        lost = PoolStats()

        def jobs() -> Iterator[TileJob]:
            planned = planned_slides(folder, todo, self.cfg, stats, self.workers, self.timeout, self.drawn)
            for key, item in enumerate(planned):
                tiles = None
                if item.status == "ok":
                    try:
                        tiles = self.tiles(folder, item)
                    except Exception as err:  # a grid that cannot be used: this slide's row says so
                        item.status, item.reason = "error", f"{item.rel}: failed ({type(err).__name__}: {err})"
                opened.append((key, item, tiles))
                ended = False
                for start in range(0, len(tiles.coords) if tiles is not None else 0, self.batch_size):
                    assert tiles is not None
                    if key in failed:
                        break
                    batch = tiles.coords[start : start + self.batch_size]
                    ended = start + len(batch) == len(tiles.coords)
                    yield TileJob(key, tiles.reader, batch, ended)
                if not ended:
                    yield TileJob.empty(key)  # nothing to read, or nothing more after a failed batch

        # batches come back through RAM, not the pool's pipe (benchmarks/tile_handoff.py)
        results = isolated_map(_read_batches, jobs(), workers=self.workers, timeout=TILE_BATCH_TIMEOUT, chunk=1,
                               initializer=_init_reader, initargs=(self.prepare,), stats=lost,
                               skip=lambda job: job.key in failed and job.reader is not None,
                               hand_off=True, turns=self.turns)  # fmt: skip
        try:
            head = next(results, None)
            while head is not None:
                key, item, tiles = opened.popleft()
                assert head[0].key == key, (head[0].key, key)
                batches = SlideBatches(head, results, failed)
                yield item, tiles, batches
                head = batches.drain()
        finally:
            results.close()  # the readers stopped at once when the run ends early, and their files removed
            _close_readers()  # workers=0: the slides read in this process
            stats.add(lost)  # the run's counts (<out>.json) hold the readers' crashes and timeouts too
            if lost.lost_chunks:
                log.warning("%d tile batch(es) lost to a reader that crashed or hung (%d crashed, %d timed out); "
                            "their slides are error rows", lost.lost_chunks, lost.crashed_files,
                            lost.timed_out_files)  # fmt: skip
            if lost.piped:  # slower, nothing lost: say so, it is a machine's setting to fix
                log.warning("%d of %d tile batches came back through the reader pool's pipe, not through RAM: "
                            "slower. The readers could not write this process's memory files (no memfd, or no "
                            "access to its /proc), nor files in %s (no room there; Docker: --shm-size)", lost.piped,
                            lost.piped + lost.handed_off, HANDOFF_DIR)  # fmt: skip

    def tiles(self, folder: Path, item: PlannedSlide) -> SlideTiles | None:
        """The slide's kept tiles (``data.slides.max_tiles_per_slide``) and their reader; None, with the slide
        marked an error, when no tile has enough tissue."""
        assert item.info is not None
        cfg = self.cfg
        grid = grid_from_json(item.info["grid"])
        keep = subsample(grid.coords, cfg.max_tiles_per_slide, item.rel)
        coords, tissue = grid.coords[keep], grid.tissue[keep]
        item.info.update(n_tiles=len(coords), tissue_mm2=grid.tissue_area_mm2, mpp=grid.mpp, level=grid.level)
        if len(coords) == 0:
            item.status = "error"
            item.reason = (f"{item.rel}: no tile with at least {cfg.min_tissue:.0%} tissue at {cfg.target_mpp} "
                           f"µm/px (tissue area {grid.tissue_area_mm2:.2f} mm²)")  # fmt: skip
            return None
        ref = SlideRef(path=str(folder / item.rel), mpp=cfg.mpp, level=grid.level, read_size=grid.read_size)
        # the slide only: each job of the tile stream carries its coordinates
        reader = TileReader([ref], np.zeros(0, np.int64), np.zeros((0, 2), np.int64), cfg.tile_size, cfg.backend,
                            transform=self.stain, jpeg_shrink=cfg.jpeg_shrink)  # fmt: skip
        return SlideTiles(grid, coords, tissue, reader)

    def process(self, item: PlannedSlide, tiles: SlideTiles, batches: SlideBatches) -> None:
        """What the unit makes of one slide's tile batches (may mark it an error)."""
        raise NotImplementedError

    def row(self, item: PlannedSlide, seconds: float) -> str:
        """The slide's row, ok or not."""
        raise NotImplementedError

    def finish(self, out: Path, table: Path) -> None:
        """Nothing beyond the rows, unless the unit says otherwise."""

    def owned(self) -> list[Path]:
        """The per-slide output folders (:meth:`SlideOutputs.folders`), when the unit writes them."""
        return [] if self.outputs is None else self.outputs.folders()


class SlideUnit(SlideScan):
    """Slides to tiles to one row a slide (see the module docstring)."""

    outputs: SlideOutputs

    def __init__(self, spec: ScoringSpec, model: Path, engine: Engine, out: Path, workers: int, timeout: float,
                 batch_size: int, heatmaps: bool) -> None:  # fmt: skip
        if spec.aggregate == "abmil" and engine.name != "torch":
            raise RunError(
                "this run aggregates tiles with its ABMIL head, which needs tile features: use --engine torch"
            )
        if spec.inputs != "slides":
            raise RunError(f"{model}: this run was not trained on slides (data.source {spec.inputs}); "
                           "use score on images")  # fmt: skip
        slides = SlidesConfig.recorded(spec.slides)
        check_stain_reference(model, slides, spec.stain_reference_sha256)  # before the normaliser is fitted to it
        super().__init__(slides, workers, timeout, turns=engine.on_cpu)
        self.spec, self.engine, self.batch_size = spec, engine, batch_size
        self.prepare = partial(preprocess, spec=spec)  # in the readers, as the run's evaluation tiles were made
        self.decision = Decision.from_json(spec.decision)
        self.calls = operating_calls(self.decision, self.operating_level)
        self.head = _mil_head(model, spec)
        self.outputs = SlideOutputs(out, heatmaps, run=spec.model_sha256 or str(model.resolve()), classes=spec.classes)
        self.columns = ["path", "status", "reason", "pred", *[f"prob_{c}" for c in spec.classes],
                        *[n for n, _ in self.calls], "tiles", "tissue_mm2", "mpp", "mpp_source", "target_mpp",
                        "level"]  # fmt: skip

    def process(self, item: PlannedSlide, tiles: SlideTiles, batches: SlideBatches) -> None:
        """Scores the slide's tiles, aggregates, and writes its tile table and heatmap."""
        assert item.info is not None
        spec, size, engine = self.spec, self.batch_size, self.engine
        coords = tiles.coords
        probs, feats = [], []
        for x in batches:
            n = len(x)
            if n < size:  # fixed batch shape: a tile's probability does not depend on its batch mates
                x = np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])
            if self.head is not None:
                p, f = engine.predict_with_features(x)
                feats.append(f[:n])
            else:
                p = engine.predict(x)
            probs.append(p[:n])
        tile_probs = np.concatenate(probs).astype(np.float64)
        measurements = {f"prob_{c}": tile_probs[:, j] for j, c in enumerate(spec.classes)}
        if self.head is not None:
            logits, attention = predict_mil(self.head, [np.concatenate(feats)])
            slide_p = softmax(logits)[0]
            measurements["attention"] = attention_measure(attention[0])
        else:  # aggregated as the run was evaluated: for its positive class
            one_slide = (["s"] * len(tile_probs), np.zeros(len(tile_probs), np.int64), tile_probs)
            _, _, agg, _ = aggregate_by_group(*one_slide, spec.aggregate, spec.top_k, self.decision.positive)
            slide_p = agg[0]
        item.probs = slide_p
        k = self.decision.positive if self.decision.positive is not None else (1 if len(spec.classes) > 1 else 0)
        title = f"{item.rel}: P({spec.classes[k]}) = {slide_p[k]:.3f} ({spec.aggregate}, {len(coords)} tiles)"
        heat = (measurements["attention"], "ABMIL attention (÷ the slide's max)") if self.head is not None else \
            (tile_probs[:, k], f"tile P({spec.classes[k]})")  # fmt: skip
        self.outputs.write(item, tiles, measurements, tile_classes(tile_probs, spec.classes), heat, title)

    def row(self, item: PlannedSlide, seconds: float) -> str:
        blank = [""] * (len(self.spec.classes) + len(self.calls))
        target = self.cfg.target_mpp
        if item.status != "ok" or item.probs is None or item.info is None:
            return csv_line([item.rel, item.status, one_line(item.reason), "", *blank, "", "", "", "", target, ""])
        info, cells = item.info, prediction_cells(item.probs, self.spec.classes, self.decision.positive, self.calls)
        return csv_line([item.rel, "ok", "", *cells, info["n_tiles"], f"{info['tissue_mm2']:.3f}",
                         f"{info['mpp']:.6g}", info["mpp_source"], target, info["level"]])  # fmt: skip

    def finish(self, out: Path, table: Path) -> None:
        self.outputs.finish(out, table)

    def provenance(self) -> dict[str, Any]:
        return {"aggregate": self.spec.aggregate, "slides": self.spec.slides}


def _mil_head(model: Path, spec: ScoringSpec) -> MILHead | None:
    if spec.aggregate != "abmil":
        return None
    if not (model / MIL_FILE).is_file():
        raise RunError(f"{model}: evaluation.patient_aggregate is abmil but {MIL_FILE} is missing")
    try:
        return load_mil(model / MIL_FILE, len(spec.classes))[0]
    except ValueError as err:
        raise RunError(f"{model}: {err}") from None

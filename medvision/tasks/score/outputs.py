"""A slide as the scan plans it, its kept tiles, and the files scoring writes for it besides its row.

Every per-slide file is named by the slide's relative path, flattened (:func:`~medvision.wsi.features.flat_name`,
the naming ``medvision features`` uses too), and :func:`unique_names` gives both commands one rule for two paths
that flatten to one name: the later slide is an error row naming both.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvision.io.archive import Entry
from medvision.io.files import atomic_write
from medvision.wsi.features import flat_name
from medvision.wsi.geojson import palette_colors, slide_geojson, write_geojson
from medvision.wsi.heatmap import plot_heatmap, probability_grid
from medvision.wsi.tiles import TileGrid, TileReader, image_scales

log = logging.getLogger("medvision")


@dataclass
class PlannedSlide:
    """A slide entry after planning: ``ok`` with its tile grid and thumbnail in ``info``, or an error or skip."""

    rel: str
    status: str
    reason: str = ""
    probs: np.ndarray | None = None
    info: dict[str, Any] | None = None


@dataclass
class SlideTiles:
    """A planned slide's kept tiles and the reader of their pixels (:meth:`TileReader.read_at`)."""

    grid: TileGrid
    coords: np.ndarray
    tissue: np.ndarray
    reader: TileReader


def ok_rows(table: Path) -> list[dict[str, str]]:
    """The ``ok`` rows of an output table (none when it does not exist yet), in its order."""
    if not table.is_file():
        return []
    with table.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return [r for r in csv.DictReader(fh) if r.get("status") == "ok"]


def finished_rows(table: Path) -> list[dict[str, str]]:
    """The ``ok`` rows of an output table and of its ranks' parts (``<table>.parts/*.csv``, what an interrupted
    torchrun run finished before they were merged): every slide whose per-slide files a run into this output has
    already written, which a new slide may not take the name of."""
    rows = {r["path"]: r for r in ok_rows(table)}
    for part in sorted(Path(f"{table}.parts").glob("*.csv")):
        rows.update({r["path"]: r for r in ok_rows(part) if r["path"] not in rows})
    return list(rows.values())


def unique_names(entries: list[Entry], indexed: dict[str, str], name: Callable[[str], str],
                 what: str) -> tuple[list[Entry], dict[str, str]]:  # fmt: skip
    """``entries`` with each candidate slide whose per-slide file name (``name(rel)``) is already another slide's
    made an error entry naming both, and the slide that owns each name.

    ``indexed``: the name of each slide already finished in the table (its ``ok`` rows), which keeps it (so a
    resumed run finds its files); the scan's slides then claim names in order, so the later of two is the error.
    ``what``: what the name is of, for the reason (e.g. ``feature file``)."""
    owner = {file: rel for rel, file in indexed.items()}
    out = []
    for entry in entries:
        if entry.outcome == "candidate":
            file = indexed.get(entry.rel) or name(entry.rel)
            first = owner.setdefault(file, entry.rel)
            if first != entry.rel:
                why = (f"{entry.rel}: its {what} {file} is already that of slide {first} (both paths flatten to "
                       "that name); rename one of them")  # fmt: skip
                entry = Entry(entry.rel, "error", why, entry.size)
        out.append(entry)
    return out, owner


class SlideOutputs:
    """What scoring writes per slide besides its row, before the row (so a row means the slide is complete):

    - ``<out>.geojson/<slide>.geojson``: for QuPath (File > Import objects, or drag and drop onto the slide): the
      tissue outline as locked annotations and the tiles as detections carrying their measurements
      (:mod:`medvision.wsi.geojson`), in level-0 pixels; tile classes keep one colour across slides (the run's
      class list), and feature ids are keyed by the run and the output, so two runs' files for one slide
      import side by side;
    - ``<out>.heatmaps/<slide>.png``: the map over the slide's thumbnail;
    - ``<out>.tiles/<slide>.parquet``: one row per tile (slide, level-0 x and y, tile side at level 0, tissue
      fraction, and the tile's measurements: class probabilities, MIL attention), merged into
      ``<out>.tiles.parquet`` at the end (the table's ok slides only, in its order). Written last, and removed
      with the others by :meth:`discard` when the slide ends as an error, so only complete slides are merged.

    ``<slide>`` is the slide's path flattened (:func:`~medvision.wsi.features.flat_name`); of two slides that
    flatten to one name the later is an error row (:meth:`unique`), which leaves the first one's files alone.
    ``run``: what identifies the scoring run in the feature ids (e.g. the model's SHA-256), beside the output's
    path. ``classes``: the run's classes, in order, that tiles are classified into (their colours).
    """

    def __init__(self, out: Path, heatmaps: bool, run: str = "", classes: Sequence[str] | None = None) -> None:
        self.out = Path(out)
        self.tiles_dir = Path(f"{out}.tiles")
        self.heat_dir = Path(f"{out}.heatmaps") if heatmaps else None
        self.geo_dir = Path(f"{out}.geojson")
        self.run_id = json.dumps([run, str(self.out.resolve())])
        self.colors = palette_colors(classes) if classes is not None else None
        self.owners: dict[str, str] = {}

    def folders(self) -> list[Path]:
        """The folders of the per-slide files: this output's alone (named after it)."""
        return [d for d in (self.tiles_dir, self.heat_dir, self.geo_dir) if d is not None]

    def unique(self, entries: list[Entry]) -> list[Entry]:
        """``entries`` with each slide whose files would have another slide's name made an error entry
        (:func:`unique_names`; the slides already ok in ``<out>`` or its ranks' parts keep theirs)."""
        indexed = {r["path"]: flat_name(r["path"]) for r in finished_rows(self.out)}
        entries, self.owners = unique_names(entries, indexed, flat_name, "output files' name")
        return entries

    def paths(self, rel: str) -> list[Path]:
        """The slide's files, in the order they are written."""
        heat = [self.heat_dir / flat_name(rel, ".png")] if self.heat_dir is not None else []
        return [self.geo_dir / flat_name(rel, ".geojson"), *heat, self.tiles_dir / flat_name(rel, ".parquet")]

    def write(self, item: PlannedSlide, tiles: SlideTiles, measurements: dict[str, np.ndarray],
              classification: Sequence[str | None] | None, heat: tuple[np.ndarray, str],
              title: str) -> None:  # fmt: skip
        """``heat``: the values drawn (0-1) and the colour bar's label. A NaN measurement stays NaN in the tile
        table and is left out of that tile's GeoJSON measurements (QuPath reads a missing one as NaN); a tile
        whose class is None (:func:`tile_classes`: its probabilities are not numbers) is left unclassified."""
        assert item.info is not None
        geo, *heat_path, table = self.paths(item.rel)
        collection = slide_geojson(item.info.get("tissue", []), tiles.coords, tiles.grid.side0,
                                   {k: np.asarray(v, np.float64) for k, v in measurements.items()}, classification,
                                   slide_id=item.rel, class_colors=self.colors, run_id=self.run_id)  # fmt: skip
        write_geojson(geo, collection)
        if heat_path:
            thumb, size0 = item.info["thumbnail"], tuple(item.info["size0"])
            grid = probability_grid(tiles.coords, heat[0], tiles.grid.side0, size0, image_scales(thumb, size0))
            plot_heatmap(heat_path[0], thumb, grid, title, heat[1])
        write_tiles(table, item.rel, tiles.coords, tiles.grid.side0, tiles.tissue, measurements)

    def discard(self, rel: str) -> None:
        """Removes whatever of the slide's files exist: the slide ends as an error row. A slide whose name is
        another slide's (:meth:`unique`) has none: those files are the other slide's, and stay."""
        if self.owners.get(flat_name(rel), rel) != rel:
            return
        for path in self.paths(rel):
            try:
                path.unlink(missing_ok=True)
            except OSError as err:  # e.g. a folder in the file's place: the slide's reason says why
                log.warning("%s: could not remove %s of a failed slide (%s)", rel, path, err)

    def finish(self, out: Path, table: Path) -> None:
        """``<out>.tiles.parquet``: the tile files of ``table``'s ok slides, in its order. Files in ``<out>.tiles/``
        of slides the table does not hold (an earlier job's, after its table was deleted) are left out."""
        merge_tiles(Path(f"{out}.tiles.parquet"), [(r["path"], self.paths(r["path"])[-1]) for r in ok_rows(table)])


def attention_measure(attention: np.ndarray) -> np.ndarray:
    """MIL attention relative to the slide's most attended tile (0-1), so slides of any size read alike: divided by
    the largest finite value, so one NaN tile (a head that overflowed) stays NaN and leaves the others scaled.
    All NaN stays NaN."""
    values = np.asarray(attention, np.float64)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if len(finite) else 0.0
    return values / top if top > 0 else values


def tile_classes(probs: np.ndarray, classes: Sequence[str]) -> list[str | None]:
    """Each tile's most probable class, for its GeoJSON classification; None (unclassified) for a tile whose
    probabilities are not all finite numbers: the argmax of a NaN row would name ``classes[0]``."""
    finite = np.isfinite(probs).all(axis=1)
    return [classes[int(k)] if ok else None for k, ok in zip(np.argmax(probs, axis=1), finite, strict=True)]


def write_tiles(path: Path, rel: str, coords: np.ndarray, side0: float, tissue: np.ndarray,
                measurements: dict[str, np.ndarray]) -> None:  # fmt: skip
    """One slide's tile table (see :class:`SlideOutputs`), written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"slide": pa.array([rel] * len(coords), pa.string()), "x": pa.array(coords[:, 0], pa.int64()),
            "y": pa.array(coords[:, 1], pa.int64()), "side_level0": pa.array(np.full(len(coords), side0), pa.float64()),
            "tissue": pa.array(tissue, pa.float32())}  # fmt: skip
    for name, values in measurements.items():
        cols[name] = pa.array(np.asarray(values, np.float32), pa.float32())
    atomic_write(path, lambda tmp: pq.write_table(pa.table(cols), tmp))


def merge_tiles(merged: Path, parts: list[tuple[str, Path]]) -> None:
    """The given slides' tile tables as one file, in the given order (the per-slide files stay, for resume). A slide
    whose file is missing is left out with a warning naming it; with no slide at all, a merged file of an earlier
    job is removed rather than left to pass for this one's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for rel, path in parts:
        if path.is_file():
            tables.append(pq.read_table(path))
        else:
            log.warning("%s: an ok row, but its tile table %s is missing: left out of %s", rel, path, merged)
    if not tables:
        merged.unlink(missing_ok=True)
        return
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowInvalid as err:
        raise ValueError(f"{merged}: the slides' tile tables ({parts[0][1].parent}) differ in their columns; "
                         f"expected one set ({err})") from None  # fmt: skip
    atomic_write(merged, lambda tmp: pq.write_table(table, tmp))

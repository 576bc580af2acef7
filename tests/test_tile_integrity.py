"""A damaged JPEG tile inside a slide is that slide's error row, never a silently wrong embedding.

libjpeg only warns (on stderr) about corrupt entropy-coded data and returns an image (OpenCV, PIL and tifffile pass
such a tile on); the tile reader decodes with simplejpeg in its strict mode, where the warning is an error."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openslide")

from medvision.cli import main
from medvision.wsi.features import feature_name, read_features
from medvision.wsi.slide import open_slide
from medvision.wsi.synthetic import build_slide_set
from medvision.wsi.tiles import TiffLevelTiles, TileSpec, plan_tiles

ENCODER = "timm:tf_efficientnet_lite0"
ARGS = ["--tile-size", "112", "--target-mpp", "1.0", "--workers", "1"]


@pytest.fixture(scope="module")
def slide(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``slide_000.svs`` of a one-slide synthetic cohort (Aperio, YCbCr JPEG tiles of 256 px, 0.5 µm/px)."""
    root = tmp_path_factory.mktemp("integrity")
    build_slide_set(shared / "data" / "he_tiles", root, n_slides=1, size=(1536, 1152), mpp=0.5, seed=3)
    return root / "slide_000.svs"


def _damage(slide: Path, out: Path) -> tuple[int, int]:
    """A copy of ``slide`` with 64 random bytes (one of them a stray marker) in the middle of the JPEG tile under
    its first tissue tile, at the level that tile is read from; returns (level, tile index)."""
    with open_slide(slide) as s:
        grid = plan_tiles(s, TileSpec(tile_size=112, target_mpp=1.0))
        size, down = s.level_dimensions[grid.level], s.level_downsamples[grid.level]
    fast = TiffLevelTiles.open(str(slide), size)
    assert fast is not None
    x, y = (round(v / down) for v in grid.coords[0])
    index = (y // fast.th) * fast.across + x // fast.tw
    start, count = int(fast.page.dataoffsets[index]), int(fast.page.databytecounts[index])
    fast.close()
    noise = bytearray(np.random.default_rng(0).integers(0, 255, 64, dtype=np.uint8).tobytes())  # no 0xFF
    noise[20:22] = b"\xff\x7b"
    data = bytearray(slide.read_bytes())
    data[start + count // 2 : start + count // 2 + 64] = noise
    out.write_bytes(bytes(data))
    return grid.level, index


def _level_tiles(fast: TiffLevelTiles) -> list[bytes]:
    return [fast.raw(i) or b"" for i in range(len(fast.page.databytecounts))]


def _scan_start(tile: bytes) -> int:
    """The first byte of the entropy-coded data: after the start-of-scan segment."""
    i = 2
    while tile[i + 1] != 0xDA:
        i += 2 + int.from_bytes(tile[i + 2 : i + 4], "big")
    return i + 2 + int.from_bytes(tile[i + 2 : i + 4], "big")


@pytest.mark.parametrize("which", ["synthetic", "aperio"])
def test_clean_tiles_pass_and_most_damage_to_their_scan_data_is_an_error(
    which: str, slide: Path, cmu_svs: Path
) -> None:
    """Every tile of the level decodes (none refused), at full size and shrunk; of 60 tiles with 64 random bytes
    written over their scan data, at least 80% are refused (measured: 91% over 200 on each slide; the rest decode
    to valid codes, which no decoder can tell from the scanner's), and a stream cut short always is."""
    path = slide if which == "synthetic" else cmu_svs
    with open_slide(path) as s:
        size = s.level_dimensions[0]
    rng, refused, cut = np.random.default_rng(1), 0, 0
    for shrink in (1, 2):
        fast = TiffLevelTiles.open(str(path), size, 448, shrink)
        assert fast is not None and fast.shrink == shrink
        tiles = _level_tiles(fast)
        assert all(fast.decode(t, i).shape == (fast.th, fast.tw, 3) for i, t in enumerate(tiles))
        for _ in range(30):
            i = int(rng.integers(len(tiles)))
            tile, start = tiles[i], _scan_start(tiles[i])
            at = int(rng.integers(start, len(tile) - 66))
            bad = tile[:at] + rng.integers(0, 256, 64, dtype=np.uint8).tobytes() + tile[at + 64 :]
            if bad == tile:
                continue
            try:
                fast.decode(bad, i)
            except ValueError as err:
                assert f"{path.name}: level 0 JPEG tile {i} (column" in str(err) and "is damaged" in str(err)
                refused += 1
            try:
                fast.decode(tile[: int(rng.integers(start + 8, len(tile) - 2))], i)
            except ValueError as err:
                cut += "Premature end of JPEG file" in str(err)
        fast.close()
    assert refused >= 48 and cut == 60, (refused, cut)


def test_a_damaged_tile_is_the_slides_error_row_in_features_and_the_clean_slide_is_unchanged(
    slide: Path, shared: Path, tmp_path: Path
) -> None:
    weights = str(shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors")
    alone, both = tmp_path / "alone", tmp_path / "both"
    for folder in (alone, both):
        folder.mkdir()
        shutil.copy(slide, folder / "clean.svs")
    level, index = _damage(slide, both / "damaged.svs")
    for folder in (alone, both):
        args = ["features", str(folder), "--encoder", ENCODER, "--checkpoint", weights, "--out", f"{folder}-f"]
        assert main([*args, *ARGS]) == (0 if folder == alone else 3)
    with (tmp_path / "both-f" / "features.csv").open(newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    assert rows["clean.svs"]["status"] == "ok" and rows["damaged.svs"]["status"] == "error"
    reason = rows["damaged.svs"]["reason"]
    assert f"level {level} JPEG tile {index}" in reason and "damaged.svs" in reason and "is damaged" in reason
    assert str(tmp_path) not in reason  # the file's name, never the folders above it
    assert not (tmp_path / "both-f" / feature_name("damaged.svs")).exists()
    a, b = (read_features(tmp_path / f / feature_name("clean.svs")) for f in ("alone-f", "both-f"))
    assert np.array_equal(a.coords, b.coords) and np.allclose(a.features, b.features, rtol=1e-4, atol=1e-5)

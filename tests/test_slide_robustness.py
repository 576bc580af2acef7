"""Slides that break the easy path: no pyramid (the thumbnail read in blocks), linked and slide-named folders,
unusable MPP metadata, and files cut short. Every slide here is a real TIFF written with tifffile, read by the
real backends."""

from __future__ import annotations

import errno
import os
import tracemalloc
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

pytest.importorskip("openslide")
pytest.importorskip("tiffslide")

import tifffile

from medvision.tasks.score.slides import find_slides
from medvision.wsi import slide as slide_module
from medvision.wsi.slide import SlideError, area_round, area_shrink_block, open_slide, tiff_cut_short
from medvision.wsi.synthetic import write_pyramidal_tiff


def _smooth_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Noise blurred to H&E-like blobs and edges (pure noise would hide a shifted block; flat colour would too)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    big = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(big.astype(np.int16) + rng.integers(-20, 21, big.shape), 0, 255).astype(np.uint8)


def _one_level_tiff(path: Path, rgb: np.ndarray, mpp: float = 0.5) -> Path:
    """A tiled JPEG TIFF with one level and no pyramid, as some scanners and converters write."""
    tifffile.imwrite(path, rgb, tile=(256, 256), compression="jpeg", photometric="rgb",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")  # fmt: skip
    return path


SHRINKS = [
    ((301, 517), (163, 97), (64, 100)),
    ((1000, 700), (233, 333), (128, 256)),
    ((256, 256), (64, 64), (50, 50)),
    ((10, 10), (1, 1), (3, 3)),
]


@pytest.mark.parametrize("shape,size,block", SHRINKS)
def test_shrinking_block_by_block_is_cv2_area_resize(shape: tuple[int, int], size: tuple[int, int],
                                                     block: tuple[int, int]) -> None:  # fmt: skip
    """Blocks cut anywhere (not on the box boundaries), added up, give INTER_AREA on the whole image."""
    h, w = shape
    image = _smooth_rgb(w, h, seed=h)
    out = np.zeros((size[1], size[0], 3), np.float32)
    for y in range(0, h, block[0]):
        for x in range(0, w, block[1]):
            area_shrink_block(out, image[y : y + block[0], x : x + block[1]], x, y, (w, h))
    got = area_round(out, (w, h))
    want = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    diff = np.abs(got.astype(int) - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float summation order: a tie rounds the other way


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_a_pyramid_step_shrunk_block_by_block_is_opencvs_to_the_grey_level(factor: int) -> None:
    """Noise, whose box means are often exact halves: OpenCV rounds them up at 2 x 2 and to even otherwise. Rounding
    every half to even moved one tile of the synthetic cohort's slide_021 (564 tiles became 563)."""
    image = np.random.default_rng(factor).integers(0, 256, (96 * factor, 128 * factor, 3), dtype=np.uint8)
    out = np.zeros((96, 128, 3), np.float32)
    for y in range(0, image.shape[0], 70):
        for x in range(0, image.shape[1], 130):
            area_shrink_block(out, image[y : y + 70, x : x + 130], x, y, (128 * factor, 96 * factor))
    want = cv2.resize(image, (128, 96), interpolation=cv2.INTER_AREA)
    assert np.array_equal(area_round(out, (128 * factor, 96 * factor)), want)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_a_slide_without_a_pyramid_is_thumbnailed_block_by_block(backend: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    rgb = _smooth_rgb(1500, 1100)
    path = _one_level_tiff(tmp_path / "flat.tif", rgb)
    monkeypatch.setattr(slide_module, "THUMBNAIL_BLOCK", 1 << 16)
    monkeypatch.setattr(slide_module, "THUMBNAIL_BLOCK_WIDTH", 512)
    with open_slide(path, backend=backend) as slide:
        assert slide.level_count == 1
        whole = slide.read_region(0, 0, 0, 1500, 1100)  # what the thumbnail read in one call before
        reads: list[tuple[int, int, int, int]] = []
        real_read = slide.read_region

        def counted(level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
            reads.append((x, y, w, h))
            return real_read(level, x, y, w, h)

        monkeypatch.setattr(slide, "read_region", counted)
        thumb = slide.thumbnail(256)
    assert thumb.shape == (188, 256, 3) and thumb.dtype == np.uint8
    want = cv2.resize(whole, (256, 188), interpolation=cv2.INTER_AREA)
    assert np.abs(thumb.astype(int) - want).max() <= 1
    assert max(w * h for _, _, w, h in reads) <= 1 << 16 and len(reads) > 20
    covered = np.zeros((1100, 1500), np.int64)  # the blocks tile the level exactly: no gap, no overlap
    for x, y, w, h in reads:
        covered[y : y + h, x : x + w] += 1
    assert (covered == 1).all()


def test_the_thumbnails_memory_is_bounded_by_the_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tiffslide decodes into NumPy arrays, which tracemalloc sees: the peak is a block's, not the level's."""
    path = _one_level_tiff(tmp_path / "flat.tif", _smooth_rgb(2048, 2048))
    monkeypatch.setattr(slide_module, "THUMBNAIL_BLOCK", 1 << 16)
    monkeypatch.setattr(slide_module, "THUMBNAIL_BLOCK_WIDTH", 256)
    level_bytes = 2048 * 2048 * 3
    with open_slide(path, backend="tiffslide") as slide:
        tracemalloc.start()
        try:
            thumb = slide.thumbnail(128)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert thumb.shape == (128, 128, 3)
    # ~33 bytes a block pixel (decoded tiles, RGBA, float32 sums); one read of the level took ~13 a level pixel
    assert peak < min(level_bytes / 4, 48 << 16), f"peak {peak / 1e6:.1f} MB for a {level_bytes / 1e6:.1f} MB level"


def test_a_pyramid_level_read_in_blocks_is_the_level_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of level 1 are addressed in level-0 pixels (x 4): each lands where the whole read puts it."""
    path = write_pyramidal_tiff(tmp_path / "slide.svs", _smooth_rgb(2048, 1536), 0.5)
    monkeypatch.setattr(slide_module, "THUMBNAIL_BLOCK", 1 << 14)
    monkeypatch.setattr(slide_module, "THUMBNAIL_BLOCK_WIDTH", 128)
    with open_slide(path) as slide:
        assert slide.best_level(2048 / 300) == 1
        w, h = slide.level_dimensions[1]
        want = cv2.resize(slide.read_region(1, 0, 0, w, h), (300, 225), interpolation=cv2.INTER_AREA)
        thumb = slide.thumbnail(300)
    assert np.abs(thumb.astype(int) - want).max() <= 1


def test_linked_folders_are_followed_once_and_loops_and_empty_slide_named_folders_are_rows(tmp_path: Path) -> None:
    root, outside = tmp_path / "slides", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    for p in (root / "a" / "s1.svs", outside / "s2.svs"):
        p.write_bytes(b"II*\x00")
    (root / "b").symlink_to(root / "a", target_is_directory=True)  # a second route to a folder
    (root / "a" / "back").symlink_to(root, target_is_directory=True)  # a loop
    (root / "linked").symlink_to(outside, target_is_directory=True)  # the only route to its slides
    (root / "empty.svs").mkdir()
    (root / "full.svs").mkdir()
    (root / "full.svs" / "s3.svs").write_bytes(b"II*\x00")
    (root / "same.svs").symlink_to(root / "a" / "s1.svs")  # a second name of one slide file
    rows = {e.rel: (e.outcome, e.reason) for e in find_slides(root)}
    assert set(rows) == {"a/s1.svs", "a/back", "b", "empty.svs", "full.svs/s3.svs", "linked/s2.svs", "same.svs"}
    assert rows["same.svs"] == ("skipped", "link to a file already listed as 'a/s1.svs'; not read twice")
    assert rows["a/s1.svs"][0] == rows["full.svs/s3.svs"][0] == rows["linked/s2.svs"][0] == "candidate"
    assert rows["a/back"] == ("skipped", "link to a directory that contains it (a loop); not followed")
    assert rows["b"] == ("skipped", "link to a directory already scanned as 'a'; not scanned twice")
    assert rows["empty.svs"][0] == "skipped" and "named like a slide" in rows["empty.svs"][1]


def test_what_is_not_a_slide_is_a_row_of_the_archive_walk_not_a_slide_to_fail_or_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slide search walks as :func:`medvision.io.archive.scan` does. It used to take a macOS ``._`` sidecar, a
    slide in a hidden folder and a FIFO named ``.svs`` (whose opening blocks a reader until the slide timeout) for
    slides, and to crash the whole run on a folder it could not list."""
    root = tmp_path / "slides"
    (root / ".Trash-1000").mkdir(parents=True)
    (root / "locked").mkdir()
    for p in (root / "s1.svs", root / ".Trash-1000" / "old.svs", root / "locked" / "s2.svs"):
        p.write_bytes(b"II*\x00")
    (root / "._s1.svs").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble
    os.mkfifo(root / "pipe.svs")
    (root / "gone.svs").symlink_to("nowhere.svs")
    locked = str(root / "locked")  # chmod 000 stops no root: the folder refuses to be listed instead

    def refusing(real: Any) -> Any:
        def call(path: Any = ".") -> Any:
            if os.fspath(path) == locked:
                raise PermissionError(errno.EACCES, "Permission denied", locked)
            return real(path)

        return call

    monkeypatch.setattr(os, "scandir", refusing(os.scandir))
    monkeypatch.setattr(os, "listdir", refusing(os.listdir))  # pathlib's iterdir, in the DICOM series probe
    rows = {e.rel: (e.outcome, e.reason) for e in find_slides(root)}
    assert rows == {
        "s1.svs": ("candidate", ""),
        "._s1.svs": ("skipped", "hidden file (a macOS ._ resource fork, .DS_Store...); not read"),
        ".Trash-1000": ("skipped", "hidden directory; not scanned"),
        "pipe.svs": ("skipped", "not a regular file (FIFO); not opened"),
        "gone.svs": ("error", "broken symbolic link: its target 'nowhere.svs' does not exist"),
        "locked": ("error", "cannot list directory (PermissionError: Permission denied)"),
    }


@pytest.mark.parametrize("value", ["-0.499", "nan", "0"])
def test_an_unusable_mpp_is_quoted_not_called_missing(value: str, tmp_path: Path) -> None:
    path = write_pyramidal_tiff(tmp_path / "slide.svs", _smooth_rgb(512, 512), None, metadata={"MPP": value})
    with pytest.raises(SlideError) as err:
        open_slide(path)
    text = str(err.value)
    assert text.startswith(f"{path}: the slide's microns-per-pixel metadata ")
    assert f"= '{value}'" in text and "expected a positive number" in text and "no microns-per-pixel" not in text
    assert "--mpp" in text and "data.slides.mpp" in text  # the flag and the recipe key
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.mpp_source == "recipe"


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_a_slide_cut_short_says_so(fraction: float, tmp_path: Path) -> None:
    """tifffile writes each directory before its data, so a cut loses a later directory of the chain."""
    whole = write_pyramidal_tiff(tmp_path / "slide.svs", _smooth_rgb(1024, 768), 0.5)
    assert tiff_cut_short(whole) is None
    data = whole.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(SlideError, match=rf"^{cut}: {cut.stat().st_size} bytes but its TIFF directory \d+ is at "
                                         r"byte \d+: the file is cut short$"):  # fmt: skip
        open_slide(cut)


def test_a_real_svs_cut_short_names_its_first_directory(cmu_svs: Path, tmp_path: Path) -> None:
    """Aperio writes the directories after the pixels: the first one is past a cut at half the file."""
    assert tiff_cut_short(cmu_svs) is None
    data = cmu_svs.read_bytes()
    first = int.from_bytes(data[4:8], "little")
    cut = tmp_path / "cmu.svs"
    cut.write_bytes(data[: len(data) // 2])
    message = f"{cut}: {len(data) // 2} bytes but its first TIFF directory is at byte {first}: the file is cut short"
    with pytest.raises(SlideError) as err:
        open_slide(cut)
    assert str(err.value) == message


def test_a_bigtiff_cut_short_and_files_that_are_not_tiffs(tmp_path: Path) -> None:
    path = tmp_path / "big.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i in range(3):
            tif.write(np.full((64, 64, 3), 40 * i, np.uint8), photometric="rgb")
    assert tiff_cut_short(path) is None
    with tifffile.TiffFile(path) as tif:
        last = tif.pages[-1].offset  # type: ignore[union-attr]
    cut = tmp_path / "cut.tif"
    cut.write_bytes(path.read_bytes()[: last + 20])  # into the last directory's entries
    why = f"{cut}: {last + 20} bytes but its TIFF directory 3, at byte {last}, runs to byte "
    assert (tiff_cut_short(cut) or "").startswith(why)
    junk = tmp_path / "junk.svs"
    junk.write_bytes(os.urandom(64))
    assert tiff_cut_short(junk) is None and tiff_cut_short(tmp_path / "absent.svs") is None
    (tmp_path / "header.tif").write_bytes(b"II*\x00")
    assert tiff_cut_short(tmp_path / "header.tif") is None  # too short for an offset: the readers say so

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from medvision.io.image import (
    ImageReadError,
    RawFormat,
    check_image_header,
    is_grayscale,
    read_image_raw,
    to_channels,
    to_unit_range,
)


def test_16bit_grayscale_png_is_neither_clipped_nor_white(tmp_path: Path) -> None:
    ramp = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12-bit data in 16-bit PNG
    path = tmp_path / "ct.png"
    cv2.imwrite(str(path), ramp)
    raw = read_image_raw(path)
    assert raw.dtype == np.uint16 and raw.max() == 4095
    np.testing.assert_array_equal(raw, ramp)
    unit = to_unit_range(raw, "dtype")
    assert unit.max() == pytest.approx(4095 / 65535)  # not 1.0 everywhere, as an 8-bit clip would give
    assert len(np.unique(unit)) == len(np.unique(ramp))  # every level survives
    stretched = to_unit_range(raw, "minmax")
    assert stretched.min() == 0.0 and stretched.max() == 1.0


def test_16bit_rgb_png_keeps_depth_and_channel_order(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), dtype=np.uint16)
    rgb[..., 0] = 60000  # red
    rgb[..., 2] = 300  # a little blue, below 8-bit resolution after scaling
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb[..., ::-1])
    raw = read_image_raw(tmp_path / "rgb16.png")
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw[0, 0], [60000, 0, 300])


def test_16bit_tiff_and_planar_tiff(tmp_path: Path) -> None:
    img = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 200
    tifffile.imwrite(tmp_path / "a.tif", img)
    np.testing.assert_array_equal(read_image_raw(tmp_path / "a.tif"), img)
    planar = np.stack([img, img // 2, img // 4])  # (C, H, W)
    tifffile.imwrite(tmp_path / "p.tiff", planar, photometric="rgb", planarconfig="separate")
    out = read_image_raw(tmp_path / "p.tiff")
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[..., 1], img // 2)


def test_8bit_jpeg_and_shared_he_tile(tmp_path: Path, shared: Path) -> None:
    tile = read_image_raw(next((shared / "data" / "he_tiles").glob("TUM-*.tif")))
    assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8
    cv2.imwrite(str(tmp_path / "t.jpg"), tile[..., ::-1])
    jpg = read_image_raw(tmp_path / "t.jpg")
    assert jpg.shape == tile.shape
    assert np.abs(jpg.astype(int) - tile.astype(int)).mean() < 8  # same picture, same channel order


def test_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageReadError, match=r"broken\.png"):
        read_image_raw(bad)
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image_raw(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match=r"suffix '\.gif'"):
        read_image_raw(tmp_path / "x.gif")


def test_channel_conversion() -> None:
    grey = np.random.default_rng(0).random((4, 4)).astype(np.float32)
    assert to_channels(grey, 3).shape == (4, 4, 3)
    rgba = np.random.default_rng(0).random((4, 4, 4)).astype(np.float32)
    assert to_channels(rgba, 3).shape == (4, 4, 3)
    rgb = np.ones((4, 4, 3), np.float32) * [1.0, 0.0, 0.0]
    np.testing.assert_allclose(to_channels(rgb.astype(np.float32), 1)[..., 0], 0.299, rtol=1e-6)
    flat = to_unit_range(np.full((3, 3), 7, np.uint16), "minmax")
    assert flat.max() == 0.0  # a constant image maps to zeros, not NaN
    hot = np.zeros((100, 100), np.float32)
    hot[0, 0] = 1e6  # one hot pixel does not squash the rest under percentile scaling
    hot[1:, :] = np.linspace(0, 1, 99 * 100).reshape(99, 100)
    assert to_unit_range(hot, "percentile")[50, 50] > 0.3


def test_a_jpeg_is_whole_up_to_its_end_marker_whatever_follows_it_for_training_and_score_alike(tmp_path: Path) -> None:
    """A motion photo's video after the end marker is a whole JPEG (it failed the last-KiB test while OpenCV, and so
    ``score``, decoded it); a JPEG cut short is an error in both (OpenCV fills the rest grey without a word)."""
    from medvision.io.image import check_image_header, jpeg_is_whole

    rgb = (np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)
    for params in ([], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_RST_INTERVAL, 2]):
        data = cv2.imencode(".jpg", rgb, params)[1].tobytes()
        trailer, cut = tmp_path / "trailer.jpg", tmp_path / "cut.jpg"
        trailer.write_bytes(data + bytes(range(256)) * 20)  # 5 KiB after the end marker
        cut.write_bytes(data[: len(data) * 2 // 3])
        assert jpeg_is_whole(data) and not jpeg_is_whole(data[:-2])
        check_image_header(trailer)
        assert read_image_raw(trailer).shape == (48, 48, 3)
        for check in (check_image_header, read_image_raw):
            with pytest.raises(ImageReadError, match=r"cut\.jpg: JPEG without its end-of-image marker"):
                check(cut)


def test_a_tiff_must_be_one_image_of_1_3_or_4_samples_in_the_audit_and_the_reader(tmp_path: Path) -> None:
    """A 7-page stack or a 5-channel TIFF passed the audit, then stopped training naming no file; a thumbnail page
    (reduced resolution) is not a second image."""
    from medvision.io.image import check_image_header

    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((7, 8, 8), np.uint8))
    tifffile.imwrite(
        tmp_path / "five.tif", np.zeros((8, 8, 5), np.uint8), photometric="minisblack", planarconfig="contig"
    )
    with tifffile.TiffWriter(tmp_path / "thumb.tif") as tif:
        tif.write(np.full((16, 16, 3), 7, np.uint8))
        tif.write(np.zeros((4, 4, 3), np.uint8), subfiletype=1)
    for check in (check_image_header, read_image_raw):
        with pytest.raises(ImageReadError, match=r"stack\.tif: a TIFF of 7 pages .*expected one image a file"):
            check(tmp_path / "stack.tif")
        with pytest.raises(ImageReadError, match=r"five\.tif: a TIFF of 5 samples a pixel; expected 1 \(grey\)"):
            check(tmp_path / "five.tif")
    check_image_header(tmp_path / "thumb.tif")
    assert (read_image_raw(tmp_path / "thumb.tif") == 7).all()


def test_tiff_colour_spaces_are_read_as_the_image_shows_or_refused(tmp_path: Path) -> None:
    """Palette indices went to the model as grey levels, a min-is-white 0 as black, CMYK as RGBA."""
    from medvision.io.image import check_image_header

    colormap = np.zeros((3, 256), np.uint16)
    colormap[0, 5] = 65535  # index 5 is red
    tifffile.imwrite(tmp_path / "palette.tif", np.full((8, 8), 5, np.uint8), photometric="palette", colormap=colormap)
    tifffile.imwrite(tmp_path / "white.tif", np.zeros((8, 8), np.uint8), photometric="miniswhite")
    tifffile.imwrite(tmp_path / "cmyk.tif", np.zeros((8, 8, 4), np.uint8), photometric="separated")
    assert (read_image_raw(tmp_path / "palette.tif") == (255, 0, 0)).all()
    assert (read_image_raw(tmp_path / "white.tif") == 255).all()
    for check in (check_image_header, read_image_raw):
        with pytest.raises(ImageReadError, match=r"cmyk\.tif: a TIFF in colour space SEPARATED; expected grey, RGB"):
            check(tmp_path / "cmyk.tif")


def _formats(folder: Path) -> list[str]:
    """One file of each layout the sources meet, written by the libraries users write them with."""
    from PIL import Image

    rng = np.random.default_rng(0)
    grey, rgb = rng.integers(0, 255, (16, 16), np.uint8), rng.integers(0, 255, (16, 16, 3), np.uint8)
    writers = {
        "g8.png": lambda p: cv2.imwrite(str(p), grey),
        "g16.png": lambda p: cv2.imwrite(str(p), grey.astype(np.uint16) * 16),
        "c16.png": lambda p: cv2.imwrite(str(p), rgb.astype(np.uint16) * 16),
        "rgba.png": lambda p: cv2.imwrite(str(p), np.dstack([rgb, grey])),
        "grey_alpha.png": lambda p: Image.fromarray(np.dstack([grey, grey]), "LA").save(p),
        "palette.png": lambda p: Image.fromarray(rgb).convert("P").save(p),
        "bilevel.png": lambda p: Image.fromarray(grey).convert("1").save(p),
        "grey_trns.png": lambda p: Image.fromarray(grey).save(p, transparency=5),
        "g.jpg": lambda p: Image.fromarray(grey).save(p),
        "exif.jpg": lambda p: Image.fromarray(rgb).save(p, exif=b"Exif\x00\x00" + bytes(20000)),
        "cmyk.jpg": lambda p: Image.fromarray(rgb).convert("CMYK").save(p),
        "g16.tif": lambda p: tifffile.imwrite(p, grey.astype(np.uint16)),
        "i16.tif": lambda p: tifffile.imwrite(p, grey.astype(np.int16) - 1024),
        "f32.tif": lambda p: tifffile.imwrite(p, grey.astype(np.float32)),
        "planar.tif": lambda p: tifffile.imwrite(
            p, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate"
        ),
        "palette.tif": lambda p: Image.fromarray(rgb).convert("P").save(p),
        "white.tif": lambda p: tifffile.imwrite(p, grey, photometric="miniswhite"),
        "g.bmp": lambda p: Image.fromarray(grey).save(p),
        "tiff_named.png": lambda p: tifffile.imwrite(p, grey, photometric="minisblack"),
    }
    for name, write in writers.items():
        write(folder / name)
    return list(writers)


def test_header_format_is_what_the_reader_gives_or_none(tmp_path: Path) -> None:
    """The sources decide transfer dtype and input channels from every file's header, read by the same check that
    finds damage: each answer must be the decoder's, and a header that cannot tell (a BMP's palette, a TIFF named
    .png) says None, so the file is decoded."""
    for name in _formats(tmp_path):
        raw = read_image_raw(tmp_path / name)
        found = check_image_header(tmp_path / name)
        if name.endswith(".bmp") or name == "tiff_named.png":
            assert found is None, name
        else:
            assert found == RawFormat(raw.dtype.name, is_grayscale(raw)), name
    assert check_image_header(tmp_path / "g16.png") == RawFormat("uint16", True)
    assert check_image_header(tmp_path / "planar.tif") == RawFormat("uint8", False)
    with pytest.raises(ImageReadError, match=r"gone\.png: cannot open"):
        check_image_header(tmp_path / "gone.png")


def test_a_folder_scan_parses_each_tiff_once_and_decodes_only_what_headers_cannot_tell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan's damage check and its format come from one read of the header: a TIFF's pages were parsed twice
    and every image opened twice. Only the BMP, whose palette decides grey or colour, is decoded."""
    import medvision.data.sources as sources
    import medvision.io.image as image
    from medvision.data.sources import load_folder

    (tmp_path / "a").mkdir()
    names = _formats(tmp_path / "a")
    parsed: list[str] = []
    decoded: list[str] = []
    tiff_file, read_raw = tifffile.TiffFile, sources.read_image_raw

    def counting_tiff(path: object, *args: object, **kwargs: object) -> tifffile.TiffFile:
        parsed.append(Path(str(path)).name)
        return tiff_file(path, *args, **kwargs)

    def counting_read(path: str | Path) -> np.ndarray:
        decoded.append(Path(path).name)
        return read_raw(path)

    monkeypatch.setattr(image.tifffile, "TiffFile", counting_tiff)
    monkeypatch.setattr(sources, "read_image_raw", counting_read)
    table = load_folder(tmp_path, None, None)
    tiffs = sorted(n for n in names if n.endswith(".tif") or n == "tiff_named.png")
    assert len(table.ids) == len(names) and sorted(parsed) == tiffs
    assert sorted(decoded) == ["g.bmp", "tiff_named.png"]


def test_jpegs_decode_as_opencv_does_and_corrupt_scan_data_is_an_error(tmp_path: Path) -> None:
    """JPEGs are decoded strictly (simplejpeg): the pixels are OpenCV's for grey, 4:2:0, 4:4:4, progressive and
    EXIF-rotated files (no rotation, as OpenCV's IMREAD_UNCHANGED), CMYK still goes through OpenCV; and a file
    whose scan data is corrupt, which OpenCV decodes with a warning on stderr, is an error naming the file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 255, (60, 90, 3), np.uint8), (0, 0), 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    writers = {
        "grey.jpg": lambda p: Image.fromarray(img[..., 0]).save(p, quality=90),
        "c420.jpg": lambda p: Image.fromarray(img).save(p, quality=90),
        "c444.jpg": lambda p: Image.fromarray(img).save(p, quality=95, subsampling=0),
        "progressive.jpg": lambda p: Image.fromarray(img).save(p, progressive=True),
        "rotated.jpg": lambda p: Image.fromarray(img).save(p, exif=exif),
        "cmyk.jpg": lambda p: Image.fromarray(img).convert("CMYK").save(p),
    }
    for name, write in writers.items():
        write(tmp_path / name)
        ref = cv2.imdecode(np.fromfile(tmp_path / name, np.uint8), cv2.IMREAD_UNCHANGED)
        ref = ref[..., ::-1] if ref.ndim == 3 else ref
        np.testing.assert_array_equal(read_image_raw(tmp_path / name), ref, err_msg=name)
    whole = (tmp_path / "c420.jpg").read_bytes()
    data = whole[: len(whole) * 2 // 3] + b"\xff\xd9"  # its scan data cut short, yet it ends as a JPEG should
    (tmp_path / "corrupt.jpg").write_bytes(data)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is not None
    with pytest.raises(ImageReadError, match=r"corrupt\.jpg: damaged JPEG data \(libjpeg: Corrupt JPEG data"):
        read_image_raw(tmp_path / "corrupt.jpg")
    twelve = bytearray(whole)  # a 12-bit frame header: left to OpenCV, which cannot decode this one either
    sof = next(i for i in range(2, len(twelve)) if twelve[i] == 0xFF and twelve[i + 1] in (0xC0, 0xC1, 0xC2))
    twelve[sof + 4] = 12
    (tmp_path / "twelve.jpg").write_bytes(bytes(twelve))
    with pytest.raises(ImageReadError, match=r"twelve\.jpg: OpenCV could not decode"):
        read_image_raw(tmp_path / "twelve.jpg")


def test_signed_16bit_tiff_maps_the_type_range_to_unit(tmp_path: Path) -> None:
    """A signed CT TIFF (-1024 air .. 3071 bone): int16's -32768..32767 is 0..1, as uint16's 0..65535 is, so the
    mapping is fixed (one value, one number, whatever else the image holds) and never negative."""
    ct = np.array([[-32768, -1024, 0, 3071, 32767]], np.int16)
    tifffile.imwrite(tmp_path / "ct.tif", ct)
    raw = read_image_raw(tmp_path / "ct.tif")
    assert raw.dtype == np.int16
    unit = to_unit_range(raw)
    np.testing.assert_allclose(unit[0], (ct[0].astype(np.float64) + 32768) / 65535, atol=1e-7)
    assert unit.dtype == np.float32 and unit[0, 0] == 0.0 and unit[0, -1] == 1.0 and np.all(np.diff(unit[0]) > 0)
    assert to_unit_range(raw[:, 1:3])[0, 0] == unit[0, 1]  # data-independent
    assert to_unit_range(np.array([-128, 127], np.int8)).tolist() == [0.0, 1.0]
    assert to_unit_range(np.array([-(2**31), 2**31 - 1], np.int32)).tolist() == [0.0, 1.0]

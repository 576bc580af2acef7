"""The DICOM reader against pydicom's own test files and pydicom-data, and against hand-computed pixels."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402

from medvision.io.dicom import (  # noqa: E402
    WINDOW_PRESETS,
    DicomDecodeError,
    DicomReadError,
    DicomSpec,
    NotADicomImage,
    modality_lut,
    parse_window,
    percentile_window,
    read_dicom,
    shipped_test_folders,
    voi_window,
)


def _pydicom_decodes(path: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            if str(ds.get("Modality", "")) in {"SR", "RTDOSE", "RTSTRUCT", "RTPLAN", "SEG"}:
                return False
            ds.pixel_array  # noqa: B018
        return True
    except Exception:
        return False


#: Globbed from disk: ``get_testdata_files()`` would try the network for files neither package ships.
DECODABLE = sorted(str(p) for folder in shipped_test_folders().values() for p in folder.rglob("*")
                   if p.is_file() and p.suffix != ".py" and _pydicom_decodes(str(p)))  # fmt: skip


def test_the_corpus_is_the_real_one() -> None:
    assert len(DECODABLE) > 140  # pydicom's ~95 decodable files plus pydicom-data's full-size radiographs


@pytest.mark.parametrize("path", DECODABLE, ids=[Path(p).name for p in DECODABLE])
def test_every_file_pydicom_decodes_decodes_here(path: str) -> None:
    pixels, meta = read_dicom(path)
    assert pixels.dtype == np.float32 and pixels.ndim == 4
    assert pixels.shape[0] == 1  # frames: "first" by default
    assert pixels.shape[-1] in (1, 3)
    assert np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert meta.n_frames >= 1 and meta.windows


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
        "JPGExtended.dcm",  # JPEG extended (12-bit)
        "JPEG-LL.dcm",  # JPEG lossless
        "emri_small_jpeg_ls_lossless.dcm",  # JPEG-LS
        "emri_small_jpeg_2k_lossless.dcm",  # JPEG 2000
        "emri_small_RLE.dcm",  # RLE
        "image_dfl.dcm",  # deflate
        "emri_small_big_endian.dcm",  # big endian
    ],
)
def test_each_transfer_syntax_decodes(name: str) -> None:
    pixels, _ = read_dicom(get_testdata_file(name))
    assert pixels.size > 0 and pixels.max() > pixels.min()


def test_lossless_codecs_give_identical_pixels() -> None:
    reference, _ = read_dicom(get_testdata_file("emri_small.dcm"), DicomSpec(frames="all"))
    for name in ("emri_small_RLE.dcm", "emri_small_big_endian.dcm", "emri_small_jpeg_2k_lossless.dcm",
                 "emri_small_jpeg_ls_lossless.dcm"):  # fmt: skip
        other, meta = read_dicom(get_testdata_file(name), DicomSpec(frames="all"))
        assert meta.n_frames == 10
        np.testing.assert_array_equal(other, reference, err_msg=name)


def test_broken_files_raise_typed_errors_naming_file_and_syntax(tmp_path: Path) -> None:
    src = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    truncated = tmp_path / "truncated.dcm"
    data = src.read_bytes()
    start = data.rindex(b"\xe0\x7f\x10\x00")  # the Pixel Data element
    truncated.write_bytes(data[: start + (len(data) - start) // 2])  # cut inside the compressed stream
    with pytest.raises(DicomDecodeError, match=r"truncated\.dcm: cannot decode pixel data with JPEG Baseline"):
        read_dicom(truncated)
    with pytest.raises(DicomReadError, match=r"nested_priv_SQ\.dcm"):
        read_dicom(get_testdata_file("nested_priv_SQ.dcm"))
    with pytest.raises(DicomDecodeError, match="unknown transfer syntax"):
        read_dicom(get_testdata_file("meta_missing_tsyntax.dcm"))
    with pytest.raises(NotADicomImage, match="not a DICOM file"):
        read_dicom(get_testdata_file("no_meta.dcm"))
    with pytest.raises(NotADicomImage, match="without image pixel data"):
        read_dicom(get_testdata_file("rtplan.dcm"))
    text = tmp_path / "notes.dcm"
    text.write_text("not dicom at all")
    with pytest.raises(NotADicomImage):
        read_dicom(text)


def test_linear_window_by_hand() -> None:
    x = np.array([-1000.0, 0.0, 39.5, 40.0, 79.0, 80.0, 1000.0])
    # PS3.3 C.11.2.1.2.1, c=40 w=80: y = ((x - 39.5) / 79 + 0.5), clipped
    expected = np.clip((x - 39.5) / 79.0 + 0.5, 0, 1)
    np.testing.assert_allclose(voi_window(x, 40, 80, "LINEAR"), expected, rtol=1e-6)
    assert voi_window(np.array([0.0]), 40, 80)[0] == 0.0
    exact = voi_window(np.array([0.0, 40.0, 80.0]), 40, 80, "LINEAR_EXACT")
    np.testing.assert_allclose(exact, [0.0, 0.5, 1.0])
    sig = voi_window(np.array([40.0, 60.0]), 40, 80, "SIGMOID")
    np.testing.assert_allclose(sig, [0.5, 1 / (1 + np.exp(-1.0))], rtol=1e-6)


def test_file_window_agrees_with_pydicom() -> None:
    path = get_testdata_file("693_J2KR.dcm")  # CT: RescaleSlope/Intercept plus a WindowCenter/Width
    ds = pydicom.dcmread(path)
    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    lo, hi = expected.min(), expected.max()
    pixels, meta = read_dicom(path)
    ours = pixels[0, ..., 0].astype(np.float64)
    assert meta.windows[0].startswith("file:0")
    # pydicom maps the window to the stored range instead of [0, 1]; compare after rescaling
    np.testing.assert_allclose(ours, (expected - lo) / (hi - lo), atol=2e-3)


def test_modality_lut_sequence_and_rescale_agree_with_pydicom() -> None:
    ds = pydicom.dcmread(get_testdata_file("mlut_18.dcm"))
    from medvision.io.dicom import modality_lut_for

    np.testing.assert_allclose(modality_lut_for(ds.pixel_array, ds), apply_modality_lut(ds.pixel_array, ds))
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    np.testing.assert_allclose(modality_lut_for(ct.pixel_array, ct), apply_modality_lut(ct.pixel_array, ct))
    assert modality_lut(np.array([0, 1000]), slope=1.0, intercept=-1024.0).tolist() == [-1024.0, -24.0]


def test_voi_lut_sequence_agrees_with_pydicom() -> None:
    path = get_testdata_file("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    expected = apply_voi_lut(ds.pixel_array, ds).astype(np.float64)
    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    pixels, meta = read_dicom(path)
    assert meta.windows == ["file VOI LUT"]
    np.testing.assert_allclose(pixels[0, ..., 0], expected / (2**bits - 1), atol=1e-6)


def test_monochrome1_is_inverted_so_high_is_bright() -> None:
    path = get_testdata_file("RG1_UNCR.dcm")  # 16-bit CR, MONOCHROME1, with a window
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(np.float64)
    c = float(np.atleast_1d(ds.WindowCenter)[0])
    w = float(np.atleast_1d(ds.WindowWidth)[0])
    pixels, meta = read_dicom(path)
    assert meta.photometric == "MONOCHROME1"
    by_hand = 1.0 - np.clip((raw - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(pixels[0, ..., 0], by_hand, atol=1e-5)
    image = pixels[0, ..., 0]
    assert image.flat[raw.argmax()] <= image.flat[raw.argmin()]  # a high stored value is dark


def test_presets_stack_as_channels_on_ct() -> None:
    spec = DicomSpec(windows=tuple(parse_window(w) for w in ("lung", "mediastinum", "bone")))
    pixels, meta = read_dicom(get_testdata_file("CT_small.dcm"), spec)
    assert pixels.shape == (1, 128, 128, 3)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = apply_modality_lut(ds.pixel_array, ds)
    for ch, name in enumerate(("lung", "mediastinum", "bone")):
        c, w = WINDOW_PRESETS[name]
        np.testing.assert_allclose(pixels[0, ..., ch], np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1), atol=1e-5)
    assert meta.windows[0].startswith("lung")
    explicit, _ = read_dicom(get_testdata_file("CT_small.dcm"), DicomSpec(windows=(parse_window([40, 80]),)))
    assert explicit.shape[-1] == 1


def test_no_window_falls_back_to_percentiles() -> None:
    pixels, meta = read_dicom(get_testdata_file("CT_small.dcm"))  # has no WindowCenter
    assert meta.windows == ["percentile (file has no window)"]
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    ramp = np.arange(1000, dtype=np.float32)
    out = percentile_window(ramp)
    assert out[0] == 0.0 and out[-1] == 1.0 and 0.49 < out[500] < 0.51


def test_colour_and_multiframe_policies() -> None:
    path = get_testdata_file("examples_ybr_color.dcm")  # YBR_FULL_422, 30 frames, JPEG baseline
    first, meta = read_dicom(path)
    assert first.shape == (1, 240, 320, 3) and meta.n_frames == 30 and meta.windows == ["rgb"]
    ds = pydicom.dcmread(path)
    rgb = ds.pixel_array[0].astype(np.float32) / 255  # pydicom converts YBR to RGB by default
    np.testing.assert_allclose(first[0], rgb, atol=1e-6)
    _, meta = read_dicom(path, DicomSpec(frames="middle"))
    assert meta.frame_indices == [15]
    every, _ = read_dicom(path, DicomSpec(frames="all"))
    assert every.shape[0] == 30
    palette, _ = read_dicom(get_testdata_file("OBXXXX1A.dcm"))  # PALETTE COLOR -> RGB
    assert palette.shape[-1] == 3 and palette.max() > 0


def test_window_parsing_errors() -> None:
    with pytest.raises(ValueError, match="lung"):
        parse_window("lungs")
    assert parse_window("file:1").index == 1
    assert parse_window({"center": 40, "width": 80}).center == 40.0


def _write_wsi(path: Path, image: np.ndarray, tile: int, sparse: bool) -> None:
    """A VL Whole Slide Microscopy image (uncompressed RGB), TILED_FULL or TILED_SPARSE with shuffled frames."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rows, cols = image.shape[:2]
    per_row, per_col = -(-cols // tile), -(-rows // tile)
    padded = np.zeros((per_col * tile, per_row * tile, 3), np.uint8)
    padded[:rows, :cols] = image
    tiles = [(r, c) for r in range(per_col) for c in range(per_row)]
    if sparse:
        tiles = tiles[::-1]  # stored in any order; the positions say where each goes
    frames = np.stack([padded[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r, c in tiles])
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "SM", "WSI-1"
    ds.Rows = ds.Columns = tile
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = rows, cols
    ds.DimensionOrganizationType = "TILED_SPARSE" if sparse else "TILED_FULL"
    if sparse:
        groups = []
        for r, c in tiles:
            pos = Dataset()
            pos.RowPositionInTotalImagePixelMatrix = r * tile + 1
            pos.ColumnPositionInTotalImagePixelMatrix = c * tile + 1
            item = Dataset()
            item.PlanePositionSlideSequence = [pos]
            groups.append(item)
        ds.PerFrameFunctionalGroupsSequence = groups
    ds.PixelData = frames.tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("sparse", [False, True], ids=["TILED_FULL", "TILED_SPARSE"])
def test_whole_slide_tiles_are_assembled(tmp_path: Path, sparse: bool) -> None:
    tile = read_dicom(get_testdata_file("US1_J2KR.dcm"))[0][0]  # a real 480x640 RGB picture as the slide
    image = np.round(tile[:100, :130] * 255).astype(np.uint8)
    path = tmp_path / "slide.dcm"
    _write_wsi(path, image, tile=32, sparse=sparse)
    pixels, meta = read_dicom(path, DicomSpec(frames="tiled"))
    assert meta.n_frames == 20 and pixels.shape == (1, 100, 130, 3)
    np.testing.assert_allclose(pixels[0], image / 255.0, atol=1e-6)
    first, _ = read_dicom(path)  # without "tiled" a frame is one tile
    assert first.shape == (1, 32, 32, 3)
    with pytest.raises(DicomReadError, match="whole-slide"):
        read_dicom(get_testdata_file("emri_small.dcm"), DicomSpec(frames="tiled"))

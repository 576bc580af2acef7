"""Where real files keep what the reader needs beyond the top level: enhanced (multi-frame) CT's functional groups,
big-endian palette and LUT tables, out-of-range file windows, and header counts the limits rely on.

Every file is one pydicom or pydicom-data ships, read from disk (never through ``get_testdata_files()``), or such
a file re-encoded here the way another archive would have written it.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRBigEndian  # noqa: E402

from medvision.io.dicom import (  # noqa: E402
    DicomReadError,
    DicomSpec,
    declared_values,
    parse_window,
    read_dicom,
    shipped_test_folders,
)

PYDICOM = shipped_test_folders()["pydicom"]
DATA = shipped_test_folders().get("pydicom-data")
needs_data = pytest.mark.skipif(DATA is None, reason="pydicom-data is not installed")


def _read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


@needs_data
def test_enhanced_ct_rescale_and_window_come_from_the_shared_functional_groups() -> None:
    """eCT_Supplemental keeps intercept -1024 and window 49/102 only in SharedFunctionalGroupsSequence."""
    path = DATA / "eCT_Supplemental.dcm"
    ds = _read(path)
    assert "RescaleIntercept" not in ds and "WindowCenter" not in ds
    hu = ds.pixel_array[0].astype(np.float32) - 1024.0
    pixels, meta = read_dicom(path)
    assert meta.windows == ["file:0 49/102 LINEAR"]
    np.testing.assert_allclose(pixels[0, ..., 0], np.clip((hu - 48.5) / 101 + 0.5, 0, 1), atol=1e-6)
    brain, meta = read_dicom(path, DicomSpec(windows=(parse_window("brain"),)))  # a preset applies to HU
    np.testing.assert_allclose(brain[0, ..., 0], np.clip((hu - 39.5) / 79 + 0.5, 0, 1), atol=1e-6)
    assert 0.0 < float((brain == 1.0).mean()) < 0.05  # on stored values (no intercept) 36% would be white


@needs_data
def test_each_frame_uses_its_own_per_frame_rescale_and_window(tmp_path: Path) -> None:
    """Frame 1 given its own Pixel Value Transformation and Frame VOI LUT items: they win over the shared ones,
    for that frame only, whether the frames are read together or one at a time."""
    ds = _read(DATA / "eCT_Supplemental.dcm")
    item = ds.PerFrameFunctionalGroupsSequence[1]
    pvt, voi = Dataset(), Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = "2", "-1000", "HU"
    voi.WindowCenter, voi.WindowWidth = "300", "1500"
    item.PixelValueTransformationSequence, item.FrameVOILUTSequence = Sequence([pvt]), Sequence([voi])
    ds.save_as(tmp_path / "per_frame.dcm")
    stored = ds.pixel_array.astype(np.float32)
    expected = [np.clip((stored[0] - 1024 - 48.5) / 101 + 0.5, 0, 1),
                np.clip((stored[1] * 2 - 1000 - 299.5) / 1499 + 0.5, 0, 1)]  # fmt: skip
    together, meta = read_dicom(tmp_path / "per_frame.dcm", DicomSpec(frames="all"))
    assert meta.frame_indices == [0, 1] and meta.windows == ["file:0 49/102 LINEAR"]
    for k in (0, 1):
        np.testing.assert_allclose(together[k, ..., 0], expected[k], atol=1e-6)
        alone, meta = read_dicom(tmp_path / "per_frame.dcm", frame=k)
        np.testing.assert_allclose(alone[0, ..., 0], expected[k], atol=1e-6)
        assert meta.windows == [["file:0 49/102 LINEAR", "file:0 300/1500 LINEAR"][k]]


@needs_data
def test_big_endian_palette_colour_gives_the_little_endian_pixels() -> None:
    """OBXXXX1A: one ultrasound image, stored little- and big-endian (and as two frames); the palette's OW tables
    of the big-endian file must not come out byte-swapped (nearly black)."""
    little, meta = read_dicom(DATA / "OBXXXX1A.dcm")
    assert meta.photometric == "PALETTE COLOR" and little.shape[-1] == 3 and 0.04 < little.mean() < 0.06
    big, _ = read_dicom(DATA / "OBXXXX1A_expb.dcm")
    np.testing.assert_array_equal(big, little)
    for name in ("OBXXXX1A_2frame.dcm", "OBXXXX1A_expb_2frame.dcm"):
        if (DATA / name).is_file():
            frames, _ = read_dicom(DATA / name, DicomSpec(frames="all"))
            np.testing.assert_array_equal(frames[:1], little)


def _mlut_as(tmp_path: Path, big_endian: bool) -> Path:
    """mlut_18.dcm with its Modality LUT Data written as OW bytes, little- or big-endian as a re-encoding would."""
    ds = _read(DATA / "mlut_18.dcm")
    item = ds.ModalityLUTSequence[0]
    values = np.asarray(item.LUTData, dtype=np.uint16)
    order = ">" if big_endian else "<"
    item["LUTData"].VR = "OW"
    item.LUTData = values.astype(f"{order}u2").tobytes()
    out = tmp_path / f"mlut_{'be' if big_endian else 'le'}_ow.dcm"
    if big_endian:
        arr = ds.pixel_array
        ds.PixelData = arr.astype(f">{arr.dtype.str[1:]}").tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        pydicom.filewriter.dcmwrite(out, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    else:
        ds.save_as(out)
    return out


@needs_data
def test_big_endian_ow_lut_data_is_read_in_the_files_byte_order(tmp_path: Path) -> None:
    spec = DicomSpec(windows=(parse_window({"center": 2000, "width": 4000}),))
    reference, _ = read_dicom(DATA / "mlut_18.dcm", spec)
    for big_endian in (False, True):
        path = _mlut_as(tmp_path, big_endian)
        assert isinstance(_read(path).ModalityLUTSequence[0].LUTData, bytes)  # OW: raw bytes, as on disk
        pixels, _ = read_dicom(path, spec)
        np.testing.assert_array_equal(pixels, reference)


@needs_data
def test_a_file_window_index_out_of_range_names_file_index_and_count(tmp_path: Path) -> None:
    """``file:i`` past the file's own windows, or past its VOI LUT Sequence items, is one clear error (it was
    silently the last VOI LUT)."""
    vlut = DATA / "vlut_04.dcm"
    n_luts = len(_read(vlut).VOILUTSequence)
    with pytest.raises(ValueError, match=rf"vlut_04\.dcm: window file:{n_luts} asked for, but the file has "
                                         rf"{n_luts} VOI LUT\(s\)"):  # fmt: skip
        read_dicom(vlut, DicomSpec(windows=(parse_window(f"file:{n_luts}"),)))
    ct = DATA / "693_J2KR.dcm"
    centers = _read(ct).WindowCenter
    n_windows = len(centers) if isinstance(centers, pydicom.multival.MultiValue) else 1
    with pytest.raises(ValueError, match=rf"693_J2KR\.dcm: window file:5 asked for, but the file has {n_windows} "
                                         r"window\(s\)"):  # fmt: skip
        read_dicom(ct, DicomSpec(windows=(parse_window("file:5"),)))


@needs_data
def test_max_pixels_counts_palette_colour_as_the_rgb_it_decodes_to() -> None:
    ds = _read(DATA / "OBXXXX1A.dcm")
    assert int(ds.SamplesPerPixel) == 1
    assert declared_values(ds, "first") == int(ds.Rows) * int(ds.Columns) * 3
    pixels, _ = read_dicom(DATA / "OBXXXX1A.dcm")
    assert pixels[0].size == declared_values(ds, "first")  # what is counted is what decoding allocates


def test_a_negative_number_of_frames_is_refused_naming_the_value(tmp_path: Path) -> None:
    ds = _read(PYDICOM / "CT_small.dcm")
    broken = copy.deepcopy(ds)
    broken.NumberOfFrames = -1
    broken.save_as(tmp_path / "neg.dcm")
    for frames in ("first", "all"):
        with pytest.raises(DicomReadError, match=r"neg\.dcm: NumberOfFrames is -1; expected 1 or more"):
            read_dicom(tmp_path / "neg.dcm", DicomSpec(frames=frames))  # type: ignore[arg-type]

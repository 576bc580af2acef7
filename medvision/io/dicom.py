"""DICOM to float32 pixels, in pure steps: decode, modality LUT, VOI, photometric, frames.

``read_dicom(path, spec)`` returns an array of shape (frames, H, W, C) in [0, 1] and a small
metadata record. Each step is a pure function that the tests check by hand and against pydicom:

1. decode: pydicom with the pylibjpeg plugins (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000,
   RLE, deflate, big-endian); YBR colour comes out as RGB, PALETTE COLOR through its LUT.
2. :func:`modality_lut`: RescaleSlope/RescaleIntercept, or a Modality LUT Sequence, to real units (HU).
3. :func:`voi_window` / :func:`voi_lut`: the file's window (which of several: ``voi_index``), its VOI
   LUT Sequence, named presets (``lung``, ``brain`` ...) or explicit center/width; several windows
   stack as channels. With no window at all, the 0.5-99.5 percentile range (:func:`percentile_window`).
4. MONOCHROME1 is inverted after VOI, so that high values are bright.

Nothing is rescaled to 8 bit and nothing is resized here; that happens in the transform pipeline.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import pydicom.config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from medvision.io.image import ImageReadError


def no_value_checks() -> None:
    """Turns off pydicom's check of each value as it is read: in its default mode it prints an invalid one on stderr,
    and legacy archives are full of UIDs with a leading-zero component (``1.2.840.113619.2.55.3.0969...``), which
    link to a patient's study in a PACS; a batch job's stderr is a saved log. medvision only reads values, so the
    check has nothing to guard (what it writes is checked where it writes, :mod:`medvision.wsi.synthetic`)."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


no_value_checks()  # on import: every path that reads DICOM imports this module (the slide reader calls it too)

VOIFunction = Literal["LINEAR", "LINEAR_EXACT", "SIGMOID"]
FramePolicy = Literal["first", "middle", "all", "tiled"]

#: Named CT windows as (center, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (50.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "liver": (30.0, 150.0),
}

#: Storage classes with pixel data that is not an image to classify (dose grids, segmentations ...).
NON_IMAGE_MODALITIES = {"SR", "RTDOSE", "RTSTRUCT", "RTPLAN", "SEG", "KO", "PR", "REG", "DOC"}


class DicomReadError(ImageReadError):
    """A DICOM file that cannot be turned into pixels; the message names the file."""


class NotADicomImage(DicomReadError):
    """Not DICOM (no preamble), or DICOM without image pixel data (SR, RTDOSE, SEG ...): skipped."""


class NotDicom(NotADicomImage):
    """Not a DICOM file at all: no DICM preamble and nothing pydicom can parse as a dataset."""


class DicomParseError(DicomReadError):
    """A file pydicom starts to parse as DICOM but cannot finish (a damaged or truncated header)."""


class DicomDecodeError(DicomReadError):
    """Pixel data that no installed decoder can decode; names the file and its transfer syntax."""


#: The version of the pixels :func:`read_dicom` gives: bumped whenever they change for some file (2: Enhanced
#: CT/MR rescale and window from the functional groups; big-endian palette and OW LUT data in the file's byte
#: order). Pixel caches key on it, so a cache filled by an older reader is never served after an upgrade.
READER_VERSION = 2


def shipped_test_folders() -> dict[str, Path]:
    """The real DICOM files installed with the packages: ``"pydicom"`` (its ``data/test_files``) and, when
    installed, ``"pydicom-data"`` (its data store). Read from disk, never through
    ``pydicom.data.get_testdata_files()``, which may try the network for a file it lacks."""
    folders = {"pydicom": Path(pydicom.__file__).parent / "data" / "test_files"}
    try:
        dist = importlib.metadata.distribution("pydicom-data")
    except importlib.metadata.PackageNotFoundError:
        return folders
    folders["pydicom-data"] = Path(str(dist.locate_file("data_store/data")))
    return folders


@dataclass(frozen=True)
class Window:
    """One VOI window: ``file`` (the file's own, entry ``index``), a preset name, or center/width."""

    kind: Literal["file", "preset", "explicit", "percentile"]
    center: float = 0.0
    width: float = 1.0
    index: int = 0
    name: str = ""


def parse_window(value: Any) -> Window:
    """``"file"``, ``"file:1"``, ``"lung"``, ``"percentile"``, ``{center: 40, width: 80}`` or ``[40, 80]``."""
    if isinstance(value, dict):
        if set(value) != {"center", "width"}:
            raise ValueError(f"window {value!r}: expected exactly the keys center and width (found "
                             f"{', '.join(map(str, value)) or 'none'})")  # fmt: skip
        c, w = float(value["center"]), float(value["width"])
        return Window("explicit", c, w, name=f"{c:g}/{w:g}")
    if isinstance(value, list | tuple) and len(value) == 2:
        return Window("explicit", float(value[0]), float(value[1]), name=f"{value[0]}/{value[1]}")
    text = str(value)
    if text == "percentile":
        return Window("percentile", name=text)
    if text == "file" or text.startswith("file:"):
        return Window("file", index=int(text.split(":")[1]) if ":" in text else 0, name=text)
    if text in WINDOW_PRESETS:
        c, w = WINDOW_PRESETS[text]
        return Window("preset", c, w, name=text)
    raise ValueError(
        f"window {value!r} is not one of file, file:<i>, percentile, {', '.join(WINDOW_PRESETS)}, "
        "or {center: C, width: W}"
    )


@dataclass(frozen=True)
class DicomSpec:
    """How DICOM pixels become model input; the recipe's ``data.dicom`` section maps onto this."""

    windows: tuple[Window, ...] = (Window("file"),)
    voi_function: VOIFunction | None = None
    frames: FramePolicy = "first"


@dataclass
class DicomMeta:
    """What a caller may need about the file. ``patient_id`` is for grouping only, never written out."""

    path: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    modality: str
    photometric: str
    transfer_syntax: str
    n_frames: int
    frame_indices: list[int] = field(default_factory=list)
    windows: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- pure pixel maths


def modality_lut(arr: np.ndarray, slope: float = 1.0, intercept: float = 0.0,
                 lut: tuple[list[int], np.ndarray] | None = None) -> np.ndarray:  # fmt: skip
    """Stored values -> modality units: a Modality LUT (``(descriptor, data)``) if given, else slope/intercept.

    LUT descriptor = (entries, first mapped value, bits); inputs below the first value map to the
    first entry and above the last to the last entry (PS3.3 C.11.1).
    """
    if lut is not None:
        return apply_lut(arr, lut[0], lut[1]).astype(np.float32)
    out = arr.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def apply_lut(arr: np.ndarray, descriptor: list[int], data: np.ndarray) -> np.ndarray:
    """Looks values up in a DICOM LUT, clamping to its first and last entries."""
    first = int(descriptor[1])
    idx = np.clip(np.round(arr).astype(np.int64) - first, 0, len(data) - 1)
    return np.asarray(data)[idx]


def voi_window(x: np.ndarray, center: float, width: float, function: VOIFunction = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1] (LINEAR, LINEAR_EXACT or SIGMOID)."""
    x = x.astype(np.float32, copy=False)
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"LINEAR_EXACT window width must be > 0, got {width}")
        y = (x - center) / width + 0.5
    else:
        if width < 1:
            raise ValueError(f"LINEAR window width must be >= 1, got {width}")
        if width == 1:
            return (x > center - 0.5).astype(np.float32)
        y = (x - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def voi_lut(x: np.ndarray, descriptor: list[int], data: np.ndarray) -> np.ndarray:
    """A VOI LUT Sequence table, scaled to [0, 1] by the table's bit depth."""
    bits = int(descriptor[2]) or 16
    return (apply_lut(x, descriptor, data).astype(np.float32) / np.float32(2**bits - 1)).clip(0, 1)


def percentile_window(x: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Robust range when a file has no window: the 0.5-99.5 percentiles map to [0, 1]."""
    lo, hi = np.percentile(x, [low, high])
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.float32)
    return np.clip((x.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def select_frames(n_frames: int, policy: FramePolicy) -> list[int]:
    """Frame indices to use: the first, the middle one, or all (``tiled`` uses every tile for one image)."""
    if policy in ("first", "tiled"):
        return [0]
    if policy == "middle":
        return [n_frames // 2]
    return list(range(n_frames))


def tile_positions(ds: Dataset, n_frames: int) -> list[tuple[int, int]]:
    """0-based (row, col) of each frame's top-left pixel in a whole-slide image's total pixel matrix.

    TILED_SPARSE files give each frame's position in the Per-Frame Functional Groups; TILED_FULL
    files store tiles row by row, so positions follow from the tile and matrix sizes (only the
    first focal plane / optical path is used).
    """
    tile_rows, tile_cols = int(ds.Rows), int(ds.Columns)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if str(ds.get("DimensionOrganizationType", "")) != "TILED_FULL" and per_frame:
        out = []
        for item in per_frame[:n_frames]:
            pos = item.PlanePositionSlideSequence[0]
            out.append(
                (int(pos.RowPositionInTotalImagePixelMatrix) - 1, int(pos.ColumnPositionInTotalImagePixelMatrix) - 1)
            )
        return out
    per_row = -(-int(ds.TotalPixelMatrixColumns) // tile_cols)
    per_col = -(-int(ds.TotalPixelMatrixRows) // tile_rows)
    return [((k // per_row) * tile_rows, (k % per_row) * tile_cols) for k in range(min(n_frames, per_row * per_col))]


def assemble_tiles(tiles: np.ndarray, positions: list[tuple[int, int]], total_rows: int, total_cols: int) -> np.ndarray:
    """Places tiles (n, h, w[, c]) at their positions in a (total_rows, total_cols[, c]) image, cropping edges."""
    out = np.zeros((total_rows, total_cols, *tiles.shape[3:]), dtype=tiles.dtype)
    h, w = tiles.shape[1:3]
    for tile, (r, c) in zip(tiles, positions, strict=False):
        rh, cw = min(h, total_rows - r), min(w, total_cols - c)
        if rh > 0 and cw > 0:
            out[r : r + rh, c : c + cw] = tile[:rh, :cw]
    return out


# ------------------------------------------------------------------------------- file handling


def _multi(value: Any) -> list[float]:
    if value is None:
        return []
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return [float(v) for v in value]
    return [float(value)]


def little_endian(ds: Dataset) -> bool:
    """Whether the file's own elements (OW LUT data among them) are little-endian, from its transfer syntax."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None:
        return bool(ts != pydicom.uid.ExplicitVRBigEndian)
    return getattr(ds, "original_encoding", (None, None))[1] is not False


def _lut_from_item(item: Dataset, is_little_endian: bool = True) -> tuple[list[int], np.ndarray]:
    """A LUT item's (descriptor, data); OW data as stored on disk is read in the file's byte order."""
    descriptor = [int(v) for v in item.LUTDescriptor]
    raw = item.LUTData
    if isinstance(raw, bytes):
        bits = descriptor[2]
        raw = np.frombuffer(raw, dtype=np.uint8 if bits <= 8 else ("<u2" if is_little_endian else ">u2"))
    data = np.asarray(raw, dtype=np.float64)
    if descriptor[0] == 0:
        descriptor[0] = 65536
    return descriptor, data[: descriptor[0]]


def _group_item(ds: Dataset, frame: int | None, sequence: str, present: tuple[str, ...]) -> Dataset:
    """Where the file keeps ``present`` for ``frame``: the top level, else the frame's own Per-Frame Functional
    Groups item, else the Shared Functional Groups item (``sequence``, e.g. PixelValueTransformationSequence, in
    either). Enhanced CT/MR/XA files keep rescale and window only in the functional groups."""
    if any(k in ds for k in present):
        return ds
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if frame is not None and per_frame and 0 <= frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        seq = group.get(sequence)
        if seq and any(k in seq[0] for k in present):
            return seq[0]
    return ds


def rescale_item(ds: Dataset, frame: int | None = None) -> Dataset:
    """The dataset that holds frame ``frame``'s RescaleSlope/Intercept (see :func:`_group_item`)."""
    return _group_item(ds, frame, "PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept"))


def voi_item(ds: Dataset, frame: int | None = None) -> Dataset:
    """The dataset that holds frame ``frame``'s WindowCenter/Width or VOI LUT Sequence (see :func:`_group_item`)."""
    return _group_item(ds, frame, "FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTSequence"))


def _file_voi(
    x: np.ndarray, ds: Dataset, window: Window, function: VOIFunction | None, frame: int | None = None, path: str = ""
) -> tuple[np.ndarray, str]:
    """The file's own VOI for ``frame``: WindowCenter/Width entry ``window.index``, or that VOI LUT Sequence item."""
    item = voi_item(ds, frame)
    centers, widths = _multi(item.get("WindowCenter")), _multi(item.get("WindowWidth"))
    func: VOIFunction = function or str(item.get("VOILUTFunction", "LINEAR")).upper()  # type: ignore[assignment]
    if func not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        func = "LINEAR"
    i = window.index
    where = f"{path}: " if path else ""
    if centers and widths:
        if i >= min(len(centers), len(widths)):
            raise ValueError(f"{where}window file:{i} asked for, but the file has {min(len(centers), len(widths))} "
                             "window(s) (WindowCenter/WindowWidth)")  # fmt: skip
        return voi_window(x, centers[i], widths[i], func), f"file:{i} {centers[i]:g}/{widths[i]:g} {func}"
    seq = item.get("VOILUTSequence")
    if seq:
        if i >= len(seq):
            raise ValueError(f"{where}window file:{i} asked for, but the file has {len(seq)} VOI LUT(s) "
                             "(VOILUTSequence)")  # fmt: skip
        descriptor, data = _lut_from_item(seq[i], little_endian(ds))
        return voi_lut(x, descriptor, data), "file VOI LUT" if i == 0 else f"file:{i} VOI LUT"
    return percentile_window(x), "percentile (file has no window)"


def _syntax(ds: Dataset) -> str:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return f"{ts.name} ({ts})" if ts is not None else "unknown transfer syntax"


_PALETTE = ("Red", "Green", "Blue", "Alpha")


def palette_dataset(ds: Dataset) -> Dataset:
    """The file's Palette Color LUT as pydicom's ``apply_color_lut`` reads it. pydicom (3.0) reads unsegmented OW
    LUT data as little-endian whatever the transfer syntax, so a big-endian file's tables would come out byte-swapped
    (an ultrasound image nearly black): here they are given to it in little-endian order. Segmented tables, which
    pydicom reads in the file's byte order, and little-endian files are passed through as they are."""
    if little_endian(ds) or "RedPaletteColorLookupTableData" not in ds:
        return ds
    out = Dataset()
    for colour in _PALETTE:
        for kind in ("Descriptor", "Data"):
            keyword = f"{colour}PaletteColorLookupTable{kind}"
            if keyword not in ds:
                continue
            elem = ds[keyword]
            value = elem.value
            if kind == "Data" and elem.VR == "OW" and isinstance(value, bytes) and len(value) % 2 == 0:
                value = np.frombuffer(value, ">u2").astype("<u2").tobytes()
            out.add_new(elem.tag, elem.VR, value)
    return out


def decode(ds: Dataset, path: str, index: int | None = None) -> np.ndarray:
    """Frames as (frames, H, W) or (frames, H, W, 3): all of them, or only frame ``index``.

    YBR colour is converted to RGB and PALETTE COLOR goes through its LUT.
    """
    ts_text = _syntax(ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pydicom.pixels.pixel_array(ds, index=index)
        photometric = str(ds.get("PhotometricInterpretation", ""))
        if photometric == "PALETTE COLOR":
            arr = pydicom.pixels.apply_color_lut(arr, palette_dataset(ds))
    except Exception as err:
        raise DicomDecodeError(f"{path}: cannot decode pixel data with {ts_text}: {type(err).__name__}: {err}") from err
    frames = 1 if index is not None else int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1))
    is_rgb = arr.ndim == (4 if frames > 1 else 3) and arr.shape[-1] == 3
    if frames == 1:
        arr = arr[None]
    if samples == 1 and not is_rgb and arr.ndim != 3:
        raise DicomDecodeError(f"{path}: unexpected pixel array shape {arr.shape} for {frames} frame(s)")
    return arr


def read_dataset(path: str | Path, defer_size: int | None = None, force: bool = False) -> Dataset:
    """Reads a DICOM file; raises :class:`NotADicomImage` for non-DICOM files and non-image objects.

    ``defer_size`` leaves element values above that many bytes (Pixel Data) on disk until they are
    used, so that a header can be checked before a large file is read into memory. ``force`` reads a
    file without the DICM preamble and file meta (older files), which is only safe for files that are
    meant to be DICOM.
    """
    try:
        ds = pydicom.dcmread(str(path), defer_size=defer_size, force=force)
        if force and "SOPClassUID" not in ds and "PixelData" not in ds:
            raise InvalidDicomError("no preamble, and read without one it has no SOP Class UID or Pixel Data")
    except InvalidDicomError as err:
        raise NotDicom(f"{path}: not a DICOM file ({err})") from None
    except FileNotFoundError:
        raise DicomReadError(f"{path}: file does not exist") from None
    except Exception as err:
        raise DicomParseError(f"{path}: cannot parse DICOM ({type(err).__name__}: {err})") from err
    modality = str(ds.get("Modality", ""))
    sop_class = ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else None
    image_class = "Rows" in ds or (sop_class is not None and "Image" in pydicom.uid.UID(str(sop_class)).name)
    if "PixelData" not in ds and image_class and modality not in NON_IMAGE_MODALITIES:
        # pydicom returns an empty dataset when an encapsulated Pixel Data element is cut short
        raise DicomDecodeError(
            f"{path}: cannot decode pixel data with {_syntax(ds)}: the Pixel Data element is missing or truncated"
        )
    if modality in NON_IMAGE_MODALITIES or "PixelData" not in ds:
        kind = modality or str(ds.get("SOPClassUID", "unknown class"))
        raise NotADicomImage(f"{path}: DICOM without image pixel data ({kind})")
    return ds


def declared_values(ds: Dataset, frames: FramePolicy) -> int:
    """Pixel values a decode of ``ds`` would allocate, from its header alone (before any decoding).

    Rows x Columns x SamplesPerPixel (3 for PALETTE COLOR, which decodes to RGB) for the one frame decoded at a
    time, or for ``tiled`` the whole slide's total pixel matrix plus all its tiles.
    """
    try:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
            samples = 3  # one stored index per pixel, but decoded through the palette as RGB
        per_frame = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * samples
        if frames != "tiled":
            return per_frame
        total = int(ds.get("TotalPixelMatrixRows", 0) or 0) * int(ds.get("TotalPixelMatrixColumns", 0) or 0)
        return total * samples + per_frame * int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 0  # unreadable sizes: the decoder reports them


def frame_count(ds: Dataset, path: str | Path) -> int:
    """NumberOfFrames (1 when absent, empty or 0, as pydicom reads it).

    Raises:
        DicomReadError: a value that is not a whole number of at least 1 (a header that says -1 frames).
    """
    value = ds.get("NumberOfFrames", 1)
    try:
        n = int(value or 1)
    except (TypeError, ValueError):
        raise DicomReadError(f"{path}: NumberOfFrames {value!r} is not a whole number; expected 1 or more") from None
    if n < 1:
        raise DicomReadError(f"{path}: NumberOfFrames is {n}; expected 1 or more")
    return n


def read_dicom(
    path: str | Path, spec: DicomSpec | None = None, frame: int | None = None, dataset: Dataset | None = None
) -> tuple[np.ndarray, DicomMeta]:
    """Reads one DICOM file to float32 (frames, H, W, C) in [0, 1] plus its metadata.

    Greyscale images get one channel per window in ``spec.windows``; colour images come out as RGB
    scaled by their bit depth (windows do not apply to colour). ``frame`` decodes that one frame only,
    instead of the frames ``spec.frames`` selects. ``dataset``, if given, is the already-read file.

    Examples:
        >>> pixels, meta = read_dicom("ct.dcm", DicomSpec(windows=(parse_window("lung"), parse_window("bone"))))
    """
    spec = spec or DicomSpec()
    path = str(path)
    ds = dataset if dataset is not None else read_dataset(path)
    n_frames = frame_count(ds, path)
    if spec.frames == "tiled" and frame is None:
        if "TotalPixelMatrixRows" not in ds or "TotalPixelMatrixColumns" not in ds:
            raise DicomReadError(f"{path}: frames 'tiled' needs a whole-slide image (TotalPixelMatrixRows/Columns)")
        tiles = decode(ds, path)
        image = assemble_tiles(
            tiles, tile_positions(ds, len(tiles)), int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns)
        )
        return _to_unit(image[None], ds, spec, _meta(ds, path, n_frames, list(range(n_frames))))
    chosen = [frame] if frame is not None else select_frames(n_frames, spec.frames)
    if not 0 <= chosen[0] < n_frames:
        raise DicomReadError(f"{path}: frame {chosen[0]} asked for, but the file has {n_frames} frame(s)")
    frames = decode(ds, path, index=chosen[0] if len(chosen) == 1 and n_frames > 1 else None)
    if n_frames > 1 and len(chosen) > 1:
        frames = frames[chosen]
    return _to_unit(frames, ds, spec, _meta(ds, path, n_frames, chosen))


def _meta(ds: Dataset, path: str, n_frames: int, chosen: list[int]) -> DicomMeta:
    return DicomMeta(
        path=path,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        patient_id=str(ds.get("PatientID", "")),
        modality=str(ds.get("Modality", "")),
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else "",
        n_frames=n_frames,
        frame_indices=chosen,
    )


def _to_unit(frames: np.ndarray, ds: Dataset, spec: DicomSpec, meta: DicomMeta) -> tuple[np.ndarray, DicomMeta]:
    """Decoded frames -> float32 (frames, H, W, C) in [0, 1]: colour by bit depth, grey by LUT and VOI."""
    photometric = meta.photometric
    if frames.ndim == 4:  # colour
        if photometric == "PALETTE COLOR":  # the LUT output is 8- or 16-bit whatever BitsStored says
            bits = 16 if frames.dtype == np.uint16 else 8
        else:
            bits = int(ds.get("BitsStored", 8))
        meta.windows = ["rgb"]
        return (frames.astype(np.float32) / np.float32(2**bits - 1)).clip(0, 1), meta

    # an enhanced file may give each frame its own rescale and window: such frames are mapped one at a time
    indices: list[int | None] = list(meta.frame_indices) if len(meta.frame_indices) == len(frames) else [None]
    per_frame = len(indices) > 1 and len({(id(rescale_item(ds, i)), id(voi_item(ds, i))) for i in indices}) > 1
    groups = [(i, frames[k : k + 1]) for k, i in enumerate(indices)] if per_frame else [(indices[0], frames)]
    out = []
    for index, group in groups:
        real = modality_lut_for(group, ds, index)
        channels = []
        used_now = []
        for window in spec.windows:
            if window.kind == "file":
                image, used = _file_voi(real, ds, window, spec.voi_function, index, meta.path)
            elif window.kind == "percentile":
                image, used = percentile_window(real), "percentile"
            else:
                image = voi_window(real, window.center, window.width, spec.voi_function or "LINEAR")
                used = f"{window.name} {window.center:g}/{window.width:g}"
            if photometric == "MONOCHROME1":
                image = 1.0 - image
            channels.append(image)
            used_now.append(used)
        if not meta.windows:
            meta.windows = used_now  # the first frame's (frames read one at a time each name their own)
        out.append(np.stack(channels, axis=-1))
    return np.concatenate(out).astype(np.float32), meta


def modality_lut_for(arr: np.ndarray, ds: Dataset, frame: int | None = None) -> np.ndarray:
    """Applies the file's Modality LUT Sequence, or frame ``frame``'s RescaleSlope/Intercept (top level, else
    its Per-Frame or the Shared Functional Groups' Pixel Value Transformation), to stored values."""
    seq = ds.get("ModalityLUTSequence")
    if seq:
        return modality_lut(arr, lut=_lut_from_item(seq[0], little_endian(ds)))
    item = rescale_item(ds, frame)
    return modality_lut(
        arr, float(item.get("RescaleSlope", 1.0) or 1.0), float(item.get("RescaleIntercept", 0.0) or 0.0)
    )

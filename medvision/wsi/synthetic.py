"""Whole-slide test images built from real H&E tiles, written as SVS, TIFF, OME-TIFF and DICOM WSI.

No real slide can be downloaded where the tests and benchmarks run, and a slide of random noise
tests nothing: a tissue detector must tell stained tissue from glass, a reader must decode real JPEG
tiles and find microns per pixel where each format keeps them, and a de-identifying pipeline must
never let a vendor's ``Filename``/``User`` fields or DICOM patient tags through. So a slide here is
glass (bright grey with scanner noise) holding blob-shaped pieces of tissue tiled from the nine
224 x 224 H&E tiles in ``shared/data/he_tiles`` (the class is the file-name prefix), tumour regions
tiled from the ``TUM`` tile, and optionally a pathologist's marker stroke on the glass. The exact
boxes are known, so ``truth.json`` from :func:`build_slide_set` gives tests their ground truth.

What the readers report for each flavour (openslide-python 1.4.7 / openslide-bin 4.0.1.2, tiffslide
3.0.1, wsidicom 0.36.1, checked by opening the files written here):

- ``aperio`` (``.svs``): OpenSlide vendor ``aperio``, the tiled pages are the levels, the stripped
  pages are the ``thumbnail``, ``label`` and ``macro`` associated images; ``openslide.mpp-x`` is the
  description's ``MPP`` string (absent without ``mpp``), and every description field is a property
  (``aperio.Filename``, ``aperio.User``: patient-identifying). tiffslide reads the same levels and
  ``tiffslide.mpp-x``.
- ``generic`` (``.tif``): OpenSlide vendor ``generic-tiff``, every tiled top-level page is a level.
  OpenSlide 4 does turn the resolution tags into ``openslide.mpp-x/y`` (``1e4 / XResolution`` when
  ``tiff.ResolutionUnit`` is ``centimeter``), next to ``tiff.XResolution`` (``40000`` at 0.25 µm/px);
  without ``mpp`` only ``tiff.XResolution`` ``1`` and ``tiff.ResolutionUnit`` ``none`` are there.
  tiffslide (vendor ``None``) reports ``tiffslide.mpp-x`` from the same tags. ``Filename``/``User`` are
  in the DocumentName/Artist tags (``tiff.DocumentName``, ``tiff.Artist``), because scanners that
  write plain TIFF put identifying text in such tags.
- ``ome`` (``.ome.tif``): the pyramid sits in SubIFDs of the first page, as OME-TIFF prescribes.
  tiffslide reads all levels, but takes ``tiffslide.mpp-x`` from the TIFF resolution tags, not from
  OME ``PhysicalSizeX`` (an OME-TIFF without the tags reads as mpp ``None``), so both are written.
  OpenSlide opens it as ``generic-tiff`` with level 0 only (it does not follow SubIFDs) and the
  resolution-tag MPP.
- ``dicom``: see :func:`write_dicom_wsi` for wsidicom's conventions and sparse-tile filling.

All TIFF flavours hold tiled baseline JPEG in YCbCr with 2x2 chroma subsampling (tifffile's default
for ``photometric="rgb"`` with JPEG: it stores PhotometricInterpretation YCbCr and the
YCbCrSubSampling tag); OpenSlide, tiffslide and tifffile all decode it back to RGB. Tiles must
therefore be a multiple of 16 pixels.

Examples:
    >>> rgb = compose_slide(HE_DIR, 4096, 3072, [(300, 200, 1800, 2500)], [(800, 900, 500, 600)])
    >>> write_pyramidal_tiff(tmp / "case.svs", rgb, 0.25)
    >>> manifest = build_slide_set(HE_DIR, tmp / "cohort", formats=("aperio", "dicom-sparse"))
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, cast

import cv2
import numpy as np
import tifffile
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset

from medvision.wsi.synthetic_compose import Box, compose_slide, tissue_core_box

Flavour = Literal["aperio", "generic", "ome"]

#: Slide formats :func:`build_slide_set` can write, and the file suffix of each ("" for a DICOM folder).
SLIDE_FORMATS = {"aperio": ".svs", "generic": ".tif", "ome": ".ome.tif", "dicom": "", "dicom-sparse": ""}

_DEFAULT_FILENAME = "SMITH_JOHN_1957-03-02"
_DEFAULT_USER = "jsmith"
_VL_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


# ---------------------------------------------------------------------------------------------------
# Composing the level-0 image


# ---------------------------------------------------------------------------------------------------
# Pyramids and TIFF flavours


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        got = f"shape {getattr(rgb, 'shape', None)} dtype {getattr(rgb, 'dtype', type(rgb).__name__)}"
        raise ValueError(f"rgb: {got}; expected an (H, W, 3) uint8 array")


def _check_common(mpp: float | None, tile: int, downsamples: Sequence[int], quality: int, multiple: int) -> None:
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp={mpp}: expected a positive number of microns per pixel (e.g. 0.25) or None")
    if tile <= 0 or tile % multiple:
        raise ValueError(f"tile={tile}: expected a positive multiple of {multiple} (JPEG chroma subsampling blocks)")
    ds = list(downsamples)
    if not ds or ds[0] != 1 or any(int(b) != b or b <= a for a, b in itertools.pairwise(ds)):
        raise ValueError(f"downsamples={tuple(ds)}: expected increasing integers starting at 1, e.g. (1, 4, 16)")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality={quality}: expected a JPEG quality in 1..100")


def level_size(width: int, height: int, downsample: int) -> tuple[int, int]:
    """(width, height) of a pyramid level: level-0 size floor-divided by the downsample, at least 1."""
    return max(1, width // downsample), max(1, height // downsample)


def pyramid_levels(rgb: np.ndarray, downsamples: Sequence[int] = (1, 4, 16)) -> list[np.ndarray]:
    """Each level area-averaged (``cv2.INTER_AREA``) straight from level 0, as the writers store them.

    Public so that tests compare what a reader returns at level ``i`` with ``pyramid_levels(...)[i]``.
    """
    h, w = rgb.shape[:2]
    levels = [rgb]
    for d in downsamples[1:]:
        levels.append(cv2.resize(rgb, level_size(w, h, int(d)), interpolation=cv2.INTER_AREA))
    return levels


def _jpeg_args(quality: int) -> dict[str, object]:
    # tifffile fills in (mutates) compressionargs, so every write needs a dict of its own
    return {"compression": "jpeg", "compressionargs": {"level": quality}, "photometric": "rgb",
            "subsampling": (2, 2), "metadata": None}  # fmt: skip


def _aperio_description(w: int, h: int, tile: int, quality: int, fields: dict[str, str]) -> str:
    """The Aperio ImageDescription of level 0: library line, geometry, then ``|key = value`` fields."""
    head = f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,100 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q={quality}"
    return "|".join([head, *(f"{k} = {v}" for k, v in fields.items())])


def _label_image(text_seed: str) -> np.ndarray:
    """A slide label: white, with a barcode-like pattern fixed by ``text_seed`` (no readable text)."""
    label = np.full((384, 384, 3), 250, np.uint8)
    bits = np.frombuffer(hashlib.sha256(text_seed.encode()).digest(), np.uint8)
    bars = np.unpackbits(bits)[:96].astype(bool)
    cols = np.repeat(bars, 3)
    label[60:200, 48 : 48 + cols.size][:, cols] = 20
    cv2.rectangle(label, (40, 240), (340, 330), (30, 30, 30), 3)
    return label


def write_pyramidal_tiff(
    path: Path,
    rgb: np.ndarray,
    mpp: float | None,
    *,
    flavour: Flavour = "aperio",
    tile: int = 256,
    downsamples: tuple[int, ...] = (1, 4, 16),
    quality: int = 90,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Writes ``rgb`` as a tiled, JPEG-compressed pyramidal TIFF of one flavour and returns ``path``.

    - ``aperio``: an SVS as Aperio scanners write it: level 0 tiled with the Aperio ImageDescription
      (``AppMag`` = 10 / mpp, so 40 at 0.25 µm/px, 20 without mpp; ``MPP`` only when ``mpp`` is given),
      a stripped JPEG thumbnail page (longest side <= 1024), the lower levels tiled, then stripped
      ``label`` and ``macro`` pages. ``metadata`` adds or overrides description fields; ``Filename``
      and ``User`` default to the patient-identifying ``SMITH_JOHN_1957-03-02`` and ``jsmith``.
    - ``generic``: each level a tiled top-level page (lower ones NewSubfileType reduced), XResolution/
      YResolution in pixels per centimeter (``1e4 / (mpp * downsample)``), no ImageDescription;
      ``Filename``/``User`` go to the DocumentName/Artist tags.
    - ``ome``: OME-TIFF, level 0 with the lower levels in its SubIFDs, ``PhysicalSizeX/Y`` in µm
      and the ``Filename`` as the OME Image Name.

    What OpenSlide and tiffslide report for each is in the module docstring. For ``generic``, keep one
    constant factor between levels (2, 3 or 4, as the default (1, 4, 16)): tiffslide takes its levels from
    tifffile, which chains top-level pages into a pyramid only at a constant factor, so (1, 2, 8) opens
    there with two levels while OpenSlide sees three.

    Raises:
        ValueError: ``rgb``, ``mpp``, ``tile``, ``downsamples``, ``quality`` or ``flavour`` out of range.
    """
    _check_rgb(rgb)
    _check_common(mpp, tile, downsamples, quality, 16)
    if flavour not in ("aperio", "generic", "ome"):
        raise ValueError(f"flavour={flavour!r}: expected 'aperio', 'generic' or 'ome'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = rgb.shape[:2]
    levels = pyramid_levels(rgb, downsamples)
    meta = {"Filename": _DEFAULT_FILENAME, "User": _DEFAULT_USER, **(metadata or {})}
    tiles = (tile, tile)

    if flavour == "aperio":
        mag = round(10.0 / mpp) if mpp is not None else 20
        fields = {"AppMag": str(mag), "StripeWidth": "2040", "ScanScope ID": "SS1234", "Filename": meta["Filename"],
                  "Date": "11/21/26", "Time": "10:41:02", "User": meta["User"]}  # fmt: skip
        fields.update({k: v for k, v in meta.items() if k not in ("Filename", "User")})
        if mpp is not None:
            fields["MPP"] = repr(float(mpp))
        desc = _aperio_description(w, h, tile, quality, fields)
        body = desc.split("|", 1)[1]
        head = f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,100 {w}x{h}] ({tile}x{tile})"
        scale = max(1, -(-max(w, h) // 1024))
        thumb = cv2.resize(rgb, level_size(w, h, scale), interpolation=cv2.INTER_AREA)
        label = _label_image(meta["Filename"])
        macro = cv2.resize(rgb, level_size(w, h, max(1, -(-max(w, h) // 768))), interpolation=cv2.INTER_AREA)
        with tifffile.TiffWriter(path, bigtiff=rgb.nbytes > 2**31) as tif:
            tif.write(levels[0], tile=tiles, description=desc, **_jpeg_args(quality))
            th, tw = thumb.shape[:2]
            tif.write(thumb, rowsperstrip=16, description=f"{head} -> {tw}x{th} JPEG/RGB Q={quality}|{body}",
                      **_jpeg_args(quality))  # fmt: skip
            for level in levels[1:]:
                lh, lw = level.shape[:2]
                tif.write(level, tile=tiles, description=f"{head} -> {lw}x{lh} JPEG/RGB Q={quality}|{body}",
                          **_jpeg_args(quality))  # fmt: skip
            lab = f"Aperio Image Library v12.0.15\r\nlabel {label.shape[1]}x{label.shape[0]}"
            tif.write(label, rowsperstrip=label.shape[0], compression="lzw", photometric="rgb", subfiletype=1,
                      description=lab, metadata=None)  # fmt: skip
            mac = f"Aperio Image Library v12.0.15\r\nmacro {macro.shape[1]}x{macro.shape[0]}"
            tif.write(macro, rowsperstrip=16, subfiletype=9, description=mac, **_jpeg_args(quality))
        return path

    if flavour == "generic":
        extratags = [(269, "s", 0, meta["Filename"], True), (315, "s", 0, meta["User"], True)]
        with tifffile.TiffWriter(path, bigtiff=rgb.nbytes > 2**31) as tif:
            for i, level in enumerate(levels):
                lh, lw = level.shape[:2]
                res = {}
                if mpp is not None:
                    res = {"resolution": (1e4 * lw / (mpp * w), 1e4 * lh / (mpp * h)), "resolutionunit": "CENTIMETER"}
                tif.write(level, tile=tiles, subfiletype=1 if i else 0, extratags=extratags if i == 0 else (),
                          **res, **_jpeg_args(quality))  # fmt: skip
        return path

    ome_meta: dict[str, object] = {"axes": "YXS", "Name": meta["Filename"]}
    if mpp is not None:
        ome_meta.update({"PhysicalSizeX": float(mpp), "PhysicalSizeXUnit": "µm",
                         "PhysicalSizeY": float(mpp), "PhysicalSizeYUnit": "µm"})  # fmt: skip
    with tifffile.TiffWriter(path, bigtiff=rgb.nbytes > 2**31, ome=True) as tif:
        args = _jpeg_args(quality)
        args["metadata"] = ome_meta
        res = {}
        if mpp is not None:
            res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
        tif.write(levels[0], tile=tiles, subifds=len(levels) - 1, **res, **args)
        for level in levels[1:]:
            tif.write(level, tile=tiles, subfiletype=1, **_jpeg_args(quality))
    return path


# ---------------------------------------------------------------------------------------------------
# DICOM VL Whole Slide Microscopy


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _jpeg_frame(tile: np.ndarray, quality: int) -> bytes:
    """One baseline JPEG frame. Pillow's ``subsampling=1`` is 4:2:2, which is what YBR_FULL_422 states."""
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=quality, subsampling=1)
    return buf.getvalue()


def _tile_grid(level: np.ndarray, tile: int) -> np.ndarray:
    """(rows, cols, tile, tile, 3) view of a level padded at the right and bottom by edge replication.

    Edge replication rather than white keeps JPEG from ringing at the border of the last tiles; what
    lies past the TotalPixelMatrix is never shown by a reader.
    """
    h, w = level.shape[:2]
    ny, nx = -(-h // tile), -(-w // tile)
    padded = np.pad(level, ((0, ny * tile - h), (0, nx * tile - w), (0, 0)), mode="edge")
    return padded.reshape(ny, tile, nx, tile, 3).swapaxes(1, 2)


def glass_tiles(level: np.ndarray, tile: int) -> np.ndarray:
    """Boolean (rows, cols) over a level's tile grid: tiles that are all glass, holding no tissue or ink.

    These are the tiles a sparse DICOM scan leaves out. A glass pixel is bright (every channel >= 225) and
    grey (channels within 12 of each other), which even the palest stained tissue (MUC) and ink are not
    everywhere in a tile. The per-pixel test is OpenCV on channel planes, and the per-tile "any" a max
    along contiguous axes, because NumPy reductions over the 5-D tile view take ~0.3 s per 4096 x 3072 level.
    """
    h, w = level.shape[:2]
    ny, nx = -(-h // tile), -(-w // tile)
    r, g, b = cv2.split(np.ascontiguousarray(level))
    lo, hi = cv2.min(cv2.min(r, g), b), cv2.max(cv2.max(r, g), b)
    content = ((lo < 225) | (cv2.subtract(hi, lo) > 12)).view(np.uint8)
    padded = cv2.copyMakeBorder(content, 0, ny * tile - h, 0, nx * tile - w, cv2.BORDER_REPLICATE)
    return padded.reshape(ny, tile, nx, tile).max(axis=3).max(axis=1) == 0


def _pixel_measures(mpp: float | None, sx: float, sy: float) -> Dataset:
    item = Dataset()
    if mpp is not None:
        item.PixelSpacing = [f"{mpp * sy / 1000:.10g}", f"{mpp * sx / 1000:.10g}"]  # row, column spacing, mm
    item.SliceThickness = 0.001  # mm; a single focal plane ~1 µm deep
    return item


def write_dicom_wsi(
    folder: Path,
    rgb: np.ndarray,
    mpp: float | None,
    *,
    tile: int = 256,
    downsamples: tuple[int, ...] = (1, 4, 16),
    sparse: bool = False,
    quality: int = 90,
    patient_name: str = "SMITH^JOHN",
    patient_id: str = "PID-0042",
) -> Path:
    """Writes ``rgb`` as a DICOM VL Whole Slide Microscopy series, one ``level-{i}.dcm`` per level.

    Frames are baseline JPEG (transfer syntax 1.2.840.10008.1.2.4.50, YBR_FULL_422 from Pillow at
    4:2:2). Level 0 is ORIGINAL\\PRIMARY\\VOLUME\\NONE, the others DERIVED\\PRIMARY\\VOLUME\\RESAMPLED;
    all share StudyInstanceUID, SeriesInstanceUID and FrameOfReferenceUID (derived from the pixels,
    the folder name and the patient, so rewriting the same slide gives the same UIDs). PixelSpacing
    (mm, in the shared functional groups) is left out when ``mpp`` is None. Patient, study and specimen
    tags are filled with identifying values on purpose, for tests that check nothing leaks.

    ``sparse=False`` writes TILED_FULL (every tile, row-major). ``sparse=True`` writes TILED_SPARSE: the
    tiles :func:`glass_tiles` calls glass are left out, as a scanner does, and every frame has a
    PlanePositionSlideSequence with 1-based Column/RowPositionInTotalImagePixelMatrix.

    wsidicom 0.36.1 (checked on these files): ``WsiDicom.open(folder)`` finds one pyramid;
    ``levels[i].level`` is log2 of the downsample (0, 2, 4 for downsamples 1, 4, 16) and
    ``read_region(location, level, size)`` takes that *level number*, not the index, with ``location``
    and ``size`` in pixels *of that level* (OpenSlide takes a level-0 location). A level number with no
    instance (1, 3) is not an error: it is resampled on the fly from the nearest level. A region past
    the level's edge raises ``WsiDicomOutOfBoundsError``. ``wsi.mpp`` is level 0's µm/px. Without
    PixelSpacing (``mpp=None``) the series does not open at all: ``WsiDicomNoResolutionError``. Tiles a
    sparse image leaves out read back as pure white (255, 255, 255), not as the glass colour around them.

    Raises:
        ValueError: ``rgb``, ``mpp``, ``tile``, ``downsamples`` or ``quality`` out of range.
        FileExistsError: ``folder`` already holds ``.dcm`` files other than those this writes.
    """
    from pydicom.encaps import encapsulate
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, JPEGBaseline8Bit, generate_uid

    _check_rgb(rgb)
    _check_common(mpp, tile, downsamples, quality, 16)
    folder = Path(folder)
    names = [f"level-{i}.dcm" for i in range(len(downsamples))]
    if folder.is_dir():
        others = sorted(p.name for p in folder.glob("*.dcm") if p.name not in names)
        if others:
            raise FileExistsError(f"{folder}: already holds DICOM files {others[:3]}; expected an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    h, w = rgb.shape[:2]
    levels = pyramid_levels(rgb, downsamples)
    digest = hashlib.sha256(levels[-1].tobytes() + f"{folder.name}|{patient_id}|{mpp}|{sparse}".encode()).hexdigest()
    study, series, frame_of_ref = (generate_uid(entropy_srcs=[digest, s]) for s in ("study", "series", "for"))
    now = datetime.datetime(2026, 11, 21, 10, 41, 2)

    for i, level in enumerate(levels):
        lh, lw = level.shape[:2]
        grid = _tile_grid(level, tile)
        ny, nx = grid.shape[:2]
        keep = ~glass_tiles(level, tile) if sparse else np.ones((ny, nx), bool)
        if not keep.any():
            keep[0, 0] = True  # an instance needs at least one frame
        rows, cols = np.nonzero(keep)
        frames = [_jpeg_frame(np.ascontiguousarray(grid[r, c]), quality) for r, c in zip(rows, cols, strict=True)]
        sop = generate_uid(entropy_srcs=[digest, f"level{i}"])

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UID(_VL_WSI_SOP_CLASS), sop
        meta.TransferSyntaxUID, meta.ImplementationClassUID = JPEGBaseline8Bit, PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = _VL_WSI_SOP_CLASS, sop
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if i == 0 else \
            ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]  # fmt: skip
        ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "SM", "medvision", "synthetic"
        ds.DeviceSerialNumber, ds.SoftwareVersions = "SS1234", "medvision.wsi.synthetic"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "19570302", "M"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.PositionReferenceIndicator = "SLIDE_CORNER"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "S26-0042", "ACC-2026-0042", "DOE^JANE"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        ds.ContainerIdentifier = f"S26-0042 A1 {patient_id}"
        ds.IssuerOfTheContainerIdentifierSequence = []
        ds.ContainerTypeCodeSequence = [_code("433466003", "SCT", "Microscope slide")]
        specimen = Dataset()
        specimen.SpecimenIdentifier, specimen.SpecimenUID = "S26-0042 A1", generate_uid(entropy_srcs=[digest, "sp"])
        specimen.IssuerOfTheSpecimenIdentifierSequence, specimen.SpecimenPreparationSequence = [], []
        ds.SpecimenDescriptionSequence = [specimen]
        ds.VolumetricProperties, ds.SpecimenLabelInImage, ds.BurnedInAnnotation = "VOLUME", "NO", "NO"
        ds.FocusMethod, ds.ExtendedDepthOfField = "AUTO", "NO"
        ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
        ds.TotalPixelMatrixOriginSequence = [origin]
        if mpp is not None:
            ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = round(w * mpp / 1000, 6), round(h * mpp / 1000, 6)
            ds.ImagedVolumeDepth = 1.0  # µm, unlike width and height (mm)
        path_item = Dataset()
        path_item.OpticalPathIdentifier, path_item.OpticalPathDescription = "1", "Brightfield"
        path_item.IlluminationTypeCodeSequence = [_code("111744", "DCM", "Brightfield illumination")]
        path_item.IlluminationColorCodeSequence = [_code("414298005", "SCT", "Full Spectrum")]
        ds.OpticalPathSequence, ds.NumberOfOpticalPaths, ds.TotalPixelMatrixFocalPlanes = [path_item], 1, 1
        shared = Dataset()
        shared.PixelMeasuresSequence = [_pixel_measures(mpp, w / lw, h / lh)]
        frame_type = Dataset()
        frame_type.FrameType = ds.ImageType
        shared.WholeSlideMicroscopyImageFrameTypeSequence = [frame_type]
        ds.SharedFunctionalGroupsSequence = [shared]
        ds.DimensionOrganizationType = "TILED_SPARSE" if sparse else "TILED_FULL"
        if sparse:
            per_frame = []
            for r, c in zip(rows, cols, strict=True):
                pos = Dataset()
                pos.ColumnPositionInTotalImagePixelMatrix = int(c) * tile + 1
                pos.RowPositionInTotalImagePixelMatrix = int(r) * tile + 1
                if mpp is not None:  # slide coordinates (mm), with ImageOrientationSlide [0,-1,0,-1,0,0]
                    px = mpp * w / lw / 1000
                    pos.XOffsetInSlideCoordinateSystem = round(20.0 - int(r) * tile * px, 6)
                    pos.YOffsetInSlideCoordinateSystem = round(40.0 - int(c) * tile * px, 6)
                pos.ZOffsetInSlideCoordinateSystem = 0.0
                item = Dataset()
                item.PlanePositionSlideSequence = [pos]
                per_frame.append(item)
            ds.PerFrameFunctionalGroupsSequence = per_frame
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = lw, lh
        ds.Rows = ds.Columns = tile
        ds.NumberOfFrames = len(frames)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
        ds.LossyImageCompressionRatio = f"{len(frames) * tile * tile * 3 / max(1, sum(map(len, frames))):.2f}"
        ds.PixelData = encapsulate(frames, has_bot=True)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.save_as(folder / names[i], enforce_file_format=True)
    return folder


# ---------------------------------------------------------------------------------------------------
# A labelled cohort


def _layout(rng: np.random.Generator, width: int, height: int, tumour: bool, pen: bool) -> tuple[list[Box], ...]:
    """Tissue, tumour and pen boxes of one slide: 1-3 side-by-side tissue pieces covering ~30-50%."""
    k = int(rng.integers(1, 4))
    m = max(1, round(0.03 * min(width, height)))
    col = (width - 2 * m) / k
    tissue: list[Box] = []
    for j in range(k):
        bw, bh = int(col * rng.uniform(0.75, 0.95)), int((height - 2 * m) * rng.uniform(0.7, 0.9))
        x = m + int(j * col) + int(rng.integers(0, int(col) - bw + 1))
        y = m + int(rng.integers(0, height - 2 * m - bh + 1))
        tissue.append((x, y, bw, bh))
    tumours: list[Box] = []
    if tumour:
        n = int(rng.integers(1, 3))
        homes = [int(v) for v in rng.choice(k, size=n, replace=n > k)]
        for t, j in enumerate(homes):
            cx, cy, cw, ch = tissue_core_box(tissue[j])
            if homes.count(j) > 1:  # two tumours in one piece: one in each half of its core
                ch //= 2
                cy += ch * t
            tw, th = int(cw * rng.uniform(0.45, 0.8)), int(ch * rng.uniform(0.45, 0.8))
            tumours.append((cx + int(rng.integers(0, cw - tw + 1)), cy + int(rng.integers(0, ch - th + 1)), tw, th))
    pens: list[Box] = []
    if pen:
        top, bottom = min(b[1] for b in tissue), height - max(b[1] + b[3] for b in tissue)
        gap, y0 = (top, 0) if top >= bottom else (bottom, height - bottom)
        if gap >= 64:
            ph, pw = min(gap - 16, 160), int(width * rng.uniform(0.2, 0.4))
            pens.append((int(rng.integers(0, width - pw + 1)), y0 + (gap - ph) // 2, pw, ph))
    return tissue, tumours, pens


def build_slide_set(
    he_dir: Path,
    out_dir: Path,
    n_slides: int = 8,
    size: tuple[int, int] = (4096, 3072),
    mpp: float = 0.25,
    formats: tuple[str, ...] = ("aperio",),
    seed: int = 0,
) -> Path:
    """Writes a small labelled slide cohort and returns its CSV manifest ``slide_path,label,patient_id``.

    Half the slides (``n_slides // 2``, at seeded places) are ``tumour`` with 1-2 tumour boxes inside
    tissue, the rest ``normal``; slides ``2p`` and ``2p + 1`` belong to patient ``P{p:03d}``. Each has
    1-3 pieces of tissue; every fourth slide also has a marker stroke on the glass. Formats cycle
    through ``formats`` (:data:`SLIDE_FORMATS`); a DICOM slide is a folder. ``slide_path`` is relative
    to the manifest. ``truth.json`` beside it maps each ``slide_path`` to its label, patient, format,
    mpp, size, seed and tissue/tumour/pen boxes (x, y, w, h, level-0 pixels). Vendor metadata and DICOM
    patient tags hold the writers' identifying defaults, never the cohort's patient ids.

    Raises:
        ValueError: ``n_slides``, ``size``, ``mpp`` or a format out of range.

    Examples:
        >>> manifest = build_slide_set(Path("shared/data/he_tiles"), tmp / "cohort", formats=("aperio", "dicom"))
    """
    if n_slides < 1:
        raise ValueError(f"n_slides={n_slides}: expected at least 1")
    width, height = (int(v) for v in size)
    if width < 256 or height < 256:
        raise ValueError(f"size={size}: expected (width, height) of at least 256 x 256 pixels")
    if not formats or any(f not in SLIDE_FORMATS for f in formats):
        raise ValueError(f"formats={formats}: expected a non-empty tuple of {list(SLIDE_FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    is_tumour = np.zeros(n_slides, bool)
    is_tumour[rng.permutation(n_slides)[: n_slides // 2]] = True
    rows, truth = [], {}
    for i in range(n_slides):
        fmt, label = formats[i % len(formats)], "tumour" if is_tumour[i] else "normal"
        slide_seed = int(rng.integers(0, 2**31))
        layout_rng = np.random.default_rng(slide_seed)
        tissue, tumours, pens = _layout(layout_rng, width, height, bool(is_tumour[i]), i % 4 == 3)
        rgb = compose_slide(he_dir, width, height, tissue, tumours, seed=slide_seed, pen_boxes=pens)
        name = f"slide_{i:03d}{SLIDE_FORMATS[fmt]}"
        if fmt.startswith("dicom"):
            write_dicom_wsi(out_dir / name, rgb, mpp, sparse=fmt == "dicom-sparse")
        else:
            write_pyramidal_tiff(out_dir / name, rgb, mpp, flavour=cast(Flavour, fmt))
        patient = f"P{i // 2:03d}"
        rows.append({"slide_path": name, "label": label, "patient_id": patient})
        truth[name] = {"label": label, "patient_id": patient, "format": fmt, "mpp": mpp, "size": [width, height],
                       "seed": slide_seed, "tissue_boxes": [list(b) for b in tissue],
                       "tumour_boxes": [list(b) for b in tumours], "pen_boxes": [list(b) for b in pens]}  # fmt: skip
    manifest = out_dir / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["slide_path", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "truth.json").write_text(json.dumps(truth, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m medvision.wsi.synthetic OUT``: a labelled demo cohort of slides built from the real H&E tiles."""
    import argparse
    import os

    p = argparse.ArgumentParser(prog="python -m medvision.wsi.synthetic", description=main.__doc__)
    p.add_argument("out", type=Path, help="folder for the slides, manifest.csv and truth.json")
    p.add_argument("--he-dir", type=Path,
                   default=Path(os.environ.get("MEDVISION_SHARED", "../shared")) / "data" / "he_tiles")  # fmt: skip
    p.add_argument("--slides", type=int, default=24)
    p.add_argument("--size", type=int, nargs=2, default=(4096, 3072), metavar=("W", "H"))
    p.add_argument("--mpp", type=float, default=0.25)
    p.add_argument("--formats", default="aperio,generic,dicom", help=f"comma-separated, of {list(SLIDE_FORMATS)}")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    manifest = build_slide_set(args.he_dir, args.out, args.slides, tuple(args.size), args.mpp,
                               tuple(args.formats.split(",")), args.seed)  # fmt: skip
    print(f"{args.slides} slides and their manifest: {manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

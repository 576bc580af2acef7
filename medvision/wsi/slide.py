"""Whole-slide images behind one small interface: levels, microns per pixel, regions, thumbnail.

A :class:`Slide` hides which library decodes the file:

- OpenSlide (``openslide-python`` with the ``openslide-bin`` wheel, no system library): Aperio SVS,
  Hamamatsu NDPI, MIRAX MRXS, Leica SCN, Ventana BIF, Philips TIFF and generic tiled TIFF;
- ``tiffslide`` (tifffile + zarr) for OME-TIFF and pyramidal TIFFs OpenSlide does not read;
- ``wsidicom`` for DICOM VL Whole Slide Microscopy series (TILED_FULL and TILED_SPARSE; tiles a sparse
  scan left out are background), given as the folder that holds the series' instances.

Coordinates follow OpenSlide: ``read_region(level, x, y, w, h)`` takes the top-left corner in
**level-0** pixels and the size in pixels **of that level**, so tile coordinates recorded at level 0
stay valid whatever level they were read from. Regions are RGB uint8; whatever lies outside the
scanned area (transparent in OpenSlide, missing tiles in DICOM) is white, like glass.

Microns per pixel come from the file's own metadata (``openslide.mpp-x``, TIFF resolution tags in
centimetres or inches, DICOM ``PixelSpacing``; tiffslide reads an OME-TIFF's from its resolution
tags, and wsidicom cannot open a series without ``PixelSpacing``). A slide without it is an error naming the file,
unless the caller passes ``mpp`` (the recipe's ``data.slides.mpp``). Nothing else of the metadata
leaves this module: vendor fields such as Aperio ``Filename``/``User`` or DICOM patient tags can
identify a patient.

Why not MONAI's ``WSIReader``: it wraps the same OpenSlide/tifffile libraries, but returns
channel-first arrays through a generic ``get_data`` with per-call metadata dictionaries, and it has no
DICOM WSI backend in the installed MONAI; ``benchmarks/wsi_tiling.py`` measures its tile rate
against this module's on the same slides (see ``benchmarks/RESULTS.md``).

Examples:
    >>> with open_slide("case01.svs") as slide:
    ...     tile = slide.read_region(0, 1024, 2048, 256, 256)
"""

from __future__ import annotations

import math
import os
import re
import struct
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import cv2
import numpy as np

from medvision.errors import MedvisionError

Backend = Literal["auto", "openslide", "tiffslide", "dicom"]

#: File suffixes read as slides (a DICOM WSI is a folder of ``.dcm`` instances).
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".tif", ".tiff")

_CM_PER_UNIT = {"centimeter": 1.0, "inch": 2.54}

#: Pixels a thumbnail reads at a time (6 MB of RGB), in blocks at most THUMBNAIL_BLOCK_WIDTH wide.
THUMBNAIL_BLOCK = 1 << 21
THUMBNAIL_BLOCK_WIDTH = 2048


class SlideError(MedvisionError, ValueError):
    """A slide that cannot be opened or used; the message names the file and what was expected."""


class Slide(ABC):
    """One whole-slide image: a pyramid of levels, each a downsampled copy of level 0."""

    path: Path
    backend: str
    level_dimensions: tuple[tuple[int, int], ...]
    """(width, height) of every level, level 0 first."""
    mpp: float
    """Microns per pixel at level 0 (square pixels)."""
    mpp_source: str
    """Where ``mpp`` came from: the metadata field's name, or ``recipe`` for an explicit value."""

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Level-0 pixels per level pixel, from the dimensions (the widths' ratio)."""
        w0 = self.level_dimensions[0][0]
        return tuple(w0 / w for w, _ in self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    @abstractmethod
    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``level`` whose top-left corner is level-0 pixel (x, y)."""

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide at most ``max_size`` pixels on its long side, from the smallest level that is big enough.

        The level is read in blocks of at most :data:`THUMBNAIL_BLOCK` pixels, each shrunk as it comes
        (:func:`area_shrink_block`, OpenCV's ``INTER_AREA`` box filter, within one grey level of it on the whole
        level): a slide without a pyramid (one 100k x 80k level) would otherwise be decoded whole, ~100 GB.
        """
        w0, h0 = self.level_dimensions[0]
        scale = max_size / max(w0, h0)
        level = self.best_level(1.0 / scale if scale < 1 else 1.0)
        w, h = self.level_dimensions[level]
        size = (max(1, round(w0 * min(1.0, scale))), max(1, round(h0 * min(1.0, scale))))
        if size[0] >= w or size[1] >= h:  # the level is (within 1%) the thumbnail's size: read it as it is
            region = self._read_level(level, None)
            return region if (w, h) == size else cv2.resize(region, size, interpolation=cv2.INTER_AREA)
        return self._read_level(level, size)

    def _read_level(self, level: int, size: tuple[int, int] | None) -> np.ndarray:
        """The whole of ``level``, read block by block; shrunk to ``size`` (width, height) as it is read, or as it
        is (``size`` None)."""
        w, h = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        cols = min(w, THUMBNAIL_BLOCK_WIDTH)
        rows = max(1, min(h, THUMBNAIL_BLOCK // cols))
        out = np.empty((h, w, 3), np.uint8) if size is None else np.zeros((size[1], size[0], 3), np.float32)
        for y in range(0, h, rows):
            for x in range(0, w, cols):
                bw, bh = min(cols, w - x), min(rows, h - y)
                # level-0 corners that every backend maps back to (x, y) of this level (they truncate or round)
                block = self.read_region(level, math.ceil(x * ds - 1e-6), math.ceil(y * ds - 1e-6), bw, bh)
                if size is None:
                    out[y : y + bh, x : x + bw] = block
                else:
                    area_shrink_block(out, block, x, y, (w, h))
        return out if size is None else area_round(out, (w, h))

    def best_level(self, downsample: float) -> int:
        """The coarsest level that is still at least as fine as ``downsample`` (so reading it loses nothing).

        A 1% tolerance absorbs the rounding of level sizes (a 4x level of an odd width is 3.999x).
        """
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01:
                best = i if ds >= self.level_downsamples[best] else best
        return best

    def close(self) -> None:  # noqa: B027 - backends without resources have nothing to close
        pass

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        """What may be written about a slide: geometry and MPP, never the vendor's free-text metadata."""
        return {"backend": self.backend, "levels": [list(d) for d in self.level_dimensions], "mpp": self.mpp,
                "mpp_source": self.mpp_source}  # fmt: skip


def _area_weights(src: int, dst: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For source pixels ``start..stop`` of an axis shrunk from ``src`` to ``dst`` pixels (``dst <= src``) by a box
    filter: the destination pixel each begins in, the share of it that falls there and the share that falls in
    the next one, both divided by the box's width ``src / dst`` (a source pixel spans two destination pixels at
    most). Exact in integers: destination pixel ``i`` covers source ``[i * src / dst, (i + 1) * src / dst)``."""
    j = np.arange(start, stop, dtype=np.int64)
    first = (j * dst) // src
    inside = np.minimum((first + 1) * src - j * dst, dst)  # of the pixel's dst units, those before the boundary
    return first, (inside / src).astype(np.float32), ((dst - inside) / src).astype(np.float32)


def _shrink_rows(block: np.ndarray, src: int, dst: int, start: int) -> tuple[int, np.ndarray]:
    """Rows ``start..`` of an image ``src`` rows high, box-shrunk to ``dst`` rows: (the first destination row
    they touch, their float32 contribution to it and the following ones)."""
    first, here, nxt = _area_weights(src, dst, start, start + len(block))
    lo = int(first[0])
    out = np.zeros((min(int(first[-1]) + 2, dst) - lo, *block.shape[1:]), np.float32)
    starts = np.flatnonzero(np.r_[True, first[1:] != first[:-1]])  # rows that open a destination row
    at = first[starts] - lo
    shape = (-1,) + (1,) * (block.ndim - 1)
    out[at] += np.add.reduceat(block * here.reshape(shape), starts, axis=0)
    spill = np.add.reduceat(block * nxt.reshape(shape), starts, axis=0)
    into = at + 1 < len(out)  # the last source row ends on the last boundary: nothing spills past it
    out[at[into] + 1] += spill[into]
    return lo, out


def area_round(out: np.ndarray, src: tuple[int, int]) -> np.ndarray:
    """:func:`area_shrink_block`'s sums as uint8, rounded as ``cv2.resize(..., INTER_AREA)`` rounds them: halves
    up when the image (``src``: width, height) is shrunk by exactly 2 on both axes (OpenCV's 2 x 2 fast path), to
    even otherwise; so a pyramid-less level gives the thumbnail, and the tiles, that OpenCV gives on the whole."""
    halves_up = src == (2 * out.shape[1], 2 * out.shape[0])
    return np.clip(np.floor(out + 0.5) if halves_up else np.rint(out), 0, 255).astype(np.uint8)


def area_shrink_block(out: np.ndarray, block: np.ndarray, x: int, y: int, src: tuple[int, int]) -> None:
    """Adds ``block`` (h, w, C), whose top-left corner is pixel (``x``, ``y``) of an image of ``src`` (width,
    height), to ``out`` (float32, the image box-shrunk to ``out``'s size). Once every block of the image has been
    added, ``out`` holds what ``cv2.resize(image, size, interpolation=cv2.INTER_AREA)`` gives, before rounding:
    so an image too big for memory can be shrunk one block at a time, blocks cut anywhere.

    Examples:
        >>> image = np.arange(108, dtype=np.uint8).reshape(6, 6, 3)
        >>> out = np.zeros((2, 2, 3), np.float32)
        >>> for y in (0, 3):
        ...     area_shrink_block(out, image[y : y + 3], 0, y, (6, 6))
    """
    th, tw = out.shape[:2]
    top, rows = _shrink_rows(block.astype(np.float32), src[1], th, y)
    left, cells = _shrink_rows(np.ascontiguousarray(rows.swapaxes(0, 1)), src[0], tw, x)
    out[top : top + cells.shape[1], left : left + cells.shape[0]] += cells.swapaxes(0, 1)


def _flatten_rgba(rgba: np.ndarray) -> np.ndarray:
    """RGBA (straight alpha) over white: areas OpenSlide marks transparent (outside the scan) become glass."""
    if rgba.shape[2] == 3:
        return rgba
    alpha = rgba[:, :, 3:4]
    if alpha.min() == 255:
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)  # 0.14 ms; a strided NumPy copy took 2.3 ms a tile
    a = alpha.astype(np.uint16)
    out = (rgba[:, :, :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _positive(value: str | float | None) -> float | None:
    """``value`` (a metadata string, or a number read as one) when it is a positive finite number, else None."""
    try:
        v = float(value) if value not in (None, "") else math.nan
    except ValueError:
        return None
    return v if math.isfinite(v) and v > 0 else None


def _mpp_from_properties(props: dict[str, str], prefix: str) -> tuple[float | None, str, float | None]:
    """MPP from OpenSlide-style properties: the vendor-normalised key, else TIFF resolution tags; with the
    pixel height in µm where the metadata gives one (``mpp-y``, ``YResolution``). Without a usable value, the
    key is the first field present whose value is not a positive number, quoted (``""`` when none is present)."""
    bad = ""
    for key, y_key in ((f"{prefix}.mpp-x", f"{prefix}.mpp-y"), ("aperio.MPP", "")):
        if (mpp := _positive(props.get(key))) is not None:
            return mpp, key, _positive(props.get(y_key))
        if props.get(key) and not bad:
            bad = f"{key} = {props[key]!r}"
    res, unit = props.get("tiff.XResolution"), (props.get("tiff.ResolutionUnit") or "").lower()
    if res and unit in _CM_PER_UNIT:
        per_cm = float(res) / _CM_PER_UNIT[unit]
        if per_cm > 100:  # 72 dpi and such are screen defaults, not a scanner's calibration
            y_res = _positive(props.get("tiff.YResolution"))
            return 1e4 / per_cm, "tiff.XResolution", 1e4 * _CM_PER_UNIT[unit] / y_res if y_res else None
    return None, bad, None


class _OpenSlideLike(Slide):
    """OpenSlide, or tiffslide, which copies its API (``read_region`` in level-0 coordinates, RGBA images)."""

    def __init__(self, path: Path, handle: Any, backend: str, prefix: str, mpp: float | None) -> None:
        self.path, self.backend, self._handle = path, backend, handle
        self.level_dimensions = tuple((int(w), int(h)) for w, h in handle.level_dimensions)
        props = {str(k): str(v) for k, v in dict(handle.properties).items()}
        found, key, height = _mpp_from_properties(props, prefix)
        self.mpp, self.mpp_source = _choose_mpp(path, found, key, mpp, height)

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        image = self._handle.read_region((int(x), int(y)), int(level), (int(w), int(h)))
        rgb = _flatten_rgba(np.asarray(image.convert("RGBA") if image.mode not in ("RGB", "RGBA") else image))
        if self.backend == "tiffslide":  # it fills outside the scan with black, not transparency: make it glass
            ds = float(self._handle.level_downsamples[level])
            lw, lh = self.level_dimensions[level]
            lx, ly = int(int(x) / ds), int(int(y) / ds)  # where tiffslide starts reading (it truncates)
            inside_w, inside_h = max(0, min(w, lw - lx)), max(0, min(h, lh - ly))
            if inside_w < w or inside_h < h or lx < 0 or ly < 0:
                rgb = rgb.copy()
                rgb[inside_h:], rgb[:, inside_w:] = 255, 255
                rgb[: max(0, -ly)], rgb[:, : max(0, -lx)] = 255, 255
        return rgb

    def close(self) -> None:
        self._handle.close()


class DicomSlide(Slide):
    """A DICOM VL Whole Slide Microscopy series read with wsidicom (one instance per pyramid level).

    wsidicom addresses levels by their power-of-two number and regions in that level's pixels; this
    class converts from level-0 coordinates. Missing TILED_SPARSE tiles come back as background.
    """

    def __init__(self, path: Path, mpp: float | None) -> None:
        from wsidicom import WsiDicom

        from medvision.io.dicom import no_value_checks

        no_value_checks()  # a slide's UIDs are never printed as invalid values
        self.path, self.backend = path, "wsidicom"
        try:
            self._wsi = WsiDicom.open(path)
        except Exception as err:
            raise SlideError(f"{path}: not a readable DICOM whole-slide series ({type(err).__name__}: {err})") from None
        levels = list(self._wsi.levels)
        if not levels:
            raise SlideError(f"{path}: DICOM series has no whole-slide pyramid levels (ImageType VOLUME)")
        self._levels = [lv.level for lv in levels]
        self.level_dimensions = tuple((int(lv.size.width), int(lv.size.height)) for lv in levels)
        found = height = None
        try:
            spacing = self._wsi.mpp
            if spacing is not None:
                found, height = float(spacing.width), float(spacing.height)
        except Exception:  # wsidicom raises when PixelSpacing is absent
            found = height = None
        key = "PixelSpacing" if found is not None else ""  # absent: "no microns-per-pixel metadata", not unusable
        if found is not None and _positive(found) is None:
            found, key = None, f"PixelSpacing = {found!r}"
        self.mpp, self.mpp_source = _choose_mpp(path, found, key, mpp, height)

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        lx, ly = round(x / ds), round(y / ds)
        lw, lh = self.level_dimensions[level]
        # wsidicom refuses regions past the edge; read the part inside and pad with glass like OpenSlide
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
        if x1 > x0 and y1 > y0:
            part = self._wsi.read_region((x0, y0), self._levels[level], (x1 - x0, y1 - y0), as_array=True)
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = np.asarray(part)[:, :, :3]
        return out

    def close(self) -> None:
        self._wsi.close()


#: How a user gives a slide's MPP: ``features`` takes a flag, training a recipe key (``score`` the run's recipe).
_SET_MPP = "set --mpp (features) or data.slides.mpp (the recipe; score uses its run's)"


def _choose_mpp(path: Path, found: float | None, key: str, override: float | None,
                height: float | None = None) -> tuple[float, str]:  # fmt: skip
    """The slide's µm per pixel: ``override`` (the recipe's), else the metadata's ``found`` under ``key``, whose
    pixels must be square (``height``, µm, within 1%): a tile of so many µm would not be square otherwise.
    Without ``found``, ``key`` names a field the metadata has but whose value is unusable (``key = 'value'``), or
    is empty."""
    if override is not None:
        return float(override), "recipe"
    if found is not None and height is not None and abs(height / found - 1) > 0.01:
        raise SlideError(f"{path}: its pixels are not square ({key} says {found:g} µm wide, {height:g} µm high); "
                         f"tiles and tissue areas here assume square pixels: resample the slide, or {_SET_MPP} to "
                         "use one value for both")  # fmt: skip
    if found is None and key:
        raise SlideError(
            f"{path}: the slide's microns-per-pixel metadata {key} is not usable: expected a positive number of µm "
            f"per pixel; {_SET_MPP} to the scanner's value, e.g. 0.25 for a 40x scan"
        )
    if found is None:
        raise SlideError(
            f"{path}: the slide has no microns-per-pixel metadata (no openslide.mpp-x, TIFF resolution, OME "
            f"PhysicalSizeX or DICOM PixelSpacing); {_SET_MPP} to the scanner's value, e.g. 0.25 for a 40x scan"
        )
    return found, key


def is_dicom_slide_dir(path: Path) -> bool:
    """A folder that holds DICOM instances (by suffix or the DICM magic at byte 128)."""
    if not path.is_dir():
        return False
    for f in path.iterdir():
        if f.is_file():
            if f.suffix.lower() == ".dcm":
                return True
            try:
                with f.open("rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def tiff_cut_short(path: Path) -> str | None:
    """Why a TIFF (SVS, NDPI, generic or BigTIFF) is cut short, or None: a directory (IFD) the chain points to at
    or past the end of the file, or running past it. A copy that stopped early loses the directories written
    after its data (Aperio writes all of them there), and the readers then say only that they cannot read it.
    Not a TIFF, or a classic TIFF of 4 GiB or more (NDPI's offsets wrap there), is None."""
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(16)
            order = {b"II": "<", b"MM": ">"}.get(head[:2])
            if order is None or len(head) < 8:
                return None
            (magic,) = struct.unpack(order + "H", head[2:4])
            if magic == 42 and size < 1 << 32:
                offset, count_fmt, entry, next_fmt = struct.unpack(order + "I", head[4:8])[0], "H", 12, "I"
            elif magic == 43 and len(head) == 16:
                offset, count_fmt, entry, next_fmt = struct.unpack(order + "Q", head[8:16])[0], "Q", 20, "Q"
            else:
                return None
            seen: set[int] = set()
            while offset and offset not in seen and len(seen) < 65536:
                where = "its first TIFF directory" if not seen else f"its TIFF directory {len(seen) + 1}"
                if offset >= size:
                    return f"{path}: {size} bytes but {where} is at byte {offset}: the file is cut short"
                seen.add(offset)
                fh.seek(offset)
                raw = fh.read(struct.calcsize(count_fmt))
                count = struct.unpack(order + count_fmt, raw)[0] if len(raw) == struct.calcsize(count_fmt) else 0
                end = offset + len(raw) + count * entry + struct.calcsize(next_fmt)
                if len(raw) < struct.calcsize(count_fmt) or end > size:
                    return (
                        f"{path}: {size} bytes but {where}, at byte {offset}, runs to byte {end}: the file is cut short"
                    )
                fh.seek(end - struct.calcsize(next_fmt))
                (offset,) = struct.unpack(order + next_fmt, fh.read(struct.calcsize(next_fmt)))
    except OSError:
        return None
    return None


_OME = re.compile(r"\.ome\.tiff?$", re.IGNORECASE)


def open_slide(path: str | Path, mpp: float | None = None, backend: Backend = "auto") -> Slide:
    """Opens a slide file (or DICOM series folder) with the backend that reads it.

    ``auto`` tries DICOM for folders, tiffslide for ``.ome.tif(f)``, then OpenSlide, then tiffslide
    for TIFFs OpenSlide does not know. ``mpp`` overrides the file's microns per pixel.

    Raises:
        SlideError: the file does not exist, is a TIFF cut short (:func:`tiff_cut_short`), no backend reads it, or
            it has no usable MPP and none was given.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: slide does not exist")
    if backend == "dicom" or (backend == "auto" and path.is_dir()):
        if not is_dicom_slide_dir(path):
            raise SlideError(f"{path}: a folder is read as a DICOM WSI series, but it holds no DICOM files")
        return DicomSlide(path, mpp)
    if (cut := tiff_cut_short(path)) is not None:  # the readers would say only "unsupported", or lose its levels
        raise SlideError(cut)
    errors = []
    order: list[str] = [backend] if backend != "auto" else (
        ["tiffslide", "openslide"] if _OME.search(path.name) else ["openslide", "tiffslide"])  # fmt: skip
    for name in order:
        try:
            if name == "openslide":
                import openslide

                return _OpenSlideLike(path, openslide.OpenSlide(str(path)), "openslide", "openslide", mpp)
            import tiffslide

            return _OpenSlideLike(path, tiffslide.TiffSlide(str(path)), "tiffslide", "tiffslide", mpp)
        except SlideError:
            raise
        except Exception as err:
            errors.append(f"{name}: {type(err).__name__}: {err}")
    raise SlideError(f"{path}: no slide backend can read it ({'; '.join(errors)})")

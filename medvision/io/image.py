"""PNG, JPEG and TIFF reading that keeps 16-bit data 16-bit.

``PIL.Image.convert("RGB")`` clips a 16-bit PNG to 255 (a white image) and silently drops a 48-bit
RGB PNG to 8 bits; ``ImageFolder`` inherits both. Here files are read at their native depth (OpenCV
for PNG/JPEG/BMP, tifffile for TIFF) and mapped to float32 in [0, 1] by pure functions.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal, NamedTuple

import cv2
import numpy as np
import tifffile

from medvision.errors import MedvisionError

Intensity = Literal["dtype", "minmax", "percentile"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ImageReadError(MedvisionError, OSError):
    """A file that is missing, unreadable, or not an image we can use; the message names the file."""


def read_image_raw(path: str | Path) -> np.ndarray:
    """Reads an image at its native bit depth: (H, W) or (H, W, C), uint8/uint16/float, RGB order."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(f"{path}: suffix {suffix!r} is not a supported image type {IMAGE_SUFFIXES}")
    try:
        if suffix in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tif:
                _one_image(path, tif)
                arr = _tiff_pixels(tif)
            if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
                arr = np.moveaxis(arr, 0, -1)  # planar (C, H, W) storage
        else:
            data = path.read_bytes()
            jpeg = data.startswith(b"\xff\xd8\xff")
            # a JPEG cut short (OpenCV fills it grey); its tail is checked first, the walk only without FFD9
            if jpeg and not data.endswith(b"\xff\xd9") and not jpeg_is_whole(data):
                raise ImageReadError(f"{path}: JPEG without its end-of-image marker; the file is cut short")
            strict = _strict_jpeg(path, data) if jpeg else None
            if strict is not None:
                arr = strict
            else:
                decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
                if decoded is None:
                    raise ImageReadError(f"{path}: OpenCV could not decode this {suffix} file (corrupt or truncated?)")
                arr = decoded
                if arr.ndim == 3 and arr.shape[2] == 3:
                    arr = arr[:, :, ::-1]  # BGR -> RGB
                elif arr.ndim == 3 and arr.shape[2] == 4:
                    arr = arr[:, :, [2, 1, 0, 3]]
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file does not exist") from None
    except Exception as err:  # decoder libraries raise many types; keep the cause, name the file
        raise ImageReadError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ImageReadError(f"{path}: expected a 2-D image (H, W) or (H, W, C), got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _strict_jpeg(path: Path, data: bytes) -> np.ndarray | None:
    """An 8-bit grey or colour JPEG decoded by libjpeg-turbo in strict mode (simplejpeg): corrupt entropy-coded
    data, which libjpeg only warns about on stderr while OpenCV returns the image, is an :class:`ImageReadError`
    (of 200 copies of a JPEG with 64 bytes overwritten, 187 are refused; OpenCV refused none:
    ``benchmarks/tile_decoder.py``). The pixels are OpenCV's (the same libjpeg-turbo, no EXIF rotation: checked
    in the tests). None for what it does not decode (CMYK, 12-bit): OpenCV decodes those."""
    import simplejpeg

    if _jpeg_format(io.BytesIO(data)) is None:  # not 8-bit samples (or no frame header found); no copy of bytes
        return None
    try:
        kind = simplejpeg.decode_jpeg_header(data)[2]
    except ValueError:
        return None
    if kind not in ("Gray", "YCbCr", "RGB"):
        return None
    try:
        image = simplejpeg.decode_jpeg(data, colorspace="GRAY" if kind == "Gray" else "RGB", strict=True)
    except ValueError as err:
        raise ImageReadError(f"{path}: damaged JPEG data (libjpeg: {err}); expected a whole JPEG stream (re-encode "
                             "the file if it opens elsewhere)") from None  # fmt: skip
    return image[:, :, 0] if kind == "Gray" else image


_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0-7: markers without a length


def jpeg_is_whole(data: bytes) -> bool:
    """Whether a JPEG stream reaches its end-of-image marker, found by walking its segments (each length-prefixed)
    and, after each start of scan, its entropy-coded data (where a 0xFF byte is stuffed as FF00).

    Data after the marker (a phone's motion-photo video, a vendor trailer) is allowed; an end marker inside an
    EXIF thumbnail is inside a segment, and skipped. A file cut short ends before the marker. Searching the last
    KiB for FFD9 instead refused a whole JPEG with a longer trailer, which OpenCV decodes (``score`` scored it).
    """
    n, i = len(data), 2
    if not data.startswith(b"\xff\xd8"):
        return False
    if data.endswith(b"\xff\xd9"):  # nearly every JPEG: no walk in the loaders' hot path (FFD9 is never in scan data)
        return True
    while i + 1 < n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xD9:
            return True
        if marker in _STANDALONE:
            i += 2
            continue
        if i + 3 >= n:
            return False
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next real marker
            while True:
                i = data.find(b"\xff", i)
                if i < 0 or i + 1 >= n:
                    return False
                if data[i + 1] == 0x00 or data[i + 1] in _STANDALONE or data[i + 1] == 0xFF:
                    i += 1 if data[i + 1] == 0xFF else 2
                    continue
                break
    return False


class RawFormat(NamedTuple):
    """What :func:`read_image_raw` gives for a file: its pixels' dtype name and whether it is grey (one channel)."""

    dtype: str
    grey: bool


#: PNG colour type -> grey: 0 is grey (OpenCV ignores its tRNS chunk); palette, RGB and the alpha types are colour
_PNG_GREY = {0: True, 2: False, 3: False, 4: False, 6: False}
#: JPEG start-of-frame markers (not DHT C4, JPG C8, DAC CC), which hold the sample precision and component count
_JPEG_SOF = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)}


def check_image_header(path: str | Path) -> RawFormat | None:
    """Checks, without decoding pixels, that a PNG/JPEG/TIFF/BMP file is whole, and returns the :class:`RawFormat`
    :func:`read_image_raw` will give for it, read from the same header; raises :class:`ImageReadError`.

    PNG: every chunk's CRC (PIL ``verify``): a truncated file or a changed byte is found. JPEG: the header
    parses and the stream reaches its end-of-image marker (:func:`jpeg_is_whole`; a file cut short does not).
    TIFF: the pages parse and their strips or tiles lie inside the file. BMP: the header parses. Not found here:
    damage inside a JPEG's or TIFF's compressed data; that file fails when it is decoded.

    The format: PNG from the IHDR bit depth (16 is uint16, 1 to 8 are uint8) and colour type; JPEG from the
    start-of-frame precision and component count; TIFF from the first page's dtype and samples a pixel (palette
    images are read as 8-bit RGB). ``None`` when the header cannot say it exactly (a BMP, whose palette decides
    whether OpenCV reads it grey; a JPEG of other than 8-bit samples; a TIFF not named ``.tif``, which OpenCV
    decodes) and the caller decodes the file to know. The sources decide ``data.transfer: auto`` and the input
    channels from every file this way, opening each once.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    jpeg: RawFormat | None = None
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
            size = fh.seek(0, 2)
            fh.seek(max(0, size - 2))
            ends = fh.read(2) == b"\xff\xd9"  # nearly every JPEG: the rest of the file is not read
            fh.seek(0)
            whole = fh.read() if head.startswith(b"\xff\xd8\xff") and not ends else b""
            if head.startswith(b"\xff\xd8\xff"):
                jpeg = _jpeg_format(fh)
    except OSError as err:
        raise ImageReadError(f"{path}: cannot open ({type(err).__name__}: {err.strerror or err})") from None
    is_tiff = head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"))
    if suffix in (".tif", ".tiff") or is_tiff:
        if not is_tiff:
            raise ImageReadError(f"{path}: suffix {suffix} but no TIFF header; expected a TIFF file")
        found = _check_tiff(path, size)
        return found if suffix in (".tif", ".tiff") else None  # OpenCV decodes a TIFF named otherwise
    from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin

    plugins: dict[bytes, Any] = {
        b"\x89PNG": PngImagePlugin.PngImageFile,
        b"\xff\xd8\xff": JpegImagePlugin.JpegImageFile,
        b"BM": BmpImagePlugin.BmpImageFile,
    }
    plugin = next((p for magic, p in plugins.items() if head.startswith(magic)), None)
    if plugin is None:
        raise ImageReadError(f"{path}: not a PNG, JPEG, TIFF or BMP image (first bytes {head[:8]!r})")
    try:
        with plugin(path) as img:  # the plugin itself: no decompression-bomb limit, the reader decides sizes
            img.verify()
    except Exception as err:
        raise ImageReadError(f"{path}: damaged {plugin.format} file ({type(err).__name__}: {err})") from None
    if plugin is JpegImagePlugin.JpegImageFile:
        if not ends and not jpeg_is_whole(whole):
            raise ImageReadError(f"{path}: JPEG without its end-of-image marker; the file is cut short")
        return jpeg
    if plugin is PngImagePlugin.PngImageFile:
        return _png_format(path, head)
    return None


def _png_format(path: Path, head: bytes) -> RawFormat:
    if len(head) < 26 or head[12:16] != b"IHDR":
        raise ImageReadError(f"{path}: PNG whose first chunk is {head[12:16]!r}; expected IHDR")
    depth, kind = head[24], head[25]
    if depth not in (1, 2, 4, 8, 16) or kind not in _PNG_GREY:
        expected = "expected bit depth 1, 2, 4, 8 or 16 and colour type 0, 2, 3, 4 or 6"
        raise ImageReadError(f"{path}: PNG header has bit depth {depth}, colour type {kind}; {expected}")
    return RawFormat("uint16" if depth == 16 else "uint8", _PNG_GREY[kind])


def _jpeg_format(fh: Any) -> RawFormat | None:
    """The JPEG's start-of-frame, found by walking its length-prefixed segments (an EXIF block may come first)."""
    fh.seek(2)
    while True:
        marker = fh.read(4)
        if len(marker) < 4 or marker[0] != 0xFF:
            return None  # no frame header where one belongs: OpenCV decides
        if marker[1] == 0xFF:  # a fill byte before the marker
            fh.seek(-3, 1)
            continue
        if marker[1] in _JPEG_SOF:
            frame = fh.read(6)
            if len(frame) < 6:
                return None
            precision, components = frame[0], frame[5]
            return RawFormat("uint8", components == 1) if precision == 8 else None
        fh.seek(int.from_bytes(marker[2:4], "big") - 2, 1)


def _full_pages(tif: tifffile.TiffFile) -> int:
    """Pages that are images of their own: a reduced-resolution copy (a thumbnail page) is not one."""
    return sum(1 for page in tif.pages if not getattr(page, "is_reduced", False))


def _one_image(path: Path, tif: tifffile.TiffFile) -> None:
    """A TIFF that is one image of 1, 3 or 4 samples a pixel (grey, RGB, RGBA) in a colour space read as such: a
    7-page stack or a 5-channel image passed the audit, then stopped training with a message that named no file
    (and ``--max-pixels`` counted the first page of a stack it then decoded whole); CMYK was read as RGBA and
    uncompressed YCbCr as RGB. Palette and min-is-white images are converted by :func:`_tiff_pixels`."""
    page, pages = tif.pages.first, _full_pages(tif)
    if pages != 1:
        raise ImageReadError(f"{path}: a TIFF of {pages} pages (a stack or a series); expected one image a file")
    samples = int(page.samplesperpixel)
    if samples not in (1, 3, 4):
        raise ImageReadError(f"{path}: a TIFF of {samples} samples a pixel; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    kind = tifffile.PHOTOMETRIC(page.photometric)
    decoded_rgb = kind == tifffile.PHOTOMETRIC.YCBCR and page.compression in (6, 7)  # JPEG: tifffile gives RGB
    if kind.name not in ("MINISBLACK", "MINISWHITE", "RGB", "PALETTE") and not decoded_rgb:
        raise ImageReadError(f"{path}: a TIFF in colour space {kind.name}; expected grey, RGB or palette colour "
                             "(save it as RGB)")  # fmt: skip


def _tiff_pixels(tif: tifffile.TiffFile) -> np.ndarray:
    """The first page's pixels as the image shows them: palette indices through the colour map (8-bit RGB), a
    min-is-white image inverted (its 0 is white)."""
    page = tif.pages.first
    arr = np.asarray(page.asarray())
    kind = tifffile.PHOTOMETRIC(page.photometric)
    if kind == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
        cmap = np.asarray(page.colormap)  # (3, 2**bits), 16-bit per TIFF 6.0
        return np.ascontiguousarray((cmap[:, arr] >> 8).astype(np.uint8).transpose(1, 2, 0))
    if kind == tifffile.PHOTOMETRIC.MINISWHITE and np.issubdtype(arr.dtype, np.unsignedinteger):
        return np.iinfo(arr.dtype).max - arr
    return arr


def _check_tiff(path: Path, size: int) -> RawFormat:
    """That a TIFF is one usable image whose strips or tiles lie inside the file; its first page's format."""
    try:
        with tifffile.TiffFile(path) as tif:
            ends = [int(o) + int(n) for page in tif.pages for o, n in zip(page.dataoffsets, page.databytecounts,
                                                                            strict=False)]  # fmt: skip
            _one_image(path, tif)
            page = tif.pages.first
            if tifffile.PHOTOMETRIC(page.photometric) == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
                found = RawFormat("uint8", False)
            else:
                found = RawFormat(np.dtype(page.dtype).name, int(page.samplesperpixel) == 1)
    except ImageReadError:
        raise
    except Exception as err:
        raise ImageReadError(f"{path}: damaged TIFF file ({type(err).__name__}: {err})") from None
    if ends and max(ends) > size:
        raise ImageReadError(f"{path}: TIFF image data runs to byte {max(ends):,} but the file has {size:,}; "
                             "the file is cut short")  # fmt: skip
    return found


def to_unit_range(image: np.ndarray, mode: Intensity = "dtype") -> np.ndarray:
    """Maps pixel values to float32 in [0, 1] without clipping information away.

    ``dtype`` maps the integer type's range to [0, 1]: unsigned types divide by their maximum (255 for uint8,
    65535 for uint16), signed ones map their minimum to 0 and maximum to 1 (int16: -32768 to 0, 32767 to 1; a
    signed 16-bit CT TIFF's -1024 is 0.484), so the mapping is fixed, never taken from the image; float images
    already in [0, 1] (windowed DICOM) pass through, other float images use ``minmax``.
    ``minmax`` stretches each image; ``percentile`` stretches the 0.5-99.5 percentile range and
    clips the tails (robust to hot pixels).
    """
    if mode == "dtype" and np.issubdtype(image.dtype, np.unsignedinteger):
        return image.astype(np.float32) * np.float32(1.0 / np.iinfo(image.dtype).max)
    if mode == "dtype" and np.issubdtype(image.dtype, np.signedinteger):
        info, work = np.iinfo(image.dtype), np.float32 if image.dtype.itemsize <= 2 else np.float64  # exact in each
        return ((image.astype(work) - work(info.min)) / work(float(info.max) - info.min)).astype(np.float32)
    img = image.astype(np.float32)
    if mode == "dtype" and img.size and img.min() >= 0.0 and img.max() <= 1.0:
        return img  # already in [0, 1]: windowed DICOM pixels
    if mode == "percentile":
        lo, hi = np.percentile(img, [0.5, 99.5])
    else:
        lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return np.zeros_like(img)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Returns (H, W, channels): grey is replicated, alpha dropped, RGB -> grey by ITU-R 601 luma."""
    if image.ndim == 2:
        image = image[:, :, None]
    have = image.shape[2]
    if have == 4:
        image, have = image[:, :, :3], 3
    if have == channels:
        return image
    if have == 1:
        return np.repeat(image, channels, axis=2)
    if have == 3 and channels == 1:
        luma = image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114
        return luma[..., None].astype(image.dtype)
    raise ValueError(f"cannot convert an image with {have} channels to {channels} channels")


def is_grayscale(image: np.ndarray) -> bool:
    """True for (H, W) and (H, W, 1) arrays."""
    return image.ndim == 2 or image.shape[2] == 1

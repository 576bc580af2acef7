"""The level-0 image of a synthetic slide: glass, blob-shaped tissue tiled from real H&E tiles, tumour regions
and marker ink (see :mod:`medvision.wsi.synthetic`, which writes it as SVS, TIFF, OME-TIFF and DICOM WSI)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import tifffile

Box = tuple[int, int, int, int]

#: Non-tumour tissue classes tiled into tissue regions, with how often each is drawn. ADI and BACK
#: are left out: fat and background are nearly white and would read as glass. MUC is pale too (HSV
#: saturation ~11 of 255), so a saturation-based detector may miss it: it is drawn rarely.
TISSUE_CLASSES: dict[str, float] = {"NORM": 0.22, "STR": 0.22, "MUS": 0.22, "LYM": 0.15, "DEB": 0.14, "MUC": 0.05}
TUMOUR_CLASS = "TUM"
#: Glass colour before noise; a real scan's background is a little below white and slightly blue.
GLASS_RGB = (241, 241, 243)
#: Marker ink: saturated blue and green, the colours pathologists circle regions with.
INK_RGB = ((40, 60, 170), (30, 140, 60))
#: Fraction of a tissue box's half-sizes around its centre that is always tissue (see ``tissue_core_box``).
CORE_FRACTION = 0.58

_BLOB_R_MIN, _BLOB_R_MAX = 0.86, 0.98  # radius of the tissue outline, as a fraction of the box's half-sizes
_BLOB_STEP = 8  # the outline is computed on a grid this many times coarser, then smoothly upsampled


def _load_tiles(he_dir: Path, prefixes: Sequence[str]) -> dict[str, np.ndarray]:
    """The first ``{prefix}*.tif`` tile of each class, cropped to one common square (so rot90 keeps shape)."""
    if not he_dir.is_dir():
        raise FileNotFoundError(f"he_dir={he_dir}: not a folder; expected the folder of H&E tiles (ADI-*.tif ...)")
    tiles: dict[str, np.ndarray] = {}
    for prefix in prefixes:
        found = sorted(he_dir.glob(f"{prefix}*.tif")) + sorted(he_dir.glob(f"{prefix}*.tiff"))
        if not found:
            raise FileNotFoundError(f"{he_dir}: no tile {prefix}*.tif; expected one per class {list(prefixes)}")
        tile = tifffile.imread(found[0])
        if tile.ndim != 3 or tile.shape[2] < 3 or tile.dtype != np.uint8:
            raise ValueError(f"{found[0]}: shape {tile.shape} dtype {tile.dtype}; expected an RGB uint8 tile")
        tiles[prefix] = tile[:, :, :3]
    side = min(min(t.shape[:2]) for t in tiles.values())
    return {k: np.ascontiguousarray(t[:side, :side]) for k, t in tiles.items()}


def _dihedral(tile: np.ndarray) -> np.ndarray:
    """The 8 rotations and mirror images of a square tile, (8, s, s, 3): tissue has no up or left."""
    rots = [np.rot90(tile, k) for k in range(4)]
    return np.stack(rots + [r[:, ::-1] for r in rots])


def _mosaic(variants: np.ndarray, height: int, width: int, rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """A (height, width, c) image tiled from ``variants`` (classes x 8 orientations, s, s, c), vectorised.

    The class is drawn per 2 x 2 block of tiles so that tissue types form patches, as in real tissue,
    rather than a checkerboard; the orientation is drawn per tile.
    """
    n_classes, n_orient, side = variants.shape[0], variants.shape[1], variants.shape[2]
    ny, nx = -(-height // side), -(-width // side)
    cls = rng.choice(n_classes, size=(-(-ny // 2), -(-nx // 2)), p=weights)
    cls = np.repeat(np.repeat(cls, 2, axis=0), 2, axis=1)[:ny, :nx]
    orient = rng.integers(0, n_orient, size=(ny, nx))
    grid = variants[cls, orient]  # (ny, nx, s, s, 3)
    return grid.transpose(0, 2, 1, 3, 4).reshape(ny * side, nx * side, -1)[:height, :width]


def _content_mask(tile: np.ndarray) -> np.ndarray:
    """uint8 (s, s, 1), 1 where a tile holds stain rather than the white of the glass it was cut from."""
    lo, hi = tile.min(axis=2), tile.max(axis=2)
    content = ((lo < 225) | (hi.astype(np.int16) - lo > 12)).astype(np.uint8)
    return cv2.morphologyEx(content, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))[:, :, None]


def _tumour_fill(tum: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A tumour region from the TUM tile: layers of its (8, s, s, 4) RGB + content variants, each shifted.

    The real TUM tile is a band of tumour on white glass: more than half of it is background, so tiled
    alone a tumour box would be half glass. Each further layer, at a random offset, fills what is
    still white in the layers above, so the region is ~90% tumour with small gaps like glandular lumina.
    """
    side = tum.shape[1]
    out = np.zeros((height, width, 4), np.uint8)
    for _ in range(4):
        oy, ox = (int(v) for v in rng.integers(0, side, size=2))
        layer = _mosaic(tum[None], height + side, width + side, rng, np.ones(1))[oy : oy + height, ox : ox + width]
        holes = out[:, :, 3] == 0
        out[holes] = layer[holes]
    return out[:, :, :3]


def _blob_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of an irregular ellipse filling a box: a radius wobbling between 0.86 and 0.98.

    Computed on a grid 8x coarser and upsampled bilinearly, so the outline is smooth and costs
    ~1/64 of a full-resolution evaluation.
    """
    gh, gw = max(2, -(-height // _BLOB_STEP) + 1), max(2, -(-width // _BLOB_STEP) + 1)
    v, u = np.meshgrid(np.linspace(-1.0, 1.0, gh), np.linspace(-1.0, 1.0, gw), indexing="ij")
    theta, dist = np.arctan2(v, u), np.hypot(u, v)
    k = np.arange(2, 6)[:, None, None]
    amp, phase = rng.uniform(0.3, 1.0, size=(4, 1, 1)) / k, rng.uniform(0, 2 * np.pi, size=(4, 1, 1))
    wobble = (amp * np.cos(k * theta + phase)).sum(axis=0) / amp.sum()  # in [-1, 1]
    radius = (_BLOB_R_MIN + _BLOB_R_MAX) / 2 + (_BLOB_R_MAX - _BLOB_R_MIN) / 2 * wobble
    inside = (radius - dist).astype(np.float32)
    return cv2.resize(inside, (width, height), interpolation=cv2.INTER_LINEAR) > 0


def tissue_core_box(box: Box) -> Box:
    """The centred part of a tissue box that is tissue whatever the seed: where tumour boxes may go.

    The outline's radius never drops below 0.86 of the half-sizes, so the rectangle within 0.58 of the
    half-sizes (corners at radius 0.82) lies inside it with a margin for the coarse-grid outline.
    """
    x, y, w, h = box
    cw, ch = int(w * CORE_FRACTION), int(h * CORE_FRACTION)
    return x + (w - cw) // 2, y + (h - ch) // 2, cw, ch


def _check_boxes(name: str, boxes: Sequence[Sequence[int]], width: int, height: int) -> list[Box]:
    out = []
    for i, b in enumerate(boxes):
        if len(b) != 4:
            raise ValueError(f"{name}[{i}]={tuple(b)}: expected (x, y, w, h) in level-0 pixels")
        x, y, w, h = (int(v) for v in b)
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
            raise ValueError(f"{name}[{i}]={(x, y, w, h)}: expected w, h > 0 inside the {width}x{height} image")
        out.append((x, y, w, h))
    return out


def _contains(outer: Box, inner: Box) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and \
        inner[0] + inner[2] <= outer[0] + outer[2] and inner[1] + inner[3] <= outer[1] + outer[3]  # fmt: skip


def _draw_pen(region: np.ndarray, rng: np.random.Generator) -> None:
    """Draws, in place, one thick wavy marker stroke along the long side of ``region``."""
    h, w = region.shape[:2]
    vertical = h > w
    length, across = (h, w) if vertical else (w, h)
    thick = max(3, min(across // 3, 60))
    pad = thick // 2 + 2
    t = np.linspace(pad, length - 1 - pad, 64)
    amp = max(0.0, (across - 2 * pad) / 2 - 1)
    wave = across / 2 + amp * 0.8 * np.sin(t / length * rng.uniform(2, 5) + rng.uniform(0, 2 * np.pi))
    pts = np.stack([wave, t] if vertical else [t, wave], axis=1).round().astype(np.int32)
    alpha = np.zeros((h, w), np.uint8)
    cv2.polylines(alpha, [pts], isClosed=False, color=255, thickness=thick, lineType=cv2.LINE_AA)
    ink = np.asarray(INK_RGB[int(rng.integers(len(INK_RGB)))], np.float32)
    a = (alpha.astype(np.float32) / 255.0 * 0.92)[:, :, None]  # marker ink is translucent
    shade = rng.normal(0.0, 4.0, size=(h, w, 1)).astype(np.float32)
    region[:] = np.clip(region * (1 - a) + (ink + shade) * a, 0, 255).astype(np.uint8)


def compose_slide(
    he_dir: Path,
    width: int,
    height: int,
    tissue_boxes: list[tuple[int, int, int, int]],
    tumour_boxes: list[tuple[int, int, int, int]],
    seed: int = 0,
    pen_boxes: Sequence[tuple[int, int, int, int]] = (),
) -> np.ndarray:
    """A level-0 slide image (height, width, 3) uint8: glass, tissue, tumour and marker ink.

    Each tissue box holds one irregular, blob-shaped piece of tissue that touches (nearly) all four
    sides of the box and stays inside it; :func:`tissue_core_box` is the part always covered. It is
    tiled from the real NORM, STR, MUS, LYM, DEB and MUC tiles, each tile randomly rotated or mirrored.
    A tumour box is filled entirely with (rotated, mirrored) TUM tiles, and the tissue around it is
    extended to cover it, so it is always fully tumour and fully inside tissue. A pen box gets one thick
    blue or green marker stroke; it is drawn last, over whatever lies under it. The glass is
    ``GLASS_RGB`` plus 0-3 grey levels of noise (values 241-246), as a real scan's background.

    Args:
        he_dir: folder of the H&E tiles, one per class, named ``{CLASS}-*.tif``.
        width: level-0 width in pixels.
        height: level-0 height in pixels.
        tissue_boxes: (x, y, w, h) of each piece of tissue, level-0 pixels.
        tumour_boxes: (x, y, w, h) of each tumour region; each must lie inside one tissue box.
        seed: seeds tile choice, orientation, outlines, noise and ink; the same seed gives the same image.
        pen_boxes: (x, y, w, h) of each marker stroke.

    Raises:
        ValueError: a size or box is out of range, or a tumour box is in no tissue box.
        FileNotFoundError: ``he_dir`` or one of the tiles is missing.

    Examples:
        >>> he = Path("shared/data/he_tiles")
        >>> rgb = compose_slide(he, 2048, 1536, [(200, 100, 1200, 1300)], [(500, 500, 400, 400)])
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width={width}, height={height}: expected positive level-0 sizes")
    tissue = _check_boxes("tissue_boxes", tissue_boxes, width, height)
    tumour = _check_boxes("tumour_boxes", tumour_boxes, width, height)
    pens = _check_boxes("pen_boxes", pen_boxes, width, height)
    homes = []
    for i, t in enumerate(tumour):
        home = next((j for j, b in enumerate(tissue) if _contains(b, t)), None)
        if home is None:
            raise ValueError(f"tumour_boxes[{i}]={t}: lies in no tissue box {tissue}; tumour must be inside tissue")
        homes.append(home)
    tiles = _load_tiles(Path(he_dir), [*TISSUE_CLASSES, TUMOUR_CLASS])
    normal = np.stack([_dihedral(tiles[c]) for c in TISSUE_CLASSES])
    weights = np.asarray(list(TISSUE_CLASSES.values()))
    weights = weights / weights.sum()
    tum = _dihedral(np.dstack([tiles[TUMOUR_CLASS], _content_mask(tiles[TUMOUR_CLASS])]))
    rng = np.random.default_rng(seed)

    noise = rng.integers(0, 4, size=(height, width), dtype=np.uint8)
    out = cv2.merge([noise + np.uint8(c) for c in GLASS_RGB])  # ~10x faster than broadcasting (H, W, 1) + (3,)
    margin = tiles[TUMOUR_CLASS].shape[0] // 4
    for j, (x, y, w, h) in enumerate(tissue):
        mask = _blob_mask(h, w, rng).view(np.uint8)
        for (tx, ty, tw, th), home in zip(tumour, homes, strict=True):
            if home == j:  # tissue all round the tumour, in case its box reaches past the outline
                mask[max(0, ty - y - margin) : ty - y + th + margin, max(0, tx - x - margin) : tx - x + tw + margin] = 1
        region = out[y : y + h, x : x + w]
        cv2.copyTo(np.ascontiguousarray(_mosaic(normal, h, w, rng, weights)), mask, region)  # in place, into the view
    for x, y, w, h in tumour:
        out[y : y + h, x : x + w] = _tumour_fill(tum, h, w, rng)
    for x, y, w, h in pens:
        _draw_pen(out[y : y + h, x : x + w], rng)
    return out

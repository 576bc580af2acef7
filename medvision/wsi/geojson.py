"""A slide's tissue outline and scored tiles as GeoJSON that QuPath opens as objects (pure functions).

Drag the file onto a slide open in QuPath 0.4 or 0.5 (or File > Import objects from file): the tissue
comes in as locked annotations, each tile as a detection square that carries its scores as
measurements (colour tiles by one of them with Measure > Show measurement maps) and, when given, its
class. The layout is the one QuPath itself writes, read off ``PathObjectTypeAdapters`` in QuPath's
source (https://github.com/qupath/qupath, ``qupath-core/src/main/java/qupath/lib/io/PathObjectTypeAdapters.java``)
and described in its docs (https://qupath.readthedocs.io/en/stable/docs/advanced/exporting_annotations.html):
a ``FeatureCollection`` whose Features carry a UUID ``id`` (read since 0.4) and ``properties`` with
``objectType`` (``annotation``, ``detection``, ``tile``, ``cell``), ``classification`` as
``{"name", "color": [r, g, b]}``, ``isLocked``, and ``measurements`` as a name -> number object (the
0.4+ form; 0.3 wrote a list of name/value pairs). Coordinates are level-0 pixels with the origin at the
top-left corner of the full-resolution image, the same numbers as :class:`~medvision.wsi.tiles.TileGrid`.

Rings follow RFC 7946 (closed, at least four positions, exterior counter-clockwise and holes clockwise
by the signed area of the raw (x, y) numbers; seen on screen, where y points down, that looks the other
way round). QuPath does not need the orientation, other GeoJSON readers check it.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from medvision.errors import MedvisionError
from medvision.io.files import atomic_write

Position = list[float]
Ring = list[Position]
Polygon = list[Ring]

#: Namespace of the feature ids: uuid5(NAMESPACE, f"{slide_id}/tile-{i}") is the same on every run.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://medvision/wsi/geojson")
#: Colour of the tissue annotations (QuPath keeps a class's colour once the project has that class).
TISSUE_COLOR = (80, 180, 80)
#: Colours of tile classes not given in ``class_colors``, in the sorted order of their names (tab10).
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))  # fmt: skip
#: Decimals kept in level-0 coordinates of tissue outlines (a hundredth of a scan pixel).
DECIMALS = 2


class GeoJSONError(MedvisionError, ValueError):
    """Input that cannot become valid GeoJSON (a NaN score, mismatched lengths); the message names it."""


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of an (n, 2) open ring: positive when counter-clockwise in a y-up frame."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _ring(contour: np.ndarray, mask_scale: float, exterior: bool) -> Ring | None:
    """An OpenCV contour as a closed level-0 ring in RFC 7946 orientation, or None when degenerate.

    Contour points are the centres of boundary pixels of the mask; mask pixel ``i`` covers level-0
    ``[i / mask_scale, (i + 1) / mask_scale)``, so its centre is ``(i + 0.5) / mask_scale``.
    """
    pts = np.round((contour.reshape(-1, 2).astype(np.float64) + 0.5) / mask_scale, DECIMALS)
    keep = np.ones(len(pts), bool)
    keep[1:] = np.any(pts[1:] != pts[:-1], axis=1)  # consecutive repeats after rounding
    pts = pts[keep]
    if len(pts) > 1 and np.array_equal(pts[0], pts[-1]):
        pts = pts[:-1]
    if len(np.unique(pts, axis=0)) < 3:
        return None
    area = _signed_area(pts)
    if area == 0.0:
        return None
    if (area > 0) != exterior:
        pts = pts[::-1]
    closed: Ring = pts.tolist()
    closed.append(list(closed[0]))
    return closed


def tissue_polygons(mask: np.ndarray, mask_scale: float, min_area_px: int = 16) -> list[Polygon]:
    """The tissue regions of a mask as GeoJSON Polygon coordinates in level-0 pixels, holes included.

    Args:
        mask: (H, W) tissue mask (bool or integer, non-zero is tissue), e.g. ``TileGrid.mask``.
        mask_scale: mask pixels per level-0 pixel (``TileGrid.mask_scale``).
        min_area_px: outlines and holes enclosing fewer mask pixels than this (contour area) are
            dropped, and a dropped outline takes its holes with it.

    Returns:
        One entry per region: its exterior ring first, then its holes; each ring a closed list of
        ``[x, y]`` level-0 positions (see the module docstring for orientation).

    Examples:
        >>> polygons = tissue_polygons(grid.mask, grid.mask_scale)
    """
    if mask.ndim != 2:
        raise GeoJSONError(f"tissue_polygons needs a 2-D mask; got shape {mask.shape}")
    if not (math.isfinite(mask_scale) and mask_scale > 0):
        raise GeoJSONError(f"mask_scale must be a positive number of mask pixels per level-0 pixel; got {mask_scale}")
    binary = np.ascontiguousarray(mask != 0, dtype=np.uint8)
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    links = hierarchy.reshape(-1, 4)  # next, previous, first child, parent
    polygons: list[Polygon] = []
    for k in np.flatnonzero(links[:, 3] == -1).tolist():
        if cv2.contourArea(contours[k]) < min_area_px:
            continue
        exterior = _ring(contours[k], mask_scale, exterior=True)
        if exterior is None:
            continue
        rings = [exterior]
        child = int(links[k, 2])
        while child != -1:
            if cv2.contourArea(contours[child]) >= min_area_px:
                hole = _ring(contours[child], mask_scale, exterior=False)
                if hole is not None:
                    rings.append(hole)
            child = int(links[child, 0])
        polygons.append(rings)
    return polygons


def _floats(name: str, values: np.ndarray, n: int) -> list[float]:
    """A measurement as plain floats, refusing wrong shapes and non-finite values (not valid JSON)."""
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise GeoJSONError(f"measurement {name!r} has shape {arr.shape}; expected ({n},), one value per tile")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise GeoJSONError(f"measurement {name!r} has dtype {arr.dtype}; expected real numbers")
    bad = np.flatnonzero(~np.isfinite(arr))
    if len(bad):
        raise GeoJSONError(f"measurement {name!r} is {arr[bad[0]]} at tile index {int(bad[0])} "
                           f"({len(bad)} non-finite value(s) in all); GeoJSON allows finite numbers only")  # fmt: skip
    if arr.dtype in (np.float32, np.float16):
        return [float(str(v)) for v in arr]  # shortest decimal that reads back as the same float32
    return [float(v) for v in arr.tolist()]


def _color(name: str, rgb: Sequence[int]) -> list[int]:
    color = [int(c) for c in rgb]
    if len(color) != 3 or not all(0 <= c <= 255 for c in color):
        raise GeoJSONError(f"colour of class {name!r} must be three integers 0-255; got {list(rgb)}")
    return color


def _feature(key: str, coordinates: Polygon, properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Feature", "id": str(uuid.uuid5(NAMESPACE, key)),
            "geometry": {"type": "Polygon", "coordinates": coordinates}, "properties": properties}  # fmt: skip


def slide_geojson(
    tissue: Sequence[Polygon],
    coords: np.ndarray,
    side0: float,
    measurements: Mapping[str, np.ndarray],
    classification: Sequence[str] | None = None,
    tissue_name: str = "Tissue",
    slide_id: str = "",
    class_colors: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """A FeatureCollection of the tissue (locked annotations) and the tiles (detections with measurements).

    Args:
        tissue: polygons from :func:`tissue_polygons`.
        coords: (N, 2) level-0 (x, y) top-left corners of the tiles (``TileGrid.coords``).
        side0: side of a tile in level-0 pixels (``TileGrid.side0``).
        measurements: name -> (N,) values, e.g. one probability per class; written as plain floats.
        classification: a class name per tile (e.g. the argmax class), or None for unclassified tiles.
        tissue_name: class given to the tissue annotations.
        slide_id: mixed into every feature id, so that two slides' objects never share an id.
        class_colors: name -> (r, g, b) of tile classes; others take :data:`PALETTE` colours in the
            sorted order of their names (pass this to keep colours the same across slides).

    Raises:
        GeoJSONError: (a ValueError) mismatched lengths, a bad side, or a non-finite measurement
            (named with its tile index).

    Examples:
        >>> # probs: (N, C) tile probabilities in grid order, classes: the C class names
        >>> fc = slide_geojson(tissue_polygons(grid.mask, grid.mask_scale), grid.coords, grid.side0,
        ...                    {f"p_{c}": probs[:, k] for k, c in enumerate(classes)},
        ...                    [classes[k] for k in probs.argmax(1)], slide_id=slide.path.name)
        >>> write_geojson(out / f"{slide.path.stem}.geojson", fc)
    """
    xy = np.asarray(coords)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise GeoJSONError(f"coords must be (N, 2) level-0 (x, y) corners; got shape {xy.shape}")
    n = len(xy)
    bad = np.flatnonzero(~np.isfinite(xy).all(axis=1))
    if len(bad):
        raise GeoJSONError(f"coords hold a non-finite value at tile index {int(bad[0])}: {xy[bad[0]].tolist()}")
    if not (math.isfinite(side0) and side0 > 0):
        raise GeoJSONError(f"side0 must be a positive number of level-0 pixels; got {side0}")
    columns = {str(name): _floats(str(name), values, n) for name, values in measurements.items()}
    if classification is not None and len(classification) != n:
        raise GeoJSONError(f"classification has {len(classification)} names for {n} tiles")
    colors: dict[str, list[int]] = {}
    if classification is not None:
        given = dict(class_colors or {})
        others = sorted({str(c) for c in classification} - given.keys())
        colors = {name: _color(name, rgb) for name, rgb in given.items()}
        colors.update({name: list(PALETTE[k % len(PALETTE)]) for k, name in enumerate(others)})

    features = []
    tissue_class = {"name": tissue_name, "color": list(TISSUE_COLOR)}
    for k, polygon in enumerate(tissue):
        properties = {"objectType": "annotation", "classification": dict(tissue_class), "isLocked": True}
        features.append(_feature(f"{slide_id}/tissue-{k}", [list(r) for r in polygon], properties))
    corners = xy.tolist()
    for i, (x, y) in enumerate(corners):
        x1, y1 = x + float(side0), y + float(side0)
        square: Polygon = [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]  # counter-clockwise by RFC 7946 signed area
        properties = {"objectType": "detection", "measurements": {name: col[i] for name, col in columns.items()}}
        if classification is not None:
            name = str(classification[i])
            properties["classification"] = {"name": name, "color": colors[name]}
        features.append(_feature(f"{slide_id}/tile-{i}", square, properties))
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: Path, collection: Mapping[str, Any]) -> None:
    """Writes ``collection`` as compact JSON, atomically; refuses NaN and infinity (not JSON).

    Raises:
        GeoJSONError: the collection holds a non-finite number or a value JSON cannot hold.
    """
    try:
        text = json.dumps(collection, allow_nan=False, separators=(",", ":"))
    except (ValueError, TypeError) as err:
        raise GeoJSONError(f"{path}: the collection cannot be written as JSON ({err})") from err

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    atomic_write(Path(path), write)

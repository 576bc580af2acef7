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
A NaN or infinite measurement (JSON has neither) is left out of that tile's ``measurements``: QuPath reads
a missing measurement as NaN, so the tile shows the same value it has in the tile table.

Feature ids are uuid5 of the run, the slide and the object, so importing a second run's file onto the same
slide (another model, a rescore) adds objects instead of asking to "Update IDs", while one run gives the
same ids every time it writes a slide.

The tissue outline is exact (:mod:`medvision.wsi.outline`): it follows the edges of the mask's pixels, so
an annotation's area in QuPath is the mask's tissue area, holes included, and its rings are valid geometry
for QuPath's JTS (simple rings that touch other rings at single corner points at most).

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

import numpy as np

from medvision.errors import MedvisionError
from medvision.io.files import atomic_write
from medvision.wsi.outline import mask_outline

Position = list[float]
Ring = list[Position]
Polygon = list[Ring]

#: Namespace of the feature ids: uuid5(NAMESPACE, '["<run_id>", "<slide_id>", "tile-<i>"]').
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://medvision/wsi/geojson")
#: Colour of the tissue annotations (QuPath keeps a class's colour once the project has that class).
TISSUE_COLOR = (80, 180, 80)
#: Colours of tile classes (tab10): :func:`palette_colors` gives them in the order of the run's classes.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))  # fmt: skip
#: Decimals kept in level-0 coordinates of tissue outlines (a hundredth of a scan pixel).
DECIMALS = 2


class GeoJSONError(MedvisionError, ValueError):
    """Input that cannot become valid GeoJSON (a NaN coordinate, mismatched lengths); the message names it."""


def _scales(mask_scale: float | tuple[float, float]) -> tuple[float, float]:
    """``(sx, sy)`` from one scale or a pair, refusing anything but two positive finite numbers."""
    try:
        values = np.broadcast_to(np.asarray(mask_scale, np.float64), (2,)).tolist()
    except (TypeError, ValueError):  # not numbers, or not one or two of them
        values = []
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise GeoJSONError(f"mask_scale must be a positive number of mask pixels per level-0 pixel, or an (x, y) "
                           f"pair of them; got {mask_scale}")  # fmt: skip
    return values[0], values[1]


def tissue_polygons(mask: np.ndarray, mask_scale: float | tuple[float, float],
                    min_area_px: int = 16) -> list[Polygon]:  # fmt: skip
    """The tissue regions of a mask as GeoJSON Polygon coordinates in level-0 pixels, holes included.

    The outline follows the edges of the mask's pixels (:func:`~medvision.wsi.outline.mask_outline`, whose
    docstring gives the connectivity: pixels that meet only at a corner are separate regions): mask column
    ``c`` begins at level-0 ``x = c / sx`` and row ``r`` at ``y = r / sy``, so a polygon's area is its tissue
    pixels times ``1 / (sx * sy)`` level-0 px², as the score table's ``tissue_mm2`` counts them.

    Args:
        mask: (H, W) tissue mask (bool or integer, non-zero is tissue), e.g. ``TileGrid.mask``.
        mask_scale: mask pixels per level-0 pixel, one number or ``(sx, sy)``; for a mask of the whole slide,
            ``(W / w0, H / h0)`` with ``(w0, h0)`` the level-0 size, ``TileGrid.mask_scales`` (a thumbnail's sides
            are rounded apart: one scale for both can be a few pixels out over a long y side).
        min_area_px: regions whose outline encloses fewer mask pixels than this are dropped with their holes,
            and so are holes of fewer pixels.

    Returns:
        One entry per region, in the order of their top-left pixels: its exterior ring first, then its holes;
        each ring a closed list of ``[x, y]`` level-0 positions (see the module docstring for orientation),
        rounded to :data:`DECIMALS` decimals where a mask pixel spans more than twice that.

    Examples:
        >>> polygons = tissue_polygons(grid.mask, grid.mask_scales)
    """
    if mask.ndim != 2:
        raise GeoJSONError(f"tissue_polygons needs a 2-D mask; got shape {mask.shape}")
    sx, sy = _scales(mask_scale)
    exact = max(sx, sy) > 0.5 * 10**DECIMALS  # rounding would merge neighbouring vertices: keep every digit
    polygons: list[Polygon] = []
    for region in mask_outline(mask, min_area_px):
        rings = []
        for ring in region:
            xy = np.stack([ring[:, 0] / sx, ring[:, 1] / sy], axis=1)
            closed: Ring = (xy if exact else np.round(xy, DECIMALS)).tolist()
            closed.append(list(closed[0]))
            rings.append(closed)
        polygons.append(rings)
    return polygons


def palette_colors(classes: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """:data:`PALETTE` colours by the order of a run's classes, for ``slide_geojson(class_colors=...)``.

    Built from the run's whole class list, not the classes a slide happens to have, so a class has the
    same colour on every slide: QuPath keeps the first colour it meets for a class name.
    """
    return {str(name): PALETTE[k % len(PALETTE)] for k, name in enumerate(classes)}


def _floats(name: str, values: np.ndarray, n: int) -> list[float | None]:
    """A measurement as plain floats, None where it is NaN or infinite (JSON has neither); wrong shapes refused."""
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise GeoJSONError(f"measurement {name!r} has shape {arr.shape}; expected ({n},), one value per tile")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise GeoJSONError(f"measurement {name!r} has dtype {arr.dtype}; expected real numbers")
    finite = np.isfinite(arr).tolist()
    short = arr.dtype in (np.float32, np.float16)  # the shortest decimal that reads back as the same float32
    floats = [float(str(v)) for v in arr] if short else [float(v) for v in arr.tolist()]
    return [v if ok else None for v, ok in zip(floats, finite, strict=True)]


def _color(name: str, rgb: Sequence[int]) -> list[int]:
    color = [int(c) for c in rgb]
    if len(color) != 3 or not all(0 <= c <= 255 for c in color):
        raise GeoJSONError(f"colour of class {name!r} must be three integers 0-255; got {list(rgb)}")
    return color


def _feature(key: list[str], coordinates: Polygon, properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Feature", "id": str(uuid.uuid5(NAMESPACE, json.dumps(key))),
            "geometry": {"type": "Polygon", "coordinates": coordinates}, "properties": properties}  # fmt: skip


def slide_geojson(
    tissue: Sequence[Polygon],
    coords: np.ndarray,
    side0: float,
    measurements: Mapping[str, np.ndarray],
    classification: Sequence[str | None] | None = None,
    tissue_name: str = "Tissue",
    slide_id: str = "",
    class_colors: Mapping[str, Sequence[int]] | None = None,
    run_id: str = "",
) -> dict[str, Any]:
    """A FeatureCollection of the tissue (locked annotations) and the tiles (detections with measurements).

    Args:
        tissue: polygons from :func:`tissue_polygons`.
        coords: (N, 2) level-0 (x, y) top-left corners of the tiles (``TileGrid.coords``).
        side0: side of a tile in level-0 pixels (``TileGrid.side0``).
        measurements: name -> (N,) values, e.g. one probability per class; written as plain floats, and
            left out of a tile where NaN or infinite (QuPath shows a missing measurement as NaN).
        classification: a class name per tile (e.g. the argmax class), None for a tile left unclassified (one
            whose probabilities are NaN), or None for all tiles unclassified. An unclassified tile has no
            ``classification`` property, as QuPath writes an object without a class.
        tissue_name: class given to the tissue annotations.
        slide_id: mixed into every feature id, so that two slides' objects never share an id.
        class_colors: name -> (r, g, b) of tile classes, e.g. :func:`palette_colors` of the run's classes
            (the same colours on every slide); a class not in it takes a :data:`PALETTE` colour by the
            sorted order of the names missing on this slide, which can differ from slide to slide.
        run_id: what identifies the run that made the scores (e.g. the model's SHA-256 and the output),
            mixed into every feature id with ``slide_id``: two runs' files for one slide share no id, and
            one run writes the same ids every time.

    Raises:
        GeoJSONError: (a ValueError) mismatched lengths, a bad side or a non-finite coordinate.

    Examples:
        >>> # probs: (N, C) tile probabilities in grid order, classes: the C class names
        >>> tissue = tissue_polygons(grid.mask, grid.mask_scales)
        >>> fc = slide_geojson(tissue, grid.coords, grid.side0,
        ...                    {f"p_{c}": probs[:, k] for k, c in enumerate(classes)},
        ...                    [classes[k] for k in probs.argmax(1)], slide_id=slide.path.name,
        ...                    class_colors=palette_colors(classes), run_id=model_sha256)
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
        others = sorted({str(c) for c in classification if c is not None} - given.keys())
        colors = {name: _color(name, rgb) for name, rgb in given.items()}
        colors.update({name: list(PALETTE[k % len(PALETTE)]) for k, name in enumerate(others)})

    features = []
    tissue_class = {"name": tissue_name, "color": list(TISSUE_COLOR)}
    for k, polygon in enumerate(tissue):
        properties = {"objectType": "annotation", "classification": dict(tissue_class), "isLocked": True}
        features.append(_feature([run_id, slide_id, f"tissue-{k}"], [list(r) for r in polygon], properties))
    corners = xy.tolist()
    for i, (x, y) in enumerate(corners):
        x1, y1 = x + float(side0), y + float(side0)
        square: Polygon = [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]  # counter-clockwise by RFC 7946 signed area
        values = {name: col[i] for name, col in columns.items() if col[i] is not None}
        properties = {"objectType": "detection", "measurements": values}
        if classification is not None and classification[i] is not None:
            name = str(classification[i])
            properties["classification"] = {"name": name, "color": colors[name]}
        features.append(_feature([run_id, slide_id, f"tile-{i}"], square, properties))
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

"""Tissue outlines and scored tiles as QuPath GeoJSON: level-0 geometry, RFC 7946 rings, a schema, NaN refused."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from medvision.wsi.geojson import slide_geojson, tissue_polygons, write_geojson

SCALE = 0.05  # mask pixels per level-0 pixel: one mask pixel is 20 level-0 pixels
TOL = 1.0 / SCALE  # one mask pixel, in level-0 pixels

_UUID = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_POSITION = {"type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "number"}}
_RING = {"type": "array", "minItems": 4, "items": _POSITION}
_CLASSIFICATION = {
    "type": "object",
    "required": ["name", "color"],
    "properties": {
        "name": {"type": "string"},
        "color": {
            "type": "array",
            "minItems": 3,
            "maxItems": 3,
            "items": {"type": "integer", "minimum": 0, "maximum": 255},
        },
    },
    "additionalProperties": False,
}
#: RFC 7946 Polygon / Feature / FeatureCollection, plus the properties QuPath 0.4+ writes and reads.
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["type", "features"],
    "properties": {
        "type": {"const": "FeatureCollection"},
        "features": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "id", "geometry", "properties"],
                "properties": {
                    "type": {"const": "Feature"},
                    "id": {"type": "string", "pattern": _UUID},
                    "geometry": {
                        "type": "object",
                        "required": ["type", "coordinates"],
                        "properties": {
                            "type": {"const": "Polygon"},
                            "coordinates": {"type": "array", "minItems": 1, "items": _RING},
                        },
                    },
                    "properties": {
                        "type": "object",
                        "required": ["objectType"],
                        "properties": {
                            "objectType": {"enum": ["annotation", "detection", "tile", "cell"]},
                            "classification": _CLASSIFICATION,
                            "isLocked": {"type": "boolean"},
                            "measurements": {"type": "object", "additionalProperties": {"type": "number"}},
                        },
                        "additionalProperties": False,
                    },
                },
            },
        },
    },
}


def _validate(collection: dict[str, Any]) -> None:
    """The schema, plus what a schema cannot say: every ring closed, exteriors CCW and holes CW."""
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(collection)
    for feature in collection["features"]:
        for k, ring in enumerate(feature["geometry"]["coordinates"]):
            assert ring[0] == ring[-1]
            assert (_signed_area(ring) > 0) == (k == 0)


def _signed_area(ring: list[list[float]]) -> float:
    pts = np.asarray(ring[:-1], dtype=np.float64)
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _bbox(ring: list[list[float]]) -> np.ndarray:
    pts = np.asarray(ring)
    return np.concatenate([pts.min(axis=0), pts.max(axis=0)])


@pytest.fixture
def mask() -> np.ndarray:
    """A rectangle with a square hole, and a disc, on a 200 x 300 mask."""
    m = np.zeros((200, 300), np.uint8)
    m[20:80, 30:110] = 1  # x 30..109, y 20..79
    m[40:60, 60:80] = 0  # the hole: x 60..79, y 40..59
    cv2.circle(m, (200, 140), 30, 1, thickness=-1)  # x 170..230, y 110..170
    return m.astype(bool)


@pytest.fixture
def tiles() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    n = 7
    coords = np.stack([np.arange(n) * 448 + 600, np.full(n, 1000)], axis=1).astype(np.int64)
    return {
        "coords": coords,
        "side0": 448.0,
        "measurements": {"p_tumor": rng.random(n).astype(np.float32), "count": rng.random(n) * 100},
        "classification": ["tumor" if i % 2 else "normal" for i in range(n)],
    }


def test_tissue_polygons_level0_with_hole(mask: np.ndarray) -> None:
    polygons = tissue_polygons(mask, SCALE)
    assert len(polygons) == 2
    by_x = sorted(polygons, key=lambda p: _bbox(p[0])[0])
    rect, disc = by_x
    np.testing.assert_allclose(_bbox(rect[0]), np.array([30, 20, 110, 80]) / SCALE, atol=TOL)
    np.testing.assert_allclose(_bbox(disc[0]), np.array([170, 110, 231, 171]) / SCALE, atol=TOL)
    assert len(rect) == 2 and len(disc) == 1
    np.testing.assert_allclose(_bbox(rect[1]), np.array([60, 40, 80, 60]) / SCALE, atol=TOL)
    for polygon in polygons:
        for k, ring in enumerate(polygon):
            assert len(ring) >= 4 and ring[0] == ring[-1]
            assert all(isinstance(v, float) for pos in ring for v in pos)
            assert (_signed_area(ring) > 0) == (k == 0)  # RFC 7946: exterior CCW, holes CW
    area = (_signed_area(rect[0]) + _signed_area(rect[1])) * SCALE**2
    assert area == pytest.approx(80 * 60 - 20 * 20, rel=0.06)


def test_tissue_polygons_drop_specks_and_degenerate_contours() -> None:
    m = np.zeros((50, 50), np.uint8)
    m[5, 5] = 1  # a single pixel: one point
    m[10, 10:30] = 1  # a line: two distinct points
    m[30:33, 30:33] = 1  # 3 x 3, contour area 4 (pixel centres)
    (only,) = tissue_polygons(m, 1.0, min_area_px=0)  # pixel centres of the 3 x 3 square's corners
    assert len(only) == 1 and len(only[0]) == 5 and _signed_area(only[0]) == 4.0
    assert sorted(map(tuple, only[0][:-1])) == [(30.5, 30.5), (30.5, 32.5), (32.5, 30.5), (32.5, 32.5)]
    assert tissue_polygons(m, 1.0, min_area_px=5) == []
    assert tissue_polygons(np.zeros((8, 8), bool), 1.0) == []
    with pytest.raises(ValueError, match="mask_scale"):
        tissue_polygons(m, 0.0)


def test_slide_geojson_round_trip(tmp_path: Path, mask: np.ndarray, tiles: dict[str, Any]) -> None:
    tissue = tissue_polygons(mask, SCALE)
    collection = slide_geojson(tissue, slide_id="slide-a.svs", **tiles)
    path = tmp_path / "out" / "slide-a.geojson"
    write_geojson(path, collection)
    assert sorted(p.name for p in path.parent.iterdir()) == ["slide-a.geojson"]  # no temporary left behind
    text = path.read_text()
    assert "\n" not in text and ": " not in text  # compact
    loaded = json.loads(text)
    _validate(loaded)

    annotations = [f for f in loaded["features"] if f["properties"]["objectType"] == "annotation"]
    detections = [f for f in loaded["features"] if f["properties"]["objectType"] == "detection"]
    assert len(annotations) == len(tissue) and len(detections) == len(tiles["coords"])
    assert all(f["properties"]["isLocked"] is True for f in annotations)
    assert all(f["properties"]["classification"]["name"] == "Tissue" for f in annotations)
    assert [f["geometry"]["coordinates"] for f in annotations] == tissue

    s = tiles["side0"]
    for i, f in enumerate(detections):
        x, y = (int(v) for v in tiles["coords"][i])
        assert f["geometry"]["coordinates"] == [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]
        assert f["properties"]["classification"]["name"] == tiles["classification"][i]
    for name, values in tiles["measurements"].items():
        got = np.array([f["properties"]["measurements"][name] for f in detections])
        np.testing.assert_array_equal(got.astype(values.dtype), values)
    colors = {f["properties"]["classification"]["name"]: f["properties"]["classification"]["color"] for f in detections}
    assert colors["tumor"] != colors["normal"]

    ids = [f["id"] for f in loaded["features"]]
    assert len(set(ids)) == len(ids) and all(str(uuid.UUID(i)) == i for i in ids)
    again = slide_geojson(tissue, slide_id="slide-a.svs", **tiles)
    other = slide_geojson(tissue, slide_id="slide-b.svs", **tiles)
    assert [f["id"] for f in again["features"]] == ids
    assert not set(ids) & {f["id"] for f in other["features"]}


def test_schema_has_teeth(tiles: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    collection = slide_geojson([], **tiles)
    collection["features"][0]["properties"]["classification"]["color"] = [0, 0, 256]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(collection)


def test_class_colors_and_unclassified_tiles(tiles: dict[str, Any]) -> None:
    fixed = slide_geojson([], **tiles, class_colors={"tumor": (200, 0, 0)})
    assert {tuple(f["properties"]["classification"]["color"]) for f in fixed["features"][1::2]} == {(200, 0, 0)}
    plain = slide_geojson([], tiles["coords"], tiles["side0"], tiles["measurements"])
    assert all("classification" not in f["properties"] for f in plain["features"])
    _validate(plain)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_measurement_refused(tiles: dict[str, Any], bad: float) -> None:
    tiles["measurements"]["p_tumor"][3] = bad
    with pytest.raises(ValueError, match=r"'p_tumor'.*tile index 3"):
        slide_geojson([], **tiles)


def test_write_refuses_nan(tmp_path: Path) -> None:
    collection = {"type": "FeatureCollection", "features": [{"properties": {"measurements": {"p": float("nan")}}}]}
    with pytest.raises(ValueError, match="JSON"):
        write_geojson(tmp_path / "x.geojson", collection)
    assert list(tmp_path.iterdir()) == []


def test_mismatched_inputs_refused(tiles: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="classification has 2 names for 7 tiles"):
        slide_geojson([], tiles["coords"], tiles["side0"], tiles["measurements"], ["a", "b"])
    with pytest.raises(ValueError, match=r"'count' has shape \(3,\)"):
        slide_geojson([], tiles["coords"], tiles["side0"], {"count": np.zeros(3)})


def test_no_tiles_gives_only_annotations(tmp_path: Path, mask: np.ndarray) -> None:
    tissue = tissue_polygons(mask, SCALE)
    collection = slide_geojson(tissue, np.zeros((0, 2), np.int64), 448.0, {"p_tumor": np.zeros(0, np.float32)}, [])
    path = tmp_path / "empty.geojson"
    write_geojson(path, collection)
    loaded = json.loads(path.read_text())
    _validate(loaded)
    assert len(loaded["features"]) == len(tissue) == 2
    assert {f["properties"]["objectType"] for f in loaded["features"]} == {"annotation"}

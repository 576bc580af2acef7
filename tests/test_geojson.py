"""Tissue outlines and scored tiles as QuPath GeoJSON: exact pixel-edge outlines valid for JTS, level-0 geometry,
RFC 7946 rings, a schema, NaN measurements left out, ids that differ between runs."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from medvision.wsi.geojson import palette_colors, slide_geojson, tissue_polygons, write_geojson
from medvision.wsi.outline import mask_outline

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
    np.testing.assert_array_equal(_bbox(rect[0]), np.array([30, 20, 110, 80]) / SCALE)  # pixel edges, exactly
    np.testing.assert_array_equal(_bbox(disc[0]), np.array([170, 110, 231, 171]) / SCALE)
    assert len(rect) == 2 and len(disc) == 1
    np.testing.assert_array_equal(_bbox(rect[1]), np.array([60, 40, 80, 60]) / SCALE)
    for polygon in polygons:
        for k, ring in enumerate(polygon):
            assert len(ring) >= 4 and ring[0] == ring[-1]
            assert all(isinstance(v, float) for pos in ring for v in pos)
            assert (_signed_area(ring) > 0) == (k == 0)  # RFC 7946: exterior CCW, holes CW
    assert (_signed_area(rect[0]) + _signed_area(rect[1])) / TOL**2 == 80 * 60 - 20 * 20  # mask px: 20 x 20 level-0
    assert sum(_signed_area(r) for p in polygons for r in p) / TOL**2 == mask.sum()
    _check_outline(polygons, mask, SCALE, SCALE)


def _lattice(ring: list[list[float]], sx: float, sy: float) -> np.ndarray:
    """An open ring's level-0 positions back on the mask's pixel-edge lattice (exact at the scales used here)."""
    pts = np.asarray(ring[:-1]) * [sx, sy]
    lattice = np.round(pts).astype(np.int64)
    np.testing.assert_allclose(pts, lattice, atol=1e-9)
    return lattice


def _winding(rings: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Winding number of lattice rings at every pixel centre: the vertical edges left of it, signed by direction."""
    crossings = np.zeros((shape[0], shape[1] + 1), np.int64)
    for ring in rings:
        for (x0, y0), (x1, y1) in zip(ring, np.roll(ring, -1, axis=0), strict=True):
            if x0 == x1:
                crossings[min(y0, y1) : max(y0, y1), x0] += 1 if y1 < y0 else -1
    return np.cumsum(crossings, axis=1)[:, : shape[1]]


def _check_outline(polygons: list[Any], mask: np.ndarray, sx: float, sy: float) -> None:
    """What JTS (QuPath) needs of a rectilinear polygon, and that the polygons cover exactly the mask's pixels:
    closed simple rings of at least 4 positions, every edge axis-parallel and turning 90 degrees (no repeated
    vertex, no collinear run, no spike), exterior CCW and holes CW, holes inside their shell, no segment shared
    by two rings, each polygon's interior connected; their union is the mask (by winding number)."""
    covered = np.zeros(mask.shape, np.int64)
    segments: set[tuple[int, int, int, int]] = set()
    for polygon in polygons:
        rings = []
        for k, ring in enumerate(polygon):
            assert len(ring) >= 5 and ring[0] == ring[-1]
            lattice = _lattice(ring, sx, sy)
            assert len(np.unique(lattice, axis=0)) == len(lattice), "a vertex twice: the ring touches itself"
            step = np.roll(lattice, -1, axis=0) - lattice
            assert ((step[:, 0] == 0) != (step[:, 1] == 0)).all()  # axis-parallel, never zero length
            assert ((step * np.roll(step, -1, axis=0)).sum(axis=1) == 0).all()  # every vertex a 90-degree turn
            assert (_signed_area(ring) > 0) == (k == 0)
            for (x0, y0), (dx, dy) in zip(lattice.tolist(), step.tolist(), strict=True):
                for t in range(max(abs(dx), abs(dy))):
                    ux, uy = x0 + t * np.sign(dx), y0 + t * np.sign(dy)
                    unit = (min(ux, ux + np.sign(dx)), min(uy, uy + np.sign(dy)), int(dx != 0), int(dy != 0))
                    assert unit not in segments, "two rings share a segment"
                    segments.add(unit)
            rings.append(lattice)
        own = _winding(rings, mask.shape)
        assert set(np.unique(own).tolist()) <= {0, 1}  # the holes lie inside the shell
        assert cv2.connectedComponents(own.astype(np.uint8), connectivity=4)[0] == 2  # one connected interior
        covered += own
    np.testing.assert_array_equal(covered, mask != 0)
    try:
        import shapely
    except ImportError:
        return
    for polygon in polygons:
        assert shapely.is_valid(shapely.Polygon(polygon[0], polygon[1:]))


def _masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    m: dict[str, np.ndarray] = {name: np.zeros((24, 30), np.uint8) for name in
                                ("square", "hole", "strips", "diagonal", "pinched", "two_ls", "wall")}  # fmt: skip
    m["square"][3:7, 5:9] = 1
    m["hole"][2:12, 2:12] = 1
    m["hole"][5:9, 5:9] = 0  # 4 x 4: drawn with area 23 through pixel centres
    m["strips"][2, 3:25] = 1  # 1 px high
    m["strips"][5:20, 4] = 1  # 1 px wide
    m["strips"][10:21, 10] = m["strips"][20, 10:22] = 1  # an L of 1-px arms
    m["diagonal"][2:5, 2:5] = m["diagonal"][5:8, 5:8] = 1  # two squares meeting at a corner
    m["diagonal"][10:18, 10:18] = np.indices((8, 8)).sum(0) % 2  # a checkerboard
    m["pinched"][2:9, 2:9] = 1
    m["pinched"][3:8, 3:8] = 0  # a 1-px ring around a hole ...
    m["pinched"][2, 8] = 0  # ... without its top-right pixel: closed only where (7, 2) and (8, 3) meet, at x 8, y 3
    m["two_ls"][1, 1:4] = m["two_ls"][1:4, 1] = 1  # two L's that meet at two corners around a 2 x 2 gap
    m["two_ls"][4, 2:5] = m["two_ls"][2:5, 4] = 1
    m["wall"][2:12, 0:10] = 1
    m["wall"][4:10, 1:6] = 0  # a hole behind a 1-px wall, at the image's edge
    noise = cv2.GaussianBlur(rng.random((90, 120)).astype(np.float32), (0, 0), 3)
    m["blobby"] = (noise > np.quantile(noise, 0.55)).astype(np.uint8)
    return m


@pytest.mark.parametrize("scale", [(0.05, 0.05), (0.25, 0.125)])
@pytest.mark.parametrize("name", sorted(_masks()))
def test_outline_area_is_the_pixel_count_and_valid_for_jts(name: str, scale: tuple[float, float]) -> None:
    mask = _masks()[name]
    sx, sy = scale
    polygons = tissue_polygons(mask, scale, min_area_px=0)
    area = sum(_signed_area(r) for p in polygons for r in p)
    assert area * sx * sy == pytest.approx(mask.sum(), rel=1e-12)  # exact but for float rounding
    assert len(polygons) == cv2.connectedComponents(mask, connectivity=4)[0] - 1  # pixels meeting at a corner: apart
    _check_outline(polygons, mask, sx, sy)
    if name == "hole":
        ((shell, hole),) = polygons
        assert -_signed_area(hole) * sx * sy == 16 and _signed_area(shell) * sx * sy == 100
    if name == "pinched":  # a shell and a hole touching at the one corner that closes the ring
        ((shell, hole),) = polygons
        assert {tuple(p) for p in shell} & {tuple(p) for p in hole} == {(8 / sx, 3 / sy)}
    if name == "two_ls":  # two polygons, not a frame whose hole cuts its interior in two
        assert [len(p) for p in polygons] == [1, 1]


def test_outline_keeps_vertices_few_and_specks_out() -> None:
    mask = np.zeros((40, 40), np.uint8)
    mask[5:30, 5:30] = 1
    mask[10:13, 10:13] = 0  # a 3 x 3 hole: fewer than 16 pixels
    mask[35:38, 35:38] = 1  # a 3 x 3 speck
    mask[32:36, 2:6] = 1  # 4 x 4: kept
    (square,) = mask_outline(mask[5:30, 5:30])
    assert square[0].tolist() == [[0, 0], [25, 0], [25, 25], [0, 25]]  # collinear runs merged: 4 corners
    big, small = tissue_polygons(mask, 1.0)
    assert [len(r) for r in big] == [5] and [len(r) for r in small] == [5]
    assert _signed_area(small[0]) == 16
    assert len(tissue_polygons(mask, 1.0, min_area_px=0)) == 3
    assert tissue_polygons(np.zeros((8, 8), bool), 1.0) == []
    (one,) = tissue_polygons(np.ones((1, 1), bool), 0.5, min_area_px=0)
    assert one == [[[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 2.0], [0.0, 0.0]]]
    for bad in (0.0, -1.0, float("nan"), (0.5, 0.0), (1, 2, 3)):
        with pytest.raises(ValueError, match="mask_scale"):
            tissue_polygons(mask, bad)  # type: ignore[arg-type]


def test_outline_uses_the_masks_own_y_scale() -> None:
    """A 30001 x 80000 slide's thumbnail is 938 x 2500: x and y scales differ, and the outline's bottom edge must
    land on the slide's (the x scale alone puts it 40 level-0 px short)."""
    w0, h0 = 30001, 80000
    mask = np.zeros((2500, 938), bool)
    mask[:, 100:] = True
    (polygon,) = tissue_polygons(mask, (938 / w0, 2500 / h0))
    np.testing.assert_allclose(_bbox(polygon[0]), [100 * w0 / 938, 0, w0, h0], atol=0.01)
    (short,) = tissue_polygons(mask, 938 / w0)
    assert h0 - _bbox(short[0])[3] > 39


def test_outline_of_a_tissue_sized_mask_is_exact() -> None:
    """At the size of a real tissue mask (3000 x 2500 px at 8 µm/px), with pinches, holes and islands."""
    noise = cv2.resize(np.random.default_rng(1).random((100, 120)).astype(np.float32), (3000, 2500))
    mask = noise > 0.6
    polygons = mask_outline(mask)
    area = sum(0.5 * float(np.dot(r[:, 0], np.roll(r[:, 1], -1)) - np.dot(np.roll(r[:, 0], -1), r[:, 1]))
               for p in polygons for r in p)  # fmt: skip
    assert area == mask.sum()
    assert len(polygons) == cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)[0] - 1


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


def test_two_runs_on_one_slide_share_no_id_and_one_run_repeats_its_own(tiles: dict[str, Any]) -> None:
    """QuPath asks to "Update IDs" when a second file repeats ids already on the slide (another model, a rescore)."""
    tissue = tissue_polygons(np.ones((4, 4), bool), SCALE)

    def ids(run: str) -> list[str]:
        return [f["id"] for f in slide_geojson(tissue, slide_id="a.svs", run_id=run, **tiles)["features"]]

    first, second = ids('["sha-of-model-1", "/out/scores.csv"]'), ids('["sha-of-model-2", "/out/scores.csv"]')
    assert len(set(first)) == len(first) == 1 + len(tiles["coords"])
    assert not set(first) & set(second)
    assert ids('["sha-of-model-1", "/out/scores.csv"]') == first


def test_schema_has_teeth(tiles: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    collection = slide_geojson([], **tiles)
    collection["features"][0]["properties"]["classification"]["color"] = [0, 0, 256]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(collection)


def test_class_colors_and_unclassified_tiles(tiles: dict[str, Any]) -> None:
    fixed = slide_geojson([], **tiles, class_colors={"tumor": (200, 0, 0)})
    assert {tuple(f["properties"]["classification"]["color"]) for f in fixed["features"][1::2]} == {(200, 0, 0)}
    run = palette_colors(["stroma", "tumor", "normal"])  # the run's order, whatever a slide holds
    assert len(set(run.values())) == 3 and run == palette_colors(["stroma", "tumor", "normal"])
    tumour_only = dict(tiles, classification=["tumor"] * len(tiles["coords"]))
    for kwargs in (tiles, tumour_only):
        got = slide_geojson([], **kwargs, class_colors=run)["features"]
        assert all(f["properties"]["classification"]["color"] == list(run[f["properties"]["classification"]["name"]])
                   for f in got)  # fmt: skip
    plain = slide_geojson([], tiles["coords"], tiles["side0"], tiles["measurements"])
    assert all("classification" not in f["properties"] for f in plain["features"])
    _validate(plain)
    some = [None, "tumor", *[None] * (len(tiles["coords"]) - 2)]  # a tile without probabilities has no class
    mixed = slide_geojson([], tiles["coords"], tiles["side0"], tiles["measurements"], some, class_colors=run)
    assert ["classification" in f["properties"] for f in mixed["features"]] == [c is not None for c in some]
    assert mixed["features"][1]["properties"]["classification"] == {"name": "tumor", "color": list(run["tumor"])}
    _validate(mixed)  # QuPath's properties: classification is optional, as QuPath writes an unclassified object


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_measurement_left_out_of_its_tile(tmp_path: Path, tiles: dict[str, Any], bad: float) -> None:
    """JSON has no NaN; QuPath reads a measurement a detection lacks as NaN, so leaving it out keeps the value."""
    tiles["measurements"]["p_tumor"][3] = bad
    collection = slide_geojson([], **tiles)
    write_geojson(tmp_path / "x.geojson", collection)
    loaded = json.loads((tmp_path / "x.geojson").read_text())
    _validate(loaded)
    measured = [f["properties"]["measurements"] for f in loaded["features"]]
    assert "p_tumor" not in measured[3] and "count" in measured[3]
    assert all("p_tumor" in m for i, m in enumerate(measured) if i != 3)
    with pytest.raises(ValueError, match=r"coords hold a non-finite value at tile index 2"):
        slide_geojson([], np.where(np.arange(14).reshape(7, 2) == 4, bad, tiles["coords"]), tiles["side0"], {})


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

"""Macenko stain normalisation on the shared H&E tiles: it moves stains toward the reference, leaves glass alone."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("torchstain")

import albumentations as A

from medvision.io.image import ImageReadError
from medvision.wsi.stain import MacenkoNormalizer, StainNormalize, load_reference, tissue_od

TISSUE = ("DEB", "LYM", "MUS", "STR", "TUM")  # mostly stained tissue; NORM is the reference


@pytest.fixture(scope="module")
def tile_paths(shared: Path) -> dict[str, Path]:
    paths = {p.name.split("-")[0]: p for p in sorted((shared / "data" / "he_tiles").glob("*.tif"))}
    if not {"NORM", "BACK", *TISSUE} <= paths.keys():
        pytest.skip(f"{shared / 'data' / 'he_tiles'} lacks some of the NORM, BACK, {TISSUE} tiles")
    return paths


@pytest.fixture(scope="module")
def tiles(tile_paths: dict[str, Path]) -> dict[str, np.ndarray]:
    return {k: load_reference(p) for k, p in tile_paths.items()}


@pytest.fixture(scope="module")
def norm(tiles: dict[str, np.ndarray]) -> MacenkoNormalizer:
    return MacenkoNormalizer(tiles["NORM"])


def estimate(rgb: np.ndarray) -> MacenkoNormalizer:
    """The Macenko fit of a tile: its stain vectors and concentration scale, the quantities normalisation maps."""
    return MacenkoNormalizer(rgb, min_tissue_pixels=10)


@pytest.mark.parametrize("name", TISSUE)
def test_normalised_stains_move_to_the_reference(name: str, tiles: dict[str, np.ndarray], norm: MacenkoNormalizer):
    tile = tiles[name]
    out = norm(tile)
    assert out.dtype == np.uint8 and out.shape == tile.shape
    assert not np.array_equal(out, tile)
    before, after = estimate(tile), estimate(out)
    he_before = np.linalg.norm(before.stain_matrix - norm.stain_matrix)
    he_after = np.linalg.norm(after.stain_matrix - norm.stain_matrix)
    assert he_after < 0.5 * he_before, (he_before, he_after)  # measured: 0.14-0.27 -> 0.01-0.10
    assert he_after < 0.12
    # the 99th-percentile H and E concentrations are mapped to the reference's
    scale_after = np.abs(np.log(after.max_concentrations / norm.max_concentrations))
    assert np.all(scale_after < 0.45), scale_after


def test_reference_fit_is_a_valid_stain_matrix(norm: MacenkoNormalizer):
    he = norm.stain_matrix
    assert he.shape == (3, 2) and np.all(he > 0)
    np.testing.assert_allclose(np.linalg.norm(he, axis=0), 1.0, atol=1e-9)
    # hematoxylin absorbs more red than eosin does, relative to green (it is the bluer stain)
    assert he[0, 0] / he[1, 0] > he[0, 1] / he[1, 1]
    assert np.all(norm.max_concentrations > 0)


def speck() -> np.ndarray:
    img = np.full((224, 224, 3), 255, np.uint8)
    img[:3, :3] = (150, 80, 160)  # 9 stained pixels: torchstain alone turned the whole tile purple
    return img


def noisy(color: tuple[int, int, int], sd: float) -> np.ndarray:
    """One flat colour with Gaussian pixel noise of ``sd`` grey levels, as a scanner gives it."""
    rng = np.random.default_rng(0)
    return np.clip(np.asarray(color) + rng.normal(0, sd, (224, 224, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "make",
    [
        lambda tiles: np.full((224, 224, 3), 255, np.uint8),
        lambda tiles: np.full((224, 224, 3), 240, np.uint8),
        lambda tiles: tiles["BACK"],
        lambda tiles: speck(),
        lambda tiles: np.full((224, 224, 3), (200, 120, 170), np.uint8),  # one flat colour: no stain plane
        lambda tiles: noisy((200, 120, 170), 2),  # the same with scanner noise: a round OD cloud, no stain axis
        lambda tiles: noisy((150, 150, 150), 2),
        lambda tiles: noisy((90, 60, 160), 3),  # blue ink
        lambda tiles: noisy((5, 5, 5), 2),  # near-black
    ],
    ids=["white", "glass240", "BACK", "speck", "flat-pink", "noisy-pink", "noisy-grey", "noisy-ink", "near-black"],
)
def test_tissue_poor_tile_is_returned_unchanged(make, tiles: dict[str, np.ndarray], norm: MacenkoNormalizer):
    tile = make(tiles)
    assert not norm.is_normalisable(tile)
    out = norm(tile)
    assert out is not tile and out.dtype == np.uint8
    np.testing.assert_array_equal(out, tile)


def test_threshold_is_the_tissue_pixel_count(tiles: dict[str, np.ndarray]):
    n = len(tissue_od(tiles["TUM"]))  # 18894, fewer than the NORM reference's 42006
    assert MacenkoNormalizer(tiles["NORM"], min_tissue_pixels=n).is_normalisable(tiles["TUM"])
    assert not MacenkoNormalizer(tiles["NORM"], min_tissue_pixels=n + 1).is_normalisable(tiles["TUM"])


def test_a_tiles_fate_depends_on_what_it_shows_not_on_its_size(tile_paths: dict[str, Path], norm: MacenkoNormalizer):
    """Macenko's scale is the 99th percentile over every pixel: mostly-glass tiles stay as they are at any size."""
    if "MUC" not in tile_paths:
        pytest.skip("no MUC tile in the shared set")
    muc = load_reference(tile_paths["MUC"])
    for k in (1, 2, 3, 4):  # 0.57% tissue at every size; 2592 tissue pixels at 672 px passed a count-only guard
        tile = np.ascontiguousarray(np.tile(muc, (k, k, 1)))
        np.testing.assert_array_equal(norm(tile), tile)
    glass = np.full((1024, 1024, 3), 236, np.uint8)
    glass[:100, :100] = load_reference(tile_paths["STR"])[:100, :100]  # 10,000 tissue pixels, 1% of the tile
    assert len(tissue_od(glass)) >= 2000
    np.testing.assert_array_equal(norm(glass), glass)  # was black tissue on purple glass
    alone = np.ascontiguousarray(glass[:100, :100])
    assert not np.array_equal(norm(alone), alone)  # the same tissue on its own is normalised
    with pytest.raises(ValueError, match=r"min_tissue_fraction must be in 0.01..1.*got 0.001"):
        MacenkoNormalizer(alone, min_tissue_fraction=0.001)


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (np.full((224, 224, 3), 255, np.uint8), r"too little tissue.*0 of 50176 pixels.*min_tissue_pixels=2000"),
        (speck(), r"too little tissue.*9 of 50176"),
        (np.full((64, 64, 3), (200, 120, 170), np.uint8), r"single flat colour"),
        (np.zeros((8, 8, 3), np.float32), r"reference: expected an RGB uint8 image.*float32"),
        (np.zeros((8, 8), np.uint8), r"reference: expected an RGB uint8 image.*\(8, 8\)"),
    ],
    ids=["white", "speck", "flat", "float", "grey"],
)
def test_bad_reference_raises_naming_the_problem(reference: np.ndarray, message: str):
    with pytest.raises(ValueError, match=message):
        MacenkoNormalizer(reference)


def test_bad_parameters_raise(tiles: dict[str, np.ndarray]):
    with pytest.raises(ValueError, match="min_tissue_pixels must be at least 10, got 0"):
        MacenkoNormalizer(tiles["NORM"], min_tissue_pixels=0)
    with pytest.raises(ValueError, match=r"io .* 1\.\.255, got 300"):
        MacenkoNormalizer(tiles["NORM"], io=300)
    with pytest.raises(ValueError, match=r"image: expected an RGB uint8 image.*float64"):
        MacenkoNormalizer(tiles["NORM"])(tiles["STR"] / 255.0)


def test_deterministic_and_picklable(tiles: dict[str, np.ndarray], norm: MacenkoNormalizer):
    again = MacenkoNormalizer(tiles["NORM"].copy())
    np.testing.assert_array_equal(again.stain_matrix, norm.stain_matrix)
    np.testing.assert_array_equal(again.max_concentrations, norm.max_concentrations)
    first = norm(tiles["TUM"])
    np.testing.assert_array_equal(norm(tiles["TUM"]), first)
    np.testing.assert_array_equal(again(tiles["TUM"]), first)
    restored = pickle.loads(pickle.dumps(norm))
    np.testing.assert_array_equal(restored(tiles["TUM"]), first)
    np.testing.assert_array_equal(restored.stain_matrix, norm.stain_matrix)


def test_non_contiguous_input(tiles: dict[str, np.ndarray], norm: MacenkoNormalizer):
    view = np.rot90(tiles["STR"])  # a strided view, as flips and rotations produce
    np.testing.assert_array_equal(norm(view), norm(np.ascontiguousarray(view)))


def test_albumentations_wrapper_matches_the_normaliser(tile_paths: dict[str, Path], tiles, norm):
    step = StainNormalize(str(tile_paths["NORM"]))
    pipeline = A.Compose([step])
    expected = norm(tiles["LYM"])
    np.testing.assert_array_equal(pipeline(image=tiles["LYM"])["image"], expected)
    # medvision's loaders hand albumentations float32 in [0, 1]: same pixels, same dtype back
    as_float = tiles["LYM"].astype(np.float32) / np.float32(255.0)
    got = pipeline(image=as_float)["image"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.rint(got * 255.0).astype(np.uint8), expected)
    np.testing.assert_array_equal(pipeline(image=tiles["BACK"])["image"], tiles["BACK"])
    # serialises as the reference path; the restored and the pickled pipelines give the same pixels
    spec = A.to_dict(pipeline)
    assert spec["transform"]["transforms"][0]["reference"] == str(tile_paths["NORM"])
    restored = A.from_dict(spec)
    np.testing.assert_array_equal(restored(image=tiles["LYM"])["image"], expected)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(pipeline))(image=tiles["LYM"])["image"], expected)


def test_wrapper_is_always_applied_and_names_a_bad_reference(tile_paths: dict[str, Path]):
    with pytest.raises(ValueError, match=r"p must be 1\.0, got 0\.5"):
        StainNormalize(str(tile_paths["NORM"]), p=0.5)
    with pytest.raises(ValueError, match=rf"{tile_paths['BACK'].name}: reference has too little tissue"):
        StainNormalize(str(tile_paths["BACK"]))
    step = StainNormalize(tile_paths["NORM"])  # a Path is stored as its string, so it serialises
    assert step.reference == str(tile_paths["NORM"])


def test_load_reference_refuses_what_is_not_rgb8(tmp_path: Path, tiles: dict[str, np.ndarray]):
    rgba = tmp_path / "opaque.png"
    cv2.imwrite(str(rgba), cv2.cvtColor(tiles["NORM"], cv2.COLOR_RGB2BGRA))
    np.testing.assert_array_equal(load_reference(rgba), tiles["NORM"])
    deep = tmp_path / "deep.png"
    cv2.imwrite(str(deep), tiles["NORM"].astype(np.uint16) * 257)
    with pytest.raises(ImageReadError, match=r"deep\.png: a stain reference must be an 8-bit RGB.*uint16"):
        load_reference(deep)
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), tiles["NORM"][..., 0])
    with pytest.raises(ImageReadError, match=r"grey\.png: .*shape \(224, 224\)"):
        load_reference(grey)
    with pytest.raises(ImageReadError, match=r"missing\.png"):
        load_reference(tmp_path / "missing.png")

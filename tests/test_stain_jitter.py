"""HED stain jitter on the shared H&E tiles: identity at scale 1 / shift 0, stains moved by the drawn factor,
the residual kept, draws reproducible from albumentations' seed, and no colour cast from the pathology preset."""

from __future__ import annotations

import pickle
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch

from medvision.data.transforms import HEDJitter, build_transforms, explicit, preset, tissue_invariances
from medvision.recipe import AugmentConfig, RecipeError, TransformSpec
from medvision.wsi.stain import JITTER_IO, RUIFROK_HED, hed_jitter, load_reference, optical_density


@pytest.fixture(scope="module")
def tiles(shared: Path) -> dict[str, np.ndarray]:
    paths = sorted((shared / "data" / "he_tiles").glob("*.tif"))
    if len(paths) != 9:
        pytest.skip(f"{shared / 'data' / 'he_tiles'} should hold the 9 H&E tiles, found {len(paths)}")
    return {p.name.split("-")[0]: load_reference(p) for p in paths}


def as_float(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) / np.float32(255.0)


def concentrations(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) hematoxylin, eosin and residual (DAB) concentrations: colour deconvolution with the full basis."""
    intensity = rgb.reshape(-1, 3).astype(np.float64) * (255.0 if rgb.dtype == np.float32 else 1.0)
    return optical_density(intensity, JITTER_IO) @ np.linalg.inv(RUIFROK_HED)


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_identity_draw_returns_every_tile(dtype: str, tiles: dict[str, np.ndarray]) -> None:
    for name, tile in tiles.items():
        x = tile if dtype == "uint8" else as_float(tile)
        out = hed_jitter(x, (1.0, 1.0), (0.0, 0.0))
        assert out.dtype == x.dtype and out.shape == x.shape, name
        err = np.abs(out.astype(np.float64) - x.astype(np.float64)) * (1.0 if dtype == "uint8" else 255.0)
        assert err.max() <= 1.0, (name, err.max())  # measured: 0 on uint8, 3e-5 grey levels on float32


def test_jitter_scales_and_shifts_h_and_e_and_keeps_the_residual(tiles: dict[str, np.ndarray]) -> None:
    scale, shift = (1.25, 0.8), (0.04, -0.03)
    for name in ("NORM", "TUM", "STR", "LYM"):
        x = as_float(tiles[name])
        out = hed_jitter(x, scale, shift)
        inside = np.all((out > 1 / 255) & (out < 254 / 255), axis=-1).reshape(-1)  # pixels no channel clipped
        assert inside.mean() > 0.9, name
        before, after = concentrations(x)[inside], concentrations(out)[inside]
        np.testing.assert_allclose(after[:, 0], scale[0] * before[:, 0] + shift[0], atol=1e-3, err_msg=name)
        np.testing.assert_allclose(after[:, 1], scale[1] * before[:, 1] + shift[1], atol=1e-3, err_msg=name)
        # the third channel holds real signal on H&E tiles (what two stains leave over) and is kept as it was
        assert before[:, 2].std() > 0.02, name
        np.testing.assert_allclose(after[:, 2], before[:, 2], atol=1e-3, err_msg=name)


def test_uint8_jitter_matches_float_to_a_grey_level(tiles: dict[str, np.ndarray]) -> None:
    tile = tiles["TUM"]
    a = hed_jitter(tile, (1.1, 0.9), (0.05, -0.05))
    b = hed_jitter(as_float(tile), (1.1, 0.9), (0.05, -0.05))
    assert a.dtype == np.uint8 and b.dtype == np.float32 and b.min() >= 0.0 and b.max() <= 1.0
    assert np.abs(a.astype(np.float64) - b * 255.0).max() <= 0.5 + 1e-3
    more_h = hed_jitter(tile, (1.3, 1.0), (0.0, 0.0)).reshape(-1, 3).mean(0)
    assert more_h[0] < tile.reshape(-1, 3).mean(0)[0] - 3  # more hematoxylin absorbs more red: a darker, bluer tile


def test_same_seed_same_draw_and_output(tiles: dict[str, np.ndarray]) -> None:
    x = as_float(tiles["NORM"])
    one = A.Compose([HEDJitter((0.8, 1.2), (-0.1, 0.1), p=1.0)])
    two = A.Compose([HEDJitter((0.8, 1.2), (-0.1, 0.1), p=1.0)])
    one.set_random_seed(7)
    two.set_random_seed(7)
    first, again = one(image=x)["image"], two(image=x)["image"]
    assert np.array_equal(first, again)
    one.set_random_seed(8)
    assert not np.allclose(one(image=x)["image"], first, atol=1 / 255)
    # the whole fine-tuning pipeline, seeded per sample as the dataset does
    pipe = build_transforms(AugmentConfig(preset="pathology"), 64, (0.5,) * 3, (0.5,) * 3, normalize=False)
    outs = []
    for _ in range(2):
        pipe.set_random_seed(3)
        outs.append(pipe(image=x)["image"])
    assert outs[0].shape == (3, 64, 64) and outs[0].dtype == torch.float32
    assert torch.equal(outs[0], outs[1])


def test_pathology_preset_adds_no_colour_cast(tiles: dict[str, np.ndarray]) -> None:
    """albumentations' HEStain turned identity draws blue (+6 to +52 grey levels of blue on these tiles)."""
    stack = [as_float(t) for t in tiles.values()]
    steps = tissue_invariances(0.0, 0.0)  # flips, rot90 and an identity jitter, always applied
    steps[-1].p = 1.0
    pipe = A.Compose(steps)
    for seed, x in enumerate(stack):
        pipe.set_random_seed(seed)
        out = pipe(image=x)["image"]
        shift = (out.reshape(-1, 3).mean(0, dtype=np.float64) - x.reshape(-1, 3).mean(0, dtype=np.float64)) * 255.0
        assert np.abs(shift).max() < 0.01, shift
    # the preset's own ranges, always applied: scale and shift are drawn around zero, so over many draws the
    # tile set keeps its mean colour (measured: +0.2, +0.5, +0.1 grey levels; HEStain gave -2, -3, +27)
    steps = preset("pathology")
    jitter = steps[-1]
    assert isinstance(jitter, HEDJitter)
    assert jitter.intensity_scale_range == (0.9, 1.1) and jitter.intensity_shift_range == (-0.05, 0.05)
    jitter.p = 1.0
    pipe = A.Compose(steps)
    shifts = []
    for seed in range(20):
        pipe.set_random_seed(seed)
        shifts.append(np.mean([(pipe(image=x)["image"] - x).reshape(-1, 3).mean(0) for x in stack], axis=0))
    assert np.abs(np.mean(shifts, axis=0) * 255.0).max() < 2.0


def test_serialises_pickles_and_builds_from_a_recipe(tiles: dict[str, np.ndarray]) -> None:
    x = as_float(tiles["MUS"])
    pipe = A.Compose(preset("pathology"))
    rebuilt = A.from_dict(A.to_dict(pipe))
    unpickled = pickle.loads(pickle.dumps(pipe))
    outs = []
    for p in (pipe, rebuilt, unpickled):
        p.set_random_seed(11)
        outs.append(p(image=x)["image"])
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    built = explicit([TransformSpec(name="HEDJitter", intensity_scale_range=(0.7, 1.3), p=1.0)])
    assert isinstance(built[0], HEDJitter) and built[0].intensity_scale_range == (0.7, 1.3)
    with pytest.raises(RecipeError, match=r"augment.transforms\[0\].intensity_scale: .*intensity_scale_range"):
        explicit([TransformSpec(name="HEDJitter", intensity_scale=(0.7, 1.3))])
    with pytest.raises(RecipeError, match="HEDJitter"):
        explicit([TransformSpec(name="HEDJiter")])


def test_bad_input_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"float32 images must be in \[0, 1\]"):
        hed_jitter(np.full((4, 4, 3), 2.0, np.float32), (1.0, 1.0), (0.0, 0.0))
    with pytest.raises(ValueError, match="RGB image"):
        hed_jitter(np.zeros((4, 4), np.uint8), (1.0, 1.0), (0.0, 0.0))
    with pytest.raises(ValueError, match="uint8 or float32"):
        hed_jitter(np.zeros((4, 4, 3), np.float64), (1.0, 1.0), (0.0, 0.0))
    with pytest.raises(ValueError, match="scale and shift"):
        hed_jitter(np.zeros((4, 4, 3), np.uint8), (-1.0, 1.0), (0.0, 0.0))
    with pytest.raises(ValueError):
        HEDJitter(intensity_scale_range=(1.2, 0.8))

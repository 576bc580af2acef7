"""The input pipeline: compact transfer, device normalisation, per-sample seeds, device flips, preload."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from conftest import tiny_recipe

from medvision.data.dataset import ImageDataset, prepare
from medvision.data.sources import load_table, preload
from medvision.data.table import DataSourceError, SampleTable
from medvision.data.transforms import build_transforms, flip_rot90_batch, normalize_batch
from medvision.recipe import AugmentConfig, RecipeError, recipe_from_dict
from medvision.runtime import EpochSampler, Inputs, make_loader
from medvision.training.build import resolve_transfer

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _table(images: list[np.ndarray]) -> SampleTable:
    n = len(images)
    return SampleTable(
        ids=[f"img{i}" for i in range(n)], labels=np.arange(n) % 2, groups=[str(i) for i in range(n)],
        splits=["train"] * n, classes=["a", "b"], loader=lambda i: images[i], grayscale=False, origin="memory",
    )  # fmt: skip


def test_device_normalisation_matches_albumentations() -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    reference = prepare(raw, "dtype", 3, build_transforms(None, 32, MEAN, STD))  # normalised on the CPU
    plain = build_transforms(None, 32, MEAN, STD, normalize=False)
    as_float = normalize_batch(prepare(raw, "dtype", 3, plain, "float32")[None], MEAN, STD)[0]
    torch.testing.assert_close(as_float, reference, atol=1e-6, rtol=0)
    compact = prepare(raw, "dtype", 3, plain, "uint8")
    assert compact.dtype == torch.uint8 and compact.shape == (3, 32, 32)
    as_uint8 = normalize_batch(compact[None], MEAN, STD)[0]
    # rounding the resized image to 256 levels moves each value by at most half a level
    assert (as_uint8 - reference).abs().max() <= 0.5 / 255 / min(STD) + 1e-6
    half = prepare(raw, "dtype", 3, plain, "float16")
    assert half.dtype == torch.float16


def test_transfer_auto_follows_the_source_depth(tmp_path: Path) -> None:
    eight = _table([np.zeros((8, 8, 3), np.uint8)] * 2)
    sixteen = _table([np.zeros((8, 8), np.uint16)] * 2)
    assert resolve_transfer("auto", eight) == "uint8"
    assert resolve_transfer("auto", sixteen) == "float32"  # 16-bit detail is not rounded away
    assert resolve_transfer("float16", eight) == "float16"
    # one 8-bit image first, 16-bit ones after it: the split is probed across, not on its first image
    mixed = _table([np.zeros((8, 8, 3), np.uint8)] + [np.zeros((8, 8), np.uint16)] * 15)
    assert resolve_transfer("auto", mixed) == "float32"


def test_augmentation_does_not_depend_on_workers_or_persistence() -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(12)]
    transform = build_transforms(AugmentConfig(preset="pathology"), 16, MEAN, STD, normalize=False)
    ds = ImageDataset(_table(images), np.arange(12), transform, "dtype", 3, "uint8")

    def epochs(workers: int) -> list[torch.Tensor]:
        sampler = EpochSampler(12, seed=3)
        loader = make_loader(ds, 4, workers, torch.device("cpu"), sampler)
        out = []
        for epoch in range(2):  # persistent workers keep their state between these two epochs
            sampler.set_epoch(epoch)
            out.append(torch.cat([x for x, _ in loader]))
        return out

    inline, workers = epochs(0), epochs(2)
    for a, b in zip(inline, workers, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(inline[0], inline[1])  # a new epoch draws new augmentations
    keys = list(EpochSampler(12, seed=3))
    assert sorted(k for k, _ in keys) == list(range(12)) and keys == list(EpochSampler(12, seed=3))


def test_device_flips_are_dihedral_seeded_and_cover_all_eight() -> None:
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3).repeat(64, 1, 1, 1)
    out = flip_rot90_batch(x, torch.Generator().manual_seed(0))
    again = flip_rot90_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    base = x[0, 0]
    group = [torch.rot90(b, k, (0, 1)) for b in (base, base.flip(1)) for k in range(4)]
    seen = set()
    for img in out[::2, 0]:
        match = [i for i, g in enumerate(group) if torch.equal(img, g)]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == set(range(8))
    with pytest.raises(ValueError, match="square"):
        flip_rot90_batch(torch.zeros(1, 1, 4, 5), torch.Generator())


def test_inputs_normalise_flip_and_lay_out_on_the_device() -> None:
    batch = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    plain = Inputs(MEAN, STD, channels_last=True)(batch, torch.device("cpu"))
    assert plain.dtype == torch.float32 and plain.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(plain, normalize_batch(batch, MEAN, STD))
    flipped = Inputs(MEAN, STD, channels_last=False, flips=True)(batch, torch.device("cpu"), torch.Generator())
    assert sorted(flipped.flatten().tolist()) == sorted(plain.flatten().tolist())


def test_on_device_flips_leave_the_cpu_pipeline() -> None:
    names = [type(t).__name__ for t in build_transforms(AugmentConfig(preset="pathology", on_device=True), 16,
                                                        MEAN, STD).transforms]  # fmt: skip
    assert "HorizontalFlip" not in names and "RandomRotate90" not in names and "HEDJitter" in names
    with pytest.raises(RecipeError, match="on_device"):
        build_transforms(AugmentConfig(preset="radiology", on_device=True), 16, (0.5,), (0.5,))


def test_preload_serves_decoded_images_and_keeps_bad_files_bad(tiles_manifest: Path, tmp_path: Path) -> None:
    tree = tiny_recipe(tiles_manifest, tmp_path)
    plain = load_table(recipe_from_dict(tree).data, 0)
    tree["data"]["preload"] = True
    loaded = load_table(recipe_from_dict(tree).data, 0)
    for i in (0, 5, 71):
        assert np.array_equal(loaded.loader(i), plain.loader(i))
    images = [np.ones((4, 4, 3), np.uint8)] * 3

    def flaky(i: int) -> np.ndarray:
        if i == 1:
            raise OSError("img1: truncated PNG")
        return images[i]

    table = _table(images)
    table.loader = flaky
    preload(table)
    assert np.array_equal(table.loader(2), images[2])
    with pytest.raises(OSError, match="truncated"):
        table.loader(1)
    with pytest.raises(DataSourceError, match=r"data\.preload"):
        preload(_table(images), max_fraction=1e-15)


def test_train_with_uint8_batches_device_flips_and_preload(tiles_manifest: Path, tmp_path: Path) -> None:
    from medvision.tasks.train import train

    tree = tiny_recipe(tiles_manifest, tmp_path, phases=[{"epochs": 1, "lr": 3e-3}])
    tree["data"].update(preload=True, num_workers=2)
    tree["augment"]["on_device"] = True
    tree["evaluation"] = {"bootstrap": 0}  # no CIs asked for: none computed, no band drawn
    run_dir = train(recipe_from_dict(tree))
    log = (run_dir / "train.log").read_text()
    assert "2 worker(s), batches travel as uint8" in log and "flips/rot90 on the device" in log
    assert (run_dir / "report.html").is_file()
    assert "![ROC curve; markers" in (run_dir / "report.md").read_text()
    assert "auc_ci" not in json.loads((run_dir / "metrics.json").read_text())["image"]["test"]


def test_albumentations_transforms_still_compose() -> None:
    # the CPU pipeline without Normalize ends in a float tensor in [0, 1]
    t = build_transforms(None, 8, MEAN, STD, normalize=False)
    out = t(image=np.ones((10, 10, 3), np.float32))["image"]
    assert out.dtype == torch.float32 and float(out.max()) == pytest.approx(1.0)
    assert not any(isinstance(step, A.Normalize) for step in t.transforms)


_FAULTS = """
import json, resource, sys
import torch
from medvision.runtime import reuse_freed_memory

def faults():  # minor page faults of ten 64 MB allocate-fill-free cycles, through PyTorch's CPU allocator
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(1 << 23, dtype=torch.float64).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
print(json.dumps([default, reuse_freed_memory(), faults(), reuse_freed_memory()]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_malloc_reuses_freed_memory_instead_of_faulting_it_in_again() -> None:
    import subprocess

    env = {**os.environ, "MEDVISION_MALLOC": ""}
    done = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, timeout=120, env=env)
    default, set_, reused, again = json.loads(done.stdout.strip().splitlines()[-1])
    assert set_ and again  # set once; a second call says so without setting it again
    assert default > 10 * 16384 * 0.9  # glibc: each 64 MB block is mmapped and faulted in, 16,384 pages a time
    # kept in the heap: faulted in once here (16,380 faults); a CI run once saw 4 of the 10 blocks mapped again
    assert reused < default / 2
    env["MEDVISION_MALLOC"] = "system"
    done = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, timeout=120, env=env)
    default, set_, reused, _ = json.loads(done.stdout.strip().splitlines()[-1])
    assert not set_ and reused > default * 0.9  # the opt-out leaves malloc as it is

"""Whole slides: backends, MPP, tissue, tile grids, the tile reader, and slide-level training and scoring.

The slides are built here from the real H&E tiles in ../shared (``medvision.wsi.synthetic``): tissue
blobs on glass, real tumour tiles planted at known level-0 boxes, pyramidal JPEG TIFFs with an
Aperio-style description (with identifying ``Filename``/``User`` fields) and DICOM WSI series (with
patient tags) of the same pixels.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("openslide")
pytest.importorskip("wsidicom")

from medvision.data.table import DataSourceError
from medvision.recipe import recipe_from_dict
from medvision.runtime import EpochSampler
from medvision.wsi.slide import SlideError, open_slide
from medvision.wsi.synthetic import (
    build_slide_set,
    compose_slide,
    pyramid_levels,
    write_dicom_wsi,
    write_pyramidal_tiff,
)
from medvision.wsi.tiles import SlideRef, TileReader, TileSpec, plan_tiles, read_tile
from medvision.wsi.tissue import tissue_mask

LEAKS = ("SMITH_JOHN", "SMITH^JOHN", "jsmith", "PID-0042", "1957-03-02")


@pytest.fixture(scope="module")
def he_dir(shared: Path) -> Path:
    return shared / "data" / "he_tiles"


@pytest.fixture(scope="module")
def small_rgb(he_dir: Path) -> np.ndarray:
    return compose_slide(he_dir, 1024, 768, [(64, 64, 600, 600)], [(200, 200, 192, 192)], seed=3,
                         pen_boxes=[(760, 80, 220, 120)])  # fmt: skip


def _write(flavour: str, rgb: np.ndarray, folder: Path, mpp: float | None = 0.5) -> Path:
    if flavour.startswith("dicom"):
        return write_dicom_wsi(folder / flavour, rgb, mpp, sparse=flavour == "dicom-sparse")
    suffix = {"aperio": ".svs", "generic": ".tif", "ome": ".ome.tif"}[flavour]
    return write_pyramidal_tiff(folder / f"slide{suffix}", rgb, mpp, flavour=flavour)  # type: ignore[arg-type]


@pytest.mark.parametrize("flavour,backend", [("aperio", "openslide"), ("generic", "openslide"), ("ome", "tiffslide"),
                                             ("dicom", "wsidicom"), ("dicom-sparse", "wsidicom")])  # fmt: skip
def test_every_backend_reads_the_pixels_levels_and_mpp(flavour: str, backend: str, small_rgb: np.ndarray,
                                                       tmp_path: Path) -> None:  # fmt: skip
    path = _write(flavour, small_rgb, tmp_path)
    levels = pyramid_levels(small_rgb, (1, 4, 16))
    with open_slide(path) as slide:
        assert slide.backend == backend
        assert slide.level_dimensions == tuple((lv.shape[1], lv.shape[0]) for lv in levels)
        assert slide.mpp == pytest.approx(0.5) and slide.mpp_source != "recipe"
        region = slide.read_region(0, 128, 96, 256, 256)
        assert region.dtype == np.uint8 and region.shape == (256, 256, 3)
        assert np.abs(region.astype(int) - small_rgb[96:352, 128:384]).mean() < 6  # JPEG
        # level 1 addressed by level-0 coordinates, sized in level-1 pixels
        coarse = slide.read_region(1, 128, 96, 64, 64)
        assert np.abs(coarse.astype(int) - levels[1][24:88, 32:96]).mean() < 6
        # beyond the scanned area is glass, not an error
        edge = slide.read_region(0, 1000, 700, 64, 128)
        assert edge.shape == (128, 64, 3) and (edge[80:, 30:] == 255).all()
        assert slide.thumbnail(256).shape == (192, 256, 3)
        assert set(slide.describe()) == {"backend", "levels", "mpp", "mpp_source"}  # no vendor metadata


def test_a_slide_without_mpp_is_an_error_naming_the_file_unless_set(small_rgb: np.ndarray, tmp_path: Path) -> None:
    path = _write("aperio", small_rgb, tmp_path, mpp=None)
    with pytest.raises(SlideError, match=r"slide\.svs: the slide has no microns-per-pixel.*data\.slides\.mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.mpp_source == "recipe"
    with pytest.raises(SlideError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")
    junk = tmp_path / "junk.svs"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(SlideError, match=r"junk\.svs: no slide backend can read it"):
        open_slide(junk)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_a_slide_with_pixels_that_are_not_square_is_an_error_unless_the_mpp_is_set(
    small_rgb: np.ndarray, tmp_path: Path, backend: str
) -> None:
    """0.25 µm wide and 0.5 µm high: a tile of so many µm would be twice as high as wide, and the tissue area half."""
    import tifffile

    path = tmp_path / "tall.tif"
    with tifffile.TiffWriter(path) as tif:
        for i, ds in enumerate((1, 4)):
            size = (small_rgb.shape[1] // ds, small_rgb.shape[0] // ds)
            level = small_rgb if ds == 1 else cv2.resize(small_rgb, size, interpolation=cv2.INTER_AREA)
            tif.write(level, tile=(256, 256), subfiletype=1 if i else 0, compression="jpeg", photometric="rgb",
                      resolution=(1e4 / (0.25 * ds), 1e4 / (0.5 * ds)), resolutionunit="CENTIMETER")  # fmt: skip
    with pytest.raises(SlideError, match=r"tall\.tif: its pixels are not square \(.* 0\.25 µm wide, 0\.5 µm high\)"):
        open_slide(path, backend=backend)
    with open_slide(path, backend=backend, mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.mpp_source == "recipe"


def test_tissue_mask_keeps_tissue_and_excludes_glass_and_pen(he_dir: Path) -> None:
    tissue, pen = (100, 100, 900, 700), (1200, 150, 500, 200)
    rgb = compose_slide(he_dir, 2048, 1024, [tissue], [], seed=5, pen_boxes=[pen])
    thumb = cv2.resize(rgb, (512, 256), interpolation=cv2.INTER_AREA)
    mask = tissue_mask(thumb)
    s = 0.25
    inside = np.zeros_like(mask)
    x, y, w, h = (round(v * s) for v in tissue)
    inside[y : y + h, x : x + w] = True
    core = mask[y + h // 4 : y + 3 * h // 4, x + w // 4 : x + 3 * w // 4]
    assert core.mean() > 0.85
    assert mask[~inside].mean() < 0.005  # glass and the pen stroke are out
    px, py, pw, ph = (round(v * s) for v in pen)
    assert not mask[py : py + ph, px : px + pw].any()
    assert not tissue_mask(np.full((64, 64, 3), 242, np.uint8)).any()  # glass only: Otsu is not trusted


def test_a_slide_smaller_than_one_tile_is_an_error_that_says_so(small_rgb: np.ndarray, tmp_path: Path) -> None:
    path = write_pyramidal_tiff(tmp_path / "tiny.svs", np.ascontiguousarray(small_rgb[:208, :300]), 0.5,
                                downsamples=(1,))  # fmt: skip
    with open_slide(path) as slide, pytest.raises(SlideError) as err:
        plan_tiles(slide, TileSpec(tile_size=224, target_mpp=0.5))
    assert str(err.value) == (f"{path}: the slide (300 x 208 px) is smaller than one tile: 224 px at 0.5 µm/px is "
                              "224 px of its level 0 (0.5 µm/px); lower --tile-size or --target-mpp (features), "
                              "data.slides.tile_size or data.slides.target_mpp (a recipe)")  # fmt: skip


def test_tiffslide_regions_across_the_slide_edge_keep_every_real_pixel(tmp_path: Path) -> None:
    """tiffslide starts a level's region at int(x / downsample); the glass fill past the edge must too."""
    rgb = np.zeros((64, 4003, 3), np.uint8)
    rgb[..., 0] = 200  # dark red everywhere: level 1 is 1000 px wide, downsample 4.003
    path = write_pyramidal_tiff(tmp_path / "odd.svs", rgb, 0.25, downsamples=(1, 4))
    with open_slide(path, backend="tiffslide") as slide:
        x = 3605  # 900.57 level-1 pixels: tiffslide reads from column 900, so columns 900-999 are real
        region = slide.read_region(1, x, 0, 224, 4)
    assert (region[:, :100, 0] > 150).all() and (region[:, :100, 1] < 60).all()  # the last column was made white
    assert (region[:, 100:] == 255).all()


@pytest.mark.parametrize("method", ["saturation", "od"])
def test_tissue_that_fills_the_image_is_not_split_in_two_by_otsu(he_dir: Path, method: str) -> None:
    """Otsu splits any image in two; without glass both halves are tissue (muscle lost 20% of its area)."""
    import tifffile

    mus = tifffile.imread(next(he_dir.glob("MUS-*.tif")))
    thumb = cv2.resize(np.tile(mus, (20, 20, 1)), (280, 280), interpolation=cv2.INTER_AREA)
    assert tissue_mask(thumb, method=method).mean() == 1.0
    beside_glass = np.full((280, 560, 3), 236, np.uint8)
    beside_glass[:, :280] = thumb
    mask = tissue_mask(beside_glass, method=method)
    assert mask[:, :280].mean() == 1.0 and not mask[:, 290:].any()
    pink = np.full((64, 64, 3), (200, 110, 170), np.uint8)  # one flat colour: was no tissue at all
    assert tissue_mask(pink, method=method).all()
    grey = np.full((64, 64, 3), (120, 120, 120), np.uint8)  # dark but colourless: optical density only
    assert tissue_mask(grey, method=method).all() == (method == "od")


@pytest.fixture(scope="module")
def square_slide(he_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    rgb = compose_slide(he_dir, 2048, 2048, [(0, 0, 2048, 2048)], [(512, 512, 512, 512)], seed=2)
    path = write_pyramidal_tiff(tmp_path_factory.mktemp("sq") / "square.svs", rgb, 0.25)
    return path, rgb


def test_tile_count_scales_with_magnification_and_coordinates_round_trip(square_slide: tuple[Path, np.ndarray]) -> None:
    path, rgb = square_slide
    with open_slide(path) as slide:
        fine = plan_tiles(slide, TileSpec(tile_size=64, target_mpp=0.25, min_tissue=0.5))
        coarse = plan_tiles(slide, TileSpec(tile_size=64, target_mpp=0.5, min_tissue=0.5))
        assert 3.6 <= len(fine.coords) / len(coarse.coords) <= 4.4  # 0.25 vs 0.5 µm/px: 4x the tiles
        assert (fine.level, fine.read_size, coarse.level, coarse.read_size) == (0, 64, 0, 128)
        # a coarse target reads a coarser level; coordinates stay level-0 multiples of the tile side
        far = plan_tiles(slide, TileSpec(tile_size=64, target_mpp=1.0, min_tissue=0.0))
        assert (far.level, far.read_size, far.side0) == (1, 64, 256.0)
        assert len(far.coords) == 64 and set(np.unique(far.coords % 256)) == {0}
        for grid in (coarse, far):
            for x, y in grid.coords[[0, len(grid.coords) // 2, -1]]:
                tile = read_tile(slide, grid.level, grid.read_size, int(x), int(y), 64)
                side = int(grid.side0)
                truth = cv2.resize(rgb[y : y + side, x : x + side], (64, 64), interpolation=cv2.INTER_AREA)
                assert np.abs(tile.astype(int) - truth).mean() < 6
        with pytest.raises(SlideError, match=r"finer than the scan's 0\.25"):
            plan_tiles(slide, TileSpec(tile_size=64, target_mpp=0.125))


def test_tile_reader_caches_pickles_and_names_a_broken_slide(square_slide: tuple[Path, np.ndarray],
                                                             tmp_path: Path) -> None:  # fmt: skip
    path, _ = square_slide
    coords = np.array([[0, 0], [128, 256], [1024, 1024]])
    reader = TileReader([SlideRef(str(path), None, 0, 128)], np.zeros(3, np.int64), coords, 64,
                        cache_dir=tmp_path / "cache")  # fmt: skip
    first = [reader(i) for i in range(3)]
    done = np.load(reader.cache_files[0][1])
    assert done.tolist() == [1, 1, 1]
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._open == {}  # handles are per process
    assert all((clone(i) == first[i]).all() for i in range(3))  # served from the cache
    plain = TileReader([SlideRef(str(path), None, 0, 128)], np.zeros(3, np.int64), coords, 64)
    assert all((plain(i) == first[i]).all() for i in range(3))
    gone = TileReader([SlideRef(str(tmp_path / "moved.svs"), None, 0, 128)], np.zeros(1, np.int64), coords[:1], 64)
    with pytest.raises(SlideError, match=r"moved\.svs: slide does not exist"):
        gone(0)


def test_tiles_per_slide_caps_each_slide_every_epoch_with_a_fresh_draw() -> None:
    groups = ["a"] * 50 + ["b"] * 5 + ["c"] * 20
    sampler = EpochSampler(len(groups), seed=1, batch_size=8, groups=groups, per_group=10)
    assert len(sampler) == 10 + 5 + 10
    draws = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        counts = defaultdict(int)
        for i, _ in keys:
            counts[groups[i]] += 1
        assert dict(counts) == {"a": 10, "b": 5, "c": 10}
        draws.append(sorted(i for i, _ in keys))
    assert draws[0] != draws[1]
    again = EpochSampler(len(groups), seed=1, batch_size=8, groups=groups, per_group=10)
    again.set_epoch(1)
    assert sorted(i for i, _ in again) == draws[1]  # resumable: only (seed, epoch) decide


def test_slide_manifest_errors_name_the_line(tmp_path: Path) -> None:
    from medvision.data.sources import load_table

    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nx.svs,a\n")
    cfg = recipe_from_dict(_recipe(bad, tmp_path)).data
    with pytest.raises(DataSourceError, match=r"missing column.*slide_path"):
        load_table(cfg, 0)
    bad.write_text("slide_path,label\nmissing.svs,tumour\n")
    with pytest.raises(DataSourceError, match=r"bad\.csv, line 2: .*missing\.svs: slide does not exist"):
        load_table(cfg, 0)


# ------------------------------------------------------------------------ training and scoring


def _recipe(manifest: Path, out: Path, name: str = "slides", aggregate: str = "mean") -> dict:
    return {
        "name": name, "seed": 0, "output_dir": str(out),
        "data": {"source": "slides", "path": str(manifest), "image_size": 64, "batch_size": 32, "num_workers": 0,
                 "slides": {"target_mpp": 1.0, "tile_size": 64, "min_tissue": 0.5}, "tiles_per_slide": 32},
        "model": {"name": "tf_efficientnet_lite0", "pretrained": str(SHARED_WEIGHTS)},
        "augment": {"preset": "none", "transforms": [{"name": "HorizontalFlip", "p": 0.5},
                                                      {"name": "RandomRotate90", "p": 0.5}]},
        "train": {"amp": "none", "phases": [{"epochs": 1, "trainable": "head", "lr": 5e-3, "bn": "frozen"},
                                            {"epochs": 3, "trainable": "all", "lr": 2e-3}]},
        "evaluation": {"bootstrap": 100, "patient_aggregate": aggregate, "explain": 0},
    }  # fmt: skip


SHARED_WEIGHTS = Path(os.environ.get("MEDVISION_SHARED", Path(__file__).resolve().parents[2] / "shared")).resolve() / \
    "weights" / "tf_efficientnet_lite0.in1k.safetensors"  # fmt: skip


@pytest.fixture(scope="module")
def cohort(he_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """16 slides (Aperio SVS, generic TIFF, DICOM WSI), 8 with planted tumour; slide-disjoint splits 8/4/4."""
    root = tmp_path_factory.mktemp("cohort")
    manifest = build_slide_set(he_dir, root, n_slides=16, size=(2048, 1536), mpp=0.5,
                               formats=("aperio", "generic", "aperio", "dicom"), seed=0)  # fmt: skip
    truth = json.loads((root / "truth.json").read_text())
    by_label: dict[str, list[str]] = defaultdict(list)
    for rel, t in truth.items():
        by_label[t["label"]].append(rel)
    split = {}
    for rels in by_label.values():
        for k, rel in enumerate(sorted(rels)):
            split[rel] = "train" if k < 4 else "val" if k < 6 else "test"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_path", "label", "patient_id", "split"])
        for rel, t in truth.items():
            w.writerow([rel, t["label"], f"patient-{rel}", split[rel]])  # one slide per patient here
    return manifest, truth


@pytest.fixture(scope="module")
def slide_run(cohort: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medvision.tasks.train import train

    manifest, _ = cohort
    return train(recipe_from_dict(_recipe(manifest, tmp_path_factory.mktemp("runs"))))


def test_slide_level_metrics_equal_a_hand_computation(slide_run: Path, cohort: tuple[Path, dict]) -> None:
    from sklearn.metrics import roc_auc_score

    metrics = json.loads((slide_run / "metrics.json").read_text())
    assert metrics["unit"] == "slide" and metrics["patient"]["aggregate"] == "mean"
    rows = list(csv.DictReader((slide_run / "predictions.csv").open()))
    probs: dict[str, list[float]] = defaultdict(list)
    labels = {}
    for r in rows:
        if r["split"] == "test":
            slide = r["id"].split("@")[0]
            probs[slide].append(float(r["prob_tumour"]))
            labels[slide] = r["label"] == "tumour"
    assert len(probs) == 4
    slides = sorted(probs)
    y = [labels[s] for s in slides]
    p = [float(np.mean(probs[s])) for s in slides]
    test = metrics["patient"]["test"]
    assert test["n"] == 4
    assert test["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
    assert test["acc"] == pytest.approx(np.mean([(pi >= 0.5) == yi for pi, yi in zip(p, y, strict=True)]))
    assert test["images_per_patient"] == pytest.approx(len([r for r in rows if r["split"] == "test"]) / 4)
    compare = metrics["slide_aggregates"]
    assert set(compare) == {"mean", "max", "top-3 mean"} and compare["mean"]["auc"] == pytest.approx(test["auc"])
    report = (slide_run / "report.md").read_text()
    assert "| slide | test | 4 |" in report and "Slide-level aggregation compared" in report
    assert test["auc"] >= 0.75  # the planted tumour is learnable from slide labels


@pytest.fixture(scope="module")
def scored(slide_run: Path, cohort: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The test slides plus a corrupt one and a text file, scored through the CLI."""
    manifest, truth = cohort
    folder = tmp_path_factory.mktemp("to_score")
    test = [r for r in csv.DictReader(manifest.open()) if r["split"] == "test"]
    for r in test:
        src = manifest.parent / r["slide_path"]
        (folder / r["slide_path"]).symlink_to(src, target_is_directory=src.is_dir())
    (folder / "broken.svs").write_bytes(b"II*\x00" + os.urandom(3000))
    (folder / "notes.txt").write_text("not a slide")
    out = folder.parent / f"{folder.name}-out" / "slides.csv"
    cmd = [sys.executable, "-m", "medvision", "score", str(folder), "--model", str(slide_run), "--out", str(out),
           "--workers", "1"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return {"folder": folder, "out": out, "proc": done, "test": test, "truth": truth, "cmd": cmd}


def test_score_writes_a_row_per_slide_tiles_and_heatmaps_and_accounts_for_everything(scored: dict) -> None:
    done, out = scored["proc"], scored["out"]
    assert done.returncode == 3, done.stderr  # one slide could not be read
    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {r["slide_path"] for r in scored["test"]} | {"broken.svs", "notes.txt"}
    assert rows["broken.svs"]["status"] == "error" and "broken.svs" in rows["broken.svs"]["reason"]
    assert rows["notes.txt"]["status"] == "skipped"
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["reconciled"] and sidecar["files_found"] == 6 and sidecar["ok_files"] == 4
    import pyarrow.parquet as pq

    tiles = pq.read_table(f"{out}.tiles.parquet").to_pylist()
    for rel in (r["slide_path"] for r in scored["test"]):
        row = rows[rel]
        mine = [t for t in tiles if t["slide"] == rel]
        assert row["status"] == "ok" and float(row["mpp"]) == 0.5 and row["target_mpp"] == "1.0"
        assert int(row["tiles"]) == len(mine) > 0 and float(row["tissue_mm2"]) > 0.1
        mean = float(np.mean([t["prob_tumour"] for t in mine]))
        assert float(row["prob_tumour"]) == pytest.approx(mean, abs=1e-5)  # mean aggregation
        assert Path(f"{out}.heatmaps/{rel}.png").is_file()
        truth = scored["truth"][rel]
        if truth["label"] == "tumour":  # the hottest tile lies on the planted tumour
            top = max(mine, key=lambda t: t["prob_tumour"])
            cx, cy = top["x"] + top["side_level0"] / 2, top["y"] + top["side_level0"] / 2
            assert any(x - 32 <= cx <= x + w + 32 and y - 32 <= cy <= y + h + 32
                       for x, y, w, h in truth["tumour_boxes"]), (rel, cx, cy, truth["tumour_boxes"])  # fmt: skip


def test_score_output_holds_no_patient_identifiers(scored: dict, slide_run: Path) -> None:
    out = scored["out"]
    files = [p for p in out.parent.rglob("*") if p.is_file()] + [p for p in slide_run.rglob("*") if p.is_file()]
    for f in files:
        if f.suffix in (".png", ".safetensors", ".pt"):
            continue
        data = f.read_bytes()
        for leak in LEAKS:
            assert leak.encode() not in data, (f, leak)


def test_score_resumes_after_kill_9(scored: dict, tmp_path: Path) -> None:
    out = tmp_path / "resumed.csv"
    cmd = [*scored["cmd"][:-4], "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.is_file() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(out.read_text().splitlines())
    assert 3 <= partial < 7
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 3, again.stderr
    first = {r["path"]: r for r in csv.DictReader(scored["out"].open())}
    second = {r["path"]: r for r in csv.DictReader(out.open())}
    assert set(second) == set(first)
    for rel, row in first.items():
        assert second[rel]["status"] == row["status"] and second[rel]["prob_tumour"] == row["prob_tumour"]
    assert json.loads(Path(f"{out}.json").read_text())["already_done"] >= 1


def test_slide_scoring_on_the_cpu_gives_the_model_every_core_while_its_readers_take_turns(
    slide_run: Path, scored: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slide readers wait while a CPU model computes, so the model keeps every core (scoring DICOM files, whose
    decoders run all the time, leaves them theirs)."""
    from medvision.tasks.score import score_slides
    from medvision.tasks.score.slides import SlideUnit

    threads: list[int] = []
    real = SlideUnit.process

    def process(self: SlideUnit, *args: Any) -> None:
        threads.append(torch.get_num_threads())
        assert self.turns  # the readers take turns with this CPU model
        real(self, *args)

    monkeypatch.setattr(SlideUnit, "process", process)
    summary = score_slides(scored["folder"], slide_run, tmp_path / "s.csv", workers=1)
    assert summary.ok_images and threads and set(threads) == {os.cpu_count()}


def test_abmil_head_is_trained_saved_compared_and_used_by_score(cohort: tuple[Path, dict], tmp_path: Path) -> None:
    from medvision.tasks.score import score_slides
    from medvision.tasks.train import train

    manifest, _ = cohort
    tree = _recipe(manifest, tmp_path, name="abmil", aggregate="abmil")
    tree["train"]["phases"] = [{"epochs": 2, "trainable": "all", "lr": 3e-3}]
    tree["data"]["tiles_per_slide"] = 16
    run = train(recipe_from_dict(tree))
    assert (run / "abmil.safetensors").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    compare = metrics["slide_aggregates"]
    assert set(compare) == {"mean", "max", "top-3 mean", "ABMIL (attention MIL)"}
    assert compare["ABMIL (attention MIL)"]["auc"] == pytest.approx(metrics["patient"]["test"]["auc"])
    assert "attention-MIL head" in (run / "report.md").read_text()
    folder = tmp_path / "two"
    folder.mkdir()
    tests = [r["slide_path"] for r in csv.DictReader(manifest.open()) if r["split"] == "test"][:2]
    for rel in tests:
        src = manifest.parent / rel
        (folder / rel).symlink_to(src, target_is_directory=src.is_dir())
    summary = score_slides(folder, run, tmp_path / "abmil.csv", workers=0)
    assert summary.ok_files == 2 and summary.reconciled
    with pytest.raises(Exception, match="ABMIL head, which needs tile features"):
        score_slides(folder, run, tmp_path / "x.csv", engine="onnxruntime")


def test_stain_reference_normalises_every_tile_of_a_slide_table(cohort: tuple[Path, dict], he_dir: Path,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    from medvision.data.sources import load_table
    from medvision.wsi.stain import MacenkoNormalizer, load_reference

    manifest, _ = cohort
    tree = _recipe(manifest, tmp_path)
    plain = load_table(recipe_from_dict(tree).data, 0)
    reference = next(he_dir.glob("NORM-*.tif"))
    tree["data"]["slides"]["stain_reference"] = str(reference)
    stained = load_table(recipe_from_dict(tree).data, 0)
    assert stained.ids == plain.ids  # the same tiles
    normalise = MacenkoNormalizer(load_reference(reference))
    for i in (0, len(plain) // 2):
        assert (stained.loader(i) == normalise(plain.loader(i))).all()
    assert np.abs(stained.loader(0).astype(int) - plain.loader(0)).mean() > 1  # it did change the colours


@pytest.mark.slow
def test_two_rank_slide_scoring_equals_the_one_process_output(scored: dict, tmp_path: Path) -> None:
    out = tmp_path / "two.csv"
    cmd = [*scored["cmd"][:-4], "--out", str(out), "--workers", "1", "--nproc", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stderr  # --nproc returns the code recorded in the sidecar
    assert len(list(Path(f"{out}.parts").glob("rank*-of-2.csv"))) == 2
    one = list(csv.DictReader(scored["out"].open()))
    two = list(csv.DictReader(out.open()))
    assert [r["path"] for r in two] == [r["path"] for r in one]  # merged in folder order
    for a, b in zip(one, two, strict=True):
        assert (a["status"], a["prob_tumour"], a["tiles"]) == (b["status"], b["prob_tumour"], b["tiles"])
    assert json.loads(Path(f"{out}.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("flavour", ["aperio", "generic", "ome"])
def test_direct_jpeg_tile_path_gives_the_backends_pixels(flavour: str, small_rgb: np.ndarray, tmp_path: Path) -> None:
    path = _write(flavour, small_rgb, tmp_path)
    coords = np.array([[0, 0], [200, 136], [900, 640], [1000, 700]])  # the last two reach past the edge
    for level, size in ((0, 128), (1, 32)):
        reader = TileReader([SlideRef(str(path), None, level, size)], np.zeros(4, np.int64), coords, 32,
                            jpeg_shrink=False)  # fmt: skip
        with open_slide(path) as slide:
            want = [read_tile(slide, level, size, int(x), int(y), 32) for x, y in coords]
        got = [reader(i) for i in range(4)]
        assert reader._fast[0] is not None  # JPEG tiles decoded straight from the file
        for g, w in zip(got, want, strict=True):
            assert np.abs(g.astype(int) - w).max() <= 1
        reader.close()


def test_direct_jpeg_tile_path_decodes_each_jpeg_tile_once_over_a_grid(tmp_path: Path) -> None:
    # a wide slide: one row of 448 px cells touches 3 rows of 32 JPEG tiles (more than the old 64-tile LRU held)
    rgb = np.random.default_rng(0).integers(0, 256, (1536, 8192, 3), dtype=np.uint8)
    path = write_pyramidal_tiff(tmp_path / "wide.svs", rgb, 0.5, downsamples=(1, 16))
    coords = np.array([(x, y) for y in range(0, 1536 - 447, 448) for x in range(0, 8192 - 447, 448)])
    reader = TileReader([SlideRef(str(path), None, 0, 448)], np.zeros(len(coords), np.int64), coords, 224,
                        jpeg_shrink=False)  # fmt: skip
    reader(0)
    fast, decoded = reader._fast[0], []
    assert fast is not None and fast.keep == 3 * 32 and fast.shrink == 1
    fast.cache.clear()
    decode = fast.decode
    fast.decode = lambda data, index: decoded.append(index) or decode(data, index)  # type: ignore[method-assign]
    tiles = [reader(i) for i in range(len(coords))]
    reader.close()
    touched = {ty * 32 + tx for cx, cy in coords for ty in range(cy // 256, (cy + 447) // 256 + 1)
               for tx in range(cx // 256, (cx + 447) // 256 + 1)}  # fmt: skip
    assert len(decoded) == len(set(decoded)) and set(decoded) == touched  # each JPEG tile decoded once
    with open_slide(path) as slide:  # and the pixels are still the backend's
        for i in (0, 20, len(coords) - 1):
            want = read_tile(slide, 0, 448, int(coords[i, 0]), int(coords[i, 1]), 224)
            assert np.abs(tiles[i].astype(int) - want).max() <= 1


def test_evaluate_a_slide_run_on_a_manifest_and_cap_tiles_by_slide_name(slide_run: Path, cohort: tuple[Path, dict],
                                                                          tmp_path: Path) -> None:  # fmt: skip
    from medvision.data.sources import load_table
    from medvision.tasks.evaluate import evaluate_run

    manifest, _ = cohort
    out, metrics = evaluate_run(slide_run, data=str(manifest), split="test", out=tmp_path / "eval")
    saved = json.loads((slide_run / "metrics.json").read_text())
    assert metrics["auc"] == pytest.approx(saved["test"]["auc"], abs=1e-6)  # the same tiles, the same model
    assert json.loads((out / "metrics.json").read_text())["unit"] == "slide"
    tree = _recipe(manifest, tmp_path)
    tree["data"]["slides"]["max_tiles_per_slide"] = 5
    first, again = (load_table(recipe_from_dict(tree).data, seed) for seed in (0, 1))
    per_slide = defaultdict(int)
    for unit in first.units or []:
        per_slide[unit] += 1
    assert set(per_slide.values()) == {5} and first.ids == again.ids  # chosen by slide name, not by seed


def test_a_slide_run_pins_its_stain_reference_through_resume_evaluate_export_and_score(
    cohort: tuple[Path, dict], he_dir: Path, tmp_path: Path
) -> None:
    """A reference file replaced after training would normalise new tiles to other colours than the run saw."""
    import shutil

    from medvision.io.files import sha256
    from medvision.runs import RunError
    from medvision.tasks.evaluate import evaluate_run
    from medvision.tasks.export.onnx import export_onnx
    from medvision.tasks.score import score_slides
    from medvision.tasks.train import train

    manifest, _ = cohort
    reference = tmp_path / "reference.tif"
    shutil.copy(next(he_dir.glob("NORM-*.tif")), reference)
    tree = _recipe(manifest, tmp_path / "runs")
    tree["data"]["slides"]["stain_reference"] = str(reference)
    tree["data"]["tiles_per_slide"] = 4
    tree["train"]["phases"] = [{"epochs": 1, "trainable": "head", "lr": 5e-3, "bn": "frozen"}]
    tree["evaluation"]["bootstrap"] = 0
    run = train(recipe_from_dict(tree))
    assert json.loads((run / "run.json").read_text())["stain_reference_sha256"] == sha256(reference)
    shutil.copy(next(he_dir.glob("TUM-*.tif")), reference)  # the same path, other pixels
    replaced = r"stain-normalised to .*reference\.tif with SHA-256 .*; that file now has"
    with pytest.raises(RunError, match=replaced):
        train(recipe_from_dict(tree), resume=True)
    with pytest.raises(RunError, match=replaced):
        evaluate_run(run)
    with pytest.raises(RunError, match=replaced):
        export_onnx(run, tmp_path / "model.onnx")
    with pytest.raises(RunError, match=replaced):
        score_slides(manifest.parent, run, tmp_path / "scores.csv")

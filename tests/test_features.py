"""``medvision features``: one HDF5 file per slide, every entry a row, resumable, one feature space per folder."""

from __future__ import annotations

import csv
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from conftest import handoff_leftovers

from medvision.cli import main
from medvision.io.files import sha256
from medvision.models.encoders import load_encoder
from medvision.recipe import SlidesConfig
from medvision.runs import RunError
from medvision.tasks.features import extract_features
from medvision.wsi.features import MAX_NAME_BYTES, FeatureFileError, feature_name, read_features, write_features
from medvision.wsi.slide import open_slide
from medvision.wsi.source import check_stain_reference, plan_slide
from medvision.wsi.tiles import SlideRef, TileReader, read_tile

ENCODER = "timm:tf_efficientnet_lite0"


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def test_every_slide_is_one_file_with_coords_mpp_encoder_and_preprocessing(
    cohort_features: Path, slide_cohort: Path, shared: Path
) -> None:
    rows = _rows(cohort_features / "features.csv")
    truth = json.loads((slide_cohort.parent / "truth.json").read_text())
    assert {r for r, row in rows.items() if row["status"] == "ok"} == set(truth)
    assert {rows["manifest.csv"]["status"], rows["truth.json"]["status"]} == {"skipped"}
    record = json.loads((cohort_features / "features.json").read_text())
    assert record["encoder"] == ENCODER and record["reconciled"] and record["dim"] == 1280
    weights = shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    encoder, sha = load_encoder(ENCODER, weights)
    assert record["encoder_sha256"] == sha
    cfg = SlidesConfig(tile_size=112, target_mpp=1.0)
    for rel in truth:
        bag = read_features(cohort_features / feature_name(rel))
        assert rows[rel]["file"] == feature_name(rel) and int(rows[rel]["tiles"]) == len(bag.features)
        assert bag.features.shape == (len(bag.coords), 1280) and bag.features.dtype == np.float32
        assert bag.attrs["encoder_sha256"] == sha and bag.attrs["mpp"] == pytest.approx(0.5)
        assert bag.attrs["tile_size"] == 112 and bag.attrs["target_mpp"] == 1.0 and bag.side0 == pytest.approx(224)
        assert (
            bag.attrs["slide_size"] == [1536, 1152]
            and bag.attrs["preprocessing"]["input_size"] == 224
            and bag.attrs["preprocessing"]["precision"] == "none"
        )
        slide, grid = plan_slide(slide_cohort.parent / rel, cfg)
        slide.close()
        assert np.array_equal(bag.coords, grid.coords) and np.allclose(bag.tissue, grid.tissue, atol=1e-4)
    # a stored embedding is the encoder's own output on that tile, read straight from the slide (224 px of level
    # 0 decoded at 112 by the JPEG decoder: jpeg_shrink), and that tile is the backend's, area-averaged, within a
    # grey level
    rel = next(iter(truth))
    bag = read_features(cohort_features / feature_name(rel))
    slide, grid = plan_slide(slide_cohort.parent / rel, cfg)
    backend = [read_tile(slide, grid.level, grid.read_size, int(x), int(y), 112) for x, y in bag.coords[:3]]
    slide.close()
    ref = SlideRef(str(slide_cohort.parent / rel), None, grid.level, grid.read_size)
    reader = TileReader([ref], np.zeros(3, np.int64), bag.coords[:3], 112)
    tiles = [reader(i) for i in range(3)]
    assert reader._fast[0] is not None and reader._fast[0].shrink == 2
    reader.close()
    assert np.abs(np.stack(tiles).astype(int) - np.stack(backend)).mean() < 1.5
    assert bag.attrs["preprocessing"]["jpeg_shrink"] is True
    with torch.no_grad():
        direct = encoder(torch.as_tensor(np.stack(tiles)).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(bag.features[:3], direct, rtol=1e-4, atol=1e-4)
    # CLAM/TRIDENT readers find what they expect: TRIDENT's coords attributes, the level-0 side an int (OpenSlide's
    # read_region refuses a float size), magnifications as 10 / (µm per pixel)
    with h5py.File(cohort_features / feature_name(rel), "r") as fh:
        c = fh["coords"].attrs
        assert "features" in fh and isinstance(c["patch_size_level0"], np.integer) and c["patch_size_level0"] == 224
        assert c["patch_size_level0_exact"] == pytest.approx(224.0) and c["patch_size"] == 112 and c["overlap"] == 0
        assert (c["level0_magnification"], c["target_magnification"]) == pytest.approx((20.0, 10.0))
        assert (c["level0_width"], c["level0_height"]) == (1536, 1152) and c["name"] == Path(rel).stem


def test_a_broken_slide_is_an_error_row_the_rest_resume_and_a_second_encoder_is_refused(
    slide_cohort: Path, cohort_features: Path, shared: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("slide_000.svs", "slide_001.tif"):
        shutil.copy(slide_cohort.parent / name, folder / name)
    (folder / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 64)
    (folder / "notes.txt").write_text("not a slide")
    out = tmp_path / "feats"
    weights = shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    cfg = SlidesConfig(tile_size=112, target_mpp=1.0, max_tiles_per_slide=5)
    first = extract_features(folder, out, ENCODER, weights, slides=cfg, workers=0)
    rows = _rows(out / "features.csv")
    assert [rows[k]["status"] for k in sorted(rows)] == ["error", "skipped", "ok", "ok"]
    assert "broken.svs" in rows["broken.svs"]["reason"] and first.exit_code == 3
    assert first.files_found == 4 and first.reconciled and int(rows["slide_000.svs"]["tiles"]) == 5
    stamp = (out / feature_name("slide_000.svs")).stat().st_mtime_ns
    (folder / "slide_002.svs").write_bytes((slide_cohort.parent / "slide_003.svs").read_bytes())
    leftover = out / f".{feature_name('slide_002.svs')}.k1ll3d00.tmp"  # a write a kill stopped before its rename
    leftover.write_bytes(b"\0" * 1024)
    again = extract_features(folder, out, ENCODER, weights, slides=cfg, workers=0)
    assert not leftover.exists() and not list(out.glob(".*.tmp"))
    # every finished row is kept on resume (a slide is one row: only a row cut short would be redone)
    assert again.already_done == 4 and again.scored_now == 1 and again.ok_files == 3 and again.files_found == 5
    assert (out / feature_name("slide_000.svs")).stat().st_mtime_ns == stamp
    with pytest.raises(RunError, match="other settings"):
        extract_features(folder, out, ENCODER, weights, slides=SlidesConfig(tile_size=128, target_mpp=1.0), workers=0)


def test_a_run_stopped_before_its_end_still_keeps_its_folder_one_feature_space(
    slide_cohort: Path, shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """features.json is written when a run starts: a second run with other settings into the folder of one that was
    interrupted (no final record yet) is refused, and so is one in another precision."""
    from medvision.tasks.features import FeatureUnit

    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("slide_000.svs", "slide_001.tif", "slide_003.svs"):
        shutil.copy(slide_cohort.parent / name, folder / name)
    out, weights = tmp_path / "feats", shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    real, seen = FeatureUnit.process, []

    def stopped_on_the_second_slide(self: FeatureUnit, *args: Any) -> None:
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt("the run is stopped")
        real(self, *args)

    monkeypatch.setattr(FeatureUnit, "process", stopped_on_the_second_slide)
    cfg = SlidesConfig(tile_size=112, target_mpp=1.0, max_tiles_per_slide=3)
    with pytest.raises(KeyboardInterrupt):
        extract_features(folder, out, ENCODER, weights, slides=cfg, workers=0)
    monkeypatch.setattr(FeatureUnit, "process", real)
    assert json.loads((out / "features.json").read_text())["finished"] is False
    with pytest.raises(RunError, match="other settings"):
        extract_features(folder, out, ENCODER, weights, slides=cfg.model_copy(update={"target_mpp": 2.0}), workers=0)
    with pytest.raises(RunError, match=r"other settings \(preprocessing differ"):  # its precision
        extract_features(folder, out, ENCODER, weights, slides=cfg, workers=0, amp="bf16")
    done = extract_features(folder, out, ENCODER, weights, slides=cfg, workers=0)
    assert done.already_done == 1 and done.ok_files == 3  # the first slide's row is kept, not redone
    assert json.loads((out / "features.json").read_text())["finished"] is True


def test_feature_files_are_checked_on_read(tmp_path: Path) -> None:
    with pytest.raises(FeatureFileError, match="no feature file"):
        read_features(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(FeatureFileError, match="not a readable feature file"):
        read_features(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as fh:
        fh.create_dataset("features", data=np.zeros((2, 4), np.float32))
    with pytest.raises(FeatureFileError, match="format"):
        read_features(tmp_path / "other.h5")


def test_the_real_aperio_slide_is_embedded_at_its_own_mpp(cmu_svs: Path, shared: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    folder = tmp_path / "real"
    folder.mkdir()
    shutil.copy(cmu_svs, folder / "cmu.svs")
    weights = shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    code = main(["features", str(folder), "--encoder", ENCODER, "--checkpoint", str(weights), "--out",
                 str(tmp_path / "f"), "--tile-size", "224", "--target-mpp", "0.5", "--workers", "1"])  # fmt: skip
    assert code == 0, capsys.readouterr()
    bag = read_features(tmp_path / "f" / "cmu.svs.h5")
    slide = open_slide(folder / "cmu.svs")
    assert bag.attrs["mpp"] == pytest.approx(slide.mpp) and slide.mpp == pytest.approx(0.499)
    assert bag.side0 == pytest.approx(224 * 0.5 / slide.mpp)  # 224.45: the exact side is what medvision reads back
    with h5py.File(tmp_path / "f" / "cmu.svs.h5", "r") as fh:
        assert fh["coords"].attrs["patch_size_level0"] == 224  # TRIDENT's: rounded, for read_region
    slide.close()
    assert len(bag.features) == 42 and bag.features.shape[1] == 1280 and np.isfinite(bag.features).all()
    text = (tmp_path / "f" / "features.json").read_text() + (tmp_path / "f" / "features.csv").read_text()
    assert "CMU-1" not in text  # the Aperio header's Filename stays inside the reader


def test_no_slide_exits_4_and_a_shard_the_hash_left_empty_exits_0(
    shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder without slides is exit 4 with a message that says so; under --shard i/n a shard to which the hash
    gave none of the folder's entries is not a failure (an array job's empty shard), and its line says why."""
    from medvision.tasks.score import in_shard

    weights = shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("no slide")
    args = ["features", str(folder), "--encoder", ENCODER, "--checkpoint", str(weights), "--workers", "0"]
    assert main([*args, "--out", str(tmp_path / "all")]) == 4
    assert f"medvision features: error: no slide to embed in {folder}" in capsys.readouterr().err
    empty = next(i for i in range(3) if not in_shard("a.txt", (i, 3)))
    assert main([*args, "--out", str(tmp_path / "shard"), "--shard", f"{empty}/3"]) == 0
    out, err = capsys.readouterr()
    assert "the folder's 1 slide(s) are all in other shards" in out and "error" not in err


def test_two_ranks_split_the_slides_and_write_the_same_files(slide_cohort: Path, shared: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("slide_000.svs", "slide_001.tif", "slide_003.svs", "slide_004.tif"):
        shutil.copy(slide_cohort.parent / name, folder / name)
    weights = shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    args = ["features", str(folder), "--encoder", ENCODER, "--checkpoint", str(weights), "--tile-size", "112",
            "--target-mpp", "1.0", "--max-tiles", "3", "--workers", "0"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "medvision", *args, "--out", str(tmp_path / "two"), "--nproc", "2"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    record = json.loads((tmp_path / "two" / "features.json").read_text())
    assert record["world_size"] == 2 and record["ok_files"] == 4 and record["reconciled"]
    assert list(_rows(tmp_path / "two" / "features.csv")) == list(_rows(tmp_path / "one" / "features.csv"))
    for name in ("slide_000.svs", "slide_001.tif", "slide_003.svs", "slide_004.tif"):
        a, b = (read_features(tmp_path / d / feature_name(name)) for d in ("one", "two"))
        assert np.array_equal(a.coords, b.coords)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)


def test_stain_normalisation_runs_before_the_encoder_and_is_recorded(
    slide_cohort: Path, shared: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(slide_cohort.parent / "slide_000.svs", folder / "slide_000.svs")
    reference = sorted((shared / "data" / "he_tiles").glob("*"))[0]
    weights = shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    plain = SlidesConfig(tile_size=112, target_mpp=1.0, max_tiles_per_slide=4)
    normalised = plain.model_copy(update={"stain_reference": str(reference)})
    extract_features(folder, tmp_path / "plain", ENCODER, weights, slides=plain, workers=0)
    extract_features(folder, tmp_path / "norm", ENCODER, weights, slides=normalised, workers=0)
    a = read_features(tmp_path / "plain" / "slide_000.svs.h5")
    b = read_features(tmp_path / "norm" / "slide_000.svs.h5")
    assert a.attrs["preprocessing"]["stain_reference"] is None and "stain_reference_sha256" not in a.attrs[
        "preprocessing"]  # fmt: skip
    assert b.attrs["preprocessing"]["stain_reference"] == str(reference)
    assert b.attrs["preprocessing"]["stain_reference_sha256"] == sha256(reference)  # its pixels, not only its path
    assert np.array_equal(a.coords, b.coords) and not np.allclose(a.features, b.features, atol=1e-3)


def test_a_stain_reference_is_recorded_by_content_and_absolute_path(
    slide_cohort: Path, shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--stain-reference ref.png`` is recorded as an absolute path with the file's SHA-256, so ``score`` finds it
    from any folder, and a folder refuses features normalised to other pixels behind the same path."""
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(slide_cohort.parent / "slide_000.svs", folder / "slide_000.svs")
    tiles = [next((shared / "data" / "he_tiles").glob(f"{k}-*")) for k in ("NORM", "TUM")]  # two tissue tiles
    shutil.copy(tiles[0], tmp_path / f"ref{tiles[0].suffix}")
    weights = shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    monkeypatch.chdir(tmp_path)
    args = ["features", "slides", "--encoder", ENCODER, "--checkpoint", str(weights), "--out", "f", "--tile-size",
            "112", "--target-mpp", "1.0", "--max-tiles", "2", "--workers", "0", "--stain-reference",
            f"ref{tiles[0].suffix}"]  # fmt: skip
    assert main(args) == 0
    made = json.loads((tmp_path / "f" / "features.json").read_text())["preprocessing"]
    assert made["stain_reference"] == str(tmp_path / f"ref{tiles[0].suffix}")
    assert made["stain_reference_sha256"] == sha256(tiles[0])
    shutil.copy(tiles[1], tmp_path / f"ref{tiles[0].suffix}")  # other pixels behind the same path
    (folder / "slide_000.svs").rename(folder / "again.svs")  # a new slide to embed into the same folder
    with pytest.raises(RunError, match=r"holds features made with other settings \(preprocessing differ"):
        extract_features(
            folder,
            tmp_path / "f",
            ENCODER,
            weights,
            workers=0,
            slides=SlidesConfig(
                tile_size=112, target_mpp=1.0, max_tiles_per_slide=2, stain_reference=made["stain_reference"]
            ),
        )


def test_score_refuses_a_stain_reference_that_changed_since_the_features(shared: Path, tmp_path: Path) -> None:
    tiles = [next((shared / "data" / "he_tiles").glob(f"{k}-*")) for k in ("NORM", "TUM")]  # two tissue tiles
    reference = tmp_path / f"ref{tiles[0].suffix}"
    shutil.copy(tiles[0], reference)
    slides = SlidesConfig(tile_size=112, target_mpp=1.0, stain_reference=str(reference)).model_dump(mode="json")
    spec = {"slides": slides, "stain_reference_sha256": sha256(reference)}
    check_stain_reference(
        tmp_path, SlidesConfig.recorded(slides), spec["stain_reference_sha256"]
    )  # the same pixels: scored alike
    check_stain_reference(tmp_path, SlidesConfig.recorded(slides), None)  # a run from before the hash was recorded
    shutil.copy(tiles[1], reference)
    with pytest.raises(RunError, match=r"stain-normalised to .*ref.* with SHA-256 .*put back the reference"):
        check_stain_reference(tmp_path, SlidesConfig.recorded(slides), spec["stain_reference_sha256"])
    reference.unlink()
    with pytest.raises(RunError, match=r"reference that cannot be read now"):
        check_stain_reference(tmp_path, SlidesConfig.recorded(slides), spec["stain_reference_sha256"])


def test_a_tile_reader_that_raises_dies_or_hangs_costs_its_slide_only(
    slide_cohort: Path,
    cohort_features: Path,
    shared: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One reader pool serves the whole run: a slide whose tiles kill or hang their reader is an error row, the pool
    replaces the worker, and the slides after it are embedded exactly as in a clean run. A hung slide costs one
    timeout: its batches already handed to the reader are cancelled, not each waited for."""
    import faulty_reader

    from medvision.tasks.score import slides as slide_scan

    folder = tmp_path / "slides"
    folder.mkdir()
    names = ["a_slide_000.svs", "b_FAULT-raise.svs", "c_FAULT-exit.svs", "d_FAULT-hang.svs", "e_slide_003.svs"]
    sources = ["slide_000.svs", "slide_001.tif", "slide_003.svs", "slide_001.tif", "slide_003.svs"]
    for name, source in zip(names, sources, strict=True):
        shutil.copy(slide_cohort.parent / source, folder / name)
    real_tiles = slide_scan.SlideScan.tiles

    def faulty_tiles(self, folder_, item):
        tiles = real_tiles(self, folder_, item)
        if tiles is not None and "FAULT-" in item.rel:
            tiles.reader.transform = faulty_reader.TileFault(item.rel.split("FAULT-")[1].split(".")[0])
        return tiles

    monkeypatch.setattr(slide_scan.SlideScan, "tiles", faulty_tiles)
    monkeypatch.setattr(slide_scan, "TILE_BATCH_TIMEOUT", 5.0)
    weights = shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    cfg = SlidesConfig(tile_size=112, target_mpp=1.0)
    summary = extract_features(folder, tmp_path / "f", ENCODER, weights, slides=cfg, workers=1, batch_size=8)
    rows = _rows(tmp_path / "f" / "features.csv")
    assert [rows[n]["status"] for n in names] == ["ok", "error", "error", "error", "ok"]
    assert summary.reconciled and summary.files_found == 5 and summary.exit_code == 3
    assert "tiles could not be read (OSError: JPEG tile data is damaged)" in rows["b_FAULT-raise.svs"]["reason"]
    assert "exited with code 3" in rows["c_FAULT-exit.svs"]["reason"]
    assert "timed out after 5 s" in rows["d_FAULT-hang.svs"]["reason"]
    assert not (tmp_path / "f" / feature_name("c_FAULT-exit.svs")).exists()
    assert handoff_leftovers() == []  # none left by a lost or cancelled batch
    assert "2 tile batch(es) lost to a reader that crashed or hung (1 crashed, 1 timed out)" in caplog.text
    for name, source in (("a_slide_000.svs", "slide_000.svs"), ("e_slide_003.svs", "slide_003.svs")):
        got, clean = (
            read_features(tmp_path / "f" / feature_name(name)),
            read_features(cohort_features / feature_name(source)),
        )
        assert np.array_equal(got.coords, clean.coords) and len(got.features) > 8  # several batches a slide
        np.testing.assert_allclose(got.features, clean.features, rtol=1e-4, atol=1e-4)


def test_a_slide_slow_to_open_holds_back_nothing_already_read(
    slide_cohort: Path, shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream's batches are drawn by a thread of their own: while the second slide is still being opened,
    the first slide's batches already read reach the encoder and its file is written. Here the second slide opens
    only once the first is finished (or after a minute, which would mean the stream waited for it)."""
    from medvision.tasks import features as feature_task
    from medvision.tasks.score import slides as slide_scan

    folder = tmp_path / "slides"
    folder.mkdir()
    for name, source in (("a_first.svs", "slide_000.svs"), ("b_slow.svs", "slide_003.svs")):
        shutil.copy(slide_cohort.parent / source, folder / name)
    first_done, waited = threading.Event(), []
    real_tiles, real_process = slide_scan.SlideScan.tiles, feature_task.FeatureUnit.process

    def slow_tiles(self, folder_, item):
        if item.rel == "b_slow.svs":
            waited.append(first_done.wait(timeout=60))
        return real_tiles(self, folder_, item)

    def process(self, item, tiles, batches):
        real_process(self, item, tiles, batches)
        if item.rel == "a_first.svs":
            first_done.set()

    monkeypatch.setattr(slide_scan.SlideScan, "tiles", slow_tiles)
    monkeypatch.setattr(feature_task.FeatureUnit, "process", process)
    weights = shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    cfg = SlidesConfig(tile_size=112, target_mpp=1.0)
    summary = extract_features(folder, tmp_path / "f", ENCODER, weights, slides=cfg, workers=1, batch_size=8)
    assert summary.ok_files == 2 and waited == [True]


def test_a_run_stopped_mid_slide_leaves_no_tile_batch_in_ram(slide_cohort: Path, tmp_path: Path) -> None:
    """The readers work ahead, each batch in a file in /dev/shm: a consumer that stops after one batch (an
    interrupted run) stops the readers first, then removes every file they were given, written or not."""
    from medvision.tasks.score.slides import SlideScan, find_slides
    from medvision.workers import PoolStats

    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("slide_000.svs", "slide_003.svs"):
        shutil.copy(slide_cohort.parent / name, folder / name)
    scan = SlideScan(SlidesConfig(tile_size=112, target_mpp=1.0), workers=1, timeout=60)
    scan.batch_size = 4  # many batches a slide, two of them ahead in the reader
    stream = scan.stream(folder, find_slides(folder), PoolStats())
    item, tiles, batches = next(stream)
    assert item.status == "ok" and tiles is not None and len(tiles.coords) > 12
    first = next(iter(batches))
    assert first.shape == (4, 112, 112, 3) and first.dtype == np.uint8
    stream.close()
    assert handoff_leftovers() == []


def _slides(slide_cohort: Path, folder: Path, names: dict[str, str]) -> Path:
    """``folder`` with a copy of the cohort's slide ``source`` at each relative path ``rel`` (``{rel: source}``)."""
    for rel, source in names.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(slide_cohort.parent / source, folder / rel)
    return folder


def test_two_slides_never_share_a_feature_file(slide_cohort: Path, shared: Path, tmp_path: Path) -> None:
    """``a/b.svs`` and ``a__b.svs`` flatten to one file name: the later slide is an error row naming both, after
    the slides already in features.csv (whose files keep their names, so resume finds them)."""
    folder = _slides(slide_cohort, tmp_path / "slides", {"a__b.svs": "slide_000.svs"})
    out, weights = tmp_path / "feats", shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    cfg = SlidesConfig(tile_size=112, target_mpp=1.0, max_tiles_per_slide=3)
    extract_features(folder, out, ENCODER, weights, slides=cfg, workers=0)
    _slides(slide_cohort, folder, {"a/b.svs": "slide_003.svs", "x/y.svs": "slide_000.svs", "x__y.svs": "slide_003.svs"})
    summary = extract_features(folder, out, ENCODER, weights, slides=cfg, workers=0)
    rows = _rows(out / "features.csv")
    assert {k: r["status"] for k, r in rows.items()} == {"a__b.svs": "ok", "a/b.svs": "error", "x/y.svs": "ok",
                                                         "x__y.svs": "error"}  # fmt: skip
    assert "a__b.svs.h5 is already that of slide a__b.svs" in rows["a/b.svs"]["reason"]
    assert "x__y.svs.h5 is already that of slide x/y.svs" in rows["x__y.svs"]["reason"]
    assert summary.exit_code == 3 and summary.reconciled
    assert read_features(out / "a__b.svs.h5").attrs["slide"] == "a__b.svs"
    assert read_features(out / "x__y.svs.h5").attrs["slide"] == "x/y.svs"


def test_a_run_from_another_slides_folder_is_refused(
    slide_cohort: Path, shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Resume takes a row's path for done: the same names in another folder would be other slides, left out."""
    first = _slides(slide_cohort, tmp_path / "site1", {"s1.svs": "slide_000.svs"})
    second = _slides(slide_cohort, tmp_path / "site2", {"s1.svs": "slide_003.svs", "s2.svs": "slide_000.svs"})
    out, weights = tmp_path / "feats", shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    cfg = SlidesConfig(tile_size=112, target_mpp=1.0, max_tiles_per_slide=3)
    extract_features(first, out, ENCODER, weights, slides=cfg, workers=0)
    assert json.loads((out / "features.json").read_text())["folder"] == str(first.resolve())
    args = ["features", str(second), "--encoder", ENCODER, "--checkpoint", str(weights), "--out", str(out),
            "--tile-size", "112", "--target-mpp", "1.0", "--max-tiles", "3", "--workers", "0"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"holds features of the slides in {first.resolve()}" in err and f"not of {second.resolve()}" in err
    assert list(_rows(out / "features.csv")) == ["s1.svs"]


def _feature_file(path: Path, slide: str, n: int = 3, **attrs: Any) -> Path:
    from medvision.wsi.features import write_features

    base = {"slide": slide, "encoder": "e", "encoder_sha256": "0" * 64, "tile_size": 112, "target_mpp": 1.0,
            "mpp": 0.5, "mpp_source": "", "preprocessing": {"mean": [0.5] * 3}, "slide_size": [10, 20]}  # fmt: skip
    coords = np.arange(2 * n, dtype=np.int64).reshape(n, 2)
    write_features(path, np.ones((n, 4), np.float32), coords, np.ones(n, np.float32), 224.0, 0, {**base, **attrs})
    return path


def test_feature_file_attributes_are_decoded_by_design_and_shapes_checked(tmp_path: Path) -> None:
    """Only the JSON attributes are decoded: a slide path that looks like JSON (``[x]/c.tif``) and an empty string
    stay strings. A tissue array of another length, a non-finite embedding or a damaged JSON attribute is a
    FeatureFileError (a row under ``on_error``), not a crash."""
    bag = read_features(_feature_file(tmp_path / "ok.h5", "[x]/c.tif"))
    assert bag.attrs["slide"] == "[x]/c.tif" and bag.attrs["mpp_source"] == ""
    assert bag.attrs["preprocessing"] == {"mean": [0.5] * 3} and bag.attrs["slide_size"] == [10, 20]
    with pytest.raises(ValueError, match=r"attributes \['extra'\] are dicts or lists"):
        _feature_file(tmp_path / "nested.h5", "s.tif", extra={"a": 1})
    for name, edit, message in [
        ("tissue", lambda fh: (fh.__delitem__("tissue"), fh.create_dataset("tissue", data=np.ones(5))),
         r"tissue \(5,\) for 3 tiles; expected \(3,\)"),
        ("nan", lambda fh: fh["features"].__setitem__((1, 2), np.nan), r"tile 1 at \[2, 3\] has a non-finite"),
        ("json", lambda fh: fh.attrs.__setitem__("preprocessing", "{not json"), "not a readable feature file"),
        ("coords", lambda fh: (fh.__delitem__("coords"), fh.create_dataset("coords", data=np.zeros((3, 3)))),
         r"expected \(n, dim\) and \(n, 2\)"),
    ]:  # fmt: skip
        path = _feature_file(tmp_path / f"{name}.h5", "s.tif")
        with h5py.File(path, "r+") as fh:
            edit(fh)
            if name == "coords":
                fh["coords"].attrs["patch_size_level0"] = 224.0
        with pytest.raises(FeatureFileError, match=message):
            read_features(path)


def test_a_feature_file_of_another_slide_is_an_error_row(tmp_path: Path) -> None:
    """An index whose rows point two slides at one file (written before names were checked) gives the file to the
    slide it holds (its ``slide`` attribute) only; a file that cannot be read is an error row, the rest load."""
    from medvision.data.slide_features import load_feature_cohort
    from medvision.recipe import DataConfig

    feats = tmp_path / "feats"
    feats.mkdir()
    _feature_file(feats / "a__b.tif.h5", "a__b.tif")
    _feature_file(feats / "[x]__c.tif.h5", "[x]/c.tif")
    (feats / "bad.tif.h5").write_bytes(b"not hdf5")
    (feats / "features.csv").write_text("path,status,reason,file\na/b.tif,ok,,a__b.tif.h5\na__b.tif,ok,,a__b.tif.h5\n"
                                        "[x]/c.tif,ok,,[x]__c.tif.h5\nbad.tif,ok,,bad.tif.h5\n")  # fmt: skip
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_path,label,patient_id\na/b.tif,t,P1\na__b.tif,n,P2\n[x]/c.tif,n,P3\nbad.tif,t,P4\n")
    cfg = DataConfig(source="slide_features", path=str(manifest), features=str(feats), on_error="skip")
    cohort = load_feature_cohort(manifest, cfg)
    assert cohort.slides == ["a__b.tif", "[x]/c.tif"]
    errors = {r.path: r.reason for r in cohort.audit if r.outcome == "error"}
    assert set(errors) == {"a/b.tif", "bad.tif"}
    assert "a__b.tif.h5 holds the features of slide 'a__b.tif', not of 'a/b.tif'" in errors["a/b.tif"]


def test_a_long_nested_path_gets_a_feature_file_the_file_system_takes(tmp_path: Path) -> None:
    """The one flattening ``score`` uses too: a path that flattens to 255 bytes keeps a readable beginning and ends
    with a hash of the whole path, so two such paths keep two names."""
    rel = "case-" + "x" * 120 + "/" + "slide-" + "y" * 118 + ".svs"
    assert len(rel.replace("/", "__").encode()) == 255
    name = feature_name(rel)
    assert name.endswith(".h5") and len(name.encode()) <= MAX_NAME_BYTES + len(".h5")
    assert name.startswith("case-xxxx") and name != feature_name(rel[:-4] + ".tif")
    assert feature_name("a/b.svs") == "a__b.svs.h5"
    attrs = {"slide": rel, "encoder": "e", "encoder_sha256": "0", "tile_size": 224, "target_mpp": 0.5, "mpp": 0.25}
    write_features(tmp_path / name, np.zeros((1, 2)), np.zeros((1, 2)), np.ones(1), 448.0, 0, attrs)
    assert read_features(tmp_path / name).attrs["slide"] == rel

"""`medvision score`: rows, errors, privacy, provenance, resume after kill -9, shards, parquet."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
from conftest import tiny_recipe  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from test_dicom_source import make_dicom_folder  # noqa: E402

from medvision.cli import main  # noqa: E402
from medvision.data.dataset import prepare  # noqa: E402
from medvision.data.dicom_source import dicom_spec  # noqa: E402
from medvision.data.transforms import build_transforms  # noqa: E402
from medvision.io.dicom import read_dicom  # noqa: E402
from medvision.recipe import recipe_from_dict  # noqa: E402
from medvision.run import load_run, train  # noqa: E402
from medvision.score import in_shard, score_folder  # noqa: E402
from medvision.train.checkpoint import sha256  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train_dicom")
    make_dicom_folder(root, per_class=6)
    tree = tiny_recipe(root, tmp_path_factory.mktemp("runs"))
    tree["data"].update(source="dicom", path=str(root), dicom={"windows": ["percentile"], "cache": False})
    tree["augment"] = {"preset": "radiology"}
    return train(recipe_from_dict(tree))


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "incoming"
    make_dicom_folder(root, per_class=5)  # 10 images, a README.txt and an RT plan
    src = Path(get_testdata_file("JPGExtended.dcm")).read_bytes()
    start = src.rindex(b"\xe0\x7f\x10\x00")
    (root / "mr" / "corrupt.dcm").write_bytes(src[: start + 200])  # a JPEG stream cut short
    shutil.copy(get_testdata_file("emri_small.dcm"), root / "mr" / "multiframe.dcm")
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_rows_errors_skips_privacy_and_provenance(trained: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    summary = score_folder(folder, trained, out, workers=0)
    rows = _rows(out)
    assert summary.scored_files == 11 and summary.scored_images == 11 and summary.errors == 1
    assert summary.skipped == 2  # README.txt and the RT plan
    assert len(rows) == 12 and len({r["path"] for r in rows}) == 12
    bad = next(r for r in rows if r["path"] == "mr/corrupt.dcm")
    assert bad["status"] == "error" and "corrupt.dcm" in bad["error"] and "JPEG Extended" in bad["error"]
    good = [r for r in rows if r["status"] == "ok"]
    assert all(r["sop_instance_uid"] and r["study_instance_uid"] for r in good)
    assert all(abs(float(r["prob_ct"]) + float(r["prob_mr"]) - 1) < 1e-4 for r in good)
    header = out.read_text().splitlines()[0]
    assert "Patient" not in header and "Accession" not in header
    text = out.read_text()
    assert "CT-0" not in text and "MR-1" not in text  # PatientIDs of the images
    record = json.loads(Path(str(out) + ".json").read_text())
    assert record["model_sha256"] == sha256(trained / "model.safetensors")
    assert record["scored_images"] == 11 and record["errors"] == 1 and record["skipped"] == 2
    assert {"medvision", "torch", "timm"} <= set(record["versions"]) and record["images_per_second"] > 0


def test_probabilities_match_a_plain_loop(trained: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    score_folder(folder, trained, out, workers=0)
    recipe, meta, bundle = load_run(trained, torch.device("cpu"))
    decision = meta["decision"]
    assert decision["temperature"] != 1.0 and decision["positive"] == 1  # classes ct, mr
    thresholds = {op["rule"]: op["threshold"] for op in decision["points"]["image"]}
    transform = build_transforms(None, recipe.data.image_size, bundle.mean, bundle.std)
    bundle.model.eval()
    rows = _rows(out)
    assert {"call_youden", "call_sensitivity_0.95", "call_specificity_0.95"} <= set(rows[0])
    record = json.loads(Path(str(out) + ".json").read_text())
    assert record["calibration_temperature"] == decision["temperature"]
    checked = 0
    for row in rows:
        if row["status"] != "ok" or checked == 4:
            continue
        pixels, _ = read_dicom(folder / row["path"], dicom_spec(recipe.data.dicom), frame=int(row["frame"]))
        x = prepare(pixels[0], recipe.data.intensity, bundle.in_chans, transform)[None]
        with torch.inference_mode():
            p = torch.softmax(bundle.model(x).float() / decision["temperature"], 1)[0].numpy()  # calibrated
        np.testing.assert_allclose([float(row["prob_ct"]), float(row["prob_mr"])], p, atol=1e-5)
        assert row["call_youden"] == str(int(p[1] >= thresholds["youden"]))
        checked += 1
    assert checked == 4


def test_opt_in_tags(trained: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "tags.csv"
    score_folder(folder, trained, out, include_tags=["PatientID"], workers=0)
    rows = [r for r in _rows(out) if r["status"] == "ok" and r["path"].startswith("ct/")]
    assert {r["tag_PatientID"] for r in rows} >= {"CT-0", "CT-1"}
    assert json.loads(Path(str(out) + ".json").read_text())["included_identifying_tags"] == ["PatientID"]


KILLER = """
import os, signal, sys
from pathlib import Path
import medvision.score as s
real, calls = s._collate, [0]
def dying_collate(items):
    calls[0] += 1
    if calls[0] == 3:  # two batches are written and flushed; die like kill -9, no cleanup
        os.kill(os.getpid(), signal.SIGKILL)
    return real(items)
s._collate = dying_collate
s.score_folder(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), batch_size=2, workers=0)
"""


def test_resume_after_kill_9_loses_and_duplicates_nothing(trained: Path, folder: Path, tmp_path: Path) -> None:
    reference = tmp_path / "ref.csv"
    score_folder(folder, trained, reference, batch_size=2, workers=0)
    out = tmp_path / "killed.csv"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(folder), str(trained), str(out)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    partial = _rows(out)
    assert 0 < len(partial) < 12
    with out.open("a") as fh:
        fh.write("ct/series0/img0.dcm,1.2.3,1.2")  # a row cut short mid-write
    summary = score_folder(folder, trained, out, batch_size=2, workers=0)
    assert summary.already_done == len(partial)
    rows = _rows(out)
    assert sorted(r["path"] for r in rows) == sorted(r["path"] for r in _rows(reference))
    ref = {r["path"]: r for r in _rows(reference)}
    for r in rows:
        assert r["prob_ct"] == ref[r["path"]]["prob_ct"], r["path"]


def test_shards_partition_the_folder(trained: Path, folder: Path, tmp_path: Path) -> None:
    parts = []
    for i in range(3):
        score_folder(folder, trained, tmp_path / f"s{i}.csv", shard=(i, 3), workers=0)
        parts.append({r["path"] for r in _rows(tmp_path / f"s{i}.csv")})
    assert not (parts[0] & parts[1]) and not (parts[1] & parts[2]) and not (parts[0] & parts[2])
    assert len(parts[0] | parts[1] | parts[2]) == 12
    assert in_shard("a/b.dcm", (0, 1))


def test_parquet_and_parallel_workers(trained: Path, folder: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "scores.parquet"
    summary = score_folder(folder, trained, out, workers=2)
    table = pq.read_table(out)
    assert table.num_rows == 12 and summary.scored_images == 11
    assert "prob_mr" in table.column_names


def test_cli_exit_codes(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert main(["score", str(empty), "--model", str(trained), "--out", str(tmp_path / "e.csv"), "--workers", "0"]) == 1
    assert "nothing could be scored" in capsys.readouterr().err
    assert main(["score", str(empty), "--model", str(tmp_path), "--out", str(tmp_path / "f.csv")]) == 2
    assert "not a finished medvision run" in capsys.readouterr().err

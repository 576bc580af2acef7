"""`medvision score`: rows, errors, privacy, provenance, resume after kill -9, shards, parquet."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
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
from medvision.inference import load_run  # noqa: E402
from medvision.io.dicom import read_dicom  # noqa: E402
from medvision.io.files import sha256  # noqa: E402
from medvision.metrics import round_significant  # noqa: E402
from medvision.recipe import recipe_from_dict  # noqa: E402
from medvision.runs import RunError  # noqa: E402
from medvision.tasks.score import in_shard, score_folder  # noqa: E402
from medvision.tasks.score.job import prediction_cells  # noqa: E402
from medvision.tasks.train import train  # noqa: E402


@pytest.fixture(scope="module")
def trained(dicom_run: Path) -> Path:
    return dicom_run


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
    assert summary.ok_files == 11 and summary.ok_images == 11 and summary.error_files == 1
    assert summary.skipped_files == 2 and summary.files_found == 14 and summary.reconciled  # README.txt, RT plan
    assert summary.exit_code == 3
    assert len(rows) == 14 and len({r["path"] for r in rows}) == 14
    bad = next(r for r in rows if r["path"] == "mr/corrupt.dcm")
    assert bad["status"] == "error" and "corrupt.dcm" in bad["reason"] and "JPEG Extended" in bad["reason"]
    assert str(folder) not in bad["reason"]  # named relative to the scanned folder
    skipped = {r["path"]: r["reason"] for r in rows if r["status"] == "skipped"}
    assert "no DICM magic" in skipped["ct/README.txt"] and "without image pixel data" in skipped["mr/plan.dcm"]
    good = [r for r in rows if r["status"] == "ok"]
    assert "sop_instance_uid" not in rows[0] and "study_instance_uid" not in rows[0]  # UIDs only with --uids
    assert list(rows[0])[:3] == ["path", "frame", "pred"] and list(rows[0])[-2:] == ["status", "reason"]
    assert all(abs(float(r["prob_ct"]) + float(r["prob_mr"]) - 1) < 1e-4 for r in good)
    header = out.read_text().splitlines()[0]
    assert "Patient" not in header and "Accession" not in header
    text = out.read_text()
    assert "CT-0" not in text and "MR-1" not in text  # PatientIDs of the images
    record = json.loads(Path(str(out) + ".json").read_text())
    assert record["model_sha256"] == sha256(trained / "model.safetensors")
    assert record["ok_images"] == 11 and record["error_files"] == 1 and record["skipped_files"] == 2
    assert record["files_found"] == 14 and record["reconciled"] and record["exit_code"] == 3
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


def test_written_probabilities_are_the_ones_the_calls_compare() -> None:
    """A score row's probabilities carry predictions.csv's digits: a value just under a threshold is not written
    as the threshold itself next to a 0 call, and a confident 3e-09 is not written 0 (a tie with every other)."""
    calls = [("youden", 0.5), ("sensitivity_0.95", 1.5e-9)]
    for p in ([0.5000004, 0.4999996], [1 - 3e-9, 3e-9], [1 - 2.5e-12, 2.5e-12], [0.25, 0.75], [0.0, 1.0]):
        cells = prediction_cells(np.array(p), ["normal", "tumour"], 1, calls)
        written = [float(v) for v in cells[1:3]]
        assert written == round_significant(np.array(p)).tolist(), cells
        assert cells[3:] == [str(int(written[1] >= thr)) for _, thr in calls], cells
    assert prediction_cells(np.array([0.5000004, 0.4999996]), ["a", "b"], 1, calls) == ["a", "0.5000004", "0.4999996",
                                                                                         "0", "1"]  # fmt: skip
    assert prediction_cells(np.array([1 - 3e-9, 3e-9]), ["a", "b"], 1, calls)[1:] == ["1", "3e-09", "0", "1"]
    # no positive class (multi-class): the probabilities only
    assert prediction_cells(np.array([0.2, 0.3, 0.5]), ["a", "b", "c"], None, []) == ["c", "0.2", "0.3", "0.5"]


def test_the_walkthrough_archive_gets_one_outcome_per_entry(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """The README's messy archive (benchmarks/messy_archive.py): 48 real images of pydicom and pydicom-data, damaged
    and non-image files, links, a directory named like a file. Every entry gets the outcome the docs show."""
    pytest.importorskip("data_store", reason="pydicom-data (module data_store) ships the archive's CR and US images")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from messy_archive import make_archive

    assert make_archive(tmp_path / "archive", 48) == 48
    out = tmp_path / "scores.csv"
    summary = score_folder(tmp_path / "archive", trained, out, workers=2)
    assert (summary.files_found, summary.ok_files, summary.error_files, summary.skipped_files) == (58, 48, 6, 4)
    assert summary.ok_images == 48 and summary.reconciled and summary.exit_code == 3
    rows = {r["path"]: r for r in _rows(out)}
    assert len(rows) == 58 and sum(r["status"] == "ok" for r in rows.values()) == 48
    reasons = {path: (r["status"], r["reason"]) for path, r in rows.items() if r["status"] != "ok"}
    expected = {
        "CT/absurd.dcm": ("error", "65535 x 65535 x 3"),
        "CT/cut.dcm": ("error", "truncated"),
        "MR/empty.dcm": ("error", "empty file (0 bytes)"),
        "MR/scan.dcm": ("error", "PNG image"),
        "link.dcm": ("error", "broken symbolic link"),
        "loop.dcm": ("error", "symbolic link loop"),
        "notes.txt": ("skipped", "not DICOM"),
        "plan.dcm": ("skipped", "without image pixel data (RTPLAN)"),
        "report.dcm": ("skipped", "without image pixel data (SR)"),
        "series.dcm": ("skipped", "a directory named like a file"),
    }
    assert set(reasons) == set(expected), reasons
    for path, (status, words) in expected.items():
        assert reasons[path][0] == status and words in reasons[path][1], (path, reasons[path])
    assert {"series.dcm/000.dcm", "series.dcm/001.dcm"} <= {p for p, r in rows.items() if r["status"] == "ok"}
    assert {p.split("/")[0] for p, r in rows.items() if r["status"] == "ok"} >= {"CR", "CT", "MR", "OT", "US"}


def test_each_directory_is_scanned_once_and_its_skipped_routes_say_which_route_was_taken(tmp_path: Path) -> None:
    from medvision.io.archive import scan

    (tmp_path / "b_real").mkdir()
    (tmp_path / "b_real" / "x.dcm").write_bytes(b"x")
    (tmp_path / "b_real" / "self").symlink_to(".")
    (tmp_path / "a_link").symlink_to("b_real")  # sorted first: the real folder is reached through it
    (tmp_path / "c_link").symlink_to("b_real")
    (tmp_path / "._x.dcm").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork: training's sources skip it
    rows = {e.rel: (e.outcome, e.reason) for e in scan(tmp_path)}
    assert rows == {
        "._x.dcm": ("skipped", "hidden file (a macOS ._ resource fork, .DS_Store...); not read"),
        "a_link/self": ("skipped", "link to a directory that contains it (a loop); not followed"),
        "a_link/x.dcm": ("candidate", ""),
        "b_real": ("skipped", "directory already scanned through the link 'a_link'; not scanned twice"),
        "c_link": ("skipped", "link to a directory already scanned as 'a_link'; not scanned twice"),
    }


def test_opt_in_tags(trained: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "tags.csv"
    score_folder(folder, trained, out, include_tags=["PatientID"], workers=0)
    rows = [r for r in _rows(out) if r["status"] == "ok" and r["path"].startswith("ct/")]
    assert {r["tag_PatientID"] for r in rows} >= {"CT-0", "CT-1"}
    assert json.loads(Path(str(out) + ".json").read_text())["included_identifying_tags"] == ["PatientID"]


def test_uids_are_opt_in_and_a_resume_into_other_columns_is_refused(
    trained: Path, folder: Path, tmp_path: Path
) -> None:  # fmt: skip
    """SOP/Study/Series Instance UIDs link a row to the patient's study: written only with uids=True (--uids). A
    table written with other columns (another --uids, or an older version's header) is never appended to."""
    out = tmp_path / "uids.csv"
    score_folder(folder, trained, out, uids=True, workers=0)
    rows = _rows(out)
    assert list(rows[0])[:5] == ["path", "sop_instance_uid", "study_instance_uid", "series_instance_uid", "frame"]
    ct0 = pydicom.dcmread(folder / "ct" / "series0" / "img0.dcm")
    row = next(r for r in rows if r["path"] == "ct/series0/img0.dcm")
    assert (row["sop_instance_uid"], row["study_instance_uid"], row["series_instance_uid"]) == (
        ct0.SOPInstanceUID, ct0.StudyInstanceUID, ct0.SeriesInstanceUID)  # fmt: skip
    assert all(r["sop_instance_uid"] for r in rows if r["status"] == "ok")
    assert json.loads(Path(f"{out}.json").read_text())["included_uids"] is True
    kept = out.read_bytes()
    with pytest.raises(RunError, match=r"holds rows of another job \(included_uids differ"):
        score_folder(folder, trained, out, workers=0)
    record = json.loads(Path(f"{out}.json").read_text())
    del record["included_uids"]  # as an earlier version wrote it: only the header tells
    Path(f"{out}.json").write_text(json.dumps(record))
    with pytest.raises(RunError, match=r"uids\.csv: cannot resume: its header is not the one asked for \(it has "
                                       r"sop_instance_uid, study_instance_uid, series_instance_uid\)"):  # fmt: skip
        score_folder(folder, trained, out, workers=0)
    assert out.read_bytes() == kept  # refused before the resume trims anything
    resumed = score_folder(folder, trained, out, uids=True, workers=0)  # the same columns resume
    assert resumed.already_done == 13 and resumed.reconciled  # resume redoes the last entry (it may be cut short)


def test_negative_number_of_frames_is_an_error_row_not_a_missing_one(trained: Path, tmp_path: Path) -> None:
    """frames: all on a header that says NumberOfFrames -1 gave an ok file with no frame, so no row at all."""
    import dataclasses

    from medvision.data.intake import ReadConfig, read_file
    from medvision.recipe import load_recipe
    from medvision.runs import ScoringSpec, read_run_json

    spec = ScoringSpec.from_run(trained, load_recipe(trained / "recipe.yaml"), read_run_json(trained))
    spec = dataclasses.replace(spec, dicom={**spec.dicom, "frames": "all"})
    ds = pydicom.dcmread(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm")
    ds.NumberOfFrames = -1
    ds.save_as(tmp_path / "neg.dcm")
    result = read_file(tmp_path / "neg.dcm", "sub/neg.dcm", ReadConfig(spec))
    assert result.status == "error" and result.frames == [], result
    assert (
        "sub/neg.dcm: NumberOfFrames is -1; expected 1 or more" in result.reason and str(tmp_path) not in result.reason
    )
    ds.NumberOfFrames = 0  # read as one frame, as pydicom reads it
    ds.save_as(tmp_path / "zero.dcm")
    assert read_file(tmp_path / "zero.dcm", "zero.dcm", ReadConfig(spec)).frames == [0]


def test_bundle_intake_keeps_the_scans_verdict_and_never_opens_a_fifo(
    trained: Path, tmp_path: Path
) -> None:  # fmt: skip
    """The MONAI bundle's reader gives a FIFO and a directory named like a file score's own rows, promptly: a FIFO
    opened for reading would block the bundle run for good."""
    import signal

    from medvision.data.bundle_intake import REASON, STATUS, ReadForModel, datalist
    from medvision.recipe import load_recipe
    from medvision.runs import ScoringSpec, read_run_json

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm", folder / "sub" / "a.dcm")
    os.mkfifo(folder / "sub" / "b_pipe.dcm")
    (folder / "c_dir.dcm").mkdir()
    (folder / "c_dir.dcm" / "note.txt").write_text("not an image")
    spec = ScoringSpec.from_run(trained, load_recipe(trained / "recipe.yaml"), read_run_json(trained))
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps({"medvision": {"spec": json.loads(spec.to_json())}}))
    reader = ReadForModel(str(metadata))

    def hung(*_: object) -> None:
        raise TimeoutError("the bundle's reader blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    try:
        signal.alarm(20)
        bundle = {}
        for item in datalist(folder):
            meta = reader(item)["image"].meta
            bundle[item["medvision_rel"]] = (meta[STATUS], meta[REASON])
        signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    score_folder(folder, trained, tmp_path / "s.csv", workers=0)
    rows = {r["path"]: r for r in _rows(tmp_path / "s.csv")}
    assert set(bundle) == set(rows)
    assert rows["sub/b_pipe.dcm"]["status"] == "skipped" and "FIFO" in rows["sub/b_pipe.dcm"]["reason"]
    assert bundle["sub/a.dcm"] == ("ok", "")
    for rel, row in rows.items():
        want = "" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
        assert bundle[rel] == (row["status"], want), rel


KILLER = """
import os, signal, sys
from pathlib import Path
import medvision.tasks.score as s
import medvision.tasks.score.job as job
calls = [0]
real_write = job.RowWriter.write
def dying_write(self, text):
    calls[0] += 1
    if calls[0] == 4:  # the header and two files are flushed; die like kill -9 halfway through this write
        self.fh.write(self.fh.name[:0] + "ct/series0/img0.dcm,1.2.3,1.2")
        self.fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(self, text)
job.RowWriter.write = dying_write
s.score_folder(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), batch_size=2, workers=0)
"""


def test_resume_after_kill_9_loses_and_duplicates_nothing(trained: Path, folder: Path, tmp_path: Path) -> None:
    reference = tmp_path / "ref.csv"
    score_folder(folder, trained, reference, batch_size=2, workers=0)
    out = tmp_path / "killed.csv"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(folder), str(trained), str(out)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    partial = _rows(out)
    assert 0 < len(partial) < 14
    assert not out.read_text().endswith("\n")  # a row cut short mid-write
    summary = score_folder(folder, trained, out, batch_size=2, workers=0)
    assert summary.already_done == len({r["path"] for r in partial}) - 1  # the last file of the kill is redone
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
    assert len(parts[0] | parts[1] | parts[2]) == 14
    assert in_shard("a/b.dcm", (0, 1))


def test_an_out_that_another_job_began_is_refused_not_mixed(trained: Path, folder: Path, tmp_path: Path) -> None:
    """Rows of two jobs never share one table: another precision or shard into the same --out stops, naming it."""
    out = tmp_path / "s.csv"
    score_folder(folder, trained, out, shard=(0, 2), workers=0)
    kept = out.read_bytes()
    with pytest.raises(RunError, match=r"holds rows of another job \(shard differ"):
        score_folder(folder, trained, out, shard=(1, 2), workers=0)
    with pytest.raises(RunError, match=r"holds rows of another job \(amp differ"):
        score_folder(folder, trained, out, shard=(0, 2), workers=0, amp="bf16")
    assert out.read_bytes() == kept  # refused before the resume trims anything
    assert score_folder(folder, trained, out, shard=(0, 2), workers=0).already_done > 0  # the same job resumes
    Path(f"{out}.json").unlink()  # rows whose record is gone may be any model's: never taken as done
    with pytest.raises(RunError, match=r"s\.csv holds rows but .*s\.csv\.json, the record of the job that wrote "
                                       r"them, is missing"):  # fmt: skip
        score_folder(folder, trained, out, shard=(0, 2), workers=0)
    assert out.read_bytes() == kept


def test_parquet_and_parallel_workers(trained: Path, folder: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "scores.parquet"
    summary = score_folder(folder, trained, out, workers=2)
    table = pq.read_table(out)
    assert table.num_rows == 14 and summary.ok_images == 11 and summary.reconciled
    assert "prob_mr" in table.column_names
    # an included tag stays text: an accession number's leading zeros are kept
    tagged = tmp_path / "tagged"
    shutil.copytree(folder, tagged, symlinks=True)
    one = next(p for p in sorted(tagged.rglob("*.dcm")) if p.is_file() and not p.is_symlink())
    ds = pydicom.dcmread(one)
    ds.AccessionNumber = "0004217"
    ds.save_as(one)
    score_folder(tagged, trained, tmp_path / "tags.parquet", include_tags=["AccessionNumber"], workers=0)
    rows = pq.read_table(tmp_path / "tags.parquet").to_pylist()
    assert "0004217" in {r["tag_AccessionNumber"] for r in rows}


def test_a_file_name_that_is_not_utf8_is_one_error_row_and_the_rest_are_scored(trained: Path, tmp_path: Path) -> None:
    """A Latin-1 name from an old share (``caf\\xe9.dcm``) cannot be written in a text row as it is: its row names it
    with the byte escaped, the other files are scored, and a second run resumes all of them."""
    folder = tmp_path / "in"
    folder.mkdir()
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (folder / "a.dcm").write_bytes(ct)
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.dcm"), "wb") as fh:
        fh.write(ct)
    out = tmp_path / "s.csv"
    summary = score_folder(folder, trained, out, workers=1)
    rows = {r["path"]: r for r in _rows(out)}
    assert rows["a.dcm"]["status"] == "ok" and summary.reconciled and summary.exit_code == 3
    assert rows["caf\\xe9.dcm"]["status"] == "error" and "not valid UTF-8" in rows["caf\\xe9.dcm"]["reason"]
    again = score_folder(folder, trained, out, workers=1)
    assert again.files_found == 2 and again.reconciled and len(_rows(out)) == 2


def test_a_file_name_with_a_line_break_is_one_row_through_a_resume(trained: Path, tmp_path: Path) -> None:
    """The row quotes the name; resuming reads records, not lines, so nothing is cut or lost."""
    folder = tmp_path / "in"
    folder.mkdir()
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    for name in ("a.dcm", "b\nc.dcm", "d\r.dcm", "z.dcm"):
        (folder / name).write_bytes(ct)
    out = tmp_path / "s.csv"
    first = score_folder(folder, trained, out, workers=0)
    again = score_folder(folder, trained, out, workers=0)
    assert first.exit_code == again.exit_code == 0 and again.reconciled and again.already_done == 3
    assert sorted(r["path"] for r in _rows(out)) == ["a.dcm", "b\nc.dcm", "d\r.dcm", "z.dcm"]


def test_a_broken_link_to_an_absolute_path_does_not_print_it(trained: Path, tmp_path: Path) -> None:
    """A link's absolute target lies outside the folder and may name a patient (``/pacs/DOE^JOHN/IM1.dcm``)."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "abs.dcm").symlink_to("/nonexistent/DOE^JOHN_1961/IM0001.dcm")
    (folder / "rel.dcm").symlink_to("gone.dcm")
    score_folder(folder, trained, tmp_path / "s.csv", workers=0)
    reason = {r["path"]: r["reason"] for r in _rows(tmp_path / "s.csv")}
    assert reason["abs.dcm"] == "broken symbolic link: its target, outside the folder, does not exist"
    assert reason["rel.dcm"] == "broken symbolic link: its target 'gone.dcm' does not exist"


def test_cli_exit_codes(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert main(["score", str(empty), "--model", str(trained), "--out", str(tmp_path / "e.csv"), "--workers", "0"]) == 4
    assert "no image file to score" in capsys.readouterr().err
    assert main(["score", str(empty), "--model", str(tmp_path), "--out", str(tmp_path / "f.csv")]) == 2
    assert "not a finished medvision run" in capsys.readouterr().err


def test_a_shard_says_its_counts_are_the_shards_and_an_empty_one_is_not_a_failure(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under --shard i/n the summary counts the shard's entries and says so. A shard to which the hash gave none of
    the folder's files exits 0 (an array job's empty shard is not a failure), says where the folder's files went,
    and leaves a header-only table and a record that says so; a shard with entries but none to score exits 4."""
    folder = tmp_path / "notes"
    folder.mkdir()
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text("no image")
    held = [sum(in_shard(n, (i, 3)) for n in ("a.txt", "b.txt")) for i in range(3)]
    empty, some = held.index(0), next(i for i, n in enumerate(held) if n)

    def score(i: int) -> int:
        return main(["score", str(folder), "--model", str(trained), "--out", str(tmp_path / f"s{i}.csv"), "--shard",
                     f"{i}/3", "--workers", "0"])  # fmt: skip

    assert score(some) == 4
    out, err = capsys.readouterr()
    assert f"{held[some]} file(s) found in shard {some}/3: 0 scored" in out
    assert f"error: no image file to score in shard {some}/3 of {folder}" in err
    assert score(empty) == 0
    out, err = capsys.readouterr()
    assert f"0 file(s) found in shard {empty}/3: 0 scored" in out
    assert "the folder's 2 file(s) are all in other shards (--shard puts each path in one shard" in out
    assert err == ""
    record = json.loads((tmp_path / f"s{empty}.csv.json").read_text())
    assert (record["files_found"], record["folder_files"], record["exit_code"]) == (0, 2, 0)
    assert (tmp_path / f"s{empty}.csv").read_text().startswith("path,")
    with (tmp_path / f"s{empty}.csv").open() as fh:
        assert list(csv.DictReader(fh)) == []


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` RGB and whose pixel data is missing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def test_png_folder_scores_like_evaluate_and_exit_codes(
    tiles_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run trained on PNG tiles scores a PNG folder: its probabilities are evaluate's, bad images are errors.
    Trained in bf16: its predictions, temperature and thresholds are still float32's, as score computes them."""
    tree = tiny_recipe(tiles_manifest, tmp_path / "runs")
    tree["train"]["amp"] = "bf16"
    run = train(recipe_from_dict(tree))
    assert json.loads((run / "run.json").read_text())["amp"] == "bf16"
    folder = tiles_manifest.parent
    out = tmp_path / "tiles.csv"
    assert main(["score", str(folder), "--model", str(run), "--out", str(out), "--workers", "0"]) == 0
    rows = {r["path"]: r for r in _rows(out)}
    assert rows["manifest.csv"]["status"] == "skipped" and "not an image file" in rows["manifest.csv"]["reason"]
    with (run / "predictions.csv").open(newline="") as fh:
        predicted = list(csv.DictReader(fh))
    assert predicted
    for p in predicted:
        assert rows[p["id"]]["status"] == "ok"
        for c in ("prob_stroma", "prob_tumor"):
            assert float(rows[p["id"]][c]) == pytest.approx(float(p[c]), rel=1e-6, abs=1e-12), (p["id"], c)
    assert "0 error(s)" in capsys.readouterr().out

    bad = tmp_path / "bad"
    shutil.copytree(folder / "tiles", bad / "tiles")
    (bad / "empty.png").write_bytes(b"")
    (bad / "cut.png").write_bytes((folder / "tiles" / "P000_00.png").read_bytes()[:100])
    (bad / "huge.png").write_bytes(_png_header_only(100_000, 100_000))
    shutil.copy(get_testdata_file("CT_small.dcm"), bad / "ct.dcm")
    tile = cv2.imread(str(folder / "tiles" / "P000_00.png"))
    jpeg = cv2.imencode(".jpg", tile)[1].tobytes()
    jpeg = jpeg[: len(jpeg) * 2 // 3] + b"\xff\xd9"  # scan data cut short, yet it ends as a JPEG should
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED) is not None  # OpenCV only warns
    (bad / "corrupt.jpg").write_bytes(jpeg)
    out = tmp_path / "bad.csv"
    assert main(["score", str(bad), "--model", str(run), "--out", str(out), "--workers", "1"]) == 3
    rows = {r["path"]: r for r in _rows(out)}
    assert rows["empty.png"]["status"] == "error" and "empty file" in rows["empty.png"]["reason"]
    assert rows["cut.png"]["status"] == "error" and "cut.png" in rows["cut.png"]["reason"]
    assert rows["huge.png"]["status"] == "error" and rows["huge.png"]["reason"].startswith(
        "header declares 30,000,000,000"
    )
    assert rows["ct.dcm"]["status"] == "skipped" and "trained on PNG" in rows["ct.dcm"]["reason"]
    assert rows["corrupt.jpg"]["status"] == "error" and "damaged JPEG data" in rows["corrupt.jpg"]["reason"]
    assert sum(r["status"] == "ok" for r in rows.values()) == 72
    assert "4 file(s) could not be scored" in capsys.readouterr().err
    record = json.loads(Path(str(out) + ".json").read_text())
    assert record["files_found"] == 77 and record["reconciled"] and record["exit_code"] == 3

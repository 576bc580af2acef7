"""The job runner shared by ``score`` and ``features``: one job an output, resume that checks what it keeps, and a
``--nproc`` launcher that passes a stop on to torchrun."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_rows, write_rows

from medvision.cli import main
from medvision.recipe import SlidesConfig
from medvision.runs import RunError
from medvision.tasks.features import extract_features
from medvision.tasks.score.table import ScoreSummary, resume, tally
from medvision.wsi.features import feature_name

ENCODER = "timm:tf_efficientnet_lite0"
SLIDES = ("slide_000.svs", "slide_001.tif", "slide_003.svs", "slide_004.tif")
HOLD = """
import sys, time
from pathlib import Path
from medvision.runtime import SINGLE
from medvision.tasks.score.table import lock_output
held = lock_output(Path(sys.argv[1]), Path(sys.argv[2]), SINGLE)
print("locked", flush=True)
time.sleep(120)
"""


def _folder(slide_cohort: Path, tmp_path: Path, names: tuple[str, ...]) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in names:
        shutil.copy(slide_cohort.parent / name, folder / name)
    return folder


def test_features_resume_redoes_transient_errors_and_stale_files_only_and_counts_each_slide_once(
    slide_cohort: Path, shared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _folder(slide_cohort, tmp_path, SLIDES)
    (folder / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 64)  # an error of the file's own content
    out, weights = tmp_path / "feats", shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    cfg = SlidesConfig(tile_size=112, target_mpp=1.0, max_tiles_per_slide=3)
    first = extract_features(folder, out, ENCODER, weights, slides=cfg, workers=0)
    assert first.ok_files == 4 and first.error_files == 1 and first.reconciled
    table = out / "features.csv"
    rows = {r["path"]: r for r in read_rows(table)}
    assert list(rows)[-1] == "slide_004.tif"  # the last row, which resume used to redo
    stamps = {n: (out / feature_name(n)).stat().st_mtime_ns for n in SLIDES}
    # slide_000: its .h5 is gone; slide_001: a reader timed out on it (the row a hung reader leaves); slide_003: its
    # row counts other tiles than its file holds. The 60 s timeout is under this run's limit (600 s): tried again
    (out / feature_name("slide_000.svs")).unlink()
    timed_out = "slide_001.tif: decoder timed out after 60 s"  # opening it, under a shorter --slide-timeout
    rows["slide_001.tif"].update(status="error", reason=timed_out, file="", tiles="", dim="", tissue_mm2="", mpp="",
                                 mpp_source="", level="", seconds="")  # fmt: skip
    rows["slide_003.svs"]["tiles"] = "2"
    write_rows(table, list(rows.values()))
    caplog.set_level("INFO", logger="medvision")
    again = extract_features(folder, out, ENCODER, weights, slides=cfg, workers=0)
    assert again.scored_now == 3 and again.already_done == 2  # broken.svs and slide_004.tif are kept
    assert again.ok_files == 4 and again.error_files == 1 and again.reconciled and again.files_found == 5
    assert "1 entry to do again (error rows of a reader that crashed or timed out under a shorter limit)" in caplog.text
    assert "ok rows whose feature file is missing" in caplog.text
    assert "another tile count" in caplog.text
    after = read_rows(table)
    assert sorted(r["path"] for r in after) == sorted(rows)  # one row a slide
    assert {r["path"]: r["status"] for r in after}["slide_001.tif"] == "ok"
    assert int({r["path"]: r["tiles"] for r in after}["slide_003.svs"]) == 3
    assert (out / feature_name("slide_004.tif")).stat().st_mtime_ns == stamps["slide_004.tif"]  # the last: kept
    assert (out / feature_name("slide_003.svs")).stat().st_mtime_ns != stamps["slide_003.svs"]
    assert "broken.svs" not in {r["path"] for r in after[-3:]}  # its content error stays done, not redone

    # a second job's row for a slide already there: counted once, and the output is not reconciled
    with table.open("a", newline="") as fh:
        csv.writer(fh).writerow([after[-1][c] for c in after[-1]])
    third = extract_features(folder, out, ENCODER, weights, slides=cfg, workers=0)
    assert third.scored_now == 0 and third.ok_files == 4 and third.ok_images == 12
    assert third.duplicate_files == 1 and not third.reconciled and third.exit_code == 3
    record = json.loads((out / "features.json").read_text())
    assert record["reconciled"] is False and record["duplicate_files"] == 1 and record["exit_code"] == 3


def test_a_second_job_into_an_output_in_use_is_refused_with_exit_code_2(
    slide_cohort: Path, shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _folder(slide_cohort, tmp_path, SLIDES[:1])
    out, weights = tmp_path / "feats", shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / "features"), str(out / "features.csv")],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        args = ["features", str(folder), "--encoder", ENCODER, "--checkpoint", str(weights), "--out", str(out),
                "--tile-size", "112", "--target-mpp", "1.0", "--max-tiles", "2", "--workers", "0"]  # fmt: skip
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{out / 'features.csv'}: another job is writing this output" in err
        assert f"process {holder.pid}" in err and "features.lock" in err
        assert not (out / "features.csv").exists()  # the refused job wrote no row
        with pytest.raises(RunError, match="another job is writing"):
            extract_features(folder, out, ENCODER, weights, workers=0)
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0  # the lock goes with the job that held it


def test_resume_of_frames_drops_the_last_file_and_retries_crashed_files(tmp_path: Path) -> None:
    """A unit whose entries have several rows (a file's frames): the last file may be cut between two frames."""
    table = tmp_path / "scores.csv"
    text = ("path,frame,pred,status,reason\r\n"
            "a.dcm,0,x,ok,\r\n"
            "b.dcm,,,error,b.dcm: decoder crashed: signal 11 (SIGSEGV)\r\n"
            "c.dcm,,,error,c.dcm: not a DICOM file (no pixel data)\r\n"
            "d.dcm,0,x,ok,\r\n"
            "d.dcm,1,x,ok,\r\n"
            "e.dcm,0,x,ok,\r\n"
            "e.dcm,1,x,o")  # fmt: skip
    table.write_bytes(text.encode())
    assert resume(table, several_rows=True).done == {"a.dcm", "c.dcm", "d.dcm"}
    assert table.read_text().splitlines() == [line for line in text.splitlines() if line[0] not in "be"]
    table.write_bytes(text.encode())
    assert resume(table, several_rows=False).done == {"a.dcm", "c.dcm", "d.dcm", "e.dcm"}  # one cut row only
    summary = ScoreSummary()
    with table.open("a", newline="") as fh:
        fh.write("d.dcm,1,x,ok,\r\n")  # a frame written twice
    tally(table, {"a.dcm", "c.dcm", "d.dcm", "e.dcm"}, summary, lambda r: int(r["status"] == "ok"))
    assert summary.ok_images == 4 and summary.duplicate_files == 1 and not summary.reconciled


def test_a_timed_out_row_is_tried_again_only_under_a_longer_limit(tmp_path: Path) -> None:
    """A file that hangs its decoder would cost every resume the limit again, for the same answer: kept under the
    same limit, tried again when the run allows longer (an auditor's --slide-timeout 0.001, then the default)."""
    table = tmp_path / "scores.csv"
    text = ("path,frame,pred,status,reason\r\n"
            "a.dcm,0,x,ok,\r\n"
            "h.dcm,,,error,h.dcm: decoder timed out after 300 s\r\n"
            "o.svs,,,error,o.svs: decoder timed out after 0.001 s\r\n"
            "s.svs,,,error,s.svs: tiles could not be read (decoder timed out after 300 s)\r\n"
            "z.dcm,0,x,ok,\r\n")  # fmt: skip
    # s.svs: a tile batch's limit is fixed (300 s), whatever --slide-timeout says: never again on a resume
    everything = {"a.dcm", "h.dcm", "o.svs", "s.svs", "z.dcm"}
    for timeout, done in ((None, everything), (300.0, everything - {"o.svs"}),
                          (600.0, everything - {"o.svs", "h.dcm"})):  # fmt: skip
        table.write_bytes(text.encode())
        assert resume(table, several_rows=False, timeout=timeout).done == done, timeout


def test_a_lock_that_cannot_be_written_is_a_user_error_not_an_internal_one(tmp_path: Path) -> None:
    """A folder this job cannot write (here: a file where the output's folder should be; root ignores chmod) stops
    every rank with a RunError naming the lock, where rank 0 alone used to die with a bare OSError."""
    from medvision.runtime import SINGLE
    from medvision.tasks.score.table import lock_output

    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "scores.csv"
    with pytest.raises(RunError, match=r"a_file/scores\.csv\.lock: cannot write the output's lock"):
        lock_output(out, out, SINGLE)


def _ours(out: Path) -> list[int]:
    """The processes whose command line names ``out`` (the launcher, torchrun and its ranks)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if str(out).encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists processes through /proc")
def test_sigterm_to_an_nproc_job_stops_torchrun_and_its_ranks(slide_cohort: Path, shared: Path, tmp_path: Path) -> None:
    folder = _folder(slide_cohort, tmp_path, SLIDES)
    out, weights = tmp_path / "feats", shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    args = ["features", str(folder), "--encoder", ENCODER, "--checkpoint", str(weights), "--out", str(out),
            "--tile-size", "112", "--target-mpp", "1.0", "--workers", "0", "--nproc", "2"]  # fmt: skip
    job = subprocess.Popen([sys.executable, "-m", "medvision", *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "features.json").is_file() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # rank 0 writes it as the job starts: torchrun and both ranks run
        assert job.poll() is None, job.stderr.read() if job.stderr else ""
        assert len(_ours(out)) >= 4  # this launcher, torchrun and two ranks
        job.send_signal(signal.SIGTERM)
        _, err = job.communicate(timeout=120)
        assert job.returncode == 128 + signal.SIGTERM, err[-2000:]
        deadline = time.monotonic() + 10
        while _ours(out) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _ours(out) == []  # nothing goes on writing --out
        assert json.loads((out / "features.json").read_text())["finished"] is False
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()

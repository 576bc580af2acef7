"""PyTorch and ONNX Runtime give the same scores on real DICOMs of every kind, and export checks it.

A run trained on DICOM with ``train.amp: auto`` (bf16 on a CPU with avx512_bf16) is exported to ONNX;
``score`` with each engine on a mixed folder (the export's DICOM parity set of pydicom and pydicom-data
files, a PNG, a truncated DICOM and a text file) must write the same rows, probabilities to 1e-4. Scoring
under the run's training autocast once made them differ by up to 0.19 on such files; the export's own
DICOM parity set must run, be recorded, and name the file when an export disagrees on one.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pydicom = pytest.importorskip("pydicom")
from conftest import read_rows, tiny_recipe  # noqa: E402
from test_dicom_source import make_dicom_folder  # noqa: E402

import medvision.tasks.export.onnx as export_onnx_module  # noqa: E402
from medvision.data.intake import ReadConfig, read_file  # noqa: E402
from medvision.inference import OrtEngine  # noqa: E402
from medvision.recipe import recipe_from_dict  # noqa: E402
from medvision.runtime import resolve_amp  # noqa: E402
from medvision.tasks.export import ExportError, ExportResult  # noqa: E402
from medvision.tasks.export.common import check_dicom_parity, dicom_parity_files, open_run  # noqa: E402
from medvision.tasks.export.onnx import export_onnx  # noqa: E402
from medvision.tasks.score import score_folder  # noqa: E402
from medvision.tasks.train import train  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def parity_files() -> list[tuple[str, Path]]:
    files, missing = dicom_parity_files()
    if missing:
        pytest.skip(missing)
    return files


@pytest.fixture(scope="module")
def amp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DICOM run trained under ``train.amp: auto``, each frame a sample, the files' VOI window; 64 px, 1 epoch.

    Uncalibrated: a temperature fitted on its 4 validation images squeezes every probability to 0.50 +- 0.01,
    where no difference in arithmetic would show; at temperature 1 they spread over 0.41-0.59 and bf16 moves
    them by up to 5e-4.
    """
    root = tmp_path_factory.mktemp("amp_dicom")
    make_dicom_folder(root, per_class=6)
    tree = tiny_recipe(root, tmp_path_factory.mktemp("amp_runs"),
                       phases=[{"name": "all", "epochs": 1, "trainable": "all", "lr": 3e-3}])  # fmt: skip
    tree["name"] = "amp_dicom"
    tree["data"].update(source="dicom", path=str(root), image_size=64,
                        dicom={"windows": ["file"], "frames": "all", "cache": False})  # fmt: skip
    tree["train"]["amp"] = "auto"
    tree["augment"] = {"preset": "radiology"}
    tree["evaluation"] = {"bootstrap": 0, "explain": 0, "calibrate": False}
    return train(recipe_from_dict(tree))


@pytest.fixture(scope="module")
def amp_onnx(amp_run: Path, parity_files: list[tuple[str, Path]],
             tmp_path_factory: pytest.TempPathFactory) -> ExportResult:  # fmt: skip
    return export_onnx(amp_run, tmp_path_factory.mktemp("amp_export") / "model.onnx", parity_images=8)


def _mixed_folder(root: Path, files: list[tuple[str, Path]]) -> Path:
    """The DICOM parity set's files, a PNG, a DICOM cut in half and a text file."""
    for name, path in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / name)
    assert cv2.imwrite(str(root / "photo.png"), np.random.default_rng(0).integers(0, 255, (40, 30), np.uint8))
    ct = (root / "pydicom" / "CT_small.dcm").read_bytes()
    (root / "cut.dcm").write_bytes(ct[: len(ct) // 2])
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def scored(amp_run: Path, amp_onnx: ExportResult, parity_files: list[tuple[str, Path]],
           tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:  # fmt: skip
    """The mixed folder, and its scores by the PyTorch engine (default precision) and by ONNX Runtime."""
    tmp = tmp_path_factory.mktemp("amp_scores")
    folder = _mixed_folder(tmp / "incoming", parity_files)
    torch_csv, ort_csv = tmp / "torch.csv", tmp / "ort.csv"
    assert score_folder(folder, amp_run, torch_csv, engine="torch", workers=0).engine == "torch"
    assert score_folder(folder, amp_onnx.path, ort_csv, engine="onnxruntime", workers=0).engine == "onnxruntime"
    return folder, torch_csv, ort_csv


def _max_diffs(ours: list[dict[str, str]], theirs: list[dict[str, str]]) -> dict[str, float]:
    """Per file, max |p_ours - p_theirs| over its ok rows; both CSVs must have the same rows, statuses, reasons."""
    assert [(r["path"], r["frame"]) for r in ours] == [(r["path"], r["frame"]) for r in theirs]
    probs = [c for c in ours[0] if c.startswith("prob_")]
    assert probs
    per_file: dict[str, float] = {}
    for ours_row, theirs_row in zip(ours, theirs, strict=True):
        key = (ours_row["path"], ours_row["frame"])
        assert (ours_row["status"], ours_row["reason"]) == (theirs_row["status"], theirs_row["reason"]), key
        if ours_row["status"] == "ok":
            diff = max(abs(float(ours_row[c]) - float(theirs_row[c])) for c in probs)
            per_file[ours_row["path"]] = max(diff, per_file.get(ours_row["path"], 0.0))
    return per_file


def test_torch_and_onnxruntime_write_the_same_rows_on_real_dicoms(
    amp_onnx: ExportResult, scored: tuple[Path, Path, Path]
) -> None:
    _, torch_csv, ort_csv = scored
    record = json.loads(Path(f"{torch_csv}.json").read_text())
    assert record["amp"] == "none"  # float32, although the run trained under bf16 where the CPU has it
    assert torch_csv.read_text().splitlines()[0] == ort_csv.read_text().splitlines()[0]  # the same columns
    torch_rows, ort_rows = read_rows(torch_csv), read_rows(ort_csv)
    per_file = _max_diffs(torch_rows, ort_rows)
    assert max(per_file.values()) <= ATOL, per_file
    worst = max(per_file, key=lambda k: per_file[k])
    print(f"torch fp32 vs onnxruntime on {len(per_file)} DICOM files: max |dp| = {per_file[worst]:.1e} ({worst})")

    status = {r["path"]: (r["status"], r["reason"]) for r in torch_rows}
    assert status["photo.png"][0] == "skipped" and status["notes.txt"][0] == "skipped"
    assert status["cut.dcm"][0] == "error" and status["pydicom/MR_truncated.dcm"][0] == "error"
    assert status["pydicom/rtplan.dcm"][0] == "skipped"
    for big in ("pydicom-data/RG1_UNCR.dcm", "pydicom-data/RG3_UNCR.dcm"):  # ~1,800-2,000 px MONOCHROME1
        assert status[big][0] == "ok", status[big]
    frames = [r["frame"] for r in torch_rows if r["path"] == "pydicom-data/emri_small_jpeg_ls_lossless.dcm"]
    assert frames == [str(k) for k in range(10)]  # every frame, as the run was trained
    # the export compared the same files at the same limit, and found the same ones unreadable
    dicom = json.loads(amp_onnx.record.read_text())["dicom_parity"]
    assert set(dicom["per_file"]) == set(per_file)
    assert set(dicom["not_compared"]) == {p for p, (s, _) in status.items() if s != "ok"} - {
        "photo.png", "notes.txt", "cut.dcm"}  # fmt: skip


def test_the_comparison_sees_bf16_scoring(amp_run: Path, scored: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Scoring under bf16 autocast (what ``score`` did before it scored in float32) fails the comparison above."""
    if resolve_amp("auto", torch.device("cpu")) != "bf16":
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / AMX)")
    folder, _, ort_csv = scored
    score_folder(folder, amp_run, tmp_path / "bf16.csv", engine="torch", workers=0, amp="bf16")
    per_file = _max_diffs(read_rows(tmp_path / "bf16.csv"), read_rows(ort_csv))
    assert max(per_file.values()) > ATOL  # 4.7e-4 measured, on 24 of 43 frames


def test_export_checks_and_records_the_dicom_set(amp_onnx: ExportResult, parity_files: list[tuple[str, Path]]) -> None:
    record = json.loads(amp_onnx.record.read_text())
    dicom = record["dicom_parity"]
    assert dicom["checked"] and dicom["atol"] == ATOL and 0 <= dicom["max_abs_diff"] <= ATOL
    assert dicom["files"] == len(dicom["per_file"]) >= 25 and dicom["frames"] > dicom["files"]  # multi-frame files
    assert dicom["worst_file"] in dicom["per_file"]
    assert dicom["max_abs_diff"] == max(f["max_abs_diff"] for f in dicom["per_file"].values())
    assert {"pydicom-data/RG1_UNCR.dcm", "pydicom-data/RG3_UNCR.dcm", "pydicom/SC_rgb_jpeg_dcmtk.dcm",
            "pydicom/MR_small_RLE.dcm", "pydicom/JPEG2000.dcm", "pydicom/MR_small_jpeg_ls_lossless.dcm"} <= set(
        dicom["per_file"])  # fmt: skip
    assert dicom["per_file"]["pydicom-data/emri_small_jpeg_ls_lossless.dcm"]["frames"] == 10
    assert dicom["not_compared"]["pydicom/MR_truncated.dcm"].startswith("error: ")
    assert dicom["not_compared"]["pydicom/rtplan.dcm"].startswith("skipped: ")
    assert len(dicom["per_file"]) + len(dicom["not_compared"]) == len(parity_files)
    line = next(c for c in amp_onnx.checks if c.startswith("DICOM parity on"))
    assert f"{dicom['files']} real files ({dicom['frames']} frames)" in line and dicom["worst_file"] in line
    metadata = {p.key: p.value for p in onnx.load(str(amp_onnx.path)).metadata_props}
    assert metadata["dicom_parity_files"] == str(dicom["files"])


def test_an_export_that_disagrees_on_one_dicom_names_it(
    amp_run: Path, amp_onnx: ExportResult, parity_files: list[tuple[str, Path]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    name, path = next((n, p) for n, p in parity_files if n == "pydicom-data/RG3_UNCR.dcm")
    target = read_file(path, name, ReadConfig(open_run(amp_run).spec)).arrays[0]

    class OffOnOneFile(OrtEngine):
        """The real exported graph in ONNX Runtime, 3e-4 off on that one image (as bf16 arithmetic might be)."""

        def predict(self, batch: np.ndarray) -> np.ndarray:
            probs = super().predict(batch)
            for k, image in enumerate(batch):
                if image.shape == target.shape and np.array_equal(image, target):
                    probs[k, 0] += 3e-4
                    probs[k, 1] -= 3e-4
            return probs

    monkeypatch.setattr(export_onnx_module, "OrtEngine", OffOnOneFile)
    out = tmp_path / "deploy" / "model.onnx"
    with pytest.raises(ExportError, match=r"DICOM parity check failed on 1 of \d+ real DICOM files") as err:
        export_onnx(amp_run, out, parity_images=4)
    assert "pydicom-data/RG3_UNCR.dcm (1 frame(s)): 0.0003" in str(err.value)
    assert not out.exists() and not list(out.parent.iterdir())  # nothing written, no staging folder left


def test_without_pydicom_data_the_set_is_skipped_and_recorded(
    amp_run: Path, amp_onnx: ExportResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.metadata.distribution

    def without_pydicom_data(name: str) -> importlib.metadata.Distribution:
        if name == "pydicom-data":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_pydicom_data)
    assert dicom_parity_files() == ([], "pydicom-data is not installed (pip install pydicom-data, or medvision[dev])")
    engine = OrtEngine(amp_onnx.path, providers=["CPUExecutionProvider"])
    result = check_dicom_parity("onnx", engine.predict, open_run(amp_run), ATOL)
    assert result.record(ATOL) == {"checked": False, "reason": dicom_parity_files()[1]}
    assert result.line("onnx", ATOL).startswith("DICOM parity: NOT CHECKED (pydicom-data is not installed")


def test_the_training_log_says_a_run_is_not_calibrated_as_its_report_does(amp_run: Path) -> None:
    """``evaluation.calibrate: false``: the log read "temperature 1.000 fitted on validation", which it was not."""
    said = "temperature 1: not calibrated (evaluation.calibrate is off"
    assert f"calibration: {said}" in (amp_run / "train.log").read_text()
    assert said in (amp_run / "report.md").read_text()

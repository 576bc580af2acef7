"""DICOM folders as a training source: labels, patients, frames, caching, and a run end to end."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from conftest import tiny_recipe  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

import medvision.data.dicom_source as dicom_source  # noqa: E402
from medvision.data.sources import load_table  # noqa: E402
from medvision.data.table import DataSourceError, check_patient_disjoint  # noqa: E402
from medvision.recipe import DataConfig, recipe_from_dict  # noqa: E402
from medvision.runs import RunError  # noqa: E402
from medvision.tasks.evaluate import evaluate_run  # noqa: E402
from medvision.tasks.train import train  # noqa: E402


def make_dicom_folder(root: Path, per_class: int = 8) -> dict[str, str]:
    """CT and MR class folders of real pydicom test images, each copy its own SOP instance and patient."""
    uids = {}
    for cls, name in (("ct", "CT_small.dcm"), ("mr", "MR_small.dcm")):
        for k in range(per_class):
            ds = pydicom.dcmread(get_testdata_file(name))
            ds.SOPInstanceUID = generate_uid()
            ds.PatientID = f"{cls.upper()}-{k // 2}"  # two images per patient
            out = root / cls / f"series{k % 2}" / f"img{k}.dcm"
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out)
            uids[out.relative_to(root).as_posix()] = str(ds.SOPInstanceUID)
    (root / "ct" / "README.txt").write_text("not an image")
    shutil.copy(get_testdata_file("rtplan.dcm"), root / "mr" / "plan.dcm")  # DICOM, but no image
    return uids


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("dicom")
    return root, make_dicom_folder(root)


def test_class_folders_patients_and_skips(dicom_folder: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, _ = dicom_folder
    table = load_table(DataConfig(source="dicom", path=str(root), val_fraction=0.25, test_fraction=0.25), 0, tmp_path)
    assert table.classes == ["ct", "mr"] and len(table) == 16
    assert table.groups.count("CT-0") == 2 and "MR-3" in table.groups
    check_patient_disjoint(table)
    pixels = table.loader(0)
    assert pixels.dtype == np.float32 and pixels.shape == (128, 128, 1) and table.grayscale


def test_labels_csv_by_uid_and_windows_as_channels(dicom_folder: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, uids = dicom_folder
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sop_instance_uid", "label"])
        for rel, uid in uids.items():
            if rel.startswith("ct/"):
                w.writerow([uid, "normal" if "series0" in rel else "abnormal"])
    dicom = {"labels": str(labels), "windows": ["lung", "mediastinum", "bone"]}
    cfg = DataConfig.model_validate({"source": "dicom", "path": str(root), "dicom": dicom})
    table = load_table(cfg, 0, tmp_path / "cache")
    assert len(table) == 8 and table.classes == ["abnormal", "normal"]
    assert table.loader(0).shape == (128, 128, 3) and not table.grayscale


def _labels_csv(path: Path, header: str, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        fh.write(header + "\n")
        csv.writer(fh).writerows(rows)
    return path


def _dicom_cfg(root: Path, labels: Path) -> DataConfig:
    return DataConfig.model_validate({"source": "dicom", "path": str(root), "dicom": {"labels": str(labels),
                                                                                       "cache": False}})  # fmt: skip


@pytest.mark.parametrize(("header", "rows", "message"), [
    ("path,label,split", [["ct/series0/img0.dcm", "ct", "train"], ["ct/series1/img1.dcm", "ct", "validation"]],
     r"l\.csv, line 3: split 'validation' is not one of \('train', 'val', 'test'\)"),
    ("path,label,split", [["ct/series0/img0.dcm", "ct", "Test"]], r"l\.csv, line 2: split 'Test' is not one of"),
    ("file,label", [["ct/series0/img0.dcm", "ct"]], r"l\.csv: needs a 'path' or 'sop_instance_uid' column"),
    ("path,Label", [["ct/series0/img0.dcm", "ct"]], r"l\.csv: column 'Label' is not a known column; expected 'label'"),
    ("path,label", [["ct/series0/img0.dcm", "ct"], ["./ct/series0/img0.dcm", "mr"]],
     r"l\.csv, line 3: file 'ct/series0/img0\.dcm' is listed twice \(first on line 2\)"),
    ("path,label", [["ct/series0/img0.dcm", " "]], r"l\.csv, line 2: empty 'label'"),
])  # fmt: skip
def test_a_bad_labels_csv_is_a_data_source_error_naming_the_line(
    dicom_folder: tuple[Path, dict[str, str]], tmp_path: Path, header: str, rows: list[list[str]], message: str
) -> None:
    """A split that is not exactly train/val/test would drop the file from every split while counting it as used."""
    root, _ = dicom_folder
    with pytest.raises(DataSourceError, match=message):
        load_table(_dicom_cfg(root, _labels_csv(tmp_path / "l.csv", header, rows)), 0)


def test_labels_csv_paths_are_normalised_and_keys_must_agree(
    dicom_folder: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    root, uids = dicom_folder
    rows = [[f"./{rel}", rel.split("/")[0]] for rel in uids]
    table = load_table(_dicom_cfg(root, _labels_csv(tmp_path / "l.csv", "path,label", rows)), 0)
    assert len(table) == len(uids) and table.classes == ["ct", "mr"]
    rel = "ct/series0/img0.dcm"
    rows = [[rel, "", "ct"], ["", uids[rel], "mr"]]  # one file: by path it is ct, by UID mr
    twice = (
        r"l2\.csv: ct/series0/img0\.dcm is listed twice with different labels or splits: line 2 \(by path\) and line 3"
    )
    with pytest.raises(DataSourceError, match=twice):
        load_table(_dicom_cfg(root, _labels_csv(tmp_path / "l2.csv", "path,sop_instance_uid,label", rows)), 0)


def test_a_patient_in_two_splits_is_refused_without_naming_the_patient(
    dicom_folder: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """The patient is the file's PatientID: the error names two of its files, never the identifier."""
    root, uids = dicom_folder
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        for rel in uids:
            k = int(rel.rsplit("img", 1)[1].split(".")[0])  # img0 and img1 are patient CT-0's: one goes to val
            split = "val" if rel == "ct/series1/img1.dcm" else "train" if k < 6 else "test"
            w.writerow([rel, rel.split("/")[0], split])
    cfg = DataConfig.model_validate({"source": "dicom", "path": str(root), "dicom": {"labels": str(labels)}})
    with pytest.raises(DataSourceError, match=r"ct/series0/img0\.dcm \('train'\) and ct/series1/img1\.dcm "
                                              r"\('val'\) belong to one patient") as err:  # fmt: skip
        load_table(cfg, 0, tmp_path / "cache")
    assert "CT-0" not in str(err.value)


def test_decoded_pixels_are_cached(dicom_folder: tuple[Path, dict[str, str]], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    root, _ = dicom_folder
    table = load_table(DataConfig(source="dicom", path=str(root)), 0, tmp_path)
    first = table.loader(3)
    assert len(list(tmp_path.glob("*.npy"))) >= 1

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(dicom_source, "read_dicom", no_decoding)
    np.testing.assert_array_equal(table.loader(3), first)  # the pixels score decodes: training sees the same
    monkeypatch.setattr(dicom_source, "READER_VERSION", dicom_source.READER_VERSION + 1)  # a newer reader
    with pytest.raises(AssertionError, match="decoded again"):
        table.loader(3)  # never served another reader's pixels


@pytest.mark.parametrize("transfer", ["auto", "uint8"])
def test_score_gives_the_probabilities_the_run_evaluated(
    dicom_folder: tuple[Path, dict[str, str]], tmp_path: Path, transfer: str
) -> None:
    """The same file, the same answer: ``score`` reads a run's DICOM files as its evaluation did, with the decode
    cache on (it keeps the decoded pixels exactly) and with ``data.transfer: uint8`` (scored in uint8 too)."""
    from medvision.cli import main

    root, _ = dicom_folder
    tree = tiny_recipe(root, tmp_path)
    tree["data"].update(source="dicom", path=str(root), transfer=transfer, dicom={"windows": ["percentile"]})
    tree["augment"] = {"preset": "radiology"}
    run = train(recipe_from_dict(tree))
    assert json.loads((run / "run.json").read_text())["transfer"] == ("uint8" if transfer == "uint8" else "float32")
    assert main(["score", str(root), "--model", str(run), "--out", str(tmp_path / "s.csv"), "--workers", "0"]) == 0
    with (run / "predictions.csv").open(newline="") as fh:
        evaluated = {r["id"]: r for r in csv.DictReader(fh)}
    with (tmp_path / "s.csv").open(newline="") as fh:
        scored = {r["path"]: r for r in csv.DictReader(fh) if r["status"] == "ok"}
    assert set(evaluated) <= set(scored) and len(evaluated) == 8  # the validation and test images
    for rel, row in evaluated.items():
        for c in ("prob_ct", "prob_mr"):
            assert float(scored[rel][c]) == pytest.approx(float(row[c]), abs=2e-6), (rel, c)


def _multiframe_folder(root: Path) -> Path:
    """Class folders a/ and b/, each with one real 10-frame MR (raw and RLE: the same pixels)."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    shutil.copy(get_testdata_file("emri_small.dcm"), root / "a" / "x.dcm")
    shutil.copy(get_testdata_file("emri_small_RLE.dcm"), root / "b" / "y.dcm")
    return root


def test_every_frame_as_a_sample(tmp_path: Path) -> None:
    root = _multiframe_folder(tmp_path / "mf")
    cfg = DataConfig.model_validate({"source": "dicom", "path": str(root), "dicom": {"frames": "all", "cache": False}})
    table = load_table(cfg, 0)
    assert len(table) == 20 and table.ids[3] == "a/x.dcm#3"
    np.testing.assert_array_equal(table.loader(3), table.loader(13))  # same pixels, RLE vs raw


def test_a_header_of_minus_one_frames_is_an_error_row_not_a_file_with_no_sample(tmp_path: Path) -> None:
    root = _multiframe_folder(tmp_path / "mf")
    bad = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    bad.NumberOfFrames = -1
    bad.save_as(root / "b" / "minus.dcm")
    tree = {"source": "dicom", "path": str(root), "dicom": {"frames": "all", "cache": False}}
    with pytest.raises(DataSourceError, match=r"b/minus\.dcm: NumberOfFrames is -1; expected 1 or more"):
        load_table(DataConfig.model_validate(tree), 0)
    table = load_table(DataConfig.model_validate({**tree, "on_error": "skip"}), 0)
    assert len(table) == 20  # the two good files' frames
    row = next(r for r in table.audit if r.path == "b/minus.dcm")
    assert row.outcome == "error" and "-1" in row.reason and "NumberOfFrames" in row.reason


def test_train_and_evaluate_on_dicom(dicom_folder: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, _ = dicom_folder
    tree = tiny_recipe(root, tmp_path)
    tree["data"].update(source="dicom", path=str(root), dicom={"windows": ["percentile"]})
    tree["augment"] = {"preset": "radiology"}
    run_dir = train(recipe_from_dict(tree))
    assert (run_dir / "metrics.json").is_file()
    assert list((tmp_path / ".cache" / "dicom").glob("*.npy"))
    with pytest.raises(RunError, match=r"were in the run's training \(8\) or validation \(4\) split"):
        evaluate_run(run_dir, data=str(root))  # the run's own folder: its training images are not a test
    out, metrics = evaluate_run(run_dir, data=str(root), allow_seen=True)
    assert metrics["n"] == 16
    assert json.loads((out / "metrics.json").read_text())["seen_in_training"]["train"] == 8


def test_whole_slide_images_as_one_sample_each(tmp_path: Path) -> None:
    from test_dicom import _write_wsi

    rng = np.random.default_rng(0)
    for cls in ("tumour", "normal"):
        (tmp_path / "wsi" / cls).mkdir(parents=True)
        _write_wsi(tmp_path / "wsi" / cls / "slide.dcm", rng.integers(0, 255, (70, 90, 3), np.uint8), 32, False)
    cfg = DataConfig.model_validate(
        {"source": "dicom", "path": str(tmp_path / "wsi"), "dicom": {"frames": "tiled", "windows": ["file"]}}
    )
    table = load_table(cfg, 0, tmp_path / "cache")
    assert len(table) == 2 and table.ids == ["normal/slide.dcm", "tumour/slide.dcm"]
    assert table.loader(0).shape == (70, 90, 3) and not table.grayscale


def test_a_legacy_uid_is_never_printed_while_reading(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """UIDs with a leading-zero component (common in legacy archives) are invalid values that pydicom, checking each
    value as it reads it, printed on stderr with the value: a link to the patient's study. medvision reads without
    that check, so neither building the table (every header) nor decoding prints them."""
    import warnings

    from pydicom.dataelem import DataElement

    from medvision.io.dicom import DicomSpec, read_dicom

    root = tmp_path / "legacy"
    make_dicom_folder(root, per_class=2)
    legacy = "1.2.840.113619.2.55.3.0969.31337"
    files = sorted(root.rglob("*.dcm"))
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        for tag, name in ((0x00080018, "SOPInstanceUID"), (0x0020000D, "StudyInstanceUID")):
            ds[tag] = DataElement(tag, "UI", f"{legacy}.{name}.{i}", validation_mode=pydicom.config.IGNORE)
        ds.save_as(path)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("DEBUG"):
        warnings.simplefilter("always")
        table = load_table(DataConfig(source="dicom", path=str(root)), 0, tmp_path / "cache")
        assert len(table) == 4  # the two classes' images (make_dicom_folder adds a non-image DICOM too)
        for rel in table.ids:
            read_dicom(root / rel, DicomSpec())
    out, err = capfd.readouterr()
    printed = out + err + caplog.text + "".join(str(w.message) for w in caught)
    assert "0969" not in printed, printed[:2000]
    assert str(pydicom.dcmread(root / table.ids[0]).SOPInstanceUID).startswith(legacy)  # the files hold them

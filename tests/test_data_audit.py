"""The data audit: every file a source meets is used, skipped or an error, and unreadable images never vanish.

A corrupt DICOM in a training folder stops the run with its name (``data.on_error: stop``, the default), or
is left out and counted in the log, ``data_audit.csv``, metrics.json and the report (``skip``). Real files:
pydicom's own test files, cut or damaged, and small PNGs.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

pydicom = pytest.importorskip("pydicom")
from conftest import tiny_recipe  # noqa: E402
from test_dicom_source import make_dicom_folder  # noqa: E402

from medvision.cli import main  # noqa: E402
from medvision.data.audit import AUDIT_FILE  # noqa: E402
from medvision.data.dicom_source import load_dicom_folder  # noqa: E402
from medvision.data.sources import load_csv, load_npz, load_table  # noqa: E402
from medvision.data.table import DataSourceError  # noqa: E402
from medvision.recipe import DataConfig, DicomConfig, recipe_from_dict  # noqa: E402
from medvision.tasks.pretrain import pretrain  # noqa: E402
from medvision.tasks.train import train  # noqa: E402

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # read directly: never a network lookup
ONE_EPOCH = [{"name": "all", "epochs": 1, "trainable": "all", "lr": 1e-2}]


def _damaged_rle(out: Path) -> None:
    """A real RLE file whose compressed stream is zeroed half-way: the header is sound, the pixels do not decode."""
    data = bytearray((TEST_FILES / "MR_small_RLE.dcm").read_bytes())
    start = data.rindex(b"\xe0\x7f\x10\x00") + 92  # past the Pixel Data header, offset table, item and RLE header
    half = (len(data) - start) // 2
    data[start : start + half] = bytes(half)
    out.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def corrupt_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ct/mr class folders of real images plus: a DICOM cut in half, garbage named .dcm, an SR, an RT plan, a text
    file (from make_dicom_folder) and an RLE image whose pixel data does not decode."""
    root = tmp_path_factory.mktemp("corrupt_dicom")
    make_dicom_folder(root, per_class=6)
    whole = (TEST_FILES / "CT_small.dcm").read_bytes()
    (root / "ct" / "truncated.dcm").write_bytes(whole[: len(whole) // 2])
    (root / "mr" / "garbage.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
    shutil.copy(TEST_FILES / "test-SR.dcm", root / "mr" / "report.dcm")
    _damaged_rle(root / "mr" / "damaged_rle.dcm")
    return root


def _audit_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "outcome", "reason", "samples"]
    return {r["path"]: r for r in rows}


def _all_files(root: Path) -> set[str]:
    return {(Path(d) / f).relative_to(root).as_posix() for d, _, files in os.walk(root) for f in files}


def test_dicom_audit_gives_each_file_one_outcome(corrupt_dicom: Path, tmp_path: Path) -> None:
    cfg = DicomConfig()
    table = load_dicom_folder(corrupt_dicom, cfg, None, tmp_path / "cache")
    audit = {r.path: r for r in table.audit}
    assert set(audit) == _all_files(corrupt_dicom)
    outcome = {path: r.outcome for path, r in audit.items()}
    assert outcome["ct/truncated.dcm"] == "error" and "Pixel Data is cut short" in audit["ct/truncated.dcm"].reason
    assert outcome["mr/garbage.dcm"] == "error" and "not a readable DICOM file" in audit["mr/garbage.dcm"].reason
    assert outcome["mr/damaged_rle.dcm"] == "error"  # found by decoding into the cache, before training
    assert outcome["mr/report.dcm"] == "skipped" and "without image pixel data (SR)" in audit["mr/report.dcm"].reason
    assert outcome["mr/plan.dcm"] == "skipped" and outcome["ct/README.txt"] == "skipped"
    assert "not DICOM" in audit["ct/README.txt"].reason
    used = [r for r in table.audit if r.outcome == "used"]
    assert len(used) == 12 and all(r.samples == 1 for r in used) and len(table) == 12
    assert "ct/truncated.dcm" not in table.ids and "mr/damaged_rle.dcm" not in table.ids
    patients = {str(pydicom.dcmread(corrupt_dicom / p).PatientID) for p in audit if p.endswith("img0.dcm")}
    assert not any(pid in r.reason for pid in patients for r in table.audit)  # e.g. "CT-0" never in a reason

    # without the decode cache only the header is checked: the damaged RLE stream is found later, in training
    plain = load_dicom_folder(corrupt_dicom, DicomConfig(cache=False), None, None)
    by_path = {r.path: r.outcome for r in plain.audit}
    assert by_path["mr/damaged_rle.dcm"] == "used" and by_path["ct/truncated.dcm"] == "error"


def test_train_stops_on_a_corrupt_dicom_naming_it(corrupt_dicom: Path, tmp_path: Path) -> None:
    """The acceptance test of the issue: a corrupt DICOM in a training folder stops the run with its name."""
    tree = tiny_recipe(corrupt_dicom, tmp_path, phases=ONE_EPOCH)
    tree["data"].update(source="dicom", path=str(corrupt_dicom))
    tree["augment"] = {"preset": "radiology"}
    with pytest.raises(DataSourceError) as caught:
        train(recipe_from_dict(tree))
    message = str(caught.value)
    assert "3 of 18 files are unreadable images" in message and "ct/truncated.dcm (Pixel Data is cut short" in message
    assert "mr/garbage.dcm" in message and "--set data.on_error=skip" in message and "\n" not in message
    run_dir = tmp_path / "tiny"
    assert not (run_dir / "model.safetensors").exists()  # stopped before training
    audit = _audit_csv(run_dir / AUDIT_FILE)  # and the run folder still lists every file
    assert set(audit) == _all_files(corrupt_dicom) and audit["ct/truncated.dcm"]["outcome"] == "error"


def test_skip_trains_and_accounts_for_every_file(corrupt_dicom: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    tree = tiny_recipe(corrupt_dicom, tmp_path, phases=ONE_EPOCH)
    tree["data"].update(source="dicom", path=str(corrupt_dicom), on_error="skip", dicom={"windows": ["percentile"]})
    tree["augment"] = {"preset": "radiology"}
    tree["evaluation"]["explain"] = 0
    with caplog.at_level("INFO", logger="medvision"):
        run_dir = train(recipe_from_dict(tree))
    assert "data: 18 files: 12 used (12 samples), 3 skipped (not images or unlabelled), 3 errors" in caplog.text
    assert "data.on_error skip: 3 of 18 files are unreadable images, left out: " in caplog.text
    audit = _audit_csv(run_dir / AUDIT_FILE)
    assert set(audit) == _all_files(corrupt_dicom)
    assert {p for p, r in audit.items() if r["outcome"] == "error"} == {
        "ct/truncated.dcm", "mr/garbage.dcm", "mr/damaged_rle.dcm"}  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data_audit"] == {"files": 18, "used": 12, "samples": 12, "skipped": 3, "errors": 3,
                                     "on_error": "skip"}  # fmt: skip
    report = (run_dir / "report.md").read_text()
    warnings = report.split("## Warnings", 1)[1]
    assert "3 unreadable image file(s) were left out of the data (data.on_error: skip)" in warnings
    assert "data_audit.csv" in warnings

    # evaluate reads the data as the run did (skip), and --set data.KEY=VALUE changes only how it is read
    assert main(["evaluate", str(run_dir), "--out", str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--set", "data.on_error=stop"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 of 18 files are unreadable images" in err[0] and "ct/truncated.dcm" in err[0]
    assert main(["evaluate", str(run_dir), "--set", "model.name=resnet50"]) == 2
    assert "evaluate takes data.KEY=VALUE only" in capsys.readouterr().err


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((16, 16, 3), value, np.uint8))


@pytest.fixture()
def corrupt_pngs(tmp_path: Path) -> Path:
    root = tmp_path / "pngs"
    for cls in ("benign", "malignant"):
        for k in range(6):
            _png(root / cls / f"p{k}_{cls}.png", 40 * k)
    whole = (root / "benign" / "p1_benign.png").read_bytes()
    (root / "benign" / "cut.png").write_bytes(whole[: len(whole) // 2])
    (root / "malignant" / "notes.txt").write_text("scanner export")
    (root / "README.md").write_text("two classes")
    return root


def test_image_folder_with_a_corrupt_png(corrupt_pngs: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source="folder", path=str(corrupt_pngs), val_fraction=0.25, test_fraction=0.25)
    with pytest.raises(DataSourceError, match=r"1 of 15 files are unreadable images: benign/cut\.png \(damaged PNG"):
        load_table(cfg, 0, audit_dir=tmp_path / "run")
    assert _audit_csv(tmp_path / "run" / AUDIT_FILE)["benign/cut.png"]["outcome"] == "error"
    table = load_table(cfg.model_copy(update={"on_error": "skip"}), 0)
    outcome = {r.path: r.outcome for r in table.audit}
    assert set(outcome) == _all_files(corrupt_pngs) and len(table) == 12
    assert outcome["benign/cut.png"] == "error" and outcome["malignant/notes.txt"] == "skipped"
    assert outcome["README.md"] == "skipped"  # outside the class folders: no label

    # a CSV manifest: a missing and a corrupt file are errors that name their rows
    manifest = corrupt_pngs / "m.csv"
    manifest.write_text("path,label\nbenign/p0_benign.png,benign\nbenign/cut.png,benign\nbenign/gone.png,benign\n"
                        "malignant/p0_malignant.png,malignant\n")  # fmt: skip
    table = load_csv(manifest, None)
    reason = {r.path: (r.outcome, r.reason) for r in table.audit}
    assert reason["benign/cut.png"][0] == "error" and reason["benign/cut.png"][1].startswith("m.csv, line 3: damaged")
    assert reason["benign/gone.png"] == ("error", "m.csv, line 4: file not found") and len(table) == 2


def test_pretrain_writes_the_audit_and_stops(corrupt_pngs: Path, tmp_path: Path) -> None:
    tree = tiny_recipe(corrupt_pngs, tmp_path, phases=ONE_EPOCH)
    tree["data"].update(source="folder", path=str(corrupt_pngs))
    with pytest.raises(DataSourceError, match=r"benign/cut\.png"):
        pretrain(recipe_from_dict(tree))
    assert set(_audit_csv(tmp_path / "tiny" / AUDIT_FILE)) == _all_files(corrupt_pngs)


def test_cli_prints_one_line_and_exits_2(corrupt_dicom: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    tree = tiny_recipe(corrupt_dicom, tmp_path, phases=ONE_EPOCH)
    tree["data"].update(source="dicom", path=str(corrupt_dicom), dicom={"cache": False})
    tree["augment"] = {"preset": "radiology"}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("medvision train: error:")]
    assert len(lines) == 1 and "ct/truncated.dcm" in lines[0] and "--set data.on_error=skip" in lines[0]
    assert "2 of 18 files" in lines[0]  # without the decode cache the damaged RLE stream is not found yet


def test_cli_exits_2_on_a_dicom_labels_csv_with_wrong_columns(corrupt_dicom: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nct/a.dcm,ct\n")
    tree = tiny_recipe(corrupt_dicom, tmp_path, phases=ONE_EPOCH)
    tree["data"].update(source="dicom", path=str(corrupt_dicom), dicom={"cache": False, "labels": str(labels)})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "labels.csv: needs a 'path' or 'sop_instance_uid' column" in err


def test_a_second_name_of_a_file_in_a_folder_is_a_skipped_row(tmp_path: Path) -> None:
    """A link in another class folder to an image (or a hard link) was a second sample of it, with the other label
    and perhaps in the other split; each file is now read by its first route, the others are rows with a reason."""
    root = tmp_path / "pngs"
    for cls in ("a", "b"):
        for k in range(4):
            _png(root / cls / f"{cls}{k}.png", 30 * k)
    os.symlink(root / "a" / "a0.png", root / "b" / "link_to_a0.png")
    os.link(root / "a" / "a1.png", root / "b" / "hard_a1.png")
    (root / "a" / "zz_link_to_b0.png").symlink_to("../b/b0.png")  # the link sorts first: the real file is skipped
    table = load_table(DataConfig(source="folder", path=str(root)), 0, audit_dir=tmp_path / "run")
    rows = _audit_csv(tmp_path / "run" / AUDIT_FILE)
    assert set(rows) == _all_files(root) and len(table) == 8
    assert rows["b/link_to_a0.png"]["outcome"] == "skipped"
    assert rows["b/link_to_a0.png"]["reason"] == "link to a file already listed as 'a/a0.png'; not read twice"
    assert rows["b/hard_a1.png"]["reason"] == ("another name (a hard link) of the file already listed as 'a/a1.png'; "
                                               "not read twice")  # fmt: skip
    assert rows["b/b0.png"]["reason"] == "file already listed through the link 'a/zz_link_to_b0.png'; not read twice"
    assert sorted(table.ids) == sorted(r for r, row in rows.items() if row["outcome"] == "used")


def test_npz_is_one_used_row(tmp_path: Path) -> None:
    images = np.zeros((6, 8, 8), np.uint8)
    np.savez(tmp_path / "toy.npz", train_images=images, train_labels=np.arange(6) % 2)
    table = load_npz(tmp_path / "toy.npz", None)
    assert [(r.path, r.outcome, r.samples) for r in table.audit] == [("toy.npz", "used", 6)]


def test_slides_that_cannot_be_used_are_errors(shared: Path, tmp_path: Path) -> None:
    pytest.importorskip("openslide")
    from medvision.wsi.synthetic import compose_slide, write_pyramidal_tiff

    he = shared / "data" / "he_tiles"
    tissue = compose_slide(he, 768, 512, [(32, 32, 600, 420)], [], seed=1)
    write_pyramidal_tiff(tmp_path / "good.tif", tissue, 0.5, flavour="generic")
    write_pyramidal_tiff(tmp_path / "glass.tif", np.full_like(tissue, 245), 0.5, flavour="generic")
    manifest = tmp_path / "slides.csv"
    manifest.write_text("slide_path,label\ngood.tif,a\nglass.tif,b\nmissing.tif,b\n")
    tree = {"source": "slides", "path": str(manifest), "slides": {"target_mpp": 1.0, "tile_size": 64}}
    with pytest.raises(DataSourceError, match=r"2 of 3 files are unreadable images: glass\.tif \(slides\.csv, line 3"):
        load_table(DataConfig.model_validate(tree), 0)
    table = load_table(DataConfig.model_validate({**tree, "on_error": "skip", "val_fraction": 0.0,
                                                  "test_fraction": 0.0}), 0)  # fmt: skip
    audit = {r.path: r for r in table.audit}
    assert audit["good.tif"].outcome == "used" and audit["good.tif"].samples == len(table) > 0
    assert "no tile with at least 50% tissue" in audit["glass.tif"].reason
    assert audit["missing.tif"].reason.startswith("slides.csv, line 4: missing.tif")


def test_a_deflated_dicom_is_not_mistaken_for_a_truncated_one(tmp_path: Path) -> None:
    """Deflate compresses the whole dataset, so the file is shorter than its Pixel Data: that is not damage."""
    import pydicom

    source = Path(pydicom.__file__).parent / "data" / "test_files" / "image_dfl.dcm"
    folder = tmp_path / "dicom" / "a"
    folder.mkdir(parents=True)
    shutil.copy(source, folder / "deflated.dcm")
    table = load_dicom_folder(tmp_path / "dicom", DicomConfig(cache=False), None, None)
    assert [row.outcome for row in table.audit] == ["used"], table.audit

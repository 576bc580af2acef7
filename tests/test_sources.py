from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from medvision.data.sources import load_csv, load_folder, load_npz, load_table
from medvision.data.table import (
    DataSourceError,
    check_patient_disjoint,
    grouped_stratified_split,
    read_manifest,
    slide_rows,
)
from medvision.recipe import DataConfig, RecipeError, recipe_from_dict
from medvision.training.build import PROBES, resolve_transfer


def _png(path: Path, value: int, dtype: type = np.uint8, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((12, 12) if channels == 1 else (12, 12, channels), value, dtype=dtype)
    cv2.imwrite(str(path), img)


def test_folder_source_with_16bit_images_and_patient_regex(tmp_path: Path) -> None:
    for c, cls in enumerate(["benign", "malignant"]):
        for p in range(3):
            for k in range(2):
                _png(tmp_path / cls / f"pat{c}{p}_slice{k}.png", 1000 * (k + 1), np.uint16)
    table = load_folder(tmp_path, None, r"^(pat\d+)_")
    assert table.classes == ["benign", "malignant"]
    assert len(table) == 12 and table.grayscale
    assert sorted(set(table.groups)) == ["pat00", "pat01", "pat02", "pat10", "pat11", "pat12"]
    raw = table.loader(1)
    assert raw.dtype == np.uint16 and raw.max() == 2000
    with pytest.raises(DataSourceError, match=r"pat00_slice0\.png: data\.patient_regex .* does not match the file"):
        load_folder(tmp_path, None, r"^(case\d+)")
    with pytest.raises(DataSourceError, match="'benign' is not one of the classes"):
        load_folder(tmp_path, ["malignant", "normal"], None)


def _tiny_tree(data: dict[str, object]) -> dict[str, object]:
    return {"name": "t", "data": data, "model": {"name": "resnet18"}, "train": {"phases": [{"epochs": 1, "lr": 0.1}]}}


def test_patient_regex_needs_one_group_that_matches_every_file(tmp_path: Path) -> None:
    """The group is the patient: a regex without one is refused at load, and a file it leaves without a patient
    is an error naming the file, never a patient ``None`` that would join unrelated files."""
    for bad, why in [("(P", "is not a regular expression"), (r"P\d", "has 0 groups"), (r"(P\d)_(x)", "has 2 groups")]:
        with pytest.raises(RecipeError, match=rf"data\.patient_regex: .*{re.escape(repr(bad))} {why}.*expected one"):
            recipe_from_dict(_tiny_tree({"source": "folder", "path": str(tmp_path), "patient_regex": bad}))
    _png(tmp_path / "a" / "P1_x.png", 1)
    _png(tmp_path / "b" / "P2_y.png", 2)
    named = load_folder(tmp_path, None, r"(?P<patient>P\d)_(x|y)")
    assert named.groups == ["P1", "P2"]  # the named group, not the first
    _png(tmp_path / "b" / "_y.png", 3)
    with pytest.raises(
        DataSourceError, match=r"b/_y\.png: data\.patient_regex .* matches, but its patient group is empty"
    ):
        load_folder(tmp_path, None, r"(P\d)?_")


def test_recipe_refuses_repeated_or_empty_class_names(tmp_path: Path) -> None:
    for classes in (["a", "a"], ["a", ""], ["a", " b"]):
        with pytest.raises(RecipeError, match=r"data\.classes: .*empty, space-padded or repeated name"):
            recipe_from_dict(_tiny_tree({"source": "folder", "path": str(tmp_path), "classes": classes}))


def test_macosx_and_hidden_folders_are_not_classes(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        _png(tmp_path / cls / f"{cls}0.png", 1)
    (tmp_path / "__MACOSX" / "a").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "a" / "._a0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / ".thumbs").mkdir()
    table = load_folder(tmp_path, None, None)
    assert table.classes == ["a", "b"] and len(table) == 2
    assert {r.path: r.outcome for r in table.audit}["__MACOSX/a/._a0.png"] == "skipped"


def _manifest(path: Path, rows: list[list[str]], header: str = "path,label,patient_id") -> Path:
    with path.open("w", newline="") as fh:
        fh.write(header + "\n")
        csv.writer(fh).writerows(rows)
    return path


def test_csv_source_and_its_errors(tmp_path: Path) -> None:
    for i in range(4):
        _png(tmp_path / "img" / f"{i}.png", 50 * i, channels=3)
    rows = [[f"img/{i}.png", "tumour" if i % 2 else "normal", f"P{i // 2}"] for i in range(4)]
    table = load_csv(_manifest(tmp_path / "m.csv", rows), None)
    assert table.classes == ["normal", "tumour"]
    assert table.labels.tolist() == [0, 1, 0, 1]
    assert table.groups == ["P0", "P0", "P1", "P1"] and not table.grayscale
    assert table.ids[0] == "img/0.png"

    bad_label = [*rows, ["img/4.png", "necrosis", "P9"]]
    with pytest.raises(DataSourceError, match=r"line 6: label 'necrosis' is not one of the classes"):
        load_csv(_manifest(tmp_path / "m2.csv", bad_label), ["normal", "tumour"])
    missing = [*rows, ["img/404.png", "normal", "P9"]]
    with pytest.raises(DataSourceError, match=r"1 of 5 files are unreadable images: img/404.png \(m3.csv, line 6: "
                                              r"file not found\).*--set data.on_error=skip"):  # fmt: skip
        load_table(DataConfig(source="csv", path=str(_manifest(tmp_path / "m3.csv", missing))), 0)
    with pytest.raises(DataSourceError, match="missing column"):
        load_csv(_manifest(tmp_path / "m4.csv", [["img/0.png"]], header="file"), None)


@pytest.mark.parametrize(("header", "column", "expected"),
                         [("path,label,Patient_ID", "Patient_ID", "patient_id"), ("path, label,patient_id", " label",
                          "label"), ("path,label,patient_id,Split", "Split", "split")])  # fmt: skip
def test_csv_column_that_differs_only_in_case_or_spaces_is_an_error(tmp_path: Path, header: str, column: str,
                                                                     expected: str) -> None:  # fmt: skip
    """``Patient_ID`` ignored would silently split one patient's images across train and test."""
    _png(tmp_path / "0.png", 1)
    rows = [["0.png", "a", "P0", "train"][: header.count(",") + 1]]
    with pytest.raises(
        DataSourceError, match=rf"m\.csv: column '{column}' is not a known column; expected '{expected}'"
    ):
        load_csv(_manifest(tmp_path / "m.csv", rows, header), None)


def test_csv_with_an_excel_bom_and_extra_columns(tmp_path: Path) -> None:
    for i in range(2):
        _png(tmp_path / f"{i}.png", i)
    (tmp_path / "m.csv").write_bytes("path,label,Notes\r\n0.png,a,x\r\n1.png,b,\r\n".encode("utf-8-sig"))
    table = load_csv(tmp_path / "m.csv", None)
    assert table.ids == ["0.png", "1.png"] and table.classes == ["a", "b"]


@pytest.mark.parametrize(
    "second", [["./img/0.png", "a", "test"], ["img/0.png", "b", "train"], ["img//0.png", "a", "train"]]
)
def test_csv_image_listed_twice_is_an_error_naming_both_lines(tmp_path: Path, second: list[str]) -> None:
    """``img/0.png`` and ``./img/0.png`` are one file: listed twice it could be in train and test at once."""
    _png(tmp_path / "img" / "0.png", 1)
    _png(tmp_path / "img" / "1.png", 2)
    rows = [["img/0.png", "a", "train"], ["img/1.png", "b", "train"], second]
    with pytest.raises(
        DataSourceError, match=r"m\.csv, line 4: image 'img/0\.png' is listed twice \(first on line 2\)"
    ):
        load_csv(_manifest(tmp_path / "m.csv", rows, "path,label,split"), None)
    table = load_csv(_manifest(tmp_path / "m.csv", [["./img/0.png", "a", "train"], ["img/1.png", "b", "val"]],
                               "path,label,split"), None)  # fmt: skip
    assert table.ids == ["img/0.png", "img/1.png"]


def test_csv_labels_are_stripped_and_bad_rows_name_their_line(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / f"{i}.png", i)
    table = load_csv(_manifest(tmp_path / "m.csv", [["0.png", " benign"], ["1.png", "malignant "], ["2.png", "benign"]],
                               "path,label"), None)  # fmt: skip
    assert table.classes == ["benign", "malignant"] and table.labels.tolist() == [0, 1, 0]
    with pytest.raises(DataSourceError, match=r"m2\.csv, line 3: empty 'label'"):
        load_csv(_manifest(tmp_path / "m2.csv", [["0.png", "a"], ["1.png", " "]], "path,label"), None)
    unlabelled = load_csv(tmp_path / "m2.csv", None, labelled=False)  # pretraining: partly labelled is unlabelled
    assert unlabelled.classes == ["unlabelled"] and len(unlabelled) == 2
    (tmp_path / "m3.csv").write_text("path,label\n0.png,a\n1.png,b\n2.png\n")
    with pytest.raises(DataSourceError, match=r"m3\.csv, line 4: 1 field\(s\) where the header has 2"):
        load_csv(tmp_path / "m3.csv", None)
    (tmp_path / "m5.csv").write_text("path,label\n0.png,a\n1,b.png,b\n")  # an unquoted comma in a path
    with pytest.raises(DataSourceError, match=r"m5\.csv, line 3: 3 field\(s\) where the header has 2 .*quote"):
        load_csv(tmp_path / "m5.csv", None)
    for bad in ("Train", "validation"):
        with pytest.raises(DataSourceError, match=rf"m4\.csv, line 2: split '{bad}' is not one of"):
            load_csv(_manifest(tmp_path / "m4.csv", [["0.png", "a", bad]], "path,label,split"), None)


def test_csv_split_column_and_leak_detection(tmp_path: Path) -> None:
    for i in range(4):
        _png(tmp_path / f"{i}.png", i)
    rows = [["0.png", "a", "P0", "train"], ["1.png", "b", "P1", "val"], ["2.png", "a", "P0", "test"],
            ["3.png", "b", "P2", "train"]]  # fmt: skip
    path = _manifest(tmp_path / "m.csv", rows, header="path,label,patient_id,split")
    cfg = DataConfig(source="csv", path=str(path))
    with pytest.raises(DataSourceError, match=r"0\.png \('train'\) and 2\.png \('test'\) belong to one patient") as err:
        load_table(cfg, seed=0)
    assert "P0" not in str(err.value)  # the id may be a DICOM PatientID: never in a message
    rows[2][3] = "train"
    table = load_table(DataConfig(source="csv", path=str(_manifest(path, rows, "path,label,patient_id,split"))), 0)
    assert table.splits == ["train", "val", "train", "train"]


@pytest.mark.parametrize("label_shape", ["(N,)", "(N,1)"])
def test_npz_source_accepts_both_label_shapes(tmp_path: Path, label_shape: str) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in [("train", 10), ("val", 4), ("test", 6)]:
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 3, n)
        arrays[f"{split}_labels"] = labels[:, None] if label_shape == "(N,1)" else labels
    np.savez(tmp_path / "toy.npz", **arrays)
    table = load_npz(tmp_path / "toy.npz", None)
    assert len(table) == 20 and table.grayscale
    assert table.labels.ndim == 1 and table.labels.dtype == np.int64
    assert table.splits.count("val") == 4 and table.ids[10] == "npz:val:0"
    assert table.loader(0).shape == (28, 28)


def test_npz_real_medmnist_files(shared: Path) -> None:
    blood = load_npz(shared / "data" / "bloodmnist.npz", None)  # labels (N, 1), RGB
    assert len(blood) == 11959 + 1712 + 3421 and len(blood.classes) == 8 and not blood.grayscale
    breast = load_npz(shared / "data" / "breastmnist.npz", None)  # labels (N,), grey
    assert len(breast.classes) == 2 and breast.grayscale
    assert breast.splits.count("test") == 156


def test_npz_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataSourceError, match="no '<split>_images'"):
        load_npz(tmp_path / "x.npz", None)
    np.savez(tmp_path / "y.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([0, 5]))
    with pytest.raises(DataSourceError, match=r"label 5, outside 0\.\.1"):
        load_npz(tmp_path / "y.npz", ["a", "b"])
    np.savez(tmp_path / "f.npz", train_images=np.zeros((3, 4, 4), np.uint8), train_labels=np.array([0.0, 1.7, 1.0]))
    with pytest.raises(DataSourceError, match=r"train_labels holds 1\.7 \(sample npz:train:1, dtype float64\); "
                                              r"expected whole class indices"):  # fmt: skip
        load_npz(tmp_path / "f.npz", None)
    np.savez(tmp_path / "w.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([0.0, 1.0]))
    assert load_npz(tmp_path / "w.npz", None).labels.tolist() == [0, 1]  # whole floats are class indices


@pytest.mark.parametrize("seed", range(5))
def test_grouped_split_never_puts_a_patient_in_two_splits(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_patients = 60
    images_per = rng.integers(1, 9, n_patients)
    groups = [f"P{p}" for p in range(n_patients) for _ in range(images_per[p])]
    labels = np.array([int(rng.random() < 0.3) for p in range(n_patients) for _ in range(images_per[p])])
    splits = grouped_stratified_split(labels, groups, 0.15, 0.2, seed)
    owner: dict[str, set[str]] = {}
    for g, s in zip(groups, splits, strict=True):
        owner.setdefault(g, set()).add(s)
    assert all(len(s) == 1 for s in owner.values())
    splits_arr = np.array(splits)
    for split, frac in [("test", 0.2), ("val", 0.15)]:
        share = (splits_arr == split).mean()
        assert abs(share - frac) < 0.08, (split, share)
        pos_rate = labels[splits_arr == split].mean()
        assert abs(pos_rate - labels.mean()) < 0.15  # stratified: each split keeps the label mix
    assert splits == grouped_stratified_split(labels, groups, 0.15, 0.2, seed)  # deterministic


def test_auto_split_for_csv_is_patient_disjoint(tiles_manifest: Path) -> None:
    table = load_table(DataConfig(source="csv", path=str(tiles_manifest), val_fraction=0.25, test_fraction=0.25), 0)
    check_patient_disjoint(table)
    assert set(table.splits) == {"train", "val", "test"}


def test_transfer_auto_reads_every_files_depth_and_decides_once_for_all_splits(tmp_path: Path) -> None:
    """Three 12-bit scans saved as 16-bit PNG among more 8-bit PNGs than a probe reads, all in the test split: every
    split travels float32 (the run records val's choice for score, evaluate re-decides on test: they must agree)."""
    rng = np.random.default_rng(0)
    n8 = 2 * PROBES
    for i in range(n8):
        _png(tmp_path / "data" / "ab"[i % 2] / f"x{i:03d}.png", int(rng.integers(0, 255)))
    rows = [[f"data/{'ab'[i % 2]}/x{i:03d}.png", "ab"[i % 2], "val" if i < 8 else "train"] for i in range(n8)]
    for k in range(3):
        _png(tmp_path / "data" / "a" / f"scan{k}.png", 1000 + 100 * k, np.uint16)
        rows.append([f"data/a/scan{k}.png", "a", "test"])
    table = load_csv(_manifest(tmp_path / "m.csv", rows, "path,label,split"), None)
    assert table.pixel_dtypes == {"uint8", "uint16"}
    assert resolve_transfer("auto", table) == "float32"
    folder = load_folder(tmp_path / "data", None, None)
    assert folder.pixel_dtypes == {"uint8", "uint16"} and resolve_transfer("auto", folder) == "float32"
    for k in range(3):
        (tmp_path / "data" / "a" / f"scan{k}.png").unlink()
    assert resolve_transfer("auto", load_folder(tmp_path / "data", None, None)) == "uint8"


def test_input_channels_come_from_every_image(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A grey file sorted first among RGB tiles made the model 1-channel and every tile brightness: mixed images
    are 3 channels with a warning that counts both kinds and names one of each."""
    for i in range(4):
        _png(tmp_path / "rgb" / ("ab"[i % 2]) / f"t{i}.png", 40 * i, channels=3)
    _png(tmp_path / "rgb" / "a" / "_grey.png", 9)
    with caplog.at_level(logging.WARNING, logger="medvision"):
        assert not load_folder(tmp_path / "rgb", None, None).grayscale
    assert re.search(r"1 grey and 4 colour images \(e\.g\. a/_grey\.png grey, a/t0\.png colour\)", caplog.text)
    (tmp_path / "rgb" / "a" / "_grey.png").unlink()
    assert not load_folder(tmp_path / "rgb", None, None).grayscale
    for i in range(4):
        _png(tmp_path / "grey" / ("ab"[i % 2]) / f"t{i}.png", 40 * i)
    _png(tmp_path / "grey" / "b" / "x.png", 1, np.uint16)
    caplog.clear()
    assert load_folder(tmp_path / "grey", None, None).grayscale and "colour" not in caplog.text
    manifest = _manifest(tmp_path / "m.csv", [["grey/a/t0.png", "a"], ["rgb/a/t0.png", "b"]], "path,label")
    assert not load_csv(manifest, None).grayscale


def test_one_file_under_two_names_in_a_csv_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    """Relative and absolute, through a link or a hard link: one file, so it is listed once or it could sit in two
    splits (the text of the two names differs, so normalising it found none of these)."""
    for i in range(2):
        _png(tmp_path / "img" / f"{i}.png", i)
    os.symlink(tmp_path / "img" / "0.png", tmp_path / "img" / "link.png")
    os.link(tmp_path / "img" / "0.png", tmp_path / "img" / "hard.png")
    os.symlink("img", tmp_path / "same_folder")
    for second in (str(tmp_path / "img" / "0.png"), "img/link.png", "img/hard.png", "same_folder/0.png"):
        rows = [["img/0.png", "a"], ["img/1.png", "b"], [second, "b"]]
        with pytest.raises(DataSourceError, match=r"m\.csv, line 4: image '.*' is the file listed as 'img/0\.png' "
                                                  r"on line 2"):  # fmt: skip
            load_csv(_manifest(tmp_path / "m.csv", rows, "path,label"), None)


def test_one_slide_under_two_names_in_a_slide_manifest_is_refused(tmp_path: Path) -> None:
    """Slide manifests (training on slides, MIL on features) check file identity as image CSVs do."""
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a.svs").write_bytes(b"slide")
    os.symlink(tmp_path / "slides" / "a.svs", tmp_path / "slides" / "link.svs")
    for second in (str(tmp_path / "slides" / "a.svs"), "slides/link.svs"):
        manifest = _manifest(tmp_path / "m.csv", [["slides/a.svs", "a"], [second, "b"]], "slide_path,label")
        with pytest.raises(DataSourceError, match=r"m\.csv, line 3: slide '.*' is the file listed as "
                                                  r"'slides/a\.svs' on line 2"):  # fmt: skip
            list(slide_rows(manifest, read_manifest(manifest, ("slide_path", "label"))))


def test_npz_labels_map_to_numbered_class_names_by_number(tmp_path: Path) -> None:
    """A run trained on a CSV of classes 0..10 stores them sorted as text; evaluating it on an .npz of the same
    images must read label 2 as class '2', not as the third name ('10')."""
    for k in range(11):
        _png(tmp_path / f"img{k}.png", k)
    manifest = _manifest(tmp_path / "m.csv", [[f"img{k}.png", str(k)] for k in range(11)], "path,label")
    run_classes = load_csv(manifest, None).classes
    assert run_classes[:3] == ["0", "1", "10"]
    images = np.stack([np.full((12, 12), k, np.uint8) for k in range(11)])
    np.savez(tmp_path / "x.npz", test_images=images, test_labels=np.arange(11))
    table = load_npz(tmp_path / "x.npz", run_classes)
    assert [run_classes[i] for i in table.labels] == [str(k) for k in range(11)]
    own = load_npz(tmp_path / "x.npz", None)  # a run trained on the npz itself, evaluated on it
    assert own.classes == [str(k) for k in range(11)]
    assert load_npz(tmp_path / "x.npz", own.classes).labels.tolist() == list(range(11))
    named = [f"c{k}" for k in range(11)]  # names in label order, as the MedMNIST recipes give them
    assert load_npz(tmp_path / "x.npz", named).labels.tolist() == list(range(11))
    with pytest.raises(DataSourceError, match=r"x\.npz: sample npz:test:10 has label 10, which is not one of the "):
        load_npz(tmp_path / "x.npz", [str(k) for k in range(10)])
    with pytest.raises(DataSourceError, match=r"mixes numbers and names"):
        load_npz(tmp_path / "x.npz", ["0", "1", *named[2:]])

"""`medvision export`: ONNX (checker, dynamic batch, metadata, parity, refusal), `score --engine onnxruntime`
(the same rows and provenance as PyTorch, DICOM and PNG), and a MONAI bundle run by MONAI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
monai_bundle = pytest.importorskip("monai.bundle")
from conftest import tiny_recipe  # noqa: E402
from test_dicom_source import make_dicom_folder  # noqa: E402

from medvision.cli import main  # noqa: E402
from medvision.data.dataset import prepare  # noqa: E402
from medvision.data.sources import load_table  # noqa: E402
from medvision.data.transforms import build_transforms  # noqa: E402
from medvision.inference import OrtEngine, load_onnx, load_run  # noqa: E402
from medvision.io.files import sha256  # noqa: E402
from medvision.io.image import read_image_raw, to_channels, to_unit_range  # noqa: E402
from medvision.models.deploy import CalibratedClassifier  # noqa: E402
from medvision.recipe import load_recipe, recipe_from_dict  # noqa: E402
from medvision.runs import ScoringSpec, cache_dir  # noqa: E402
from medvision.tasks.export import ExportError, ExportResult  # noqa: E402
from medvision.tasks.export.monai_bundle import export_monai_bundle  # noqa: E402
from medvision.tasks.export.onnx import export_onnx  # noqa: E402
from medvision.tasks.score import score_folder  # noqa: E402
from medvision.tasks.train import train  # noqa: E402
from medvision.training.build import split_dataset  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def grey16_run(tiles_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny run on 16-bit greyscale PNGs (the tiles' luma): one input channel, batches travel as float32."""
    root = tmp_path_factory.mktemp("grey16")
    with tiles_manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        grey = to_channels(to_unit_range(read_image_raw(tiles_manifest.parent / row["path"])), 1)[..., 0]
        (root / row["path"]).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / row["path"]), np.round(grey * 65535).astype(np.uint16))
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tree = tiny_recipe(root / "manifest.csv", tmp_path_factory.mktemp("export_runs"))
    tree.update(name="grey16", augment={"preset": "none"}, evaluation={"bootstrap": 0, "explain": 0})
    return train(recipe_from_dict(tree))


@pytest.fixture(scope="module")
def rgb_onnx(rgb_run: Path) -> ExportResult:
    return export_onnx(rgb_run)


@pytest.fixture(scope="module")
def dicom_onnx(dicom_run: Path) -> ExportResult:
    return export_onnx(dicom_run, parity_images=8)


def _test_images(run: Path, n: int) -> tuple[torch.Tensor, CalibratedClassifier, ScoringSpec]:
    """n test images of a run exactly as its loader yields them, and its calibrated PyTorch model."""
    recipe, meta, bundle = load_run(run, CPU)
    spec = ScoringSpec.from_run(run, recipe, meta)
    ds = split_dataset(recipe, load_table(recipe.data, recipe.seed, cache_dir(recipe)), bundle, "test", train=False)
    batch = torch.stack([ds[i][0] for i in range(min(n, len(ds)))])
    return batch, CalibratedClassifier(bundle.model, spec.mean, spec.std, spec.temperature).eval(), spec


def _torch_probs(model: CalibratedClassifier, batch: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(batch).numpy()


def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_onnx_rgb_uint8(rgb_run: Path, rgb_onnx: ExportResult) -> None:
    path = rgb_onnx.path
    assert path == rgb_run / "export" / "model.onnx" and path.is_file()
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["probabilities"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8

    record = json.loads(rgb_onnx.record.read_text())
    assert record["sha256"] == sha256(path) and record["model_sha256"] == sha256(rgb_run / "model.safetensors")
    assert record["parity"]["max_abs_diff"] <= 1e-4 and record["parity"]["images"] == rgb_onnx.images > 0
    assert record["parity"]["split"] == "test" and record["parity"]["batch_sizes"] == [1, 16]
    assert rgb_onnx.parity == record["parity"]["max_abs_diff"]
    assert record["dicom_parity"] == {"checked": False, "reason": "the run was trained on PNG/JPEG/TIFF/BMP images, "
                                                                  "not DICOM"}  # fmt: skip
    meta = _metadata(path)
    assert float(meta["parity_max_abs_diff"]) <= 1e-4
    assert json.loads(meta["classes"]) == ["stroma", "tumor"] and meta["input_dtype"] == "uint8"
    assert meta["channels"] == "3" and meta["image_size"] == "32" and meta["positive_class"] == "tumor"
    assert meta["model_sha256"] == record["model_sha256"] and float(meta["temperature"]) > 0
    assert {op["rule"] for op in json.loads(meta["operating_points"])["image"]} == {"youden", "sensitivity",
                                                                                     "specificity"}  # fmt: skip

    engine, spec = load_onnx(path)  # the spec round-trips through the file's metadata
    recipe, run_meta, _ = load_run(rgb_run, CPU)
    assert spec == ScoringSpec.from_run(rgb_run, recipe, run_meta) and spec.transfer == "uint8"
    assert engine.name == "onnxruntime" and engine.input_dtype == np.uint8

    batch, model, _ = _test_images(rgb_run, 5)
    assert batch.dtype == torch.uint8 and len(batch) == 5
    probs = engine.predict(batch.numpy())  # dynamic batch: 5 here, 1 below
    assert probs.dtype == np.float32 and probs.shape == (5, 2)
    np.testing.assert_allclose(probs, _torch_probs(model, batch), atol=1e-4, rtol=0)
    np.testing.assert_allclose(engine.predict(batch[:1].numpy()), probs[:1], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        engine.predict(batch.numpy().astype(np.float32) / 255)


def test_onnx_greyscale_float_from_dicom(dicom_run: Path, dicom_onnx: ExportResult) -> None:
    result = dicom_onnx
    assert result.parity is not None and result.parity <= 1e-4
    dicom = json.loads(result.record.read_text())["dicom_parity"]  # the real DICOM set (tests/test_engine_parity.py)
    if dicom["checked"]:
        assert dicom["max_abs_diff"] <= 1e-4 and dicom["files"] >= 25
    else:
        assert "pydicom-data is not installed" in dicom["reason"]
    engine, spec = load_onnx(result.path)
    assert spec.inputs == "dicom" and spec.in_chans == 1 and spec.transfer == "float32"
    assert engine.input_dtype == np.float32 and engine.input_shape[1:] == [1, spec.image_size, spec.image_size]
    meta = _metadata(result.path)
    assert json.loads(meta["dicom_windows"]) == ["percentile"] and meta["input_dtype"] == "float32"
    assert json.loads(meta["medvision_spec"])["dicom"]["windows"] == ["percentile"]

    batch, model, _ = _test_images(dicom_run, 6)
    assert batch.dtype == torch.float32 and batch.shape[1] == 1
    probs = engine.predict(batch.numpy())
    np.testing.assert_allclose(probs, _torch_probs(model, batch), atol=1e-4, rtol=0)
    half = batch.numpy().astype(np.float16)  # float16 transfer is widened to the graph's float32, value for value
    np.testing.assert_array_equal(engine.predict(half), engine.predict(half.astype(np.float32)))
    assert engine.predict(half[:1]).shape == (1, 2)


def test_failed_parity_writes_nothing(rgb_run: Path, rgb_onnx: ExportResult, tmp_path: Path) -> None:
    assert rgb_onnx.parity is not None  # checked, and any difference at all (even 0) fails a negative limit
    out = tmp_path / "deploy" / "model.onnx"
    out.parent.mkdir()
    shutil.copy(rgb_onnx.path, out)  # an earlier export at the same place must survive a failed one
    before = sha256(out)
    with pytest.raises(ExportError, match=r"parity check failed: on \d+ test images .* > -1"):
        export_onnx(rgb_run, out, atol=-1.0)
    # nothing new: no model.onnx written over it, no record, no staging folder or temporary file left
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"] and sha256(out) == before


def test_load_onnx_names_foreign_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.onnx"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(plain))
    with pytest.raises(ExportError, match=r"plain\.onnx: not a medvision export"):
        load_onnx(plain)
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(ExportError, match=r"notes\.onnx: ONNX Runtime cannot load it"):
        load_onnx(text)
    assert isinstance(OrtEngine(plain).predict(np.zeros((1, 3, 4, 4), np.float32)), np.ndarray)


def _scores(out: Path) -> tuple[dict[tuple[str, str], dict[str, str]], dict[str, object]]:
    with out.open(newline="") as fh:
        rows = {(r["path"], r["frame"]): r for r in csv.DictReader(fh)}
    return rows, json.loads(Path(str(out) + ".json").read_text())


def _same_scores(torch_out: Path, ort_out: Path) -> int:
    """ONNX Runtime's rows are PyTorch's: same files, outcomes, reasons, UIDs and calls; probabilities to 1e-4."""
    ours, ours_record = _scores(torch_out)
    theirs, theirs_record = _scores(ort_out)
    assert list(ours) == list(theirs)  # the same rows in the same order
    assert torch_out.read_text().splitlines()[0] == ort_out.read_text().splitlines()[0]  # the same columns
    thresholds = {"call_youden" if op["rule"] == "youden" else f"call_{op['rule']}_{op['target']:g}": op["threshold"]
                  for op in ours_record["operating_points"]}  # fmt: skip
    ok = 0
    for key, row in ours.items():
        other = theirs[key]
        probs = [c for c in row if c.startswith("prob_")]
        for column, value in row.items():
            if column in probs and row["status"] == "ok":
                assert abs(float(value) - float(other[column])) <= 1e-4, (key, column)
            elif column in thresholds and value != other[column]:  # a call may flip only right at its threshold
                p_pos = [float(row[c]) for c in probs if abs(float(row[c]) - thresholds[column]) <= 1e-4]
                assert p_pos, (key, column, value, other[column])
            else:
                assert value == other[column], (key, column)
        ok += row["status"] == "ok"
    assert ours_record["engine"] == "torch" and theirs_record["engine"] == "onnxruntime"
    assert theirs_record["model_file_sha256"] == sha256(Path(str(theirs_record["model_file"])))
    same = ("model_sha256", "recipe_sha256", "calibration_temperature", "operating_points", "files_found",
            "ok_files", "ok_images", "error_files", "skipped_files", "reconciled", "exit_code", "limits")  # fmt: skip
    for key in same:
        assert ours_record[key] == theirs_record[key], key
    return ok


def test_score_onnxruntime_dicom_same_rows_as_torch(dicom_run: Path, dicom_onnx: ExportResult, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    folder = tmp_path / "incoming"
    make_dicom_folder(folder, per_class=4)  # 8 images, a README.txt and an RT plan
    (folder / "mr" / "empty.dcm").write_bytes(b"")
    ct = (folder / "ct" / "series0" / "img0.dcm").read_bytes()
    (folder / "ct" / "cut.dcm").write_bytes(ct[: len(ct) // 2])
    args = ["score", str(folder), "--out"]
    assert main([*args, str(tmp_path / "torch.csv"), "--model", str(dicom_run), "--workers", "0"]) == 3
    assert main([*args, str(tmp_path / "ort.csv"), "--model", str(dicom_run), "--engine", "onnxruntime",
                 "--workers", "1"]) == 3  # fmt: skip  # RUN_DIR finds RUN_DIR/export/model.onnx
    assert "12 file(s) found: 8 scored (8 image(s)), 2 error(s), 2 skipped" in capsys.readouterr().out
    assert _same_scores(tmp_path / "torch.csv", tmp_path / "ort.csv") == 8
    # the .onnx file alone is enough: its metadata carries the spec
    alone = tmp_path / "model.onnx"
    shutil.copy(dicom_onnx.path, alone)
    summary = score_folder(folder, alone, tmp_path / "alone.csv", engine="onnxruntime", workers=0)
    assert summary.engine == "onnxruntime" and summary.reconciled
    # trained again since the export: the old graph is refused, not used in the new weights' name
    again = tmp_path / "again"
    shutil.copytree(dicom_run, again)
    weights = load_file(again / "model.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, again / "model.safetensors")
    capsys.readouterr()
    assert main([*args, str(tmp_path / "stale.csv"), "--model", str(again), "--engine", "onnxruntime"]) == 2
    assert "was exported from other weights" in capsys.readouterr().err
    assert _same_scores(tmp_path / "torch.csv", tmp_path / "alone.csv") == 8


def test_score_onnxruntime_png_same_rows_as_torch(
    rgb_run: Path, rgb_onnx: ExportResult, tiles_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tiles_manifest.parent
    for engine in ("torch", "onnxruntime"):
        argv = ["score", str(folder), "--model", str(rgb_run), "--out", str(tmp_path / f"{engine}.csv"),
                "--engine", engine, "--workers", "1"]  # fmt: skip
        assert main(argv) == 0
    assert _same_scores(tmp_path / "torch.csv", tmp_path / "onnxruntime.csv") == 72
    no_export = tmp_path / "run_copy"
    shutil.copytree(rgb_run, no_export, ignore=shutil.ignore_patterns("export"))
    capsys.readouterr()
    out = str(tmp_path / "x.csv")
    assert main(["score", str(folder), "--model", str(no_export), "--out", out, "--engine", "onnxruntime"]) == 2
    assert "no exported ONNX model; run `medvision export" in capsys.readouterr().err


def _medvision_probs(run: Path, files: list[Path]) -> np.ndarray:
    """What medvision computes for image files: prepare() (the loader's path) then the calibrated model."""
    recipe, meta, bundle = load_run(run, CPU)
    spec = ScoringSpec.from_run(run, recipe, meta)
    transform = build_transforms(None, spec.image_size, spec.mean, spec.std, normalize=False)
    batch = torch.stack([prepare(read_image_raw(f), recipe.data.intensity, spec.in_chans, transform,
                                 spec.transfer) for f in files])  # fmt: skip
    return _torch_probs(CalibratedClassifier(bundle.model, spec.mean, spec.std, spec.temperature).eval(), batch)


def _run_bundle(bundle: Path, images: Path, out: Path) -> dict[str, np.ndarray]:
    """Runs the bundle with MONAI's own API and reads the probabilities its ClassificationSaver wrote."""
    with pytest.warns(UserWarning, match="from a source you trust"):
        monai_bundle.run(
            config_file=str(bundle / "configs" / "inference.json"), meta_file=str(bundle / "configs" / "metadata.json"),
            logging_file=False, bundle_root=str(bundle), dataset_dir=str(images), output_dir=str(out),
        )  # fmt: skip
    with (out / "predictions.csv").open(newline="") as fh:  # keyed by the path relative to ``images``
        return {Path(row[0]).relative_to(images).as_posix(): np.array([float(v) for v in row[1:]])
                for row in csv.reader(fh)}  # fmt: skip


def _some_tiles(manifest: Path, folder: Path, n: int = 8) -> list[Path]:
    folder.mkdir()
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))[::9][:n]
    return [Path(shutil.copy(manifest.parent / row["path"], folder / Path(row["path"]).name)) for row in rows]


def test_monai_bundle_rgb_runs_in_monai(rgb_run: Path, tiles_manifest: Path, tmp_path: Path) -> None:
    result = export_monai_bundle(rgb_run)
    bundle = rgb_run / "export" / "monai_bundle"
    assert result.path == bundle and result.parity is not None and result.parity <= 1e-4
    for part in ("configs/metadata.json", "configs/inference.json", "models/model.ts", "models/model.pt",
                 "docs/README.md", "LICENSE", "medvision_export.json"):  # fmt: skip
        assert (bundle / part).is_file(), part
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version", "task",
                "description", "authors", "copyright"):  # fmt: skip
        assert meta[key], key
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == 3 and image["spatial_shape"] == [32, 32] and image["dtype"] == "float32"
    assert image["value_range"] == [0, 1] and pred["channel_def"] == {"0": "stroma", "1": "tumor"}
    assert meta["medvision"]["model_sha256"] == sha256(rgb_run / "model.safetensors")
    assert meta["medvision"]["calibration_temperature"] > 0 and meta["medvision"]["positive_class"] == "tumor"
    checks = meta["medvision_checks"]
    assert json.loads(result.record.read_text())["dicom_parity"]["checked"] is False  # an image run: no DICOM set
    assert 0 <= checks["bundle_vs_score_max_abs_diff"] <= 1e-4  # the bundle end to end, checked at export
    assert meta["required_packages_version"]["medvision"]  # the bundle reads with medvision
    assert json.loads((bundle / "configs" / "inference.json").read_text())["preprocessing"]["_target_"] == (
        "medvision.data.bundle_intake.ReadForModel")  # fmt: skip

    files = _some_tiles(tiles_manifest, tmp_path / "incoming")
    written = _run_bundle(bundle, tmp_path / "incoming", tmp_path / "scores")
    assert sorted(written) == sorted(f.name for f in files)
    monai_probs = np.stack([written[f.name] for f in files])
    ours = _medvision_probs(rgb_run, files)
    diff = float(np.abs(monai_probs - ours).max())
    print(f"RGB uint8 bundle vs medvision on {len(files)} tiles: max |dp| = {diff:.2e}")
    assert diff <= 1e-4  # one preprocessing: the bundle reads with medvision's reader


def test_cli_exports_a_greyscale_16_bit_bundle(grey16_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    bundle = tmp_path / "bundle"
    assert main(["export", str(grey16_run), "--format", "monai-bundle", "--out", str(bundle)]) == 0
    printed = capsys.readouterr().out
    assert f"monai-bundle: {bundle}" in printed and "max |p_torchscript - p_torch|" in printed
    assert "the bundle run by MONAI (medvision's reader" in printed and "python -m monai.bundle run" in printed
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 1 and image["dtype"] == "float32" and meta["medvision"]["spec"]["in_chans"] == 1

    manifest = Path(load_recipe(grey16_run / "recipe.yaml").data.path)  # 16-bit greyscale PNGs, as trained on
    files = _some_tiles(manifest, tmp_path / "incoming")
    written = _run_bundle(bundle, tmp_path / "incoming", tmp_path / "scores")
    monai_probs = np.stack([written[f.name] for f in files])
    diff = float(np.abs(monai_probs - _medvision_probs(grey16_run, files)).max())
    assert diff <= 1e-4, diff  # float batches: no 8-bit rounding; the two bilinear resizes agree to ~1e-7 (3e-8 seen)

    assert main(["export", str(tmp_path / "nothing"), "--format", "onnx"]) == 2
    assert "is not a finished medvision run" in capsys.readouterr().err


def test_monai_bundle_of_a_dicom_run_scores_like_score(dicom_run: Path, tmp_path: Path) -> None:
    """A DICOM run's bundle, run by MONAI on a mixed folder of real DICOMs, gives `score`'s rows to 1e-4: one reader."""
    from test_engine_parity import _mixed_folder

    from medvision.tasks.export.common import dicom_parity_files

    files, missing = dicom_parity_files()
    if missing:
        pytest.skip(missing)
    result = export_monai_bundle(dicom_run, tmp_path / "bundle", parity_images=4)
    record = json.loads(result.record.read_text())
    assert record["dicom_parity"]["checked"] and record["dicom_parity"]["max_abs_diff"] <= 1e-4
    assert record["checks"]["bundle_vs_score_max_abs_diff"] <= 1e-4
    assert any(line.startswith("DICOM parity: ") for line in result.checks)

    folder = _mixed_folder(tmp_path / "incoming", files)
    written = _run_bundle(tmp_path / "bundle", folder, tmp_path / "scores")
    score_folder(folder, dicom_run, tmp_path / "score.csv", engine="torch", workers=0)
    with (tmp_path / "score.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(written) == sorted(r["path"] for r in rows)  # every file has its row, readable or not
    probs = [c for c in rows[0] if c.startswith("prob_")]
    compared = 0
    for row in rows:
        bundle_probs = written[row["path"]]
        if row["status"] == "ok":
            assert np.abs(bundle_probs - np.array([float(row[c]) for c in probs])).max() <= 1e-4, row["path"]
            compared += 1
        else:  # an error or skipped row in score is a NaN row in the bundle, never a made-up score
            assert np.isnan(bundle_probs).all(), row["path"]
    assert compared >= 25 and np.isnan(written["cut.dcm"]).all()


def test_monai_bundle_refuses_frame_by_frame_dicom_runs(dicom_run: Path, tmp_path: Path) -> None:
    """One row per file is what a bundle writes; a run that scores each frame as a row is sent to ONNX instead."""
    run = tmp_path / "run"
    shutil.copytree(dicom_run, run, ignore=shutil.ignore_patterns("export"))
    tree = yaml.safe_load((run / "recipe.yaml").read_text())
    tree["data"]["dicom"]["frames"] = "all"
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ExportError, match=r"data.dicom.frames: all.*--format onnx"):
        export_monai_bundle(run, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def _bundle_spec(run: Path, folder: Path, **change: object) -> Path:
    """A bundle's ``configs/metadata.json`` holding the run's real scoring spec with ``change`` applied."""
    from medvision.runs import read_run_json

    spec = json.loads(ScoringSpec.from_run(run, load_recipe(run / "recipe.yaml"), read_run_json(run)).to_json())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{'-'.join(change) or 'good'}.json"
    path.write_text(json.dumps({"medvision": {"spec": {**spec, **change}}}))
    return path


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"intensity": "dtpye"}, "'intensity' is 'dtpye'; expected one of dtype, minmax, percentile"),
        ({"inputs": "DICOM"}, "'inputs' is 'DICOM'; expected one of dicom, images, slides"),
        ({"transfer": "uint16"}, "'transfer' is 'uint16'; expected one of uint8, float16, float32"),
        ({"image_size": "64"}, "'image_size' is '64'; expected a whole number >= 1"),
        ({"image_size": 0}, "'image_size' is 0; expected a whole number >= 1"),
        ({"in_chans": 4}, "'mean' is .*; expected one value per input channel \\(4, in_chans\\)"),
        ({"aggregate": "median"}, "'aggregate' is 'median'; expected one of mean, max, topk, abmil"),
        ({"tta": ["hflip", "shear"]}, "'tta' is .*expected a list of hflip, vflip, rot90"),
        ({"std": [0.0]}, "'std' is \\[0.0\\]; expected positive numbers"),
        ({"dicom": {"windows": ["lung-ish"], "frames": "first"}}, "'dicom': windows is \\['lung-ish'\\].*lung-ish"),
        ({"extra": 1}, "'extra' unknown"),
    ],
)
def test_bundle_reader_refuses_a_damaged_spec_once_naming_file_field_and_value(
    dicom_run: Path, tmp_path: Path, change: dict[str, object], expected: str
) -> None:
    """A hand-edited metadata.json is one error when the bundle's reader is built, not a silently different
    preprocessing or an error row on every file (a bad DICOM window was the latter)."""
    from medvision.data.bundle_intake import ReadForModel

    good = ReadForModel(str(_bundle_spec(dicom_run, tmp_path)))  # the spec the project writes loads
    assert good.spec.inputs == "dicom" and good.spec.in_chans == 1
    bad = _bundle_spec(dicom_run, tmp_path, **change)
    with pytest.raises(ValueError, match=expected) as err:
        ReadForModel(str(bad))
    assert str(err.value).startswith(f"{bad}: scoring spec")

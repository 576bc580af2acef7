"""`medvision export` on the user's own folders and files: what `--out` may replace, bad inputs as user errors
(exit 2), the opset the record states, the stale-ONNX check, and TorchScript bundles of models that
``torch.jit.script`` cannot save (traced, yet still taking uint8 batches and following the input's device)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("monai.bundle")
from conftest import tiny_recipe  # noqa: E402

from medvision.cli import main  # noqa: E402
from medvision.inference import load_scorer  # noqa: E402
from medvision.models.deploy import CalibratedClassifier  # noqa: E402
from medvision.recipe import recipe_from_dict  # noqa: E402
from medvision.runs import RunError  # noqa: E402
from medvision.tasks.export import ExportError  # noqa: E402
from medvision.tasks.export import onnx as onnx_export  # noqa: E402
from medvision.tasks.export.common import open_run  # noqa: E402
from medvision.tasks.export.monai_bundle import TRACED, _torchscript, bundle_metadata, export_monai_bundle  # noqa: E402
from medvision.tasks.export.onnx import export_onnx  # noqa: E402
from medvision.tasks.train import train  # noqa: E402


@pytest.fixture(scope="module")
def run(rgb_run: Path) -> Path:
    """Tiny fine-tuned run on 8-bit RGB tiles (uint8 batches): conftest's, the export tests' too."""
    return rgb_run


@pytest.fixture(scope="module")
def knn_run(tiles_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny ``train.protocol: knn`` run: a k-NN head on frozen features, uint8 batches."""
    tree = tiny_recipe(tiles_manifest, tmp_path_factory.mktemp("safety_runs"), protocol="knn", knn_k=5)
    tree.update(name="tiny_knn", evaluation={"bootstrap": 0, "explain": 0})
    return train(recipe_from_dict(tree))


def _copy(run: Path, to: Path) -> Path:
    return Path(shutil.copytree(run, to, ignore=shutil.ignore_patterns("export")))


def _no_export(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the slow export ran before --out was checked")


def test_bundle_out_replaces_only_an_earlier_bundle(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "victim.txt").write_text("mine")
    before = sorted(p.name for p in run.iterdir())
    with monkeypatch.context() as m:
        m.setattr("medvision.tasks.export.monai_bundle.load_parity_images", _no_export)
        assert main(["export", str(run), "--format", "monai-bundle", "--out", str(exports)]) == 2
        err = capsys.readouterr().err
        assert f"--out {exports} is a folder with other files" in err and "medvision_export.json" in err
        assert (exports / "victim.txt").read_text() == "mine"
        for out, says in ((run, "is the run folder"), (run.parent, "or holds it"), (run / "plots", "not below"),
                          (run / "export", "not below")):  # fmt: skip
            assert main(["export", str(run), "--format", "monai-bundle", "--out", str(out)]) == 2
            assert says in capsys.readouterr().err, out
        assert sorted(p.name for p in run.iterdir()) == before  # the run is intact
    bundle = tmp_path / "bundle"
    export_monai_bundle(run, bundle, parity_images=2)
    (bundle / "docs" / "stale.txt").write_text("from the first export")
    export_monai_bundle(run, bundle, parity_images=2)  # an earlier bundle is replaced
    assert (bundle / "models" / "model.ts").is_file() and not (bundle / "docs" / "stale.txt").exists()


def test_onnx_out_refuses_what_is_not_an_earlier_export(run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(onnx_export, "_torch_export", _no_export)
    notes = tmp_path / "notes.txt"
    notes.write_text("notes")
    other = tmp_path / "other.onnx"
    other.write_text("not onnx")
    (tmp_path / "dir.onnx").mkdir()
    (tmp_path / "dir.onnx" / "model.onnx").mkdir()
    cases = {notes: f"{notes} is an existing file, not a folder", other: f"--out {other} is an existing file that "
             "is not a medvision ONNX export", tmp_path / "dir.onnx": "model.onnx is an existing folder"}  # fmt: skip
    for out, says in cases.items():
        assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 2, out
        assert says in capsys.readouterr().err, out
    assert notes.read_text() == "notes" and other.read_text() == "not onnx"


def test_corrupt_weights_are_a_user_error(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = _copy(run, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["export", str(broken), "--format", "onnx"]) == 2
    assert f"{broken / 'model.safetensors'}: not a readable safetensors file" in capsys.readouterr().err


def test_opset_outside_what_the_exporter_writes_is_refused(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_export, "_torch_export", _no_export)
    for opset in (17, onnx.defs.onnx_opset_version() + 2):  # torch.onnx wrote 18 for both, and the record said 17/30
        with pytest.raises(ExportError, match=rf"ONNX opset {opset}: expected 18 .* to"):
            export_onnx(run, opset=opset)


def test_record_states_the_opset_the_file_imports(run: Path, tmp_path: Path) -> None:
    result = export_onnx(run, tmp_path / "m.onnx", parity_images=2, opset=19)
    written = [o.version for o in onnx.load(str(result.path)).opset_import if o.domain == ""]
    assert json.loads(result.record.read_text())["opset"] == written[0] == 19


def test_stale_onnx_found_through_its_record(run: Path, tmp_path: Path) -> None:
    """An export written into the run (``--out RUN``) is refused once the run's weights change; an unrelated
    ``model.safetensors`` two folders up from a copied file is never taken for its run."""
    copy = _copy(run, tmp_path / "run")
    result = export_onnx(copy, copy, parity_images=2)
    assert result.path == copy / "model.onnx"
    load_scorer(copy / "model.onnx", "onnxruntime")  # the same weights: loads

    far = tmp_path / "far" / "sub"
    far.mkdir(parents=True)
    shutil.copy(result.path, far / "model.onnx")  # without its record: no run to check against
    save_file({"x": torch.zeros(1)}, str(tmp_path / "far" / "model.safetensors"))
    load_scorer(far / "model.onnx", "onnxruntime")

    state = load_file(str(copy / "model.safetensors"))  # train again: other weights
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1.0
    save_file(state, str(copy / "model.safetensors"))
    with pytest.raises(RunError, match="was exported from other weights"):
        load_scorer(copy / "model.onnx", "onnxruntime")


class _Unsaveable(nn.Module):
    """Scripts, but ``torch.jit.save`` fails on the ignored Python call (as timm's mobilevitv2_050 does)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    @torch.jit.ignore
    def pool(self, x):  # unannotated: TorchScript cannot resolve string annotations of an ignored method
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))


def test_torchscript_falls_back_to_a_trace_that_takes_uint8() -> None:
    torch.manual_seed(0)
    model = CalibratedClassifier(_Unsaveable(), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), temperature=1.5).eval()
    source = SimpleNamespace(model=model, example=lambda: torch.zeros((2, 3, 8, 8), dtype=torch.uint8),
                             recipe=SimpleNamespace(model=SimpleNamespace(name="unsaveable")))  # fmt: skip
    module, how = _torchscript(source)  # type: ignore[arg-type]
    assert how == TRACED
    raw = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        for batch in (raw, raw.float() / 255):
            assert torch.equal(module(batch), model(batch)), batch.dtype


def test_knn_trace_follows_the_input_device(knn_run: Path) -> None:
    source = open_run(knn_run)
    with torch.no_grad():
        traced = torch.jit.trace(source.model, source.example().float(), check_trace=False)
    graph = str(traced.inlined_graph)
    assert "scatter_add" in graph and "Device = prim::Constant" not in graph  # was "cpu", frozen: failed on cuda:0


def test_knn_bundle_is_scripted_and_takes_uint8(knn_run: Path, tmp_path: Path) -> None:
    result = export_monai_bundle(knn_run, tmp_path / "bundle", parity_images=4)
    assert json.loads(result.record.read_text())["torchscript"] == "torch.jit.script"  # was a float32 trace
    source = open_run(knn_run)
    net = torch.jit.load(str(tmp_path / "bundle" / "models" / "model.ts"))
    raw = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((net(raw) - source.model(raw)).abs().max()) <= 1e-6  # the float32 trace was 0.16 off


def test_dicom_windows_name_the_channels(run: Path) -> None:
    source = open_run(run)
    dicom = {"windows": ["lung", "mediastinum", {"center": 400, "width": 1800}], "voi_function": None,
             "frames": "first"}  # fmt: skip
    source.spec = dataclasses.replace(source.spec, inputs="dicom", dicom=dicom, transfer="float32")
    meta = bundle_metadata(source)
    channels = meta["network_data_format"]["inputs"]["image"]["channel_def"]
    assert channels == {"0": "window lung (center -600, width 1500)", "1": "window mediastinum (center 50, width 350)",
                        "2": "window (center 400, width 1800)"}  # fmt: skip
    assert "RGB" not in meta["data_type"] and "one VOI window each" in meta["data_type"]
    source.spec = dataclasses.replace(source.spec, dicom={**dicom, "windows": ["brain"]})
    channels = bundle_metadata(source)["network_data_format"]["inputs"]["image"]["channel_def"]
    assert set(channels.values()) == {"window brain (center 40, width 80)"} and len(channels) == 3

"""``medvision export RUN --format monai-bundle``: a MONAI bundle that MONAI runs on a folder of files.

Layout (the MONAI Bundle specification)::

    monai_bundle/
      configs/metadata.json    bundle metadata: versions, network_data_format, classes, operating points, the spec
      configs/inference.json   medvision's reader + SupervisedEvaluator + ClassificationSaver
      configs/logging.conf     console logging, as MONAI's model-zoo bundles have
      models/model.ts          TorchScript of CalibratedClassifier (metadata and inference.json inside too)
      models/model.pt          its state dict (needs timm + medvision to instantiate; model.ts needs neither)
      docs/README.md           how to run it, what it expects, what was checked
      LICENSE
      medvision_export.json    the export record

``python -m monai.bundle run --config_file configs/inference.json --dataset_dir DIR`` (run in the
bundle folder) scores every file under DIR and writes ``eval/predictions.csv``: one row per file, the
path then the calibrated probability of each class in metadata order (NaN for a file that cannot be read).

The preprocessing is medvision's own: ``inference.json`` names :mod:`medvision.data.bundle_intake`,
whose transform reads each file with :func:`medvision.data.intake.read_file` and the run's
:class:`~medvision.runs.ScoringSpec` (kept in ``metadata.json``), as ``medvision score`` and the ONNX
path do. So images and DICOM runs both export (DICOM windows, MONOCHROME1, frames and all), and the
bundle needs medvision installed where it runs (``required_packages_version`` says so). Export checks
the bundle end to end: the run's own test files through the bundle's parsed ``preprocessing`` and its
TorchScript network against ``read_file`` and the PyTorch model, and for DICOM runs every file of the
real DICOM parity set (:func:`~medvision.tasks.export.common.check_dicom_parity`), each within 1e-4.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import cv2
import ignite
import monai
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import save_net_with_metadata

import medvision
from medvision.data.bundle_intake import network_input
from medvision.data.dicom_source import DicomLoader
from medvision.data.intake import ReadConfig, read_file
from medvision.data.table import FileLoader
from medvision.io.dicom import Window, parse_window
from medvision.io.files import sha256
from medvision.models.deploy import RawBatchInput
from medvision.runs import ScoringSpec
from medvision.tasks.export.common import (
    BUNDLE_RECORD,
    PARITY_ATOL,
    DicomParity,
    ExportError,
    ExportResult,
    ExportSource,
    ParityImages,
    check_bundle_out,
    check_dicom_parity,
    check_parity,
    export_versions,
    load_parity_images,
    open_run,
    parity_line,
    quiet,
    replace_dir,
    spec_summary,
    staging_dir,
    torch_probabilities,
    write_json,
)

log = logging.getLogger("medvision")

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
_NVIMGCODEC_LOG = "monai.data.nvimgcodec_pydicom_plugin"  # LoadImage builds MONAI's GPU DICOM reader too, and it warns
TRACED = "torch.jit.trace at float32, in a scripted RawBatchInput that takes uint8 0..255 or float in [0, 1]"
"""How ``models/model.ts`` was made when ``torch.jit.script`` cannot hold the model (recorded as ``torchscript``)."""
NETWORK_INPUT = "NCHW uint8 0..255 or float in [0, 1] (the bundle's reader feeds float32 in [0, 1])"
"""What ``models/model.ts`` takes, scripted or traced (recorded in ``metadata.json`` as ``network_input``)."""
RUN_COMMAND = "python -m monai.bundle run --config_file configs/inference.json --dataset_dir DIR --output_dir OUT"


def export_monai_bundle(
    run_dir: Path, out: Path | None = None, parity_images: int = 32, atol: float = PARITY_ATOL
) -> ExportResult:
    """Writes the run as a MONAI bundle folder (default ``RUN/export/monai_bundle``), checked, or raises.

    Kept only if the TorchScript model gives the PyTorch model's probabilities within ``atol`` on
    ``parity_images`` of the run's test images, the whole bundle (its parsed preprocessing, then its
    network) gives ``medvision score``'s probabilities within ``atol`` on the same files, and, for a
    DICOM run, on every file of the DICOM parity set; otherwise :class:`ExportError` is raised and an
    earlier bundle at ``out`` stays as it was.

    Examples:
        >>> result = export_monai_bundle(Path("runs/demo"))
        >>> # cd runs/demo/export/monai_bundle && python -m monai.bundle run --config_file configs/inference.json \\
        >>> #     --dataset_dir /data/incoming --output_dir /tmp/scores
    """
    source = open_run(run_dir)
    spec = source.spec
    if spec.inputs == "dicom" and spec.dicom.get("frames") == "all":
        raise ExportError(
            f"{source.run_dir} scores every frame of a file as its own row (data.dicom.frames: all); a MONAI bundle "
            "gives one row per file. Export it with --format onnx and score with `medvision score --engine onnxruntime`"
        )
    out = Path(out) if out is not None else source.run_dir / "export" / "monai_bundle"
    check_bundle_out(out, source.run_dir)  # the bundle replaces the folder: refuse anything but an earlier one
    images = load_parity_images(source, parity_images)
    inference = inference_config()
    metadata = bundle_metadata(source)
    checks = []
    with staging_dir(out) as stage:
        for sub in ("configs", "models", "docs"):
            (stage / sub).mkdir()
        (stage / "configs" / "inference.json").write_text(json.dumps(inference, indent=4) + "\n")
        (stage / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n")  # the reader's spec
        scripted, how = _torchscript(source)
        ts_path = stage / "models" / "model.ts"
        extra = {"inference.json": json.dumps(inference).encode()}
        with quiet():
            save_net_with_metadata(scripted, str(ts_path), meta_values=metadata, more_extra_files=extra)
            loaded = torch.jit.load(str(ts_path), map_location="cpu").eval()
        torch.save(source.model.state_dict(), stage / "models" / "model.pt")
        diff = bundle_diff = None
        if images is not None:
            reference = torch_probabilities(source.model, images.batch)
            exported = torch_probabilities(loaded, network_input(images.batch))  # float32, as the bundle feeds it
            diff = check_parity("torchscript", exported, reference, atol, images)
            bundle_diff = _check_bundle(stage, loaded, source, images, atol)
        # the bundle's network on the DICOM parity set read by read_file, which is the bundle's own reader
        dicom = check_dicom_parity("torchscript", lambda batch: torch_probabilities(loaded, network_input(
            torch.from_numpy(batch))), source, atol)  # fmt: skip
        metadata["medvision_checks"] = _checks_record(diff, bundle_diff, images, atol, dicom)
        metadata["medvision"].update(torchscript=how, network_input=NETWORK_INPUT)
        (stage / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n")
        (stage / "docs" / "README.md").write_text(readme(source, metadata["medvision_checks"], how))
        (stage / "configs" / "logging.conf").write_text(_LOGGING)
        (stage / "LICENSE").write_text(_LICENSE.format(name=spec.name))
        record = _record(source, stage, how, metadata["medvision_checks"])
        write_json(stage / BUNDLE_RECORD, record)
        replace_dir(stage, out)
    checks.append(f"models/model.ts: TorchScript ({how}) of the calibrated model")
    checks.append(parity_line("torchscript", diff, images, atol))
    if images is not None and bundle_diff is not None:
        checks.append(f"the bundle run by MONAI (medvision's reader, TorchScript network) vs `medvision score` on "
                      f"{len(images)} {images.split} files: max |dp| = {bundle_diff:.2e}")  # fmt: skip
    if dicom.diffs:
        checks.append(f"DICOM parity: {len(dicom.diffs)} real DICOM files, max |dp| = {dicom.max_abs_diff:.2e} "
                      f"(worst {dicom.worst})")  # fmt: skip
    checks.append(f"run it: cd {out} && {RUN_COMMAND}")
    log.info("exported %s", out)
    return ExportResult("monai-bundle", out, out / BUNDLE_RECORD, diff, len(images) if images else 0,
                        images.split if images else None, checks)  # fmt: skip


def inference_config() -> dict[str, Any]:
    """``configs/inference.json``: files under ``dataset_dir`` -> ``output_dir/predictions.csv``.

    Reading and preprocessing are :mod:`medvision.data.bundle_intake`'s (medvision's own reader and the
    run's spec from ``metadata.json``); MONAI runs the evaluator and writes the CSV.
    """
    intake = "medvision.data.bundle_intake"
    return {
        "imports": ["$import torch", "$import monai", f"$import {intake} as bundle_intake"],
        "bundle_root": ".",
        "dataset_dir": "/workspace/data",
        "output_dir": "$@bundle_root + '/eval'",
        "output_filename": "predictions.csv",
        "metadata_file": "$@bundle_root + '/configs/metadata.json'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "datalist": "$bundle_intake.datalist(@dataset_dir)",
        "network": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
        "preprocessing": {"_target_": f"{intake}.ReadForModel", "metadata_file": "@metadata_file"},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 16,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": f"{intake}.MarkUnread"},
        "handlers": [
            {
                "_target_": "ClassificationSaver",
                "output_dir": "@output_dir",
                "filename": "@output_filename",
                "batch_transform": "$lambda batch: [item['image'].meta for item in batch]",
                "output_transform": "$monai.handlers.from_engine(['pred'])",
            }
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "run": ["$@evaluator.run()"],
    }


def bundle_metadata(source: ExportSource) -> dict[str, Any]:
    """``configs/metadata.json`` in the MONAI bundle schema, with medvision's decision and provenance added."""
    spec = source.spec
    summary = spec_summary(spec)
    k, c, size = len(spec.classes), spec.in_chans, spec.image_size
    uint8 = spec.transfer == "uint8"
    channel_def, read_as = channels(spec)
    kind = "DICOM" if spec.inputs == "dicom" else "PNG/JPEG/TIFF/BMP"
    return {
        "schema": SCHEMA,
        "version": "1.0.0",
        "changelog": {"1.0.0": f"exported by medvision {spec.medvision_version} from run {spec.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"pytorch-ignite": ignite.__version__, "medvision": medvision.__version__},
        "name": spec.name,
        "task": f"Image classification into {k} classes: {', '.join(spec.classes)}",
        "description": (
            f"{source.recipe.model.name} (timm) fine-tuned by medvision run {spec.name}. Reads {kind} files with "
            f"medvision's reader as the run was trained, resizes them to {size} x {size} and returns calibrated "
            f"probabilities (temperature {spec.temperature:.4g}, fitted on validation) for {spec.classes}."
        ),
        "authors": f"medvision run {spec.name}",
        "copyright": "See LICENSE",
        "data_source": f"{source.recipe.data.source}: {Path(source.recipe.data.path).name}",
        "data_type": f"{kind} files, read as {read_as}",
        "image_classes": f"{c} channel data in [0, 1] (float32){', on 8-bit levels' if uint8 else ''}",
        "label_classes": ", ".join(f"{i}: {name}" for i, name in enumerate(spec.classes)),
        "pred_classes": f"{k} calibrated probabilities summing to 1, in label order",
        "intended_use": "Research use; not validated for clinical decisions.",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "n/a",
                    "num_channels": c,
                    "spatial_shape": [size, size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": channel_def,
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": k,
                    "spatial_shape": [1, k],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {str(i): name for i, name in enumerate(spec.classes)},
                }
            },
        },
        "medvision": {
            "model": source.recipe.model.name,
            "model_sha256": spec.model_sha256,
            "calibration_temperature": spec.temperature,
            "positive_class": summary["positive_class"],
            "operating_points": summary["operating_points"],
            "intensity": spec.intensity,
            "spec": json.loads(spec.to_json()),
        },
    }


def channels(spec: ScoringSpec) -> tuple[dict[str, str], str]:
    """``channel_def`` of the network input and what the files are read as.

    A DICOM run with as many windows as channels has one window per channel (``data.dicom.windows: [lung,
    mediastinum, bone]`` is not RGB), each named with its center/width; one window is replicated into every
    channel. Image runs: grey, RGB, or numbered channels.
    """
    c = spec.in_chans
    windows = [parse_window(w) for w in spec.dicom.get("windows") or ["file"]] if spec.inputs == "dicom" else []
    if windows and (len(windows) == c or len(windows) == 1):
        names = [_window_name(w) for w in windows]
        if len(windows) == c > 1:
            listed = "; ".join(names)
            return {str(i): name for i, name in enumerate(names)}, f"{c} channels, one VOI window each: {listed}"
        copies = f", in {c} identical channels" + (" (colour DICOMs as R, G, B)" if c == 3 else "") if c > 1 else ""
        return {str(i): names[0] for i in range(c)}, f"greyscale images, {names[0]}{copies}"
    if c == 1:
        return {"0": "grey"}, "greyscale images"
    if c == 3:
        return {"0": "R", "1": "G", "2": "B"}, "RGB images"
    return {str(i): f"channel {i}" for i in range(c)}, f"{c}-channel images"


def _window_name(window: Window) -> str:
    if window.kind in ("preset", "explicit"):
        named = f"{window.name} " if window.kind == "preset" else ""
        return f"window {named}(center {window.center:g}, width {window.width:g})"
    if window.kind == "file":
        return f"the file's own VOI window (entry {window.index}; the percentile range where it has none)"
    return "window from the image's 0.5th-99.5th percentiles"


def _torchscript(source: ExportSource) -> tuple[torch.jit.ScriptModule, str]:
    """``torch.jit.script`` (keeps the uint8/float branch), else a trace at float32 inside :class:`RawBatchInput`,
    which takes that branch again.

    Scripting can succeed and still give a module that cannot be saved: a ``@torch.jit.ignore`` method stays a
    Python call (timm's mobilevitv2_050: "Could not export Python function call '_forward_cross_attn'"). So a
    scripted module counts only once it has been saved and loaded back; otherwise the model is traced.
    """
    try:
        with quiet():
            scripted = torch.jit.script(source.model)
            _save_and_load(scripted)
        return scripted, "torch.jit.script"
    except Exception as err:  # TorchScript rejects some Python constructs; a trace needs none of them
        reason = str(err).strip().split("\n")[0]
        log.info("torch.jit.script failed (%s: %s); tracing at float32", type(err).__name__, reason)
    try:
        with torch.no_grad(), quiet():
            traced = torch.jit.trace(source.model, source.example().float(), check_trace=False)
            wrapped = torch.jit.script(RawBatchInput(traced))
            _save_and_load(wrapped)
        return wrapped, TRACED
    except Exception as err:
        raise ExportError(f"TorchScript cannot hold {source.recipe.model.name}: {type(err).__name__}: {err}") from None


def _save_and_load(module: torch.jit.ScriptModule) -> None:
    """Raises what ``torch.jit.save`` or ``torch.jit.load`` raise for ``module`` (in memory)."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    torch.jit.load(buffer, map_location="cpu")


def _parity_files(images: ParityImages, scratch: Path) -> list[Path]:
    """The parity images' own files; for in-memory tables (npz) the arrays written losslessly as PNG."""
    ds = images.dataset
    indices = [int(i) for i in ds.indices[: len(images)]]
    loader = ds.table.loader
    if isinstance(loader, (FileLoader, DicomLoader)):
        return [Path(loader.paths[i]) for i in indices]
    return [_write_png(scratch / f"{i}.png", loader(i)) for i in indices]


def _write_png(path: Path, raw: np.ndarray) -> Path:
    if raw.ndim == 3 and raw.shape[2] in (3, 4):
        raw = raw[:, :, [2, 1, 0, 3][: raw.shape[2]]]  # OpenCV writes BGR(A)
    if not cv2.imwrite(str(path), raw):
        raise ExportError(f"{path}: OpenCV could not write a {raw.dtype} {raw.shape} check image")
    return path


def _check_bundle(
    bundle: Path, network: torch.jit.ScriptModule, source: ExportSource, images: ParityImages, atol: float
) -> float:
    """The bundle end to end (its ``preprocessing`` as MONAI's ConfigParser builds it, then its network) against
    ``medvision score``'s path (:func:`~medvision.data.intake.read_file`, then the PyTorch model) on the parity
    images' files; the largest difference, or :class:`ExportError` naming the worst file."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    cfg = ReadConfig(source.spec)
    with tempfile.TemporaryDirectory(dir=bundle) as scratch:
        preprocess = parser.get_parsed_content("preprocessing")
        ours, theirs, names = [], [], []
        for path in _parity_files(images, Path(scratch)):
            item = preprocess({"image": str(path)})["image"]
            if item.meta["medvision_status"] != "ok":
                raise ExportError(f"the bundle cannot read the run's own file {path}: {item.meta['medvision_reason']}")
            theirs.append(torch.as_tensor(item).clone())
            result = read_file(path, path.name, cfg)
            if result.status != "ok":
                raise ExportError(f"medvision cannot read the run's own file {path}: {result.reason}")
            ours.append(torch.from_numpy(result.arrays[0]))
            names.append(str(path))
    reference = torch_probabilities(source.model, torch.stack(ours))
    exported = torch_probabilities(network, torch.stack(theirs))
    per_file = np.abs(exported.astype(np.float64) - reference).max(axis=1)
    worst = int(per_file.argmax())
    if not per_file[worst] <= atol:
        raise ExportError(
            f"the bundle run by MONAI gives other probabilities than `medvision score` on the run's own "
            f"{images.split} images: max |dp| = {per_file[worst]:.3g} > {atol:g} (worst: {names[worst]}); "
            "it was not written"
        )
    return float(per_file[worst])


def _checks_record(
    diff: float | None, bundle_diff: float | None, images: ParityImages | None, atol: float, dicom: DicomParity
) -> dict[str, Any]:
    if images is None:
        return {"checked": False, "reason": "--parity-images 0", "dicom_parity": dicom.record(atol)}
    return {
        "images": len(images),
        "split": images.split,
        "torchscript_vs_torch_max_abs_diff": diff,
        "atol": atol,
        "bundle_vs_score_max_abs_diff": bundle_diff,
        "dicom_parity": dicom.record(atol),
    }


def _record(source: ExportSource, stage: Path, how: str, checks: dict[str, Any]) -> dict[str, Any]:
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    return {
        "format": "monai-bundle",
        "run": str(source.run_dir.resolve()),
        "model_sha256": source.spec.model_sha256,
        "torchscript": how,
        "checks": {key: value for key, value in checks.items() if key != "dicom_parity"},
        "dicom_parity": checks["dicom_parity"],
        "files": {str(p.relative_to(stage)): sha256(p) for p in files},
        "versions": export_versions("monai", "ignite"),
    }


_LOGGING = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

_LICENSE = """The weights in this bundle were trained by medvision run {name}. No licence was recorded for them
or for the data they were trained on: ask the run's owner before sharing the bundle.
"""


def readme(source: ExportSource, checks: dict[str, Any], how: str = "torch.jit.script") -> str:
    """``docs/README.md``: what the bundle expects, how to run it, what was checked at export."""
    spec = source.spec
    points = "\n".join(
        f"- {level}: {op['rule']}{'' if op.get('target') is None else ' ' + str(op['target'])} -> threshold "
        f"{op['threshold']}" for level, ops in (spec.decision.get("points") or {}).items() for op in ops
    )  # fmt: skip
    positive = spec_summary(spec)["positive_class"]
    kind = "DICOM files" if spec.inputs == "dicom" else "PNG/JPEG/TIFF/BMP images"
    checked = (
        f"On {checks['images']} {checks['split']} images of the run: TorchScript vs PyTorch max |dp| = "
        f"{checks['torchscript_vs_torch_max_abs_diff']:.2e}; this bundle run by MONAI vs `medvision score` "
        f"max |dp| = {checks['bundle_vs_score_max_abs_diff']:.2e}."
        if checks.get("images")
        else "Not checked at export (--parity-images 0)."
    )
    dicom = checks["dicom_parity"]
    if dicom.get("checked"):
        checked += (f" DICOM parity set: {dicom['files']} real DICOM files ({dicom['frames']} frames), max |dp| = "
                    f"{dicom['max_abs_diff']:.2e}.")  # fmt: skip
    return f"""# {spec.name}

{source.recipe.model.name} fine-tuned by medvision on {len(spec.classes)} classes: {", ".join(spec.classes)}.
Exported with `medvision export --format monai-bundle` (medvision {spec.medvision_version}); weights SHA-256
`{spec.model_sha256}`.

## Run it

Needs `pip install medvision[export]` (medvision reads the files; MONAI runs the rest). From this
folder, on a folder of files (searched recursively):

```bash
{RUN_COMMAND}
```

or from anywhere, adding `--meta_file BUNDLE/configs/metadata.json --bundle_root BUNDLE` with
`--config_file BUNDLE/configs/inference.json`. Without `--output_dir` the results go to `eval/`.
In Python: `monai.bundle.run(config_file=..., meta_file=..., bundle_root=..., dataset_dir=..., output_dir=...)`.

`OUT/predictions.csv` has one row per file and no header: the file's path, then the calibrated
probability of each class in this order: {", ".join(spec.classes)}. A file that cannot be read, or
is not an input, gets NaN probabilities and a warning in the log with its reason.

## Input

{kind} with the kind of content the run was trained on. Each file is read by medvision's own
reader (`medvision.data.bundle_intake.ReadForModel`, the code `medvision score` runs) with the run's
settings from `configs/metadata.json`: scaled to [0, 1] ({spec.intensity}), made
{spec.in_chans}-channel, resized to {spec.image_size} x {spec.image_size}. The model
(`models/model.ts`: {how}) takes that batch ({NETWORK_INPUT}) and applies the backbone's normalisation,
test-time augmentation ({", ".join(spec.tta) or "none"}) and the calibration itself. The files are
read in MONAI's process: for untrusted folders, where a decoder may crash or hang, use
`medvision score`, which isolates each file.

## Output and decision

Probabilities are calibrated by temperature scaling ({spec.temperature:.4g}, fitted on the run's
validation split). Operating points chosen on validation for the class `{positive}`:

{points or "(none recorded)"}

## Checked at export

{checked}

Research use; not validated for clinical decisions.
"""

"""``medvision export RUN --format monai-bundle``: a MONAI bundle that MONAI runs on a folder of images.

Layout (the MONAI Bundle specification)::

    monai_bundle/
      configs/metadata.json    bundle metadata: versions, network_data_format, classes, operating points
      configs/inference.json   MONAI transforms + SupervisedEvaluator + ClassificationSaver
      configs/logging.conf     console logging, as MONAI's model-zoo bundles have
      models/model.ts          TorchScript of CalibratedClassifier (metadata and inference.json inside too)
      models/model.pt          its state dict (needs timm + medvision to instantiate; model.ts needs neither)
      docs/README.md           how to run it, what it expects, what was checked
      LICENSE
      medvision_export.json    the export record

``python -m monai.bundle run --config_file configs/inference.json --dataset_dir DIR`` (run in the
bundle folder) scores every PNG/JPEG/TIFF/BMP under DIR and writes ``eval/predictions.csv``: one
row per file, the path then the calibrated probability of each class in metadata order.

The preprocessing is MONAI's transforms, chosen to reproduce :func:`medvision.data.dataset.prepare`:
PILReader at native depth in (H, W) order, channel first, [0, 1] by the training images' bit depth
(or per-image min-max / percentiles, as the recipe's ``data.intensity`` says), medvision's channel
rule (grey replicated, alpha dropped, RGB to grey by ITU-R 601 luma; a one-line ``Lambdad``, as
MONAI has no such transform), bilinear ``Resized`` (half-pixel centres, no antialiasing, as OpenCV's
INTER_LINEAR), and rounding to 8-bit levels when the run's batches travel as uint8. The model gets
float32 in [0, 1] either way (MONAI's tools, e.g. ``verify_net_in_out``, make float test inputs only);
the TorchScript module divides uint8 batches by 255 and passes float ones through. Export checks it on
the run's own images: every pixel within one 8-bit level of medvision's (exact ties of the two
resize implementations' rounding can fall either way), float runs within 1e-5.

Runs trained on DICOM are refused: MONAI's DICOM reader does not apply medvision's VOI windows
and MONOCHROME1 handling, so a bundle would score other pixels than the run was trained on. Use
``--format onnx`` and ``medvision score --engine onnxruntime`` for them. The DICOM parity set of
:func:`~medvision.tasks.export.common.check_dicom_parity` therefore never runs for a bundle: its
record says so (``dicom_parity``: not checked, with the reason) rather than claiming a pass. Runs
on 16-bit colour images are refused too: PIL (MONAI's PNG reader here) reduces 48-bit RGB to 8 bits.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import cv2
import ignite
import monai
import numpy as np
import PIL
import torch
from monai.bundle import ConfigParser
from monai.data import save_net_with_metadata

from medvision.data.table import FileLoader
from medvision.io.files import sha256
from medvision.io.image import IMAGE_SUFFIXES
from medvision.runs import ScoringSpec
from medvision.tasks.export.common import (
    PARITY_ATOL,
    DicomParity,
    ExportError,
    ExportResult,
    ExportSource,
    ParityImages,
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
RUN_COMMAND = "python -m monai.bundle run --config_file configs/inference.json --dataset_dir DIR --output_dir OUT"


def export_monai_bundle(
    run_dir: Path, out: Path | None = None, parity_images: int = 32, atol: float = PARITY_ATOL
) -> ExportResult:
    """Writes the run as a MONAI bundle folder (default ``RUN/export/monai_bundle``), checked, or raises.

    Kept only if the TorchScript model gives the PyTorch model's probabilities within ``atol`` on
    ``parity_images`` of the run's test images, and the bundle's MONAI preprocessing reproduces
    medvision's on the same image files (see the module docstring); otherwise :class:`ExportError`
    is raised and an earlier bundle at ``out`` stays as it was.

    Examples:
        >>> result = export_monai_bundle(Path("runs/demo"))
        >>> # cd runs/demo/export/monai_bundle && python -m monai.bundle run --config_file configs/inference.json \\
        >>> #     --dataset_dir /data/tiles --output_dir /tmp/scores
    """
    source = open_run(run_dir)
    spec = source.spec
    if spec.inputs == "dicom":
        windows = ", ".join(map(str, spec.dicom.get("windows") or ["file"]))
        raise ExportError(
            f"{source.run_dir} was trained on DICOM (windows: {windows}); a MONAI bundle would read the files "
            "with MONAI's DICOM reader, which applies neither these windows nor medvision's MONOCHROME1 and frame "
            "handling, and so would score other pixels. --format monai-bundle exports runs trained on "
            "PNG/JPEG/TIFF/BMP images only; export this run with --format onnx and score with "
            "`medvision score --engine onnxruntime`"
        )
    out = Path(out) if out is not None else source.run_dir / "export" / "monai_bundle"
    images = load_parity_images(source, parity_images)
    max_value = _bit_depth_max(source, images)
    inference = inference_config(spec, max_value)
    metadata = bundle_metadata(source, max_value)
    checks = []
    with staging_dir(out) as stage:
        for sub in ("configs", "models", "docs"):
            (stage / sub).mkdir()
        (stage / "configs" / "inference.json").write_text(json.dumps(inference, indent=4) + "\n")
        scripted, how = _torchscript(source)
        ts_path = stage / "models" / "model.ts"
        extra = {"inference.json": json.dumps(inference).encode()}
        with quiet():
            save_net_with_metadata(scripted, str(ts_path), meta_values=metadata, more_extra_files=extra)
            loaded = torch.jit.load(str(ts_path), map_location="cpu").eval()
        torch.save(source.model.state_dict(), stage / "models" / "model.pt")
        diff = pixels = bundle_diff = None
        if images is not None:
            reference = torch_probabilities(source.model, images.batch)
            exported = torch_probabilities(loaded, bundle_input(images.batch))  # what the bundle feeds it
            diff = check_parity("torchscript", exported, reference, atol, images)
            monai_batch = _monai_preprocess(stage, images)
            pixels = _check_pixels(spec, monai_batch, images)
            bundle_diff = float(np.abs(torch_probabilities(loaded, monai_batch) - reference).max())
        # the bundle's network on medvision-read DICOM frames; skipped with its reason, as DICOM runs are refused
        dicom = check_dicom_parity("torchscript", lambda batch: torch_probabilities(loaded, bundle_input(
            torch.from_numpy(batch))), source, atol)  # fmt: skip
        metadata["medvision_checks"] = _checks_record(diff, pixels, bundle_diff, images, atol, dicom)
        (stage / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n")
        (stage / "docs" / "README.md").write_text(readme(source, max_value, metadata["medvision_checks"]))
        (stage / "configs" / "logging.conf").write_text(_LOGGING)
        (stage / "LICENSE").write_text(_LICENSE.format(name=spec.name))
        record = _record(source, stage, how, metadata["medvision_checks"])
        write_json(stage / "medvision_export.json", record)
        replace_dir(stage, out)
    checks.append(f"models/model.ts: TorchScript ({how}) of the calibrated model")
    checks.append(parity_line("torchscript", diff, images, atol))
    if images is not None and pixels is not None and bundle_diff is not None:
        unit = f"{pixels:.0f} 8-bit level(s)" if spec.transfer == "uint8" else f"{pixels:.2e} (in [0, 1])"
        checks.append(f"MONAI preprocessing vs medvision's on the same {len(images)} files: max pixel difference "
                      f"{unit}; max |p_bundle - p_medvision| = {bundle_diff:.2e}")  # fmt: skip
    checks.append(f"run it: cd {out} && {RUN_COMMAND}")
    log.info("exported %s", out)
    return ExportResult("monai-bundle", out, out / "medvision_export.json", diff, len(images) if images else 0,
                        images.split if images else None, checks)  # fmt: skip


def _bit_depth_max(source: ExportSource, images: ParityImages | None) -> int:
    """The largest value of the training images' integer type (255 or 65535), from one of the run's images."""
    if images is None:
        if source.spec.transfer == "uint8":
            return 255
        raise ExportError(
            "without parity images the bit depth of the run's images is unknown (its batches are float); "
            "give --parity-images 1 or more"
        )
    ds = images.dataset
    raw = ds.table.loader(int(ds.indices[0]))
    colour = raw.ndim == 3 and raw.shape[2] >= 3
    if raw.dtype == np.uint16 and colour:
        raise ExportError(
            f"{source.run_dir} was trained on 16-bit colour images; MONAI reads PNG with PIL, which reduces them to "
            "8 bits, so a bundle would not see the pixels the run saw. Export it with --format onnx"
        )
    if raw.dtype in (np.uint8, np.uint16):
        return int(np.iinfo(raw.dtype).max)
    if source.spec.intensity != "dtype":
        return 0  # per-image scaling does not depend on the depth
    raise ExportError(
        f"{source.run_dir} was trained on {raw.dtype} images with data.intensity 'dtype'; a MONAI bundle supports "
        "8- and 16-bit integer images there. Export it with --format onnx"
    )


def _channels_expression(channels: int) -> str:
    """medvision's :func:`~medvision.io.image.to_channels` on a (C, H, W) tensor, as a MONAI config expression."""
    if channels == 1:
        return "$lambda x: x if x.shape[0] == 1 else x[0:1] * 0.299 + x[1:2] * 0.587 + x[2:3] * 0.114"
    if channels == 3:
        return "$lambda x: x if x.shape[0] == 3 else x[:3] if x.shape[0] > 3 else x.repeat(3, 1, 1)"
    return f"$lambda x: x if x.shape[0] == {channels} else x.repeat({channels}, 1, 1)"


def preprocessing_config(spec: ScoringSpec, max_value: int) -> list[dict[str, Any]]:
    """The MONAI transforms (as bundle config) that turn an image file into the run's model input."""
    key = "image"
    scale: dict[str, Any]
    if spec.intensity == "dtype":
        scale = {"_target_": "ScaleIntensityRanged", "keys": key, "a_min": 0.0, "a_max": float(max_value),
                 "b_min": 0.0, "b_max": 1.0}  # fmt: skip
    elif spec.intensity == "minmax":
        scale = {"_target_": "ScaleIntensityd", "keys": key, "minv": 0.0, "maxv": 1.0}
    else:
        scale = {"_target_": "ScaleIntensityRangePercentilesd", "keys": key, "lower": 0.5, "upper": 99.5,
                 "b_min": 0.0, "b_max": 1.0, "clip": True}  # fmt: skip
    steps: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": key, "reader": "PILReader", "reverse_indexing": False, "dtype": None,
         "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": key},
        scale,
        {"_target_": "Lambdad", "keys": key, "func": _channels_expression(spec.in_chans)},
        {"_target_": "Resized", "keys": key, "spatial_size": [spec.image_size, spec.image_size], "mode": "bilinear",
         "align_corners": False, "anti_aliasing": False},
    ]  # fmt: skip
    if spec.transfer == "uint8":
        steps += [
            {"_target_": "ScaleIntensityRanged", "keys": key, "a_min": 0.0, "a_max": 1.0, "b_min": 0.0,
             "b_max": 255.0, "clip": True},
            {"_target_": "Lambdad", "keys": key, "func": "$torch.round"},
            {"_target_": "ScaleIntensityRanged", "keys": key, "a_min": 0.0, "a_max": 255.0, "b_min": 0.0,
             "b_max": 1.0},
        ]  # fmt: skip
    steps.append({"_target_": "EnsureTyped", "keys": key, "dtype": "$torch.float32"})
    return steps


def inference_config(spec: ScoringSpec, max_value: int) -> dict[str, Any]:
    """``configs/inference.json``: files under ``dataset_dir`` -> ``output_dir/predictions.csv``."""
    return {
        "imports": ["$import glob", "$import os", "$import torch", "$import monai"],
        "bundle_root": ".",
        "dataset_dir": "/workspace/data",
        "output_dir": "$@bundle_root + '/eval'",
        "output_filename": "predictions.csv",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "suffixes": list(IMAGE_SUFFIXES),
        "datalist": "$[{'image': f} for f in sorted(glob.glob(os.path.join(@dataset_dir, '**', '*'), recursive=True))"
        " if f.lower().endswith(tuple(@suffixes))]",
        "network": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_config(spec, max_value)},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 16,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SimpleInferer"},
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
            "val_handlers": "@handlers",
            "amp": False,
        },
        "run": ["$@evaluator.run()"],
    }


def _depth_words(spec: ScoringSpec, max_value: int) -> str:
    if spec.intensity != "dtype":
        return f"any depth, scaled per image ({spec.intensity})"
    return {255: "8-bit", 65535: "16-bit"}.get(max_value, f"max value {max_value}")


def bundle_metadata(source: ExportSource, max_value: int) -> dict[str, Any]:
    """``configs/metadata.json`` in the MONAI bundle schema, with medvision's decision and provenance added."""
    spec = source.spec
    summary = spec_summary(spec)
    k, c, size = len(spec.classes), spec.in_chans, spec.image_size
    uint8 = spec.transfer == "uint8"
    channel_def = {"0": "R", "1": "G", "2": "B"} if c == 3 else {str(i): f"channel {i}" for i in range(c)}
    if c == 1:
        channel_def = {"0": "grey"}
    depth = _depth_words(spec, max_value)
    return {
        "schema": SCHEMA,
        "version": "1.0.0",
        "changelog": {"1.0.0": f"exported by medvision {spec.medvision_version} from run {spec.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"pytorch-ignite": ignite.__version__, "pillow": PIL.__version__},
        "name": spec.name,
        "task": f"Image classification into {k} classes: {', '.join(spec.classes)}",
        "description": (
            f"{source.recipe.model.name} (timm) fine-tuned by medvision run {spec.name}. Reads {depth} "
            f"PNG/JPEG/TIFF/BMP images, resizes them to {size} x {size} and returns calibrated probabilities "
            f"(temperature {spec.temperature:.4g}, fitted on validation) for {spec.classes}."
        ),
        "authors": f"medvision run {spec.name}",
        "copyright": "See LICENSE",
        "data_source": f"{source.recipe.data.source}: {Path(source.recipe.data.path).name}",
        "data_type": f"{depth} {'RGB' if c == 3 else 'greyscale' if c == 1 else f'{c}-channel'} images",
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
            "bit_depth_max": max_value,
            "spec": json.loads(spec.to_json()),
        },
    }


def _torchscript(source: ExportSource) -> tuple[torch.jit.ScriptModule, str]:
    """``torch.jit.script`` (keeps the uint8/float branch), else a trace at float32, what the bundle feeds it."""
    try:
        with quiet():
            return torch.jit.script(source.model), "torch.jit.script"
    except Exception as err:  # TorchScript rejects some Python constructs; a trace needs none of them
        log.info("torch.jit.script failed (%s: %s); tracing at float32", type(err).__name__, err)
    try:
        with torch.no_grad(), quiet():
            traced = torch.jit.trace(source.model, source.example().float(), check_trace=False)
        return traced, "torch.jit.trace at float32"
    except Exception as err:
        raise ExportError(f"TorchScript cannot hold {source.recipe.model.name}: {type(err).__name__}: {err}") from None


def _monai_preprocess(bundle: Path, images: ParityImages) -> torch.Tensor:
    """The parity images' files through the bundle's own ``preprocessing``, as MONAI's ConfigParser builds it.

    The run's original files when its table reads files; otherwise (npz, preloaded) the decoded
    arrays written losslessly as PNG.
    """
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    ds = images.dataset
    indices = [int(i) for i in ds.indices[: len(images)]]
    with tempfile.TemporaryDirectory(dir=bundle) as scratch, quiet(_NVIMGCODEC_LOG):
        preprocess = parser.get_parsed_content("preprocessing")
        if isinstance(ds.table.loader, FileLoader):
            files = [ds.table.loader.paths[i] for i in indices]
        else:
            files = [_write_png(Path(scratch) / f"{i}.png", ds.table.loader(i)) for i in indices]
        try:
            tensors = [preprocess({"image": f})["image"] for f in files]
        except Exception as err:  # MONAI wraps reader errors in RuntimeError with the transform's name
            raise ExportError(f"the bundle's MONAI preprocessing fails on the run's own images: {err}") from None
    return torch.stack([torch.as_tensor(t) for t in tensors])


def _write_png(path: Path, raw: np.ndarray) -> str:
    if raw.ndim == 3 and raw.shape[2] in (3, 4):
        raw = raw[:, :, [2, 1, 0, 3][: raw.shape[2]]]  # OpenCV writes BGR(A)
    if not cv2.imwrite(str(path), raw):
        raise ExportError(f"{path}: OpenCV could not write a {raw.dtype} {raw.shape} check image")
    return str(path)


def bundle_input(batch: torch.Tensor) -> torch.Tensor:
    """A loader batch as the bundle's preprocessing gives it: float32 in [0, 1] (uint8 levels divided by 255)."""
    return batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()


def _check_pixels(spec: ScoringSpec, monai_batch: torch.Tensor, images: ParityImages) -> float:
    """Largest pixel difference between MONAI's and medvision's inputs (8-bit levels for uint8 runs, else
    in [0, 1]); raises when it is more than rounding."""
    ours = bundle_input(images.batch)
    if monai_batch.shape != ours.shape:
        raise ExportError(
            f"the bundle's MONAI preprocessing gives batches of shape {tuple(monai_batch.shape)}, medvision's "
            f"{tuple(ours.shape)}"
        )
    diff = float((monai_batch.double() - ours.double()).abs().max())
    # uint8: one level, where OpenCV and torch land a hair apart around an exact .5 and round to different
    # sides; float16 batches round [0, 1] to 2^-11; float32 ones differ by float noise only
    scale, limit = {"uint8": (255.0, 1.001), "float16": (1.0, 1e-3)}.get(spec.transfer, (1.0, 1e-5))
    if diff * scale > limit:
        raise ExportError(
            f"the bundle's MONAI preprocessing differs from medvision's on the run's own {images.split} images by "
            f"up to {diff * scale:.3g}{' 8-bit levels' if scale > 1 else ''} (allowed {limit:g}); the bundle "
            "would not see the pixels the run saw, so it was not written"
        )
    return diff * scale


def _checks_record(
    diff: float | None, pixels: float | None, bundle_diff: float | None, images: ParityImages | None, atol: float,
    dicom: DicomParity,
) -> dict[str, Any]:  # fmt: skip
    if images is None:
        return {"checked": False, "reason": "--parity-images 0", "dicom_parity": dicom.record(atol)}
    return {
        "images": len(images),
        "split": images.split,
        "torchscript_vs_torch_max_abs_diff": diff,
        "atol": atol,
        "preprocessing_max_pixel_diff": pixels,
        "bundle_vs_medvision_max_abs_diff": bundle_diff,
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


def readme(source: ExportSource, max_value: int, checks: dict[str, Any]) -> str:
    """``docs/README.md``: what the bundle expects, how to run it, what was checked at export."""
    spec = source.spec
    points = "\n".join(
        f"- {level}: {op['rule']}{'' if op.get('target') is None else ' ' + str(op['target'])} -> threshold "
        f"{op['threshold']}" for level, ops in (spec.decision.get("points") or {}).items() for op in ops
    )  # fmt: skip
    positive = spec_summary(spec)["positive_class"]
    rounding = " and rounds it to 8-bit levels" if spec.transfer == "uint8" else ""
    levels = " 8-bit level(s)" if spec.transfer == "uint8" else ""
    checked = (
        f"On {checks['images']} {checks['split']} images of the run: TorchScript vs PyTorch max |dp| = "
        f"{checks['torchscript_vs_torch_max_abs_diff']:.2e}; MONAI's preprocessing vs medvision's max pixel "
        f"difference {checks['preprocessing_max_pixel_diff']:.3g}{levels}; bundle vs medvision max |dp| = "
        f"{checks['bundle_vs_medvision_max_abs_diff']:.2e}."
        if checks.get("images")
        else "Not checked at export (--parity-images 0)."
    )
    return f"""# {spec.name}

{source.recipe.model.name} fine-tuned by medvision on {len(spec.classes)} classes: {", ".join(spec.classes)}.
Exported with `medvision export --format monai-bundle` (medvision {spec.medvision_version}); weights SHA-256
`{spec.model_sha256}`.

## Run it

From this folder, on a folder of images (searched recursively):

```bash
{RUN_COMMAND}
```

or from anywhere, adding `--meta_file BUNDLE/configs/metadata.json --bundle_root BUNDLE` with
`--config_file BUNDLE/configs/inference.json`. Without `--output_dir` the results go to `eval/`.
In Python: `monai.bundle.run(config_file=..., meta_file=..., bundle_root=..., dataset_dir=..., output_dir=...)`.

`OUT/predictions.csv` has one row per file and no header: the file's path, then the calibrated
probability of each class in this order: {", ".join(spec.classes)}.

## Input

{_depth_words(spec, max_value)} PNG/JPEG/TIFF/BMP files with the kind of content the run was trained on.
MONAI reads each file at its native depth, scales it to [0, 1] ({spec.intensity}), makes it
{spec.in_chans}-channel (grey is replicated, alpha dropped, RGB to grey by ITU-R 601 luma), resizes it
bilinearly to {spec.image_size} x {spec.image_size}{rounding}:
the preprocessing medvision trained with. The model (`models/model.ts`) takes that batch (float32
in [0, 1]) and applies the backbone's normalisation and the calibration itself.

## Output and decision

Probabilities are calibrated by temperature scaling ({spec.temperature:.4g}, fitted on the run's
validation split). Operating points chosen on validation for the class `{positive}`:

{points or "(none recorded)"}

## Checked at export

{checked}

Research use; not validated for clinical decisions.
"""

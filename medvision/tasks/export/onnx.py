"""``medvision export RUN --format onnx``: one ``.onnx`` file that scores exactly as the run does.

The graph is :class:`~medvision.models.deploy.CalibratedClassifier` in eval mode: input ``image``,
the raw NCHW batch as the loader produces it (uint8 0..255 when the run's batches travel as uint8,
else float32 in [0, 1]), dynamic batch; output ``probabilities``, calibrated (N, K). Normalisation
and the temperature are inside the graph, so nothing about the model lives outside the file:
:func:`load_onnx` reads the :class:`~medvision.runs.ScoringSpec` back from its metadata.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` + onnxscript), the default
since torch 2.9. The TorchScript-based exporter still runs in torch 2.14 but is deprecated (it
warns on every call) and slated for removal. On 17 timm families (ResNet, EfficientNet, ConvNeXt,
DenseNet, RegNet, MobileNetV3, ViT, Swin, EfficientViT, FastViT, EdgeNeXt, MobileViTv2, HRNet,
SE-ResNeXt, GhostNet, RepVGG, EfficientNet-Lite) both exported every model with a dynamic batch and
matched PyTorch to 2e-6 in ONNX Runtime, so the supported path wins. It is slower to export (4-40 s
on 2 CPU cores against 0.5-4 s), once per run.

The file is written to a scratch folder, checked with ``onnx.checker`` (full check), run in ONNX
Runtime on batches of 1 and of several of the run's own test images, compared with PyTorch (fp32),
for a run trained on DICOM also on the DICOM parity set (real files read as ``score`` reads them,
:func:`~medvision.tasks.export.common.check_dicom_parity`), and only then renamed into place, with a
``model.onnx.json`` record next to it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from medvision.inference import SPEC_KEY, OrtEngine
from medvision.io.files import sha256
from medvision.runs import ScoringSpec
from medvision.tasks.export.common import (
    PARITY_ATOL,
    DicomParity,
    ExportError,
    ExportResult,
    ExportSource,
    ParityImages,
    check_dicom_parity,
    check_onnx_out,
    check_parity,
    chunk_sizes,
    export_versions,
    load_parity_images,
    open_run,
    parity_line,
    quiet,
    spec_summary,
    staging_dir,
    torch_probabilities,
    write_json,
)

log = logging.getLogger("medvision")

INPUT = "image"
OUTPUT = "probabilities"
OPSET = 18
MIN_OPSET = 18
"""torch.onnx's dynamo exporter writes opset 18 (torchlib's) and converts from there: asked for 17, it wrote 18."""


def export_onnx(
    run_dir: Path, out: Path | None = None, parity_images: int = 32, atol: float = PARITY_ATOL, opset: int = OPSET
) -> ExportResult:
    """Writes the run's calibrated model as ONNX (default ``RUN/export/model.onnx``), checked, or raises.

    ``out`` ending in ``.onnx`` is the file, otherwise a folder for ``model.onnx``. The export is
    kept only if ``onnx.checker`` passes and ONNX Runtime's probabilities on ``parity_images`` of the
    run's test images (and, for a run trained on DICOM, on every file of the DICOM parity set) are
    within ``atol`` of PyTorch's in float32; otherwise :class:`ExportError` is raised and nothing is
    written (an earlier export at ``out`` stays as it was).

    Examples:
        >>> result = export_onnx(Path("runs/demo"))
        >>> engine, spec = load_onnx(result.path)
        >>> probs = engine.predict(batch_uint8)  # (N, K) calibrated
    """
    highest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= highest:
        raise ExportError(f"ONNX opset {opset}: expected {MIN_OPSET} (what torch.onnx writes natively) to {highest} "
                          f"(the newest this onnx {onnx.__version__} knows)")  # fmt: skip
    source = open_run(run_dir)
    out = Path(out) if out is not None else source.run_dir / "export" / "model.onnx"
    if out.suffix != ".onnx" or out.is_dir():  # an existing folder is a folder, whatever its name
        out = out / "model.onnx"
    check_onnx_out(out)  # before the slow export, as is the data below
    images = load_parity_images(source, parity_images)  # before the slow export: missing data fails in a second
    program = _torch_export(source, opset)
    for key, value in onnx_metadata(source.spec).items():
        program.model.metadata_props[key] = value
    program.model.doc_string = (
        f"medvision run {source.spec.name}: raw {source.spec.transfer} NCHW batch -> calibrated probabilities "
        f"of {source.spec.classes}"
    )
    checks = []
    with staging_dir(out) as stage:
        staged = stage / out.name
        program.save(str(staged))  # weights above 2 GB go to model.onnx.data beside it, named for the final file
        _check_model(staged)
        checks.append("onnx.checker (full check): ok")
        written = _written_opset(staged)
        if written != opset:  # torch.onnx falls back to its own opset when its converter cannot reach the one asked
            raise ExportError(f"asked for ONNX opset {opset}, torch.onnx wrote opset {written} for "
                              f"{source.recipe.model.name} (its version converter could not convert the graph); "
                              f"nothing was written: use opset {written}")  # fmt: skip
        engine = OrtEngine(staged, providers=["CPUExecutionProvider"])
        checks.append(_check_dynamic_batch(engine, source))
        diff = _parity(engine, source, images, atol)
        checks.append(parity_line("onnx", diff, images, atol))
        dicom = check_dicom_parity("onnx", engine.predict, source, atol)
        if source.spec.inputs == "dicom":
            checks.append(dicom.line("onnx", atol))
        props: dict[str, str] = {}
        if images is not None:
            props.update(parity_max_abs_diff=f"{diff:.3e}", parity_images=str(len(images)), parity_split=images.split)
        if dicom.max_abs_diff is not None:
            props.update(
                dicom_parity_max_abs_diff=f"{dicom.max_abs_diff:.3e}", dicom_parity_files=str(len(dicom.diffs))
            )
        if props:
            _add_metadata(staged, props)
            _check_model(staged)
        staged_record = stage / f"{out.name}.json"
        write_json(staged_record, _record(source, staged, written, diff, images, atol, dicom))
        for extra in sorted(stage.iterdir()):  # external weights (if any) first, then the model, then its record
            if extra not in (staged, staged_record):
                os.replace(extra, out.parent / extra.name)
        os.replace(staged, out)
        record = out.with_name(staged_record.name)
        os.replace(staged_record, record)
    size = out.stat().st_size / 2**20
    shape = f"[batch, {source.spec.in_chans}, {source.spec.image_size}, {source.spec.image_size}]"
    checks.insert(0, f"input {INPUT!r} {_input_dtype(source)} {shape} -> {OUTPUT!r} float32 [batch, "
                     f"{len(source.spec.classes)}]; ONNX opset {opset}, {size:.1f} MB")  # fmt: skip
    log.info("exported %s", out)
    return ExportResult("onnx", out, record, diff, len(images) if images else 0, images.split if images else None,
                        checks)  # fmt: skip


def _input_dtype(source: ExportSource) -> str:
    return "uint8" if source.input_dtype == torch.uint8 else "float32"


def _torch_export(source: ExportSource, opset: int) -> Any:
    """``torch.onnx.export(dynamo=True)`` of the calibrated model with a dynamic batch (see the module docstring)."""
    log.info("exporting %s with torch.onnx (dynamo, opset %d)...", source.recipe.model.name, opset)
    batch = torch.export.Dim("batch")
    try:
        with contextlib.redirect_stdout(io.StringIO()), quiet("onnxscript", "onnx_ir", "torch.onnx"):
            return torch.onnx.export(
                source.model, (source.example(),), dynamo=True, verbose=False, opset_version=opset,
                input_names=[INPUT], output_names=[OUTPUT], dynamic_shapes=({0: batch},),
            )  # fmt: skip
    except Exception as err:  # torch.export raises many types; keep the first lines, they say which op failed
        reason = " ".join(str(err).split("\n")[:3])
        raise ExportError(
            f"torch.onnx could not export {source.recipe.model.name}: {type(err).__name__}: {reason}"
        ) from None


def _written_opset(path: Path) -> int:
    """The default-domain (``ai.onnx``) opset the saved model imports: what the file really needs."""
    versions = [
        o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")
    ]
    if len(versions) != 1:
        raise ExportError(f"{path.name}: expected one ai.onnx opset import, the file has {versions}")
    return int(versions[0])


def _check_model(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"onnx.checker rejects the exported model: {err}") from None


def _check_dynamic_batch(engine: OrtEngine, source: ExportSource) -> str:
    """Batches of 1 and 5 run and give one probability row per image that sums to 1."""
    for n in (1, 5):
        probs = engine.predict(source.example(n).numpy())
        if probs.shape != (n, len(source.spec.classes)) or not np.allclose(probs.sum(1), 1.0, atol=1e-5):
            raise ExportError(f"the exported model gives {probs.shape} probabilities for a batch of {n}")
    return "onnxruntime: batches of 1 and 5 run (dynamic batch)"


def _parity(engine: OrtEngine, source: ExportSource, images: ParityImages | None, atol: float) -> float | None:
    """ONNX Runtime against PyTorch on the parity images, fed one alone then up to 16 at a time."""
    if images is None:
        return None
    batch = images.batch.numpy()
    parts, start = [], 0
    for size in chunk_sizes(len(images)):
        parts.append(engine.predict(batch[start : start + size]))
        start += size
    reference = torch_probabilities(source.model, images.batch)
    return check_parity("onnx", np.concatenate(parts), reference, atol, images)


def _add_metadata(path: Path, props: dict[str, str]) -> None:
    """Adds metadata to a saved model without touching its graph (external weights, if any, stay where they are)."""
    model = onnx.load(str(path), load_external_data=False)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def onnx_metadata(spec: ScoringSpec) -> dict[str, str]:
    """``metadata_props`` of an export: the machine-readable spec plus its facts, one readable key each."""
    props = {SPEC_KEY: spec.to_json(), "producer": "medvision export --format onnx"}
    for key, value in spec_summary(spec).items():
        props[key] = value if isinstance(value, str) else json.dumps(value)
    props["input"] = (
        f"{INPUT}: {props['input_dtype']} NCHW, {spec.in_chans} x {spec.image_size} x {spec.image_size}, "
        + ("0..255 (8-bit levels)" if spec.transfer == "uint8" else "[0, 1]")
        + "; unnormalised: the backbone's mean/std and the temperature are inside the graph"
    )
    props["output"] = f"{OUTPUT}: float32 (N, {len(spec.classes)}), calibrated, columns {spec.classes}"
    return props


def _record(
    source: ExportSource, model: Path, opset: int, diff: float | None, images: ParityImages | None, atol: float,
    dicom: DicomParity,
) -> dict[str, Any]:  # fmt: skip
    spec = source.spec
    size = spec.image_size
    parity = None
    if images is not None:
        parity = {"max_abs_diff": diff, "atol": atol, "images": len(images), "split": images.split,
                  "batch_sizes": sorted(set(chunk_sizes(len(images)))),
                  "reference": "medvision.models.deploy.CalibratedClassifier in PyTorch, fp32, CPU"}  # fmt: skip
    return {
        "format": "onnx",
        "file": model.name,
        "sha256": sha256(model),
        "run": str(source.run_dir.resolve()),
        "model_sha256": spec.model_sha256,
        "exporter": f"torch.onnx.export(dynamo=True), opset {opset}",
        "opset": opset,  # read back from the written file's ai.onnx import
        "input": {"name": INPUT, "dtype": _input_dtype(source), "shape": ["batch", spec.in_chans, size, size]},
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch", len(spec.classes)], "classes": spec.classes},
        "checker": "onnx.checker.check_model(full_check=True): ok",
        "parity": parity,
        "dicom_parity": dicom.record(atol),
        "versions": export_versions("onnx", "onnxruntime", "onnxscript"),
    }

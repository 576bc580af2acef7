"""Deployable models from a finished run: an ONNX file and a MONAI bundle.

Both contain one function, :class:`medvision.models.deploy.CalibratedClassifier`: the raw batch the
loader produces (uint8 0..255, or float in [0, 1]) -> calibrated class probabilities, with the
backbone's normalisation and the fitted temperature inside. Every export is checked before it is
kept: the exported model must give the PyTorch model's probabilities (to 1e-4, both in float32) on
real images of the run's own test split, pushed through the run's own preprocessing, and for a run
trained on DICOM on every file of a set of real DICOMs of every kind read as ``score`` reads them
(:func:`~medvision.tasks.export.common.check_dicom_parity`); otherwise nothing is written.

- :mod:`medvision.tasks.export.onnx`: ``model.onnx`` with the :class:`~medvision.runs.ScoringSpec`
  in its metadata, :class:`~medvision.inference.OrtEngine` to run it, and
  :func:`~medvision.inference.load_onnx` to read it back.
- :mod:`medvision.tasks.export.monai_bundle`: a MONAI bundle (TorchScript model, ``inference.json`` whose
  reader is medvision's own, :mod:`medvision.data.bundle_intake`) that ``python -m monai.bundle run`` executes.

This module imports neither onnx nor MONAI (both are the optional ``export`` extra), so the CLI can
import it on any install.
"""

from __future__ import annotations

from pathlib import Path

from medvision.options import EXPORT_FORMATS
from medvision.tasks.export.common import ExportError, ExportResult


def export_run(run_dir: Path, fmt: str, out: Path | None = None, parity_images: int = 32) -> ExportResult:
    """Exports a finished run as ``onnx`` or ``monai-bundle`` (see the module docstring).

    Examples:
        >>> result = export_run(Path("runs/bloodmnist_effnet_lite0"), "onnx")
        >>> print("\\n".join(result.lines()))
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"export format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    try:
        if fmt == "onnx":
            from medvision.tasks.export.onnx import export_onnx

            return export_onnx(run_dir, out, parity_images)
        from medvision.tasks.export.monai_bundle import export_monai_bundle

        return export_monai_bundle(run_dir, out, parity_images)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("onnx", "onnxruntime", "onnxscript", "monai", "ignite"):
            raise ExportError(
                f"--format {fmt} needs {err.name}, which is not installed; pip install 'medvision[export]'"
            ) from None
        raise

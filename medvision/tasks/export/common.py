"""What every export format shares: the run's calibrated model and spec, real parity images, the checks.

The parity images are the first images of the run's test split (else validation) as
:func:`medvision.training.build.split_dataset` yields them: read from disk, mapped to [0, 1], resized
and compacted to the run's transfer dtype, i.e. exactly what the loader feeds the model in
evaluate and score. An exported model is compared with :class:`CalibratedClassifier` on them.

A run trained on DICOM is checked on a second set too, :func:`dicom_parity_files`: real files that
the run has never seen (pydicom's own test files and pydicom-data's full-size radiographs) in many
transfer syntaxes, sizes and photometric interpretations, each read by
:func:`medvision.data.intake.read_file`, the host-side path of ``medvision score``, frames included.
The run's own test images are all alike; these are not, and it is on images a model is unsure of
that a difference in arithmetic shows: on a tf_efficientnet_lite0 run trained on DICOM, scoring under
bf16 autocast instead of float32 moved probabilities by up to 0.19 on this set and 0.03 on the run's
own test images. Both sets compare the export with PyTorch in float32, the precision ``score`` uses
by default with either engine.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from medvision.data.dataset import ImageDataset
from medvision.data.intake import ReadConfig, read_file
from medvision.data.sources import load_table
from medvision.data.table import DataSourceError
from medvision.errors import ExportError
from medvision.inference import SPEC_KEY, load_run
from medvision.io.dicom import shipped_test_folders
from medvision.io.files import atomic_write
from medvision.io.image import ImageReadError
from medvision.models.deploy import CalibratedClassifier
from medvision.recipe import Recipe
from medvision.runs import ScoringSpec, cache_dir, versions
from medvision.training.build import ModelBundle, split_dataset
from medvision.wsi.source import check_stain_reference

log = logging.getLogger("medvision")


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and what it checked."""

    format: str
    path: Path
    """``model.onnx`` or the bundle folder."""
    record: Path
    """JSON record of the export: checks, figures, file hashes and versions."""
    parity: float | None
    """max |p_export - p_torch| on the parity images (None when the check was skipped with 0 images)."""
    images: int
    split: str | None
    checks: list[str] = field(default_factory=list)
    """One human-readable line per check that passed, in the order they ran."""

    def lines(self) -> list[str]:
        return [f"{self.format}: {self.path}", *self.checks, f"record: {self.record}"]


PARITY_ATOL = 1e-4
"""Largest max |p_export - p_torch| an export may show on the parity images (fp32 throughout)."""


@dataclass
class ExportSource:
    """A finished run opened for export, on the CPU: the calibrated model and the spec that goes with it."""

    run_dir: Path
    recipe: Recipe
    meta: dict[str, Any]
    bundle: ModelBundle
    spec: ScoringSpec
    model: CalibratedClassifier
    """In eval mode, contiguous memory format (the exported graph carries no layout transposes)."""

    @property
    def input_dtype(self) -> torch.dtype:
        """What an exported model takes: uint8 for uint8 transfer, float32 otherwise (float16 batches are widened)."""
        return torch.uint8 if self.spec.transfer == "uint8" else torch.float32

    def example(self, batch: int = 2) -> torch.Tensor:
        """A zero batch of the exported input's shape and dtype (batch 2, so that tracing keeps the batch dynamic)."""
        size = self.spec.image_size
        return torch.zeros((batch, self.spec.in_chans, size, size), dtype=self.input_dtype)


def open_run(run_dir: Path) -> ExportSource:
    """Loads a finished run on the CPU (``RunError`` names a missing file) and wraps it for export."""
    run_dir = Path(run_dir)
    try:
        recipe, meta, bundle = load_run(run_dir, torch.device("cpu"))
    except SafetensorError as err:  # a damaged or truncated file: the user's to replace, not a bug
        raise ExportError(f"{run_dir / 'model.safetensors'}: not a readable safetensors file ({err}); expected the "
                          "weights the run saved: restore them or train the run again") from None  # fmt: skip
    bundle.model = bundle.model.to(memory_format=torch.contiguous_format).eval()
    spec = ScoringSpec.from_run(run_dir, recipe, meta)
    if spec.inputs == "slides":  # parity tiles are normalised to the reference: the one the run trained on
        check_stain_reference(run_dir, recipe.data.slides, spec.stain_reference_sha256)
    model = CalibratedClassifier(bundle.model, spec.mean, spec.std, spec.temperature, spec.tta).eval()
    return ExportSource(run_dir, recipe, meta, bundle, spec, model)


@dataclass
class ParityImages:
    """Up to n images of one split of the run's own data, as the loader yields them."""

    dataset: ImageDataset
    split: str
    batch: torch.Tensor
    """(n, C, H, W) in the run's transfer dtype."""

    def __len__(self) -> int:
        return len(self.batch)


def load_parity_images(source: ExportSource, n: int) -> ParityImages | None:
    """The first ``n`` images of the run's test split, else of its validation split; None for ``n == 0``.

    Raises :class:`ExportError` when the run's data cannot be read (moved or deleted): without it
    the export cannot be checked.
    """
    if n < 0:
        raise ExportError(f"--parity-images must be >= 0, got {n}")
    if n == 0:
        log.warning("export: parity check skipped (0 images); the exported model is NOT checked against the run")
        return None
    recipe = source.recipe
    try:
        table = load_table(recipe.data, recipe.seed, cache_dir(recipe))
        for split in ("test", "val"):
            ds = split_dataset(recipe, table, source.bundle, split, train=False)
            if len(ds):
                k = min(n, len(ds))
                return ParityImages(ds, split, torch.stack([ds[i][0] for i in range(k)]))
    except (DataSourceError, ImageReadError, FileNotFoundError) as err:
        raise ExportError(
            f"the parity check needs {source.run_dir}'s own images, which cannot be read: {err}. "
            "Restore the data (recipe.yaml data.path) or pass --parity-images 0 to export unchecked"
        ) from None
    raise ExportError(f"{source.run_dir}: the run's test and validation splits are both empty; nothing to check on")


def torch_probabilities(model: torch.nn.Module, batch: torch.Tensor, chunk: int = 64) -> np.ndarray:
    """Probabilities of ``model`` on ``batch`` (float32 numpy), in chunks."""
    with torch.inference_mode():
        parts = [model(batch[i : i + chunk]).float().numpy() for i in range(0, len(batch), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def chunk_sizes(n: int, largest: int = 16) -> list[int]:
    """Batch sizes that cover ``n`` images: one alone first, then up to ``largest`` at a time.

    Running an export on batches of 1 and of several checks that its batch dimension is really dynamic.
    """
    sizes = [1] if n else []
    rest = n - 1
    while rest > 0:
        sizes.append(min(largest, rest))
        rest -= sizes[-1]
    return sizes


def check_parity(what: str, exported: np.ndarray, reference: np.ndarray, atol: float, images: ParityImages) -> float:
    """max |exported - reference|; raises :class:`ExportError` when it is above ``atol`` or not finite."""
    if exported.shape != reference.shape:
        raise ExportError(f"{what} returned shape {exported.shape}, the PyTorch model {reference.shape}")
    diff = float(np.max(np.abs(exported.astype(np.float64) - reference))) if exported.size else 0.0
    if not math.isfinite(diff) or diff > atol:
        raise ExportError(
            f"parity check failed: on {len(images)} {images.split} images of the run, max |p_{what} - p_torch| = "
            f"{diff:.3g} > {atol:g}; the exported model does not compute what the run's model computes, so it "
            "was not written"
        )
    return diff


def parity_line(what: str, diff: float | None, images: ParityImages | None, atol: float) -> str:
    if diff is None or images is None:
        return "parity: NOT CHECKED (--parity-images 0)"
    return f"parity on {len(images)} {images.split} images: max |p_{what} - p_torch| = {diff:.2e} (limit {atol:.0e})"


#: The DICOM parity set, by the package that ships each file: every transfer syntax the installed decoders
#: read, images from 50 x 10 to 1955 x 1841 pixels (rows x columns), MONOCHROME1/2, RGB, YBR and palette
#: colour (made grey for a grey run), modality and VOI LUTs, multi-frame files; and three files the reader
#: refuses and one without pixel data, whose rows the record lists as not compared.
DICOM_PARITY_SET: dict[str, tuple[str, ...]] = {
    "pydicom": (
        "CT_small.dcm",  # explicit VR little endian, CT 128 x 128
        "MR_small_bigendian.dcm",  # explicit VR big endian
        "MR_small_RLE.dcm",  # RLE lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
        "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless, 16-bit, 50 x 10
        "JPGExtended.dcm",  # JPEG extended, 12-bit, 1024 x 256
        "JPEG2000.dcm",  # JPEG 2000, 1024 x 256
        "image_dfl.dcm",  # deflated explicit VR, 8-bit 512 x 512
        "SC_jpeg_no_color_transform.dcm",  # JPEG baseline, RGB
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR_FULL
        "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG baseline, YBR_FULL_422
        "SC_rgb_jls_lossy_line.dcm",  # JPEG-LS near-lossless, RGB
        "SC_rgb_rle_2frame.dcm",  # RLE, RGB, 2 frames
        "GDCMJ2K_TextGBR.dcm",  # JPEG 2000 lossless, YBR_RCT
        "examples_palette.dcm",  # PALETTE COLOR, 350 x 800
        "JPEG-lossy.dcm",  # a JPEG extended stream the decoders reject: an error row
        "MR_truncated.dcm",  # pixel data cut short: an error row
        "rtplan.dcm",  # an RT plan, no pixel data: a skipped row
    ),
    "pydicom-data": (
        "RG1_UNCR.dcm",  # CR 1955 x 1841, MONOCHROME1
        "RG3_UNCR.dcm",  # CR 1760 x 1760, MONOCHROME1
        "RG1_J2KR.dcm",  # the same CR in JPEG 2000 lossless
        "RG3_J2KI.dcm",  # CR in lossy JPEG 2000
        "JPEG-LL.dcm",  # JPEG lossless (process 14)
        "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless SV1, 8-bit 768 x 1024
        "MR2_J2KI.dcm",  # MR 1024 x 1024, lossy JPEG 2000
        "US1_J2KR.dcm",  # US 480 x 640, JPEG 2000 lossless, YBR_RCT
        "SC_ybr_full_uncompressed.dcm",  # YBR_FULL, uncompressed
        "SC_rgb_16bit.dcm",  # RGB, 16 bits per sample
        "OBXXXX1A_rle_2frame.dcm",  # PALETTE COLOR, RLE, 2 frames
        "gdcm-US-ALOKA-16.dcm",  # 16-bit PALETTE COLOR
        "emri_small_jpeg_ls_lossless.dcm",  # MR, JPEG-LS, 10 frames
        "eCT_Supplemental.dcm",  # enhanced CT, 2 frames
        "mlut_18.dcm",  # modality LUT
        "vlut_04.dcm",  # VOI LUT
        "emri_small_jpeg_2k_lossless_too_short.dcm",  # JPEG 2000 stream cut short: an error row
    ),
}


def dicom_parity_files() -> tuple[list[tuple[str, Path]], str]:
    """The DICOM parity set on this machine: (name, path) pairs, named ``pydicom/CT_small.dcm`` and
    ``pydicom-data/RG1_UNCR.dcm``; or no files and the reason, when pydicom-data is not installed.

    The files are found in the installed packages' folders, never through
    ``pydicom.data.get_testdata_files()`` (which may try the network). A name a package version does
    not ship is left out.
    """
    folders = shipped_test_folders()
    if "pydicom-data" not in folders:
        return [], "pydicom-data is not installed (pip install pydicom-data, or medvision[dev])"
    files = []
    for package, names in DICOM_PARITY_SET.items():
        present = {p.name: p for p in folders[package].glob("*.dcm")}
        files += [(f"{package}/{name}", present[name]) for name in names if name in present]
    return files, ""


@dataclass
class DicomParity:
    """An exported model against PyTorch (fp32) on the DICOM parity set, file by file."""

    diffs: dict[str, float] = field(default_factory=dict)
    """File name -> max |p_export - p_torch| over its frames."""
    frames: dict[str, int] = field(default_factory=dict)
    not_compared: dict[str, str] = field(default_factory=dict)
    """File name -> ``error: reason`` or ``skipped: reason``, as ``score`` would write its row."""
    skipped: str = ""
    """Why the set did not run at all ("" when it ran)."""

    @property
    def max_abs_diff(self) -> float | None:
        return max(self.diffs.values()) if self.diffs else None

    @property
    def worst(self) -> str | None:
        return max(self.diffs, key=lambda name: self.diffs[name]) if self.diffs else None

    def record(self, atol: float) -> dict[str, Any]:
        """The export record's ``dicom_parity`` entry."""
        if self.skipped:
            return {"checked": False, "reason": self.skipped}
        return {
            "checked": True,
            "files": len(self.diffs),
            "frames": sum(self.frames.values()),
            "max_abs_diff": self.max_abs_diff,
            "worst_file": self.worst,
            "atol": atol,
            "reader": "medvision.data.intake.read_file(path, name, ReadConfig(spec)), as `medvision score` reads",
            "reference": "medvision.models.deploy.CalibratedClassifier in PyTorch, fp32, CPU",
            "per_file": {
                name: {"frames": self.frames[name], "max_abs_diff": diff} for name, diff in self.diffs.items()
            },
            "not_compared": self.not_compared,
        }

    def line(self, what: str, atol: float) -> str:
        if self.skipped:
            return f"DICOM parity: NOT CHECKED ({self.skipped})"
        if not self.diffs:
            return f"DICOM parity: no file of the set could be read here; {len(self.not_compared)} not compared"
        return (
            f"DICOM parity on {len(self.diffs)} real files ({sum(self.frames.values())} frames) of pydicom and "
            f"pydicom-data, read as `score` reads them: max |p_{what} - p_torch| = {self.max_abs_diff:.2e} "
            f"({self.worst}; limit {atol:.0e}); {len(self.not_compared)} not compared (error/skipped rows)"
        )


def check_dicom_parity(
    what: str, predict: Callable[[np.ndarray], np.ndarray], source: ExportSource, atol: float
) -> DicomParity:
    """The exported model (``predict``: a raw batch -> probabilities) against PyTorch on the DICOM parity set.

    Each file is read with :func:`~medvision.data.intake.read_file` and the run's spec, all its frames
    are scored by both, and the largest difference per file must be within ``atol``; otherwise
    :class:`ExportError` names each file above it. Files the reader turns into error or skipped rows
    are recorded as not compared, with their reason. Runs trained on images skip the set.
    """
    if source.spec.inputs != "dicom":
        return DicomParity(skipped="the run was trained on PNG/JPEG/TIFF/BMP images, not DICOM")
    files, missing = dicom_parity_files()
    if missing:
        log.warning("export: DICOM parity set skipped: %s", missing)
        return DicomParity(skipped=missing)
    out = DicomParity()
    cfg = ReadConfig(source.spec)
    batches: dict[str, np.ndarray] = {}
    for name, path in files:
        with quiet("pydicom", level=logging.CRITICAL):  # its decoders log each failure with a traceback
            result = read_file(path, name, cfg)
        if result.status == "ok":
            batches[name] = np.stack(result.arrays)
        else:
            out.not_compared[name] = f"{result.status}: {result.reason}"
    reference = np.zeros((0, 0), np.float32)
    if batches:  # PyTorch on all frames at once (one image at a time is slow on a CPU), the export file by file
        reference = torch_probabilities(source.model, torch.from_numpy(np.concatenate(list(batches.values()))))
    start = 0
    for name, batch in batches.items():
        exported, expected = predict(batch), reference[start : start + len(batch)]
        start += len(batch)
        if exported.shape != expected.shape:
            raise ExportError(f"DICOM parity: on {name} the exported model returned shape {exported.shape}, the "
                              f"PyTorch model {expected.shape}")  # fmt: skip
        out.diffs[name] = float(np.max(np.abs(exported.astype(np.float64) - expected)))
        out.frames[name] = len(batch)
    bad = [name for name, d in out.diffs.items() if not (math.isfinite(d) and d <= atol)]
    bad.sort(key=lambda name: out.diffs[name] if math.isfinite(out.diffs[name]) else math.inf, reverse=True)
    if bad:
        listed = "; ".join(f"{name} ({out.frames[name]} frame(s)): {out.diffs[name]:.3g}" for name in bad[:5])
        raise ExportError(
            f"DICOM parity check failed on {len(bad)} of {len(out.diffs)} real DICOM files read as `score` reads "
            f"them: max |p_{what} - p_torch| > {atol:g} on {listed}{' ...' if len(bad) > 5 else ''}; the exported "
            "model does not compute what the run's model computes, so it was not written"
        )
    if not out.diffs:
        log.warning("export: no file of the DICOM parity set could be read here: %s", out.not_compared)
    return out


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A scratch folder next to ``final`` (same filesystem, so renames out of it are atomic), always removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


BUNDLE_RECORD = "medvision_export.json"
"""The record a bundle export writes at its root: what marks a folder as one ``--out`` may replace."""


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_bundle_out(out: Path, run_dir: Path) -> None:
    """Refuses a bundle ``--out`` whose replacement would delete anything but an earlier bundle export.

    The finished bundle replaces the whole folder, so ``--out`` must be new, empty, or a bundle medvision wrote
    (its ``medvision_export.json`` says ``monai-bundle``); and it must not be the run, hold the run, or sit among
    the run's own files (only under ``RUN/export``). Checked before the slow export.
    """
    where, run = out.resolve(), run_dir.resolve()
    if _within(run, where):
        raise ExportError(f"--out {out} is the run folder {run_dir} or holds it; replacing it would delete the run. "
                          f"Expected a new folder, or {run_dir / 'export' / 'monai_bundle'} (the default)")  # fmt: skip
    if _within(where, run) and not (where != run / "export" and _within(where, run / "export")):
        raise ExportError(f"--out {out} is inside the run {run_dir} but not below {run_dir / 'export'}; expected a "
                          "folder outside the run or below its export folder (which itself holds the run's other "
                          "exports)")  # fmt: skip
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} is an existing file; expected a folder for the bundle (new, empty, or an "
                          "earlier bundle export, which is replaced)")  # fmt: skip
    if not any(out.iterdir()):
        return
    if _record_format(out / BUNDLE_RECORD) != "monai-bundle":
        raise ExportError(f"--out {out} is a folder with other files in it and no {BUNDLE_RECORD} of a monai-bundle "
                          "export; the bundle replaces the whole folder, so expected a new or empty folder or an "
                          "earlier bundle export")  # fmt: skip


def check_onnx_out(out: Path) -> None:
    """Refuses an ONNX ``--out`` that would overwrite anything but an earlier ONNX export, before the slow export.

    ``out`` is the final ``.onnx`` path; it and its record ``OUT.json`` may each replace only a file an earlier
    ``--format onnx`` export wrote (the record says ``onnx``; an ``.onnx`` file without its record must hold
    medvision's spec in its metadata).
    """
    for parent in (out.parent, *out.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"--out: {parent} is an existing file, not a folder; expected a path ending in "
                                  ".onnx or a folder for model.onnx")  # fmt: skip
            break
    record = out.with_name(f"{out.name}.json")
    if out.is_dir():
        raise ExportError(f"--out {out} is an existing folder; expected a path for the .onnx file")
    if record.is_dir() or (record.exists() and _record_format(record) != "onnx"):
        raise ExportError(f"{record} exists and is not the record of an earlier ONNX export, which is all the "
                          f"export of {out.name} may replace; choose another --out")  # fmt: skip
    if out.exists() and _record_format(record) != "onnx":
        try:
            import onnx

            props = {p.key for p in onnx.load(str(out), load_external_data=False).metadata_props}
        except Exception:  # not ONNX at all (onnx raises protobuf's DecodeError and others)
            props = set()
        if SPEC_KEY not in props:
            raise ExportError(f"--out {out} is an existing file that is not a medvision ONNX export; expected a new "
                              "path or an earlier export, which is replaced")  # fmt: skip


def _record_format(path: Path) -> str | None:
    """The ``format`` of a medvision export record at ``path``; None when it is missing or not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return str(data.get("format")) if isinstance(data, dict) else None


def replace_dir(stage: Path, final: Path) -> None:
    """Moves a finished folder into place, replacing an older one only once the new one is complete."""
    os.chmod(stage, 0o755)  # mkdtemp made it private
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(stage, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Writes a JSON record atomically, world-readable like the model beside it (mkstemp would leave it 0600)."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")
        os.chmod(tmp, 0o644)

    atomic_write(path, write)


def export_versions(*modules: str) -> dict[str, str]:
    """medvision, torch, timm, python, plus the named packages' versions."""
    out = versions()
    for name in modules:
        module = __import__(name)
        out[name] = str(getattr(module, "__version__", "unknown"))
    out["numpy"] = np.__version__
    return out


def spec_summary(spec: ScoringSpec) -> dict[str, Any]:
    """The human-readable facts of a spec, shared by the ONNX metadata and the bundle's metadata."""
    decision = spec.decision or {}
    positive = decision.get("positive")
    summary: dict[str, Any] = {
        "classes": spec.classes,
        "image_size": spec.image_size,
        "channels": spec.in_chans,
        "inputs": spec.inputs,
        "intensity": spec.intensity,
        "input_dtype": "uint8" if spec.transfer == "uint8" else "float32",
        "transfer": spec.transfer,
        "temperature": spec.temperature,
        "positive_class": spec.classes[positive] if isinstance(positive, int) else None,
        "operating_points": decision.get("points", {}),
        "model_sha256": spec.model_sha256,
        "medvision_version": spec.medvision_version,
    }
    if spec.inputs == "dicom":
        summary["dicom_windows"] = spec.dicom.get("windows")
        summary["dicom_voi_function"] = spec.dicom.get("voi_function")
        summary["dicom_frames"] = spec.dicom.get("frames")
    return summary


@contextmanager
def quiet(*loggers: str, level: int = logging.ERROR) -> Iterator[None]:
    """Silences third-party chatter around a call: torch's deprecation notices for ``torch.jit`` (still
    the format MONAI bundles use), MONAI's notes about GPU DICOM decoding it cannot find, and the named
    loggers below ``level`` (onnxscript logs every optimiser pass at INFO)."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    try:
        for name in loggers:
            logging.getLogger(name).setLevel(level)
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning, UserWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)

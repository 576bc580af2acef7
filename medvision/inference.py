"""Engines: a trained model as a function from raw batches to calibrated probabilities.

Every probability medvision writes after training goes through an :class:`Engine`: ``score`` on files
and on whole slides (TTA and ABMIL included), ``evaluate`` of a run folder through :func:`load_run`, and
the export checks. Two engines implement it, over the same :class:`~medvision.models.deploy.CalibratedClassifier`
function and the same host-side reader (:func:`medvision.data.intake.read_file` for files, the tile
reader for slides), so they cannot preprocess differently:

- :class:`TorchEngine`: the run folder's weights in PyTorch;
- :class:`OrtEngine`: its ONNX export in ONNX Runtime (the optional ``export`` extra).

Both compute in float32 by default. A run trained with ``train.amp: auto`` trains in bf16 where the CPU
or GPU has it, but scoring under that autocast made PyTorch's probabilities differ from ONNX Runtime's
by up to 0.19 on real DICOMs the model was unsure of (see the ``score`` docs); ``score --amp`` opts into
reduced precision for speed, and the provenance records which was used.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from medvision.data.table import SampleTable
from medvision.errors import EnvironmentProblem, ExportError
from medvision.evaluation import SplitOutputs
from medvision.io.files import sha256
from medvision.models.backbone import create_backbone
from medvision.models.backbone import load_state as load_model_state
from medvision.models.deploy import CalibratedClassifier
from medvision.models.heads import fit_state
from medvision.options import SCORE_AMP
from medvision.recipe import Recipe, load_recipe
from medvision.runs import RunError, ScoringSpec, read_run_json
from medvision.runtime import (
    SINGLE,
    Dist,
    autocast,
    local_part,
    make_loader,
    resolve_amp,
    resolve_device,
)
from medvision.training.build import ModelBundle, model_inputs, split_dataset
from medvision.training.loop import gather_outputs, predict_logits

log = logging.getLogger("medvision")

#: Where an exported ONNX model keeps its :class:`ScoringSpec` (``metadata_props``).
SPEC_KEY = "medvision_spec"
_NUMPY = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}


def load_run(run_dir: Path, device: torch.device) -> tuple[Recipe, dict[str, Any], ModelBundle]:
    """The recipe, metadata and best model of a finished run (weights read as safetensors)."""
    if (run_dir / "mil.json").is_file():
        raise RunError(f"{run_dir} is a MIL run on cached slide features: its evaluation is the cross-validation in "
                       "its report.html, and `medvision score SLIDES --model RUN` scores new slides with it; it has "
                       "no image model to evaluate, explain or export")  # fmt: skip
    for needed in ("recipe.yaml", "run.json", "model.safetensors"):
        if not (run_dir / needed).is_file():
            raise RunError(f"{run_dir} is not a finished medvision run: {needed} is missing")
    recipe = load_recipe(run_dir / "recipe.yaml")
    meta = read_run_json(run_dir)
    recipe = recipe.changed({"model.pretrained": False, "model.init_from": None, "model.in_chans": meta["in_chans"]})
    model = create_backbone(recipe.model, num_classes=len(meta["classes"]), in_chans=meta["in_chans"])
    state = load_model_state(run_dir / "model.safetensors")
    fit_state(model, state, len(meta["classes"]), recipe.train.knn_k, recipe.train.knn_temperature)  # a knn run's bank
    model.load_state_dict(state)
    model.to(device)
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bundle = ModelBundle(model=model, in_chans=meta["in_chans"], mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    return recipe, meta, bundle


def split_outputs(
    bundle: ModelBundle, recipe: Recipe, table: SampleTable, split: str, device: torch.device, workers: int,
    d: Dist = SINGLE,
) -> tuple[SplitOutputs, list[str], float] | None:  # fmt: skip
    """A split's logits, labels and patients, its item ids, and its mean (uncalibrated) cross-entropy.

    On several ranks each evaluates its contiguous shard (no sample repeated, none left out) and
    rank 0 gets the whole split, in order; the other ranks get None.

    Always in float32, whatever ``train.amp`` trained in: these are the probabilities the run's temperature,
    operating points, metrics and ``predictions.csv`` come from, so they must be those of the model the run
    ships, which ``score`` and the exports compute in float32. Evaluated in bf16 instead, a Youden threshold of
    0.9533 sat on the validation positives' bf16 probabilities, above their float32 ones (0.9518): sensitivity
    1.0 in the report, 0 in ``score``.
    """
    ds = split_dataset(recipe, table, bundle, split, train=False)
    loader = make_loader(local_part(ds, d), recipe.data.eval_batch_size, workers, device)
    tta = tuple(recipe.evaluation.tta)
    inputs = model_inputs(recipe, bundle)
    logits, labels = predict_logits(bundle.model, loader, device, "none", inputs, tta=tta)
    whole = gather_outputs(logits, labels, d)
    if whole is None:
        return None
    logits, labels = whole
    if tta:  # (N, 1 + views, K): the image's own logits first
        out = SplitOutputs(logits[:, 0], labels, ds.groups, views=logits, patients=ds.patients)
    else:
        out = SplitOutputs(logits, labels, ds.groups, patients=ds.patients)
    probs = out.probs()  # the TTA average when there are views
    loss = float(-np.log(probs[np.arange(len(labels)), labels] + 1e-300).mean()) if len(labels) else float("nan")
    return out, ds.ids, loss


class Engine(Protocol):
    """Raw batches (N, C, H, W) in the spec's transfer dtype -> calibrated probabilities (N, K) float32."""

    name: str

    @property
    def on_cpu(self) -> bool:
        """Whether the model computes on this machine's CPU (then tile readers take turns with it)."""
        ...

    def predict(self, batch: np.ndarray) -> np.ndarray: ...

    def predict_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities and the backbone's pre-logits features of each image (for an ABMIL head)."""
        ...


class TorchEngine:
    """The run's model in PyTorch, on CUDA when present; float32 unless ``amp`` says otherwise."""

    name = "torch"

    def __init__(self, model: CalibratedClassifier, device: torch.device, amp: str = "none",
                 channels_last: bool = False) -> None:  # fmt: skip
        self.model, self.device, self.amp, self.channels_last = model.eval().to(device), device, amp, channels_last

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def _input(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), autocast(self.device, self.amp):
            return self.model(self._input(batch)).float().cpu().numpy()

    def predict_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode(), autocast(self.device, self.amp):
            probs, feats = self.model.probs_and_features(self._input(batch))
        return probs.float().cpu().numpy(), feats.float().flatten(1).cpu().numpy()


def load_scorer(
    model: Path, engine: str, cpu_threads: int | None = None, amp: str = "none"
) -> tuple[Engine, ScoringSpec, dict[str, Any]]:
    """The engine, the spec and the provenance of a model: a run folder, or (onnxruntime) an exported .onnx.

    ``cpu_threads``: ONNX Runtime's threads on the CPU (PyTorch's are set by the caller, for the run).
    ``amp``: the PyTorch engine's precision (``none`` = float32, the same function as the ONNX graph;
    ``auto`` = the hardware's fast type, as training uses). Raises :class:`RunError` (or
    :class:`ExportError`) when the model cannot be loaded.
    """
    if amp not in SCORE_AMP:
        raise RunError(f"--amp {amp!r} is not one of {', '.join(SCORE_AMP)}")
    if engine == "torch":
        device = resolve_device("auto")
        recipe, meta, bundle = load_run(model, device)
        spec = ScoringSpec.from_run(model, recipe, meta)
        net = CalibratedClassifier(bundle.model, spec.mean, spec.std, spec.temperature, spec.tta)
        amp = resolve_amp(amp, device)
        torch_engine = TorchEngine(net, device, amp, recipe.train.channels_last)
        return torch_engine, spec, {"model_file": str(model / "model.safetensors"), "device": str(device), "amp": amp}
    if engine == "onnxruntime":
        if amp != "none":
            raise RunError(f"--amp {amp}: ONNX Runtime runs the exported float32 graph; use --engine torch for {amp}")
        path = model / "export" / "model.onnx" if model.is_dir() else model
        if not path.is_file():
            raise RunError(f"{path}: no exported ONNX model; run `medvision export {model} --format onnx` first")
        ort_engine, spec = load_onnx(path, cpu_threads)
        file_sha = sha256(path)
        # The run the file came from: the folder given, else the one its own record (OUT.json, written by the
        # export beside the file) names, trusted only if the record is this file's; never a folder guessed from
        # where the file lies (an export can be written anywhere with --out).
        weights = model / "model.safetensors" if model.is_dir() else None
        record = path.with_name(f"{path.name}.json")
        if weights is None and record.is_file():
            try:
                facts = json.loads(record.read_text())
            except (OSError, UnicodeDecodeError, ValueError):
                facts = None
            if isinstance(facts, dict) and facts.get("format") == "onnx" and facts.get("sha256") == file_sha:
                weights = Path(str(facts.get("run"))) / "model.safetensors" if facts.get("run") else None
        if weights is not None and weights.is_file() and (now := sha256(weights)) != spec.model_sha256:
            raise RunError(f"{path} was exported from other weights (SHA-256 {spec.model_sha256[:12]}…) than the "
                           f"run's {weights} ({now[:12]}…): trained again since? Run `medvision export "
                           f"{weights.parent} --format onnx` again")  # fmt: skip
        providers = ort_engine.session.get_providers()
        return ort_engine, spec, {"model_file": str(path), "model_file_sha256": file_sha,
                                  "device": ort_engine.device, "onnxruntime_providers": providers}  # fmt: skip
    raise RunError(f"--engine {engine!r} is not one of torch, onnxruntime")


class OrtEngine:
    """An exported model in ONNX Runtime: raw batches (N, C, H, W) in the transfer dtype -> probabilities (N, K).

    Runs on CUDA when ONNX Runtime has its CUDA provider, else on the CPU (``providers`` overrides).

    Examples:
        >>> engine = OrtEngine(Path("runs/demo/export/model.onnx"))
        >>> probs = engine.predict(batch)  # float32 (N, K)
    """

    name = "onnxruntime"

    def __init__(self, path: Path, providers: Sequence[str] | None = None, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort  # the optional `export` extra
        except ModuleNotFoundError as err:
            raise EnvironmentProblem(
                f"ONNX Runtime is not installed ({err.name}); pip install 'medvision[export]'"
            ) from None
        self.path = Path(path)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        if threads:  # CPU threads for one batch (default: ONNX Runtime's, one per physical core)
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=list(providers))
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].type not in _NUMPY:
            got = [(i.name, i.type) for i in inputs]
            raise ExportError(f"{self.path}: expected one uint8 or float input, the graph has {got}")
        self.input_name = inputs[0].name
        self.input_dtype = np.dtype(_NUMPY[inputs[0].type])
        self.input_shape = list(inputs[0].shape)

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``batch``: (N, C, H, W) uint8 (for a uint8 graph), float16 or float32 in [0, 1] (for a float graph)."""
        if batch.ndim != 4:
            raise ValueError(f"{self.path.name}: expected a batch (N, C, H, W), got shape {batch.shape}")
        if self.input_dtype == np.uint8:
            if batch.dtype != np.uint8:
                raise ValueError(f"{self.path.name} takes uint8 batches (0..255), got {batch.dtype}")
        elif batch.dtype in (np.float16, np.float32, np.float64):
            batch = batch.astype(np.float32, copy=False)
        else:
            raise ValueError(f"{self.path.name} takes float batches in [0, 1], got {batch.dtype}")
        (probs,) = self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})
        return np.asarray(probs, dtype=np.float32)

    def predict_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise RunError(f"{self.path.name}: the exported graph returns probabilities only; a run that aggregates "
                       "tiles with its ABMIL head needs tile features: use --engine torch")  # fmt: skip


def load_onnx(path: Path, threads: int | None = None) -> tuple[OrtEngine, ScoringSpec]:
    """An exported ``model.onnx`` in ONNX Runtime and the :class:`ScoringSpec` stored in its metadata.

    ``threads``: ONNX Runtime's intra-op threads on the CPU (default: its own choice).

    Raises :class:`ExportError`, naming the file, when it is not an ONNX model ONNX Runtime can load
    or not a medvision export.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        engine = OrtEngine(path, threads=threads)
    except (ExportError, EnvironmentProblem):
        raise
    except Exception as err:  # onnxruntime raises its own types (InvalidProtobuf, Fail, NoSuchFile)
        raise ExportError(f"{path}: ONNX Runtime cannot load it ({type(err).__name__}: {err})") from None
    text = engine.session.get_modelmeta().custom_metadata_map.get(SPEC_KEY)
    if text is None:
        raise ExportError(
            f"{path}: not a medvision export (its ONNX metadata has no {SPEC_KEY!r}); "
            "make one with `medvision export RUN --format onnx`"
        )
    try:
        spec = ScoringSpec.from_json(text, str(path))
    except ValueError as err:
        raise ExportError(str(err)) from None
    want = np.dtype(np.uint8 if spec.transfer == "uint8" else np.float32)
    shape = engine.input_shape[1:]
    if engine.input_dtype != want or shape != [spec.in_chans, spec.image_size, spec.image_size]:
        raise ExportError(
            f"{path}: the graph takes {engine.input_dtype} {shape} but its spec says {want} "
            f"{[spec.in_chans, spec.image_size, spec.image_size]}; the file was edited after export"
        )
    return engine, spec

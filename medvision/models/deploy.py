"""What a trained model needs in order to score new files, wherever it runs.

Two pieces, shared by ``score`` (PyTorch or ONNX Runtime), ``export --format onnx`` and
``export --format monai-bundle``:

- :class:`ScoringSpec`: classes, input size and channels, how pixels map to [0, 1] (intensity
  mapping, DICOM windows and frames), the dtype batches travel in, and the decision taken on
  validation (temperature, operating-point thresholds), plus the model's SHA-256. It is built from a
  run folder, and written into an exported model's metadata, so an ``.onnx`` file alone is enough
  to score a folder exactly as the run would.
- :class:`CalibratedClassifier`: a module from the raw batch the loader produces (uint8 0..255, or
  float in [0, 1], NCHW) to calibrated probabilities. Normalisation by the backbone's mean and std
  and division by the fitted temperature happen inside it, so the exported graph and the PyTorch
  scorer compute the same function.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

import medvision
from medvision.io.files import sha256

Inputs = Literal["dicom", "images", "slides"]
Transfer = Literal["uint8", "float16", "float32"]


@dataclass(frozen=True)
class ScoringSpec:
    """Everything scoring needs about a model besides its weights (see the module docstring)."""

    name: str
    classes: list[str]
    image_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    inputs: Inputs
    """Which files are scored: DICOM (a run trained on DICOM) or PNG/JPEG/TIFF/BMP images (any other source)."""
    intensity: str
    """``data.intensity`` of the recipe: how native pixel values map to [0, 1]."""
    dicom: dict[str, Any] = field(default_factory=dict)
    """The recipe's ``data.dicom`` section (windows, VOI function, frames)."""
    slides: dict[str, Any] = field(default_factory=dict)
    """The recipe's ``data.slides`` section (magnification, tile size, tissue rule, stain) for slide runs."""
    aggregate: str = "mean"
    """``evaluation.patient_aggregate``: how a slide's tile probabilities become the slide's."""
    top_k: int = 3
    transfer: Transfer = "float32"
    """Dtype of the unnormalised batches: uint8 for 8-bit sources, float otherwise (DICOM windows, 16-bit)."""
    decision: dict[str, Any] = field(default_factory=dict)
    """:class:`medvision.evaluation.Decision` as JSON: temperature, positive class, operating points."""
    tta: list[str] = field(default_factory=list)
    """``evaluation.tta``: the transforms whose calibrated probabilities are averaged with the image's own."""
    model_sha256: str = ""
    """SHA-256 of the run's ``model.safetensors``: the weights every exported format was made from."""
    recipe_sha256: str = ""
    medvision_version: str = ""

    @property
    def temperature(self) -> float:
        return float(self.decision.get("temperature", 1.0)) if self.decision else 1.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, origin: str = "<json>") -> ScoringSpec:
        """Reads :meth:`to_json` back; ``origin`` names the file in the error for a foreign or damaged record."""
        try:
            data = json.loads(text)
            data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
            return cls(**data)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{origin}: not a medvision scoring spec ({type(err).__name__}: {err})") from None

    @classmethod
    def from_run(cls, run_dir: Path, recipe: Any, meta: dict[str, Any]) -> ScoringSpec:
        """The spec of a finished run, from its resolved recipe and ``run.json``.

        Runs written before ``run.json`` recorded ``transfer`` score in float32 (exact for any depth)
        for images, and as the recipe says for DICOM (whose windows are never 8-bit).
        """
        source = recipe.data.source
        inputs: Inputs = "dicom" if source == "dicom" else "slides" if source == "slides" else "images"
        if inputs == "dicom":
            transfer: Transfer = "float16" if recipe.data.transfer == "float16" else "float32"
        else:
            transfer = meta.get("transfer") or (recipe.data.transfer if recipe.data.transfer != "auto" else "float32")
        return cls(
            name=str(meta.get("name", run_dir.name)),
            classes=list(meta["classes"]),
            image_size=int(meta.get("image_size", recipe.data.image_size)),
            in_chans=int(meta["in_chans"]),
            mean=tuple(float(v) for v in meta["mean"]),
            std=tuple(float(v) for v in meta["std"]),
            inputs=inputs,
            intensity=recipe.data.intensity,
            dicom=recipe.data.dicom.model_dump(mode="json"),
            slides=recipe.data.slides.model_dump(mode="json") if inputs == "slides" else {},
            aggregate=recipe.evaluation.patient_aggregate,
            top_k=recipe.evaluation.top_k,
            transfer=transfer,
            decision=dict(meta.get("decision") or {}),
            tta=list(recipe.evaluation.tta),
            model_sha256=sha256(run_dir / "model.safetensors"),
            recipe_sha256=sha256(run_dir / "recipe.yaml"),
            medvision_version=medvision.__version__,
        )


class CalibratedClassifier(nn.Module):
    """Raw batch (uint8 0..255 or float in [0, 1], NCHW) -> calibrated class probabilities (N, K).

    ``softmax(model(normalise(x)) / temperature)``: the probabilities ``score`` writes and exported
    models return. The temperature is a buffer, so it travels with the weights into any export.
    With ``tta`` (``evaluation.tta``) the calibrated probabilities of the image and of each listed
    transform of it (see :func:`medvision.data.transforms.tta_views`) are averaged, inside the
    module, so exported models do the same.

    Examples:
        >>> probs = CalibratedClassifier(model, mean, std, temperature=1.3)(batch_uint8)
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], temperature: float = 1.0,
                 tta: tuple[str, ...] | list[str] = ()) -> None:  # fmt: skip
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"calibration temperature must be > 0, got {temperature}")
        unknown = sorted(set(tta) - {"hflip", "vflip", "rot90"})
        if unknown:
            raise ValueError(f"tta: {unknown} not among hflip, vflip, rot90")
        self.hflip, self.vflip, self.rot90 = "hflip" in tta, "vflip" in tta, "rot90" in tta  # scriptable flags
        self.model = model
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.temperature: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the arithmetic of medvision.data.transforms.normalize_batch, with the constants as buffers so that
        # they move with .to(device) and are folded into an exported graph
        scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
        z = (x.float() * scale - self.mean) / self.std
        probs = torch.softmax(self.model(z).float() / self.temperature, dim=1)
        views = 1
        if self.hflip:
            probs = probs + torch.softmax(self.model(z.flip(-1)).float() / self.temperature, dim=1)
            views += 1
        if self.vflip:
            probs = probs + torch.softmax(self.model(z.flip(-2)).float() / self.temperature, dim=1)
            views += 1
        if self.rot90:
            probs = probs + torch.softmax(self.model(torch.rot90(z, 1, [-2, -1])).float() / self.temperature, dim=1)
            views += 1
        return probs / views

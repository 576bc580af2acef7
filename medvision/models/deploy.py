"""The function every scoring path computes, from raw batch to calibrated probabilities.

Shared by ``score`` (PyTorch or ONNX Runtime), ``export --format onnx`` and ``export --format monai-bundle``
(its companion, :class:`medvision.runs.ScoringSpec`, says how files become that raw batch):

- :class:`CalibratedClassifier`: a module from the raw batch the loader produces (uint8 0..255, or
  float in [0, 1], NCHW) to calibrated probabilities. Normalisation by the backbone's mean and std
  and division by the fitted temperature happen inside it, so the exported graph and the PyTorch
  scorer compute the same function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """The raw batch as the backbone takes it (the arithmetic of
        :func:`medvision.data.transforms.normalize_batch`, with the constants as buffers so that they move with
        ``.to(device)`` and are folded into an exported graph)."""
        scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
        return (x.float() * scale - self.mean) / self.std

    def calibrate(self, logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities of the image's own ``logits``, averaged with those of its TTA views of ``z``."""
        probs = torch.softmax(logits.float() / self.temperature, dim=1)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.normalise(x)
        return self.calibrate(self.model(z), z)

    @torch.jit.unused
    def probs_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward`'s probabilities and the backbone's pre-logits features of the image itself (the
        input of an ABMIL head), in one pass of the backbone over the image."""
        z = self.normalise(x)
        backbone: Any = self.model  # a timm model: forward_features, forward_head and get_classifier
        feats = backbone.forward_head(backbone.forward_features(z), pre_logits=True)
        return self.calibrate(backbone.get_classifier()(feats), z), feats


class RawBatchInput(nn.Module):
    """The raw-batch contract (uint8 0..255 or float in [0, 1]) around a :class:`CalibratedClassifier` traced at
    float32, for TorchScript exports of models that ``torch.jit.script`` cannot hold.

    A trace records the one path its example took through :meth:`CalibratedClassifier.normalise`: traced on
    float32, it reads a uint8 batch as floats 0..255 (probabilities 0.147 off on a kNN run). Scripted around the
    trace, this module takes the dtype branch again and hands the trace what it was traced on: ``x / 255`` in
    float32 is the very arithmetic ``normalise`` does for uint8, and its float path multiplies by 1.0 (exact),
    so the result is bit for bit the untraced model's.

    Examples:
        >>> traced = torch.jit.trace(calibrated, batch.float())
        >>> scripted = torch.jit.script(RawBatchInput(traced))  # takes uint8 or float again
    """

    def __init__(self, traced: nn.Module) -> None:
        super().__init__()
        self.net = traced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            return self.net(x.float() * (1.0 / 255.0))
        return self.net(x.float())

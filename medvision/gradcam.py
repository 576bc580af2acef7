"""Where did the model look? Grad-CAM and Grad-CAM++ heatmaps for timm CNNs.

The target layer needs no configuration: it is the output of ``model.forward_features`` (the last
convolutional stage, the feature map that ``model.forward_head`` pools and classifies). Taking the
feature map as a detached leaf and differentiating only ``forward_head`` gives exact class-score
gradients without hooks, and works when every parameter is frozen. Vision transformers return
tokens, not a (B, C, H, W) map, and are refused with :class:`ExplainError`.

``medvision explain RUN_DIR --images ...`` lands in :func:`explain_images`, which reads each image
through the run's own preprocessing and overlays the heatmap on the image the model actually saw.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, cast

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvision.errors import MedvisionError

log = logging.getLogger("medvision")
Method = Literal["gradcam", "gradcam++"]
METHODS: tuple[str, ...] = ("gradcam", "gradcam++")


class ExplainError(MedvisionError, ValueError):
    """A model, method, target or image that Grad-CAM cannot work with; the message says what was expected."""


def target_layer_name(model: nn.Module) -> str:
    """Names the layer whose output is explained, for logs and reports.

    timm's ``feature_info`` names the last stage (``layer4`` in a ResNet). Some models add a 1x1 head
    convolution after it inside ``forward_features`` (EfficientNet's ``conv_head``); there the channel
    counts differ and the name says the map comes after that stage.
    """
    info = getattr(model, "feature_info", None)
    last = info[-1] if isinstance(info, list) and info and isinstance(info[-1], dict) else {}
    module = str(last.get("module") or "")
    if not module:
        return "forward_features"
    if last.get("num_chs") not in (None, getattr(model, "num_features", last.get("num_chs"))):
        return f"forward_features (after {module})"
    return module


def check_method(method: str) -> Method:
    if method not in METHODS:
        raise ExplainError(f"method {method!r} is not one of {METHODS}")
    return cast(Method, method)


def _weights(acts: torch.Tensor, grads: torch.Tensor, method: Method) -> torch.Tensor:
    """Per-channel weights (B, C) of the feature map for one class score."""
    if method == "gradcam":
        return grads.mean(dim=(2, 3))
    # Grad-CAM++ (Chattopadhay et al. 2018), with exp(score) folded into powers of the gradient.
    g2, g3 = grads.pow(2), grads.pow(3)
    denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), 0.0)
    return (alpha * grads.clamp(min=0)).sum(dim=(2, 3))


def cams_and_logits(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor | None, method: Method
) -> tuple[np.ndarray, torch.Tensor]:
    """Heatmaps (B, H, W) in [0, 1] and the logits (B, K) of one forward pass."""
    if images.ndim != 4:
        raise ExplainError(f"images must be a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    timm_model: Any = model
    if not (hasattr(timm_model, "forward_features") and hasattr(timm_model, "forward_head")):
        raise ExplainError(f"{type(model).__name__} has no forward_features/forward_head; expected a timm model")
    param = next(model.parameters(), None)
    x = images.to(param.device if param is not None else images.device, dtype=torch.float32)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():  # the backbone needs no graph: gradients stop at the feature map
            feats = timm_model.forward_features(x)
        if not isinstance(feats, torch.Tensor) or feats.ndim != 4:
            shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ExplainError(
                f"{type(model).__name__}: forward_features gave {shape}, not a (B, C, H, W) feature map; "
                "Grad-CAM needs a CNN (vision transformers return tokens)"
            )
        with torch.enable_grad():
            feats = feats.detach().float().requires_grad_(True)
            logits = timm_model.forward_head(feats)
            if target is None:
                target = logits.argmax(dim=1)
            target = torch.as_tensor(target, device=logits.device).long().reshape(-1)
            n_classes = logits.shape[1]
            if target.shape[0] != logits.shape[0] or bool(((target < 0) | (target >= n_classes)).any()):
                raise ExplainError(
                    f"target {target.tolist()}: expected one class index in [0, {n_classes}) per image "
                    f"({logits.shape[0]} images)"
                )
            score = logits.gather(1, target[:, None]).sum()
            (grads,) = torch.autograd.grad(score, feats)
    finally:
        for m, was_training in modes.items():
            m.train(was_training)
    acts = feats.detach()
    cam = F.relu((_weights(acts, grads, method)[:, :, None, None] * acts).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / torch.where(peak > 0, peak, torch.ones_like(peak)), 0.0)
    return cam.clamp(0, 1).cpu().numpy().astype(np.float32), logits.detach()


def grad_cam(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor | None = None, method: Method = "gradcam"
) -> np.ndarray:
    """Class-activation heatmaps (B, H, W), float32 in [0, 1], at the input's resolution.

    ``target`` is one class index per image (default: the predicted class). Each map is divided by
    its own maximum, so maps show where, not how strongly; a map with no positive evidence stays all
    zero. The model runs in eval mode and fp32 (autocast would round the gradients), and each of its
    modules gets its train/eval mode back afterwards.

    The map has one value per feature cell (3 x 3 for a 96-pixel input to a stride-32 CNN), which
    bilinear upsampling places at the cell's centre. A cell's receptive field is not centred there
    (with symmetric padding it sits up-left of it), so a peak can lie up to about half a stride
    (16 pixels) from the structure it points at: read heatmaps as regions, not pixels.

    Examples:
        >>> heat = grad_cam(bundle.model, batch, method="gradcam++")  # (B, H, W)
    """
    return cams_and_logits(model, images, target, check_method(method))[0]


def display_image(tensor: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """The normalised model input (C, H, W) back as an H x W x 3 uint8 picture.

    Three channels are shown as RGB; any other count shows the first channel in grey (for several
    DICOM windows, the first window), so the picture is exactly what the model saw, not the file.
    """
    if tensor.ndim != 3 or len(mean) != tensor.shape[0] or len(std) != tensor.shape[0]:
        raise ExplainError(
            f"display_image: tensor of shape {tuple(tensor.shape)} needs (C, H, W) with C == len(mean) == len(std) "
            f"(got {len(mean)} and {len(std)})"
        )
    x = tensor.detach().float().cpu().numpy()
    x = x * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    rgb = x.transpose(1, 2, 0) if x.shape[0] == 3 else np.repeat(x[0][:, :, None], 3, axis=2)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blends a jet-coloured heatmap (H, W in [0, 1]) over an H x W x 3 uint8 RGB image."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ExplainError(f"overlay: image must be H x W x 3 uint8, got {image.shape} {image.dtype}")
    if heatmap.shape != image.shape[:2]:
        raise ExplainError(f"overlay: heatmap shape {heatmap.shape} does not match image {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ExplainError(f"overlay: alpha {alpha} must be in [0, 1]")
    levels = np.rint(np.clip(np.nan_to_num(heatmap), 0.0, 1.0) * 255).astype(np.uint8)
    colour = cv2.applyColorMap(levels, cv2.COLORMAP_JET)[:, :, ::-1]  # OpenCV colours are BGR
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def confident_errors(
    labels: np.ndarray, probs: np.ndarray, n: int = 4, positive: int = 1
) -> list[tuple[int, str, float]]:
    """The wrong predictions the model was surest of: the cases worth a heatmap in a report.

    Binary (K == 2): the ``n`` most confident false positives, then the ``n`` most confident false
    negatives. Multiclass: the ``2 * n`` most confident wrong predictions (kind ``"wrong"``). The
    confidence is the probability of the predicted (wrong) class, so a false negative with a positive
    probability of 0.1 has confidence 0.9. Within a kind the list runs from most to least confident.
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"confident_errors: need labels (N,) and probs (N, K>=2), got {labels.shape}, {probs.shape}")
    if not 0 <= positive < probs.shape[1]:
        raise ValueError(f"confident_errors: positive {positive} is not a class index in [0, {probs.shape[1]})")
    pred = probs.argmax(axis=1)
    conf = probs[np.arange(len(pred)), pred]

    def top(mask: np.ndarray, kind: str, k: int) -> list[tuple[int, str, float]]:
        idx = np.flatnonzero(mask)
        idx = idx[np.argsort(-conf[idx], kind="stable")][:k]
        return [(int(i), kind, float(conf[i])) for i in idx]

    if probs.shape[1] == 2:
        truth, called = labels == positive, pred == positive
        return top(~truth & called, "false positive", n) + top(truth & ~called, "false negative", n)
    return top(pred != labels, "wrong", 2 * n)

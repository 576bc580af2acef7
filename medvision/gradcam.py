"""Where did the model look? Grad-CAM and Grad-CAM++ heatmaps for timm CNNs.

The target layer needs no configuration: it is the output of ``model.forward_features`` (the last
convolutional stage, the feature map that ``model.forward_head`` pools and classifies). Taking the
feature map as a detached leaf and differentiating only ``forward_head`` gives exact class-score
gradients without hooks, and works when every parameter is frozen. Some timm models (Swin, SwinV2,
MambaOut: ``model.output_fmt == "NHWC"``) give that map channels-last; it is permuted to
(B, C, H, W) for the CAM and handed back channels-last to ``forward_head``, which expects it so.
Vision transformers return tokens, not a map, and are refused with :class:`ExplainError`.

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


def channels_last(model: nn.Module) -> bool:
    """Whether ``forward_features`` gives (B, H, W, C) rather than (B, C, H, W).

    timm records this as ``output_fmt``: a plain string in recent releases, a ``Format`` enum (a ``str``
    subclass whose ``value`` is the string) in others. Reading the map as (B, C, H, W) when it is
    channels-last gives a meaningless CAM with no error, so the attribute is trusted, not the shape.
    """
    fmt = getattr(model, "output_fmt", "NCHW")
    return str(getattr(fmt, "value", fmt)).upper() == "NHWC"


def coarse_note(grid: tuple[int, int], size: tuple[int, int]) -> str | None:
    """A caption warning for heatmaps drawn from fewer than 4 x 4 feature cells, else ``None``.

    A 64-pixel input to a stride-32 model leaves a 2 x 2 map: the upsampled heatmap is then a smooth
    blend of four numbers, and a reader should not look for structure in it.

    Examples:
        >>> coarse_note((2, 2), (64, 64))
        '2×2 feature map at 64 px: coarse'
    """
    if min(grid) >= 4:
        return None
    px = f"{size[0]} px" if size[0] == size[1] else f"{size[0]}×{size[1]} px"
    return f"{grid[0]}×{grid[1]} feature map at {px}: coarse"


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
) -> tuple[np.ndarray, torch.Tensor, tuple[int, int]]:
    """Heatmaps (B, H, W) in [0, 1], the logits (B, K) of one forward pass, and the feature map's
    (rows, columns), so a caller can say how coarse the heatmaps are (:func:`coarse_note`)."""
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
        nhwc = channels_last(model)
        with torch.enable_grad():
            # the leaf is always (B, C, H, W); a channels-last head gets a permuted view of it
            feats = (feats.permute(0, 3, 1, 2) if nhwc else feats).detach().float().requires_grad_(True)
            logits = timm_model.forward_head(feats.permute(0, 2, 3, 1) if nhwc else feats)
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
    grid = (int(cam.shape[-2]), int(cam.shape[-1]))
    cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    # min-max per map, as common Grad-CAM tooling does: dividing by the peak alone left a 2 x 2 map
    # whose four cells were all positive as a near-uniform wash
    low = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - low
    cam = torch.where(span > 0, (cam - low) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
    return cam.clamp(0, 1).cpu().numpy().astype(np.float32), logits.detach(), grid


def grad_cam(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor | None = None, method: Method = "gradcam"
) -> np.ndarray:
    """Class-activation heatmaps (B, H, W), float32 in [0, 1], at the input's resolution.

    ``target`` is one class index per image (default: the predicted class). Each map is scaled by
    its own minimum and maximum to [0, 1], so maps show where, not how strongly; a constant map
    (no positive evidence, or a single feature cell) is all zero. The model runs in eval mode and
    fp32 (autocast would round the gradients), and each of its modules gets its train/eval mode
    back afterwards.

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

"""Grad-CAM against an independent reference, for channels-first and channels-last timm models.

Swin and MambaOut give their last feature map as (B, H, W, C) (``output_fmt == "NHWC"``). Read as
(B, C, H, W), the heatmap is noise (correlation 0.005 with the right one) and nothing fails, so each
model's map is checked against one computed here another way: a forward hook on the module that ends
``forward_features``, a full ``model(x)`` forward and backward, and the textbook formula on the
activations and gradients permuted to (B, C, H, W). Random weights suffice: the two computations must
agree for any weights. Inputs are not square, so a swapped height and width would show too.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from medvision.gradcam import cams_and_logits, channels_last, coarse_note, grad_cam
from medvision.results import explain_panel

TINY_SWIN = {"window_size": 2, "embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}

# timm name, extra create_model arguments, the module whose output is forward_features', input (H, W)
MODELS = [
    ("resnet18", {}, "layer4", (96, 64)),
    ("efficientnet_lite0", {}, "bn2", (96, 64)),
    ("convnext_atto", {}, "norm_pre", (96, 64)),
    ("mambaout_femto", {}, "stages", (96, 64)),
    ("swin_tiny_patch4_window7_224", {**TINY_SWIN, "img_size": (128, 64)}, "norm", (128, 64)),
]


def reference_cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor, layer: str, nhwc: bool) -> np.ndarray:
    """Grad-CAM from hooks on ``layer`` during an ordinary forward and backward pass, min-max scaled."""
    grabbed: dict[str, torch.Tensor] = {}

    def hook(_: nn.Module, __: Any, output: torch.Tensor) -> None:
        output.retain_grad()
        grabbed["acts"] = output

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        x = x.clone().requires_grad_(True)  # a graph even where the first layers hold no trainable weight
        logits = model.eval()(x)
        logits.gather(1, target[:, None]).sum().backward()
    finally:
        handle.remove()
    acts, grads = grabbed["acts"].detach(), grabbed["acts"].grad
    assert grads is not None
    if nhwc:
        acts, grads = acts.permute(0, 3, 1, 2), grads.permute(0, 3, 1, 2)
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0].numpy()
    low, high = cam.min(axis=(1, 2), keepdims=True), cam.max(axis=(1, 2), keepdims=True)
    return np.where(high > low, (cam - low) / np.where(high > low, high - low, 1.0), 0.0)


@pytest.mark.parametrize(("name", "kwargs", "layer", "size"), MODELS, ids=[m[0].split("_")[0] for m in MODELS])
def test_cam_matches_a_hook_reference(name: str, kwargs: dict[str, Any], layer: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model: Any = timm.create_model(name, num_classes=3, **kwargs).eval()
    x = torch.randn(2, 3, *size)
    target = torch.tensor([0, 2])
    nhwc = name.startswith(("mambaout", "swin"))
    assert channels_last(model) == nhwc
    heat, logits, grid = cams_and_logits(model, x, target, "gradcam")
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-4)  # the head was given the layout it expects
    assert grid == (size[0] // 32, size[1] // 32)
    expected = reference_cam(model, x, target, layer, nhwc)
    assert heat.shape == expected.shape == (2, *size)
    np.testing.assert_allclose(heat, expected, atol=1e-4)
    assert heat.max() == pytest.approx(1.0)  # the reference is no all-zero map that anything would match
    assert all(h.min() == 0.0 and h.max() in (0.0, pytest.approx(1.0)) for h in heat)
    if nhwc:  # the check can fail: the old reading (channels taken from the last spatial axis) is far off
        with pytest.raises(AssertionError):
            np.testing.assert_allclose(heat, reference_cam(model, x, target, layer, nhwc=False), atol=1e-2)


def test_output_fmt_as_string_or_enum() -> None:
    from enum import Enum

    class Format(str, Enum):  # timm releases that store output_fmt as an enum
        NCHW = "NCHW"
        NHWC = "NHWC"

    assert channels_last(SimpleNamespace(output_fmt=Format.NHWC))  # type: ignore[arg-type]
    assert not channels_last(SimpleNamespace(output_fmt=Format.NCHW))  # type: ignore[arg-type]
    assert channels_last(SimpleNamespace(output_fmt="NHWC"))  # type: ignore[arg-type]
    assert not channels_last(nn.Linear(2, 2))  # no attribute: channels first


class Passthrough(nn.Module):
    """forward_features is the input itself; the head averages it: the CAM is the input, scaled."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 2)
        nn.init.ones_(self.fc.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def test_maps_are_min_max_scaled() -> None:
    """An all-positive 2 x 2 map spans [0, 1]; divided by its peak alone it stayed in [0.25, 1], a flat wash."""
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    heat = grad_cam(Passthrough(), x, torch.tensor([0]))
    np.testing.assert_allclose(heat[0], [[0.0, 1 / 3], [2 / 3, 1.0]], atol=1e-6)
    flat = grad_cam(Passthrough(), torch.full((1, 1, 2, 2), 5.0), torch.tensor([0]))
    assert np.array_equal(flat, np.zeros((1, 2, 2), np.float32))  # constant: zeros, not NaN


def test_coarse_note() -> None:
    assert coarse_note((2, 2), (64, 64)) == "2×2 feature map at 64 px: coarse"
    assert coarse_note((3, 2), (96, 64)) == "3×2 feature map at 96×64 px: coarse"
    assert coarse_note((4, 4), (128, 128)) is None and coarse_note((7, 7), (224, 224)) is None


@pytest.mark.parametrize(("size", "coarse"), [(64, True), (128, False)])
def test_report_panel_titles_say_when_the_map_is_coarse(size: int, coarse: bool) -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=2).eval()  # stride 32
    images = torch.rand(2, 3, size, size)
    bundle = SimpleNamespace(model=model, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    outputs = SimpleNamespace(labels=np.array([0, 1]), probs=lambda _: np.array([[0.2, 0.8], [0.9, 0.1]]))
    decision = SimpleNamespace(temperature=1.0, positive=1)
    cfg = SimpleNamespace(explain=1, explain_method="gradcam")
    panel = explain_panel(bundle, [(im, 0) for im in images], outputs, decision, ["a", "b"], cfg,  # type: ignore[arg-type]
                          torch.device("cpu"))  # fmt: skip
    titles = [title for _, _, title in panel]
    assert [t.split(";")[0] for t in titles] == ["false positive: a → b (0.80)", "false negative: b → a (0.90)"]
    note = f"; 2×2 feature map at {size} px: coarse"
    assert all(t.endswith(note) for t in titles) if coarse else all(";" not in t for t in titles)

"""The two views SimCLR compares: random crops plus the augmentations the domain is invariant to.

Pathology (and other colour microscopy): crops, flips, 90-degree rotations (tissue has no up),
H&E stain jitter and colour jitter (stain batches and scanners differ), occasional greyscale and
blur. Radiology: crops, window jitter (brightness/contrast), gamma, small rotations, blur and noise;
no colour (the images have none) and no flips (anatomy has sides). The recipe's own
``augment.transforms`` are appended to either, so a user can add what their images need.
"""

from __future__ import annotations

from typing import Any, Literal

import albumentations as A
import torch
from albumentations.pytorch import ToTensorV2

from medvision.data.transforms import explicit, tissue_invariances
from medvision.recipe import Recipe

ViewKind = Literal["pathology", "radiology"]


def view_kind(recipe: Recipe, channels: int) -> ViewKind:
    """``pretrain.views``, with ``auto`` resolved: the augment preset's domain, else by channel count."""
    if recipe.pretrain.views != "auto":
        return recipe.pretrain.views
    if recipe.augment.preset in ("pathology", "radiology"):
        return recipe.augment.preset
    return "pathology" if channels == 3 else "radiology"


def view_transforms(kind: ViewKind, image_size: int, min_crop: float, extra: list[Any] | None = None) -> A.Compose:
    """One random view of a [0, 1] float image: crop to ``image_size``, then the domain's augmentations."""
    steps: list[A.BasicTransform] = [
        A.RandomResizedCrop(size=(image_size, image_size), scale=(min_crop, 1.0), ratio=(3 / 4, 4 / 3)),
    ]
    if kind == "pathology":
        steps += [
            *tissue_invariances(0.2, 0.1),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.8),
            A.ToGray(p=0.1),
        ]
    else:
        steps += [
            A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=0.8),
            A.RandomGamma(gamma_limit=(70, 150), p=0.5),
            A.Affine(rotate=(-10, 10), p=0.5),
            A.GaussNoise(std_range=(0.01, 0.05), p=0.3),
        ]
    blur = max(3, (image_size // 10) | 1)  # an odd kernel about a tenth of the side, as in SimCLR
    steps.append(A.GaussianBlur(blur_limit=(3, blur), sigma_limit=(0.1, 2.0), p=0.5))
    steps += explicit(extra or [])
    steps.append(ToTensorV2())
    return A.Compose(steps)


class TwoViews:
    """A transform that returns two independent views of one image, stacked: ``{"image": (2, C, H, W)}``.

    It takes the dataset's per-sample seed like any albumentations pipeline, so the views of a
    sample depend only on (seed, epoch, position) and a resumed run draws the same ones.
    """

    def __init__(self, transform: A.Compose) -> None:
        self.transform = transform

    def set_random_seed(self, seed: int) -> None:
        self.transform.set_random_seed(seed)

    def __call__(self, image: Any) -> dict[str, torch.Tensor]:
        return {"image": torch.stack([self.transform(image=image)["image"], self.transform(image=image)["image"]])}

"""From a recipe to the objects a run needs: the model and the datasets of its splits.

Training, ``evaluate`` and ``export`` all build through here, so an evaluated or exported image
goes through exactly the preprocessing the model was trained with. Device, precision, loaders and
ranks are :mod:`medvision.runtime`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from torch import nn

from medvision.data.dataset import ImageDataset, Transfer
from medvision.data.table import SampleTable, subset_indices
from medvision.data.transforms import build_transforms
from medvision.models.backbone import create_backbone, data_config
from medvision.recipe import Recipe
from medvision.runtime import Inputs

log = logging.getLogger("medvision")


@dataclass
class ModelBundle:
    """The model plus what preprocessing needs to know about it."""

    model: nn.Module
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def build_model(recipe: Recipe, table: SampleTable) -> ModelBundle:
    in_chans = recipe.model.in_chans or (1 if table.grayscale else 3)
    model = create_backbone(recipe.model, num_classes=len(table.classes), in_chans=in_chans)
    cfg = data_config(model, in_chans)
    return ModelBundle(model=model, in_chans=in_chans, mean=cfg["mean"], std=cfg["std"])


PROBES = 64
"""Images of a split :func:`resolve_transfer` decodes: a folder of 8-bit PNGs with 16-bit ones among them went uint8
when the first image alone was probed, and 100 grey levels of a 16-bit image reached the model as one."""


def resolve_transfer(setting: str, table: SampleTable, indices: np.ndarray) -> Transfer:
    """``auto``: uint8 when the source is 8-bit (probed on up to :data:`PROBES` images spread over the split),
    float32 otherwise (exact for any depth)."""
    if setting != "auto":
        return setting  # type: ignore[return-value]
    if len(indices) == 0:
        return "float32"
    probes = np.unique(indices[np.linspace(0, len(indices) - 1, min(len(indices), PROBES)).astype(np.int64)])
    for i in probes:
        try:
            image = table.loader(int(i))
        except Exception:  # the bad file is reported when it is loaded; float32 is exact for any depth
            return "float32"
        if image.dtype != np.uint8:
            return "float32"
    return "uint8"


def split_dataset(recipe: Recipe, table: SampleTable, bundle: ModelBundle, split: str, train: bool) -> ImageDataset:
    """The dataset of one split; training splits get the recipe's augmentation, others resize only.

    Its tensors are unnormalised and compact (``data.transfer``); :class:`Inputs` normalises them on
    the device.
    """
    aug = recipe.augment if train else None
    transform = build_transforms(aug, recipe.data.image_size, bundle.mean, bundle.std, normalize=False)
    fraction = recipe.data.train_fraction if split == "train" else 1.0
    indices = subset_indices(table, split, recipe.data.limit, recipe.seed, fraction)
    transfer = resolve_transfer(recipe.data.transfer, table, indices)
    return ImageDataset(table, indices, transform, recipe.data.intensity, bundle.in_chans, transfer)


def model_inputs(recipe: Recipe, bundle: ModelBundle) -> Inputs:
    return Inputs(bundle.mean, bundle.std, recipe.train.channels_last, recipe.augment.on_device)

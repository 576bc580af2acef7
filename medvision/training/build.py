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
    """The recipe's backbone; ``model.in_chans`` unset is 1 when every image of the table is grey, else 3 (the
    sources read every image's header: :func:`medvision.data.sources.decide_grayscale`)."""
    in_chans = recipe.model.in_chans or (1 if table.grayscale else 3)
    model = create_backbone(recipe.model, num_classes=len(table.classes), in_chans=in_chans)
    cfg = data_config(model, in_chans)
    return ModelBundle(model=model, in_chans=in_chans, mean=cfg["mean"], std=cfg["std"])


PROBES = 64
"""Images :func:`resolve_transfer` decodes, spread over the whole table, for a source that does not record its
images' dtypes (:attr:`SampleTable.pixel_dtypes`; folder, CSV and npz sources do)."""


def resolve_transfer(setting: str, table: SampleTable) -> Transfer:
    """``auto``: uint8 when every image of the table is 8-bit, float32 otherwise (exact for any depth).

    Decided once for the whole table, not per split, so train, evaluate and score of the same data agree (the
    run records the choice in ``run.json``): folder and CSV sources read every file's header bit depth, so one
    16-bit PNG among 600 8-bit ones makes it float32.
    """
    known = table.pixel_dtypes
    if setting != "auto":
        if setting == "uint8" and known is not None and known != {"uint8"}:
            log.warning("%s: data.transfer uint8 rounds images of dtype %s to 256 levels; data.transfer auto keeps "
                        "them exact (float32)", table.origin, ", ".join(sorted(known - {"uint8"})))  # fmt: skip
        return setting  # type: ignore[return-value]
    if known is not None:
        return "uint8" if known == {"uint8"} else "float32"
    if len(table) == 0:
        return "float32"
    for i in np.unique(np.linspace(0, len(table) - 1, min(len(table), PROBES)).astype(np.int64)):
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
    transfer = resolve_transfer(recipe.data.transfer, table)
    return ImageDataset(table, split_indices(recipe, table, split), transform, recipe.data.intensity, bundle.in_chans,
                        transfer)  # fmt: skip


def split_indices(recipe: Recipe, table: SampleTable, split: str) -> np.ndarray:
    """The rows of ``split`` a run uses: ``data.limit`` of them, and ``data.train_fraction`` of the training ones."""
    fraction = recipe.data.train_fraction if split == "train" else 1.0
    return subset_indices(table, split, recipe.data.limit, recipe.seed, fraction)


def model_inputs(recipe: Recipe, bundle: ModelBundle) -> Inputs:
    return Inputs(bundle.mean, bundle.std, recipe.train.channels_last, recipe.augment.on_device)

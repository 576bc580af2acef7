"""From a recipe to the objects a run needs: device, sample table, model, datasets and loaders.

Training, ``evaluate`` and ``score`` all build through here, so a scored image goes through
exactly the preprocessing the model was trained with.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from medvision.data.dataset import ImageDataset, Transfer
from medvision.data.sources import SampleTable, subset_indices
from medvision.data.transforms import build_transforms, flip_rot90_batch, normalize_batch
from medvision.models.backbone import create_backbone, data_config
from medvision.recipe import Recipe

log = logging.getLogger("medvision")


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device) -> str:
    """Turns ``auto`` into bf16 where the hardware runs it natively, else ``none``; warns on emulated bf16."""
    native_bf16 = (
        torch.cuda.is_bf16_supported() if device.type == "cuda" else torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
    if amp == "auto":
        return "bf16" if native_bf16 else ("fp16" if device.type == "cuda" else "none")
    if amp == "bf16" and not native_bf16:
        log.warning("train.amp bf16: this %s has no native bf16; it is emulated and much slower than fp32", device.type)
    return amp


def resolve_workers(setting: int | str, device: torch.device) -> int:
    """``auto``: no workers on a CPU-only machine (they would compete with the model for cores)."""
    if setting != "auto":
        return int(setting)
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffles by (seed, epoch) and gives each sample its own augmentation seed: ``(index, seed)`` keys.

    The order and every sample's augmentation depend only on (seed, epoch, position), never on the
    worker that loads it, so workers can persist across epochs and a resumed run still sees
    exactly the data an uninterrupted one would.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g).tolist()
        return iter(zip(order, seeds, strict=True))

    def __len__(self) -> int:
        return self.n


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    sampler: Sampler[tuple[int, int]] | None = None,
) -> DataLoader[tuple[torch.Tensor, int]]:
    """Workers persist across epochs and prefetch; batches are pinned for ``non_blocking`` copies to CUDA."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


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


def resolve_transfer(setting: str, table: SampleTable, indices: np.ndarray) -> Transfer:
    """``auto``: uint8 when the source is 8-bit (probed on the split's first image), float32 otherwise."""
    if setting != "auto":
        return setting  # type: ignore[return-value]
    if len(indices) == 0:
        return "float32"
    try:
        first = table.loader(int(indices[0]))
    except Exception:  # the bad file is reported when it is loaded; float32 is exact for any depth
        return "float32"
    return "uint8" if first.dtype == np.uint8 else "float32"


def split_dataset(recipe: Recipe, table: SampleTable, bundle: ModelBundle, split: str, train: bool) -> ImageDataset:
    """The dataset of one split; training splits get the recipe's augmentation, others resize only.

    Its tensors are unnormalised and compact (``data.transfer``); :class:`Inputs` normalises them on
    the device.
    """
    aug = recipe.augment if train else None
    transform = build_transforms(aug, recipe.data.image_size, bundle.mean, bundle.std, normalize=False)
    indices = subset_indices(table, split, recipe.data.limit, recipe.seed)
    transfer = resolve_transfer(recipe.data.transfer, table, indices)
    return ImageDataset(table, indices, transform, recipe.data.intensity, bundle.in_chans, transfer)


@dataclass(frozen=True)
class Inputs:
    """How a loader batch becomes model input on the device: copy (compact dtype), flips, normalise, layout."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels_last: bool
    flips: bool = False
    """Random per-image flips/rot90 on the device (``augment.on_device``); training batches only."""

    def __call__(self, x: torch.Tensor, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        if self.flips and generator is not None:
            x = flip_rot90_batch(x, generator)
        x = normalize_batch(x, self.mean, self.std)
        fmt = torch.channels_last if self.channels_last and x.ndim == 4 else torch.contiguous_format
        return x.contiguous(memory_format=fmt)


def model_inputs(recipe: Recipe, bundle: ModelBundle) -> Inputs:
    return Inputs(bundle.mean, bundle.std, recipe.train.channels_last, recipe.augment.on_device)

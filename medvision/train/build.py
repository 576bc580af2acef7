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

from medvision.data.dataset import ImageDataset
from medvision.data.sources import SampleTable, subset_indices
from medvision.data.transforms import build_transforms
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


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on (seed, epoch), so a resumed run sees the same data."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "transform"):
        info.dataset.transform.set_random_seed(torch.initial_seed() % 2**32)


def make_loader(
    dataset: ImageDataset, batch_size: int, workers: int, device: torch.device, sampler: Sampler[int] | None = None
) -> DataLoader[tuple[torch.Tensor, int]]:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        worker_init_fn=_seed_worker if workers else None,
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


def split_dataset(recipe: Recipe, table: SampleTable, bundle: ModelBundle, split: str, train: bool) -> ImageDataset:
    """The dataset of one split; training splits get the recipe's augmentation, others resize+normalise."""
    transform = build_transforms(recipe.augment if train else None, recipe.data.image_size, bundle.mean, bundle.std)
    indices = subset_indices(table, split, recipe.data.limit, recipe.seed)
    return ImageDataset(table, indices, transform, recipe.data.intensity, bundle.in_chans)

"""A torch Dataset over one split of a sample table."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from medvision.data.sources import SampleTable
from medvision.io.image import ImageReadError, Intensity, to_channels, to_unit_range


def prepare(
    raw: np.ndarray, intensity: Intensity, channels: int, transform: Callable[..., dict[str, torch.Tensor]]
) -> torch.Tensor:
    """Native pixels -> [0, 1] -> model channels -> transform: the one path training, evaluate and score share."""
    return transform(image=to_channels(to_unit_range(raw, intensity), channels))["image"]


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Yields ``(image CHW float32, label)``: native-depth pixels -> [0, 1] -> channels -> transform."""

    def __init__(
        self,
        table: SampleTable,
        indices: np.ndarray,
        transform: Callable[..., dict[str, torch.Tensor]],
        intensity: Intensity,
        channels: int,
    ) -> None:
        self.table = table
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.intensity = intensity
        self.channels = channels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        i = int(self.indices[k])
        try:
            raw = self.table.loader(i)
        except ImageReadError:
            raise
        except Exception as err:
            raise ImageReadError(f"{self.table.ids[i]}: {err}") from err
        return prepare(raw, self.intensity, self.channels, self.transform), int(self.table.labels[i])

    @property
    def ids(self) -> list[str]:
        return [self.table.ids[i] for i in self.indices]

    @property
    def groups(self) -> list[str]:
        return [self.table.groups[i] for i in self.indices]

"""A torch Dataset over one split of a sample table."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from medvision.data.table import SampleTable
from medvision.io.image import ImageReadError, Intensity, to_channels, to_unit_range

Transfer = Literal["uint8", "float16", "float32"]
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def prepare(
    raw: np.ndarray,
    intensity: Intensity,
    channels: int,
    transform: Callable[..., dict[str, torch.Tensor]],
    transfer: Transfer = "float32",
) -> torch.Tensor:
    """Native pixels -> [0, 1] -> model channels -> transform: the one path training, evaluate and score share.

    ``transfer`` is the dtype the tensor travels in. uint8 rounds the [0, 1] image to 256 levels,
    which loses nothing but interpolation rounding for an 8-bit source; float16 keeps 11 bits, for
    16-bit images and DICOM windows. The device divides by 255 (uint8) and normalises.
    """
    x = transform(image=to_channels(to_unit_range(raw, intensity), channels))["image"]
    if transfer == "uint8":  # in NumPy: torch's intra-op threads made this 7 ms/image on a busy 2-core CPU
        return torch.from_numpy(np.clip(np.rint(x.numpy() * 255.0), 0, 255).astype(np.uint8))
    return x.to(_DTYPES[transfer])


def measure_image(raw: np.ndarray, intensity: Intensity) -> dict[str, float]:
    """``mean_intensity``, ``height`` and ``width`` of a decoded image before resizing; the mean is over every
    pixel and colour channel (alpha dropped) on the 0-1 scale the model reads, after ``data.intensity``."""
    pixels = raw[..., :3] if raw.ndim == 3 and raw.shape[2] == 4 else raw
    mean = float(to_unit_range(pixels, intensity).mean(dtype=np.float64))
    return {"mean_intensity": mean, "height": float(raw.shape[0]), "width": float(raw.shape[1])}


class ImageMeasures(Dataset[dict[str, float]]):
    """Yields :func:`measure_image` of table rows, for the shift check between validation and test.

    An image that does not decode gives NaNs (left out of the statistics), never a crash at the end of a run.
    """

    def __init__(self, table: SampleTable, indices: np.ndarray, intensity: Intensity) -> None:
        self.table, self.indices, self.intensity = table, np.asarray(indices, dtype=np.int64), intensity

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, float]:
        try:
            raw = self.table.loader(int(self.indices[k]))
        except Exception:
            return {"mean_intensity": math.nan, "height": math.nan, "width": math.nan}
        return measure_image(raw, self.intensity)


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Yields ``(image CHW, label)``: native-depth pixels -> [0, 1] -> channels -> transform -> ``transfer`` dtype.

    An item key is an index, or ``(index, seed)`` from :class:`medvision.runtime.EpochSampler`:
    the augmentation of that sample is then seeded by ``seed``, so it does not depend on which
    worker draws it or on whether workers persist across epochs (resume stays exact).
    """

    def __init__(
        self,
        table: SampleTable,
        indices: np.ndarray,
        transform: Callable[..., dict[str, torch.Tensor]],
        intensity: Intensity,
        channels: int,
        transfer: Transfer = "float32",
    ) -> None:
        self.table = table
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.intensity = intensity
        self.channels = channels
        self.transfer = transfer

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        k, seed = key if isinstance(key, tuple) else (key, None)
        i = int(self.indices[k])
        try:
            raw = self.table.loader(i)
        except ImageReadError:
            raise
        except Exception as err:
            raise ImageReadError(f"{self.table.ids[i]}: {err}") from err
        if seed is not None:
            self.transform.set_random_seed(seed)  # type: ignore[attr-defined]
        return prepare(raw, self.intensity, self.channels, self.transform, self.transfer), int(self.table.labels[i])

    @property
    def ids(self) -> list[str]:
        return [self.table.ids[i] for i in self.indices]

    @property
    def groups(self) -> list[str]:
        """The unit predictions are aggregated to: each row's slide for whole-slide tiles, else its patient."""
        units = self.table.aggregates_to
        return [units[i] for i in self.indices]

    @property
    def patients(self) -> list[str] | None:
        """Each row's patient where the rows aggregate to slides (:attr:`groups`); None where those are patients."""
        return None if self.table.units is None else [self.table.groups[i] for i in self.indices]

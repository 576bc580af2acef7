"""TODO docstring."""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Iterator
from pathlib import Path

import timm
import torch

import medvision
from medvision.recipe import Recipe
from medvision.runtime import (
    Dist,
)

log = logging.getLogger("medvision")


class RunError(RuntimeError):
    """A run folder that cannot be created, resumed or evaluated as asked."""


def cache_dir(recipe: Recipe) -> Path:
    """Where decoded DICOM pixels are cached: shared by the runs of one output folder."""
    return Path(recipe.output_dir) / ".cache" / "dicom"


def attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler


def versions() -> dict[str, str]:
    """Library versions, recorded in run.json and in scoring provenance."""
    return {
        "medvision": medvision.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def mean_count(value: float) -> str:
    """A mean number of things for a log line: ``12`` when it is whole, else one decimal (``2.5``)."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


@contextlib.contextmanager
def run_log(run_dir: Path, d: Dist) -> Iterator[None]:
    """Rank 0 logs at INFO into ``run_dir/train.log`` (complete even when the console shows only warnings);
    the other ranks log warnings only, so there is one log: rank 0's."""
    level = log.level
    handler = None
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = attach_log_file(run_dir)
        log.setLevel(logging.INFO)
    else:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)
        if handler is not None:
            log.removeHandler(handler)
            handler.close()

"""Checkpoints that survive a crash mid-write and load without unpickling code.

Two files per run: ``model.safetensors`` (the best weights, for evaluate, score and init_from) and
``last.pt`` (the full training state, for exact resume). Both are written to a temporary file in
the same folder and renamed over the old one, so a kill at any moment leaves a valid file.
``last.pt`` holds only tensors, numbers, strings, lists and dicts, and is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from medvision.io.files import atomic_write
from medvision.runs import RunError


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Writes the model's state dict as safetensors (tensors cloned so shared storage is allowed)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata or {}))


def save_state(state: dict[str, Any], path: Path) -> None:
    """Writes the full training state with ``torch.save``, atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    """Reads a full training state with ``weights_only=True`` (no arbitrary code from the file)."""
    if not path.is_file():
        raise RunError(f"no checkpoint at {str(path)!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise RunError(f"{path}: not a medvision training state (expected a dict with a 'model' entry)")
    return state

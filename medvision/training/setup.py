"""What every training task does before and around its epochs, written once: ``train`` and ``pretrain`` share it.

- :func:`preflight`: the run folder can be written (or resumed) and the global batch splits over the ranks,
  checked on every rank before rank 0 writes anything;
- :func:`start_run_folder`: stale results of an earlier run removed (unless resuming) and the resolved
  ``recipe.yaml`` written;
- :func:`place_model`: one rule for ``train.sync_bn`` (GPUs only: on CPU ranks it is an error, whichever task
  asks), then the device and memory format;
- :func:`optimiser`: AdamW over the parameter groups, the warm-up + cosine schedule and the GradScaler (fp16
  only), and :class:`TrainingState` to save them to ``last.pt`` atomically and restore them for an exact resume.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medvision.io.files import atomic_write_text, remove_temporaries
from medvision.models.freeze import optimizer_groups
from medvision.recipe import Recipe, dump_recipe, load_recipe, tree_changes
from medvision.runs import SPLITS_FILE, RunError, nothing_to_resume, read_splits, write_splits
from medvision.runtime import Dist, barrier, broadcast
from medvision.training.checkpoint import load_state, save_state

log = logging.getLogger("medvision")


def warmup_cosine(total_steps: int, warmup: float, floor: float = 0.01) -> Callable[[int], float]:
    """LR factor per optimizer step: linear warmup over ``warmup`` of the steps, then cosine to ``floor``."""
    warm = round(warmup * total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def preflight(recipe: Recipe, run_dir: Path, d: Dist, resume: bool, overwrite: bool, min_per_rank: int = 1,
              why_min: str = "") -> None:  # fmt: skip
    """Checks, on every rank, that the run can start; then waits for all ranks, so that no rank has begun
    writing into ``run_dir`` while another still checks it.

    Raises:
        RunError: resuming without ``last.pt``; a finished run in the way without ``--overwrite``; a global
            batch that does not divide over the ranks (or leaves fewer than ``min_per_rank`` a rank); mixup or
            cutmix with an odd number of images a rank.
    """
    if resume and not (run_dir / "last.pt").is_file():
        raise nothing_to_resume(run_dir, run_dir / "last.pt", "first checkpoint")
    if resume:
        same_recipe(recipe, run_dir)
    if not resume and not overwrite and (run_dir / "recipe.yaml").exists():
        raise RunError(
            f"run folder {run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            "or --set name=<new name>"
        )
    batch, world = recipe.data.batch_size, d.world_size
    if batch % world or batch // world < min_per_rank:
        least = f" with at least {min_per_rank} images per rank{why_min}" if min_per_rank > 1 else ""
        raise RunError(
            f"data.batch_size {batch} is the global batch and must divide by the world size {world}{least}; use a "
            f"multiple of {world}, e.g. {world * max(min_per_rank, batch // world)}"
        )
    per_rank = batch // world
    if world > 1 and (recipe.train.mixup > 0 or recipe.train.cutmix > 0) and per_rank % 2:
        raise RunError(f"train.mixup / train.cutmix on {world} ranks: each rank's slice of a batch (data.batch_size "
                       f"{batch} / {world} = {per_rank}) must be even, as timm's Mixup pairs the images of a slice and "
                       f"an odd one is never mixed; use data.batch_size {world * (per_rank + 1)}")  # fmt: skip
    barrier(d)


#: What a resumed run's recipe may change: where the run folder is, its name, and how the run is tracked.
RESUMABLE = ("output_dir", "name", "tracking")


def same_recipe(recipe: Recipe, run_dir: Path) -> None:
    """Refuses to resume ``run_dir`` with a recipe other than the one it was trained with (``recipe.yaml``), except
    for :data:`RESUMABLE`: ``medvision train --resume`` reads that file, but a caller of ``train(recipe,
    resume=True)`` could pass another, and the folder would then name settings its weights were not trained with.

    Raises:
        RunError: naming the keys that differ, both values of the first, and what to do.
    """
    saved_path = run_dir / "recipe.yaml"
    if not saved_path.is_file():
        return
    changes = [c for c in tree_changes(load_recipe(saved_path).model_dump(mode="json"), recipe.model_dump(mode="json"))
               if c[0].split(".")[0] not in RESUMABLE]  # fmt: skip
    if changes:
        key, saved, given = changes[0]
        raise RunError(f"cannot resume {run_dir} with another recipe: {', '.join(c[0] for c in changes)} differ from "
                       f"{saved_path} ({key}: {given!r}, trained with {saved!r}); resume with its own (medvision "
                       "train --resume RUN_DIR), or start a new run (--set name=<new name>)")  # fmt: skip


def start_run_folder(recipe: Recipe, run_dir: Path, d: Dist, resume: bool, results: tuple[str, ...]) -> None:
    """Rank 0: removes an earlier run's ``results`` (files or folders, e.g. ``export/``, whose ONNX model would
    be the old weights) unless resuming, and what a killed atomic write left (a half-written checkpoint's
    temporary), and writes the resolved ``recipe.yaml`` (a resumed run's is :func:`same_recipe`'s, with its
    folder where it now is)."""
    if not d.is_main:
        return
    if not resume:
        for stale in results:
            if (run_dir / stale).is_dir():
                shutil.rmtree(run_dir / stale)
            else:
                (run_dir / stale).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(run_dir)
    atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))


def place_model(model: nn.Module, recipe: Recipe, d: Dist, device: torch.device) -> nn.Module:
    """The model on ``device`` in the recipe's memory format, its BatchNorms synchronised across GPU ranks
    when ``train.sync_bn`` asks.

    Raises:
        RunError: ``train.sync_bn`` on CPU ranks (torch's SyncBatchNorm runs on GPUs only).
    """
    if recipe.train.sync_bn and d.world_size > 1:
        if device.type != "cuda":
            raise RunError("train.sync_bn: torch's SyncBatchNorm runs on GPUs only; on CPU ranks set it to false "
                           "(and consider bn: frozen phases, which need no batch statistics)")  # fmt: skip
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log.info("BatchNorm -> SyncBatchNorm: statistics over the global batch of %d ranks", d.world_size)
    model = model.to(device)
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass
class TrainingState:
    """The optimiser, schedule and loss scaler of one phase of training, saved and restored together."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler

    def save(self, model: nn.Module, progress: dict[str, Any], path: Path, extra: dict[str, Any] | None = None) -> None:
        """``last.pt``, atomically: the model, this state, ``progress`` (epoch, best, history) and ``extra``
        (the weights' moving average)."""
        save_state({"model": model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                    "fit": progress, **(extra or {})}, path)  # fmt: skip

    def restore(self, saved: dict[str, Any]) -> None:
        """Continues from a ``last.pt`` read with :func:`read_checkpoint` (the model is restored by the caller)."""
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])


def optimiser(model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None, steps: int,
              warmup: float, amp: str, device: torch.device) -> TrainingState:  # fmt: skip
    """AdamW over ``model``'s trainable parameters (no decay on norms and biases; ``layer_decay`` scales the
    learning rate by depth), a linear warm-up then cosine decay over ``steps`` optimiser steps, and a
    GradScaler that is enabled for fp16 only."""
    optimizer = torch.optim.AdamW(optimizer_groups(model, lr, weight_decay, layer_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    return TrainingState(optimizer, scheduler, scaler)


def optimiser_steps(epochs: int, batches: int, accumulate: int) -> int:
    """Optimiser steps in ``epochs`` epochs of ``batches`` batches, stepping every ``accumulate`` batches."""
    return epochs * math.ceil(batches / accumulate)


def read_checkpoint(run_dir: Path, model: nn.Module) -> dict[str, Any]:
    """``last.pt`` of ``run_dir`` (read with ``weights_only=True``), with its weights loaded into ``model``."""
    saved = load_state(run_dir / "last.pt")
    model.load_state_dict(saved["model"])
    log.info("resuming %s after epoch %d", run_dir, saved["fit"].get("epoch", 0))
    return saved


def keep_splits(run_dir: Path, held: dict[str, list[str]], resume: bool, d: Dist) -> None:
    """Writes ``splits.csv`` (rank 0), the ids the run trains, validates and tests on, so that ``evaluate`` tests
    exactly those later and a fine-tuning run from it knows what it trained on, whatever the data folder holds by
    then. A resumed run whose data now splits differently is refused on every rank: its epochs so far trained on
    another split."""
    problem = None
    if d.is_main and resume and (before := read_splits(run_dir)) is not None:
        now = {i: split for split, ids in held.items() for i in ids}
        moved = sorted(i for i in before.keys() | now.keys() if before.get(i) != now.get(i))
        if moved:
            problem = (f"{run_dir / SPLITS_FILE}: the data now splits {len(moved)} image(s) differently from when "
                       f"this run started (e.g. {moved[0]!r}: {before.get(moved[0], 'not in the run')} then, "
                       f"{now.get(moved[0], 'not in the run')} now); resuming would train on another split. Restore "
                       "the data, or start afresh with --overwrite")  # fmt: skip
    problem = broadcast(problem, d)
    if problem:
        raise RunError(problem)
    if d.is_main:
        write_splits(run_dir, held)

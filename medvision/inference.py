"""TODO docstring."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvision.data.table import SampleTable
from medvision.evaluation import SplitOutputs
from medvision.models.backbone import create_backbone
from medvision.models.backbone import load_state as load_model_state
from medvision.models.heads import fit_state
from medvision.recipe import Recipe, load_recipe
from medvision.runs import RunError
from medvision.runtime import (
    SINGLE,
    Dist,
    local_part,
    make_loader,
)
from medvision.training.build import ModelBundle, model_inputs, split_dataset
from medvision.training.loop import evaluate, gather_outputs

log = logging.getLogger("medvision")


def load_run(run_dir: Path, device: torch.device) -> tuple[Recipe, dict[str, Any], ModelBundle]:
    """The recipe, metadata and best model of a finished run (weights read as safetensors)."""
    for needed in ("recipe.yaml", "run.json", "model.safetensors"):
        if not (run_dir / needed).is_file():
            raise RunError(f"{run_dir} is not a finished medvision run: {needed} is missing")
    recipe = load_recipe(run_dir / "recipe.yaml")
    meta = json.loads((run_dir / "run.json").read_text())
    recipe.model.pretrained = False
    recipe.model.init_from = None
    recipe.model.in_chans = meta["in_chans"]
    model = create_backbone(recipe.model, num_classes=len(meta["classes"]), in_chans=meta["in_chans"])
    state = load_model_state(run_dir / "model.safetensors")
    fit_state(model, state, len(meta["classes"]), recipe.train.knn_k, recipe.train.knn_temperature)  # a knn run's bank
    model.load_state_dict(state)
    model.to(device)
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bundle = ModelBundle(model=model, in_chans=meta["in_chans"], mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    return recipe, meta, bundle


def split_outputs(
    bundle: ModelBundle, recipe: Recipe, table: SampleTable, split: str, device: torch.device, workers: int,
    d: Dist = SINGLE,
) -> tuple[SplitOutputs, list[str], float] | None:  # fmt: skip
    """A split's logits, labels and patients, its item ids, and its mean (uncalibrated) cross-entropy.

    On several ranks each evaluates its contiguous shard (no sample repeated, none left out) and
    rank 0 gets the whole split, in order; the other ranks get None.
    """
    ds = split_dataset(recipe, table, bundle, split, train=False)
    loader = make_loader(local_part(ds, d), recipe.data.eval_batch_size, workers, device)
    tta = tuple(recipe.evaluation.tta)
    logits, labels = evaluate(bundle.model, loader, device, recipe.train.amp, model_inputs(recipe, bundle), tta=tta)
    whole = gather_outputs(logits, labels, d)
    if whole is None:
        return None
    logits, labels = whole
    if tta:  # (N, 1 + views, K): the image's own logits first
        out = SplitOutputs(logits[:, 0], labels, ds.groups, views=logits)
    else:
        out = SplitOutputs(logits, labels, ds.groups)
    probs = out.probs()  # the TTA average when there are views
    loss = float(-np.log(probs[np.arange(len(labels)), labels] + 1e-300).mean()) if len(labels) else float("nan")
    return out, ds.ids, loss

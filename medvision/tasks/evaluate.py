"""``medvision evaluate RUN [--data PATH]``: a finished run on its own test split, or on another dataset.

The run's temperature and operating-point thresholds, chosen on its validation split, are applied as they
are; nothing is refitted on the data being evaluated. Under ``torchrun`` the split is sharded over the ranks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from medvision.data.sources import load_table
from medvision.data.table import SampleTable
from medvision.evaluation import Decision
from medvision.inference import load_run, split_outputs
from medvision.recipe import Recipe, RecipeError
from medvision.results import slide_comparison, slide_head, write_results
from medvision.runs import RunError, cache_dir
from medvision.runtime import (
    broadcast,
    current,
    resolve_amp,
    resolve_workers,
    setup,
)
from medvision.training.build import ModelBundle

log = logging.getLogger("medvision")


def open_split(
    run_dir: Path, data: str | None, source: str | None, split: str | None, data_overrides: list[str] | None = None
) -> tuple[torch.device, Recipe, dict[str, Any], ModelBundle, SampleTable, str]:
    """A finished run and the table it is to be applied to: its own, or ``data`` with the same classes.

    ``data_overrides`` (``--set data.KEY=VALUE``) change how the data is read (``data.on_error=skip``,
    ``data.num_workers=0``); nothing else of the run's recipe can change, since its weights depend on it.
    """
    _, device = setup("auto")  # under torchrun: this rank's device, and the process group
    recipe, meta, bundle = load_run(run_dir, device)
    changes: dict[str, Any] = {"train.amp": resolve_amp(recipe.train.amp, device), "data.classes": meta["classes"]}
    if data is not None:
        path = Path(data).resolve()
        folder_kind = "dicom" if recipe.data.source == "dicom" else "folder"
        guessed = "npz" if path.suffix == ".npz" else "csv" if path.suffix == ".csv" else folder_kind
        if recipe.data.source == "slides":  # a slide run evaluates slide manifests
            guessed = "slides"
        changes.update({"data.path": str(path), "data.source": source or guessed, "data.limit": None})
    for assignment in data_overrides or []:
        key, sep, value = assignment.partition("=")
        if not key.strip().startswith("data.") or not sep:
            raise RecipeError(
                f"--set {assignment!r}: evaluate takes data.KEY=VALUE only (how the data is read), e.g. --set "
                "data.on_error=skip; the rest of the run's recipe is fixed by its weights"
            )
        changes[key.strip()] = yaml.safe_load(value) if value.strip() else None
    recipe = recipe.changed(changes, origin=f"{run_dir / 'recipe.yaml'} with --data {data} and --set {data_overrides}")
    split = split or ("test" if data is None else "all")
    table = load_table(recipe.data, recipe.seed, cache_dir(recipe))
    if split != "all" and len(table.indices(split)) == 0:
        raise RunError(f"{table.origin} has no '{split}' split; use --split all, train, val or test")
    return device, recipe, meta, bundle, table, split


def evaluate_run(
    run_dir: Path, data: str | None = None, source: str | None = None, split: str | None = None,
    out: Path | None = None, data_overrides: list[str] | None = None,
) -> tuple[Path, dict[str, float]]:  # fmt: skip
    """Re-scores a run on its own test split, or on another dataset (``data``) with the same classes.

    The run's temperature and operating-point thresholds (chosen on its validation split) are
    applied as they are; nothing is refitted on the data being evaluated.
    """
    device, recipe, meta, bundle, table, split = open_split(run_dir, data, source, split, data_overrides)
    d = current()
    workers = resolve_workers(recipe.data.num_workers, device)
    out = out or run_dir / "eval" / (f"{Path(table.origin).stem}-{split}" if data else split)
    decision = Decision.from_json(meta.get("decision"))
    meta.update(data=table.origin, source=recipe.data.source, weights=f"run {run_dir}")
    outputs = split_outputs(bundle, recipe, table, split, device, workers, d)  # sharded across ranks
    metrics: dict[str, float] | None = None
    if outputs is not None:  # rank 0
        out.mkdir(parents=True, exist_ok=True)
        if recipe.evaluation.patient_aggregate == "abmil":
            slide_head(recipe, bundle, table, {split: outputs}, device, run_dir, fit=False)
        extra = {"run": str(run_dir), "data": table.origin, "world_size": d.world_size,
                 "tta": list(recipe.evaluation.tta)}  # fmt: skip
        extra.update(slide_comparison(recipe, {split: outputs}, decision))
        metrics = write_results(out, bundle, recipe, table, meta, {split: outputs}, decision, extra, device)[split]
    metrics = broadcast(metrics, d)
    assert metrics is not None  # rank 0 always has them
    return out, metrics

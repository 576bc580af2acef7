"""``medvision evaluate RUN [--data PATH]``: a finished run on its own test split, or on another dataset.

The run's temperature and operating-point thresholds, chosen on its validation split, are applied as they
are; nothing is refitted on the data being evaluated. Under ``torchrun`` the split is sharded over the ranks.

The run's own split is the one its ``splits.csv`` recorded, not one recomputed from the data folder as it is now
(one added image reshuffles a recomputed split). With ``--data``, images the run trained or validated on are
refused unless ``allow_seen``, and then counted in the report and ``metrics.json``.
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
from medvision.report import SELECTION_SPLIT
from medvision.results import slide_comparison, slide_head, write_results
from medvision.runs import SPLITS_FILE, RunError, cache_dir, read_splits
from medvision.runtime import (
    broadcast,
    current,
    resolve_amp,
    resolve_workers,
    setup,
)
from medvision.training.build import ModelBundle, split_indices
from medvision.wsi.source import check_stain_reference

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
    held = read_splits(run_dir)
    if data is None and held is not None:  # the recorded rows are already those data.limit / train_fraction kept
        changes.update({"data.limit": None, "data.train_fraction": 1.0})
    recipe = recipe.changed(changes, origin=f"{run_dir / 'recipe.yaml'} with --data {data} and --set {data_overrides}")
    if recipe.data.source == "slides":  # tiles normalised to the reference's pixels the run trained on
        check_stain_reference(run_dir, recipe.data.slides, meta.get("stain_reference_sha256"))
    split = split or ("test" if data is None else "all")
    table = load_table(recipe.data, recipe.seed, cache_dir(recipe))
    if data is None:
        _restore_split(run_dir, table, held, split)
    if split != "all" and len(table.indices(split)) == 0:
        raise RunError(f"{table.origin} has no '{split}' split; use --split all, train, val or test")
    return device, recipe, meta, bundle, table, split


def _restore_split(run_dir: Path, table: SampleTable, held: dict[str, str] | None, split: str) -> None:
    """The run's own split, as ``splits.csv`` recorded it: rows the run did not use are in no split (an image
    added since is not a test image). Refuses when an image the run held out for ``split`` is gone from the data."""
    if held is None:
        log.info("%s has no %s (a run from before it was written): its split is recomputed from %s as it is now, "
                 "which is the run's split only if no image was added or removed since", run_dir, SPLITS_FILE,
                 table.origin)  # fmt: skip
        return
    present = set(table.ids)
    missing = sorted(i for i, s in held.items() if (split == "all" or s == split) and i not in present)
    if missing:
        raise RunError(f"{table.origin}: {len(missing)} of the images the run held in its {split} split "
                       f"({run_dir / SPLITS_FILE}) are not in the data now (e.g. {missing[0]!r}); evaluating the "
                       "rest would report on another split: restore them, or evaluate with --data")  # fmt: skip
    table.splits = [held.get(i, "") for i in table.ids]
    if added := len(present - held.keys()):
        log.info("%s: %d image(s) not in the run's %s (added since, or left out by data.limit / train_fraction) "
                 "are in no split", table.origin, added, SPLITS_FILE)  # fmt: skip


def seen_images(run_dir: Path, meta: dict[str, Any], table: SampleTable, idx: Any,
                held: dict[str, str] | None) -> dict[str, Any]:  # fmt: skip
    """How many of the evaluated rows ``idx`` of ``--data`` the run trained or validated on, by id (``held``: its
    ``splits.csv``). Ids name files relative to their source, so they are compared only when ``--data`` is the
    run's own data; otherwise the result says that nothing could be compared."""
    ran_on = str(meta.get("data") or "")
    same = bool(ran_on) and Path(ran_on).resolve() == Path(table.origin).resolve()
    if not same:
        return {"checked": False, "same_data": False, "reason": f"{table.origin} is not the run's data "
                f"({ran_on or 'unrecorded'}): ids name files relative to each source, so they cannot be matched to "
                "the run's training images"}  # fmt: skip
    if held is None:
        return {"checked": False, "same_data": True, "reason": f"{run_dir} has no {SPLITS_FILE} (a run from before "
                "it was written): which of these images it trained on is not known"}  # fmt: skip
    out: dict[str, Any] = {"checked": True, "same_data": True, "evaluated": len(idx)}
    for split in ("train", "val"):
        ids = sorted(x for x in (table.ids[int(i)] for i in idx) if held.get(x) == split)
        out[split], out[f"{split}_example"] = len(ids), ids[0] if ids else None
    return out


def _seen_fact(seen: dict[str, Any]) -> str:
    if not seen["checked"]:
        return f"not compared with the run's training images: {seen['reason']}"
    if not seen["train"] and not seen["val"]:
        return f"none of the {seen['evaluated']} evaluated images were in the run's training or validation split"
    return (
        f"{seen['train']} of the {seen['evaluated']} evaluated images were in the run's training split and "
        f"{seen['val']} in its validation split (which chose its checkpoint, temperature and thresholds): "
        "their metrics are optimistic"
    )


def evaluate_run(
    run_dir: Path, data: str | None = None, source: str | None = None, split: str | None = None,
    out: Path | None = None, data_overrides: list[str] | None = None, allow_seen: bool = False,
) -> tuple[Path, dict[str, float]]:  # fmt: skip
    """Re-scores a run on its own test split, or on another dataset (``data``) with the same classes.

    The run's temperature and operating-point thresholds (chosen on its validation split) are
    applied as they are; nothing is refitted on the data being evaluated. ``data`` that holds images the run
    trained or validated on is refused unless ``allow_seen``; then the report says how many.

    Raises:
        RunError: images of the run's held-out split gone from its data, or seen images without ``allow_seen``.
    """
    device, recipe, meta, bundle, table, split = open_split(run_dir, data, source, split, data_overrides)
    idx = split_indices(recipe, table, split)  # the rows split_outputs scores
    seen: dict[str, Any] | None = None
    if data is not None:
        seen = seen_images(run_dir, meta, table, idx, read_splits(run_dir))
        if seen["checked"] and seen["train"] + seen["val"] and not allow_seen:
            example = seen["train_example"] or seen["val_example"]
            raise RunError(f"{table.origin}: {seen['train'] + seen['val']} of the {len(idx)} images to evaluate "
                           f"({split}) were in the run's training ({seen['train']}) or validation ({seen['val']}) "
                           f"split (e.g. {example!r}, {run_dir / SPLITS_FILE}): their metrics would be optimistic. "
                           "Evaluate the run's own test split without --data, pick --split test, or pass "
                           "--allow-seen to report them anyway, counted")  # fmt: skip
        if not seen["checked"]:
            log.info("evaluate: %s", _seen_fact(seen))
    d = current()
    workers = resolve_workers(recipe.data.num_workers, device)
    out = out or run_dir / "eval" / (f"{Path(table.origin).stem}-{split}" if data else split)
    decision = Decision.from_json(meta.get("decision"))
    meta.update(data=table.origin, source=recipe.data.source, weights=f"run {run_dir}")
    meta["split_sizes"] = {split: len(idx)}  # what is evaluated here, not the training run's splits
    # the report marks the run's validation split as the one that chose checkpoint, temperature and thresholds
    meta["selection_split"] = SELECTION_SPLIT if seen is None or seen["same_data"] else None
    outputs = split_outputs(bundle, recipe, table, split, device, workers, d)  # sharded across ranks
    metrics: dict[str, float] | None = None
    if outputs is not None:  # rank 0
        out.mkdir(parents=True, exist_ok=True)
        if recipe.evaluation.patient_aggregate == "abmil":
            slide_head(recipe, bundle, table, {split: outputs}, device, run_dir, fit=False)
        extra: dict[str, Any] = {"run": str(run_dir), "data": table.origin, "world_size": d.world_size,
                                 "tta": list(recipe.evaluation.tta)}  # fmt: skip
        if seen is not None:
            extra["seen_in_training"] = {**seen, "fact": _seen_fact(seen)}
        extra.update(slide_comparison(recipe, {split: outputs}, decision))
        metrics = write_results(out, bundle, recipe, table, meta, {split: outputs}, decision, extra, device)[split]
    metrics = broadcast(metrics, d)
    assert metrics is not None  # rank 0 always has them
    return out, metrics

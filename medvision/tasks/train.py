"""``medvision train RECIPE``: a recipe to a run folder (see :mod:`medvision.runs` for what the folder holds).

Set-up shared with ``pretrain`` (:mod:`medvision.training.setup`), the data audit, the model, then either the
freeze phases (:func:`medvision.training.loop.fit`) or a head on frozen features (``linear_probe``, ``knn``),
then calibration and operating points on validation and the results (:mod:`medvision.results`).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medvision.data.dataset import ImageDataset
from medvision.data.sources import load_table
from medvision.data.table import SampleTable, subset_indices
from medvision.evaluation import fit_decision
from medvision.inference import split_outputs
from medvision.metrics import MetricWarning
from medvision.models.backbone import load_state as load_model_state
from medvision.models.heads import fit_state
from medvision.recipe import Recipe, RecipeError, load_recipe
from medvision.report import calibrated, temperature_fact, write_json
from medvision.results import slide_comparison, slide_head, write_results
from medvision.runs import SPLITS_FILE, RunError, cache_dir, read_json, read_splits, run_log, versions
from medvision.runtime import (
    Dist,
    EpochSampler,
    barrier,
    local_part,
    make_loader,
    resolve_amp,
    resolve_workers,
    seed_everything,
    set_deterministic,
    setup,
)
from medvision.tasks.track import log_trained_run
from medvision.tracking import Tracker
from medvision.training.build import ModelBundle, build_model, model_inputs, split_dataset
from medvision.training.loop import class_weights, classification_loss, fit
from medvision.training.protocols import fit_frozen_head
from medvision.training.setup import keep_splits, place_model, preflight, start_run_folder
from medvision.wsi.source import check_stain_reference, stain_fingerprint

log = logging.getLogger("medvision")

#: What a finished run folder holds besides recipe.yaml and run.json: removed when a run starts afresh.
RESULTS = ("model.safetensors", "last.pt", "splits.csv", "metrics.json", "predictions.csv", "report.md",
           "report.html", "export")  # fmt: skip


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False, parent: Tracker | None = None) -> Path:
    """Trains a recipe into ``<output_dir>/<name>`` and writes metrics, predictions and the report.

    Under ``torchrun`` every rank calls this: each trains on its slice of every global batch, and
    rank 0 alone writes the run folder (see :mod:`medvision.runtime`). With ``recipe.tracking`` on, rank 0
    logs the run to MLflow / TensorBoard (a child run of ``parent``, see :mod:`medvision.tracking`).

    Examples:
        >>> run_dir = train(load_recipe("recipes/bloodmnist_effnet_lite0.yaml"))
    """
    if recipe.data.source == "slide_features":  # a MIL head on cached tile features, cross-validated
        from medvision.tasks.mil import train_mil

        return train_mil(recipe, resume=resume, overwrite=overwrite, parent=parent)
    d, device = setup(recipe.train.device)
    run_dir = Path(recipe.output_dir) / recipe.name
    if recipe.train.protocol == "finetune" and not recipe.train.phases:
        raise RunError("train.phases is empty; protocol finetune needs at least one phase, e.g. "
                       "[{epochs: 5, lr: 1e-3}], or set train.protocol to linear_probe or knn")  # fmt: skip
    preflight(recipe, run_dir, d, resume, overwrite)
    with run_log(run_dir, d, recipe, parent, resume=resume) as tracker:
        _train(recipe, run_dir, resume, d, device)
        log_trained_run(tracker, run_dir)
    return run_dir


def _train(recipe: Recipe, run_dir: Path, resume: bool, d: Dist, device: torch.device) -> Path:
    start = time.perf_counter()
    start_run_folder(recipe, run_dir, d, resume, RESULTS)
    seed_everything(recipe.seed)
    set_deterministic(recipe.train.deterministic)
    recipe = recipe.changed({"train.amp": resolve_amp(recipe.train.amp, device, training=True)})
    log.info("device %s, amp %s, channels_last %s", device, recipe.train.amp, recipe.train.channels_last)
    workers = resolve_workers(recipe.data.num_workers, device)
    table = load_table(recipe.data, recipe.seed, cache_dir(recipe), audit_dir=run_dir if d.is_main else None)
    bundle = build_model(recipe, table)
    model = place_model(bundle.model, recipe, d, device)
    bundle.model = model
    datasets = {s: split_dataset(recipe, table, bundle, s, train=s == "train") for s in ("train", "val", "test")}
    sizes = {s: len(ds) for s, ds in datasets.items()}
    refuse_seen_images(recipe, table, {table.ids[i] for s in ("val", "test") for i in datasets[s].indices})
    keep_splits(run_dir, {s: [table.ids[i] for i in ds.indices] for s, ds in datasets.items()}, resume, d)
    recipe = monitor_defined(recipe, table, datasets["val"].indices)
    log.info("data %s: %d classes, split sizes %s", table.origin, len(table.classes), sizes)
    for split in ("train", "val"):
        if sizes[split] == 0:
            raise RunError(f"the {split} split of {table.origin} is empty; adjust data.val_fraction or the split")
    meta = {
        "name": recipe.name,
        "classes": table.classes,
        "in_chans": bundle.in_chans,
        "mean": bundle.mean,
        "std": bundle.std,
        "image_size": recipe.data.image_size,
        "model": recipe.model.name,
        "split_sizes": sizes,
        "transfer": datasets["val"].transfer,  # how evaluation batches travelled; score and export do the same
        "device": str(device),
        "amp": recipe.train.amp,  # resolved: what the run trained in (bf16 / fp16 / none), not "auto"
        "monitor": recipe.train.monitor,  # what chose the checkpoint (val_loss where val_auc is undefined)
        "deterministic": recipe.train.deterministic,
        "world_size": d.world_size,
        "protocol": recipe.train.protocol,
        "train_fraction": recipe.data.train_fraction,
        "tta": list(recipe.evaluation.tta),
        "versions": versions(),
    }
    if recipe.data.source == "slides" and recipe.data.slides.stain_reference:  # its pixels, not only its path
        if resume and (run_dir / "run.json").is_file():  # the epochs so far saw tiles normalised to the reference
            before = read_json(run_dir / "run.json", "run.json").get("stain_reference_sha256")  # recorded then
            check_stain_reference(run_dir, recipe.data.slides, before)
        meta["stain_reference_sha256"] = stain_fingerprint(recipe.data.slides)
    if d.is_main:
        write_json(run_dir / "run.json", meta)

    train_labels = table.labels[datasets["train"].indices]
    absent = [c for c, n in zip(table.classes, np.bincount(train_labels, minlength=len(table.classes)), strict=True)
              if n == 0]  # fmt: skip
    if absent:  # a warning, not an error: a smoke run with data.limit may miss a class on purpose
        log.warning("class(es) %s have no training image: the model's output for them is never trained (a class in "
                    "data.classes without images, or data.limit / train_fraction left it out)", absent)  # fmt: skip
    if recipe.data.train_fraction < 1.0:
        counts = np.bincount(train_labels, minlength=len(table.classes)).tolist()
        log.info("data.train_fraction %g: %d training images with labels (per class %s)",
                 recipe.data.train_fraction, sizes["train"], counts)  # fmt: skip
    if recipe.train.protocol != "finetune":
        return _train_frozen(recipe, run_dir, bundle, table, meta, datasets, d, device, workers, start)
    per_rank = recipe.data.batch_size // d.world_size
    weights = None
    if recipe.train.balance == "sampler":
        weights = class_weights(train_labels, len(table.classes)).numpy()[train_labels]
        log.info("train.balance sampler: each epoch draws %d training images class-balanced, with replacement",
                 sizes["train"])  # fmt: skip
    bn_trains = any(p.bn == "train" for p in recipe.train.phases) and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in bundle.model.modules()
    )
    sampler = EpochSampler(sizes["train"], recipe.seed, recipe.data.batch_size, d.rank, d.world_size,
                           datasets["train"].groups, recipe.data.tiles_per_slide, weights,
                           min_per_rank=2 if bn_trains else 1)  # fmt: skip
    criterion = None
    if recipe.train.balance == "loss" or recipe.train.focal_gamma > 0:
        cw = class_weights(train_labels, len(table.classes)) if recipe.train.balance == "loss" else None
        criterion = classification_loss(recipe.train, cw)
        log.info("loss: %s%s", f"focal (gamma {recipe.train.focal_gamma:g})" if recipe.train.focal_gamma > 0
                 else "cross-entropy", f", class weights {[round(w, 3) for w in cw.tolist()]}" if cw is not None
                 else "")  # fmt: skip
    if recipe.data.tiles_per_slide is not None:
        log.info("training on at most %d tiles per slide per epoch: %d of %d tiles", recipe.data.tiles_per_slide,
                 sampler.n, sizes["train"])  # fmt: skip
    train_loader = make_loader(datasets["train"], per_rank, workers, device, sampler)
    val_loader = make_loader(local_part(datasets["val"], d), recipe.data.eval_batch_size, workers, device)
    inputs = model_inputs(recipe, bundle)
    if sampler.used == 0:
        raise RunError(f"{table.origin}: {sampler.n} training image(s) on {d.world_size} ranks: not one training "
                       "step (each rank needs a sample); add training data or use fewer ranks")  # fmt: skip
    if d.world_size > 1:
        log.info("distributed: %d ranks (%s), global batch %d = %d per rank; validation in %d shards gathered on "
                 "rank 0", d.world_size, "nccl" if device.type == "cuda" else "gloo", recipe.data.batch_size,
                 per_rank, d.world_size)  # fmt: skip
    if dropped := sampler.n - sampler.used:
        log.info("the last %d training sample(s) of each epoch (a different draw each epoch) are left out: a last "
                 "batch of %d would give a rank %s", dropped, dropped,
                 "fewer than 2 samples, and BatchNorm cannot train on one" if bn_trains else "none")  # fmt: skip
    log.info("loader: %d worker(s), batches travel as %s and are normalised on %s%s", workers,
             datasets["train"].transfer, device, ", flips/rot90 on the device" if inputs.flips else "")  # fmt: skip
    state = fit(model, train_loader, val_loader, recipe.train, device, run_dir, recipe.seed, resume, inputs, d,
                criterion)  # fmt: skip

    barrier(d)  # rank 0 has written model.safetensors: the best epoch's weights, or the last validated ones
    model.load_state_dict(load_model_state(run_dir / "model.safetensors"))
    extra = {"best_epoch": state.best_epoch, "monitor": recipe.train.monitor, "history": state.history}
    start -= state.earlier  # a resumed run's wall time counts the processes before this one
    _evaluate_splits(recipe, run_dir, bundle, table, meta, sizes, d, device, workers, start, extra)
    return run_dir


def monitor_defined(recipe: Recipe, table: SampleTable, val: np.ndarray) -> Recipe:
    """``train.monitor: val_auc`` needs every class in the validation split (a macro AUC is undefined without one,
    :data:`~medvision.metrics.NEEDS_EVERY_CLASS`): where a class has no validation image, no epoch could ever be
    best, so the run monitors ``val_loss`` instead, and says so (run.json records the monitor used)."""
    if recipe.train.monitor != "val_auc" or not len(val):
        return recipe
    present = set(np.unique(table.labels[val]).tolist())
    missing = [c for k, c in enumerate(table.classes) if k not in present]
    if not missing:
        return recipe
    log.warning("the validation split has no image of class(es) %s, so val_auc is undefined in every epoch: "
                "monitoring val_loss instead (set train.monitor, or give every class validation images)",
                missing)  # fmt: skip
    return recipe.changed({"train.monitor": "val_loss"})


def refuse_seen_images(recipe: Recipe, table: SampleTable, held_out: set[str]) -> None:
    """Refuses a ``model.init_from`` run (SimCLR pretraining or an earlier fine-tuning) that trained on images this
    run validates or tests on: same data, another split (another seed or fractions, where the data fixes none).
    Its test metrics would be of images the backbone has seen.

    Raises:
        RunError: naming the run, how many images it saw and one of them.
    """
    if not recipe.model.init_from:
        return
    source = Path(recipe.model.init_from)
    saved = (source if source.is_dir() else source.parent) / "recipe.yaml"
    try:
        other = load_recipe(saved) if saved.is_file() else None
    except RecipeError as err:
        log.warning("model.init_from: %s cannot be read (%s); its training images are not checked", saved, err)
        return
    if other is None or (other.data.source, other.data.path) != (recipe.data.source, recipe.data.path):
        return  # other data (or a bare weights file): nothing to match by id
    recorded = read_splits(saved.parent)
    if recorded is not None:  # what it trained on, whatever the data folder holds now
        seen = {i for i, split in recorded.items() if split == "train"} & held_out
    else:
        log.info("model.init_from %s has no %s (a run from before it was written): its training split is recomputed "
                 "from the data as it is now, which is its split only if no image was added or removed since",
                 saved.parent, SPLITS_FILE)  # fmt: skip
        same = other.data == recipe.data and other.seed == recipe.seed
        theirs = table if same else load_table(other.data, other.seed, cache_dir(other))
        seen = {theirs.ids[i] for i in subset_indices(theirs, "train", other.data.limit, other.seed,
                                                      other.data.train_fraction)} & held_out  # fmt: skip
    if seen:
        raise RunError(f"model.init_from {saved.parent} trained on {len(seen)} of this run's validation and test "
                       f"images (e.g. {sorted(seen)[0]!r}): its split of {table.origin} (seed {other.seed}) is not "
                       f"this run's (seed {recipe.seed}), so this run would be tested on images its backbone has "
                       "seen. Use that run's seed and split fractions, a split column in the data, or pretrain "
                       "again on this run's split")  # fmt: skip


def _train_frozen(recipe: Recipe, run_dir: Path, bundle: ModelBundle, table: SampleTable, meta: dict[str, Any],
                  datasets: dict[str, ImageDataset], d: Dist, device: torch.device, workers: int,
                  start: float) -> Path:  # fmt: skip
    """``linear_probe`` / ``knn``: rank 0 fits the head on frozen features; every rank then loads it."""
    info: dict[str, Any] = {}
    plain_train = split_dataset(recipe, table, bundle, "train", train=False)  # features without augmentation
    if d.is_main:
        info = fit_frozen_head(bundle.model, recipe, plain_train, datasets["val"], len(table.classes), device,
                               workers, model_inputs(recipe, bundle), run_dir)  # fmt: skip
    barrier(d)
    if not d.is_main:
        state = load_model_state(run_dir / "model.safetensors")
        fit_state(bundle.model, state, len(table.classes), recipe.train.knn_k, recipe.train.knn_temperature)
        bundle.model.load_state_dict(state)
        bundle.model.to(device)
    sizes = {s: len(ds) for s, ds in datasets.items()}
    extra: dict[str, Any] = {"best_epoch": 0, "monitor": None, "history": [], "protocol": info}
    _evaluate_splits(recipe, run_dir, bundle, table, meta, sizes, d, device, workers, start, extra)
    return run_dir


def _evaluate_splits(recipe: Recipe, run_dir: Path, bundle: ModelBundle, table: SampleTable, meta: dict[str, Any],
                     sizes: dict[str, int], d: Dist, device: torch.device, workers: int, start: float,
                     extra: dict[str, Any]) -> None:  # fmt: skip
    """The trained model on validation and test (sharded over the ranks), then rank 0 writes the results."""
    splits = {}
    for split in ("val", "test"):
        if sizes[split] == 0:
            log.warning("no %s split; skipping its metrics", split)
            continue
        outputs = split_outputs(bundle, recipe, table, split, device, workers, d)
        if outputs is not None:
            splits[split] = outputs
    if d.is_main:
        _finish(recipe, run_dir, bundle, table, meta, splits, extra, start, device)
    barrier(d)  # no rank returns before the run folder is complete


def _finish(recipe: Recipe, run_dir: Path, bundle: ModelBundle, table: SampleTable, meta: dict[str, Any],
            splits: dict[str, Any], extra: dict[str, Any], start: float, device: torch.device) -> None:  # fmt: skip
    """Rank 0: calibration and operating points on validation, then metrics, predictions and the report."""
    if recipe.evaluation.patient_aggregate == "abmil":
        slide_head(recipe, bundle, table, splits, device, run_dir, fit=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        decision = fit_decision(splits["val"][0], table.classes, recipe.evaluation)
    for w in caught:
        log.warning("%s", w.message)
    log.info("calibration: %s", f"temperature {decision.temperature:.3f} fitted on validation"
             if calibrated(decision) else temperature_fact(decision))  # fmt: skip
    meta["decision"] = decision.to_json()
    weights = recipe.model.pretrained if isinstance(recipe.model.pretrained, str) else (
        "timm hub weights" if recipe.model.pretrained else
        f"init_from {recipe.model.init_from}" if recipe.model.init_from else "random init")  # fmt: skip
    meta["weights"] = weights
    meta["data"], meta["source"] = table.origin, recipe.data.source  # in run.json too: compare names them
    write_json(run_dir / "run.json", meta)
    seconds = time.perf_counter() - start
    extra = {**extra, "seconds": seconds, "tta": list(recipe.evaluation.tta)}
    extra.update(slide_comparison(recipe, splits, decision))
    write_results(run_dir, bundle, recipe, table, meta, splits, decision, extra, device)
    log.info("run folder: %s (%.0f s)", run_dir, seconds)

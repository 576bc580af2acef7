"""``medvision pretrain RECIPE``: SimCLR on the training images, labels ignored, into a run folder.

The folder holds ``model.safetensors`` (the backbone's weights, timm names, no classifier: what
``model.init_from`` loads), ``recipe.yaml``, ``run.json``, ``pretrain.json`` (the per-epoch history),
``plots/pretrain.png`` (loss and kNN health curves), ``train.log`` and ``last.pt`` (exact resume).

The steps are :func:`medvision.training.loop.train_one_epoch`'s, with the SimCLR criterion: the same
AMP path, gradient clipping and accumulation, progress bar, NaN stop and DDP share. Each epoch
reseeds from (seed, epoch) and the sampler gives every sample its view seed, so a resumed run
repeats an uninterrupted one. After each epoch, when the validation split has labels, a kNN
classifier on the frozen features (leave-one-out over at most ``pretrain.knn_samples`` labelled
validation images) gives a health number: a collapsed representation shows at once as chance
accuracy.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from medvision.data.dataset import ImageDataset
from medvision.data.sources import load_table
from medvision.data.table import SampleTable, subset_indices
from medvision.data.transforms import build_transforms
from medvision.data.views import TwoViews, view_kind, view_transforms
from medvision.models.backbone import create_backbone, data_config
from medvision.models.heads import extract_features, knn_probs
from medvision.models.simclr import SimCLR, simclr_criterion
from medvision.recipe import Recipe
from medvision.report import write_json
from medvision.runs import EPOCH_ROW, SPLITS_FILE, RunError, cache_dir, run_log, versions
from medvision.runtime import (
    Dist,
    EpochSampler,
    Inputs,
    barrier,
    broadcast,
    make_loader,
    resolve_amp,
    resolve_workers,
    seed_everything,
    set_deterministic,
    setup,
    sync_buffers,
    wrap_ddp,
)
from medvision.tasks.track import log_pretrained_run
from medvision.training.build import resolve_transfer
from medvision.training.checkpoint import save_weights
from medvision.training.loop import FitState, train_one_epoch
from medvision.training.setup import (
    keep_splits,
    optimiser,
    optimiser_steps,
    place_model,
    preflight,
    read_checkpoint,
    start_run_folder,
)

log = logging.getLogger("medvision")


def pretrain(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> Path:
    """Self-supervised pretraining of ``recipe.model`` on ``recipe.data``'s training images, into a run folder.

    Under ``torchrun`` every rank calls this; rank 0 writes the folder.

    Examples:
        >>> run_dir = pretrain(load_recipe("recipes/bloodmnist_simclr_lite0.yaml"))
        >>> finetune = load_recipe("recipes/bloodmnist_effnet_lite0.yaml", [f"model.init_from={run_dir}",
        ...                        "model.pretrained=false"])
    """
    d, device = setup(recipe.train.device)
    run_dir = Path(recipe.output_dir) / recipe.name
    preflight(recipe, run_dir, d, resume, overwrite, min_per_rank=2,
              why_min=" (the projection head's BatchNorm needs a batch)")  # fmt: skip
    with run_log(run_dir, d, recipe, kind="pretrain", resume=resume) as tracker:
        _pretrain(recipe, run_dir, resume, d, device)
        log_pretrained_run(tracker, run_dir)
    return run_dir


def _pretrain(recipe: Recipe, run_dir: Path, resume: bool, d: Dist, device: torch.device) -> Path:
    start = time.perf_counter()
    cfg = recipe.pretrain
    start_run_folder(recipe, run_dir, d, resume, ("model.safetensors", "last.pt", "pretrain.json", SPLITS_FILE))
    seed_everything(recipe.seed)
    set_deterministic(recipe.train.deterministic)
    recipe = recipe.changed({"train.amp": resolve_amp(recipe.train.amp, device, training=True)})
    workers = resolve_workers(recipe.data.num_workers, device)
    table = load_table(
        recipe.data, recipe.seed, cache_dir(recipe), labelled=False, audit_dir=run_dir if d.is_main else None
    )
    in_chans = recipe.model.in_chans or (1 if table.grayscale else 3)
    backbone = create_backbone(recipe.model, num_classes=0, in_chans=in_chans)
    stats = data_config(backbone, in_chans)
    simclr = SimCLR(backbone, cfg.proj_hidden, cfg.proj_dim)
    model = place_model(simclr, recipe, d, device)
    kind = view_kind(recipe, in_chans)
    if kind == "pathology" and in_chans != 3:
        raise RunError(f"pretrain.views 'pathology' jitters stain and colour and needs RGB input; the model takes "
                       f"{in_chans} channel(s): use views: radiology")  # fmt: skip
    views = TwoViews(view_transforms(kind, recipe.data.image_size, cfg.min_crop, recipe.augment.transforms))
    indices = subset_indices(table, "train", recipe.data.limit, recipe.seed, recipe.data.train_fraction)
    if len(indices) < recipe.data.batch_size:
        raise RunError(f"{table.origin}: the training split has {len(indices)} images, fewer than one batch of "
                       f"data.batch_size {recipe.data.batch_size}")  # fmt: skip
    # what the backbone saw: a fine-tuning run from it refuses to validate or test on these
    keep_splits(run_dir, {"train": [table.ids[i] for i in indices]}, resume, d)
    transfer = resolve_transfer(recipe.data.transfer, table)
    train_ds = ImageDataset(table, indices, views, recipe.data.intensity, in_chans, transfer)
    sampler = EpochSampler(len(train_ds), recipe.seed, recipe.data.batch_size, d.rank, d.world_size, drop_last=True)
    loader = make_loader(train_ds, recipe.data.batch_size // d.world_size, workers, device, sampler)
    inputs = Inputs(stats["mean"], stats["std"], False)  # (B, 2, C, H, W): the criterion sets the layout
    health = _health_set(recipe, table, stats, in_chans, transfer)
    log.info("pretrain %s: SimCLR on %d unlabelled training images of %s (%d per epoch in full batches of %d; %s "
             "views, %d px), %d epochs of %d steps, temperature %g; device %s, amp %s", recipe.model.name,
             len(indices), table.origin, sampler.n, recipe.data.batch_size, kind, recipe.data.image_size, cfg.epochs,
             len(loader), cfg.temperature, device, recipe.train.amp)  # fmt: skip
    meta = {"kind": "pretrain", "method": cfg.method, "name": recipe.name, "model": recipe.model.name,
            "in_chans": in_chans, "mean": stats["mean"], "std": stats["std"], "image_size": recipe.data.image_size,
            "images": len(indices), "data": table.origin, "views": kind, "world_size": d.world_size,
            "device": str(device), "versions": versions()}  # fmt: skip
    if d.is_main:
        write_json(run_dir / "run.json", meta)

    state = FitState()
    steps = optimiser_steps(cfg.epochs, len(loader), recipe.train.accumulate)
    opt = optimiser(model, cfg.lr, recipe.train.weight_decay, None, steps, cfg.warmup, recipe.train.amp, device)
    if resume:
        saved = read_checkpoint(run_dir, model)
        opt.restore(saved)
        state = FitState(**saved["fit"])
        state.earlier = state.seconds
        start -= state.earlier  # a resumed run's wall time counts the processes before this one, as training's does
    if not resume:  # the starting weights' health: what pretraining has to improve on
        knn0 = _knn_accuracy(simclr.backbone, health, recipe, device, workers) if d.is_main and health else None
        state.history.append({"epoch": 0, "knn_acc": broadcast(knn0, d)})
        if knn0 is not None:
            log.info("epoch 0 (starting weights): kNN accuracy %.4f", knn0, extra={EPOCH_ROW: state.history[-1]})
    forward = wrap_ddp(model, d, device)
    criterion = simclr_criterion(cfg.temperature, d, recipe.train.channels_last)
    sizes = sampler.global_batch_sizes()
    for epoch in range(state.epoch, cfg.epochs):
        seed_everything(recipe.seed + epoch)
        sampler.set_epoch(epoch)
        desc = f"pretrain {epoch + 1}/{cfg.epochs}"
        row: dict[str, Any] = train_one_epoch(forward, loader, opt.optimizer, opt.scheduler, opt.scaler, recipe.train,
                                              device, "train", desc, inputs, None, d, sizes, criterion)  # fmt: skip
        sync_buffers(model, d)
        knn = _knn_accuracy(simclr.backbone, health, recipe, device, workers) if d.is_main and health else None
        row = {"epoch": epoch + 1, **row, "knn_acc": broadcast(knn, d)}
        state.history.append(row)
        state.epoch = epoch + 1
        log.info("epoch %d/%d: loss %.4f  kNN accuracy %s  %.0f img/s  %.0fs", epoch + 1, cfg.epochs,
                 row["train_loss"], "n/a" if knn is None else f"{knn:.4f}", row["train_img_s"],
                 row["seconds"], extra={EPOCH_ROW: row})  # fmt: skip
        state.seconds = time.perf_counter() - start
        if d.is_main:  # last.pt last: a kill before it leaves the epoch to be done again, and these rewritten with it
            save_weights(
                simclr.backbone, run_dir / "model.safetensors", {"epoch": str(state.epoch), "method": "simclr"}
            )
            write_json(run_dir / "pretrain.json", {"history": state.history, "seconds": state.seconds})
            plot_pretraining(run_dir / "plots" / "pretrain.png", state.history)
            opt.save(model, state.__dict__, run_dir / "last.pt")
    barrier(d)
    log.info("run folder: %s (%.0f s)", run_dir, time.perf_counter() - start)
    return run_dir


def _health_set(recipe: Recipe, table: SampleTable, stats: dict[str, tuple[float, ...]], in_chans: int,
                transfer: Any) -> ImageDataset | None:  # fmt: skip
    """Up to ``pretrain.knn_samples`` labelled validation images (seeded), or None when there are none to use."""
    if recipe.pretrain.knn_samples == 0 or len(table.classes) < 2:
        return None
    idx = subset_indices(table, "val", recipe.pretrain.knn_samples, recipe.seed)
    if len(idx) < 2:
        return None
    plain = build_transforms(None, recipe.data.image_size, stats["mean"], stats["std"], normalize=False)
    return ImageDataset(table, idx, plain, recipe.data.intensity, in_chans, transfer)


def _knn_accuracy(backbone: nn.Module, ds: ImageDataset, recipe: Recipe, device: torch.device, workers: int) -> float:
    """Leave-one-out k-NN accuracy of the frozen features on the labelled validation images."""
    loader = make_loader(ds, recipe.data.eval_batch_size, workers, device)
    stats = data_config(backbone, ds.channels)
    feats = extract_features(backbone, loader, device, recipe.train.amp, Inputs(stats["mean"], stats["std"], False))
    labels = ds.table.labels[ds.indices]
    probs = knn_probs(feats, feats, labels, len(ds.table.classes), recipe.train.knn_k, recipe.train.knn_temperature,
                      exclude_self=True)  # fmt: skip
    return float((probs.argmax(axis=1) == labels).mean())


def plot_pretraining(path: Path, history: list[dict[str, Any]]) -> Path:
    """Loss per epoch, and the kNN health accuracy on a second axis when it was measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 3.2), dpi=110)
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    losses = np.array([h.get("train_loss", np.nan) for h in history], dtype=float)
    ax.plot(epochs, losses, marker="o", color="tab:blue", label="NT-Xent loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss", color="tab:blue")
    knn = np.array([np.nan if h.get("knn_acc") is None else h["knn_acc"] for h in history], dtype=float)
    if np.isfinite(knn).any():
        ax2 = ax.twinx()
        ax2.plot(epochs, knn, marker="s", color="tab:green", label="kNN accuracy (val)")
        ax2.set_ylabel("kNN accuracy (validation)", color="tab:green")
        ax2.set_ylim(0, 1)
    ax.set_title("Self-supervised pretraining (SimCLR)")
    fig.tight_layout()
    fig.savefig(path)
    return path

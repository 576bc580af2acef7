"""The training loop: ``fit`` runs the freeze phases, ``train_one_epoch`` and ``evaluate`` do the work.

One AMP path: ``torch.autocast`` with the recipe's dtype, and a GradScaler that is only enabled for
fp16 (when disabled it passes the loss and the step straight through). The optimizer is stepped in
exactly one place. The host reads the loss from the device only every ``log_interval`` steps, to
update the progress bar and to stop on a NaN/Inf loss.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from medvision.data.transforms import tta_views
from medvision.errors import MedvisionError
from medvision.metrics import MetricAccumulator, compute_metrics, softmax
from medvision.models.freeze import apply_trainable, select_trainable, set_bn_policy
from medvision.recipe import PhaseConfig, TrainConfig
from medvision.runs import EPOCH_ROW
from medvision.runtime import (
    SINGLE,
    Dist,
    EpochSampler,
    Inputs,
    all_gather_tensor,
    autocast,
    broadcast,
    gather,
    seed_everything,
    sync_buffers,
    to_device,
    wrap_ddp,
)
from medvision.training.checkpoint import save_weights
from medvision.training.setup import optimiser, optimiser_steps, read_checkpoint

log = logging.getLogger("medvision")
Batch = Any  # (images, labels) as collated by the DataLoader
Criterion = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(model, images, labels) -> per-sample losses (B,)``, run inside autocast: what a training step minimises."""


class NonFiniteLoss(MedvisionError, FloatingPointError):
    """The training loss became NaN or Inf; the run stops rather than train on garbage."""


def classification_loss(cfg: TrainConfig, class_weights: torch.Tensor | None = None) -> Criterion:
    """Cross-entropy (with ``cfg.label_smoothing``), focal when ``cfg.focal_gamma > 0``, class-weighted when given.

    Focal loss (Lin et al. 2017) multiplies each sample's cross-entropy by ``(1 - p_true) ** gamma``.
    ``class_weights`` (mean 1 over the training samples, see :func:`class_weights`) weigh each
    sample by its label, so the per-sample losses keep their scale and the DDP sum stays exact.
    """

    def loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model(images).float()
        if labels.is_floating_point():  # soft targets from mixup / cutmix, label smoothing already in them
            ce = -(labels * F.log_softmax(logits, dim=1)).sum(dim=1)
            return ce if class_weights is None else ce * (labels @ class_weights.to(ce.device))
        ce = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing, reduction="none")
        if cfg.focal_gamma > 0:
            p_true = torch.softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]
            ce = (1.0 - p_true).clamp_min(0.0).pow(cfg.focal_gamma) * ce
        if class_weights is not None:
            ce = ce * class_weights.to(ce.device)[labels]
        return ce

    return loss


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, ``n / (classes present * n_class)``: every class weighs the same in total.

    Their mean over the training samples is 1, so the loss keeps its scale. A class absent from the
    training labels gets weight 0 (it has no samples to weigh).
    """
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = max(1, int((counts > 0).sum()))
    w = np.where(counts > 0, len(labels) / (present * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


Mix = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(images, labels) -> (mixed images, soft targets)``: mixup / cutmix of one training batch."""


def batch_mixer(cfg: TrainConfig, num_classes: int) -> Mix | None:
    """timm's ``Mixup`` for ``train.mixup`` / ``train.cutmix`` (None when both are 0).

    It draws from NumPy's global generator, which :func:`fit` re-seeds every epoch, so a resumed run
    mixes as an uninterrupted one would. A batch of odd size (a last, short one) is left unmixed, with
    its labels smoothed the same way, as timm's batch mode needs pairs.
    """
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    if num_classes < 2:
        raise ValueError(f"train.mixup / train.cutmix need the model's class count for their soft targets; got "
                         f"{num_classes} (a model without a timm classifier head?)")  # fmt: skip
    from timm.data import Mixup

    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob, switch_prob=cfg.mix_switch,
                  mode="batch", label_smoothing=cfg.label_smoothing, num_classes=num_classes)  # fmt: skip
    off = cfg.label_smoothing / num_classes

    def mix(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(images) % 2 == 0:
            return cast(tuple[torch.Tensor, torch.Tensor], mixup(images, labels))
        soft = torch.full((len(labels), num_classes), off, device=labels.device)
        return images, soft.scatter_(1, labels[:, None], 1.0 - cfg.label_smoothing + off)

    return mix


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    device: torch.device,
    bn: str,
    desc: str,
    inputs: Inputs | None = None,
    generator: torch.Generator | None = None,
    d: Dist = SINGLE,
    global_sizes: list[int] | None = None,
    criterion: Criterion | None = None,
    mix: Mix | None = None,
    after_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One pass over the training data; returns the mean loss, throughput and the LR of its last optimizer step.

    With ``cfg.accumulate``, each group of micro-batches averages their losses; the epoch's last group may
    be short, and is divided by the micro-batches it has.

    ``mix`` mixes each batch (mixup / cutmix) before the loss; ``after_step`` runs after every
    optimizer step (the weights' moving average).

    ``inputs`` turns loader batches into model input on the device; ``generator`` drives its
    on-device augmentation. ``criterion`` gives per-sample losses: the classification loss of
    ``cfg`` by default, the self-supervised objective in :mod:`medvision.tasks.pretrain`.

    On several ranks (``d``, with ``model`` wrapped in DDP) each rank's loss is its share of the
    global batch's mean, ``sum(loss_i) * world / global_sizes[step]``, so DDP's averaged gradient is
    exactly the gradient of the global batch's mean loss, as on one process, even when the last
    batch splits unevenly. The logged loss is the mean over ranks, and a NaN on any rank stops every
    rank with the same message.
    """
    criterion = criterion or classification_loss(cfg)
    model.train()
    set_bn_policy(model, bn)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    window_loss = torch.zeros((), device=device)
    total_loss = 0.0
    window_steps = seen = 0
    start = time.perf_counter()
    n_steps = len(loader)
    lr = optimizer.param_groups[-1]["lr"]
    bar = tqdm(total=n_steps, desc=desc, leave=False, dynamic_ncols=True, disable=None)
    for step, (images, labels) in enumerate(loader):
        images = to_device(images, device, inputs, generator)
        labels = labels.to(device, non_blocking=True)
        if mix is not None:
            images, labels = mix(images, labels)
        with autocast(device, cfg.amp):
            per_sample = criterion(model, images, labels)
            if d.world_size > 1:
                share = d.world_size / (global_sizes[step] if global_sizes else len(images) * d.world_size)
                loss = per_sample.sum() * share
            else:
                loss = per_sample.mean()
        group = min(cfg.accumulate, n_steps - step + step % cfg.accumulate)  # the last group may be short
        scaler.scale(loss / group).backward()
        window_loss += loss.detach()
        window_steps += 1
        seen += global_sizes[step] if global_sizes and d.world_size > 1 else len(images)
        last = step + 1 == n_steps
        if (step + 1) % cfg.accumulate == 0 or last:
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            lr = optimizer.param_groups[-1]["lr"]  # what this step uses; the scheduler then sets the next one's
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if after_step is not None:
                after_step()
        if (step + 1) % cfg.log_interval == 0 or last:
            ranks = all_gather_tensor(window_loss / window_steps, d).tolist()  # the one host sync per log interval
            mean = sum(ranks) / len(ranks)
            if not math.isfinite(mean):
                bar.close()
                where = "" if d.world_size == 1 else " on rank(s) " + ", ".join(
                    f"{r} of {d.world_size}" for r, v in enumerate(ranks) if not math.isfinite(v))  # fmt: skip
                raise NonFiniteLoss(
                    f"{desc}: loss became {mean} between steps {step + 2 - window_steps} and {step + 1}{where}; "
                    "stopping. Lower the LR, set train.grad_clip, or use amp: bf16 instead of fp16. "
                    "The last good checkpoint is kept."
                )
            total_loss += mean * window_steps
            bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
            bar.update(window_steps)
            window_loss.zero_()
            window_steps = 0
    bar.close()
    elapsed = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(1, n_steps),
        "train_img_s": seen / elapsed,
        "lr": lr,
        "seconds": elapsed,
    }


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    loader: DataLoader[Batch],
    device: torch.device,
    amp: str,
    inputs: Inputs | None,
    max_batches: int | None = None,
    tta: tuple[str, ...] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32) and labels over a loader (in eval mode); on several ranks, this rank's shard.

    Logits rather than probabilities, because calibration fits a temperature to them; the loss is
    :func:`mean_cross_entropy` of the whole split, once the shards are gathered. With ``tta``
    (``evaluation.tta``) the logits are (N, 1 + len(tta), K): the image itself, then each transform.
    """
    model.eval()
    acc = MetricAccumulator()
    parts = []
    for i, (images, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x = to_device(images, device, inputs)
        with autocast(device, amp):
            views = [model(v).float() for v in tta_views(x, tta)]
        acc.update(views[0], labels.to(device, non_blocking=True))
        if tta:
            parts.append(torch.stack(views, dim=1).cpu().numpy())
    logits, labels = acc.logits_and_labels()
    if tta:
        logits = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 1 + len(tta), 0), np.float32)
    return logits, labels


def mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of logits (NaN for none)."""
    if len(labels) == 0:
        return float("nan")
    log_probs = np.log(softmax(logits) + 1e-300)
    return float(-log_probs[np.arange(len(labels)), labels].mean())


# --------------------------------------------------------------------------------------- fit


@dataclass
class FitState:
    """What a resumed run needs besides the tensors: where it was and how well it did."""

    epoch: int = 0
    best: float | None = None
    best_epoch: int = -1
    stale: int = 0
    """Epochs of the current phase since ``monitor`` last improved (``train.patience`` counts within a phase)."""
    phase: int = 0
    """The freeze phase the last epoch belonged to (index into ``train.phases``)."""
    phase_epochs: int = 0
    """Epochs that phase has trained."""
    history: list[dict[str, Any]] = field(default_factory=list)

    best_loss: float = math.inf
    ema_steps: int = 0
    """Optimizer steps the weights' moving average has seen (its warm-up depends on it)."""
    peak: float | None = None
    """Highest ``val_auc``/``val_acc`` seen so far (the chosen epoch may sit up to the tolerance below it)."""
    seconds: float = 0.0
    """Wall time of the training up to the last checkpoint, every process of a resumed run together."""
    earlier: float = 0.0
    """The part of ``seconds`` spent before this process (by the processes a resumed run follows)."""

    def improved(self, value: float, val_loss: float, monitor: str, tolerance: float = 0.0) -> bool:
        """Better on ``monitor``: lower ``val_loss``; or, for AUC and accuracy, higher by more than ``tolerance``.
        A value within ``tolerance`` of the best so far and of the highest seen is a tie, broken by a lower
        validation loss (AUC 0.9583 at loss 0.194 beats 0.9591 at loss 0.578 with a tolerance of 0.002)."""
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if monitor == "val_loss":
            return value < self.best
        if value > self.best + tolerance:
            return True
        peak = max(self.best, self.peak if self.peak is not None else self.best)
        within = value >= self.best - tolerance and value >= peak - tolerance
        return within and val_loss < self.best_loss


def _phase_of(epoch: int, phases: list[PhaseConfig]) -> tuple[int, int]:
    """(phase index, epoch within phase) of a global epoch number, where no phase stopped early (an old last.pt)."""
    start = 0
    for i, phase in enumerate(phases):
        if epoch < start + phase.epochs:
            return i, epoch - start
        start += phase.epochs
    return len(phases), 0


def _next_epoch(state: FitState, cfg: TrainConfig) -> tuple[int, int]:
    """(phase, epoch within it) that training goes on with: the next phase's first once ``state.phase`` ran all
    its epochs or out of patience."""
    p, done = state.phase, state.phase_epochs
    if p < len(cfg.phases) and (done >= cfg.phases[p].epochs or (cfg.patience is not None and
                                                                  state.stale >= cfg.patience)):  # fmt: skip
        return p + 1, 0
    return p, done


def gather_outputs(
    logits: np.ndarray, labels: np.ndarray, d: Dist
) -> tuple[np.ndarray, np.ndarray] | None:  # fmt: skip
    """The ranks' evaluation shards (contiguous, in rank order) put back together on rank 0; None elsewhere."""
    parts = gather((logits, labels), d)
    if parts is None:
        return None
    if len(parts) == 1:
        return logits, labels
    shaped = [p[0].shape[1:] for p in parts if p[0].ndim >= 2 and len(p[0])]  # (K,), or (views, K) with TTA
    trailing = shaped[0] if shaped else (0,)
    return (np.concatenate([p[0].reshape(-1, *trailing) for p in parts]).astype(np.float32),
            np.concatenate([p[1] for p in parts]).astype(np.int64))  # fmt: skip


def fit(
    model: nn.Module,
    train_loader: DataLoader[Batch],
    val_loader: DataLoader[Batch],
    cfg: TrainConfig,
    device: torch.device,
    run_dir: Path,
    seed: int,
    resume: bool = False,
    inputs: Inputs | None = None,
    d: Dist = SINGLE,
    criterion: Criterion | None = None,
) -> FitState:
    """Runs every freeze phase; keeps ``model.safetensors`` (best) and ``last.pt`` (resume) in ``run_dir``.

    Each epoch starts by re-seeding from (seed, epoch), and the sampler and augmentation are seeded
    the same way, so resuming from ``last.pt`` replays exactly what an uninterrupted run would do.

    On several ranks (``d``): the model is wrapped in DDP per freeze phase, around the parameters
    that phase trains (so no parameter is ever unused); ``val_loader`` holds this rank's shard of the
    validation split, whose logits rank 0 gathers; rank 0 decides on the best checkpoint and early
    stopping and broadcasts its decision; only rank 0 writes; every rank reads ``last.pt`` on resume.
    """
    compiled = cast(nn.Module, torch.compile(model)) if cfg.compile else model
    state = FitState()
    saved: dict[str, Any] | None = None
    if resume:
        saved = read_checkpoint(run_dir, model)
        state = FitState(**saved["fit"])
        if "phase" not in saved["fit"]:  # written before phases kept their own patience
            state.phase, state.phase_epochs = _phase_of(state.epoch, cfg.phases)
    mix = batch_mixer(cfg, int(getattr(model, "num_classes", 0))) if criterion is None else None
    ema = None
    if cfg.ema is not None:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema, use_warmup=True)
        if saved is not None:
            ema.module.load_state_dict(saved["ema"])

    def ema_step() -> None:
        assert ema is not None
        state.ema_steps += 1
        ema.update(model, step=state.ema_steps)

    evaluated = ema.module if ema is not None else compiled  # validation and the best checkpoint: the average
    state.earlier, began = state.seconds, time.perf_counter()
    for phase in cfg.phases:  # a bad token in a later phase fails now, not after the earlier phases trained
        select_trainable(model, phase.trainable)
    phase_idx, phase_epoch = _next_epoch(state, cfg)
    if phase_idx == len(cfg.phases):  # resumed after the last epoch (killed while it finished): nothing to train
        _keep_a_checkpoint(state, ema.module if ema is not None else model, run_dir, cfg.monitor, d)
        return state

    _, labels = predict_logits(compiled, val_loader, device, cfg.amp, inputs, max_batches=2)
    log.info("sanity check: 2 validation batches evaluate (%d images%s)", len(labels),
             "" if d.world_size == 1 else " on rank 0")  # fmt: skip

    sampler = getattr(train_loader, "sampler", None)  # any iterable of batches works (benchmarks)
    sizes = sampler.global_batch_sizes() if isinstance(sampler, EpochSampler) else None
    for p_i in range(phase_idx, len(cfg.phases)):
        phase = cfg.phases[p_i]
        if p_i != phase_idx or phase_epoch == 0:  # a phase starts: its own patience
            state.phase, state.phase_epochs, state.stale = p_i, 0, 0
        n_train, n_frozen = apply_trainable(model, select_trainable(model, phase.trainable))
        log.info(
            "phase %s: %d epochs, trainable %s, lr %g, bn %s%s -- %s trainable / %s frozen parameters",
            phase.name, phase.epochs, ",".join(phase.trainable), phase.lr, phase.bn,
            f", layer_decay {phase.layer_decay}" if phase.layer_decay else "", f"{n_train:,}", f"{n_frozen:,}",
        )  # fmt: skip
        forward = wrap_ddp(compiled, d, device) if d.world_size > 1 else compiled
        steps = optimiser_steps(phase.epochs, len(train_loader), cfg.accumulate)
        opt = optimiser(model, phase.lr, cfg.weight_decay, phase.layer_decay, steps, phase.warmup, cfg.amp, device)
        if saved is not None and p_i == phase_idx and phase_epoch > 0:
            opt.restore(saved)
        saved = None
        for e in range(state.phase_epochs, phase.epochs):
            seed_everything(seed + state.epoch)
            if isinstance(sampler, EpochSampler):
                sampler.set_epoch(state.epoch)
            generator = torch.Generator(device=device).manual_seed(seed * 100_003 + state.epoch)
            desc = f"{phase.name} {e + 1}/{phase.epochs}"
            stats = train_one_epoch(forward, train_loader, opt.optimizer, opt.scheduler, opt.scaler, cfg, device,
                                    phase.bn, desc, inputs, generator, d, sizes, criterion, mix,
                                    ema_step if ema is not None else None)  # fmt: skip
            sync_buffers(model, d)
            if ema is not None:  # its BatchNorm statistics average each rank's own: rank 0's, as it saves them
                sync_buffers(ema.module, d)
            logits, labels = predict_logits(evaluated, val_loader, device, cfg.amp, inputs)
            whole = gather_outputs(logits, labels, d)
            decision: tuple[dict[str, Any], bool] | None = None
            if whole is not None:
                val_loss = mean_cross_entropy(*whole)
                val = compute_metrics(whole[1], softmax(whole[0]))
                row: dict[str, Any] = {"epoch": state.epoch + 1, "phase": phase.name, **stats, "val_loss": val_loss,
                       "val_auc": val["auc"], "val_acc": val["acc"]}  # fmt: skip
                value = float(row[cfg.monitor])
                decision = row, state.improved(value, val_loss, cfg.monitor, cfg.monitor_tolerance)
            row, improved = broadcast(decision, d)  # type: ignore[misc]  # rank 0 decides for every rank
            state.history.append(row)
            state.epoch += 1
            state.phase_epochs += 1
            if cfg.monitor != "val_loss" and math.isfinite(float(row[cfg.monitor])):
                state.peak = max(float(row[cfg.monitor]), state.peak if state.peak is not None else -math.inf)
            if improved:
                state.best, state.best_loss, state.best_epoch, state.stale = (
                    float(row[cfg.monitor]), row["val_loss"], state.epoch, 0)  # fmt: skip
                if d.is_main:
                    best = ema.module if ema is not None else model
                    save_weights(best, run_dir / "model.safetensors", {"epoch": str(state.epoch)})
            else:
                state.stale += 1
            log.info(
                "epoch %d (%s %d/%d): train_loss %.4f  val_loss %.4f  val_auc %.4f  val_acc %.4f  "
                "%.0f img/s  %.0fs%s",
                state.epoch, phase.name, e + 1, phase.epochs, row["train_loss"], row["val_loss"], row["val_auc"],
                row["val_acc"], row["train_img_s"], row["seconds"], "  *best*" if state.stale == 0 else "",
                extra={EPOCH_ROW: row},  # the run log hands the row to experiment tracking
            )  # fmt: skip
            state.seconds = state.earlier + time.perf_counter() - began
            if d.is_main:
                opt.save(model, state.__dict__, run_dir / "last.pt",
                         {"ema": ema.module.state_dict()} if ema is not None else None)  # fmt: skip
            if cfg.patience is not None and state.stale >= cfg.patience:
                then = (
                    "the run" if p_i + 1 == len(cfg.phases) else f"phase {phase.name}; next {cfg.phases[p_i + 1].name}"
                )
                log.info("early stopping: %s did not improve for %d epochs; this ends %s", cfg.monitor, cfg.patience,
                         then)  # fmt: skip
                break
    _keep_a_checkpoint(state, ema.module if ema is not None else model, run_dir, cfg.monitor, d)
    return state


def _keep_a_checkpoint(state: FitState, evaluated: nn.Module, run_dir: Path, monitor: str, d: Dist) -> None:
    """Where ``monitor`` was never finite, no epoch was best: the weights validated last (the moving average with
    ``train.ema``) become ``model.safetensors``."""
    if state.best is None and d.is_main:
        log.warning("%s was never finite; keeping the last weights as model.safetensors", monitor)
        save_weights(evaluated, run_dir / "model.safetensors", {"epoch": str(state.epoch)})

"""The honesty check: does medvision's training loop cost anything over a minimal hand-written loop?

In one process, on the same batches, model, batch size, AMP and channels_last, it times:

(a) ``medvision.training.loop.train_one_epoch``: the loop ``fit`` runs (progress bar, loss checks every
    ``log_interval`` steps, LR schedule, GradScaler path, BN policy), and ``fit`` itself for the
    same steps (plus its per-epoch validation of 64 images and checkpoint writes);
(b) a minimal loop: ``timm.create_model``, AdamW, ``torch.autocast``, backward, step, no logging;
(c) timm's reference ``train.py``, when a copy is given with ``--timm-train``; it is not part of
    the pip package, so without one the row says so and is skipped.

The batches are decoded once and kept in memory (uint8, as medvision's loader produces them for
8-bit data), and both loops turn them into model input with the same ``Inputs`` (copy, normalise,
channels_last), so the difference is the loop and nothing else. Each round runs every loop once,
in alternating order, after one warm-up epoch each; the table gives the median epoch with the
min-max, and the speed ratio to (b) as the median over rounds of the ratio within each round.

    python benchmarks/train_overhead.py [--model tf_efficientnet_lite0] [--images 512] [--repeats 9]
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F

from medvision.data.sources import load_npz
from medvision.data.transforms import build_transforms
from medvision.models.freeze import optimizer_groups
from medvision.recipe import TrainConfig
from medvision.runtime import EpochSampler, Inputs, autocast, resolve_amp, seed_everything
from medvision.tasks.benchmark.speed import device_name
from medvision.training.loop import fit, train_one_epoch
from medvision.training.setup import warmup_cosine

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MEDVISION_SHARED", ROOT.parent / "shared"))
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def batches(n_images: int, image_size: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """BloodMNIST training images through medvision's own dataset path, collated once, kept as uint8."""
    from medvision.data.dataset import ImageDataset

    table = load_npz(SHARED / "data" / "bloodmnist.npz", None)
    idx = table.indices("train")[:n_images]
    ds = ImageDataset(table, idx, build_transforms(None, image_size, MEAN, STD, normalize=False), "dtype", 3, "uint8")
    keys = list(EpochSampler(len(ds), seed))
    out = []
    for start in range(0, len(keys) - batch_size + 1, batch_size):  # full batches only, as both loops see them
        items = [ds[k] for k in keys[start : start + batch_size]]
        out.append((torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])))
    return out


def new_model(name: str, channels_last: bool, device: torch.device) -> torch.nn.Module:
    seed_everything(0)
    model = timm.create_model(name, pretrained=False, num_classes=8).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def medvision_epoch(model: torch.nn.Module, data: list[Any], cfg: TrainConfig, device: torch.device,
                    inputs: Inputs) -> None:  # fmt: skip
    optimizer = torch.optim.AdamW(optimizer_groups(model, cfg.phases[0].lr, cfg.weight_decay, None))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(len(data), 0.0))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    train_one_epoch(model, data, optimizer, scheduler, scaler, cfg, device, "train", "overhead", inputs)  # type: ignore[arg-type]


def minimal_epoch(model: torch.nn.Module, data: list[Any], cfg: TrainConfig, device: torch.device,
                  inputs: Inputs, same_groups: bool = False) -> None:  # fmt: skip
    """The loop anyone would write: no schedule, no logging, no checks.

    ``same_groups`` gives AdamW medvision's parameter groups (no weight decay on norms and biases),
    so that row differs from (a) in the loop alone.
    """
    model.train()
    params = optimizer_groups(model, cfg.phases[0].lr, cfg.weight_decay, None) if same_groups else model.parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.phases[0].lr, weight_decay=cfg.weight_decay)
    for images, labels in data:
        x = inputs(images, device)
        with autocast(device, cfg.amp):
            loss = F.cross_entropy(model(x), labels.to(device, non_blocking=True))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()


def fit_epoch(model: torch.nn.Module, data: list[Any], cfg: TrainConfig, device: torch.device, inputs: Inputs,
              run_dir: Path) -> None:  # fmt: skip
    """The whole of ``fit`` for one epoch: sanity check, training, 64-image validation, two checkpoint writes."""
    val = data[:1] if data[0][0].shape[0] >= 64 else data[:2]
    fit(model, data, val, cfg, device, run_dir, 0, inputs=inputs)  # type: ignore[arg-type]


def timed(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def timm_reference(script: Path | None) -> str:
    if script is None or not script.is_file():
        return "skipped: timm's train.py is not in the pip package; pass --timm-train PATH to a checkout's copy"
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    return "found (run it on the same data by hand; see benchmarks/README.md)" if proc.returncode == 0 else (
        f"skipped: {script} --help failed: {proc.stderr.strip()[-200:]}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    parser.add_argument("--timm-train", type=Path, help="path to timm's train.py from a source checkout")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("train_overhead.csv"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = resolve_amp(args.amp, device)
    cfg = TrainConfig.model_validate({"amp": amp, "channels_last": True, "log_interval": 10,
                                      "phases": [{"epochs": 1, "lr": 1e-3}]})  # fmt: skip
    inputs = Inputs(MEAN, STD, channels_last=True)
    data = batches(args.images, args.image_size, args.batch_size, seed=0)
    images = len(data) * args.batch_size
    where = device_name(device)
    print(f"{args.model}, {images} images/epoch in {len(data)} batches of {args.batch_size} at {args.image_size} px, "
          f"amp {amp}, channels_last, on {where}, torch {torch.__version__}, timm {timm.__version__}")  # fmt: skip

    names = ["a: medvision train_one_epoch", "a': medvision fit (1 epoch)", "b: minimal loop",
             "b': minimal loop, medvision's AdamW groups"]  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        models = {name: new_model(args.model, True, device) for name in times}
        runs = {
            "a: medvision train_one_epoch": lambda m: medvision_epoch(m, data, cfg, device, inputs),
            "a': medvision fit (1 epoch)": lambda m: fit_epoch(m, data, cfg, device, inputs, Path(tmp)),
            "b: minimal loop": lambda m: minimal_epoch(m, data, cfg, device, inputs),
            "b': minimal loop, medvision's AdamW groups": lambda m: minimal_epoch(m, data, cfg, device, inputs, True),
        }
        for name, run in runs.items():  # warm-up, not counted
            run(models[name])
        for r in range(args.repeats):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))  # alternate so drift hits both
            for name in order:
                times[name].append(timed(runs[name], models[name]))

    base = times["b: minimal loop"]
    rows = []
    print("\n| loop | img/s median [min–max] | s/epoch | speed vs b: median of paired rounds [min–max] |")
    print("| --- | --- | --- | --- |")
    for name, ts in times.items():
        med = statistics.median(ts)
        # each round ran every loop back to back, so a round's ratio cancels slow drifts of the machine
        paired = [b / t for b, t in zip(base, ts, strict=True)]
        ratio = statistics.median(paired)
        rows.append({"loop": name, "img_s": images / med, "img_s_min": images / max(ts), "img_s_max": images / min(ts),
                     "seconds": med, "ratio_vs_minimal": ratio, "ratio_min": min(paired),
                     "ratio_max": max(paired)})  # fmt: skip
        print(f"| {name} | {images / med:.1f} [{images / max(ts):.1f}–{images / min(ts):.1f}] | {med:.2f} | "
              f"{ratio:.3f} [{min(paired):.3f}–{max(paired):.3f}] |")  # fmt: skip
    reference = timm_reference(args.timm_train)
    print(f"| c: timm train.py | {reference} | | |")
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {args.out}")
    if not all(math.isfinite(r["ratio_vs_minimal"]) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""The whole training pipeline: ``medvision train`` against the plain script a user would otherwise write.

Both train on the same PNG class folder of real images (BloodMNIST from ``../shared``, written as
PNG files, ``train/<class>/*.png`` and ``val/<class>/*.png``), with the same model
(``tf_efficientnet_lite0`` from the local ImageNet weights), image size, global batch, epochs,
flips, worker count and precision (fp32 on this CPU). The plain script is
``torchvision.datasets.ImageFolder`` (PIL) with torchvision transforms, a ``DataLoader``,
``timm.create_model``, AdamW and a validation pass per epoch. medvision reads the same files
through a CSV manifest with the same split, and writes everything it always writes (checkpoints,
metrics with CIs, calibration, report). The two alternate for ``--rounds`` rounds; the table gives
the median (and min-max) training images/s per epoch and wall time, the ratio, and the validation
accuracy each reached. Writes a CSV.

    python benchmarks/train_e2e.py [--rounds 3] [--epochs 2] [--train 2000] [--val 400] [--workers 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MEDVISION_SHARED", ROOT.parent / "shared"))
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
MODEL = "tf_efficientnet_lite0"


def write_folder(root: Path, n_train: int, n_val: int, seed: int = 0) -> tuple[Path, list[str]]:
    """BloodMNIST images as PNG files in class folders, and a manifest.csv (path,label,split) over the same files."""
    data = np.load(SHARED / "data" / "bloodmnist.npz")
    rng = np.random.default_rng(seed)
    classes = [f"c{k}" for k in range(8)]
    rows = []
    for split, key, n in (("train", "train", n_train), ("val", "val", n_val)):
        images, labels = data[f"{key}_images"], data[f"{key}_labels"].reshape(-1)
        for i in sorted(rng.choice(len(images), n, replace=False)):
            rel = f"{split}/{classes[labels[i]]}/{key}{i:05d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(root / rel)
            rows.append((rel, classes[labels[i]], split))
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return root / "manifest.csv", classes


PLAIN = r"""
import sys, time, json
import timm, torch, torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

root, weights = sys.argv[1], sys.argv[6]
size, batch, epochs, workers = (int(v) for v in sys.argv[2:6])
start = time.perf_counter()
torch.manual_seed(0)
norm = transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # tf_efficientnet_lite0's mean and std
flips = [transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip()]
train_tf = transforms.Compose([transforms.Resize(size), *flips, transforms.ToTensor(), norm])
val_tf = transforms.Compose([transforms.Resize(size), transforms.ToTensor(), norm])
train_ds = datasets.ImageFolder(f"{root}/train", train_tf)
val_ds = datasets.ImageFolder(f"{root}/val", val_tf)
train_dl = DataLoader(train_ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
val_dl = DataLoader(val_ds, batch_size=256, num_workers=workers, persistent_workers=workers > 0)
model = timm.create_model("tf_efficientnet_lite0", pretrained=True, num_classes=len(train_ds.classes),
                          pretrained_cfg_overlay=dict(file=weights))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
history = []
for epoch in range(epochs):
    model.train()
    t0, seen = time.perf_counter(), 0
    for x, y in train_dl:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(x)
    train_s = time.perf_counter() - t0
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in val_dl:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    history.append({"train_img_s": seen / train_s, "val_acc": correct / total})
print(json.dumps({"history": history, "wall": time.perf_counter() - start}))
"""


def run_plain(folder: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-c", PLAIN, str(folder), str(args.image_size), str(args.batch_size), str(args.epochs),
           str(args.workers), str(WEIGHTS)]  # fmt: skip
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["process_wall"] = time.perf_counter() - start
    return result


def run_medvision(manifest: Path, out: Path, args: argparse.Namespace, k: int) -> dict:
    recipe = {
        "name": f"e2e{k}", "seed": 0, "output_dir": str(out),
        "data": {"source": "csv", "path": str(manifest), "image_size": args.image_size,
                 "batch_size": args.batch_size, "num_workers": args.workers},
        "augment": {"preset": "none", "transforms": [{"name": "HorizontalFlip", "p": 0.5},
                                                     {"name": "VerticalFlip", "p": 0.5}]},
        "model": {"name": MODEL, "pretrained": str(WEIGHTS)},
        "train": {"amp": "none", "phases": [{"name": "all", "epochs": args.epochs, "trainable": "all", "lr": 1e-3,
                                             "warmup": 0.0}]},
    }  # fmt: skip
    path = out / f"e2e{k}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medvision", "train", str(path)], check=True, capture_output=True)
    wall = time.perf_counter() - start
    metrics = json.loads((out / f"e2e{k}" / "metrics.json").read_text())
    history = [{"train_img_s": h["train_img_s"], "val_acc": h["val_acc"]} for h in metrics["history"]]
    return {"history": history, "wall": metrics["seconds"], "process_wall": wall}


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--val", type=int, default=400, help="validation images")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("train_e2e.csv"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medvision-e2e-"))
    manifest, _ = write_folder(work / "data", args.train, args.val)
    results: dict[str, list[dict]] = {"plain": [], "medvision": []}
    for k in range(args.rounds):
        order = ("plain", "medvision") if k % 2 == 0 else ("medvision", "plain")
        for method in order:
            r = run_plain(work / "data", args) if method == "plain" else run_medvision(manifest, work, args, k)
            results[method].append(r)
            rates = ", ".join(f"{h['train_img_s']:.1f}" for h in r["history"])
            print(f"round {k + 1} {method}: train img/s per epoch {rates}; wall {r['process_wall']:.1f} s; "
                  f"val acc {r['history'][-1]['val_acc']:.4f}", flush=True)  # fmt: skip
    rows = []
    for method, runs in results.items():
        rates = [h["train_img_s"] for r in runs for h in r["history"]]
        walls = [r["process_wall"] for r in runs]
        accs = [r["history"][-1]["val_acc"] for r in runs]
        rows.append({"method": method, "train_img_s": statistics.median(rates), "train_img_s_min": min(rates),
                     "train_img_s_max": max(rates), "wall_s": statistics.median(walls), "wall_min": min(walls),
                     "wall_max": max(walls), "val_acc": statistics.median(accs),
                     "rates": rates, "walls": walls})  # fmt: skip
    plain, ours = rows
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, timm {timm.__version__}"
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*[k for k in rows[0] if k not in ("rates", "walls")], "machine"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: v for k, v in r.items() if k not in ("rates", "walls")}, "machine": machine})
    print(f"\nmachine: {machine}; {args.train} train / {args.val} val BloodMNIST PNGs, {MODEL} (ImageNet weights), "
          f"{args.image_size} px, batch {args.batch_size}, {args.epochs} epochs, {args.workers} workers, fp32, "
          f"{args.rounds} alternating rounds\n")  # fmt: skip
    print("| method | train img/s per epoch, median (min-max) | wall s, median (min-max) | val accuracy (median) |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {_summary(r['rates'])} | {_summary(r['walls'])} | {r['val_acc']:.4f} |")
    print(
        f"\nmedvision / plain: training throughput {ours['train_img_s'] / plain['train_img_s']:.2f}x, "
        f"wall time {ours['wall_s'] / plain['wall_s']:.2f}x"
    )
    print(f"CSV: {args.out}")


if __name__ == "__main__":
    main()

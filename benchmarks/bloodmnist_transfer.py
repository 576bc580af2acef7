"""Transfer learning vs random initialisation on BloodMNIST, same recipe, same machine.

Runs ``recipes/bloodmnist_effnet_lite0.yaml`` twice, with the ImageNet weights and with
``model.pretrained=false``, and prints test AUC / accuracy / wall time as a markdown table and a CSV.

    python benchmarks/bloodmnist_transfer.py [--out benchmarks/bloodmnist_transfer.csv] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from medvision.recipe import load_recipe
from medvision.tasks.train import train

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MEDVISION_SHARED", str(ROOT.parent / "shared"))  # works from any directory
RECIPE = ROOT / "recipes" / "bloodmnist_effnet_lite0.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("bloodmnist_transfer.csv"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    rows = []
    for init, extra in [("ImageNet (local file)", []), ("random", ["model.pretrained=false"])]:
        suffix = "" if not extra else "_scratch"
        recipe = load_recipe(RECIPE, [*args.overrides, *extra])
        recipe.name += suffix
        start = time.perf_counter()
        run_dir = train(recipe, overwrite=True)
        minutes = (time.perf_counter() - start) / 60
        metrics = json.loads((run_dir / "metrics.json").read_text())
        rows.append({
            "init": init, "test_auc": metrics["test"]["auc"], "test_acc": metrics["test"]["acc"],
            "val_auc": metrics["val"]["auc"], "val_acc": metrics["val"]["acc"], "best_epoch": metrics["best_epoch"],
            "minutes": minutes, "run_dir": str(run_dir), "machine": machine,
        })  # fmt: skip
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nmachine: {machine}\n")
    print("| init | test AUC | test acc | val AUC | val acc | best epoch | wall min |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['init']} | {r['test_auc']:.4f} | {r['test_acc']:.4f} | {r['val_auc']:.4f} | "
              f"{r['val_acc']:.4f} | {r['best_epoch']} | {r['minutes']:.1f} |")  # fmt: skip
    print(f"\nCSV: {args.out}")


if __name__ == "__main__":
    main()

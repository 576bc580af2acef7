"""Loader throughput of medvision's training input pipeline: images/s per source, cache, transfer and workers.

Iterates the real training loader (``split_dataset(..., train=True)`` + ``make_loader`` with an
``EpochSampler``: persistent workers, prefetch 4, the recipe's augmentation preset) over batches
only, with no model, for the same BloodMNIST images stored three ways and for real DICOM:

- a folder of PNG class subfolders, decoded every epoch, then with ``data.preload: true``;
- the ``.npz`` file itself (always in memory);
- a DICOM folder from ``dicom_corpus.py`` (pydicom's and pydicom-data's images), with the float16
  decode cache off, then on.

Every configuration gets one untimed warm-up epoch (for worker configs it also starts the
persistent workers), then ``--epochs`` timed epochs; each batch is consumed (one element read, on
the device with ``--device cuda``). The DICOM cache is filled by the warm-up epoch of the first
cache-on configuration, so every timed cache-on epoch reads a warm cache. All files were just
written, so they sit in the OS page cache: cold-disk reads are not measured. The main process keeps
torch's default thread count, as ``medvision train`` does (``--torch-threads`` changes it; workers
always run one). The baseline of each source is its lowest worker count, no preload or cache,
float32; ``vs baseline`` is a ratio of medians from the same run.

    python benchmarks/input_pipeline.py [--quick] [--images 2000] [--copies 2] [--workers 0,1,2] [--device cpu]
"""

from __future__ import annotations

import argparse
import csv
import gc
import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import timm
import torch
from dicom_corpus import make_corpus

from medvision.data.sources import load_table
from medvision.data.table import SampleTable, subset_indices
from medvision.recipe import Recipe, recipe_from_dict
from medvision.runs import cache_dir
from medvision.runtime import EpochSampler, make_loader
from medvision.training.build import ModelBundle, build_model, model_inputs, split_dataset

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MEDVISION_SHARED", str(ROOT.parent / "shared"))  # works from any directory
BLOOD_CLASSES = ["basophil", "eosinophil", "erythroblast", "immature_granulocyte", "lymphocyte", "monocyte",
                 "neutrophil", "platelet"]  # fmt: skip


@dataclass
class Config:
    """One row of the table: a source and the loader settings under test."""

    source: str
    cache: str
    transfer: str
    workers: int
    recipe: Recipe
    baseline: bool = False


def base_recipe(source: str, path: Path, out_dir: Path, args: argparse.Namespace) -> Recipe:
    """The recipe a user would write for this source (as in ``recipes/``), with every image in the train split."""
    dicom = source == "dicom"
    data: dict[str, Any] = {
        "source": source,
        "path": str(path),
        "image_size": args.dicom_image_size if dicom else args.image_size,
        "batch_size": args.dicom_batch_size if dicom else args.batch_size,
        "val_fraction": 0.0,
        "test_fraction": 0.0,
    }
    if source == "npz":
        data["classes"] = BLOOD_CLASSES
        data["limit"] = args.images  # the same images that were written as PNG
    if dicom:
        data["dicom"] = {"windows": ["file"], "frames": "first"}
        data["limit"] = args.dicom_limit
    tree = {
        "name": f"input_pipeline_{source}",
        "seed": 0,
        "output_dir": str(out_dir),
        "data": data,
        "augment": {"preset": "radiology" if dicom else "pathology"},
        "model": {"name": "tf_efficientnet_lite0", "in_chans": 1 if dicom else None},
        "train": {"device": args.device, "phases": [{"epochs": 1, "lr": 1e-3}]},
    }
    return recipe_from_dict(tree, origin=f"<{source} benchmark recipe>", overrides=args.overrides)


def variant(recipe: Recipe, **data: Any) -> Recipe:
    out = recipe.model_copy(deep=True)
    for key, value in data.items():
        if key == "cache":
            out.data.dicom.cache = value
        else:
            setattr(out.data, key, value)
    return out


def write_png_folder(npz_recipe: Recipe, out: Path) -> int:
    """Writes the npz train images that ``data.limit`` picks as ``out/<class>/<id>.png``; returns the count."""
    table = load_table(npz_recipe.data, npz_recipe.seed)
    idx = subset_indices(table, "train", npz_recipe.data.limit, npz_recipe.seed)
    for i in idx:
        target = out / table.classes[int(table.labels[i])] / f"{table.ids[i].replace(':', '_')}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        image = table.loader(int(i))
        if not cv2.imwrite(str(target), image[:, :, ::-1] if image.ndim == 3 else image):  # RGB -> BGR
            raise OSError(f"{target}: cv2.imwrite failed")
    return len(idx)


def time_config(cfg: Config, table: SampleTable, bundle: ModelBundle, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up epoch plus ``args.epochs`` timed epochs of the real training loader; img/s per epoch."""
    recipe = cfg.recipe
    device = torch.device(args.device)
    ds = split_dataset(recipe, table, bundle, "train", train=True)
    sampler = EpochSampler(len(ds), recipe.seed)
    loader = make_loader(ds, recipe.data.batch_size, cfg.workers, device, sampler)
    inputs = model_inputs(recipe, bundle) if device.type == "cuda" else None
    rates, batch_bytes = [], 0
    for epoch in range(1 + args.epochs):
        sampler.set_epoch(epoch)
        generator = torch.Generator(device=device).manual_seed(epoch)
        sink = torch.zeros((), device=device)
        seen = 0
        start = time.perf_counter()
        for x, y in loader:
            batch_bytes = max(batch_bytes, x.nelement() * x.element_size())
            if inputs is not None:  # copy (compact dtype) + normalise on the GPU, as training does
                x = inputs(x, device, generator)
            sink += x.reshape(-1)[-1].float()  # consume the batch
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - start))
    del loader  # shuts the persistent workers down before the next configuration forks its own
    gc.collect()
    timed = rates[1:]
    return {
        "images": len(ds),
        "transfer_resolved": ds.transfer,
        "first_epoch_img_s": rates[0],
        "img_s": statistics.median(timed),
        "img_s_min": min(timed),
        "img_s_max": max(timed),
        "img_s_per_worker": statistics.median(timed) / max(1, cfg.workers),
        "bytes_per_batch": batch_bytes,
    }


def configs(source: str, recipe: Recipe, args: argparse.Namespace) -> list[list[Config]]:
    """The configurations of one source, grouped by cache setting (each group loads its table once)."""
    label = {"folder": "PNG folder", "npz": "npz", "dicom": "DICOM folder"}[source]
    transfers = args.dicom_transfers if source == "dicom" else args.transfers
    caches: dict[str, list[tuple[str, dict[str, Any]]]] = {
        "folder": [("no preload", {"preload": False}), ("preload", {"preload": True})],
        "npz": [("in memory", {})],
        "dicom": [("off", {"cache": False}), ("on (warm)", {"cache": True})],
    }
    groups = []
    for c_i, (cache, setting) in enumerate(caches[source]):
        group = []
        for workers in args.workers:
            for transfer in transfers:
                r = variant(recipe, num_workers=workers, transfer=transfer, **setting)
                base_transfer = "float32" if "float32" in transfers else transfers[0]
                baseline = c_i == 0 and workers == min(args.workers) and transfer == base_transfer
                group.append(Config(label, cache, transfer, workers, r, baseline))
        groups.append(group)
    return groups


def build_plan(work: Path, args: argparse.Namespace) -> tuple[list[list[Config]], list[str]]:
    """Writes the PNG folder and the DICOM corpus under ``work``; returns the configuration groups and notes."""
    plan: list[list[Config]] = []
    notes = []
    runs = work / "runs"
    if {"folder", "npz"} & set(args.sources):
        npz_path = Path(os.environ["MEDVISION_SHARED"]) / "data" / "bloodmnist.npz"
        if not npz_path.is_file():
            raise SystemExit(f"{npz_path} not found; set MEDVISION_SHARED to the shared data folder")
        npz_recipe = base_recipe("npz", npz_path, runs, args)
        if "folder" in args.sources:
            n = write_png_folder(npz_recipe, work / "png")
            notes.append(
                f"PNG folder: {n} BloodMNIST train images, 28x28 RGB, upsampled to {args.image_size} px, "
                f"batch {args.batch_size}, preset pathology"
            )
            plan += configs("folder", base_recipe("folder", work / "png", runs, args), args)
        if "npz" in args.sources:
            notes.append(f"npz: the same {args.images} images (data.limit of the train split), in memory")
            plan += configs("npz", npz_recipe, args)
    if "dicom" in args.sources:
        n = make_corpus(work / "dicom", args.copies)
        mb = sum(p.stat().st_size for p in (work / "dicom").rglob("*.dcm")) / 1e6
        used = f", {args.dicom_limit} used" if args.dicom_limit and args.dicom_limit < n else ""
        notes.append(
            f"DICOM folder: {n} files{used} ({mb:.0f} MB, dicom_corpus.py --copies {args.copies}), window 'file', "
            f"{args.dicom_image_size} px, batch {args.dicom_batch_size}, preset radiology, 1 channel"
        )
        plan += configs("dicom", base_recipe("dicom", work / "dicom", runs, args), args)
    return plan, notes


def run_plan(plan: list[list[Config]], args: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    bundles: dict[str, ModelBundle] = {}
    for group in plan:
        recipe = group[0].recipe
        start = time.perf_counter()
        table = load_table(recipe.data, recipe.seed, cache_dir(recipe))  # data.preload decodes here
        setup_s = time.perf_counter() - start
        if group[0].source not in bundles:  # only in_chans, mean and std are used: no forward pass
            bundles[group[0].source] = build_model(recipe, table)
        for cfg in group:
            r = time_config(cfg, table, bundles[cfg.source], args)
            transfer = r.pop("transfer_resolved")
            results.append(
                {"source": cfg.source, "cache": cfg.cache, "transfer": transfer, "workers": cfg.workers, **r,
                 "setup_s": setup_s, "baseline": cfg.baseline}
            )  # fmt: skip
            print(
                f"  {cfg.source:12s} {cfg.cache:10s} {transfer:8s} workers {cfg.workers}: {r['img_s']:7.0f} img/s "
                f"(first epoch {r['first_epoch_img_s']:.0f})",
                flush=True,
            )
        del table
        gc.collect()
    base = {r["source"]: r["img_s"] for r in results if r["baseline"]}
    for r in results:
        r["ratio"] = r["img_s"] / base[r["source"]] if r["source"] in base else float("nan")
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    columns = ["source", "cache", "transfer", "workers", "img/s median [min–max]", "img/s per worker"]
    print("| " + " | ".join([*columns, "bytes per batch", "vs baseline"]) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = "1.00x (baseline)" if r["baseline"] else f"{r['ratio']:.2f}x"
        print(
            f"| {r['source']} | {r['cache']} | {r['transfer']} | {r['workers']} | {r['img_s']:.0f} "
            f"[{r['img_s_min']:.0f}–{r['img_s_max']:.0f}] | {r['img_s_per_worker']:.0f} | {r['bytes_per_batch']:,} "
            f"| {ratio} |"
        )
    fills = [r for r in results if r["cache"].startswith("on")]
    if fills:
        print(
            f"\nDICOM cache fill (first pass = warm-up epoch of the first cache-on row, "
            f"{fills[0]['workers']} workers): {fills[0]['first_epoch_img_s']:.0f} img/s"
        )
    pre = [r for r in results if r["cache"] == "preload"]
    if pre:
        print(f"PNG preload (every image decoded once, before the workers start): {pre[0]['setup_s']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 128 images, 32 DICOM files (< 1 min)")
    parser.add_argument("--images", type=int, default=2000, help="BloodMNIST train images (PNG folder and npz)")
    parser.add_argument("--copies", type=int, default=2, help="copies of each DICOM source file (107 files each)")
    parser.add_argument("--dicom-limit", type=int, help="use at most this many DICOM files (data.limit)")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--transfers", default="float32,uint8", help="data.transfer values for the 8-bit sources")
    parser.add_argument("--dicom-transfers", default="float32", help="data.transfer values for DICOM")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per configuration (after 1 warm-up)")
    parser.add_argument("--image-size", type=int, default=64, help="PNG/npz: 28 px upsampled to this")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dicom-image-size", type=int, default=128, help="as recipes/dicom_modality.yaml")
    parser.add_argument("--dicom-batch-size", type=int, default=32)
    parser.add_argument("--sources", default="folder,npz,dicom", help="any of folder, npz, dicom")
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"],
        help="cuda: pinned batches are copied and normalised on the GPU (model_inputs), synchronised per epoch",
    )  # fmt: skip
    parser.add_argument("--torch-threads", type=int, help="main-process torch threads (workers always use 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE for every recipe")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("input_pipeline.csv"))
    args = parser.parse_args()
    if args.quick:
        args.images, args.copies, args.dicom_limit = 128, 1, 32
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    args.workers = [int(w) for w in args.workers.split(",")]
    args.transfers = args.transfers.split(",")
    args.dicom_transfers = args.dicom_transfers.split(",")
    args.sources = args.sources.split(",")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    gpu = f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, "
        f"timm {timm.__version__}, main-process torch threads {torch.get_num_threads()}"
    )
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medvision-input-bench-") as tmp:
        plan, notes = build_plan(Path(tmp), args)
        results = run_plan(plan, args)
    seconds = time.perf_counter() - started
    load_after = os.getloadavg()
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*results[0], "epochs", "device", "machine"])
        writer.writeheader()
        for r in results:
            writer.writerow({**r, "epochs": args.epochs, "device": args.device, "machine": machine})

    print(f"\nmachine: {machine}; device {args.device}")
    print(
        f"load average (1/5/15 min) before {' '.join(f'{v:.2f}' for v in load_before)}, "
        f"after {' '.join(f'{v:.2f}' for v in load_after)}; {seconds:.0f} s in all"
    )
    for note in notes:
        print(f"- {note}")
    print(
        f"- every row: 1 untimed warm-up epoch (it also starts the persistent workers), then the median of "
        f"{args.epochs} epochs [min–max]; per worker = img/s / max(1, workers)\n"
    )
    print_table(results)
    print(f"CSV: {args.out}")


if __name__ == "__main__":
    main()

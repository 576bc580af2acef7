"""Scoring speed on real DICOM: ``medvision score`` against a plain one-image-at-a-time loop.

Both run in this process, on the same files (pydicom's and pydicom-data's images, copied to a few
thousand files by ``dicom_corpus.py``), with the same model and the same preprocessing. The plain
loop is ``pydicom.dcmread -> pixel_array -> window -> model`` for one image at a time; medvision
decodes in DataLoader workers and runs batched inference under ``inference_mode``. Prints a table,
writes a CSV, and checks that the probabilities agree.

    python benchmarks/score_dicom.py [--copies 20] [--model RUN_DIR] [--workers 2]
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from dicom_corpus import make_corpus

from medvision.data.dataset import prepare
from medvision.data.dicom_source import dicom_spec, walk_files
from medvision.data.transforms import build_transforms
from medvision.io.dicom import DicomReadError, NotADicomImage, read_dicom
from medvision.recipe import load_recipe
from medvision.run import load_run, train
from medvision.score import score_folder

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MEDVISION_SHARED", str(ROOT.parent / "shared"))  # works from any directory
RECIPE = ROOT / "recipes" / "dicom_modality.yaml"


def plain_loop(folder: Path, run_dir: Path) -> tuple[dict[str, np.ndarray], int, float]:
    """One file at a time, in this process: read, decode, window, preprocess, model."""
    recipe, _, bundle = load_run(run_dir, torch.device("cpu"))
    transform = build_transforms(None, recipe.data.image_size, bundle.mean, bundle.std)
    spec = dicom_spec(recipe.data.dicom)
    model = bundle.model.eval()
    probs: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for path in walk_files(folder):
            try:
                pixels, _ = read_dicom(path, spec)
            except (NotADicomImage, DicomReadError):  # skipped or error rows in medvision; not timed here
                continue
            x = prepare(pixels[0], recipe.data.intensity, bundle.in_chans, transform)[None]
            x = x.contiguous(memory_format=torch.channels_last) if recipe.train.channels_last else x
            probs[path.relative_to(folder).as_posix()] = torch.softmax(model(x).float(), 1)[0].numpy()
    return probs, len(probs), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=20, help="copies of each source file")
    parser.add_argument("--model", type=Path, help="a finished run; default: train recipes/dicom_modality.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("score_dicom.csv"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    work = Path(tempfile.mkdtemp(prefix="medvision-score-bench-"))
    run_dir = args.model
    if run_dir is None:
        train_corpus = work / "train"
        make_corpus(train_corpus, 2)
        recipe = load_recipe(RECIPE, [f"data.path={train_corpus}", f"output_dir={work / 'runs'}"])
        run_dir = train(recipe)
    corpus = work / "score"
    n_files = make_corpus(corpus, args.copies)
    size_mb = sum(p.stat().st_size for p in walk_files(corpus)) / 1e6
    print(f"{n_files} DICOM files ({size_mb:.0f} MB) in {corpus}; model {run_dir}")

    plain, n_plain, t_plain = plain_loop(corpus, run_dir)
    out = work / "scores.csv"
    summary = score_folder(corpus, run_dir, out, batch_size=args.batch_size, workers=args.workers)
    with out.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "ok"]
    classes = [c[len("prob_") :] for c in rows[0] if c.startswith("prob_")]
    diff = max(float(np.abs(np.array([float(r[f"prob_{c}"]) for c in classes]) - plain[r["path"]]).max()) for r in rows)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    results = [
        {"method": "plain loop (1 process, batch 1)", "images": n_plain, "seconds": t_plain,
         "img_s": n_plain / t_plain, "ratio": 1.0},
        {"method": f"medvision score ({args.workers} workers, batch {args.batch_size})",
         "images": summary.scored_images, "seconds": summary.seconds, "img_s": summary.images_per_second,
         "ratio": summary.images_per_second / (n_plain / t_plain)},
    ]  # fmt: skip
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*results[0], "max_prob_diff", "files", "machine"])
        writer.writeheader()
        for r in results:
            writer.writerow({**r, "max_prob_diff": diff, "files": n_files, "machine": machine})
    print(f"\nmachine: {machine}\n")
    print("| method | images | seconds | img/s | vs plain |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['method']} | {r['images']} | {r['seconds']:.1f} | {r['img_s']:.1f} | {r['ratio']:.2f}x |")
    print(f"\nmax |p_medvision - p_plain| over {len(rows)} images: {diff:.2e}")
    print(summary.line())
    print(f"CSV: {args.out}")


if __name__ == "__main__":
    main()

"""Slide-level AUC of MIL heads on cached features against tile fine-tuning, on the same patient-grouped folds.

One synthetic cohort (``medvision.wsi.synthetic.build_slide_set``: real H&E tiles, two slides a patient, half
the slides with planted tumour) is tiled once (``--tile-size`` px at ``--target-mpp`` µm/px, at least 50%
tissue) and compared two ways, cross-validated by patient:

- **MIL on cached features**: ``extract_features`` embeds every tissue tile once with the frozen ImageNet
  ``tf_efficientnet_lite0`` (``timm:tf_efficientnet_lite0`` from ``../shared/weights``, 1280-d); then one
  ``data.source: slide_features`` run per head (``mean``, ``abmil``, ``clam_sb``, ``transmil``, the ``mil``
  defaults) does the ``--folds``-fold cross-validation. The folds depend only on the seed and the cohort
  (``patient_folds``), so every head gets the same folds; the script checks that the four ``folds.csv`` agree.
- **Tile fine-tuning** (what ``data.source: slides`` does today): for fold ``f`` a manifest with a ``split``
  column: ``test`` = the slides of fold ``f`` in the MIL runs' ``folds.csv``; ``val`` = the patients the MIL
  fold used for early stopping, recomputed with ``validation_split(labels, patients, train, val_fraction,
  seed + 1000 + f, stratify=True)`` on the rows of ``folds.csv`` (the cohort's slide order, labels as indices
  of the sorted class names, exactly as ``medvision.tasks.mil._fold`` calls it; the script checks the fit/val
  slide counts against each MIL fold's record); ``train`` = the rest. The same ImageNet ``tf_efficientnet_lite0``
  is fine-tuned on the training slides' tiles with the slide label on every tile (one head-only epoch, then
  ``--tile-epochs`` full epochs, ``--tiles-per-slide`` tiles a slide a epoch, the pathology augmentation
  preset); the checkpoint is picked on validation tile AUC and a temperature fitted on validation; a test
  slide's probability is the mean of its tiles' calibrated probabilities (``evaluation.patient_aggregate:
  mean``). The same tiling settings give the same tiles: the script checks that every test slide's predicted
  tiles are exactly the coordinates in its feature file.

Every row's numbers come from the same code (``medvision.tasks.mil_report.cv_metrics``): per-fold AUC, mean ±
SD across folds, pooled out-of-fold AUC with a stratified bootstrap CI (``--bootstrap`` resamples of whole
patients: a patient's two slides are drawn together). For each MIL head, ``Δ vs tiles`` is its pooled AUC minus
the tile row's, with a paired stratified bootstrap CI over the patients. Train seconds per fold: the MIL
fold's fit + prediction (from its record), or the whole tile run (``train()`` wall time: tissue grid, training,
validation, test, calibration, report); feature extraction is a one-off cost shared by every MIL head and fold,
shown in its own column. Timings on a shared machine are upper bounds: the script reports how many cores other
processes used meanwhile.

    OMP_NUM_THREADS=2 python benchmarks/mil_vs_tiles.py [--slides 40] [--folds 5] [--seed 0] [--quick]

Slides, features and runs go to ``--workdir`` (default ``runs/mil_vs_tiles``, git-ignored); the cohort and
its features are reused when the settings match. The table is printed and written as ``--out`` (CSV).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medvision.data.slide_features import FeatureCohort, validation_split
from medvision.intervals import bootstrap_cis
from medvision.metrics import MetricWarning, compute_auc
from medvision.recipe import EvalConfig, SlidesConfig, load_recipe
from medvision.tasks.benchmark.medmnist import machine
from medvision.tasks.mil_report import cv_metrics
from medvision.tasks.train import train
from medvision.wsi.features import feature_name, read_features
from medvision.wsi.synthetic import build_slide_set

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("MEDVISION_SHARED", HERE.parent.parent / "shared")).resolve()
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
ENCODER = "timm:tf_efficientnet_lite0"
HEADS = ("mean", "abmil", "clam_sb", "transmil")
CLASSES = ["normal", "tumour"]  # sorted label names, as both data sources index them
VAL_FRACTION = 0.2  # mil.val_fraction's default; the tile runs validate on the same patients


def busy_seconds() -> float:
    """CPU seconds the whole machine has used (``/proc/stat``)."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
    except OSError:
        return math.nan
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds of this process and its finished children (DataLoader and tissue-detection workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------- cohort and features


def cohort(work: Path, n_slides: int, size: tuple[int, int], mpp: float, seed: int) -> Path:
    """The slide cohort's manifest, built unless ``work/cohort`` already holds one made with these settings."""
    folder = work / "cohort"
    settings = {"n_slides": n_slides, "size": list(size), "mpp": mpp, "seed": seed, "formats": ["aperio", "generic"]}
    stamp = work / "cohort.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings and (folder / "manifest.csv").is_file():
        print(f"cohort: reusing {folder}", flush=True)
        return folder / "manifest.csv"
    for stale in ("cohort", "features", "runs", "recipes"):  # features and runs of another cohort are stale too
        shutil.rmtree(work / stale, ignore_errors=True)
    (work / "features_timing.json").unlink(missing_ok=True)
    start = time.perf_counter()
    manifest = build_slide_set(SHARED / "data" / "he_tiles", folder, n_slides, size, mpp, ("aperio", "generic"), seed)
    stamp.write_text(json.dumps(settings))
    print(f"cohort: {n_slides} slides of {size[0]} x {size[1]} px at {mpp} µm/px in "
          f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    return manifest


def features(work: Path, slides: Path, tiling: SlidesConfig, amp: str) -> tuple[Path, float]:
    """Every slide's tile features (extracted once, or reused) and the seconds the extraction took."""
    # imported here, after medvision.tasks.score: importing medvision.tasks.features first hits an import cycle
    # (features -> score -> score.mil -> features.RawTiles), reported with this benchmark
    import medvision.tasks.score  # noqa: F401
    from medvision.tasks.features import extract_features

    out, timing = work / "features", work / "features_timing.json"
    if timing.is_file() and (out / "features.json").is_file():
        seconds = json.loads(timing.read_text())["seconds"]
        print(f"features: reusing {out} (extracted in {seconds:.0f} s)", flush=True)
        return out, seconds
    start = time.perf_counter()
    # workers=0: tiles read in this process; one reader process per slide (workers=1) costs a process start-up
    # per slide, about as long as embedding a 50-tile slide on this CPU
    summary = extract_features(slides, out, ENCODER, WEIGHTS, slides=tiling, workers=0, amp=amp)
    seconds = time.perf_counter() - start
    if summary.error_files:
        raise SystemExit(f"feature extraction: {summary.line()}")
    timing.write_text(json.dumps({"seconds": seconds}))
    print(f"features: {summary.line()}", flush=True)
    return out, seconds


# ------------------------------------------------------------------------------------------------- the two methods


def run_mil(work: Path, manifest: Path, feats: Path, head: str, folds: int, seed: int, bootstrap: int,
            epochs: int | None) -> Path:  # fmt: skip
    mil: dict[str, Any] = {"head": head, "folds": folds, "val_fraction": VAL_FRACTION}
    if epochs is not None:
        mil["epochs"] = epochs
    tree = {"name": f"mil_{head}", "seed": seed, "output_dir": str(work / "runs"),
            "data": {"source": "slide_features", "path": str(manifest), "features": str(feats)},
            "mil": mil, "evaluation": {"bootstrap": bootstrap}}  # fmt: skip
    path = work / "recipes" / f"mil_{head}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return train(load_recipe(path), overwrite=True)


def split_manifest(slides: Path, rows: list[dict[str, str]], f: int, seed: int) -> tuple[Path, dict[str, str]]:
    """Fold ``f``'s manifest with a split column (see the module docstring) and each slide's split."""
    labels = np.asarray([CLASSES.index(r["label"]) for r in rows], np.int64)
    patients = [r["patient"] for r in rows]
    fold = np.asarray([int(r["fold"]) for r in rows])
    fit, val, why = validation_split(labels, patients, np.flatnonzero(fold != f), VAL_FRACTION, seed + 1000 + f,
                                     True, CLASSES)  # fmt: skip
    if len(val) == 0:  # the MIL heads then train without early stopping; tile fine-tuning needs a val split
        raise SystemExit(f"fold {f}: no validation split ({why}); use more --slides")
    split = {r["slide_path"]: "test" for r in rows if int(r["fold"]) == f}
    split.update({rows[i]["slide_path"]: "val" for i in val})
    split.update({rows[i]["slide_path"]: "train" for i in fit})
    path = slides / f"split_fold{f}.csv"  # beside the slides: slide_path stays the same relative string
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_path", "label", "patient_id", "split"])
        for r in rows:
            w.writerow([r["slide_path"], r["label"], r["patient"], split[r["slide_path"]]])
    return path, split


def run_tiles(work: Path, manifest: Path, f: int, seed: int, args: argparse.Namespace) -> Path:
    tiling = {"target_mpp": args.target_mpp, "tile_size": args.tile_size, "min_tissue": args.min_tissue,
              "tile_cache": True}  # fmt: skip
    tree = {
        "name": f"tiles_fold{f}", "seed": seed + f, "output_dir": str(work / "runs"),
        "data": {"source": "slides", "path": str(manifest), "image_size": args.image_size, "batch_size": 32,
                 "eval_batch_size": 128, "num_workers": 0, "tiles_per_slide": args.tiles_per_slide, "slides": tiling},
        "augment": {"preset": "pathology"},
        "model": {"name": "tf_efficientnet_lite0", "pretrained": str(WEIGHTS)},
        "train": {"amp": args.amp, "phases": [
            {"name": "head", "epochs": 1, "trainable": "head", "lr": 5e-3, "bn": "frozen"},
            {"name": "full", "epochs": args.tile_epochs, "trainable": "all", "lr": 2e-3, "warmup": 0.05}]},
        "evaluation": {"bootstrap": 100, "patient_aggregate": "mean", "explain": 0},
    }  # fmt: skip
    path = work / "recipes" / f"tiles_fold{f}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return train(load_recipe(path), overwrite=True)


def tile_fold(run: Path, split: dict[str, str], feats: Path, tumour: set[str]) -> tuple[list[str], np.ndarray]:
    """The fold's test slides and their probabilities (mean of their tiles' calibrated probabilities), checked
    against the run's own slide-level AUC and against the tiles in the slides' feature files."""
    tiles: dict[str, list[tuple[str, float]]] = {}
    for r in read_csv(run / "predictions.csv"):
        if r["split"] == "test":
            slide, xy = r["id"].rsplit("@", 1)
            tiles.setdefault(slide, []).append((xy, float(r["prob_tumour"])))
    test = sorted(s for s, v in split.items() if v == "test")
    if sorted(tiles) != test:
        raise SystemExit(f"{run}: test slides {sorted(tiles)} are not the fold's {test}")
    for s in test:
        coords = read_features(feats / feature_name(s)).coords
        if sorted(xy for xy, _ in tiles[s]) != sorted(f"{x},{y}" for x, y in coords.tolist()):
            raise SystemExit(f"{run}: the tiles of {s} differ from those in its feature file")
    p = np.asarray([np.mean([v for _, v in tiles[s]]) for s in test])
    probs = np.stack([1 - p, p], axis=1)
    reported = json.loads((run / "metrics.json").read_text())["patient"]["test"]["auc"]
    y = np.asarray([s in tumour for s in test], np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        mine = compute_auc(y, probs)
    if not (math.isnan(mine) and math.isnan(reported)) and abs(mine - reported) > 1e-9:
        raise SystemExit(f"{run}: slide AUC {mine} from predictions.csv, {reported} in metrics.json")
    return test, probs


# ----------------------------------------------------------------------------------------------------- the table


def paired_delta(y: np.ndarray, a: np.ndarray, b: np.ndarray, patients: list[str],
                 resamples: int) -> tuple[float, float, float]:  # fmt: skip
    """AUC(a) - AUC(b) on the same slides, with a paired stratified bootstrap CI that resamples whole patients."""
    both = np.stack([a, b], axis=1)

    def delta(yy: np.ndarray, pp: np.ndarray) -> float:
        return compute_auc(yy, pp[:, 0]) - compute_auc(yy, pp[:, 1])

    lo, hi = bootstrap_cis(y, both, {"d": delta}, resamples, 0, groups=patients)["d"]
    return delta(y, both), lo, hi


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=40, help="slides in the cohort (two a patient)")
    parser.add_argument("--size", type=int, nargs=2, default=(3072, 2304), metavar=("W", "H"), help="level-0 size")
    parser.add_argument("--mpp", type=float, default=0.5, help="level-0 µm/px of the slides")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="cohort, folds, heads and fine-tuning")
    parser.add_argument("--tile-size", type=int, default=112)
    parser.add_argument("--target-mpp", type=float, default=1.0)
    parser.add_argument("--min-tissue", type=float, default=0.5)
    parser.add_argument("--image-size", type=int, default=112, help="tile fine-tuning input size")
    parser.add_argument("--tile-epochs", type=int, default=3, help="full fine-tuning epochs after the head epoch")
    parser.add_argument("--tiles-per-slide", type=int, default=16, help="training tiles per slide per epoch")
    parser.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "none", "bf16"),
        help="precision of feature extraction and fine-tuning (auto: bf16 on a CPU with native bf16)",
    )
    parser.add_argument("--mil-epochs", type=int, default=None, help="default: the mil section's (40, early stop)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of every CI")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 20 small slides, 3 folds, 1 full tile epoch, 10 MIL epochs")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=HERE.parent / "runs" / "mil_vs_tiles")
    parser.add_argument("--out", type=Path, default=HERE / "mil_vs_tiles.csv")
    args = parser.parse_args(argv)
    if args.quick:
        args.slides, args.size, args.folds, args.tile_epochs, args.tiles_per_slide = 20, (1536, 1152), 3, 1, 8
        args.mil_epochs, args.bootstrap = 10, 200
        if args.workdir == parser.get_default("workdir"):
            args.workdir = HERE.parent / "runs" / "mil_vs_tiles_quick"
        if args.out == parser.get_default("out"):
            args.out = args.workdir / "mil_vs_tiles.csv"
    if args.slides < 2 * args.folds:
        parser.error(f"--slides {args.slides}: {args.folds} folds need at least {2 * args.folds} slides (2 a patient)")
    command = shlex.join(["python", "benchmarks/mil_vs_tiles.py", *(sys.argv[1:] if argv is None else argv)])
    host = machine()
    started, busy0, own0 = time.perf_counter(), busy_seconds(), own_seconds()
    work: Path = args.workdir
    tiling = SlidesConfig(tile_size=args.tile_size, target_mpp=args.target_mpp, min_tissue=args.min_tissue)

    manifest = cohort(work, args.slides, tuple(args.size), args.mpp, args.seed)
    tumour = {r["slide_path"] for r in read_csv(manifest) if r["label"] == "tumour"}
    feats, extract_s = features(work, manifest.parent, tiling, args.amp)
    n_tiles = sum(int(r["tiles"]) for r in read_csv(feats / "features.csv") if r["status"] == "ok")

    mil_runs = {}
    for head in HEADS:
        t = time.perf_counter()
        mil_runs[head] = run_mil(work, manifest, feats, head, args.folds, args.seed, args.bootstrap, args.mil_epochs)
        print(f"MIL {head}: {time.perf_counter() - t:.0f} s", flush=True)
    rows = read_csv(mil_runs[HEADS[0]] / "folds.csv")
    for head in HEADS[1:]:
        if read_csv(mil_runs[head] / "folds.csv") != rows:
            raise SystemExit(f"{mil_runs[head]}/folds.csv differs from {mil_runs[HEADS[0]]}/folds.csv")
    fold_of = {r["slide_path"]: int(r["fold"]) for r in rows}

    records, tile_seconds = [], []
    for f in range(args.folds):
        path, split = split_manifest(manifest.parent, rows, f, args.seed)
        n_fit, n_val = sum(v == "train" for v in split.values()), sum(v == "val" for v in split.values())
        for head in HEADS:
            rec = json.loads((mil_runs[head] / "folds" / f"fold{f}.json").read_text())
            if (rec["fit_slides"], rec["val_slides"]) != (n_fit, n_val):
                raise SystemExit(f"fold {f}: MIL {head} fitted/validated on {rec['fit_slides']}/{rec['val_slides']} "
                                 f"slides, the tile split has {n_fit}/{n_val}")  # fmt: skip
        t = time.perf_counter()
        run = run_tiles(work, path, f, args.seed, args)
        tile_seconds.append(time.perf_counter() - t)
        test, probs = tile_fold(run, split, feats, tumour)
        if any(fold_of[s] != f for s in test):
            raise SystemExit(f"fold {f}: the tile run tested slides of other folds")
        records.append({"fold": f, "test": test, "predictions": probs.tolist(), "best_epoch": 0,
                        "seconds": tile_seconds[-1]})  # fmt: skip
        print(f"tiles fold {f}: {n_fit} train / {n_val} val / {len(test)} test slides, {tile_seconds[-1]:.0f} s",
              flush=True)  # fmt: skip

    # every row through the same report code: per fold, mean ± SD, pooled with its bootstrap CI
    ev = EvalConfig(bootstrap=args.bootstrap)
    labels = np.asarray([CLASSES.index(r["label"]) for r in rows], np.int64)
    slides = [r["slide_path"] for r in rows]
    shell = FeatureCohort(slides, [], [], labels, [r["patient"] for r in rows], CLASSES, {})
    folds = np.asarray([fold_of[s] for s in slides])
    methods: dict[str, tuple[dict[str, Any], dict[str, float], list[float]]] = {}
    for head in HEADS:
        run = mil_runs[head]
        m = json.loads((run / "metrics.json").read_text())
        oof = {r["slide_path"]: float(r["prob_tumour"]) for r in read_csv(run / "predictions.csv")}
        methods[f"MIL {head} (cached features)"] = (m, oof, [r["seconds"] for r in m["folds"]])
    tm = cv_metrics(shell, folds, records, ev)
    tile_oof = {s: p[1] for r in records for s, p in zip(r["test"], r["predictions"], strict=True)}
    tile_name = "tile fine-tuning, mean of tiles"
    methods[tile_name] = (tm, tile_oof, tile_seconds)

    other = (busy_seconds() - busy0) - (own_seconds() - own0)
    wall = time.perf_counter() - started
    y = labels
    p_tiles = np.asarray([tile_oof[s] for s in slides])
    table = []
    for name, (m, oof, secs) in methods.items():
        p = np.asarray([oof[s] for s in slides])
        pooled = m["pooled"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricWarning)
            check = compute_auc(y, p)
            paired = name != tile_name
            d, dlo, dhi = paired_delta(y, p, p_tiles, shell.patients, args.bootstrap) if paired else (math.nan,) * 3
        if abs(check - pooled["auc"]) > 1e-6:
            raise SystemExit(f"{name}: pooled AUC {pooled['auc']} in its metrics, {check} from its predictions")
        table.append({
            "method": name, "folds": args.folds, "slides": len(slides), "patients": len(set(shell.patients)),
            "fold_auc": ";".join(f"{r['auc']:.4f}" for r in m["folds"]),
            "fold_n": ";".join(str(r["n"]) for r in m["folds"]),
            "auc_mean": m["across_folds"]["auc"]["mean"], "auc_sd": m["across_folds"]["auc"]["sd"],
            "pooled_auc": pooled["auc"], "pooled_lo": pooled["auc_ci"][0], "pooled_hi": pooled["auc_ci"][1],
            "delta_vs_tiles": d, "delta_lo": dlo, "delta_hi": dhi,
            "train_s_per_fold": float(np.mean(secs)), "train_s_min": float(min(secs)), "train_s_max": float(max(secs)),
            "one_off_s": extract_s if name != tile_name else 0.0,
        })  # fmt: skip
    meta = {"tiles": n_tiles, "tiling": f"{args.tile_size} px at {args.target_mpp} µm/px, min tissue {args.min_tissue}",
            "machine": f"{host['device']}; CPU flags {host['cpu_flags']}; amp auto = {host['amp_auto']}; "
                       f"amp used = {args.amp}; torch {host['torch']}",
            "date": host["date"], "command": command, "wall_s": round(wall),
            "other_cores": round(other / wall, 2)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*table[0], *meta])
        writer.writeheader()
        writer.writerows([{**{k: f"{v:.5g}" if isinstance(v, float) else v for k, v in r.items()}, **meta}
                          for r in table])  # fmt: skip

    print(f"\nMachine: {meta['machine']}; {meta['date']}")
    print(f"Command: `{command}`; {meta['wall_s']} s wall in all; other processes used {meta['other_cores']} cores "
          "on average meanwhile")  # fmt: skip
    print(
        f"{len(slides)} slides of {table[0]['patients']} patients ({sum(labels)} tumour), {n_tiles} tissue tiles "
        f"({meta['tiling']}); {args.folds} folds grouped by patient; {args.bootstrap} bootstrap resamples\n"
    )
    print("| method | per-fold AUC | mean ± SD | pooled AUC [95% CI] | Δ pooled vs tiles [95% CI] | train s per fold "
          "| one-off s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        delta = "-" if math.isnan(r["delta_vs_tiles"]) else \
            f"{r['delta_vs_tiles']:+.3f} [{r['delta_lo']:+.3f}, {r['delta_hi']:+.3f}]"  # fmt: skip
        one_off = f"{r['one_off_s']:.0f} (features)" if r["one_off_s"] else "-"
        print(f"| {r['method']} | {r['fold_auc'].replace(';', ', ')} | {r['auc_mean']:.3f} ± {r['auc_sd']:.3f} | "
              f"{r['pooled_auc']:.3f} [{r['pooled_lo']:.3f}, {r['pooled_hi']:.3f}] | {delta} | "
              f"{r['train_s_per_fold']:.1f} ({r['train_s_min']:.1f}-{r['train_s_max']:.1f}) | {one_off} |")  # fmt: skip
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

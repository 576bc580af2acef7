"""Test-time augmentation on and off, for finished runs: the same model, the same test images.

For each run folder, the validation and test splits are evaluated once with every view (the image,
its horizontal and vertical flips and its 90-degree rotation). "off" uses the image's own logits;
"on" averages the calibrated probabilities of the views, as ``evaluation.tta: [hflip, vflip,
rot90]`` does. Each side fits its own temperature on validation (validation decides, for both), and
is scored on test: AUC and accuracy with 95% stratified bootstrap CIs, ECE, and the on-minus-off
difference of AUC and accuracy with a paired bootstrap CI (the same resampled test images for both).

    python benchmarks/tta.py RUN_DIR [RUN_DIR ...] [--tta hflip,vflip,rot90] [--resamples 1000]

Prints a Markdown table and writes ``benchmarks/tta.csv``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch

from medvision.data.sources import load_table
from medvision.evaluation import SplitOutputs, fit_decision
from medvision.inference import load_run
from medvision.intervals import bootstrap_cis
from medvision.metrics import compute_accuracy, compute_auc, expected_calibration_error
from medvision.runs import cache_dir
from medvision.runtime import make_loader, resolve_amp
from medvision.training.build import model_inputs, split_dataset
from medvision.training.loop import predict_logits

HERE = Path(__file__).parent


def views_of(run_dir: Path, tta: tuple[str, ...]) -> tuple[str, list[str], dict[str, SplitOutputs]]:
    """The run's name, classes and (N, 1 + len(tta), K) logits of its validation and test splits."""
    device = torch.device("cpu")
    recipe, meta, bundle = load_run(run_dir, device)
    recipe = recipe.changed({"data.classes": meta["classes"]})
    amp = resolve_amp(recipe.train.amp, device)
    table = load_table(recipe.data, recipe.seed, cache_dir(recipe))
    out = {}
    for split in ("val", "test"):
        ds = split_dataset(recipe, table, bundle, split, train=False)
        loader = make_loader(ds, recipe.data.eval_batch_size, 0, device)
        logits, labels = predict_logits(bundle.model, loader, device, amp, model_inputs(recipe, bundle), tta=tta)
        out[split] = SplitOutputs(logits[:, 0], labels, ds.groups, views=logits)
    return recipe.name, meta["classes"], out


def measure(run_dir: Path, tta: tuple[str, ...], resamples: int) -> dict[str, object]:
    name, classes, splits = views_of(run_dir, tta)
    recipe, _, _ = load_run(run_dir, torch.device("cpu"))
    cfg = recipe.evaluation
    off = {s: SplitOutputs(o.logits, o.labels, o.groups) for s, o in splits.items()}
    probs = {}
    row: dict[str, object] = {"run": name, "tta": "+".join(tta), "n_test": len(splits["test"].labels)}
    for side, outputs in (("off", off), ("on", splits)):
        decision = fit_decision(outputs["val"], classes, cfg)
        p = outputs["test"].probs(decision.temperature)
        y = outputs["test"].labels
        probs[side] = p
        cis = bootstrap_cis(y, p, {"auc": compute_auc, "acc": compute_accuracy}, resamples, 0)
        row.update({f"auc_{side}": compute_auc(y, p), f"auc_{side}_lo": cis["auc"][0], f"auc_{side}_hi": cis["auc"][1],
                    f"acc_{side}": compute_accuracy(y, p), f"acc_{side}_lo": cis["acc"][0],
                    f"acc_{side}_hi": cis["acc"][1], f"ece_{side}": expected_calibration_error(y, p),
                    f"temperature_{side}": decision.temperature})  # fmt: skip
    y = splits["test"].labels
    k = len(classes)
    both = np.concatenate([probs["off"], probs["on"]], axis=1)

    def d_auc(yy: np.ndarray, pp: np.ndarray) -> float:
        return compute_auc(yy, pp[:, k:]) - compute_auc(yy, pp[:, :k])

    def d_acc(yy: np.ndarray, pp: np.ndarray) -> float:
        return compute_accuracy(yy, pp[:, k:]) - compute_accuracy(yy, pp[:, :k])

    deltas = bootstrap_cis(y, both, {"auc": d_auc, "acc": d_acc}, resamples, 0)
    row.update({"d_auc": d_auc(y, both), "d_auc_lo": deltas["auc"][0], "d_auc_hi": deltas["auc"][1],
                "d_acc": d_acc(y, both), "d_acc_lo": deltas["acc"][0], "d_acc_hi": deltas["acc"][1]})  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished medvision run folders")
    parser.add_argument("--tta", default="hflip,vflip,rot90", help="views besides the image (default: %(default)s)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=HERE / "tta.csv")
    args = parser.parse_args(argv)
    tta = tuple(t for t in args.tta.split(",") if t)
    rows = [measure(run, tta, args.resamples) for run in args.runs]
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: f"{v:.5g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows])

    def ci(r: dict[str, object], key: str, sign: str = "") -> str:
        return f"{r[key]:{sign}.4f} ({r[key + '_lo']:{sign}.4f} to {r[key + '_hi']:{sign}.4f})"

    print(f"| run | views | test n | AUC off | AUC on ({'+'.join(tta)}) | ΔAUC (paired 95% CI) | ACC off | ACC on | "
          "ΔACC (paired 95% CI) | ECE off / on |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['run']} | {1 + len(tta)} | {r['n_test']} | {ci(r, 'auc_off')} | {ci(r, 'auc_on')} | "
              f"{ci(r, 'd_auc', '+')} | {ci(r, 'acc_off')} | {ci(r, 'acc_on')} | {ci(r, 'd_acc', '+')} | "
              f"{r['ece_off']:.4f} / {r['ece_on']:.4f} |")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

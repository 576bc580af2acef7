"""``medvision benchmark medmnist``: a recipe over seeds and variants on MedMNIST's official splits, beside
the published figures.

Each variant is the recipe plus a few ``--set``-style overrides (``base`` is the recipe as it is). For
every variant and seed one ordinary run is trained on the ``.npz`` file's own train split, chooses
its checkpoint, temperature and operating points on the validation split, and reads the test split
once, at the end. Finished runs are reused, so an interrupted benchmark resumes.

Outputs, in ``--out``: ``medmnist.csv`` (one row per run: test AUC and accuracy with their 95%
bootstrap CIs, accuracy at each operating point, epochs, wall time), ``medmnist_summary.csv`` (mean
over seeds, mean CI, SD over seeds), ``medmnist_deltas.csv`` (each variant minus the reference, test
AUC and accuracy, a paired bootstrap CI over the test images and the same seeds) and ``medmnist.md``:
the machine, then the published rows of the file's own image size and medvision's, and the deltas.

Accuracy is the argmax of the probabilities (for two classes, a 0.5 threshold), as MedMNIST v2 and
MedMNIST+ report it; ``acc@youden`` is the accuracy at the Youden threshold chosen on validation
(two-class runs). AUC is scikit-learn's macro one-vs-rest AUC, as both papers use.
"""

from __future__ import annotations

import logging
import math
import time
import zipfile
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvision.metrics import compute_auc
from medvision.recipe import Recipe, recipe_from_dict
from medvision.runs import read_run_json
from medvision.runtime import cpu_flags, resolve_amp
from medvision.tasks.benchmark.deltas import delta_unit, paired_bootstrap
from medvision.tasks.benchmark.labels import (
    StudyResult,
    TestFigures,
    check_seeds,
    finished_as,
    parse_seed_list,
    write_dicts,
)
from medvision.tasks.benchmark.speed import BenchmarkError, device_name, figure
from medvision.tasks.train import train

log = logging.getLogger("medvision")


@dataclass(frozen=True)
class Published:
    """A published test-split figure (AUC and ACC as fractions; SD over their seeds when given) on the files of
    ``size`` px images: only a run on a file of that size sits beside it."""

    source: str
    model: str
    auc: float
    acc: float
    auc_sd: float | None = None
    acc_sd: float | None = None
    size: int = 28


_V2 = "MedMNIST v2 (Yang et al., Sci Data 2023, benchmark table)"
_PLUS = "MedMNIST+ (Doerrich et al. 2024, BENCHMARK.md)"
#: The figures to beat at 28 px. MedMNIST+'s are its best 28 px ACC and best 28 px AUC over 10 models and
#: 3 protocols (both from one model here); its 64-224 px columns are other files (images scanned at that
#: size), not the 28 px data upsampled, so they are not comparable with any run on the 28 px file.
PUBLISHED: dict[str, list[Published]] = {
    "bloodmnist": [
        Published(_V2, "ResNet-18 (28), end-to-end", 0.998, 0.958),
        Published(_PLUS, "VGG16, end-to-end, 28 px (best 28 px ACC and AUC)", 0.9966, 0.9485, 0.0006, 0.0047),
    ],
    "breastmnist": [
        Published(_V2, "ResNet-18 (28), end-to-end", 0.901, 0.863),
        Published(_PLUS, "AlexNet, end-to-end, 28 px (best 28 px ACC and AUC)", 0.8908, 0.8654, 0.0241, 0.0189),
    ],
}


@dataclass
class SeedRun(TestFigures):
    """One variant and seed, trained and tested; the validation figures are what variants are chosen on."""

    variant: str
    seed: int
    val_auc: float = math.nan
    val_acc: float = math.nan
    acc_youden: float = math.nan
    best_epoch: int = 0
    amp: str = ""
    model: str = ""


MedmnistResult = StudyResult[SeedRun]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:KEY=VALUE;KEY=VALUE`` -> (NAME, overrides); ``NAME:`` alone is the recipe as it is.

    Examples:
        >>> parse_variant("ls0:train.label_smoothing=0")
        ('ls0', ['train.label_smoothing=0'])
    """
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise BenchmarkError(f"--variant {text!r}: expected NAME:KEY=VALUE[;KEY=VALUE...], NAME of letters, digits, "
                             "- and _ (e.g. 'tta:evaluation.tta=[hflip,vflip]')")  # fmt: skip
    overrides = [part.strip() for part in rest.split(";") if part.strip()]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise BenchmarkError(f"--variant {name}: {bad[0]!r} is not KEY=VALUE")
    return name, overrides


def dataset_key(recipe: Recipe) -> str:
    """``bloodmnist`` for ``.../bloodmnist.npz`` (or ``bloodmnist_64.npz``): which dataset's published rows apply."""
    return Path(recipe.data.path).stem.lower().split("_")[0]


def source_side(recipe: Recipe) -> int | None:
    """The side, in pixels, of the ``.npz`` file's images, from its ``test_images`` array header (nothing is
    decoded); None when the file is not such an archive.

    MedMNIST+ ships each dataset at 28, 64, 128 and 224 px as separate files, scanned at that size: the
    file, not its name nor ``data.image_size``, says which published figures a run can be set beside.
    """
    try:
        with zipfile.ZipFile(recipe.data.path) as archive, archive.open("test_images.npy") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape = read(fh)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return int(shape[1]) if len(shape) >= 3 else None


def published_rows(recipe: Recipe, side: int | None) -> list[Published]:
    """The published figures of the recipe's dataset measured on files of ``side`` px images (none when unknown)."""
    return [p for p in PUBLISHED.get(dataset_key(recipe), []) if side is not None and p.size == side]


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` -> ``[0, 1, 2]`` (:func:`~medvision.tasks.benchmark.labels.parse_seed_list`). One number is
    one seed, not a count as ``benchmark labels --seeds 3`` reads it: the log says so when that seed is not 0."""
    seeds = parse_seed_list(text)
    if "," not in text and seeds[0] != 0:
        log.warning("medmnist benchmark: --seeds %s is one run, of seed %d: --seeds lists the seeds, it is not a "
                    "count as in benchmark labels (three seeds are 0,1,2)", text.strip(), seeds[0])  # fmt: skip
    return seeds


def configure(base: Recipe, variant: str, overrides: list[str], seed: int, out: Path) -> Recipe:
    """The run of one variant and seed: the recipe, the variant's overrides, its own name, seed and folder."""
    tree = base.model_dump(mode="json")
    return recipe_from_dict(tree, origin=f"variant {variant!r} of {base.name}", overrides=[
        *overrides, f"seed={seed}", f"name={base.name}__{variant}__s{seed}", f"output_dir={out / 'runs'}",
        "evaluation.explain=0",  # Grad-CAM panels are not what this benchmark is about
    ])  # fmt: skip


def read_run(run_dir: Path, row: SeedRun) -> SeedRun:
    """A finished run's figures from its ``metrics.json`` and ``run.json``."""
    metrics = row.read_test(run_dir)
    val = metrics["image"]["val"]
    row.val_auc, row.val_acc = figure(val.get("auc")), figure(val.get("acc"))
    for op in metrics["image"]["test"].get("operating_points") or []:
        if op.get("rule") == "youden":  # no Youden point (one class in validation): null matrix, NaN accuracy
            cm = np.asarray(op.get("confusion_matrix") or [[math.nan]], dtype=float)
            row.acc_youden = float(np.trace(cm) / cm.sum()) if cm.sum() > 0 else math.nan
    row.best_epoch = int(metrics.get("best_epoch") or 0)
    meta = read_run_json(run_dir)
    row.amp, row.model = str(meta.get("amp", "")), str(meta.get("model", ""))
    return row


def machine() -> dict[str, str]:
    """What the figures were measured on: device, native bf16 or not, torch, date."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        have = cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        have = set()
    flags = " ".join(f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in have)
    return {"device": device_name(device), "cpu_flags": flags or "n/a", "amp_auto": resolve_amp("auto", device),
            "torch": torch.__version__, "date": datetime.now().astimezone().isoformat(timespec="seconds")}  # fmt: skip


def medmnist_benchmark(
    recipe: Recipe, seeds: list[int], variants: list[tuple[str, list[str]]], out: Path, overwrite: bool = False,
    resamples: int = 1000,
) -> MedmnistResult:  # fmt: skip
    """Trains and tests every variant for every seed (reusing finished runs) and writes the tables.

    The first variant is the reference of the deltas. Examples:
        >>> medmnist_benchmark(load_recipe("recipes/breastmnist_effnet_lite0_gray.yaml"), [0, 1, 2],
        ...                    [("base", []), ("no_ls", ["train.label_smoothing=0"])], Path("medmnist-breast"))
    """
    check_seeds(seeds)
    if not variants:
        variants = [("base", [])]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise BenchmarkError(f"--variant names must differ; got {names}")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[SeedRun] = []
    for name, overrides in variants:
        for seed in seeds:
            r = configure(recipe, name, overrides, seed, out)  # a bad override fails here, before any training
            row = SeedRun(name, seed)
            run_dir = Path(r.output_dir) / r.name
            start = time.perf_counter()
            try:
                if overwrite or not finished_as(run_dir, r):
                    log.info("medmnist benchmark: %s", r.name)
                    train(r, overwrite=True)
                else:
                    log.info("medmnist benchmark: %s finished earlier with this recipe; reused", r.name)
                rows.append(read_run(run_dir, row))
            except Exception as err:  # one failed run is a row with its error; the others still run
                row.error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                row.seconds = time.perf_counter() - start
                log.error("medmnist benchmark: %s failed: %s", r.name, row.error)
                rows.append(row)
            write_dicts(out / "medmnist.csv", [asdict(x) for x in rows])
    summary = summarise(rows, names)
    deltas = variant_deltas(rows, names, resamples, recipe.evaluation.bootstrap_seed)
    md = to_markdown(recipe, summary, deltas, machine(), source_side(recipe))
    files = [out / "medmnist.csv", out / "medmnist_summary.csv", out / "medmnist_deltas.csv", out / "medmnist.md"]
    write_dicts(files[1], summary)
    write_dicts(files[2], deltas)
    files[3].write_text(md)
    return MedmnistResult(rows, summary, deltas, md, files)


def summarise(rows: list[SeedRun], names: list[str]) -> list[dict[str, Any]]:
    """Per variant: mean over seeds of each figure and of its CI bounds, and the SD over seeds."""
    out = []
    for name in names:
        ok = [r for r in rows if r.variant == name and not r.error]
        entry: dict[str, Any] = {"variant": name, "seeds": len(ok), "failed": sum(r.variant == name and bool(r.error)
                                                                                   for r in rows)}  # fmt: skip
        for metric in ("val_auc", "val_acc", "auc", "acc", "acc_youden", "epochs", "best_epoch", "seconds"):
            vals = np.array([getattr(r, metric) for r in ok], dtype=float)
            entry[metric] = float(vals.mean()) if len(vals) else math.nan
            if metric in ("auc", "acc"):
                entry[f"{metric}_lo"] = float(np.mean([getattr(r, f"{metric}_lo") for r in ok])) if ok else math.nan
                entry[f"{metric}_hi"] = float(np.mean([getattr(r, f"{metric}_hi") for r in ok])) if ok else math.nan
                entry[f"{metric}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
        entry["amp"] = ",".join(sorted({r.amp for r in ok}))
        entry["model"] = ",".join(sorted({r.model for r in ok}))
        out.append(entry)
    return out


def _accuracy(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(p.argmax(axis=1) == y))


def variant_deltas(rows: list[SeedRun], names: list[str], resamples: int, seed: int) -> list[dict[str, Any]]:
    """Each variant minus the reference (the first), test AUC and accuracy, over the seeds both finished."""
    done = {(r.variant, r.seed): r for r in rows if not r.error}
    out = []
    for name in names[1:]:
        pairs = [(done[(names[0], s)].run_dir, r.run_dir) for (v, s), r in done.items()
                 if v == name and (names[0], s) in done]  # fmt: skip
        if not pairs:
            continue
        entry: dict[str, Any] = {"variant": name, "reference": names[0], "seeds": len(pairs)}
        for metric, d in paired_bootstrap(pairs, {"auc": compute_auc, "acc": _accuracy}, resamples, seed).items():
            entry.update({f"delta_{metric}": d.value, f"delta_{metric}_lo": d.lo, f"delta_{metric}_hi": d.hi,
                          "unit": d.unit})  # fmt: skip
        out.append(entry)
    return out


def _f(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"


def _with_ci_sd(e: dict[str, Any], metric: str) -> str:
    """Four decimals: near the published figures the third one decides."""
    if not math.isfinite(e[metric]):
        return "n/a"
    ci = f" ({e[f'{metric}_lo']:.4f}-{e[f'{metric}_hi']:.4f})" if math.isfinite(e[f"{metric}_lo"]) else ""
    sd = f" ± {e[f'{metric}_sd']:.4f}" if math.isfinite(e[f"{metric}_sd"]) else ""
    return f"{e[metric]:.4f}{sd}{ci}"


def verdict(recipe: Recipe, summary: list[dict[str, Any]], side: int | None = 28) -> str:
    """One sentence: the mean test AUC and ACC of the variant with the best validation AUC (then accuracy): the
    one a user would pick without looking at the test split, against the best published figures at the file's
    image size (none: no sentence)."""
    published = published_rows(recipe, side)
    done = [e for e in summary if e["seeds"] and math.isfinite(e["val_auc"])]
    if not published or not done:
        return ""
    best = max(done, key=lambda e: (e["val_auc"], e["val_acc"]))
    auc_bar, acc_bar = max(p.auc for p in published), max(p.acc for p in published)

    def against(value: float, bar: float) -> str:
        return f"{value:.4f} >= {bar:.4g}" if value >= bar else f"{value:.4f} < {bar:.4g} (gap {bar - value:.4f})"

    return (f"{dataset_key(recipe)}: medvision `{best['variant']}` (best validation AUC; mean of {best['seeds']} "
            f"seeds) test AUC "
            f"{against(best['auc'], auc_bar)}, ACC {against(best['acc'], acc_bar)}, against the best published "
            f"{published[0].size} px figures.")  # fmt: skip


def to_markdown(recipe: Recipe, summary: list[dict[str, Any]], deltas: list[dict[str, Any]],
                host: dict[str, str], side: int | None = 28) -> str:  # fmt: skip
    """The table; ``side`` is the file's image side (:func:`source_side`), which picks the published rows."""
    size = recipe.data.image_size
    resized = "" if side is None or size == side else f" {'upsampled' if size > side else 'downsampled'} to {size} px"
    source = f"{side} px source images{resized}" if side else f"source image size unknown, model input {size} px"
    published = published_rows(recipe, side)
    other = sorted({p.size for p in PUBLISHED.get(dataset_key(recipe), [])} - {p.size for p in published})
    lines = [
        f"MedMNIST benchmark of `{recipe.name}` ({dataset_key(recipe)}, official test split, {source}; mean over "
        "seeds ± SD, mean 95% bootstrap CI)",
        "",
        f"Machine: {host['device']}; CPU flags {host['cpu_flags']}; amp auto = {host['amp_auto']}; torch "
        f"{host['torch']}; {host['date']}",
        "",
        "| source | model / variant | seeds | val AUC / ACC | test AUC | test ACC (argmax) | ACC @ youden "
        "| epochs (best) | min/run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    if other:
        lines[1:1] = ["", f"Published figures for {dataset_key(recipe)} at {', '.join(map(str, other))} px are not "
                      "shown: " + (f"this file's images are {side} px" if side else "this file's image size is unknown")
                      + ", and a file of another size is other data, not comparable."]  # fmt: skip
    for p in published:
        auc = f"{p.auc:.4g}" + (f" ± {p.auc_sd:.4f}" if p.auc_sd is not None else "")  # as published: 3 or 4 places
        acc = f"{p.acc:.4g}" + (f" ± {p.acc_sd:.4f}" if p.acc_sd is not None else "")
        seeds = 3 if p.auc_sd is not None else "-"
        lines.append(f"| {p.source} | {p.model} | {seeds} | - | {auc} | {acc} | - | - | - |")
    for e in summary:
        failed = f" ({e['failed']} failed)" if e["failed"] else ""
        lines.append(
            f"| medvision ({e['amp'] or '-'}) | {e['model'] or recipe.model.name}, `{e['variant']}` | "
            f"{e['seeds']}{failed} | "
            f"{_f(e['val_auc'])} / {_f(e['val_acc'])} | {_with_ci_sd(e, 'auc')} | {_with_ci_sd(e, 'acc')} | "
            f"{_f(e['acc_youden'])} | "
            f"{_f(e['epochs'], 0)} ({_f(e['best_epoch'], 0)}) | {_f(e['seconds'] / 60, 1)} |"
        )
    if deltas:
        unit = delta_unit(deltas)
        title = f"Each variant minus the reference, same seeds, paired bootstrap over the test {unit} (95% CI)"
        lines += ["", title, "", "| variant | minus | seeds | delta AUC | delta ACC |", "| --- " * 5 + "|"]
        for d in deltas:
            lines.append(
                f"| {d['variant']} | {d['reference']} | {d['seeds']} | {d['delta_auc']:+.4f} "
                f"({d['delta_auc_lo']:+.4f} to {d['delta_auc_hi']:+.4f}) | {d['delta_acc']:+.4f} "
                f"({d['delta_acc_lo']:+.4f} to {d['delta_acc_hi']:+.4f}) |"
            )
    said = verdict(recipe, summary, side)
    return "\n".join(lines + (["", said] if said else [])) + "\n"

"""``medvision benchmark labels``: how many labels does a task need, from which start, with which protocol?

For every combination of label fraction, initialisation (``imagenet``, ``random``, or a run folder
such as a ``medvision pretrain`` backbone) and protocol (``finetune``, ``linear_probe``, ``knn``),
and for each seed, one ordinary run is trained on that fraction of the training split
(``data.train_fraction``: whole patients, stratified by label, nested across fractions) and
evaluated on the whole test split. The validation split stays whole: it chooses the checkpoint,
the temperature and the probe's regularisation, as in every run.

Outputs, in ``--out``: ``label_efficiency.csv`` (one row per run), ``label_efficiency_summary.csv``
and ``label_efficiency.md`` (mean test AUC and accuracy over seeds, the mean of the runs' 95%
bootstrap CIs, and the standard deviation over seeds), ``label_efficiency.png`` (AUC and accuracy
against the number of labels, log axis, one line per init and protocol, CI bands), and
``label_efficiency_deltas.csv``: each init against the reference init at every fraction and
protocol, the test-AUC difference averaged over seeds with a paired bootstrap CI (the same resampled
test images for both; whole patients where a patient has several test images, as the runs' own CIs draw
them). Finished runs of the same recipe are reused, so an interrupted benchmark resumes; the rows of an
earlier grid in ``--out`` stay in the tables only when their runs were trained from the same base recipe.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import yaml
from matplotlib.figure import Figure

from medvision.data.sources import load_table
from medvision.data.table import subset_indices
from medvision.metrics import compute_auc
from medvision.recipe import Recipe, dump_recipe
from medvision.recipe_nodes import FINETUNE_ONLY, TrainConfig, finetune_only_settings
from medvision.runs import RunError, cache_dir, read_json, read_metrics_json, read_run_json
from medvision.tasks.benchmark.deltas import delta_unit, paired_bootstrap
from medvision.tasks.benchmark.speed import BenchmarkError, figure
from medvision.tasks.track import log_reused_run
from medvision.tasks.train import train
from medvision.tracking import Tracker, tracked

log = logging.getLogger("medvision")
PROTOCOLS = ("finetune", "linear_probe", "knn")


@dataclass(kw_only=True)
class TestFigures:
    """A finished run's test AUC and accuracy with their 95% bootstrap CIs, epochs and wall time; ``error`` set
    when the run failed (the other runs of a benchmark still run)."""

    auc: float = math.nan
    auc_lo: float = math.nan
    auc_hi: float = math.nan
    acc: float = math.nan
    acc_lo: float = math.nan
    acc_hi: float = math.nan
    epochs: int = 0
    seconds: float = math.nan
    run_dir: str = ""
    error: str = ""

    def read_test(self, run_dir: Path) -> dict[str, Any]:
        """Fills the figures from the run's ``metrics.json``; returns that file's contents."""
        metrics = read_metrics_json(run_dir)
        test = metrics["image"]["test"]
        self.auc, self.acc = figure(test.get("auc")), figure(test.get("acc"))
        self.auc_lo, self.auc_hi = (figure(v) for v in (test.get("auc_ci") or [None, None])[:2])
        self.acc_lo, self.acc_hi = (figure(v) for v in (test.get("acc_ci") or [None, None])[:2])
        self.epochs = len(metrics.get("history", []))
        self.seconds = float(metrics.get("seconds", math.nan))
        self.run_dir = str(run_dir)
        return metrics


@dataclass
class LabelRun(TestFigures):
    """One trained and tested run of the label-efficiency grid."""

    init: str
    protocol: str
    fraction: float
    seed: int
    labels: int = 0


R = TypeVar("R", bound=TestFigures)


@dataclass
class StudyResult(Generic[R]):
    """A benchmark of many runs: one row per run, the summary over seeds, the paired deltas, the Markdown and
    the files written."""

    rows: list[R]
    summary: list[dict[str, Any]]
    deltas: list[dict[str, Any]]
    markdown: str
    files: list[Path] = field(default_factory=list)


LabelResult = StudyResult[LabelRun]


def check_seeds(seeds: list[int]) -> list[int]:
    """``seeds`` unchanged; a :class:`BenchmarkError` when there are none or one is repeated (it would be one run
    counted twice: the SD over seeds shrinks and the paired delta claims more seeds than it has)."""
    if not seeds:
        raise BenchmarkError("--seeds: give at least one seed, e.g. 0,1,2")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        which = f"seed {repeated[0]} is" if len(repeated) == 1 else f"seeds {', '.join(map(str, repeated))} are"
        raise BenchmarkError(f"--seeds {','.join(map(str, seeds))}: {which} given more than once; each seed is one "
                             "run, so give distinct seeds, e.g. 0,1,2")  # fmt: skip
    return seeds


def parse_seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2`` -> ``[0, 1, 2]``, checked by :func:`check_seeds`."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchmarkError(f"--seeds {text!r}: expected whole numbers, comma separated, e.g. 0,1,2") from None
    return check_seeds(seeds)


def parse_seed_count(text: str) -> int | list[int]:
    """``benchmark labels --seeds``: a count (``3``: the recipe's seed and the two after it) or, as ``benchmark
    medmnist --seeds`` takes them, the seeds themselves, comma separated (``0,1,2``; one seed alone as ``5,``)."""
    if "," in text:
        return parse_seed_list(text)
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise BenchmarkError(f"--seeds {text!r}: expected a count of seeds (a whole number >= 1, e.g. 3) or the "
                             "seeds themselves, comma separated (e.g. 0,1,2)")  # fmt: skip
    return count


def seeds_of(recipe: Recipe, seeds: int | list[int]) -> list[int]:
    """A grid's seeds: a count N is the recipe's seed and the N - 1 after it, a list is those (:func:`check_seeds`)."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise BenchmarkError(f"--seeds must be >= 1, got {seeds}")
        return [recipe.seed + s for s in range(seeds)]
    return check_seeds(list(seeds))


def parse_fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchmarkError(f"--fractions {text!r}: expected numbers such as 0.01,0.1,1.0") from None
    bad = [v for v in values if not 0 < v <= 1]
    if not values or bad:
        raise BenchmarkError(f"--fractions {text!r}: each fraction must be in (0, 1]; got {bad or 'none'}")
    return sorted(set(values))


def parse_protocols(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in PROTOCOLS]
    if not values or bad:
        raise BenchmarkError(f"--protocols {text!r}: {bad or 'none given'}; choose from {', '.join(PROTOCOLS)}")
    return values


def parse_inits(text: str) -> list[str]:
    """``imagenet``, ``random``, or a run folder / ``.safetensors`` file (checked to exist)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise BenchmarkError("--inits: give at least one of imagenet, random, or a run folder")
    for v in values:
        if v not in ("imagenet", "random") and not Path(v).exists():
            raise BenchmarkError(f"--inits: {v!r} is neither imagenet, random nor an existing run folder or file")
    return values


def init_label(init: str) -> str:
    """The name an init goes by in tables and plots: a pretraining run's is ``<start>+<its folder name>``."""
    if init in ("imagenet", "random"):
        return init
    path = Path(init)
    run = path if path.is_dir() else path.parent
    try:
        meta = read_json(run / "run.json", "run.json")
        recipe = (run / "recipe.yaml").read_text()
    except (OSError, RunError):  # not a run folder: its name will do
        return run.name
    if meta.get("kind") == "pretrain":
        started = "random" if "pretrained: false" in recipe else "imagenet"
        return f"{started}+{meta.get('method', 'ssl')}:{run.name}"
    return run.name


def _tag(init: str) -> str:
    return init if init in ("imagenet", "random") else Path(init).name


def finished_as(run_dir: Path, recipe: Recipe) -> bool:
    """A finished run of exactly this recipe, to reuse: one trained with another model, size or schedule (the
    base recipe, a variant's overrides or its --set changed since) is trained again, and the log says why.

    The one reuse check of both study benchmarks (``labels`` and ``medmnist``): a run folder's name says which
    grid cell it is, not what it was trained with, so only its saved ``recipe.yaml`` can tell.
    """
    saved = run_dir / "recipe.yaml"
    if not (run_dir / "metrics.json").is_file() or not saved.is_file():
        return False
    if saved.read_text() == dump_recipe(recipe):
        return True
    log.info("%s: finished, but its recipe.yaml differs from the recipe this benchmark runs now; training it again",
             run_dir)  # fmt: skip
    return False


GRID_KEYS = ("name", "output_dir", "seed", "data.train_fraction", "train.protocol", "evaluation.explain",
             "model.pretrained", "model.init_from")  # fmt: skip
"""What :func:`_configure` sets per grid run (with the phases' epochs): the rest is the base recipe's."""


def _base_of(tree: dict[str, Any], frozen: bool = False) -> dict[str, Any]:
    """A grid run's recipe tree less what the grid sets per run: what runs of one base recipe share. ``frozen``: as
    a frozen-feature protocol's run keeps it, without the fine-tuning settings :func:`_configure` resets."""
    tree = yaml.safe_load(yaml.safe_dump(tree))  # a deep copy, in the types recipe.yaml reads back as
    for key in (*GRID_KEYS, *(f"train.{k}" for k in FINETUNE_ONLY if frozen)):
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.get(part) or {}
        node.pop(leaf, None)
    for phase in tree.get("train", {}).get("phases") or []:
        phase.pop("epochs", None)
    return tree


def same_base(rows: list[LabelRun], recipe: Recipe) -> list[LabelRun]:
    """The rows of an earlier grid whose runs were trained from ``recipe`` (fraction, seed, init, protocol and
    stretched epochs apart); the others are left out, and logged, so that one curve never joins two models."""
    tree = recipe.model_dump(mode="json")
    base = {frozen: _base_of(tree, frozen) for frozen in (False, True)}
    kept: list[LabelRun] = []
    left: list[LabelRun] = []
    for row in rows:
        saved = Path(row.run_dir) / "recipe.yaml" if row.run_dir else None
        frozen = row.protocol != "finetune"
        try:
            ok = saved is not None and _base_of(yaml.safe_load(saved.read_text()), frozen) == base[frozen]
        except (OSError, yaml.YAMLError, AttributeError):
            ok = False
        (kept if ok else left).append(row)
    if left:
        log.warning("label benchmark: %d earlier row(s) of label_efficiency.csv left out of the tables: their runs "
                    "were trained from another base recipe (or their recipe.yaml is gone): %s", len(left),
                    ", ".join(Path(r.run_dir).name or f"{r.init}-{r.protocol}-f{r.fraction:g}-s{r.seed}"
                              for r in left))  # fmt: skip
    return kept


def _configure(base: Recipe, init: str, protocol: str, fraction: float, seed: int, out: Path,
               min_steps: int, train_size: int) -> Recipe:  # fmt: skip
    tag = _tag(init)
    weights: dict[str, Any] = (
        {"model.pretrained": False, "model.init_from": None} if init == "random"
        else {"model.pretrained": base.model.pretrained or True, "model.init_from": None} if init == "imagenet"
        else {"model.pretrained": False, "model.init_from": str(Path(init).resolve())}
    )  # fmt: skip
    # a frozen-feature protocol trains no network: the base recipe's fine-tuning settings go back to their defaults
    # (a probe recipe may not carry settings it never reads)
    unread = {f"train.{k}": getattr(TrainConfig(), k) for k in finetune_only_settings(base.train)} \
        if protocol != "finetune" else {}  # fmt: skip
    r = base.changed({
        "name": f"{tag}-{protocol}-f{fraction:g}-s{seed}", "output_dir": str(out / "runs"), "seed": seed,
        "data.train_fraction": fraction, "train.protocol": protocol,
        "evaluation.explain": 0,  # Grad-CAM panels are not what this benchmark is about
        **weights, **unread,
    })  # fmt: skip
    if protocol == "finetune" and r.train.phases:
        steps = sum(p.epochs for p in r.train.phases) * math.ceil(train_size / r.data.batch_size)
        factor = max(1, math.ceil(min_steps / max(1, steps)))
        r = r.changed({f"train.phases[{i}].epochs": phase.epochs * factor for i, phase in enumerate(r.train.phases)})
        if factor > 1:
            log.info("%s: %d training images; phase epochs x%d to reach %d optimizer steps", r.name, train_size,
                     factor, min_steps)  # fmt: skip
    return r


def _read(run_dir: Path, row: LabelRun) -> LabelRun:
    row.read_test(run_dir)
    row.labels = int(read_run_json(run_dir)["split_sizes"]["train"])
    return row


def label_benchmark(
    recipe: Recipe, fractions: list[float], inits: list[str], protocols: list[str], seeds: int | list[int],
    out: Path, min_steps: int = 100, overwrite: bool = False, resamples: int = 500,
) -> LabelResult:  # fmt: skip
    """Trains and tests the whole grid (reusing finished runs) and writes the tables, deltas and plot. ``seeds``: a
    count (the recipe's seed and those after it) or the seeds themselves (:func:`seeds_of`).

    With ``recipe.tracking.mlflow`` on, the benchmark is one MLflow run (its tables and plot as artifacts, the
    curves as metrics ``test_auc.<init>.<protocol>`` whose step is the number of labels) and each grid run, a
    reused one too, is a child run of it; a reused run's folder keeps its ``tracking.json``.

    Examples:
        >>> label_benchmark(load_recipe("recipes/bloodmnist_effnet_lite0.yaml"), [0.01, 0.1, 1.0],
        ...                 ["imagenet", "random", "runs/bloodmnist_simclr_lite0"], ["finetune", "linear_probe"],
        ...                 seeds=3, out=Path("label-efficiency"))
    """
    seed_list = seeds_of(recipe, seeds)
    tags: dict[str, str] = {}
    for init in inits:  # an init's run folders are named by its folder's name: two of one name would share them
        if (first := tags.setdefault(_tag(init), init)) != init:
            raise BenchmarkError(f"--inits {first} and {init} have the same folder name {_tag(init)!r}, which names "
                                 "their runs; give them folders of different names")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    with tracked(out, recipe, kind="benchmark-labels", name=f"{recipe.name}-labels") as parent:
        parent.log_params({"benchmark.fractions": str(fractions), "benchmark.inits": ",".join(inits),
                           "benchmark.protocols": ",".join(protocols), "benchmark.seeds": ",".join(map(str, seed_list)),
                           "benchmark.min_steps": str(min_steps)})  # fmt: skip
        result = _label_grid(
            recipe, fractions, inits, protocols, seed_list, out, min_steps, overwrite, resamples, parent
        )
        for e in result.summary:
            if math.isfinite(e["labels"]):
                name = re.sub(r"[^\w.\-/ :]", "_", f"{e['init']}.{e['protocol']}")
                parent.log_metrics({f"test_auc.{name}": e["auc"], f"test_acc.{name}": e["acc"]}, round(e["labels"]))
        parent.finish(out, {"runs": len(result.rows), "failed": sum(1 for r in result.rows if r.error)}, None,
                      result.files)  # fmt: skip
    return result


def _label_grid(recipe: Recipe, fractions: list[float], inits: list[str], protocols: list[str], seeds: list[int],
                out: Path, min_steps: int, overwrite: bool, resamples: int,
                parent: Tracker) -> LabelResult:  # fmt: skip
    # an earlier grid in this folder: its rows stay in the tables if they come from the same base recipe (the
    # cells this grid runs again are replaced by its own rows anyway)
    planned = {(init_label(i), p, f, s) for i in inits for p in protocols for f in fractions for s in seeds}
    earlier = same_base([r for r in read_rows(out / "label_efficiency.csv") if _key(r) not in planned], recipe)
    rows: list[LabelRun] = []

    def record(row: LabelRun) -> None:
        rows.append(row)
        mine = {_key(r) for r in rows}
        _write_rows(out / "label_efficiency.csv", [r for r in earlier if _key(r) not in mine] + rows)

    for seed in seeds:
        table = load_table(recipe.data, seed, cache_dir(recipe))
        for fraction in fractions:
            size = len(subset_indices(table, "train", recipe.data.limit, seed, fraction))
            for init in inits:
                for protocol in protocols:
                    r = _configure(recipe, init, protocol, fraction, seed, out, min_steps, size)
                    row = LabelRun(init_label(init), protocol, fraction, seed, labels=size)
                    run_dir = Path(r.output_dir) / r.name
                    start = time.perf_counter()
                    try:
                        if overwrite or not finished_as(run_dir, r):
                            log.info("label benchmark: %s (%d labelled training images)", r.name, size)
                            train(r, overwrite=True, parent=parent)
                        else:
                            log_reused_run(parent, run_dir, r)
                        record(_read(run_dir, row))
                    except Exception as err:  # one failed run is a row with its error; the grid goes on
                        row.error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                        row.seconds = time.perf_counter() - start
                        log.error("label benchmark: %s failed: %s", r.name, row.error)
                        record(row)
    mine = {_key(r) for r in rows}
    rows = [r for r in earlier if _key(r) not in mine] + rows
    summary = summarise(rows)
    reference = "imagenet" if "imagenet" in inits else inits[0]
    deltas = paired_deltas(rows, init_label(reference), resamples, recipe.evaluation.bootstrap_seed)
    files = [out / "label_efficiency.csv", out / "label_efficiency_summary.csv", out / "label_efficiency_deltas.csv",
             out / "label_efficiency.md", out / "label_efficiency.png"]  # fmt: skip
    write_dicts(files[1], summary)
    write_dicts(files[2], deltas)
    md = to_markdown(summary, deltas, recipe.name)
    files[3].write_text(md)
    plot_curves(files[4], summary, recipe.name)
    return LabelResult(rows, summary, deltas, md, files)


def summarise(rows: list[LabelRun]) -> list[dict[str, Any]]:
    """Mean over seeds of test AUC / accuracy and of their CI bounds, and the standard deviation over seeds."""
    keys = sorted({(r.init, r.protocol, r.fraction) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    order = list(dict.fromkeys((r.init, r.protocol) for r in rows))
    keys.sort(key=lambda k: (order.index((k[0], k[1])), k[2]))
    out = []
    for init, protocol, fraction in keys:
        ok = [r for r in rows if (r.init, r.protocol, r.fraction) == (init, protocol, fraction) and not r.error]
        failed = sum(1 for r in rows if (r.init, r.protocol, r.fraction) == (init, protocol, fraction) and r.error)
        entry: dict[str, Any] = {"init": init, "protocol": protocol, "fraction": fraction, "seeds": len(ok),
                                 "failed": failed}  # fmt: skip
        entry["labels"] = float(np.mean([r.labels for r in ok])) if ok else math.nan
        for metric in ("auc", "acc"):
            vals = np.array([getattr(r, metric) for r in ok], dtype=float)
            entry[metric] = float(vals.mean()) if len(vals) else math.nan
            entry[f"{metric}_lo"] = float(np.mean([getattr(r, f"{metric}_lo") for r in ok])) if ok else math.nan
            entry[f"{metric}_hi"] = float(np.mean([getattr(r, f"{metric}_hi") for r in ok])) if ok else math.nan
            entry[f"{metric}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
        out.append(entry)
    return out


def paired_deltas(rows: list[LabelRun], reference: str, resamples: int, seed: int) -> list[dict[str, Any]]:
    """Test AUC of each init minus the reference init's, per fraction and protocol, averaged over paired seeds
    (:func:`paired_bootstrap`)."""
    done = {(r.init, r.protocol, r.fraction, r.seed): r for r in rows if not r.error}
    out = []
    for init, protocol, fraction in dict.fromkeys((r.init, r.protocol, r.fraction) for r in rows if not r.error):
        if init == reference:
            continue
        pairs = [(done[(reference, protocol, fraction, s)].run_dir, r.run_dir) for (i, p, f, s), r in done.items()
                 if (i, p, f) == (init, protocol, fraction) and (reference, protocol, fraction, s) in done]  # fmt: skip
        if not pairs:
            continue
        d = paired_bootstrap(pairs, {"auc": compute_auc}, resamples, seed)["auc"]
        out.append({"init": init, "reference": reference, "protocol": protocol, "fraction": fraction,
                    "seeds": len(pairs), "delta_auc": d.value, "delta_lo": d.lo, "delta_hi": d.hi,
                    "unit": d.unit})  # fmt: skip
    inits = list(dict.fromkeys(r.init for r in rows))
    return sorted(out, key=lambda e: (e["fraction"], inits.index(e["init"]), e["protocol"]))


def _ci(entry: dict[str, Any], metric: str) -> str:
    value, lo, hi = entry[metric], entry[f"{metric}_lo"], entry[f"{metric}_hi"]
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.3f} ({lo:.3f}-{hi:.3f})" if math.isfinite(lo) else f"{value:.3f}"


def _sd(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "-"


def to_markdown(summary: list[dict[str, Any]], deltas: list[dict[str, Any]], name: str) -> str:
    head = "| init | protocol | fraction | labels | seeds | test AUC (95% CI) | AUC SD | test ACC (95% CI) | ACC SD |"
    lines = [f"Label efficiency of `{name}` (test split; mean over seeds, mean 95% bootstrap CI, SD over seeds)", "",
             head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for e in summary:
        failed = f" ({e['failed']} failed)" if e["failed"] else ""
        labels = f"{e['labels']:.0f}" if math.isfinite(e["labels"]) else "-"
        lines.append(f"| {e['init']} | {e['protocol']} | {e['fraction']:g} | {labels} | {e['seeds']}{failed} | "
                     f"{_ci(e, 'auc')} | {_sd(e['auc_sd'])} | {_ci(e, 'acc')} | {_sd(e['acc_sd'])} |")  # fmt: skip
    if deltas:
        unit = delta_unit(deltas)
        lines += ["", f"Test AUC difference against the reference init (paired bootstrap over the test {unit}, 95% CI)",
                  "", "| init | minus | protocol | fraction | seeds | delta AUC (95% CI) |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for d in deltas:
            ci = f" ({d['delta_lo']:+.3f} to {d['delta_hi']:+.3f})" if math.isfinite(d["delta_lo"]) else ""
            lines.append(f"| {d['init']} | {d['reference']} | {d['protocol']} | {d['fraction']:g} | {d['seeds']} | "
                         f"{d['delta_auc']:+.3f}{ci} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_curves(path: Path, summary: list[dict[str, Any]], name: str) -> Path:
    """Test AUC and accuracy against labelled training images (log axis); bands are the mean 95% CIs."""
    fig = Figure(figsize=(10, 4), dpi=110)
    axes = fig.subplots(1, 2)
    inits = list(dict.fromkeys(e["init"] for e in summary))
    protocols = list(dict.fromkeys(e["protocol"] for e in summary))
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    styles = {"finetune": "-", "linear_probe": "--", "knn": ":"}
    for ax, metric, title in ((axes[0], "auc", "test AUC"), (axes[1], "acc", "test accuracy")):
        for i, init in enumerate(inits):
            for protocol in protocols:
                pts = sorted((e for e in summary if e["init"] == init and e["protocol"] == protocol
                              and math.isfinite(e[metric])), key=lambda e: e["labels"])  # fmt: skip
                if not pts:
                    continue
                x = [e["labels"] for e in pts]
                colour = colours[i % len(colours)]
                ax.plot(x, [e[metric] for e in pts], styles.get(protocol, "-"), marker="o", color=colour,
                        label=f"{init}, {protocol}")  # fmt: skip
                lo, hi = [e[f"{metric}_lo"] for e in pts], [e[f"{metric}_hi"] for e in pts]
                if all(math.isfinite(v) for v in lo + hi):
                    ax.fill_between(x, lo, hi, color=colour, alpha=0.12, linewidth=0)
        ax.set_xscale("log")
        ax.set_xlabel("labelled training images")
        ax.set_ylabel(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Label efficiency: {name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _key(row: LabelRun) -> tuple[str, str, float, int]:
    return row.init, row.protocol, row.fraction, row.seed


def read_rows(path: Path) -> list[LabelRun]:
    """The per-run rows of an earlier grid in the same folder (none when there is no such file)."""
    if not path.is_file():
        return []
    types = {f.name: f.type for f in fields(LabelRun)}
    out = []
    with path.open(newline="") as fh:
        for raw in csv.DictReader(fh):
            values: dict[str, Any] = {}
            for name, text in raw.items():
                kind = types.get(name)
                if kind is None:
                    continue
                values[name] = float(text) if kind == "float" else int(float(text)) if kind == "int" else text
            out.append(LabelRun(**values))
    return out


def _write_rows(path: Path, rows: list[LabelRun]) -> None:
    write_dicts(path, [asdict(r) for r in rows])


def write_dicts(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as CSV, floats to 6 significant digits (an empty file for no rows)."""
    with path.open("w", newline="") as fh:
        if not rows:
            return
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

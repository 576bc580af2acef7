"""The results of ``medvision benchmark``: their types and summaries, and the CSV, Markdown and PNG they become.

The measuring lives in :mod:`medvision.tasks.benchmark.speed`; everything here is pure or writes a file. The run
header goes above every table and into every CSV row (device, torch, AMP, sizes, date), so CSVs from
several machines can be concatenated and no row loses the device it was measured on. Figures are
``matplotlib.figure.Figure`` objects saved straight to a file, never ``pyplot``, as in
:mod:`medvision.plots`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

DPI = 110
FLOPS_NOTE = (
    "GFLOPs/img: forward, counted by torch.utils.flop_counter on one image (a multiply-add is 2 FLOPs); "
    "train FLOPs = 3x forward (the MFU convention), optimizer not counted"
)
MFU_NOTE = "MFU = achieved model TFLOP/s / the measured peak of a matmul in the run's compute dtype"


# ------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Spread:
    """The median of repeated measurements with their range: one number would hide noisy repeats."""

    median: float
    min: float
    max: float

    def inverse(self, scale: float) -> Spread:
        """``scale / x`` of each figure (seconds per step -> images per second); min and max swap."""
        return Spread(scale / self.median, scale / self.max, scale / self.min)


def summarize(samples: Sequence[float]) -> Spread:
    """Median, min and max of repeated timings.

    Examples:
        >>> summarize([3.0, 1.0, 2.0])
        Spread(median=2.0, min=1.0, max=3.0)
    """
    values = np.asarray(samples, dtype=np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(f"summarize needs at least one finite sample; got {list(samples)}")
    return Spread(float(np.median(values)), float(values.min()), float(values.max()))


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both axes (both maximised), sorted by x.

    A point is dominated when another is at least as good on both axes and better on one; NaN points
    (a failed run) are never on the front.

    Examples:
        >>> pareto_front([1.0, 2.0, 3.0, 2.0], [0.9, 0.95, 0.8, 0.7])
        [1, 2]
    """
    if len(xs) != len(ys):
        raise ValueError(f"xs has {len(xs)} values but ys has {len(ys)}; expected one y per x")
    pts = [(float(x), float(y), i) for i, (x, y) in enumerate(zip(xs, ys, strict=True))]
    pts = [p for p in pts if np.isfinite(p[0]) and np.isfinite(p[1])]
    front = [
        i for x, y, i in pts
        if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for x2, y2, _ in pts)
    ]  # fmt: skip
    return sorted(front, key=lambda i: (float(xs[i]), i))


@dataclass
class ModeResult:
    """Inference or training speed of one backbone."""

    img_s: Spread
    step_ms: Spread
    tflops: float
    mfu: float
    mem_gib: float
    first_call_s: float


@dataclass
class SpeedRow:
    """One backbone of a speed run; ``error`` is set, and the figures are missing, when it failed."""

    backbone: str
    params: int | None = None
    gflops: float = float("nan")
    train_gflops: float = float("nan")
    modes: dict[str, ModeResult] = field(default_factory=dict)
    error: str = ""


@dataclass
class RecipeRow:
    """One backbone fine-tuned with the recipe: test metrics, throughput and size; ``error`` if it failed."""

    backbone: str
    init: str = ""
    run_dir: str = ""
    test_auc: float = float("nan")
    auc_ci: tuple[float, float] = (float("nan"), float("nan"))
    test_acc: float = float("nan")
    acc_ci: tuple[float, float] = (float("nan"), float("nan"))
    train_img_s: float = float("nan")
    infer_img_s: Spread | None = None
    params: int | None = None
    gflops: float = float("nan")
    infer_mem_gib: float = float("nan")
    seconds: float = float("nan")
    error: str = ""


@dataclass
class Report:
    """A finished benchmark: the header, the rows, the Markdown table and the files written."""

    header: dict[str, Any]
    rows: list[Any]
    markdown: str
    files: list[Path]


# ------------------------------------------------------------------------------------ tables


def _memory_note(device: str) -> str:
    if device == "cuda":
        return "memory: torch.cuda.max_memory_allocated per mode (weights, optimizer state, activations)"
    return "memory: not measured on a CPU (no per-allocation peak; process RSS is monotonic), shown as n/a"


def _fmt(value: float | int | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _sig(value: float | None, digits: int = 3) -> str:
    """``digits`` significant figures: a small model's 0.00042 TFLOP/s on a CPU is not ``0.000``."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}"


def _spread(s: Spread | None, digits: int = 1) -> str:
    return "n/a" if s is None else f"{_fmt(s.median, digits)} ({_fmt(s.min, digits)}–{_fmt(s.max, digits)})"


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    return lines + ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]


def _header_lines(title: str, header: dict[str, Any]) -> list[str]:
    return [
        f"# {title}",
        "",
        f"- device: **{header['device']}**, {header['device_name']}",
        f"- torch {header['torch']}, timm {header['timm']}; amp {header['amp']}, channels_last "
        f"{header['channels_last']}, compile {header['compile']}",
        f"- timing: warm-up {header['warmup']} step(s), not counted; then the median (min–max) of {header['repeats']} "
        f"repeat(s) of {header['steps']} step(s)"
        + ("; CUDA events" if header["device"] == "cuda" else "; host clock (perf_counter)"),
        f"- date: {header['date']}",
    ]


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def write_csv(path: Path, records: list[dict[str, Any]]) -> Path:
    """One row per record; the columns are the union of the records' keys, in first-seen order."""
    columns = list(dict.fromkeys(k for r in records for k in r))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(records)
    return path


# ------------------------------------------------------------------------------------ speed


def speed_record(row: SpeedRow) -> dict[str, Any]:
    """A flat CSV row: every figure of both modes, missing ones left empty."""
    rec: dict[str, Any] = {"backbone": row.backbone, "params": row.params, "gflops": row.gflops,
                           "train_gflops": row.train_gflops}  # fmt: skip
    for mode in ("train", "infer"):
        m = row.modes.get(mode)
        for key in ("img_s", "step_ms"):
            s = getattr(m, key) if m else None
            rec |= {f"{mode}_{key}": s and s.median, f"{mode}_{key}_min": s and s.min, f"{mode}_{key}_max": s and s.max}
        for key in ("tflops", "mfu", "mem_gib", "first_call_s"):
            rec[f"{mode}_{key}"] = getattr(m, key) if m else None
    rec["error"] = row.error
    return {k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}


def speed_markdown(header: dict[str, Any], rows: list[SpeedRow]) -> str:
    lines = _header_lines("Backbone speed benchmark", header)
    lines[4:4] = [
        f"- input: batch {header['batch_size']} of {header['in_chans']}x{header['image_size']}x{header['image_size']} "
        f"random normal images, random labels over {header['num_classes']} classes; train step = forward + "
        "cross-entropy + backward + AdamW",
        f"- measured peak: {_fmt(header['peak_tflops'], 2)} TFLOP/s ({header['peak_matmul']} matmul, range "
        f"{_fmt(header['peak_tflops_min'], 2)}–{_fmt(header['peak_tflops_max'], 2)})",
        f"- {FLOPS_NOTE}",
        f"- {MFU_NOTE}",
        f"- {_memory_note(header['device'])}",
    ]
    columns = ["backbone", "params (M)", "GFLOPs/img", "train img/s (min–max)", "train step ms", "train TFLOP/s",
               "train MFU", "train mem GiB", "infer img/s (min–max)", "infer step ms", "infer TFLOP/s", "infer MFU",
               "infer mem GiB", "note"]  # fmt: skip
    body = []
    for r in rows:
        cells = [r.backbone, _fmt(r.params and r.params / 1e6, 2), _sig(r.gflops)]
        for mode in ("train", "infer"):
            m = r.modes.get(mode)
            cells += [_spread(m.img_s), _fmt(m.step_ms.median, 1), _sig(m.tflops), _sig(m.mfu),
                      _fmt(m.mem_gib, 2)] if m else ["n/a"] * 5  # fmt: skip
        cells.append(r.error)
        body.append(cells)
    return "\n".join([*lines, "", *_table(columns, body)]) + "\n"


def _plain_log_ticks(ax: Axes) -> None:
    """Decimal labels on a log x axis, minor ticks labelled too when it spans under a decade."""
    ax.xaxis.set_major_formatter(LogFormatter())
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))


def _stagger(k: int) -> tuple[int, int]:
    """Label offsets in points that cycle above, below and level, so labels of close points overlap less."""
    return (4, (5, -11, -3)[k % 3])


def _message(fig: Figure, text: str) -> None:
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color="0.3", transform=ax.transAxes, wrap=True)


def plot_speed(path: Path, header: dict[str, Any], rows: list[SpeedRow]) -> Path:
    """Left: train and inference img/s per backbone with min–max bars. Right: inference img/s against GFLOPs."""
    ok = [r for r in rows if r.modes]
    fig = Figure(figsize=(10, max(3.4, 1.4 + 0.42 * len(ok))), layout="constrained")
    title = f"{header['device_name']} · {header['image_size']} px · batch {header['batch_size']} · amp {header['amp']}"
    fig.suptitle(title + (" · compiled" if header["compile"] else ""), fontsize=9)
    if not ok:
        _message(fig, "no backbone could be measured; see the error column of speed.csv")
    else:
        bars, scatter = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        y = list(range(len(ok)))
        for k, mode in enumerate(("train", "infer")):
            pos = [i + (k - 0.5) * 0.4 for i in y]
            s = [r.modes[mode].img_s if mode in r.modes else None for r in ok]
            med = [x.median if x else 0.0 for x in s]
            err = [[x.median - x.min if x else 0.0 for x in s], [x.max - x.median if x else 0.0 for x in s]]
            bars.barh(pos, med, height=0.4, xerr=err, capsize=2, label=f"{mode} (median, min–max)", color=f"C{k}")
        bars.set(yticks=y, yticklabels=[r.backbone for r in ok], xlabel="images / s")
        bars.invert_yaxis()
        bars.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        for k, r in enumerate(ok):
            if "infer" in r.modes and r.gflops > 0:
                scatter.scatter(r.gflops, r.modes["infer"].img_s.median, color="C1")
                scatter.annotate(r.backbone, (r.gflops, r.modes["infer"].img_s.median), fontsize=7,
                                 xytext=_stagger(k), textcoords="offset points")  # fmt: skip
        scatter.set(xscale="log", xlabel="GFLOPs / image (forward, log scale)", ylabel="inference images / s")
        _plain_log_ticks(scatter)
        scatter.set_ylim(bottom=0)
        scatter.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return path


# ------------------------------------------------------------------------------------ recipe


def recipe_record(row: RecipeRow) -> dict[str, Any]:
    s = row.infer_img_s
    rec = {
        "backbone": row.backbone, "init": row.init, "test_auc": row.test_auc, "test_auc_lo": row.auc_ci[0],
        "test_auc_hi": row.auc_ci[1], "test_acc": row.test_acc, "test_acc_lo": row.acc_ci[0],
        "test_acc_hi": row.acc_ci[1], "train_img_s": row.train_img_s, "infer_img_s": s and s.median,
        "infer_img_s_min": s and s.min, "infer_img_s_max": s and s.max, "params": row.params, "gflops": row.gflops,
        "infer_mem_gib": row.infer_mem_gib, "seconds": row.seconds, "run_dir": row.run_dir, "error": row.error,
    }  # fmt: skip
    return {k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}


def _with_ci(value: float, ci: tuple[float, float]) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if all(map(math.isfinite, ci)) else "")


def recipe_markdown(header: dict[str, Any], rows: list[RecipeRow]) -> str:
    lines = _header_lines(f"Recipe benchmark: {header['recipe']}", header)
    lines[4:4] = [
        f"- each backbone fine-tuned with the same recipe; starting weights: policy `{header['pretrained']}` "
        "(the init column says which were used)",
        f"- train img/s: median over the epochs of the recipe's last phase, batch {header['train_batch_size']}, "
        f"data loading included; infer img/s: random {header['image_size']} px batches of {header['batch_size']} "
        "timed as in `medvision benchmark speed`",
        f"- test AUC / accuracy with the run's bootstrap CIs; {_memory_note(header['device'])}",
    ]
    columns = ["backbone", "init", "test AUC (CI)", "test ACC (CI)", "train img/s", "infer img/s (min–max)",
               "params (M)", "GFLOPs/img", "infer mem GiB", "wall s", "note"]  # fmt: skip
    body = [[r.backbone, r.init, _with_ci(r.test_auc, r.auc_ci), _with_ci(r.test_acc, r.acc_ci),
             _fmt(r.train_img_s), _spread(r.infer_img_s), _fmt(r.params and r.params / 1e6, 2), _sig(r.gflops),
             _fmt(r.infer_mem_gib, 2), _fmt(r.seconds, 0), r.error] for r in rows]  # fmt: skip
    return "\n".join([*lines, "", *_table(columns, body)]) + "\n"


def plot_pareto(path: Path, header: dict[str, Any], rows: list[RecipeRow]) -> Path:
    """Test AUC against inference img/s (log), with CI bars; the Pareto front is joined and drawn filled.

    Rows without both figures (failed runs) are left out.
    """
    ok = [r for r in rows if r.infer_img_s is not None and math.isfinite(r.test_auc)]
    fig = Figure(figsize=(5.6, 4.2), layout="constrained")
    if not ok:
        _message(fig, "no backbone finished; see the error column of recipe.csv")
    else:
        ax = fig.add_subplot()
        xs = [r.infer_img_s.median for r in ok if r.infer_img_s]
        ys = [r.test_auc for r in ok]
        front = pareto_front(xs, ys)
        lo = [y - r.auc_ci[0] if math.isfinite(r.auc_ci[0]) else 0.0 for r, y in zip(ok, ys, strict=True)]
        hi = [r.auc_ci[1] - y if math.isfinite(r.auc_ci[1]) else 0.0 for r, y in zip(ok, ys, strict=True)]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor="0.6", elinewidth=0.8, capsize=2)
        ax.scatter(xs, ys, facecolors="white", edgecolors="C0", zorder=3, label="dominated")
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "-o", color="C3", zorder=4, label="Pareto front")
        for k, (r, x, y) in enumerate(zip(ok, xs, ys, strict=True)):
            ax.annotate(r.backbone, (x, y), fontsize=7, xytext=_stagger(k), textcoords="offset points")
        ax.set(xscale="log", xlabel="inference images / s (log scale)", ylabel="test AUC")
        _plain_log_ticks(ax)
        ax.set_title(f"{header['recipe']} · {header['device_name']}", fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower left")
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return path

"""The PNG figures of a run report: ROC with a bootstrap band, precision-recall, confusion, reliability,
training curves and image grids.

Every figure is a ``matplotlib.figure.Figure`` saved straight to a file, never ``pyplot``: no global
figure manager, no backend switch and no rcParams changes, so a report can be drawn from a worker
thread or under any backend without touching the caller's matplotlib state. Figures are small (about
4x3.5 inches at 110 dpi) because the HTML report embeds them. Degenerate data (one class, no samples,
NaN probabilities) never raises here: the figure says "undefined: <why>" instead, and no metric is
computed where it would only warn.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from medvision.intervals import bootstrap_indices
from medvision.metrics import average_precision, binary_auc, expected_calibration_error

DPI = 110
SIZE = (4.2, 3.6)
_GRID = np.linspace(0.0, 1.0, 201)  # FPR grid of the ROC plots: steps of 0.005


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return path


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.3", wrap=True,
            bbox={"facecolor": "white", "edgecolor": "0.7", "alpha": 0.9})  # fmt: skip


def _message_figure(path: Path, text: str) -> Path:
    fig = Figure(figsize=SIZE)
    ax = fig.add_subplot()
    ax.set_axis_off()
    _note(ax, text)
    return _save(fig, path)


def _check_probs(y_true: np.ndarray, probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int64 and probabilities as (N, K) float64; shape mistakes are errors, not plot notes."""
    y, p = np.asarray(y_true).ravel(), np.asarray(probs, dtype=np.float64)
    if k < 2:
        raise ValueError(f"there are {k} class(es); expected at least 2")
    if y.size == 0 and p.size == 0:
        return np.zeros(0, dtype=np.int64), p.reshape(0, k)
    if p.ndim != 2 or p.shape != (len(y), k):
        raise ValueError(f"probs has shape {p.shape}; expected (len(y_true), len(classes)) = ({len(y)}, {k})")
    if y.dtype.kind not in "biu" or y.min() < 0 or y.max() >= k:
        raise ValueError(f"y_true must be integer labels in 0..{k - 1}; got dtype {y.dtype}, values {np.unique(y)}")
    return y.astype(np.int64), p


def _why_undefined(score: np.ndarray, positives: np.ndarray | None = None) -> str | None:
    """Why no curve can be drawn from these scores (and, if given, binary labels), or None if one can."""
    if len(score) == 0:
        return "no samples"
    if not np.all(np.isfinite(score)):
        return "probabilities contain NaN or Inf"
    if positives is not None and (n_pos := int(np.count_nonzero(positives))) in (0, len(positives)):
        return f"only one class ({n_pos} positive, {len(positives) - n_pos} negative)"
    return None


def _cumulative_counts(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives when thresholding at each distinct score, highest threshold first."""
    order = np.argsort(-score, kind="mergesort")
    s_sorted, y_sorted = score[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tps = np.cumsum(y_sorted)[last_of_tie]
    return tps, last_of_tie + 1 - tps


def _staircase(y: np.ndarray, score: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The highest TPR reachable by a threshold whose FPR is at most each grid point (needs both classes)."""
    tps, fps = _cumulative_counts(y, score)
    fpr, tpr = np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]
    return tpr[np.searchsorted(fpr, grid, side="right") - 1]


def _bootstrap_band(
    curve: Callable[[np.ndarray], np.ndarray], y: np.ndarray, groups: Sequence[Any] | None, n_grid: int,
    n_resamples: int, seed: int, level: float,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Pointwise percentile band of ``curve(indices)`` over the resamples of
    :func:`~medvision.intervals.bootstrap_indices` (within each class of ``y``; ``groups``, each row's patient: whole
    patients), the bootstrap of the report's CIs with the same seed."""
    if not 0 < level < 1:
        raise ValueError(f"level is {level}; expected a coverage strictly between 0 and 1, e.g. 0.95")
    if n_resamples < 0:
        raise ValueError(f"n_resamples is {n_resamples}; expected 0 (no band) or more")
    if n_resamples == 0:
        return np.full(n_grid, np.nan), np.full(n_grid, np.nan)
    curves = np.empty((n_resamples, n_grid))
    with np.errstate(divide="ignore", invalid="ignore"):
        for r, rows in enumerate(bootstrap_indices(y, n_resamples, seed, groups=groups)):
            curves[r] = curve(rows)
    # a resample of whole patients may leave a class out (a patient's slides with two labels): it has no curve,
    # and is skipped as bootstrap_cis skips its undefined metrics
    curves = curves[np.isfinite(curves).all(axis=1)]
    if not len(curves):
        return np.full(n_grid, np.nan), np.full(n_grid, np.nan)
    alpha = (1 - level) / 2
    return np.quantile(curves, alpha, axis=0), np.quantile(curves, 1 - alpha, axis=0)


def roc_band(
    y_true: np.ndarray, score: np.ndarray, fpr_grid: np.ndarray, n_resamples: int = 200, seed: int = 0,
    level: float = 0.95, groups: Sequence[Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The ROC curve on a grid of false-positive rates, with a stratified-bootstrap percentile band.

    The curve is the ROC staircase read conservatively: at each grid FPR, the highest TPR that some
    threshold reaches without exceeding that FPR. Ties are thresholded together, as a real cut-off
    would, so no point between two achievable operating points is invented. Positives and negatives
    are resampled separately so every resample keeps the data's prevalence and has a defined ROC.

    Args:
        y_true: (N,) binary labels (bool or 0/1); true is the positive class.
        score: (N,) scores, higher meaning more likely positive.
        fpr_grid: false-positive rates in [0, 1] at which to read the curves.
        n_resamples: bootstrap resamples; 0 gives a NaN band.
        seed: seed of ``np.random.default_rng``; the same seed gives the same band.
        level: coverage of the pointwise band.
        groups: each row's patient: the bootstrap draws whole patients (a cluster bootstrap), as the CIs do
            where rows are not independent; one group per row draws exactly the resamples of None.

    Returns:
        (tpr, lo, hi), each shaped like ``fpr_grid``.

    Raises:
        ValueError: if only one class is present, scores are not finite, or the grid leaves [0, 1].

    Examples:
        >>> y = np.array([0, 0, 1, 1]); s = np.array([0.1, 0.6, 0.4, 0.9])
        >>> roc_band(y, s, np.array([0.0, 0.5, 1.0]), n_resamples=20)[0]
        array([0.5, 1. , 1. ])
    """
    y, s = np.asarray(y_true).astype(bool).ravel(), np.asarray(score, dtype=np.float64).ravel()
    grid = np.asarray(fpr_grid, dtype=np.float64)
    if len(y) != len(s):
        raise ValueError(f"y_true has {len(y)} entries but score has {len(s)}")
    if grid.ndim != 1 or not np.all((grid >= 0) & (grid <= 1)):
        raise ValueError(f"fpr_grid must be a 1-D array of rates in [0, 1]; got shape {grid.shape}")
    if (why := _why_undefined(s, y)) is not None:
        raise ValueError(f"roc_band needs finite scores and both classes; {why}")
    tpr = _staircase(y, s, grid)
    lo, hi = _bootstrap_band(lambda i: _staircase(y[i], s[i], grid), y, groups, len(grid), n_resamples, seed, level)
    return tpr, lo, hi


def for_positive(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], positive: int | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels, probabilities and class names with ``positive`` (``evaluation.positive_class``) second, as
    :func:`plot_roc` and :func:`plot_pr` draw two classes: the first class swapped in when it is the positive one."""
    if len(classes) == 2 and positive == 0:
        return 1 - np.asarray(y_true), np.asarray(probs)[:, ::-1], list(classes)[::-1]
    return np.asarray(y_true), np.asarray(probs), list(classes)


def plot_roc(
    path: Path, y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], *, n_resamples: int = 200,
    seed: int = 0, level: float = 0.95, points: list[dict[str, Any]] | None = None,
    groups: Sequence[Any] | None = None,
) -> Path:  # fmt: skip
    """ROC with its bootstrap band: class 1 for two classes, else the macro one-vs-rest average.

    The macro curve is the mean per-class TPR on a shared FPR grid; its band resamples within each class
    and reuses one index set for all classes, so the band reflects the correlation between them. ``groups``
    (each row's patient) makes the band's bootstrap draw whole patients, as the CIs beside it do.
    ``points`` (dicts with ``label``, ``fpr``, ``tpr``) mark chosen operating points.

    Examples:
        >>> plot_roc(run_dir / "roc_test.png", labels, probs, ["benign", "malignant"])  # doctest: +SKIP
    """
    y, p = _check_probs(y_true, probs, len(classes))
    fig = Figure(figsize=SIZE)
    ax = fig.add_subplot()
    binary, present = len(classes) == 2, np.unique(y)
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6", label="chance")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(f"ROC, positive class {classes[1]!r}" if binary else "ROC, macro one-vs-rest", fontsize=9)
    why = _why_undefined(p) or (f"only one class ({classes[present[0]]})" if len(present) < 2 else None)
    if why is not None:
        _note(ax, f"undefined: {why}")
    else:
        targets = [1] if binary else list(present)

        def curve(i: np.ndarray) -> np.ndarray:  # binary: class 1; else the mean one-vs-rest TPR
            return np.mean([_staircase(y[i] == k, p[i, k], _GRID) for k in targets], axis=0)

        lo, hi = _bootstrap_band(curve, y, groups, len(_GRID), n_resamples, seed, level)
        aucs = [binary_auc(y == k, p[:, k]) for k in targets]
        for k, auc in zip(targets, aucs, strict=True):
            if not binary:  # the thin per-class curves under the macro average
                ax.plot(_GRID, _staircase(y == k, p[:, k], _GRID), drawstyle="steps-post", lw=0.7, alpha=0.8,
                        label=f"{classes[k]} AUC {auc:.3f}")  # fmt: skip
        ax.fill_between(_GRID, lo, hi, step="post", alpha=0.25, lw=0, color="C0" if binary else "k",
                        label=f"{level:.0%} CI (bootstrap)")  # fmt: skip
        ax.plot(_GRID, curve(np.arange(len(y))), drawstyle="steps-post", lw=1.8, color="C0" if binary else "k",
                label=f"{'' if binary else 'macro '}AUC {np.mean(aucs):.3f}")  # fmt: skip
        for k in sorted(set(range(len(classes))) - set(present)):
            ax.plot([], [], " ", label=f"{classes[k]}: absent, AUC undefined")
    for i, pt in enumerate(points or []):
        if not {"label", "fpr", "tpr"} <= pt.keys():
            raise ValueError(f"operating point {pt} needs the keys label, fpr and tpr")
        ax.plot(pt["fpr"], pt["tpr"], "o", ms=5, mfc="white", mec="crimson", zorder=5)
        # stacked label offsets: points often coincide (a well-separated test set)
        ax.annotate(str(pt["label"]), (pt["fpr"], pt["tpr"]), xytext=(6, -10 - 9 * i), textcoords="offset points",
                    fontsize=7)  # fmt: skip
    ax.legend(loc="lower right", fontsize=6.5, framealpha=0.85)
    return _save(fig, path)


def plot_pr(path: Path, y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> Path:
    """Precision-recall: class 1 against its prevalence for two classes, else each class against the rest.

    PR curves show what ROC hides when positives are rare: how many flagged cases are real. The curve
    is drawn as the step function whose area is the average precision in the legend.
    """
    y, p = _check_probs(y_true, probs, len(classes))
    fig = Figure(figsize=SIZE)
    ax = fig.add_subplot()
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="recall", ylabel="precision")
    binary = len(classes) == 2
    ax.set_title(f"precision-recall, positive class {classes[1]!r}" if binary else "precision-recall, one-vs-rest",
                 fontsize=9)  # fmt: skip
    why = _why_undefined(p) or ("no positives" if binary and not (y == 1).any() else
                                "no negatives" if binary and (y == 1).all() else None)  # fmt: skip
    if why is not None:
        _note(ax, f"undefined: {why}")
    for k in [] if why else [1] if binary else range(len(classes)):
        pos, s = y == k, p[:, k]
        if not pos.any() or pos.all():  # an empty legend entry keeps the note clear of the curves
            ax.plot([], [], " ", label=f"{classes[k]}: no {'positives' if not pos.any() else 'negatives'}, AP "
                                       "undefined")  # fmt: skip
            continue
        tps, fps = _cumulative_counts(pos, s)
        recall, precision = np.r_[0.0, tps / tps[-1]], np.r_[1.0, tps / (tps + fps)]
        name = "AP" if binary else f"{classes[k]} AP"
        ax.plot(recall, precision, drawstyle="steps-pre", lw=1.6 if binary else 0.9,
                label=f"{name} {average_precision(pos, s):.3f}")  # fmt: skip
        if binary:
            ax.axhline(pos.mean(), ls="--", lw=0.8, color="0.6", label=f"prevalence {pos.mean():.3f}")
    if ax.lines:
        ax.legend(loc="lower left", fontsize=6.5, framealpha=0.85)
    return _save(fig, path)


def plot_confusion(path: Path, cm: np.ndarray, classes: Sequence[str], title: str) -> Path:
    """Counts in cells, coloured by the row share so rare classes are as readable as common ones."""
    counts = np.asarray(cm)
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(f"cm has shape {counts.shape}; expected (len(classes), len(classes)) = ({k}, {k})")
    if k == 0:
        return _message_figure(path, "undefined: no classes")
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    fig = Figure(figsize=(max(SIZE[0], 1.8 + 0.36 * k), max(SIZE[1], 1.2 + 0.36 * k)))  # cells stay readable
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("share of true class", fontsize=7)
    size = 8 if k <= 6 else 6.5
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=size, color="white" if share[i, j] > 0.5 else "black")
    rotate = k > 4 or max(len(c) for c in classes) > 8
    ax.set_xticks(range(k), list(classes), rotation=45 if rotate else 0, ha="right" if rotate else "center",
                  fontsize=size)  # fmt: skip
    ax.set_yticks(range(k), list(classes), fontsize=size)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _reliability_panel(ax: Axes, y: np.ndarray, p: np.ndarray, n_bins: int, name: str) -> None:
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence (top label)")
    if (why := _why_undefined(p)) is not None:
        ax.set_title(f"{name}\nECE undefined", fontsize=9)
        _note(ax, f"undefined: {why}")
        return
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)  # the binning of expected_calibration_error
    count = np.bincount(bins, minlength=n_bins)
    full = count > 0
    acc = np.bincount(bins, weights=correct, minlength=n_bins)[full] / count[full]
    mean_conf = np.bincount(bins, weights=conf, minlength=n_bins)[full] / count[full]
    ax.bar(np.flatnonzero(full) / n_bins, acc, width=1 / n_bins, align="edge", alpha=0.35, edgecolor="C0", lw=0.6)
    ax.plot(mean_conf, acc, "o-", ms=3, lw=1)
    ax.set_title(f"{name}\nECE {expected_calibration_error(y, p, n_bins):.3f}", fontsize=9)


def plot_reliability(path: Path, y_true: np.ndarray, probs_before: np.ndarray, probs_after: np.ndarray,
                     n_bins: int = 15) -> Path:  # fmt: skip
    """Reliability diagrams before and after temperature scaling, side by side with their ECE.

    Bars are the accuracy of each non-empty equal-width confidence bin, dots sit at the bin's mean
    confidence: dots under the diagonal mean over-confidence. The bins are those of the ECE in the titles.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins is {n_bins}; expected at least 1")
    fig = Figure(figsize=(2 * SIZE[0] * 0.85, SIZE[1]))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, probs, name in zip(axes, (probs_before, probs_after), ("before", "after temperature scaling"), strict=True):
        p = np.asarray(probs, dtype=np.float64)
        y, p = _check_probs(y_true, p, p.shape[1] if p.ndim == 2 and p.size else 2)
        _reliability_panel(ax, y, p, n_bins, name)
    axes[0].set_ylabel("accuracy")
    return _save(fig, path)


def _column(history: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if row.get(key) is None else float(row[key]) for row in history], dtype=np.float64)


def plot_training(path: Path, history: list[dict[str, Any]], monitor: str | None = None,
                  best_epoch: int | None = None) -> Path:  # fmt: skip
    """Loss, learning rate and validation AUC/accuracy per epoch, with freeze-phase boundaries marked.

    The phase lines show where a jump in loss or LR comes from (unfreezing, a new LR). ``best_epoch``, the epoch
    whose weights the run kept (``metrics.json``: the training loop's choice, with its ``monitor_tolerance``), is
    starred on the ``monitor`` curve (``val_auc``, ``val_acc`` or ``val_loss``).
    """
    if not history:
        return _message_figure(path, "no epochs")
    if monitor not in (None, "val_auc", "val_acc", "val_loss"):
        raise ValueError(f"monitor is {monitor!r}; expected None, 'val_auc', 'val_acc' or 'val_loss'")
    epoch = _column(history, "epoch")
    if not np.all(np.isfinite(epoch)):
        raise ValueError(f"every history row needs a numeric 'epoch'; got {epoch.tolist()}")
    fig = Figure(figsize=(SIZE[0] * 1.1, SIZE[1] * 1.75))
    ax_loss, ax_lr, ax_val = fig.subplots(3, 1, sharex=True)
    panels = [(ax_loss, ("train_loss", "val_loss")), (ax_lr, ("lr",)), (ax_val, ("val_auc", "val_acc"))]
    for ax, keys in panels:
        drawn = False
        for key in keys:
            values = _column(history, key)
            if key == "lr":
                values[~(values > 0)] = np.nan  # a log axis cannot show 0 or negative rates
            drawn |= bool(np.isfinite(values).any())
            ax.plot(epoch, values, "o-", ms=2.5, lw=1, label=key.replace("_", " "))
        if not drawn:
            _note(ax, "no values")
        elif ax is ax_lr:
            ax.set_yscale("log")
        ax.legend(fontsize=6.5, loc="best")
        ax.tick_params(labelsize=7)
    phases = [str(row.get("phase", "")) for row in history]
    starts = [i for i in range(len(history)) if i == 0 or phases[i] != phases[i - 1]]
    for i in starts:
        x = epoch[0] if i == 0 else (epoch[i - 1] + epoch[i]) / 2
        for ax, _ in panels if i > 0 else []:
            ax.axvline(x, ls="--", lw=0.8, color="0.5")
        ax_loss.text(x, 1.02, f" {phases[i]}", transform=ax_loss.get_xaxis_transform(), fontsize=7, va="bottom")
    kept = np.flatnonzero(epoch == best_epoch) if monitor is not None and best_epoch is not None else np.zeros(0)
    if len(kept):
        values, best = _column(history, str(monitor)), kept[0]
        ax = ax_loss if monitor == "val_loss" else ax_val
        ax.plot(epoch[best], values[best], "*", ms=10, color="crimson", label=f"kept epoch ({monitor})")
        ax.legend(fontsize=6.5, loc="best")
    ax_val.set_xlabel("epoch")
    ax_val.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def plot_image_grid(path: Path, images: list[np.ndarray], titles: list[str], ncols: int = 4) -> Path:
    """A grid of HxWx3 uint8 images with small titles, e.g. Grad-CAM of the most confident mistakes."""
    if len(images) != len(titles):
        raise ValueError(f"got {len(images)} images but {len(titles)} titles; expected one title per image")
    if ncols < 1:
        raise ValueError(f"ncols is {ncols}; expected at least 1")
    if not images:
        return _message_figure(path, "no images")
    for i, img in enumerate(images):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"images[{i}] has shape {img.shape} and dtype {img.dtype}; expected HxWx3 uint8")
    cols = min(ncols, len(images))
    rows = -(-len(images) // cols)
    fig = Figure(figsize=(2.2 * cols, 2.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, img, title in zip(axes, images, titles, strict=False):
        ax.imshow(img)
        # wrapped so neighbouring titles never run into each other
        ax.set_title("\n".join(textwrap.wrap(title, 34)), fontsize=6.5)
    return _save(fig, path)


def plot_roc_curves(
    path: Path, y_true: np.ndarray, probs: dict[str, np.ndarray], classes: Sequence[str], title: str = "ROC"
) -> Path:
    """Several models' ROC curves on the same cases, overlaid: class 1 for two classes, else the macro
    one-vs-rest curve (mean per-class TPR on a shared FPR grid, as :func:`plot_roc` draws it).

    ``probs`` maps each model's name (the legend, with its AUC) to its (N, K) probabilities.

    Examples:
        >>> plot_roc_curves(out / "roc.png", y, {"A": p_a, "B": p_b}, ["benign", "malignant"])  # doctest: +SKIP
    """
    fig = Figure(figsize=SIZE)
    ax = fig.add_subplot()
    binary = len(classes) == 2
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6", label="chance")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(f"{title}, positive class {classes[1]!r}" if binary else f"{title}, macro one-vs-rest", fontsize=9)
    for i, (name, model_probs) in enumerate(probs.items()):
        y, p = _check_probs(y_true, model_probs, len(classes))
        present = np.unique(y)
        why = _why_undefined(p) or (f"only one class ({classes[present[0]]})" if len(present) < 2 else None)
        if why is not None:
            _note(ax, f"undefined: {why}")
            break
        targets = [1] if binary else list(present)
        tpr = np.mean([_staircase(y == k, p[:, k], _GRID) for k in targets], axis=0)
        auc = np.mean([binary_auc(y == k, p[:, k]) for k in targets])
        ax.plot(_GRID, tpr, drawstyle="steps-post", lw=1.6, color=f"C{i}", label=f"{name}: AUC {auc:.3f}")
    ax.legend(loc="lower right", fontsize=6.5, framealpha=0.85)
    return _save(fig, path)

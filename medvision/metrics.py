"""Classification and regression metrics as pure functions, checked against scikit-learn in the tests.

AUC on data with a single class is undefined: it is NaN with a warning, never a crash and never a
silent 0.5. Likewise a regression metric of an empty set, and R² of a constant target.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


class MetricWarning(UserWarning):
    """A metric that is undefined on this data (single class, NaN scores) and was reported as NaN."""


NEEDS_EVERY_CLASS = ("auc", "balanced_acc", "average_precision")
"""The macro metrics of more than one class, which average over every class: on cases that lack a class they are
undefined (NaN, with a warning naming it), as scikit-learn's are, never an average over the classes present,
which would be another metric than on cases that hold them all (a fold, a split, a bootstrap resample)."""


def lacks_a_class(y_true: np.ndarray, n_classes: int, what: str) -> bool:
    """Whether ``y_true`` lacks one of the ``n_classes`` classes; warns, naming them, that ``what`` is then NaN
    (see :data:`NEEDS_EVERY_CLASS`)."""
    absent = sorted(set(range(n_classes)) - set(np.asarray(y_true).ravel().tolist()))
    if absent:
        warnings.warn(f"{what} is undefined: class(es) {absent} have no case here, and a macro average needs every "
                      "class; reporting NaN", MetricWarning, stacklevel=3)  # fmt: skip
    return bool(absent)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank (as in the Mann-Whitney U statistic)."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    boundaries = np.flatnonzero(np.diff(sorted_vals)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1..end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def binary_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve for 0/1 labels, via the rank-sum (Mann-Whitney) identity."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if len(y) != len(s):
        raise ValueError(f"y_true has {len(y)} entries but score has {len(s)}")
    if not np.all(np.isfinite(s)):
        warnings.warn("AUC: scores contain NaN or Inf; AUC is NaN", MetricWarning, stacklevel=2)
        return float("nan")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        warnings.warn(f"AUC is undefined with only one class present (all {len(y)} cases); reporting NaN",
                      MetricWarning, stacklevel=2)  # fmt: skip
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def compute_auc(y_true: np.ndarray, probs: np.ndarray, average: str = "macro") -> float:
    """Binary AUC, or one-vs-rest AUC averaged over classes for more than two (scikit-learn's ``ovr``).

    ``probs`` is (N,) scores of the positive class, or (N, K) class probabilities. ``average`` is
    ``macro`` (each class counts the same) or ``weighted`` (by class prevalence). A class absent from
    ``y_true`` has no one-vs-rest AUC: the macro AUC is then NaN with a warning naming it
    (:data:`NEEDS_EVERY_CLASS`); the weighted AUC gives it its weight, zero, and leaves it out with a warning.
    """
    if average not in ("macro", "weighted"):
        raise ValueError(f"AUC average {average!r} is not one of macro, weighted")
    y = np.asarray(y_true).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1 or p.shape[1] == 1:
        return binary_auc(y, p.ravel())
    if p.shape[1] == 2:
        return binary_auc(y == 1, p[:, 1])
    if average == "macro" and lacks_a_class(y, p.shape[1], "macro AUC"):
        return float("nan")
    return _mean_of_columns(np.eye(p.shape[1], dtype=bool)[y], p, average, "multiclass")


def _mean_of_columns(onehot: np.ndarray, p: np.ndarray, average: str, kind: str) -> float:
    """Mean (or support-weighted mean) of the per-column binary AUCs of the columns with both classes."""
    aucs, weights, absent = [], [], []
    for k in range(p.shape[1]):
        positives = onehot[:, k]
        if positives.all() or not positives.any():
            absent.append(k)
            continue
        aucs.append(binary_auc(positives, p[:, k]))
        weights.append(float(positives.sum()))
    if absent:
        warnings.warn(
            f"{kind} AUC: class(es) {absent} have no positive (or no negative) samples and are left out",
            MetricWarning,
            stacklevel=3,
        )
    if not aucs:
        return float("nan")
    return float(np.average(aucs, weights=weights if average == "weighted" else None))


def multilabel_auc(y_true: np.ndarray, probs: np.ndarray, average: str = "macro") -> float:
    """AUC of (N, K) 0/1 label indicators against (N, K) scores: ``macro``, ``weighted`` or ``micro``.

    As scikit-learn's ``roc_auc_score`` on a multilabel indicator matrix, except that a label column
    with a single class is left out with a warning instead of raising.
    """
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 2 or y.shape != p.shape:
        raise ValueError(f"multilabel AUC needs (N, K) labels and scores of one shape, got {y.shape} and {p.shape}")
    if average == "micro":
        return binary_auc(y.ravel(), p.ravel())
    if average not in ("macro", "weighted"):
        raise ValueError(f"multilabel AUC average {average!r} is not one of macro, weighted, micro")
    return _mean_of_columns(y, p, average, "multilabel")


def compute_accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Share of samples whose arg-max class (or score > 0.5 for 1-D scores) equals the label."""
    y = np.asarray(y_true).ravel()
    if len(y) == 0:
        warnings.warn("accuracy of an empty set is undefined; reporting NaN", MetricWarning, stacklevel=2)
        return float("nan")
    p = np.asarray(probs)
    pred = (p.ravel() > 0.5).astype(np.int64) if p.ndim == 1 else p.argmax(axis=1)
    return float((pred == y).mean())


def compute_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The headline numbers of a split: AUC, accuracy and sample count."""
    return {"auc": compute_auc(y_true, probs), "acc": compute_accuracy(y_true, probs), "n": len(y_true)}


class MetricAccumulator:
    """Collects logits and labels batch by batch (on the device, without syncing) for one split."""

    def __init__(self) -> None:
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self._logits.append(logits.detach().float())
        self._labels.append(labels.detach())

    def logits_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._logits:
            return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
        return torch.cat(self._logits).cpu().numpy(), torch.cat(self._labels).cpu().numpy()

    def compute(self) -> dict[str, float]:
        logits, labels = self.logits_and_labels()
        return compute_metrics(labels, softmax(logits) if len(labels) else logits)


# ------------------------------------------------------------------------------- regression metrics


def _regression_pair(y_true: np.ndarray, pred: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Targets and predictions as 1-D float64 (a prediction may be (n,) or (n, 1), as a regression head's
    output); None, with a warning, where ``name`` is undefined: no rows, or NaN/inf among them."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(pred, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if p.ndim != 1 or len(p) != len(y):
        raise ValueError(f"{name}: pred has shape {p.shape} for {len(y)} targets: expected ({len(y)},) or "
                         f"({len(y)}, 1)")  # fmt: skip
    if len(y) == 0:
        warnings.warn(f"{name} of an empty set is undefined; reporting NaN", MetricWarning, stacklevel=3)
        return None
    if not (np.isfinite(y).all() and np.isfinite(p).all()):
        warnings.warn(f"{name}: targets or predictions contain NaN or Inf; reporting NaN", MetricWarning, stacklevel=3)
        return None
    return y, p


def compute_mse(y_true: np.ndarray, pred: np.ndarray) -> float:
    """Mean squared error of continuous predictions ``(n,)`` or ``(n, 1)`` (scikit-learn's ``mean_squared_error``)."""
    pair = _regression_pair(y_true, pred, "MSE")
    return float("nan") if pair is None else float(np.mean(np.square(pair[0] - pair[1])))


def compute_mae(y_true: np.ndarray, pred: np.ndarray) -> float:
    """Mean absolute error of continuous predictions (scikit-learn's ``mean_absolute_error``), in the target's units."""
    pair = _regression_pair(y_true, pred, "MAE")
    return float("nan") if pair is None else float(np.mean(np.abs(pair[0] - pair[1])))


def compute_r2(y_true: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (scikit-learn's ``r2_score``): 1 is perfect, 0 is no
    better than predicting the targets' own mean, below 0 worse. Undefined (NaN, with a warning) when the
    targets are constant, where scikit-learn reports 0 or 1 by convention."""
    pair = _regression_pair(y_true, pred, "R2")
    if pair is None:
        return float("nan")
    y, p = pair
    ss_tot = float(np.sum(np.square(y - y.mean())))
    if ss_tot == 0.0:
        warnings.warn("R2 is undefined for a constant target; reporting NaN", MetricWarning, stacklevel=2)
        return float("nan")
    return 1.0 - float(np.sum(np.square(y - p))) / ss_tot


# ------------------------------------------------------------------ threshold and calibration metrics


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]`` as an (n_classes, n_classes) int64 matrix."""
    y, p = np.asarray(y_true, dtype=np.int64).ravel(), np.asarray(y_pred, dtype=np.int64).ravel()
    return np.bincount(y * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ratio(num: float, den: float, name: str) -> float:
    if den == 0:
        warnings.warn(f"{name} is undefined (0/0); reporting NaN", MetricWarning, stacklevel=3)
        return float("nan")
    return float(num / den)


def per_class_metrics(cm: np.ndarray) -> list[dict[str, float]]:
    """Sensitivity, specificity, PPV, NPV and F1 of each class against the rest, from a confusion matrix."""
    total = cm.sum()
    out = []
    for k in range(cm.shape[0]):
        tp = float(cm[k, k])
        fn = float(cm[k].sum() - tp)
        fp = float(cm[:, k].sum() - tp)
        tn = float(total - tp - fn - fp)
        out.append({
            "sensitivity": _ratio(tp, tp + fn, f"class {k} sensitivity"),
            "specificity": _ratio(tn, tn + fp, f"class {k} specificity"),
            "ppv": _ratio(tp, tp + fp, f"class {k} PPV"),
            "npv": _ratio(tn, tn + fn, f"class {k} NPV"),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn, f"class {k} F1"),
            "support": float(tp + fn),
        })  # fmt: skip
    return out


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the ``n_classes`` classes (scikit-learn's ``balanced_accuracy_score`` where every class has
    a case). A class without cases has no recall: NaN with a warning naming it (:data:`NEEDS_EVERY_CLASS`), where
    scikit-learn would average over the classes present."""
    if len(np.asarray(y_true)) == 0:
        warnings.warn("balanced accuracy of an empty set is undefined; reporting NaN", MetricWarning, stacklevel=2)
        return float("nan")
    if lacks_a_class(y_true, n_classes, "balanced accuracy"):
        return float("nan")
    cm = confusion_matrix(y_true, y_pred, n_classes)
    return float(np.mean(np.diag(cm) / cm.sum(axis=1)))


def average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    """Binary average precision: sum over thresholds of (R_n - R_{n-1}) P_n, as scikit-learn computes it."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    if n_pos == 0:
        warnings.warn("average precision is undefined without positives; reporting NaN", MetricWarning, stacklevel=2)
        return float("nan")
    if n_pos == len(y):  # scikit-learn says 1.0 here, for any scores: no ranking is measured, as AUC says n/a
        warnings.warn("average precision without negatives is 1 whatever the scores; reporting NaN", MetricWarning,
                      stacklevel=2)  # fmt: skip
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tps = np.cumsum(y_sorted)[last_of_tie]
    precision = tps / (last_of_tie + 1)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def brier_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean squared error of the probabilities against the labels: for two classes (N,) or (N, 2), of the second
    class's probability (scikit-learn's ``brier_score_loss``; the same for either class); for more, summed over
    the one-hot classes (Brier's original form, which for two classes would be twice the binary score)."""
    y = np.asarray(y_true).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]
    if p.ndim == 1:
        return float(np.mean((p - y) ** 2))
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: confidence vs accuracy in equal-width confidence bins, weighted by bin size."""
    y = np.asarray(y_true).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1 - p, p], axis=1)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


# ------------------------------------------------------------------------ thresholds


def roc_points(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, sensitivity, specificity) at every distinct score, highest threshold first."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    thresholds = np.unique(s)[::-1]
    pos, neg = max(1, int(y.sum())), max(1, int((~y).sum()))
    sens = np.array([(s[y] >= t).sum() / pos for t in thresholds])
    spec = np.array([(s[~y] < t).sum() / neg for t in thresholds])
    return thresholds, sens, spec


def operating_point(y_true: np.ndarray, score: np.ndarray, rule: str, target: float | None = None) -> float:
    """A threshold chosen on validation data: ``youden`` (max sens + spec - 1), ``sensitivity`` (the fewest false
    alarms reaching ``target`` sensitivity) or ``specificity`` (the most cases caught reaching ``target``).

    Each rule picks the validation score its calls start at, and the threshold is halfway between it and the next
    lower validation score: the validation calls are the same, and a new case scoring a hair below that score (a
    saturated 0.9999998 where validation's lowest tumour slide had 0.9999999) is not called negative on it. Every
    sensitivity is reached at the lowest score, which is kept as it is. A specificity no observed score reaches (the
    highest-scoring case is a negative) is reached just above the highest score, calling every case negative, with
    a warning: the highest score itself would miss the target on the very data it was chosen on."""
    thresholds, sens, spec = roc_points(y_true, score)

    def below(i: int) -> float:  # halfway down to the next validation score
        return float(thresholds[i] if i + 1 == len(thresholds) else (thresholds[i] + thresholds[i + 1]) / 2)

    if rule == "youden":
        return below(int(np.argmax(sens + spec - 1)))
    if target is None:
        raise ValueError(f"operating point rule {rule!r} needs a target, e.g. 0.95")
    if rule == "sensitivity":
        ok = np.flatnonzero(sens >= target)
        return below(int(ok[0]) if ok.size else len(thresholds) - 1)
    if rule == "specificity":
        ok = np.flatnonzero(spec >= target)
        if ok.size:
            return below(int(ok[-1]))
        warnings.warn(f"no score reaches specificity {target:g} on validation (its highest-scoring case is a "
                      "negative): the threshold is just above the highest score, calling every case negative",
                      MetricWarning, stacklevel=2)  # fmt: skip
        return float(np.nextafter(thresholds[0], np.inf))
    raise ValueError(f"operating point rule {rule!r} is not one of youden, sensitivity, specificity")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64, stable for large logits."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def tta_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of (N, K) logits, or for (N, V, K) the mean over the V views of each view's softmax."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 2:
        return softmax(z, temperature)
    n, v, k = z.shape
    return softmax(z.reshape(n * v, k), temperature).reshape(n, v, k).mean(axis=1)


#: Significant digits of a probability in ``predictions.csv``, and in every metric computed on it (float32 carries
#: about 7). Differences below them are the arithmetic's noise, and an AUC must not rank images on them: a k-NN run's
#: report did, and its test AUC was 1.5e-4 away from the AUC of its own predictions.csv.
PROB_DIGITS = 7


def round_significant(x: np.ndarray, digits: int = PROB_DIGITS) -> np.ndarray:
    """``x`` rounded to ``digits`` significant digits, as ``float(f"{v:.{digits}g}")`` rounds each value, so that a
    metric on the rounded array is the metric on the written file: ``[0.123456789, 0.0]`` -> ``[0.123, 0.0]`` (3)."""
    x = np.array(x, dtype=np.float64)  # a copy: the rounded values go back into it
    ok = np.isfinite(x) & (x != 0)
    mag = np.abs(x[ok])
    exponent = np.floor(np.log10(mag))
    exponent[mag >= 10.0 ** (exponent + 1)] += 1  # log10 may miss by one next to a power of ten
    exponent[mag < 10.0**exponent] -= 1
    power = digits - 1 - exponent
    exact = (power >= 0) & (power <= 22)  # an integer over 10**power, with 10**power exact: one correct division
    values = x[ok]
    values[exact] = np.round(values[exact] * 10.0 ** power[exact]) / 10.0 ** power[exact]
    values[~exact] = [float(f"{v:.{digits}g}") for v in values[~exact]]
    x[ok] = values
    return x


def aggregate_by_group(
    groups: list[str], y_true: np.ndarray, probs: np.ndarray, method: str = "mean", top_k: int = 3,
    positive: int | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray, int]:  # fmt: skip
    """Image (or patch) probabilities -> one row per patient (or slide): ``mean``, ``max`` or ``topk`` mean.

    For two classes the ``positive`` class's probability (``evaluation.positive_class``, a run's
    ``Decision.positive``; None: the second class) is aggregated and the other one is its complement, so ``max``
    means "the slide is as suspicious as its most suspicious patch". For more classes each column is aggregated
    and the row renormalised to sum to one. A patient whose images carry different labels takes the positive
    label if any image has it (binary) or the most common label (multiclass); the number of such patients is
    returned so it can be reported.

    Returns (group ids in first-seen order, labels, probabilities, patients with mixed labels).
    """
    if method not in ("mean", "max", "topk"):
        raise ValueError(f"patient aggregation {method!r} is not one of mean, max, topk")
    y = np.asarray(y_true).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if len(groups) != len(y) or len(y) != len(p):
        raise ValueError(f"{len(groups)} groups, {len(y)} labels and {len(p)} probability rows differ")
    index: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    binary = p.shape[1] == 2
    positive = 1 if positive is None else positive
    if binary and positive not in (0, 1):
        raise ValueError(f"positive class index {positive}; expected 0 or 1 for two classes")
    cols = p[:, [positive]] if binary else p
    out_p, out_y, mixed = [], [], 0
    for rows in index.values():
        block = cols[rows]
        if method == "mean":
            agg = block.mean(axis=0)
        elif method == "max":
            agg = block.max(axis=0)
        else:
            agg = np.sort(block, axis=0)[::-1][: max(1, top_k)].mean(axis=0)
        out_p.append((np.r_[1.0 - agg[0], agg[0]] if positive == 1 else np.r_[agg[0], 1.0 - agg[0]]) if binary
                     else agg / agg.sum())  # fmt: skip
        labels = y[rows]
        if (labels != labels[0]).any():
            mixed += 1
        if binary:
            out_y.append(positive if (labels == positive).any() else 1 - positive)
        else:
            out_y.append(int(np.bincount(labels).argmax()))
    return list(index), np.asarray(out_y, dtype=np.int64), np.asarray(out_p).reshape(-1, p.shape[1]), mixed

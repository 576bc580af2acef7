"""How sure a metric is: bootstrap CIs (stratified, or of whole patients), the paired bootstrap of two models,
DeLong's test, and the Wilson and Student-t intervals; pure functions, checked against scikit-learn and SciPy in
the tests. One bootstrap (:func:`bootstrap_indices`) draws every resample here, and the ROC bands of
:mod:`medvision.plots` too, so a CI and the band beside it come from the same resamples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from math import erf, sqrt
from statistics import NormalDist
from typing import Any

import numpy as np

from medvision.metrics import MetricWarning


def bootstrap_indices(y: np.ndarray, n_resamples: int, seed: int, stratify: bool = True,
                      groups: Sequence[Any] | np.ndarray | None = None) -> Iterator[np.ndarray]:  # fmt: skip
    """The row indices of each bootstrap resample: within each class when ``stratify`` (every resample keeps the
    class mix), else over all rows; none when there are no rows. One definition for every bootstrap here, so
    paired and single CIs drawn with the same seed use the same resamples.

    ``groups`` (one id per row, e.g. the patient of each slide) makes it a cluster bootstrap: whole groups are
    drawn with replacement and every row of a drawn group comes along, so rows that are not independent (a
    patient's several slides) count as the one unit they are and the interval is not too narrow. With
    ``stratify`` the groups are drawn within the class of their rows; a group whose rows carry different
    labels counts in the class most of its rows have (ties: the lowest). Groups are taken in the order of
    their first row, so one group per row draws exactly the rows (and random numbers) of ``groups=None``.
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(y).ravel()
    members: list[np.ndarray] | None = None  # each group's rows, groups in the order of their first row
    unit_y = y
    if groups is not None:
        ids = np.asarray(groups).ravel()
        if len(ids) != len(y):
            raise ValueError(f"bootstrap groups: {len(ids)} group ids for {len(y)} rows; expected one per row")
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        rank = np.empty(len(first), np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        unit = rank[inverse.ravel()]
        members = np.split(np.argsort(unit, kind="stable"), np.cumsum(np.bincount(unit))[:-1]) if len(y) else []
        counts = [np.unique(y[rows], return_counts=True) for rows in members]  # a group's class: its most common
        unit_y = np.asarray([v[int(np.argmax(c))] for v, c in counts], dtype=y.dtype)  # label (ties: the lowest)
    strata = [np.flatnonzero(unit_y == c) for c in np.unique(unit_y)] if stratify else [np.arange(len(unit_y))]
    strata = [g for g in strata if len(g)]
    for _ in range(n_resamples if strata else 0):
        drawn = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in strata])
        yield drawn if members is None else np.concatenate([members[u] for u in drawn])


def bootstrap_cis(
    y_true: np.ndarray,
    probs: np.ndarray,
    metrics: dict[str, Callable[[np.ndarray, np.ndarray], float]],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    *,
    stratify: bool = True,
    groups: Sequence[Any] | np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile CIs of several metrics over the same (by default stratified) bootstrap resamples.

    With ``stratify`` each class is resampled on its own, so every resample keeps the data's class mix
    and AUC is defined in each one. Continuous targets need ``stratify=False``: every distinct value
    would be its own stratum, resampled only to itself, and the interval would collapse to the point
    estimate; then all rows are resampled together. ``groups`` (one id per row, e.g. each slide's patient)
    resamples whole groups instead of rows (:func:`bootstrap_indices`). Resamples where a metric is NaN are
    dropped for that metric; a metric that is NaN in every resample gets a (NaN, NaN) interval.
    """
    y = np.asarray(y_true).ravel()
    p = np.asarray(probs)
    values: dict[str, list[float]] = {name: [] for name in metrics}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        for idx in bootstrap_indices(y, n_resamples, seed, stratify, groups):
            for name, metric in metrics.items():
                values[name].append(metric(y[idx], p[idx]))
    alpha = (1 - level) / 2
    out = {}
    for name, vals in values.items():
        arr = np.asarray(vals, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        out[name] = (
            (float(np.quantile(arr, alpha)), float(np.quantile(arr, 1 - alpha))) if arr.size else (math.nan, math.nan)
        )
    return out


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    *,
    stratify: bool = True,
    groups: Sequence[Any] | np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile CI of one ``metric`` over bootstrap resamples, stratified by class by default, of whole
    ``groups`` when given (see ``bootstrap_cis``)."""
    return bootstrap_cis(y_true, probs, {"m": metric}, n_resamples, seed, level, stratify=stratify, groups=groups)["m"]


def _placements(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components: V10 per positive, V01 per negative (ties count one half)."""
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return wins.mean(axis=1), wins.mean(axis=0)


def delong_test(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """DeLong et al. (1988): AUCs of two models on the same cases, their ``level`` CIs and the two-sided p-value.
    The cases are taken as independent (one a patient)."""
    if not 0 < level < 1:
        raise ValueError(f"level is {level}; expected a coverage strictly between 0 and 1, e.g. 0.95")
    y = np.asarray(y_true).astype(bool).ravel()
    a, b = np.asarray(score_a, dtype=np.float64).ravel(), np.asarray(score_b, dtype=np.float64).ravel()
    if y.all() or not y.any():
        warnings.warn("DeLong test needs both classes; reporting NaN", MetricWarning, stacklevel=2)
        nan = float("nan")
        return {"auc_a": nan, "auc_b": nan, "ci_a": (nan, nan), "ci_b": (nan, nan), "z": nan, "p": nan}
    m, n = int(y.sum()), int((~y).sum())
    comps = [_placements(s[y], s[~y]) for s in (a, b)]
    aucs = np.array([v10.mean() for v10, _ in comps])
    s10 = np.cov(np.stack([v10 for v10, _ in comps]))
    s01 = np.cov(np.stack([v01 for _, v01 in comps]))
    cov = s10 / m + s01 / n
    var_diff = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = (aucs[0] - aucs[1]) / np.sqrt(var_diff) if var_diff > 0 else 0.0
    p = 2 * (1 - 0.5 * (1 + erf(abs(z) / sqrt(2))))
    z_level = z_value(level)
    # the normal approximation can pass 1 (0.96 +- 0.11): an AUC is in [0, 1], so is its interval
    ci = [(max(0.0, aucs[i] - z_level * np.sqrt(cov[i, i])), min(1.0, aucs[i] + z_level * np.sqrt(cov[i, i])))
          for i in range(2)]  # fmt: skip
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "ci_a": ci[0], "ci_b": ci[1], "z": float(z), "p": p}


def paired_bootstrap(
    y_true: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    metrics: dict[str, Callable[[np.ndarray, np.ndarray], float]],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    *,
    stratify: bool = True,
    groups: Sequence[Any] | np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """The difference ``metric(b) - metric(a)`` of two models on the same cases, with a paired bootstrap.

    Each resample draws one set of case indices (within each class when ``stratify``, of whole ``groups``
    when given, as :func:`bootstrap_cis` draws them) and scores both models on it, so what the two have in common (the
    hard cases, the easy ones) cancels out of the difference. Returns, per metric: ``diff`` (on all
    cases), ``ci`` (percentile interval of the resampled differences) and ``p``, the two-sided
    bootstrap p-value of "no difference": twice the smaller share of resampled differences at or below
    zero and at or above it, counted as ``(1 + k) / (1 + resamples)`` so it is never 0, capped at 1. So
    p < 1 - ``level`` where the interval leaves out 0, up to the resolution of the resampling. Resamples
    where the difference is NaN are dropped (``resamples`` says how many were kept).
    """
    y = np.asarray(y_true).ravel()
    a, b = np.asarray(probs_a), np.asarray(probs_b)
    if len(a) != len(y) or len(b) != len(y):
        raise ValueError(f"paired bootstrap: {len(y)} labels but {len(a)} and {len(b)} prediction rows; expected "
                         "both models' predictions of the same cases")  # fmt: skip
    diffs: dict[str, list[float]] = {name: [] for name in metrics}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        observed = {name: metric(y, b) - metric(y, a) for name, metric in metrics.items()}
        for idx in bootstrap_indices(y, n_resamples, seed, stratify, groups):
            for name, metric in metrics.items():
                diffs[name].append(metric(y[idx], b[idx]) - metric(y[idx], a[idx]))
    alpha = (1 - level) / 2
    out: dict[str, dict[str, Any]] = {}
    for name, vals in diffs.items():
        d = np.asarray(vals, dtype=np.float64)
        d = d[np.isfinite(d)]
        if d.size == 0:
            out[name] = {"diff": float(observed[name]), "ci": (math.nan, math.nan), "p": math.nan, "resamples": 0}
            continue
        tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
        out[name] = {
            "diff": float(observed[name]),
            "ci": (float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha))),
            "p": min(1.0, 2 * (1 + tail) / (1 + d.size)),
            "resamples": int(d.size),
        }
    return out


def z_value(level: float) -> float:
    """The standard normal quantile of a two-sided ``level`` interval: 1.959964 for 0.95."""
    return NormalDist().inv_cdf(0.5 + level / 2)


def proportion_ci(k: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (NaN, NaN for ``n == 0``); checked against SciPy's
    ``binomtest(k, n).proportion_ci(method="wilson")``. Never zero-wide for a finite ``n``: 10 of 10 gives
    (0.72, 1.0), not the point 1.0 a percentile bootstrap of 10 hits collapses to. ``k`` may be fractional (a
    share of ``n`` patients estimated from their images, :func:`share_ci`)."""
    if n == 0:
        return math.nan, math.nan
    z = z_value(level)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)  # exact ends, not 1 - 1e-16


def clustered(groups: Sequence[Any] | np.ndarray | None) -> bool:
    """Whether ``groups`` (one id per row) put more than one row in some group: only then do the rows need drawing
    whole, and does a proportion's CI need the cluster bootstrap rather than Wilson's interval."""
    return groups is not None and len(set(np.asarray(groups).ravel().tolist())) < len(groups)


def share_ci(hits: np.ndarray, groups: Sequence[Any] | np.ndarray | None = None,
             bootstrap: tuple[float, float] | None = None, level: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """CI of the share of true ``hits`` (one per case in the denominator: the positives of a sensitivity, every
    case of an accuracy), never zero-wide for a finite number of cases.

    Cases that are independent (no ``groups``, or one case a group): Wilson's interval of k hits of n
    (:func:`proportion_ci`); a percentile bootstrap of 10 hits of 10 is the point 1.0. Cases grouped by patient
    (a patient's images): Wilson's interval at the effective sample size (E. L. Korn and B. I. Graubard,
    "Confidence intervals for proportions with small expected number of positive counts estimated from survey
    data", Survey Methodology 24(2), 1998): the share's variance is what the cluster ``bootstrap`` interval (of
    :func:`bootstrap_cis` with the same groups) says, its width over ``2 z``, and ``n_eff = p (1 - p) / se^2``,
    kept between the number of patients in the denominator (a patient's images all alike) and the number of
    cases (independent). Where the bootstrap cannot tell (every patient's images all right, or all wrong: every
    resample gives the same share), ``n_eff`` is the number of patients. NaN, NaN without cases.
    """
    h = np.asarray(hits, dtype=bool).ravel()
    if not len(h):
        return math.nan, math.nan
    if not clustered(groups):
        return proportion_ci(int(h.sum()), len(h), level)
    n_eff = effective_n(h, groups, bootstrap, level)
    return proportion_ci(float(h.mean()) * n_eff, n_eff, level)


def effective_n(hits: np.ndarray, groups: Sequence[Any] | np.ndarray | None = None,
                bootstrap: tuple[float, float] | None = None, level: float = 0.95) -> float:  # fmt: skip
    """The number of independent cases the share of ``hits`` is worth (:func:`share_ci`): all of them without
    ``groups``; grouped, ``p (1 - p) / se^2`` from the cluster ``bootstrap`` interval, kept between the number of
    groups and of cases, and the number of groups where the bootstrap cannot tell."""
    h = np.asarray(hits, dtype=bool).ravel()
    if not clustered(groups):
        return float(len(h))
    assert groups is not None
    units, p = len(set(np.asarray(groups).ravel().tolist())), float(h.mean())
    if bootstrap is not None and all(math.isfinite(v) for v in bootstrap) and 0.0 < p < 1.0:
        se = (bootstrap[1] - bootstrap[0]) / (2 * z_value(level))
        if se > 0:
            return min(max(p * (1 - p) / (se * se), float(units)), float(len(h)))
    return float(units)


Rate = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""A proportion as (labels, probabilities) -> (each case in its denominator, each case a hit)."""


def share(rate: Rate) -> Callable[[np.ndarray, np.ndarray], float]:
    """The proportion ``rate`` measures, as a metric of (labels, probabilities); NaN with an empty denominator."""

    def fn(y: np.ndarray, p: np.ndarray) -> float:
        mask, hit = rate(y, p)
        return float(hit[mask].mean()) if mask.any() else math.nan

    return fn


def proportion_cis(
    y: np.ndarray,
    probs: np.ndarray,
    rates: dict[str, Rate],
    every: set[str],
    n_resamples: int,
    seed: int,
    level: float,
    groups: Sequence[Any] | None,
) -> dict[str, tuple[float, float]]:
    """CIs of proportions (sensitivity, specificity, accuracy), never zero-wide (:func:`share_ci`).

    Independent cases (one image a patient): Wilson's interval of each. A patient's several images: the cluster
    bootstrap, within each class for a rate over one class (a sensitivity: its denominator is that class) but over
    all patients for the rates named in ``every``, over every case (an accuracy, whose CI must carry the
    uncertainty of the class mix that a stratified resample holds fixed), each made a Wilson interval at the
    effective sample size that bootstrap tells (:func:`share_ci`). The resamples are those of
    :func:`bootstrap_cis` with the same seed."""
    y, probs = np.asarray(y).ravel(), np.asarray(probs)
    boot: dict[str, tuple[float, float]] = {}
    if clustered(groups):
        for stratify, names in ((True, set(rates) - every), (False, set(rates) & every)):
            if names:
                fns = {n: share(rates[n]) for n in sorted(names)}
                boot.update(bootstrap_cis(y, probs, fns, n_resamples, seed, level, stratify=stratify, groups=groups))
    out = {}
    for name, rate in rates.items():
        mask, hit = rate(y, probs)
        kept = None if groups is None else np.asarray(groups)[mask]
        out[name] = share_ci(hit[mask], kept, boot.get(name), level)
    return out


def accuracy_rate(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy as a :data:`Rate`: every case is in its denominator, a hit where the arg-max class is the label."""
    return np.ones(len(y), dtype=bool), np.asarray(p).argmax(axis=1) == np.asarray(y).ravel()


def accuracy_ci(y: np.ndarray, probs: np.ndarray, n_resamples: int, seed: int, level: float,
                groups: Sequence[Any] | None) -> tuple[float, float]:  # fmt: skip
    """The CI of an accuracy as :func:`proportion_cis` makes it (Wilson's interval; with several images a patient,
    at the effective sample size the unstratified patient bootstrap tells): what ``compare`` and the MIL report
    quote beside ``evaluation``'s."""
    return proportion_cis(y, probs, {"acc": accuracy_rate}, {"acc"}, n_resamples, seed, level, groups)["acc"]


def recall_rate(k: int) -> Rate:
    """Class ``k``'s recall as a :data:`Rate`: its cases are in the denominator, a hit where the arg-max is ``k``."""

    def rate(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(y).ravel() == k, np.asarray(p).argmax(axis=1) == k

    return rate


def balanced_accuracy_ci(y: np.ndarray, probs: np.ndarray, n_resamples: int, seed: int, level: float,
                         groups: Sequence[Any] | None) -> tuple[float, float]:  # fmt: skip
    """The CI of a balanced accuracy (the mean of the ``K`` classes' recalls), never zero-wide: Wilson's interval
    at the effective sample size of a mean of proportions, ``K^2 / sum_k 1 / n_k``, ``n_k`` each class's cases (or,
    with several images a patient, the effective number :func:`effective_n` takes from the class's stratified
    cluster bootstrap). With equal recalls its variance is exactly that of a proportion of that many cases; two
    classes of n cases each make it 2n, the accuracy's, and a rare class makes it small, as it makes the balanced
    accuracy uncertain. A stratified percentile bootstrap holds each class's count fixed, so a head that gets every
    slide right has the point [1, 1]. NaN, NaN when some class has no case (the metric is undefined)."""
    y, probs = np.asarray(y).ravel(), np.asarray(probs)
    rates = {f"recall_{k}": recall_rate(k) for k in range(probs.shape[1])}
    cases = {name: rate(y, probs) for name, rate in rates.items()}  # (each class's cases, its hits)
    if any(not mask.any() for mask, _ in cases.values()):
        return math.nan, math.nan
    boot: dict[str, tuple[float, float]] = {}
    if clustered(groups):
        fns = {name: share(rate) for name, rate in rates.items()}
        boot = bootstrap_cis(y, probs, fns, n_resamples, seed, level, stratify=True, groups=groups)
    recalls, inverse = [], 0.0
    for name, (mask, hit) in cases.items():
        recalls.append(float(hit[mask].mean()))
        inverse += 1.0 / effective_n(hit[mask], None if groups is None else np.asarray(groups)[mask],
                                     boot.get(name), level)  # fmt: skip
    n_eff = len(rates) ** 2 / inverse
    return proportion_ci(float(np.mean(recalls)) * n_eff, n_eff, level)


def ci_methods(groups: Sequence[Any] | None) -> dict[str, str]:
    """How :func:`proportion_cis` and the AUC's bootstrap made each CI of a summary, for metrics.json to say."""
    boot = "percentile bootstrap, stratified by class"
    if not clustered(groups):
        wilson = "Wilson score interval (cases independent: one image a patient)"
        return {"auc": boot, "sensitivity": wilson, "specificity": wilson, "accuracy": wilson}
    cluster = "percentile cluster bootstrap of patients"
    eff = (
        "Wilson score interval at the effective sample size (Korn-Graubard) that the {} tells, between the "
        "number of patients and of images in its denominator"
    )
    return {"auc": f"{cluster}, stratified by class",
            "sensitivity": eff.format(f"{cluster}, stratified by class,"),
            "specificity": eff.format(f"{cluster}, stratified by class,"),
            "accuracy": eff.format(f"{cluster}, not stratified (the class mix varies),")}  # fmt: skip


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of a mean (NaN, NaN for fewer than two values); checked against SciPy's
    ``ttest_1samp(values, 0).confidence_interval``. Constant values give the point ``(mean, mean)``."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return math.nan, math.nan
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, len(x) - 1)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return float(x.mean()) - half, float(x.mean()) + half

"""Report figures: the ROC band maths against scikit-learn, and every plot writing a PNG on good and bad data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_curve

from medvision.metrics import confusion_matrix
from medvision.plots import (
    plot_confusion,
    plot_image_grid,
    plot_pr,
    plot_reliability,
    plot_roc,
    plot_training,
    roc_band,
)

GRID = np.linspace(0, 1, 101)


def binormal(n: int, seed: int = 0, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scores N(0, 1) for negatives and N(1.2, 1) for positives, 30% prevalence."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    score = rng.normal(1.2 * y, 1.0)
    return y, np.round(score, 1) if ties else score


def softmax_data(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[y]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return y, e / e.sum(axis=1, keepdims=True)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] > 100 and img.size[1] > 100


# ----------------------------------------------------------------------------------------- roc_band


@pytest.mark.parametrize("ties", [False, True])
def test_roc_band_curve_is_sklearn_staircase_on_the_grid(ties: bool) -> None:
    y, s = binormal(400, seed=1, ties=ties)
    tpr, lo, hi = roc_band(y, s, GRID, n_resamples=100)
    fpr_sk, tpr_sk, _ = roc_curve(y, s, drop_intermediate=False)
    expected = np.array([tpr_sk[fpr_sk <= g].max() for g in GRID])
    np.testing.assert_array_equal(tpr, expected)
    assert tpr[0] == expected[0] and tpr[-1] == 1.0
    inside = (lo <= tpr) & (tpr <= hi)
    assert inside.mean() >= 0.9
    assert np.all(lo <= hi) and np.all((lo >= 0) & (hi <= 1))


def test_roc_band_narrows_with_more_data_and_is_seeded() -> None:
    widths = []
    for n in (300, 3000):
        y, s = binormal(n, seed=2)
        _, lo, hi = roc_band(y, s, GRID, n_resamples=100, seed=3)
        widths.append(float(np.mean(hi - lo)))
    assert widths[1] < 0.6 * widths[0]

    y, s = binormal(300, seed=2)
    first, again = roc_band(y, s, GRID, seed=7), roc_band(y, s, GRID, seed=7)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], roc_band(y, s, GRID, seed=8)[1])


def test_roc_band_of_whole_patients_is_wider_where_a_patients_slides_agree() -> None:
    """Five slides a patient, scored alike: drawn one by one they pass for five cases and the band is too narrow.
    One group a row draws exactly the resamples of no groups (the report's CIs and its band share one bootstrap)."""
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(16), 5)
    y = patients % 2 == 1
    s = (rng.normal(size=16) + 0.8 * (np.arange(16) % 2))[patients] + 0.05 * rng.normal(size=80)
    _, lo, hi = roc_band(y, s, GRID, seed=1)
    _, lo_p, hi_p = roc_band(y, s, GRID, seed=1, groups=patients.tolist())
    assert float(np.mean(hi_p - lo_p)) > 1.4 * float(np.mean(hi - lo))
    alone = roc_band(y, s, GRID, seed=1, groups=[f"row{i}" for i in range(80)])
    np.testing.assert_array_equal(alone[1], lo)
    np.testing.assert_array_equal(alone[2], hi)


def test_roc_band_rejects_single_class_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="12 positive, 0 negative"):
        roc_band(np.ones(12, dtype=bool), np.linspace(0, 1, 12), GRID)
    y, s = binormal(50)
    with pytest.raises(ValueError, match="NaN"):
        roc_band(y, np.where(y, np.nan, s), GRID)
    with pytest.raises(ValueError, match="level"):
        roc_band(y, s, GRID, level=95)
    with pytest.raises(ValueError, match="fpr_grid"):
        roc_band(y, s, np.array([0.0, 1.5]))
    with pytest.raises(ValueError, match="49"):
        roc_band(y, s[:49], GRID)


# -------------------------------------------------------------------------------------------- plots

CLASSES_2 = ["benign", "malignant"]
CLASSES_4 = ["basophil", "eosinophil", "lymphocyte", "neutrophil"]


def cases() -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    y2, p2 = softmax_data(120, 2, seed=4)
    y4, p4 = softmax_data(160, 4, seed=5)
    nan = p2.copy()
    nan[3] = np.nan
    return {
        "binary": (y2, p2, CLASSES_2),
        "multiclass": (y4, p4, CLASSES_4),
        "multiclass_absent_class": (np.minimum(y4, 2), p4, CLASSES_4),
        "single_class": (np.zeros(30, dtype=np.int64), p2[:30], CLASSES_2),
        "single_class_multi": (np.full(30, 2), p4[:30], CLASSES_4),
        "nan": (y2, nan, CLASSES_2),
        "empty": (np.zeros(0, dtype=np.int64), np.zeros((0, 2)), CLASSES_2),
    }


POINTS = [{"label": "Youden", "fpr": 0.2, "tpr": 0.8}, {"label": "sens 0.95", "fpr": 0.5, "tpr": 0.95}]


@pytest.mark.parametrize("case", ["binary", "multiclass"])
def test_roc_pr_and_reliability_write_pngs(case: str, tmp_path: Path) -> None:
    y, p, classes = cases()[case]
    out = plot_roc(tmp_path / "roc.png", y, p, classes, n_resamples=30, points=POINTS)
    assert out == tmp_path / "roc.png"
    assert_png(out)
    assert_png(plot_pr(tmp_path / "pr.png", y, p, classes))
    sharper = p**2 / (p**2).sum(axis=1, keepdims=True)
    assert_png(plot_reliability(tmp_path / "rel.png", y, p, sharper))


# Degenerate data is drawn as a note on the figure, so no metric is even asked (and none warns).
@pytest.mark.filterwarnings("error::medvision.metrics.MetricWarning")
@pytest.mark.parametrize("case", ["single_class", "nan", "empty", "multiclass_absent_class", "single_class_multi"])
def test_degenerate_roc_and_pr_draw_a_note(case: str, tmp_path: Path) -> None:
    y, p, classes = cases()[case]
    assert_png(plot_roc(tmp_path / "roc.png", y, p, classes, n_resamples=30, points=POINTS))
    assert_png(plot_pr(tmp_path / "pr.png", y, p, classes))


@pytest.mark.filterwarnings("error::medvision.metrics.MetricWarning")
def test_degenerate_reliability(tmp_path: Path) -> None:
    y, p, _ = cases()["binary"]
    _, nan, _ = cases()["nan"]
    assert_png(plot_reliability(tmp_path / "nan.png", y, nan, p))
    assert_png(plot_reliability(tmp_path / "empty.png", np.zeros(0, dtype=int), np.zeros((0, 0)), np.zeros((0, 3))))


def test_plots_are_deterministic(tmp_path: Path) -> None:
    y, p, classes = cases()["binary"]
    a = plot_roc(tmp_path / "a.png", y, p, classes, n_resamples=10).read_bytes()
    b = plot_roc(tmp_path / "b.png", y, p, classes, n_resamples=10).read_bytes()
    assert a == b


def test_plot_inputs_are_checked(tmp_path: Path) -> None:
    y, p, _ = cases()["binary"]
    with pytest.raises(ValueError, match=r"\(120, 4\)"):
        plot_roc(tmp_path / "x.png", y, p, CLASSES_4)
    with pytest.raises(ValueError, match=r"0\.\.1"):
        plot_pr(tmp_path / "x.png", y + 1, p, CLASSES_2)
    with pytest.raises(ValueError, match="tpr"):
        plot_roc(tmp_path / "x.png", y, p, CLASSES_2, n_resamples=5, points=[{"label": "a", "fpr": 0.1}])
    with pytest.raises(ValueError, match="n_bins"):
        plot_reliability(tmp_path / "x.png", y, p, p, n_bins=0)
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        plot_confusion(tmp_path / "x.png", np.eye(2, dtype=int), ["a", "b", "c"], "bad")


def test_plot_confusion(tmp_path: Path) -> None:
    k = 12
    y, p = softmax_data(200, k, seed=k)
    cm = confusion_matrix(np.minimum(y, k - 2), p.argmax(axis=1), k)  # the last class never true: an empty row
    assert_png(plot_confusion(tmp_path / "cm.png", cm, [f"class {i}" for i in range(k)], "test, argmax"))


def history_rows() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for epoch in range(1, 8):
        phase = "head" if epoch <= 3 else "full"
        rows.append({
            "epoch": epoch, "phase": phase, "train_loss": 1 / epoch, "val_loss": 1.2 / epoch + 0.05 * (epoch > 5),
            "val_auc": 0.7 + 0.03 * epoch, "val_acc": 0.6 + 0.03 * epoch, "lr": 1e-2 if phase == "head" else 3e-4,
        })  # fmt: skip
    rows[0]["val_auc"] = None
    rows[1]["val_loss"] = float("nan")
    return rows


def test_plot_training(tmp_path: Path) -> None:
    assert_png(plot_training(tmp_path / "train.png", history_rows(), monitor="val_loss"))
    # the star is the run's kept epoch as given (the loop's choice, with its tolerance), not one recomputed here
    assert_png(plot_training(tmp_path / "kept.png", history_rows(), monitor="val_auc", best_epoch=4))
    assert_png(plot_training(tmp_path / "absent.png", history_rows(), monitor="val_auc", best_epoch=99))


def test_plot_training_degenerate(tmp_path: Path) -> None:
    assert_png(plot_training(tmp_path / "empty.png", []))
    nothing = [{"epoch": 1, "phase": "head", "train_loss": None, "val_loss": None, "val_auc": float("nan"),
                "val_acc": None, "lr": 0.0}]  # fmt: skip
    assert_png(plot_training(tmp_path / "nothing.png", nothing, monitor="val_auc"))
    with pytest.raises(ValueError, match="monitor"):
        plot_training(tmp_path / "x.png", history_rows(), monitor="auc")


def test_plot_image_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32 + 8 * i, 40, 3), dtype=np.uint8) for i in range(5)]
    titles = [f"FP p={0.9 + 0.01 * i:.2f}" for i in range(5)]
    assert_png(plot_image_grid(tmp_path / "grid.png", images, titles, ncols=3))
    assert_png(plot_image_grid(tmp_path / "none.png", [], []))
    with pytest.raises(ValueError, match="uint8"):
        plot_image_grid(tmp_path / "x.png", [images[0].astype(np.float32)], ["x"])
    with pytest.raises(ValueError, match="titles"):
        plot_image_grid(tmp_path / "x.png", images, titles[:2])

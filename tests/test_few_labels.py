"""Few labels: frozen-feature heads (linear probe, k-NN), label subsets, test-time augmentation, the label benchmark."""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import timm
import torch
from conftest import tiny_recipe
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

from medvision.data.sources import load_table
from medvision.data.table import DataSourceError, label_subset, subset_indices
from medvision.data.transforms import tta_views
from medvision.evaluation import Decision, SplitOutputs, clinical_metrics, fit_temperature
from medvision.metrics import softmax, tta_softmax
from medvision.models.deploy import CalibratedClassifier
from medvision.models.heads import (
    LOG_FLOOR,
    KNNClassifier,
    attach_knn_head,
    classifier_keys,
    extract_features,
    feature_width,
    fit_linear_probe,
    fit_state,
    knn_probs,
    set_classifier,
)
from medvision.models.simclr import SimCLR
from medvision.recipe import DataConfig, EvalConfig, RecipeError, load_recipe, recipe_from_dict
from medvision.runs import RunError
from medvision.tasks.benchmark.labels import (
    LabelResult,
    _configure,
    label_benchmark,
    parse_fractions,
    parse_inits,
    parse_protocols,
    parse_seed_count,
    seeds_of,
)
from medvision.tasks.benchmark.speed import BenchmarkError
from medvision.tasks.evaluate import evaluate_run
from medvision.tasks.score import score_folder
from medvision.tasks.train import train

TTA = ["hflip", "vflip", "rot90"]


def _blood(shared: Path, out: Path, name: str, protocol: str, limit: int, **evaluation: Any) -> dict[str, Any]:
    """A BloodMNIST recipe at 32 px on ImageNet weights; the frozen protocols need no phases."""
    return {
        "name": name,
        "seed": 0,
        "output_dir": str(out),
        "data": {"source": "npz", "path": str(shared / "data" / "bloodmnist.npz"), "image_size": 32, "limit": limit,
                 "batch_size": 64},
        "model": {"name": "tf_efficientnet_lite0",
                  "pretrained": str(shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors")},
        "train": {"amp": "none", "protocol": protocol},
        "evaluation": {"bootstrap": 50, "explain": 0, **evaluation},
    }  # fmt: skip


def _test_rows(run: Path) -> dict[str, dict[str, str]]:
    return {r["id"]: r for r in csv.DictReader((run / "predictions.csv").open()) if r["split"] == "test"}


# ------------------------------------------------------------------------------- heads, on synthetic features


def _blobs(n: int, n_val: int, k: int, dims: int, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Training and validation rows of overlapping Gaussian classes, off-centre and unevenly scaled features
    (so the standardisation folded into the probe matters)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n + n_val)
    centres = rng.normal(size=(k, dims)) * 1.5
    x = (centres[y] + rng.normal(size=(n + n_val, dims))) * rng.uniform(0.5, 3.0, dims) + rng.normal(size=dims)
    x = x.astype(np.float32)
    return (x[:n], y[:n]), (x[n:], y[n:])


@pytest.mark.parametrize("k", [3, 2])
def test_linear_probe_equals_sklearn_logistic_regression_on_standardised_features(k: int) -> None:
    (x, y), (xv, yv) = _blobs(240, 120, k, 12, seed=k)
    linear, history = fit_linear_probe(x, y, xv, yv, k, balanced=False, seed=0)
    assert [row["C"] for row in history] == [0.01, 0.1, 1.0, 10.0]
    assert all(set(row) == {"C", "val_loss", "val_acc"} and 0 <= row["val_acc"] <= 1 for row in history)
    best = min(history, key=lambda row: row["val_loss"])
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    sk = LogisticRegression(C=best["C"], max_iter=2000, random_state=0).fit((x - mean) / scale, y)
    assert sk.coef_.shape[0] == (1 if k == 2 else k)  # two classes: scikit-learn keeps one row
    expected = sk.predict_proba((xv - mean) / scale)
    with torch.no_grad():
        got = torch.softmax(linear(torch.from_numpy(xv)).double(), dim=1).numpy()
    assert linear.weight.shape == (k, 12)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # the chosen C's history row is the validation log-loss and accuracy of these very probabilities
    assert best["val_loss"] == pytest.approx(-np.log(expected[np.arange(len(yv)), yv]).mean(), abs=1e-6)
    assert best["val_acc"] == pytest.approx((expected.argmax(1) == yv).mean())
    if k == 2:  # the one row is split symmetrically: logit(1) = -logit(0)
        np.testing.assert_allclose(linear.weight[0].detach().numpy(), -linear.weight[1].detach().numpy(), rtol=1e-6)


def test_linear_probe_gives_a_class_absent_from_training_almost_no_probability() -> None:
    (x, y), (xv, yv) = _blobs(200, 60, 3, 8, seed=5)
    linear, _ = fit_linear_probe(x, y, xv, yv, 4, balanced=True, seed=0)  # class 3 has no training row
    with torch.no_grad():
        p = torch.softmax(linear(torch.from_numpy(xv)).double(), dim=1).numpy()
    assert p.shape == (60, 4)
    assert p[:, 3].max() < 1e-9
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert (p.argmax(1) == yv).mean() > 0.6


def _brute_knn(query: np.ndarray, bank: np.ndarray, labels: np.ndarray, k: int, t: float,
               exclude_self: bool) -> np.ndarray:  # fmt: skip
    out = np.zeros((len(query), int(labels.max()) + 2))
    for i, q in enumerate(query):
        sims = [
            (float(q @ b / (np.linalg.norm(q) * np.linalg.norm(b))), j)
            for j, b in enumerate(bank)
            if not (exclude_self and j == i)
        ]
        for sim, j in sorted(sims, reverse=True)[:k]:
            out[i, labels[j]] += math.exp(sim / t)
        out[i] /= out[i].sum()
    return out


def test_knn_probs_match_a_brute_force_loop_with_and_without_leave_one_out() -> None:
    rng = np.random.default_rng(0)
    bank, labels = rng.normal(size=(60, 6)), rng.integers(0, 3, 60)  # 4 classes: class 3 never votes
    query = rng.normal(size=(25, 6)) * 3.0  # the scale of a feature vector does not matter: cosine
    got = knn_probs(query, bank, labels, 4, k=7, temperature=0.1)
    np.testing.assert_allclose(got, _brute_knn(query, bank, labels, 7, 0.1, False), atol=1e-12)
    assert (got[:, 3] == 0).all()
    loo = knn_probs(bank, bank, labels, 4, k=5, temperature=0.5, exclude_self=True)
    np.testing.assert_allclose(loo, _brute_knn(bank, bank, labels, 5, 0.5, True), atol=1e-12)
    with_self = knn_probs(bank, bank, labels, 4, k=1, temperature=0.5)
    assert (with_self.argmax(1) == labels).all()  # without leave-one-out each image is its own nearest neighbour
    # k larger than the bank: every bank row votes
    np.testing.assert_allclose(knn_probs(query, bank, labels, 4, k=500, temperature=0.1),
                               _brute_knn(query, bank, labels, 60, 0.1, False), atol=1e-12)  # fmt: skip
    with pytest.raises(ValueError, match="at least one"):
        knn_probs(query[:1], bank[:1], labels[:1], 4, k=3, temperature=0.1, exclude_self=True)


def test_knn_leave_one_out_is_right_past_the_first_block_of_1024_queries() -> None:
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(1100, 3))
    labels = rng.integers(0, 2, 1100)
    loo = knn_probs(bank, bank, labels, 2, k=3, temperature=0.2, exclude_self=True)
    rows = [0, 1023, 1024, 1099]
    np.testing.assert_allclose(loo[rows], _loo_rows(bank, labels, rows, 3, 0.2), atol=1e-12)


def _loo_rows(bank: np.ndarray, labels: np.ndarray, rows: list[int], k: int, t: float) -> np.ndarray:
    unit = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    out = np.zeros((len(rows), 2))
    for r, i in enumerate(rows):
        sims = unit @ unit[i]
        sims[i] = -np.inf
        for j in np.argsort(-sims)[:k]:
            out[r, labels[j]] += math.exp(sims[j] / t)
        out[r] /= out[r].sum()
    return out


def test_knn_classifier_forward_is_the_log_of_knn_probs_floored() -> None:
    rng = np.random.default_rng(2)
    bank, labels = rng.normal(size=(40, 16)).astype(np.float32), rng.integers(0, 3, 40)
    query = rng.normal(size=(12, 16)).astype(np.float32)
    head = KNNClassifier(torch.from_numpy(bank), torch.from_numpy(labels), num_classes=5, k=6, temperature=0.07)
    with torch.no_grad():
        logits = head(torch.from_numpy(query)).double().numpy()
    expected = np.log(np.maximum(knn_probs(query, bank, labels, 5, 6, 0.07), LOG_FLOOR))
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits[:, 3:], math.log(LOG_FLOOR), atol=1e-6)  # classes 3 and 4 never vote
    assert KNNClassifier(torch.from_numpy(bank[:4]), torch.from_numpy(labels[:4]), 5, 20, 0.07).k == 4


def test_knn_head_in_a_timm_model_saves_and_loads_its_bank() -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    images = torch.rand(10, 3, 32, 32)
    loader = DataLoader(TensorDataset(images, torch.zeros(10, dtype=torch.long)), batch_size=4)
    feats = extract_features(model, loader, torch.device("cpu"), "none", None)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(images), pre_logits=True).numpy()
    assert feats.shape == (10, model.num_features) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, expected, atol=1e-5)
    assert classifier_keys(model) == {"classifier.weight", "classifier.bias"}

    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    set_classifier(model, KNNClassifier(torch.from_numpy(feats), labels, 3, k=3, temperature=0.1))
    assert isinstance(model.get_classifier(), KNNClassifier)
    assert classifier_keys(model) == {"classifier.bank", "classifier.bank_labels"}
    with torch.no_grad():
        before = model(images)
    np.testing.assert_allclose(before.numpy(), np.log(np.maximum(knn_probs(expected, expected, labels.numpy(), 3, 3,
                                                                           0.1), LOG_FLOOR)), atol=1e-4)  # fmt: skip
    state = model.state_dict()

    fresh = timm.create_model("test_efficientnet", num_classes=3).eval()
    with pytest.raises(RuntimeError):  # an ordinary classifier cannot take the bank
        fresh.load_state_dict(state)
    fit_state(fresh, state, 3, k=3, temperature=0.1)
    fresh.load_state_dict(state)  # strict: every key fits now
    with torch.no_grad():
        assert torch.equal(fresh(images), before)
    plain = timm.create_model("test_efficientnet", num_classes=3)
    fit_state(plain, plain.state_dict(), 3, k=3, temperature=0.1)  # no bank: the head stays linear
    assert isinstance(plain.get_classifier(), torch.nn.Linear)

    plain.pretrained_cfg = {**plain.pretrained_cfg, "classifier": "no_such_head"}
    with pytest.raises(ValueError, match="no classifier at 'no_such_head'"):
        set_classifier(plain, torch.nn.Identity())


# ---------------------------------------------------------------------------- the frozen protocols, end to end


@pytest.fixture(scope="module")
def probe_run(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A linear probe on ImageNet features of 200 BloodMNIST images per split, tested with three TTA views."""
    out = tmp_path_factory.mktemp("probe")
    return train(recipe_from_dict(_blood(shared, out, "probe", "linear_probe", 200, tta=TTA)))


@pytest.fixture(scope="module")
def knn_run(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("knn")
    return train(recipe_from_dict(_blood(shared, out, "knn", "knn", 300)))


@pytest.fixture(scope="module")
def tiny_runs(tiles_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A one-epoch fine-tune and a k-NN run of timm's tiny test_efficientnet on 72 synthetic tiles (12 patients)."""
    out = tmp_path_factory.mktemp("tiny")
    phases = [{"name": "head", "epochs": 1, "trainable": "head", "lr": 1e-2}]
    finetune = tiny_recipe(tiles_manifest, out, phases=phases)
    finetune["name"], finetune["evaluation"]["explain"] = "finetune", 0
    knn = tiny_recipe(tiles_manifest, out, phases=[], protocol="knn", knn_k=5)
    knn["name"], knn["evaluation"]["explain"] = "knn", 0
    return train(recipe_from_dict(finetune)), train(recipe_from_dict(knn))


@pytest.mark.parametrize(
    ("fixture", "protocol", "fitted"), [("probe_run", "linear_probe", "C"), ("knn_run", "knn", "k")]
)
def test_frozen_protocol_on_bloodmnist_runs_reports_and_reevaluates(
    fixture: str, protocol: str, fitted: str, request: pytest.FixtureRequest
) -> None:
    run: Path = request.getfixturevalue(fixture)
    for name in ("recipe.yaml", "run.json", "model.safetensors", "metrics.json", "predictions.csv", "report.md",
                 "report.html", "train.log"):  # fmt: skip
        assert (run / name).is_file(), name
    assert not (run / "last.pt").exists()  # nothing was trained by gradient steps, so there is nothing to resume
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"image", "patient", "decision", "test", "val", "history", "best_epoch", "protocol"} <= set(metrics)
    assert metrics["test"]["auc"] > 0.8, metrics["test"]
    assert metrics["test"]["acc"] > 0.4, metrics["test"]  # chance is 1/8
    info = metrics["protocol"]
    assert info["name"] == protocol and info["features"] == 1280 and info["train_images"] == metrics["test"]["n"]
    if protocol == "linear_probe":
        assert info["C"] in (0.01, 0.1, 1.0, 10.0) and len(info["grid"]) == 4
        assert info["C"] == min(info["grid"], key=lambda row: row["val_loss"])["C"]
    else:
        assert info[fitted] == 20 and info["temperature"] == 0.07
    assert json.loads((run / "run.json").read_text())["protocol"] == protocol
    rows = list(csv.DictReader((run / "predictions.csv").open()))
    assert len(rows) == metrics["val"]["n"] + metrics["test"]["n"]
    assert set(rows[0]) == {"split", "id", "label", "pred", *(f"prob_{i}" for i in range(8))}
    assert "| image | test |" in (run / "report.md").read_text()
    # the file is what the report measured: a k-NN run's floored vote shares used to differ below the written
    # digits by the number of empty classes, and the report's AUC ranked on that noise (0.003 off the file's)
    test = [r for r in rows if r["split"] == "test"]
    probs = np.array([[float(r[f"prob_{i}"]) for i in range(8)] for r in test])
    labels = np.array([int(r["label"]) for r in test])
    assert metrics["test"]["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"), abs=1e-12)

    out, again = evaluate_run(run)  # a knn run's weights hold the bank: fit_state reshapes the model for it
    assert again["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)
    assert again["acc"] == pytest.approx(metrics["test"]["acc"], abs=1e-6)
    assert (out / "metrics.json").is_file()


def test_frozen_run_has_the_metrics_layout_of_a_finetune_run(tiny_runs: tuple[Path, Path]) -> None:
    finetune, knn = (json.loads((run / "metrics.json").read_text()) for run in tiny_runs)
    assert set(knn) == set(finetune) | {"protocol"}
    for level in ("image", "patient"):
        assert set(knn[level]) == set(finetune[level])
        assert set(knn[level]["test"]) - {"warnings"} == set(finetune[level]["test"]) - {"warnings"}
    assert knn["history"] == [] and knn["protocol"]["k"] == 5


def test_finetune_needs_phases(tiles_manifest: Path, tmp_path: Path) -> None:
    recipe = recipe_from_dict(tiny_recipe(tiles_manifest, tmp_path, phases=[]))
    assert recipe.train.protocol == "finetune"
    with pytest.raises(RunError, match=r"train\.phases"):
        train(recipe)
    assert not (tmp_path / "tiny").exists()  # refused before the run folder was made
    tree = tiny_recipe(tiles_manifest, tmp_path, phases=[])
    tree["train"]["protocol"] = "ridge"
    with pytest.raises(RecipeError, match=r"train\.protocol"):
        recipe_from_dict(tree)


# ----------------------------------------------------------------------------------------- label subsets


def _patients(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """600 images of 150 patients (1-7 images each), three classes at about 60/30/10%; labels mixed within some."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for p in range(150):
        label = int(rng.choice(3, p=[0.6, 0.3, 0.1]))
        for _ in range(int(rng.integers(1, 8))):
            labels.append(label if rng.random() > 0.1 else int(rng.integers(0, 3)))
            groups.append(f"patient{p}")
    return np.asarray(labels), groups


def test_label_subsets_are_nested_whole_patient_stratified_and_seeded() -> None:
    labels, groups = _patients()
    idx = np.arange(len(labels))
    subsets = {f: label_subset(labels, groups, idx, f, seed=0) for f in (0.01, 0.1, 0.3, 0.6)}
    patients = {f: {groups[i] for i in s} for f, s in subsets.items()}
    for small, large in ((0.01, 0.1), (0.1, 0.3), (0.3, 0.6)):
        assert set(subsets[small]) <= set(subsets[large]), (small, large)
    for f, s in subsets.items():
        assert len(set(s)) == len(s) and (np.diff(s) > 0).all()
        kept = set(s.tolist())
        for g in patients[f]:  # whole patients: every image of a kept patient is kept
            assert all(i in kept for i in np.flatnonzero(np.asarray(groups) == g))
        majority = {g: np.bincount(labels[np.asarray(groups) == g], minlength=3).argmax() for g in patients[f]}
        assert set(majority.values()) == {0, 1, 2}, f  # every class keeps at least one patient
    for f in (0.3, 0.6):
        share = np.bincount(labels[subsets[f]], minlength=3) / len(subsets[f])
        np.testing.assert_allclose(share, np.bincount(labels, minlength=3) / len(labels), atol=0.08)
        assert abs(len(subsets[f]) / len(labels) - f) < 0.05
    assert len(subsets[0.01]) < 30  # at least one patient of each class, hardly more
    other = label_subset(labels, groups, idx, 0.3, seed=1)
    assert set(other.tolist()) != set(subsets[0.3].tolist())
    assert np.array_equal(label_subset(labels, groups, idx, 0.3, seed=0), subsets[0.3])
    assert np.array_equal(label_subset(labels, groups, idx, 1.0, seed=0), idx)


def test_a_class_no_patient_is_mostly_made_of_keeps_an_example_in_every_subset() -> None:
    """Tumour tiles only on slides that are mostly stroma: no patient's majority, so no bucket of its own. Every
    subset still holds one, from the same patient at every fraction (the subsets stay nested)."""
    groups = [f"P{p}" for p in range(10) for _ in range(4)]
    labels = np.array([int(p >= 8 and t == 0) for p in range(10) for t in range(4)])  # P8, P9: 1 tumour of 4
    idx = np.arange(len(labels))
    subsets = [label_subset(labels, groups, idx, f, seed=s) for s in (0, 1, 2) for f in (0.1, 0.3, 0.6)]
    for k, subset in enumerate(subsets):
        assert set(labels[subset].tolist()) == {0, 1}
        assert len(subset) < len(idx)
        if k % 3:
            assert set(subsets[k - 1]) <= set(subset)


def test_subset_indices_applies_the_fraction_within_the_limit(tiles_manifest: Path) -> None:
    cfg = DataConfig(source="csv", path=str(tiles_manifest), image_size=32, val_fraction=0.25, test_fraction=0.25)
    table = load_table(cfg, seed=0)
    train_idx = table.indices("train")
    assert np.array_equal(subset_indices(table, "train", None, 0), train_idx)
    assert np.array_equal(subset_indices(table, "train", None, 0, fraction=1.0), train_idx)
    half = subset_indices(table, "train", None, 0, fraction=0.5)
    assert set(half) < set(train_idx)
    kept = {table.groups[i] for i in half}
    assert {table.groups[i] for i in train_idx if i not in set(half)}.isdisjoint(kept)  # no patient is split
    assert set(table.labels[half]) == set(table.labels[train_idx])
    limited = subset_indices(table, "train", 20, 0)
    within = subset_indices(table, "train", 20, 0, fraction=0.5)
    assert set(within) <= set(limited) and len(within) < len(limited)
    for bad in (0.0, 1.5):
        tree = tiny_recipe(tiles_manifest, Path("runs"))
        tree["data"]["train_fraction"] = bad
        with pytest.raises(RecipeError, match="train_fraction"):
            recipe_from_dict(tree)


# -------------------------------------------------------------------------------------- test-time augmentation


def test_tta_views_are_the_flips_and_the_quarter_turn() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = tta_views(x, TTA)
    assert len(views) == 4 and views[0] is x
    np.testing.assert_array_equal(views[1].numpy(), x.numpy()[..., ::-1])
    np.testing.assert_array_equal(views[2].numpy(), x.numpy()[..., ::-1, :])
    np.testing.assert_array_equal(views[3].numpy(), np.rot90(x.numpy(), 1, axes=(-2, -1)))
    assert views[3][0, 0, 0, 0] == x[0, 0, 0, 3]  # counter-clockwise: the top-right corner comes to the top left
    assert tta_views(x, []) == [x]
    with pytest.raises(ValueError, match="'blur'"):
        tta_views(x, ["hflip", "blur"])


def test_tta_softmax_temperature_and_split_outputs_average_the_views() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(50, 4)) * 4
    y = (logits + rng.normal(size=(50, 4)) * 4).argmax(1)  # over-confident logits
    same = np.repeat(logits[:, None], 3, axis=1)
    np.testing.assert_allclose(tta_softmax(same, 1.7), softmax(logits, 1.7), atol=1e-12)
    np.testing.assert_allclose(tta_softmax(logits, 1.7), softmax(logits, 1.7))
    assert fit_temperature(same, y) == pytest.approx(fit_temperature(logits, y), rel=1e-6)  # golden section: ~1e-9
    assert fit_temperature(logits, y) > 1.2
    views = rng.normal(size=(50, 3, 4)) * 3
    by_hand = np.mean([softmax(views[:, v], 2.0) for v in range(3)], axis=0)
    np.testing.assert_allclose(tta_softmax(views, 2.0), by_hand, atol=1e-12)
    out = SplitOutputs(views[:, 0], y, [str(i) for i in range(50)], views=views)
    np.testing.assert_allclose(out.probs(2.0), by_hand, rtol=5e-7)  # to the 7 digits predictions.csv keeps
    np.testing.assert_allclose(SplitOutputs(views[:, 0], y, []).probs(2.0), softmax(views[:, 0], 2.0), rtol=5e-7)
    # temperature of the averaged probabilities: it beats the first view's own temperature on the views' NLL
    t_views, t_first = fit_temperature(views, y), fit_temperature(views[:, 0], y)
    nll = [float(-np.log(tta_softmax(views, t)[np.arange(50), y]).mean()) for t in (t_views, t_first)]
    assert nll[0] <= nll[1] + 1e-12


def test_calibrated_classifier_averages_the_calibrated_softmax_of_each_view() -> None:
    torch.manual_seed(1)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    mean, std, t = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), 1.7
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    z = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        per_view = [torch.softmax(model(v) / t, dim=1) for v in tta_views(z, TTA)]
        got = CalibratedClassifier(model, mean, std, t, tta=tuple(TTA))(x)
        plain = CalibratedClassifier(model, mean, std, t)(x)
    torch.testing.assert_close(got, torch.stack(per_view).mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(plain, per_view[0], atol=1e-6, rtol=0)
    assert not torch.allclose(got, plain, atol=1e-4)  # a random model is not flip-invariant
    with pytest.raises(ValueError, match="blur"):
        CalibratedClassifier(model, mean, std, t, tta=("blur",))


def test_recipe_rejects_a_tta_transform_twice_or_unknown(tiles_manifest: Path) -> None:
    tree = tiny_recipe(tiles_manifest, Path("runs"))
    tree["evaluation"]["tta"] = ["hflip", "rot90", "hflip"]
    with pytest.raises(RecipeError, match="twice"):
        recipe_from_dict(tree)
    tree["evaluation"]["tta"] = ["hflip", "transpose"]
    with pytest.raises(RecipeError, match=r"evaluation\.tta"):
        recipe_from_dict(tree)
    tree["evaluation"]["tta"] = TTA
    assert recipe_from_dict(tree).evaluation.tta == TTA


def test_tta_run_records_it_and_scores_files_as_its_predictions(probe_run: Path, shared: Path, tmp_path: Path) -> None:
    assert json.loads((probe_run / "run.json").read_text())["tta"] == TTA
    assert json.loads((probe_run / "metrics.json").read_text())["tta"] == TTA
    assert (
        "test-time augmentation: calibrated probabilities averaged over the image and its hflip, vflip, rot90"
        in (probe_run / "report.md").read_text()
    )
    rows = _test_rows(probe_run)
    images = np.load(shared / "data" / "bloodmnist.npz")["test_images"]
    chosen = sorted(rows, key=lambda i: int(i.split(":")[2]))[:6]
    folder = tmp_path / "images"
    folder.mkdir()
    for item in chosen:
        i = int(item.split(":")[2])
        assert cv2.imwrite(str(folder / f"test_{i}.png"), images[i][:, :, ::-1])  # RGB -> OpenCV's BGR
    out = tmp_path / "scores.csv"
    summary = score_folder(folder, probe_run, out, workers=0)
    assert summary.ok_files == 6 and summary.exit_code == 0
    scored = {r["path"]: r for r in csv.DictReader(out.open())}
    for item in chosen:
        want, got = rows[item], scored[f"test_{item.split(':')[2]}.png"]
        for c in range(8):
            assert float(got[f"prob_{c}"]) == pytest.approx(float(want[f"prob_{c}"]), abs=1e-4), (item, c)
        assert got["pred"] == want["pred"]
    provenance = json.loads(Path(f"{out}.json").read_text())
    assert provenance["tta"] == TTA


# ----------------------------------------------------------------------------------- warnings on small classes


def test_a_class_with_fewer_than_10_samples_is_warned_about() -> None:
    rng = np.random.default_rng(4)
    classes = ["lymphocyte", "neutrophil", "platelet"]

    def split(counts: list[int]) -> SplitOutputs:
        y = np.repeat(np.arange(3), counts)
        logits = np.eye(3)[y] * 2 + rng.normal(size=(len(y), 3))
        return SplitOutputs(logits, y, [f"p{i}" for i in range(len(y))])

    cfg = EvalConfig(bootstrap=0)
    m = clinical_metrics({"val": split([30, 30, 30]), "test": split([30, 30, 4])}, classes, cfg, Decision())
    for level in ("image", "patient"):
        warned = [w for w in m[level]["test"].get("warnings", []) if "fewer than 10" in w]
        assert len(warned) == 1 and "platelet (4)" in warned[0] and "neutrophil" not in warned[0], warned
        assert not [w for w in m[level]["val"].get("warnings", []) if "fewer than 10" in w]


def test_report_shows_small_class_warnings(tiny_runs: tuple[Path, Path]) -> None:
    _, knn = tiny_runs  # 18 test tiles of 3 patients
    metrics = json.loads((knn / "metrics.json").read_text())
    warned = [w for w in metrics["patient"]["test"]["warnings"] if "fewer than 10" in w]
    assert warned and "test split, per patient" in warned[0]
    report = (knn / "report.md").read_text()
    section = report.split("## Warnings", 1)[1]
    assert warned[0] in section
    assert "fewer than 10 patients of class" in section


# --------------------------------------------------------------------------------------- the label benchmark


@dataclass
class Grid:
    first: LabelResult
    second: LabelResult
    out: Path
    stamps: tuple[dict[Path, int], dict[Path, int]]
    """metrics.json modification times of every run, after the first and after the second call."""
    seconds: float
    """Of the second call."""


@pytest.fixture(scope="module")
def label_grid(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Grid:
    """fractions 0.25 and 1 x ImageNet and random init x linear probe and k-NN, one seed, 100 images a split."""
    out = tmp_path_factory.mktemp("labels")
    recipe = recipe_from_dict(_blood(shared, out / "unused", "blood", "finetune", 100))
    args = (recipe, [0.25, 1.0], ["imagenet", "random"], ["linear_probe", "knn"], 1, out)

    def stamps() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")}

    first = label_benchmark(*args, resamples=50)
    before = stamps()
    start = time.perf_counter()
    second = label_benchmark(*args, resamples=50)
    return Grid(first, second, out, (before, stamps()), time.perf_counter() - start)


def test_label_benchmark_writes_the_grid_summary_and_deltas(label_grid: Grid) -> None:
    result, out = label_grid.first, label_grid.out
    for name in ("label_efficiency.csv", "label_efficiency_summary.csv", "label_efficiency_deltas.csv",
                 "label_efficiency.md"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "label_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    assert len(result.rows) == 8 and not [r.error for r in result.rows if r.error]
    assert len(list(csv.DictReader((out / "label_efficiency.csv").open()))) == 8
    summary = list(csv.DictReader((out / "label_efficiency_summary.csv").open()))
    keys = [(r["init"], r["protocol"], float(r["fraction"])) for r in summary]
    assert sorted(keys) == sorted((i, p, f) for i in ("imagenet", "random") for p in ("linear_probe", "knn")
                                  for f in (0.25, 1.0))  # fmt: skip
    for init in ("imagenet", "random"):
        for protocol in ("linear_probe", "knn"):
            labels = {float(r["fraction"]): float(r["labels"]) for r in summary
                      if (r["init"], r["protocol"]) == (init, protocol)}  # fmt: skip
            assert 8 <= labels[0.25] < labels[1.0] == 100, labels
    for r in result.rows:  # the run itself trained on the images the table counts
        meta = json.loads((Path(r.run_dir) / "run.json").read_text())
        assert meta["train_fraction"] == r.fraction and meta["split_sizes"]["train"] == r.labels
        assert meta["protocol"] == r.protocol and meta["split_sizes"]["test"] == 100
        protocol_info = json.loads((Path(r.run_dir) / "metrics.json").read_text())["protocol"]
        assert protocol_info["train_images"] == r.labels  # the head was fitted on the subset only
        assert 0.5 < r.auc <= 1 and r.auc_lo <= r.auc_hi
    imagenet_knn = {r.fraction: r.auc for r in result.rows if (r.init, r.protocol) == ("imagenet", "knn")}
    assert imagenet_knn[1.0] > 0.8, imagenet_knn
    deltas = list(csv.DictReader((out / "label_efficiency_deltas.csv").open()))
    assert len(deltas) == 4 == len(result.deltas)
    # the deltas are defined on predictions.csv; recompute each run's AUC from that file
    from medvision.metrics import compute_auc
    from medvision.tasks.benchmark.deltas import _test_probs

    auc = {(r.init, r.protocol, r.fraction): compute_auc(*_test_probs(r.run_dir)[1:]) for r in result.rows}
    for d in result.deltas:
        assert (d["init"], d["reference"], d["seeds"]) == ("random", "imagenet", 1)
        diff = auc[("random", d["protocol"], d["fraction"])] - auc[("imagenet", d["protocol"], d["fraction"])]
        assert d["delta_auc"] == pytest.approx(diff, abs=1e-6)
        assert d["delta_lo"] <= d["delta_auc"] <= d["delta_hi"]
    md = (out / "label_efficiency.md").read_text()
    assert "| imagenet | knn | 0.25 |" in md and "| random | imagenet | linear_probe | 1 |" in md


def test_label_benchmark_reuses_finished_runs(label_grid: Grid) -> None:
    before, after = label_grid.stamps
    assert len(before) == 8 and before == after  # no run was trained again
    first, second = label_grid.first, label_grid.second
    assert [(r.init, r.protocol, r.fraction, r.labels, r.auc, r.acc) for r in second.rows] == [
        (r.init, r.protocol, r.fraction, r.labels, r.auc, r.acc) for r in first.rows
    ]
    assert second.deltas == first.deltas and second.markdown == first.markdown


def test_label_benchmark_arguments_are_checked(tmp_path: Path) -> None:
    assert parse_fractions("1.0, 0.1,0.1") == [0.1, 1.0]
    for bad in ("0,0.5", "1.5", "a,b", ""):
        with pytest.raises(BenchmarkError, match="--fractions"):
            parse_fractions(bad)
    assert parse_protocols("knn,finetune") == ["knn", "finetune"]
    for bad in ("knn,svm", " "):
        with pytest.raises(BenchmarkError, match="--protocols"):
            parse_protocols(bad)
    assert parse_inits(f"imagenet,random,{tmp_path}") == ["imagenet", "random", str(tmp_path)]
    for bad in ("", f"imagenet,{tmp_path / 'missing'}"):
        with pytest.raises(BenchmarkError, match="--inits"):
            parse_inits(bad)


def test_label_benchmark_seeds_are_a_count_or_a_list(tiles_manifest: Path, tmp_path: Path) -> None:
    """``--seeds 3`` is a count (from the recipe's seed), ``--seeds 0,1,2`` the seeds, as ``benchmark medmnist``."""
    assert parse_seed_count("3") == 3 and parse_seed_count(" 2 ") == 2
    assert parse_seed_count("0,1,2") == [0, 1, 2] and parse_seed_count("5,") == [5]
    for bad in ("0", "-1", "a", "", "1,1", "a,b"):
        with pytest.raises(BenchmarkError, match="--seeds"):
            parse_seed_count(bad)
    tree = tiny_recipe(tiles_manifest, tmp_path / "unused")
    tree["seed"] = 4
    recipe = recipe_from_dict(tree)
    assert seeds_of(recipe, 2) == [4, 5] and seeds_of(recipe, [7, 1]) == [7, 1]
    with pytest.raises(BenchmarkError, match="--seeds must be >= 1"):
        seeds_of(recipe, 0)
    result = label_benchmark(recipe, [1.0], ["random"], ["knn"], [7, 1], tmp_path / "grid", resamples=0)
    assert [(r.seed, Path(r.run_dir).name) for r in result.rows] == [(7, "random-knn-f1-s7"), (1, "random-knn-f1-s1")]
    assert not [r.error for r in result.rows if r.error] and result.summary[0]["seeds"] == 2


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # MLflow's store
def test_a_reused_run_keeps_its_tracking_json(tiles_manifest: Path, tmp_path: Path) -> None:
    """A reused run is logged to the benchmark's MLflow run as a child again, but its folder's tracking.json still
    names the MLflow run that trained it (what ``train --resume`` reopens); a folder without one stays without."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from medvision.tracking import RECORD, default_uri

    tree = tiny_recipe(tiles_manifest, tmp_path / "base")
    tree["tracking"] = {"mlflow": True, "log_model": False}
    args = (recipe_from_dict(tree), [0.5, 1.0], ["random"], ["knn"], 1, tmp_path / "grid")
    first = label_benchmark(*args, resamples=0)
    kept, untracked = (Path(r.run_dir) / RECORD for r in sorted(first.rows, key=lambda r: -r.fraction))
    before = kept.read_bytes()
    untracked.unlink()
    label_benchmark(*args, resamples=0)
    assert kept.read_bytes() == before and not untracked.exists()
    client = MlflowClient(tracking_uri=default_uri(tmp_path / "base"))
    experiment = client.get_experiment_by_name("medvision").experiment_id
    parents = client.search_runs([experiment], "tags.`medvision.kind` = 'benchmark-labels'", order_by=["start_time"])
    assert len(parents) == 2
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parents[1].info.run_id}'")
    assert len(children) == 2  # the reused runs are logged all the same
    trained = client.get_run(json.loads(before)["run_id"])
    assert trained.data.tags["mlflow.parentRunId"] == parents[0].info.run_id


def test_configure_stretches_finetune_epochs_on_small_subsets(tiles_manifest: Path, tmp_path: Path) -> None:
    phases = [{"name": "head", "epochs": 1, "trainable": "head", "lr": 1e-2},
              {"name": "full", "epochs": 2, "trainable": "all", "lr": 1e-3}]  # fmt: skip
    tree = tiny_recipe(tiles_manifest, tmp_path, phases=phases)
    tree["model"]["pretrained"] = "/weights/own.safetensors"
    base = recipe_from_dict(tree)  # batch size 16
    small = _configure(base, "random", "finetune", 0.1, 3, tmp_path, min_steps=30, train_size=20)
    # 3 epochs of ceil(20 / 16) = 2 steps are 6 steps; x5 reaches 30
    assert [p.epochs for p in small.train.phases] == [5, 10]
    assert (small.name, small.seed, small.data.train_fraction, small.train.protocol) == ("random-finetune-f0.1-s3", 3,
                                                                                          0.1, "finetune")  # fmt: skip
    assert small.output_dir == str(tmp_path / "runs") and small.model.pretrained is False
    assert small.evaluation.explain == 0
    assert [p.epochs for p in base.train.phases] == [1, 2]  # the base recipe is not touched
    large = _configure(base, "imagenet", "finetune", 1.0, 0, tmp_path, min_steps=30, train_size=1000)
    assert [p.epochs for p in large.train.phases] == [1, 2] and large.model.pretrained == "/weights/own.safetensors"
    probe = _configure(base, "imagenet", "linear_probe", 0.1, 0, tmp_path, min_steps=30, train_size=20)
    assert [p.epochs for p in probe.train.phases] == [1, 2] and probe.train.protocol == "linear_probe"


# ------------------------------------------------------------------------------------------ unlabelled sources


def test_unlabelled_flat_folder_and_path_only_csv(tmp_path: Path) -> None:
    folder = tmp_path / "flat"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        assert cv2.imwrite(str(folder / f"img{i}.png"), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    manifest = tmp_path / "paths.csv"
    manifest.write_text("path\n" + "".join(f"flat/img{i}.png\n" for i in range(10)))
    for source, path in (("folder", folder), ("csv", manifest)):
        cfg = DataConfig(source=source, path=str(path), image_size=32)
        table = load_table(cfg, seed=0, labelled=False)
        assert table.classes == ["unlabelled"] and len(table) == 10, source
        assert (table.labels == 0).all() and set(table.splits) <= {"train", "val", "test"}
        assert sorted(table.ids) == sorted(f"{'flat/' if source == 'csv' else ''}img{i}.png" for i in range(10))
        assert table.loader(0).shape == (16, 16, 3)
        with pytest.raises(DataSourceError):
            load_table(cfg, seed=0)  # labelled=True: a folder needs class folders, a CSV a label column


def test_a_later_grid_in_the_same_folder_adds_to_the_tables(label_grid: Grid, shared: Path) -> None:
    """More seeds or fractions later: the folder's tables cover every run its label_efficiency.csv holds."""
    recipe = recipe_from_dict(_blood(shared, label_grid.out / "unused", "blood", "finetune", 100))
    more = label_benchmark(recipe, [0.5], ["imagenet"], ["knn"], 1, label_grid.out, resamples=20)
    keys = {(e["init"], e["protocol"], e["fraction"]) for e in more.summary}
    assert ("imagenet", "knn", 0.5) in keys and ("random", "linear_probe", 0.25) in keys and len(keys) == 9
    assert len(list(csv.DictReader((label_grid.out / "label_efficiency.csv").open()))) == 9
    assert "| imagenet | knn | 0.5 |" in more.markdown


def test_a_changed_recipe_is_trained_again_and_two_inits_of_one_name_are_refused(
    shared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run is reused only when it was trained from exactly this recipe: another image size trains it again, and
    the earlier grid's other points (another model) leave the tables instead of joining its curve."""
    tree = _blood(shared, tmp_path / "unused", "blood", "finetune", 40)
    label_benchmark(recipe_from_dict(tree), [0.5, 1.0], ["imagenet"], ["knn"], 1, tmp_path, resamples=0)
    run = tmp_path / "runs" / "imagenet-knn-f1-s0"
    first = (run / "metrics.json").stat().st_mtime_ns
    tree["data"]["image_size"] = 48
    with caplog.at_level("INFO", logger="medvision"):
        again = label_benchmark(recipe_from_dict(tree), [1.0], ["imagenet"], ["knn"], 1, tmp_path, resamples=0)
    assert (run / "metrics.json").stat().st_mtime_ns != first
    assert load_recipe(run / "recipe.yaml").data.image_size == 48
    assert "its recipe.yaml differs from the recipe this benchmark runs now" in caplog.text
    assert [(r.fraction, r.run_dir) for r in again.rows] == [(1.0, str(run))]  # the 32 px f0.5 run is left out
    assert [e["fraction"] for e in again.summary] == [1.0] and "| 0.5 |" not in again.markdown
    assert len(list(csv.DictReader((tmp_path / "label_efficiency.csv").open()))) == 1
    assert "1 earlier row(s) of label_efficiency.csv left out" in caplog.text and "imagenet-knn-f0.5-s0" in caplog.text
    assert (tmp_path / "runs" / "imagenet-knn-f0.5-s0" / "metrics.json").is_file()  # the run itself stays
    for name in ("a", "b"):
        (tmp_path / name / "simclr").mkdir(parents=True)
    with pytest.raises(BenchmarkError, match="have the same folder name 'simclr'"):
        label_benchmark(recipe_from_dict(tree), [1.0], [str(tmp_path / "a" / "simclr"), str(tmp_path / "b" / "simclr")],
                        ["knn"], 1, tmp_path / "two", resamples=0)  # fmt: skip


def _predictions(run: Path, ids: list[str], labels: list[int], p1: np.ndarray) -> str:
    run.mkdir(parents=True)
    rows = ["split,id,label,pred,prob_a,prob_b"] + [f"test,{i},{'ab'[y]},{'ab'[int(p > 0.5)]},{1 - p},{p}"
                                                    for i, y, p in zip(ids, labels, p1, strict=True)]  # fmt: skip
    (run / "predictions.csv").write_text("\n".join(rows) + "\n")
    return str(run)


def test_paired_deltas_score_each_seed_on_its_own_test_images(tmp_path: Path) -> None:
    """Seeds split a CSV differently: each seed's pair is scored against its own labels, never the last seed's."""
    from medvision.metrics import compute_auc
    from medvision.tasks.benchmark.deltas import paired_bootstrap

    rng = np.random.default_rng(0)
    pairs, expected = [], []
    for seed in range(2):
        ids = [f"s{seed}_{i}" for i in range(40)]
        y = rng.integers(0, 2, 40)
        a, b = np.clip(0.5 + (y - 0.5) * rng.random(40), 0, 1), np.clip(0.5 + (y - 0.5) * rng.random(40) * 2, 0, 1)
        pairs.append((_predictions(tmp_path / f"a{seed}", ids, y.tolist(), a),
                      _predictions(tmp_path / f"b{seed}", ids, y.tolist(), b)))  # fmt: skip
        two = lambda p: np.stack([1 - p, p], axis=1)  # noqa: E731
        expected.append(compute_auc(y, two(b)) - compute_auc(y, two(a)))
    delta = paired_bootstrap(pairs, {"auc": compute_auc}, 200, 0)["auc"]
    value, lo, hi = delta.value, delta.lo, delta.hi
    assert value == pytest.approx(float(np.mean(expected)), abs=1e-6) and lo <= value <= hi
    assert delta.unit == "images"  # no run folder tells of patients
    _predictions(tmp_path / "c", [f"s0_{i}" for i in range(40)], [0] * 40, np.full(40, 0.5))
    with pytest.raises(BenchmarkError, match="tested on different images"):
        paired_bootstrap([(pairs[1][0], str(tmp_path / "c"))], {"auc": compute_auc}, 0, 0)


def test_paired_delta_resamples_whole_patients_as_the_runs_own_cis_do(tiny_runs: tuple[Path, Path]) -> None:
    """Six test tiles a patient: the delta's bootstrap draws patients (from the run's own table: predictions.csv
    holds no patient ids), so its CI is not narrower than the patient-level CIs of the runs it compares."""
    from medvision.intervals import bootstrap_indices
    from medvision.metrics import compute_auc
    from medvision.tasks.benchmark.deltas import _test_probs, paired_bootstrap

    finetune, knn = (str(r) for r in tiny_runs)
    d = paired_bootstrap([(finetune, knn)], {"auc": compute_auc}, 200, 0)["auc"]
    assert d.unit == "patients"
    recipe = load_recipe(Path(finetune) / "recipe.yaml")
    table = load_table(recipe.data, recipe.seed)
    ids, y, pa = _test_probs(finetune)
    pb = _test_probs(knn)[2]
    patient = dict(zip(table.ids, table.groups, strict=True))
    groups = [patient[i] for i in ids]
    assert len(set(groups)) < len(ids)  # several tiles a patient in the test split
    spread = np.array([compute_auc(y[i], pb[i]) - compute_auc(y[i], pa[i])
                       for i in bootstrap_indices(y, 200, 0, groups=groups)])  # fmt: skip
    spread = spread[np.isfinite(spread)]
    assert (d.lo, d.hi) == pytest.approx(tuple(np.quantile(spread, [0.025, 0.975])), abs=1e-12)
    assert d.value == pytest.approx(compute_auc(y, pb) - compute_auc(y, pa), abs=1e-12)
    assert "patient" not in (Path(finetune) / "predictions.csv").read_text().splitlines()[0]


def test_heads_take_the_width_timm_pools_to_where_a_pre_logits_layer_widens_it() -> None:
    """MobileNetV3's classifier sees 1024 features (timm's ``head_hidden_size``), not ``num_features`` (288): the
    k-NN bank and SimCLR's projector are built on what the backbone really hands on."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=3).eval()
    images = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
    assert pooled.shape[1] == feature_width(model) == 1024 != model.num_features
    attach_knn_head(model, 6, 3, k=3, temperature=0.1)
    with torch.no_grad():
        assert model(images).shape == (4, 3)  # the bank's width fits the pooled features
    simclr = SimCLR(timm.create_model("mobilenetv3_small_050", num_classes=0), hidden=32, out=16).eval()
    with torch.no_grad():
        assert simclr(images).shape == (4, 16)

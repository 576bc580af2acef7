"""Class imbalance: ``train.balance: none | sampler | loss`` and focal loss (``train.focal_gamma``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medvision.recipe import RecipeError, recipe_from_dict
from medvision.runtime import EpochSampler
from medvision.training.loop import class_weights, classification_loss


def test_class_weights_equalise_the_classes_and_keep_the_loss_scale() -> None:
    labels = np.array([0] * 90 + [1] * 10 + [3] * 20)
    w = class_weights(labels, 4).numpy()
    assert w[2] == 0.0  # absent from training: nothing to weigh
    per_class_total = [w[c] * (labels == c).sum() for c in (0, 1, 3)]
    assert np.allclose(per_class_total, per_class_total[0])
    assert np.isclose(w[labels].mean(), 1.0)


def test_focal_loss_is_cross_entropy_scaled_by_one_minus_p_true() -> None:
    cfg = recipe_from_dict(_recipe(Path("unused"), "none")).train
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3], [-3.0, 4.0, 0.0]])
    labels = torch.tensor([0, 2, 0])
    identity = nn.Identity()
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(classification_loss(cfg)(identity, logits, labels), ce)
    cfg = cfg.model_copy(update={"focal_gamma": 2.0})
    p_true = torch.softmax(logits, 1)[torch.arange(3), labels]
    assert torch.allclose(classification_loss(cfg)(identity, logits, labels), (1 - p_true) ** 2 * ce)
    weights = torch.tensor([0.5, 1.0, 3.0])
    weighted = classification_loss(cfg, weights)(identity, logits, labels)
    assert torch.allclose(weighted, (1 - p_true) ** 2 * ce * weights[labels])
    # the hard sample (wrong by a margin) weighs more, relative to the easy ones, than in plain cross-entropy
    focal = (1 - p_true) ** 2 * ce
    assert focal[2] / focal.sum() > ce[2] / ce.sum()


def test_balanced_sampler_is_deterministic_resumable_and_balanced() -> None:
    labels = np.array([0] * 950 + [1] * 50)
    weights = class_weights(labels, 2).numpy()[labels]
    a = EpochSampler(len(labels), seed=3, batch_size=32, weights=weights)
    b = EpochSampler(len(labels), seed=3, batch_size=32, weights=weights)
    a.set_epoch(4)
    b.set_epoch(4)  # a resumed run builds a new sampler and sets the epoch it stopped at
    first = list(a)
    assert first == list(b) and len(first) == len(labels)
    a.set_epoch(5)
    assert list(a) != first
    drawn = labels[[i for i, _ in first]]
    assert 0.4 < drawn.mean() < 0.6  # the 5% class is drawn about half the time
    with pytest.raises(ValueError, match="weights for"):
        EpochSampler(10, 0, weights=np.ones(9))


def test_two_ranks_split_the_balanced_draws_of_one_process() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    weights = class_weights(labels, 2).numpy()[labels]
    one = EpochSampler(100, 1, 16, weights=weights)
    ranks = [EpochSampler(100, 1, 16, r, 2, weights=weights) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(2)
    assert sorted(list(ranks[0]) + list(ranks[1])) == sorted(one)


def test_recipe_rules_for_balance() -> None:
    tree = _recipe(Path("x.npz"), "sampler")
    tree["data"]["tiles_per_slide"] = 4
    with pytest.raises(RecipeError, match="tiles_per_slide"):
        recipe_from_dict(tree)
    tree = _recipe(Path("x.npz"), "none")
    tree["train"].update(protocol="linear_probe", focal_gamma=2.0)
    with pytest.raises(RecipeError, match="focal_gamma"):
        recipe_from_dict(tree)


def _recipe(npz: Path, balance: str, out: Path | None = None, weights: Path | None = None) -> dict:
    return {
        "name": f"balance-{balance}",
        "output_dir": str(out or "runs"),
        "data": {"source": "npz", "path": str(npz), "image_size": 32, "batch_size": 32},
        "model": {"name": "tf_efficientnet_lite0", "pretrained": str(weights) if weights else False},
        "train": {"amp": "none", "balance": balance,
                  "phases": [{"epochs": 3, "trainable": "head", "lr": 1e-2, "bn": "frozen"}]},
        "evaluation": {"bootstrap": 0, "explain": 0},
    }  # fmt: skip


def test_balancing_a_1_to_20_training_set_raises_balanced_accuracy(shared: Path, tmp_path: Path) -> None:
    """BloodMNIST eosinophils against neutrophils, 200:10 in training, balanced in validation and test."""
    from medvision.tasks.train import train

    data = np.load(shared / "data" / "bloodmnist.npz")
    rng = np.random.default_rng(0)
    arrays = {}
    for split, (n_major, n_minor) in {"train": (200, 10), "val": (50, 50), "test": (60, 60)}.items():
        x, y = data[f"{split}_images"], data[f"{split}_labels"].ravel()
        idx = np.concatenate([rng.choice(np.flatnonzero(y == 1), n_major, replace=False),
                              rng.choice(np.flatnonzero(y == 6), n_minor, replace=False)])  # fmt: skip
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x[idx], (y[idx] == 6).astype(np.int64)
    npz = tmp_path / "imbalanced.npz"
    np.savez(npz, **arrays)
    weights = shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    balanced_acc = {}
    for balance in ("none", "sampler", "loss"):
        run = train(recipe_from_dict(_recipe(npz, balance, tmp_path / "runs", weights)))
        metrics = json.loads((run / "metrics.json").read_text())
        balanced_acc[balance] = metrics["image"]["test"]["balanced_acc"]
    assert balanced_acc["sampler"] > balanced_acc["none"] + 0.1, balanced_acc
    assert balanced_acc["loss"] > balanced_acc["none"] + 0.05, balanced_acc
    log = (tmp_path / "runs" / "balance-loss" / "train.log").read_text()
    assert "class weights" in log

"""Heads on frozen features: timm's pre-logits embeddings, a fitted linear probe, and a k-NN classifier.

The ``linear_probe`` and ``knn`` protocols (the frozen-feature protocols of MedMNIST+, Doerrich et
al. 2024) embed every image once with the frozen backbone and fit only a head on those cached
features. Either head is put back into the timm model as its classifier, so the result is an
ordinary model whose ``forward`` gives logits: ``evaluate``, ``score``, ``explain`` and ``export``
use it like a fine-tuned one.

- The linear probe is scikit-learn's multinomial logistic regression on standardised features, its
  regularisation chosen on validation; the standardisation is folded into the ``nn.Linear``.
- The k-NN head (Wu et al. 2018, as in DINO's evaluation) holds the L2-normalised training
  features; the ``k`` most cosine-similar vote with weight ``exp(sim / T)``. Its logits are the log
  of the vote shares, so temperature scaling and the metrics apply unchanged.
"""

from __future__ import annotations

import logging
import math
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from medvision.runtime import Inputs, autocast, to_device

log = logging.getLogger("medvision")
LOG_FLOOR = 1e-6
"""Vote shares are floored here before the log, so a class no neighbour voted for has a finite logit."""


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: DataLoader[Any], device: torch.device, amp: str, inputs: Inputs | None
) -> np.ndarray:  # fmt: skip
    """(N, F) float32 pre-logits features of every image in the loader (timm's ``forward_head(pre_logits=True)``)."""
    model.eval()
    parts = []
    for images, _ in loader:
        with autocast(device, amp):
            x = to_device(images, device, inputs)
            feats = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
        parts.append(feats.float().flatten(1).cpu().numpy())
    width = parts[0].shape[1] if parts else 0
    return np.concatenate(parts) if parts else np.zeros((0, width), np.float32)


def knn_probs(
    query: np.ndarray, bank: np.ndarray, bank_labels: np.ndarray, num_classes: int, k: int, temperature: float,
    exclude_self: bool = False,
) -> np.ndarray:  # fmt: skip
    """(N, K) class vote shares of each query among its ``k`` most cosine-similar bank rows.

    ``exclude_self`` drops each query's own row (query ``i`` is bank row ``i``): leave-one-out
    accuracy on one labelled set, as the pretraining health check uses.
    """
    q = _unit(query)
    b = _unit(bank)
    k = min(k, len(b) - (1 if exclude_self else 0))
    if k < 1:
        raise ValueError(f"k-NN needs at least one reference image, got a bank of {len(b)}")
    out = np.zeros((len(q), num_classes), np.float64)
    for start in range(0, len(q), 1024):  # (1024, bank) similarity blocks keep memory flat
        sims = q[start : start + 1024] @ b.T
        if exclude_self:
            rows = np.arange(sims.shape[0])
            sims[rows, rows + start] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sims, top, axis=1) / temperature)
        votes = np.zeros((sims.shape[0], num_classes))
        np.add.at(votes, (np.arange(sims.shape[0])[:, None], bank_labels[top]), weights)
        out[start : start + 1024] = votes / votes.sum(axis=1, keepdims=True)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class KNNClassifier(nn.Module):
    """A timm classifier replacement: pre-logits features -> log k-NN vote shares over the stored bank.

    The bank (L2-normalised training features and their labels) is a buffer, so it is saved in
    ``model.safetensors`` and travels into an ONNX export.
    """

    def __init__(self, bank: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int, temperature: float):
        super().__init__()
        self.num_classes, self.k, self.temperature = num_classes, min(k, len(bank)), temperature
        self.log_floor = LOG_FLOOR  # an attribute, not the global: TorchScript cannot read a global float
        self.bank: torch.Tensor
        self.bank_labels: torch.Tensor
        self.register_buffer("bank", F.normalize(bank.float(), dim=1))
        self.register_buffer("bank_labels", labels.long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript wants a constant autocast device; a scripted export runs in fp32
            return self._votes(x)
        with torch.autocast(x.device.type, enabled=False):  # similarities in float32: bf16 would reorder neighbours
            return self._votes(x)

    def _votes(self, x: torch.Tensor) -> torch.Tensor:
        sims = F.normalize(x.float().flatten(1), dim=1) @ self.bank.T
        top, idx = sims.topk(self.k, dim=1)
        weights = torch.exp(top / self.temperature)
        # allocated from a tensor, not with device=x.device: a trace would freeze that device as a constant
        votes = weights.new_zeros((weights.shape[0], self.num_classes))
        votes = votes.scatter_add(1, self.bank_labels[idx], weights)
        return torch.log((votes / votes.sum(dim=1, keepdim=True)).clamp_min(self.log_floor))


def set_classifier(model: nn.Module, head: nn.Module) -> None:
    """Puts ``head`` where timm's classifier is (``classifier``, ``fc``, ``head.fc`` ...), by timm's own name."""
    name = cast(Any, model).pretrained_cfg.get("classifier") or "classifier"
    parent: Any = model
    *path, last = name.split(".")
    for part in path:
        parent = getattr(parent, part)
    if not hasattr(parent, last):
        raise ValueError(f"{type(model).__name__}: no classifier at {name!r} (timm's pretrained_cfg['classifier'])")
    setattr(parent, last, head)


def feature_width(model: nn.Module) -> int:
    """The width of the pooled features a timm model hands its classifier (what ``num_classes=0`` returns): timm's
    ``head_hidden_size`` where a pre-logits layer widens them (MobileNetV3: 288 -> 1024), else ``num_features``."""
    return int(getattr(model, "head_hidden_size", None) or cast(Any, model).num_features)


def attach_knn_head(model: nn.Module, bank_size: int, num_classes: int, k: int, temperature: float) -> None:
    """An empty k-NN head of the right shape, for loading a saved ``knn`` run's weights into."""
    width = feature_width(model)
    set_classifier(model, KNNClassifier(torch.zeros(bank_size, width), torch.zeros(bank_size, dtype=torch.long),
                                        num_classes, k, temperature))  # fmt: skip


def fit_state(model: nn.Module, state: dict[str, torch.Tensor], num_classes: int, k: int, temperature: float) -> None:
    """Shapes ``model`` for a saved state: a ``knn`` run's weights hold a k-NN bank where the classifier was."""
    banks = [key for key in state if key.endswith(".bank") or key == "bank"]
    if banks:
        attach_knn_head(model, int(state[banks[0]].shape[0]), num_classes, k, temperature)


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of timm's classifier (``classifier.weight`` ...): the head a new task replaces."""
    name = cast(Any, model).pretrained_cfg.get("classifier") or "classifier"
    head = cast(Any, model).get_classifier()
    return {f"{name}.{key}" for key in head.state_dict()} if isinstance(head, nn.Module) else set()


def fit_linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, num_classes: int,
    balanced: bool, seed: int, grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0),
) -> tuple[nn.Linear, list[dict[str, Any]]]:  # fmt: skip
    """Logistic regression on standardised features; ``C`` is the one with the lowest validation log-loss.

    Returns the probe as an ``nn.Linear`` on the raw features (standardisation folded in) and one
    history row per ``C`` tried. Classes absent from the training subset keep a bias of -30.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    mean = train_x.mean(axis=0)
    scale = train_x.std(axis=0) + 1e-6
    zt, zv = (train_x - mean) / scale, (val_x - mean) / scale
    history, best = [], None
    for c in grid:
        clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced" if balanced else None, random_state=seed)
        with threadpool_limits(1, user_api="blas"):  # measured: 2 BLAS threads on a busy 2-core CPU, 140x slower
            clf.fit(zt, train_y)
        logits = _full_logits(clf.decision_function(zv), clf.classes_, num_classes)
        loss = _log_loss(logits, val_y)
        acc = float((logits.argmax(1) == val_y).mean()) if len(val_y) else math.nan
        history.append({"C": c, "val_loss": loss, "val_acc": acc})
        log.info("linear probe: C %g  val_loss %.4f  val_acc %.4f", c, loss, acc)
        if best is None or loss < best[0]:
            best = (loss, clf)
    assert best is not None
    clf = best[1]
    coef = np.zeros((num_classes, train_x.shape[1]))
    bias = np.full(num_classes, -30.0)
    w, b = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:  # scikit-learn keeps one row for two classes: logit(class 1) - logit(class 0)
        w, b = np.stack([-w[0] / 2, w[0] / 2]), np.array([-b[0] / 2, b[0] / 2])
    coef[clf.classes_], bias[clf.classes_] = w, b
    linear = nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(coef / scale))
        linear.bias.copy_(torch.from_numpy(bias - (coef * mean / scale).sum(axis=1)))
    return linear, history


def _full_logits(scores: np.ndarray, seen: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(scores), k), -30.0)
    if scores.ndim == 1:
        scores = np.stack([-scores / 2, scores / 2], axis=1)
    out[:, seen] = scores
    return out


def _log_loss(logits: np.ndarray, y: np.ndarray) -> float:
    if len(y) == 0:
        return math.nan
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())

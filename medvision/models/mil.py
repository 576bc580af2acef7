"""Slide-level prediction from frozen tile features: gated attention MIL (ABMIL).

A slide is a bag of tiles and only the slide carries a label; in a positive slide a handful of
tumour tiles may sit among hundreds of normal ones. Averaging tile features (mean pooling) dilutes
those few tiles by the bag size, so the slide signal fades as slides grow. Attention-based MIL
(Ilse, Tomczak & Welling, ICML 2018, "Attention-based Deep Multiple Instance Learning") learns a
weight per tile instead, pools with those weights, and classifies the pooled vector; the weights
double as a heat map of where the model looked.

The head here is the paper's gated variant over features that a tile backbone has already
computed (one ``(n_tiles, in_features)`` array per slide): a per-tile embedding
``h = ReLU(W x)``, attention ``a = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))``, slide vector
``z = sum_k a_k h_k`` and logits ``C z``. Training follows the paper: Adam, one bag per step,
early stopping on validation loss. Features are standardised with the training set's per-feature
mean and std, stored as buffers inside the model, so a saved model carries its own normalisation.

Examples:
    >>> cfg = MILConfig(epochs=40, seed=0)
    >>> model, history = fit_abmil(train_bags, train_labels, val_bags, val_labels, num_classes=2, cfg=cfg)
    >>> logits, attention = predict_abmil(model, test_bags)
    >>> save_abmil(model, Path("runs/abmil.safetensors"), meta={"backbone": "resnet50"})
    >>> model, meta = load_abmil(Path("runs/abmil.safetensors"))
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from medvision.io.files import atomic_write

FORMAT = "medvision.abmil"
"""Value of the ``format`` metadata key, so :func:`load_abmil` can tell an ABMIL file from other weights."""

_STD_FLOOR = 1e-6
"""Smallest per-feature std used for standardisation: a constant feature is centred, not divided by zero."""


class ABMIL(nn.Module):
    """Gated (or plain) attention pooling over one bag of tile features, then a linear classifier.

    Args:
        in_features: Width of each tile feature vector.
        num_classes: Number of slide classes (two or more; the loss is softmax cross-entropy).
        hidden: Width of the per-tile embedding ``h`` (the paper's M).
        attention: Width of the attention branch (the paper's L).
        dropout: Dropout on the tile embedding and the attention branch, for regularisation on few slides.
        gated: Multiply ``tanh(V h)`` by ``sigmoid(U h)`` (the paper's gated attention); False gives the
            plain ``tanh`` attention, whose near-linear response limits which tiles it can single out.
    """

    feat_mean: Tensor
    feat_std: Tensor

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 128,
        attention: int = 64,
        dropout: float = 0.25,
        gated: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("hidden", hidden), ("attention", attention)):
            if value < 1:
                raise ValueError(f"ABMIL {name}={value}: expected a positive width")
        if num_classes < 2:
            raise ValueError(f"ABMIL num_classes={num_classes}: expected 2 or more (binary is 2 logits)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ABMIL dropout={dropout}: expected a probability in [0, 1)")
        self.in_features = in_features
        self.num_classes = num_classes
        self.hidden = hidden
        self.attention = attention
        self.dropout = dropout
        self.gated = gated
        # Identity until fit_abmil sets them from the training bags; saved with the weights.
        self.register_buffer("feat_mean", torch.zeros(in_features))
        self.register_buffer("feat_std", torch.ones(in_features))
        self.embed = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Sequential(nn.Linear(hidden, attention), nn.Tanh(), nn.Dropout(dropout))
        self.attn_u = nn.Sequential(nn.Linear(hidden, attention), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        self.attn_w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, num_classes)

    def arch(self) -> dict[str, Any]:
        """The constructor arguments, as saved by :func:`save_abmil` to rebuild the model."""
        return {
            "in_features": self.in_features,
            "num_classes": self.num_classes,
            "hidden": self.hidden,
            "attention": self.attention,
            "dropout": self.dropout,
            "gated": self.gated,
        }

    def forward(self, bag: Tensor) -> tuple[Tensor, Tensor]:
        """Logits ``(num_classes,)`` and attention weights ``(n_tiles,)`` (non-negative, summing to 1)."""
        if bag.ndim != 2 or bag.shape[1] != self.in_features or bag.shape[0] == 0:
            raise ValueError(f"ABMIL bag of shape {tuple(bag.shape)}: expected (n_tiles >= 1, {self.in_features})")
        h = self.embed((bag - self.feat_mean) / self.feat_std)
        gate = self.attn_v(h)
        if self.attn_u is not None:
            gate = gate * self.attn_u(h)
        weights = torch.softmax(self.attn_w(gate).squeeze(-1), dim=0)
        return self.classifier(weights @ h), weights


@dataclass
class MILConfig:
    """How :func:`fit_abmil` trains; the defaults follow the paper's Adam settings and a CLAM-style dropout."""

    epochs: int = 40
    """Most passes over the training bags; early stopping usually ends sooner."""
    lr: float = 5e-4
    """Adam learning rate (the paper's 5e-4)."""
    weight_decay: float = 1e-4
    """Adam L2 weight decay (the paper's 1e-4)."""
    patience: int = 10
    """Epochs without a lower validation loss before training stops; the best epoch's weights are kept."""
    seed: int = 0
    """Seeds weight init, dropout, bag order and tile subsampling: same seed and data, same model."""
    hidden: int = 128
    """Width of the per-tile embedding."""
    attention: int = 64
    """Width of the attention branch."""
    dropout: float = 0.25
    """Dropout on the embedding and attention branch."""
    gated: bool = True
    """Gated attention (the paper's better variant) rather than plain tanh attention."""
    threads: int = 1
    """Torch intra-op threads while training. One, because a bag's matrices are too small to split: two
    threads ran a step 10x slower on a busy 2-core machine, and one thread also makes the result
    independent of the machine's core count."""
    max_tiles_train: int | None = 512
    """Random tiles kept per bag per training step (fresh each epoch), for speed and as augmentation; None
    keeps all. Validation and prediction always see every tile."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"MILConfig.epochs={self.epochs}: expected at least 1")
        if not self.lr > 0:
            raise ValueError(f"MILConfig.lr={self.lr}: expected a positive learning rate")
        if self.weight_decay < 0:
            raise ValueError(f"MILConfig.weight_decay={self.weight_decay}: expected >= 0")
        if self.patience < 1:
            raise ValueError(f"MILConfig.patience={self.patience}: expected at least 1")
        if self.threads < 1:
            raise ValueError(f"MILConfig.threads={self.threads}: expected at least 1")
        if self.max_tiles_train is not None and self.max_tiles_train < 1:
            raise ValueError(f"MILConfig.max_tiles_train={self.max_tiles_train}: expected at least 1, or None")


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Runs the block with ``n`` torch intra-op threads and restores the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_bags(bags: Sequence[np.ndarray], name: str, width: int | None) -> int | None:
    """Checks every bag is a non-empty finite 2-D array of one width; returns that width (None if no bags)."""
    for i, bag in enumerate(bags):
        arr = np.asarray(bag)
        if arr.ndim != 2:
            raise ValueError(f"{name}[{i}] has shape {arr.shape}: expected (n_tiles, n_features)")
        if arr.shape[0] == 0:
            raise ValueError(f"{name}[{i}] is an empty bag: expected at least one tile")
        if width is None:
            width = arr.shape[1]
        elif arr.shape[1] != width:
            raise ValueError(f"{name}[{i}] has {arr.shape[1]} features per tile: expected {width}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}[{i}] holds NaN or inf features: expected finite values")
    return width


def _check_labels(labels: np.ndarray, n_bags: int, num_classes: int, name: str) -> np.ndarray:
    """Returns the labels as int64 after checking there is one integer in [0, num_classes) per bag."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n_bags:
        raise ValueError(f"{name} has shape {arr.shape}: expected ({n_bags},), one label per bag")
    if arr.size and not np.issubdtype(arr.dtype, np.integer) and not np.all(np.mod(arr, 1) == 0):
        raise ValueError(f"{name} holds non-integer values {arr[np.mod(arr, 1) != 0][:3]}: expected class indices")
    out = arr.astype(np.int64)
    for i, y in enumerate(out):
        if not 0 <= y < num_classes:
            raise ValueError(f"{name}[{i}]={y}: expected a class index in [0, {num_classes})")
    return out


def _bag_loss(model: ABMIL, bag: Tensor, label: int, class_weight: Tensor) -> Tensor:
    """Class-weighted cross-entropy of one bag.

    The weight multiplies the loss explicitly: ``F.cross_entropy(weight=...)`` with its default mean
    reduction divides by the summed weight, which for a single bag cancels the weight entirely.
    """
    logits, _ = model(bag)
    target = torch.tensor([label])
    return class_weight[label] * F.cross_entropy(logits.unsqueeze(0), target)


def fit_abmil(
    train_bags: list[np.ndarray],
    train_labels: np.ndarray,
    val_bags: list[np.ndarray],
    val_labels: np.ndarray,
    num_classes: int,
    cfg: MILConfig,
) -> tuple[ABMIL, dict[str, Any]]:
    """Trains an ABMIL head on the CPU, one bag per step, and keeps the epoch with the lowest validation loss.

    The loss weights each class by ``n_bags / (num_classes * n_bags_of_class)`` in the training set, so
    a rare positive class counts as much as the common one; the validation loss is the same weighted
    cross-entropy, averaged as ``sum(w_i * loss_i) / sum(w_i)``. With no validation bags, training runs
    all ``cfg.epochs`` and keeps the last epoch. The global torch RNG is seeded inside and restored on
    return, and torch runs on ``cfg.threads`` threads (restored too), so the caller's state is untouched
    and the result depends only on the data and ``cfg``.

    Args:
        train_bags: One ``(n_tiles, n_features)`` array per training slide.
        train_labels: One class index per training slide; every class must occur.
        val_bags: Validation slides, same feature width; may be empty.
        val_labels: One class index per validation slide.
        num_classes: Number of slide classes (2 or more).
        cfg: Optimiser, early stopping and architecture settings.

    Returns:
        The model in eval mode and a history dict: ``train_loss`` and ``val_loss`` per epoch (``val_loss``
        empty without validation bags), ``best_epoch`` (0-based index of the kept weights),
        ``epochs_run`` and ``class_weights``.

    Examples:
        >>> model, history = fit_abmil(train_bags, y_train, val_bags, y_val, num_classes=2, cfg=MILConfig())
        >>> history["best_epoch"], history["val_loss"][history["best_epoch"]]
    """
    if len(train_bags) == 0:
        raise ValueError("train_bags is empty: expected at least one training bag")
    width = _check_bags(train_bags, "train_bags", None)
    assert width is not None
    _check_bags(val_bags, "val_bags", width)
    y_train = _check_labels(train_labels, len(train_bags), num_classes, "train_labels")
    y_val = _check_labels(val_labels, len(val_bags), num_classes, "val_labels")
    counts = np.bincount(y_train, minlength=num_classes)
    missing = [c for c in range(num_classes) if counts[c] == 0]
    if missing:
        raise ValueError(f"train_labels has no bag of class {missing}: expected every class in [0, {num_classes})")
    class_weight = torch.tensor(len(y_train) / (num_classes * counts), dtype=torch.float32)

    train_t = [torch.as_tensor(np.asarray(b, dtype=np.float32)) for b in train_bags]
    val_t = [torch.as_tensor(np.asarray(b, dtype=np.float32)) for b in val_bags]
    # Per-tile statistics in float64: slides contribute in proportion to their tile count.
    all_tiles = np.concatenate([np.asarray(b, dtype=np.float64) for b in train_bags], axis=0)
    mean = torch.as_tensor(all_tiles.mean(axis=0), dtype=torch.float32)
    std = torch.as_tensor(np.maximum(all_tiles.std(axis=0), _STD_FLOOR), dtype=torch.float32)

    rng = np.random.default_rng(cfg.seed)
    history: dict[str, Any] = {"train_loss": [], "val_loss": [], "class_weights": class_weight.tolist()}
    with torch.random.fork_rng(devices=[]), _torch_threads(cfg.threads):
        torch.manual_seed(cfg.seed)
        model = ABMIL(width, num_classes, cfg.hidden, cfg.attention, cfg.dropout, cfg.gated)
        model.feat_mean.copy_(mean)
        model.feat_std.copy_(std)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        best_loss, best_epoch, best_state = float("inf"), -1, None
        for epoch in range(cfg.epochs):
            model.train()
            total = 0.0
            for i in rng.permutation(len(train_t)):
                bag = train_t[i]
                if cfg.max_tiles_train is not None and bag.shape[0] > cfg.max_tiles_train:
                    keep = np.sort(rng.choice(bag.shape[0], cfg.max_tiles_train, replace=False))
                    bag = bag[torch.as_tensor(keep)]
                loss = _bag_loss(model, bag, int(y_train[i]), class_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
            history["train_loss"].append(total / len(train_t))
            if not val_t:
                continue
            model.eval()
            with torch.no_grad():
                losses = [_bag_loss(model, b, int(y), class_weight).item() for b, y in zip(val_t, y_val, strict=True)]
            val_loss = sum(losses) / float(class_weight[torch.as_tensor(y_val)].sum())
            history["val_loss"].append(val_loss)
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif epoch - best_epoch >= cfg.patience:
                break
    history["epochs_run"] = len(history["train_loss"])
    if best_state is None:
        history["best_epoch"] = history["epochs_run"] - 1
    else:
        history["best_epoch"] = best_epoch
        model.load_state_dict(best_state)
    return model.eval(), history


def predict_abmil(model: ABMIL, bags: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Slide logits ``(n_bags, num_classes)`` as float64 and each bag's attention weights over all its tiles.

    The model is put in eval mode (no dropout); apply ``softmax`` to the logits for class probabilities.
    """
    _check_bags(bags, "bags", model.in_features)
    model.eval()
    logits = np.zeros((len(bags), model.num_classes), dtype=np.float64)
    attention: list[np.ndarray] = []
    with torch.no_grad():
        for i, bag in enumerate(bags):
            out, weights = model(torch.as_tensor(np.asarray(bag, dtype=np.float32)))
            logits[i] = out.double().numpy()
            attention.append(weights.double().numpy())
    return logits, attention


def save_abmil(model: ABMIL, path: Path, meta: dict[str, Any]) -> None:
    """Writes weights, normalisation buffers and architecture to one safetensors file, atomically.

    The safetensors header holds ``format``, ``arch`` (the constructor arguments as JSON) and ``meta``
    (the caller's dict as JSON: backbone name, feature extractor hash, class names...), so the file
    rebuilds the model without any code or pickle.
    """
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"save_abmil meta for {str(path)!r} is not JSON-serialisable: {exc}") from exc
    metadata = {"format": FORMAT, "arch": json.dumps(model.arch(), sort_keys=True), "meta": meta_json}
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=metadata))


def load_abmil(path: Path) -> tuple[ABMIL, dict[str, Any]]:
    """Rebuilds a model written by :func:`save_abmil`, in eval mode, and returns it with its ``meta`` dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ABMIL file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} has format {metadata.get('format')!r}: expected {FORMAT!r}")
    try:
        arch = json.loads(metadata["arch"])
        meta = json.loads(metadata.get("meta", "{}"))
        model = ABMIL(**arch)
        model.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{str(path)!r} does not hold a consistent ABMIL model: {exc}") from exc
    return model.eval(), meta

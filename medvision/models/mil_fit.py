"""Training, prediction and files of the MIL heads in :mod:`medvision.models.mil`.

Training follows ABMIL's paper for every head: Adam (lr 5e-4, L2 weight decay 1e-4), one whole bag per step,
early stopping on the validation loss (CLAM-SB's: the bag loss alone), the training tiles' per-feature statistics
stored in the head. One recipe trains every head, so that heads compared on the same folds differ in their
architecture alone; the heads' own references train otherwise (CLAM: Adam, lr 2e-4 in its commands, weight
decay 1e-5, up to 200 epochs; TransMIL: RAdam with Lookahead, lr 2e-4, weight decay 1e-5), which
``mil.lr``, ``mil.weight_decay`` and ``mil.epochs`` reproduce where the optimiser allows. A head is saved as one
safetensors file whose header holds its kind, its constructor arguments and the caller's metadata, so it is
rebuilt without code or pickle. With ``MILConfig(task="regression")`` and ``num_classes=1`` a head learns a
continuous slide target instead (see :func:`fit_mil`).

Examples:
    >>> cfg = MILConfig(head="transmil", epochs=40, seed=0)
    >>> model, history = fit_mil(train_bags, train_labels, val_bags, val_labels, num_classes=2, cfg=cfg)
    >>> logits, attention = predict_mil(model, test_bags)
    >>> reg = MILConfig(head="abmil", task="regression")
    >>> model, history = fit_mil(train_bags, train_scores, val_bags, val_scores, num_classes=1, cfg=reg)
    >>> predictions, attention = predict_mil(model, test_bags)  # (n_bags, 1), in the scores' units
    >>> save_mil(model, Path("runs/mil.safetensors"), meta={"encoder": "uni"})
    >>> model, meta = load_mil(Path("runs/mil.safetensors"))
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from medvision.io.files import atomic_write
from medvision.models.mil import MIL_HEADS, MILHead, build_head

FORMAT = "medvision.mil"
"""Value of the ``format`` metadata key, so :func:`load_mil` can tell a MIL head from other weights."""
LEGACY_FORMAT = "medvision.abmil"
"""Files written before the other heads existed: ABMIL, read as such."""

_STD_FLOOR = 1e-6
"""A feature whose std over the training tiles is below this is constant there (a dead ReLU unit, an fp16 value
flushed to zero): it is centred and not divided (its std is taken as 1). Divided by the floor itself, a value of
0.01 on a new slide was 10^4 standard deviations, and every head's probability 0 or 1."""


def feature_scale(std: np.ndarray) -> np.ndarray:
    """The divisor of each feature in standardisation: its std, or 1 where it is constant (:data:`_STD_FLOOR`)."""
    std = np.asarray(std, dtype=np.float64)
    return np.where(std < _STD_FLOOR, 1.0, std)


@dataclass
class MILConfig:
    """How :func:`fit_mil` trains which head; the defaults follow ABMIL's Adam settings and each head's own dropout."""

    head: str = "abmil"
    """``mean`` (mean-pool linear baseline), ``abmil``, ``clam_sb`` or ``transmil``."""
    task: Literal["classification", "regression"] = "classification"
    """``classification`` (class indices, ``num_classes >= 2``, weighted cross-entropy) or ``regression`` (one
    finite float per slide, ``num_classes=1``, squared error of the standardised target; not ``clam_sb``)."""
    epochs: int = 40
    """Most passes over the training bags; early stopping usually ends sooner."""
    lr: float = 5e-4
    """Adam learning rate (the paper's 5e-4)."""
    weight_decay: float = 1e-4
    """Adam L2 weight decay (the paper's 1e-4)."""
    patience: int = 10
    """Epochs without a lower validation loss (regression: validation MSE) before training stops; the best
    epoch's weights are kept."""
    seed: int = 0
    """Seeds weight init, dropout, bag order and tile subsampling: same seed and data, same model."""
    hidden: int = 128
    """Width of the per-tile embedding."""
    attention: int = 64
    """Width of the attention branch."""
    dropout: float | None = None
    """Dropout of the head; None: the head's own default (0.25 for mean, abmil and clam_sb, TransMIL's 0.1)."""
    gated: bool = True
    """Gated attention (the paper's better variant) rather than plain tanh attention (abmil, clam_sb)."""
    heads: int = 8
    """Attention heads of ``transmil`` (the paper's 8); ``hidden`` must divide by it."""
    k: int = 8
    """Tiles from each end of the attention ranking for CLAM-SB's instance loss (its ``k_sample``)."""
    bag_weight: float = 0.7
    """CLAM-SB: weight of the bag loss; the instance loss gets the rest."""
    subtyping: bool | None = None
    """CLAM-SB: CLAM's ``subtyping`` (the other classes' instance classifiers learn the top tiles as negatives);
    None: on with more than two classes."""
    threads: int = 1
    """Torch intra-op threads while training. One, because a bag's matrices are too small to split: two
    threads ran a step 10x slower on a busy 2-core machine, and one thread also makes the result
    independent of the machine's core count."""
    max_tiles_train: int | None = None
    """Random tiles kept per bag per training step (fresh each epoch), for speed; None (the default, as every
    reference trains) keeps all. A cap can drop every tumour tile of a slide whose label rests on a few: on bags
    of 5,000 tiles with 10 planted, a 512-tile sample held none of them 36% of the time, and ABMIL's test AUC fell
    from 1.00 to 0.81-0.83 in two of three seeds. Validation and prediction always see every tile."""

    def __post_init__(self) -> None:
        if self.head not in MIL_HEADS:
            raise ValueError(f"MILConfig.head={self.head!r}: expected one of {', '.join(MIL_HEADS)}")
        if self.task not in ("classification", "regression"):
            raise ValueError(f"MILConfig.task={self.task!r}: expected 'classification' or 'regression'")
        if self.task == "regression" and self.head == "clam_sb":
            raise ValueError("MILConfig head='clam_sb' with task='regression': CLAM-SB's instance loss needs "
                             "classes; use abmil, mean or transmil for a continuous target")  # fmt: skip
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


def _check_targets(targets: np.ndarray, n_bags: int, name: str) -> np.ndarray:
    """Returns regression targets as float64 after checking there is one finite number per bag."""
    arr = np.asarray(targets)
    if arr.ndim != 1 or arr.shape[0] != n_bags:
        raise ValueError(f"{name} has shape {arr.shape}: expected ({n_bags},), one target per bag")
    if arr.size and not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} has dtype {arr.dtype}: expected numbers (a regression target per bag)")
    out = arr.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}]={out[bad[0]]}: expected finite targets ({bad.size} NaN or inf in all)")
    return out


def _check_task(num_classes: int, cfg: MILConfig) -> None:
    if cfg.task == "regression" and num_classes != 1:
        raise ValueError(f"fit_mil num_classes={num_classes} with MILConfig.task='regression': expected 1 (one "
                         "continuous output)")  # fmt: skip
    if cfg.task == "classification" and num_classes < 2:
        raise ValueError(f"fit_mil num_classes={num_classes} with MILConfig.task='classification': expected 2 or "
                         "more (binary is 2 logits; num_classes=1 is for task='regression')")  # fmt: skip


def tile_statistics(bags: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (float64) over every tile of ``bags``, one bag at a time.

    Slides count in proportion to their tile count. Bags are merged with Chan et al.'s pairwise update, so
    memory stays at one bag in float64: a cohort of 1,000 slides of 2,000 x 1,024 tiles is 16 GB in float64,
    which concatenating first would need.
    """
    n, mean, m2 = 0, None, None
    for bag in bags:
        x = np.asarray(bag, dtype=np.float64)
        k, bag_mean = x.shape[0], x.mean(axis=0)
        bag_m2 = np.square(x - bag_mean).sum(axis=0)
        if mean is None or m2 is None:
            n, mean, m2 = k, bag_mean, bag_m2
            continue
        delta = bag_mean - mean
        total = n + k
        mean = mean + delta * (k / total)
        m2 = m2 + bag_m2 + np.square(delta) * (n * k / total)
        n = total
    if mean is None or m2 is None:
        raise ValueError("tile_statistics got no bags: expected at least one")
    return mean, np.sqrt(m2 / n)


def head_arguments(cfg: MILConfig) -> dict[str, Any]:
    """The constructor arguments of ``cfg.head`` taken from ``cfg`` (no ``dropout`` when it is None: the head's own)."""
    common: dict[str, Any] = {} if cfg.dropout is None else {"dropout": cfg.dropout}
    if cfg.head == "mean":
        return common
    if cfg.head == "transmil":
        return {**common, "hidden": cfg.hidden, "heads": cfg.heads}
    attention = {**common, "hidden": cfg.hidden, "attention": cfg.attention, "gated": cfg.gated}
    if cfg.head != "clam_sb":
        return attention
    return {**attention, "k": cfg.k, "bag_weight": cfg.bag_weight,
            **({} if cfg.subtyping is None else {"subtyping": cfg.subtyping})}  # fmt: skip


def fit_mil(
    train_bags: list[np.ndarray],
    train_labels: np.ndarray,
    val_bags: list[np.ndarray],
    val_labels: np.ndarray,
    num_classes: int,
    cfg: MILConfig,
) -> tuple[MILHead, dict[str, Any]]:
    """Trains the head ``cfg.head`` on the CPU, one bag per step, and keeps the epoch with the lowest
    validation loss.

    Classification (``cfg.task``, the default): the loss weights each class by
    ``n_bags / (num_classes * n_bags_of_class)`` in the training set, so a rare positive class counts as
    much as the common one; the validation loss is the same weighted cross-entropy, averaged as
    ``sum(w_i * loss_i) / sum(w_i)`` (for CLAM-SB of the bag loss alone, without its instance loss:
    :meth:`~medvision.models.mil.MILHead.validation_loss`). Regression: the labels are one finite float per
    slide and ``num_classes`` is 1; the head stores the training targets' mean and std (``target_mean``,
    ``target_std``; a std of 0 is taken as 1) and both losses are the mean squared error of the target so
    standardised, i.e. the MSE in the target's units divided by the training targets' variance, so early
    stopping follows the validation MSE. With no validation bags, training runs all ``cfg.epochs`` and
    keeps the last epoch. The global torch RNG is seeded inside and restored on return, and torch runs on
    ``cfg.threads`` threads (restored too), so the caller's state is untouched and the result depends only
    on the data and ``cfg``.

    Args:
        train_bags: One ``(n_tiles, n_features)`` array per training slide.
        train_labels: One class index per training slide, every class occurring; for regression one finite
            target per slide.
        val_bags: Validation slides, same feature width; may be empty.
        val_labels: One class index (regression: target) per validation slide.
        num_classes: Number of slide classes (2 or more), or 1 for regression.
        cfg: Task, optimiser, early stopping and architecture settings.

    Returns:
        The model in eval mode and a history dict: ``train_loss`` and ``val_loss`` per epoch (``val_loss``
        empty without validation bags), ``best_epoch`` (0-based index of the kept weights),
        ``epochs_run``, ``epoch_seconds`` (wall time of each epoch: training and validation, not the set-up),
        ``class_weights`` (None for regression) and, for regression, ``target_mean`` and ``target_std``.

    Examples:
        >>> model, history = fit_mil(train_bags, y_train, val_bags, y_val, num_classes=2, cfg=MILConfig())
        >>> history["best_epoch"], history["val_loss"][history["best_epoch"]]
        >>> reg, _ = fit_mil(train_bags, scores, val_bags, val_scores, 1, MILConfig(task="regression"))
    """
    if len(train_bags) == 0:
        raise ValueError("train_bags is empty: expected at least one training bag")
    _check_task(num_classes, cfg)
    width = _check_bags(train_bags, "train_bags", None)
    assert width is not None
    _check_bags(val_bags, "val_bags", width)
    history: dict[str, Any] = {"train_loss": [], "val_loss": [], "epoch_seconds": []}
    class_weight: torch.Tensor | None = None
    if cfg.task == "regression":
        y_train = _check_targets(train_labels, len(train_bags), "train_labels")
        y_val = _check_targets(val_labels, len(val_bags), "val_labels")
        target_std = float(y_train.std()) or 1.0  # one bag, or a constant target: centre only
        history.update(class_weights=None, target_mean=float(y_train.mean()), target_std=target_std)
    else:
        y_train = _check_labels(train_labels, len(train_bags), num_classes, "train_labels")
        y_val = _check_labels(val_labels, len(val_bags), num_classes, "val_labels")
        counts = np.bincount(y_train, minlength=num_classes)
        missing = [c for c in range(num_classes) if counts[c] == 0]
        if missing:
            raise ValueError(f"train_labels has no bag of class {missing}: expected every class in [0, {num_classes})")
        class_weight = torch.tensor(len(y_train) / (num_classes * counts), dtype=torch.float32)
        history["class_weights"] = class_weight.tolist()
    # Regression: every bag counts 1; classification: its class weight, so the mean is sum(w l) / sum(w).
    val_weight = len(y_val) if class_weight is None else float(class_weight[torch.as_tensor(y_val)].sum())

    train_t = [torch.as_tensor(np.asarray(b, dtype=np.float32)) for b in train_bags]
    val_t = [torch.as_tensor(np.asarray(b, dtype=np.float32)) for b in val_bags]
    # Per-tile statistics in float64: slides contribute in proportion to their tile count.
    mean, std = tile_statistics(train_bags)

    rng = np.random.default_rng(cfg.seed)
    with torch.random.fork_rng(devices=[]), _torch_threads(cfg.threads):
        torch.manual_seed(cfg.seed)
        model = build_head(cfg.head, width, num_classes, **head_arguments(cfg))
        model.feat_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        model.feat_std.copy_(torch.as_tensor(feature_scale(std), dtype=torch.float32))
        if model.regression:
            model.target_mean.fill_(history["target_mean"])
            model.target_std.fill_(history["target_std"])
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        best_loss, best_epoch, best_state = float("inf"), -1, None
        for epoch in range(cfg.epochs):
            started = time.perf_counter()
            model.train()
            total = 0.0
            for i in rng.permutation(len(train_t)):
                bag = train_t[i]
                if cfg.max_tiles_train is not None and bag.shape[0] > cfg.max_tiles_train:
                    keep = np.sort(rng.choice(bag.shape[0], cfg.max_tiles_train, replace=False))
                    bag = bag[torch.as_tensor(keep)]
                loss = model.bag_loss(bag, y_train[i].item(), class_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
            history["train_loss"].append(total / len(train_t))
            if not val_t:
                history["epoch_seconds"].append(time.perf_counter() - started)
                continue
            model.eval()
            with torch.no_grad():
                losses = [model.validation_loss(b, y.item(), class_weight).item()
                          for b, y in zip(val_t, y_val, strict=True)]  # fmt: skip
            val_loss = sum(losses) / val_weight
            history["val_loss"].append(val_loss)
            history["epoch_seconds"].append(time.perf_counter() - started)
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


def kept_epoch(best_epoch: int, validated: bool) -> str:
    """The epoch whose weights a head kept, as logs and reports name it: counted from 1, as fine-tuning counts its
    epochs (``history["best_epoch"]`` and the fold records keep the 0-based index), and called the last, not the
    best, when no validation loss chose it (``validated`` False: every epoch ran and the last was kept)."""
    return f"best epoch {best_epoch + 1}" if validated else f"last epoch {best_epoch + 1} (no validation)"


def predict_mil(model: MILHead, bags: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Slide logits ``(n_bags, num_classes)`` as float64 and each bag's attention weights over all its tiles.

    The model is put in eval mode (no dropout); apply ``softmax`` to the logits for class probabilities.
    A regression head (``num_classes=1``) gives ``(n_bags, 1)`` predictions in the target's own units
    (the head's ``target_mean`` and ``target_std`` undo the standardisation it was trained on).
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


def top_tiles(model: MILHead, bags: list[np.ndarray], attention: list[np.ndarray]) -> list[int]:
    """The index of each bag's top tile, the one that drives its prediction most: the most attended tile
    (``attention`` as :func:`predict_mil` returned it), or for the ``mean`` head, which attends to none, the
    tile whose own logit most favours the predicted class (:meth:`~medvision.models.mil.MILHead.tile_scores`)."""
    model.eval()
    with torch.no_grad():
        scores = [model.tile_scores(torch.as_tensor(np.asarray(b, dtype=np.float32)), torch.as_tensor(a))
                  for b, a in zip(bags, attention, strict=True)]  # fmt: skip
    return [int(torch.argmax(s)) for s in scores]


def save_mil(model: MILHead, path: Path, meta: dict[str, Any]) -> None:
    """Writes weights, normalisation buffers and architecture to one safetensors file, atomically.

    The safetensors header holds ``format``, ``kind``, ``arch`` (the constructor arguments as JSON) and ``meta``
    (the caller's dict as JSON: backbone name, feature extractor hash, class names...), so the file
    rebuilds the model without any code or pickle.
    """
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"save_mil meta for {str(path)!r} is not JSON-serialisable: {exc}") from exc
    metadata = {"format": FORMAT, "kind": model.kind, "arch": json.dumps(model.arch(), sort_keys=True),
                "meta": meta_json}  # fmt: skip
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=metadata))


def load_mil(path: Path, num_classes: int | None = None) -> tuple[MILHead, dict[str, Any]]:
    """Rebuilds a head written by :func:`save_mil`, in eval mode, and returns it with its ``meta`` dict.

    ``num_classes``: what the caller will read from its logits (softmax over that many classes); a head with
    another output (a regression head's single value) is refused rather than turned into probabilities.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no MIL head file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc
    if metadata.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise ValueError(f"{str(path)!r} has format {metadata.get('format')!r}: expected {FORMAT!r}")
    kind = metadata.get("kind", "abmil")
    try:
        arch = json.loads(metadata["arch"])
        meta = json.loads(metadata.get("meta", "{}"))
        model = build_head(kind, **arch)
        model.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{str(path)!r} does not hold a consistent {kind} head: {exc}") from exc
    if num_classes is not None and model.num_classes != num_classes:

        def what(n: int) -> str:
            return "a regression head (one continuous output)" if n == 1 else f"a classifier of {n} classes"

        raise ValueError(f"{str(path)!r} holds {what(model.num_classes)}: expected {what(num_classes)}")
    return model.eval(), meta

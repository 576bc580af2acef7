"""Slide-level prediction from frozen tile features: multiple-instance learning (MIL) heads.

A slide is a bag of tiles and only the slide carries a label; in a positive slide a handful of
tumour tiles may sit among hundreds of normal ones. Every head here takes one bag of tile features
that an encoder has already computed (``(n_tiles, in_features)``) and returns the slide's logits and
a weight per tile (non-negative, summing to 1: where the model looked, drawn as a heat map). Each
standardises the features with the training tiles' per-feature mean and std, kept as buffers, so a
saved head carries its own normalisation. Training, prediction and files: :mod:`medvision.models.mil_fit`.

``num_classes=1`` makes any head but CLAM-SB a regression head for a continuous slide target (a score,
a biomarker level): its one output is the prediction in the target's own units. It learns the target
standardised with the training targets' mean and std, kept as the buffers ``target_mean`` and
``target_std`` (registered only on regression heads, so classification files from before them load
unchanged); the loss is the squared error of that standardised target, without class weights.

- :class:`MeanMIL`: the mean of the tile features, then a linear classifier. The baseline: a few
  positive tiles are diluted by the bag size. It attends to nothing (its weights are uniform), so its
  tiles are ranked by their own logits instead (:meth:`MeanMIL.tile_scores`).
- :class:`ABMIL`: gated attention pooling (Ilse, Tomczak & Welling, ICML 2018): ``h = ReLU(W x)``,
  ``a = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))``, logits ``C sum_k a_k h_k``.
- :class:`CLAMSB`: CLAM single-branch (Lu et al., Nat. Biomed. Eng. 2021): ABMIL's gated attention plus
  one instance classifier per class, trained on the ``k`` most and least attended tiles of the slide's
  own class as pseudo-positives and -negatives; with CLAM's ``subtyping`` (by default on with more than two
  classes; ``mil.subtyping`` sets it) every other class's classifier also learns the ``k`` most attended tiles
  as negatives, and the summed instance loss is divided by the number of classes. The training loss is
  ``0.7 * bag CE + 0.3 * instance CE`` (CLAM's ``bag_weight``, and its cross-entropy instance loss option),
  the whole times the bag's class weight; validation, and so early stopping, uses the bag CE alone, as
  CLAM's ``validate_clam`` does.
- :class:`TransMIL`: Shao et al., NeurIPS 2021: a class token and the projected tiles, padded to a
  square grid, through two transformer layers with the PPEG convolutional position encoding between
  them; the class token classifies. Attention is exact softmax attention
  (``scaled_dot_product_attention``) where the paper approximates it with Nyström attention, so the
  Nyström attention's depthwise convolution residual on the values (``res_conv``, kernel 33, in
  ``nystrom-attention``) is not used either. Dropout follows the reference (``NystromAttention(dropout=0.1)``):
  on each attention layer's output projection, not on the attention probabilities; the dropout after
  the input projection is medvision's own (the reference has none there). The tile weights are the class
  token's attention rollout through both layers (:func:`attention_rollout`; the reference gives none), with
  the weight of the tiles repeated to square the token grid added back to the tiles they repeat.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MILHead(nn.Module):
    """What every MIL head shares: the feature standardisation, the bag check, the loss and ``arch``.

    ``num_classes`` is 2 or more for classification (binary is 2 logits) and 1 for regression.
    """

    kind = ""
    feat_mean: Tensor
    feat_std: Tensor
    target_mean: Tensor
    target_std: Tensor

    def __init__(self, in_features: int, num_classes: int, **arch: Any) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"{type(self).__name__} in_features={in_features}: expected a positive width")
        if num_classes < 1:
            raise ValueError(f"{type(self).__name__} num_classes={num_classes}: expected 2 or more classes (binary "
                             "is 2 logits), or 1 for a regression output")  # fmt: skip
        dropout = arch.get("dropout", 0.0)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{type(self).__name__} dropout={dropout}: expected a probability in [0, 1)")
        self.in_features, self.num_classes, self._arch = in_features, num_classes, arch
        # Identity until training sets them from the training bags; saved with the weights.
        self.register_buffer("feat_mean", torch.zeros(in_features))
        self.register_buffer("feat_std", torch.ones(in_features))
        if num_classes == 1:  # only here, so classification files written before regression load strictly
            self.register_buffer("target_mean", torch.zeros(()))
            self.register_buffer("target_std", torch.ones(()))

    @property
    def regression(self) -> bool:
        """One output, a continuous target in its own units, rather than class logits."""
        return self.num_classes == 1

    def arch(self) -> dict[str, Any]:
        """The constructor arguments, as saved with the weights to rebuild the head."""
        return {"in_features": self.in_features, "num_classes": self.num_classes, **self._arch}

    def standardise(self, bag: Tensor) -> Tensor:
        if bag.ndim != 2 or bag.shape[1] != self.in_features or bag.shape[0] == 0:
            raise ValueError(f"{type(self).__name__} bag of shape {tuple(bag.shape)}: expected (n_tiles >= 1, "
                             f"{self.in_features})")  # fmt: skip
        return (bag - self.feat_mean) / self.feat_std

    def output(self, z: Tensor) -> Tensor:
        """The classifier's raw output as the head returns it: logits, or for regression the standardised
        prediction mapped back to the target's units."""
        return z * self.target_std + self.target_mean if self.regression else z

    def bag_loss(self, bag: Tensor, target: float, class_weight: Tensor | None = None) -> Tensor:
        """The training loss of one bag.

        Classification: the cross-entropy of class index ``target``, times ``class_weight[target]`` when
        given (the weight multiplies the loss explicitly: ``F.cross_entropy(weight=...)`` divides by the
        summed weight, which for one bag cancels it). Regression: the squared error of the target
        standardised with ``target_mean`` and ``target_std``; there are no classes to weight, so
        ``class_weight`` must be None.
        """
        out = self.logits(bag)
        if self.regression:
            if class_weight is not None:
                raise ValueError(f"{type(self).__name__} regression bag_loss got a class_weight: expected None")
            return ((out[0] - target) / self.target_std).square()
        return self._weighted_ce(out, int(target), class_weight)

    def validation_loss(self, bag: Tensor, target: float, class_weight: Tensor | None = None) -> Tensor:
        """The loss early stopping follows: :meth:`bag_loss` (CLAM-SB's leaves its instance loss out)."""
        return self.bag_loss(bag, target, class_weight)

    def tile_scores(self, bag: Tensor, weights: Tensor) -> Tensor:
        """How much each tile drives the prediction, to rank the tiles (the top tile a run reports): the
        weights ``forward`` returned for ``bag``."""
        return weights

    def logits(self, bag: Tensor) -> Tensor:
        """``forward``'s first output alone, for the losses (TransMIL then skips the work of its tile weights)."""
        return self(bag)[0]

    @staticmethod
    def _weighted_ce(logits: Tensor, label: int, class_weight: Tensor | None) -> Tensor:
        loss = F.cross_entropy(logits.unsqueeze(0), torch.tensor([label]))
        return loss if class_weight is None else class_weight[label] * loss


class MeanMIL(MILHead):
    """Mean of the standardised tile features, then a linear layer: the baseline the others must beat.

    ``dropout`` (on the mean feature) defaults to 0.25, as ABMIL's and CLAM-SB's: the value the recipe's
    ``mil.dropout`` has always trained this head with.
    """

    kind = "mean"

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.25) -> None:
        super().__init__(in_features, num_classes, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_features, num_classes)

    def forward(self, bag: Tensor) -> tuple[Tensor, Tensor]:
        x = self.standardise(bag)
        weights = torch.full((x.shape[0],), 1.0 / x.shape[0], device=x.device)
        return self.output(self.classifier(self.drop(x.mean(0)))), weights

    def tile_outputs(self, bag: Tensor) -> Tensor:
        """Each tile's own output ``(n_tiles, num_classes)``, as if it were the whole bag: the linear layer on its
        standardised feature (the bag's logits are their mean, without dropout); regression: the tile's own
        prediction in the target's units. What the heatmap of a ``mean`` head shows, since it attends to nothing."""
        return self.output(self.classifier(self.standardise(bag)))

    def tile_scores(self, bag: Tensor, weights: Tensor) -> Tensor:
        """Each tile's own logits, the linear layer on its standardised feature (the bag's logits are their
        mean, without dropout), for the class the bag is predicted: centred over the classes, since softmax
        ignores a shift shared by all (for two classes half the tile's logit margin). Regression: each
        tile's own standardised prediction. The uniform ``weights`` cannot rank anything."""
        z = self.classifier(self.standardise(bag))
        if self.regression:
            return z[:, 0]
        return (z - z.mean(1, keepdim=True))[:, int(z.mean(0).argmax())]


class ABMIL(MILHead):
    """Gated (or plain) attention pooling over one bag, then a linear classifier.

    Args:
        in_features: Width of each tile feature vector.
        num_classes: Number of slide classes (two or more; the loss is softmax cross-entropy), or 1 for a
            regression output (the loss is the squared error of the standardised target).
        hidden: Width of the per-tile embedding ``h`` (the paper's M).
        attention: Width of the attention branch (the paper's L).
        dropout: Dropout on the tile embedding and the attention branch, for regularisation on few slides.
        gated: Multiply ``tanh(V h)`` by ``sigmoid(U h)`` (the paper's gated attention); False gives the
            plain ``tanh`` attention, whose near-linear response limits which tiles it can single out.
    """

    kind = "abmil"

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128, attention: int = 64,
                 dropout: float = 0.25, gated: bool = True) -> None:  # fmt: skip
        super().__init__(in_features, num_classes, hidden=hidden, attention=attention, dropout=dropout, gated=gated)
        for name, value in (("hidden", hidden), ("attention", attention)):
            if value < 1:
                raise ValueError(f"ABMIL {name}={value}: expected a positive width")
        self.embed = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Sequential(nn.Linear(hidden, attention), nn.Tanh(), nn.Dropout(dropout))
        self.attn_u = nn.Sequential(nn.Linear(hidden, attention), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        self.attn_w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, num_classes)

    def attend(self, h: Tensor) -> Tensor:
        """``softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))`` over the bag's embeddings (tanh alone ungated)."""
        gate = self.attn_v(h)
        if self.attn_u is not None:
            gate = gate * self.attn_u(h)
        return torch.softmax(self.attn_w(gate).squeeze(-1), dim=0)

    def forward(self, bag: Tensor) -> tuple[Tensor, Tensor]:
        """Logits ``(num_classes,)`` (regression: the prediction, ``(1,)``) and attention weights ``(n_tiles,)``
        (non-negative, summing to 1)."""
        h = self.embed(self.standardise(bag))
        weights = self.attend(h)
        return self.output(self.classifier(weights @ h)), weights


class CLAMSB(ABMIL):
    """CLAM-SB: ABMIL plus instance classifiers trained on the most and least attended tiles.

    Args:
        k: Tiles taken from each end of the attention ranking for the instance loss (CLAM's ``k_sample``, 8);
            a bag of fewer than ``2k`` tiles uses half of it, and a bag of one tile has no instance loss
            (its one tile would be both a pseudo-positive and a pseudo-negative): its loss is the bag loss.
        bag_weight: Weight of the bag loss; the instance loss gets ``1 - bag_weight`` (CLAM's 0.7).
    """

    kind = "clam_sb"

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128, attention: int = 64,
                 dropout: float = 0.25, gated: bool = True, k: int = 8, bag_weight: float = 0.7,
                 subtyping: bool | None = None) -> None:  # fmt: skip
        if num_classes == 1:
            raise ValueError("CLAM-SB num_classes=1: regression is not supported (its instance loss trains one "
                             "classifier per class); use abmil, mean or transmil")  # fmt: skip
        super().__init__(in_features, num_classes, hidden, attention, dropout, gated)
        if k < 1 or not 0.0 <= bag_weight <= 1.0:
            raise ValueError(f"CLAM-SB k={k}, bag_weight={bag_weight}: expected k >= 1 and bag_weight in [0, 1]")
        self._arch.update(k=k, bag_weight=bag_weight)
        if subtyping is not None:  # saved only when set, so heads saved before the option rebuild as they trained
            self._arch.update(subtyping=subtyping)
        self.k, self.bag_weight = k, bag_weight
        self.subtyping = num_classes > 2 if subtyping is None else subtyping
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(num_classes))

    def instance_loss(self, h: Tensor, weights: Tensor, label: int) -> Tensor | None:
        """CLAM's instance loss of one bag, None for a bag of one tile (see ``k``).

        The true class's instance classifier: cross-entropy of its top-k attended tiles as 1 and bottom-k as 0
        (CLAM's ``inst_eval``). With ``subtyping`` (CLAM's flag; by default on with more than two classes) each
        other class's classifier adds the cross-entropy of the top-k tiles as 0 (``inst_eval_out``: what the
        slide is made of is not that class), and the sum is divided by the number of classes. Without it (by
        default with two classes, e.g. tumour against normal, where the normal slide has no tiles of the other
        class to learn from), the true class's term alone. A binary subtyping task (LUAD against LUSC, where
        each class has its own tissue) is CLAM's ``--subtyping`` with two classes: ``subtyping=True``.
        """
        if h.shape[0] < 2:
            return None
        k = min(self.k, h.shape[0] // 2)
        order = torch.argsort(weights, descending=True, stable=True)  # one order: with ties (identical tiles) two
        top, bottom = order[:k], order[-k:]  # top-k calls gave a tile both labels; k <= n/2 keeps these apart
        logits = self.instance_classifiers[label](h[torch.cat([top, bottom])])
        targets = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)])
        loss = F.cross_entropy(logits, targets)
        if not self.subtyping:
            return loss
        negative = torch.zeros(k, dtype=torch.long)
        for c in range(self.num_classes):
            if c != label:
                loss = loss + F.cross_entropy(self.instance_classifiers[c](h[top]), negative)
        return loss / self.num_classes

    def bag_loss(self, bag: Tensor, target: float, class_weight: Tensor | None = None) -> Tensor:
        """``bag_weight * bag CE + (1 - bag_weight) * instance loss``, the whole of it times the bag's class weight;
        the bag CE alone for a one-tile bag.

        The class weight scales both terms, so each bag keeps CLAM's 0.7 : 0.3 balance and a minority-class bag
        trains its instance classifier as much as its bag classifier: CLAM balances classes by sampling bags
        (its ``weighted_sample``), which leaves every bag's loss as it is; weighting the bag CE alone gave the
        minority (tumour) class's instance loss 0.08 of its bag's loss on a 90:10 cohort, not 0.3.
        """
        label = int(target)
        h = self.embed(self.standardise(bag))
        weights = self.attend(h)
        bag_ce = self._weighted_ce(self.classifier(weights @ h), label, None)
        instance = self.instance_loss(h, weights, label)
        loss = bag_ce if instance is None else self.bag_weight * bag_ce + (1.0 - self.bag_weight) * instance
        return loss if class_weight is None else class_weight[label] * loss

    def validation_loss(self, bag: Tensor, target: float, class_weight: Tensor | None = None) -> Tensor:
        """The weighted bag cross-entropy alone: CLAM's ``validate_clam`` stops early on it (the instance loss
        trains the attention; it is no measure of the slide prediction)."""
        logits, _ = self(bag)
        return self._weighted_ce(logits, int(target), class_weight)


class _TransLayer(nn.Module):
    """Pre-norm multi-head self-attention with a residual, returning its queries and keys too when asked.

    Dropout is on the output projection, as ``to_out`` of the reference's ``NystromAttention`` has it; the
    attention probabilities are not dropped (which also keeps ``scaled_dot_product_attention`` on its fast
    CPU path, where ``dropout_p > 0`` falls back to materialising the attention and a mask over it).
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.heads = heads

    def forward(self, x: Tensor, keep: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The layer's output and, with ``keep``, its queries and keys ``(heads, tokens, head width)``, from which
        :func:`_attention_rows` computes rows of its attention matrix."""
        n, dim = x.shape
        q, k, v = self.qkv(self.norm(x)).view(n, 3, self.heads, dim // self.heads).permute(1, 2, 0, 3)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.drop(self.out(y.transpose(0, 1).reshape(n, dim))), ((q, k) if keep else None)


def _attention_rows(qk: tuple[Tensor, Tensor], start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of a layer's attention matrix (softmax over every token, the mean over heads), as
    ``scaled_dot_product_attention`` weighs the values with it: ``(stop - start, tokens)``."""
    q, k = qk
    return torch.softmax(q[:, start:stop] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1).mean(0)


def attention_rollout(first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor]) -> Tensor:
    """The class token's row of the attention rollout through two layers (Abnar & Zuidema, 2020), over every token.

    Each layer's residual is counted as attention to the token itself, ``(A + I) / 2``; the product of the two
    layers' matrices, ``(A2 + I)(A1 + I) / 4``, has the class-token row ``(a2 A1 + a1 + a2 + e0) / 4``, where
    ``a1`` and ``a2`` are the class token's rows of ``A1`` and ``A2``. ``a2 A1`` is summed over blocks of ``A1``'s
    rows, 16 MB of scores a block, so memory stays linear in the tokens; the time is about one more forward pass (a
    20,000-tile bag on 2 CPU threads: 4.6 s, beside 4.9 s for the logits; blocks of 4 MB took 5.7 s, of 64 MB 9.8 s).
    """
    last = _attention_rows(second, 0, 1)[0]
    tokens = last.shape[0]
    block = max(1, 2**22 // (tokens * first[0].shape[0]))  # rows of A1 at a time: heads x block x tokens floats
    through = torch.zeros_like(last)
    for start in range(0, tokens, block):
        stop = min(start + block, tokens)
        through += last[start:stop] @ _attention_rows(first, start, stop)
    own = torch.zeros_like(last)
    own[0] = 1.0
    return (through + _attention_rows(first, 0, 1)[0] + last + own) / 4.0


class _PPEG(nn.Module):
    """TransMIL's pyramid position encoding: depthwise 7x7, 5x5 and 3x3 convolutions over the token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, s, padding=s // 2, groups=dim) for s in (7, 5, 3))

    def forward(self, x: Tensor, side: int) -> Tensor:
        cls, tokens = x[:1], x[1:]
        grid = tokens.transpose(0, 1).reshape(1, -1, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2)[0].transpose(0, 1)])


class TransMIL(MILHead):
    """TransMIL (see the module docstring).

    Args:
        hidden: Token width (the paper's 512).
        heads: Attention heads (the paper's 8).
        dropout: Dropout after the input projection and on each attention layer's output projection (the
            reference's 0.1).
    """

    kind = "transmil"

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128, heads: int = 8,
                 dropout: float = 0.1) -> None:  # fmt: skip
        super().__init__(in_features, num_classes, hidden=hidden, heads=heads, dropout=dropout)
        if hidden < 1 or heads < 1 or hidden % heads:
            raise ValueError(f"TransMIL hidden={hidden}, heads={heads}: expected hidden divisible by heads")
        self.project = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.cls_token = nn.Parameter(torch.zeros(1, hidden))
        nn.init.normal_(self.cls_token, std=0.02)
        self.layer1 = _TransLayer(hidden, heads, dropout)
        self.ppeg = _PPEG(hidden)
        self.layer2 = _TransLayer(hidden, heads, dropout)
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def _run(self, bag: Tensor, keep: bool) -> tuple[Tensor, Any, Any, int, int]:
        """Logits, both layers' queries and keys (with ``keep``), the tiles and the grid side."""
        h = self.project(self.standardise(bag))
        n = h.shape[0]
        side = math.ceil(math.sqrt(n))
        h = torch.cat([h, h[: side * side - n]]) if side * side > n else h  # pad the grid by repeating tiles
        x, first = self.layer1(torch.cat([self.cls_token, h]), keep=keep)
        x, second = self.layer2(self.ppeg(x, side), keep=keep)
        return self.output(self.classifier(self.norm(x)[0])), first, second, n, side

    def logits(self, bag: Tensor) -> Tensor:
        return self._run(bag, keep=False)[0]

    def forward(self, bag: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and tile weights: the class token's attention rollout through both layers
        (:func:`attention_rollout`), with the weight of the tiles repeated to square the token grid added back to
        the tiles they repeat. The last layer's attention alone does not localise: its first layer and PPEG have
        already spread a tumour tile's signal over every token, so on planted-tile bags the planted tile ranked
        near the middle of its bag in two of three trained heads, where the rollout ranked it first in 76-94%."""
        logits, first, second, n, side = self._run(bag, keep=True)
        with torch.no_grad():
            rollout = attention_rollout(first, second)
        weights = rollout[1 : n + 1].clone()  # the real tiles, not the class token
        pad = side * side - n
        weights[:pad] += rollout[n + 1 :]  # a repeated tile's weight is its original's
        return logits, weights / weights.sum()


#: Every head by its ``kind`` (the recipe's and the saved file's name for it).
MIL_HEADS: dict[str, type[MILHead]] = {cls.kind: cls for cls in (MeanMIL, ABMIL, CLAMSB, TransMIL)}


def build_head(kind: str, in_features: int, num_classes: int, **arch: Any) -> MILHead:
    """A head of ``kind`` (``mean``, ``abmil``, ``clam_sb``, ``transmil``) with its own arguments from ``arch``."""
    if kind not in MIL_HEADS:
        raise ValueError(f"MIL head {kind!r}: expected one of {', '.join(MIL_HEADS)}")
    return MIL_HEADS[kind](in_features, num_classes, **arch)

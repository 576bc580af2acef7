"""Freeze phases in timm's own vocabulary: stem, stages, head.

The partition comes from ``model.group_matcher(coarse=True)``, the grouping timm already uses for
layer-wise LR decay: the first group is the stem, the group that holds the classifier is the head,
and the groups between are the stages (``layer1..4`` in a ResNet, ``blocks.0..6`` in an
EfficientNet). A phase names what trains; everything else has ``requires_grad=False`` and its
BatchNorm statistics frozen, so a frozen layer really does not change.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from timm.models import group_parameters
from torch import nn

from medvision.errors import MedvisionError

log = logging.getLogger("medvision")


class FreezeError(MedvisionError, ValueError):
    """A ``trainable`` token that names nothing in this backbone."""


@dataclass(frozen=True)
class Partition:
    """Parameter names of the stem, each stage and the head, in forward order."""

    stem: list[str]
    stages: list[list[str]]
    head: list[str]

    def describe(self) -> str:
        """One line per part with its timm module names (``blocks.6, conv_head, bn2``)."""
        groups = [self.stem, *self.stages, self.head]
        owners: dict[str, set[int]] = {}
        for i, names in enumerate(groups):
            for n in names:
                owners.setdefault(n.split(".")[0], set()).add(i)

        def span(names: list[str]) -> str:
            # a top-level module split across parts (``blocks``) is named with its index (``blocks.6``)
            return ", ".join(
                dict.fromkeys(
                    ".".join(n.split(".")[:2]) if len(owners[n.split(".")[0]]) > 1 else n.split(".")[0] for n in names
                )
            )

        lines = [f"  stem: {span(self.stem)}"]
        lines += [f"  stage:{i}: {span(s)}" for i, s in enumerate(self.stages)]
        lines.append(f"  head: {span(self.head)}")
        return "\n".join(lines)


def partition(model: nn.Module) -> Partition:
    """Splits a timm model's parameters into stem, stages and head using its coarse group matcher."""
    timm_model: Any = model  # timm's methods are not visible through nn.Module's type
    if not hasattr(timm_model, "group_matcher"):
        raise FreezeError(f"{type(model).__name__} has no timm group_matcher; freeze phases need a timm model")
    groups = list(group_parameters(model, timm_model.group_matcher(coarse=True)).values())
    classifier = {n for n, _ in timm_model.get_classifier().named_parameters()}
    head_prefix = timm_model.pretrained_cfg.get("classifier", "")
    if isinstance(head_prefix, (list, tuple)):
        head_prefix = head_prefix[0]
    classifier = {f"{head_prefix}.{n}" for n in classifier}
    if len(groups) < 2 or not classifier & set(groups[-1]):
        # a model whose classifier is not in the last group: treat the classifier alone as the head
        everything = [n for g in groups for n in g if n not in classifier]
        return Partition(stem=groups[0], stages=[everything[len(groups[0]) :]], head=sorted(classifier))
    return Partition(stem=groups[0], stages=groups[1:-1], head=groups[-1])


def select_trainable(model: nn.Module, tokens: list[str]) -> set[str]:
    """Parameter names selected by ``trainable`` tokens.

    Tokens: ``all``, ``head``, ``stem``, ``stage:<i>`` (negative counts from the end),
    ``last_stages:<n>``, or a timm module prefix such as ``layer4`` or ``blocks.6``.
    """
    part = partition(model)
    names = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    for token in tokens:
        if token == "all":
            chosen.update(names)
        elif token == "head":
            chosen.update(part.head)
        elif token == "stem":
            chosen.update(part.stem)
        elif m := re.fullmatch(r"stage:(-?\d+)", token):
            i = int(m.group(1))
            if not -len(part.stages) <= i < len(part.stages):
                raise FreezeError(f"trainable {token!r}: this backbone has stages 0..{len(part.stages) - 1}")
            chosen.update(part.stages[i])
        elif m := re.fullmatch(r"last_stages:(\d+)", token):
            n = int(m.group(1))
            if not 1 <= n <= len(part.stages):
                raise FreezeError(f"trainable {token!r}: n must be 1..{len(part.stages)} for this backbone")
            for stage in part.stages[-n:]:
                chosen.update(stage)
        else:
            hits = [n for n in names if n == token or n.startswith(token + ".")]
            if not hits:
                raise FreezeError(
                    f"trainable {token!r} matches no parameter of {type(model).__name__}. Use all, head, stem, "
                    f"stage:<i>, last_stages:<n> or a module prefix. This backbone's parts:\n{part.describe()}"
                )
            chosen.update(hits)
    return chosen


def apply_trainable(model: nn.Module, trainable: set[str]) -> tuple[int, int]:
    """Sets ``requires_grad`` from the chosen names; returns (trainable, frozen) parameter counts."""
    n_train = n_frozen = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
        if name in trainable:
            n_train += p.numel()
        else:
            n_frozen += p.numel()
    return n_train, n_frozen


def set_bn_policy(model: nn.Module, bn: str) -> None:
    """After ``model.train()``: put BatchNorm in eval mode where frozen, or everywhere for ``bn: frozen``.

    A BN layer whose affine parameters are frozen would otherwise keep updating its running
    statistics, and the "frozen" backbone would drift.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            frozen = not params or not any(p.requires_grad for p in params)
            if bn == "frozen" or frozen:
                module.eval()


def _no_weight_decay(name: str, param: torch.Tensor, skip: set[str]) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or name in skip


def optimizer_groups(
    model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None
) -> list[dict[str, Any]]:
    """AdamW parameter groups over trainable parameters.

    Norm and bias parameters (and timm's ``no_weight_decay()`` set, e.g. position embeddings) get no
    weight decay. With ``layer_decay``, timm's fine group matcher numbers the layers from the stem,
    and layer ``i`` of ``L`` gets ``lr * layer_decay ** (L - 1 - i)``.
    """
    timm_model: Any = model
    skip = set(timm_model.no_weight_decay()) if hasattr(timm_model, "no_weight_decay") else set()
    layer_of: dict[str, int] = {}
    n_layers = 1
    if layer_decay is not None:
        fine = group_parameters(model, timm_model.group_matcher(coarse=False))
        for depth, names in enumerate(fine.values()):
            for n in names:
                layer_of[n] = depth
        n_layers = len(fine)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = layer_of.get(name, n_layers - 1)
        no_wd = _no_weight_decay(name, p, skip)
        scale = layer_decay ** (n_layers - 1 - depth) if layer_decay is not None else 1.0
        key = (depth, no_wd)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * scale, "weight_decay": 0.0 if no_wd else weight_decay}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]

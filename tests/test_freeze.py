from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from medvision.models.freeze import (
    FreezeError,
    apply_trainable,
    optimizer_groups,
    partition,
    select_trainable,
)
from medvision.recipe import TrainConfig
from medvision.training.loop import train_one_epoch
from medvision.training.setup import warmup_cosine


def test_partition_uses_timm_groups() -> None:
    part = partition(timm.create_model("resnet18", num_classes=3))
    assert part.stem == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert len(part.stages) == 4 and part.stages[-1][0].startswith("layer4.")
    assert part.head == ["fc.weight", "fc.bias"]
    eff = partition(timm.create_model("tf_efficientnet_lite0", num_classes=3))
    assert eff.head == ["classifier.weight", "classifier.bias"] and len(eff.stages) == 7


def test_tokens_select_the_named_parts() -> None:
    model = timm.create_model("test_resnet", num_classes=2)
    names = {n for n, _ in model.named_parameters()}
    assert select_trainable(model, ["all"]) == names
    assert select_trainable(model, ["head"]) == {"fc.weight", "fc.bias"}
    last = select_trainable(model, ["last_stages:1"])
    assert last and all(n.startswith("layer4.") for n in last)
    assert select_trainable(model, ["stage:-1"]) == last
    assert select_trainable(model, ["layer4"]) == last  # a timm module prefix
    with pytest.raises(FreezeError, match=r"(?s)matches no parameter.*stage:3: layer4\n  head: fc"):
        select_trainable(model, ["layer9"])
    with pytest.raises(FreezeError, match=r"stages 0\.\.3"):
        select_trainable(model, ["stage:4"])


def test_no_weight_decay_on_norm_and_bias_and_layer_decay() -> None:
    model = timm.create_model("test_resnet", num_classes=2)
    apply_trainable(model, select_trainable(model, ["all"]))
    groups = optimizer_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            is_norm_or_bias = p.ndim <= 1
            assert (g["weight_decay"] == 0.0) == is_norm_or_bias, names[id(p)]
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == [0.5**k for k in range(len(lrs) - 1, -1, -1)]  # one step of decay per timm layer group
    head_group = next(g for g in groups if any(names[id(p)] == "fc.weight" for p in g["params"]))
    assert head_group["lr"] == 1.0
    stem_group = next(g for g in groups if any(names[id(p)].startswith("conv1.") for p in g["params"]))
    assert stem_group["lr"] == min(lrs)


def test_frozen_weights_and_bn_stats_do_not_change_trainable_ones_do() -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=2)
    trainable = select_trainable(model, ["head", "last_stages:1"])
    n_train, n_frozen = apply_trainable(model, trainable)
    assert n_train > 0 and n_frozen > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 2, (32,)))
    loader = DataLoader(data, batch_size=8)
    cfg = TrainConfig(phases=[{"epochs": 1, "lr": 0.01}], amp="none", channels_last=False, log_interval=1)
    optimizer = torch.optim.AdamW(optimizer_groups(model, 0.01, 0.05, None))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(4, 0.0))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, torch.device("cpu"), "train", "t")
    after = model.state_dict()
    for name, _ in model.named_parameters():
        changed = not torch.equal(before[name], after[name])
        assert changed == (name in trainable), name
    frozen_bn = "layer1.0.bn1.running_mean"
    assert torch.equal(before[frozen_bn], after[frozen_bn])  # BN of a frozen stage keeps its statistics
    assert not torch.equal(before["layer4.0.bn1.running_mean"], after["layer4.0.bn1.running_mean"])


def test_bn_frozen_policy_freezes_statistics_of_trainable_layers() -> None:
    model = timm.create_model("test_resnet", num_classes=2)
    apply_trainable(model, select_trainable(model, ["all"]))
    before = model.state_dict()["layer4.0.bn1.running_mean"].clone()
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,))), batch_size=4)
    cfg = TrainConfig(phases=[{"epochs": 1, "lr": 0.01}], amp="none", channels_last=False)
    optimizer = torch.optim.AdamW(optimizer_groups(model, 0.01, 0.0, None))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(2, 0.0))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, torch.device("cpu"), "frozen", "t")
    assert torch.equal(before, model.state_dict()["layer4.0.bn1.running_mean"])
    assert not torch.equal(model.state_dict()["layer4.0.bn1.weight"], torch.ones_like(before))  # affine trains


def test_warmup_cosine_shape() -> None:
    f = warmup_cosine(100, 0.1)
    values = np.array([f(s) for s in range(100)])
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert np.all(np.diff(values[10:]) <= 1e-12) and values[-1] < 0.05

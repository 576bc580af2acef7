"""Does the seed paper's autoencoder earn a place next to SimCLR? A masked denoising autoencoder, measured.

The design paper proposes autoencoder pretraining; ``medvision pretrain`` ships SimCLR. This script
pretrains the same backbone (``tf_efficientnet_lite0`` from its ImageNet weights) on the same
unlabelled BloodMNIST training images, at the same size and for the same epochs, as a masked
denoising autoencoder: half of the 4x4 patches of each image are blanked and Gaussian noise is
added, a light decoder rebuilds the image from the backbone's feature map, and the loss is the MSE
on the masked patches. The steps are ``medvision.training.loop.train_one_epoch``'s (same AMP path,
same optimizer schedule). Both backbones, and the ImageNet start, are then compared by what the
issue cares about: leave-one-out kNN accuracy on the validation split, and a linear probe trained
on 1% of the training labels (``data.train_fraction: 0.01``) scored on the whole test split.

    python benchmarks/ssl_objectives.py --simclr runs/bloodmnist_simclr_lite0 [--epochs 15]

Prints a table and writes ``benchmarks/ssl_objectives.csv``; the autoencoder's backbone is saved in
``--out`` (a folder ``model.init_from`` accepts).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch
import torch.nn.functional as F
from torch import nn

from medvision.data.dataset import ImageDataset
from medvision.data.sources import load_table
from medvision.data.table import subset_indices
from medvision.data.transforms import build_transforms
from medvision.models.backbone import create_backbone, data_config
from medvision.models.freeze import optimizer_groups
from medvision.models.heads import extract_features, knn_probs
from medvision.recipe import load_recipe
from medvision.runtime import EpochSampler, Inputs, make_loader, resolve_amp, seed_everything
from medvision.tasks.train import train
from medvision.training.checkpoint import save_weights
from medvision.training.loop import train_one_epoch
from medvision.training.setup import warmup_cosine

HERE = Path(__file__).parent
ROOT = HERE.parent


class MaskedAutoencoder(nn.Module):
    """The timm backbone's feature map -> a light upsampling decoder -> the image (normalised space)."""

    def __init__(self, backbone: nn.Module, size: int, channels: int) -> None:
        super().__init__()
        self.backbone, self.size = backbone, size
        width = int(backbone.num_features)  # type: ignore[arg-type]
        self.decode = nn.Sequential(  # light: at 32 px a 3x3 conv decoder cost 10x the backbone
            nn.Conv2d(width, 64, 1), nn.GELU(), nn.Upsample(size=(size // 4, size // 4), mode="bilinear"),
            nn.Conv2d(64, 32, 3, padding=1), nn.GELU(), nn.Upsample(size=(size, size), mode="bilinear"),
            nn.Conv2d(32, channels, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.backbone.forward_features(x))  # type: ignore[operator]


def masked_criterion(patch: int, ratio: float, noise: float) -> object:
    def loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        keep = (torch.rand(b, 1, h // patch, w // patch, device=images.device) >= ratio).float()
        keep = F.interpolate(keep, size=(h, w), mode="nearest")
        corrupted = images * keep + noise * torch.randn_like(images)
        recon = model(corrupted).float()
        masked = 1.0 - keep
        err = ((recon - images.float()) ** 2 * masked).sum(dim=(1, 2, 3))
        return err / masked.sum(dim=(1, 2, 3)).clamp_min(1.0) / images.shape[1]

    return loss


def pretrain_autoencoder(recipe_path: Path, epochs: int, out: Path, shared: str) -> tuple[Path, list[float]]:
    recipe = load_recipe(recipe_path, [f"output_dir={out.parent}"])
    device = torch.device("cpu")
    amp = resolve_amp(recipe.train.amp, device)
    table = load_table(recipe.data, recipe.seed)
    backbone = create_backbone(recipe.model, num_classes=0, in_chans=3)
    stats = data_config(backbone, 3)
    model = MaskedAutoencoder(backbone, recipe.data.image_size, 3)
    plain = build_transforms(recipe.augment, recipe.data.image_size, stats["mean"], stats["std"], normalize=False)
    ds = ImageDataset(table, subset_indices(table, "train", None, recipe.seed), plain, "dtype", 3, "uint8")
    sampler = EpochSampler(len(ds), recipe.seed, recipe.data.batch_size)
    loader = make_loader(ds, recipe.data.batch_size, 0, device, sampler)
    optimizer = torch.optim.AdamW(optimizer_groups(model, recipe.pretrain.lr, recipe.train.weight_decay, None))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(epochs * len(loader), 0.1))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cfg = recipe.train.model_copy(update={"amp": amp})
    inputs = Inputs(stats["mean"], stats["std"], False)
    criterion = masked_criterion(4, 0.5, 0.1)
    losses = []
    for epoch in range(epochs):
        seed_everything(recipe.seed + epoch)
        sampler.set_epoch(epoch)
        stats_e = train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, device, "train",
                                  f"autoencoder {epoch + 1}/{epochs}", inputs, criterion=criterion)  # type: ignore[arg-type]  # fmt: skip
        losses.append(stats_e["train_loss"])
        print(f"autoencoder epoch {epoch + 1}/{epochs}: masked MSE {stats_e['train_loss']:.4f} "
              f"({stats_e['seconds']:.0f} s)", flush=True)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    save_weights(backbone, out / "model.safetensors", {"method": "masked_autoencoder"})
    (out / "run.json").write_text(json.dumps({"kind": "pretrain", "method": "masked_autoencoder"}))
    return out, losses


def knn_health(init: str | None, recipe_path: Path, shared: str) -> float:
    over = ["model.pretrained=false", f"model.init_from={init}"] if init else []
    recipe = load_recipe(recipe_path, over)
    device = torch.device("cpu")
    table = load_table(recipe.data, recipe.seed)
    backbone = create_backbone(recipe.model, num_classes=0, in_chans=3)
    stats = data_config(backbone, 3)
    plain = build_transforms(None, recipe.data.image_size, stats["mean"], stats["std"], normalize=False)
    ds = ImageDataset(table, subset_indices(table, "val", None, recipe.seed), plain, "dtype", 3, "uint8")
    loader = make_loader(ds, 512, 0, device)
    feats = extract_features(backbone, loader, device, resolve_amp("auto", device), Inputs(stats["mean"],
                             stats["std"], False))  # fmt: skip
    labels = table.labels[ds.indices]
    probs = knn_probs(feats, feats, labels, len(table.classes), 20, 0.07, exclude_self=True)
    return float((probs.argmax(1) == labels).mean())


def probe(init: str | None, name: str, out: Path) -> dict[str, float]:
    over = ["data.image_size=32", "train.protocol=linear_probe", "data.train_fraction=0.01", f"name={name}",
            f"output_dir={out}", "evaluation.explain=0", "evaluation.bootstrap=500"]  # fmt: skip
    if init:
        over += ["model.pretrained=false", f"model.init_from={init}"]
    run = train(load_recipe(ROOT / "recipes" / "bloodmnist_effnet_lite0.yaml", over), overwrite=True)
    test = json.loads((run / "metrics.json").read_text())["image"]["test"]
    return {"auc": test["auc"], "auc_lo": test["auc_ci"][0], "auc_hi": test["auc_ci"][1], "acc": test["acc"],
            "acc_lo": test["acc_ci"][0], "acc_hi": test["acc_ci"][1]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--simclr", type=Path, required=True, help="a finished medvision pretrain run (SimCLR)")
    parser.add_argument("--epochs", type=int, default=15, help="autoencoder epochs (default: SimCLR's 15)")
    parser.add_argument("--out", type=Path, default=Path("ssl-objectives"))
    args = parser.parse_args(argv)
    shared = os.environ.get("MEDVISION_SHARED", str(ROOT.parent / "shared"))
    recipe = ROOT / "recipes" / "bloodmnist_simclr_lite0.yaml"
    start = time.perf_counter()
    ae_dir, losses = pretrain_autoencoder(recipe, args.epochs, args.out / "masked_autoencoder", shared)
    ae_seconds = time.perf_counter() - start
    rows = []
    for label, init in (("imagenet", None), ("imagenet+simclr", str(args.simclr.resolve())),
                        ("imagenet+masked_autoencoder", str(ae_dir.resolve()))):  # fmt: skip
        row: dict[str, object] = {"init": label, "knn_val": knn_health(init, recipe, shared)}
        row.update(probe(init, f"probe-{label.replace('+', '_')}", args.out))
        rows.append(row)
    with (HERE / "ssl_objectives.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: f"{v:.5g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows])
    print(f"autoencoder: {args.epochs} epochs in {ae_seconds:.0f} s, masked MSE {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(
        "| init | kNN accuracy (val, leave-one-out) | 1% labels linear probe: test AUC (95% CI) | test ACC (95% CI) |"
    )
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['init']} | {r['knn_val']:.4f} | {r['auc']:.4f} ({r['auc_lo']:.4f}-{r['auc_hi']:.4f}) | "
              f"{r['acc']:.4f} ({r['acc_lo']:.4f}-{r['acc_hi']:.4f}) |")  # fmt: skip
    return 0 if all(math.isfinite(float(r["auc"])) for r in rows) else 1  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())

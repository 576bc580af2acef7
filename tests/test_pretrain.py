"""``medvision pretrain``: SimCLR views, the NT-Xent loss (one process and two gloo ranks), the run folder,
exact resume, and ``model.init_from`` of the pretrained backbone."""

from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import read_rows, tiny_recipe
from safetensors.torch import load_file

from medvision.cli import main
from medvision.data.views import TwoViews, view_kind, view_transforms
from medvision.models.simclr import nt_xent
from medvision.recipe import recipe_from_dict
from medvision.runs import RunError
from medvision.runtime import Dist
from medvision.tasks import pretrain as pretrain_run
from medvision.tasks.pretrain import pretrain


def _recipe(manifest: Path, out: Path, name: str = "ssl", **pretrain_cfg: Any) -> dict[str, Any]:
    tree = tiny_recipe(manifest, out)
    tree["name"] = name
    tree["data"]["batch_size"] = 8
    tree["pretrain"] = {"epochs": 2, "lr": 1e-3, "proj_dim": 16, "proj_hidden": 32, **pretrain_cfg}
    return tree


def _reference_nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent written out sample by sample (Chen et al. 2020, eq. 1), views interleaved a0 a1 b0 b1 ..."""
    z = F.normalize(z, dim=1)
    losses = []
    for i in range(len(z)):
        sims = torch.stack([z[i] @ z[j] / temperature for j in range(len(z)) if j != i])
        positive = z[i] @ z[i ^ 1] / temperature
        losses.append(-(positive - torch.logsumexp(sims, 0)))
    return torch.stack(losses).view(-1, 2).mean(1)


def test_nt_xent_matches_its_definition_and_rewards_matching_views() -> None:
    torch.manual_seed(0)
    z = torch.randn(12, 5)
    assert torch.allclose(nt_xent(z, 0.3, Dist()), _reference_nt_xent(z, 0.3), atol=1e-5)
    anchors = torch.randn(6, 5)
    matched = torch.repeat_interleave(anchors, 2, dim=0)  # each view identical to its partner
    assert nt_xent(matched, 0.1, Dist()).mean() < nt_xent(torch.randn(12, 5), 0.1, Dist()).mean()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nt_xent_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    z = torch.randn(14, 6)
    sizes = [8, 6]  # uneven shards, in views (4 and 3 samples)
    start = sum(sizes[:rank])
    mine = z[start : start + sizes[rank]].clone().requires_grad_(True)
    losses = nt_xent(mine, 0.2, Dist(rank, world))
    (losses.sum() * world / 7).backward()  # train_one_epoch's share: sum * world / global samples
    torch.save({"losses": losses.detach(), "grad": mine.grad}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_contrast_against_the_whole_global_batch(tmp_path: Path) -> None:
    """Per-sample losses and gradients on two gloo ranks equal one process's on the whole batch."""
    ctx = mp.start_processes(_nt_xent_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        assert time.monotonic() < deadline, "a rank hung"
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    z = torch.randn(14, 6).requires_grad_(True)
    losses = nt_xent(z, 0.2, Dist())
    losses.mean().backward()
    assert torch.allclose(torch.cat([p["losses"] for p in parts]), losses.detach(), atol=1e-6)
    # DDP averages the ranks' gradients; each rank's gradient reaches every embedding through the gather
    summed = torch.cat([p["grad"] for p in parts]) / 2
    assert z.grad is not None and torch.allclose(summed, z.grad, atol=1e-6)


def test_two_views_differ_and_repeat_with_the_seed() -> None:
    views = TwoViews(view_transforms("pathology", 32, 0.3))
    image = np.random.default_rng(0).random((28, 28, 3), dtype=np.float32)
    views.set_random_seed(7)
    first = views(image=image)["image"]
    views.set_random_seed(7)
    again = views(image=image)["image"]
    assert first.shape == (2, 3, 32, 32)
    assert torch.equal(first, again) and not torch.equal(first[0], first[1])
    grey = TwoViews(view_transforms("radiology", 32, 0.5))(image=image[:, :, :1])["image"]
    assert grey.shape == (2, 1, 32, 32)


def test_view_defaults_follow_the_domain(tiles_manifest: Path, tmp_path: Path) -> None:
    recipe = recipe_from_dict(_recipe(tiles_manifest, tmp_path))
    assert view_kind(recipe, 3) == "pathology"  # the tiny recipe's augment preset
    recipe = recipe.changed({"augment.preset": "none"})
    assert view_kind(recipe, 1) == "radiology" and view_kind(recipe, 3) == "pathology"
    recipe = recipe.changed({"pretrain.views": "radiology"})
    assert view_kind(recipe, 3) == "radiology"


def test_pretrain_writes_a_backbone_run_folder(
    tiles_manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="medvision")
    run = pretrain(recipe_from_dict(_recipe(tiles_manifest, tmp_path)))
    for name in ("model.safetensors", "last.pt", "recipe.yaml", "run.json", "pretrain.json", "train.log",
                 "plots/pretrain.png"):  # fmt: skip
        assert (run / name).is_file(), name
    meta = json.loads((run / "run.json").read_text())
    assert meta["kind"] == "pretrain" and meta["method"] == "simclr" and meta["in_chans"] == 3
    # the training split, every image of which the epochs draw, not one epoch's full batches (30 of 8: 24)
    n_train = sum(r["split"] == "train" for r in read_rows(run / "splits.csv"))
    assert n_train % 8 and meta["images"] == n_train
    assert f"SimCLR on {n_train} unlabelled training images" in caplog.text
    history = json.loads((run / "pretrain.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert all(0.0 <= h["knn_acc"] <= 1.0 for h in history)  # the labelled validation split's health check
    assert all(math.isfinite(h["train_loss"]) for h in history[1:])
    weights = load_file(str(run / "model.safetensors"))
    assert not any(k.startswith("classifier") for k in weights)  # the backbone only: no head, no projector
    assert not any(k.startswith("projector") for k in weights)
    with pytest.raises(RunError, match="already holds a run"):
        pretrain(recipe_from_dict(_recipe(tiles_manifest, tmp_path)))


def test_interrupted_pretraining_resumes_exactly(tiles_manifest: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    whole = pretrain(recipe_from_dict(_recipe(tiles_manifest, tmp_path, "whole")))
    real_plot = pretrain_run.plot_pretraining

    def crash_before_the_last_checkpoint(path: Path, history: list[dict[str, Any]]) -> Path:
        real_plot(path, history)
        if history[-1]["epoch"] == 2:
            raise KeyboardInterrupt  # killed after epoch 2's pretrain.json and plot, before its last.pt
        return path

    monkeypatch.setattr(pretrain_run, "plot_pretraining", crash_before_the_last_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        pretrain(recipe_from_dict(_recipe(tiles_manifest, tmp_path, "cut")))
    monkeypatch.undo()
    cut = tmp_path / "cut"
    before = torch.load(cut / "last.pt", weights_only=True)["fit"]
    assert before["epoch"] == 1 and before["seconds"] > 0
    assert main(["pretrain", "--resume", str(cut)]) == 0
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((cut / "pretrain.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [0, 1, 2]  # epoch 2 done again, its record with it
    # the wall time counts the process before the resume: at least every epoch's own time
    assert record["seconds"] > before["seconds"] and record["seconds"] >= sum(h.get("seconds", 0) for h in
                                                                              record["history"])  # fmt: skip


def test_init_from_a_pretrained_backbone(
    tiles_manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from medvision.runs import read_splits
    from medvision.tasks.train import train

    ssl = pretrain(recipe_from_dict(_recipe(tiles_manifest, tmp_path)))
    backbone = load_file(str(ssl / "model.safetensors"))
    assert set(read_splits(ssl).values()) == {"train"}  # what the backbone saw, whatever the folder holds later
    tree = tiny_recipe(tiles_manifest, tmp_path)
    tree["name"] = "probe"
    tree["model"]["init_from"] = str(ssl)
    tree["train"]["protocol"] = "linear_probe"
    caplog.set_level("INFO", logger="medvision")
    probe = train(recipe_from_dict(tree))
    assert "the source has no classifier" in caplog.text
    weights = load_file(str(probe / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in backbone.items())  # the frozen backbone is the pretrained one
    classes = json.loads((probe / "run.json").read_text())["classes"]
    assert weights["classifier.weight"].shape[0] == len(classes)  # the probe's head: one row per class
    tree["name"], tree["train"]["protocol"] = "finetuned", "finetune"
    finetuned = train(recipe_from_dict(tree))
    assert json.loads((finetuned / "metrics.json").read_text())["test"]["n"] > 0
    # another seed splits the same manifest otherwise: the backbone has seen some of that run's test images
    tree["name"], tree["seed"] = "reseeded", 1
    with pytest.raises(RunError, match=rf"model.init_from {ssl} trained on \d+ of this run's validation and test "
                                       r"images \(e\.g\. '.*'\): its split of .* \(seed 0\) is not this run's "
                                       r"\(seed 1\)"):  # fmt: skip
        train(recipe_from_dict(tree))
    assert not (tmp_path / "reseeded" / "model.safetensors").exists()


def test_pretrain_reads_a_flat_folder_of_unlabelled_images(tmp_path: Path) -> None:
    import cv2

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        cv2.imwrite(str(folder / f"img{i:02d}.png"), rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    argv = ["pretrain", str(_write(tmp_path, folder)), "--set", "pretrain.epochs=1"]
    assert main(argv) == 0
    history = json.loads((tmp_path / "runs" / "flat" / "pretrain.json").read_text())["history"]
    assert history[-1]["knn_acc"] is None  # no labels: no health check, and no error
    assert main(argv) == 2  # the folder holds a run: a clear error, nothing overwritten


def _write(tmp_path: Path, folder: Path) -> Path:
    import yaml

    tree = {"name": "flat", "output_dir": str(tmp_path / "runs"),
            "data": {"source": "folder", "path": str(folder), "image_size": 32, "batch_size": 8},
            "model": {"name": "test_efficientnet"}, "train": {"amp": "none"},
            "pretrain": {"proj_dim": 16, "proj_hidden": 32}}  # fmt: skip
    path = tmp_path / "flat.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.slow
def test_pretraining_on_two_ranks(tiles_manifest: Path, tmp_path: Path) -> None:
    """``medvision pretrain --nproc 2``: torchrun, gloo, the global batch split over the ranks."""
    import subprocess
    import sys

    import yaml

    path = tmp_path / "ssl.yaml"
    path.write_text(yaml.safe_dump(_recipe(tiles_manifest, tmp_path, "two")))
    proc = subprocess.run([sys.executable, "-m", "medvision", "pretrain", str(path), "--nproc", "2"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    history = json.loads((tmp_path / "two" / "pretrain.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2] and all(math.isfinite(h["train_loss"]) for h in history[1:])


def test_sync_bn_follows_the_same_rule_as_train(tiles_manifest: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """One set-up for both tasks: SyncBatchNorm on CPU ranks is an error in pretrain too (it was skipped)."""
    tree = _recipe(tiles_manifest, tmp_path, name="syncbn")
    tree["train"]["sync_bn"] = True
    monkeypatch.setattr(pretrain_run, "setup", lambda device: (Dist(0, 2), torch.device("cpu")))
    with pytest.raises(RunError, match="SyncBatchNorm runs on GPUs only"):
        pretrain(recipe_from_dict(tree))

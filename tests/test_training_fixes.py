"""Training details an audit found wrong: per-phase patience, accumulation's last group, the recorded LR, native
bf16 only, fp16 off CUDA, the checkpoint of a never-finite monitor with EMA, late trainable typos, frozen protocols'
ignored settings and the mode of atomically written files."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pytest
import torch
import torch.optim.optimizer as optim_hooks
from conftest import tiny_recipe
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import medvision.training.loop as loop
from medvision.errors import EnvironmentProblem
from medvision.io.files import atomic_write_text
from medvision.models.freeze import FreezeError
from medvision.recipe import RecipeError, TrainConfig, recipe_from_dict
from medvision.runtime import cpu_flags, native_cpu_bf16, resolve_amp
from medvision.tasks.benchmark.labels import _configure
from medvision.tasks.train import train


def _history(run: Path) -> list[dict[str, object]]:
    return json.loads((run / "metrics.json").read_text())["history"]


def _tree(manifest: Path, out: Path, **train_keys: object) -> dict[str, object]:
    tree = tiny_recipe(manifest, out, **train_keys)
    tree["evaluation"] = {"bootstrap": 0, "explain": 0}
    return tree


# ------------------------------------------------------------------------------- patience


def test_patience_counts_within_a_phase_and_resume_follows_it(
    tiles_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the first epoch improves, patience 1: the head phase stops after 2 of its 3 epochs, the full phase
    still trains (and stops after 1 of 3), the best is epoch 1. A run killed as the full phase starts (last.pt
    records that the head phase stopped early) resumes into the full phase: the same run, bit for bit."""
    phases = [{"name": "head", "epochs": 3, "trainable": "head", "lr": 1e-2, "bn": "frozen"},
              {"name": "full", "epochs": 3, "trainable": "all", "lr": 3e-3}]  # fmt: skip
    monkeypatch.setattr(loop.FitState, "improved", lambda self, *args, **kwargs: self.best is None)
    straight = train(recipe_from_dict(_tree(tiles_manifest, tmp_path / "a", phases=phases, patience=1)))
    history = _history(straight)
    assert [(h["epoch"], h["phase"]) for h in history] == [(1, "head"), (2, "head"), (3, "full")]
    assert json.loads((straight / "metrics.json").read_text())["best_epoch"] == 1
    log = (straight / "train.log").read_text()
    assert "this ends phase head; next full" in log and "this ends the run" in log

    real, calls = loop.train_one_epoch, {"n": 0}

    def dies_in_phase_two(*args: object, **kwargs: object) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    recipe = recipe_from_dict(_tree(tiles_manifest, tmp_path / "b", phases=phases, patience=1))
    monkeypatch.setattr(loop, "train_one_epoch", dies_in_phase_two)
    with pytest.raises(KeyboardInterrupt):
        train(recipe)
    assert torch.load(recipe_dir(recipe) / "last.pt", weights_only=True)["fit"]["phase"] == 0
    monkeypatch.setattr(loop, "train_one_epoch", real)
    resumed = train(recipe, resume=True)
    a, b = (torch.load(run / "last.pt", weights_only=True) for run in (straight, resumed))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    timeless = [[{k: v for k, v in h.items() if k not in ("seconds", "train_img_s")} for h in _history(run)]
                for run in (straight, resumed)]  # fmt: skip
    assert timeless[0] == timeless[1]
    fa, fb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def recipe_dir(recipe: object) -> Path:
    return Path(recipe.output_dir) / recipe.name  # type: ignore[attr-defined]


# ------------------------------------------------------------------------- one epoch's steps


def _epoch(accumulate: int, n: int = 12, batch: int = 4) -> tuple[nn.Linear, list[torch.Tensor], list[float], dict]:
    torch.manual_seed(0)
    x, y = torch.randn(n, 4), torch.randint(0, 2, (n,))
    model = nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    cfg = TrainConfig(phases=[{"epochs": 1, "lr": 0.1}], amp="none", channels_last=False, log_interval=1,
                      accumulate=accumulate)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    grads: list[torch.Tensor] = []
    lrs: list[float] = []

    def record(o: torch.optim.Optimizer, *_: object) -> None:
        if o is opt:
            assert model.weight.grad is not None
            grads.append(model.weight.grad.clone())
            lrs.append(o.param_groups[-1]["lr"])

    handle = optim_hooks.register_optimizer_step_pre_hook(record)
    try:
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        stats = loop.train_one_epoch(model, loader, opt, sched, scaler, cfg, torch.device("cpu"), "train", "t")
    finally:
        handle.remove()
    return model, grads, lrs, {"stats": stats, "x": x, "y": y}


def test_the_last_short_accumulation_group_averages_its_own_micro_batches() -> None:
    """3 batches, accumulate 2: groups {0, 1} and {2}; each step's gradient is its group's batch-mean gradient."""
    model, grads, _, rest = _epoch(accumulate=2)
    x, y = rest["x"], rest["y"]

    def mean_grad(rows: slice) -> torch.Tensor:
        model.zero_grad()
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        assert model.weight.grad is not None
        return model.weight.grad.clone()

    assert len(grads) == 2
    torch.testing.assert_close(grads[0], mean_grad(slice(0, 8)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[1], mean_grad(slice(8, 12)), atol=1e-6, rtol=1e-5)


def test_the_recorded_lr_is_the_one_the_last_step_used() -> None:
    _, _, lrs, rest = _epoch(accumulate=1)
    assert len(lrs) == 3 and lrs[-1] == pytest.approx(1e-9 / 3)
    assert rest["stats"]["lr"] == lrs[-1]  # not 1e-9 / 4, set by the scheduler after the last step


# ------------------------------------------------------------------------------ precision

#: Abridged /proc/cpuinfo of a Sapphire Rapids core (AVX512-BF16 and AMX) and of a Skylake-SP core (AVX512 only).
SAPPHIRE = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 amx_bf16 amx_tile
bogomips\t: 4000.00
"""
SKYLAKE = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni
bugs\t\t: spectre_v1 spectre_v2
"""


def test_native_cpu_bf16_reads_the_cpu_flags() -> None:
    assert {"avx512_bf16", "amx_bf16"} <= cpu_flags(SAPPHIRE) and "avx512f" in cpu_flags(SKYLAKE)
    assert native_cpu_bf16(SAPPHIRE) and not native_cpu_bf16(SKYLAKE)
    assert native_cpu_bf16(SAPPHIRE.replace(" avx512_bf16", ""))  # AMX alone computes bf16 too
    assert cpu_flags("processor\t: 0\n") == set() and not native_cpu_bf16("")


def test_auto_precision_on_this_machine_follows_its_flags() -> None:
    try:
        native = native_cpu_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert resolve_amp("auto", torch.device("cpu")) == ("bf16" if native else "none")


def test_auto_precision_on_a_gpu_with_emulated_bf16_is_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    """A T4 or V100: torch counts emulated bf16 unless asked not to; such a GPU trains in fp16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_amp("auto", torch.device("cuda")) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert resolve_amp("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # an older torch, without the argument
    assert resolve_amp("auto", torch.device("cuda")) == "fp16"


def test_fp16_training_off_cuda_is_refused(tiles_manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(EnvironmentProblem, match=r"train.amp 'fp16' needs a CUDA device .* device is 'cpu'"):
        resolve_amp("fp16", torch.device("cpu"), training=True)
    assert resolve_amp("fp16", torch.device("cpu")) == "fp16"  # evaluating an fp16 run on a CPU is fine
    if torch.cuda.is_available():
        pytest.skip("device auto resolves to CUDA here")
    recipe = recipe_from_dict(_tree(tiles_manifest, tmp_path, amp="fp16", device="auto"))
    with pytest.raises(EnvironmentProblem, match=r"train\.amp 'fp16'"):
        train(recipe)
    assert not (recipe_dir(recipe) / "last.pt").exists()


# ------------------------------------------------------------------------ checkpoints, recipes


def test_a_never_finite_monitor_keeps_the_validated_ema_weights(
    tiles_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """val_auc on a validation split of one class is NaN every epoch: model.safetensors is the moving average the
    epochs were validated with, not the raw weights. (``train`` itself monitors val_loss when validation lacks a
    class, :func:`~medvision.tasks.train.monitor_defined`; that switch is turned off here to reach the loop's own
    last resort, which any monitor that never becomes finite takes.)"""
    import medvision.tasks.train as train_task

    monkeypatch.setattr(train_task, "monitor_defined", lambda recipe, table, val: recipe)
    rows = list(csv.DictReader(tiles_manifest.open()))
    patients = sorted({r["patient_id"] for r in rows})
    one_class = [p for p in patients if len({r["label"] for r in rows if r["patient_id"] == p}) == 1]
    val = one_class[:2]
    assert len(val) == 2 and len({r["label"] for r in rows if r["patient_id"] in val}) == 1
    test = [p for p in patients if p not in val][:2]
    for r in rows:
        r["split"] = "val" if r["patient_id"] in val else "test" if r["patient_id"] in test else "train"
        r["path"] = str(tiles_manifest.parent / r["path"])
    manifest = tmp_path / "split.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tree = _tree(manifest, tmp_path / "runs", ema=0.9, phases=[{"epochs": 2, "lr": 1e-2}])
    for key in ("val_fraction", "test_fraction"):
        tree["data"].pop(key)  # type: ignore[attr-defined]
    run = train(recipe_from_dict(tree))
    assert all(h["val_auc"] is None or h["val_auc"] != h["val_auc"] for h in _history(run))  # NaN (JSON null)
    last, best = torch.load(run / "last.pt", weights_only=True), load_file(run / "model.safetensors")
    assert all(torch.equal(best[k], last["ema"][k].contiguous()) for k in best)
    assert not all(torch.equal(best[k], last["model"][k].contiguous()) for k in best)


def test_a_bad_token_in_a_later_phase_fails_before_the_first_epoch(
    tiles_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_epoch(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained an epoch before checking every phase")

    monkeypatch.setattr(loop, "train_one_epoch", no_epoch)
    phases = [{"name": "head", "epochs": 3, "trainable": "head", "lr": 1e-2},
              {"name": "full", "epochs": 2, "trainable": "blockz.4", "lr": 1e-3}]  # fmt: skip
    recipe = recipe_from_dict(_tree(tiles_manifest, tmp_path, phases=phases))
    with pytest.raises(FreezeError, match=r"blockz\.4"):
        train(recipe)
    assert not (recipe_dir(recipe) / "last.pt").exists()


@pytest.mark.parametrize("protocol", ["linear_probe", "knn"])
def test_frozen_protocols_refuse_fine_tuning_settings(tmp_path: Path, protocol: str) -> None:
    settings = {"ema": 0.999, "grad_clip": 1.0, "patience": 2, "accumulate": 4, "label_smoothing": 0.1,
                "monitor": "val_loss", "weight_decay": 0.0, "compile": True}  # fmt: skip
    for key, value in settings.items():
        tree = tiny_recipe(tmp_path / "m.csv", tmp_path, protocol=protocol, **{key: value})
        with pytest.raises(RecipeError, match=rf"train.{key}: .* protocol '{protocol}' never reads"):
            recipe_from_dict(tree)
    base = recipe_from_dict(tiny_recipe(tmp_path / "m.csv", tmp_path, **settings))
    with pytest.raises(RecipeError, match="never reads"):  # a derived copy passes the same rules
        base.changed({"train.protocol": protocol})
    probe = _configure(base, "imagenet", protocol, 1.0, 0, tmp_path, 0, 10)  # benchmark labels' probe of it
    assert probe.train.protocol == protocol and probe.train.ema is None and probe.train.label_smoothing == 0.0
    assert probe.train.phases == base.train.phases  # the rest is the base recipe's
    assert recipe_from_dict(tiny_recipe(tmp_path / "m.csv", tmp_path, protocol=protocol, knn_k=5, balance="loss"))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_mode_the_umask_gives(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        (tmp_path / "b.json").write_text("{}")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.json").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "b.json").stat().st_mode)

"""End to end on tiny data: train -> files -> evaluate -> resume; plus weights sources and failure modes."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import medvision.training.loop as loop
from medvision.cli import main
from medvision.models.backbone import PretrainedUnavailable, create_backbone
from medvision.recipe import ModelConfig, RecipeError, TrainConfig, dump_recipe, recipe_from_dict
from medvision.runs import RunError, mean_count
from medvision.tasks.demo import CLASSES, synthetic_tile
from medvision.tasks.evaluate import evaluate_run
from medvision.tasks.train import train


@pytest.fixture(scope="module")
def finished_run(tiles_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return train(recipe_from_dict(tiny_recipe(tiles_manifest, out)))


def test_train_writes_a_complete_run_folder(finished_run: Path) -> None:
    for name in ("recipe.yaml", "run.json", "model.safetensors", "last.pt", "metrics.json", "predictions.csv",
                 "report.md", "train.log"):  # fmt: skip
        assert (finished_run / name).is_file(), name
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert set(metrics) >= {"val", "test", "history", "best_epoch"}
    assert 0.0 <= metrics["test"]["acc"] <= 1.0 and 0.0 <= metrics["test"]["auc"] <= 1.0
    assert [h["phase"] for h in metrics["history"]] == ["head", "full"]
    rows = list(csv.DictReader((finished_run / "predictions.csv").open()))
    assert len(rows) == metrics["val"]["n"] + metrics["test"]["n"]
    assert set(rows[0]) == {"split", "id", "label", "pred", "prob_stroma", "prob_tumor"}
    assert "patient" not in (finished_run / "predictions.csv").read_text().splitlines()[0]
    log = (finished_run / "train.log").read_text()
    assert "phase head" in log and "trainable" in log and "frozen parameters" in log
    assert "test, per patient (mean of 6 images): AUC" in log  # 12 patients of 6 tiles each
    assert "| image | test |" in (finished_run / "report.md").read_text()
    saved = (finished_run / "recipe.yaml").read_text()
    assert str(Path(metrics["history"][0]["phase"])) in saved and "/" in saved.split("path:")[1].split()[0]


def test_run_reports_cis_operating_points_calibration_and_plots(finished_run: Path) -> None:
    metrics = json.loads((finished_run / "metrics.json").read_text())
    run = json.loads((finished_run / "run.json").read_text())
    assert run["decision"] == metrics["decision"] and metrics["decision"]["temperature"] > 0
    assert metrics["bootstrap"] == {"resamples": 50, "seed": 0, "level": 0.95}
    for level in ("image", "patient"):
        for split in ("val", "test"):
            s = metrics[level][split]
            assert {"auc", "acc", "balanced_acc", "average_precision", "calibration", "per_class",
                    "confusion_matrix", "operating_points"} <= set(s), (level, split)  # fmt: skip
            assert s["positive_class"] == "tumor" and len(s["operating_points"]) == 3
            assert "ece_before" in s["calibration"] and "ece_after" in s["calibration"]
    test = metrics["image"]["test"]
    assert test["auc"] == metrics["test"]["auc"] and "auc_ci" in test
    # 6 tiles per patient: the patient level has a sixth of the rows
    assert metrics["patient"]["test"]["n"] * 6 == test["n"] and metrics["patient"]["aggregate"] == "mean"
    for name in ("roc", "pr", "confusion", "reliability", "training"):
        assert (finished_run / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    md = (finished_run / "report.md").read_text()
    assert "## Operating points (test split)" in md and "](plots/roc.png)" in md and "chosen on the validation" in md
    html = (finished_run / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") >= 5 and "src='plots/" not in html  # self-contained
    assert "patient" not in (finished_run / "predictions.csv").read_text().splitlines()[0]


def test_evaluate_reproduces_test_metrics_and_scores_other_data(finished_run: Path, tiles_manifest: Path) -> None:
    trained = json.loads((finished_run / "metrics.json").read_text())["test"]
    out, metrics = evaluate_run(finished_run)
    assert metrics["auc"] == pytest.approx(trained["auc"], abs=1e-6)
    assert metrics["acc"] == pytest.approx(trained["acc"], abs=1e-6)
    assert (out / "metrics.json").is_file() and (out / "predictions.csv").is_file() and (out / "report.html").is_file()
    evaluated = json.loads((out / "metrics.json").read_text())
    run_metrics = json.loads((finished_run / "metrics.json").read_text())
    assert evaluated["decision"] == run_metrics["decision"]  # thresholds and temperature are the run's, not refitted
    assert evaluated["image"]["test"]["operating_points"] == run_metrics["image"]["test"]["operating_points"]
    out2, everything = evaluate_run(finished_run, data=str(tiles_manifest), allow_seen=True)
    assert everything["n"] == 72 and out2.name == "manifest-all"


def test_cli_train_evaluate_and_errors(finished_run: Path, tiles_manifest: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert main(["evaluate", str(finished_run)]) == 0
    assert "AUC" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {source: csv, path: m.csv}\nmodel: {name: resnet18}\n"
                   "train: {phases: [{epochs: 1, lr: 1e-3, trainabel: head}]}\n")  # fmt: skip
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.phases[0].trainabel: unknown key; did you mean 'trainable'?" in err
    good = tmp_path / "good.yaml"
    import yaml

    good.write_text(yaml.safe_dump(tiny_recipe(tiles_manifest, finished_run.parent)))
    assert main(["train", str(good)]) == 2  # the run folder exists already
    assert "--resume" in capsys.readouterr().err


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize("extra", [{}, {"ema": 0.9, "mixup": 0.4, "cutmix": 1.0, "label_smoothing": 0.1}],
                         ids=["plain", "ema_mixup_cutmix"])  # fmt: skip
def test_resume_after_interruption_is_exact(tiles_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            extra: dict[str, float]) -> None:  # fmt: skip
    phases = [{"name": "head", "epochs": 1, "trainable": "head", "lr": 1e-2},
              {"name": "full", "epochs": 2, "trainable": "all", "lr": 3e-3, "warmup": 0.2}]  # fmt: skip
    straight = train(recipe_from_dict(tiny_recipe(tiles_manifest, tmp_path / "a", phases=phases, **extra)))

    real = loop.train_one_epoch
    calls = {"n": 0}

    def dies_in_epoch_three(*args: object, **kwargs: object) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill in the middle of the 'full' phase")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    recipe = recipe_from_dict(tiny_recipe(tiles_manifest, tmp_path / "b", phases=phases, **extra))
    monkeypatch.setattr(loop, "train_one_epoch", dies_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        train(recipe)
    monkeypatch.setattr(loop, "train_one_epoch", real)
    interrupted = tmp_path / "b" / "tiny"
    fit_state = torch.load(interrupted / "last.pt", weights_only=True)["fit"]
    assert fit_state["epoch"] == 2 and fit_state["seconds"] > 0
    saved = (interrupted / "recipe.yaml").read_text()
    for key, value in (("train.label_smoothing", 0.3), ("seed", 7)):  # another recipe: refused, the folder untouched
        with pytest.raises(RunError, match=rf"cannot resume .* with another recipe: {key} differ"):
            train(recipe.changed({key: value}), resume=True)
    assert (interrupted / "recipe.yaml").read_text() == saved
    leftover = interrupted / ".last.pt.k1ll3d00.tmp"  # what a kill in the middle of a checkpoint's write leaves
    leftover.write_bytes(b"\0" * 64)
    resumed = train(recipe_from_dict(tiny_recipe(tiles_manifest, tmp_path / "b", phases=phases, **extra)), resume=True)
    assert not leftover.exists()
    metrics = json.loads((resumed / "metrics.json").read_text())
    # the run's wall time counts the process before the resume: at least every epoch's own time
    assert metrics["seconds"] > fit_state["seconds"]
    assert metrics["seconds"] >= sum(h["seconds"] for h in metrics["history"])
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if extra:  # the moving average resumed too, and the run's weights are the average
        ema_a, ema_b = (torch.load(run / "last.pt", weights_only=True)["ema"] for run in (straight, resumed))
        assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    history = json.loads((resumed / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_a_run_killed_before_its_first_checkpoint_says_to_start_again(tiles_manifest: Path, tmp_path: Path) -> None:
    recipe = recipe_from_dict(tiny_recipe(tiles_manifest, tmp_path))
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))  # what a kill before epoch 1's last.pt leaves
    with pytest.raises(RunError, match=r"stopped before its first checkpoint .* start it again with --overwrite"):
        train(recipe, resume=True)


def test_a_run_killed_after_it_stopped_early_resumes_without_training_on(
    tiles_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Early stopping (no epoch improves after the first, patience 1) ends the run at epoch 2 of 4; a kill during its
    final evaluation leaves last.pt at that point, and --resume trains no further epoch: the same run."""
    phases = [{"name": "all", "epochs": 4, "trainable": "all", "lr": 1e-2}]
    monkeypatch.setattr(loop.FitState, "improved", lambda self, *args, **kwargs: self.best is None)
    straight = train(recipe_from_dict(tiny_recipe(tiles_manifest, tmp_path / "a", phases=phases, patience=1)))
    assert [h["epoch"] for h in json.loads((straight / "metrics.json").read_text())["history"]] == [1, 2]

    import medvision.tasks.train as train_task

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("simulated kill in the final evaluation")

    recipe = recipe_from_dict(tiny_recipe(tiles_manifest, tmp_path / "b", phases=phases, patience=1))
    real_evaluate = train_task._evaluate_splits
    monkeypatch.setattr(train_task, "_evaluate_splits", killed)
    with pytest.raises(KeyboardInterrupt):
        train(recipe)
    monkeypatch.setattr(train_task, "_evaluate_splits", real_evaluate)

    def no_epoch(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained an epoch after early stopping")

    monkeypatch.setattr(loop, "train_one_epoch", no_epoch)
    resumed = train(recipe, resume=True)
    a, b = _state(straight), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    histories = [json.loads((run / "metrics.json").read_text())["history"] for run in (straight, resumed)]
    timeless = [[{k: v for k, v in h.items() if k not in ("seconds", "train_img_s")} for h in hs] for hs in histories]
    assert timeless[0] == timeless[1]


def test_nan_loss_stops_with_a_clear_message() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 2, 2), torch.randint(0, 2, (8,))), batch_size=4)
    cfg = TrainConfig(phases=[{"epochs": 1, "lr": 0.1}], amp="none", channels_last=False, log_interval=1)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(loop.NonFiniteLoss, match="loss became nan between steps 1 and 1"):
        loop.train_one_epoch(model, loader, opt, sched, scaler, cfg, torch.device("cpu"), "train", "p0 1/1")


def test_init_from_an_earlier_run_reinitialises_a_different_head(finished_run: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="medvision")
    model = create_backbone(ModelConfig(name="test_efficientnet", init_from=str(finished_run)), 5, 3)
    assert "head re-initialised" in caplog.text and "classifier.weight" in caplog.text
    saved = load_file(finished_run / "model.safetensors")
    own = model.state_dict()
    assert torch.equal(own["conv_stem.weight"], saved["conv_stem.weight"])
    assert own["classifier.weight"].shape[0] == 5
    same = create_backbone(ModelConfig(name="test_efficientnet", init_from=str(finished_run)), 2, 3)
    assert torch.equal(same.state_dict()["classifier.weight"], saved["classifier.weight"])


def test_init_from_adapts_a_stem_for_other_channels_and_refuses_another_backbone(
    finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An RGB run seeding a greyscale task: the stem is adapted as timm adapts ImageNet weights (never left random
    under the name of a head); a tensor of the backbone itself that does not fit is an error."""
    import shutil

    import timm
    from safetensors.torch import save_file

    caplog.set_level(logging.INFO, logger="medvision")
    saved = load_file(finished_run / "model.safetensors")
    grey = create_backbone(ModelConfig(name="test_efficientnet", init_from=str(finished_run)), 2, 1)
    expected = timm.models.adapt_input_conv(1, saved["conv_stem.weight"])
    assert torch.equal(grey.state_dict()["conv_stem.weight"], expected)
    assert "stem adapted from 3 to 1 input channel(s)" in caplog.text and "head re-initialised" not in caplog.text
    other = tmp_path / "other"
    shutil.copytree(finished_run, other)
    changed = dict(saved)
    key = next(k for k in saved if k.startswith("blocks.") and k.endswith("conv_pw.weight"))
    changed[key] = torch.zeros(saved[key].shape[0] + 1, *saved[key].shape[1:])
    save_file(changed, other / "model.safetensors")
    with pytest.raises(ValueError, match=rf"another architecture, not only another head: {key} "):
        create_backbone(ModelConfig(name="test_efficientnet", init_from=str(other)), 2, 3)


def test_local_pretrained_file_with_new_head_and_grayscale_stem(shared: Path) -> None:
    path = shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    file = load_file(path)
    model = create_backbone(ModelConfig(name="tf_efficientnet_lite0", pretrained=str(path)), 8, 3)
    assert torch.equal(model.state_dict()["blocks.6.0.conv_pw.weight"], file["blocks.6.0.conv_pw.weight"])
    assert model.get_classifier().out_features == 8
    grey = create_backbone(ModelConfig(name="tf_efficientnet_lite0", pretrained=str(path)), 2, 1)
    stem = grey.state_dict()["conv_stem.weight"]
    assert stem.shape[1] == 1
    torch.testing.assert_close(stem[:, 0], file["conv_stem.weight"].sum(dim=1))  # timm's in_chans adaptation


def test_missing_or_unreachable_pretrained_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PretrainedUnavailable, match="does not exist"):
        create_backbone(ModelConfig(name="resnet18", pretrained=str(tmp_path / "none.safetensors")), 2, 3)
    monkeypatch.setattr("medvision.models.backbone.reachable", lambda host, timeout=3.0: False)
    with pytest.raises(PretrainedUnavailable, match="cannot reach"):
        create_backbone(ModelConfig(name="resnet18", pretrained=True), 2, 3)


def test_demo_tiles_differ_by_nuclear_density_but_overlap() -> None:
    rng = np.random.default_rng(0)
    dark = {c: np.array([(synthetic_tile(rng, c == "tumor").mean(axis=2) < 140).mean() for _ in range(40)])
            for c in CLASSES}  # fmt: skip
    assert dark["tumor"].mean() > 2 * dark["stroma"].mean()
    # inflamed stroma is as crowded as the edge of a tumour: nuclear area alone ranks the classes
    # well (AUC 0.88-0.95 over eight seeds; tumour has 2.2-2.8x the dark area) but not perfectly,
    # so the demo has real errors to show
    auc = roc_auc_score(np.r_[np.zeros(40), np.ones(40)], np.r_[dark["stroma"], dark["tumor"]])
    assert 0.8 < auc < 0.98


def test_demo_patients_are_slides_with_or_without_tumour(tiles_manifest: Path) -> None:
    labels: dict[str, list[str]] = {}
    for row in csv.DictReader(tiles_manifest.open()):
        labels.setdefault(row["patient_id"], []).append(row["label"])
    assert len(labels) == 12 and all(len(v) == 6 for v in labels.values())
    for k, patient in enumerate(sorted(labels)):
        assert ("tumor" in labels[patient]) == (k % 2 == 0), (patient, labels[patient])


def test_early_stopping_with_accumulation_and_clipping(tiles_manifest: Path, tmp_path: Path) -> None:
    phases = [{"name": "still", "epochs": 5, "trainable": "all", "lr": 1e-12, "bn": "frozen"}]  # nothing changes
    recipe = recipe_from_dict(
        tiny_recipe(
            tiles_manifest, tmp_path, phases=phases, monitor="val_loss", patience=1, accumulate=2, grad_clip=1.0
        )
    )
    run_dir = train(recipe)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # an LR of 1e-12 moves val_loss by rounding noise at most: it stops improving within an epoch or two,
    # and patience 1 then stops the run one epoch after the best
    assert len(metrics["history"]) < 5 and metrics["best_epoch"] == len(metrics["history"]) - 1
    assert "early stopping" in (run_dir / "train.log").read_text()


def test_cli_explain_errors_and_images(finished_run: Path, tiles_manifest: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "errors"
    assert main(["explain", str(finished_run), "--out", str(out), "-n", "2", "--method", "gradcam++"]) == 0
    rows = list(csv.DictReader((out / "errors.csv").open()))
    assert len(rows) <= 4 and all(r["kind"] in ("false positive", "false negative") for r in rows)
    for r in rows:
        assert (out / r["file"]).read_bytes()[:4] == b"\x89PNG" and r["label"] != r["call"]
    if rows:
        assert (out / "errors_gradcam++.png").is_file()
    tile = next((tiles_manifest.parent / "tiles").glob("*.png"))
    assert main(["explain", str(finished_run), "--images", str(tile), "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / f"{tile.stem}_gradcam.png").is_file()
    assert main(["explain", str(finished_run), "--target", "tumor"]) == 2
    assert "--target applies to --images" in capsys.readouterr().err


def test_mean_count_is_whole_or_one_decimal() -> None:
    assert mean_count(12.0) == "12" and mean_count(np.float64(6.0)) == "6"
    assert mean_count(2.5) == "2.5" and mean_count(7 / 3) == "2.3"
    assert mean_count(2.96) == "3.0"  # not whole, so it keeps its decimal even where it rounds to one


def test_cli_explain_says_why_when_the_test_split_has_no_errors(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    # a task no model gets wrong: dark against light tiles; the run is trained for real, and its
    # test split checked to hold no error, before explain is asked for the errors' heatmaps
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = ["path,label"]
    for i in range(40):
        dark = i % 2 == 0
        grey = np.clip((40 if dark else 215) + rng.normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(tmp_path / "img" / f"{i:02d}.png"), grey)
        lines.append(f"img/{i:02d}.png,{'dark' if dark else 'light'}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    tree = tiny_recipe(tmp_path / "manifest.csv", tmp_path / "runs")
    tree["augment"] = {"preset": "none"}
    run_dir = train(recipe_from_dict(tree))
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert test["acc"] == 1.0 and test["n"] == 10, f"the easy run made errors on test: {test}"

    out = tmp_path / "explain"
    assert main(["explain", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"no misclassified images in the test split of {run_dir}: nothing to explain" in printed
    assert "--images FILE" in printed and "wrote 0" not in printed
    assert (out / "errors.csv").read_text().splitlines() == ["id,label,call,confidence,kind,file"]
    assert not list(out.glob("*.png"))


def test_soft_targets_and_an_odd_batch_match_hard_label_cross_entropy() -> None:
    """The soft-target loss of mixup/cutmix is cross-entropy: on smoothed one-hot targets it is F.cross_entropy."""
    cfg = TrainConfig(phases=[{"epochs": 1, "lr": 0.1}], mixup=0.4, label_smoothing=0.1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    images, labels = torch.randn(5, 3, 2, 2), torch.tensor([0, 2, 1, 1, 0])
    mix = loop.batch_mixer(cfg, 3)
    assert mix is not None
    same, soft = mix(images, labels)  # odd batch: not mixed, labels smoothed as timm smooths them
    assert torch.equal(same, images) and torch.allclose(soft.sum(1), torch.ones(5))
    criterion = loop.classification_loss(cfg)
    expected = F.cross_entropy(model(images), labels, label_smoothing=0.1, reduction="none")
    assert torch.allclose(criterion(model, images, soft), expected, atol=1e-6)
    np.random.seed(0)  # timm's Mixup draws lambda from NumPy's global generator (fit seeds it every epoch)
    mixed, targets = mix(images[:4].clone(), labels[:4])  # even batch: mixed with itself reversed (in place)
    assert targets.shape == (4, 3) and not torch.equal(mixed, images[:4])
    assert torch.allclose(targets.sum(1), torch.ones(4))


def test_ema_weights_are_the_checkpoint(tiles_manifest: Path, tmp_path: Path) -> None:
    phases = [{"name": "all", "epochs": 1, "trainable": "all", "lr": 3e-3}]
    run = train(recipe_from_dict(tiny_recipe(tiles_manifest, tmp_path, phases=phases, ema=0.9)))
    last = torch.load(run / "last.pt", weights_only=True)
    best = load_file(run / "model.safetensors")  # one epoch, so the best one: saved from the moving average
    assert all(torch.equal(best[k], last["ema"][k]) for k in best)
    assert any(not torch.equal(best[k], last["model"][k]) for k in best if best[k].is_floating_point())


def test_mixing_needs_hard_label_free_settings() -> None:
    with pytest.raises(RecipeError, match="focal_gamma needs hard labels"):
        recipe_from_dict(
            {
                "name": "x",
                "data": {"source": "csv", "path": "x.csv"},
                "model": {"name": "resnet18"},
                "train": {"mixup": 0.2, "focal_gamma": 2.0, "phases": [{"epochs": 1, "lr": 0.1}]},
            }
        )


def test_a_class_without_training_images_is_a_warning(tiles_manifest: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    tree = tiny_recipe(tiles_manifest, tmp_path, phases=[{"name": "all", "epochs": 1, "trainable": "all", "lr": 1e-3}])
    tree["data"]["classes"] = ["stroma", "tumor", "necrosis"]
    tree["evaluation"] = {"bootstrap": 0, "explain": 0}
    caplog.set_level("WARNING", logger="medvision")
    train(recipe_from_dict(tree))
    assert "class(es) ['necrosis'] have no training image: the model's output for them is never trained" in caplog.text

"""Grad-CAM on a model that has learnt a known cue: a bright square must light up the heatmap.

A tiny timm EfficientNet is trained with medvision's own ``train`` on synthetic 96-pixel images of
noise, where class "square" holds a bright 16-24 pixel square at a random place and class "empty"
holds none. The only evidence for "square" is the square, so a faithful heatmap must peak on it.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import timm
import torch
import yaml

from medvision.cli import main
from medvision.data.transforms import build_transforms
from medvision.gradcam import ExplainError, confident_errors, display_image, grad_cam, overlay, target_layer_name
from medvision.inference import load_run
from medvision.recipe import recipe_from_dict
from medvision.tasks.explain import explain_errors, explain_images, load_input
from medvision.tasks.train import train

SIZE = 96
Box = tuple[int, int, int]  # top row, left column, side


def square_image(rng: np.random.Generator, square: bool) -> tuple[np.ndarray, Box | None]:
    """A dark noisy uint8 image, with a bright square at a random place if ``square``."""
    image = rng.normal(40, 12, (SIZE, SIZE))
    box = None
    if square:
        side = int(rng.integers(16, 25))
        top, left = (int(v) for v in rng.integers(0, SIZE - side + 1, 2))
        image[top : top + side, left : left + side] = rng.normal(200, 12, (side, side))
        box = (top, left, side)
    return np.clip(image, 0, 255).astype(np.uint8), box


def write_images(folder: Path, n: int, seed: int, only_squares: bool = False) -> list[tuple[Path, str, Box | None]]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image, box = square_image(rng, only_squares or i % 2 == 0)
        path = folder / f"img{i:03d}.png"
        cv2.imwrite(str(path), image)
        out.append((path, "empty" if box is None else "square", box))
    return out


@pytest.fixture(scope="module")
def square_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder trained to tell squares from noise (about 5-10 s on two CPU cores)."""
    root = tmp_path_factory.mktemp("squares")
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "patient_id"])
        for i, (path, label, _) in enumerate(write_images(root / "images", 200, seed=0)):
            writer.writerow([path.relative_to(root).as_posix(), label, f"P{i:03d}"])
    recipe = {
        "name": "squares",
        "seed": 0,
        "output_dir": str(root / "runs"),
        "data": {"source": "csv", "path": str(manifest), "image_size": SIZE, "batch_size": 16,
                 "val_fraction": 0.2, "test_fraction": 0.1, "num_workers": 0},
        "model": {"name": "test_efficientnet"},
        "train": {"device": "cpu", "amp": "none", "channels_last": False, "monitor": "val_loss", "log_interval": 5,
                  "phases": [{"name": "all", "epochs": 8, "trainable": "all", "lr": 3e-3}]},
        "evaluation": {"bootstrap": 20},
    }  # fmt: skip
    return train(recipe_from_dict(recipe))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str, Box | None]]:
    """Square images the model never saw, with where their squares are."""
    return write_images(tmp_path_factory.mktemp("held_out"), 40, seed=123, only_squares=True)


def _distance(row: int, col: int, box: Box) -> int:
    """Chebyshev distance in pixels from (row, col) to the square (0 inside it)."""
    top, left, side = box
    return max(top - row, 0, row - (top + side - 1), left - col, 0, col - (left + side - 1))


def _peak_hits(heat: np.ndarray, boxes: list[Box], margin: int) -> float:
    """Share of maps whose maximum lies within ``margin`` pixels of the image's square."""
    peaks = [np.unravel_index(int(h.argmax()), h.shape) for h in heat]
    return float(np.mean([_distance(int(r), int(c), box) <= margin for (r, c), box in zip(peaks, boxes, strict=True)]))


def _contrast(heat: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """Mean heat inside each square over mean heat outside it."""
    out = []
    for h, (top, left, side) in zip(heat, boxes, strict=True):
        inside = np.zeros(h.shape, dtype=bool)
        inside[top : top + side, left : left + side] = True
        out.append(h[inside].mean() / max(h[~inside].mean(), 1e-6))
    return np.asarray(out)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_heatmap_peaks_on_the_square(square_run: Path, held_out: list[tuple[Path, str, Box | None]],
                                     method: str) -> None:  # fmt: skip
    recipe, meta, bundle = load_run(square_run, torch.device("cpu"))
    transform = build_transforms(None, SIZE, bundle.mean, bundle.std)
    images = torch.stack([load_input(p, recipe, bundle.in_chans, transform) for p, _, _ in held_out])
    square = meta["classes"].index("square")
    with torch.no_grad():
        correct = (bundle.model.eval()(images).argmax(dim=1) == square).numpy()
        stride = SIZE // bundle.model.forward_features(images[:1]).shape[-1]  # type: ignore[operator]
    assert correct.mean() >= 0.9, f"the model learnt too little to test its heatmaps: {correct.mean():.2f} correct"
    images = images[torch.from_numpy(correct)]
    boxes = [box for (_, _, box), ok in zip(held_out, correct, strict=True) if ok and box is not None]

    heat = grad_cam(bundle.model, images, torch.full((len(images),), square), method=method)  # type: ignore[arg-type]
    # A feature cell's value is drawn at the cell's centre, up to half a stride from where the cell
    # looks (grad_cam's docstring). Over six data seeds 80-100% of the peaks were that close; the
    # same maps scored against other images' squares (chance) reach 17-35%.
    hits = _peak_hits(heat, boxes, margin=stride // 2)
    assert hits >= 0.75, f"{method}: the peak is on the square in only {hits:.0%} of the images"
    assert _peak_hits(heat, boxes[7:] + boxes[:7], margin=stride // 2) <= 0.5  # the check can fail
    # independent of where the peak is drawn: the square is clearly hotter than the background
    contrast = _contrast(heat, boxes)
    assert np.mean(contrast > 1.5) >= 0.9, f"{method}: inside/outside heat {np.round(contrast, 2)}"
    if method == "gradcam":  # Grad-CAM is class-discriminative: the "empty" map avoids the square
        other = grad_cam(bundle.model, images, torch.full((len(images),), 1 - square), method="gradcam")
        assert np.median(_contrast(other, boxes)) < 0.5


def test_explain_images_writes_overlays_and_a_table(square_run: Path, held_out: list[tuple[Path, str, Box | None]],
                                                    tmp_path: Path) -> None:  # fmt: skip
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    paths = [held_out[0][0], broken, held_out[1][0]]
    written = explain_images(square_run, paths, tmp_path / "out", method="gradcam++", target_class="square")
    assert [p.name for p in written] == ["img000_gradcam++.png", "img001_gradcam++.png"]
    for path in written:
        picture = cv2.imread(str(path))
        assert picture is not None and picture.shape == (SIZE, SIZE, 3)
    rows = list(csv.DictReader((tmp_path / "out" / "explain.csv").open()))
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert rows[0]["target_class"] == "square" and rows[0]["method"] == "gradcam++"
    assert rows[0]["predicted_class"] in ("empty", "square") and 0.5 <= float(rows[0]["probability"]) <= 1.0
    assert rows[0]["overlay"] == "img000_gradcam++.png" and rows[0]["error"] == ""
    assert rows[1]["overlay"] == "" and "broken.png" in rows[1]["error"]

    again = explain_images(square_run, [held_out[2][0], held_out[2][0]], tmp_path / "twice")
    assert [p.name for p in again] == ["img002_gradcam.png", "img002_2_gradcam.png"]  # no silent overwrite
    with pytest.raises(ExplainError, match="'lesion' is not one of the run's classes"):
        explain_images(square_run, paths, tmp_path / "x", target_class="lesion")
    with pytest.raises(ExplainError, match="method 'cam'"):
        explain_images(square_run, paths, tmp_path / "x", method="cam")
    assert json.loads((square_run / "run.json").read_text())["classes"] == ["empty", "square"]


def test_explain_images_defaults_to_the_recipes_method(square_run: Path, held_out: list[tuple[Path, str, Box | None]],
                                                      tmp_path: Path) -> None:  # fmt: skip
    """``explain --images`` without --method uses evaluation.explain_method, as --help says (it used gradcam)."""
    run = tmp_path / "run"
    shutil.copytree(square_run, run)
    tree = yaml.safe_load((run / "recipe.yaml").read_text())
    tree.setdefault("evaluation", {})["explain_method"] = "gradcam++"
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree))
    image = held_out[0][0]
    assert main(["explain", str(run), "--images", str(image), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "img000_gradcam++.png").is_file()
    assert [r["method"] for r in csv.DictReader((tmp_path / "out" / "explain.csv").open())] == ["gradcam++"]
    # an explicit --method still wins
    assert main(["explain", str(run), "--images", str(image), "--out", str(tmp_path / "b"), "--method", "gradcam"]) == 0
    assert (tmp_path / "b" / "img000_gradcam.png").is_file()


@pytest.mark.parametrize("n", ["-1", "0", "two"])
def test_explain_refuses_n_below_one(n: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-1 used to keep all but the last error of each kind and 0 silently became the recipe's count."""
    with pytest.raises(SystemExit) as stop:
        main(["explain", str(tmp_path), "-n", n])
    assert stop.value.code == 2
    assert f"argument -n: {n!r}: expected a whole number >= 1" in capsys.readouterr().err
    with pytest.raises(ExplainError, match=r"n is 0; expected at least 1"):  # the library, before reading the run
        explain_errors(tmp_path / "no_such_run", n=0)


def test_explain_gives_the_runs_own_calibrated_tta_probability(tiles_manifest: Path, tmp_path: Path) -> None:
    """With evaluation.tta, an image's probability (and the class its heatmap is for) is the average over the views,
    as predictions.csv and score give it; one view's called 9 of 25 test images otherwise."""
    from conftest import tiny_recipe

    tree = tiny_recipe(tiles_manifest, tmp_path / "runs")
    tree["evaluation"] = {"bootstrap": 0, "explain": 0, "tta": ["hflip", "rot90"]}
    run = train(recipe_from_dict(tree))
    rows = [r for r in csv.DictReader((run / "predictions.csv").open()) if r["split"] == "test"]
    paths = [tiles_manifest.parent / r["id"] for r in rows]
    explain_images(run, paths, tmp_path / "out")
    explained = list(csv.DictReader((tmp_path / "out" / "explain.csv").open()))
    for row, got in zip(rows, explained, strict=True):
        assert got["predicted_class"] == row["pred"] == got["target_class"], row["id"]
        assert float(got["probability"]) == pytest.approx(float(row[f"prob_{row['pred']}"]), abs=2e-6), row["id"]


def test_heatmaps_are_bounded_with_frozen_weights_and_modes_restored() -> None:
    torch.manual_seed(0)
    model: Any = timm.create_model("test_resnet", num_classes=3)
    model.requires_grad_(False)
    model.train()
    model.bn1.eval()  # a frozen-BN policy must survive explaining
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():  # callers inside no_grad still get gradients
        heat = grad_cam(model, x, torch.tensor([0, 2]), method="gradcam++")
    assert heat.shape == (2, 64, 48) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    assert model.training and not model.bn1.training and model.layer1.training
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert grad_cam(model.eval(), x).shape == (2, 64, 48) and not model.training


def test_maps_without_positive_evidence_stay_zero() -> None:
    model: Any = timm.create_model("test_resnet", num_classes=2)
    torch.nn.init.zeros_(model.fc.weight)  # no class evidence anywhere: every gradient is zero
    for method in ("gradcam", "gradcam++"):
        heat = grad_cam(model, torch.randn(1, 3, 32, 32), method=method)
        assert np.array_equal(heat, np.zeros((1, 32, 32), np.float32))


def test_bad_models_methods_and_targets_are_refused() -> None:
    vit = timm.create_model("test_vit", num_classes=2, img_size=32)
    with pytest.raises(ExplainError, match=r"VisionTransformer.*\(1, \d+, \d+\).*needs a CNN"):
        grad_cam(vit, torch.randn(1, 3, 32, 32))
    cnn = timm.create_model("test_resnet", num_classes=2)
    with pytest.raises(ExplainError, match="method 'cam' is not one of"):
        grad_cam(cnn, torch.randn(1, 3, 32, 32), method="cam")  # type: ignore[arg-type]
    with pytest.raises(ExplainError, match=r"target \[2\]: expected one class index in \[0, 2\)"):
        grad_cam(cnn, torch.randn(1, 3, 32, 32), torch.tensor([2]))
    with pytest.raises(ExplainError, match=r"\(B, C, H, W\)"):
        grad_cam(cnn, torch.randn(3, 32, 32))


def test_target_layer_names() -> None:
    assert target_layer_name(timm.create_model("test_resnet")) == "layer4"
    assert target_layer_name(timm.create_model("test_efficientnet")) == "forward_features (after blocks.4)"
    assert target_layer_name(torch.nn.Linear(2, 2)) == "forward_features"


def test_display_image_and_overlay() -> None:
    grey = torch.tensor([[[0.0, 0.5], [1.0, 0.25]]])
    mean, std = (0.5,), (0.25,)
    picture = display_image((grey - 0.5) / 0.25, mean, std)
    assert picture.shape == (2, 2, 3) and picture.dtype == np.uint8
    assert picture[..., 0].tolist() == [[0, 128], [255, 64]] and (picture[..., 0] == picture[..., 2]).all()
    assert display_image(torch.full((1, 2, 2), 9.0), mean, std).max() == 255  # clipped, not wrapped
    rgb = display_image(torch.zeros(3, 4, 4), (0.2, 0.4, 0.6), (1.0, 1.0, 1.0))
    assert rgb[0, 0].tolist() == [51, 102, 153]
    with pytest.raises(ExplainError, match="C == len"):
        display_image(torch.zeros(3, 4, 4), mean, std)

    image = np.full((2, 2, 3), 100, np.uint8)
    heat = np.array([[0.0, 1.0], [0.5, 0.0]], np.float32)
    assert np.array_equal(overlay(image, heat, alpha=0.0), image)
    jet = overlay(image, heat, alpha=1.0)
    assert jet[0, 1, 0] > jet[0, 1, 2] and jet[0, 0, 2] > jet[0, 0, 0]  # hot is red, cold is blue (RGB)
    with pytest.raises(ExplainError, match="does not match image"):
        overlay(image, np.zeros((3, 3)))


def test_confident_errors_binary() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    p_pos = np.array([0.9, 0.6, 0.2, 0.1, 0.45, 0.8, 0.99, 0.3])
    probs = np.stack([1 - p_pos, p_pos], axis=1)
    errors = confident_errors(labels, probs, n=2)
    assert [(i, kind) for i, kind, _ in errors] == [
        (6, "false positive"), (0, "false positive"), (3, "false negative"), (7, "false negative")
    ]  # fmt: skip
    assert [round(c, 2) for _, _, c in errors] == [0.99, 0.9, 0.9, 0.7]
    flipped = confident_errors(labels, probs, n=1, positive=0)  # class 0 as the positive one
    assert flipped == [(3, "false positive", pytest.approx(0.9)), (6, "false negative", pytest.approx(0.99))]
    assert confident_errors(np.array([1, 0]), np.array([[0.1, 0.9], [0.8, 0.2]])) == []


def test_confident_errors_multiclass_and_bad_input() -> None:
    labels = np.array([0, 1, 2, 2, 1])
    probs = np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.9, 0.05, 0.05], [0.3, 0.3, 0.4]])
    assert [(i, kind) for i, kind, _ in confident_errors(labels, probs, n=1)] == [(3, "wrong"), (0, "wrong")]
    assert len(confident_errors(labels, probs, n=4)) == 4
    with pytest.raises(ValueError, match="positive 2"):
        confident_errors(np.array([0, 1]), np.array([[0.5, 0.5], [0.5, 0.5]]), positive=2)
    with pytest.raises(ValueError, match=r"labels \(N,\) and probs \(N, K>=2\)"):
        confident_errors(np.array([0, 1, 1]), np.array([[0.5, 0.5], [0.5, 0.5]]))

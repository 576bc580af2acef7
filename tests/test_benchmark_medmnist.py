"""`medvision benchmark medmnist` on a real BreastMNIST subset: seeds x variants, the published rows, paired
deltas, resume; and `--deterministic` reruns that are bit-identical."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_recipe

from medvision.cli import main
from medvision.io.files import sha256
from medvision.recipe import recipe_from_dict
from medvision.tasks.benchmark.medmnist import PUBLISHED, medmnist_benchmark, parse_variant
from medvision.tasks.benchmark.speed import BenchmarkError
from medvision.tasks.train import train


@pytest.fixture(scope="module")
def breast_subset(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 48 / 24 / 24 images of the official BreastMNIST splits, named so the published rows apply."""
    src = np.load(shared / "data" / "breastmnist.npz")
    out = tmp_path_factory.mktemp("medmnist") / "breastmnist.npz"
    n = {"train": 48, "val": 24, "test": 24}
    np.savez(out, **{f"{s}_{kind}": src[f"{s}_{kind}"][: n[s]] for s in n for kind in ("images", "labels")})
    return out


def _recipe_tree(npz: Path, out: Path) -> dict:
    tree = tiny_recipe(npz, out, phases=[{"name": "all", "epochs": 1, "trainable": "all", "lr": 3e-3}])
    tree["name"] = "breast_tiny"
    tree["data"] = {"source": "npz", "path": str(npz), "classes": ["malignant", "benign_or_normal"],
                    "image_size": 32, "batch_size": 16}  # fmt: skip
    tree["model"]["in_chans"] = 1
    tree["augment"] = {"preset": "radiology"}
    tree["evaluation"] = {"bootstrap": 50, "positive_class": "malignant"}
    return tree


def test_parse_variant() -> None:
    assert parse_variant("base:") == ("base", [])
    assert parse_variant("tta:evaluation.tta=[hflip,vflip]; train.label_smoothing=0") == (
        "tta", ["evaluation.tta=[hflip,vflip]", "train.label_smoothing=0"])  # fmt: skip
    with pytest.raises(BenchmarkError, match="NAME:KEY=VALUE"):
        parse_variant("no colon")
    with pytest.raises(BenchmarkError, match="is not KEY=VALUE"):
        parse_variant("x:train.label_smoothing")


def test_medmnist_benchmark_seeds_variants_and_published_rows(breast_subset: Path, tmp_path: Path) -> None:
    recipe = recipe_from_dict(_recipe_tree(breast_subset, tmp_path / "unused"))
    out = tmp_path / "bench"
    variants = [("base", []), ("ls", ["train.label_smoothing=0.2"])]
    result = medmnist_benchmark(recipe, [0, 1], variants, out, resamples=50)
    assert [(r.variant, r.seed) for r in result.rows] == [("base", 0), ("base", 1), ("ls", 0), ("ls", 1)]
    assert not any(r.error for r in result.rows)
    for row in result.rows:
        run = Path(row.run_dir)
        assert run == out / "runs" / f"breast_tiny__{row.variant}__s{row.seed}"
        metrics = json.loads((run / "metrics.json").read_text())
        assert row.auc == metrics["image"]["test"]["auc"] and row.acc == metrics["image"]["test"]["acc"]
        assert row.auc_lo <= row.auc <= row.auc_hi and 0 <= row.acc_youden <= 1
        assert row.amp == "none" and row.epochs == 1
    recipe_of = json.loads((Path(result.rows[2].run_dir) / "run.json").read_text())
    assert recipe_of["amp"] == "none"
    assert "label_smoothing: 0.2" in (Path(result.rows[2].run_dir) / "recipe.yaml").read_text()

    base, ls = result.summary
    assert base["seeds"] == ls["seeds"] == 2
    assert base["auc"] == pytest.approx(np.mean([r.auc for r in result.rows[:2]]))
    assert base["auc_sd"] == pytest.approx(np.std([r.auc for r in result.rows[:2]], ddof=1))
    (delta,) = result.deltas
    assert delta["variant"] == "ls" and delta["reference"] == "base" and delta["seeds"] == 2
    mean_diff = np.mean([result.rows[2].auc - result.rows[0].auc, result.rows[3].auc - result.rows[1].auc])
    assert delta["delta_auc"] == pytest.approx(mean_diff, abs=1e-9)  # the paired delta is the runs' own AUCs
    assert delta["delta_auc_lo"] <= delta["delta_auc"] <= delta["delta_auc_hi"]

    md = (out / "medmnist.md").read_text()
    for p in PUBLISHED["breastmnist"]:
        assert p.source in md and f"{p.auc:.4g}" in md
    assert "Machine: CPU" in md and "breastmnist: medvision `" in md  # the verdict sentence
    with (out / "medmnist.csv").open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 4

    stamp = {r.run_dir: (Path(r.run_dir) / "model.safetensors").stat().st_mtime_ns for r in result.rows}
    again = medmnist_benchmark(recipe, [0, 1], variants, out, resamples=50)  # finished runs are reused
    assert {r.run_dir: (Path(r.run_dir) / "model.safetensors").stat().st_mtime_ns for r in again.rows} == stamp
    assert [r.auc for r in again.rows] == [r.auc for r in result.rows]


def test_cli_benchmark_medmnist_rejects_a_bad_variant(breast_subset: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(_recipe_tree(breast_subset, tmp_path / "runs")))
    code = main(["benchmark", "medmnist", str(recipe), "--variant", "x:train.no_such_key=1", "--out",
                 str(tmp_path / "b"), "--seeds", "0"])  # fmt: skip
    assert code == 2 and "no_such_key" in capsys.readouterr().err
    assert not (tmp_path / "b" / "runs").exists()  # refused before any training


def test_deterministic_reruns_are_bit_identical(tiles_manifest: Path, tmp_path: Path) -> None:
    tree = tiny_recipe(tiles_manifest, tmp_path)
    tree["train"]["deterministic"] = True
    first = train(recipe_from_dict({**tree, "name": "a"}))
    second = train(recipe_from_dict({**tree, "name": "b"}))
    assert sha256(first / "model.safetensors") == sha256(second / "model.safetensors")
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (first, second))
    losses = [[(h["train_loss"], h["val_loss"], h["val_auc"]) for h in m["history"]] for m in (a, b)]
    assert losses[0] == losses[1] and a["image"] == b["image"]
    assert (first / "predictions.csv").read_bytes() == (second / "predictions.csv").read_bytes()
    assert json.loads((first / "run.json").read_text())["deterministic"] is True

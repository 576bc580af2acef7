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
from medvision.tasks.benchmark.medmnist import (
    PUBLISHED,
    SeedRun,
    machine,
    medmnist_benchmark,
    parse_seeds,
    parse_variant,
    read_run,
    source_side,
    to_markdown,
)
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

    # the variant's overrides change: its run is trained again, the reference's is still reused
    changed = medmnist_benchmark(recipe, [0], [("base", []), ("ls", ["train.label_smoothing=0.05"])], out,
                                 resamples=20)  # fmt: skip
    base_run, ls_run = (Path(r.run_dir) for r in changed.rows)
    assert (base_run / "model.safetensors").stat().st_mtime_ns == stamp[str(base_run)]
    assert (ls_run / "model.safetensors").stat().st_mtime_ns != stamp[str(ls_run)]
    assert "label_smoothing: 0.05" in (ls_run / "recipe.yaml").read_text()


def test_a_finished_run_with_undefined_metrics_is_read_as_nan_not_failed(tmp_path: Path) -> None:
    """metrics.json writes NaN as null: one class in validation leaves no Youden point (null threshold and
    confusion matrix), one class in test no AUC. The run finished; its undefined figures are NaN, the rest kept."""
    run = tmp_path / "run"
    run.mkdir()
    op = {"rule": "youden", "target": None, "threshold": None, "sensitivity": None, "specificity": None,
          "confusion_matrix": None}  # fmt: skip
    metrics = {"image": {"val": {"auc": None, "acc": 0.75},
                         "test": {"auc": None, "acc": 0.5, "auc_ci": [None, None], "acc_ci": [0.3, 0.7],
                                  "operating_points": [op]}},
               "history": [{}, {}], "seconds": 3.0, "best_epoch": 2}  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    meta = {"classes": ["a", "b"], "in_chans": 1, "mean": [0.5], "std": [0.5], "amp": "none", "model": "tiny"}
    (run / "run.json").write_text(json.dumps(meta))
    row = read_run(run, SeedRun(variant="base", seed=0))
    assert np.isnan(row.auc) and np.isnan(row.auc_lo) and np.isnan(row.val_auc) and np.isnan(row.acc_youden)
    assert (row.acc, row.acc_lo, row.acc_hi, row.val_acc, row.epochs, row.best_epoch) == (0.5, 0.3, 0.7, 0.75, 2, 2)
    assert not row.error


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


def test_one_seed_is_a_seed_not_a_count(caplog: pytest.LogCaptureFixture) -> None:
    """``--seeds 3`` is one run of seed 3 (``benchmark labels --seeds 3`` is three seeds): the log says so."""
    with caplog.at_level("WARNING", logger="medvision"):
        assert parse_seeds("0") == [0] and parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("3,") == [3]
        assert not caplog.records
        assert parse_seeds("3") == [3]
    assert "--seeds 3 is one run, of seed 3" in caplog.text and "not a count" in caplog.text


def test_repeated_seeds_are_refused_before_any_training(breast_subset: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """``--seeds 0,0`` would count one run twice (an SD of 0, a paired delta over 'two' seeds)."""
    assert parse_seeds("2, 0,1") == [2, 0, 1]
    for bad in ("0,0", "1,2,1"):
        with pytest.raises(BenchmarkError, match=r"seed \d is given more than once"):
            parse_seeds(bad)
    recipe = recipe_from_dict(_recipe_tree(breast_subset, tmp_path / "unused"))
    with pytest.raises(BenchmarkError, match="--seeds 0,0: seed 0 is given more than once"):
        medmnist_benchmark(recipe, [0, 0], [], tmp_path / "b")
    file = tmp_path / "r.yaml"
    file.write_text(json.dumps(_recipe_tree(breast_subset, tmp_path / "runs")))
    assert main(["benchmark", "medmnist", str(file), "--seeds", "0,1,0", "--out", str(tmp_path / "c")]) == 2
    assert "seed 0 is given more than once" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_table_states_the_files_image_size_and_sets_only_published_rows_of_that_size(
    shared: Path, tmp_path: Path
) -> None:
    """A MedMNIST+ 64 px file is other data than the 28 px one: its table says 64 px and shows no 28 px rows."""
    src = np.load(shared / "data" / "breastmnist.npz")
    small = tmp_path / "breastmnist.npz"
    big = tmp_path / "breastmnist_64.npz"
    arrays = {f"{s}_{k}": src[f"{s}_{k}"][:4] for s in ("train", "val", "test") for k in ("images", "labels")}
    np.savez(small, **arrays)
    np.savez(big, **{k: np.zeros((4, 64, 64), np.uint8) if k.endswith("images") else v for k, v in arrays.items()})
    host = machine()
    for npz, side, size in ((small, 28, 64), (big, 64, 64), (big, 64, 32)):
        tree = _recipe_tree(npz, tmp_path / "runs")
        tree["data"]["image_size"] = size
        recipe = recipe_from_dict(tree)
        assert source_side(recipe) == side
        summary = [{"variant": "base", "seeds": 1, "failed": 0, "val_auc": 0.9, "val_acc": 0.8, "auc": 0.85,
                    "acc": 0.8, "acc_youden": 0.8, "epochs": 1, "best_epoch": 1, "seconds": 6.0, "amp": "none",
                    "model": "test_efficientnet", "auc_lo": 0.7, "auc_hi": 0.95, "auc_sd": float("nan"),
                    "acc_lo": 0.7, "acc_hi": 0.9, "acc_sd": float("nan")}]  # fmt: skip
        md = to_markdown(recipe, summary, [], host, source_side(recipe))
        title = md.splitlines()[0]
        if side == 28:
            assert "28 px source images upsampled to 64 px" in title
            assert all(p.source in md for p in PUBLISHED["breastmnist"]) and "best published 28 px" in md
        else:
            resized = " downsampled to 32 px" if size == 32 else ""
            assert f"64 px source images{resized};" in title and "28 px" not in title
            assert not any(p.source in md for p in PUBLISHED["breastmnist"])  # no 28 px row beside a 64 px run
            assert "breastmnist at 28 px are not shown: this file's images are 64 px" in md
            assert "against the best published" not in md

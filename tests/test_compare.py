"""`medvision compare`: two real tiny runs on one test set, checked against scikit-learn and DeLong; the paired
bootstrap against a direct computation; mismatched runs refused with errors naming the runs; the CLI's codes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_recipe
from sklearn.metrics import accuracy_score, roc_auc_score

from medvision.cli import main
from medvision.intervals import delong_test, paired_bootstrap
from medvision.metrics import compute_accuracy, compute_auc
from medvision.recipe import recipe_from_dict
from medvision.tasks.compare import CompareError, compare_runs
from medvision.tasks.train import train

RESAMPLES = 200


@pytest.fixture(scope="module")
def two_runs(tiles_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two recipes that differ in backbone only (same data, seed and fractions: the same test images)."""
    out = tmp_path_factory.mktemp("compare_runs")
    runs = []
    for name, model in (("effnet", "test_efficientnet"), ("resnet", "test_resnet")):
        tree = tiny_recipe(tiles_manifest, out, phases=[{"name": "all", "epochs": 1, "trainable": "all", "lr": 3e-3}])
        tree.update(name=name, model={"name": model},
                    evaluation={"bootstrap": 0, "explain": 0, "patient_aggregate": "max"})  # fmt: skip
        runs.append(train(recipe_from_dict(tree)))
    return runs[0], runs[1]


def _rows(run: Path, split: str = "test") -> list[dict[str, str]]:
    with (run / "predictions.csv").open(newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["split"] == split]


def _arrays(run: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """ids, 0/1 labels (tumor = 1) and (N, 2) probabilities, read straight from predictions.csv."""
    rows = sorted(_rows(run), key=lambda r: r["id"])
    y = np.array([r["label"] == "tumor" for r in rows], dtype=np.int64)
    p = np.array([[float(r["prob_stroma"]), float(r["prob_tumor"])] for r in rows])
    return [r["id"] for r in rows], y, p


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _rewrite(run: Path, change) -> None:  # type: ignore[no-untyped-def]
    with (run / "predictions.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = list(reader.fieldnames or []), list(reader)
    rows = [r for r in (change(r) for r in rows) if r is not None]
    with (run / "predictions.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_the_table_is_sklearn_and_delong_on_the_predictions(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_runs
    result = compare_runs([a, b], out=tmp_path / "cmp", n_resamples=RESAMPLES)
    ids_a, y, pa = _arrays(a)
    ids_b, y_b, pb = _arrays(b)
    assert (
        ids_a == ids_b
        and (y == y_b).all()
        and len(y) == json.loads((a / "run.json").read_text())["split_sizes"]["test"]
    )
    image = result.data["levels"]["image"]
    for name, p in (("effnet", pa), ("resnet", pb)):
        row = image["runs"][name]
        assert row["n"] == len(y)
        assert row["auc"] == pytest.approx(roc_auc_score(y, p[:, 1]), abs=1e-12)
        assert row["acc"] == pytest.approx(accuracy_score(y, p.argmax(axis=1)), abs=1e-12)
        assert row["auc_ci"][0] <= row["auc_ci"][1]
        assert f"| {name} | {len(y)} | {row['auc']:.3f} (" in result.markdown
    (pair,) = image["pairs"]
    assert (pair["reference"], pair["run"]) == ("effnet", "resnet")
    assert pair["delong_p"] == pytest.approx(delong_test(y, pa[:, 1], pb[:, 1])["p"], abs=1e-12)
    for metric, score in (("auc", roc_auc_score(y, pb[:, 1]) - roc_auc_score(y, pa[:, 1])),
                          ("acc", accuracy_score(y, pb.argmax(1)) - accuracy_score(y, pa.argmax(1)))):  # fmt: skip
        lo, hi = pair[metric]["ci"]
        assert pair[metric]["diff"] == pytest.approx(score, abs=1e-12)
        assert lo <= pair[metric]["diff"] <= hi
        assert 0 < pair[metric]["p"] <= 1
    assert len(pair["verdicts"]) == 2 and all(v.startswith("resnet") for v in pair["verdicts"])
    assert "n/a (binary only)" not in result.markdown
    assert sorted(p.name for p in result.files) == ["compare.html", "compare.json", "compare.md"]
    assert (tmp_path / "cmp" / "plots" / "roc_image.png").stat().st_size > 1000


def test_the_patient_level_aggregates_as_the_recipe_says(two_runs: tuple[Path, Path], tmp_path: Path,
                                                         tiles_manifest: Path) -> None:  # fmt: skip
    a, b = two_runs
    patient_of = {r["path"]: r["patient_id"] for r in csv.DictReader(tiles_manifest.open())}
    result = compare_runs([a, b], out=tmp_path / "cmp", n_resamples=RESAMPLES)
    level = result.data["levels"]["patient"]
    for name, run in (("effnet", a), ("resnet", b)):
        ids, y, p = _arrays(run)
        worst: dict[str, tuple[int, float]] = {}  # the recipe's max: a patient is its most suspicious image
        for i, label, prob in zip(ids, y, p[:, 1], strict=True):
            old = worst.get(patient_of[i], (0, 0.0))
            worst[patient_of[i]] = (max(old[0], int(label)), max(old[1], float(prob)))
        yp, pp = np.array([v[0] for v in worst.values()]), np.array([v[1] for v in worst.values()])
        assert level["runs"][name]["n"] == len(worst) < len(ids)
        assert level["runs"][name]["auc"] == pytest.approx(roc_auc_score(yp, pp), abs=1e-12)
        assert level["runs"][name]["acc"] == pytest.approx(accuracy_score(yp, pp > 0.5), abs=1e-12)
    assert "aggregated by `max`" in result.markdown and "## Per patient" in result.markdown


def test_a_better_run_is_called_better_and_identical_runs_are_not(two_runs: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:  # fmt: skip
    a, _ = two_runs

    def scored(name: str, tumor: tuple[float, float], other: tuple[float, float]) -> Path:
        """A copy of a real run whose test probabilities of tumor are drawn from ``tumor`` for tumour images and from
        ``other`` for the rest (uniform, seeded by the name)."""
        run, rng = _copy(a, tmp_path / name), np.random.default_rng(len(name))

        def change(row: dict[str, str]) -> dict[str, str]:
            if row["split"] == "test":
                p = rng.uniform(*(tumor if row["label"] == "tumor" else other))
                row.update(prob_tumor=f"{p:.6f}", prob_stroma=f"{1 - p:.6f}")
            return row

        _rewrite(run, change)
        return run

    poor = scored("poor", (0.2, 0.5), (0.3, 0.7))
    perfect = scored("perfect", (0.6, 0.9), (0.1, 0.4))
    twin = _copy(poor, tmp_path / "twin")
    result = compare_runs([poor, perfect, twin], out=tmp_path / "cmp", n_resamples=RESAMPLES)
    better, same = result.data["levels"]["image"]["pairs"]
    _, y, p_poor = _arrays(poor)
    assert result.data["levels"]["image"]["runs"]["perfect"]["auc"] == 1.0
    assert better["auc"]["diff"] == pytest.approx(1 - roc_auc_score(y, p_poor[:, 1]))
    assert better["auc"]["ci"][0] > 0 and better["auc"]["p"] < 0.05
    assert better["verdicts"][0].startswith(f"perfect is better than poor on AUC (ΔAUC {better['auc']['diff']:+.3f} [")
    # the images are 3 patients' tiles, drawn patient by patient: a resample of three tumour-free patients has no
    # tumour tile and no AUC, and is dropped; the p-value's floor is 2 / (1 + the resamples kept)
    kept = better["auc"]["resamples"]
    assert 100 < kept < RESAMPLES
    assert better["verdicts"][0].endswith(f"bootstrap p≤{2 / (1 + kept):.3f}, DeLong p<0.001)"), better["verdicts"][0]
    assert same["auc"]["diff"] == 0 and tuple(same["auc"]["ci"]) == (0, 0) and same["auc"]["p"] == 1
    assert "twin vs poor: no difference shown on AUC (CI of ΔAUC includes 0" in same["verdicts"][0]
    assert "not adjusted for multiple testing" in result.markdown


def test_runs_tested_on_different_images_labels_or_classes_are_refused(two_runs: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:  # fmt: skip
    a, b = two_runs
    test_ids = sorted(r["id"] for r in _rows(b))
    fewer = _copy(b, tmp_path / "fewer")
    _rewrite(fewer, lambda r: None if r["id"] in test_ids[:2] else r)
    with pytest.raises(CompareError) as err:
        compare_runs([a, fewer], out=tmp_path / "x")
    text = str(err.value)
    assert str(a) in text and str(fewer) in text and "not tested on the same test set" in text
    assert "2 id(s) only in the first" in text and test_ids[0] in text and "only in the second" not in text

    relabelled = _copy(b, tmp_path / "relabelled")
    _rewrite(relabelled, lambda r: {**r, "label": "tumor"} if r["split"] == "test" else r)
    with pytest.raises(CompareError, match=r"label \d+ of the \d+ test images differently .* is 'stroma' in the first"):
        compare_runs([a, relabelled], out=tmp_path / "x")

    other = tmp_path / "other"
    other.mkdir()
    rows = _rows(a)
    (other / "predictions.csv").write_text("split,id,label,pred,prob_benign,prob_malignant\n" + "".join(
        f"test,{r['id']},benign,benign,0.5,0.5\n" for r in rows))  # fmt: skip
    with pytest.raises(CompareError, match=r"other has classes \['benign', 'malignant'\] but .*effnet has"):
        compare_runs([a, other], out=tmp_path / "x")


def test_the_patient_level_takes_each_runs_own_positive_class_in_its_own_class_order(
    two_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """A run listing its classes the other way round (tumor first, and positive) is the same model: the same
    patient numbers. Runs with different positive classes label mixed patients differently: no patient level."""
    a, _ = two_runs
    flipped = _copy(a, tmp_path / "flipped")
    with (a / "predictions.csv").open(newline="") as fh:
        fields = list(csv.DictReader(fh).fieldnames or [])
    order = [f for f in fields if not f.startswith("prob_")] + ["prob_tumor", "prob_stroma"]
    rows = list(csv.DictReader((a / "predictions.csv").open(newline="")))
    with (flipped / "predictions.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=order)
        writer.writeheader()
        writer.writerows(rows)
    meta = json.loads((a / "run.json").read_text())
    assert meta["classes"] == ["stroma", "tumor"] and meta["decision"]["positive"] in (1, None)
    meta["classes"], meta["decision"]["positive"] = ["tumor", "stroma"], 0
    meta["data"] = "/mnt/site_b/manifest.csv"  # the same ids and labels, read from elsewhere
    (flipped / "run.json").write_text(json.dumps(meta))
    result = compare_runs([a, flipped], out=tmp_path / "cmp", n_resamples=RESAMPLES)
    assert "The runs read their images from different data (effnet: `" in result.markdown
    assert "flipped: `/mnt/site_b/manifest.csv`): their ids and labels agree, but nothing here checks" in (
        result.markdown
    )
    grouped = result.data["levels"]["image"]["runs"]["effnet"]["auc_ci"]  # a patient's images drawn together
    level = result.data["levels"]["patient"]
    for metric in ("auc", "acc"):
        ours = level["runs"]["effnet"][metric]
        assert level["runs"]["flipped"][metric] == pytest.approx(ours, nan_ok=True)
        assert level["pairs"][0][metric]["diff"] == pytest.approx(0.0, nan_ok=True)
    # and the other way round: the reference in the flipped order
    again = compare_runs([flipped, a], out=tmp_path / "cmp2", n_resamples=RESAMPLES)
    assert again.data["levels"]["patient"]["runs"]["effnet"]["acc"] == level["runs"]["effnet"]["acc"]

    stroma = _copy(a, tmp_path / "stroma")
    meta = json.loads((a / "run.json").read_text())
    meta["decision"]["positive"] = 0
    (stroma / "run.json").write_text(json.dumps(meta))
    result = compare_runs([a, stroma], out=tmp_path / "cmp3", n_resamples=RESAMPLES)
    assert "patient" not in result.data["levels"]
    assert "No patient level: the runs name different positive classes (effnet `tumor`, stroma `stroma`)" in (
        result.markdown
    )
    # no patient level, but each image's patient is known: the image-level bootstrap still draws patients whole
    assert result.data["levels"]["image"]["runs"]["effnet"]["auc_ci"] == grouped
    assert "the image-level CIs and Δ resample patients, not images" in result.markdown
    (stroma / "recipe.yaml").unlink()  # one run's patients unknown: the other run's data still tell them
    result = compare_runs([a, stroma], out=tmp_path / "cmp4", n_resamples=RESAMPLES)
    assert result.data["levels"]["image"]["runs"]["effnet"]["auc_ci"] == grouped
    (a / "recipe.yaml").rename(tmp_path / "recipe.yaml")  # no run's: the images are independent, and it says so
    try:
        result = compare_runs([a, stroma], out=tmp_path / "cmp5", n_resamples=RESAMPLES)
    finally:
        (tmp_path / "recipe.yaml").rename(a / "recipe.yaml")
    assert result.data["levels"]["image"]["runs"]["effnet"]["auc_ci"] != grouped
    assert "treat the images as independent, as each image's patient is unknown (" in result.markdown


def test_a_probability_that_is_not_one_is_refused_naming_the_file_and_line(two_runs: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:  # fmt: skip
    a, b = two_runs
    first = next(r["id"] for r in _rows(b))
    for value in ("nan", "inf", "-0.5", "1.2"):
        bad = _copy(b, tmp_path / f"bad{value}")
        _rewrite(bad, lambda r, v=value: {**r, "prob_stroma": v} if r["id"] == first and r["split"] == "test" else r)
        shown = value.replace(".", "[.]")
        with pytest.raises(CompareError, match=rf"predictions.csv, line \d+: prob_stroma = {shown}\S*; expected a "
                                               r"probability in \[0, 1\]"):  # fmt: skip
            compare_runs([a, bad], out=tmp_path / "x")


def test_more_than_two_classes_use_the_macro_auc_and_say_delong_is_binary_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    classes = ["a", "b", "c"]
    runs, probs = [], []
    for name, signal in (("weak", 0.5), ("strong", 3.0)):
        logits = rng.normal(size=(len(y), 3)) + signal * np.eye(3)[y]
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        folder = tmp_path / name  # a folder with predictions.csv only, as an evaluate output: image level only
        folder.mkdir()
        order = [0, 1, 2] if name == "weak" else [2, 0, 1]  # the second run lists its classes in another order
        lines = ["split,id,label,pred," + ",".join(f"prob_{classes[c]}" for c in order)]
        for i, (k, row) in enumerate(zip(y, p, strict=True)):
            values = ",".join(f"{row[c]:.6f}" for c in order)
            lines.append(f"test,img{i}.png,{classes[k]},{classes[int(row.argmax())]},{values}")
        (folder / "predictions.csv").write_text("\n".join(lines) + "\n")
        runs.append(folder)
        probs.append(np.array([[float(f"{v:.6f}") for v in row] for row in p]))
    result = compare_runs(runs, out=tmp_path / "cmp", n_resamples=RESAMPLES)
    image = result.data["levels"]["image"]
    for name, p in zip(("weak", "strong"), probs, strict=True):
        assert image["runs"][name]["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"), abs=1e-12)
    (pair,) = image["pairs"]
    assert pair["delong_p"] is None and pair["auc"]["ci"][0] > 0
    assert "n/a (binary only)" in result.markdown and "with 3 classes it does not apply" in result.markdown
    assert "No patient level: " in result.markdown and "patient" not in result.data["levels"]


def test_paired_bootstrap_is_the_direct_computation() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(40) < 0.4).astype(np.int64)
    a = np.clip(y * 0.3 + rng.random(40) * 0.7, 0, 1)
    b = np.clip(y * 0.6 + rng.random(40) * 0.4, 0, 1)
    pa, pb = np.stack([1 - a, a], 1), np.stack([1 - b, b], 1)
    metrics = {"auc": compute_auc, "acc": compute_accuracy}
    got = paired_bootstrap(y, pa, pb, metrics, n_resamples=120, seed=7, level=0.9)
    draw = np.random.default_rng(7)  # the same draws, by hand: within each class, the classes in sorted order
    strata = [np.flatnonzero(y == 0), np.flatnonzero(y == 1)]
    diffs: dict[str, list[float]] = {"auc": [], "acc": []}
    for _ in range(120):
        idx = np.concatenate([draw.choice(g, size=len(g), replace=True) for g in strata])
        diffs["auc"].append(roc_auc_score(y[idx], b[idx]) - roc_auc_score(y[idx], a[idx]))
        diffs["acc"].append(accuracy_score(y[idx], b[idx] > 0.5) - accuracy_score(y[idx], a[idx] > 0.5))
    for name, d in diffs.items():
        arr = np.array(d)
        assert got[name]["diff"] == pytest.approx(
            roc_auc_score(y, b) - roc_auc_score(y, a)
            if name == "auc"
            else np.mean((b > 0.5) == y) - np.mean((a > 0.5) == y)
        )
        assert got[name]["ci"] == pytest.approx((np.quantile(arr, 0.05), np.quantile(arr, 0.95)))
        p = min(1.0, 2 * (1 + min((arr <= 0).sum(), (arr >= 0).sum())) / 121)
        assert got[name]["p"] == pytest.approx(p) and got[name]["resamples"] == 120
    with pytest.raises(ValueError, match="40 labels but 39 and 40 prediction rows"):
        paired_bootstrap(y, pa[:39], pb, metrics)


def test_the_html_is_self_contained(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    compare_runs(list(two_runs), out=tmp_path / "cmp", n_resamples=RESAMPLES)
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert page.count("src='data:image/png;base64,") == 2  # the image and the patient ROC
    assert "src='plots/" not in page and "<table>" in page
    assert "![ROC curves" in (tmp_path / "cmp" / "compare.md").read_text()


def test_cli_exit_codes(two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = two_runs
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out), "--resamples", "50"]) == 0
    printed = capsys.readouterr().out
    assert "| comparison | ΔAUC" in printed and f"wrote {out / 'compare.md'}" in printed
    assert main(["compare", str(a), "--out", str(out)]) == 2
    assert (
        capsys.readouterr().err.strip() == "medvision compare: error: compare needs at least two runs; got 1: " + str(a)
    )
    assert main(["compare", str(a), str(b), "--split", "val", "--out", str(out / "val")]) == 0
    page = (out / "val" / "compare.md").read_text()
    assert "val (selection split: optimistic) split:" in page and "its numbers are optimistic" in page
    assert "(selection split" not in (out / "compare.md").read_text()  # the test split: no such label
    assert main(["compare", str(a), str(b), "--split", "train", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medvision compare: error: ") and "no rows of split 'train'" in err[0]
    fewer = _copy(b, tmp_path / "fewer")
    _rewrite(fewer, lambda r: None if r["split"] == "test" and r["id"].endswith("_00.png") else r)
    assert main(["compare", str(a), str(fewer), "--out", str(out)]) == 2
    assert "were not tested on the same test set" in capsys.readouterr().err

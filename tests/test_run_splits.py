"""A run's split is the one it recorded (``splits.csv``), not one recomputed from the data as it is now; evaluating
data the run trained on is refused or counted; a slide run pins its stain reference's pixels."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import read_rows, tiny_recipe, write_rows

from medvision.data.sources import load_table
from medvision.data.table import grouped_stratified_split, patient_order
from medvision.recipe import recipe_from_dict
from medvision.runs import RunError, ScoringSpec, read_splits
from medvision.runtime import Dist
from medvision.tasks.evaluate import evaluate_run
from medvision.tasks.train import refuse_seen_images, train
from medvision.training.setup import keep_splits
from medvision.wsi.source import check_stain_reference, stain_fingerprint

ONE_EPOCH = [{"name": "all", "epochs": 1, "trainable": "all", "lr": 3e-3}]


@pytest.fixture(scope="module")
def own_run(tiles_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny run on a private copy of the tiles (the tests add and remove images), and that copy's manifest."""
    data = tmp_path_factory.mktemp("data") / "tiles"
    shutil.copytree(tiles_manifest.parent, data)
    manifest = data / tiles_manifest.name
    tree = tiny_recipe(manifest, tmp_path_factory.mktemp("runs"), phases=ONE_EPOCH)
    tree["data"]["num_workers"] = 0
    tree["evaluation"]["explain"] = 0
    return train(recipe_from_dict(tree)), manifest


def test_evaluate_tests_the_recorded_split_after_images_are_added_and_refuses_when_one_is_gone(
    own_run: tuple[Path, Path],
) -> None:
    run, manifest = own_run
    held = read_splits(run)
    assert held is not None
    recorded_test = sorted(i for i, s in held.items() if s == "test")
    trained = {r["id"] for r in read_rows(run / "predictions.csv") if r["split"] == "test"}
    assert sorted(trained) == recorded_test and set(held.values()) == {"train", "val", "test"}
    original = manifest.read_text()
    rows = read_rows(manifest)
    # a new patient's images arrive after training, from a patient a recomputed split deals to test: the run still
    # tests on the images it held out, none of the new ones
    for k in range(6):
        shutil.copy(manifest.parent / rows[k]["path"], manifest.parent / f"new_{k}.png")
    try:
        for late in (f"late-patient-{j}" for j in range(50)):
            new = [{**rows[k], "path": f"new_{k}.png", "patient_id": late} for k in range(6)]
            write_rows(manifest, rows + new)
            recipe = recipe_from_dict(json.loads(json.dumps(tiny_recipe(manifest, run.parent))))
            now = load_table(recipe.data, recipe.seed)
            recomputed = {now.ids[i] for i in now.indices("test")}
            if recomputed - set(recorded_test):
                break
        # the stable split makes room for it by moving at most the held-out patient dealt last
        # (test_the_split_of_a_patient_survives_...); the run must not test on the newcomer even so
        patient = {r["path"]: r["patient_id"] for r in rows}
        assert {r["path"] for r in new} <= recomputed
        assert len({patient[i] for i in set(recorded_test) - recomputed}) <= 1
        out, _ = evaluate_run(run, out=run / "eval" / "after-adding")
        evaluated = sorted(r["id"] for r in read_rows(out / "predictions.csv"))
        assert evaluated == recorded_test  # exactly the held-out images, none of the new ones
        report = (out / "report.md").read_text()
        assert f"split sizes: test {len(recorded_test)}" in report
        # one of the run's test images is gone: refused, naming how many and one of them
        gone = recorded_test[0]
        write_rows(manifest, [r for r in rows if r["path"] != gone])
        with pytest.raises(RunError, match=rf"1 of the images the run held in its test split .*{gone}"):
            evaluate_run(run, out=run / "eval" / "after-removing")
    finally:
        manifest.write_text(original)


def test_evaluate_counts_the_images_in_no_split_by_id_when_one_is_removed_and_one_added(
    own_run: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    run, manifest = own_run
    held = read_splits(run)
    assert held is not None
    original = manifest.read_text()
    rows = read_rows(manifest)
    trained = next(r for r in rows if held.get(r["path"]) == "train")
    shutil.copy(manifest.parent / rows[0]["path"], manifest.parent / "arrived.png")
    try:  # as many rows as the run recorded, one of them new: a difference of totals would count none
        kept = [r for r in rows if r is not trained]
        write_rows(manifest, [*kept, {**rows[0], "path": "arrived.png", "patient_id": "late-patient"}])
        caplog.set_level("INFO", logger="medvision")
        evaluate_run(run, out=run / "eval" / "one-out-one-in")
        assert "1 image(s) not in the run's splits.csv (added since" in caplog.text
        assert "-1 image(s)" not in caplog.text
    finally:
        manifest.write_text(original)


def test_evaluate_with_data_refuses_the_runs_own_training_images_unless_allowed(own_run: tuple[Path, Path]) -> None:
    run, manifest = own_run
    held = read_splits(run)
    assert held is not None
    n_train, n_val = (sum(s == k for s in held.values()) for k in ("train", "val"))
    with pytest.raises(RunError, match=rf"{n_train + n_val} of the {len(held)} images to evaluate \(all\)"):
        evaluate_run(run, data=str(manifest), out=run / "eval" / "refused")
    out, _ = evaluate_run(run, data=str(manifest), out=run / "eval" / "allowed", allow_seen=True)
    seen = json.loads((out / "metrics.json").read_text())["seen_in_training"]
    assert (seen["checked"], seen["train"], seen["val"], seen["evaluated"]) == (True, n_train, n_val, len(held))
    report = (out / "report.md").read_text()
    assert f"{n_train} of the {len(held)} evaluated images were in the run's training split" in report
    assert f"split sizes: all {len(held)}" in report  # the evaluated table, not the training run's split sizes
    # the run's test split alone, through --data: nothing seen, nothing refused
    out, _ = evaluate_run(run, data=str(manifest), split="test", out=run / "eval" / "test-only")
    seen = json.loads((out / "metrics.json").read_text())["seen_in_training"]
    assert (seen["train"], seen["val"]) == (0, 0)
    report = (out / "report.md").read_text()  # and it is not called optimistic
    assert f"none of the {seen['evaluated']} evaluated images were in the run's training or validation" in report
    assert "optimistic" not in report.split("## Metrics")[0]


def test_validation_rows_are_labelled_as_the_selection_split(own_run: tuple[Path, Path]) -> None:
    run, _ = own_run
    report = (run / "report.md").read_text()
    assert "| image | val (selection split: optimistic) |" in report and "| image | test |" in report
    metrics = json.loads((run / "metrics.json").read_text())
    assert "val" in metrics["image"] and "test" in metrics["image"]  # metrics.json keeps the plain split names


def test_init_from_is_checked_against_the_recorded_training_split(own_run: tuple[Path, Path]) -> None:
    run, manifest = own_run
    held = read_splits(run)
    assert held is not None
    tree = tiny_recipe(manifest, run.parent / "other", phases=ONE_EPOCH)
    tree["model"]["init_from"] = str(run)
    recipe = recipe_from_dict(tree)
    table = load_table(recipe.data, recipe.seed)
    trained_on = sorted(i for i, s in held.items() if s == "train")
    with pytest.raises(RunError, match=rf"trained on 1 of this run's validation and test images .*{trained_on[0]}"):
        refuse_seen_images(recipe, table, {trained_on[0]})
    refuse_seen_images(recipe, table, {i for i, s in held.items() if s == "test"})  # held out there too: fine


def test_a_replaced_stain_reference_is_refused_and_the_spec_records_its_hash(shared: Path, tmp_path: Path) -> None:
    from medvision.recipe import SlidesConfig

    reference = tmp_path / "ref.tif"
    shutil.copy(next((shared / "data" / "he_tiles").glob("NORM-*.tif")), reference)
    slides = SlidesConfig(stain_reference=str(reference))
    recorded = stain_fingerprint(slides)
    assert recorded is not None
    check_stain_reference(tmp_path, slides, recorded)  # the same pixels: fine
    check_stain_reference(tmp_path, slides, None)  # a run from before the hash was recorded: not checked
    shutil.copy(next((shared / "data" / "he_tiles").glob("TUM-*.tif")), reference)
    now = stain_fingerprint(slides)
    assert now is not None
    with pytest.raises(RunError, match=rf"ref\.tif with SHA-256 {recorded[:16]}…; that file now has {now[:16]}…"):
        check_stain_reference(tmp_path, slides, recorded)
    with pytest.raises(RunError, match="names no stain_reference"):
        check_stain_reference(tmp_path, SlidesConfig(), recorded)
    spec = ScoringSpec(name="r", classes=["a", "b"], image_size=32, in_chans=3, mean=(0.5,) * 3, std=(0.2,) * 3,
                       inputs="slides", intensity="dtype", slides=slides.model_dump(mode="json"),
                       stain_reference_sha256=recorded)  # fmt: skip
    assert ScoringSpec.from_json(spec.to_json()).stain_reference_sha256 == recorded  # what exports carry


def test_a_resumed_run_whose_data_now_splits_otherwise_is_refused(tmp_path: Path) -> None:
    held = {"train": ["a.png", "b.png"], "val": ["c.png"], "test": ["d.png"]}
    keep_splits(tmp_path, held, resume=False, d=Dist())
    assert read_splits(tmp_path) == {"a.png": "train", "b.png": "train", "c.png": "val", "d.png": "test"}
    keep_splits(tmp_path, held, resume=True, d=Dist())  # the same split: resumed
    moved = {"train": ["a.png", "c.png"], "val": ["b.png"], "test": ["d.png"]}
    with pytest.raises(RunError, match=r"splits\.csv: the data now splits 2 image\(s\) differently from when this "
                                       r"run started \(e\.g\. 'b\.png': train then, val now\)"):  # fmt: skip
        keep_splits(tmp_path, moved, resume=True, d=Dist())
    assert read_splits(tmp_path)["b.png"] == "train"  # nothing rewritten
    keep_splits(tmp_path, moved, resume=False, d=Dist())  # a fresh start records the new split
    assert read_splits(tmp_path)["b.png"] == "val"


def test_val_auc_without_every_class_in_validation_monitors_val_loss(
    tiles_manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A class with no validation image makes the macro AUC undefined in every epoch: no epoch could be best."""
    rows = list(csv.DictReader(tiles_manifest.open()))
    patients = sorted({r["patient_id"] for r in rows})
    split = {p: "train" if k < 8 else "val" if k < 10 else "test" for k, p in enumerate(patients)}
    manifest = tiles_manifest.parent / "three_classes.csv"
    with manifest.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "label", "patient_id", "split"])
        for r in rows:  # a third class in the training and test splits only
            label = "necrosis" if r["patient_id"] in (patients[0], patients[-1]) else r["label"]
            out.writerow([r["path"], label, r["patient_id"], split[r["patient_id"]]])
    caplog.set_level("WARNING", logger="medvision")
    run = train(recipe_from_dict(tiny_recipe(manifest, tmp_path)))
    assert "no image of class(es) ['necrosis'], so val_auc is undefined in every epoch" in caplog.text
    assert json.loads((run / "run.json").read_text())["monitor"] == "val_loss"
    assert "was never finite" not in caplog.text  # an epoch was best on val_loss


def test_the_split_of_a_patient_survives_adding_or_dropping_another() -> None:
    """A file that stops reading (or a new patient) moves a few patients next to a split's boundary, not the cohort:
    the shuffle it replaces re-dealt them all (dropping one of these 200 patients moved 4 to 95 others), so two runs
    on nearly one dataset tested on different patients."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 9, 200)
    groups = [f"P{p}" for p in range(200) for _ in range(sizes[p])]
    labels = np.array([int(rng.random() < 0.3) for p in range(200) for _ in range(sizes[p])])

    def split(keep: list[int]) -> dict[str, str]:
        kept = [groups[i] for i in keep]
        return dict(zip(kept, grouped_stratified_split(labels[keep], kept, 0.15, 0.2, seed=7), strict=True))

    everyone = split(list(range(len(groups))))
    assert list(everyone.values()).count("test") > 20
    for drop in range(0, 200, 25):
        without = split([i for i, g in enumerate(groups) if g != f"P{drop}"])  # a patient gone (or, read back: added)
        assert sum(everyone[g] != s for g, s in without.items()) <= 4
        first = groups.index(f"P{drop}")
        one_less = split([i for i in range(len(groups)) if i != first])  # one image gone: its label share shifts
        assert sum(everyone[g] != s for g, s in one_less.items()) <= 6
    assert split(list(range(len(groups)))) == everyone  # deterministic
    order = patient_order(["b", "a", "c", "d"], seed=1)
    assert [p for p in order if p != "c"] == patient_order(["b", "a", "d"], seed=1)
    assert patient_order(list("abcdefghij"), 2) != patient_order(list("abcdefghij"), 1)  # the seed reorders

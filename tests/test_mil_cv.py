"""``data.source: slide_features``: MIL heads cross-validated by patient on cached features, reported per fold."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from medvision.cli import main
from medvision.data.slide_features import (
    FeatureCohort,
    load_feature_cohort,
    patient_folds,
    validation_split,
)
from medvision.data.table import DataSourceError
from medvision.intervals import balanced_accuracy_ci, bootstrap_cis
from medvision.metrics import balanced_accuracy, compute_auc, softmax
from medvision.models.mil import build_head
from medvision.models.mil_fit import head_arguments, load_mil, predict_mil, save_mil, top_tiles
from medvision.recipe import EvalConfig, RecipeError, load_recipe
from medvision.runs import RunError
from medvision.tasks.evaluate import evaluate_run
from medvision.tasks.mil import mil_config
from medvision.tasks.mil_report import (
    METRIC_RANGE,
    _across,
    cv_metrics,
    fold_summary,
    metric_functions,
    validation_note,
)
from medvision.tasks.score import score_slides
from medvision.tasks.track import MIL_FILES, mil_uploads
from medvision.tasks.train import train
from medvision.tracking import recipe_params, run_metrics
from medvision.wsi.features import feature_name, read_features, write_features
from medvision.wsi.geojson import NAMESPACE as GEOJSON_NAMESPACE


def _recipe(tmp: Path, manifest: Path, features: Path, **mil: Any) -> Path:
    tree = {"name": "mil", "output_dir": str(tmp / "runs"), "seed": 0,
            "data": {"source": "slide_features", "path": str(manifest), "features": str(features)},
            "mil": {"folds": 3, "epochs": 15, "patience": 5, "hidden": 32, "attention": 16, "lr": 2e-3, **mil},
            "evaluation": {"bootstrap": 200}}  # fmt: skip
    path = tmp / "mil.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_patient_folds_keep_patients_whole_and_classes_in_every_fold() -> None:
    rng = np.random.default_rng(0)
    patients = [f"P{i // 3}" for i in range(60)]  # 3 slides a patient
    labels = np.asarray([int(p[1:]) % 2 for p in patients])
    folds = patient_folds(labels, patients, 5, seed=1, stratify=True)
    for p in set(patients):
        assert len({folds[i] for i, q in enumerate(patients) if q == p}) == 1
    for f in range(5):
        assert set(labels[folds == f]) == {0, 1} and 9 <= (folds == f).sum() <= 15
    assert not np.array_equal(folds, patient_folds(labels, patients, 5, seed=2, stratify=True))
    cont = patient_folds(rng.normal(size=60), patients, 4, seed=0, stratify=False)
    assert sorted(np.bincount(cont).tolist()) == [15, 15, 15, 15]
    fit, val, _ = validation_split(labels, patients, np.flatnonzero(folds != 0), 0.2, 0, True)
    assert not {patients[i] for i in fit} & {patients[i] for i in val} and set(labels[val]) == {0, 1}
    with pytest.raises(DataSourceError, match="at least 5 patients"):
        patient_folds(labels[:6], patients[:6], 5, 0, True)


def test_cross_validated_abmil_run_reports_every_fold_and_scores_out_of_fold(
    slide_cohort: Path, cohort_features: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", str(_recipe(tmp_path, slide_cohort, cohort_features))]) == 0, capsys.readouterr().err
    run = tmp_path / "runs" / "mil"
    folds = _csv(run / "folds.csv")
    assert len(folds) == 12
    by_patient: dict[str, set[str]] = {}
    for r in folds:
        by_patient.setdefault(r["patient"], set()).add(r["fold"])
    assert all(len(v) == 1 for v in by_patient.values())  # two slides a patient, always in the same fold
    ids = {r["patient_id"] for r in _csv(slide_cohort)}  # the manifest's (an MRN, in practice): never written
    preds = _csv(run / "predictions.csv")
    assert {r["patient"] for r in folds} == {r["patient"] for r in preds} == {f"p{k}" for k in range(1, 7)}
    assert not any(i in (run / name).read_text() for i in ids for name in ("folds.csv", "predictions.csv"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert [f["fold"] for f in metrics["folds"]] == [0, 1, 2] and sum(f["n"] for f in metrics["folds"]) == 12
    assert all(len(f["auc_ci"]) == 2 for f in metrics["folds"] if f["auc"] == f["auc"])
    aucs = [f["auc"] for f in metrics["folds"]]
    assert metrics["across_folds"]["auc"]["mean"] == pytest.approx(np.nanmean(aucs))
    assert metrics["across_folds"]["auc"]["sd"] == pytest.approx(np.nanstd(aucs, ddof=1))
    preds = _csv(run / "predictions.csv")
    y = np.asarray([r["label"] == "tumour" for r in preds], int)
    p = np.asarray([float(r["prob_tumour"]) for r in preds])
    # the metrics are the file's: equal but for the order of a sum (the pooled AUC adds the slides fold by fold)
    assert metrics["pooled"]["auc"] == pytest.approx(roc_auc_score(y, p), rel=0, abs=1e-12)
    assert metrics["pooled"]["auc"] >= 0.8  # planted tumour tiles in ImageNet features: measured 1.0
    # every out-of-fold probability is the saved head of that fold on that slide's bag
    for r in preds:
        head, meta = load_mil(run / "folds" / f"fold{r['fold']}.safetensors")
        bag = read_features(cohort_features / feature_name(r["slide_path"])).features
        assert meta["fold"] == int(r["fold"]) and meta["encoder"] == "timm:tf_efficientnet_lite0"
        assert softmax(predict_mil(head, [bag])[0])[0, 1] == pytest.approx(float(r["prob_tumour"]), abs=1e-5)
    html = (run / "report.html").read_text()
    assert "mean ± SD over folds" in html and "Every fold" in html and "data:image/png;base64" in html
    # 4 training patients a fold are too few to hold out a fifth (val_fraction 0.2): the report says so
    assert [(f["fit_patients"], f["val_patients"]) for f in metrics["folds"]] == [(4, 0)] * 3
    report = (run / "report.md").read_text()
    assert "No fold held out validation patients" in report and "20% share" not in report
    assert "resamples patients, not slides" in report and metrics["bootstrap_unit"] == "patient"
    # the ROC's band: the bootstrap of the CIs beside it (whole patients, evaluation.ci_level and .bootstrap)
    assert "with its 95% bootstrap band (200 resamples of whole patients, as the pooled CIs)" in report
    spec = json.loads((run / "mil.json").read_text())
    assert spec["encoder_sha256"] == json.loads((cohort_features / "features.json").read_text())["encoder_sha256"]
    assert spec["slides"]["tile_size"] == 112 and 0 < spec["threshold"] < 1 and len(spec["heads"]) == 3
    # resume keeps finished folds; the result is the same
    kept = (run / "folds" / "fold0.json").stat().st_mtime_ns
    (run / "folds" / "fold2.json").unlink()
    recipe = load_recipe(run / "recipe.yaml")
    train(recipe, resume=True)
    assert (run / "folds" / "fold0.json").stat().st_mtime_ns == kept
    assert json.loads((run / "metrics.json").read_text())["pooled"]["auc"] == pytest.approx(metrics["pooled"]["auc"])


@pytest.mark.parametrize("head", ["mean", "clam_sb", "transmil"])
def test_every_head_cross_validates(head: str, slide_cohort: Path, cohort_features: Path, tmp_path: Path) -> None:
    run = train(load_recipe(_recipe(tmp_path, slide_cohort, cohort_features, head=head, heads=4)))
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["folds"]) == 3 and metrics["pooled"]["n"] == 12
    assert json.loads((run / "run.json").read_text())["head"] == head
    for f in range(3):  # each test slide's top tile: the head's own ranking (the mean head's: not always tile 0)
        record = json.loads((run / "folds" / f"fold{f}.json").read_text())
        model, _ = load_mil(run / "folds" / f"fold{f}.safetensors")
        feats = [read_features(cohort_features / feature_name(rel)) for rel in record["test"]]
        _, attention = predict_mil(model, [b.features for b in feats])
        best = top_tiles(model, [b.features for b in feats], attention)
        assert record["top_tiles"] == [b.coords[t].tolist() for b, t in zip(feats, best, strict=True)]


def test_continuous_target_reports_mse_mae_r2_with_cis(slide_cohort: Path, cohort_features: Path,
                                                       tmp_path: Path) -> None:  # fmt: skip
    truth = json.loads((slide_cohort.parent / "truth.json").read_text())
    manifest = tmp_path / "scores.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_path", "label", "patient_id"])
        for rel, t in truth.items():  # tumour area in mm² at 0.5 µm/px: a continuous slide label
            w.writerow([rel, sum(b[2] * b[3] for b in t["tumour_boxes"]) * 0.25e-6, t["patient_id"]])
    path = _recipe(tmp_path, manifest, cohort_features, head="abmil")
    tree = yaml.safe_load(path.read_text())
    tree["data"]["target"] = "continuous"
    path.write_text(yaml.safe_dump(tree))
    run = train(load_recipe(path))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["target"] == "continuous" and set(metrics["across_folds"]) == {"mse", "mae", "r2"}
    pooled = metrics["pooled"]
    assert pooled["mse_ci"][0] <= pooled["mse"] <= pooled["mse_ci"][1] and pooled["mae"] >= 0
    preds = _csv(run / "predictions.csv")
    err = np.asarray([float(r["prediction"]) - float(r["label"]) for r in preds])
    assert pooled["mse"] == pytest.approx(float(np.mean(err**2)), rel=1e-6)
    # areas of about 1e-3 mm²: the report writes significant digits, never 0.000
    report = (run / "report.md").read_text()
    assert f"| mse | {metrics['across_folds']['mse']['mean']:.4g} ± " in report
    assert f"{pooled['mae']:.4g} [{pooled['mae_ci'][0]:.4g}, {pooled['mae_ci'][1]:.4g}]" in report
    assert "0.000 [0.000, 0.000]" not in report and pooled["mse"] < 1e-3
    assert json.loads((run / "mil.json").read_text())["threshold"] is None
    tracked, tags = run_metrics(metrics)  # what tracking logs of it
    assert tracked["cv_mae_mean"] == pytest.approx(metrics["across_folds"]["mae"]["mean"])
    assert tracked["pooled_r2_ci_high"] == pytest.approx(pooled["r2_ci"][1]) and tracked["slides"] == 12
    assert tags["medvision.target"] == "continuous" and "medvision.pooled_mse" in tags
    with pytest.raises(RunError, match="MIL run on cached slide features"):
        evaluate_run(run)
    tree["mil"]["head"] = "clam_sb"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(RecipeError, match="clam_sb"):
        load_recipe(path)


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # MLflow's own store
def test_a_tracked_run_logs_each_fold_at_its_step_the_summary_and_the_run_folder(
    slide_cohort: Path, cohort_features: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train --track`` into a SQLite store, TensorBoard on; read back by MLflow's client and TensorBoard's reader."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    code = main(["train", str(_recipe(tmp_path, slide_cohort, cohort_features)), "--track",
                 "--set", f"tracking.uri={uri}", "--set", "tracking.tensorboard=true",
                 "--set", "tracking.experiment=mil"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    run_dir = tmp_path / "runs" / "mil"
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mil").experiment_id])
    run_id, logged, tags = run.info.run_id, run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_name == "mil"
    assert run.data.params == recipe_params(load_recipe(run_dir / "recipe.yaml"))
    assert run.data.params["data.source"] == "slide_features" and run.data.params["mil.folds"] == "3"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    folds = metrics["folds"]
    for key, name in (("auc", "fold_auc"), ("acc", "fold_acc"), ("balanced_acc", "fold_balanced_acc"),
                      ("n", "fold_slides"), ("best_epoch", "fold_best_epoch")):  # fmt: skip
        history = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(f["fold"], pytest.approx(f[key])) for f in folds], name
    lows = sorted(client.get_metric_history(run_id, "fold_auc_ci_low"), key=lambda m: m.step)
    assert [m.step for m in lows] == [0, 1, 2] and lows[1].value == pytest.approx(folds[1]["auc_ci"][0])
    across, pooled = metrics["across_folds"]["auc"], metrics["pooled"]
    assert (logged["cv_auc_mean"], logged["cv_auc_sd"]) == pytest.approx((across["mean"], across["sd"]))
    assert (logged["cv_auc_ci_low"], logged["cv_auc_ci_high"]) == pytest.approx(tuple(across["ci"]))
    assert logged["cv_acc_mean"] == pytest.approx(metrics["across_folds"]["acc"]["mean"])
    assert (logged["pooled_auc"], logged["pooled_auc_ci_low"], logged["pooled_auc_ci_high"]) == pytest.approx(
        (pooled["auc"], *pooled["auc_ci"]))  # fmt: skip
    assert (logged["slides"], logged["patients"], logged["folds"]) == (12, 6, 3)
    assert not any(k.startswith(("test_", "best_val_")) for k in logged)  # no test split: the folds are the test
    lo, hi = pooled["auc_ci"]
    assert tags["medvision.pooled_auc"] == f"{pooled['auc']:.3f} (95% CI {lo:.3f}-{hi:.3f})"
    assert tags["medvision.cv_auc"].startswith(f"{across['mean']:.3f} ± {across['sd']:.3f} over 3 folds")
    assert (tags["medvision.kind"], tags["medvision.mil_head"], tags["medvision.positive_class"]) == (
        "mil", "abmil", "tumour")  # fmt: skip
    assert tags["medvision.encoder_sha256"] == json.loads((run_dir / "mil.json").read_text())["encoder_sha256"]
    names = {a.path for a in client.list_artifacts(run_id)}
    assert names == {f for f in MIL_FILES if (run_dir / f).exists()} | {"folds"} and "model" not in names
    assert {"mil.json", "folds", "report.html", "run.json"} <= names
    assert "train.log" not in names  # it can name slides' files: only with tracking.log_predictions
    assert not {"folds.csv", "predictions.csv"} & names  # they name patients: the run folder keeps them
    # the fold heads, but not the fold records that list the slides' paths (tracking.log_predictions is off)
    assert {a.path for a in client.list_artifacts(run_id, "folds")} == {f"folds/fold{f}.safetensors" for f in range(3)}
    assert {p.name for p in mil_uploads(run_dir, True)} >= {"fold0.json", "predictions.csv", "fold0.safetensors"}
    for name in ("folds/fold1.safetensors", "metrics.json", "mil.json"):
        copy = Path(client.download_artifacts(run_id, name, str(tmp_path / "download")))
        assert copy.read_bytes() == (run_dir / name).read_bytes(), name
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("fold_auc")] == [
        (f["fold"], pytest.approx(f["auc"], rel=1e-6)) for f in folds
    ]
    assert events.Scalars("final/pooled_auc")[0].value == pytest.approx(pooled["auc"], rel=1e-6)


def test_a_slide_is_matched_by_its_path_or_by_a_file_name_no_other_slide_has(
    slide_cohort: Path, cohort_features: Path, tmp_path: Path
) -> None:
    """features.csv names slides relative to the folder that was embedded. A manifest elsewhere finds them by file
    name, but two of its slides with one name (two sites' s1.svs) are errors: they never share one bag."""
    rows = _csv(slide_cohort)
    first = rows[0]["slide_path"]
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_path", "label", "patient_id"])
        w.writerow([f"./{rows[1]['slide_path']}", rows[1]["label"], rows[1]["patient_id"]])  # the same path
        w.writerow([f"elsewhere/{rows[2]['slide_path']}", rows[2]["label"], rows[2]["patient_id"]])  # by name
        w.writerows([[f"site{s}/{first}", label, f"X{s}"] for s, label in (("A", "tumour"), ("B", "normal"))])
    cfg = load_recipe(_recipe(tmp_path, manifest, cohort_features), ["data.on_error=skip"]).data
    cohort = load_feature_cohort(manifest, cfg)
    assert cohort.slides == [rows[1]["slide_path"], f"elsewhere/{rows[2]['slide_path']}"]
    errors = {r.path: r.reason for r in cohort.audit if r.outcome == "error"}
    assert set(errors) == {f"siteA/{first}", f"siteB/{first}"}
    assert f"its file name {first!r} names 1 slide(s) there and 2 in the manifest" in errors[f"siteA/{first}"]
    with pytest.raises(DataSourceError, match=r"2 of 4 slides have no usable features: siteA/"):
        load_feature_cohort(manifest, cfg.model_copy(update={"on_error": "stop"}))


def test_missing_features_are_audit_errors_and_the_recipe_is_checked(
    slide_cohort: Path, cohort_features: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(slide_cohort.read_text() + "slide_999.svs,tumour,P999\n")
    with pytest.raises(DataSourceError, match=r"slide_999\.svs"):
        train(load_recipe(_recipe(tmp_path, manifest, cohort_features)))
    recipe = load_recipe(_recipe(tmp_path, manifest, cohort_features), ["data.on_error=skip", "name=skip"])
    run = train(recipe)
    audit = {r["path"]: r for r in _csv(run / "data_audit.csv")}
    assert audit["slide_999.svs"]["outcome"] == "error"
    assert json.loads((run / "metrics.json").read_text())["slides"] == 12
    bad = yaml.safe_load(_recipe(tmp_path, manifest, cohort_features).read_text())
    bad["model"] = {"name": "resnet18"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(RecipeError, match="do not apply"):
        load_recipe(tmp_path / "bad.yaml")


def test_score_embeds_new_slides_alike_and_writes_attention_heatmaps_and_qupath_geojson(
    slide_cohort: Path, cohort_features: Path, shared: Path, cmu_svs: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from test_geojson import _validate as validate_qupath

    run = train(load_recipe(_recipe(tmp_path, slide_cohort, cohort_features)))
    folder = tmp_path / "new"
    folder.mkdir()
    for name in ("slide_000.svs", "slide_002"):  # an Aperio file and a DICOM WSI series folder
        src = slide_cohort.parent / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, folder / name)
    shutil.copy(cmu_svs, folder / "cmu.svs")  # the real scan: 0.499 µm/px, tiled at the run's 1 µm/px
    (folder / "broken.svs").write_bytes(b"not a slide at all")
    weights = shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    out = tmp_path / "scores.csv"
    code = main(["score", str(folder), "--model", str(run), "--out", str(out), "--encoder-checkpoint", str(weights)])
    assert code == 3, capsys.readouterr().err  # one error row, the rest scored
    rows = {r["path"]: r for r in _csv(out)}
    assert rows["broken.svs"]["status"] == "error" and "broken.svs" in rows["broken.svs"]["reason"]
    assert all(rows[k]["status"] == "ok" for k in ("slide_000.svs", "slide_002", "cmu.svs"))
    record = json.loads(Path(f"{out}.json").read_text())
    assert record["reconciled"] and record["encoder_sha256"] == json.loads((run / "mil.json").read_text())[
        "encoder_sha256"]  # fmt: skip
    # the slide's probability is the mean of the fold heads on the cached bag of the same slide
    bag = read_features(cohort_features / feature_name("slide_000.svs")).features
    heads = [load_mil(run / "folds" / f"fold{f}.safetensors")[0] for f in range(3)]
    expected = np.mean([softmax(predict_mil(h, [bag])[0])[0] for h in heads], axis=0)
    assert float(rows["slide_000.svs"]["prob_tumour"]) == pytest.approx(expected[1], abs=1e-4)
    assert rows["slide_000.svs"]["call_youden"] in ("0", "1") and float(rows["cmu.svs"]["mpp"]) == pytest.approx(0.499)
    import pyarrow.parquet as pq

    one = [t for t in pq.read_table(f"{out}.tiles.parquet").to_pylist() if t["slide"] == "slide_000.svs"]
    assert len(one) == int(rows["slide_000.svs"]["tiles"]) and max(t["attention"] for t in one) == pytest.approx(1.0)
    assert Path(f"{out}.heatmaps/slide_000.svs.png").is_file()
    geo = json.loads(Path(f"{out}.geojson/slide_000.svs.geojson").read_text())
    validate_qupath(geo)
    kinds = [f["properties"]["objectType"] for f in geo["features"]]
    assert kinds.count("detection") == len(one) and kinds.count("annotation") >= 1
    first = next(f for f in geo["features"] if f["properties"]["objectType"] == "detection")
    x, y = first["geometry"]["coordinates"][0][0]
    assert [x, y] == [one[0]["x"], one[0]["y"]]
    assert first["properties"]["measurements"]["attention"] == pytest.approx(one[0]["attention"], abs=1e-6)
    assert "CMU-1" not in Path(f"{out}.geojson/cmu.svs.geojson").read_text()
    # the ids are the run's: its spec and fold heads (hashed into the record), and the output
    heads_sha = hashlib.sha256((run / "mil.json").read_bytes())
    for f in range(3):
        heads_sha.update((run / "folds" / f"fold{f}.safetensors").read_bytes())
    assert record["model_sha256"] == heads_sha.hexdigest()
    assert geo["features"][0]["id"] == str(uuid.uuid5(
        GEOJSON_NAMESPACE, json.dumps([json.dumps([record["model_sha256"], str(out.resolve())]), "slide_000.svs",
                                       "tissue-0"])))  # fmt: skip
    # other weights than the run's: refused before anything is scored
    other = tmp_path / "other.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    state = {k: (v + 1e-3 if v.is_floating_point() else v) for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, other)
    with pytest.raises(RunError, match="SHA-256"):
        score_slides(folder, run, tmp_path / "again.csv", encoder_checkpoint=other)


def test_the_interval_over_folds_is_students_t_clipped_to_the_metrics_range() -> None:
    from scipy import stats

    from medvision.tasks.mil_report import METRIC_RANGE, fold_summary

    folds = [1.0, 1.0, 0.5]  # a wide spread: the raw t-interval reaches 1.37
    got = fold_summary(folds, 0.95, METRIC_RANGE["auc"])
    low, high = stats.t.interval(0.95, 2, loc=np.mean(folds), scale=stats.sem(folds))
    assert high > 1 and got["ci"] == [pytest.approx(low), 1.0] and got["sd"] == pytest.approx(np.std(folds, ddof=1))
    assert fold_summary([0.1, 0.02, 0.4], 0.95, METRIC_RANGE["mse"])["ci"][0] == 0.0
    one = fold_summary([0.8, float("nan")], 0.95, METRIC_RANGE["auc"])  # a fold where AUC is undefined
    assert one["folds"] == 1 and one["mean"] == 0.8 and np.isnan(one["sd"]) and np.isnan(one["ci"]).all()


def _shell(patients: list[str], labels: list[int]) -> FeatureCohort:
    """A cohort without bags: what :func:`cv_metrics` reads (slides, labels, patients, classes)."""
    slides = [f"s{i}.svs" for i in range(len(labels))]
    return FeatureCohort(slides, [], [], np.asarray(labels, np.int64), patients, ["normal", "tumour"], {})


def test_every_ci_of_the_cv_report_resamples_whole_patients() -> None:
    rng = np.random.default_rng(0)
    patients = [f"P{i // 3:02d}" for i in range(60)]  # 3 slides a patient, all with the patient's label
    labels = [int(p[1:]) % 2 for p in patients]
    cohort = _shell(patients, labels)
    folds = patient_folds(cohort.labels, patients, 3, seed=0, stratify=True)
    by_patient = {p: rng.normal(0.0, 1.0) + 0.8 * (int(p[1:]) % 2) for p in set(patients)}
    prob = 1 / (1 + np.exp(-np.asarray([by_patient[p] for p in patients])))
    records = [{"fold": f, "test": [cohort.slides[i] for i in np.flatnonzero(folds == f)],
                "predictions": [[1 - prob[i], prob[i]] for i in np.flatnonzero(folds == f)], "best_epoch": 0,
                "seconds": 0.0} for f in range(3)]  # fmt: skip
    cfg = EvalConfig(bootstrap=200)
    metrics = cv_metrics(cohort, folds, records, cfg)
    fns = metric_functions(False)
    order = np.concatenate([np.flatnonzero(folds == f) for f in range(3)])  # the folds' slides, fold by fold
    y, p = cohort.labels[order], np.stack([1 - prob, prob], 1)[order]
    pooled = bootstrap_cis(y, p, fns, 200, cfg.bootstrap_seed, cfg.ci_level, groups=[patients[i] for i in order])
    assert metrics["pooled"]["auc_ci"] == list(pooled["auc"])
    assert metrics["pooled"]["balanced_acc_ci"] == list(
        balanced_accuracy_ci(y, p, 200, cfg.bootstrap_seed, cfg.ci_level, [patients[i] for i in order])
    )
    for f, row in enumerate(metrics["folds"]):
        idx = np.flatnonzero(folds == f)
        own = bootstrap_cis(cohort.labels[idx], np.stack([1 - prob, prob], 1)[idx], fns, 200, cfg.bootstrap_seed + f,
                            cfg.ci_level, groups=[patients[i] for i in idx])  # fmt: skip
        assert row["auc_ci"] == list(own["auc"]) and row["patients"] == len({patients[i] for i in idx})
    by_slide = bootstrap_cis(y, p, fns, 200, cfg.bootstrap_seed, cfg.ci_level)["auc"]
    assert np.diff(metrics["pooled"]["auc_ci"])[0] > np.diff(by_slide)[0]  # slides of one patient are not 3 cases


def test_the_summary_says_in_how_many_folds_a_metric_was_defined() -> None:
    """A fold whose test slides hold one class has no AUC: the mean over the others says it is over fewer folds."""
    summary = fold_summary([0.8, math.nan, 0.9], 0.95, METRIC_RANGE["auc"])
    cell, interval = _across(summary, "auc", 3)
    assert cell == "0.850 ± 0.071 (2 of 3 folds: undefined in the others)" and interval.startswith("[")
    assert _across(fold_summary([0.8, 0.7, 0.9], 0.95, METRIC_RANGE["auc"]), "auc", 3)[0] == "0.800 ± 0.100"


def test_the_report_gives_the_share_of_patients_actually_held_out() -> None:
    rows = [{"fold": 0, "fit_patients": 16, "val_patients": 4}, {"fold": 1, "fit_patients": 15, "val_patients": 5}]
    assert validation_note(rows, 0.2) == ("Early stopping used 20%-25% of each fold's training patients (4 of 20, "
                                          "5 of 20; mil.val_fraction 0.2), never its test slides.")  # fmt: skip
    half = validation_note([{"fold": 0, "fit_patients": 4, "val_patients": 4}], 0.4)  # 0.4 is one of 2 folds
    assert "50% of each fold's training patients" in half and "40%" not in half
    some = validation_note([*rows, {"fold": 2, "fit_patients": 3, "val_patients": 0}], 0.2)
    assert some.endswith("Fold 2 had too few training patients to hold any out: trained all mil.epochs and kept "
                         "the last epoch.")  # fmt: skip
    why = {"fold": 2, "fit_patients": 8, "val_patients": 0, "no_validation": "class 'tumour' has 1 training patient"}
    assert validation_note([*rows, why], 0.2).endswith("Fold 2 held no validation patients out (class 'tumour' has 1 "
                                                       "training patient): trained all mil.epochs and kept the last "
                                                       "epoch.")  # fmt: skip
    none = validation_note([{"fold": f, "fit_patients": 3, "val_patients": 0} for f in range(2)], 0.2)
    assert none.startswith("No fold held out validation patients") and "%" not in none


def test_logs_and_report_count_the_kept_epoch_from_1_and_call_it_last_without_validation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The fold records keep ``best_epoch`` 0-based; what a person reads (log, report, metrics.json and so MLflow)
    counts epochs from 1, as fine-tuning does,
    and a head that no validation loss chose (it trained all mil.epochs and kept the last) is not called best."""
    manifest, folder = _cache(tmp_path / "none", _pairs(6))  # 4 training patients a fold: too few to hold any out
    with caplog.at_level("INFO", logger="medvision"):
        run = train(load_recipe(_recipe(tmp_path / "none", manifest, folder, epochs=3)))
    record = json.loads((run / "folds" / "fold0.json").read_text())
    assert record["val_patients"] == 0 and record["best_epoch"] == 2  # stored: the 0-based index of the last
    assert json.loads((run / "metrics.json").read_text())["folds"][0]["best_epoch"] == 3  # what MLflow logs: from 1
    assert f"fold 0: {len(record['test'])} test slides, last epoch 3 (no validation), " in caplog.text
    assert "best epoch" not in caplog.text
    report = (run / "report.md").read_text()
    assert "| epoch kept |" in report and "| last epoch 3 (no validation) |" in report and "best epoch" not in report
    caplog.clear()
    rows = [(f"p{p}.svs", "tumour" if p % 2 else "normal", f"P{p:02d}") for p in range(12)]
    manifest, folder = _cache(tmp_path / "val", rows)  # 8 training patients a fold: some validate
    with caplog.at_level("INFO", logger="medvision"):
        run = train(load_recipe(_recipe(tmp_path / "val", manifest, folder, epochs=3)))
    record = json.loads((run / "folds" / "fold0.json").read_text())
    best = record["best_epoch"] + 1
    assert record["val_patients"] and f"fold 0: {len(record['test'])} test slides, best epoch {best}, " in caplog.text
    assert f"| best epoch {best} |" in (run / "report.md").read_text()


def test_mil_dropout_defaults_to_each_heads_own(tmp_path: Path) -> None:
    manifest, features = tmp_path / "manifest.csv", tmp_path / "features"  # loading a recipe does not read them
    for head, own in (("mean", 0.25), ("abmil", 0.25), ("clam_sb", 0.25), ("transmil", 0.1)):
        recipe = load_recipe(_recipe(tmp_path, manifest, features, head=head))
        assert recipe.mil.dropout is None
        assert build_head(head, 8, 2, **head_arguments(mil_config(recipe, 0))).arch()["dropout"] == own, head
    recipe = load_recipe(_recipe(tmp_path, manifest, features, head="transmil"), ["mil.dropout=0.3"])
    assert build_head("transmil", 8, 2, **head_arguments(mil_config(recipe, 0))).arch()["dropout"] == 0.3


ATTRS = {"encoder": "fake:enc", "encoder_sha256": "0" * 64, "tile_size": 224, "target_mpp": 0.5, "mpp": 0.25,
         "mpp_source": "metadata", "tissue_mm2": 1.0, "min_tissue": 0.2, "tissue_method": "od",
         "preprocessing": {"precision": "none"}}  # fmt: skip


def _cache(root: Path, rows: list[tuple[str, str, str]], **attrs: Any) -> tuple[Path, Path]:
    """A manifest of ``(slide, label, patient)`` rows and a feature folder without ``features.json``, written by
    medvision's own writer: 8-d random tiles, a fifth of a tumour slide's shifted. Returns (manifest, folder)."""
    rng = np.random.default_rng(0)
    folder = root / "features"
    folder.mkdir(parents=True, exist_ok=True)
    with (root / "manifest.csv").open("w", newline="") as fh, (folder / "features.csv").open("w", newline="") as ft:
        csv.writer(fh).writerows([("slide_path", "label", "patient_id"), *rows])
        table = csv.writer(ft)
        table.writerow(["path", "status", "reason", "file"])
        for rel, label, _ in rows:
            x = rng.normal(size=(12, 8)).astype(np.float32)
            x[:3, 0] += 2.0 * (label == "tumour")
            xy = np.stack([np.arange(12) * 224, np.zeros(12)], 1)
            write_features(folder / feature_name(rel), x, xy, np.ones(12), 448.0, 0, {**ATTRS, **attrs, "slide": rel})
            table.writerow([rel, "ok", "", feature_name(rel)])
    return root / "manifest.csv", folder


def _pairs(n: int, tumour: set[int] | None = None) -> list[tuple[str, str, str]]:
    """Two slides of each of ``n`` patients; the odd patients (or those in ``tumour``) are tumour."""
    return [(f"p{p}_s{s}.svs", "tumour" if (p in tumour if tumour else p % 2) else "normal", f"P{p:02d}")
            for p in range(n) for s in range(2)]  # fmt: skip


def test_resume_refuses_finished_folds_of_other_settings_or_features(tmp_path: Path) -> None:
    manifest, folder = _cache(tmp_path, _pairs(12))
    recipe = load_recipe(_recipe(tmp_path, manifest, folder, epochs=2))
    run = train(recipe)
    (run / "folds" / "fold2.json").unlink()  # interrupted in fold 2
    record = (run / "folds" / "fold0.json").read_text()
    assert json.loads(record)["settings"]["features"]["encoder_sha256"] == "0" * 64
    other = load_recipe(_recipe(tmp_path, manifest, folder, epochs=2, head="mean", lr=1e-2))
    with pytest.raises(RunError, match=r"fold0\.json was trained with other settings than this recipe's \(mil\.head "
                                       r"'abmil' -> 'mean'; mil\.lr 0\.002 -> 0\.01\); .*--overwrite"):  # fmt: skip
        train(other, resume=True)
    assert "head: abmil" in (run / "recipe.yaml").read_text()  # a refused resume rewrites nothing
    _cache(tmp_path, _pairs(12), encoder_sha256="1" * 64)  # the cache re-made by other weights
    with pytest.raises(RunError, match=r"features\.encoder_sha256 '0000.* -> '1111"):
        train(recipe, resume=True)
    _cache(tmp_path, _pairs(12))
    old = json.loads(record)
    del old["settings_sha256"], old["settings"]
    (run / "folds" / "fold0.json").write_text(json.dumps(old))  # written before records kept their settings
    with pytest.raises(RunError, match="does not record the settings its head was trained with"):
        train(recipe, resume=True)
    (run / "folds" / "fold0.json").write_text(record)
    kept = (run / "folds" / "fold1.safetensors").stat().st_mtime_ns
    train(recipe, resume=True)  # the same settings: the finished folds are kept
    assert (run / "folds" / "fold1.safetensors").stat().st_mtime_ns == kept
    assert (run / "folds" / "fold2.json").is_file()
    heads = [p.relative_to(run).as_posix() for p in mil_uploads(run, False) if p.parent.name == "folds"]
    assert heads == [f"folds/fold{f}.safetensors" for f in range(3)]  # no fold record: they name the slides


def test_mil_json_keeps_the_features_tiling_and_score_checks_stain_and_heads(tmp_path: Path) -> None:
    """Without features.json, mil.json's slides section is what the feature files record."""
    from medvision.recipe import SlidesConfig
    from medvision.tasks.score.mil import _fold_heads
    from medvision.wsi.source import check_stain_reference

    pre = {"precision": "none", "stain_reference": str(tmp_path / "ref.png"), "jpeg_shrink": True,
           "stain_reference_sha256": "ab" * 32}  # fmt: skip
    manifest, folder = _cache(tmp_path, _pairs(9), preprocessing=pre)
    run = train(load_recipe(_recipe(tmp_path, manifest, folder, epochs=2)))
    spec = json.loads((run / "mil.json").read_text())
    assert spec["slides"] == {"tile_size": 224, "target_mpp": 0.5, "min_tissue": 0.2, "tissue_method": "od",
                              "stain_reference": str(tmp_path / "ref.png"), "jpeg_shrink": True}  # fmt: skip
    cfg = SlidesConfig.recorded(spec["slides"])
    assert (cfg.min_tissue, cfg.tissue_method, cfg.jpeg_shrink) == (0.2, "od", True)
    unnamed = {**spec, "slides": {k: v for k, v in spec["slides"].items() if k != "stain_reference"}}
    with pytest.raises(RunError, match="names no stain_reference"):
        check_stain_reference(run, SlidesConfig.recorded(unnamed["slides"]), unnamed["stain_reference_sha256"])
    assert len(_fold_heads(run, spec)) == 3
    head, meta = load_mil(run / "folds" / "fold1.safetensors")
    save_mil(head, run / "folds" / "fold1.safetensors", {**meta, "encoder_sha256": "1" * 64})
    with pytest.raises(RunError, match=r"fold1\.safetensors: this fold head was trained on features of the encoder "
                                       "with SHA-256 1111111111111111"):  # fmt: skip
        _fold_heads(run, spec)


def test_features_of_another_tissue_threshold_are_not_mixed(tmp_path: Path) -> None:
    manifest, folder = _cache(tmp_path, _pairs(4))
    _cache(tmp_path / "other", _pairs(4)[-1:], min_tissue=0.5, tissue_method="saturation")
    shutil.copy(tmp_path / "other" / "features" / feature_name("p3_s1.svs"), folder / feature_name("p3_s1.svs"))
    cohort = load_feature_cohort(
        manifest, load_recipe(_recipe(tmp_path, manifest, folder), ["data.on_error=skip"]).data
    )
    (error,) = [r for r in cohort.audit if r.outcome == "error"]
    assert error.path == "p3_s1.svs" and "min_tissue 0.2 vs 0.5; tissue_method 'od' vs 'saturation'" in error.reason


@pytest.mark.filterwarnings("ignore:The least populated class in y:UserWarning")  # the 1-patient class
def test_small_cohorts_validate_only_with_every_class_on_both_sides_or_not_at_all(tmp_path: Path) -> None:
    labels, patients = np.asarray([0, 0, 0, 1, 1, 1, 1]), [f"P{i}" for i in range(7)]
    with pytest.raises(DataSourceError, match=r"mil\.folds 5: .*patients of each class: 'normal' 3, 'tumour' 4\. "
                                              r".*use mil\.folds 3 or fewer"):  # fmt: skip
        patient_folds(labels, patients, 5, 0, True, ["normal", "tumour"])
    y, pats, rows = np.asarray([0, 1] * 4), [f"P{i}" for i in range(8)], np.arange(8)
    fit, val, why = validation_split(y, pats, rows, 0.2, 0, True)  # 4 patients a class: 4 inner folds, not 5
    assert why == "" and set(y[fit]) == set(y[val]) == {0, 1}
    rare = np.asarray([1, 0, 0, 0, 0, 0, 0, 0])
    for seed in range(5):  # the rare class's only patient never leaves the fit patients
        fit, val, why = validation_split(rare, pats, rows, 0.2, seed, True, ["normal", "tumour"])
        assert len(val) == 0 and list(fit) == list(rows) and "class 'tumour' has 1 training patient" in why
    two = np.asarray([1, 1, 0, 0, 0, 0, 0, 0])
    for seed in range(5):
        fit, val, _ = validation_split(two, pats, rows, 0.2, seed, True)
        assert set(two[fit]) == set(two[val]) == {0, 1}
    manifest, folder = _cache(
        tmp_path, [(f"p{p}.svs", "tumour" if p % 2 else "normal", f"P{p:02d}") for p in range(12)]
    )
    run = train(load_recipe(_recipe(tmp_path, manifest, folder, epochs=2)))  # scikit-learn's 5 inner splits crashed
    assert all(f["val_patients"] for f in json.loads((run / "metrics.json").read_text())["folds"])
    manifest, folder = _cache(tmp_path / "one", _pairs(9, tumour={0}))  # one tumour patient: its fold fits none
    with pytest.raises(RunError, match=r"its fit patients hold no slide of class 'tumour' \(patients of each class in "
                                       r"the cohort: 'normal' 8, 'tumour' 1\)"):  # fmt: skip
        train(load_recipe(_recipe(tmp_path / "one", manifest, folder, epochs=2)))


def test_a_fold_lacking_a_class_has_no_auc_or_balanced_accuracy(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    for labels, names in (([0, 1, 0, 1, 0, 0, 0, 0], ["normal", "tumour"]), ([0, 1, 2, 0, 1, 0, 1, 0], list("abc"))):
        y = np.asarray(labels)
        cohort = FeatureCohort([f"s{i}.svs" for i in range(8)], [], [], y, [f"P{i}" for i in range(8)], names, {})
        folds = np.asarray([0, 0, 0, 0, 1, 1, 1, 1] if len(names) == 2 else [0, 0, 0, 1, 1, 1, 1, 1])
        p = rng.dirichlet(np.ones(len(names)), 8)
        records = [
            {
                "fold": f,
                "test": [cohort.slides[i] for i in np.flatnonzero(folds == f)],
                "predictions": p[folds == f].tolist(),
                "best_epoch": 0,
                "seconds": 0.0,
            }
            for f in (0, 1)
        ]
        with caplog.at_level("WARNING", logger="medvision"):
            metrics = cv_metrics(cohort, folds, records, EvalConfig(bootstrap=20))
        row = metrics["folds"][1]
        assert math.isnan(row["auc"]) and math.isnan(row["balanced_acc"]) and "auc_ci" not in row
        assert row["acc"] == pytest.approx(np.mean(p[folds == 1].argmax(1) == y[folds == 1]))
        assert metrics["across_folds"]["auc"]["folds"] == metrics["across_folds"]["balanced_acc"]["folds"] == 1
        order = np.concatenate([np.flatnonzero(folds == f) for f in (0, 1)])
        assert metrics["pooled"]["auc"] == pytest.approx(compute_auc(y[order], p[order]))  # all slides, as before
        assert metrics["pooled"]["balanced_acc"] == pytest.approx(
            balanced_accuracy(y[order], p[order].argmax(1), len(names))
        )
        missing = ", ".join(repr(c) for i, c in enumerate(names) if i not in set(y[folds == 1].tolist()))
        assert f"fold 1: its test slides hold no slide of class {missing}" in caplog.text

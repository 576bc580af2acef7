"""Experiment tracking: a real training run logged to a real MLflow store (and a real ``mlflow server``), read
back with MLflow's own client and REST API; TensorBoard event files read back with TensorBoard's reader."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_recipe

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")
pytest.importorskip("onnxruntime")

from mlflow.tracking import MlflowClient  # noqa: E402

from medvision import tracking  # noqa: E402
from medvision.cli import main  # noqa: E402
from medvision.data.sources import load_table  # noqa: E402
from medvision.inference import load_run  # noqa: E402
from medvision.recipe import Recipe, RecipeError, dump_recipe, load_recipe, recipe_from_dict  # noqa: E402
from medvision.runs import EPOCH_ROW, cache_dir, run_log  # noqa: E402
from medvision.runtime import Dist  # noqa: E402
from medvision.tasks.benchmark.labels import label_benchmark  # noqa: E402
from medvision.tasks.pretrain import pretrain  # noqa: E402
from medvision.tasks.track import TRAIN_FILES, log_trained_run, uploaded  # noqa: E402
from medvision.tracking import RECORD, Tracker, TrackingError, default_uri, recipe_params, tracked  # noqa: E402
from medvision.training import loop  # noqa: E402
from medvision.training.build import split_dataset  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # MLflow's store
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
LOCAL_FILES = ("mlruns", "mlflow.db", "mlartifacts", "tensorboard")
"""What tracking could leave in the working folder if it wrote to MLflow's or TensorBoard's defaults."""


def _unflatten(params: dict[str, str]) -> dict[str, Any]:
    """MLflow parameters back to a recipe tree: numbered keys become lists, values are JSON unless plain text."""
    tree: dict[str, Any] = {}
    for key, text in params.items():
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        *path, last = key.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value

    def lists(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if node and all(k.isdigit() for k in node):
            return [lists(node[str(i)]) for i in range(len(node))]
        return {k: lists(v) for k, v in node.items()}

    return lists(tree)


@dataclass
class Tracked:
    run_dir: Path
    uri: str
    client: Any
    run: Any
    cwd: Path


@pytest.fixture(scope="module")
def tracked_run(tiles_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracked]:
    """``medvision train RECIPE --track`` (2 epochs at 32 px) into a SQLite store, TensorBoard on, run from an
    empty working folder."""
    root = tmp_path_factory.mktemp("tracking")
    cwd = root / "cwd"
    cwd.mkdir()
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiles_manifest, root / "runs")))
    before = os.getcwd()
    os.chdir(cwd)
    try:
        code = main(["train", str(recipe), "--track", "--set", f"tracking.uri={uri}",
                     "--set", "tracking.tensorboard=true", "--set", "tracking.experiment=tiny-tests"])  # fmt: skip
    finally:
        os.chdir(before)
    assert code == 0
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    yield Tracked(root / "runs" / "tiny", uri, client, runs[0], cwd)


def test_params_are_the_flattened_recipe(tracked_run: Tracked) -> None:
    params = tracked_run.run.data.params
    saved = load_recipe(tracked_run.run_dir / "recipe.yaml")
    assert params == recipe_params(saved)
    assert Recipe.model_validate(_unflatten(params)) == saved  # nothing lost: the parameters are the recipe
    assert params["model.name"] == "test_efficientnet" and params["train.phases.1.lr"] == "0.003"
    assert params["train.phases.0.trainable"] == '["head"]' and params["tracking.mlflow"] == "true"
    assert tracked_run.run.info.run_name == "tiny" and tracked_run.run.info.status == "FINISHED"


def test_every_epoch_is_logged_at_its_step(tracked_run: Tracked) -> None:
    history = json.loads((tracked_run.run_dir / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    for key in ("train_loss", "val_loss", "val_auc", "val_acc", "lr", "train_img_s"):
        logged = tracked_run.client.get_metric_history(tracked_run.run.info.run_id, key)
        assert [(m.step, m.value) for m in sorted(logged, key=lambda m: m.step)] == [
            (h["epoch"], pytest.approx(h[key])) for h in history
        ], key


def test_final_metrics_carry_their_confidence_intervals(tracked_run: Tracked) -> None:
    metrics = json.loads((tracked_run.run_dir / "metrics.json").read_text())
    logged, tags = tracked_run.run.data.metrics, tracked_run.run.data.tags
    test, patient = metrics["image"]["test"], metrics["patient"]["test"]
    assert logged["test_auc"] == pytest.approx(test["auc"])
    assert (logged["test_auc_ci_low"], logged["test_auc_ci_high"]) == pytest.approx(tuple(test["auc_ci"]))
    assert (logged["test_acc_ci_low"], logged["test_acc_ci_high"]) == pytest.approx(tuple(test["acc_ci"]))
    positive = test["per_class"][test["positive_class"]]
    assert logged["test_sensitivity"] == pytest.approx(positive["sensitivity"])
    assert logged["test_sensitivity_ci_high"] == pytest.approx(positive["sensitivity_ci"][1])
    assert logged["patient_test_auc"] == pytest.approx(patient["auc"])
    assert logged["test_loss"] == pytest.approx(metrics["test"]["loss"])
    assert logged["best_val_auc"] == pytest.approx(metrics["image"]["val"]["auc"])  # not mixed into val_auc's epochs
    assert logged["best_epoch"] == metrics["best_epoch"]
    # the run's time is its own metric, not a last point on the epochs' "seconds" series
    assert logged["run_seconds"] == pytest.approx(metrics["seconds"])
    epochs = tracked_run.client.get_metric_history(tracked_run.run.info.run_id, "seconds")
    assert sorted(m.step for m in epochs) == [h["epoch"] for h in metrics["history"]]
    lo, hi = test["auc_ci"]
    assert tags["medvision.test_auc"] == f"{test['auc']:.3f} (95% CI {lo:.3f}-{hi:.3f})"
    assert tags["medvision.kind"] == "train" and tags["medvision.run_dir"] == str(tracked_run.run_dir)
    assert tags["medvision.positive_class"] == test["positive_class"] == "tumor"


def test_run_folder_files_are_artifacts(tracked_run: Tracked, tmp_path: Path) -> None:
    client, run_id = tracked_run.client, tracked_run.run.info.run_id
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.html", "metrics.json", "recipe.yaml", "plots", "model"} <= names
    assert not names & {"predictions.csv", "data_audit.csv", "train.log"}  # they name files: log_predictions
    assert uploaded(tracked_run.run_dir, TRAIN_FILES, True)[-3:] == [
        tracked_run.run_dir / "predictions.csv",
        tracked_run.run_dir / "data_audit.csv",
        tracked_run.run_dir / "train.log",
    ]
    assert "plots/roc.png" in {a.path for a in client.list_artifacts(run_id, "plots")}
    for name in ("metrics.json", "report.html", "recipe.yaml"):
        copy = Path(client.download_artifacts(run_id, name, str(tmp_path)))
        assert copy.read_bytes() == (tracked_run.run_dir / name).read_bytes(), name


def _test_batch(run_dir: Path) -> tuple[np.ndarray, list[str]]:
    """The run's test images as its loader hands them to the model (raw NCHW, the run's transfer dtype)."""
    recipe, _, bundle = load_run(run_dir, torch.device("cpu"))
    table = load_table(recipe.data, recipe.seed, cache_dir(recipe))
    ds = split_dataset(recipe, table, bundle, "test", train=False)
    return np.stack([ds[i][0].numpy() for i in range(len(ds))]), [table.ids[j] for j in ds.indices]


def _predicted(run_dir: Path, ids: list[str]) -> np.ndarray:
    with (run_dir / "predictions.csv").open(newline="") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh) if r["split"] == "test"}
    columns = [c for c in next(iter(rows.values())) if c.startswith("prob_")]
    return np.array([[float(rows[i][c]) for c in columns] for i in ids])


def test_logged_model_loads_with_pyfunc_and_predicts_as_the_run(
    tracked_run: Tracked, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked_run.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{tracked_run.run.info.run_id}/model")
    batch, ids = _test_batch(tracked_run.run_dir)
    assert batch.dtype == np.uint8 and batch.shape[1:] == (3, 32, 32) and len(batch) == 18
    out = model.predict(batch)
    assert np.abs(out["probabilities"] - _predicted(tracked_run.run_dir, ids)).max() < 1e-4
    inputs = model.metadata.get_input_schema().inputs
    assert [(i.name, i.type, i.shape) for i in inputs] == [("image", np.dtype("uint8"), (-1, 3, 32, 32))]
    assert model.metadata.metadata["classes"] == ["stroma", "tumor"]


def test_tensorboard_event_files_hold_the_epochs(tracked_run: Tracked) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = json.loads((tracked_run.run_dir / "metrics.json").read_text())["history"]
    events = EventAccumulator(str(tracked_run.run_dir / "tensorboard"))
    events.Reload()
    for key in ("val_auc", "train_loss"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [
            (h["epoch"], pytest.approx(h[key], rel=1e-6)) for h in history
        ]
    assert events.Scalars("final/test_auc")[0].step == 2


def test_tracking_writes_nothing_in_the_working_folder(tracked_run: Tracked) -> None:
    assert list(tracked_run.cwd.iterdir()) == []
    store = Path(tracked_run.uri.removeprefix("sqlite:///")).parent
    assert sorted(p.name for p in store.iterdir()) == ["mlartifacts", "mlflow.db"]


def test_after_one_failed_epoch_mlflow_is_sent_no_further_epochs_but_the_final_metrics(
    tiles_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that went away cost about 4 minutes of MLflow's retries on every epoch; now only once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = recipe_from_dict(tiny_recipe(tiles_manifest, tmp_path / "runs"),
                              overrides=["tracking.mlflow=true", f"tracking.uri={uri}"])  # fmt: skip
    tracker = Tracker.start(tmp_path / "runs" / "tiny", recipe)
    tracker.log_epoch(1, {"epoch": 1, "train_loss": 0.9})
    working = tracker._client
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker._client = MlflowClient(tracking_uri=f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="medvision"):
        tracker.log_epoch(2, {"epoch": 2, "train_loss": 0.8})
    assert "metrics of step 2 not logged" in caplog.text and "without sending MLflow its further epochs" in caplog.text
    tracker._client = working  # the server is back: the epochs still are not sent, the final metrics are
    tracker.log_epoch(3, {"epoch": 3, "train_loss": 0.7})
    tracker.finish(tmp_path / "runs" / "tiny", {"test_auc": 0.75})
    tracker.end()
    history = working.get_metric_history(tracker.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.9)]
    assert working.get_run(tracker.run_id).data.metrics["test_auc"] == 0.75


def test_one_failed_upload_leaves_the_others_and_names_itself(
    tiles_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An artifact that cannot be uploaded (a permission error, a store that refuses it) is named in the one error;
    the artifacts after it and the model still reach the run, which ends FAILED."""
    import onnx
    from onnx import TensorProto, helper

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = recipe_from_dict(tiny_recipe(tiles_manifest, tmp_path / "runs"),
                              overrides=["tracking.mlflow=true", f"tracking.uri={uri}"])  # fmt: skip
    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "plots").mkdir(parents=True)
    for name in ("recipe.yaml", "metrics.json", "report.html", "plots/roc.png"):
        (run_dir / name).write_text(name)
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 3, 2, 2])
    out = helper.make_tensor_value_info("probabilities", TensorProto.UINT8, ["batch", 3, 2, 2])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["probabilities"])], "g", [image], [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "model.onnx"))
    with caplog.at_level(logging.INFO, logger="medvision"), tracked(run_dir, recipe) as tracker:
        real = tracker._client.log_artifact

        def refuses_metrics(run_id: str, local_path: str, artifact_path: str | None = None) -> None:
            if Path(local_path).name == "metrics.json":
                raise PermissionError(f"[Errno 13] Permission denied: {local_path!r} at https://alice:s3cr3t@store/")
            real(run_id, local_path, artifact_path)

        monkeypatch.setattr(tracker._client, "log_artifact", refuses_metrics)
        tracker.finish(run_dir, {"test_auc": 0.5}, artifacts=[run_dir / n for n in ("recipe.yaml", "metrics.json",
                       "report.html", "plots", "gone.csv")], model=tmp_path / "model.onnx")  # fmt: skip
    client = MlflowClient(tracking_uri=uri)
    assert {a.path for a in client.list_artifacts(tracker.run_id)} == {"recipe.yaml", "report.html", "plots", "model"}
    assert [a.path for a in client.list_artifacts(tracker.run_id, "plots")] == ["plots/roc.png"]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.metrics["test_auc"] == 0.5
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "1 upload(s) missing from it: metrics.json (PermissionError: [Errno 13] Permission denied" in error
    assert "https://store/" in error and "s3cr3t" not in caplog.text and "gone.csv" not in error


def test_tracking_off_imports_and_writes_nothing(tiles_manifest: Path, tmp_path: Path) -> None:
    """The default recipe through the run log, an epoch row included: no MLflow, no TensorBoard, no store."""
    tree = tiny_recipe(tiles_manifest, tmp_path / "runs")
    code = f"""
import logging, sys
from pathlib import Path
from medvision.recipe import recipe_from_dict
from medvision.runs import EPOCH_ROW, run_log
from medvision.runtime import Dist
recipe = recipe_from_dict({tree!r})
with run_log(Path(recipe.output_dir) / recipe.name, Dist(), recipe) as tracker:
    logging.getLogger("medvision").info("epoch 1", extra={{EPOCH_ROW: {{"epoch": 1, "val_auc": 0.5}}}})
print(tracker.active, "mlflow" in sys.modules, "torch.utils.tensorboard" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **QUIET}, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "False"]
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == ["runs", "runs/tiny", "runs/tiny/train.log"]


def test_tracking_section_is_strict_and_off_by_default(tiles_manifest: Path, tmp_path: Path) -> None:
    tree = tiny_recipe(tiles_manifest, tmp_path)
    cfg = recipe_from_dict(tree).tracking
    assert (cfg.mlflow, cfg.tensorboard, cfg.uri, cfg.experiment, cfg.log_model) == (False, False, None,
                                                                                    "medvision", True)  # fmt: skip
    with pytest.raises(RecipeError, match=r"tracking\.mlfow: unknown key; did you mean 'mlflow'"):
        recipe_from_dict(tiny_recipe(tiles_manifest, tmp_path), overrides=["tracking.mlfow=true"])
    assert default_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_mlflow_tracking_uri_from_the_environment_is_the_default(
    tiles_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'env-store' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    recipe = recipe_from_dict(tiny_recipe(tiles_manifest, tmp_path / "runs"), overrides=["tracking.mlflow=true"])
    with tracked(tmp_path / "runs" / "tiny", recipe) as tracker:
        assert tracker.uri == uri
    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and not (tmp_path / "runs" / "mlflow.db").exists()
    given = recipe.changed({"tracking.uri": f"sqlite:///{tmp_path / 'given.db'}"})
    with tracked(tmp_path / "runs" / "tiny", given) as tracker:  # the recipe's uri wins over the environment
        assert tracker.uri == given.tracking.uri


def test_a_missing_package_or_a_bad_uri_names_the_fix(
    tiles_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tiny_recipe(tiles_manifest, tmp_path)
    bad = recipe_from_dict(tree, overrides=["tracking.mlflow=true", "tracking.uri=nosuchscheme://host/x"])
    with pytest.raises(TrackingError, match=r"tracking\.uri 'nosuchscheme://host/x': cannot open MLflow"):
        Tracker.start(tmp_path / "run", bad)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    with pytest.raises(TrackingError, match=r"mlflow is not installed; pip install -e \"\.\[tracking\]\""):
        Tracker.start(tmp_path / "run", recipe_from_dict(tree, overrides=["tracking.mlflow=true"]))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(TrackingError, match=r"TensorBoard is missing .*pip install -e \"\.\[tracking\]\""):
        Tracker.start(tmp_path / "run", recipe_from_dict(tree, overrides=["tracking.tensorboard=true"]))


def test_pretrain_is_tracked(tiles_manifest: Path, tracked_run: Tracked, tmp_path: Path) -> None:
    tree = tiny_recipe(tiles_manifest, tmp_path / "runs")
    tree.update(name="ssl", pretrain={"epochs": 1, "proj_dim": 16, "proj_hidden": 32})
    tree["data"]["batch_size"] = 8
    tree["tracking"] = {"mlflow": True, "uri": tracked_run.uri, "experiment": "tiny-pretrain"}
    run_dir = pretrain(recipe_from_dict(tree))
    client = tracked_run.client
    run = client.search_runs([client.get_experiment_by_name("tiny-pretrain").experiment_id])[0]
    history = json.loads((run_dir / "pretrain.json").read_text())["history"]
    knn = sorted(client.get_metric_history(run.info.run_id, "knn_acc"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in knn] == [(h["epoch"], pytest.approx(h["knn_acc"])) for h in history]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]
    assert run.data.metrics["final_train_loss"] == pytest.approx(history[-1]["train_loss"])
    assert run.data.tags["medvision.kind"] == "pretrain" and run.info.status == "FINISHED"
    assert {"pretrain.json", "model.safetensors", "recipe.yaml"} <= {a.path for a in client.list_artifacts(
        run.info.run_id)}  # fmt: skip


def test_label_benchmark_is_a_parent_run_with_a_child_per_grid_run(tiles_manifest: Path, tmp_path: Path) -> None:
    """Default store (``<output_dir>/mlflow.db``); the second call reuses the runs and logs them as children too."""
    tree = tiny_recipe(tiles_manifest, tmp_path / "base")
    tree["tracking"] = {"mlflow": True, "log_model": False}
    recipe = recipe_from_dict(tree)
    args = (recipe, [0.5, 1.0], ["random"], ["knn"], 1, tmp_path / "grid")
    first = label_benchmark(*args, resamples=20)
    label_benchmark(*args, resamples=20)
    client = MlflowClient(tracking_uri=default_uri(tmp_path / "base"))
    experiment = client.get_experiment_by_name("medvision").experiment_id
    parents = client.search_runs([experiment], "tags.`medvision.kind` = 'benchmark-labels'", order_by=["start_time"])
    assert len(parents) == 2 and all(p.info.run_name == "tiny-labels" for p in parents)
    for parent in parents:
        children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        by_fraction = {c.data.params["data.train_fraction"]: c for c in children}
        assert sorted(by_fraction) == ["0.5", "1.0"]
        for row in first.rows:
            child = by_fraction[str(row.fraction)]
            assert child.data.params["train.protocol"] == "knn" and child.info.status == "FINISHED"
            assert child.data.metrics["test_auc"] == pytest.approx(row.auc)
            assert child.data.tags["medvision.run_dir"] == row.run_dir
        curve = sorted(client.get_metric_history(parent.info.run_id, "test_auc.random.knn"), key=lambda m: m.step)
        assert [(m.step, m.value) for m in curve] == [(round(e["labels"]), pytest.approx(e["auc"]))
                                                      for e in first.summary]  # fmt: skip
        assert {"label_efficiency.csv", "label_efficiency.md", "label_efficiency.png"} <= {
            a.path for a in client.list_artifacts(parent.info.run_id)}  # fmt: skip
    assert not (tmp_path / "grid" / "tensorboard").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real ``mlflow server`` on a free local port, SQLite behind it, artifacts proxied into ``tmp_path``."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "served")]  # fmt: skip
    log_file = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(cmd, cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT,
                              env={**os.environ, **QUIET}, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:  # the server runs uvicorn as a child process: end the session this test started, by its id
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log_file.close()


@pytest.mark.slow  # about a minute: the server takes 30-40 s to start on 2 CPU cores
def test_a_run_logged_to_a_tracking_server(
    tracked_run: Tracked, mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run log and the train task's finish, pointed at a server by ``tracking.uri``; read back over REST."""
    run_dir = tmp_path / "runs" / "tiny"
    shutil.copytree(tracked_run.run_dir, run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml").changed({
        "output_dir": str(run_dir.parent), "tracking.uri": mlflow_server, "tracking.tensorboard": False,
        "tracking.experiment": "served"})  # fmt: skip
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    with run_log(run_dir, Dist(), recipe) as tracker:
        for row in history:  # as the training loop logs them
            logging.getLogger("medvision").info("epoch %d", row["epoch"], extra={EPOCH_ROW: row})
        log_trained_run(tracker, run_dir)
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = _get(f"{api}/experiments/get-by-name?experiment_name=served")["experiment"]["experiment_id"]
    runs = _get(f"{api}/runs/search", {"experiment_ids": [experiment]})["runs"]
    assert len(runs) == 1 and runs[0]["info"]["run_id"] == tracker.run_id
    run = _get(f"{api}/runs/get?run_id={tracker.run_id}")["run"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "tiny"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params == recipe_params(recipe)
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    test = json.loads((run_dir / "metrics.json").read_text())["image"]["test"]
    assert metrics["test_auc"] == pytest.approx(test["auc"]) and metrics["test_auc_ci_low"] == pytest.approx(
        test["auc_ci"][0])  # fmt: skip
    query = urllib.parse.urlencode({"run_id": tracker.run_id, "metric_key": "val_auc"})
    steps = _get(f"{api}/metrics/get-history?{query}")["metrics"]
    assert sorted((m["step"], m["value"]) for m in steps) == [(h["epoch"], pytest.approx(h["val_auc"]))
                                                              for h in history]  # fmt: skip
    listed = _get(f"{api}/artifacts/list?run_id={tracker.run_id}")["files"]
    assert {"report.html", "metrics.json", "recipe.yaml", "model"} <= {f["path"] for f in listed}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    model = mlflow.pyfunc.load_model(f"runs:/{tracker.run_id}/model")  # through the server's artifact proxy
    batch, ids = _test_batch(run_dir)
    assert np.abs(model.predict(batch)["probabilities"] - _predicted(run_dir, ids)).max() < 1e-4


def _patient_named_dataset(tiles_manifest: Path, root: Path) -> Path:
    """The tiles under patient-like paths (``DOE_JANE_MRN0003/IM0017.png``), and one unreadable image among them."""
    rows = list(csv.DictReader(tiles_manifest.open(newline="")))
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "patient_id"])
        for i, row in enumerate(rows):
            rel = f"DOE_JANE_MRN{i // 6:04d}/IM{i:04d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tiles_manifest.parent / row["path"], root / rel)
            writer.writerow([rel, row["label"], row["patient_id"]])
        (root / "DOE_JANE_MRN0005" / "IM9999.png").write_bytes(b"not an image")
        writer.writerow(["DOE_JANE_MRN0005/IM9999.png", rows[0]["label"], rows[0]["patient_id"]])
    return root / "manifest.csv"


def _everything_logged(client: Any, run_id: str, into: Path) -> dict[str, bytes]:
    run = client.get_run(run_id)
    texts = {"params": json.dumps(run.data.params).encode(), "tags": json.dumps(run.data.tags).encode(),
             "metrics": json.dumps(run.data.metrics).encode()}  # fmt: skip
    folder = Path(client.download_artifacts(run_id, "", str(into)))
    texts.update({str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()})
    return texts


def test_no_file_name_reaches_mlflow_unless_log_predictions(tiles_manifest: Path, tmp_path: Path) -> None:
    """train.log names the files a run left out (and data_audit.csv, predictions.csv every file): by default none of
    them, and no file name, reaches the tracking server; with tracking.log_predictions train.log does."""
    (tmp_path / "data").mkdir()
    manifest = _patient_named_dataset(tiles_manifest, tmp_path / "data")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tree = tiny_recipe(manifest, tmp_path / "runs")
    tree["data"]["on_error"] = "skip"
    tree["tracking"] = {"mlflow": True, "uri": uri, "log_model": False}  # the ONNX model names no file either
    recipe = recipe_from_dict(tree)
    assert main(["train", str(_write(tmp_path / "r.yaml", recipe))]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    assert "DOE_JANE_MRN0005/IM9999.png" in (run_dir / "train.log").read_text()  # the log does name it
    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((run_dir / RECORD).read_text())["run_id"]
    logged = _everything_logged(client, run_id, tmp_path / "default")
    assert {"recipe.yaml", "metrics.json", "report.html"} <= set(logged) and "train.log" not in logged
    assert [name for name, data in logged.items() if b"DOE_JANE" in data] == []

    with tracked(run_dir, recipe.changed({"tracking.log_predictions": True})) as tracker:
        log_trained_run(tracker, run_dir)
    logged = _everything_logged(client, tracker.run_id, tmp_path / "predictions")
    assert logged["train.log"] == (run_dir / "train.log").read_bytes()
    assert {"predictions.csv", "data_audit.csv"} <= set(logged)


def _write(path: Path, recipe: Recipe) -> Path:
    path.write_text(dump_recipe(recipe))
    return path


def test_resume_continues_the_same_mlflow_run(
    tiles_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run interrupted after its first epoch, resumed: one MLflow run, every epoch at its step, FINISHED; a
    second resume of the finished run starts no other run either."""
    import medvision.tasks.train as train_task

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    phases = [{"name": "all", "epochs": 2, "trainable": "all", "lr": 1e-2}]
    tree = tiny_recipe(tiles_manifest, tmp_path / "runs", phases=phases)
    tree["tracking"] = {"mlflow": True, "uri": uri, "log_model": False}
    recipe = recipe_from_dict(tree)
    real, calls = loop.train_one_epoch, {"n": 0}

    def dies_in_epoch_two(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill in epoch 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_task.train(recipe)
    monkeypatch.setattr(loop, "train_one_epoch", real)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("medvision").experiment_id
    (first,) = client.search_runs([experiment])
    assert first.info.status == "KILLED"
    run_dir = tmp_path / "runs" / "tiny"
    assert json.loads((run_dir / RECORD).read_text()) == {"run_id": first.info.run_id, "experiment_id": experiment,
                                                          "uri": uri}  # fmt: skip
    assert [m.step for m in client.get_metric_history(first.info.run_id, "val_auc")] == [1]

    for _ in range(2):  # the interrupted run, then the finished one
        train_task.train(load_recipe(run_dir / "recipe.yaml"), resume=True)
        (run,) = client.search_runs([experiment])
        assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
        history = json.loads((run_dir / "metrics.json").read_text())["history"]
        logged = sorted(client.get_metric_history(run.info.run_id, "val_auc"), key=lambda m: m.step)
        assert [(m.step, m.value) for m in logged] == [(h["epoch"], pytest.approx(h["val_auc"])) for h in history]
        assert [h["epoch"] for h in history] == [1, 2]
        assert run.data.params == recipe_params(load_recipe(run_dir / "recipe.yaml"))
        assert run.data.metrics["test_auc"] == pytest.approx(
            json.loads((run_dir / "metrics.json").read_text())["image"]["test"]["auc"])  # fmt: skip


def test_sigterm_ends_the_mlflow_run_killed(tiles_manifest: Path, tmp_path: Path) -> None:
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("the test runner handles SIGTERM itself; tracking leaves such a handler alone")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = recipe_from_dict(tiny_recipe(tiles_manifest, tmp_path / "runs"),
                              overrides=["tracking.mlflow=true", f"tracking.uri={uri}"])  # fmt: skip
    with pytest.raises(SystemExit) as stopped, tracked(tmp_path / "runs" / "tiny", recipe) as tracker:
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL  # else the kill below would end pytest
        tracker.log_epoch(1, {"epoch": 1, "val_auc": 0.5})
        os.kill(os.getpid(), signal.SIGTERM)  # as SLURM stops a job at its time limit
        for _ in range(500):
            time.sleep(0.01)
    assert stopped.value.code == 143
    assert MlflowClient(tracking_uri=uri).get_run(tracker.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_credentials_in_the_tracking_uri_are_never_logged_or_uploaded(
    tiles_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real = tracking._open_experiment
    # as if a server answered at the URI given: the store behind it is a local one
    monkeypatch.setattr(tracking, "_open_experiment", lambda uri, experiment: real(store, experiment))
    secret = "https://alice:s3cr3t@mlflow.example.org:5000/"
    recipe = recipe_from_dict(tiny_recipe(tiles_manifest, tmp_path / "runs"),
                              overrides=["tracking.mlflow=true", f"tracking.uri={secret}"])  # fmt: skip
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    _write(run_dir / "recipe.yaml", recipe)
    with caplog.at_level(logging.INFO, logger="medvision"), tracked(run_dir, recipe) as tracker:
        tracker.finish(run_dir, {"test_auc": 0.5}, artifacts=[run_dir / "recipe.yaml"])
    client = MlflowClient(tracking_uri=store)
    logged = _everything_logged(client, tracker.run_id, tmp_path / "down")
    assert logged and not [name for name, data in logged.items() if b"s3cr3t" in data or b"alice" in data]
    assert client.get_run(tracker.run_id).data.params["tracking.uri"] == "https://mlflow.example.org:5000/"
    assert load_recipe(tmp_path / "down" / "recipe.yaml").tracking.uri == "https://mlflow.example.org:5000/"
    assert "tracking: MLflow run" in caplog.text and "s3cr3t" not in caplog.text
    assert "s3cr3t" not in (run_dir / RECORD).read_text()
    assert "s3cr3t" in (run_dir / "recipe.yaml").read_text()  # the run folder is the user's own, as given

    def outage(*args: Any, **kwargs: Any) -> None:  # MLflow's own errors name the URL, credentials and all
        raise RuntimeError(f"API request to {secret}api/2.0/mlflow/runs/log-batch failed")

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medvision"), tracked(tmp_path / "runs" / "down", recipe) as broken:
        monkeypatch.setattr(broken._client, "log_batch", outage)
        monkeypatch.setattr(broken._client, "set_terminated", outage)
        broken.log_epoch(1, {"epoch": 1, "val_auc": 0.5})
    assert "metrics of step 1 not logged" in caplog.text and "cannot end MLflow run" in caplog.text
    assert "s3cr3t" not in caplog.text and "https://mlflow.example.org:5000/api" in caplog.text

    monkeypatch.setattr(tracking, "_open_experiment", real)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    unreachable = recipe.changed({"tracking.uri": f"http://alice:s3cr3t@127.0.0.1:{_free_port()}"})
    with pytest.raises(TrackingError, match=r"tracking\.uri 'http://127\.0\.0\.1:\d+': cannot open") as err:
        Tracker.start(tmp_path / "other", unreachable)
    assert "s3cr3t" not in str(err.value)


def test_resume_reopens_only_the_recorded_run_at_the_same_uri(
    tiles_manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = recipe_from_dict(tiny_recipe(tiles_manifest, tmp_path / "runs"),
                              overrides=["tracking.mlflow=true", f"tracking.uri={uri}"])  # fmt: skip
    run_dir = tmp_path / "runs" / "tiny"
    with tracked(run_dir, recipe, resume=True) as first:  # nothing recorded yet: a new run
        first.log_epoch(1, {"epoch": 1, "val_auc": 0.5})
    with tracked(run_dir, recipe, resume=True) as again:
        assert again.run_id == first.run_id
        assert MlflowClient(tracking_uri=uri).get_run(again.run_id).info.status == "RUNNING"
        again.log_epoch(2, {"epoch": 2, "val_auc": 0.6})
    client = MlflowClient(tracking_uri=uri)
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "val_auc")] == [(1, 0.5), (2, 0.6)]
    other = recipe.changed({"tracking.uri": f"sqlite:///{tmp_path / 'other.db'}"})
    with caplog.at_level(logging.WARNING, logger="medvision"), tracked(run_dir, other, resume=True) as moved:
        assert moved.run_id != first.run_id
    assert f"names MLflow run {first.run_id} at {uri}, not at" in caplog.text
    with tracked(run_dir, recipe) as fresh:  # not a resume (--overwrite): a new run, and the record follows it
        assert fresh.run_id != first.run_id
    assert json.loads((run_dir / RECORD).read_text())["run_id"] == fresh.run_id

"""Experiment tracking: one small adapter between a run and MLflow or TensorBoard, off by default.

The run log (:func:`medvision.runs.run_log`) starts a :class:`Tracker` for the recipe's ``tracking``
section, hands it each epoch's row as the training loop logs it, and ends it with the run's status;
the task that wrote the run folder then calls :meth:`Tracker.finish` with the final metrics, the
folder's files and the model. The training loop never calls it.

What a tracked run holds in MLflow:

- parameters: the recipe flattened to dotted keys (``train.phases.0.lr``; a list of models is numbered,
  a list of values is JSON), see :func:`recipe_params`;
- metrics: each epoch's row (``train_loss``, ``val_auc``, ``lr``, ...) at its epoch as the step, and the
  final metrics of ``metrics.json`` with their CIs (``test_auc``, ``test_auc_ci_low``, ...), see
  :func:`run_metrics`; a cross-validated MIL run has no epochs: each fold's row at the fold's index as the
  step (``fold_auc``), and the summary over the folds as its final metrics (``cv_auc_mean``, ``pooled_auc``);
- tags: ``medvision.*`` (kind, run folder, version, positive class, headline AUC with its CI);
- artifacts: ``recipe.yaml``, ``metrics.json``, ``report.html`` and the other files the task names, and
  under ``model/`` an MLflow model that ``mlflow.pyfunc.load_model`` runs (ONNX flavour; not for a MIL run,
  whose heads score tile features, not images).

The run folder records its MLflow run in :data:`RECORD`, so that a resumed run reopens it (one run, its epochs
at their steps); a run ends FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM (see :func:`tracked`). A
``tracking.uri``'s ``user:password@`` is never logged, recorded or uploaded (:func:`redact_uri`).

Only rank 0 tracks: :func:`~medvision.runs.run_log` gives the other ranks an idle tracker. MLflow and
TensorBoard are imported only when the recipe turns them on, and MLflow's telemetry is switched off
(``MLFLOW_DISABLE_TELEMETRY``) before it is imported, unless the environment says otherwise.

Examples:
    >>> with tracked(run_dir, recipe) as tracker:
    ...     tracker.log_epoch(1, {"train_loss": 0.61, "val_auc": 0.83})
    ...     tracker.finish(run_dir, {"test_auc": 0.81}, artifacts=[run_dir / "metrics.json"])
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import medvision
from medvision.errors import MedvisionError
from medvision.io.files import atomic_write_text
from medvision.recipe import Recipe

log = logging.getLogger("medvision")

INSTALL = 'pip install -e ".[tracking]" from the medvision checkout'
MAX_PARAM_LENGTH = 6000
"""MLflow's limit on a parameter value's length; longer values are cut (and end with an ellipsis)."""
LOCAL_ARTIFACTS = "mlartifacts"
"""Beside a local ``sqlite:///`` store: the folder that holds its runs' artifacts."""
RECORD = "tracking.json"
"""In the run folder: the MLflow run it is logged to (``run_id``, ``experiment_id``, the URI without credentials),
written when that run starts, so that ``--resume`` continues the same MLflow run."""
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s'\"]*@")
REDACTED_SUFFIXES = (".yaml", ".yml", ".json", ".md", ".html", ".log", ".txt", ".csv")
"""Text files whose uploaded copy has URIs' credentials taken out (:func:`redact_uri`)."""


class TrackingError(MedvisionError, RuntimeError):
    """Tracking that cannot start as the recipe asks: a missing package or an unusable ``tracking.uri``."""


def _cause(err: BaseException) -> str:
    """An exception as a log line names it, ``Type: message``, any credentials in a URI of it left out."""
    return f"{type(err).__name__}: {redact_uri(str(err))}"


def redact_uri(text: str) -> str:
    """``text`` with the ``user:password@`` of every URI in it taken out: what may be logged or stored.

    Examples:
        >>> redact_uri("https://alice:s3cr3t@mlflow.example.org/")
        'https://mlflow.example.org/'
    """
    return _USERINFO.sub(r"\1", text)


def default_uri(output_dir: str | Path) -> str:
    """``sqlite:///<output_dir>/mlflow.db``: a local MLflow store beside the run folders, no server needed.

    MLflow 3 refuses the old ``./mlruns`` file store unless ``MLFLOW_ALLOW_FILE_STORE=true``; SQLite is
    what it now uses by default, and what ``mlflow ui --backend-store-uri`` reads.
    """
    return f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db').as_posix()}"


def recipe_params(recipe: Recipe) -> dict[str, str]:
    """The recipe as MLflow parameters: dotted keys, strings as they are, other values as JSON.

    A list of sections is numbered (``train.phases.0.lr``: MLflow keys allow no brackets); a list of
    values stays one parameter (``evaluation.tta`` = ``["hflip"]``).

    Examples:
        >>> recipe_params(recipe)["train.phases.0.lr"]
        '0.01'
    """
    out: dict[str, str] = {}

    def walk(key: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for name, item in value.items():
                walk(f"{key}.{name}" if key else str(name), item)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                walk(f"{key}.{i}", item)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[key] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 1] + "…"

    walk("", recipe.model_dump(mode="json"))
    if "tracking.uri" in out:
        out["tracking.uri"] = redact_uri(out["tracking.uri"])
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(v is None or _number(v) for v in value)


def _put(out: dict[str, float], name: str, value: Any) -> None:
    """``value`` as ``out[name]`` when it is a number; a CI ``<name>_ci: [low, high]`` as ``<name>_ci_low`` and
    ``<name>_ci_high`` (an undefined bound left out); anything else is left out."""
    if _number(value):
        out[name] = float(value)
    elif name.endswith("_ci") and _pair(value):
        for end, bound in zip(("low", "high"), value, strict=True):
            if bound is not None:
                out[f"{name}_{end}"] = float(bound)


def flat_metrics(section: Mapping[str, Any], stem: str, skip: Iterable[str] = ()) -> dict[str, float]:
    """The numbers of one section of ``metrics.json`` as ``<stem>_<key>``, its CIs as ``<stem>_<key>_ci_low`` /
    ``_ci_high``; text, ``None``, nested sections and the keys in ``skip`` are left out.

    Examples:
        >>> flat_metrics({"auc": 0.9, "auc_ci": [0.8, 0.97], "n": 12, "fold": 0}, "fold", skip=["fold"])
        {'fold_auc': 0.9, 'fold_auc_ci_low': 0.8, 'fold_auc_ci_high': 0.97, 'fold_n': 12.0}
    """
    out: dict[str, float] = {}
    left_out = set(skip)
    for key, value in section.items():
        if key not in left_out:
            _put(out, f"{stem}_{key}", value)
    return out


def run_metrics(metrics: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """The final metrics of a run's ``metrics.json`` as flat MLflow metrics, and its headline as tags.

    Image level: ``test_<metric>`` (``test_auc``, ``test_acc``, ``test_average_precision``), a CI
    ``<metric>_ci: [low, high]`` as ``test_auc_ci_low`` / ``test_auc_ci_high``, calibration as
    ``test_ece_after`` / ``test_brier_after``, and the positive class's ``test_sensitivity``,
    ``test_specificity`` (with CIs), ``test_ppv``, ``test_npv``. Validation the same as ``best_val_*``
    (the chosen checkpoint, calibrated), so it does not mix with the epochs' ``val_auc`` curve; the
    patient (or slide) level as ``patient_test_*`` and ``patient_val_*``. Values that are undefined
    (``None``) are left out; NaN stays NaN.

    A cross-validated MIL run's ``metrics.json`` (:func:`medvision.tasks.mil_report.cv_metrics`, recognised by
    its ``across_folds``) gives the summary over its folds instead: per metric (``auc``, ``acc``,
    ``balanced_acc``; ``mse``, ``mae``, ``r2`` for a continuous target) ``cv_<metric>_mean``, ``cv_<metric>_sd``,
    the t-interval of the mean as ``cv_<metric>_ci_low`` / ``_ci_high`` and ``cv_<metric>_folds`` (the folds
    where it is defined); the pooled out-of-fold ``pooled_<metric>`` with its bootstrap CI; and ``slides``,
    ``patients``, ``folds``. Its tags are ``medvision.cv_<metric>`` (mean ± SD with the t-interval),
    ``medvision.pooled_<metric>`` (with its CI), ``medvision.target`` and the positive class. Each fold's own
    row is not a final metric: it is logged at the fold's index as the step
    (:func:`medvision.tasks.track.log_mil_run`).
    """
    if "across_folds" in metrics:
        return _cross_validated(metrics)
    out: dict[str, float] = {}
    stems = {("image", "val"): "best_val", ("image", "test"): "test", ("patient", "val"): "patient_val",
             ("patient", "test"): "patient_test"}  # fmt: skip
    for (level, split), stem in stems.items():
        block = metrics.get(level)
        section = block.get(split) if isinstance(block, dict) else None
        if not isinstance(section, dict):
            continue
        out.update(flat_metrics(section, stem))
        calibration = section.get("calibration") or {}
        out.update(flat_metrics(calibration, stem, skip=[k for k in calibration if not k.startswith(("ece", "brier"))]))
        positive = (section.get("per_class") or {}).get(section.get("positive_class"), {})
        out.update(flat_metrics(positive, stem, skip=["support"]))
    for split in ("val", "test"):
        _put(out, f"{stems['image', split]}_loss", (metrics.get(split) or {}).get("loss"))
    _put(out, "best_epoch", metrics.get("best_epoch"))
    _put(out, "run_seconds", metrics.get("seconds"))  # not "seconds": that is each epoch's series

    tags: dict[str, str] = {}
    test = (metrics.get("image") or {}).get("test") or {}
    level = (metrics.get("bootstrap") or {}).get("level", 0.95)
    for key in ("auc", "acc"):
        value, ci = test.get(key), test.get(f"{key}_ci") or []
        if _number(value):
            tags[f"medvision.test_{key}"] = f"{value:.3f}{_ci_text(ci, level)}"
    if test.get("positive_class"):
        tags["medvision.positive_class"] = str(test["positive_class"])
    if metrics.get("monitor"):
        tags["medvision.monitor"] = str(metrics["monitor"])
    return out, tags


def _ci_text(ci: Any, level: float, what: str = "CI") -> str:
    return f" ({level:.0%} {what} {ci[0]:.3f}-{ci[1]:.3f})" if _pair(ci) and None not in ci else ""


def _cross_validated(metrics: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """:func:`run_metrics` of a cross-validated MIL run (see there)."""
    out: dict[str, float] = {}
    tags: dict[str, str] = {}
    level = metrics.get("ci_level") or 0.95
    pooled = metrics.get("pooled") or {}
    for name, across in (metrics.get("across_folds") or {}).items():
        out.update(flat_metrics(across, f"cv_{name}"))
        if _number(across.get("mean")) and _number(across.get("sd")):
            tags[f"medvision.cv_{name}"] = (f"{across['mean']:.3f} ± {across['sd']:.3f} over {across.get('folds')} "
                                            f"folds{_ci_text(across.get('ci'), level, 't-interval')}")  # fmt: skip
        if _number(pooled.get(name)):
            tags[f"medvision.pooled_{name}"] = f"{pooled[name]:.3f}{_ci_text(pooled.get(f'{name}_ci'), level)}"
    out.update(flat_metrics(pooled, "pooled", skip=["n"]))
    _put(out, "slides", metrics.get("slides"))
    _put(out, "patients", metrics.get("patients"))
    _put(out, "folds", len(metrics.get("folds") or []))
    tags["medvision.target"] = str(metrics.get("target"))
    classes, positive = metrics.get("classes"), metrics.get("positive_index")
    if classes and isinstance(positive, int):
        tags["medvision.positive_class"] = str(classes[positive])
    return out, tags


def _import_mlflow() -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage data leaves the machine
    try:
        import mlflow
    except ModuleNotFoundError as err:
        raise TrackingError(f"tracking.mlflow is true but {err.name} is not installed; {INSTALL}") from None
    return mlflow


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch raises ImportError, not ModuleNotFoundError, without tensorboard
        raise TrackingError(f"tracking.tensorboard is true but TensorBoard is missing ({err}); {INSTALL}") from None
    return SummaryWriter


def _open_experiment(uri: str, experiment: str) -> tuple[Any, str]:
    """An MlflowClient on ``uri`` and the id of ``experiment`` (created when missing); a local SQLite store
    keeps its artifacts in ``mlartifacts/<experiment>`` beside the database, not in the current folder."""
    from mlflow.tracking import MlflowClient

    location = None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        db.parent.mkdir(parents=True, exist_ok=True)
        location = str(db.resolve().parent / LOCAL_ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment))
    try:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return client, found.experiment_id
        return client, client.create_experiment(experiment, artifact_location=location)
    except Exception as err:  # MLflow raises many kinds (MlflowException, SQLAlchemy, requests)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise TrackingError(f"tracking.uri {redact_uri(uri)!r}: cannot open MLflow experiment {experiment!r} "
                            f"({type(err).__name__}: {redact_uri(first[:400])})") from None  # fmt: skip


def _tensor_spec(value_info: Any) -> Any:
    """An MLflow TensorSpec for an ONNX graph input or output (a named dimension is the batch: -1)."""
    from mlflow.types.schema import TensorSpec
    from onnx.helper import tensor_dtype_to_np_dtype

    tensor = value_info.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return TensorSpec(tensor_dtype_to_np_dtype(tensor.elem_type), shape, value_info.name)


class Tracker:
    """A run's MLflow run and TensorBoard writer; ``Tracker()`` tracks nothing (every call is a no-op).

    Start one with :meth:`start` (or :func:`tracked`, which also ends it). A failure to log an epoch
    is a warning, not the end of the training run.
    """

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.uri: str | None = None
        self.experiment_id: str | None = None
        self.log_model = self.log_predictions = False
        self._client: Any = None
        self._writer: Any = None
        self._step = 0
        self._warned = False
        self._failed = False

    @property
    def safe_uri(self) -> str:
        """The tracking URI without credentials: what is logged and recorded."""
        return redact_uri(self.uri or "")

    @property
    def active(self) -> bool:
        return self._client is not None or self._writer is not None

    @classmethod
    def start(cls, run_dir: Path, recipe: Recipe, parent: Tracker | None = None, kind: str = "train",
              name: str | None = None, resume: bool = False, record: bool = True) -> Tracker:  # fmt: skip
        """Starts tracking ``recipe``'s run in ``run_dir`` as its ``tracking`` section asks (a child run of
        ``parent`` when that one is an MLflow run), logging the recipe as parameters. With ``resume``, the MLflow
        run that ``run_dir``'s :data:`RECORD` names is reopened (RUNNING again, its parameters kept, the epochs
        going on at their steps), whatever it ended as; a new one is started only when there is none to reopen.
        ``record=False`` (a benchmark logging a run it reused) leaves the folder's :data:`RECORD` naming its own run.

        Raises:
            TrackingError: MLflow or TensorBoard is asked for but not installed, or ``tracking.uri`` is unusable.
        """
        cfg, tracker = recipe.tracking, cls()
        writer = _summary_writer_class() if cfg.tensorboard else None  # both checked before anything is written
        if cfg.mlflow:
            _import_mlflow()
            tracker._start_mlflow(run_dir, recipe, parent, kind, name, resume, record)
        if writer is not None:
            tracker._writer = writer(log_dir=str(run_dir / "tensorboard"))
        return tracker

    def _start_mlflow(self, run_dir: Path, recipe: Recipe, parent: Tracker | None, kind: str,
                      name: str | None, resume: bool, record: bool) -> None:  # fmt: skip
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        cfg = recipe.tracking
        if parent is not None and parent._client is not None:
            self._client, self.uri, self.experiment_id = parent._client, parent.uri, parent.experiment_id
        else:
            self.uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(recipe.output_dir)
            self._client, self.experiment_id = _open_experiment(self.uri, cfg.experiment)
        self.log_model, self.log_predictions = cfg.log_model, cfg.log_predictions
        params = recipe_params(recipe)
        reopened = self._reopen(run_dir, params) if resume else None
        if reopened is None:
            tags = {"medvision.kind": kind, "medvision.run_dir": str(run_dir.resolve()),
                    "medvision.version": medvision.__version__}  # fmt: skip
            if parent is not None and parent.run_id is not None:
                tags[MLFLOW_PARENT_RUN_ID] = parent.run_id
            try:
                run = self._client.create_run(self.experiment_id, run_name=name or recipe.name, tags=tags)
            except Exception as err:
                raise TrackingError(f"tracking.uri {self.safe_uri!r}: cannot start an MLflow run "
                                    f"({_cause(err)})") from None  # fmt: skip
            self.run_id = run.info.run_id
        try:
            if record:
                mine = {"run_id": self.run_id, "experiment_id": self.experiment_id, "uri": self.safe_uri}
                atomic_write_text(run_dir / RECORD, json.dumps(mine, indent=2) + "\n")
            self.log_params(params if reopened is None else reopened)
        except Exception:
            self._failed = True
            self.end()
            raise
        log.info("tracking: MLflow run %s (%s) %s in experiment %r at %s", self.run_id, name or recipe.name,
                 "started" if reopened is None else "reopened", cfg.experiment, self.safe_uri)  # fmt: skip

    def _reopen(self, run_dir: Path, params: dict[str, str]) -> dict[str, str] | None:
        """Sets the MLflow run that ``run_dir``'s :data:`RECORD` names RUNNING again and returns the parameters it
        lacks (MLflow refuses to change a parameter's value: one that differs is kept, with a warning); ``None``
        when there is no such run on this tracking URI (a new one is started)."""
        record = run_dir / RECORD
        try:
            saved = json.loads(record.read_text())
            run_id, uri = str(saved["run_id"]), saved.get("uri")
        except FileNotFoundError:
            log.info("tracking: %s has no %s (tracked before medvision recorded its MLflow run); starting a new run "
                     "for the resumed epochs", run_dir, RECORD)  # fmt: skip
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("tracking: %s is unreadable (%s: %s), expected {\"run_id\": ...}; starting a new MLflow run",
                        record, type(err).__name__, err)  # fmt: skip
            return None
        if uri != self.safe_uri:
            log.warning("tracking: %s names MLflow run %s at %s, not at %s; starting a new run there", record, run_id,
                        uri, self.safe_uri)  # fmt: skip
            return None
        try:
            run = self._client.get_run(run_id)
            if run.info.lifecycle_stage != "active" or run.info.experiment_id != self.experiment_id:
                raise LookupError("deleted, or in another experiment than tracking.experiment")
            self._client.update_run(run_id, status="RUNNING")
        except Exception as err:  # MLflow raises MlflowException (RESOURCE_DOES_NOT_EXIST) and others
            log.warning("tracking: cannot reopen MLflow run %s of %s (%s: %s); starting a new run", run_id, record,
                        type(err).__name__, redact_uri(str(err).split("\n")[0][:200]))  # fmt: skip
            return None
        self.run_id = run_id
        logged = run.data.params
        changed = sorted(k for k in params if k in logged and logged[k] != params[k])
        if changed:
            log.warning("tracking: the resumed recipe differs from MLflow run %s's parameters in %s; MLflow keeps "
                        "the first values", run_id, ", ".join(changed[:10]))  # fmt: skip
        return {k: v for k, v in params.items() if k not in logged}

    def log_params(self, params: Mapping[str, str]) -> None:
        if self._client is None:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters a batch
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """The numeric values of ``metrics`` (strings, booleans and ``None`` are skipped) at ``step``; a failure
        is a warning, once per run: a tracking hiccup must not end hours of training. After one, no further step
        is sent to MLflow (each call to a server that went away spent about 4 minutes in MLflow's own retries,
        every epoch); the final metrics are tried once more by :meth:`finish`."""
        values = {k: float(v) for k, v in metrics.items() if _number(v)}
        self._step = max(self._step, step)
        try:
            if self._writer is not None:
                for key, value in values.items():
                    self._writer.add_scalar(key, value, step)
                self._writer.flush()
            if self._client is not None and values and not self._warned:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                items = [Metric(k, v, now, step) for k, v in values.items()]
                for i in range(0, len(items), 1000):
                    self._client.log_batch(self.run_id, metrics=items[i : i + 1000])
        except Exception as err:  # MLflow raises many kinds (MlflowException, SQLAlchemy, requests)
            if not self._warned:
                log.warning("tracking: metrics of step %d not logged (%s); the run goes on without sending "
                            "MLflow its further epochs (its final metrics are tried at the end)", step,
                            _cause(err))  # fmt: skip
                self._warned = True

    def log_epoch(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One epoch's row as the loop logs it (``epoch``, ``phase``, ``train_loss``, ``val_auc``...) at ``step``."""
        self.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    def finish(self, run_dir: Path, metrics: Mapping[str, Any], tags: Mapping[str, str] | None = None,
               artifacts: Iterable[Path] = (), model: Path | None = None,
               model_metadata: dict[str, Any] | None = None) -> None:  # fmt: skip
        """The run's final ``metrics`` and ``tags``, its ``artifacts`` (files and folders of ``run_dir``, which
        keep their relative paths) and, when given, the ONNX ``model`` as an MLflow model under ``model/``.

        A failure is logged as an error and ends the MLflow run as FAILED; the run folder stays as it is. Each
        artifact and the model are uploaded on their own: one that fails is named in that error, the others go on.
        """
        if not self.active:
            return
        try:
            if self._writer is not None:
                for key, value in metrics.items():
                    if _number(value):
                        self._writer.add_scalar(f"final/{key}", float(value), self._step)
                self._writer.flush()
            if self._client is None:
                return
            from mlflow.entities import Metric, RunTag

            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if _number(v)]
            for i in range(0, len(items), 1000):
                self._client.log_batch(self.run_id, metrics=items[i : i + 1000])
            if tags:
                self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            failed: list[str] = []  # each upload on its own: one that fails leaves the others to go on
            for path in artifacts:
                name = str(path)
                try:
                    if not path.exists():
                        continue
                    rel = path.resolve().relative_to(run_dir.resolve()).parent.as_posix()
                    folder = None if rel == "." else rel
                    name = path.name if folder is None else f"{folder}/{path.name}"
                    if path.is_dir():
                        self._client.log_artifacts(self.run_id, str(path), name)
                    else:
                        self._log_file(path, folder)
                except Exception as err:
                    failed.append(f"{name} ({_cause(err)})")
            try:
                if model is not None:
                    self._log_onnx(model, model_metadata or {})
            except Exception as err:
                failed.append(f"model/ ({_cause(err)})")
            if failed:
                self._failed = True
                log.error("tracking: the MLflow run %s of %s is incomplete, %d upload(s) missing from it: %s; "
                          "the run folder itself is complete", self.run_id, run_dir, len(failed),
                          "; ".join(failed))  # fmt: skip
        except Exception as err:
            self._failed = True
            log.error("tracking: the MLflow run %s of %s is incomplete (%s); the run folder itself is complete",
                      self.run_id, run_dir, _cause(err))  # fmt: skip

    def _log_file(self, path: Path, folder: str | None) -> None:
        """One file as an artifact; a text file that holds a URI with credentials (``tracking.uri`` in
        ``recipe.yaml``) as a copy without them (:func:`redact_uri`); the run folder keeps its own."""
        text = path.read_text(errors="replace") if path.suffix in REDACTED_SUFFIXES else ""
        clean = redact_uri(text)
        if clean == text:
            self._client.log_artifact(self.run_id, str(path), folder)
            return
        with tempfile.TemporaryDirectory(prefix="medvision-mlflow-") as tmp:
            copy = Path(tmp) / path.name
            copy.write_text(clean)
            self._client.log_artifact(self.run_id, str(copy), folder)

    def _log_onnx(self, path: Path, metadata: dict[str, Any]) -> None:
        """The ONNX file as an MLflow model (pyfunc: raw NCHW batch in, calibrated probabilities out)."""
        import mlflow.onnx
        import onnx
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema

        proto = onnx.load(str(path))
        graph = proto.graph
        signature = ModelSignature(inputs=Schema([_tensor_spec(v) for v in graph.input]),
                                   outputs=Schema([_tensor_spec(v) for v in graph.output]))  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="medvision-mlflow-") as tmp:
            local = Path(tmp) / "model"
            # the requirements are onnx and onnxruntime: inferring them runs a subprocess (12 s on 2 cores)
            mlflow.onnx.save_model(proto, str(local), signature=signature, metadata=metadata,
                                   pip_requirements=mlflow.onnx.get_default_pip_requirements(),
                                   save_as_external_data=proto.ByteSize() > 2**30)  # fmt: skip
            self._client.log_artifacts(self.run_id, str(local), "model")
        log.info("tracking: model logged as runs:/%s/model (ONNX, pyfunc)", self.run_id)

    def end(self, status: str = "FINISHED") -> None:
        """Closes the TensorBoard writer and ends the MLflow run (FAILED if :meth:`finish` failed)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._client is not None:
            try:
                self._client.set_terminated(self.run_id, "FAILED" if self._failed else status)
            except Exception as err:
                log.warning("tracking: cannot end MLflow run %s (%s)", self.run_id, _cause(err))
            self._client = None


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM (what SLURM, ``kill`` and ``docker stop`` send) raises ``SystemExit(143)`` in the main thread, so the
    run ends as KILLED instead of staying RUNNING; only over the default action (a program with its own handler,
    or one that ignores SIGTERM, has decided); the previous handler is back afterwards."""
    ours = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if ours:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        if ours and signal.getsignal(signal.SIGTERM) is _terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def tracked(run_dir: Path, recipe: Recipe, parent: Tracker | None = None, kind: str = "train",
            name: str | None = None, resume: bool = False, record: bool = True) -> Iterator[Tracker]:  # fmt: skip
    """:meth:`Tracker.start` (``resume``: reopening the run folder's MLflow run), and at the end :meth:`Tracker.end`:
    FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM (which, while tracking, raises ``SystemExit(143)``
    in the main thread instead of ending the process on the spot)."""
    tracker = Tracker.start(run_dir, recipe, parent, kind, name, resume, record)
    status = "FINISHED"
    try:
        with _sigterm_raises() if tracker.active else contextlib.nullcontext():
            yield tracker
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except SystemExit as err:
        status = "KILLED" if err.code == 128 + signal.SIGTERM else "FAILED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker.end(status)

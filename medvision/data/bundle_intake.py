"""The intake of an exported MONAI bundle: MONAI's runner, medvision's reader.

A bundle written by ``medvision export --format monai-bundle`` names these objects in its
``configs/inference.json``, so MONAI's ``SupervisedEvaluator`` reads every file exactly as
``medvision score`` does (:func:`medvision.data.intake.read_file`, with the run's
:class:`~medvision.runs.ScoringSpec` from the bundle's ``configs/metadata.json``): the same DICOM
windows, MONOCHROME1 and frame handling, channel rule, resize and rounding. There is one
preprocessing definition, not a second one rebuilt from MONAI transforms. The bundle therefore needs
medvision installed where it runs (its ``metadata.json`` lists it under ``required_packages_version``);
its TorchScript model does not.

- :func:`datalist`: every entry under the folder, as ``score`` finds them (:func:`medvision.io.archive.scan`),
  each with the scan's verdict: its path relative to the folder, and whether it is a file to read.
- :class:`ReadForModel`: ``{"image": path}`` -> the model's input as a ``MetaTensor`` (C, H, W) float32 in
  [0, 1], with ``filename_or_obj`` and medvision's verdict (``medvision_status``, ``medvision_reason``) in its
  meta. A file that cannot be read (or is not an input) becomes a zero image marked with its reason, and
  is logged; it is never dropped. What the scan already rejected (a FIFO, a directory named like a file, a
  broken link) is never opened: its verdict is ``score``'s, word for word.
- :class:`MarkUnread`: the evaluator's post-processing; the probabilities of such a file become NaN, so
  ``predictions.csv`` has one row for every file and no made-up score.

MONAI reads in-process: a decoder that crashes or hangs stops the bundle run. ``medvision score`` is
the crash-isolated path for untrusted folders.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor

from medvision.data.intake import FileResult, ReadConfig, read_file
from medvision.io.archive import scan
from medvision.runs import ScoringSpec

log = logging.getLogger("medvision")

STATUS, REASON = "medvision_status", "medvision_reason"
#: A datalist item's scan verdict (:func:`datalist`): the path relative to the folder, the outcome, its reason.
REL, OUTCOME, SCAN_REASON = "medvision_rel", "medvision_outcome", "medvision_scan_reason"


def read_spec(metadata_file: str | Path) -> ScoringSpec:
    """The run's scoring spec from a bundle's ``configs/metadata.json`` (its ``medvision.spec`` entry)."""
    path = Path(metadata_file)
    try:
        spec = json.loads(path.read_text())["medvision"]["spec"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a medvision bundle's metadata.json (no medvision.spec entry: {err})") from None
    return ScoringSpec.from_json(json.dumps(spec), origin=str(path))


def datalist(dataset_dir: str | Path) -> list[dict[str, str]]:
    """``{"image": path, ...}`` for every entry under ``dataset_dir``, in ``score``'s order, with the scan's verdict
    (:data:`REL`, :data:`OUTCOME`, :data:`SCAN_REASON`). The entries ``score`` rejects while scanning (a FIFO, a
    directory named like a file, a broken link, a directory that cannot be listed) are listed too, so that each gets
    its NaN row and logged reason from :class:`ReadForModel` instead of vanishing from ``predictions.csv``; only a
    ``candidate`` is ever opened."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset_dir {root} is not a folder")
    return [{"image": str(root / e.rel), REL: e.rel, OUTCOME: e.outcome, SCAN_REASON: e.reason} for e in scan(root)]


def network_input(x: torch.Tensor) -> torch.Tensor:
    """Preprocessed frames as the bundle's network takes them: float32 in [0, 1] (uint8 levels / 255).

    The network (:class:`~medvision.models.deploy.CalibratedClassifier`) does the same division itself
    for uint8 input; the bundle hands it float32, as its ``network_data_format`` declares.
    """
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


class ReadForModel:
    """MONAI transform: ``{"image": path}`` -> ``{"image": MetaTensor}``, read by medvision's ``read_file``.

    Args:
        metadata_file: the bundle's ``configs/metadata.json``, which holds the run's scoring spec.
        key: the item key holding the path.
    """

    def __init__(self, metadata_file: str, key: str = "image") -> None:
        # checked here, once (ScoringSpec.from_json): a bad field or DICOM window is one error naming the file,
        # not an error row, or a silently different preprocessing, for every file the bundle reads
        self.spec = read_spec(metadata_file)
        if self.spec.inputs == "dicom" and self.spec.dicom.get("frames") == "all":
            raise ValueError(f"{metadata_file}: a run scored frame by frame (data.dicom.frames: all) gives several "
                             "rows per file; score it with `medvision score`")  # fmt: skip
        self.cfg = ReadConfig(self.spec)
        self.key = key
        self.blank = torch.zeros(self.spec.in_chans, self.spec.image_size, self.spec.image_size)

    def read(self, path: Path, rel: str) -> FileResult:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings about damaged files; the verdict says it
            return read_file(path, rel, self.cfg)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        path = Path(item[self.key])
        rel, outcome = item.get(REL) or path.name, item.get(OUTCOME, "candidate")
        if outcome == "candidate":  # a hand-written datalist ({"image": path} only) is read as candidates
            result = self.read(path, rel)
        else:  # the scan's verdict, as score writes it; a FIFO opened here would block the run
            result = FileResult(rel, "error" if outcome == "error" else "skipped", str(item.get(SCAN_REASON, "")))
        if result.status == "ok":
            image, reason = network_input(torch.from_numpy(result.arrays[0])), ""
        else:
            image, reason = self.blank.clone(), f"{result.status}: {result.reason}"
            log.warning("%s: %s; its row gets NaN probabilities", path, reason)
        meta = {"filename_or_obj": str(path), STATUS: result.status, REASON: reason}
        return {**item, self.key: MetaTensor(image, meta=meta)}


class MarkUnread:
    """Evaluator post-processing: NaN probabilities for a file :class:`ReadForModel` could not read."""

    def __init__(self, key: str = "image", pred: str = "pred") -> None:
        self.key, self.pred = key, pred

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        image = item.get(self.key)
        meta = getattr(image, "meta", {}) or {}
        if meta.get(STATUS, "ok") != "ok":
            item = {**item, self.pred: torch.full_like(item[self.pred], float("nan"))}
        return item

"""Batch scoring of DICOM folders: ``medvision score DIR --model RUN_DIR --out scores.csv``.

One row per scored image or frame, written and flushed batch by batch. A corrupt file is an error
row and the run goes on; files that are not DICOM, or DICOM without an image (SR, RTDOSE, SEG ...),
are skipped and counted. Re-running with the same ``--out`` resumes: files already in the output are
not scored again, and a row cut short by a kill is dropped and redone. The preprocessing is the
trained run's own (its recipe's DICOM windows, intensity mapping, size and normalisation).

No patient identifiers are written unless asked for with ``--include-tags``. A sidecar
``<out>.json`` records the checkpoint's SHA-256, the recipe hash, versions, counts and speed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from medvision.data.dataset import Transfer, prepare
from medvision.data.dicom_source import dicom_spec, walk_files
from medvision.data.transforms import build_transforms
from medvision.evaluation import Decision
from medvision.io.dicom import NotADicomImage, read_dataset, read_dicom, select_frames
from medvision.io.image import Intensity
from medvision.run import load_run, versions
from medvision.train.build import Inputs, resolve_amp, resolve_device
from medvision.train.checkpoint import sha256
from medvision.train.loop import autocast

log = logging.getLogger("medvision")
BASE_COLUMNS = ["path", "sop_instance_uid", "study_instance_uid", "series_instance_uid", "frame", "pred"]

#: Tags that identify a patient; never written unless the user names them in ``--include-tags``.
IDENTIFYING_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs")


def in_shard(rel: str, shard: tuple[int, int]) -> bool:
    """Deterministic, overlap-free split of files across ``n`` workers by a hash of the relative path."""
    i, n = shard
    return int(hashlib.sha1(rel.encode()).hexdigest()[:12], 16) % n == i


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` with 0 <= i < n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


class DicomFiles(Dataset[dict[str, Any]]):
    """One item per file: its preprocessed frames, identifiers, or the reason it was skipped or failed."""

    def __init__(self, root: Path, rels: list[str], spec: Any, frames: str, intensity: Intensity, channels: int,
                 transform: Any, tags: list[str], transfer: Transfer = "float32") -> None:  # fmt: skip
        self.root, self.rels, self.spec, self.frames = root, rels, spec, frames
        self.intensity, self.channels, self.transform, self.tags = intensity, channels, transform, tags
        self.transfer = transfer

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, k: int) -> dict[str, Any]:
        rel = self.rels[k]
        path = self.root / rel
        item: dict[str, Any] = {"path": rel, "status": "ok", "error": "", "frames": [], "tensors": []}
        try:
            ds = read_dataset(path)
            item.update(
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                study_instance_uid=str(ds.get("StudyInstanceUID", "")),
                series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
                tags={t: str(ds.get(t, "")) for t in self.tags},
            )
            n_frames = int(ds.get("NumberOfFrames", 1) or 1)
            for frame in select_frames(n_frames, self.frames):  # type: ignore[arg-type]
                whole = self.frames == "tiled"  # one image from all tiles
                pixels, _ = read_dicom(path, self.spec, frame=None if whole else frame, dataset=ds)
                item["tensors"].append(prepare(pixels[0], self.intensity, self.channels, self.transform, self.transfer))
                item["frames"].append(frame)
        except NotADicomImage as err:
            item.update(status="skipped", error=str(err))
        except Exception as err:  # one bad file is one error row; the rest of the folder is still scored
            item.update(status="error", error=f"{type(err).__name__}: {err}", frames=[], tensors=[])
        return item


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


@dataclass
class ScoreSummary:
    """Counts and speed of one scoring run; also written to the provenance sidecar."""

    scored_images: int = 0
    scored_files: int = 0
    skipped: int = 0
    errors: int = 0
    already_done: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    shard: str = "0/1"
    out: str = ""
    skipped_examples: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"scored {self.scored_images} image(s) from {self.scored_files} file(s) in {self.seconds:.1f} s "
            f"({self.images_per_second:.1f} img/s); {self.skipped} non-image file(s) skipped, {self.errors} error(s), "
            f"{self.already_done} already in {self.out}"
        )


def _done_paths(out: Path) -> set[str]:
    """Paths already in a previous output; a last line cut short by a kill is removed first."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        with out.open("r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
    with out.open(newline="") as fh:
        return {row["path"] for row in csv.DictReader(fh) if row.get("path")}


def score_folder(
    folder: Path,
    run_dir: Path,
    out: Path,
    include_tags: list[str] | None = None,
    shard: tuple[int, int] = (0, 1),
    batch_size: int | None = None,
    workers: int | None = None,
) -> ScoreSummary:
    """Scores every DICOM image under ``folder`` with the run's best model; see the module docstring.

    Examples:
        >>> score_folder(Path("/data/cr"), Path("runs/chest"), Path("scores.csv")).line()
    """
    start = time.perf_counter()
    tags = list(include_tags or [])
    device = resolve_device("auto")
    recipe, meta, bundle = load_run(run_dir, device)
    amp = resolve_amp(recipe.train.amp, device)
    classes: list[str] = meta["classes"]
    parquet = out.suffix == ".parquet"
    table_path = out.with_suffix(".partial.csv") if parquet else out
    done = _done_paths(table_path)
    rels = [p.relative_to(folder).as_posix() for p in walk_files(folder)]
    todo = [r for r in rels if in_shard(r, shard) and r not in done]
    summary = ScoreSummary(already_done=len(done), shard=f"{shard[0]}/{shard[1]}", out=str(out))
    decision = Decision.from_json(meta.get("decision"))
    calls = operating_calls(decision)
    columns = [*BASE_COLUMNS, *[f"prob_{c}" for c in classes], *[name for name, _ in calls], "status", "error",
               *[f"tag_{t}" for t in tags]]  # fmt: skip
    transform = build_transforms(None, recipe.data.image_size, bundle.mean, bundle.std, normalize=False)
    transfer: Transfer = "float16" if recipe.data.transfer == "float16" else "float32"  # windows are never 8-bit
    files = DicomFiles(folder, todo, dicom_spec(recipe.data.dicom), recipe.data.dicom.frames, recipe.data.intensity,
                       bundle.in_chans, transform, tags, transfer)  # fmt: skip
    inputs = Inputs(bundle.mean, bundle.std, recipe.train.channels_last)
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    loader = DataLoader(files, batch_size=batch_size or 16, num_workers=n_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda")  # fmt: skip
    new_file = not table_path.is_file() or table_path.stat().st_size == 0
    with _cores_for_workers(n_workers, device):
        _score_batches(loader, bundle.model.eval(), device, amp, inputs, classes, tags, columns, table_path, new_file,
                       summary, len(todo), decision)  # fmt: skip
    summary.seconds = time.perf_counter() - start
    summary.images_per_second = summary.scored_images / summary.seconds if summary.seconds else 0.0
    if parquet:
        _to_parquet(table_path, out)
    _write_provenance(out, run_dir, summary, tags, decision)
    return summary


@contextmanager
def _cores_for_workers(n_workers: int, device: torch.device) -> Iterator[None]:
    """While decode workers run on this machine's cores, keep the main process and OpenCV off them.

    On the CPU the main process runs inference with ``cores - workers`` threads (at least one), and
    OpenCV is set to one thread before the workers fork, so they inherit it (setting it inside a
    forked worker can deadlock on the parent's thread pool). Both settings are restored afterwards.
    Measured on 2 cores: 1.58x -> 1.91x over the plain loop (benchmarks/RESULTS.md).
    """
    cv_threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    if n_workers > 0:
        cv2.setNumThreads(1)
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - n_workers))
    try:
        yield
    finally:
        cv2.setNumThreads(cv_threads)
        torch.set_num_threads(torch_threads)


def _score_batches(
    loader: DataLoader[dict[str, Any]],
    model: torch.nn.Module,
    device: torch.device,
    amp: str,
    inputs: Inputs,
    classes: list[str],
    tags: list[str],
    columns: list[str],
    table_path: Path,
    new_file: bool,
    summary: ScoreSummary,
    n_files: int,
    decision: Decision,
) -> None:
    """Runs the model over the loader's batches and appends (and flushes) one row per image or error.

    Probabilities are divided by the run's fitted temperature (calibrated); each operating point of
    the run adds a 0/1 column that calls the positive class at the threshold chosen on validation.
    """
    calls = operating_calls(decision)
    with table_path.open("a", newline="") as fh, torch.inference_mode():
        writer = csv.writer(fh)
        if new_file:
            writer.writerow(columns)
        bar = tqdm(total=n_files, desc="score", unit="file", dynamic_ncols=True, disable=None)
        for items in loader:
            tensors = [t for it in items for t in it["tensors"]]
            probs = np.zeros((0, len(classes)), dtype=np.float32)
            if tensors:
                batch = inputs(torch.stack(tensors), device)
                with autocast(device, amp):
                    logits = model(batch)
                probs = torch.softmax(logits.float() / decision.temperature, dim=1).cpu().numpy()
            k = 0
            for it in items:
                if it["status"] == "skipped":
                    summary.skipped += 1
                    if len(summary.skipped_examples) < 5:
                        summary.skipped_examples.append(it["error"])
                    continue
                ids = [it["path"], it.get("sop_instance_uid", ""), it.get("study_instance_uid", ""),
                       it.get("series_instance_uid", "")]  # fmt: skip
                extra = [it.get("tags", {}).get(t, "") for t in tags]
                if it["status"] == "error":
                    summary.errors += 1
                    writer.writerow([*ids, "", "", *[""] * (len(classes) + len(calls)), "error", it["error"], *extra])
                    continue
                for frame in it["frames"]:
                    p = probs[k]
                    k += 1
                    flags = [str(int(p[decision.positive] >= thr)) for _, thr in calls]
                    writer.writerow([*ids, frame, classes[int(p.argmax())], *[f"{v:.6f}" for v in p], *flags, "ok", "",
                                     *extra])  # fmt: skip
                    summary.scored_images += 1
                summary.scored_files += 1
            fh.flush()  # rows of a finished batch survive a kill
            bar.update(len(items))
        bar.close()


def _to_parquet(table_path: Path, out: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError(
            f"Parquet output needs pyarrow (pip install pyarrow); the rows are in {table_path}"
        ) from None
    text = ("path", "sop_instance_uid", "study_instance_uid", "series_instance_uid", "pred", "error")
    string_columns = {c: pa.string() for c in text}
    table = pacsv.read_csv(table_path, convert_options=pacsv.ConvertOptions(column_types=string_columns))
    pq.write_table(table, out)


def operating_calls(decision: Decision) -> list[tuple[str, float]]:
    """(column name, threshold) of each image-level operating point with a finite threshold."""
    calls = []
    for op in decision.points.get("image", []) if decision.positive is not None else []:
        name = "call_youden" if op["rule"] == "youden" else f"call_{op['rule']}_{op['target']:g}"
        if op["threshold"] is not None and np.isfinite(op["threshold"]):
            calls.append((name, float(op["threshold"])))
    return calls


def _write_provenance(out: Path, run_dir: Path, summary: ScoreSummary, tags: list[str], decision: Decision) -> None:
    record = {
        "model_checkpoint": str(run_dir / "model.safetensors"),
        "model_sha256": sha256(run_dir / "model.safetensors"),
        "recipe_sha256": sha256(run_dir / "recipe.yaml"),
        "versions": versions(),
        "calibration_temperature": decision.temperature,
        "operating_points": decision.points.get("image", []),
        "included_identifying_tags": [t for t in tags if t in IDENTIFYING_TAGS],
        "included_tags": tags,
        **asdict(summary),
    }
    Path(str(out) + ".json").write_text(json.dumps(record, indent=2) + "\n")

"""``medvision score DIR --model RUN --out scores.csv``: every file or slide under a folder, scored and accounted for.

One job (:mod:`medvision.tasks.score.job`: shard, parts, resume, merge, tally, provenance) over a unit: a
file gives frames (:mod:`~medvision.tasks.score.files`, for runs trained on images or DICOM) and a slide
gives tiles (:mod:`~medvision.tasks.score.slides`, for runs trained on whole slides). Every probability
comes from the engine (:mod:`medvision.inference`): the run in PyTorch, or its ONNX export in ONNX Runtime,
both in float32 unless ``amp`` says otherwise.

Examples:
    >>> score_folder(Path("/data/cr"), Path("runs/chest"), Path("scores.csv")).line()
    >>> score_slides(Path("/data/slides"), Path("runs/camelyon"), Path("slides.csv")).line()
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from medvision.data.intake import ReadConfig, Reader, read_file
from medvision.inference import Engine
from medvision.models.slide_head import MIL_FILE
from medvision.options import FILE_TIMEOUT, MAX_FILE_BYTES, MAX_PIXELS, SLIDE_TIMEOUT
from medvision.runs import RunError, ScoringSpec
from medvision.runtime import reader_processes, resolve_device
from medvision.tasks.score.files import FileUnit
from medvision.tasks.score.job import ScoreSummary, in_shard, run_job
from medvision.tasks.score.mil import is_mil_run, score_mil_slides
from medvision.tasks.score.slides import ABMIL_NEEDS_TORCH, SlideUnit
from medvision.workers import start_forkserver

__all__ = ["ScoreSummary", "in_shard", "nothing_to_score", "score_folder", "score_slides"]


def score_folder(
    folder: Path,
    model: Path,
    out: Path,
    include_tags: list[str] | None = None,
    shard: tuple[int, int] = (0, 1),
    batch_size: int | None = None,
    workers: int | None = None,
    engine: str = "torch",
    file_timeout: float = FILE_TIMEOUT,
    max_pixels: int = MAX_PIXELS,
    max_file_bytes: int = MAX_FILE_BYTES,
    reader: Reader = read_file,
    amp: str = "none",
    uids: bool = False,
) -> ScoreSummary:
    """Scores every file under ``folder`` with a run (or its ONNX export); see :mod:`~medvision.tasks.score.files`.

    ``workers`` decode processes (default min(4, cores)); ``0`` decodes in this process, without crash
    isolation (for debugging). ``reader`` turns one file into a :class:`~medvision.data.intake.FileResult`.
    ``amp``: the PyTorch engine's precision (``none``: float32, the same function as the ONNX export).
    A ``.parquet`` ``out`` is written from a CSV beside it. ``uids``: add each DICOM file's SOP, Study and Series
    Instance UID as columns; they identify the patient's study, so they are left out unless asked for.
    """
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    parquet = out.suffix == ".parquet"

    def unit(spec: ScoringSpec, model_: Path, engine_: Engine) -> FileUnit:
        cfg = ReadConfig(spec, tuple(include_tags or ()), max_pixels, max_file_bytes)
        return FileUnit(spec, engine_, cfg, reader, n_workers, file_timeout, batch_size or 16, parquet, uids)

    table = out.with_suffix(".partial.csv") if parquet else None
    return run_job(folder, model, out, unit, shard, engine, amp, n_workers, table)


def score_slides(
    folder: Path, model: Path, out: Path, shard: tuple[int, int] = (0, 1), batch_size: int | None = None,
    workers: int | None = None, engine: str = "torch", slide_timeout: float = SLIDE_TIMEOUT, heatmaps: bool = True,
    amp: str = "none", encoder_checkpoint: str | Path | None = None,
) -> ScoreSummary:  # fmt: skip
    """Scores every slide under ``folder`` with a slide-trained run; see :mod:`~medvision.tasks.score.slides`,
    and :mod:`~medvision.tasks.score.mil` for a run trained on cached features (``encoder_checkpoint``: its
    encoder's weights, default ``$MEDVISION_ENCODER_<NAME>``). ``workers``: tile-reading processes (default,
    :func:`~medvision.runtime.reader_processes`: on a CPU one per thread of the model, which read while it waits
    for a batch; beside a GPU every core but one)."""
    if workers != 0:
        start_forkserver()  # its start-up overlaps with loading the model
    model_device = resolve_device("auto") if engine == "torch" else torch.device("cpu")  # ONNX Runtime: the CPU
    if is_mil_run(model):
        if engine != "torch" or amp != "none":
            raise RunError("a run trained on cached features scores with its encoder in PyTorch at the precision "
                           "its features were made in: leave --engine and --amp at their defaults")  # fmt: skip
        return score_mil_slides(folder, model, out, encoder_checkpoint, shard, batch_size or 32,
                                reader_processes(model_device) if workers is None else workers,
                                slide_timeout, heatmaps)  # fmt: skip
    if engine != "torch" and (model / MIL_FILE).is_file():  # fail before loading anything
        raise RunError(ABMIL_NEEDS_TORCH)
    n_workers = workers if workers is not None else reader_processes(model_device)

    def unit(spec: ScoringSpec, model_: Path, engine_: Engine) -> SlideUnit:
        return SlideUnit(spec, model_, engine_, out, n_workers, slide_timeout, batch_size or 32, heatmaps)

    # on the CPU the slide readers take turns with the model (SlideUnit: turns=engine.on_cpu): it keeps every core
    return run_job(folder, model, out, unit, shard, engine, amp, n_workers, turns=True)


def nothing_to_score(folder: Path, summary: ScoreSummary, what: str = "image file to score") -> str:
    """What a job that had nothing to score (exit 4) looked in: the folder, or under ``--shard i/n`` the shard that
    held some of the folder's entries but none to score (a shard that held none of them exits 0). ``what``: what it
    found none of (``features``: a slide to embed)."""
    if summary.shard == "0/1" or not summary.files_found:
        return f"no {what} in {folder}"
    return f"no {what} in shard {summary.shard} of {folder}"

"""A score reader that fails the way compiled decoders do, for files named ``FAULT-<kind>.dcm``.

It is handed to :func:`medvision.tasks.score.score_folder` as ``reader`` and runs inside the decode worker
processes (it is imported there by name, so it lives in its own module). Every other file goes to the
real :func:`medvision.data.intake.read_file`.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np

from medvision.data.intake import FileResult, ReadConfig, read_file


class PanicException(BaseException):  # named like pyo3's, which also derives from BaseException
    """What a Rust decoder raises through pyo3 when it panics."""


def read(path: Path, rel: str, cfg: ReadConfig) -> FileResult:
    kind = path.stem[len("FAULT-") :] if path.stem.startswith("FAULT-") else ""
    if kind == "panic":
        raise PanicException("called `Option::unwrap()` on a `None` value")
    if kind == "exit":
        os._exit(3)
    if kind == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "abort":
        os.abort()
    if kind == "hang":
        time.sleep(3600)
    return read_file(path, rel, cfg)


class TileFault:
    """A tile transform that fails as a compiled slide decoder can: ``raise``, ``panic`` (a Rust decoder's
    ``PanicException``, a ``BaseException``), ``exit`` (the worker dies), ``segv`` or ``hang``. Set on the tile
    reader of a slide named ``FAULT-<kind>...`` to test the tile stream."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        if self.kind == "raise":
            raise OSError("JPEG tile data is damaged")
        if self.kind == "panic":
            raise PanicException("called `Option::unwrap()` on a `None` value")
        if self.kind == "exit":
            os._exit(3)
        if self.kind == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if self.kind == "hang":
            time.sleep(3600)
        return tile

"""Hand-off slots: how a worker process leaves a large numpy array in RAM for its parent instead of pickling it
through the pool's pipe (:func:`medvision.workers.isolated_map` with ``hand_off=True``).

A slot is made by the parent, written in place by a worker and read back by the parent (:class:`Slots`,
:class:`HandOff`). Two things make a slot safe to give up early, while a worker that was stopped may still be
running:

- a memory file's slot is named uniquely (``medvision-handoff-<pid>-<n>``), and a worker writes it only after
  checking that the file it opened is that one: a descriptor number the parent closed and then reused (for the
  next slot, or a feature file) is never written with stale tiles;
- a file in :data:`HANDOFF_DIR` stays locked (``flock``) by the process that made it for as long as it may use it,
  so :func:`sweep_handoffs` removes only the files of a process that is gone, whatever its pid reads as in this
  PID namespace (containers that share ``/dev/shm`` see each other's files, not each other's pids).
"""

from __future__ import annotations

import fcntl
import itertools
import os
import tempfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Where a worker leaves a large array for its parent when no memory file can be shared (:class:`Slots`): RAM
#: (tmpfs) where the system has it.
HANDOFF_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
_HANDOFF_PREFIX = "medvision-handoff-"
_handoff_ids = itertools.count()
_held: dict[str, int] = {}  # hand-off files this process made -> the descriptor that holds their lock


def _new_name() -> str:
    """A name no other hand-off file or slot of any process has: the stale-descriptor check relies on it."""
    return f"{_HANDOFF_PREFIX}{os.getpid()}-{next(_handoff_ids)}"


def handoff_path() -> str:
    """A new hand-off file in :data:`HANDOFF_DIR`: empty, this user's only, made by the parent (so that it can
    remove the file whatever becomes of the worker), named with the parent's pid and held under an exclusive
    ``flock`` until :func:`discard` (so that :func:`sweep_handoffs` leaves it alone while this process lives). A
    file that cannot be made (no room) is no error: the worker cannot open it, and its array travels through the
    pipe."""
    for _ in range(3):
        path = str(HANDOFF_DIR / _new_name())
        try:  # readable by this user only: the pixels are a patient's
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return path
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not swept between its making and its lock
                _held[path] = fd
                return path
        except OSError:  # no lock to be had (or the file swept): a slot unheld would be swept as a dead run's
            with suppress(OSError):
                os.unlink(path)
        os.close(fd)
    return path  # never made: the worker's array comes through the pipe


def discard(path: str) -> None:
    """Removes a hand-off file, if the worker got as far as writing it, and lets go of its lock."""
    with suppress(FileNotFoundError):
        os.unlink(path)
    if (fd := _held.pop(path, None)) is not None:
        with suppress(OSError):
            os.close(fd)


def sweep_handoffs() -> None:
    """Removes hand-off files left by a process that no longer runs (one killed before it could clean up): those
    whose lock can be taken. A live process holds its files' locks, whichever PID namespace it runs in; the lock of
    a process that died went with it."""
    for path in HANDOFF_DIR.glob(f"{_HANDOFF_PREFIX}*"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:  # gone meanwhile, or not ours to judge: another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its maker runs
            os.close(fd)
            continue
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # still the file locked, not a new one of that name
                os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)


class Slots:
    """One pool's hand-off slots (:class:`HandOff`): files in RAM that the parent makes, a worker writes in place
    from the start, and the parent reads back and gives out again, so a slot's pages stay in RAM from one batch
    to the next (a new file a batch made the kernel find fresh pages for every one: slots move 2.3x the MB/s).

    A slot is an anonymous memory file (``memfd_create``) that the worker opens by its ``/proc/<parent>/fd/<n>``
    path. No mount bounds it, where ``/dev/shm`` is as small as 64 MB in a Docker container (15 readers keep 30
    tile batches of 4.8 MB in flight), and every array that did not fit came through the pool's pipe: one thread
    of the parent reads the pipe in 64 KB steps, each waiting for the GIL that the model's launches hold
    (benchmarks/RESULTS.md, "Tile hand-off"). A memory file also goes with its parent, however that ends.
    Where there are no memfds, or a worker cannot open one (no access to the parent's ``/proc``), the slots from
    then on are files in :data:`HANDOFF_DIR` (:func:`handoff_path`).

    A slot whose result was lost (its worker died, hung or was cancelled) or could not be read is retired: closed
    or removed at once and never given out again, so the slots open stay bounded by the results in flight however
    many slides fail. A worker still being stopped cannot write a retired slot's descriptor number once it is
    reused: it checks the memory file's unique name first (:meth:`link`, :meth:`HandOff.leave`).
    """

    memory_files = True
    """False: files in :data:`HANDOFF_DIR` only (``benchmarks/tile_handoff.py`` measures both)."""

    def __init__(self) -> None:
        self.memfd = self.memory_files and hasattr(os, "memfd_create") and Path(f"/proc/{os.getpid()}/fd").is_dir()
        self.fds: dict[str, tuple[int, str]] = {}  # memory-file slots: path -> this process's descriptor, its link
        self.files: set[str] = set()  # slots in HANDOFF_DIR
        self.free: list[str] = []  # read back, to be given out again

    def get(self) -> str:
        """A slot for one result: one read back before, or a new one."""
        if self.free:
            return self.free.pop()
        if self.memfd:
            name = _new_name()
            try:
                fd = os.memfd_create(name)  # close-on-exec: no other program inherits it
            except OSError:
                self.memfd = False
            else:
                with suppress(OSError):  # the pixels are a patient's: this user only (as /proc allows already)
                    os.fchmod(fd, 0o600)
                path = f"/proc/{os.getpid()}/fd/{fd}"
                self.fds[path] = (fd, f"/memfd:{name} (deleted)")
                return path
        path = handoff_path()
        self.files.add(path)
        return path

    def link(self, path: str) -> str | None:
        """What ``path`` must lead to for a worker to write it (a memory slot's unique name); None for a file slot,
        whose name is never used twice."""
        slot = self.fds.get(path)
        return slot[1] if slot is not None else None

    def put_back(self, path: str) -> None:
        """The slot's result has been read (or it was not an array): give it out again."""
        self.free.append(path)

    def unwritten(self, path: str) -> None:
        """A worker could not write the slot and sent its array through the pipe. A memory file: the worker cannot
        open the parent's (no access to its ``/proc``), so the next slots are files. A file: ``/dev/shm`` was full
        (the worker emptied the slot), and may have room for it later."""
        if path in self.fds:
            self.memfd = False
            self.retire(path)
        else:
            self.put_back(path)

    def retire(self, path: str) -> None:
        """Gives the slot up for good, now: its memory file closed (its pages freed once no worker holds it
        open), or its file removed."""
        slot = self.fds.pop(path, None)
        if slot is None:
            self.files.discard(path)
            discard(path)
            return
        with suppress(OSError):
            os.close(slot[0])

    def close(self) -> None:
        """At the end: every slot closed or removed."""
        for fd, _ in self.fds.values():
            with suppress(OSError):
                os.close(fd)
        for path in self.files:
            discard(path)
        self.fds, self.files, self.free = {}, set(), []


@dataclass(frozen=True)
class HandOff:
    """A worker's numpy result, left in a slot in RAM (:class:`Slots`) for its parent instead of pickled through
    the pool's pipe.

    Pebble sends a result down a pipe in 64 KB steps, each a switch between the two processes: a batch of 32
    tiles of 224 px (4.8 MB) took 11.6 ms and 4.4 ms of the parent's CPU, on the cores the encoder needs, against
    4.9 ms and 1.5 ms this way (benchmarks/tile_handoff.py): one copy out and one copy in. A slot that cannot be
    written (no access, or a full ``/dev/shm``) is no error: the array then travels through the pipe as before.
    Plain ``write``/``read``, not a shared mapping, so a full tmpfs is an ``OSError`` here and never a ``SIGBUS``
    in the middle of a copy.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def leave(cls, array: np.ndarray, path: str, link: str | None = None) -> HandOff | np.ndarray:
        """Worker side: ``array`` written into the slot ``path`` (the parent's: never made here), from its start;
        ``array`` itself when it cannot be, and then the slot emptied, so that a write cut short by a full tmpfs
        does not keep its pages from the other slots. ``link``: what the slot must lead to (:meth:`Slots.link`);
        a descriptor the parent has closed and reused for another file is left alone, unopened where possible
        (non-blocking: never waiting on a pipe that took its number)."""
        data = np.ascontiguousarray(array)
        try:
            if link is not None and os.readlink(path) != link:
                return array
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            return array
        try:
            if link is not None and os.readlink(f"/proc/self/fd/{fd}") != link:  # reused after the check above
                os.close(fd)
                return array
        except OSError:
            os.close(fd)
            return array
        try:
            view = data.reshape(-1).view(np.uint8).data
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            with suppress(OSError):
                os.ftruncate(fd, 0)
            return array
        finally:
            os.close(fd)
        return cls(path, data.shape, data.dtype.str)

    def take(self) -> np.ndarray:
        """Parent side: the array, read back from the slot (which stays: its owner gives it out again or removes
        it).

        Raises:
            OSError: the slot cannot be read, or holds fewer bytes than the array.
        """
        out = np.empty(self.shape, np.dtype(self.dtype))
        view, done = out.reshape(-1).view(np.uint8).data, 0
        with open(self.path, "rb", buffering=0) as fh:
            while done < len(view) and (n := fh.readinto(view[done:])):
                done += n
        if done != out.nbytes:
            raise OSError(f"{self.path}: hand-off slot holds {done} bytes, expected {out.nbytes} for {self.shape}")
        return out

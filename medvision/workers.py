"""Reading untrusted files in worker processes that are allowed to die.

Compiled decoders fail in ways Python cannot catch: a Rust decoder panics (``PanicException``
derives from ``BaseException``), a C decoder segfaults or calls ``abort()``, a damaged stream makes
one loop forever. In torch's DataLoader any of these kills the whole run. :func:`isolated_map` runs
the work in a pool of processes from Pebble (a maintained library made for exactly this: a pool
whose tasks can time out, and whose dead workers are replaced without breaking the pool), in chunks:

1. a chunk whose worker dies or passes its deadline is detected by the pool, which starts a fresh
   worker in its place;
2. that chunk's files are retried one by one, each in its own task (a fresh or healthy worker); a chunk of
   one item is not retried (it already was alone);
3. the one file that still kills or hangs its worker becomes a :class:`Failure` with the reason
   ("decoder crashed: signal 11 (SIGSEGV)", "decoder timed out after 60 s"), and the run goes on.

Results come back in input order, so an output written from them is deterministic. Workers start
from a ``forkserver`` (a clean, single-threaded process), never by forking a process that runs
inference threads or holds a CUDA context.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import queue
import signal
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import closing, suppress
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from pebble import ProcessExpired, ProcessPool

log = logging.getLogger("medvision")
T = TypeVar("T")
R = TypeVar("R")

#: The modules every pool's workers use, imported once in the forkserver they are all forked from. A new worker
#: (at the start, or in place of one a decoder killed) re-runs the program's main module: for the CLI that imports
#: all of medvision and timm, 3.5 s a worker on 2 cores unless they are already loaded in the forkserver (0.05 s).
#: One set for every pool, because a process has one forkserver and whichever pool comes first starts it: with a
#: set per pool, a slide run after a DICOM decode paid the import for every reader it started or replaced.
WORKER_MODULES = (
    "medvision.data.dicom_source",
    "medvision.data.intake",
    "medvision.wsi.source",
    "medvision.tasks.score.files",
    "medvision.tasks.score.slides",
    "medvision.cli",
)


@dataclass
class Failure:
    """An item whose worker died or hung even when it was retried alone."""

    reason: str


#: What an item that ``isolated_map`` was told to skip yields in place of a result.
SKIPPED = Failure("not read: skipped")


@dataclass
class PoolStats:
    """What the pool went through: chunks lost to a dead or hung worker, and the files that caused it; with
    ``hand_off``, the arrays that came back through their slot and those that could not and came through the
    pool's pipe (slower: no slot the workers could write)."""

    lost_chunks: int = 0
    crashed_files: int = 0
    timed_out_files: int = 0
    handed_off: int = 0
    piped: int = 0


#: The longest a worker waits at :func:`wait_turn` at a time, in seconds: beside a consumer that keeps a result
#: longer (a slow model), a worker reads a step each wait, so no task comes near its timeout for waiting.
TURN_PAUSE = 0.5
_TURN: dict[str, Any] = {}


def wait_turn() -> None:
    """In a worker of ``isolated_map(turns=True)``: waits while the consumer works on a result (at most
    :data:`TURN_PAUSE` s); no-op anywhere else. A task calls it between its steps (before each tile)."""
    if (go := _TURN.get("go")) is not None:
        go.wait(_TURN["pause"])


def _init_turns(go: Any, pause: float, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    _TURN.update(go=go, pause=pause)
    if initializer is not None:
        initializer(*initargs)


#: Where a worker leaves a large array for its parent when no memory file can be shared (:class:`Slots`): RAM
#: (tmpfs) where the system has it.
HANDOFF_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
_HANDOFF_PREFIX = "medvision-handoff-"
_handoff_ids = itertools.count()


def handoff_path() -> str:
    """A new hand-off file in :data:`HANDOFF_DIR`: empty, this user's only, made by the parent (so that it can
    remove the file whatever becomes of the worker) and named with the parent's pid (so that
    :func:`sweep_handoffs` knows whose it is). A file that cannot be made (no room) is no error: the worker cannot
    open it, and its array travels through the pipe."""
    path = str(HANDOFF_DIR / f"{_HANDOFF_PREFIX}{os.getpid()}-{next(_handoff_ids)}")
    with suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # readable by this user only: the
    return path  # pixels are a patient's


def discard(path: str) -> None:
    """Removes a hand-off file, if the worker got as far as writing it."""
    with suppress(FileNotFoundError):
        os.unlink(path)


def sweep_handoffs() -> None:
    """Removes hand-off files left by a parent that no longer runs (one killed before it could clean up)."""
    for path in HANDOFF_DIR.glob(f"{_HANDOFF_PREFIX}*"):
        pid = path.name[len(_HANDOFF_PREFIX) :].split("-")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            discard(str(path))
        except (ValueError, PermissionError):  # not ours to judge: another user's, or not a name we wrote
            continue


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

    A slot whose result was lost (its worker died, hung or was cancelled) or could not be read is retired:
    emptied at once and never given out again. A retired memory file stays open until :meth:`close`, called once
    no worker runs: its descriptor, closed earlier, could be given to a file the run opens next (a feature file),
    which a worker still being stopped would then write tiles into.
    """

    memory_files = True
    """False: files in :data:`HANDOFF_DIR` only (``benchmarks/tile_handoff.py`` measures both)."""

    def __init__(self) -> None:
        self.memfd = self.memory_files and hasattr(os, "memfd_create") and Path(f"/proc/{os.getpid()}/fd").is_dir()
        self.fds: dict[str, int] = {}  # memory-file slots: path -> this process's descriptor
        self.files: set[str] = set()  # slots in HANDOFF_DIR
        self.free: list[str] = []  # read back, to be given out again

    def get(self) -> str:
        """A slot for one result: one read back before, or a new one."""
        if self.free:
            return self.free.pop()
        if self.memfd:
            try:
                fd = os.memfd_create(_HANDOFF_PREFIX.rstrip("-"))  # close-on-exec: no other program inherits it
            except OSError:
                self.memfd = False
            else:
                with suppress(OSError):  # the pixels are a patient's: this user only (as /proc allows already)
                    os.fchmod(fd, 0o600)
                path = f"/proc/{os.getpid()}/fd/{fd}"
                self.fds[path] = fd
                return path
        path = handoff_path()
        self.files.add(path)
        return path

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
        """Empties the slot for good: its file removed, or its memory file truncated (closed by :meth:`close`)."""
        fd = self.fds.get(path)
        if fd is None:
            self.files.discard(path)
            discard(path)
            return
        with suppress(OSError):
            os.ftruncate(fd, 0)

    def close(self) -> None:
        """Once no worker runs: every slot closed or removed."""
        for fd in self.fds.values():
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
    def leave(cls, array: np.ndarray, path: str) -> HandOff | np.ndarray:
        """Worker side: ``array`` written into the slot ``path`` (the parent's: never made here), from its start;
        ``array`` itself when it cannot be, and then the slot emptied, so that a write cut short by a full tmpfs
        does not keep its pages from the other slots."""
        data = np.ascontiguousarray(array)
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError:
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


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        return f"decoder crashed: signal {-exitcode} ({name})"
    return f"decoder crashed: its worker process exited with code {exitcode}"


def _failure(err: Exception, timeout: float, stats: PoolStats) -> Failure:
    """What became of an item whose task failed on its own (it was alone in its chunk), counted in ``stats``."""
    if isinstance(err, FutureTimeout):
        stats.timed_out_files += 1
        return Failure(f"decoder timed out after {timeout:g} s")
    stats.crashed_files += 1
    if isinstance(err, ProcessExpired):
        return Failure(_death(err.exitcode))
    return Failure(f"reading failed in its worker process ({type(err).__name__}: {err})")


class _Inline(Generic[R]):
    """A finished result standing in for a future (``workers=0``: no processes, no isolation)."""

    def __init__(self, fn: Callable[[list[Any]], list[R]], chunk: list[Any]) -> None:
        self.value = fn(chunk)

    def result(self) -> list[R]:
        return self.value


def _context() -> Any:
    """The start method of every pool: a ``forkserver`` with :data:`WORKER_MODULES` imported once (``spawn``
    where there is no forkserver)."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        context.set_forkserver_preload(list(WORKER_MODULES))
    return context


def start_forkserver() -> None:
    """Starts the forkserver the pools fork from now, with :data:`WORKER_MODULES` imported (seconds: they import
    torch), so that its start-up overlaps with loading a model instead of delaying the first file. No-op when it
    runs."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        from multiprocessing import forkserver

        _context()
        forkserver.ensure_running()


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size``; when drawing them raises, the items drawn before it come first as a
    shorter list, then the error."""
    it = iter(items)
    while True:
        part: list[T] = []
        try:
            part.extend(islice(it, size))
        except BaseException:
            if part:
                yield part
            raise
        if not part:
            return
        yield part


class _Drawn(Generic[T]):
    """``items`` drawn in chunks by a thread of its own, at most ``ahead`` chunks ahead of the pool. An item that
    is slow to make (the next slide's tile batches wait for the slide to be opened) then holds back nothing that
    is ready: the pool's finished results are handed on while the thread waits for it.

    :meth:`get` gives the next chunk, or None at the end (or, not blocking, when none is ready yet); an exception
    raised while drawing ends the items and is kept in ``error``. :meth:`close` stops the thread, which closes
    ``items`` if it is a generator (its ``finally`` runs in the thread that ran it)."""

    _END = object()

    def __init__(self, items: Iterable[T], size: int, ahead: int) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self.ended = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._draw, args=(items, size), name="medvision-draw", daemon=True)
        self._thread.start()

    def _put(self, value: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _draw(self, items: Iterable[T], size: int) -> None:
        it = iter(items)
        last: Any = self._END
        try:
            for part in _chunks(it, size):
                if not self._put(part):
                    break
        except BaseException as err:  # the drawing's own error: the consumer raises it after the items before it
            last = err
        finally:
            close = getattr(it, "close", None)
            if self._stop.is_set() and close is not None:
                close()
        self._put(last)

    def get(self, block: bool) -> list[T] | None:
        if self.ended:
            return None
        try:
            value = self._queue.get(block=block)
        except queue.Empty:
            return None
        if value is self._END or isinstance(value, BaseException):
            self.ended = True
            self.error = value if isinstance(value, BaseException) else None
            return None
        return value

    def raise_error(self) -> None:
        """At the end of the results: the error that ended the drawing, if one did."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)  # a thread still waiting for its item stops when that item comes


def isolated_map(
    fn: Callable[[list[T]], list[R]],
    items: Iterable[T],
    *,
    workers: int,
    timeout: float,
    chunk: int = 4,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    stats: PoolStats | None = None,
    skip: Callable[[T], bool] | None = None,
    hand_off: bool = False,
    turns: bool = False,
) -> Generator[tuple[T, R | Failure], None, None]:
    """Yields ``(item, fn's result for it)`` in input order, or ``(item, Failure)`` for an item that kills its worker.

    ``fn`` takes a list of items and returns one result per item; it runs in ``workers`` processes
    (each set up by ``initializer(*initargs)``, forked from a forkserver that has :data:`WORKER_MODULES` imported),
    at most ``timeout`` seconds per item. ``workers=0`` runs ``fn`` in this process:
    no isolation, for debugging.

    ``items`` may be a lazy iterable: it is drawn by a thread of their own only as far as the pool works ahead (two
    chunks a worker), so a stream whose items are made as it goes (a slide's tile batches once the slide is opened)
    flows through one pool, and an item that is slow to make does not hold back the results already read.
    A chunk whose items all meet ``skip`` when its turn comes is not waited for: its task is cancelled (a worker
    that runs it is stopped and replaced) and each item yields :data:`SKIPPED` (a batch of a slide already lost).

    ``hand_off``: a result that is a numpy array comes back through a slot in RAM (:class:`Slots`,
    :class:`HandOff`), not the pool's pipe: at most as many slots as results in flight, each used again once read
    back; the slots of results lost or cancelled are retired at once, and all are closed once the workers are
    stopped, so none is written afterwards (files left in ``/dev/shm`` by a parent that was killed are swept by the
    next pool that hands off). A slot that cannot be read back makes that item a :class:`Failure`.

    ``turns``: the workers share the consumer's cores (a model on the CPU). From a result's yield until the consumer
    asks for the next, a worker waits at each :func:`wait_turn`, so reading and computing take turns instead of
    both running on too few cores (``benchmarks/RESULTS.md``, "Readers in turns").

    Examples:
        >>> for path, rows in isolated_map(read_files, paths, workers=2, timeout=60): ...
    """
    stats = stats if stats is not None else PoolStats()
    if workers <= 0:
        if initializer is not None:
            initializer(*initargs)
        for part in _chunks(items, chunk):
            yield from zip(part, _Inline(fn, part).result(), strict=True)
        return
    context = _context()
    ahead = max(2, 2 * workers)
    drawn = _Drawn(items, chunk, ahead)
    slots: Slots | None = None
    if hand_off:
        sweep_handoffs()
        slots = Slots()
    try:
        first = drawn.get(block=True)
        if first is None:
            drawn.raise_error()  # drawing the very first item may have failed
            return
        go = context.Event() if turns else None  # set: the workers' turn
        if go is not None:
            go.set()
            initializer, initargs = _init_turns, (go, TURN_PAUSE, initializer, initargs)
        pool = ProcessPool(max_workers=workers, initializer=initializer, initargs=initargs, context=context)
        results = _results(pool, fn, first, drawn, ahead, timeout, stats, skip, slots)
        try:
            with closing(results):
                for result in results:
                    if go is not None:
                        go.clear()
                    yield result
                    if go is not None:
                        go.set()
        except BaseException:  # an error downstream, Ctrl-C, or the caller abandoning the generator: stop at once
            pool.stop()
            pool.join()
            raise
        pool.close()
        pool.join()
    finally:
        drawn.close()
        if slots is not None:  # no worker runs any more: nothing can write these after they are closed
            slots.close()


def _hand_back(fn: Callable[[list[T]], list[R]], part: list[T], paths: list[str]) -> list[Any]:
    """A task of a pool that hands off: ``fn``'s results, each array left in the file named for it."""
    results = fn(part)
    return [HandOff.leave(r, p) if isinstance(r, np.ndarray) else r for r, p in zip(results, paths, strict=True)]


def _results(
    pool: ProcessPool,
    fn: Callable[[list[T]], list[R]],
    first: list[T],
    drawn: _Drawn[T],
    ahead: int,
    timeout: float,
    stats: PoolStats,
    skip: Callable[[T], bool] | None,
    slots: Slots | None,
) -> Generator[tuple[T, R | Failure], None, None]:
    """:func:`isolated_map`'s results, in input order: up to ``ahead`` chunks scheduled, topped up from ``drawn``
    without waiting for it while a result is pending; a lost chunk retried item by item. ``slots``: the hand-off
    slots, closed by the caller at the end (None: results come through the pipe)."""

    def skipped(part: list[T]) -> bool:
        return skip is not None and all(skip(item) for item in part)

    def schedule(part: list[T]) -> tuple[Any, list[str]]:
        """The task for ``part``, and the slots its arrays come back in."""
        if slots is None:
            return pool.schedule(fn, (part,), timeout=timeout * len(part)), [""] * len(part)
        paths = [slots.get() for _ in part]
        return pool.schedule(_hand_back, (fn, part, paths), timeout=timeout * len(part)), paths

    def received(value: Any, path: str) -> Any:
        """A result as the consumer gets it: a handed-off array read back; its slot given out again."""
        if slots is None:
            return value
        if not isinstance(value, HandOff):  # through the pipe (the slot could not be written), or not an array
            if isinstance(value, np.ndarray):
                stats.piped += 1
                slots.unwritten(path)
            else:
                slots.put_back(path)
            return value
        try:
            array = value.take()
        except OSError as err:
            slots.retire(path)
            return Failure(f"its result could not be read back ({err})")
        stats.handed_off += 1
        slots.put_back(path)
        return array

    def drop(paths: list[str]) -> None:
        """Retires the slots of results lost or cancelled now, never to be given out again (a worker being stopped
        may still write them)."""
        if slots is not None:
            for path in paths:
                slots.retire(path)

    def submit(part: list[T]) -> tuple[list[T], Any, list[str]]:
        return (part, None, []) if skipped(part) else (part, *schedule(part))

    pending: deque[tuple[list[T], Any, list[str]]] = deque([submit(first)])
    while True:
        while len(pending) < ahead and (nxt := drawn.get(block=not pending)) is not None:
            pending.append(submit(nxt))
        if not pending:
            drawn.raise_error()  # after the results of every item drawn before it
            return
        part, future, paths = pending.popleft()
        if future is None or skipped(part):
            if future is not None:
                future.cancel()
            drop(paths)
            yield from ((item, SKIPPED) for item in part)
            continue
        try:
            got = list(zip(part, future.result(), paths, strict=True))
        except Exception as err:  # ProcessExpired, a timeout, or a result that could not travel back
            drop(paths)
            stats.lost_chunks += 1
            what = f"failed ({type(err).__name__}: {err})"
            if isinstance(err, FutureTimeout | ProcessExpired):
                what = "timed out" if isinstance(err, FutureTimeout) else "died"
            if len(part) == 1:  # alone already: retrying would only cost the time again
                yield part[0], _failure(err, timeout, stats)
                continue
            log.warning("a decode worker %s while reading %d file(s); retrying them one by one", what, len(part))
        else:
            yield from ((item, received(value, path)) for item, value, path in got)
            continue
        singles = [(item, *schedule([item])) for item in part]
        for item, single, (path,) in singles:
            try:
                value = single.result()[0]
            except Exception as err:
                drop([path])
                yield item, _failure(err, timeout, stats)
            else:
                yield item, received(value, path)

"""Reading untrusted files in worker processes that are allowed to die.

Compiled decoders fail in ways Python cannot catch: a Rust decoder panics (``PanicException``
derives from ``BaseException``), a C decoder segfaults or calls ``abort()``, a damaged stream makes
one loop forever. In torch's DataLoader any of these kills the whole run. :func:`isolated_map` runs
the work in a pool of processes from Pebble (a maintained library made for exactly this: a pool
whose tasks can time out, and whose dead workers are replaced without breaking the pool), in chunks:

1. a chunk whose worker dies, passes its deadline or raises anything at all (a ``PanicException`` too) is
   detected by the pool, which starts a fresh worker in place of one that died;
2. that chunk's files are retried one by one, each in its own task (a fresh or healthy worker); a chunk of
   one item is not retried (it already was alone);
3. the one file that still kills or hangs its worker becomes a :class:`Failure` with the reason
   ("decoder crashed: signal 11 (SIGSEGV)", "decoder timed out after 60 s"), and the run goes on.

Results come back in input order, so an output written from them is deterministic. Workers start
from a ``forkserver`` (a clean, single-threaded process), never by forking a process that runs
inference threads or holds a CUDA context.

A run that is stopped from outside stops its workers: SIGTERM while a pool runs raises ``SystemExit(143)``
in the main thread, so the pool's own stop path runs, and a worker ends as soon as its parent is gone
(``kill -9``), so no reader hung in a decoder keeps the forkserver and the resource tracker alive after it.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from itertools import islice
from typing import Any, Generic, TypeVar

import numpy as np
from pebble import ProcessExpired, ProcessPool

from medvision.handoff import HandOff, Slots, sweep_handoffs

log = logging.getLogger("medvision")

#: How a :class:`Failure`'s reason begins when the worker, not the file's content, failed: a crash, a timeout (the
#: seconds follow), a result lost on its way back. ``score``'s resume reads them to decide what to try again.
CRASHED = "decoder crashed:"
TIMED_OUT = "decoder timed out after"
UNREAD = "its result could not be read back"
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

    def add(self, other: PoolStats) -> None:
        """Counts ``other``'s losses in with these (a second pool of the same run: the tile readers)."""
        self.lost_chunks += other.lost_chunks
        self.crashed_files += other.crashed_files
        self.timed_out_files += other.timed_out_files


#: The longest a worker waits at :func:`wait_turn` at a time, in seconds: beside a consumer that keeps a result
#: longer (a slow model), a worker reads a step each wait, so no task comes near its timeout for waiting.
TURN_PAUSE = 0.5
_TURN: dict[str, Any] = {}


def wait_turn() -> None:
    """In a worker of ``isolated_map(turns=True)``: waits while the consumer works on a result (at most
    :data:`TURN_PAUSE` s); no-op anywhere else. A task calls it between its steps (before each tile)."""
    if (go := _TURN.get("go")) is not None:
        go.wait(_TURN["pause"])


def _init_worker(go: Any, pause: float, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    """Every worker's set-up: it dies with its parent, waits its turn (``go``: ``isolated_map(turns=True)``), then
    runs the pool's own ``initializer``."""
    _die_with_parent()
    if go is not None:
        _TURN.update(go=go, pause=pause)
    if initializer is not None:
        initializer(*initargs)


def _die_with_parent() -> None:
    """A worker hung in a decoder outlives a parent that was killed, and with it the forkserver (which lives while a
    worker holds its pipe) and the resource tracker, unless it is told to die with it. Its parent in the kernel's
    sense is the forkserver, so ``PR_SET_PDEATHSIG`` cannot tie it to the run's process; the pipe that
    multiprocessing keeps open from that process (its ``parent_process().sentinel``) can: a thread waits for its end
    and ends the worker. (A decoder that loops in C holding the GIL keeps the thread from running: none of the
    slide or DICOM decoders does.)"""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.sentinel is not None:
        threading.Thread(target=_watch_parent, args=(parent.sentinel,), name="medvision-parent", daemon=True).start()


def _watch_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


_TERM: dict[str, Any] = {"depth": 0}


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a pool runs, SIGTERM (``kill``, a scheduler's time limit, ``docker stop``) raises ``SystemExit(143)``
    in the main thread, so the pool's stop path runs (workers stopped, hand-off files removed) where the default
    action would end the process at once and leave hung readers behind. Only in the main thread (where a handler can
    be set), only over the default action (a program with its own handler, or one that ignores SIGTERM, has
    decided), once for pools that run at the same time; the previous handler is back when the last ends."""
    main = threading.current_thread() is threading.main_thread()
    if main and _TERM["depth"] == 0 and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)
    _TERM["depth"] += main
    try:
        yield
    finally:
        _TERM["depth"] -= main
        if main and _TERM["depth"] == 0:
            with suppress(ValueError):  # a generator closed from another thread: left to the next pool's end
                if signal.getsignal(signal.SIGTERM) is _terminated:  # ours, not a handler the program set
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        return f"{CRASHED} signal {-exitcode} ({name})"
    return f"{CRASHED} its worker process exited with code {exitcode}"


def _failure(err: BaseException, timeout: float, stats: PoolStats) -> Failure:
    """What became of an item whose task failed on its own (it was alone in its chunk), counted in ``stats``."""
    if isinstance(err, FutureTimeout):
        stats.timed_out_files += 1
        return Failure(f"{TIMED_OUT} {timeout:g} s")
    stats.crashed_files += 1
    if isinstance(err, ProcessExpired):
        return Failure(_death(err.exitcode))
    return Failure(f"reading failed in its worker process ({type(err).__name__}: {err})")


def _outcome(future: Any) -> tuple[Any, BaseException | None]:
    """``future``'s result, or the exception its task ended with: of any kind, since a Rust decoder's
    ``PanicException`` derives from ``BaseException`` and must cost its chunk only, not the run. This process's own
    Ctrl-C or SIGTERM, raised while it waits, goes on up."""
    err = future.exception()  # waits; what the task raised, or None (an interrupt while waiting goes up)
    return (None, err) if err is not None else (future.result(), None)


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
    back; the slots of results lost or cancelled are closed at once (however many slides fail, the slots open stay
    as few as the results in flight), the rest once the workers are stopped (files left in ``/dev/shm`` by a parent
    that was killed are swept by the next pool that hands off). A slot that cannot be read back makes that item a
    :class:`Failure`.

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
    with _sigterm_raises():
        yield from _pooled(fn, items, workers, timeout, chunk, initializer, initargs, stats, skip, hand_off, turns)


def _pooled(fn: Callable[[list[T]], list[R]], items: Iterable[T], workers: int, timeout: float, chunk: int,
            initializer: Callable[..., None] | None, initargs: tuple[Any, ...], stats: PoolStats,
            skip: Callable[[T], bool] | None, hand_off: bool, turns: bool,
            ) -> Generator[tuple[T, R | Failure], None, None]:  # fmt: skip
    """:func:`isolated_map` with ``workers`` processes."""
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
        setup = (go, TURN_PAUSE, initializer, initargs)
        pool = ProcessPool(max_workers=workers, initializer=_init_worker, initargs=setup, context=context)
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


def _hand_back(fn: Callable[[list[T]], list[R]], part: list[T], paths: list[str], links: list[str | None]) -> list[Any]:
    """A task of a pool that hands off: ``fn``'s results, each array left in the slot named for it (``links``: what
    each slot must lead to, :meth:`Slots.link`)."""
    results = fn(part)
    return [HandOff.leave(r, p, k) if isinstance(r, np.ndarray) else r
            for r, p, k in zip(results, paths, links, strict=True)]  # fmt: skip


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
        links = [slots.link(path) for path in paths]
        return pool.schedule(_hand_back, (fn, part, paths, links), timeout=timeout * len(part)), paths

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
            return Failure(f"{UNREAD} ({err})")
        stats.handed_off += 1
        slots.put_back(path)
        return array

    def drop(paths: list[str]) -> None:
        """Retires the slots of results lost or cancelled now, never to be given out again (a worker being stopped
        may still run: it checks a slot's link before it writes, :meth:`HandOff.leave`)."""
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
        values, err = _outcome(future)
        if err is not None:  # ProcessExpired, a timeout, a result that could not travel back, or a decoder's panic
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
            got = list(zip(part, values, paths, strict=True))
            yield from ((item, received(value, path)) for item, value, path in got)
            continue
        singles = [(item, *schedule([item])) for item in part]
        for item, single, (path,) in singles:
            values, err = _outcome(single)
            if err is not None:
                drop([path])
                yield item, _failure(err, timeout, stats)
            else:
                yield item, received(values[0], path)

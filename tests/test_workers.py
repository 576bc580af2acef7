"""The crash-isolated pool's stream contract (:func:`medvision.workers.isolated_map`) with a lazy input: results in
input order, an item that is slow to make holds back nothing already read, an error while making the items
reaches the consumer, and a consumer that stops early closes the input. ``list`` is the work: it returns its
chunk, so each item's result is the item."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import handoff_leftovers

from medvision import workers
from medvision.handoff import HANDOFF_DIR, HandOff, Slots, discard, handoff_path, sweep_handoffs
from medvision.runtime import reader_processes
from medvision.workers import isolated_map


def test_an_item_slow_to_make_does_not_hold_back_the_results_already_read() -> None:
    """The next slide's batches wait for the slide to be opened; meanwhile the batches already read go on to the
    model. Here the third item is made only once the consumer has the first result (or after 2 min: the first
    worker starts from a forkserver that imports torch)."""
    gate = threading.Event()
    waited: list[bool] = []

    def items() -> Iterator[int]:
        yield 0
        yield 1
        waited.append(gate.wait(timeout=120))
        yield 2

    got = []
    for item, result in isolated_map(list, items(), workers=1, timeout=30, chunk=1):
        got.append((item, result))
        gate.set()
    assert got == [(0, 0), (1, 1), (2, 2)]
    assert waited == [True]  # the first result reached the consumer while the third item was still being made


def test_an_error_while_making_the_items_reaches_the_consumer_after_the_results_before_it() -> None:
    def items() -> Iterator[int]:
        yield from range(3)
        raise ValueError("slide index is damaged")

    got = []
    with pytest.raises(ValueError, match="slide index is damaged"):
        for item, _ in isolated_map(list, items(), workers=1, timeout=30, chunk=2):
            got.append(item)
    assert got == [0, 1, 2]

    def nothing_drawn() -> Iterator[int]:
        raise ValueError("slide folder is unreadable")
        yield 0

    with pytest.raises(ValueError, match="slide folder is unreadable"):  # not an empty stream
        list(isolated_map(list, nothing_drawn(), workers=1, timeout=30, chunk=2))


def test_a_consumer_that_stops_early_closes_the_lazy_input() -> None:
    """Closing the input runs its ``finally`` (a planning pool of its own is stopped there)."""
    closed = threading.Event()

    def items() -> Iterator[int]:
        try:
            yield from range(1000)
        finally:
            closed.set()

    stream = isolated_map(list, items(), workers=1, timeout=30, chunk=1)
    assert next(stream) == (0, 0)
    stream.close()
    assert closed.wait(timeout=5)


def _batch(i: int) -> np.ndarray:
    shapes = [(8, 64, 64, 3), (4, 3, 32, 32), (0, 64, 64, 3)]
    dtypes = [np.uint8, np.float32, np.uint8]
    return (np.arange(np.prod(shapes[i])) % 251).astype(dtypes[i]).reshape(shapes[i])


def _hand_off(items: list[tuple[int, str]]) -> list[HandOff | np.ndarray]:
    """A reader's work: a batch left in the file its parent named."""
    return [HandOff.leave(_batch(i), path) for i, path in items]


@pytest.mark.parametrize("memory_files", [True, False], ids=["memfd", "dev-shm"])
def test_a_worker_hands_a_batch_back_through_a_slot_in_ram_that_the_parent_closes(
    memory_files: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tile batches come back from the readers through RAM instead of the pool's pipe (2.4x less time and 2.9x
    less of the encoder's CPU for a 4.8 MB batch, benchmarks/RESULTS.md): a memory file of the parent's that the
    worker opens through /proc, or (without memfds) a file in /dev/shm. The same array, dtype and shape; only this
    user may read the slot; nothing left once the slots are closed."""
    if memory_files and not Slots().memfd:
        pytest.skip("no memfd_create or /proc on this system: slots are files")
    monkeypatch.setattr(Slots, "memory_files", memory_files)
    slots = Slots()
    items = [(i, slots.get()) for i in range(3)]
    assert all(path.startswith("/proc/") == memory_files for _, path in items)
    got = list(isolated_map(_hand_off, items, workers=1, timeout=60, chunk=2))
    assert all(isinstance(value, HandOff) for _, value in got)  # not the pipe
    for (i, path), (_, value) in zip(items, got, strict=True):
        assert isinstance(value, HandOff) and value.path == path
        assert os.stat(path).st_mode & 0o777 == 0o600  # tile pixels are a patient's: no other user reads them
        array = value.take()
        assert array.dtype == _batch(i).dtype and np.array_equal(array, _batch(i))
    assert len(handoff_leftovers()) == 3
    slots.close()
    assert handoff_leftovers() == []


def test_a_batch_that_cannot_be_left_in_a_file_travels_as_itself_and_a_short_file_is_an_error(tmp_path: Path) -> None:
    """A full /dev/shm (Docker's 64 MB) is no error: the array goes through the pipe; so does one whose slot the
    parent could not make or has removed (the worker never makes a file). A slot cut short is an OSError naming
    it (its slide becomes an error row); retiring it removes it."""
    batch = _batch(0)
    assert HandOff.leave(batch, str(tmp_path / "missing-folder" / "x")) is batch
    assert HandOff.leave(batch, str(tmp_path / "removed")) is batch and not (tmp_path / "removed").exists()
    path = str(tmp_path / "short")
    Path(path).touch(0o600)  # the parent's slot
    handed = HandOff.leave(batch, path)
    assert isinstance(handed, HandOff) and handed.shape == batch.shape
    Path(path).write_bytes(Path(path).read_bytes()[:100])
    with pytest.raises(OSError, match=rf"{path}: hand-off slot holds 100 bytes, expected {batch.nbytes}"):
        handed.take()
    slots = Slots()
    slots.files.add(path)
    slots.retire(path)
    assert not Path(path).exists()
    discard(path)  # a file already gone is no error


def _leave_with_a_file_size_limit(path: str) -> tuple[bool, int]:
    """In a process whose files may not grow past 1 MB (as a full tmpfs stops a write): whether the batch came
    back as itself, and the slot's size after."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    batch = np.full((32, 224, 224, 3), 7, np.uint8)  # 4.8 MB
    returned = HandOff.leave(batch, path) is batch
    return returned, os.path.getsize(path)


def test_a_batch_whose_write_is_cut_short_travels_as_itself_and_its_slot_gives_its_pages_back(
    tmp_path: Path,
) -> None:
    """A slot whose write fails part way (a full /dev/shm) would otherwise keep the megabytes it got, in RAM,
    from the other slots: it is emptied, and the batch goes through the pipe."""
    import multiprocessing

    path = tmp_path / "slot"
    path.touch(0o600)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        returned, size = pool.apply(_leave_with_a_file_size_limit, (str(path),))
    assert returned and size == 0


def test_sweeping_removes_the_hand_off_files_of_a_parent_that_is_gone_and_keeps_a_live_ones() -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = HANDOFF_DIR / f"medvision-handoff-{int(gone.stdout)}-0"
    live = Path(handoff_path())
    for path in (dead, live):
        path.write_bytes(b"tiles")
    try:
        sweep_handoffs()
        assert not dead.exists() and live.exists()
    finally:
        discard(str(dead))
        discard(str(live))


def _arrays(items: list[int]) -> list[np.ndarray | str]:
    """A reader's work without knowing how its result travels: arrays, and a reason for item 9."""
    return ["tile data is damaged" if i == 9 else _batch(i % 3) for i in items]


def test_a_pool_that_hands_off_returns_the_arrays_through_ram_and_leaves_no_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``isolated_map(hand_off=True)`` (the slide tile stream): every array result comes back through a file that
    is read back and removed; a result that is not an array comes as itself; a consumer that stops early leaves no
    file of the results it did not take."""
    taken = []
    real_take = HandOff.take

    def take(self: HandOff) -> np.ndarray:
        taken.append(self.path)
        return real_take(self)

    monkeypatch.setattr(HandOff, "take", take)
    got = list(isolated_map(_arrays, [0, 1, 2, 9, 3], workers=1, timeout=60, chunk=2, hand_off=True))
    assert [item for item, _ in got] == [0, 1, 2, 9, 3]
    for item, value in got:
        if item == 9:
            assert value == "tile data is damaged"
        else:
            assert isinstance(value, np.ndarray) and np.array_equal(value, _batch(item % 3))
    assert len(taken) == 4 and handoff_leftovers() == []  # through RAM, not the pipe; nothing left

    taken.clear()
    got = list(isolated_map(_arrays, list(range(40)), workers=2, timeout=60, chunk=1, hand_off=True))
    assert all(np.array_equal(value, _batch(item % 3)) for item, value in got if item != 9)
    # each slot is written in place and used again once read back (its pages stay in RAM): no more slots than
    # results in flight (two a worker), where a file a batch made 39
    assert len(taken) == 39 and len(set(taken)) <= 4 and handoff_leftovers() == []

    stream = isolated_map(_arrays, list(range(8)), workers=1, timeout=60, chunk=1, hand_off=True)
    assert np.array_equal(next(stream)[1], _batch(0))  # the pool has read ahead meanwhile
    stream.close()
    assert handoff_leftovers() == []


def test_slide_readers_default_to_the_cores_beside_a_gpu_and_to_the_model_threads_beside_a_cpu_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a GPU the encoder needs no cores and one reader (300-450 tiles/s) cannot feed it: every core but the
    main process's, shared among the machine's torchrun ranks. On a CPU one per thread of the model (at most 8):
    they read in turns with it, and its wait for a batch is shortest with every core reading."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert reader_processes(torch.device("cpu")) == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert reader_processes(torch.device("cpu")) == 8
    assert reader_processes(torch.device("cuda")) == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert reader_processes(torch.device("cuda")) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert reader_processes(torch.device("cuda")) == 1


def _stamped(items: list[int]) -> list[list[float]]:
    """A reader's work in steps (a tile each): the system-wide monotonic time at which each step began."""
    out = []
    for _ in items:
        steps = []
        for _ in range(3):
            workers.wait_turn()
            steps.append(time.monotonic())
            time.sleep(0.04)
        out.append(steps)
    return out


def _steps_while_busy(turns: bool) -> tuple[int, int]:
    """Steps that began while the consumer worked on a result (0.25 s each), and all steps."""
    busy, steps = [], []
    for _, stamps in isolated_map(_stamped, list(range(6)), workers=2, timeout=60, chunk=1, turns=turns):
        start = time.monotonic()
        time.sleep(0.25)  # the model's forward pass
        busy.append((start + 0.06, time.monotonic() - 0.01))  # margins: a step let go just before the result came
        steps += stamps if isinstance(stamps, list) else []
    inside = sum(any(a < t < b for a, b in busy) for t in steps)
    return inside, len(steps)


def test_readers_in_turns_step_only_while_the_consumer_waits_and_never_wait_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``isolated_map(turns=True)`` (readers beside a model on the CPU): a worker waits at ``wait_turn`` from the
    moment a result is handed to the consumer until it asks for the next, so no step runs while the model
    computes; without turns steps run then. A consumer that keeps its result longer than ``TURN_PAUSE`` does not
    stop the workers (no task waits near its timeout): they go on a step each pause. ``wait_turn`` outside such a
    pool returns at once."""
    assert _steps_while_busy(turns=True) == (0, 18)
    inside, steps = _steps_while_busy(turns=False)
    assert steps == 18 and inside > 0
    monkeypatch.setattr(workers, "TURN_PAUSE", 0.02)
    inside, steps = _steps_while_busy(turns=True)
    assert steps == 18 and inside > 0
    start = time.monotonic()
    workers.wait_turn()
    assert time.monotonic() - start < 0.01


def test_a_pool_whose_slots_cannot_be_made_sends_the_arrays_through_the_pipe_and_counts_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No /dev/shm, or none left: every array still arrives, through the pipe, and the pool's stats say how many
    did (the tile stream warns with that count: a silent slow path is a setting nobody fixes)."""
    from medvision import handoff
    from medvision.workers import PoolStats

    monkeypatch.setattr(handoff, "HANDOFF_DIR", tmp_path / "no-such-folder")
    monkeypatch.setattr(Slots, "memory_files", False)
    stats = PoolStats()
    got = list(isolated_map(_arrays, [0, 1, 9, 2], workers=1, timeout=60, chunk=1, hand_off=True, stats=stats))
    assert [np.array_equal(v, _batch(i % 3)) if i != 9 else v == "tile data is damaged" for i, v in got] == [True] * 4
    assert (stats.piped, stats.handed_off) == (3, 0)
    stats = PoolStats()
    monkeypatch.undo()
    list(isolated_map(_arrays, [0, 1, 9, 2], workers=1, timeout=60, chunk=1, hand_off=True, stats=stats))
    assert (stats.piped, stats.handed_off) == (0, 3)


def test_a_memory_slot_the_workers_cannot_open_sends_that_array_through_the_pipe_and_the_next_slots_are_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Where a worker may not open its parent's /proc (a hardened kernel, a sandbox), the arrays of the memory
    slots already given out come through the pipe, counted; the pool then makes its slots in /dev/shm."""
    from medvision.workers import PoolStats

    if not Slots().memfd:
        pytest.skip("no memfd_create or /proc on this system: slots are files")
    unopenable = tmp_path / "not-a-file"
    unopenable.mkdir()
    monkeypatch.setattr(os, "memfd_create", lambda name, flags=0: os.open(unopenable, os.O_RDONLY), raising=False)
    stats = PoolStats()
    got = list(isolated_map(_arrays, [0, 1, 2, 3, 4], workers=1, timeout=60, chunk=1, hand_off=True, stats=stats))
    assert all(np.array_equal(value, _batch(item % 3)) for item, value in got)
    assert (stats.piped, stats.handed_off) == (2, 3)  # two slots given out before the first result came back
    assert handoff_leftovers() == []


def _panics(items: list[int]) -> list[int]:
    """A decoder that panics on item 1, as a Rust one does through pyo3 (``PanicException``: a ``BaseException``)."""
    from faulty_reader import PanicException

    if 1 in items:
        raise PanicException("called `Option::unwrap()` on a `None` value")
    return items


def test_a_task_that_panics_in_its_worker_is_its_items_failure_and_the_others_go_on() -> None:
    """Whatever comes out of a worker's task costs its chunk (retried item by item) and then its item, never the
    run: a ``PanicException`` is no ``Exception``, and the parent re-raises it from the task's future."""
    got = dict(isolated_map(_panics, [0, 1, 2, 3], workers=1, timeout=60, chunk=2))
    assert {k: v for k, v in got.items() if k != 1} == {0: 0, 2: 2, 3: 3}
    assert isinstance(got[1], workers.Failure) and "PanicException: called `Option::unwrap()`" in got[1].reason


def _handoff_descriptors() -> int:
    """This process's descriptors open on hand-off slots: memory files, and files (held for their lock)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        n += link.startswith("/memfd:medvision-handoff") or "/medvision-handoff-" in link
    return n


def _slide_batches(items: list[tuple[int, int]]) -> list[np.ndarray | str]:
    """A slide's tile batches: the first of every slide cannot be read, the others take a moment."""
    out: list[np.ndarray | str] = []
    for _, batch in items:
        if batch == 0:
            out.append("JPEG tile data is damaged")
        else:
            time.sleep(0.02)
            out.append(_batch(0))
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count descriptors")
@pytest.mark.parametrize("memory_files", [True, False], ids=["memfd", "dev-shm"])
def test_many_failed_slides_keep_the_open_hand_off_slots_bounded_by_the_batches_in_flight(
    memory_files: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed slide's batches already handed to readers are cancelled and their slots retired. A retired slot is
    closed at once (a reader being stopped checks the slot's name before writing, so a descriptor number reused
    meanwhile is never written): kept open to the end, 30 failed slides held ~90 descriptors, and a few thousand
    broke a run at the usual limit of 1024."""
    monkeypatch.setattr(Slots, "memory_files", memory_files)
    failed: set[int] = set()
    items = [(slide, batch) for slide in range(30) for batch in range(4)]
    most, results = 0, 0
    stream = isolated_map(_slide_batches, items, workers=2, timeout=60, chunk=1, hand_off=True,
                          skip=lambda item: item[0] in failed)  # fmt: skip
    for (slide, _), value in stream:
        results += 1
        if isinstance(value, str | workers.Failure):
            failed.add(slide)
        most = max(most, _handoff_descriptors())
    assert results == len(items) and failed == set(range(30))
    assert 0 < most <= 8  # four batches in flight (two a worker), a few read back meanwhile
    assert handoff_leftovers() == [] and _handoff_descriptors() == 0


_HANGING_RUN = """
import os, sys, time
from pathlib import Path
from medvision.workers import isolated_map

def hang(items):
    Path(sys.argv[1], str(os.getpid())).touch()
    time.sleep(3600)
    return items

if __name__ == "__main__":
    for _ in isolated_map(hang, range(4), workers=2, timeout=600, chunk=1, hand_off=True):
        pass
"""


def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        kids = {p for p, pp in parents.items() if pp == pid}
        todo += list(kids - found)
        found |= kids
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the processes a run started")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_run_that_is_terminated_or_killed_leaves_no_process_behind(tmp_path: Path, sig: signal.Signals) -> None:
    """``kill`` (SIGTERM: the pool's stop path runs, exit status 143) or ``kill -9`` (the workers end with their
    parent's pipe) while readers hang in a decoder: no reader, forkserver or resource tracker the run started is
    left running. Before, hung readers kept the forkserver and the resource tracker alive for good."""
    script, markers = tmp_path / "hanging_run.py", tmp_path / "markers"
    script.write_text(_HANGING_RUN)
    markers.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(markers)], cwd=tmp_path)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(list(markers.iterdir())) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert len(list(markers.iterdir())) == 2, "the readers never started"
        started = _descendants(proc.pid)
        assert {int(p.name) for p in markers.iterdir()} <= started
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == (143 if sig == signal.SIGTERM else -sig)
        deadline = time.monotonic() + 10
        while any(_running(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [p for p in started if _running(p)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in started:  # what a failing run left: only the processes it started, by pid
            if _running(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
    assert list(HANDOFF_DIR.glob(f"medvision-handoff-{proc.pid}-*")) == []


_HOLDER = """
import os, sys, time
from medvision import handoff
os.getpid = lambda: int(sys.argv[1])  # as a process in another PID namespace (a container) reads its own pid
print(handoff.handoff_path(), flush=True)
time.sleep(120)
"""


def test_sweeping_keeps_a_live_runs_hand_off_file_whatever_pid_it_names_and_removes_one_whose_run_died() -> None:
    """The pid in a hand-off file's name is its maker's in its own PID namespace: containers that share /dev/shm
    do not see each other's pids. The maker holds the file's lock while it lives; the sweep removes only files
    whose lock it can take."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, gone.stdout.strip()], stdout=subprocess.PIPE, text=True)
    path = HANDOFF_DIR / "medvision-handoff-none"
    try:
        assert holder.stdout is not None
        path = Path(holder.stdout.readline().strip())
        assert path.name.startswith(f"medvision-handoff-{int(gone.stdout)}-") and path.exists()
        sweep_handoffs()
        assert path.exists()  # its maker runs: not swept, though no process here has that pid
        holder.kill()
        holder.wait()
        sweep_handoffs()
        assert not path.exists()  # its maker died: its lock went with it
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        discard(str(path))


def test_a_stopped_worker_never_writes_a_retired_memory_slot_whose_descriptor_number_was_reused(
    tmp_path: Path,
) -> None:
    """A retired memory slot is closed at once, while the worker that had it may still be being stopped; the next
    file this process opens can take its descriptor number. The worker checks the slot's unique name first and
    leaves that file alone (its batch goes nowhere: its result is not waited for)."""
    slots = Slots()
    if not slots.memfd:
        pytest.skip("no memfd_create or /proc on this system: slots are files")
    path = slots.get()
    link = slots.link(path)
    assert link is not None and link.startswith("/memfd:medvision-handoff-")
    slots.retire(path)
    assert handoff_leftovers() == []  # closed now, not at the end of the run
    number = int(path.rsplit("/", 1)[1])
    assert not os.path.exists(f"/proc/self/fd/{number}")
    fd = os.open(tmp_path / "features.parquet", os.O_WRONLY | os.O_CREAT, 0o600)
    if fd != number:  # the next file this process opens, under the slot's old number
        os.dup2(fd, number, inheritable=False)
        os.close(fd)
    try:
        batch = _batch(0)
        assert HandOff.leave(batch, path, link) is batch
    finally:
        os.close(number)
    assert (tmp_path / "features.parquet").stat().st_size == 0
    live = slots.get()
    handed = HandOff.leave(batch, live, slots.link(live))
    assert isinstance(handed, HandOff) and np.array_equal(handed.take(), batch)
    slots.close()

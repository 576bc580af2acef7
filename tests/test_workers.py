"""The crash-isolated pool's stream contract (:func:`medvision.workers.isolated_map`) with a lazy input: results in
input order, an item that is slow to make holds back nothing already read, an error while making the items
reaches the consumer, and a consumer that stops early closes the input. ``list`` is the work: it returns its
chunk, so each item's result is the item."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

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

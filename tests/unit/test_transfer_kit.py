"""The shared thread pool: threads over the allowed count end, or wait and come back when it grows."""

from __future__ import annotations

import threading

import pytest

from scalebus.transfer import kit


def test_parked_threads_resume_when_the_limit_grows_and_end_with_the_run() -> None:
    allowed = [1]
    seen: set[str] = set()
    lock = threading.Lock()
    released = threading.Event()

    def work(item: int) -> None:
        with lock:
            seen.add(threading.current_thread().name)
        if item == 5:
            allowed[0] = 4  # from here on four threads may take items
            released.set()
        if item > 5:
            released.wait(5)
            threading.Event().wait(0.01)  # long enough that the others take the next items

    kit.run_parallel(work, range(40), max_workers=4, threads_allowed=lambda: allowed[0], name="t", park_s=0.01)
    assert len(seen) == 4


def test_without_parking_threads_over_the_limit_end() -> None:
    seen: set[str] = set()
    kit.run_parallel(
        lambda _i: seen.add(threading.current_thread().name),
        range(50),
        max_workers=4,
        threads_allowed=lambda: 1,
        name="t",
    )
    assert seen == {threading.current_thread().name}


def test_a_failure_ends_parked_threads_too() -> None:
    def work(item: int) -> None:
        if item == 3:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        kit.run_parallel(work, range(1000), max_workers=4, threads_allowed=lambda: 1, park_s=0.01)

"""The embedded queue's record of settled jobs (throughput and waits for ``status``), the percentile it reports,
and the paging every dead-letter reader shares."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scalebus.backends import base
from scalebus.backends.local import sqlite_queue


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[sqlite_queue.SqliteJobQueue]:
    q = sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=30, max_delivery_count=2)
    yield q
    q.close()


def _take(q: sqlite_queue.SqliteJobQueue) -> base.ReceivedMessage:
    got = q.receive(max_wait_s=1)
    assert got is not None
    return got


def test_completions_dead_letters_waits_and_runs_are_recorded(queue: sqlite_queue.SqliteJobQueue) -> None:
    started = time.time()
    queue.send([base.OutgoingMessage(f"j{i}", b"{}") for i in range(5)])
    time.sleep(0.3)  # every job waits at least this long
    first, second, third = _take(queue), _take(queue), _take(queue)
    time.sleep(0.2)  # and these run at least this long
    queue.complete(first)
    queue.complete(second)
    queue.dead_letter(third, reason="SchemaViolation", description="bad")
    queue.abandon(abandoned := _take(queue))  # a delivery that did not settle: not a completion
    got = queue.recent(since=started - 1)
    assert (got.completed, got.dead_lettered, got.enqueued, got.source) == (2, 1, 5, "sqlite")
    assert got.wait_p50_s is not None and got.wait_p95_s is not None and got.wait_max_s is not None
    assert 0.3 <= got.wait_p50_s <= got.wait_p95_s <= got.wait_max_s < 5
    assert got.run_p50_s is not None and got.run_p95_s is not None
    assert 0.2 <= got.run_p50_s <= got.run_p95_s < 5
    assert got.oldest_waiting_s is not None and got.oldest_waiting_s >= 0.3, "j3 was given back, j4 never taken"
    assert got.oldest_includes_locked is False and got.unavailable == ()
    assert abandoned.message_id == "j3"


def test_the_window_leaves_out_what_settled_before_it(queue: sqlite_queue.SqliteJobQueue) -> None:
    queue.send([base.OutgoingMessage("old", b"{}")])
    queue.complete(_take(queue))
    got = queue.recent(since=time.time() + 1)
    assert (got.completed, got.dead_lettered, got.enqueued, got.wait_p50_s, got.run_p50_s) == (0, 0, 0, None, None)
    assert got.oldest_waiting_s is None, "nothing waits"


def test_jobs_dead_lettered_for_too_many_deliveries_are_counted(queue: sqlite_queue.SqliteJobQueue) -> None:
    queue.send([base.OutgoingMessage("poison", b"{}")])
    for _ in range(2):
        queue.abandon(_take(queue))
    assert queue.receive(max_wait_s=0.1) is None  # the third delivery dead-letters it
    assert queue.recent(since=time.time() - 60).dead_lettered == 1


def test_the_record_is_pruned_to_a_day(queue: sqlite_queue.SqliteJobQueue, tmp_path: Path) -> None:
    queue.send([base.OutgoingMessage(f"j{i}", b"{}") for i in range(2)])
    queue.complete(_take(queue))
    with sqlite3.connect(tmp_path / "q.db") as conn:  # make the first settlement a day and a minute old
        conn.execute("UPDATE settled SET settled_at = settled_at - ?", (sqlite_queue.HISTORY_KEEP_S + 60,))
    queue.complete(_take(queue))
    with sqlite3.connect(tmp_path / "q.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM settled").fetchone() == (1,)


def test_a_queue_file_from_before_the_record_gains_it(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, "
            "message_id TEXT NOT NULL, body BLOB NOT NULL, enqueued_at REAL NOT NULL, "
            "delivery_count INTEGER NOT NULL DEFAULT 0, "
            "lock_token TEXT, locked_until REAL, dead INTEGER NOT NULL DEFAULT 0, dl_reason TEXT, "
            "dl_description TEXT, UNIQUE (queue, message_id))"
        )
        conn.execute(
            "INSERT INTO messages (queue, message_id, body, enqueued_at) VALUES ('jobs', 'a', x'7b7d', 1.0)"
        )
    q = sqlite_queue.SqliteJobQueue(path, queue="jobs", lock_duration_s=30, max_delivery_count=2)
    try:
        q.complete(_take(q))
        assert q.recent(since=0).completed == 1
    finally:
        q.close()


@pytest.mark.parametrize(
    ("values", "pct", "expected"),
    [
        pytest.param([], 50, None, id="none"),
        pytest.param([4.0], 95, 4.0, id="one"),
        pytest.param([1.0, 2.0, 3.0, 4.0], 50, 2.0, id="median-of-four-is-the-second"),
        pytest.param([float(i) for i in range(1, 101)], 95, 95.0, id="p95-of-100"),
        pytest.param([float(i) for i in range(1, 21)], 95, 19.0, id="p95-of-20"),
        pytest.param([1.0, 2.0], 100, 2.0, id="p100-is-max"),
    ],
)
def test_nearest_rank_percentile(values: list[float], pct: float, expected: float | None) -> None:
    assert sqlite_queue.percentile(values, pct) == expected


def _dead(seq: int) -> base.DeadLetter:
    return base.DeadLetter(f"m{seq}", "r", "", 1, b"", sequence_number=seq)


class _ShortPages:
    """Peeks from a store of dead letters, each returning at most ``limit`` (fewer than asked, as a broker may)."""

    def __init__(self, count: int, *, limit: int) -> None:
        self.store = [_dead(seq) for seq in range(10, 10 + 3 * count, 3)]  # gaps, as sequence numbers have
        self.limit = limit
        self.calls: list[tuple[int, int]] = []

    def __call__(self, start: int, count: int) -> list[base.DeadLetter]:
        self.calls.append((start, count))
        return [d for d in self.store if d.sequence_number >= start][: min(count, self.limit)]


@pytest.mark.parametrize(
    ("count", "limit", "max_count", "expected"),
    [
        pytest.param(0, 5, 10, 0, id="none"),
        pytest.param(23, 5, 100, 23, id="short-pages-are-not-the-end"),
        pytest.param(23, 100, 10, 10, id="cap"),
        pytest.param(250, 250, 1000, 250, id="many"),
    ],
)
def test_paging_reads_every_dead_letter_up_to_the_cap(
    count: int, limit: int, max_count: int, expected: int
) -> None:
    pages = _ShortPages(count, limit=limit)
    got = base.page_dead_letters(pages, max_count=max_count, page_size=20)
    assert got == pages.store[:expected]
    assert all(asked <= 20 for _, asked in pages.calls)
    starts = [start for start, _ in pages.calls]
    assert starts[0] == 1 and starts == sorted(set(starts)), "each page starts past the last one seen"

"""The queue port's contract: Service Bus peek-lock semantics, asserted the same way on every backend."""

from __future__ import annotations

import threading
import time

import pytest

from scalebus import errors
from scalebus.backends import base

WAIT_S = 5.0


def _msg(i: int | str) -> base.OutgoingMessage:
    return base.OutgoingMessage(message_id=f"job-{i}", body=f'{{"n": "{i}"}}'.encode())


def _wait_for_depth(depth: base.QueueDepth, predicate: object, timeout_s: float = 10.0) -> base.DepthSample:
    """Depth sources may lag a little (cached admin reads): poll until the predicate holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        sample = depth.read_depth()
        if predicate(sample) or time.monotonic() > deadline:  # type: ignore[operator]
            return sample
        time.sleep(0.2)


def test_send_receive_complete_removes_message(queue_factory) -> None:  # type: ignore[no-untyped-def]
    queue, depth = queue_factory()
    queue.send([_msg(1)])
    got = queue.receive(max_wait_s=WAIT_S)
    assert got is not None
    assert (got.message_id, got.body, got.delivery_count) == ("job-1", b'{"n": "1"}', 1)
    assert got.locked_until > time.time()
    queue.complete(got)
    assert queue.receive(max_wait_s=0.5) is None
    sample = _wait_for_depth(depth, lambda s: s.active == 0 and not s.in_flight)
    assert (sample.active, sample.dead_lettered) == (0, 0)


def test_messages_arrive_in_order_and_locked_ones_are_not_redelivered(queue_factory) -> None:  # type: ignore[no-untyped-def]
    queue, _ = queue_factory()
    queue.send([_msg(1), _msg(2), _msg(3)])
    first = queue.receive(max_wait_s=WAIT_S)
    second = queue.receive(max_wait_s=WAIT_S)
    assert first is not None and second is not None
    assert [first.message_id, second.message_id] == ["job-1", "job-2"]
    third = queue.receive(max_wait_s=WAIT_S)
    assert third is not None and third.message_id == "job-3"
    assert queue.receive(max_wait_s=0.5) is None
    for message in (first, second, third):
        queue.complete(message)


def test_abandon_redelivers_with_higher_delivery_count(queue_factory) -> None:  # type: ignore[no-untyped-def]
    queue, _ = queue_factory()
    queue.send([_msg(1)])
    first = queue.receive(max_wait_s=WAIT_S)
    assert first is not None
    queue.abandon(first)
    again = queue.receive(max_wait_s=WAIT_S)
    assert again is not None and again.message_id == "job-1"
    assert again.delivery_count == 2
    assert again.lock_token != first.lock_token
    queue.complete(again)


def test_expired_lock_redelivers_and_old_lock_cannot_settle(queue_factory) -> None:  # type: ignore[no-untyped-def]
    queue, _ = queue_factory(lock_duration_s=5)
    queue.send([_msg(1)])
    first = queue.receive(max_wait_s=WAIT_S)
    assert first is not None
    again = queue.receive(max_wait_s=15)  # arrives once the 5 s lock has expired
    assert again is not None and again.message_id == "job-1" and again.delivery_count == 2
    with pytest.raises(errors.LockLostError):
        queue.complete(first)
    queue.complete(again)


def test_renew_lock_extends_the_lock(queue_factory) -> None:  # type: ignore[no-untyped-def]
    queue, _ = queue_factory(lock_duration_s=5)
    queue.send([_msg(1)])
    got = queue.receive(max_wait_s=WAIT_S)
    assert got is not None
    time.sleep(1.0)
    renewed = queue.renew_lock(got)
    assert renewed > got.locked_until


def test_keep_locked_holds_a_job_past_several_lock_durations(queue_factory) -> None:  # type: ignore[no-untyped-def]
    queue, _ = queue_factory(lock_duration_s=5)
    queue.send([_msg(1)])
    got = queue.receive(max_wait_s=WAIT_S)
    assert got is not None
    lost: list[BaseException] = []
    keeper = queue.keep_locked(got, on_lost=lost.append)
    try:
        # Nobody else can take it during 2.5 lock durations, because the keeper renews it.
        assert queue.receive(max_wait_s=12.5) is None
    finally:
        keeper.stop()
    assert lost == [] and keeper.lost is None
    queue.complete(got)


def test_dead_letter_keeps_reason_and_description(queue_factory) -> None:  # type: ignore[no-untyped-def]
    queue, depth = queue_factory()
    queue.send([_msg("bad")])
    got = queue.receive(max_wait_s=WAIT_S)
    assert got is not None
    queue.dead_letter(got, reason="SchemaViolation", description="inputs: field required")
    assert queue.receive(max_wait_s=0.5) is None
    dead = queue.peek_dead_letters(max_count=10)
    assert [(d.message_id, d.reason, d.description) for d in dead] == [
        ("job-bad", "SchemaViolation", "inputs: field required")
    ]
    assert _wait_for_depth(depth, lambda s: s.dead_lettered == 1).dead_lettered == 1


def test_max_delivery_count_moves_message_to_dead_letter(queue_factory) -> None:  # type: ignore[no-untyped-def]
    queue, _ = queue_factory(max_delivery_count=2)
    queue.send([_msg(1)])
    for expected in (1, 2):
        got = queue.receive(max_wait_s=WAIT_S)
        assert got is not None and got.delivery_count == expected
        queue.abandon(got)
    assert queue.receive(max_wait_s=1.0) is None
    dead = queue.peek_dead_letters(max_count=10)
    assert [(d.message_id, d.reason) for d in dead] == [("job-1", "MaxDeliveryCountExceeded")]


def _same_job(got: base.ReceivedMessage | None, first: base.ReceivedMessage) -> base.ReceivedMessage:
    """A released job comes back with its body; its id may be the derived one of a copy."""
    assert got is not None and got.body == first.body
    assert got.message_id in (first.message_id, base.requeued_message_id(first.message_id, first.sequence_number))
    return got


def test_release_later_hides_the_job_for_the_delay_and_spends_no_delivery(queue_factory) -> None:  # type: ignore[no-untyped-def]
    queue, depth = queue_factory(max_delivery_count=2)
    queue.send([_msg(1)])
    got = queue.receive(max_wait_s=WAIT_S)
    assert got is not None and (got.delivery_count, got.released) == (1, 0)
    released_at = time.monotonic()
    queue.release_later(got, delay_s=3.0)
    assert queue.receive(max_wait_s=1.5) is None  # hidden for the delay
    sample = _wait_for_depth(depth, lambda s: s.scheduled == 1)
    assert (sample.active, sample.scheduled) == (0, 1)
    got = _same_job(queue.receive(max_wait_s=15), got)
    assert time.monotonic() - released_at >= 2.5
    assert (got.delivery_count, got.released) == (1, 1)
    for released in (2, 3):  # more releases than the queue's max delivery count: none is dead-lettered
        queue.release_later(got, delay_s=0.0)
        got = _same_job(queue.receive(max_wait_s=15), got)
        assert (got.delivery_count, got.released) == (1, released)
    assert (got.delivery_count, got.released) == (1, 3)
    assert queue.peek_dead_letters(max_count=10) == []
    queue.complete(got)
    assert queue.receive(max_wait_s=1.0) is None


def test_released_job_keeps_its_own_deliveries_and_dead_letters_after_them(queue_factory) -> None:  # type: ignore[no-untyped-def]
    queue, _ = queue_factory(max_delivery_count=2)
    queue.send([_msg(1)])
    first = queue.receive(max_wait_s=WAIT_S)
    assert first is not None
    queue.abandon(first)  # a failure of the job's own: counts
    second = queue.receive(max_wait_s=WAIT_S)
    assert second is not None and second.delivery_count == 2
    queue.release_later(second, delay_s=0.0)  # the environment's: does not
    third = _same_job(queue.receive(max_wait_s=WAIT_S), first)
    assert (third.delivery_count, third.released) == (2, 1)
    queue.abandon(third)
    assert queue.receive(max_wait_s=1.5) is None
    dead = queue.peek_dead_letters(max_count=10)
    assert [d.reason for d in dead] == ["MaxDeliveryCountExceeded"]
    assert dead[0].body == first.body


def test_release_with_a_lost_lock_raises(queue_factory) -> None:  # type: ignore[no-untyped-def]
    queue, _ = queue_factory()
    queue.send([_msg(1)])
    got = queue.receive(max_wait_s=WAIT_S)
    assert got is not None
    queue.complete(got)
    with pytest.raises(errors.LockLostError):
        queue.release_later(got, delay_s=1.0)


def test_depth_counts_active_and_in_flight(queue_factory) -> None:  # type: ignore[no-untyped-def]
    queue, depth = queue_factory()
    queue.send([_msg(i) for i in range(4)])
    got = queue.receive(max_wait_s=WAIT_S)
    assert got is not None
    sample = _wait_for_depth(depth, lambda s: s.active + (s.in_flight or 0) == 4 and s.in_flight != 0)
    assert sample.active + (sample.in_flight or 0) == 4
    if sample.in_flight is not None:
        assert sample.in_flight == 1
    assert sample.sampled_at <= time.time()
    queue.complete(got)


def test_concurrent_receivers_never_share_a_message(queue_factory) -> None:  # type: ignore[no-untyped-def]
    queue, _ = queue_factory()
    queue.send([_msg(i) for i in range(20)])
    seen: list[str] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def drain() -> None:
        try:
            while (got := queue.receive(max_wait_s=1.0)) is not None:
                with lock:
                    seen.append(got.message_id)
                queue.complete(got)
        except Exception as exc:  # reported below, with the message ids seen so far
            failures.append(exc)

    threads = [threading.Thread(target=drain) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert sorted(seen) == sorted(f"job-{i}" for i in range(20))


def _dead_letter_all(queue: base.JobQueue, count: int) -> dict[str, int]:
    """Send ``count`` jobs and dead-letter each at once (well inside any duplicate-detection window, so a copy
    that reused the old id would be dropped); returns message id → sequence number."""
    queue.send([_msg(i) for i in range(count)])
    sequence_numbers: dict[str, int] = {}
    for _ in range(count):
        got = queue.receive(max_wait_s=WAIT_S)
        assert got is not None
        queue.dead_letter(got, reason="SchemaViolation", description="fixed since")
        sequence_numbers[got.message_id] = got.sequence_number
    return sequence_numbers


def _receive_all(queue: base.JobQueue) -> list[base.ReceivedMessage]:
    received = []
    while (got := queue.receive(max_wait_s=1.0)) is not None:
        received.append(got)
        queue.complete(got)
    return received


def test_requeue_moves_dead_letters_back_with_their_bodies(queue_factory) -> None:  # type: ignore[no-untyped-def]
    queue, depth = queue_factory()
    sequence_numbers = _dead_letter_all(queue, 5)

    first = queue.requeue_dead_letters(max_count=3, concurrency=2)
    assert len(first) == 3  # max_count holds across receivers
    assert len(queue.peek_dead_letters(max_count=10)) == 2
    rest = queue.requeue_dead_letters(max_count=10, concurrency=4)
    moved = first + rest
    assert sorted(m.message_id for m in moved) == sorted(sequence_numbers)
    assert {m.new_message_id for m in moved} == {
        base.requeued_message_id(mid, seq) for mid, seq in sequence_numbers.items()
    }
    assert queue.peek_dead_letters(max_count=10) == []

    received = _receive_all(queue)
    by_new_id = {m.new_message_id: m.message_id for m in moved}
    assert sorted(r.message_id for r in received) == sorted(by_new_id)
    assert all(r.body == _msg(by_new_id[r.message_id].removeprefix("job-")).body for r in received)
    assert {r.delivery_count for r in received} == {1}  # a fresh start
    assert _wait_for_depth(depth, lambda s: s.dead_lettered == 0 and s.active == 0).dead_lettered == 0
    assert queue.requeue_dead_letters(max_count=10, concurrency=2) == []


def test_a_requeued_job_dead_lettered_again_can_be_requeued_again(queue_factory) -> None:  # type: ignore[no-untyped-def]
    queue, _ = queue_factory()
    _dead_letter_all(queue, 1)
    (once,) = queue.requeue_dead_letters(max_count=1)
    got = queue.receive(max_wait_s=WAIT_S)
    assert got is not None and got.message_id == once.new_message_id
    queue.dead_letter(got, reason="StillBroken", description="try again")
    (twice,) = queue.requeue_dead_letters(max_count=1)
    assert twice.message_id == once.new_message_id
    assert twice.new_message_id == base.requeued_message_id("job-0", got.sequence_number)  # one mark, not two
    again = queue.receive(max_wait_s=WAIT_S)
    assert again is not None and again.message_id == twice.new_message_id and again.body == _msg(0).body
    queue.complete(again)


def test_every_dead_letter_is_peeked_in_order_page_after_page(queue_factory) -> None:  # type: ignore[no-untyped-def]
    """260 dead letters, more than one Service Bus peek returns (250 at most) and three pages of
    ``base.DEAD_LETTER_PAGE``: every one comes back, oldest first, and a cap returns exactly that many (``status``
    asks for one more than its cap to tell whether it was capped)."""
    queue, _ = queue_factory()
    sequence_numbers = _dead_letter_all(queue, 260)
    in_order = sorted(sequence_numbers, key=sequence_numbers.__getitem__)
    dead = queue.peek_dead_letters(max_count=1000)
    assert [d.message_id for d in dead] == in_order
    assert [d.sequence_number for d in dead] == sorted(sequence_numbers.values())
    assert {d.reason for d in dead} == {"SchemaViolation"}
    assert [d.message_id for d in queue.peek_dead_letters(max_count=120)] == in_order[:120]
    assert len(queue.peek_dead_letters(max_count=261)) == 260, "no more than there are: not capped"
    assert len(queue.peek_dead_letters(max_count=260)) == 260


def test_close_twice_is_harmless(queue_factory) -> None:  # type: ignore[no-untyped-def]
    """Commands close the queue and its depth source on every exit path, and both may be one object."""
    queue, depth = queue_factory()
    queue.send([_msg("closing")])
    depth.read_depth()
    queue.close()
    depth.close()
    queue.close()
    depth.close()

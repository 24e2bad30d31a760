"""The eviction policy as a table (pure: notices, the time and the held job in, a decision out), and the reading
of IMDS scheduled-event documents."""

from __future__ import annotations

import math

import pytest

from scalebus.backends import base
from scalebus.backends.azure import scheduled_events
from scalebus.worker import eviction

NOW = 1_700_000_000.0
K = base.NoticeKind


def notice(kind: K, in_s: float | None = 30.0, *, event_id: str = "e1", **extra: bool) -> base.Notice:
    return base.Notice(event_id, kind, None if in_s is None else NOW + in_s, **extra)


def staging(job_id: str = "j1") -> eviction.RunningJob:
    return eviction.RunningJob(job_id)  # not running the analytics yet: no bound on its end


def running(ends_in_s: float) -> eviction.RunningJob:
    return eviction.RunningJob("j1", NOW + ends_in_s)


@pytest.mark.parametrize(
    ("notices", "job", "acknowledged", "evicted_by", "release", "ack"),
    [
        pytest.param([], None, (), None, False, (), id="nothing-scheduled"),
        pytest.param([], running(5), (), None, False, (), id="nothing-scheduled-busy"),
        pytest.param([notice(K.REBOOT, 900)], running(5), (), None, False, (), id="reboot-only-logged"),
        pytest.param([notice(K.FREEZE, 5)], staging(), (), None, False, (), id="freeze-only-logged"),
        pytest.param([notice(K.REDEPLOY, 600)], None, (), None, False, (), id="redeploy-only-logged"),
        pytest.param([notice(K.PREEMPT)], None, (), "e1", False, ("e1",), id="preempt-idle-acks-at-once"),
        pytest.param([notice(K.PREEMPT)], staging(), (), "e1", True, (), id="preempt-while-staging-releases"),
        pytest.param([notice(K.PREEMPT)], running(3600), (), "e1", True, (), id="preempt-long-job-releases"),
        pytest.param([notice(K.PREEMPT)], running(25), (), "e1", True, (), id="preempt-no-time-to-publish"),
        pytest.param([notice(K.PREEMPT)], running(10), (), "e1", False, (), id="preempt-job-ends-in-time"),
        pytest.param([notice(K.TERMINATE, 900)], running(60), (), "e1", False, (), id="terminate-job-finishes"),
        pytest.param([notice(K.TERMINATE, 900)], running(1800), (), "e1", True, (), id="terminate-long-job"),
        pytest.param(
            [notice(K.PREEMPT, None, started=True)], running(1), (), "e1", True, (), id="started-releases-anything"
        ),
        pytest.param(
            [notice(K.PREEMPT, None, started=True)], None, (), "e1", False, (), id="started-needs-no-ack"
        ),
        pytest.param([notice(K.PREEMPT, None)], running(1), (), "e1", True, (), id="no-time-given-means-now"),
        pytest.param(
            [notice(K.PREEMPT, others_affected=True)], None, (), "e1", False, (), id="shared-event-never-acked"
        ),
        pytest.param([notice(K.PREEMPT)], None, ("e1",), "e1", False, (), id="acked-once-only"),
        pytest.param(
            [notice(K.TERMINATE, 600, event_id="t"), notice(K.PREEMPT, 30, event_id="p"), notice(K.REBOOT, 5)],
            running(100),
            (),
            "p",
            True,
            (),
            id="soonest-losing-event-rules",
        ),
        pytest.param(
            [notice(K.TERMINATE, 600, event_id="t"), notice(K.PREEMPT, 30, event_id="p")],
            None,
            (),
            "p",
            False,
            ("t", "p"),
            id="idle-acks-every-losing-event",
        ),
    ],
)
def test_decide(
    notices: list[base.Notice],
    job: eviction.RunningJob | None,
    acknowledged: tuple[str, ...],
    evicted_by: str | None,
    release: bool,
    ack: tuple[str, ...],
) -> None:
    decision = eviction.decide(notices, now=NOW, job=job, acknowledge=True, acknowledged=frozenset(acknowledged))
    assert (decision.eviction.event_id if decision.eviction else None) == evicted_by
    assert decision.release_job is release
    assert decision.acknowledge == ack


def test_acknowledging_can_be_turned_off() -> None:
    decision = eviction.decide([notice(K.PREEMPT)], now=NOW, job=None, acknowledge=False)
    assert decision.eviction is not None and decision.acknowledge == ()


def test_release_margin_is_the_settle_margin() -> None:
    """A job whose analytics ends exactly SETTLE_MARGIN_S before the eviction still finishes."""
    job = running(30 - eviction.SETTLE_MARGIN_S)
    assert not eviction.decide([notice(K.PREEMPT, 30)], now=NOW, job=job, acknowledge=True).release_job
    assert math.isinf(staging().ends_by)


# --------------------------------------------------------------------------------------------- IMDS documents


def event(**fields: object) -> dict[str, object]:
    return {
        "EventId": "E1",
        "EventType": "Preempt",
        "ResourceType": "VirtualMachine",
        "Resources": ["pool_7"],
        "EventStatus": "Scheduled",
        "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT",
        "Description": "",
        "EventSource": "Platform",
        "DurationInSeconds": -1,
    } | fields


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param([], [], id="empty"),
        pytest.param(
            [event()], [base.Notice("E1", K.PREEMPT, 1474309787.0)], id="preempt-for-me-with-its-not-before"
        ),
        pytest.param([event(Resources=["POOL_7"])], [base.Notice("E1", K.PREEMPT, 1474309787.0)], id="any-case"),
        pytest.param([event(Resources=["pool_8"])], [], id="another-vm"),
        pytest.param(
            [event(Resources=["pool_8", "pool_7"], EventType="Freeze")],
            [base.Notice("E1", K.FREEZE, 1474309787.0, others_affected=True)],
            id="shared",
        ),
        pytest.param(
            [event(EventStatus="Started", NotBefore="")],
            [base.Notice("E1", K.PREEMPT, None, started=True)],
            id="started",
        ),
        pytest.param([event(NotBefore="soon")], [base.Notice("E1", K.PREEMPT, None)], id="unreadable-time-is-now"),
        pytest.param([event(EventType="Hibernate")], [], id="unknown-type-ignored"),
        pytest.param([event(ResourceType="Disk")], [], id="not-a-vm"),
        pytest.param(["junk", event(Resources=None)], [], id="malformed-entries-skipped"),
    ],
)
def test_notices_for(events: list[object], expected: list[base.Notice]) -> None:
    assert scheduled_events.notices_for(events, vm_name="pool_7") == expected

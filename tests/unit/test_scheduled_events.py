"""ImdsNoticeSource against the IMDS fake over a real socket (what the contract suite does not pin down)."""

from __future__ import annotations

import socket
import time

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import scheduled_events
from tests.fakes.imds import ImdsFake


def test_incarnation_follows_the_document(imds_fake: ImdsFake) -> None:
    source = scheduled_events.ImdsNoticeSource(imds_fake.endpoint, vm_name="pool_1")
    assert source.pending() == []
    first = source.incarnation
    event_id = imds_fake.post_event("Preempt", ["pool_1"])
    (notice,) = source.pending()
    assert notice.event_id == event_id
    assert first is not None and source.incarnation == first + 1


def test_acknowledgement_is_a_start_request_for_that_event(imds_fake: ImdsFake) -> None:
    mine = imds_fake.post_event("Preempt", ["pool_1"])
    other = imds_fake.post_event("Preempt", ["pool_2"])
    source = scheduled_events.ImdsNoticeSource(imds_fake.endpoint, vm_name="pool_1")
    posts = imds_fake.count("POST /metadata/scheduledevents")

    source.acknowledge(mine)

    assert imds_fake.acknowledged == [mine]
    assert imds_fake.count("POST /metadata/scheduledevents") == posts + 1
    statuses = {e["EventId"]: (e["EventStatus"], e["NotBefore"]) for e in imds_fake.scheduled_events}
    assert statuses[mine] == ("Started", "")
    assert statuses[other][0] == "Scheduled"


def test_unknown_event_is_a_permanent_notice_error(imds_fake: ImdsFake) -> None:
    source = scheduled_events.ImdsNoticeSource(imds_fake.endpoint, vm_name="pool_1")
    with pytest.raises(errors.NoticeError, match="HTTP 400") as caught:
        source.acknowledge("no-such-event")
    assert not caught.value.transient


def test_no_imds_is_transient() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = scheduled_events.ImdsNoticeSource(f"http://127.0.0.1:{port}", vm_name="pool_1", timeout_s=0.5)
    with pytest.raises(errors.TransientNoticeError, match="unreachable"):
        source.pending()


def test_a_vm_name_is_required() -> None:
    with pytest.raises(errors.NoticeError, match="name"):
        scheduled_events.ImdsNoticeSource("http://127.0.0.1:1", vm_name="")


def test_kinds_are_the_documented_event_types() -> None:
    assert {k.value for k in base.NoticeKind} == {"Preempt", "Terminate", "Reboot", "Redeploy", "Freeze"}


def test_a_slow_first_call_is_abandoned_and_asked_again(imds_fake: ImdsFake) -> None:
    """IMDS enables Scheduled Events on the first request, which can take up to two minutes to answer: the call
    gives up at its timeout and asks again instead of holding the eviction watch for that long."""
    imds_fake.post_event("Preempt", ["pool_1"])
    imds_fake.first_events_delay_s = 3.0
    source = scheduled_events.ImdsNoticeSource(imds_fake.endpoint, vm_name="pool_1", timeout_s=0.5)
    asked = imds_fake.count("/metadata/scheduledevents")

    started = time.monotonic()
    (notice,) = source.pending()

    assert time.monotonic() - started < 2.5, "waited for the slow first answer"
    assert notice.kind is base.NoticeKind.PREEMPT
    assert imds_fake.count("/metadata/scheduledevents") - asked == 2


def test_a_410_is_transient(imds_fake: ImdsFake) -> None:
    imds_fake.fail_next("/metadata/scheduledevents", 410, times=5)
    source = scheduled_events.ImdsNoticeSource(imds_fake.endpoint, vm_name="pool_1")

    with pytest.raises(errors.TransientNoticeError, match="410"):
        source.pending()

"""The notice port: one suite over the local pool's notice board and IMDS scheduled events (the fake, over HTTP).

What the worker relies on: it sees the events that name its instance and only those, with their kind and time;
it can tell an event shared with other instances; acknowledging starts the event and is recorded; an event that
is gone cannot be acknowledged.
"""

from __future__ import annotations

import time

import pytest

from scalebus import errors
from scalebus.backends import base
from tests.contract.notice_platforms import *  # noqa: F403  (fixtures)
from tests.contract.notice_platforms import NoticePlatform

ME, OTHER = "pool_1", "pool_2"


def test_no_events_no_notices(notice_platform: NoticePlatform) -> None:
    assert notice_platform.source(ME).pending() == []


def test_only_events_naming_this_instance_are_seen(notice_platform: NoticePlatform) -> None:
    mine = notice_platform.post(base.NoticeKind.PREEMPT, [ME], not_before_s=30)
    notice_platform.post(base.NoticeKind.PREEMPT, [OTHER], not_before_s=30)
    before = time.time()

    (notice,) = notice_platform.source(ME).pending()

    assert (notice.event_id, notice.kind, notice.started, notice.others_affected) == (
        mine,
        base.NoticeKind.PREEMPT,
        False,
        False,
    )
    assert notice.not_before is not None
    assert before + 25 <= notice.not_before <= before + 32  # RFC 1123 on the wire: whole seconds


def test_an_event_shared_with_others_says_so(notice_platform: NoticePlatform) -> None:
    shared = notice_platform.post(base.NoticeKind.REBOOT, [OTHER, ME], not_before_s=900)
    (notice,) = notice_platform.source(ME).pending()
    assert (notice.event_id, notice.kind, notice.others_affected) == (shared, base.NoticeKind.REBOOT, True)


def test_every_kind_comes_through(notice_platform: NoticePlatform) -> None:
    for kind in base.NoticeKind:
        notice_platform.post(kind, [ME], not_before_s=600)
    assert sorted(n.kind for n in notice_platform.source(ME).pending()) == sorted(base.NoticeKind)


def test_acknowledging_starts_the_event_and_is_recorded(notice_platform: NoticePlatform) -> None:
    event_id = notice_platform.post(base.NoticeKind.PREEMPT, [ME], not_before_s=30)
    source = notice_platform.source(ME)

    source.acknowledge(event_id)
    source.acknowledge(event_id)  # twice is fine

    assert event_id in notice_platform.acknowledged()
    (notice,) = source.pending()
    assert notice.started and notice.not_before is None


def test_a_cleared_event_disappears_and_cannot_be_acknowledged(notice_platform: NoticePlatform) -> None:
    event_id = notice_platform.post(base.NoticeKind.TERMINATE, [ME], not_before_s=300)
    source = notice_platform.source(ME)
    assert [n.event_id for n in source.pending()] == [event_id]

    notice_platform.clear(event_id)

    assert source.pending() == []
    with pytest.raises(errors.NoticeError):
        source.acknowledge(event_id)


def test_close_twice_is_harmless(notice_platform: NoticePlatform) -> None:
    source = notice_platform.source(ME)
    assert source.pending() == []
    source.close()
    source.close()

"""Ports that count their own calls: the scale set the controller drives and the notices a worker watches.

Wrapping at the port keeps the controller's step and the worker's liveness code free of metrics: every call,
its duration and its failure are booked where they happen, on whichever thread makes them (the capacity write
runs on the step's write thread). The wrapped port behaves exactly as the inner one, errors included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from scalebus.backends import base

T = TypeVar("T")


class CallRecorder(Protocol):
    def scale_set_call(self, operation: str, *, seconds: float, error: BaseException | None) -> None: ...


class MeteredScaleSet:
    """A :class:`~scalebus.backends.base.ScaleSet` whose every call is timed and counted by operation."""

    def __init__(self, inner: base.ScaleSet, recorder: CallRecorder) -> None:
        self._inner = inner
        self._recorder = recorder

    def get_capacity(self) -> int:
        return self._timed("get_capacity", self._inner.get_capacity)

    def list_instances(self) -> list[base.Instance]:
        return self._timed("list_instances", self._inner.list_instances)

    def set_capacity(self, capacity: int) -> None:
        self._timed("set_capacity", lambda: self._inner.set_capacity(capacity))

    def delete_instances(self, instance_ids: Sequence[str]) -> None:
        self._timed("delete_instances", lambda: self._inner.delete_instances(instance_ids))

    def set_protection(self, instance_id: str, *, protected: bool) -> None:
        self._timed("set_protection", lambda: self._inner.set_protection(instance_id, protected=protected))

    def close(self) -> None:
        self._inner.close()

    def _timed(self, operation: str, call: Callable[[], T]) -> T:
        started = time.monotonic()
        try:
            result = call()
        except Exception as exc:
            self._recorder.scale_set_call(operation, seconds=time.monotonic() - started, error=exc)
            raise
        self._recorder.scale_set_call(operation, seconds=time.monotonic() - started, error=None)
        return result


class MeteredScaleSetWithViews(MeteredScaleSet):
    """The same, for a scale set that also reads instance views on request (``base.InstanceViews``): the
    controller asks for views only where the wrapped scale set offers them, so the wrapper must not hide them."""

    def __init__(self, inner: base.ScaleSet, recorder: CallRecorder) -> None:
        super().__init__(inner, recorder)
        assert isinstance(inner, base.InstanceViews)
        self._views: base.InstanceViews = inner

    def instance_states(self, instance_ids: Sequence[str]) -> dict[str, base.InstanceState]:
        return self._timed("instance_states", lambda: self._views.instance_states(instance_ids))


def meter_scale_set(inner: base.ScaleSet, recorder: CallRecorder) -> MeteredScaleSet:
    """``inner`` with its calls booked, offering exactly the optional capabilities ``inner`` offers."""
    if isinstance(inner, base.InstanceViews):
        return MeteredScaleSetWithViews(inner, recorder)
    return MeteredScaleSet(inner, recorder)


class NoticeRecorder(Protocol):
    def notice_seen(self, kind: str) -> None: ...


class CountedNotices:
    """A :class:`~scalebus.backends.base.NoticeSource` that books each notice once, by kind, as it first appears
    (a pending notice is returned by every poll until it starts)."""

    def __init__(self, inner: base.NoticeSource, recorder: NoticeRecorder) -> None:
        self._inner = inner
        self._recorder = recorder
        self._seen: set[str] = set()

    def pending(self) -> list[base.Notice]:
        notices = self._inner.pending()
        for notice in notices:
            if notice.event_id not in self._seen:
                self._seen.add(notice.event_id)
                self._recorder.notice_seen(str(notice.kind))
        return notices

    def acknowledge(self, event_id: str) -> None:
        self._inner.acknowledge(event_id)

    def close(self) -> None:
        self._inner.close()

"""Who plays the platform in the notice tests: the local pool's notice board, or the IMDS fake.

Each platform posts scheduled events for instances by name, lists what was acknowledged and opens the
``NoticeSource`` a worker on instance ``name`` would use.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from scalebus.backends import base
from scalebus.backends.azure import scheduled_events
from scalebus.backends.local import notices
from tests.fakes.imds import ImdsFake


class NoticePlatform(Protocol):
    def post(self, kind: base.NoticeKind, names: list[str], *, not_before_s: float = 30.0) -> str: ...

    def clear(self, event_id: str) -> None: ...

    def acknowledged(self) -> list[str]: ...

    def source(self, name: str) -> base.NoticeSource: ...


class LocalPlatform:
    def __init__(self, state_path: Path) -> None:
        self.state_path = state_path
        self.board = notices.LocalNoticeBoard(state_path)
        self._opened: list[base.NoticeSource] = []

    def post(self, kind: base.NoticeKind, names: list[str], *, not_before_s: float = 30.0) -> str:
        return self.board.post(names, kind, not_before=time.time() + not_before_s)

    def clear(self, event_id: str) -> None:
        self.board.clear(event_id)

    def acknowledged(self) -> list[str]:
        return self.board.acknowledged()

    def source(self, name: str) -> base.NoticeSource:
        source = self.board.source_for(name)
        self._opened.append(source)
        return source

    def close(self) -> None:
        for source in self._opened:
            source.close()
        self.board.close()


class ImdsPlatform:
    def __init__(self, fake: ImdsFake) -> None:
        self.fake = fake

    def post(self, kind: base.NoticeKind, names: list[str], *, not_before_s: float = 30.0) -> str:
        return self.fake.post_event(kind.value, names, not_before_s=not_before_s)

    def clear(self, event_id: str) -> None:
        self.fake.clear_event(event_id)

    def acknowledged(self) -> list[str]:
        return list(self.fake.acknowledged)

    def source(self, name: str) -> base.NoticeSource:
        return scheduled_events.ImdsNoticeSource(self.fake.endpoint, vm_name=name, timeout_s=2.0)


@pytest.fixture
def local_notice_platform(tmp_path: Path) -> Iterator[LocalPlatform]:
    platform = LocalPlatform(tmp_path / "pool.db")
    yield platform
    platform.close()


@pytest.fixture
def imds_notice_platform(imds_fake: ImdsFake) -> ImdsPlatform:
    return ImdsPlatform(imds_fake)


@pytest.fixture(params=["local", "imds"])
def notice_platform(request: pytest.FixtureRequest) -> NoticePlatform:
    platform: NoticePlatform = request.getfixturevalue(f"{request.param}_notice_platform")
    return platform

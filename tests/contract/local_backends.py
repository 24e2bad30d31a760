"""Factories for the embedded backends, in the shape tests/contract/conftest.py documents."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scalebus.backends import base
from scalebus.backends.local import folder, pool, sqlite_queue
from scalebus.backends.local import secrets as local_secrets

QueueFactory = Callable[..., tuple[base.JobQueue, base.QueueDepth]]
_names = itertools.count()

# A stand-in worker for scale-set contract tests: lives until told to stop, as an idle VM would.
SLEEPER = [
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, lambda *a: exit(0)); time.sleep(600)",
]


@pytest.fixture
def sqlite_queue_factory(tmp_path: Path) -> Iterator[QueueFactory]:
    opened: list[sqlite_queue.SqliteJobQueue] = []

    def factory(
        *, lock_duration_s: float = 5, max_delivery_count: int = 3
    ) -> tuple[base.JobQueue, base.QueueDepth]:
        queue = sqlite_queue.SqliteJobQueue(
            tmp_path / "queue.db",
            queue=f"q{next(_names)}",
            lock_duration_s=lock_duration_s,
            max_delivery_count=max_delivery_count,
        )
        opened.append(queue)
        return queue, queue

    yield factory
    for queue in opened:
        queue.close()


@pytest.fixture
def local_scale_set_factory(tmp_path: Path) -> Iterator[Callable[[], base.ScaleSet]]:
    opened: list[tuple[Path, pool.LocalScaleSet]] = []

    def factory() -> base.ScaleSet:
        state_path = tmp_path / f"pool{next(_names)}.db"
        scale_set = pool.LocalScaleSet(state_path, worker_argv=SLEEPER, worker_env={})
        opened.append((state_path, scale_set))
        return scale_set

    yield factory
    for state_path, scale_set in opened:
        # A second handle on the same pool stops its workers, even if the test closed its own handle already.
        reaper = pool.LocalScaleSet(state_path, worker_argv=SLEEPER, worker_env={})
        reaper.set_capacity(0)
        reaper.close()
        scale_set.close()  # waits a little for the workers it started


@pytest.fixture
def folder_store_factory(tmp_path: Path) -> Callable[[], tuple[base.ObjectStore, str]]:
    def factory() -> tuple[base.ObjectStore, str]:
        root = tmp_path / f"lake{next(_names)}"
        root.mkdir()
        return folder.FolderStore(), folder.uri_of(root) + "/"

    return factory


@pytest.fixture
def folder_secrets_factory(tmp_path: Path) -> Callable[[], tuple[base.SecretSource, Callable[[str, str], None]]]:
    """``factory() -> (SecretSource, put)``: an empty secrets folder; ``put`` writes a mode-600 file as an operator
    would (``echo "$VALUE" > name``, so with a trailing newline)."""

    def factory() -> tuple[base.SecretSource, Callable[[str, str], None]]:
        root = tmp_path / f"secrets{next(_names)}"
        root.mkdir(mode=0o700)

        def put(name: str, value: str) -> None:
            path = root / name
            path.touch(mode=0o600)
            path.write_text(value + "\n", encoding="utf-8")

        return local_secrets.FolderSecretSource.from_url(f"local://{root}"), put

    return factory

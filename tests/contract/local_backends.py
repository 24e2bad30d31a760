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
    opened: list[pool.LocalScaleSet] = []

    def factory() -> base.ScaleSet:
        scale_set = pool.LocalScaleSet(tmp_path / f"pool{next(_names)}.db", worker_argv=SLEEPER, worker_env={})
        opened.append(scale_set)
        return scale_set

    yield factory
    for scale_set in opened:
        scale_set.set_capacity(0)
        scale_set.close()


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

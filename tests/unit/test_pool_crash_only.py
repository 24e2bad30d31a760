"""The local pool is crash-only: a dead worker, a spawn that cannot start and a controller killed mid-spawn are
each reported at once and leave no ghost. Real processes; the only seam is the pool's spawn-pause fault hook."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.local import pool, sqlite_queue
from scalebus.controller import step
from scalebus.settings import ControllerSettings
from tests.contract.local_backends import SLEEPER


def _eventually(check: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def state_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pool.db"
    yield path
    reaper = pool.LocalScaleSet(path, worker_argv=SLEEPER, worker_env={})
    reaper.set_capacity(0)
    _eventually(lambda: reaper.list_instances() == [])
    reaper.close(wait_s=0)


def _not_executable(tmp_path: Path) -> list[str]:
    script = tmp_path / "worker.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    return [str(script)]


def test_a_spawn_that_cannot_start_raises_our_error_and_leaves_no_row(state_path: Path, tmp_path: Path) -> None:
    scale_set = pool.LocalScaleSet(state_path, worker_argv=_not_executable(tmp_path), worker_env={})
    try:
        with pytest.raises(errors.ScaleSetError, match="cannot start a worker"):
            scale_set.set_capacity(2)
        assert scale_set.list_instances() == []
        assert scale_set.get_capacity() == 0
    finally:
        scale_set.close(wait_s=0)


def test_the_controller_survives_a_spawn_that_cannot_start(state_path: Path, tmp_path: Path) -> None:
    queue = sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=5, max_delivery_count=2)
    queue.send([base.OutgoingMessage("j1", b"{}")])
    scale_set = pool.LocalScaleSet(state_path, worker_argv=_not_executable(tmp_path), worker_env={})
    controller_step = step.ControllerStep(
        depth=queue,
        scale_set=scale_set,
        heartbeats=scale_set.heartbeats(),
        settings=ControllerSettings(max_instances=2, poll_interval_s=0.01),
        clock=time.time,
        writes=step.InlineWriteRunner(),
    )
    try:
        for _ in range(3):
            controller_step.run_round()  # raises nothing: the failed write is booked
        assert controller_step.stats.failures >= 1 or controller_step.failure_streak >= 1
        assert scale_set.list_instances() == []
    finally:
        scale_set.close(wait_s=0)
        queue.close()


def test_a_dead_worker_is_failed_at_once_and_its_heartbeat_forgotten(state_path: Path) -> None:
    scale_set = pool.LocalScaleSet(state_path, worker_argv=SLEEPER, worker_env={})
    try:
        scale_set.set_capacity(1)
        ((instance_id, pid),) = [(i.instance_id, int(i.name.split()[-1])) for i in scale_set.list_instances()]
        beats = scale_set.heartbeats()
        beats.beat(base.Heartbeat(instance_id, base.WorkerState.BUSY, time.time(), job_id="j1"))
        os.kill(pid, signal.SIGKILL)
        assert _eventually(lambda: [i.state for i in scale_set.list_instances()] == [base.InstanceState.FAILED])
        assert beats.read_all() == [], "a dead worker's last beat must not keep it counted as busy"
        scale_set.delete_instances([instance_id])
        assert _eventually(lambda: scale_set.list_instances() == [])
    finally:
        scale_set.close(wait_s=0)


SPAWNER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from scalebus.backends.local import pool
    scale_set = pool.LocalScaleSet(Path(sys.argv[1]), worker_argv=sys.argv[2:], worker_env={})
    scale_set.set_capacity(1)
    """
)


def test_a_controller_killed_mid_spawn_leaves_no_ghost(state_path: Path) -> None:
    env = {**os.environ, pool.SPAWN_PAUSE_ENV: "60"}
    spawner = subprocess.Popen([sys.executable, "-c", SPAWNER, str(state_path), *SLEEPER], env=env)
    observer = pool.LocalScaleSet(state_path, worker_argv=SLEEPER, worker_env={})
    try:
        assert _eventually(lambda: state_path.exists() and len(observer.list_instances()) == 1)
        ((mid_spawn,),) = [[i.state for i in observer.list_instances()]]
        assert mid_spawn is base.InstanceState.STARTING  # its spawner is alive: being started
        spawner.kill()
        spawner.wait(timeout=10)
        (ghost,) = observer.list_instances()
        assert ghost.state is base.InstanceState.FAILED
        assert observer.get_capacity() == 1  # until it is deleted, as a failed VM counts
        observer.delete_instances([ghost.instance_id])
        assert observer.list_instances() == []
    finally:
        if spawner.poll() is None:
            spawner.kill()
            spawner.wait(timeout=10)
        observer.close(wait_s=0)

"""Self-destroy over the local pool: only this instance, guards refuse clearly, safe to run twice."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.local import pool
from scalebus.selfdestroy import routine
from tests.contract.local_backends import SLEEPER


@pytest.fixture
def scale_set(tmp_path: Path) -> pool.LocalScaleSet:
    s = pool.LocalScaleSet(tmp_path / "pool.db", worker_argv=SLEEPER, worker_env={})
    s.set_capacity(2)
    yield s
    s.set_capacity(0)
    s.close()


def _identity(scale_set: pool.LocalScaleSet, instance_id: str) -> pool.LocalIdentity:
    return pool.LocalIdentity({pool.INSTANCE_ID_ENV: instance_id, pool.SCALE_SET_ENV: scale_set.url})


def _destroy(scale_set: pool.LocalScaleSet, identity: base.InstanceIdentity, **kw: object) -> routine.Result:
    return routine.self_destroy(
        identity=identity, scale_set=scale_set, scale_set_id=scale_set.url, heartbeats=scale_set.heartbeats(), **kw
    )  # type: ignore[arg-type]


def test_deletes_only_itself_and_is_idempotent(scale_set: pool.LocalScaleSet) -> None:
    me, other = (i.instance_id for i in scale_set.list_instances())
    first = _destroy(scale_set, _identity(scale_set, me))
    assert first.outcome is routine.Outcome.DELETED
    states = {i.instance_id: i.state for i in scale_set.list_instances()}
    assert states.get(me, base.InstanceState.DELETING) is base.InstanceState.DELETING
    assert states[other] is not base.InstanceState.DELETING
    second = _destroy(scale_set, _identity(scale_set, me))
    assert second.outcome in (routine.Outcome.ALREADY_DELETING, routine.Outcome.ALREADY_GONE)


def test_dry_run_deletes_nothing(scale_set: pool.LocalScaleSet) -> None:
    me = scale_set.list_instances()[0].instance_id
    result = _destroy(scale_set, _identity(scale_set, me), dry_run=True)
    assert result.outcome is routine.Outcome.DRY_RUN
    assert scale_set.get_capacity() == 2


def test_refuses_outside_a_scale_set(scale_set: pool.LocalScaleSet) -> None:
    with pytest.raises(errors.SelfDestroyRefused, match="not running in a scale set"):
        _destroy(scale_set, pool.LocalIdentity({}))


def test_refuses_another_scale_set(scale_set: pool.LocalScaleSet) -> None:
    me = scale_set.list_instances()[0].instance_id
    foreign = pool.LocalIdentity({pool.INSTANCE_ID_ENV: me, pool.SCALE_SET_ENV: "local:///elsewhere.db"})
    with pytest.raises(errors.SelfDestroyRefused, match="not the configured scale set"):
        _destroy(scale_set, foreign)
    assert scale_set.get_capacity() == 2


def test_refuses_while_a_job_is_held(scale_set: pool.LocalScaleSet) -> None:
    me = scale_set.list_instances()[0].instance_id
    scale_set.heartbeats().beat(base.Heartbeat(me, base.WorkerState.BUSY, time.time(), "job-7"))
    with pytest.raises(errors.SelfDestroyRefused, match="job-7"):
        _destroy(scale_set, _identity(scale_set, me))
    assert scale_set.get_capacity() == 2


def test_unknown_instance_counts_as_gone(scale_set: pool.LocalScaleSet) -> None:
    result = _destroy(scale_set, _identity(scale_set, "local-999"))
    assert result.outcome is routine.Outcome.ALREADY_GONE
    assert scale_set.get_capacity() == 2


class FlakyScaleSet:
    """Our own seam: a scale set whose first deletes are throttled."""

    def __init__(self, inner: pool.LocalScaleSet, failures: int) -> None:
        self.inner, self.failures, self.calls = inner, failures, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def delete_instances(self, ids: list[str]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise errors.TransientScaleSetError("throttled", retry_after_s=0.01)
        self.inner.delete_instances(ids)


def test_retries_transient_failures_until_deadline(scale_set: pool.LocalScaleSet) -> None:
    me = scale_set.list_instances()[0].instance_id
    flaky = FlakyScaleSet(scale_set, failures=2)
    slept: list[float] = []
    result = routine.self_destroy(
        identity=_identity(scale_set, me),
        scale_set=flaky,
        scale_set_id=scale_set.url,  # type: ignore[arg-type]
        heartbeats=None,
        sleep=slept.append,
    )
    assert result.outcome is routine.Outcome.DELETED and result.attempts == 3
    assert slept == [0.01, 0.01]
    always = FlakyScaleSet(scale_set, failures=99)
    other = scale_set.list_instances()[-1].instance_id
    with pytest.raises(errors.TransientScaleSetError):
        routine.self_destroy(
            identity=_identity(scale_set, other),
            scale_set=always,
            scale_set_id=scale_set.url,  # type: ignore[arg-type]
            heartbeats=None,
            sleep=lambda _s: None,
            deadline_s=0.0,
        )

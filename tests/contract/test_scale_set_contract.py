"""The scale-set port's contract, asserted the same way on the local pool and VMSS."""

from __future__ import annotations

import time
from collections.abc import Callable

from scalebus.backends import base

Live = (base.InstanceState.STARTING, base.InstanceState.RUNNING)


def _eventually(check: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_starts_empty(scale_set_factory) -> None:  # type: ignore[no-untyped-def]
    scale_set = scale_set_factory()
    assert scale_set.get_capacity() == 0
    assert scale_set.list_instances() == []


def test_set_capacity_adds_instances(scale_set_factory) -> None:  # type: ignore[no-untyped-def]
    scale_set = scale_set_factory()
    scale_set.set_capacity(3)
    assert scale_set.get_capacity() == 3
    instances = scale_set.list_instances()
    assert len(instances) == 3
    assert len({i.instance_id for i in instances}) == 3
    assert all(i.state in Live for i in instances)
    assert all(i.created_at <= time.time() for i in instances)


def test_delete_named_instance_lowers_capacity(scale_set_factory) -> None:  # type: ignore[no-untyped-def]
    scale_set = scale_set_factory()
    scale_set.set_capacity(2)
    victim, survivor = (i.instance_id for i in scale_set.list_instances())
    scale_set.delete_instances([victim])
    assert scale_set.get_capacity() == 1
    assert _eventually(
        lambda: (
            [i.instance_id for i in scale_set.list_instances() if i.state is not base.InstanceState.DELETING]
            == [survivor]
        )
    )
    assert _eventually(lambda: victim not in {i.instance_id for i in scale_set.list_instances()})


def test_delete_is_idempotent(scale_set_factory) -> None:  # type: ignore[no-untyped-def]
    scale_set = scale_set_factory()
    scale_set.set_capacity(1)
    (only,) = (i.instance_id for i in scale_set.list_instances())
    scale_set.delete_instances([only])
    scale_set.delete_instances([only])  # already deleting / gone: no error
    assert _eventually(lambda: scale_set.list_instances() == [])
    scale_set.delete_instances([only])
    assert scale_set.get_capacity() == 0


def test_scale_out_keeps_existing_instances(scale_set_factory) -> None:  # type: ignore[no-untyped-def]
    scale_set = scale_set_factory()
    scale_set.set_capacity(1)
    before = {i.instance_id for i in scale_set.list_instances()}
    scale_set.set_capacity(3)
    after = {i.instance_id for i in scale_set.list_instances()}
    assert before < after and len(after) == 3


def test_close_twice_is_harmless(scale_set_factory) -> None:  # type: ignore[no-untyped-def]
    scale_set = scale_set_factory()
    assert scale_set.list_instances() == []
    scale_set.close()
    scale_set.close()

"""``Lease`` contract: the same assertions over the pool database's row lease and a blob lease (Azurite).

At most one holder at a time; a fencing token that grows with each new holder and stays with a renewal; a
released lease passes at once, one that runs out passes after its duration; the lost holder learns it on renewal.
Blob leases last 15 s at least, so the one test that waits a lease out takes ~35 s on Azurite.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.local import lease as local_lease

LeaseFactory = Callable[[], base.Lease]


@pytest.fixture
def sqlite_lease_factory(tmp_path: Path) -> Iterator[LeaseFactory]:
    """Every lease of one test on one file, as every controller of a pool opens the same one."""
    opened: list[base.Lease] = []

    def factory() -> base.Lease:
        opened.append(local_lease.SqliteLease.open(tmp_path / "pool.db", duration_s=1.0))
        return opened[-1]

    yield factory
    for lease in opened:
        lease.close()


@pytest.fixture
def blob_lease_factory(request: pytest.FixtureRequest) -> Iterator[LeaseFactory]:
    from scalebus.backends.azure import lease as blob_lease
    from tests.fakes.azurite_plugin import ACCOUNT

    azurite = request.getfixturevalue("azurite_env")
    uri = f"abfss://{azurite.new_container()}@{ACCOUNT}.dfs.core.windows.net/fleet/"
    opened: list[base.Lease] = []

    def factory() -> base.Lease:
        opened.append(blob_lease.open_lease_at(uri, azurite.storage_settings(), duration_s=15))
        return opened[-1]

    yield factory
    for lease in opened:
        lease.close()


@pytest.fixture(params=["sqlite", pytest.param("blob", marks=pytest.mark.azurite)])
def lease_factory(request: pytest.FixtureRequest) -> LeaseFactory:
    """``factory() -> Lease``: each call another client of the same, fresh lease."""
    factory: LeaseFactory = request.getfixturevalue(f"{request.param}_lease_factory")
    return factory


def test_one_holder_at_a_time(lease_factory: LeaseFactory) -> None:
    a, b = lease_factory(), lease_factory()
    assert a.holder() is None
    grant = a.acquire("ctl-a")
    assert grant is not None and grant.holder == "ctl-a" and grant.token >= 1
    assert b.acquire("ctl-b") is None
    assert a.acquire("ctl-a") is None, "held, by this holder too"
    held = b.holder()
    assert held is not None and (held.holder, held.token) == ("ctl-a", grant.token)


def test_release_passes_the_lease_at_once_with_a_higher_token(lease_factory: LeaseFactory) -> None:
    a, b = lease_factory(), lease_factory()
    first = a.acquire("ctl-a")
    assert first is not None
    a.release(first)
    assert a.holder() is None
    second = b.acquire("ctl-b")
    assert second is not None and second.token > first.token
    with pytest.raises(errors.LeaseLostError):
        a.renew(first)
    a.release(first)  # a lost lease is left alone
    held = a.holder()
    assert held is not None and (held.holder, held.token) == ("ctl-b", second.token)


def test_tokens_grow_with_each_new_holder(lease_factory: LeaseFactory) -> None:
    leases = [lease_factory() for _ in range(3)]
    tokens = []
    for n, lease in enumerate(leases * 2):
        grant = lease.acquire(f"ctl-{n}")
        assert grant is not None
        tokens.append(grant.token)
        assert lease.renew(grant).token == grant.token, "a renewal keeps the token"
        lease.release(grant)
    assert tokens == sorted(set(tokens)), tokens


def test_renewal_keeps_the_lease_and_one_not_renewed_runs_out(lease_factory: LeaseFactory) -> None:
    a, b = lease_factory(), lease_factory()
    duration = a.duration_s
    started = time.monotonic()
    grant = a.acquire("ctl-a")
    assert grant is not None
    _sleep_until(started + 0.6 * duration)
    renewed_at = time.monotonic()
    a.renew(grant)
    _sleep_until(started + 1.2 * duration)
    assert b.acquire("ctl-b") is None, "renewed: still held past its first duration"
    _sleep_until(renewed_at + duration + 1.5)
    taken = b.acquire("ctl-b")
    assert taken is not None and taken.token > grant.token, "not renewed again: it ran out"
    with pytest.raises(errors.LeaseLostError):
        a.renew(grant)


def test_close_twice_is_harmless(lease_factory: LeaseFactory) -> None:
    lease = lease_factory()
    assert lease.acquire("ctl-a") is not None
    lease.close()
    lease.close()


def _sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))

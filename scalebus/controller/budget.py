"""ARM's write budget shared by the pools of one controller: whose turn it is to write, and when nobody may.

Each pool's policy keeps its own per-scale-set budget (``controller.max_writes_per_minute``). Azure also counts
writes per subscription: Resource Manager's subscription limits (a token bucket per subscription and region,
https://learn.microsoft.com/azure/azure-resource-manager/management/request-limits-and-throttling) and the
Compute provider's own policies per subscription and region
(https://learn.microsoft.com/troubleshoot/azure/virtual-machines/troubleshooting-throttling-errors). Pools
whose scale sets are in one subscription therefore draw on one budget, kept here per *key* (the subscription, see
:func:`budget_key`; the region is not in a resource id, so pools in two regions of one subscription share one
budget: the cautious side).

The decision is pure (:func:`allowance`, :func:`settle`, :func:`throttled`: state in, state out, ``now`` passed
in). Fairness is a queue of the pools that wanted to write and were held back, in the order they were first
held back: a pool may spend what is left of the window only after one write is kept back for each pool ahead
of it in that queue. A pool that always wants to write is held back behind a quiet one as soon as both wait, so
two pools wanting writes take alternate turns and none waits behind more than one write of each other pool. A
429 (or a ``Retry-After``) seen by one pool closes the budget for every pool on the key until it has passed.
:class:`SharedBudget` holds the states for the loop and hands each pool its :class:`PoolGate`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

WINDOW_S = 60.0
"""The shared cap counts the writes of the last minute (``max_writes_per_minute_total``)."""
THROTTLE_BACKOFF_S = 60.0
"""How long every pool holds its writes after a 429 that came without a ``Retry-After`` (the adapter retried it
and the count rose): ARM's write buckets refill within a minute."""
WAIT_STALE_S = 2 * WINDOW_S
"""A pool that has not asked again for this long (its rounds fail and back off, up to a minute, or it stopped)
loses its place in the queue."""
LOCAL_KEY = "local"
"""The key of the embedded pools (no ARM): they share the cap among themselves."""


@dataclass(frozen=True, slots=True)
class BudgetState:
    """One key's shared budget: writes of the window, who waits for a turn, and a throttling hold."""

    writes: tuple[float, ...] = ()
    """Times of the writes made in the last :data:`WINDOW_S` by all pools of the key."""
    waiting: tuple[tuple[str, float], ...] = ()
    """Pools held back, with when each last asked, in the order they were first held back."""
    closed_until: float = 0.0
    """No pool writes before this (a 429 or a ``Retry-After``)."""


def available(state: BudgetState, *, now: float, limit: int) -> int | None:
    """Writes the key may still make now (``None``: no cap; 0 while throttled)."""
    if now < state.closed_until:
        return 0
    if limit <= 0:
        return None
    return max(0, limit - sum(1 for t in state.writes if now - t < WINDOW_S))


def allowance(state: BudgetState, pool: str, *, now: float, limit: int) -> int | None:
    """Writes ``pool`` may make now: what is left after one write for each pool waiting ahead of it (``None``:
    no cap and no hold)."""
    left = available(state, now=now, limit=limit)
    if left is None:
        return None
    waiting = [name for name, asked in state.waiting if now - asked < WAIT_STALE_S]
    ahead = waiting.index(pool) if pool in waiting else len(waiting)
    return max(0, left - ahead)


def settle(state: BudgetState, pool: str, *, now: float, spent: int, satisfied: bool) -> BudgetState:
    """Book a round of ``pool``: ``spent`` writes made, and whether it made every write it wanted (else it keeps,
    or takes, its place in the queue)."""
    writes = (*(t for t in state.writes if now - t < WINDOW_S), *([now] * spent))
    queue = [(name, asked) for name, asked in state.waiting if now - asked < WAIT_STALE_S]
    position = next((n for n, (name, _) in enumerate(queue) if name == pool), None)
    if satisfied:
        if position is not None:
            del queue[position]
    elif position is None:
        queue.append((pool, now))
    else:
        queue[position] = (pool, now)
    return replace(state, writes=writes, waiting=tuple(queue))


def throttled(state: BudgetState, *, now: float, retry_after_s: float | None) -> BudgetState:
    """ARM said to wait: no pool of the key writes for ``retry_after_s`` (:data:`THROTTLE_BACKOFF_S` unknown)."""
    wait = THROTTLE_BACKOFF_S if retry_after_s is None else max(0.0, retry_after_s)
    return replace(state, closed_until=max(state.closed_until, now + wait))


def budget_key(scale_set_url: str) -> str:
    """The budget a scale set draws on: its subscription (``/subscriptions/<id>/...``, case-insensitive), or
    :data:`LOCAL_KEY` for the embedded pool."""
    parts = scale_set_url.strip("/").split("/")
    if len(parts) >= 2 and parts[0].lower() == "subscriptions":
        return "subscription:" + parts[1].lower()
    return LOCAL_KEY


class SharedBudget:
    """The states of every key, for the pools of one controller (thread-safe: writes finish on their threads)."""

    def __init__(self, *, limit: int, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, BudgetState] = {}

    def gate(self, pool: str, *, key: str) -> PoolGate:
        return PoolGate(self, pool, key)

    def state(self, key: str) -> BudgetState:
        with self._lock:
            return self._states.get(key, BudgetState())

    def allowance(self, key: str, pool: str) -> int | None:
        with self._lock:
            state = self._states.get(key, BudgetState())
            return allowance(state, pool, now=self._clock(), limit=self._limit)

    def settle(self, key: str, pool: str, *, spent: int, satisfied: bool) -> None:
        with self._lock:
            state = self._states.get(key, BudgetState())
            self._states[key] = settle(state, pool, now=self._clock(), spent=spent, satisfied=satisfied)

    def throttled(self, key: str, *, retry_after_s: float | None) -> None:
        with self._lock:
            state = self._states.get(key, BudgetState())
            self._states[key] = throttled(state, now=self._clock(), retry_after_s=retry_after_s)


@dataclass(frozen=True, slots=True)
class PoolGate:
    """One pool's view of the shared budget: what the step asks before it writes."""

    budget: SharedBudget
    pool: str
    key: str

    def allowance(self) -> int | None:
        """Writes this pool may start now (``None``: as many as its own policy allows)."""
        return self.budget.allowance(self.key, self.pool)

    def settle(self, *, spent: int, satisfied: bool) -> None:
        self.budget.settle(self.key, self.pool, spent=spent, satisfied=satisfied)

    def throttled(self, *, retry_after_s: float | None) -> None:
        self.budget.throttled(self.key, retry_after_s=retry_after_s)

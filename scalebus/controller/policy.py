"""The scaling policy: one observation in, one decision out.

Pure by design (STYLE.md pattern 1): no I/O, no clock, no logging, no sleeping. ``now`` arrives in the
observation and everything remembered between rounds lives in the immutable :class:`PolicyState`, so the
controller loop and the simulator (``controller/simulate.py``) run exactly the same code.

What it decides:

* **capacity** — the scale set's new target, or ``None`` for no write. Demand is
  ``ceil((active + in_flight) / jobs_per_instance)`` within ``[min_instances, max_instances]``. Instances still
  starting count as supply (a VM takes 1–4 minutes to boot; counting them avoids provisioning twice), and the
  whole shortfall is requested in one write. Capacity is never lowered: VMSS would remove instances of its own
  choosing, busy ones included. Scale-in happens when idle workers delete themselves.
* **delete** — named broken instances: failed, never booted within ``boot_timeout_s``, or silent for
  ``heartbeat_timeout_s``. Never one whose latest heartbeat says it is busy within the heartbeat timeout.
* **idle_grace_s** — how long idle workers should keep waiting for work before deleting themselves. The
  ski-rental answer: keep a worker while the next job *it* will get is expected sooner than re-booting one would
  cost (``boot_estimate_s``), within ``[idle_grace_min_s, idle_grace_max_s]``. Only the arrivals the busy
  workers do not take as they free up need an idle worker, so a steady fleet retires its idle surplus at once.
  The controller loop publishes it to the workers through the heartbeat store (``HeartbeatStore.publish_hint``).

The controller loop applies ``delete`` first, then writes ``capacity`` (the target already accounts for the
deletions), and counts both against the ARM write budget (``max_writes_per_minute``).

Beyond the foundation (issue 6) the policy reads the *age* of the depth sample. An Azure Monitor sample is minutes
old and has no in-flight count: jobs that workers picked up after the sample was taken are no longer waiting,
so they are subtracted (the policy remembers when it first saw each job busy), and in-flight work is taken from
the busy heartbeats. Requests are stable on noisy input because capacity only rises, and only when the demand
exceeds supply by at least ``Tunables.min_step`` or has stayed above it for ``Tunables.confirm_s``. Waiting jobs
that busy workers will start within a boot are not booted for: each busy job's chance to end soon is read off the
learned durations given how long it has run.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, replace

from scalebus.backends import base
from scalebus.settings import ControllerSettings

WRITE_WINDOW_S = 60.0
"""The ARM budget window: ``max_writes_per_minute`` writes in any ``WRITE_WINDOW_S`` seconds."""


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One instance as the controller sees it: the scale set's view joined with the worker's latest heartbeat."""

    instance_id: str
    state: base.InstanceState
    """starting / running / deleting / failed, from the scale set."""
    created_at: float
    worker: base.WorkerState | None = None
    """From the worker's latest heartbeat; ``None`` when the worker was never heard from."""
    last_beat_at: float | None = None
    job_id: str | None = None
    protected: bool = False
    """Whether the scale set protects it from scale-in (``scale_set.protect_busy``)."""


@dataclass(frozen=True, slots=True)
class Observation:
    now: float
    depth: base.DepthSample
    """``active``, ``in_flight`` (``None`` when the source cannot tell), ``sampled_at`` (may be minutes old)."""
    capacity: int
    """The scale set's current target capacity."""
    instances: tuple[InstanceView, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    capacity: int | None
    """New target capacity to write (after ``delete`` is applied), or ``None``: no write this round."""
    delete: tuple[str, ...]
    """Specific broken instances to delete (never one holding a job)."""
    reason: str
    """One human sentence for the log: why."""
    idle_grace_s: float | None = None
    """How long an idle worker should wait for work before deleting itself; ``None``: its own setting."""
    demand: int = 0
    """Instances the work needs (before the min/max clamp); for logs, plots and tests."""
    deferred: bool = False
    """A write is wanted but held back (write budget, noise filter): decide again next round."""


@dataclass(frozen=True, slots=True)
class Tunables:
    """Internal constants of the policy. What a user tunes (boot estimate, idle grace bounds, prewarming,
    absorption) is in :class:`~scalebus.settings.ControllerSettings`. Defaults are what the benchmark runs."""

    confirm_s: float = 0.0
    """A shortfall smaller than ``min_step`` must last this long before it is requested (noise filter)."""
    min_step: int = 1
    """A shortfall at least this large is requested at once."""
    write_reserve: int = 1
    """Writes of the per-minute budget kept back for broken-instance deletions and for bigger steps later."""
    arrival_memory: int = 16
    """Recent job sightings kept to estimate the inter-arrival gap."""
    job_memory_s: float = 3600.0
    """How long a job id stays remembered (to tell jobs picked up after a stale depth sample)."""
    min_durations: int = 5
    """Job durations seen before ``ControllerSettings.absorb_factor`` applies."""
    prewarm_max_cv: float = 0.2
    """Arrivals count as periodic when the gaps' spread (MAD / median) is at most this."""


DEFAULT_TUNABLES = Tunables()


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What the policy remembers between rounds."""

    writes: tuple[float, ...] = ()
    """Times of the ARM writes (capacity and deletes) in the last ``WRITE_WINDOW_S`` seconds."""
    job_first_seen: tuple[tuple[str, float], ...] = ()
    """Job ids seen busy on some worker, with when first seen (bounded by ``Tunables.job_memory_s``)."""
    arrivals: tuple[float, ...] = ()
    """When new work was first noticed (a rising backlog or a new busy job), for the inter-arrival estimate."""
    busy_jobs: tuple[str, ...] = ()
    """Jobs busy in the previous round (a job that leaves this set has finished: its duration is learned)."""
    durations: tuple[float, ...] = ()
    """Recent job durations (first seen busy → gone), newest last."""
    last_active: int = 0
    shortfall_since: float | None = None
    """When demand first exceeded supply by less than ``min_step`` (the noise filter's clock)."""


def initial_state() -> PolicyState:
    return PolicyState()


def decide(
    obs: Observation,
    state: PolicyState,
    settings: ControllerSettings,
    *,
    tunables: Tunables = DEFAULT_TUNABLES,
) -> tuple[Decision, PolicyState]:
    """One round: how many instances, which broken ones to delete, and why."""
    now = obs.now
    writes = tuple(t for t in state.writes if now - t < WRITE_WINDOW_S)
    budget = settings.max_writes_per_minute - len(writes)

    broken = [view for view in obs.instances if _is_broken(view, now, settings)]
    retired = [view for view in obs.instances if _is_retired(view, now, settings)]
    # retired workers (idle past their grace, taking no work) are deleted in batches, never with the last
    # write of the budget: a scale-out may need it
    spare = budget - (tunables.write_reserve if not broken else 0)
    doomed = [*broken, *retired] if (broken and budget > 0) or (retired and spare > 0) else []
    delete = tuple(view.instance_id for view in doomed)
    if delete:
        writes = (*writes, now)
        budget -= 1

    job_first_seen, newly_busy = _remember_jobs(obs, state, tunables)
    busy_jobs, durations = _learn_durations(obs, state, dict(job_first_seen), settings, tunables)
    waiting = _waiting_now(obs, job_first_seen)
    busy = _busy_count(obs, settings)
    in_flight = obs.depth.in_flight if obs.depth.in_flight is not None else busy
    absorbed = _absorbed(obs, dict(job_first_seen), durations, settings, tunables)
    demand = math.ceil((max(0, waiting - absorbed) + in_flight) / settings.jobs_per_instance)

    arrivals = _remember_arrivals(state, now, obs.depth.active, newly_busy, tunables)
    grace = _idle_grace(arrivals, busy, durations, settings, tunables)
    forecast = _forecast(arrivals, now, settings, tunables)
    if forecast is not None:  # the next periodic job is due within a boot: have a worker ready and waiting
        demand = max(demand, 1)
        grace = min(max(grace, forecast), settings.idle_grace_max_s)
    desired = min(max(demand, settings.min_instances), settings.max_instances)

    supply, listed = _supply(obs, {view.instance_id for view in broken}, settings)
    base_capacity = max(obs.capacity, listed) - len(delete)
    shortfall = desired - supply

    def finish(
        capacity: int | None, reason: str, shortfall_since: float | None, *, deferred: bool = False
    ) -> tuple[Decision, PolicyState]:
        new_writes = (*writes, now) if capacity is not None else writes
        decision = Decision(
            capacity=capacity,
            delete=delete,
            reason=_with_deletes(reason, broken, retired, delete),
            idle_grace_s=grace,
            demand=demand,
            deferred=deferred or (bool(broken or retired) and not delete),
        )
        new_state = replace(
            state,
            writes=new_writes,
            job_first_seen=job_first_seen,
            busy_jobs=busy_jobs,
            durations=durations,
            arrivals=arrivals,
            last_active=obs.depth.active,
            shortfall_since=shortfall_since,
        )
        return decision, new_state

    work = f"{waiting} waiting + {in_flight} in flight"
    if obs.depth.in_flight is None:
        work += " (in flight from heartbeats)"
    if absorbed and waiting:
        work += f" ({min(absorbed, waiting)} soon taken by busy workers)"
    if forecast is not None:
        work += " (a periodic job is due)"
    if shortfall <= 0:
        return finish(None, f"{work} need {desired}, {supply} already provisioned or starting", None)

    target = min(base_capacity + shortfall, settings.max_instances)
    if target <= base_capacity:
        return finish(None, f"{work} need {desired}, but the scale set is at max_instances", None)

    since = state.shortfall_since if state.shortfall_since is not None else now
    if shortfall < tunables.min_step and now - since < tunables.confirm_s:
        return finish(
            None, f"{work} need {desired} of {supply}: waiting to confirm a small rise", since, deferred=True
        )

    reserve = tunables.write_reserve if shortfall < tunables.min_step else 0
    if budget - reserve <= 0:
        return finish(
            None,
            f"{work} need {desired} of {supply}, but the write budget of "
            f"{settings.max_writes_per_minute}/min is spent: the next write takes the whole step",
            since,
            deferred=True,
        )
    return finish(
        target, f"{work} need {desired}, {supply} provisioned: scale out by {shortfall} to {target}", None
    )


def _supply(obs: Observation, broken_ids: set[str], settings: ControllerSettings) -> tuple[int, int]:
    """Instances that serve or will serve work (starting ones included), and instances listed at all.

    Capacity already written but not yet listed counts as supply too: the scale set is creating it.
    """
    serving = sum(
        1
        for view in obs.instances
        if view.instance_id not in broken_ids
        and not _is_retired(view, obs.now, settings)
        and view.state is not base.InstanceState.DELETING
        and (
            view.state in (base.InstanceState.STARTING, base.InstanceState.RUNNING)
            or _is_busy(view, obs.now, settings)
        )
    )
    listed = sum(1 for view in obs.instances if view.state is not base.InstanceState.DELETING)
    return serving + max(0, obs.capacity - listed), listed


def _is_broken(view: InstanceView, now: float, settings: ControllerSettings) -> bool:
    if view.state is base.InstanceState.DELETING:
        return False
    heard_recently = view.last_beat_at is not None and now - view.last_beat_at < settings.heartbeat_timeout_s
    if heard_recently and view.worker is base.WorkerState.BUSY:
        return False  # holds a job: never ours to kill, whatever the scale set says
    if view.state is base.InstanceState.FAILED:
        return True
    if view.last_beat_at is None:
        # never heard from: starting or running, it had boot_timeout_s to become a worker
        return now - view.created_at > settings.boot_timeout_s
    if view.state is base.InstanceState.STARTING:
        return now - view.created_at > settings.boot_timeout_s and not heard_recently
    return not heard_recently


def _is_retired(view: InstanceView, now: float, settings: ControllerSettings) -> bool:
    """A worker that stopped taking work and holds none: safe to delete, one batch for many."""
    return (
        view.state is base.InstanceState.RUNNING
        and view.worker is base.WorkerState.DRAINING
        and view.job_id is None
        and view.last_beat_at is not None
        and now - view.last_beat_at < settings.heartbeat_timeout_s
    )


def _is_busy(view: InstanceView, now: float, settings: ControllerSettings) -> bool:
    return (
        view.worker is base.WorkerState.BUSY
        and view.last_beat_at is not None
        and now - view.last_beat_at < settings.heartbeat_timeout_s
    )


def _busy_count(obs: Observation, settings: ControllerSettings) -> int:
    return sum(1 for view in obs.instances if _is_busy(view, obs.now, settings))


def _remember_jobs(
    obs: Observation, state: PolicyState, tunables: Tunables
) -> tuple[tuple[tuple[str, float], ...], int]:
    """Add the jobs busy now to the jobs seen; returns the new memory and how many jobs are new this round."""
    seen = dict(state.job_first_seen)
    new = 0
    for view in obs.instances:
        if view.job_id is not None and view.worker is base.WorkerState.BUSY and view.job_id not in seen:
            seen[view.job_id] = obs.now
            new += 1
    kept = tuple((job, at) for job, at in seen.items() if obs.now - at <= tunables.job_memory_s)
    return kept, new


def _learn_durations(
    obs: Observation,
    state: PolicyState,
    first_seen: dict[str, float],
    settings: ControllerSettings,
    tunables: Tunables,
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Jobs busy last round and not now have finished: learn how long they took."""
    busy_now = tuple(
        view.job_id for view in obs.instances if view.job_id is not None and _is_busy(view, obs.now, settings)
    )
    current = set(busy_now)
    ended = [obs.now - first_seen[job] for job in state.busy_jobs if job not in current and job in first_seen]
    durations = (*state.durations, *ended)[-2 * tunables.arrival_memory :]
    return busy_now, durations


def _absorbed(
    obs: Observation,
    first_seen: dict[str, float],
    durations: tuple[float, ...],
    settings: ControllerSettings,
    tunables: Tunables,
) -> int:
    """Waiting jobs the busy workers will start before a new VM could boot (not worth booting for).

    Per busy worker: the jobs it starts within the horizon (``boot_estimate_s``) are its current job's chance
    to end by then plus the jobs it runs after that (the time left over / the mean duration). The chance is
    read off the durations learned so far *given how long the job has run*: a job near its typical duration
    is about to free its worker, a fresh one is not. A job older than all but a few learned durations (or
    whose id is unknown) is taken as memoryless: horizon / mean duration.
    """
    if len(durations) < tunables.min_durations or settings.absorb_factor <= 0:
        return 0
    horizon = settings.boot_estimate_s
    ordered = sorted(durations)
    mean = max(sum(ordered) / len(ordered), 1.0)
    expected = 0.0
    for view in obs.instances:
        if not _is_busy(view, obs.now, settings):
            continue
        age = obs.now - first_seen[view.job_id] if view.job_id in first_seen else math.inf
        first = bisect.bisect_right(ordered, age)
        longer = ordered[first:]
        if len(longer) < tunables.min_durations:
            expected += horizon / mean
            continue
        left_over = [horizon - (d - age) for d in longer[: bisect.bisect_right(longer, age + horizon)]]
        expected += (len(left_over) + sum(left_over) / mean) / len(longer)
    return math.floor(settings.absorb_factor * expected)


def _forecast(
    arrivals: tuple[float, ...], now: float, settings: ControllerSettings, tunables: Tunables
) -> float | None:
    """For periodic arrivals due within a boot time: how long an idle worker should wait for the job."""
    if not settings.prewarm or len(arrivals) < 3:
        return None
    gaps = sorted(b - a for a, b in itertools.pairwise(arrivals))
    median = gaps[len(gaps) // 2]
    spread = sorted(abs(gap - median) for gap in gaps)[len(gaps) // 2]
    if median < 2.0 * settings.boot_estimate_s or spread > tunables.prewarm_max_cv * median:
        return None
    due = arrivals[-1] + median
    margin = max(60.0, 3.0 * spread)
    if due - settings.prewarm_lead_s <= now <= due + margin:
        return due + margin - now
    return None


def _waiting_now(obs: Observation, job_first_seen: tuple[tuple[str, float], ...]) -> int:
    """Messages waiting now, from a sample that may be old.

    Jobs first seen busy after the sample was taken were counted as waiting in it; they are running now.
    For a fresh sample (admin API, local queue) this subtracts nothing.
    """
    started_since = sum(1 for _, at in job_first_seen if at > obs.depth.sampled_at)
    return max(0, obs.depth.active - started_since)


def _remember_arrivals(
    state: PolicyState, now: float, active: int, newly_busy: int, tunables: Tunables
) -> tuple[float, ...]:
    """Note the rounds where new work showed up (a rising backlog or jobs we had not seen)."""
    # a job picked up straight from an empty queue never shows in a depth sample: its first busy heartbeat does
    arrived = active > state.last_active or (newly_busy > 0 and active == 0 and state.last_active == 0)
    arrivals = (*state.arrivals, now) if arrived else state.arrivals
    return arrivals[-tunables.arrival_memory :]


def _idle_grace(
    arrivals: tuple[float, ...],
    busy: int,
    durations: tuple[float, ...],
    settings: ControllerSettings,
    tunables: Tunables,
) -> float:
    """Ski rental: keep an idle worker while the next job *for it* is expected sooner than a reboot would cost.

    A new job goes to an idle worker only if no busy worker frees up first: busy workers free up at
    ``busy / mean duration`` per second, jobs arrive at ``1 / typical gap``, and an idle worker is needed at
    the rate the arrivals outpace the completions. When the completions keep up (a steady fleet), idle workers
    are surplus and retire at once; while work grows (or with nothing busy) the expected wait for a job is
    ``1 / (arrival rate - completion rate)``. Below the break-even (the boot estimate, doubled: a reboot costs
    VM time booting and the job's wait), waiting pays; otherwise retire quickly and pay the boot when work comes.
    """
    if len(arrivals) < 3:
        return settings.idle_grace_min_s
    gaps = sorted(b - a for a, b in itertools.pairwise(arrivals))
    typical = gaps[len(gaps) // 2]
    if len(durations) >= tunables.min_durations and busy > 0:
        freed_per_gap = busy * typical / max(sum(durations) / len(durations), 1.0)
        if freed_per_gap >= 1.0:
            return settings.idle_grace_min_s
        typical /= 1.0 - freed_per_gap
    if typical <= 2.0 * settings.boot_estimate_s:
        return min(max(1.5 * typical, settings.idle_grace_min_s), settings.idle_grace_max_s)
    return settings.idle_grace_min_s


def _with_deletes(
    reason: str, broken: list[InstanceView], retired: list[InstanceView], delete: tuple[str, ...]
) -> str:
    if delete:
        parts = []
        if broken:
            parts.append(f"broken {', '.join(view.instance_id for view in broken)}")
        if retired:
            parts.append(f"retired {', '.join(view.instance_id for view in retired)}")
        return f"{reason}; deleting {' and '.join(parts)}"
    if broken or retired:
        return f"{reason}; {len(broken) + len(retired)} instance(s) to delete wait for the write budget"
    return reason

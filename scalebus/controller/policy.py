"""The scaling policy: one observation in, one decision out.

Pure by design: no I/O, no clock, no logging, no sleeping. ``now`` arrives in the observation and everything
remembered between rounds lives in the immutable :class:`PolicyState`, so the controller (``controller/step.py``)
runs the same code in production and in the simulator (``simulator/``).

What it decides:

* **capacity** — the scale set's new target, or ``None`` for no write. Demand is
  ``ceil((active + in_flight) / jobs_per_instance)`` within ``[min_instances, max_instances]``. Instances still
  starting count as supply (a VM takes 1–4 minutes to boot; counting them avoids provisioning twice), and the
  whole shortfall is requested in one write. Capacity is never lowered: VMSS would remove instances of its own
  choosing, busy ones included. Scale-in happens when idle workers delete themselves.
* **delete** — named broken instances: failed, never booted within ``boot_timeout_s``, or silent for
  ``heartbeat_timeout_s``. Never one with a fresh heartbeat (whatever its provisioning state says), none for
  silence when the heartbeat store failed or many workers went quiet together, and a bounded number of silent
  ones per round: faults of the observer never turn into kills. New instances that keep failing the same way
  before their first heartbeat back off scale-out (and the reason says so).
* **idle_grace_s** — how long idle workers should keep waiting for work before deleting themselves. The
  ski-rental answer: keep a worker while the next job *it* will get is expected sooner than re-booting one would
  cost (``boot_estimate_s``), within ``[idle_grace_min_s, idle_grace_max_s]``. Only the arrivals the busy
  workers do not take as they free up need an idle worker, so a steady fleet retires its idle surplus at once.
  The controller step publishes it to the workers through the heartbeat store (``HeartbeatStore.publish_hint``).

The controller step applies ``delete`` first, then writes ``capacity`` (the target already accounts for the
deletions), and counts both against the ARM write budget (``max_writes_per_minute``, and what the budget shared
with other pools allows: ``Observation.write_allowance``).

Counts mean what their source means. Service Bus's admin API and Monitor count a locked message as active
(``DepthSample.active_includes_locked``): the jobs seen busy since the sample are subtracted from it and counted
once, as in-flight work from the busy heartbeats. The policy reads the *age* of the sample too: a Monitor sample
is minutes old, and one older than ``Tunables.max_sample_age_s`` is not scaled out on. Requests are stable on
noisy input because capacity only rises, and only to the lowest demand seen over ``Tunables.confirm_s``.
Waiting jobs that busy workers will start within a boot are not booted for: each busy job's chance to end soon
is read off the learned durations given how long it has run.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

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
    created_at: float | None
    """When the scale set created it; ``None`` (or 0) when the listing has no ``timeCreated``: the policy then
    ages the instance from when it first listed it, never from 1970."""
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
    """``active`` (with locked messages where ``active_includes_locked``), ``in_flight`` (``None`` when the
    source cannot tell), ``sampled_at`` (may be minutes old)."""
    capacity: int
    """The scale set's target capacity (``ScaleSet.get_capacity``). On Azure the listing lags the target while
    VMs are created, so capacity above the listed instances counts as starting supply."""
    instances: tuple[InstanceView, ...]
    heartbeats_ok: bool = True
    """False when the heartbeat store could not be read: silence then says nothing about the workers, so no
    instance is deleted for it and every running instance may be holding a job."""
    write_in_flight: bool = False
    """A scale-set write started in an earlier round has not finished: no second write is started."""
    write_allowance: int | None = None
    """Writes the budget shared with other pools leaves this pool now (``controller/budget.py``); ``None``: only
    this pool's own ``max_writes_per_minute`` bounds it."""


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
    """A write is wanted but held back (write budget, noise filter, a write in flight): decide again next round."""


@dataclass(frozen=True, slots=True)
class Tunables:
    """Internal constants of the policy. What a user tunes (boot estimate, idle grace bounds, prewarming,
    absorption) is in :class:`~scalebus.settings.ControllerSettings`. Defaults are what the benchmark runs."""

    confirm_s: float = 2.0
    """Noise filter: a rise in demand is written once it has lasted this long; the write takes the lowest demand
    seen over the last ``confirm_s``, so one spiked sample never writes a burst's worth of capacity. Chosen by
    simulation (``bench/policy.py``): one poll (2 s) of confirmation costs at most one poll of reaction."""
    min_step: int = 1
    """A shortfall smaller than this keeps ``write_reserve`` writes of the budget back."""
    write_reserve: int = 1
    """Writes of the per-minute budget kept back for broken-instance deletions and for bigger steps later."""
    arrival_memory: int = 16
    """Recent job sightings kept to estimate the inter-arrival gap."""
    job_memory_s: float = 3600.0
    """Longest a finished job stays remembered (to tell jobs picked up after a stale depth sample)."""
    job_memory_max: int = 20_000
    """Most finished jobs remembered (busy ones are always remembered): bounds memory and decide's time."""
    min_durations: int = 5
    """Job durations seen before ``ControllerSettings.absorb_factor`` applies."""
    prewarm_max_cv: float = 0.2
    """Arrivals count as periodic when the gaps' spread (MAD / median) is at most this."""
    max_sample_age_s: float = 600.0
    """A depth sample older than this is not trusted for scale-out (a Monitor sample is 1–3 minutes old when
    healthy; one hours old means the metric pipeline is stuck)."""
    silent_delete_share: float = 0.1
    """At most this share of the listed fleet (at least one) is deleted per round for being silent."""
    mass_silence_share: float = 0.25
    """When more than this share of the workers heard from before are silent together (and more than two), the
    heartbeat path is suspect (store outage, clock skew): none is deleted for silence."""
    boot_failure_limit: int = 3
    """Consecutive new instances that fail the same way before scale-out backs off."""
    boot_backoff_s: float = 120.0
    """First back-off after ``boot_failure_limit`` identical boot failures; doubles with each further one."""
    boot_backoff_max_s: float = 1800.0
    """The longest back-off: scale-out is tried again at least this often."""


DEFAULT_TUNABLES = Tunables()


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What the policy remembers between rounds (bounded: see ``Tunables.job_memory_max``)."""

    writes: tuple[float, ...] = ()
    """Times of the ARM writes (capacity and deletes) in the last ``WRITE_WINDOW_S`` seconds."""
    jobs: Mapping[str, float] = field(default_factory=dict)
    """Jobs busy in the previous round → when first seen busy (a job that leaves has finished: its duration is
    learned)."""
    finished: tuple[tuple[float, float], ...] = ()
    """(last seen busy, first seen busy) of jobs that finished within ``Tunables.max_sample_age_s``, oldest
    first, at most ``Tunables.job_memory_max``: a stale depth sample may still count them."""
    seen_at: float | None = None
    """When the previous round observed."""
    arrivals: tuple[float, ...] = ()
    """When new work was first noticed (a rising backlog or a new busy job), for the inter-arrival estimate."""
    durations: tuple[float, ...] = ()
    """Recent job durations (first seen busy → gone), newest last."""
    last_active: int = 0
    """Messages estimated waiting last round (a rise is an arrival)."""
    demands: tuple[tuple[float, int], ...] = ()
    """(time, desired instances) of the last ``Tunables.confirm_s`` and the round before: the noise filter."""
    first_listed: Mapping[str, float] = field(default_factory=dict)
    """When instances without a creation time were first listed (their age is counted from then)."""
    boot_failures: tuple[tuple[str, float, str], ...] = ()
    """(kind, when, instance id) of new instances deleted before their first heartbeat, since an instance last
    booted; each instance once, however often its deletion is retried."""
    failed_deletes: Mapping[str, tuple[int, float]] = field(default_factory=dict)
    """Instances whose deletion failed: (failures, not retried before), see :func:`note_delete_failed`."""


def initial_state() -> PolicyState:
    return PolicyState()


def is_busy(view: InstanceView, now: float, settings: ControllerSettings) -> bool:
    """Holds a job by a heartbeat fresher than ``heartbeat_timeout_s``: the one freshness rule for every use."""
    return (
        view.worker is base.WorkerState.BUSY
        and view.last_beat_at is not None
        and now - view.last_beat_at < settings.heartbeat_timeout_s
    )


def note_delete_failed(state: PolicyState, instance_ids: Sequence[str], *, now: float) -> PolicyState:
    """The step could not delete these instances (409, 403, ...): they stay listed, and deleting them again waits
    ``_DELETE_BACKOFF_S`` doubling per failure, so a broken instance that cannot be deleted does not spend the
    write budget scale-out needs."""
    failed = dict(state.failed_deletes)
    for iid in instance_ids:
        count = failed[iid][0] + 1 if iid in failed else 1
        failed[iid] = (count, now + min(_DELETE_BACKOFF_MAX_S, _DELETE_BACKOFF_S * 2 ** (count - 1)))
    return replace(state, failed_deletes=failed)


_DELETE_BACKOFF_S = 60.0
_DELETE_BACKOFF_MAX_S = 900.0


@dataclass(frozen=True, slots=True)
class _Fleet:
    """One pass over the instances: what each one is, for the rest of the round."""

    busy: tuple[InstanceView, ...]
    broken: tuple[tuple[InstanceView, str], ...]
    """Instances to delete and why (``failed``, ``never booted``, ``silent``)."""
    retired: tuple[InstanceView, ...]
    held: str
    """Why some broken instances are kept this round (mass silence, no heartbeats, the per-round bound)."""
    serving: int
    listed: int
    running: int
    booted: bool
    """Some instance created after the last boot failure has been heard from."""
    first_listed: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class _Deletions:
    """The broken and retired instances of this round, and those deleted now (within the write budget)."""

    broken: tuple[tuple[InstanceView, str], ...]
    retired: tuple[InstanceView, ...]
    delete: tuple[str, ...]
    writes: tuple[float, ...]
    """The write times of the window, the deletion's included."""
    budget: int
    """Writes left in the window after the deletion."""
    held: str


@dataclass(frozen=True, slots=True)
class _Memory:
    """What this round adds to the remembered jobs, durations and arrivals."""

    jobs: dict[str, float]
    finished: tuple[tuple[float, float], ...]
    durations: tuple[float, ...]
    arrivals: tuple[float, ...]
    waiting: int
    """Messages waiting now (estimated from the sample and the jobs seen busy since)."""
    trusted: bool
    """The depth sample is recent enough to scale out on."""


@dataclass(frozen=True, slots=True)
class _Demand:
    """How many instances the work needs, and the words that explain it."""

    work: str
    demand: int
    desired: int
    """``demand`` within ``[min_instances, max_instances]``."""
    grace: float
    trusted: bool
    """The depth sample is recent enough to scale out on."""


@dataclass(frozen=True, slots=True)
class _Write:
    """The capacity write chosen (or not) and why."""

    capacity: int | None
    reason: str
    deferred: bool = False


def decide(
    obs: Observation,
    state: PolicyState,
    settings: ControllerSettings,
    *,
    tunables: Tunables = DEFAULT_TUNABLES,
) -> tuple[Decision, PolicyState]:
    """One round: how many instances, which broken ones to delete, and why."""
    fleet = _classify(obs, state, settings, tunables)
    deletions = _plan_deletions(obs, state, fleet, settings, tunables)
    memory = _remember(obs, state, fleet, tunables)
    need = _demand(obs, fleet, memory, settings, tunables)
    demands = _recent_demands(state.demands, obs.now, need.desired, tunables)
    write = _plan_write(obs, state, fleet, deletions, need, demands, settings, tunables)
    writes = (*deletions.writes, obs.now) if write.capacity is not None else deletions.writes
    decision = Decision(
        capacity=write.capacity,
        delete=deletions.delete,
        reason=_with_deletes(write.reason, deletions),
        idle_grace_s=need.grace,
        demand=need.demand,
        deferred=write.deferred or (bool(deletions.broken or deletions.retired) and not deletions.delete),
    )
    new_state = replace(
        state,
        writes=writes,
        jobs=memory.jobs,
        finished=memory.finished,
        seen_at=obs.now,
        durations=memory.durations,
        arrivals=memory.arrivals,
        last_active=memory.waiting,
        demands=demands,
        first_listed=fleet.first_listed,
        boot_failures=_boot_failures(state, fleet, deletions, obs.now),
        failed_deletes=_still_listed(state.failed_deletes, obs),
    )
    return decision, new_state


def _still_listed(failed: Mapping[str, tuple[int, float]], obs: Observation) -> Mapping[str, tuple[int, float]]:
    if not failed:
        return failed
    listed = {view.instance_id for view in obs.instances}
    return {iid: entry for iid, entry in failed.items() if iid in listed}


def _classify(obs: Observation, state: PolicyState, settings: ControllerSettings, tunables: Tunables) -> _Fleet:
    """Sort every instance once: busy, broken (and why), retired, serving; then bound the silent deletions."""
    now, timeout = obs.now, settings.heartbeat_timeout_s
    busy: list[InstanceView] = []
    broken: list[tuple[InstanceView, str]] = []
    retired: list[InstanceView] = []
    first_listed: dict[str, float] = {}
    serving = listed = running = heard_before = 0
    last_failure = state.boot_failures[-1][1] if state.boot_failures else math.inf
    booted = not state.boot_failures
    for view in obs.instances:
        if view.state is base.InstanceState.DELETING:
            continue
        listed += 1
        created = view.created_at
        if not created:
            created = first_listed[view.instance_id] = state.first_listed.get(view.instance_id, now)
        fresh = view.last_beat_at is not None and now - view.last_beat_at < timeout
        if view.last_beat_at is not None:
            heard_before += 1
            booted = booted or (fresh and created >= last_failure)
        if view.state is base.InstanceState.RUNNING:
            running += 1
        why = None if fresh else _broken_why(view, now - created, obs.heartbeats_ok, settings)
        if why is not None:
            broken.append((view, why))
        elif fresh and view.worker is base.WorkerState.BUSY:
            busy.append(view)
            serving += 1
        elif fresh and view.worker is base.WorkerState.DRAINING and view.job_id is None:
            retired.append(view)
        elif view.state is not base.InstanceState.FAILED:
            serving += 1
    kept, held = _bound_silent(broken, heard_before, listed, tunables)
    return _Fleet(tuple(busy), kept, tuple(retired), held, serving, listed, running, booted, first_listed)


def _broken_why(view: InstanceView, age: float, heartbeats_ok: bool, settings: ControllerSettings) -> str | None:
    """Why an instance without a fresh heartbeat is broken, or ``None``. A fresh heartbeat is health whatever
    the provisioning state says (a failed VM extension leaves a working VM ``Failed``); without heartbeats at
    all (the store failed) silence proves nothing."""
    if not heartbeats_ok:
        return None
    if view.state is base.InstanceState.FAILED:
        return "failed"
    if view.last_beat_at is None:
        return "never booted" if age > settings.boot_timeout_s else None
    if view.state is base.InstanceState.STARTING and age <= settings.boot_timeout_s:
        return None
    return "silent"


def _bound_silent(
    broken: list[tuple[InstanceView, str]], heard_before: int, listed: int, tunables: Tunables
) -> tuple[tuple[tuple[InstanceView, str], ...], str]:
    """Deleting for silence is bounded per round, and suspended when many workers go quiet together."""
    silent = [item for item in broken if item[1] == "silent"]
    others = [item for item in broken if item[1] != "silent"]
    if len(silent) > 2 and len(silent) > tunables.mass_silence_share * heard_before:
        held = (
            f"{len(silent)} of {heard_before} workers went silent together (heartbeat store or clock trouble?): "
            "deleting none of them"
        )
        return tuple(others), held
    bound = max(1, math.floor(tunables.silent_delete_share * listed))
    quiet = [item for item in broken if item[1] != "failed"]
    if len(quiet) <= bound:
        return tuple(broken), ""
    kept = [item for item in broken if item[1] == "failed"] + quiet[:bound]
    return tuple(kept), f"{len(quiet) - bound} more silent instance(s) wait: at most {bound} per round"


def _plan_deletions(
    obs: Observation, state: PolicyState, fleet: _Fleet, settings: ControllerSettings, tunables: Tunables
) -> _Deletions:
    """Broken instances are deleted whenever a write is left; retired workers (idle past their grace, taking
    no work) in batches, never with the last write of the budget: a scale-out may need it. Nothing is started
    while an earlier write is still running."""
    now = obs.now
    writes = tuple(t for t in state.writes if now - t < WRITE_WINDOW_S)
    budget = settings.max_writes_per_minute - len(writes)
    if obs.write_allowance is not None:
        budget = min(budget, obs.write_allowance)
    broken, retired = fleet.broken, fleet.retired
    if state.failed_deletes:
        backoff = state.failed_deletes
        broken = tuple(item for item in broken if backoff.get(item[0].instance_id, (0, now))[1] <= now)
        retired = tuple(view for view in retired if backoff.get(view.instance_id, (0, now))[1] <= now)
    spare = budget - (tunables.write_reserve if not broken else 0)
    allowed = not obs.write_in_flight and ((broken and budget > 0) or (retired and spare > 0))
    doomed = (*(view for view, _ in broken), *retired) if allowed else ()
    delete = tuple(view.instance_id for view in doomed)
    if delete:
        writes = (*writes, now)
        budget -= 1
    return _Deletions(broken, retired, delete, writes, budget, fleet.held)


def _remember(obs: Observation, state: PolicyState, fleet: _Fleet, tunables: Tunables) -> _Memory:
    """The memory after this round: busy jobs with when first seen, finished ones while a stale sample may still
    count them (bounded), the durations of jobs that ended, the waiting estimate and the arrivals."""
    now = obs.now
    old = state.jobs
    jobs: dict[str, float] = {}
    newly_busy = 0
    for view in fleet.busy:
        job = view.job_id
        if job is None:
            continue
        first = old.get(job)
        if first is None:
            newly_busy += 1
            first = now
        jobs[job] = first
    last = state.seen_at if state.seen_at is not None else now
    ended = [(last, first) for job, first in old.items() if job not in jobs]
    durations = (*state.durations, *(now - first for _, first in ended))[-2 * tunables.arrival_memory :]
    horizon = min(tunables.job_memory_s, tunables.max_sample_age_s)
    finished = (*state.finished, *ended)
    keep = bisect.bisect_left(finished, now - horizon, key=lambda item: item[0])
    finished = finished[max(keep, len(finished) - tunables.job_memory_max) :]
    trusted = now - obs.depth.sampled_at <= tunables.max_sample_age_s
    waiting = _waiting_now(obs, fleet, jobs, finished) if trusted else 0
    arrivals = _remember_arrivals(state, now, waiting, newly_busy, tunables)
    return _Memory(jobs, finished, durations, arrivals, waiting, trusted)


def _demand(
    obs: Observation, fleet: _Fleet, memory: _Memory, settings: ControllerSettings, tunables: Tunables
) -> _Demand:
    """Instances for the waiting work (less what busy workers absorb) and the in-flight work, a worker ready
    for a periodic job that is due, and the idle grace."""
    trusted, waiting = memory.trusted, memory.waiting
    busy = len(fleet.busy) if obs.heartbeats_ok else fleet.running
    in_flight = obs.depth.in_flight if obs.depth.in_flight is not None else busy
    absorbed = _absorbed(obs, fleet, memory, settings, tunables) if waiting else 0
    demand = math.ceil((max(0, waiting - absorbed) + in_flight) / settings.jobs_per_instance)
    grace = _idle_grace(memory.arrivals, busy, memory.durations, settings, tunables)
    forecast = _forecast(memory.arrivals, obs.now, settings, tunables)
    if forecast is not None:  # the next periodic job is due within a boot: have a worker ready and waiting
        demand = max(demand, 1)
        grace = min(max(grace, forecast), settings.idle_grace_max_s)
    desired = min(max(demand, settings.min_instances), settings.max_instances)
    work = f"{waiting} waiting + {in_flight} in flight"
    if not trusted:
        work += f" (depth sample {obs.now - obs.depth.sampled_at:.0f} s old: not trusted, waiting counted as 0)"
    elif obs.depth.active_includes_locked and obs.depth.in_flight is None:
        work += f" ({obs.depth.active} active incl. locked)"
    if obs.depth.in_flight is None:
        work += " (in flight from heartbeats)" if obs.heartbeats_ok else " (heartbeats unreadable: all running)"
    if absorbed and waiting:
        work += f" ({min(absorbed, waiting)} soon taken by busy workers)"
    if forecast is not None:
        work += " (a periodic job is due)"
    return _Demand(work, demand, desired, grace, trusted)


def _recent_demands(
    demands: tuple[tuple[float, int], ...], now: float, desired: int, tunables: Tunables
) -> tuple[tuple[float, int], ...]:
    """The demands of the last ``confirm_s``, plus the latest older one (what held when the window opened)."""
    recent = tuple(item for item in demands if now - item[0] < tunables.confirm_s)
    older = [item for item in demands if now - item[0] >= tunables.confirm_s]
    return (*older[-1:], *recent, (now, desired))


def _confirmed(demands: tuple[tuple[float, int], ...], now: float, tunables: Tunables) -> int:
    """The demand that has held for ``confirm_s``: the lowest over the window. The first round has nothing to
    compare with and is taken as it is (a controller restarted on a backlog acts at once)."""
    if tunables.confirm_s <= 0 or len(demands) == 1:
        return demands[-1][1]
    return min(desired for _, desired in demands)


def _plan_write(
    obs: Observation,
    state: PolicyState,
    fleet: _Fleet,
    deletions: _Deletions,
    need: _Demand,
    demands: tuple[tuple[float, int], ...],
    settings: ControllerSettings,
    tunables: Tunables,
) -> _Write:
    """The whole confirmed shortfall in one write, unless nothing is short, the fleet is at its cap, the rise is
    not confirmed yet (noise filter), boots keep failing, a write is in flight, or the write budget is spent."""
    supply = fleet.serving + max(0, obs.capacity - fleet.listed)
    base_capacity = max(obs.capacity, fleet.listed) - len(deletions.delete)
    work, desired = need.work, need.desired
    shortfall = desired - supply
    if shortfall <= 0:
        return _Write(None, f"{work} need {desired}, {supply} already provisioned or starting")
    target = min(base_capacity + shortfall, settings.max_instances)
    if target <= base_capacity:
        return _Write(None, f"{work} need {desired}, but the scale set is at max_instances")
    confirmed = max(_confirmed(demands, obs.now, tunables), settings.min_instances)
    if confirmed - supply <= 0:
        return _Write(
            None, f"{work} need {desired} of {supply}: waiting {tunables.confirm_s:.0f} s to confirm", True
        )
    shortfall = min(shortfall, confirmed - supply)
    target = min(base_capacity + shortfall, settings.max_instances)
    backoff = _boot_backoff(state, fleet, obs.now, tunables)
    if backoff:
        return _Write(None, f"{work} need {desired} of {supply}, but {backoff}", True)
    if obs.write_in_flight:
        return _Write(None, f"{work} need {desired} of {supply}: an earlier write is still running", True)
    reserve = tunables.write_reserve if shortfall < tunables.min_step else 0
    if deletions.budget - reserve <= 0:
        shared = obs.write_allowance is not None and obs.write_allowance < settings.max_writes_per_minute - len(
            deletions.writes
        )
        spent = (
            "the write budget shared with other pools"
            if shared
            else f"the write budget of {settings.max_writes_per_minute}/min"
        )
        reason = f"{work} need {desired} of {supply}, but {spent} is spent: the next write takes the whole step"
        return _Write(None, reason, True)
    return _Write(target, f"{work} need {desired}, {supply} provisioned: scale out by {shortfall} to {target}")


def _boot_failures(
    state: PolicyState, fleet: _Fleet, deletions: _Deletions, now: float
) -> tuple[tuple[str, float, str], ...]:
    """New instances deleted before their first heartbeat, in a row, each once (a deletion may be retried); an
    instance that boots clears the count."""
    failures = () if fleet.booted else state.boot_failures
    counted = {iid for _, _, iid in failures}
    deleted = set(deletions.delete)
    new = tuple(
        (why, now, view.instance_id)
        for view, why in deletions.broken
        if view.instance_id in deleted
        and view.instance_id not in counted
        and view.last_beat_at is None
        and why in ("failed", "never booted")
    )
    return (*failures, *new)[-16:]


def _boot_backoff(state: PolicyState, fleet: _Fleet, now: float, tunables: Tunables) -> str:
    """Why scale-out waits after repeated identical boot failures (empty: it does not)."""
    failures = () if fleet.booted else state.boot_failures
    if len(failures) < tunables.boot_failure_limit:
        return ""
    kind = failures[-1][0]
    same = 0
    for why, _, _ in reversed(failures):
        if why != kind:
            break
        same += 1
    if same < tunables.boot_failure_limit:
        return ""
    wait = min(tunables.boot_backoff_max_s, tunables.boot_backoff_s * 2 ** (same - tunables.boot_failure_limit))
    left = failures[-1][1] + wait - now
    if left <= 0:
        return ""
    return (
        f"the last {same} new instances {kind} before their first heartbeat (check the image, extensions and "
        f"quota): backing off scale-out for {left:.0f} more s"
    )


def _absorbed(
    obs: Observation, fleet: _Fleet, memory: _Memory, settings: ControllerSettings, tunables: Tunables
) -> int:
    """Waiting jobs the busy workers will start before a new VM could boot (not worth booting for).

    Per busy worker: the jobs it starts within the horizon (``boot_estimate_s``) are its current job's chance
    to end by then plus the jobs it runs after that (the time left over / the mean duration). The chance is
    read off the durations learned so far *given how long the job has run*: a job near its typical duration
    is about to free its worker, a fresh one is not. A job older than all but a few learned durations (or
    whose id is unknown) is taken as memoryless: horizon / mean duration.
    """
    durations = memory.durations
    if len(durations) < tunables.min_durations or settings.absorb_factor <= 0:
        return 0
    horizon = settings.boot_estimate_s
    ordered = sorted(durations)
    mean = max(sum(ordered) / len(ordered), 1.0)
    jobs, now = memory.jobs, obs.now
    expected = 0.0
    by_first: dict[float | None, float] = {}  # jobs first seen in the same round have the same age
    for view in fleet.busy:
        first_seen = jobs.get(view.job_id) if view.job_id is not None else None
        chance = by_first.get(first_seen)
        if chance is None:
            age = now - first_seen if first_seen is not None else math.inf
            chance = by_first[first_seen] = _starts_within(age, ordered, horizon, mean, tunables)
        expected += chance
    return math.floor(settings.absorb_factor * expected)


def _starts_within(age: float, ordered: list[float], horizon: float, mean: float, tunables: Tunables) -> float:
    """Jobs one busy worker, whose job has run ``age`` seconds, is expected to start within ``horizon``."""
    longer = ordered[bisect.bisect_right(ordered, age) :]
    if len(longer) < tunables.min_durations:
        return horizon / mean
    left_over = [horizon - (d - age) for d in longer[: bisect.bisect_right(longer, age + horizon)]]
    return (len(left_over) + sum(left_over) / mean) / len(longer)


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


def _waiting_now(
    obs: Observation, fleet: _Fleet, jobs: Mapping[str, float], finished: tuple[tuple[float, float], ...]
) -> int:
    """Messages waiting now, from a sample that may be old, never counting a running job twice.

    Where the count includes locked messages (Service Bus, Monitor), every job seen busy at or after the sample
    was either locked then or taken since: all of them are subtracted. Where it does not (SQLite), only the jobs
    first seen after the sample were still counted as waiting in it. Without heartbeats, every running instance
    may hold one of the counted messages.
    """
    depth = obs.depth
    since = depth.sampled_at
    recent = finished[bisect.bisect_left(finished, since, key=lambda item: item[0]) :]
    if not depth.active_includes_locked:
        started_since = sum(1 for first in jobs.values() if first > since)
        started_since += sum(1 for _, first in recent if first > since)
        return max(0, depth.active - started_since)
    if not obs.heartbeats_ok:
        return max(0, depth.active - fleet.running)
    return max(0, depth.active - max(len(jobs) + len(recent), len(fleet.busy)))


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


def _with_deletes(reason: str, deletions: _Deletions) -> str:
    broken, retired, delete = deletions.broken, deletions.retired, deletions.delete
    held = f"; {deletions.held}" if deletions.held else ""
    if delete:
        parts = [f"{why} {view.instance_id}" for view, why in broken[:20]]
        if len(broken) > 20:
            parts.append(f"{len(broken) - 20} more broken")
        if retired:
            parts.append(f"{len(retired)} retired")
        return f"{reason}; deleting {', '.join(parts)}{held}"
    if broken or retired:
        return f"{reason}; {len(broken) + len(retired)} instance(s) to delete wait for the write budget{held}"
    return reason + held

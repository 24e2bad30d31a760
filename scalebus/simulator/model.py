"""A deterministic discrete-event simulator of a worker fleet, for comparing scaling policies.

It replays a job trace (``simulator/traces.py``) through the controller's own round (``controller/step.py``,
behind the simulated ports of ``simulator/ports.py``) and through models of what users run today
(``simulator/baselines.py``: KEDA + HPA, Azure Monitor autoscale, Azure Batch autoscale, and a clairvoyant
oracle); ``simulator/report.py`` runs them and summarises. The world modelled here:

* VMs boot in a lognormal time (p50 90 s, p95 240 s), stage their job's input at a per-VM bandwidth, then run it.
* Service Bus peek-lock: a worker renews its lock while it works; when its VM is removed mid-job the message
  becomes visible again only when the lock expires, and running it again is a duplicate execution.
* The ARM write budget per scale set: a token bucket of 12 writes refilled at 4 per minute; a write without a
  token is a 429 and changes nothing. Capacity writes, deletions and each worker's self-destroy all spend it.
* Azure Monitor's ActiveMessages metric at 1-minute grain, arriving 1–3 minutes late.
* Spot evictions with a 30 s notice (the worker gives its job back, the VM is then deleted).
* Production defaults throughout: a retired worker deletes itself after ``worker.retire_wait_s`` (15 s), a job
  running past ``worker.job_timeout_s`` is stopped and abandoned by its worker (redelivered, dead-lettered after
  Service Bus's default 10 deliveries), and scale-set writes are long-running operations polled every 15 s.
* Jobs still unfinished at the horizon (24 h after the last arrival) are censored there: a job never started
  waits until the horizon, the makespan ends there, and ``jobs_done`` shows how many finished.

Event driven: nothing is ticked per second. Controllers wake on their own period, and the scalebus controller
sleeps while nothing changes, so a 24-hour trace costs what its events cost. Everything random comes from
generators seeded per run, one per concern (trace, boot times, metric lag, evictions), so every policy sees the
same jobs and the same boot times for its n-th VM on a given seed. This module does no I/O.
"""

from __future__ import annotations

import bisect
import enum
import heapq
import math
import random
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from scalebus.settings import ControllerSettings, WorkerSettings
from scalebus.simulator import traces

HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class World:
    """The physical model. Defaults are documented Azure behaviour or typical values (see the module doc)."""

    boot_p50_s: float = 90.0
    boot_p95_s: float = 240.0
    bandwidth_bytes_per_s: float = 200e6
    """Per-VM staging bandwidth from the data lake (~1.6 Gbit/s)."""
    lock_duration_s: float = 60.0
    """Service Bus default lock duration: how long a killed worker's message stays invisible."""
    arm_burst: int = 12
    arm_writes_per_min: float = 4.0
    eviction_notice_s: float = 30.0
    metric_grain_s: float = 60.0
    metric_lag_min_s: float = 60.0
    metric_lag_max_s: float = 180.0
    self_destroy_after_s: float = WorkerSettings().retire_wait_s
    """A retired scalebus worker the controller has not deleted yet deletes itself after this long."""
    worker_idle_timeout_s: float = WorkerSettings().idle_timeout_s
    """scalebus workers' own idle timeout (``worker.idle_timeout_s``) when the policy gives no grace."""
    job_timeout_s: float = WorkerSettings().job_timeout_s
    """A job running longer is stopped by its worker and abandoned (``worker.job_timeout_s``)."""
    max_deliveries: int = 10
    """Service Bus's default max delivery count: a job abandoned this often is dead-lettered."""
    heartbeat_interval_s: float = WorkerSettings().heartbeat_interval_s
    """Workers beat on every state change and this often in between (``worker.heartbeat_interval_s``)."""
    lro_poll_s: float = 15.0
    """How often the SDK polls a long-running ARM operation (a capacity write ends at the first poll after
    its new VMs are provisioned)."""
    delete_lro_s: float = 60.0
    """How long deleting instances runs before ARM reports it done."""
    writes_wait_for_provisioning: bool = True
    """A capacity write's operation runs until its new VMs are provisioned (as ARM's does); off: it ends at the
    first poll, for measuring what serialising writes behind it costs."""
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    """scalebus's controller settings (``scalebus simulate --config``); ``max_instances`` comes from the trace."""


# ------------------------------------------------------------------------------------------------ the fleet


class VmState(enum.Enum):
    """Where a simulated VM is in its life; VM-hours are accounted per state."""

    BOOTING = "booting"
    IDLE = "idle"
    STAGING = "staging"
    RUNNING = "running"
    GONE = "gone"

    @property
    def busy(self) -> bool:
        """Holds a job (staging its input or running it)."""
        return self in (VmState.STAGING, VmState.RUNNING)


@dataclass(slots=True)
class Vm:
    vid: int
    created_at: float
    state: VmState = VmState.BOOTING
    since: float = 0.0
    job: int | None = None
    accepting: bool = True
    """Takes work when idle (False: retiring, draining, evicted, or a KEDA node without a pod)."""
    retiring: bool = False
    draining: bool = False
    idle_epoch: int = 0
    """Counts the VM's idle spells: a job's timers carry it, so a killed job's timers never end the next job."""
    ready_at: float = 0.0
    """When it will finish booting (its provisioning ends then: what a capacity write's operation waits for)."""

    def spell(self) -> Spell:
        return Spell(self.vid, self.idle_epoch)


class Autoscaler(Protocol):
    """A scaling policy inside the simulator: it observes ``sim`` and acts through its methods."""

    name: str
    period_s: float
    """Seconds between evaluations; 0 means after every event (the oracle)."""

    def tick(self, sim: Simulation) -> None: ...

    def quiet(self, sim: Simulation) -> bool:
        """True when a tick now would change nothing until some event happens (lets 24 h traces skip ahead)."""

    def on_ready(self, sim: Simulation, vm: Vm) -> None:
        """A VM finished booting."""

    def on_idle(self, sim: Simulation, vm: Vm) -> None:
        """A worker found the queue empty."""

    def on_done(self, sim: Simulation, vm: Vm) -> None:
        """A worker finished its job (before it looks for the next)."""


@dataclass(slots=True)
class RunMetrics:
    reaction_s: float
    wait_p50_s: float
    wait_p95_s: float
    makespan_s: float
    vm_hours: float
    booting_h: float
    idle_h: float
    staging_h: float
    running_h: float
    busy_killed: int
    duplicates: int
    arm_writes: int
    arm_429: int
    cost_usd: float
    jobs_done: int
    evicted_busy: int
    timed_out: int = 0
    dead_lettered: int = 0


# ------------------------------------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class Spell:
    """One VM's current busy spell (``Vm.idle_epoch`` changes on every idle)."""

    vid: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Arrive:
    job: int


@dataclass(frozen=True, slots=True)
class LockExpired:
    """A killed worker's message becomes visible again."""

    job: int


@dataclass(frozen=True, slots=True)
class Booted:
    vid: int


@dataclass(frozen=True, slots=True)
class Staged:
    spell: Spell


@dataclass(frozen=True, slots=True)
class Ran:
    spell: Spell


@dataclass(frozen=True, slots=True)
class TimedOut:
    """The worker's job timeout passed: it stops the job and abandons the message."""

    spell: Spell


@dataclass(frozen=True, slots=True)
class Retire:
    """A scalebus worker idle for its grace stops taking work."""

    spell: Spell


@dataclass(frozen=True, slots=True)
class SelfDestroy:
    """A retired worker the controller has not deleted deletes itself."""

    spell: Spell


@dataclass(frozen=True, slots=True)
class EvictNotice:
    """One Spot VM, picked at random, gets its eviction notice."""


@dataclass(frozen=True, slots=True)
class Evicted:
    vid: int


@dataclass(frozen=True, slots=True)
class MetricGrain:
    """Azure Monitor takes a sample."""


@dataclass(frozen=True, slots=True)
class Tick:
    """The autoscaler's periodic evaluation."""


@dataclass(frozen=True, slots=True)
class Wake:
    """An evaluation the autoscaler asked for (``Simulation.wake_at``)."""


Event = (
    Arrive
    | LockExpired
    | Booted
    | Staged
    | Ran
    | TimedOut
    | Retire
    | SelfDestroy
    | EvictNotice
    | Evicted
    | MetricGrain
    | Tick
    | Wake
)


# ------------------------------------------------------------------------------------------------ books


@dataclass(slots=True)
class ArmBudget:
    """ARM's write budget per scale set: a token bucket; a write without a token is a 429."""

    burst: int
    per_min: float
    tokens: float = 0.0
    at: float = 0.0
    writes: int = 0
    throttled: int = 0

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)

    def spend(self, now: float) -> bool:
        rate = self.per_min / 60.0
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.writes += 1
            return True
        self.throttled += 1
        return False

    def next_token_in(self) -> float:
        return max(1.0, (1.0 - self.tokens) / (self.per_min / 60.0))


@dataclass(slots=True)
class Generators:
    """One seeded generator per concern, so every policy sees the same boot time for its n-th VM."""

    boot: random.Random
    lag: random.Random
    evict: random.Random
    policy: random.Random
    """For the models' own choices (which pod KEDA's ReplicaSet removes)."""
    boot_mu: float
    boot_sigma: float

    @classmethod
    def seeded(cls, seed: int, world: World) -> Generators:
        return cls(
            boot=random.Random(f"boot/{seed}"),
            lag=random.Random(f"lag/{seed}"),
            evict=random.Random(f"evict/{seed}"),
            policy=random.Random(f"policy/{seed}"),
            boot_mu=math.log(world.boot_p50_s),
            boot_sigma=math.log(world.boot_p95_s / world.boot_p50_s) / 1.6449,
        )

    def boot_s(self) -> float:
        """A lognormal boot time with the world's p50 and p95."""
        return math.exp(self.boot.gauss(self.boot_mu, self.boot_sigma))


@dataclass(slots=True)
class MonitorMetric:
    """Azure Monitor's ActiveMessages metric: one sample per grain, each visible only after its lag."""

    samples: list[tuple[float, float, int, int]] = field(default_factory=list)
    """(visible_at, sampled_at, active, pending) per grain, in order of sampled_at."""

    def sample(self, now: float, lag_s: float, *, active: int, pending: int) -> None:
        self.samples.append((now + lag_s, now, active, pending))
        if len(self.samples) > 64:
            del self.samples[:32]

    def visible(self, now: float, *, lag_s: float | None = None) -> list[tuple[float, int, int]]:
        """Samples (sampled_at, active, pending) that have arrived by ``now`` (Monitor lag, or ``lag_s``)."""
        out = []
        for visible_at, sampled_at, active, pending in self.samples:
            arrived = visible_at if lag_s is None else sampled_at + lag_s
            if arrived <= now:
                out.append((sampled_at, active, pending))
        return out


@dataclass(slots=True)
class Timeline:
    """(t, waiting, VMs, busy VMs) about every ``step_s`` seconds, for the plots; empty unless enabled."""

    enabled: bool
    step_s: float
    points: list[tuple[float, int, int, int]] = field(default_factory=list)

    def record(self, now: float, waiting: int, vms: dict[int, Vm]) -> None:
        if self.enabled and (not self.points or now - self.points[-1][0] >= self.step_s):
            self.points.append((now, waiting, len(vms), sum(1 for vm in vms.values() if vm.state.busy)))


@dataclass(slots=True)
class Ledger:
    """What a run is measured by: per-job starts and waits, VM-seconds per state, kills, reaction times."""

    starts: list[int]
    start_at: list[float]
    done_at: list[float]
    waits: list[float] = field(default_factory=list)
    vm_seconds: dict[VmState, float] = field(
        default_factory=lambda: dict.fromkeys(
            (VmState.BOOTING, VmState.IDLE, VmState.STAGING, VmState.RUNNING), 0.0
        )
    )
    busy_killed: int = 0
    evicted_busy: int = 0
    timed_out: int = 0
    dead_lettered: int = 0
    horizon: float = math.inf
    reactions: list[float] = field(default_factory=list)
    episode_at: float | None = None
    """When the open backlog episode began (closed by the next scale request)."""

    @classmethod
    def for_jobs(cls, count: int) -> Ledger:
        return cls(starts=[0] * count, start_at=[0.0] * count, done_at=[math.nan] * count)


# ------------------------------------------------------------------------------------------------ the engine


class Simulation:
    """One run: one trace, one policy, one seed."""

    def __init__(
        self, trace: traces.Trace, autoscaler: Autoscaler, *, seed: int, world: World, record: bool
    ) -> None:
        self.trace = trace
        self.world = world
        self.autoscaler = autoscaler
        self.now = 0.0
        self.arrivals = [job.arrival_s for job in trace.jobs]
        self.queue: deque[int] = deque()
        self.locked = 0
        self.completed = 0
        self.vms: dict[int, Vm] = {}
        self._next_vid = 0
        self.arm = ArmBudget(world.arm_burst, world.arm_writes_per_min)
        self.ledger = Ledger.for_jobs(len(trace.jobs))
        self.metric = MonitorMetric()
        self.random = Generators.seeded(seed, world)
        span = (self.arrivals[-1] if self.arrivals else 0.0) + HOUR
        self.timeline = Timeline(record, max(5.0, span / 1500))
        self.changed = True
        """Something happened since the autoscaler's last tick."""
        self._heap: list[tuple[float, int, Event]] = []
        self._seq = 0
        self._tick_pending = False
        self._schedule_start()

    def _schedule_start(self) -> None:
        for index, job in enumerate(self.trace.jobs):
            self._push(job.arrival_s, Arrive(index))
        for at in self.trace.evictions_s:
            self._push(at, EvictNotice())
        self._push(0.0, MetricGrain())
        self._push(0.0, Tick())
        self._tick_pending = True

    # ---------------------------------------------------------------------------------- queries for policies

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def arrivals_between(self, start: float, end: float) -> int:
        return bisect.bisect_right(self.arrivals, end) - bisect.bisect_right(self.arrivals, start)

    # ---------------------------------------------------------------------------------- actions for policies

    def arm_write(self) -> bool:
        """Spend one ARM write; False (a 429) when the bucket is empty."""
        return self.arm.spend(self.now)

    def note_scale_request(self) -> None:
        """A policy asked for more capacity: closes the open reaction-time episode."""
        if self.ledger.episode_at is not None:
            self.ledger.reactions.append(self.now - self.ledger.episode_at)
            self.ledger.episode_at = None

    def grow(self, count: int, *, accepting: bool = True) -> list[Vm]:
        """Create ``count`` VMs (the write, if any, is the caller's)."""
        if count <= 0:
            return []
        self.note_scale_request()
        created = []
        for _ in range(count):
            vm = Vm(self._next_vid, self.now, since=self.now, accepting=accepting)
            vm.ready_at = self.now + self.random.boot_s()
            self._next_vid += 1
            self.vms[vm.vid] = vm
            self._push(vm.ready_at, Booted(vm.vid))
            created.append(vm)
        self.changed = True
        return created

    def set_capacity(self, target: int, *, newest_first: bool = True) -> bool:
        """A VMSS capacity write: grows, or removes the newest VMs whatever they are doing (as VMSS does)."""
        if not self.arm_write():
            return False
        have = len(self.vms)
        if target > have:
            self.grow(target - have)
        elif target < have:
            order = sorted(self.vms.values(), key=lambda vm: vm.vid, reverse=newest_first)
            for vm in order[: have - target]:
                self.remove(vm)
        return True

    def delete(self, vms: Sequence[Vm]) -> bool:
        """Delete named VMs in one ARM write."""
        if not vms:
            return True
        if not self.arm_write():
            return False
        for vm in vms:
            self.remove(vm)
        return True

    def remove(self, vm: Vm) -> None:
        """The VM is gone now. A job it held comes back when its lock expires."""
        if vm.state is VmState.GONE:
            return
        self._kill_job(vm)
        self._set_state(vm, VmState.GONE)
        del self.vms[vm.vid]
        self.changed = True

    def drain(self, vm: Vm) -> None:
        """Take no new work; the VM is removed when its job ends (Batch ``taskcompletion``)."""
        vm.accepting = False
        vm.draining = True
        if vm.state in (VmState.IDLE, VmState.BOOTING):
            self.remove(vm)

    def release(self, vm: Vm) -> None:
        """The VM may take work (KEDA: a pod was scheduled on it)."""
        vm.accepting = True
        self.changed = True
        if vm.state is VmState.IDLE:
            self._assign(vm)

    def withhold(self, vm: Vm) -> None:
        """The VM takes no new work; a job it is running is killed (KEDA: its pod was removed)."""
        vm.accepting = False
        if self._kill_job(vm):
            self._set_state(vm, VmState.IDLE)
        self.changed = True

    def wake_at(self, at: float) -> None:
        self._push(at, Wake())

    def schedule_retire(self, vm: Vm, after_s: float) -> None:
        """A scalebus worker stops taking work after ``after_s`` idle; the controller (or itself) deletes it."""
        self._push(self.now + after_s, Retire(vm.spell()))

    # ---------------------------------------------------------------------------------- the engine

    def run(self) -> RunMetrics:
        end_of_time = (self.arrivals[-1] if self.arrivals else 0.0) + 24 * HOUR
        self.ledger.horizon = end_of_time
        while self._heap:
            at, _, event = heapq.heappop(self._heap)
            if at > end_of_time:
                break
            self.now = at
            if isinstance(event, Tick | Wake):
                self._evaluate(periodic=isinstance(event, Tick))
            else:
                self._dispatch(event)
                self._after_event()
            self.timeline.record(self.now, len(self.queue), self.vms)
            if self._finished():
                break
        for vm in list(self.vms.values()):
            self._set_state(vm, vm.state)
        return run_metrics(self)

    def _evaluate(self, *, periodic: bool) -> None:
        """The autoscaler's turn; the next periodic one is booked unless it says nothing would change."""
        period = self.autoscaler.period_s
        if periodic:
            self._tick_pending = False
        self.autoscaler.tick(self)
        self.changed = False
        if period > 0 and not self._tick_pending and not self.autoscaler.quiet(self):
            self._push(self.now + period, Tick())
            self._tick_pending = True

    def _after_event(self) -> None:
        """Something changed: the oracle acts at once, the others at their next period boundary."""
        period = self.autoscaler.period_s
        self.changed = True
        if period == 0:
            self.autoscaler.tick(self)
        elif not self._tick_pending:
            self._push((math.floor(self.now / period) + 1) * period, Tick())
            self._tick_pending = True

    def _push(self, at: float, event: Event) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, event))

    def _dispatch(self, event: Event) -> None:
        match event:
            case Arrive(job):
                self.queue.append(job)
                self._offer_work()
            case LockExpired(job):
                self.locked -= 1
                self.queue.appendleft(job)  # a redelivered message keeps its place at the head
                self._offer_work()
            case Booted(vid):
                self._booted(vid)
            case Staged(spell):
                self._staged(spell)
            case Ran(spell) | TimedOut(spell):
                vm = self._current(spell)
                if vm is not None and vm.state is VmState.RUNNING and vm.job is not None:
                    self._finish(vm) if isinstance(event, Ran) else self._time_out(vm)
            case Retire(spell):
                self._retire(spell)
            case SelfDestroy(spell):
                self._self_destroy(spell)
            case MetricGrain():
                self._sample_metric()
            case EvictNotice():
                self._evict_notice()
            case Evicted(vid):
                self._evicted(vid)

    def _set_state(self, vm: Vm, state: VmState) -> None:
        bucket = VmState.IDLE if vm.state is VmState.GONE else vm.state
        self.ledger.vm_seconds[bucket] += self.now - vm.since
        vm.since = self.now
        vm.state = state
        if state is VmState.IDLE:
            vm.idle_epoch += 1

    def _kill_job(self, vm: Vm) -> bool:
        """The VM's job is lost mid-run: its message comes back when the lock expires."""
        if not vm.state.busy or vm.job is None:
            return False
        self.ledger.busy_killed += 1
        self._push(self.now + self.world.lock_duration_s, LockExpired(vm.job))
        vm.job = None
        return True

    def _offer_work(self) -> None:
        """A message became visible: the first idle worker takes it, else the backlog may open an episode."""
        for vm in self._idle_vms():
            self._assign(vm)
            break
        self._open_episode()

    def _assign(self, vm: Vm) -> None:
        """An idle worker takes the next message, or reports idle."""
        if vm.state is not VmState.IDLE or not vm.accepting:
            return
        if not self.queue:
            self.autoscaler.on_idle(self, vm)
            return
        job = self.queue.popleft()
        self.locked += 1
        self.ledger.starts[job] += 1
        self.ledger.start_at[job] = self.now
        vm.job = job
        self._set_state(vm, VmState.STAGING)
        staging = self.trace.jobs[job].input_bytes / self.world.bandwidth_bytes_per_s
        self._push(self.now + staging, Staged(vm.spell()))

    def _open_episode(self) -> None:
        """Backlog appears: more jobs wait than idle or booting workers, and the fleet could still grow."""
        if self.ledger.episode_at is not None or len(self.vms) >= self.trace.max_instances:
            return
        supply = sum(1 for vm in self.vms.values() if vm.accepting and vm.state in (VmState.IDLE, VmState.BOOTING))
        if len(self.queue) > supply:
            self.ledger.episode_at = self.now

    def _idle_vms(self) -> list[Vm]:
        return [vm for vm in self.vms.values() if vm.state is VmState.IDLE and vm.accepting]

    def _current(self, spell: Spell) -> Vm | None:
        """The VM of a job event, if the job it was scheduled for is still the VM's current one.

        A worker whose job was killed (KEDA removed its pod) and that then took another job must not have the
        new job staged or finished by the old job's timers.
        """
        vm = self.vms.get(spell.vid)
        return vm if vm is not None and vm.idle_epoch == spell.epoch else None

    def _booted(self, vid: int) -> None:
        vm = self.vms.get(vid)
        if vm is not None and vm.state is VmState.BOOTING:
            self._set_state(vm, VmState.IDLE)
            self.autoscaler.on_ready(self, vm)
            self._assign(vm)

    def _staged(self, spell: Spell) -> None:
        vm = self._current(spell)
        if vm is not None and vm.state is VmState.STAGING and vm.job is not None:
            self._set_state(vm, VmState.RUNNING)
            run_s = self.trace.jobs[vm.job].run_s
            if run_s > self.world.job_timeout_s:
                self._push(self.now + self.world.job_timeout_s, TimedOut(spell))
            else:
                self._push(self.now + run_s, Ran(spell))

    def _finish(self, vm: Vm) -> None:
        assert vm.job is not None
        job = vm.job
        self.locked -= 1
        self.completed += 1
        self.ledger.done_at[job] = self.now
        self.ledger.waits.append(self.ledger.start_at[job] - self.trace.jobs[job].arrival_s)
        vm.job = None
        self._set_state(vm, VmState.IDLE)
        self.autoscaler.on_done(self, vm)
        if vm.draining:
            self.remove(vm)
        else:
            self._assign(vm)

    def _time_out(self, vm: Vm) -> None:
        """The worker stops the job and abandons it: redelivered at once, dead-lettered after max deliveries."""
        assert vm.job is not None
        job = vm.job
        self.locked -= 1
        self.ledger.timed_out += 1
        vm.job = None
        if self.ledger.starts[job] >= self.world.max_deliveries:
            self.ledger.dead_lettered += 1
            self.completed += 1  # settled for good: nothing left to run
        else:
            self.queue.appendleft(job)
        self._set_state(vm, VmState.IDLE)
        self.autoscaler.on_done(self, vm)
        if vm.draining:
            self.remove(vm)
        else:
            self._assign(vm)

    def _retire(self, spell: Spell) -> None:
        vm = self.vms.get(spell.vid)
        if vm is not None and vm.state is VmState.IDLE and vm.accepting and vm.idle_epoch == spell.epoch:
            vm.accepting = False
            vm.retiring = True
            self._push(self.now + self.world.self_destroy_after_s, SelfDestroy(spell))

    def _self_destroy(self, spell: Spell) -> None:
        vm = self.vms.get(spell.vid)
        if vm is None or not vm.retiring:
            return
        if self.arm_write():
            self.remove(vm)
        else:
            self._push(self.now + self.arm.next_token_in(), SelfDestroy(spell))

    def _sample_metric(self) -> None:
        lag = self.random.lag.uniform(self.world.metric_lag_min_s, self.world.metric_lag_max_s)
        self.metric.sample(self.now, lag, active=len(self.queue), pending=len(self.queue) + self.locked)
        if not self._finished():
            self._push(self.now + self.world.metric_grain_s, MetricGrain())

    def _evict_notice(self) -> None:
        candidates = [vm for vm in self.vms.values() if vm.state is not VmState.BOOTING and not vm.draining]
        if not candidates:
            return
        vm = candidates[self.random.evict.randrange(len(candidates))]
        vm.accepting = False
        vm.draining = True
        if vm.state.busy and vm.job is not None:  # the worker gives its job back on the notice
            self.ledger.evicted_busy += 1
            self.locked -= 1
            self.queue.appendleft(vm.job)
            vm.job = None
            self._set_state(vm, VmState.IDLE)
            for other in self._idle_vms():
                self._assign(other)
                break
        self._push(self.now + self.world.eviction_notice_s, Evicted(vm.vid))
        self.changed = True

    def _evicted(self, vid: int) -> None:
        vm = self.vms.get(vid)
        if vm is not None:
            self._set_state(vm, VmState.GONE)
            del self.vms[vid]
        self.changed = True

    def _finished(self) -> bool:
        return self.completed == len(self.trace.jobs) and not self.vms


def run_metrics(sim: Simulation) -> RunMetrics:
    """What a finished run is measured by."""
    ledger = sim.ledger
    hours = {state: seconds / HOUR for state, seconds in ledger.vm_seconds.items()}
    total = sum(hours.values())
    done = [at for at in ledger.done_at if not math.isnan(at)]
    unfinished = len(done) + ledger.dead_lettered < len(sim.arrivals)
    end = ledger.horizon if unfinished else sim.now
    never_started = [end - sim.arrivals[job] for job, starts in enumerate(ledger.starts) if starts == 0]
    waits = sorted((*ledger.waits, *(max(0.0, wait) for wait in never_started)))
    return RunMetrics(
        reaction_s=statistics.fmean(ledger.reactions) if ledger.reactions else 0.0,
        wait_p50_s=quantile(waits, 0.50),
        wait_p95_s=quantile(waits, 0.95),
        makespan_s=(end if unfinished else max(done, default=end)) - sim.arrivals[0] if sim.arrivals else math.nan,
        vm_hours=total,
        booting_h=hours[VmState.BOOTING],
        idle_h=hours[VmState.IDLE],
        staging_h=hours[VmState.STAGING],
        running_h=hours[VmState.RUNNING],
        busy_killed=ledger.busy_killed,
        duplicates=sum(max(0, starts - 1) for starts in ledger.starts),
        arm_writes=sim.arm.writes,
        arm_429=sim.arm.throttled,
        cost_usd=total * sim.trace.price_per_vm_hour,
        jobs_done=sim.completed - ledger.dead_lettered,
        evicted_busy=ledger.evicted_busy,
        timed_out=ledger.timed_out,
        dead_lettered=ledger.dead_lettered,
    )


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics of sorted ``values``; NaN when empty."""
    if not values:
        return math.nan
    position = q * (len(values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)

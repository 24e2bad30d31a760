"""A deterministic discrete-event simulator of a worker fleet, for comparing scaling policies.

It replays a job trace (``controller/traces.py``) through the *same* :func:`scalebus.controller.policy.decide`
the controller runs, and through models of what users run today (``controller/baselines.py``: KEDA + HPA,
Azure Monitor autoscale, Azure Batch autoscale, and a clairvoyant oracle). The world it models:

* VMs boot in a lognormal time (p50 90 s, p95 240 s), stage their job's input at a per-VM bandwidth, then run it.
* Service Bus peek-lock: a worker renews its lock while it works; when its VM is removed mid-job the message
  becomes visible again only when the lock expires, and running it again is a duplicate execution.
* The ARM write budget per scale set: a token bucket of 12 writes refilled at 4 per minute; a write without a
  token is a 429 and changes nothing. Capacity writes, deletions and each worker's self-destroy all spend it.
* Azure Monitor's ActiveMessages metric at 1-minute grain, arriving 1–3 minutes late.
* Spot evictions with a 30 s notice (the worker gives its job back, the VM is then deleted).

Event driven: nothing is ticked per second. Controllers wake on their own period, and the scalebus controller
sleeps while nothing changes, so a 24-hour trace costs what its events cost. Everything random comes from
generators seeded per run, one per concern (trace, boot times, metric lag, evictions), so every policy sees the
same jobs and the same boot times for its n-th VM on a given seed. The only I/O here is :func:`plot` (matplotlib,
imported lazily) at the edge.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

from scalebus import errors
from scalebus.settings import ControllerSettings
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
    self_destroy_after_s: float = 90.0
    """A retired scalebus worker the controller has not deleted yet deletes itself after this long."""
    worker_idle_timeout_s: float = 30.0
    """scalebus workers' own idle timeout (``worker.idle_timeout_s``) when the policy gives no grace."""
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    """scalebus's controller settings (``scalebus simulate --config``); ``max_instances`` comes from the trace."""


# ------------------------------------------------------------------------------------------------ the model

BOOTING, IDLE, STAGING, RUNNING, GONE = "booting", "idle", "staging", "running", "gone"
_BUSY = (STAGING, RUNNING)


@dataclass(slots=True)
class Vm:
    vid: int
    created_at: float
    state: str = BOOTING
    since: float = 0.0
    job: int | None = None
    accepting: bool = True
    """Takes work when idle (False: retiring, draining, evicted, or a KEDA node without a pod)."""
    retiring: bool = False
    draining: bool = False
    idle_epoch: int = 0


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


# event kinds
_ARRIVE, _BOOTED, _STAGED, _RAN, _LOCK_EXPIRED, _RETIRE, _SELF_DESTROY, _TICK, _MINUTE, _EVICT, _EVICTED, _WAKE = (
    range(12)
)


class Simulation:
    """One run: one trace, one policy, one seed."""

    def __init__(
        self, trace: traces.Trace, autoscaler: Autoscaler, *, seed: int, world: World, record: bool
    ) -> None:
        self.trace = trace
        self.world = world
        self.autoscaler = autoscaler
        self.now = 0.0
        self._heap: list[tuple[float, int, int, int]] = []
        self._seq = 0
        jobs = trace.jobs
        self.arrivals = [job.arrival_s for job in jobs]
        self.queue: deque[int] = deque()
        self.locked = 0
        self.completed = 0
        self._starts = [0] * len(jobs)
        self._start_at = [0.0] * len(jobs)
        self._done_at = [math.nan] * len(jobs)
        self._waits: list[float] = []
        self.vms: dict[int, Vm] = {}
        self._next_vid = 0
        self._boot_rng = random.Random(f"boot/{seed}")
        self._lag_rng = random.Random(f"lag/{seed}")
        self.evict_rng = random.Random(f"evict/{seed}")
        self.rng = random.Random(f"policy/{seed}")
        self._boot_mu = math.log(world.boot_p50_s)
        self._boot_sigma = math.log(world.boot_p95_s / world.boot_p50_s) / 1.6449
        self._tokens = float(world.arm_burst)
        self._tokens_at = 0.0
        self.arm_writes = 0
        self.arm_429 = 0
        self.busy_killed = 0
        self.evicted_busy = 0
        self._vm_seconds = {BOOTING: 0.0, IDLE: 0.0, STAGING: 0.0, RUNNING: 0.0}
        self._episode_at: float | None = None
        self._reactions: list[float] = []
        self._tick_pending = False
        self._changed = True
        self.metric_samples: list[tuple[float, float, int, int]] = []
        """(visible_at, sampled_at, active, pending) per metric grain, in order of sampled_at."""
        self._record = record
        span = (self.arrivals[-1] if self.arrivals else 0.0) + HOUR
        self._plot_step = max(5.0, span / 1500)
        self.timeline: list[tuple[float, int, int, int]] = []
        for index, job in enumerate(jobs):
            self._push(job.arrival_s, _ARRIVE, index)
        for at in trace.evictions_s:
            self._push(at, _EVICT, 0)
        self._push(0.0, _MINUTE, 0)
        self._push(0.0, _TICK, 0)
        self._tick_pending = True

    # ---------------------------------------------------------------------------------- queries for policies

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def alive(self) -> list[Vm]:
        return list(self.vms.values())

    def count(self, state: str) -> int:
        return sum(1 for vm in self.vms.values() if vm.state == state)

    def busy(self) -> int:
        return sum(1 for vm in self.vms.values() if vm.state in _BUSY)

    def visible_samples(self, *, lag_s: float | None = None) -> list[tuple[float, int, int]]:
        """Metric samples (sampled_at, active, pending) that have arrived by now (Monitor lag, or ``lag_s``)."""
        out = []
        for visible_at, sampled_at, active, pending in self.metric_samples:
            arrived = visible_at if lag_s is None else sampled_at + lag_s
            if arrived <= self.now:
                out.append((sampled_at, active, pending))
        return out

    def arrivals_between(self, start: float, end: float) -> int:
        return bisect.bisect_right(self.arrivals, end) - bisect.bisect_right(self.arrivals, start)

    # ---------------------------------------------------------------------------------- actions for policies

    def arm_write(self) -> bool:
        """Spend one ARM write; False (a 429) when the bucket is empty."""
        rate = self.world.arm_writes_per_min / 60.0
        self._tokens = min(float(self.world.arm_burst), self._tokens + (self.now - self._tokens_at) * rate)
        self._tokens_at = self.now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.arm_writes += 1
            return True
        self.arm_429 += 1
        return False

    def next_token_in(self) -> float:
        rate = self.world.arm_writes_per_min / 60.0
        return max(1.0, (1.0 - self._tokens) / rate)

    def note_scale_request(self) -> None:
        """A policy asked for more capacity: closes the open reaction-time episode."""
        if self._episode_at is not None:
            self._reactions.append(self.now - self._episode_at)
            self._episode_at = None

    def grow(self, count: int, *, accepting: bool = True) -> list[Vm]:
        """Create ``count`` VMs (the write, if any, is the caller's)."""
        if count <= 0:
            return []
        self.note_scale_request()
        created = []
        for _ in range(count):
            vm = Vm(self._next_vid, self.now, since=self.now, accepting=accepting)
            self._next_vid += 1
            self.vms[vm.vid] = vm
            boot = math.exp(self._boot_rng.gauss(self._boot_mu, self._boot_sigma))
            self._push(self.now + boot, _BOOTED, vm.vid)
            created.append(vm)
        self._changed = True
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
        if vm.state == GONE:
            return
        if vm.state in _BUSY and vm.job is not None:
            self.busy_killed += 1
            self._push(self.now + self.world.lock_duration_s, _LOCK_EXPIRED, vm.job)
            vm.job = None
        self._set_state(vm, GONE)
        del self.vms[vm.vid]
        self._changed = True

    def drain(self, vm: Vm) -> None:
        """Take no new work; the VM is removed when its job ends (Batch ``taskcompletion``)."""
        vm.accepting = False
        vm.draining = True
        if vm.state in (IDLE, BOOTING):
            self.remove(vm)

    def release(self, vm: Vm) -> None:
        """The VM may take work (KEDA: a pod was scheduled on it)."""
        vm.accepting = True
        self._changed = True
        if vm.state == IDLE:
            self._assign(vm)

    def withhold(self, vm: Vm) -> None:
        """The VM takes no new work; a job it is running is killed (KEDA: its pod was removed)."""
        vm.accepting = False
        if vm.state in _BUSY and vm.job is not None:
            self.busy_killed += 1
            self._push(self.now + self.world.lock_duration_s, _LOCK_EXPIRED, vm.job)
            vm.job = None
            self._set_state(vm, IDLE)
        self._changed = True

    def wake_at(self, at: float) -> None:
        self._push(at, _WAKE, 0)

    # ---------------------------------------------------------------------------------- the engine

    def _push(self, at: float, kind: int, arg: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, arg))

    def _set_state(self, vm: Vm, state: str) -> None:
        bucket = IDLE if vm.state == GONE else vm.state
        self._vm_seconds[bucket] += self.now - vm.since
        vm.since = self.now
        vm.state = state
        if state == IDLE:
            vm.idle_epoch += 1

    def _assign(self, vm: Vm) -> None:
        """An idle worker takes the next message, or reports idle."""
        if vm.state != IDLE or not vm.accepting:
            return
        if not self.queue:
            self.autoscaler.on_idle(self, vm)
            return
        job = self.queue.popleft()
        self.locked += 1
        self._starts[job] += 1
        self._start_at[job] = self.now
        vm.job = job
        self._set_state(vm, STAGING)
        staging = self.trace.jobs[job].input_bytes / self.world.bandwidth_bytes_per_s
        self._push(self.now + staging, _STAGED, _tagged(vm))

    def _open_episode(self) -> None:
        """Backlog appears: more jobs wait than idle or booting workers, and the fleet could still grow."""
        if self._episode_at is not None or len(self.vms) >= self.trace.max_instances:
            return
        supply = sum(1 for vm in self.vms.values() if vm.accepting and vm.state in (IDLE, BOOTING))
        if len(self.queue) > supply:
            self._episode_at = self.now

    def _idle_vms(self) -> list[Vm]:
        return [vm for vm in self.vms.values() if vm.state == IDLE and vm.accepting]

    def _dispatch(self, kind: int, arg: int) -> None:
        if kind == _ARRIVE:
            self.queue.append(arg)
            for vm in self._idle_vms():
                self._assign(vm)
                break
            self._open_episode()
        elif kind == _LOCK_EXPIRED:
            self.locked -= 1
            self.queue.appendleft(arg)  # a redelivered message keeps its place at the head
            for vm in self._idle_vms():
                self._assign(vm)
                break
            self._open_episode()
        elif kind == _BOOTED:
            vm_or_none = self.vms.get(arg)
            if vm_or_none is not None and vm_or_none.state == BOOTING:
                self._set_state(vm_or_none, IDLE)
                self.autoscaler.on_ready(self, vm_or_none)
                self._assign(vm_or_none)
        elif kind == _STAGED:
            vm_or_none = self._current(arg)
            if vm_or_none is not None and vm_or_none.state == STAGING and vm_or_none.job is not None:
                self._set_state(vm_or_none, RUNNING)
                self._push(self.now + self.trace.jobs[vm_or_none.job].run_s, _RAN, arg)
        elif kind == _RAN:
            vm_or_none = self._current(arg)
            if vm_or_none is not None and vm_or_none.state == RUNNING and vm_or_none.job is not None:
                self._finish(vm_or_none)
        else:
            self._dispatch_timers(kind, arg)

    def _current(self, tagged: int) -> Vm | None:
        """The VM of a job event, if the job it was scheduled for is still the VM's current one.

        A worker whose job was killed (KEDA removed its pod) and that then took another job must not have the
        new job staged or finished by the old job's timers.
        """
        vm = self.vms.get(tagged >> 20)
        return vm if vm is not None and vm.idle_epoch & 0xFFFFF == tagged & 0xFFFFF else None

    def _dispatch_timers(self, kind: int, arg: int) -> None:
        if kind in (_RETIRE, _SELF_DESTROY):
            self._retire_step(kind, arg)
        elif kind == _MINUTE:
            self._sample_metric()
        elif kind in (_EVICT, _EVICTED):
            self._evict_step(kind, arg)

    def _finish(self, vm: Vm) -> None:
        assert vm.job is not None
        job = vm.job
        self.locked -= 1
        self.completed += 1
        self._done_at[job] = self.now
        self._waits.append(self._start_at[job] - self.trace.jobs[job].arrival_s)
        vm.job = None
        self._set_state(vm, IDLE)
        if vm.draining:
            self.remove(vm)
        else:
            self._assign(vm)

    def _retire_step(self, kind: int, vid: int) -> None:
        vm = self.vms.get(vid >> 20)
        if vm is None:
            return
        if kind == _RETIRE:
            if vm.state == IDLE and vm.accepting and vm.idle_epoch == vid & 0xFFFFF:
                vm.accepting = False
                vm.retiring = True
                self._push(self.now + self.world.self_destroy_after_s, _SELF_DESTROY, vid)
        elif vm.retiring:
            if self.arm_write():
                self.remove(vm)
            else:
                self._push(self.now + self.next_token_in(), _SELF_DESTROY, vid)

    def schedule_retire(self, vm: Vm, after_s: float) -> None:
        """A scalebus worker stops taking work after ``after_s`` idle; the controller (or itself) deletes it."""
        self._push(self.now + after_s, _RETIRE, _tagged(vm))

    def _sample_metric(self) -> None:
        lag = self._lag_rng.uniform(self.world.metric_lag_min_s, self.world.metric_lag_max_s)
        self.metric_samples.append((self.now + lag, self.now, len(self.queue), len(self.queue) + self.locked))
        if len(self.metric_samples) > 64:
            del self.metric_samples[:32]
        if not self._finished():
            self._push(self.now + self.world.metric_grain_s, _MINUTE, 0)

    def _evict_step(self, kind: int, vid: int) -> None:
        if kind == _EVICT:
            candidates = [vm for vm in self.vms.values() if vm.state != BOOTING and not vm.draining]
            if not candidates:
                return
            vm = candidates[self.evict_rng.randrange(len(candidates))]
            vm.accepting = False
            vm.draining = True
            if vm.state in _BUSY and vm.job is not None:  # the worker gives its job back on the notice
                self.evicted_busy += 1
                self.locked -= 1
                self.queue.appendleft(vm.job)
                vm.job = None
                self._set_state(vm, IDLE)
                for other in self._idle_vms():
                    self._assign(other)
                    break
            self._push(self.now + self.world.eviction_notice_s, _EVICTED, vm.vid)
        else:
            vm_or_none = self.vms.get(vid)
            if vm_or_none is not None:
                self._set_state(vm_or_none, GONE)
                del self.vms[vid]
        self._changed = True

    def _finished(self) -> bool:
        return self.completed == len(self.trace.jobs) and not self.vms

    def run(self) -> RunMetrics:
        period = self.autoscaler.period_s
        end_of_time = (self.arrivals[-1] if self.arrivals else 0.0) + 24 * HOUR
        while self._heap:
            at, _, kind, arg = heapq.heappop(self._heap)
            if at > end_of_time:
                break
            self.now = at
            if kind in (_TICK, _WAKE):
                if kind == _TICK:
                    self._tick_pending = False
                self.autoscaler.tick(self)
                self._changed = False
                if period > 0 and not self._tick_pending and not self.autoscaler.quiet(self):
                    self._push(self.now + period, _TICK, 0)
                    self._tick_pending = True
            else:
                self._dispatch(kind, arg)
                self._changed = True
                if period == 0:
                    self.autoscaler.tick(self)
                elif not self._tick_pending:
                    self._push((math.floor(self.now / period) + 1) * period, _TICK, 0)
                    self._tick_pending = True
            if self._record and (not self.timeline or self.now - self.timeline[-1][0] >= self._plot_step):
                self.timeline.append((self.now, len(self.queue), len(self.vms), self.busy()))
            if self._finished():
                break
        for vm in list(self.vms.values()):
            self._set_state(vm, vm.state)
        return self._metrics()

    @property
    def changed(self) -> bool:
        """Something happened since the controller's last tick."""
        return self._changed

    def _metrics(self) -> RunMetrics:
        hours = {key: value / HOUR for key, value in self._vm_seconds.items()}
        total = sum(hours.values())
        waits = sorted(self._waits)
        done = [at for at in self._done_at if not math.isnan(at)]
        return RunMetrics(
            reaction_s=statistics.fmean(self._reactions) if self._reactions else 0.0,
            wait_p50_s=_quantile(waits, 0.50),
            wait_p95_s=_quantile(waits, 0.95),
            makespan_s=(max(done) - self.arrivals[0]) if done else math.nan,
            vm_hours=total,
            booting_h=hours[BOOTING],
            idle_h=hours[IDLE],
            staging_h=hours[STAGING],
            running_h=hours[RUNNING],
            busy_killed=self.busy_killed,
            duplicates=sum(max(0, starts - 1) for starts in self._starts),
            arm_writes=self.arm_writes,
            arm_429=self.arm_429,
            cost_usd=total * self.trace.price_per_vm_hour,
            jobs_done=self.completed,
            evicted_busy=self.evicted_busy,
        )


def _tagged(vm: Vm) -> int:
    """An event argument naming the VM and its current busy spell (``idle_epoch`` changes on every idle)."""
    return (vm.vid << 20) | (vm.idle_epoch & 0xFFFFF)


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    position = q * (len(values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


# ------------------------------------------------------------------------------------------------ reports

METRICS = tuple(f.name for f in fields(RunMetrics))


@dataclass(frozen=True, slots=True)
class Estimate:
    mean: float
    ci95: float
    """Half-width of the 95 % confidence interval of the mean (Student t over seeds)."""

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "–"
        digits = 0 if abs(self.mean) >= 100 else 1 if abs(self.mean) >= 10 else 2
        return f"{self.mean:.{digits}f} ± {self.ci95:.{digits}f}"


def estimate(values: Sequence[float]) -> Estimate:
    clean = [value for value in values if not math.isnan(value)]
    if not clean:
        return Estimate(math.nan, math.nan)
    mean = statistics.fmean(clean)
    if len(clean) < 2:
        return Estimate(mean, 0.0)
    return Estimate(mean, _t975(len(clean) - 1) * statistics.stdev(clean) / math.sqrt(len(clean)))


def _t975(df: int) -> float:
    """Student t 97.5 % quantile (Cornish-Fisher expansion around the normal's 1.96; < 0.5 % off for df ≥ 3)."""
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True, slots=True)
class PolicyResult:
    trace: str
    policy: str
    runs: tuple[RunMetrics, ...]
    summary: dict[str, Estimate]

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace": self.trace,
            "policy": self.policy,
            "seeds": len(self.runs),
            "metrics": {name: {"mean": est.mean, "ci95": est.ci95} for name, est in self.summary.items()},
        }


TABLE_COLUMNS = (
    ("reaction_s", "reaction s"),
    ("wait_p50_s", "wait p50 s"),
    ("wait_p95_s", "wait p95 s"),
    ("makespan_s", "makespan s"),
    ("vm_hours", "VM-h"),
    ("idle_h", "idle VM-h"),
    ("booting_h", "booting VM-h"),
    ("busy_killed", "busy killed"),
    ("duplicates", "duplicates"),
    ("arm_writes", "ARM writes"),
    ("arm_429", "429s"),
    ("cost_usd", "cost $"),
)


@dataclass(frozen=True, slots=True)
class SimulationReport:
    trace: str
    seeds: int
    results: tuple[PolicyResult, ...]
    plot: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace": self.trace,
            "seeds": self.seeds,
            "plot": str(self.plot) if self.plot else None,
            "results": [result.to_dict() for result in self.results],
        }

    def rows(self) -> list[dict[str, str]]:
        """One row per policy, columns in display order, ``mean ± 95 % CI`` over seeds."""
        return [
            {"trace": result.trace, "policy": result.policy}
            | {label: str(result.summary[name]) for name, label in TABLE_COLUMNS}
            for result in self.results
        ]

    def result(self, policy: str) -> PolicyResult:
        for result in self.results:
            if result.policy == policy:
                return result
        raise KeyError(policy)


# ------------------------------------------------------------------------------------------------ entry point

POLICIES = ("scalebus", "scalebus-monitor", "keda", "azure-autoscale", "batch", "oracle")


def make_autoscaler(name: str, trace: traces.Trace, world: World) -> Autoscaler:
    from scalebus.simulator import baselines  # baselines import this module's types

    factories: dict[str, Callable[[], Autoscaler]] = {
        "scalebus": lambda: baselines.ScalebusAutoscaler(trace, world, monitor=False),
        "scalebus-monitor": lambda: baselines.ScalebusAutoscaler(trace, world, monitor=True),
        "keda": lambda: baselines.KedaAutoscaler(trace),
        "azure-autoscale": lambda: baselines.AzureAutoscaler(trace),
        "batch": lambda: baselines.BatchAutoscaler(trace),
        "oracle": lambda: baselines.OracleAutoscaler(trace, world),
    }
    if name not in factories:
        raise errors.UserInputError(f"unknown policy {name!r}: choose from {', '.join(POLICIES)}")
    return factories[name]()


def run_once(
    trace: traces.Trace, policy: str, *, seed: int, world: World | None = None, record: bool = False
) -> tuple[RunMetrics, list[tuple[float, int, int, int]]]:
    """One seeded run; returns its metrics and (with ``record``) the (t, waiting, VMs, busy) timeline."""
    world = world or World()
    sim = Simulation(trace, make_autoscaler(policy, trace, world), seed=seed, world=world, record=record)
    return sim.run(), sim.timeline


def run_simulation(
    trace: str,
    policies: Sequence[str],
    seeds: int,
    plot: Path | None = None,
    *,
    world: World | None = None,
    max_instances: int | None = None,
) -> SimulationReport:
    """Replay ``trace`` (``builtin:NAME``, a built-in name, or a CSV path) through each policy on seeds 0..n-1.

    ``max_instances`` overrides the trace's fleet cap, for every policy alike.
    """
    if seeds < 1:
        raise errors.UserInputError("--seeds must be at least 1")
    if max_instances is not None and max_instances < 1:
        raise errors.UserInputError("--max-instances must be at least 1")
    for name in policies:
        if name not in POLICIES:
            raise errors.UserInputError(f"unknown policy {name!r}: choose from {', '.join(POLICIES)}")
    make_trace = traces.load(trace)
    per_seed = [make_trace(seed) for seed in range(seeds)]
    if max_instances is not None:
        per_seed = [replace(seeded, max_instances=max_instances) for seeded in per_seed]
    results = []
    timelines: dict[str, list[tuple[float, int, int, int]]] = {}
    for name in policies:
        runs = []
        for seed, seeded in enumerate(per_seed):
            metrics, timeline = run_once(
                seeded, name, seed=seed, world=world, record=plot is not None and seed == 0
            )
            runs.append(metrics)
            if timeline:
                timelines[name] = timeline
        summary = {metric: estimate([float(getattr(run, metric)) for run in runs]) for metric in METRICS}
        results.append(PolicyResult(per_seed[0].name, name, tuple(runs), summary))
    if plot is not None:
        draw_plot(plot, per_seed[0].name, timelines)
    return SimulationReport(per_seed[0].name, seeds, tuple(results), plot)


def draw_plot(path: Path, trace: str, timelines: dict[str, list[tuple[float, int, int, int]]]) -> None:
    """Queue depth, VMs and busy VMs over time, one panel per policy (seed 0), as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise errors.UserInputError("plotting needs matplotlib: pip install 'scalebus[plot]'") from None
    fig, axes = plt.subplots(len(timelines), 1, figsize=(11, 2.4 * len(timelines)), sharex=True, squeeze=False)
    for ax, (name, timeline) in zip(axes[:, 0], timelines.items(), strict=True):
        hours = [point[0] / HOUR for point in timeline]
        ax.step(hours, [point[1] for point in timeline], where="post", label="waiting jobs", color="tab:red")
        ax.step(hours, [point[2] for point in timeline], where="post", label="VMs", color="tab:blue")
        ax.step(hours, [point[3] for point in timeline], where="post", label="busy VMs", color="tab:green")
        ax.set_title(f"{trace} — {name}", fontsize=9, loc="left")
        ax.set_ylabel("count")
        ax.set_yscale("symlog", linthresh=10)
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("hours")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise errors.UserInputError(f"cannot write plot {path} ({exc.strerror}): choose a writable path") from None
    finally:
        plt.close(fig)


__all__ = [
    "POLICIES",
    "Autoscaler",
    "Estimate",
    "PolicyResult",
    "RunMetrics",
    "Simulation",
    "SimulationReport",
    "Vm",
    "World",
    "run_once",
    "run_simulation",
]

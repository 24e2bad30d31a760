"""The Prometheus recorders: the only module that imports ``prometheus_client``.

Names follow https://prometheus.io/docs/practices/naming/: the ``scalebus_`` prefix, base units in the name
(``_seconds``, ``_bytes``), ``_total`` on counters, and labels only where summing over them means something
(instances by ``state`` add up to the fleet; active and in-flight messages do not add up on Service Bus, whose
active count includes locked messages, so they are separate gauges). Every series carries its ``pool`` (a name
from the config), so one controller's pools and their workers are told apart. Every label has a bounded set of
values (:mod:`scalebus.observability.recorder`). Each recorder has its own ``CollectorRegistry``: no process-wide
state, so tests and two recorders in one process do not see each other's series.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import prometheus_client
from prometheus_client import core as prometheus_core
from prometheus_client import exposition

from scalebus import errors
from scalebus.backends import base
from scalebus.observability import recorder
from scalebus.observability.recorder import DecisionLike, Health, ObservationLike
from scalebus.settings import DEFAULT_POOL

QUICK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
"""ARM calls and staging: sub-second reads to a capacity write that waits for VMs (minutes)."""
JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 172800.0)
"""Waits and runs of jobs: seconds to the 48 h default job timeout."""


SCALE_SET_OPERATIONS = (
    "get_capacity",
    "list_instances",
    "set_capacity",
    "delete_instances",
    "set_protection",
    "instance_states",
)
"""The ``operation`` label: the calls of the scale-set port (``metered.MeteredScaleSet`` books them)."""


class ArmStatsLike(Protocol):
    """The Azure scale-set adapter's wire counters (``backends.azure.compute.ArmCallStats`` fits)."""

    @property
    def calls(self) -> int: ...

    @property
    def writes(self) -> int: ...

    @property
    def throttled(self) -> int: ...

    @property
    def server_errors(self) -> int: ...

    @property
    def ratelimit_remaining(self) -> int | None: ...


class _Exporter:
    def __init__(self, health: Health) -> None:
        self.health = health
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)

    def render(self) -> tuple[bytes, str]:
        return prometheus_client.generate_latest(self.registry), exposition.CONTENT_TYPE_LATEST


class ControllerExporter(_Exporter):
    """The controller's metrics: one registry, every series labelled with its ``pool`` (a name from the config:
    a bounded set). Each pool records through its own :class:`ControllerPoolRecorder` (:meth:`pool`)."""

    def __init__(self, health: Health, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(health)
        self.clock = clock
        r = self.registry
        self.active = prometheus_client.Gauge(
            "scalebus_queue_active_messages",
            "Messages waiting to be received (the depth source's count).",
            ["pool"],
            registry=r,
        )
        self.in_flight = prometheus_client.Gauge(
            "scalebus_queue_in_flight_messages",
            "Messages locked by a receiver (NaN when the depth source cannot tell).",
            ["pool"],
            registry=r,
        )
        self.dead_lettered = prometheus_client.Gauge(
            "scalebus_queue_dead_lettered_messages", "Messages in the dead-letter queue.", ["pool"], registry=r
        )
        self.depth_age = prometheus_client.Gauge(
            "scalebus_queue_depth_age_seconds",
            "How old the last depth sample was when the round read it.",
            ["pool"],
            registry=r,
        )
        self.instances = prometheus_client.Gauge(
            "scalebus_scale_set_instances",
            "Instances the scale set lists, by state.",
            ["pool", "state"],
            registry=r,
        )
        self.capacity = prometheus_client.Gauge(
            "scalebus_scale_set_capacity", "The scale set's target capacity as last read.", ["pool"], registry=r
        )
        self.target = prometheus_client.Gauge(
            "scalebus_controller_target_capacity", "The capacity the last round decided on.", ["pool"], registry=r
        )
        self.demand = prometheus_client.Gauge(
            "scalebus_controller_demand_instances",
            "Instances the work needs, before the min/max bounds.",
            ["pool"],
            registry=r,
        )
        self.decisions = prometheus_client.Counter(
            "scalebus_controller_decisions_total",
            "Rounds decided, by why (a bounded reason).",
            ["pool", "reason"],
            registry=r,
        )
        self.round_failures = prometheus_client.Counter(
            "scalebus_controller_round_failures_total",
            "Rounds that failed reading a backend, by kind.",
            ["pool", "kind"],
            registry=r,
        )
        self.last_round = prometheus_client.Gauge(
            "scalebus_controller_last_round_timestamp_seconds",
            "When the last round succeeded (epoch).",
            ["pool"],
            registry=r,
        )
        self.calls = prometheus_client.Counter(
            "scalebus_scale_set_calls_total",
            "Scale-set port calls, by operation.",
            ["pool", "operation"],
            registry=r,
        )
        self.call_errors = prometheus_client.Counter(
            "scalebus_scale_set_call_errors_total",
            "Scale-set port calls that failed (after the adapter's own retries), by operation and kind.",
            ["pool", "operation", "kind"],
            registry=r,
        )
        self.call_seconds = prometheus_client.Histogram(
            "scalebus_scale_set_call_duration_seconds",
            "How long scale-set port calls took, by operation (set_capacity: the capacity write, to its end).",
            ["pool", "operation"],
            buckets=QUICK_BUCKETS,
            registry=r,
        )
        self._arm = _ArmCollector()
        self.registry.register(self._arm)
        self._pools: dict[str, ControllerPoolRecorder] = {}

    def pool(self, name: str) -> ControllerPoolRecorder:
        """The recorder of pool ``name`` (created, with its known series at 0, on first use)."""
        if name not in self._pools:
            self._pools[name] = ControllerPoolRecorder(self, name)
        return self._pools[name]

    def watch_arm(self, pool: str, stats: Callable[[], ArmStatsLike]) -> None:
        """Expose the pool's adapter wire counters (every request, retry and poll), read at each scrape."""
        self._arm.watch(pool, stats)


class ControllerPoolRecorder:
    """One pool's rounds and scale-set calls (a ``ControllerMetrics`` and a ``metered.CallRecorder``)."""

    def __init__(self, exporter: ControllerExporter, pool: str) -> None:
        self._x = exporter
        self.name = pool
        self.health = exporter.health
        # series known in advance start at 0, so rate() and the dashboard see them before the first event
        # (https://prometheus.io/docs/practices/instrumentation/#avoid-missing-metrics)
        for reason in recorder.DecisionReason:
            exporter.decisions.labels(pool, reason.value)
        for operation in SCALE_SET_OPERATIONS:
            exporter.calls.labels(pool, operation)
            for kind in recorder.ERROR_KINDS:
                exporter.call_errors.labels(pool, operation, kind)
        for kind in recorder.ERROR_KINDS:
            exporter.round_failures.labels(pool, kind)
        for state in base.InstanceState:
            exporter.instances.labels(pool, state.value).set(0)
        for gauge in (
            exporter.active,
            exporter.in_flight,
            exporter.dead_lettered,
            exporter.depth_age,
            exporter.capacity,
            exporter.target,
            exporter.demand,
            exporter.last_round,
        ):
            gauge.labels(pool)

    # ------------------------------------------------------------------ ControllerMetrics

    def round_done(self, obs: ObservationLike, decision: DecisionLike, *, next_in_s: float) -> None:
        x, pool = self._x, self.name
        depth = obs.depth
        x.active.labels(pool).set(depth.active)
        x.in_flight.labels(pool).set(math.nan if depth.in_flight is None else depth.in_flight)
        x.dead_lettered.labels(pool).set(depth.dead_lettered)
        x.depth_age.labels(pool).set(max(0.0, obs.now - depth.sampled_at))
        counts = dict.fromkeys(base.InstanceState, 0)
        for view in obs.instances:
            counts[view.state] += 1
        for state, count in counts.items():
            x.instances.labels(pool, state.value).set(count)
        x.capacity.labels(pool).set(obs.capacity)
        target = decision.capacity if decision.capacity is not None else obs.capacity - len(decision.delete)
        x.target.labels(pool).set(target)
        x.demand.labels(pool).set(decision.demand)
        x.decisions.labels(pool, recorder.classify_decision(decision).value).inc()
        x.last_round.labels(pool).set(x.clock())
        self.health.tick(next_in_s=next_in_s)
        self.health.mark_ready()

    def round_failed(self, exc: errors.BackendError, *, next_in_s: float) -> None:
        self._x.round_failures.labels(self.name, recorder.error_kind(exc)).inc()
        self.health.tick(next_in_s=next_in_s)

    def standing_by(self, *, next_in_s: float) -> None:
        self.health.tick(next_in_s=next_in_s)

    # ------------------------------------------------------------------ scale-set calls

    def scale_set_call(self, operation: str, *, seconds: float, error: BaseException | None) -> None:
        x, pool = self._x, self.name
        x.calls.labels(pool, operation).inc()
        x.call_seconds.labels(pool, operation).observe(seconds)
        if error is not None:
            x.call_errors.labels(pool, operation, recorder.error_kind(error)).inc()


class _ArmCollector:
    """A ``prometheus_client.registry.Collector``: yields every watched pool's ARM counters fresh at each scrape
    (one collector for all pools: a registry refuses two collectors of one metric name)."""

    def __init__(self) -> None:
        self._stats: dict[str, Callable[[], ArmStatsLike]] = {}

    def watch(self, pool: str, stats: Callable[[], ArmStatsLike]) -> None:
        self._stats[pool] = stats

    def describe(self) -> list[prometheus_core.Metric]:
        return []

    def collect(self) -> list[prometheus_core.Metric]:
        requests = prometheus_core.CounterMetricFamily(
            "scalebus_arm_requests", "ARM requests sent, by method class (read: GET).", labels=["pool", "method"]
        )
        throttled = prometheus_core.CounterMetricFamily(
            "scalebus_arm_throttled_responses", "ARM answers with 429 (throttled).", labels=["pool"]
        )
        server_errors = prometheus_core.CounterMetricFamily(
            "scalebus_arm_server_error_responses", "ARM answers with a 5xx status.", labels=["pool"]
        )
        remaining = prometheus_core.GaugeMetricFamily(
            "scalebus_arm_ratelimit_remaining",
            "The lowest x-ms-ratelimit-remaining-* count in ARM's last answer.",
            labels=["pool"],
        )
        for pool, read in self._stats.items():
            s = read()
            requests.add_metric([pool, "read"], s.calls - s.writes)
            requests.add_metric([pool, "write"], s.writes)
            throttled.add_metric([pool], s.throttled)
            server_errors.add_metric([pool], s.server_errors)
            if s.ratelimit_remaining is not None:
                remaining.add_metric([pool], s.ratelimit_remaining)
        found: list[prometheus_core.Metric] = [requests, throttled, server_errors]
        return [*found, remaining] if remaining.samples else found if self._stats else []


class WorkerExporter(_Exporter):
    """Records one worker's jobs: settlements, waits, staging, analytics, eviction notices. Every series carries
    the worker's ``pool``, so a dashboard groups the fleet's workers as it groups the controller's pools."""

    def __init__(
        self, health: Health, *, pool: str = DEFAULT_POOL, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(health)
        self._clock = clock
        self.pool = pool
        self._reasons = recorder.LabelBound()
        self._kinds = recorder.LabelBound(limit=8)
        r = self.registry
        self._jobs = prometheus_client.Counter(
            "scalebus_worker_jobs_total",
            "Messages settled, by outcome and a bounded reason (dead letter: its reason; abandon: whose fault).",
            ["pool", "outcome", "reason"],
            registry=r,
        )

        def timing(name: str, doc: str, buckets: Sequence[float]) -> Any:
            return prometheus_client.Histogram(name, doc, ["pool"], buckets=buckets, registry=r).labels(pool)

        def count(name: str, doc: str) -> Any:
            return prometheus_client.Counter(name, doc, ["pool"], registry=r).labels(pool)

        self.wait = timing(
            "scalebus_worker_job_wait_seconds",
            "From enqueue to first receipt (first deliveries only).",
            JOB_BUCKETS,
        )
        self.duration = timing("scalebus_worker_job_duration_seconds", "From receipt to settlement.", JOB_BUCKETS)
        self.analytics = timing(
            "scalebus_worker_analytics_duration_seconds", "How long the analytics ran.", JOB_BUCKETS
        )
        self.staging = timing(
            "scalebus_worker_staging_duration_seconds", "How long staging a job's inputs took.", QUICK_BUCKETS
        )
        self.staged_bytes = count("scalebus_worker_staged_bytes_total", "Input bytes staged.")
        self.staged_files = count("scalebus_worker_staged_files_total", "Input files staged.")
        self._notices = prometheus_client.Counter(
            "scalebus_worker_eviction_notices_total",
            "Eviction or deletion notices seen, by kind.",
            ["pool", "kind"],
            registry=r,
        )
        self.busy = prometheus_client.Gauge(
            "scalebus_worker_busy", "1 while the worker holds a message, else 0.", ["pool"], registry=r
        ).labels(pool)
        self._jobs.labels(pool, "complete", "")
        for notice in base.NoticeKind:
            self._notices.labels(pool, notice.value)

    # ------------------------------------------------------------------ WorkerMetrics

    def loop_tick(self, *, next_in_s: float) -> None:
        self.health.tick(next_in_s=next_in_s)
        self.health.mark_ready()

    def job_received(self, message: base.ReceivedMessage) -> None:
        self.health.hold()
        self.busy.set(1)
        if message.delivery_count == 1 and message.released == 0:
            self.wait.observe(max(0.0, self._clock() - message.enqueued_at))

    def job_settled(self, *, verdict: str, reason: str, cause: str, seconds: float) -> None:
        self.busy.set(0)
        self.duration.observe(max(0.0, seconds))
        self._jobs.labels(self.pool, verdict, self._label(verdict, reason, cause)).inc()

    def job_staged(self, *, files: int, size_bytes: int, seconds: float) -> None:
        self.staged_files.inc(files)
        self.staged_bytes.inc(size_bytes)
        self.staging.observe(max(0.0, seconds))

    def job_ran(self, *, seconds: float) -> None:
        self.analytics.observe(max(0.0, seconds))

    # ------------------------------------------------------------------ notices

    def notice_seen(self, kind: str) -> None:
        self._notices.labels(self.pool, self._kinds(kind) or "other").inc()

    def _label(self, verdict: str, reason: str, cause: str) -> str:
        if verdict == "dead_letter":
            return self._reasons(reason)
        if verdict == "abandon":
            return self._reasons(cause)
        if verdict == "let_go":
            return "lock_lost"
        if verdict == "given_back":
            return "evicted"
        return ""

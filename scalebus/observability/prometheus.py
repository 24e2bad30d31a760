"""The Prometheus recorders: the only module that imports ``prometheus_client``.

Names follow https://prometheus.io/docs/practices/naming/: the ``scalebus_`` prefix, base units in the name
(``_seconds``, ``_bytes``), ``_total`` on counters, and labels only where summing over them means something
(instances by ``state`` add up to the fleet; active and in-flight messages do not add up on Service Bus, whose
active count includes locked messages, so they are separate gauges). Every label has a bounded set of values
(:mod:`scalebus.observability.recorder`). Each recorder has its own ``CollectorRegistry``: no process-wide state,
so tests and two recorders in one process do not see each other's series.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

import prometheus_client
from prometheus_client import core as prometheus_core
from prometheus_client import exposition

from scalebus import errors
from scalebus.backends import base
from scalebus.observability import recorder
from scalebus.observability.recorder import DecisionLike, Health, ObservationLike

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
    """Records the controller's rounds and its scale-set calls."""

    def __init__(self, health: Health, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(health)
        self._clock = clock
        r = self.registry
        self.active = prometheus_client.Gauge(
            "scalebus_queue_active_messages",
            "Messages waiting to be received (the depth source's count).",
            registry=r,
        )
        self.in_flight = prometheus_client.Gauge(
            "scalebus_queue_in_flight_messages",
            "Messages locked by a receiver (NaN when the depth source cannot tell).",
            registry=r,
        )
        self.dead_lettered = prometheus_client.Gauge(
            "scalebus_queue_dead_lettered_messages", "Messages in the dead-letter queue.", registry=r
        )
        self.depth_age = prometheus_client.Gauge(
            "scalebus_queue_depth_age_seconds",
            "How old the last depth sample was when the round read it.",
            registry=r,
        )
        self.instances = prometheus_client.Gauge(
            "scalebus_scale_set_instances", "Instances the scale set lists, by state.", ["state"], registry=r
        )
        self.capacity = prometheus_client.Gauge(
            "scalebus_scale_set_capacity", "The scale set's target capacity as last read.", registry=r
        )
        self.target = prometheus_client.Gauge(
            "scalebus_controller_target_capacity", "The capacity the last round decided on.", registry=r
        )
        self.demand = prometheus_client.Gauge(
            "scalebus_controller_demand_instances",
            "Instances the work needs, before the min/max bounds.",
            registry=r,
        )
        self.decisions = prometheus_client.Counter(
            "scalebus_controller_decisions_total",
            "Rounds decided, by why (a bounded reason).",
            ["reason"],
            registry=r,
        )
        self.round_failures = prometheus_client.Counter(
            "scalebus_controller_round_failures_total",
            "Rounds that failed reading a backend, by kind.",
            ["kind"],
            registry=r,
        )
        self.last_round = prometheus_client.Gauge(
            "scalebus_controller_last_round_timestamp_seconds",
            "When the last round succeeded (epoch).",
            registry=r,
        )
        self.calls = prometheus_client.Counter(
            "scalebus_scale_set_calls_total", "Scale-set port calls, by operation.", ["operation"], registry=r
        )
        self.call_errors = prometheus_client.Counter(
            "scalebus_scale_set_call_errors_total",
            "Scale-set port calls that failed (after the adapter's own retries), by operation and kind.",
            ["operation", "kind"],
            registry=r,
        )
        self.call_seconds = prometheus_client.Histogram(
            "scalebus_scale_set_call_duration_seconds",
            "How long scale-set port calls took, by operation (set_capacity: the capacity write, to its end).",
            ["operation"],
            buckets=QUICK_BUCKETS,
            registry=r,
        )
        # series known in advance start at 0, so rate() and the dashboard see them before the first event
        # (https://prometheus.io/docs/practices/instrumentation/#avoid-missing-metrics)
        for reason in recorder.DecisionReason:
            self.decisions.labels(reason.value)
        for operation in SCALE_SET_OPERATIONS:
            self.calls.labels(operation)
            for kind in recorder.ERROR_KINDS:
                self.call_errors.labels(operation, kind)
        for kind in recorder.ERROR_KINDS:
            self.round_failures.labels(kind)
        for state in base.InstanceState:
            self.instances.labels(state.value).set(0)

    # ------------------------------------------------------------------ ControllerMetrics

    def round_done(self, obs: ObservationLike, decision: DecisionLike, *, next_in_s: float) -> None:
        depth = obs.depth
        self.active.set(depth.active)
        self.in_flight.set(math.nan if depth.in_flight is None else depth.in_flight)
        self.dead_lettered.set(depth.dead_lettered)
        self.depth_age.set(max(0.0, obs.now - depth.sampled_at))
        counts = dict.fromkeys(base.InstanceState, 0)
        for view in obs.instances:
            counts[view.state] += 1
        for state, count in counts.items():
            self.instances.labels(state.value).set(count)
        self.capacity.set(obs.capacity)
        target = decision.capacity if decision.capacity is not None else obs.capacity - len(decision.delete)
        self.target.set(target)
        self.demand.set(decision.demand)
        self.decisions.labels(recorder.classify_decision(decision).value).inc()
        self.last_round.set(self._clock())
        self.health.tick(next_in_s=next_in_s)
        self.health.mark_ready()

    def round_failed(self, exc: errors.BackendError, *, next_in_s: float) -> None:
        self.round_failures.labels(recorder.error_kind(exc)).inc()
        self.health.tick(next_in_s=next_in_s)

    def standing_by(self, *, next_in_s: float) -> None:
        self.health.tick(next_in_s=next_in_s)

    # ------------------------------------------------------------------ scale-set calls

    def scale_set_call(self, operation: str, *, seconds: float, error: BaseException | None) -> None:
        self.calls.labels(operation).inc()
        self.call_seconds.labels(operation).observe(seconds)
        if error is not None:
            self.call_errors.labels(operation, recorder.error_kind(error)).inc()

    def watch_arm(self, stats: Callable[[], ArmStatsLike]) -> None:
        """Expose the adapter's wire counters (every request, retry and poll), read at each scrape."""
        self.registry.register(_ArmCollector(stats))


class _ArmCollector:
    """A ``prometheus_client.registry.Collector``: yields the ARM counters fresh at each scrape."""

    def __init__(self, stats: Callable[[], ArmStatsLike]) -> None:
        self._stats = stats

    def collect(self) -> list[prometheus_core.Metric]:
        s = self._stats()
        requests = prometheus_core.CounterMetricFamily(
            "scalebus_arm_requests", "ARM requests sent, by method class (read: GET).", labels=["method"]
        )
        requests.add_metric(["read"], s.calls - s.writes)
        requests.add_metric(["write"], s.writes)
        found: list[prometheus_core.Metric] = [
            requests,
            prometheus_core.CounterMetricFamily(
                "scalebus_arm_throttled_responses", "ARM answers with 429 (throttled).", value=s.throttled
            ),
            prometheus_core.CounterMetricFamily(
                "scalebus_arm_server_error_responses", "ARM answers with a 5xx status.", value=s.server_errors
            ),
        ]
        if s.ratelimit_remaining is not None:
            found.append(
                prometheus_core.GaugeMetricFamily(
                    "scalebus_arm_ratelimit_remaining",
                    "The lowest x-ms-ratelimit-remaining-* count in ARM's last answer.",
                    value=s.ratelimit_remaining,
                )
            )
        return found


class WorkerExporter(_Exporter):
    """Records one worker's jobs: settlements, waits, staging, analytics, eviction notices."""

    def __init__(self, health: Health, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(health)
        self._clock = clock
        self._reasons = recorder.LabelBound()
        self._kinds = recorder.LabelBound(limit=8)
        r = self.registry
        self.jobs = prometheus_client.Counter(
            "scalebus_worker_jobs_total",
            "Messages settled, by outcome and a bounded reason (dead letter: its reason; abandon: whose fault).",
            ["outcome", "reason"],
            registry=r,
        )
        self.wait = prometheus_client.Histogram(
            "scalebus_worker_job_wait_seconds",
            "From enqueue to first receipt (first deliveries only).",
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.duration = prometheus_client.Histogram(
            "scalebus_worker_job_duration_seconds", "From receipt to settlement.", buckets=JOB_BUCKETS, registry=r
        )
        self.analytics = prometheus_client.Histogram(
            "scalebus_worker_analytics_duration_seconds",
            "How long the analytics ran.",
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.staging = prometheus_client.Histogram(
            "scalebus_worker_staging_duration_seconds",
            "How long staging a job's inputs took.",
            buckets=QUICK_BUCKETS,
            registry=r,
        )
        self.staged_bytes = prometheus_client.Counter(
            "scalebus_worker_staged_bytes_total", "Input bytes staged.", registry=r
        )
        self.staged_files = prometheus_client.Counter(
            "scalebus_worker_staged_files_total", "Input files staged.", registry=r
        )
        self.notices = prometheus_client.Counter(
            "scalebus_worker_eviction_notices_total",
            "Eviction or deletion notices seen, by kind.",
            ["kind"],
            registry=r,
        )
        self.busy = prometheus_client.Gauge(
            "scalebus_worker_busy", "1 while the worker holds a message, else 0.", registry=r
        )
        self.jobs.labels("complete", "")
        for notice in base.NoticeKind:
            self.notices.labels(notice.value)

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
        self.jobs.labels(verdict, self._label(verdict, reason, cause)).inc()

    def job_staged(self, *, files: int, size_bytes: int, seconds: float) -> None:
        self.staged_files.inc(files)
        self.staged_bytes.inc(size_bytes)
        self.staging.observe(max(0.0, seconds))

    def job_ran(self, *, seconds: float) -> None:
        self.analytics.observe(max(0.0, seconds))

    # ------------------------------------------------------------------ notices

    def notice_seen(self, kind: str) -> None:
        self.notices.labels(self._kinds(kind) or "other").inc()

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

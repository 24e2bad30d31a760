"""The metrics recorders, the health clock, the endpoints and the watchdog, with plain values and real sockets.

The policy cases run the real ``policy.decide`` so a reworded reason sentence that no longer maps to its label
fails here. Exposition is read back with ``prometheus_client``'s own parser, as a Prometheus server would.
"""

from __future__ import annotations

import ast
import json
import math
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from scalebus import errors
from scalebus.backends import base
from scalebus.controller import loop, policy
from scalebus.observability import metered, prometheus, recorder, server, telemetry, watchdog
from scalebus.observability.recorder import DecisionReason, Health
from scalebus.settings import ControllerSettings, MetricsSettings

ROOT = Path(__file__).resolve().parents[2]
NOW = 100_000.0
S = base.InstanceState


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(body: bytes, name: str, **labels: str) -> float:
    """One sample; every series carries a ``pool``, ``default`` unless named."""
    labels.setdefault("pool", "default")
    return samples(body)[(name, tuple(sorted(labels.items())))]


def view(iid: str, state: base.InstanceState = S.RUNNING) -> policy.InstanceView:
    return policy.InstanceView(iid, state, NOW - 900, worker=base.WorkerState.IDLE, last_beat_at=NOW - 1)


def observe(active: int, instances: Sequence[policy.InstanceView], **extra: object) -> policy.Observation:
    depth = base.DepthSample(active, 0, 0, sampled_at=NOW)
    return policy.Observation(
        now=NOW,
        depth=depth,
        capacity=len(instances),
        instances=tuple(instances),
        **extra,  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------------------------------- bounded reasons


def test_the_policy_reasons_map_to_their_labels() -> None:
    cfg = ControllerSettings(max_instances=4)
    state = policy.initial_state()
    satisfied, state = policy.decide(observe(0, [view("a")]), state, cfg)
    assert recorder.classify_decision(satisfied) is DecisionReason.SATISFIED, satisfied.reason
    confirming, state = policy.decide(observe(3, []), state, cfg)
    assert recorder.classify_decision(confirming) is DecisionReason.CONFIRMING, confirming.reason
    later = policy.Observation(
        now=NOW + 5, depth=base.DepthSample(3, 0, 0, sampled_at=NOW + 5), capacity=0, instances=()
    )
    out, state = policy.decide(later, state, cfg)
    assert recorder.classify_decision(out) is DecisionReason.SCALE_OUT, out.reason
    in_flight, _ = policy.decide(observe(3, [], write_in_flight=True), policy.initial_state(), cfg)
    assert recorder.classify_decision(in_flight) in (DecisionReason.WRITE_IN_FLIGHT, DecisionReason.CONFIRMING)


def test_every_phrase_the_labels_rely_on_is_still_in_the_policy() -> None:
    """The branches hard to reach from outside (boot back-off, spent write budget) are checked by their text."""
    source = (ROOT / "scalebus/controller/policy.py").read_text()
    for phrase, _ in recorder._REASON_MARKS:
        assert phrase in source, phrase


@pytest.mark.parametrize(
    ("capacity", "delete", "reason", "label"),
    [
        (5, (), "anything", DecisionReason.SCALE_OUT),
        (None, ("i1",), "x; deleting failed i1", DecisionReason.DELETE),
        (None, (), "3 need 2; 1 instance(s) to delete wait for the write budget", DecisionReason.OTHER),
        (None, (), "something new", DecisionReason.OTHER),
    ],
    ids=["write-wins", "deletions", "deletion-suffix-ignored", "unknown"],
)
def test_classify_decision_table(
    capacity: int | None, delete: tuple[str, ...], reason: str, label: DecisionReason
) -> None:
    decision = policy.Decision(capacity=capacity, delete=delete, reason=reason)
    assert recorder.classify_decision(decision) is label


def test_label_bound_keeps_identifiers_and_caps_how_many() -> None:
    bound = recorder.LabelBound(limit=2)
    assert bound("SecretNotFound") == "SecretNotFound"
    assert bound("the body is not JSON: {") == "other"
    assert bound("") == ""
    assert bound("InvalidJson") == "InvalidJson"
    assert bound("TooDeep") == "other"  # a third distinct value
    assert bound("SecretNotFound") == "SecretNotFound"  # one already seen stays itself


def test_error_kinds() -> None:
    assert recorder.error_kind(errors.AccessDeniedError("no")) == "access_denied"
    assert recorder.error_kind(errors.TransientScaleSetError("429")) == "transient"
    assert recorder.error_kind(errors.InstanceNotFoundError("gone")) == "permanent"
    assert recorder.error_kind(ValueError()) == "other"


# ------------------------------------------------------------------------------------------- health


def test_health_goes_503_once_the_loop_is_late_past_its_announced_wait() -> None:
    clock = FakeClock()
    health = Health(stall_s=10, clock=clock)
    assert health.live()[0]  # start-up counts as a tick
    assert health.ready() == (False, "starting: the first round is not done")
    health.tick(next_in_s=30)
    health.mark_ready()
    clock.now = 39.9
    assert health.live() == (True, "ok") and health.ready()[0]
    clock.now = 41
    alive, why = health.live()
    assert not alive and "11 s past its announced wait" in why
    assert not health.ready()[0]


def test_a_held_job_keeps_the_worker_alive_until_its_next_tick() -> None:
    clock = FakeClock()
    health = Health(stall_s=5, clock=clock)
    health.hold()
    clock.now = 10_000
    assert health.live()[0]
    health.tick(next_in_s=1)
    clock.now = 10_007
    assert not health.live()[0]


# ------------------------------------------------------------------------------------------- controller


class PoolExporter(prometheus.ControllerPoolRecorder):
    """The recorder of pool ``default`` with its exporter's exposition at hand."""

    def __init__(self) -> None:
        self.exporter = prometheus.ControllerExporter(Health(stall_s=60), clock=lambda: NOW)
        super().__init__(self.exporter, "default")

    def render(self) -> tuple[bytes, str]:
        return self.exporter.render()

    def watch_arm(self, stats: Callable[[], prometheus.ArmStatsLike]) -> None:
        self.exporter.watch_arm("default", stats)


def controller_exporter() -> PoolExporter:
    return PoolExporter()


def test_a_round_sets_depth_instances_capacity_and_counts_the_decision() -> None:
    exporter = controller_exporter()
    obs = policy.Observation(
        now=NOW,
        depth=base.DepthSample(7, 2, 1, sampled_at=NOW - 3),
        capacity=3,
        instances=(view("a"), view("b"), view("c", S.STARTING)),
    )
    decision = policy.Decision(capacity=6, delete=(), reason="scale out", demand=9)
    exporter.round_done(obs, decision, next_in_s=2)
    body, content_type = exporter.render()
    assert content_type.startswith("text/plain")
    assert value(body, "scalebus_queue_active_messages") == 7
    assert value(body, "scalebus_queue_in_flight_messages") == 2
    assert value(body, "scalebus_queue_dead_lettered_messages") == 1
    assert value(body, "scalebus_queue_depth_age_seconds") == 3
    assert value(body, "scalebus_scale_set_instances", state="running") == 2
    assert value(body, "scalebus_scale_set_instances", state="starting") == 1
    assert value(body, "scalebus_scale_set_instances", state="failed") == 0
    assert value(body, "scalebus_scale_set_capacity") == 3
    assert value(body, "scalebus_controller_target_capacity") == 6
    assert value(body, "scalebus_controller_demand_instances") == 9
    assert value(body, "scalebus_controller_decisions_total", reason="scale_out") == 1
    assert value(body, "scalebus_controller_decisions_total", reason="satisfied") == 0
    assert value(body, "scalebus_controller_last_round_timestamp_seconds") == NOW
    assert exporter.health.ready()[0]


def test_an_unknown_in_flight_count_is_nan_and_deletions_lower_the_target() -> None:
    exporter = controller_exporter()
    obs = policy.Observation(
        now=NOW, depth=base.DepthSample(0, None, 0, sampled_at=NOW), capacity=3, instances=(view("a"),)
    )
    exporter.round_done(obs, policy.Decision(None, ("x", "y"), "deleting"), next_in_s=2)
    body, _ = exporter.render()
    assert math.isnan(value(body, "scalebus_queue_in_flight_messages"))
    assert value(body, "scalebus_controller_target_capacity") == 1
    assert value(body, "scalebus_controller_decisions_total", reason="delete") == 1


class FakeScaleSet:
    """A scale set at our own port seam (``backends/base.ScaleSet``): fails ``set_capacity`` when told to."""

    def __init__(self, *, fail: errors.BackendError | None = None) -> None:
        self.capacity = 0
        self.fail = fail
        self.closed = False

    def get_capacity(self) -> int:
        return self.capacity

    def list_instances(self) -> list[base.Instance]:
        return []

    def set_capacity(self, capacity: int) -> None:
        if self.fail is not None:
            raise self.fail
        self.capacity = capacity

    def delete_instances(self, instance_ids: Sequence[str]) -> None:
        return None

    def set_protection(self, instance_id: str, *, protected: bool) -> None:
        return None

    def close(self) -> None:
        self.closed = True


def test_metered_scale_set_times_counts_and_passes_errors_through() -> None:
    exporter = controller_exporter()
    inner = FakeScaleSet()
    scale_set = metered.MeteredScaleSet(inner, exporter)
    scale_set.set_capacity(4)
    assert scale_set.get_capacity() == 4
    inner.fail = errors.TransientScaleSetError("429 from ARM")
    with pytest.raises(errors.TransientScaleSetError):
        scale_set.set_capacity(5)
    scale_set.close()
    assert inner.closed
    body, _ = exporter.render()
    assert value(body, "scalebus_scale_set_calls_total", operation="set_capacity") == 2
    assert value(body, "scalebus_scale_set_calls_total", operation="get_capacity") == 1
    assert value(body, "scalebus_scale_set_call_errors_total", operation="set_capacity", kind="transient") == 1
    assert value(body, "scalebus_scale_set_call_duration_seconds_count", operation="set_capacity") == 2


class ArmStats:
    """What ``backends.azure.compute.ArmCallStats`` holds (its fields, as plain values)."""

    calls = 10
    writes = 3
    throttled = 2
    server_errors = 1
    ratelimit_remaining: int | None = 107


def test_the_arm_wire_counters_are_read_at_each_scrape() -> None:
    exporter = controller_exporter()
    stats = ArmStats()
    exporter.watch_arm(lambda: stats)
    body, _ = exporter.render()
    assert value(body, "scalebus_arm_requests_total", method="read") == 7
    assert value(body, "scalebus_arm_requests_total", method="write") == 3
    assert value(body, "scalebus_arm_throttled_responses_total") == 2
    assert value(body, "scalebus_arm_server_error_responses_total") == 1
    assert value(body, "scalebus_arm_ratelimit_remaining") == 107
    stats.throttled = 5
    stats.ratelimit_remaining = None
    body, _ = exporter.render()
    assert value(body, "scalebus_arm_throttled_responses_total") == 5
    assert ("scalebus_arm_ratelimit_remaining", (("pool", "default"),)) not in samples(body)


class OneRoundDepth:
    """A depth source at our port seam that fails after its first reads, then stops the loop."""

    def __init__(self, stop: object) -> None:
        self.reads = 0
        self.stop = stop

    def read_depth(self) -> base.DepthSample:
        self.reads += 1
        if self.reads > 1:
            self.stop.set()  # type: ignore[attr-defined]
            raise errors.TransientQueueError("queue down")
        return base.DepthSample(0, 0, 0, sampled_at=NOW)

    def close(self) -> None:
        return None


class NoHeartbeats:
    def beat(self, heartbeat: base.Heartbeat) -> None:
        return None

    def read_all(self) -> list[base.Heartbeat]:
        return []

    def forget(self, instance_id: str) -> None:
        return None

    def publish_hint(self, hint: base.FleetHint) -> None:
        return None

    def read_hint(self) -> base.FleetHint | None:
        return None

    def close(self) -> None:
        return None


def test_the_controller_loop_reports_each_round_done_or_failed() -> None:
    import threading

    stop = threading.Event()
    exporter = controller_exporter()
    controller = loop.Controller(
        [
            loop.Pool(
                depth=OneRoundDepth(stop),
                scale_set=FakeScaleSet(),
                heartbeats=NoHeartbeats(),
                settings=ControllerSettings(poll_interval_s=0.01),
                metrics=exporter,
            )
        ],
        clock=lambda: NOW,
    )
    controller.run(stop)
    body, _ = exporter.render()
    assert value(body, "scalebus_controller_decisions_total", reason="satisfied") == 1
    assert value(body, "scalebus_controller_round_failures_total", kind="transient") == 1


# ------------------------------------------------------------------------------------------- worker


def received(*, delivery_count: int = 1, released: int = 0, enqueued_at: float = NOW - 42) -> base.ReceivedMessage:
    return base.ReceivedMessage("m", b"{}", "t", delivery_count, 1, enqueued_at, NOW + 30, released=released)


def test_worker_settlements_are_labelled_by_outcome_and_bounded_reason() -> None:
    exporter = prometheus.WorkerExporter(Health(stall_s=60), clock=lambda: NOW)
    exporter.job_received(received())
    exporter.job_received(received(delivery_count=2))  # a redelivery: its wait is not a queue wait
    exporter.job_staged(files=3, size_bytes=3000, seconds=0.5)
    exporter.job_ran(seconds=12)
    exporter.job_settled(verdict="complete", reason="", cause="job", seconds=13)
    exporter.job_settled(verdict="dead_letter", reason="SecretNotFound", cause="job", seconds=1)
    exporter.job_settled(verdict="dead_letter", reason="not an identifier!", cause="job", seconds=1)
    exporter.job_settled(verdict="abandon", reason="", cause="environment", seconds=1)
    exporter.job_settled(verdict="let_go", reason="", cause="job", seconds=1)
    exporter.notice_seen("Preempt")
    body, _ = exporter.render()
    assert value(body, "scalebus_worker_job_wait_seconds_count") == 1
    assert value(body, "scalebus_worker_job_wait_seconds_sum") == 42
    assert value(body, "scalebus_worker_jobs_total", outcome="complete", reason="") == 1
    assert value(body, "scalebus_worker_jobs_total", outcome="dead_letter", reason="SecretNotFound") == 1
    assert value(body, "scalebus_worker_jobs_total", outcome="dead_letter", reason="other") == 1
    assert value(body, "scalebus_worker_jobs_total", outcome="abandon", reason="environment") == 1
    assert value(body, "scalebus_worker_jobs_total", outcome="let_go", reason="lock_lost") == 1
    assert value(body, "scalebus_worker_staged_bytes_total") == 3000
    assert value(body, "scalebus_worker_staged_files_total") == 3
    assert value(body, "scalebus_worker_analytics_duration_seconds_sum") == 12
    assert value(body, "scalebus_worker_job_duration_seconds_count") == 5
    assert value(body, "scalebus_worker_eviction_notices_total", kind="Preempt") == 1
    assert value(body, "scalebus_worker_busy") == 0


class Notices:
    """A notice source at our port seam that returns the same pending notice on every poll (as IMDS does)."""

    def __init__(self) -> None:
        self.notice = base.Notice("e1", base.NoticeKind.PREEMPT, NOW + 30)

    def pending(self) -> list[base.Notice]:
        return [self.notice]

    def acknowledge(self, event_id: str) -> None:
        return None

    def close(self) -> None:
        return None


def test_a_notice_polled_again_is_counted_once() -> None:
    exporter = prometheus.WorkerExporter(Health(stall_s=60))
    notices = metered.CountedNotices(Notices(), exporter)
    assert len(notices.pending()) == 1
    notices.pending()
    body, _ = exporter.render()
    assert value(body, "scalebus_worker_eviction_notices_total", kind="Preempt") == 1


# ------------------------------------------------------------------------------------------- endpoints


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def served() -> Iterator[tuple[server.EndpointServer, Health, FakeClock]]:
    clock = FakeClock()
    health = Health(stall_s=5, clock=clock)
    exporter = prometheus.ControllerExporter(health)
    endpoints = server.serve(bind="127.0.0.1", port=0, render=exporter.render, health=health, role="test")
    assert endpoints is not None
    yield endpoints, health, clock
    endpoints.close()
    endpoints.close()  # twice is harmless


def test_endpoints_serve_metrics_health_and_readiness(
    served: tuple[server.EndpointServer, Health, FakeClock],
) -> None:
    endpoints, health, clock = served
    url = f"http://127.0.0.1:{endpoints.port}"
    status, body = get(url + "/metrics")
    assert status == 200
    assert any(f.name == "scalebus_controller_decisions" for f in text_string_to_metric_families(body))
    assert get(url + "/healthz")[0] == 200
    assert get(url + "/readyz") == (503, "starting: the first round is not done\n")
    health.tick(next_in_s=2)
    health.mark_ready()
    assert get(url + "/readyz")[0] == 200
    clock.now = 100  # the loop stalled
    status, body = get(url + "/healthz")
    assert status == 503 and "has not ticked" in body
    assert get(url + "/readyz")[0] == 503
    assert get(url + "/nope")[0] == 404


def test_a_port_taken_turns_the_endpoints_off_with_a_warning() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with structlog.testing.capture_logs() as logs:
            endpoints = server.serve(
                bind="127.0.0.1", port=port, render=lambda: (b"", "text/plain"), health=Health(stall_s=1), role="w"
            )
    assert endpoints is None
    assert [e["event"] for e in logs] == ["metrics_port_busy"]


def test_port_zero_serves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    report = telemetry.WorkerTelemetry(MetricsSettings())
    assert report.endpoints is None
    report.close()
    controller = telemetry.ControllerTelemetry(MetricsSettings())
    assert controller.endpoints is None
    controller.close()


# ------------------------------------------------------------------------------------------- watchdog


def test_watchdog_says_ready_after_the_first_good_round_and_pings_every_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(path))
        systemd.settimeout(2)
        dog = watchdog.Watchdog()
        assert dog.active
        dog.ping(ready=False)
        dog.ping(ready=True)
        dog.ping(ready=True)
        dog.close()
        dog.close()
        sent = [systemd.recv(64).decode() for _ in range(5)]
    assert sent == ["WATCHDOG=1", "READY=1", "WATCHDOG=1", "WATCHDOG=1", "STOPPING=1"]


def test_watchdog_without_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    dog = watchdog.Watchdog()
    assert not dog.active
    dog.ping(ready=True)
    dog.close()


# ------------------------------------------------------------------------------------------- boundaries


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.partition(".")[0])
    return names


def test_only_the_recorder_module_imports_prometheus_client_and_only_the_watchdog_sdnotify() -> None:
    importers: dict[str, list[str]] = {"prometheus_client": [], "sdnotify": []}
    for path in sorted((ROOT / "scalebus").rglob("*.py")):
        for name in imports_of(path) & importers.keys():
            importers[name].append(str(path.relative_to(ROOT)))
    assert importers == {
        "prometheus_client": ["scalebus/observability/prometheus.py"],
        "sdnotify": ["scalebus/observability/watchdog.py"],
    }


# ------------------------------------------------------------------------------------------- dashboard


def dashboard_metrics() -> set[str]:
    """Every ``scalebus_*`` series name the dashboard's queries read."""
    import re

    board = json.loads((ROOT / "docs/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    assert exprs, "the dashboard queries nothing"
    return {name for expr in exprs for name in re.findall(r"\bscalebus_[a-z_]+", expr)}


def exposed_names(body: bytes) -> set[str]:
    return {name for name, _ in samples(body)}


def test_every_metric_the_dashboard_queries_is_exposed() -> None:
    controller = controller_exporter()
    controller.watch_arm(ArmStats)
    metered.MeteredScaleSet(FakeScaleSet(), controller).set_capacity(1)
    controller.round_failed(errors.TransientQueueError("x"), next_in_s=1)
    worker = prometheus.WorkerExporter(Health(stall_s=60))
    worker.job_settled(verdict="abandon", reason="", cause="job", seconds=1)
    worker.notice_seen("Preempt")
    exposed = exposed_names(controller.render()[0]) | exposed_names(worker.render()[0])
    assert dashboard_metrics() - exposed == set()


# ------------------------------------------------------------------------------------------- container check


def run_healthcheck(port: int) -> int:
    import os
    import subprocess
    import sys

    env = {**os.environ, "SCALEBUS_METRICS__PORT": str(port)}
    script = ROOT / "docker/healthcheck.py"
    return subprocess.run([sys.executable, str(script)], env=env, timeout=30, check=False).returncode


def test_the_container_check_asks_healthz_when_metrics_are_on(
    served: tuple[server.EndpointServer, Health, FakeClock],
) -> None:
    endpoints, _, clock = served
    assert run_healthcheck(endpoints.port) == 0
    clock.now = 100  # the loop stalled: 503, whatever /proc shows
    assert run_healthcheck(endpoints.port) == 1


class ViewingScaleSet(FakeScaleSet):
    """A scale set that reads instance views on request (``base.InstanceViews``), as the VMSS adapter does."""

    def instance_states(self, instance_ids: Sequence[str]) -> dict[str, base.InstanceState]:
        return {iid: base.InstanceState.FAILED for iid in instance_ids}


def test_the_wrapper_keeps_exactly_the_optional_capabilities_of_what_it_wraps() -> None:
    exporter = controller_exporter()
    plain = metered.meter_scale_set(FakeScaleSet(), exporter)
    viewing = metered.meter_scale_set(ViewingScaleSet(), exporter)
    assert not isinstance(plain, base.InstanceViews)
    assert isinstance(viewing, base.InstanceViews)
    assert viewing.instance_states(["i1"]) == {"i1": base.InstanceState.FAILED}


# ------------------------------------------------------------------------------------------- pools


def test_two_pools_in_one_exporter_keep_their_own_series() -> None:
    exporter = prometheus.ControllerExporter(Health(stall_s=60), clock=lambda: NOW)
    short, long = exporter.pool("short"), exporter.pool("long")
    assert exporter.pool("short") is short
    short.round_done(observe(4, [view("a")]), policy.Decision(3, (), "scale out", demand=4), next_in_s=1)
    long.round_done(observe(0, []), policy.Decision(None, (), "0 need 0, 0 already provisioned"), next_in_s=1)
    metered.MeteredScaleSet(FakeScaleSet(), long).set_capacity(1)
    stats = ArmStats()
    exporter.watch_arm("long", lambda: stats)
    body, _ = exporter.render()
    assert value(body, "scalebus_queue_active_messages", pool="short") == 4
    assert value(body, "scalebus_queue_active_messages", pool="long") == 0
    assert value(body, "scalebus_controller_decisions_total", pool="short", reason="scale_out") == 1
    assert value(body, "scalebus_controller_decisions_total", pool="long", reason="scale_out") == 0
    assert value(body, "scalebus_controller_decisions_total", pool="long", reason="satisfied") == 1
    assert value(body, "scalebus_scale_set_calls_total", pool="long", operation="set_capacity") == 1
    assert value(body, "scalebus_scale_set_calls_total", pool="short", operation="set_capacity") == 0
    assert value(body, "scalebus_arm_throttled_responses_total", pool="long") == 2
    assert ("scalebus_arm_throttled_responses_total", (("pool", "short"),)) not in samples(body)


def test_a_workers_series_carry_its_pool() -> None:
    exporter = prometheus.WorkerExporter(Health(stall_s=60), pool="long", clock=lambda: NOW)
    exporter.job_received(received())
    exporter.job_settled(verdict="complete", reason="", cause="job", seconds=3)
    exporter.notice_seen("Preempt")
    body, _ = exporter.render()
    assert value(body, "scalebus_worker_jobs_total", pool="long", outcome="complete", reason="") == 1
    assert value(body, "scalebus_worker_job_wait_seconds_count", pool="long") == 1
    assert value(body, "scalebus_worker_eviction_notices_total", pool="long", kind="Preempt") == 1
    assert {dict(labels).get("pool") for _, labels in samples(body)} == {"long"}


def test_every_dashboard_query_filters_and_groups_by_pool() -> None:
    import re

    board = json.loads((ROOT / "docs/grafana-dashboard.json").read_text())
    assert "pool" in {v["name"] for v in board["templating"]["list"]}
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            selectors = re.findall(r"\bscalebus_[a-z_]+(\{[^}]*\})?", expr)
            assert selectors and all('pool=~"$pool"' in s for s in selectors), expr
            for aggregation in re.findall(r"\b(?:sum|min|max)\b(?: by \(([^)]*)\))?", expr):
                assert "pool" in aggregation.split(", "), expr
            assert "{{pool}}" in target.get("legendFormat", "{{pool}}"), target

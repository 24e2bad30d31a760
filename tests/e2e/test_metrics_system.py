"""Metrics and health scraped from a real controller and a real worker on the embedded default.

The controller (``scalebus controller run``) starts its one worker process itself; both serve ``[metrics]``.
The test scrapes them over HTTP while a slow job runs and parses the exposition with ``prometheus_client``'s
parser, as a Prometheus server would. A stalled loop answering 503 is covered in ``tests/unit/test_metrics.py``
with a fake clock.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e._system import System, assert_outputs_exactly_once, finish

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SQLITE_QUEUE = """url = "sqlite:///{root}/queue.db?queue=jobs"
lock_duration_s = 5
max_delivery_count = 3"""
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
POOL = (("pool", "default"),)
"""Every series carries its pool; a config without ``[[pools]]`` has the one pool ``default``."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> Samples | None:
    """Every sample at ``/metrics``, or ``None`` while nothing listens."""
    try:
        status, body = get(f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return None
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def wait_for(
    what: str, probe: Callable[[], Samples | None], ok: Callable[[Samples], bool], timeout_s: float = 30
) -> Samples:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last is not None and ok(last):
            return last
        time.sleep(0.2)
    pytest.fail(f"{what} not seen in {timeout_s} s; last scrape: {last}")


@pytest.fixture
def system(tmp_path: Path) -> System:
    return System(tmp_path, queue_table=SQLITE_QUEUE.format(root=tmp_path))


def test_controller_and_worker_serve_metrics_and_health(system: System) -> None:
    controller_port, worker_port = free_port(), free_port()
    text = system.config.read_text().replace("max_instances = 3", "max_instances = 1")
    system.config.write_text(text + f"[metrics]\nport = {controller_port}\nworker_port = {worker_port}\n")
    job_ids = ["job0", "slow1"]
    submitted = system.cli("submit", "-f", str(system.write_inputs(job_ids)))
    assert submitted.returncode == 0, submitted.stderr

    controller = system.start_controller()
    try:
        first = wait_for(
            "the controller's first round",
            lambda: scrape(controller_port),
            lambda s: (
                s.get(("scalebus_controller_decisions_total", (("pool", "default"), ("reason", "scale_out"))), 0)
                >= 1
            ),
        )
        assert (
            first[("scalebus_queue_active_messages", POOL)] + first[("scalebus_queue_in_flight_messages", POOL)]
            >= 1
        )
        assert get(f"http://127.0.0.1:{controller_port}/healthz")[0] == 200
        assert get(f"http://127.0.0.1:{controller_port}/readyz")[0] == 200

        worker = wait_for(
            "the worker running the slow job after completing the first",
            lambda: scrape(worker_port),
            lambda s: (
                s.get(
                    ("scalebus_worker_jobs_total", (("outcome", "complete"), ("pool", "default"), ("reason", ""))),
                    0,
                )
                == 1
                and s.get(("scalebus_worker_busy", POOL), 0) == 1
                and s.get(("scalebus_worker_staged_files_total", POOL), 0) == 2  # the slow one staged: it runs 4 s
            ),
        )
        assert worker[("scalebus_worker_staged_bytes_total", POOL)] == 1000 + len("job0") + 1000 + len("slow1")
        assert worker[("scalebus_worker_job_wait_seconds_count", POOL)] == 2
        assert worker[("scalebus_worker_analytics_duration_seconds_count", POOL)] == 1
        assert get(f"http://127.0.0.1:{worker_port}/healthz")[0] == 200

        during = wait_for(
            "the controller seeing the slow job in flight",
            lambda: scrape(controller_port),
            # a round the controller began before the first job completed may still be the latest it published
            lambda s: (
                s[("scalebus_queue_in_flight_messages", POOL)] == 1
                and s[("scalebus_queue_active_messages", POOL)] == 0
            ),
        )
        assert during[("scalebus_scale_set_instances", (("pool", "default"), ("state", "running")))] == 1
        assert (
            during[("scalebus_scale_set_calls_total", (("operation", "set_capacity"), ("pool", "default")))] >= 1
        )
        assert (
            during[
                (
                    "scalebus_scale_set_call_duration_seconds_count",
                    (("operation", "set_capacity"), ("pool", "default")),
                )
            ]
            >= 1
        )
        exposed = {name for name, _ in during} | {name for name, _ in worker}
        on_azure_only = {n for n in dashboard_metrics() if n.startswith("scalebus_arm_")}
        assert dashboard_metrics() - on_azure_only - exposed == set()
    except BaseException:
        controller.kill()
        controller.communicate()
        raise
    finish(controller)
    assert_outputs_exactly_once(system, job_ids)


def dashboard_metrics() -> set[str]:
    board = json.loads((ROOT / "docs/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    return {name for expr in exprs for name in re.findall(r"\bscalebus_[a-z_]+", expr)}

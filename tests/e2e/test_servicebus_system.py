"""The whole system as real processes on the Service Bus backend: submit, controller, worker pool, self-destroy.

The flow of ``test_embedded_system`` with ``queue.url = "servicebus://..."``: jobs travel over AMQP to the fake
broker (a thread of this pytest process, on 127.0.0.1), the controller reads the depth from the admin HTTPS fake
(``depth_source = "admin"``, which cannot tell in-flight work, so ``in_flight`` is ``None``) and the local pool
starts ``scalebus worker run`` processes that consume from the broker. The analytics program appends a line to
``runs.log`` per execution, so "exactly once" is counted, not assumed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from scalebus.backends import base
from scalebus.backends.azure import servicebus
from scalebus.settings import QueueSettings
from tests.e2e.test_embedded_system import ANALYTICS, _events, _finish
from tests.fakes.servicebus_amqp import ServiceBusBroker
from tests.fakes.servicebus_plugin import new_queue_name

pytestmark = pytest.mark.slow

LOCK_DURATION_S = 5.0
"""Service Bus's own minimum, and what the SDK's once-a-second AutoLockRenewer needs."""
MAX_DELIVERY_COUNT = 3


class ServiceBusSystem:
    def __init__(self, root: Path, queue: QueueSettings, environ: dict[str, str]) -> None:
        self.root = root
        self.queue = queue
        self.config = root / "scalebus.toml"
        (root / "analytics.py").write_text(ANALYTICS)
        self.config.write_text(f"""
[queue]
url = "{queue.url}"
connection_string_env = "{queue.connection_string_env}"
depth_source = "admin"
admin_endpoint = "{queue.admin_endpoint}"
connection_verify = "{queue.connection_verify}"
depth_cache_s = 0.5
[scale_set]
url = "local://"
state_path = "{root}/pool.db"
[controller]
max_instances = 3
poll_interval_s = 0.5
heartbeat_timeout_s = 10
exit_when_drained = true
[worker]
command = ["{sys.executable}", "{root}/analytics.py"]
work_dir = "{root}/work"
idle_timeout_s = 2
retire_wait_s = 1
receive_wait_s = 0.5
heartbeat_interval_s = 0.5
[staging]
min_free_bytes = 0
""")
        self.env = {**os.environ, **environ, "E2E_ROOT": str(root), "SCALEBUS_LOG__FORMAT": "json"}

    def cli(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "scalebus", *args, "--config", str(self.config)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def start_controller(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "scalebus", "controller", "run", "--config", str(self.config), "-o", "json"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def write_inputs(self, job_ids: list[str]) -> Path:
        lines = []
        for job_id in job_ids:
            folder = self.root / "lake" / job_id
            folder.mkdir(parents=True)
            (folder / "reads.fq").write_bytes(os.urandom(1000 + len(job_id)))
            lines.append(
                json.dumps(
                    {
                        "job_id": job_id,
                        "inputs": [folder.as_uri() + "/"],
                        "output": (self.root / "out" / job_id).as_uri() + "/",
                    }
                )
            )
        path = self.root / "jobs.jsonl"
        path.write_text("\n".join(lines))
        return path

    def send_poison(self, environ: dict[str, str], closer: concurrent.futures.Executor) -> None:
        """A message no worker can parse as a job (``submit`` would refuse it), sent through the production
        adapter as another producer might."""
        queue, depth = servicebus.open_servicebus(self.queue, environ=environ)
        try:
            queue.send([base.OutgoingMessage("poison", b'{"job_id": "poison", "inputs": "not-a-list"}')])
        finally:
            closer.submit(queue.close)
            if isinstance(depth, servicebus.ServiceBusAdminDepth):
                closer.submit(depth.close)

    def runs(self) -> list[str]:
        log = self.root / "runs.log"
        return log.read_text().split() if log.exists() else []

    def status(self) -> dict[str, object]:
        result = self.cli("status", "-o", "json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def sb_system(
    tmp_path: Path,
    servicebus_broker: ServiceBusBroker,
    servicebus_settings: Callable[..., tuple[QueueSettings, dict[str, str]]],
) -> tuple[ServiceBusSystem, dict[str, str], str]:
    name = new_queue_name("e2e")
    servicebus_broker.create_queue(name, lock_duration_s=LOCK_DURATION_S, max_delivery_count=MAX_DELIVERY_COUNT)
    queue, environ = servicebus_settings(name)
    return ServiceBusSystem(tmp_path, queue, environ), environ, name


def test_jobs_run_exactly_once_poison_is_dead_lettered_and_pool_empties_on_servicebus(
    sb_system: tuple[ServiceBusSystem, dict[str, str], str],
    servicebus_broker: ServiceBusBroker,
    servicebus_closer: concurrent.futures.ThreadPoolExecutor,
) -> None:
    system, environ, name = sb_system
    job_ids = [f"job{i}" for i in range(6)]
    submitted = system.cli("submit", "-f", str(system.write_inputs(job_ids)), "-o", "json")
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["submitted"] == len(job_ids)
    system.send_poison(environ, servicebus_closer)

    out, err = _finish(system.start_controller(), timeout_s=60)

    assert sorted(system.runs()) == sorted(job_ids), "each job's analytics ran exactly once"
    for job_id in job_ids:
        out_dir = system.root / "out" / job_id
        marker = json.loads((out_dir / "_SUCCESS").read_text())
        assert marker, "commit marker lists the outputs"
        assert int((out_dir / "size.txt").read_text()) == 1000 + len(job_id)
        assert not [p for p in out_dir.rglob("*") if p.name.endswith(".part")]
    counts = servicebus_broker.counts(name)
    assert counts is not None
    assert (counts.active, counts.locked, counts.dead_lettered) == (0, 0, 1), "the broker agrees"
    status = system.status()
    depth = status["depth"]
    assert isinstance(depth, dict)
    assert depth["source"] == "servicebus-admin"
    assert (depth["active"], depth["in_flight"], depth["dead_lettered"]) == (0, None, 1)
    assert (depth["scheduled"], depth["transfer"]) == (0, 0), "Service Bus status shows scheduled and transfer"
    assert status["dead_letters"][0]["message_id"] == "poison"  # type: ignore[index]
    assert status["dead_letters"][0]["reason"] == "SchemaViolation"  # type: ignore[index]
    assert status["instances"] == []
    assert json.loads(out)["peak_instances"] >= 2
    events = _events(err)
    assert "scale_decision" in events and "controller_drained" in events

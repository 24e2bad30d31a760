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
from collections.abc import Callable
from pathlib import Path

import pytest

from scalebus.backends import base
from scalebus.backends.azure import servicebus
from scalebus.settings import QueueSettings
from tests.e2e._system import System, assert_outputs_exactly_once, events, finish
from tests.fakes.servicebus_amqp import ServiceBusBroker
from tests.fakes.servicebus_plugin import new_queue_name

pytestmark = pytest.mark.slow

LOCK_DURATION_S = 5.0
"""Service Bus's own minimum, and what the SDK's once-a-second AutoLockRenewer needs."""
MAX_DELIVERY_COUNT = 3


class ServiceBusSystem(System):
    def __init__(self, root: Path, queue: QueueSettings, environ: dict[str, str]) -> None:
        table = (
            f'url = "{queue.url}"\nconnection_string_env = "{queue.connection_string_env}"\n'
            f'depth_source = "admin"\nadmin_endpoint = "{queue.admin_endpoint}"\n'
            f'connection_verify = "{queue.connection_verify}"\ndepth_cache_s = 0.5'
        )
        super().__init__(root, queue_table=table, environ=environ)
        self.queue = queue

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

    out, err = finish(system.start_controller(), timeout_s=60)

    assert_outputs_exactly_once(system, job_ids)
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
    logged = events(err)
    assert "scale_decision" in logged and "controller_drained" in logged

"""Two pools in one controller on the embedded default: two queues, two local scale sets, workers per pool.

The config has ``[[pools]]`` ``short`` and ``long``, each with its own queue and pool database. Jobs go to both
queues; one ``scalebus controller run`` scales both out (its local pools start ``scalebus worker run --pool``
processes) and exits once both are drained. Its ``/metrics`` is scraped while it runs and parsed with
``prometheus_client``'s parser: every series carries the pool, and each pool's decisions are its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e._system import System, assert_outputs_exactly_once, finish
from tests.e2e.test_metrics_system import SQLITE_QUEUE, free_port, scrape, wait_for

pytestmark = pytest.mark.slow

POOLS = """
[[pools]]
name = "short"
[pools.queue]
url = "sqlite:///{root}/queue.db?queue=short"
[pools.scale_set]
state_path = "{root}/pool-short.db"
[pools.controller]
max_instances = 2

[[pools]]
name = "long"
[pools.queue]
url = "sqlite:///{root}/queue.db?queue=long"
[pools.scale_set]
state_path = "{root}/pool-long.db"
[pools.controller]
max_instances = 1
"""


def submit(system: System, queue: str, job_ids: list[str]) -> None:
    """``scalebus submit --pool`` to one pool's queue."""
    jobs_file = system.write_inputs(job_ids)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalebus",
            "submit",
            "-f",
            str(jobs_file),
            "--config",
            str(system.config),
            "--pool",
            queue,
        ],
        env=system.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    jobs_file.rename(system.root / f"jobs-{queue}.jsonl")


def test_one_controller_scales_two_pools_out_and_drains_both(tmp_path: Path) -> None:
    system = System(tmp_path, queue_table=SQLITE_QUEUE.format(root=tmp_path))
    port = free_port()
    system.config.write_text(
        system.config.read_text() + f"[metrics]\nport = {port}\n" + POOLS.format(root=tmp_path)
    )
    short_jobs, long_jobs = ["s0", "s1", "s2"], ["slow0", "slow1"]
    submit(system, "short", short_jobs)
    submit(system, "long", long_jobs)

    controller = system.start_controller()
    try:
        seen = wait_for(
            "both pools scaling out",
            lambda: scrape(port),
            lambda s: all(
                s.get(("scalebus_controller_decisions_total", (("pool", pool), ("reason", "scale_out"))), 0) >= 1
                for pool in ("short", "long")
            ),
        )
        pools = {dict(labels).get("pool") for name, labels in seen if name.startswith("scalebus_")}
        assert pools == {"short", "long"}, "every controller series carries its pool"
        assert seen[("scalebus_scale_set_capacity", (("pool", "long"),))] <= 1, "long's own max_instances"
    except BaseException:
        controller.kill()
        controller.communicate()
        raise
    out, err = finish(controller, timeout_s=120)

    assert_outputs_exactly_once(system, short_jobs + long_jobs)
    by_pool = json.loads(out)["pools"]
    assert set(by_pool) == {"short", "long"}
    assert by_pool["short"]["capacity_writes"] >= 1 and by_pool["long"]["capacity_writes"] >= 1
    assert by_pool["long"]["peak_instances"] == 1 and 1 <= by_pool["short"]["peak_instances"] <= 2
    ran_in = _pool_of_each_job(err)
    assert {job: ran_in[job] for job in short_jobs} == dict.fromkeys(short_jobs, "short")
    assert {job: ran_in[job] for job in long_jobs} == dict.fromkeys(long_jobs, "long")


def _pool_of_each_job(stderr: str) -> dict[str, str]:
    """The pool of the worker that logged each job's completion (workers log ``pool`` with every line)."""
    found = {}
    for line in stderr.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("job_id") and entry.get("pool") and "instance_id" in entry:
            found[entry["job_id"]] = entry["pool"]
    return found

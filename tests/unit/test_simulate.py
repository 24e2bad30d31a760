"""The simulator: deterministic per seed, baselines behave as documented, scalebus never kills a busy worker."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from scalebus import errors
from scalebus.controller import policy as scaling_policy
from scalebus.simulator import model, ports, traces
from scalebus.simulator import report as simulate


def small_burst(count: int = 20, *, at: float = 100.0, run_s: float = 600.0) -> traces.Trace:
    jobs = tuple(traces.Job(at + n * 0.1, run_s, 0) for n in range(count))
    return traces.Trace("small-burst", jobs, max_instances=20)


def one_job(at: float = 100.0, run_s: float = 60.0) -> traces.Trace:
    return traces.Trace("one-job", (traces.Job(at, run_s, 0),), max_instances=5)


FIXED_BOOT = model.World(boot_p50_s=60.0, boot_p95_s=60.0001)


@pytest.mark.parametrize("policy", simulate.POLICIES)
def test_same_seed_same_result(policy: str) -> None:
    trace = small_burst()
    first, _ = simulate.run_once(trace, policy, seed=3)
    second, _ = simulate.run_once(trace, policy, seed=3)
    assert first == second
    if policy == "keda":  # 600 s jobs outlive KEDA's 300 s cooldown to zero: killed and redelivered until cut off
        assert first.busy_killed > 0
    else:
        assert first.jobs_done == len(trace.jobs)


def test_seeds_differ_in_boot_times() -> None:
    trace = small_burst()
    runs = {simulate.run_once(trace, "scalebus", seed=seed)[0].booting_h for seed in range(3)}
    assert len(runs) == 3


def test_keda_waits_for_its_poll() -> None:
    """A job at t=100 is seen at KEDA's next 30 s poll (t=120): no scale request before then."""
    metrics, _ = simulate.run_once(one_job(100.0), "keda", seed=0, world=FIXED_BOOT)
    assert metrics.reaction_s == pytest.approx(20.0)


def test_scalebus_reacts_within_its_poll_interval() -> None:
    metrics, _ = simulate.run_once(one_job(101.0), "scalebus", seed=0, world=FIXED_BOOT)
    assert metrics.reaction_s <= 2.0 + scaling_policy.DEFAULT_TUNABLES.confirm_s, "one poll, then one to confirm"
    assert 60.0 <= metrics.wait_p50_s <= 60.0 + metrics.reaction_s + 0.01, "boot plus reaction"


def test_azure_autoscale_waits_for_metric_lag() -> None:
    """Nothing happens before the first minute sample showing the job has arrived (≥ 1 min lag)."""
    world = model.World(boot_p50_s=60.0, boot_p95_s=60.0001, metric_lag_min_s=120.0, metric_lag_max_s=120.0)
    metrics, _ = simulate.run_once(one_job(100.0, run_s=60.0), "azure-autoscale", seed=0, world=world)
    # sampled at t=120, visible at t=240, next rule evaluation on the minute: t=240
    assert metrics.reaction_s == pytest.approx(140.0)


def test_azure_autoscale_respects_cooldown_and_keeps_growing_while_jobs_hold_locks() -> None:
    """+5 per 5-minute cooldown. ActiveMessages counts locked messages, so the metric never reads empty while
    jobs run: the rule keeps scaling out and never scales in on a busy fleet."""
    trace = small_burst(count=12, run_s=1800.0)
    metrics, timeline = simulate.run_once(trace, "azure-autoscale", seed=0, world=FIXED_BOOT, record=True)
    grew_at = [
        t for (t, _, vms, _), (_, _, before, _) in zip(timeline[1:], timeline, strict=False) if vms > before
    ]
    assert len(grew_at) >= 3
    assert all(later - earlier >= 295.0 for earlier, later in itertools.pairwise(grew_at))
    assert metrics.busy_killed == 0
    assert metrics.idle_h > 0  # VMs added after every job had a worker


def test_batch_evaluates_every_five_minutes_and_waits_for_tasks() -> None:
    metrics, _ = simulate.run_once(one_job(100.0, run_s=600.0), "batch", seed=0, world=FIXED_BOOT)
    assert metrics.reaction_s == pytest.approx(200.0)  # the evaluation at t=300
    assert metrics.busy_killed == 0


def test_keda_scale_in_kills_busy_workers() -> None:
    """Long jobs: the queue empties, HPA scales to ceil(0/5) after stabilization, pods die mid-job."""
    metrics, _ = simulate.run_once(small_burst(count=20, run_s=1200.0), "keda", seed=0)
    assert metrics.busy_killed > 0


@pytest.mark.parametrize(
    ("trace_name", "policy"),
    [("burst500", "scalebus"), ("burst500", "scalebus-monitor"), ("spot-storm", "scalebus")],
)
def test_scalebus_never_kills_a_busy_worker(trace_name: str, policy: str) -> None:
    trace = traces.BUILTIN[trace_name](0)
    metrics, _ = simulate.run_once(trace, policy, seed=0)
    assert metrics.busy_killed == 0
    assert metrics.jobs_done == len(trace.jobs)


def test_scalebus_scales_out_in_one_write_and_retires_everything() -> None:
    metrics, timeline = simulate.run_once(small_burst(count=20, run_s=120.0), "scalebus", seed=1, record=True)
    assert max(vms for _, _, vms, _ in timeline) == 20
    assert metrics.arm_429 == 0
    assert metrics.idle_h < 0.1 * metrics.vm_hours


def test_oracle_is_ready_before_the_burst() -> None:
    metrics, _ = simulate.run_once(small_burst(count=10, at=600.0), "oracle", seed=0, world=FIXED_BOOT)
    assert metrics.wait_p95_s == pytest.approx(0.0)


def test_arm_budget_turns_excess_writes_into_429s() -> None:
    sim = model.Simulation(one_job(), simulate.make_autoscaler("oracle", one_job(), model.World()),
                              seed=0, world=model.World(), record=False)  # fmt: skip
    results = [sim.arm_write() for _ in range(14)]
    assert results.count(True) == 12
    assert (sim.arm.writes, sim.arm.throttled) == (12, 2)
    sim.now = 15.0
    assert sim.arm_write()


def test_report_rows_json_and_plot(tmp_path: Path) -> None:
    csv_path = tmp_path / "jobs.csv"
    csv_path.write_text("arrival_s,run_s,input_bytes\n0,30,1000000\n5,30,0\n10,30,0\n")
    png = tmp_path / "out.png"
    report = simulate.run_simulation(str(csv_path), ["scalebus", "keda"], 2, png)
    assert [row["policy"] for row in report.rows()] == ["scalebus", "keda"]
    assert "±" in report.rows()[0]["wait p95 s"]
    decoded = json.loads(json.dumps(report.to_dict()))
    assert decoded["results"][0]["metrics"]["jobs_done"]["mean"] == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("trace", "policies", "seeds"),
    [
        pytest.param("builtin:nope", ["scalebus"], 1, id="unknown-builtin"),
        pytest.param("builtin:trickle", ["hpa"], 1, id="unknown-policy"),
        pytest.param("builtin:trickle", ["scalebus"], 0, id="no-seeds"),
        pytest.param("/nonexistent/trace.csv", ["scalebus"], 1, id="missing-csv"),
    ],
)
def test_user_mistakes_are_one_line_errors(trace: str, policies: list[str], seeds: int) -> None:
    with pytest.raises(errors.UserInputError):
        simulate.run_simulation(trace, policies, seeds)


def test_confidence_interval() -> None:
    assert simulate.estimate([1.0, 1.0, 1.0]).ci95 == 0.0
    spread = simulate.estimate([0.0, 2.0] * 15)
    assert spread.mean == pytest.approx(1.0)
    assert spread.ci95 == pytest.approx(2.045 * 1.017 / 30**0.5, rel=0.01)


def test_scalebus_runs_with_the_given_controller_settings() -> None:
    """``scalebus simulate --config``: the simulated policy is the configured one (here: prewarming off)."""
    from scalebus.settings import ControllerSettings

    def p95(world: model.World) -> float:
        report = simulate.run_simulation("builtin:trickle", ["scalebus"], 2, world=world)
        return float(report.to_dict()["results"][0]["metrics"]["wait_p95_s"]["mean"])

    assert p95(model.World(controller=ControllerSettings(prewarm=False))) > p95(model.World())


class _KillOnce:
    """Boots one VM; at t=90 takes its job away and gives the VM new work at once (a KEDA pod replaced)."""

    name = "kill-once"
    period_s = 1.0

    def tick(self, sim: model.Simulation) -> None:
        if sim.now == 0.0:
            sim.grow(1)
        if sim.now == 90.0:
            (vm,) = sim.vms.values()
            sim.withhold(vm)
            sim.release(vm)

    def quiet(self, sim: model.Simulation) -> bool:
        return sim.now > 400.0

    def on_ready(self, sim: model.Simulation, vm: model.Vm) -> None:
        """Nothing to do."""

    def on_done(self, sim: model.Simulation, vm: model.Vm) -> None:
        """Nothing to do."""

    def on_idle(self, sim: model.Simulation, vm: model.Vm) -> None:
        if sim.completed == 2:
            sim.remove(vm)


def test_a_killed_jobs_timers_do_not_end_the_next_job() -> None:
    """Job 0 (60 s) is killed at t=90 and job 1 (100 s) starts on the same VM: it must run its full 100 s,
    not end at t=120 when job 0 would have; job 0 comes back after the 60 s lock and runs after it."""
    trace = traces.Trace("two", (traces.Job(0.0, 60.0), traces.Job(1.0, 100.0)), max_instances=1)
    sim = model.Simulation(trace, _KillOnce(), seed=0, world=FIXED_BOOT, record=False)
    metrics = sim.run()
    assert (metrics.jobs_done, metrics.busy_killed) == (2, 1)
    assert metrics.makespan_s == pytest.approx(250.0, abs=0.01)  # job 1 from 90 to 190, then job 0 to 250
    assert metrics.running_h * 3600 == pytest.approx(30.0 + 100.0 + 60.0, abs=0.01)


def test_max_instances_reaches_every_policy(tmp_path: Path) -> None:
    csv_path = tmp_path / "jobs.csv"
    csv_path.write_text("arrival_s,run_s\n" + "".join(f"{n * 0.1},300\n" for n in range(60)))
    wide = simulate.run_simulation(str(csv_path), ["scalebus", "oracle"], 1, max_instances=60)
    narrow = simulate.run_simulation(str(csv_path), ["scalebus", "oracle"], 1, max_instances=3)
    for policy in ("scalebus", "oracle"):
        assert wide.result(policy).summary["makespan_s"].mean < narrow.result(policy).summary["makespan_s"].mean
    with pytest.raises(errors.UserInputError, match="max-instances"):
        simulate.run_simulation(str(csv_path), ["oracle"], 1, max_instances=0)


def test_a_job_longer_than_the_worker_timeout_is_retried_then_dead_lettered() -> None:
    """As the worker applies ``job_timeout_s``: stopped, abandoned, redelivered until max deliveries."""
    world = model.World(boot_p50_s=60.0, boot_p95_s=60.0001, job_timeout_s=100.0, max_deliveries=3)
    metrics, _ = simulate.run_once(one_job(100.0, run_s=500.0), "scalebus", seed=0, world=world)
    assert (metrics.timed_out, metrics.dead_lettered, metrics.jobs_done) == (3, 1, 0)


def test_unfinished_jobs_are_censored_at_the_horizon() -> None:
    """A policy that never scales: the job waits until the horizon (24 h after the last arrival) and counts."""

    class Never:
        name = "never"
        period_s = 60.0

        def tick(self, sim: model.Simulation) -> None:
            """Does nothing."""

        def quiet(self, sim: model.Simulation) -> bool:
            return True

        def on_ready(self, sim: model.Simulation, vm: model.Vm) -> None:
            """Nothing boots."""

        def on_done(self, sim: model.Simulation, vm: model.Vm) -> None:
            """Nothing runs."""

        def on_idle(self, sim: model.Simulation, vm: model.Vm) -> None:
            """Nothing idles."""

    sim = model.Simulation(one_job(100.0), Never(), seed=0, world=FIXED_BOOT, record=False)
    metrics = sim.run()
    assert metrics.jobs_done == 0
    assert metrics.wait_p95_s == pytest.approx(24 * 3600.0)
    assert metrics.makespan_s == pytest.approx(24 * 3600.0)


def test_keda_scaledjob_runs_each_message_in_its_own_pod_and_kills_none() -> None:
    metrics, _ = simulate.run_once(small_burst(count=20, run_s=1200.0), "keda-scaledjob", seed=0)
    assert (metrics.busy_killed, metrics.jobs_done) == (0, 20)


def test_scalebus_is_fed_the_admin_count_with_locked_messages() -> None:
    """What production's admin source returns: one number, locked included, no in-flight count."""
    trace = small_burst(count=5)
    autoscaler = simulate.make_autoscaler("scalebus", trace, model.World())
    sim = model.Simulation(trace, autoscaler, seed=0, world=model.World(), record=False)
    sim.queue.extend(range(3))
    sim.locked = 2
    sample = ports.SimQueueDepth(sim, monitor=False).read_depth()
    assert (sample.active, sample.in_flight, sample.active_includes_locked) == (5, None, True)

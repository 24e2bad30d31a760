"""The policies the simulator compares: scalebus itself (the real ``policy.decide``) and models of the peers.

Each model reproduces documented defaults (issue 6), not a caricature:

* **KEDA + HPA** (azure-servicebus scaler on AKS): KEDA polls the queue every 30 s; HPA syncs every 15 s toward
  ``ceil(active / 5)`` replicas, scales up by at most max(+4, +100 %) per 60 s, scales down to the highest
  recommendation of the last 300 s; KEDA deactivates to zero 300 s after the queue was last active. The pod
  removed on scale-in is arbitrary (busy or not: KEDA issues #2900, #3674, #6719). The cluster autoscaler scans
  every 10 s for pending pods, adds one node per pod, and removes a node unneeded for 10 minutes.
* **Azure Monitor autoscale** on the VMSS: ActiveMessages at 1-minute grain arriving 1–3 minutes late, rules
  evaluated every 60 s over a 5-minute window: average > 0 → +5 VMs, average 0 → −5 VMs (the newest, busy or
  not), 5-minute cooldown after any action. (Generous: the portal's examples scale by 1 on a threshold.)
* **Azure Batch autoscale** (Nextflow's default formula) evaluated every 5 minutes: target = pending tasks
  (waiting + running, max of the latest sample and the 5-minute average), halved when nothing is pending;
  ``taskcompletion``: a node chosen for removal finishes its task first.
* **oracle**: knows every arrival; boots VMs one p95 boot time ahead of the jobs that need them, never waits for
  a poll or the ARM budget, retires idle VMs no job will need.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from scalebus.backends import base
from scalebus.controller import policy
from scalebus.simulator import traces
from scalebus.simulator.model import BOOTING, IDLE, RUNNING, STAGING, Simulation, Vm, World


def _in_system(sim: Simulation) -> int:
    return sim.waiting + sim.locked


class _Autoscaler:
    """Defaults for the hooks most models ignore: quiet once nothing is queued or running."""

    def quiet(self, sim: Simulation) -> bool:
        return not sim.vms and _in_system(sim) == 0

    def on_ready(self, sim: Simulation, vm: Vm) -> None:
        """A VM finished booting."""

    def on_idle(self, sim: Simulation, vm: Vm) -> None:
        """A VM finished its job and found none waiting."""


class ScalebusAutoscaler(_Autoscaler):
    """The controller loop in miniature: observe, ``policy.decide``, apply deletes, then the capacity write."""

    def __init__(self, trace: traces.Trace, world: World, *, monitor: bool) -> None:
        self.name = "scalebus-monitor" if monitor else "scalebus"
        self.settings = world.controller.model_copy(update={"max_instances": trace.max_instances})
        self.period_s = self.settings.poll_interval_s
        self.state = policy.initial_state()
        self.grace = world.worker_idle_timeout_s
        self.monitor = monitor
        self.decisions = 0
        self._deferred = False

    def _depth(self, sim: Simulation) -> base.DepthSample:
        if not self.monitor:
            return base.DepthSample(sim.waiting, sim.locked, 0, sampled_at=sim.now, source="admin")
        samples = sim.visible_samples()
        if not samples:
            return base.DepthSample(0, None, 0, sampled_at=0.0, source="monitor")
        sampled_at, active, _ = samples[-1]
        return base.DepthSample(active, None, 0, sampled_at=sampled_at, source="monitor")

    def tick(self, sim: Simulation) -> None:
        views = tuple(_view(vm, sim.now) for vm in sim.vms.values())
        obs = policy.Observation(now=sim.now, depth=self._depth(sim), capacity=len(sim.vms), instances=views)
        decision, self.state = policy.decide(obs, self.state, self.settings)
        self.decisions += 1
        if decision.delete:
            sim.delete([sim.vms[int(iid)] for iid in decision.delete if int(iid) in sim.vms])
        if decision.capacity is not None:
            sim.set_capacity(decision.capacity)
        if decision.idle_grace_s is not None:
            self.grace = decision.idle_grace_s
        self._deferred = decision.deferred

    def quiet(self, sim: Simulation) -> bool:
        if self.monitor:
            return not sim.vms and _in_system(sim) == 0 and not self._deferred and not sim.changed
        return (
            not sim.changed
            and not self._deferred
            and not any(vm.state == BOOTING or vm.retiring for vm in sim.vms.values())
        )

    def on_idle(self, sim: Simulation, vm: Vm) -> None:
        sim.schedule_retire(vm, self.grace)


def _view(vm: Vm, now: float) -> policy.InstanceView:
    iid = str(vm.vid)
    if vm.state == BOOTING:
        return policy.InstanceView(iid, base.InstanceState.STARTING, vm.created_at)
    if vm.state in (STAGING, RUNNING):
        worker = base.WorkerState.BUSY
    elif vm.retiring or vm.draining:
        worker = base.WorkerState.DRAINING
    else:
        worker = base.WorkerState.IDLE
    job = str(vm.job) if vm.job is not None else None
    return policy.InstanceView(iid, base.InstanceState.RUNNING, vm.created_at, worker, now, job)


class KedaAutoscaler(_Autoscaler):
    """KEDA azure-servicebus scaler + HPA + the AKS cluster autoscaler, one pod per node."""

    period_s = 5.0
    poll_s = 30.0
    hpa_sync_s = 15.0
    ca_scan_s = 10.0
    target_per_replica = 5
    stabilization_s = 300.0
    cooldown_s = 300.0
    unneeded_node_s = 600.0

    def __init__(self, trace: traces.Trace) -> None:
        self.name = "keda"
        self.max_replicas = trace.max_instances
        self.replicas = 0
        self.metric = 0
        self.last_active_at = -math.inf
        self.recommendations: deque[tuple[float, int]] = deque()
        self.history: deque[tuple[float, int]] = deque()
        self.unneeded_since: dict[int, float] = {}

    @staticmethod
    def _due(now: float, every: float) -> bool:
        return math.isclose(now % every, 0.0, abs_tol=1e-6) or math.isclose(now % every, every, abs_tol=1e-6)

    def tick(self, sim: Simulation) -> None:
        now = sim.now
        if self._due(now, self.poll_s):
            self.metric = sim.waiting
            if self.metric > 0:
                self.last_active_at = now
                if self.replicas == 0:  # KEDA itself activates 0 -> 1
                    self._set_replicas(sim, 1)
            elif self.replicas > 0 and now - self.last_active_at >= self.cooldown_s:
                self._set_replicas(sim, 0)
        if self._due(now, self.hpa_sync_s) and self.replicas > 0:
            self._hpa(sim, now)
        self._reconcile_pods(sim)
        if self._due(now, self.ca_scan_s):
            self._cluster_autoscaler(sim, now)

    def _hpa(self, sim: Simulation, now: float) -> None:
        desired = max(1, min(self.max_replicas, math.ceil(self.metric / self.target_per_replica)))
        self.recommendations.append((now, desired))
        while self.recommendations and now - self.recommendations[0][0] > self.stabilization_s:
            self.recommendations.popleft()
        while self.history and now - self.history[0][0] > 60.0:
            self.history.popleft()
        if desired > self.replicas:
            base_count = self.history[0][1] if self.history else self.replicas
            limit = max(base_count + 4, 2 * base_count)
            self._set_replicas(sim, min(desired, limit))
        elif desired < self.replicas:
            self._set_replicas(sim, max(d for _, d in self.recommendations))
        self.history.append((now, self.replicas))

    def _set_replicas(self, sim: Simulation, replicas: int) -> None:
        if replicas > self.replicas:
            sim.note_scale_request()
        self.replicas = replicas

    def _reconcile_pods(self, sim: Simulation) -> None:
        with_pod = [vm for vm in sim.vms.values() if vm.accepting]
        if len(with_pod) > self.replicas:
            for _ in range(len(with_pod) - self.replicas):  # the ReplicaSet removes an arbitrary pod
                sim.withhold(with_pod.pop(sim.rng.randrange(len(with_pod))))
        elif len(with_pod) < self.replicas:
            free = [vm for vm in sim.vms.values() if not vm.accepting and vm.state == IDLE and not vm.draining]
            for vm in free[: self.replicas - len(with_pod)]:
                sim.release(vm)

    def _cluster_autoscaler(self, sim: Simulation, now: float) -> None:
        with_pod = sum(1 for vm in sim.vms.values() if vm.accepting)
        booting = sum(1 for vm in sim.vms.values() if vm.state == BOOTING)
        pending = self.replicas - with_pod - booting
        if pending > 0 and sim.arm_write():
            sim.grow(pending, accepting=False)
        unneeded = []
        for vm in list(sim.vms.values()):
            if vm.accepting or vm.state != IDLE:
                self.unneeded_since.pop(vm.vid, None)
                continue
            since = self.unneeded_since.setdefault(vm.vid, now)
            if now - since >= self.unneeded_node_s:
                unneeded.append(vm)
        if unneeded and sim.delete(unneeded):
            for vm in unneeded:
                self.unneeded_since.pop(vm.vid, None)

    def quiet(self, sim: Simulation) -> bool:
        return not sim.vms and _in_system(sim) == 0 and self.replicas == 0

    def on_ready(self, sim: Simulation, vm: Vm) -> None:
        if sum(1 for other in sim.vms.values() if other.accepting) < self.replicas:
            sim.release(vm)


class AzureAutoscaler(_Autoscaler):
    """Azure Monitor autoscale rules on the scale set, fed by the lagged ActiveMessages metric."""

    period_s = 60.0
    window_s = 300.0
    cooldown_s = 300.0
    out_above = 0.0
    out_by = 5
    in_below = 1e-9
    in_by = 5

    def __init__(self, trace: traces.Trace) -> None:
        self.name = "azure-autoscale"
        self.max_instances = trace.max_instances
        self.last_action = -math.inf

    def tick(self, sim: Simulation) -> None:
        now = sim.now
        window = [active for at, active, _ in sim.visible_samples() if at >= now - self.window_s]
        if not window or now - self.last_action < self.cooldown_s:
            return
        average = statistics.fmean(window)
        capacity = len(sim.vms)
        if average > self.out_above and capacity < self.max_instances:
            sim.note_scale_request()
            if sim.set_capacity(min(self.max_instances, capacity + self.out_by)):
                self.last_action = now
        elif (
            average < self.in_below
            and capacity > 0
            and sim.set_capacity(max(0, capacity - self.in_by), newest_first=True)
        ):
            self.last_action = now


class BatchAutoscaler(_Autoscaler):
    """Azure Batch pool autoscale with Nextflow's default formula, every 5 minutes, ``taskcompletion``."""

    period_s = 300.0
    metric_lag_s = 30.0

    def __init__(self, trace: traces.Trace) -> None:
        self.name = "batch"
        self.max_instances = trace.max_instances
        self.target = 0

    def tick(self, sim: Simulation) -> None:
        samples = [
            pending for at, _, pending in sim.visible_samples(lag_s=self.metric_lag_s) if at >= sim.now - 300
        ]
        latest = samples[-1] if samples else 0
        tasks = max(latest, math.ceil(statistics.fmean(samples))) if samples else latest
        target = tasks if tasks > 0 else self.target // 2
        target = max(0, min(target, self.max_instances))
        serving = [vm for vm in sim.vms.values() if not vm.draining]
        if target == len(serving):
            self.target = target
            return
        if target > len(serving):
            sim.note_scale_request()
        if not sim.arm_write():
            return
        self.target = target
        if target > len(serving):
            sim.grow(target - len(serving))
            return
        # taskcompletion: idle and booting nodes go first, busy ones after their task
        order = sorted(serving, key=lambda vm: (vm.state in (STAGING, RUNNING), -vm.vid))
        for vm in order[: len(serving) - target]:
            sim.drain(vm)


class OracleAutoscaler(_Autoscaler):
    """Clairvoyant: sees the queue and every future arrival, acts after every event, no ARM budget."""

    period_s = 0.0

    def __init__(self, trace: traces.Trace, world: World) -> None:
        self.name = "oracle"
        self.max_instances = trace.max_instances
        self.lead_s = world.boot_p95_s
        self._scheduled = False

    def tick(self, sim: Simulation) -> None:
        if not self._scheduled:
            self._scheduled = True
            for arrival in sim.arrivals:
                sim.wake_at(max(0.0, arrival - self.lead_s))
        need = min(self.max_instances, _in_system(sim) + sim.arrivals_between(sim.now, sim.now + self.lead_s))
        serving = [vm for vm in sim.vms.values() if vm.accepting]
        if need > len(serving):
            sim.grow(need - len(serving))
        elif need < len(serving):
            idle = [vm for vm in serving if vm.state == IDLE]
            for vm in idle[: len(serving) - need]:
                sim.remove(vm)

    def quiet(self, sim: Simulation) -> bool:
        return True

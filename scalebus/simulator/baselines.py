"""Models of the autoscalers scalebus is compared with (scalebus itself runs its own step: ``ports.py``).

Each model reproduces documented defaults, not a caricature:

* **KEDA + HPA** (azure-servicebus scaler on AKS): KEDA polls the queue every 30 s and reads the admin API's
  ``ActiveMessageCount``, which counts locked messages too (the same field scalebus's admin depth source reads);
  HPA syncs every 15 s toward ``ceil(count / messageCount)`` replicas (``messageCount`` 5 by default; ``keda-mc1``
  is the one-job-per-worker setting ``messageCount: 1``), scales up by at most max(+4, +100 %) per 60 s, scales
  down to the highest recommendation of the last 300 s; KEDA deactivates to zero 300 s after the queue was last
  active. The pod removed on scale-in is arbitrary (busy or not: KEDA issues #2900, #3674, #6719). The cluster
  autoscaler scans every 10 s for pending pods, adds one node per pod, and removes a node unneeded for 10 minutes.
* **KEDA ScaledJob** (``keda-scaledjob``): every 30 s KEDA starts ``min(maxReplicaCount, count) - running jobs``
  new Jobs (the default scaling strategy); each Job's pod takes one message, runs it and exits, so no busy pod is
  ever removed. Nodes come and go as above.
* **Azure Monitor autoscale** on the VMSS: ActiveMessages (locked messages included) at 1-minute grain
  arriving 1–3 minutes late, rules
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

from scalebus.simulator import traces
from scalebus.simulator.model import Simulation, Vm, VmState, World


def in_system(sim: Simulation) -> int:
    """Messages waiting or locked by a worker."""
    return sim.waiting + sim.locked


class _Autoscaler:
    """Defaults for the hooks most models ignore: quiet once nothing is queued or running."""

    def quiet(self, sim: Simulation) -> bool:
        return not sim.vms and in_system(sim) == 0

    def on_ready(self, sim: Simulation, vm: Vm) -> None:
        """A VM finished booting."""

    def on_idle(self, sim: Simulation, vm: Vm) -> None:
        """A VM finished its job and found none waiting."""

    def on_done(self, sim: Simulation, vm: Vm) -> None:
        """A VM finished a job."""


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

    def __init__(self, trace: traces.Trace, *, message_count: int = 5) -> None:
        self.name = "keda" if message_count == 5 else f"keda-mc{message_count}"
        self.target_per_replica = message_count
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
            self.metric = in_system(sim)  # ActiveMessageCount: waiting and locked
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
                sim.withhold(with_pod.pop(sim.random.policy.randrange(len(with_pod))))
        elif len(with_pod) < self.replicas:
            free = [
                vm for vm in sim.vms.values() if not vm.accepting and vm.state is VmState.IDLE and not vm.draining
            ]
            for vm in free[: self.replicas - len(with_pod)]:
                sim.release(vm)

    def _cluster_autoscaler(self, sim: Simulation, now: float) -> None:
        with_pod = sum(1 for vm in sim.vms.values() if vm.accepting)
        booting = sum(1 for vm in sim.vms.values() if vm.state is VmState.BOOTING)
        pending = self.replicas - with_pod - booting
        if pending > 0 and sim.arm_write():
            sim.grow(pending, accepting=False)
        unneeded = []
        for vm in list(sim.vms.values()):
            if vm.accepting or vm.state is not VmState.IDLE:
                self.unneeded_since.pop(vm.vid, None)
                continue
            since = self.unneeded_since.setdefault(vm.vid, now)
            if now - since >= self.unneeded_node_s:
                unneeded.append(vm)
        if unneeded and sim.delete(unneeded):
            for vm in unneeded:
                self.unneeded_since.pop(vm.vid, None)

    def quiet(self, sim: Simulation) -> bool:
        return not sim.vms and in_system(sim) == 0 and self.replicas == 0

    def on_ready(self, sim: Simulation, vm: Vm) -> None:
        if sum(1 for other in sim.vms.values() if other.accepting) < self.replicas:
            sim.release(vm)


class KedaScaledJobAutoscaler(KedaAutoscaler):
    """KEDA ScaledJob: one Kubernetes Job per message, each pod runs one job and exits; nodes as for KEDA."""

    def __init__(self, trace: traces.Trace) -> None:
        super().__init__(trace, message_count=1)
        self.name = "keda-scaledjob"
        self.pending_pods = 0

    def tick(self, sim: Simulation) -> None:
        now = sim.now
        if self._due(now, self.poll_s):
            running = sum(1 for vm in sim.vms.values() if vm.accepting) + self.pending_pods
            new = max(0, min(self.max_replicas, in_system(sim)) - running)
            if new:
                sim.note_scale_request()
                self.pending_pods += new
        for vm in [vm for vm in sim.vms.values() if self._free(vm)][: self.pending_pods]:
            self.pending_pods -= 1
            sim.release(vm)
        self.replicas = sum(1 for vm in sim.vms.values() if vm.accepting) + self.pending_pods
        if self._due(now, self.ca_scan_s):
            self._cluster_autoscaler(sim, now)

    @staticmethod
    def _free(vm: Vm) -> bool:
        return not vm.accepting and vm.state is VmState.IDLE and not vm.draining

    def quiet(self, sim: Simulation) -> bool:
        return not sim.vms and in_system(sim) == 0 and self.pending_pods == 0

    def on_ready(self, sim: Simulation, vm: Vm) -> None:
        if self.pending_pods > 0:
            self.pending_pods -= 1
            sim.release(vm)

    def on_done(self, sim: Simulation, vm: Vm) -> None:
        """The Job's pod exits with its job: the node keeps running, podless."""
        vm.accepting = False

    def on_idle(self, sim: Simulation, vm: Vm) -> None:
        """A pod that found no message (another pod took it) exits too."""
        vm.accepting = False


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
        window = [pending for at, _, pending in sim.metric.visible(sim.now) if at >= now - self.window_s]
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
            pending
            for at, _, pending in sim.metric.visible(sim.now, lag_s=self.metric_lag_s)
            if at >= sim.now - 300
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
        order = sorted(serving, key=lambda vm: (vm.state.busy, -vm.vid))
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
        need = min(self.max_instances, in_system(sim) + sim.arrivals_between(sim.now, sim.now + self.lead_s))
        serving = [vm for vm in sim.vms.values() if vm.accepting]
        if need > len(serving):
            sim.grow(need - len(serving))
        elif need < len(serving):
            idle = [vm for vm in serving if vm.state is VmState.IDLE]
            for vm in idle[: len(serving) - need]:
                sim.remove(vm)

    def quiet(self, sim: Simulation) -> bool:
        return True

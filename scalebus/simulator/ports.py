"""scalebus in the simulator: the controller's own round (``controller/step.py``) behind simulated ports.

:class:`SimQueueDepth`, :class:`SimScaleSet` and :class:`SimHeartbeatStore` implement the controller's ports
(``backends/base.py``) over a :class:`~scalebus.simulator.model.Simulation`, so the benchmark runs exactly the
observe → decide → apply code production runs. What they report follows the simulator's model:

* depth: what production's sources return. With ``monitor`` off, the Service Bus admin API's
  ``ActiveMessageCount``: waiting *and* locked messages in one number, fresh, no in-flight count; with
  ``monitor`` on, Azure Monitor's ActiveMessages metric of the same count, minutes late;
* the scale set: a VM is ``starting`` while it boots and ``running`` after. Writes run on
  :class:`SimWriteRunner`: their effect (new VMs listed as starting, deleted ones gone) is immediate, as ARM
  lists new instances at once, but the operation stays in flight until its VMs are provisioned (deletions:
  ``World.delete_lro_s``), seen at the SDK's next 15 s poll, and the controller starts no other write meanwhile.
  Each write spends the simulated ARM budget (a 429 changes nothing and raises nothing). Protection from
  scale-in is not modelled (nothing else scales in);
* heartbeats: every booted VM's worker beats on each state change and every ``heartbeat_interval_s`` between
  (busy with its job, draining once retiring or evicted, else idle), so a heartbeat is up to 5 s old, as in
  production. The controller's hint is the idle grace the simulated workers retire after; they use the latest
  one published, whatever its age.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from scalebus.backends import base
from scalebus.controller import step
from scalebus.simulator import traces
from scalebus.simulator.model import Simulation, Vm, VmState, World

_QUIET = structlog.wrap_logger(
    None, processors=[], wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL)
)
"""The step logs every decision; thousands of simulated runs would flood the simulate command's log."""


class SimQueueDepth:
    """The queue's depth as the admin API (``monitor`` off) or the Azure Monitor metric (on) reports it."""

    def __init__(self, sim: Simulation, *, monitor: bool) -> None:
        self._sim = sim
        self._monitor = monitor

    def read_depth(self) -> base.DepthSample:
        sim = self._sim
        if not self._monitor:
            active = sim.waiting + sim.locked
            return base.DepthSample(
                active, None, 0, sampled_at=sim.now, source="admin", active_includes_locked=True
            )
        samples = sim.metric.visible(sim.now)
        if not samples:
            return base.DepthSample(0, None, 0, sampled_at=sim.now, source="monitor", active_includes_locked=True)
        sampled_at, _, pending = samples[-1]
        return base.DepthSample(
            pending, None, 0, sampled_at=sampled_at, source="monitor", active_includes_locked=True
        )

    def close(self) -> None:
        """Nothing to release."""


class SimScaleSet:
    """The simulated fleet as a VM scale set; instance ids are the VMs' numbers."""

    def __init__(self, sim: Simulation) -> None:
        self._sim = sim

    def get_capacity(self) -> int:
        return len(self._sim.vms)

    def list_instances(self) -> list[base.Instance]:
        return [_instance(vm) for vm in self._sim.vms.values()]

    def set_capacity(self, capacity: int) -> None:
        self._sim.set_capacity(capacity)

    def delete_instances(self, instance_ids: Sequence[str]) -> None:
        vms = self._sim.vms
        self._sim.delete([vms[int(iid)] for iid in instance_ids if int(iid) in vms])

    def set_protection(self, instance_id: str, *, protected: bool) -> None:
        """Not modelled: nothing else scales the simulated fleet in."""

    def close(self) -> None:
        """Nothing to release."""


@dataclass(slots=True)
class SimWrite:
    """A write's long-running operation: done once the simulated clock passes ``done_at``."""

    sim: Simulation
    outcome: step.WriteOutcome
    done_at: float

    def done(self) -> bool:
        return self.sim.now >= self.done_at

    def result(self) -> step.WriteOutcome:
        return self.outcome


class SimWriteRunner:
    """The write's effect at once; its operation in flight until the new VMs are provisioned (or a deletion's
    ``World.delete_lro_s`` passed), rounded up to the SDK's next ``World.lro_poll_s`` poll."""

    def __init__(self, sim: Simulation) -> None:
        self._sim = sim
        self.pending_until = 0.0

    def submit(self, write: Callable[[], step.WriteOutcome]) -> step.PendingWrite:
        sim = self._sim
        before = set(sim.vms)
        outcome = write()
        ready = [vm.ready_at for vid, vm in sim.vms.items() if vid not in before]
        runs = max(ready, default=sim.now) - sim.now if sim.world.writes_wait_for_provisioning else 0.0
        if outcome.deleted:
            runs = max(runs, sim.world.delete_lro_s)
        poll = sim.world.lro_poll_s
        done_at = sim.now + max(poll, math.ceil(runs / poll) * poll)
        self.pending_until = done_at
        sim.wake_at(done_at)
        return SimWrite(sim, outcome, done_at)

    def close(self) -> None:
        """Nothing runs in the background."""


class SimHeartbeatStore:
    """Every booted VM's worker, heard from just now; keeps the controller's latest hint for the workers."""

    def __init__(self, sim: Simulation) -> None:
        self._sim = sim
        self._hint: base.FleetHint | None = None

    def beat(self, heartbeat: base.Heartbeat) -> None:
        """Workers are simulated: their heartbeats are derived from the VMs in :meth:`read_all`."""

    def read_all(self) -> list[base.Heartbeat]:
        now, every = self._sim.now, self._sim.world.heartbeat_interval_s
        return [_heartbeat(vm, now, every) for vm in self._sim.vms.values() if vm.state is not VmState.BOOTING]

    def forget(self, instance_id: str) -> None:
        """Nothing is stored per worker."""

    def publish_hint(self, hint: base.FleetHint) -> None:
        self._hint = hint

    def read_hint(self) -> base.FleetHint | None:
        return self._hint

    def close(self) -> None:
        """Nothing to release."""


class ScalebusAutoscaler:
    """scalebus: the controller's :class:`~scalebus.controller.step.ControllerStep` on the simulated fleet."""

    def __init__(self, trace: traces.Trace, world: World, *, monitor: bool) -> None:
        self.name = "scalebus-monitor" if monitor else "scalebus"
        self.settings = world.controller.model_copy(update={"max_instances": trace.max_instances})
        self.period_s = self.settings.poll_interval_s
        self.monitor = monitor
        self._default_grace_s = world.worker_idle_timeout_s
        self._heartbeats: SimHeartbeatStore | None = None
        self._writes: SimWriteRunner | None = None
        self._step: step.ControllerStep | None = None
        self._deferred = False

    def _bind(self, sim: Simulation) -> step.ControllerStep:
        """The ports need the simulation, which is built after its autoscaler: wire them on the first tick."""
        self._heartbeats = SimHeartbeatStore(sim)
        self._writes = SimWriteRunner(sim)
        return step.ControllerStep(
            depth=SimQueueDepth(sim, monitor=self.monitor),
            scale_set=SimScaleSet(sim),
            heartbeats=self._heartbeats,
            settings=self.settings,
            clock=lambda: sim.now,
            writes=self._writes,
            log=_QUIET,
        )

    def tick(self, sim: Simulation) -> None:
        if self._step is None:
            self._step = self._bind(sim)
        _, decision = self._step.run_round()
        self._deferred = decision.deferred

    def quiet(self, sim: Simulation) -> bool:
        if self._writes is not None and sim.now < self._writes.pending_until:
            return False
        if self.monitor:
            return not sim.vms and sim.waiting + sim.locked == 0 and not self._deferred and not sim.changed
        return (
            not sim.changed
            and not self._deferred
            and not any(vm.state is VmState.BOOTING or vm.retiring for vm in sim.vms.values())
        )

    def on_ready(self, sim: Simulation, vm: Vm) -> None:
        """A booted worker starts taking work at once (the simulation assigns it)."""

    def on_done(self, sim: Simulation, vm: Vm) -> None:
        """A worker that finished a job takes the next one itself."""

    def on_idle(self, sim: Simulation, vm: Vm) -> None:
        """An idle worker retires after the controller's idle grace, or its own idle timeout without a hint."""
        hint = self._heartbeats.read_hint() if self._heartbeats is not None else None
        sim.schedule_retire(vm, hint.idle_grace_s if hint is not None else self._default_grace_s)


def _instance(vm: Vm) -> base.Instance:
    state = base.InstanceState.STARTING if vm.state is VmState.BOOTING else base.InstanceState.RUNNING
    return base.Instance(str(vm.vid), state, vm.created_at)


def _heartbeat(vm: Vm, now: float, every: float) -> base.Heartbeat:
    """The worker's latest beat: at its last state change, or the last periodic beat since."""
    if vm.state.busy:
        worker = base.WorkerState.BUSY
    elif vm.retiring or vm.draining:
        worker = base.WorkerState.DRAINING
    else:
        worker = base.WorkerState.IDLE
    at = vm.since + every * math.floor((now - vm.since) / every) if every > 0 else now
    return base.Heartbeat(str(vm.vid), worker, at, str(vm.job) if vm.job is not None else None)

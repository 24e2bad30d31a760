"""Builds what a controller or worker process reports through, from ``[metrics]``: the recorder the loop is
given, the endpoints serving it, and (controller) the systemd watchdog. Called by the CLI's commands; closing it
stops the endpoints and tells systemd the service is stopping.
"""

from __future__ import annotations

from scalebus import errors
from scalebus.backends import base
from scalebus.observability import metered, prometheus, server, watchdog
from scalebus.observability.recorder import DecisionLike, Health, ObservationLike
from scalebus.settings import MetricsSettings


class ControllerTelemetry:
    """The controller's recorder: metrics (with ``metrics.port``) and the watchdog (under systemd)."""

    def __init__(self, cfg: MetricsSettings) -> None:
        self.health = Health(stall_s=cfg.stall_s)
        self.exporter = prometheus.ControllerExporter(self.health)
        self.endpoints = (
            server.serve(
                bind=cfg.bind, port=cfg.port, render=self.exporter.render, health=self.health, role="controller"
            )
            if cfg.port
            else None
        )
        self._watchdog = watchdog.Watchdog()

    def metered(self, scale_set: base.ScaleSet) -> base.ScaleSet:
        """The scale set with its calls counted; the Azure adapter's wire counters exposed too."""
        stats = getattr(scale_set, "stats", None)  # VmssScaleSet.stats: an ArmCallStats snapshot
        if stats is not None:
            self.exporter.watch_arm(lambda: scale_set.stats)  # type: ignore[attr-defined]
        return metered.meter_scale_set(scale_set, self.exporter)

    def round_done(self, obs: ObservationLike, decision: DecisionLike, *, next_in_s: float) -> None:
        self.exporter.round_done(obs, decision, next_in_s=next_in_s)
        self._watchdog.ping(ready=True)

    def round_failed(self, exc: errors.BackendError, *, next_in_s: float) -> None:
        self.exporter.round_failed(exc, next_in_s=next_in_s)
        self._watchdog.ping(ready=False)

    def standing_by(self, *, next_in_s: float) -> None:
        """A standby is started and alive (systemd must neither time out its start nor restart it)."""
        self.exporter.standing_by(next_in_s=next_in_s)
        self._watchdog.ping(ready=True)

    def close(self) -> None:
        self._watchdog.close()
        if self.endpoints is not None:
            self.endpoints.close()


class WorkerTelemetry(prometheus.WorkerExporter):
    """One worker's recorder and its endpoints (``metrics.worker_port``; 0, or the port taken: none)."""

    def __init__(self, cfg: MetricsSettings) -> None:
        super().__init__(Health(stall_s=cfg.stall_s))
        self.endpoints = (
            server.serve(
                bind=cfg.bind, port=cfg.worker_port, render=self.render, health=self.health, role="worker"
            )
            if cfg.worker_port
            else None
        )

    def counted(self, notices: base.NoticeSource | None) -> base.NoticeSource | None:
        return None if notices is None else metered.CountedNotices(notices, self)

    def close(self) -> None:
        if self.endpoints is not None:
            self.endpoints.close()

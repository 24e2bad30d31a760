"""Builds what a controller or worker process reports through, from ``[metrics]``: the recorder the loop is
given, the endpoints serving it, and (controller) the systemd watchdog. Called by the CLI's commands; closing it
stops the endpoints and tells systemd the service is stopping.
"""

from __future__ import annotations

from scalebus import errors
from scalebus.backends import base
from scalebus.observability import metered, prometheus, server, watchdog
from scalebus.observability.recorder import DecisionLike, Health, ObservationLike
from scalebus.settings import DEFAULT_POOL, MetricsSettings


class ControllerTelemetry:
    """The controller's recorders (one per pool, :meth:`pool`), its endpoints (with ``metrics.port``) and the
    watchdog (under systemd): one health clock for the process, ticked by every pool's rounds."""

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

    def pool(self, name: str) -> PoolTelemetry:
        """What pool ``name``'s rounds and scale-set calls report through."""
        return PoolTelemetry(self.exporter.pool(name), self._watchdog, self.exporter)

    def close(self) -> None:
        self._watchdog.close()
        if self.endpoints is not None:
            self.endpoints.close()


class PoolTelemetry:
    """One pool's recorder (``recorder.ControllerMetrics``): its metrics, and the process's watchdog fed."""

    def __init__(
        self,
        recorder_: prometheus.ControllerPoolRecorder,
        watchdog_: watchdog.Watchdog,
        exporter: prometheus.ControllerExporter,
    ) -> None:
        self._recorder = recorder_
        self._watchdog = watchdog_
        self._exporter = exporter

    def metered(self, scale_set: base.ScaleSet) -> base.ScaleSet:
        """The scale set with its calls counted; the Azure adapter's wire counters exposed too."""
        stats = getattr(scale_set, "stats", None)  # VmssScaleSet.stats: an ArmCallStats snapshot
        if stats is not None:
            self._exporter.watch_arm(self._recorder.name, lambda: scale_set.stats)  # type: ignore[attr-defined]
        return metered.meter_scale_set(scale_set, self._recorder)

    def round_done(self, obs: ObservationLike, decision: DecisionLike, *, next_in_s: float) -> None:
        self._recorder.round_done(obs, decision, next_in_s=next_in_s)
        self._watchdog.ping(ready=True)

    def round_failed(self, exc: errors.BackendError, *, next_in_s: float) -> None:
        self._recorder.round_failed(exc, next_in_s=next_in_s)
        self._watchdog.ping(ready=False)

    def standing_by(self, *, next_in_s: float) -> None:
        """A standby is started and alive (systemd must neither time out its start nor restart it)."""
        self._recorder.standing_by(next_in_s=next_in_s)
        self._watchdog.ping(ready=True)


class WorkerTelemetry(prometheus.WorkerExporter):
    """One worker's recorder and its endpoints (``metrics.worker_port``; 0, or the port taken: none)."""

    def __init__(self, cfg: MetricsSettings, *, pool: str = DEFAULT_POOL) -> None:
        super().__init__(Health(stall_s=cfg.stall_s), pool=pool)
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

"""What an operator sees of a running controller or worker: Prometheus metrics, ``/healthz``, ``/readyz`` and the
systemd watchdog.

The controller and the worker import only :mod:`scalebus.observability.recorder` (protocols, the no-op default, the
pure health clock and the bounded labels); the composition root builds the real recorders with
:mod:`scalebus.observability.telemetry`. Only :mod:`scalebus.observability.prometheus` imports
``prometheus_client`` and only :mod:`scalebus.observability.watchdog` imports ``sdnotify``.
"""

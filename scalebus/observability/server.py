"""The HTTP endpoints: ``/metrics`` (the exposition), ``/healthz`` (the loop is alive), ``/readyz`` (ready).

A stdlib ``ThreadingHTTPServer`` on a daemon thread, since ``prometheus_client``'s own server answers every path
with the metrics. The exposition is rendered by a callable passed in, so this module knows nothing of Prometheus.
A port already taken is logged and the process runs without endpoints: several workers on one machine (the
embedded default) share ``metrics.worker_port`` and only the first binds it.
"""

from __future__ import annotations

import errno
import http.server
import threading
from collections.abc import Callable

import structlog

from scalebus.observability.recorder import Health

log = structlog.get_logger(__name__)

Render = Callable[[], tuple[bytes, str]]
"""Returns the exposition body and its content type."""


class EndpointServer:
    """Serves the three endpoints until :meth:`close` (safe to call twice)."""

    def __init__(self, server: http.server.ThreadingHTTPServer) -> None:
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="scalebus-metrics", daemon=True
        )
        self._thread.start()
        self._closed = False

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(*, bind: str, port: int, render: Render, health: Health, role: str) -> EndpointServer | None:
    """Start serving on ``bind:port``; ``None`` (logged) when the port is taken."""
    handler = _handler_class(render, health)
    try:
        server = http.server.ThreadingHTTPServer((bind, port), handler)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.warning("metrics_port_busy", role=role, bind=bind, port=port, error=str(exc))
        return None
    server.daemon_threads = True
    endpoints = EndpointServer(server)
    log.info("metrics_serving", role=role, bind=bind, port=endpoints.port)
    return endpoints


def _handler_class(render: Render, health: Health) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            if path == "/metrics":
                body, content_type = render()
                self._answer(200, body, content_type)
            elif path in ("/healthz", "/readyz"):
                ok, why = health.live() if path == "/healthz" else health.ready()
                self._answer(200 if ok else 503, (why + "\n").encode(), "text/plain; charset=utf-8")
            else:
                self._answer(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("metrics_request", line=format % args)

    return Handler

"""One way to run a test peer's HTTP(S) server: threaded, on 127.0.0.1 and a free port, stopped cleanly.

The ARM, IMDS, Service Bus admin and Monitor fakes differ in what they answer, not in how they listen. HTTPS uses a
certificate from a ``trustme`` CA, because the Azure SDKs refuse to send bearer tokens over plain HTTP; clients
trust it through ``connection_verify=<ca.pem>``.
"""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from collections.abc import Callable
from email.message import Message
from typing import Any, Self

import trustme


class BackgroundServer:
    """A started ``ThreadingHTTPServer`` serving ``handler`` from a daemon thread until ``stop``."""

    def __init__(
        self, handler: type[http.server.BaseHTTPRequestHandler], *, name: str, ca: trustme.CA | None = None
    ) -> None:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.scheme = "http"
        if ca is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class ServedFake:
    """The life cycle the HTTP fakes share: ``start`` (subclasses), ``stop``, a context manager, ``endpoint``."""

    _server: BackgroundServer | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() the fake first"
        return self._server.endpoint


Handle = Callable[[str, str, Message], tuple[int, dict[str, str], Any]]
"""What a JSON fake answers: (method, path, headers) -> (status, extra headers, JSON-ready body)."""


def json_handler(handle: Handle) -> type[http.server.BaseHTTPRequestHandler]:
    """A request handler that reads (and drops) the request body, asks ``handle`` and writes its JSON answer."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            status, extra, payload = handle(self.command, self.path, self.headers)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _serve  # noqa: N815  (http.server's naming)

        def log_message(self, *_args: Any) -> None:
            pass

    return Handler

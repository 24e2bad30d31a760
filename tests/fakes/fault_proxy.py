"""A small HTTP/1.1 proxy that injects faults between the Azure SDK and Azurite.

Point a store's ``account_url`` at :attr:`FaultProxy.url` instead of Azurite's, then queue faults with
:meth:`FaultProxy.inject`: each applies to the next matching request(s). Faults are the ones the staging engine
must survive or detect: a connection dropped before any response or half-way through a body, ``503 ServerBusy``
with ``Retry-After``, a slow body, a short body (with a matching ``Content-Length``, so only a size check can
tell) and a corrupt body (same length, flipped bytes: only a checksum can tell).
"""

from __future__ import annotations

import contextlib
import enum
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO


class Fault(enum.Enum):
    DROP = "drop"
    """Close the connection without answering."""
    DROP_MID_BODY = "drop_mid_body"
    """Send the headers and half the body, then close."""
    BUSY = "busy"
    """Answer 503 ServerBusy with ``Retry-After``."""
    SLOW = "slow"
    """Relay the body in small pieces with pauses."""
    SHORT_BODY = "short_body"
    """Send half the body with ``Content-Length`` rewritten to match."""
    CORRUPT = "corrupt"
    """Flip every byte of the body's first 16 bytes; same length."""


@dataclass
class _Rule:
    fault: Fault
    method: str
    path_contains: str
    remaining: int


@dataclass
class _Response:
    status_line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class FaultProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``upstream_port`` on 127.0.0.1."""

    upstream_port: int
    retry_after_s: float = 0.2
    slow_delay_s: float = 0.01
    applied: list[tuple[Fault, str, str]] = field(default_factory=list)
    """(fault, method, path) of every fault injected so far."""

    def __post_init__(self) -> None:
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/devstoreaccount1"

    def inject(self, fault: Fault, *, method: str = "GET", path_contains: str = "", times: int = 1) -> None:
        """Apply ``fault`` to the next ``times`` requests with this method whose path contains the text."""
        with self._lock:
            self._rules.append(_Rule(fault, method.upper(), path_contains, times))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()

    # ------------------------------------------------------------------------------------------ plumbing

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for rule in self._rules:
                if rule.remaining > 0 and rule.method == method and rule.path_contains in path:
                    rule.remaining -= 1
                    self.applied.append((rule.fault, method, path))
                    return rule.fault
        return None

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _addr = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            reader = client.makefile("rb")
            while not self._closed.is_set():
                request = _read_message(reader, is_request=True)
                if request is None:
                    return
                start_line, headers, body = request
                method, path = start_line.split(b" ")[:2]
                fault = self._take(method.decode(), path.decode())
                if fault is Fault.DROP:
                    return
                if fault is Fault.BUSY:
                    client.sendall(_busy_response(self.retry_after_s))
                    continue
                if upstream is None:
                    upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
                    upstream_reader = upstream.makefile("rb")
                upstream.sendall(_serialize(start_line, headers, body))
                response = _read_message(upstream_reader, is_request=False, head=method == b"HEAD")
                if response is None:
                    return
                status_line, resp_headers, resp_body = response
                if not self._relay(client, fault, _Response(status_line, resp_headers, resp_body)):
                    return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                client.close()
            if upstream is not None:
                with contextlib.suppress(OSError):
                    upstream.close()

    def _relay(self, client: socket.socket, fault: Fault | None, response: _Response) -> bool:
        """Send the (possibly damaged) response; ``False`` when the connection must close."""
        body = response.body
        if fault is Fault.SHORT_BODY:
            body = body[: len(body) // 2]
        elif fault is Fault.CORRUPT:
            body = bytes(b ^ 0xFF for b in body[:16]) + body[16:]
        head = _serialize(response.status_line, _with_length(response.headers, len(body)), b"")
        if fault is Fault.DROP_MID_BODY:
            client.sendall(_serialize(response.status_line, response.headers, b"") + body[: len(body) // 2])
            return False
        if fault is Fault.SLOW:
            client.sendall(head)
            step = max(1, len(body) // 20)
            for start in range(0, len(body), step):
                client.sendall(body[start : start + step])
                time.sleep(self.slow_delay_s)
            return True
        client.sendall(head + body)
        return True


def _read_message(
    reader: BinaryIO, *, is_request: bool, head: bool = False
) -> tuple[bytes, list[tuple[bytes, bytes]], bytes] | None:
    start_line = reader.readline()
    if not start_line:
        return None
    headers: list[tuple[bytes, bytes]] = []
    while True:
        line = reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        headers.append((name.strip(), value.strip()))
    lookup = {name.lower(): value for name, value in headers}
    status = b"" if is_request else start_line.split(b" ")[1]
    if head or status in (b"204", b"304"):
        return start_line.rstrip(b"\r\n"), headers, b""
    if lookup.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = _read_chunked(reader)
        headers = [(n, v) for n, v in headers if n.lower() != b"transfer-encoding"]
        headers.append((b"Content-Length", str(len(body)).encode()))
        return start_line.rstrip(b"\r\n"), headers, body
    length = int(lookup.get(b"content-length", b"0"))
    return start_line.rstrip(b"\r\n"), headers, reader.read(length) if length else b""


def _read_chunked(reader: BinaryIO) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int(reader.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while reader.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(parts)
        parts.append(reader.read(size))
        reader.readline()


def _with_length(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    kept = [(n, v) for n, v in headers if n.lower() != b"content-length"]
    return [*kept, (b"Content-Length", str(length).encode())]


def _serialize(start_line: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    lines = [start_line, *(name + b": " + value for name, value in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _busy_response(retry_after_s: float) -> bytes:
    body = (
        b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>'
        b"<Message>The server is busy.</Message></Error>"
    )
    headers = [
        (b"Content-Type", b"application/xml"),
        (b"x-ms-error-code", b"ServerBusy"),
        (b"Retry-After", str(max(0, round(retry_after_s))).encode()),
        (b"x-ms-retry-after-ms", str(int(retry_after_s * 1000)).encode()),
        (b"Content-Length", str(len(body)).encode()),
    ]
    return _serialize(b"HTTP/1.1 503 Server Busy", headers, body)

"""Blob reads and listings on a lean path: keep-alive HTTP connections reused across GETs, bodies streamed.

Why not the SDK for reads: profiled over many small blobs, nearly all client CPU went to azure-core's per-request
pipeline and ``requests`` (which re-reads the proxy environment on every request), and the SDK holds a whole GET
in memory before writing it, so large GETs cost their size in RSS. Here a GET is a minimal HTTP/1.1 exchange on
a pooled persistent connection (one per thread in flight), the body is copied through one fixed buffer of
:data:`READ_BUFFER_BYTES` per thread, so a file of any size is one GET with constant memory.

Listing goes the same way: List Blobs pages are fetched on the same connections and parsed with ElementTree for
the five fields staging needs (name, size, etag, Content-MD5, the ``hdi_isfolder`` marker), and, for a listing of
one folder level (``delimiter=/``), the ``BlobPrefix`` names standing for the sub-folders. Profiled over 2,000
small blobs, the SDK's generated XML deserializer for ``list_blobs`` was ~40 % of all client CPU of a staging run
(a hundred thousand key extractions), and it holds the full ``BlobProperties`` of every blob until the plan is
built.

Boundary: only Get Blob (whole or ranged, conditional on the listed etag) and List Blobs (REST "List Blobs",
``restype=container&comp=list``, with metadata; flat, or one level with a delimiter). Writes and everything else
stay on the SDK in :mod:`scalebus.backends.azure.datalake`, which builds a :class:`BlobReader` from the same
credential the SDK client uses: a bearer token (cached until near expiry), a SAS query string, or a Shared Key
signature (the documented "Authorize with Shared Key" scheme for the Blob service; Azurite uses it).

Errors: HTTP statuses become scalebus storage errors (transient for 408/429/5xx, with ``Retry-After``); the cause
is a :class:`BlobStatusError` carrying ``status_code``. Connection failures (resets, a body cut short) drop the
thread's connection and are transient. :func:`_retry.retry_blob_get` retries; a retry rewinds the sink to where the
read started. Failures of the sink itself (local disk) are not network errors and propagate unchanged.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import functools
import hashlib
import hmac
import io
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, cast
from xml.etree import ElementTree

from scalebus import errors
from scalebus.backends.azure import _errors, _retry

API_VERSION = "2021-08-06"
"""x-ms-version sent with every GET (any version since 2017-11-09 supports bearer tokens and x-ms-range)."""
READ_BUFFER_BYTES = 1024 * 1024
"""The one buffer each thread copies bodies through: the memory a read in flight holds, whatever its size."""
TOKEN_SCOPE = "https://storage.azure.com/.default"
SOCKET_TIMEOUT_S = 60.0
"""No byte for this long on a connection is a failed (transient) read."""
_TOKEN_REFRESH_MARGIN_S = 300.0
_MAX_IDLE = 64
"""Idle connections kept for reuse (one per staging thread in practice); more are closed."""
_IDLE_REOPEN_S = 4.0
"""Servers close idle keep-alive connections (Node, so Azurite: after 5 s); reopen rather than hit a dead one."""
_ERROR_BODY_MAX = 64 * 1024
_HEAD_BUFFER_BYTES = 64 * 1024
_MAX_LINE_BYTES = 64 * 1024
_MAX_HEADERS = 100


class Auth(Protocol):
    """Adds authorisation to one request: mutates ``headers``, returns a query string to append (or "").

    ``query`` holds the request's own query parameters, values percent-encoded as sent (Shared Key signs them).
    """

    def authorize(self, method: str, path: str, headers: dict[str, str], query: Mapping[str, str]) -> str: ...


# --------------------------------------------------------------------------------------------- auth


def string_to_sign(
    method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str], account: str
) -> str:
    """The Shared Key string-to-sign for the Blob service (version 2009-09-19 and later).

    ``path`` is the request path as sent (percent-encoded, starting with ``/``); ``headers`` may use any case.
    Standard headers contribute their value or an empty line (Content-Length: empty when zero); every ``x-ms-``
    header is canonicalised (lower-case name, sorted, ``name:value``); the resource is ``/<account><path>`` plus
    each query parameter as ``\\nname:value`` (lower-case names, sorted, values decoded).
    """
    lower = {name.lower(): value.strip() for name, value in headers.items()}
    length = lower.get("content-length", "")
    standard = [
        lower.get("content-encoding", ""),
        lower.get("content-language", ""),
        "" if length == "0" else length,
        lower.get("content-md5", ""),
        lower.get("content-type", ""),
        lower.get("date", ""),
        lower.get("if-modified-since", ""),
        lower.get("if-match", ""),
        lower.get("if-none-match", ""),
        lower.get("if-unmodified-since", ""),
        lower.get("range", ""),
    ]
    canonical_headers = "".join(f"{name}:{lower[name]}\n" for name in sorted(lower) if name.startswith("x-ms-"))
    resource = f"/{account}{path}"
    for name in sorted(query, key=str.lower):
        resource += f"\n{name.lower()}:{urllib.parse.unquote(query[name])}"
    return method.upper() + "\n" + "\n".join(standard) + "\n" + canonical_headers + resource


@dataclass(frozen=True, slots=True)
class SharedKeyAuth:
    """``Authorization: SharedKey <account>:<base64 HMAC-SHA256 of the string-to-sign>``."""

    account: str
    key: bytes

    @classmethod
    def from_base64(cls, account: str, account_key: str) -> SharedKeyAuth:
        return cls(account, base64.b64decode(account_key))

    def signature(self, message: str) -> str:
        return base64.b64encode(hmac.new(self.key, message.encode("utf-8"), hashlib.sha256).digest()).decode()

    def authorize(self, method: str, path: str, headers: dict[str, str], query: Mapping[str, str]) -> str:
        message = string_to_sign(method, path, query, headers, self.account)
        headers["Authorization"] = f"SharedKey {self.account}:{self.signature(message)}"
        return ""


@dataclass(frozen=True, slots=True)
class SasAuth:
    """A SAS token appended as the query string; no header."""

    token: str

    def authorize(self, method: str, path: str, headers: dict[str, str], query: Mapping[str, str]) -> str:
        return self.token.lstrip("?")


class TokenSource(Protocol):
    def get_token(self, *scopes: str) -> Any: ...


class BearerAuth:
    """``Authorization: Bearer`` from an azure-identity credential, fetched once and reused until near expiry."""

    def __init__(self, credential: TokenSource, *, clock: Any = time.time) -> None:
        self._credential = credential
        self._clock = clock
        self._lock = threading.Lock()
        self._token = ""
        self._expires_on = 0.0

    def authorize(self, method: str, path: str, headers: dict[str, str], query: Mapping[str, str]) -> str:
        headers["Authorization"] = "Bearer " + self._current()
        return ""

    def _current(self) -> str:
        with self._lock:
            if self._clock() >= self._expires_on - _TOKEN_REFRESH_MARGIN_S:
                try:
                    access = self._credential.get_token(TOKEN_SCOPE)
                except Exception as exc:  # azure-identity raises many types; none may leak past the port
                    raise errors.StorageError(
                        f"cannot get a storage token ({type(exc).__name__}); check the identity"
                    ) from exc
                self._token, self._expires_on = str(access.token), float(access.expires_on)
            return self._token


# --------------------------------------------------------------------------------------------- reads


class BlobStatusError(Exception):
    """An HTTP error answer to a GET (the cause chained under the scalebus error)."""

    def __init__(self, status_code: int, error_code: str, retry_after_s: float | None) -> None:
        super().__init__(f"HTTP {status_code} {error_code}".rstrip())
        self.status_code = status_code
        self.error_code = error_code
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class ListedBlob:
    """One entry of a List Blobs page, as far as staging needs it (``etag`` exactly as the service lists it)."""

    name: str
    size: int
    etag: str
    content_md5: bytes | None
    is_folder: bool


@dataclass(frozen=True, slots=True)
class BlobPage:
    """One List Blobs page; ``next_marker`` is "" on the last page. ``prefixes`` are the ``BlobPrefix`` names of
    a listing with a delimiter (each ends with the delimiter); empty for a flat listing."""

    blobs: list[ListedBlob]
    next_marker: str
    prefixes: tuple[str, ...] = ()


def parse_blob_page(body: bytes, *, what: str) -> BlobPage:
    """The blobs and blob prefixes of a List Blobs ``EnumerationResults`` document (names marked ``Encoded`` are
    percent-decoded). Layout: https://learn.microsoft.com/rest/api/storageservices/list-blobs (``Blobs/Blob``,
    ``Blobs/BlobPrefix/Name``, ``NextMarker``)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise errors.StorageError(f"{what}: the listing is not valid XML ({exc})") from exc
    blobs: list[ListedBlob] = []
    for node in root.iterfind("Blobs/Blob"):
        name_node = node.find("Name")
        props = node.find("Properties")
        if name_node is None or props is None:
            raise errors.StorageError(f"{what}: a listed blob has no Name or Properties")
        name = _name_text(name_node)
        md5 = props.findtext("Content-MD5")
        blobs.append(
            ListedBlob(
                name=name,
                size=int(props.findtext("Content-Length") or 0),
                etag=props.findtext("Etag") or "",
                content_md5=base64.b64decode(md5) if md5 else None,
                is_folder=node.findtext("Metadata/hdi_isfolder") == "true",
            )
        )
    prefixes: list[str] = []
    for node in root.iterfind("Blobs/BlobPrefix"):
        name_node = node.find("Name")
        if name_node is None:
            raise errors.StorageError(f"{what}: a listed blob prefix has no Name")
        prefixes.append(_name_text(name_node))
    return BlobPage(blobs, root.findtext("NextMarker") or "", tuple(prefixes))


def _name_text(node: ElementTree.Element) -> str:
    """A ``Name`` element's text; the service percent-encodes names XML cannot carry and says so with
    ``Encoded="true"``."""
    name = node.text or ""
    return urllib.parse.unquote(name) if node.get("Encoded") == "true" else name


class BlobReader:
    """Streams blobs of one account endpoint (``scheme://host[:port][/base path]``) into sinks, and lists them."""

    def __init__(self, endpoint: str, auth: Auth, *, ca_file: str = "") -> None:
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) endpoint: {parts.scheme}://{parts.hostname}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._host_header = parts.netloc.rpartition("@")[2]
        self._base_path = parts.path.rstrip("/")
        self._auth = auth
        self._ssl = ssl.create_default_context(cafile=ca_file or None) if parts.scheme == "https" else None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._idle: list[_Wire] = []

    def close(self) -> None:
        """Close the idle connections (connections in use close when their GET ends)."""
        with self._lock:
            wires, self._idle = self._idle, []
        for wire in wires:
            wire.close()

    def read_into(
        self, container: str, name: str, sink: BinaryIO, *, offset: int, length: int | None, etag: str, what: str
    ) -> int:
        """Write bytes ``[offset, offset+length)`` of the blob (``length`` None: to the end) into ``sink``; return
        how many arrived. Refused with a 412 cause if the blob's etag is no longer ``etag``."""
        if length == 0:
            return 0
        path = f"{self._base_path}/{container}/{urllib.parse.quote(name, safe='/~')}"
        headers = {"x-ms-version": API_VERSION, "If-Match": etag}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            headers["x-ms-range"] = f"bytes={offset}-{end}"
        got: int = self._attempt(path, {}, headers, sink, _Attempts(rewind_point(sink)), what=what)
        return got

    def list_page(
        self, container: str, prefix: str, marker: str, *, max_results: int, what: str, delimiter: str = ""
    ) -> BlobPage:
        """One page of List Blobs (with metadata) of names starting with ``prefix``; ``marker`` is the previous
        page's ``next_marker`` ("" for the first page). With a ``delimiter`` the names that go on past it after
        the prefix come back once each as a blob prefix instead (one folder level); ``max_results`` counts both."""
        query = {"restype": "container", "comp": "list", "include": "metadata", "maxresults": str(max_results)}
        if prefix:
            query["prefix"] = prefix
        if delimiter:
            query["delimiter"] = delimiter
        if marker:
            query["marker"] = marker
        encoded = {name: urllib.parse.quote(value, safe="") for name, value in query.items()}
        path = f"{self._base_path}/{urllib.parse.quote(container, safe='')}"
        sink = io.BytesIO()
        got: int = self._attempt(path, encoded, {"x-ms-version": API_VERSION}, sink, _Attempts(0), what=what)
        return parse_blob_page(sink.getbuffer()[:got].tobytes(), what=what)  # a retry rewrote it from 0

    @_retry.retry_blob_get
    def _attempt(
        self,
        path: str,
        query: Mapping[str, str],
        headers: dict[str, str],
        sink: BinaryIO,
        attempts: _Attempts,
        *,
        what: str,
    ) -> int:
        attempts.count += 1
        rewind_for_retry(sink, attempts.start, attempt=attempts.count, what=what)
        return self._get(path, query, dict(headers), sink, what=what)

    def _get(
        self, path: str, query: Mapping[str, str], headers: dict[str, str], sink: BinaryIO, *, what: str
    ) -> int:
        """One GET of ``path`` with ``query`` (values percent-encoded); the 200/206 body goes into ``sink``."""
        headers["x-ms-date"] = _http_date()
        params = "&".join(f"{name}={value}" for name, value in query.items())
        extra = self._auth.authorize("GET", path, headers, query)
        if extra:
            params = f"{params}&{extra}" if params else extra
        target = f"{path}?{params}" if params else path
        wire = self._take()
        reusable = False
        try:
            try:
                wire.send(f"GET {target} HTTP/1.1\r\nHost: {self._host_header}\r\n", headers)
                status, reason, response_headers, keep_alive = wire.read_head()
                if status not in (200, 206):
                    reusable = wire.drain_error_body(response_headers) and keep_alive
                    raise _status_error(status, reason, response_headers, what=what)
                count = wire.copy_body(response_headers, sink, self._buffer())
                reusable = keep_alive and "content-length" in response_headers
                return count
            except _SinkError as exc:
                raise exc.original from None
            except (OSError, ValueError) as exc:
                raise errors.TransientStorageError(f"{what}: connection failed ({type(exc).__name__})") from exc
        finally:
            self._give(wire, reusable=reusable)

    def _take(self) -> _Wire:
        """An idle keep-alive connection (most recently used first), else a new one."""
        now = time.monotonic()
        stale: list[_Wire] = []
        wire: _Wire | None = None
        with self._lock:
            while self._idle:
                candidate = self._idle.pop()
                if now - candidate.used_at <= _IDLE_REOPEN_S:
                    wire = candidate
                    break
                stale.append(candidate)
        for old in stale:
            old.close()
        return wire or _Wire.open(self._host, self._port, self._ssl)

    def _give(self, wire: _Wire, *, reusable: bool) -> None:
        if reusable:
            wire.used_at = time.monotonic()
            with self._lock:
                if len(self._idle) < _MAX_IDLE:
                    self._idle.append(wire)
                    return
        wire.close()

    def _buffer(self) -> memoryview:
        buffer: memoryview | None = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = self._local.buffer = memoryview(bytearray(READ_BUFFER_BYTES))
        return buffer


def rewind_point(sink: BinaryIO) -> int | None:
    """Where ``sink`` stands before a read, if a retry can rewind it to there (``None``: it cannot)."""
    try:
        return sink.tell() if sink.seekable() else None
    except (AttributeError, OSError):
        return None


def rewind_for_retry(sink: BinaryIO, start: int | None, *, attempt: int, what: str) -> None:
    """Before attempt number ``attempt`` (from 1) of a read into ``sink``: a retry rewrites the body from where the
    first attempt started, so seek back there, or fail if the sink cannot rewind."""
    if attempt <= 1:
        return
    if start is None:
        raise errors.StorageError(f"{what}: failed part-way into a sink that cannot rewind")
    sink.seek(start)


@dataclass(slots=True)
class _Attempts:
    """Where the sink stood before the first attempt, and how many attempts were made."""

    start: int | None
    count: int = 0


class _Sink(Protocol):
    def write(self, data: memoryview, /) -> object: ...


class _Headers(dict[str, str]):
    """Response headers by lower-case name; ``get`` takes any case."""

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


class _BadResponse(ConnectionError):
    """The answer broke HTTP/1.1 framing (or the connection closed inside it): the connection is unusable."""


class _Wire:
    """One HTTP/1.1 keep-alive connection. Requests are written in one ``sendall``; responses are parsed only as
    far as a blob GET needs (status, headers, Content-Length or chunked framing), which costs a fraction of
    ``http.client``'s ``email``-based header parsing per request."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = cast(io.BufferedReader, sock.makefile("rb", buffering=_HEAD_BUFFER_BYTES))
        self.used_at = time.monotonic()

    @classmethod
    def open(cls, host: str, port: int, context: ssl.SSLContext | None) -> _Wire:
        try:
            raw = socket.create_connection((host, port), timeout=SOCKET_TIMEOUT_S)
        except OSError as exc:
            raise errors.TransientStorageError(f"cannot connect to {host}:{port} ({type(exc).__name__})") from exc
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return cls(context.wrap_socket(raw, server_hostname=host) if context is not None else raw)
        except ssl.SSLCertVerificationError as exc:
            raw.close()
            raise errors.StorageError(f"{host}: TLS certificate not trusted ({exc.verify_message})") from exc
        except OSError as exc:
            raw.close()
            raise errors.TransientStorageError(f"cannot connect to {host}:{port} ({type(exc).__name__})") from exc

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._reader.close()
        with contextlib.suppress(OSError):
            self._sock.close()

    def send(self, request_line: str, headers: Mapping[str, str]) -> None:
        head = request_line + "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
        self._sock.sendall(head.encode("ascii"))

    def read_head(self) -> tuple[int, str, _Headers, bool]:
        """Status, reason, headers, and whether the connection may carry another request afterwards."""
        line = self._reader.readline(_MAX_LINE_BYTES + 1)
        if not line:
            raise _BadResponse("connection closed before the status line")
        version, _, rest = line.rstrip(b"\r\n").partition(b" ")
        status_text, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or len(status_text) != 3 or not status_text.isdigit():
            raise _BadResponse("not an HTTP/1.x status line")
        headers = _Headers()
        for _ in range(_MAX_HEADERS):
            line = self._reader.readline(_MAX_LINE_BYTES + 1)
            if line in (b"\r\n", b"\n"):
                break
            name, colon, value = line.partition(b":")
            if not colon or not line.endswith(b"\n"):
                raise _BadResponse("malformed or cut-off header line")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        else:
            raise _BadResponse("too many header lines")
        keep_alive = version == b"HTTP/1.1" and headers.get("connection", "").lower() != "close"
        return int(status_text), reason.decode("latin-1"), headers, keep_alive

    def copy_body(self, headers: _Headers, sink: _Sink, buffer: memoryview) -> int:
        """Copy the body into ``sink`` through ``buffer``; a body shorter than its framing says is an error."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return self._copy_chunked(sink, buffer)
        announced = headers.get("content-length")
        if announced is None:  # framed by the connection closing
            return self._copy(sink, buffer, None)
        return self._copy(sink, buffer, int(announced))

    def drain_error_body(self, headers: _Headers) -> bool:
        """Read and drop an error answer's (small) body; ``False`` if the connection cannot be reused after it."""
        sink = _Discard()
        try:
            if headers.get("transfer-encoding", "").lower() == "chunked":
                self._copy_chunked(sink, memoryview(bytearray(_ERROR_BODY_MAX)))
            elif "content-length" in headers and int(headers["content-length"]) <= _ERROR_BODY_MAX:
                self._copy(sink, memoryview(bytearray(_ERROR_BODY_MAX)), int(headers["content-length"]))
            else:
                return False
        except (OSError, ValueError, _SinkError):
            return False
        return sink.count <= _ERROR_BODY_MAX

    def _copy(self, sink: _Sink, buffer: memoryview, length: int | None) -> int:
        count = 0
        size = len(buffer)
        while length is None or count < length:
            want = size if length is None else min(size, length - count)
            n = self._reader.readinto(buffer[:want])
            if not n:
                if length is None:
                    return count
                raise _BadResponse(f"body cut short: {count} of {length} bytes")
            _write(sink, buffer[:n])
            count += n
        return count

    def _copy_chunked(self, sink: _Sink, buffer: memoryview) -> int:
        count = 0
        while True:
            size_line = self._reader.readline(_MAX_LINE_BYTES + 1)
            if not size_line.endswith(b"\n"):
                raise _BadResponse("cut-off chunk size")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self._reader.readline(_MAX_LINE_BYTES + 1) not in (b"\r\n", b"\n", b""):
                    pass
                return count
            count += self._copy(sink, buffer, size)
            if self._reader.readline(_MAX_LINE_BYTES + 1) not in (b"\r\n", b"\n"):
                raise _BadResponse("malformed chunk end")


class _Discard:
    def __init__(self) -> None:
        self.count = 0

    def write(self, data: memoryview) -> int:
        self.count += len(data)
        if self.count > _ERROR_BODY_MAX:
            raise _SinkError(ValueError("error body too large"))
        return len(data)


class _SinkError(Exception):
    """Carries a failure of the sink (local disk) past the network handlers, so it is not retried as one."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def _write(sink: _Sink, data: memoryview) -> None:
    try:
        sink.write(data)
    except Exception as exc:
        raise _SinkError(exc) from None


def _status_error(status: int, reason: str, headers: _Headers, *, what: str) -> errors.StorageError:
    """The scalebus error for a non-2xx answer; the cause (chained) carries ``status_code``."""
    code = headers.get("x-ms-error-code", "") or reason
    cause = BlobStatusError(status, code, _errors.retry_after_s(_Answer(headers)))
    error: errors.StorageError
    if status == 404:
        error = errors.ObjectNotFoundError(f"{what}: not found")
    elif status in (401, 403):
        error = errors.StorageError(
            f"{what}: authentication failed (HTTP {status}); check the identity and its roles"
        )
    elif status in errors.TRANSIENT_HTTP_STATUS:
        error = errors.TransientStorageError(f"{what}: {cause}", retry_after_s=cause.retry_after_s)
    else:
        error = errors.StorageError(f"{what}: {cause}")
    error.__cause__ = cause
    return error


@dataclass(frozen=True, slots=True)
class _Answer:
    """What ``_errors.retry_after_s`` reads: an object with ``headers``."""

    headers: _Headers


@functools.lru_cache(maxsize=2)
def _http_date_at(second: int) -> str:
    return email.utils.formatdate(second, usegmt=True)


def _http_date() -> str:
    """RFC 1123 date for x-ms-date, formatted once per second."""
    return _http_date_at(int(time.time()))


def proxy_configured(endpoint: str) -> bool:
    """Whether the environment routes ``endpoint`` through a proxy (this path does not speak proxies)."""
    parts = urllib.parse.urlsplit(endpoint)
    proxies = urllib.request.getproxies()
    if not proxies.get(parts.scheme):
        return False
    return not urllib.request.proxy_bypass(parts.hostname or "")

"""The shapes of the storage URIs scalebus reads and writes, checked by one pure module.

Job intake and the storage adapters both call these functions, so a URI that passes submit-time validation is a
URI the adapter accepts: a disagreement would turn a job that can never run into one retried to max deliveries.
Nothing here touches a file system or the network; whether a path exists, is a symlink or is readable is the
adapter's question. Failures raise :class:`~scalebus.errors.UnsafePathError` (a permanent storage error).
"""

from __future__ import annotations

import posixpath
import urllib.parse
from dataclasses import dataclass

from scalebus import errors

FILE = "file"
ABFSS = "abfss"
SUPPORTED_SCHEMES = (FILE, ABFSS)
_ABFSS_SHAPE = "abfss://<filesystem>@<account>.dfs.core.windows.net/<path>"
_SHOWN_CHARS = 160


@dataclass(frozen=True, slots=True)
class Location:
    """Where a URI points, normalised for comparison: ``store`` names the file system or container, ``segments``
    the path inside it (no empty or ``.`` segments)."""

    scheme: str
    store: str
    segments: tuple[str, ...]

    def overlaps(self, other: Location) -> bool:
        """Equal, or one inside the other: writing to one can change what the other names."""
        if (self.scheme, self.store) != (other.scheme, other.store):
            return False
        n = min(len(self.segments), len(other.segments))
        return self.segments[:n] == other.segments[:n]


def shown(uri: str) -> str:
    """A URI as error messages quote it: bounded in length, whatever a hostile producer sent."""
    return repr(uri if len(uri) <= _SHOWN_CHARS else uri[:_SHOWN_CHARS] + "…")


def file_path(uri: str) -> str:
    """The absolute local path a ``file:///abs/path`` URI names (percent-decoded)."""
    if not uri.startswith(f"{FILE}://"):
        raise errors.UnsafePathError(f"{shown(uri)}: not a file:/// URI")
    parts = _split(uri)
    if parts.netloc not in ("", "localhost"):
        raise errors.UnsafePathError(f"{shown(uri)}: file URIs must name a local path (file:///abs/path)")
    path = _decoded_path(uri, parts)
    if not path.startswith("/"):
        raise errors.UnsafePathError(f"{shown(uri)}: the path must be absolute (file:///abs/path)")
    return path


def split_abfss(uri: str) -> tuple[str, str, str]:
    """``(filesystem, host, path)`` of an ADLS Gen2 URI; ``path`` is the blob name (no leading ``/``)."""
    if not uri.startswith(f"{ABFSS}://"):
        raise errors.UnsafePathError(f"{shown(uri)}: not an ADLS Gen2 URI ({_ABFSS_SHAPE})")
    parts = _split(uri)
    filesystem, at, host = parts.netloc.partition("@")
    if not at or not filesystem or "." not in host or "@" in host:
        raise errors.UnsafePathError(f"{shown(uri)}: not an ADLS Gen2 URI ({_ABFSS_SHAPE})")
    return filesystem, host, _decoded_path(uri, parts).lstrip("/")


def check_job_uri(uri: str) -> Location:
    """A URI a job may name (an input or its output), as a :class:`Location`; ``UnsafePathError`` otherwise.

    The adapters' own shape checks, plus what a job must not carry: a scheme no worker reads, control
    characters, the file system root as a whole.
    """
    scheme = uri.partition("://")[0] if "://" in uri else ""
    if scheme not in SUPPORTED_SCHEMES:
        raise errors.UnsafePathError(
            f"unsupported scheme in {shown(uri)}: use one of {', '.join(s + '://' for s in SUPPORTED_SCHEMES)}"
        )
    if any(ord(c) < 0x20 or c == "\x7f" for c in uri) or uri != uri.strip():
        raise errors.UnsafePathError(f"{shown(uri)} has control characters or surrounding spaces")
    if scheme == FILE:
        path = file_path(uri)
        if path.strip("/") == "":
            raise errors.UnsafePathError(f"{shown(uri)} names the file system root: name a folder")
        return Location(FILE, "", _segments(path))
    filesystem, host, path = split_abfss(uri)
    return Location(ABFSS, f"{filesystem}@{host.lower()}", _segments(path))


def local_location(path: str) -> Location:
    """The :class:`Location` of an absolute local path (a configured root, the work dir), for comparisons."""
    return Location(FILE, "", _segments(posixpath.normpath(path)))


def _split(uri: str) -> urllib.parse.SplitResult:
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.UnsafePathError(f"{shown(uri)} is not valid Unicode (a lone surrogate)") from None
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError as exc:  # an unbalanced [ in the host, say
        raise errors.UnsafePathError(f"{shown(uri)} is not a URI ({exc})") from None
    if parts.query or parts.fragment or "?" in uri or "#" in uri:
        raise errors.UnsafePathError(f"{shown(uri)} must not carry a query or fragment (no SAS tokens in URIs)")
    return parts


def _decoded_path(uri: str, parts: urllib.parse.SplitResult) -> str:
    try:
        path = urllib.parse.unquote(parts.path, errors="strict")
    except UnicodeDecodeError:
        raise errors.UnsafePathError(f"{shown(uri)} percent-encodes bytes that are not UTF-8") from None
    if "\x00" in path or ".." in path.split("/"):
        raise errors.UnsafePathError(f"{shown(uri)} has a '..' segment or NUL byte")
    return path


def _segments(path: str) -> tuple[str, ...]:
    return tuple(s for s in path.split("/") if s not in ("", "."))

"""``FolderStore``: the object-store port over a local folder (``file:///abs/path`` URIs).

The embedded default data lake, and the reference the Azure adapter's contract tests are held to. An object's
etag is ``f"{mtime_ns}-{size}"``: cheap to compute and it changes whenever the file is rewritten. Writes go to a
temporary file beside the target and are renamed into place, so readers never see half a file.
"""

from __future__ import annotations

import os
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from scalebus import errors, uris
from scalebus.backends import base

_SCHEME = "file://"
_COPY_BLOCK_BYTES = 1024 * 1024


def path_of(uri: str) -> Path:
    """The local path a ``file:///abs/path`` URI names (percent-decoded)."""
    return Path(uris.file_path(uri))


def uri_of(path: Path) -> str:
    """The ``file://`` URI of an absolute local path."""
    return _SCHEME + urllib.parse.quote(str(path))


def _etag(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns}-{st.st_size}"


class FolderStore:
    """``base.ObjectStore`` over the local file system."""

    def close(self) -> None:
        """Nothing to release."""

    def list_files(self, uri: str) -> Iterator[base.RemoteObject]:
        root = path_of(uri)
        try:
            st = root.stat()
        except FileNotFoundError:
            raise errors.ObjectNotFoundError(f"{uri}: not found") from None
        except OSError as exc:
            raise errors.StorageError(f"{uri}: cannot stat ({exc.strerror})") from exc
        if not root.is_dir():
            yield base.RemoteObject(uri=uri, rel_path=root.name, size=st.st_size, etag=_etag(st))
            return
        prefix = uri.rstrip("/") + "/"
        for rel_path, entry_st in _walk(root, ""):
            yield base.RemoteObject(
                uri=prefix + urllib.parse.quote(rel_path),
                rel_path=rel_path,
                size=entry_st.st_size,
                etag=_etag(entry_st),
            )

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        path = path_of(obj.uri)
        try:
            with path.open("rb", buffering=0) as src:
                if offset:
                    src.seek(offset)
                return _copy(src, sink, length)
        except FileNotFoundError:
            raise errors.ObjectNotFoundError(f"{obj.uri}: not found") from None
        except OSError as exc:
            raise errors.StorageError(f"{obj.uri}: read failed ({exc.strerror})") from exc

    def write_file(self, source: Path, uri: str) -> None:
        target = path_of(uri)
        try:
            with source.open("rb", buffering=0) as src:
                self._write_atomically(target, lambda fh: _copy(src, fh, None))
        except FileNotFoundError:
            raise errors.StorageError(f"{source}: local file not found") from None

    def write_bytes(self, data: bytes, uri: str) -> None:
        self._write_atomically(path_of(uri), lambda fh: fh.write(data))

    def exists(self, uri: str) -> bool:
        return path_of(uri).is_file()

    @staticmethod
    def _write_atomically(target: Path, write: Callable[[BinaryIO], object]) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    write(fh)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise errors.StorageError(f"{target}: write failed ({exc.strerror})") from exc


def _walk(root: Path, rel: str) -> Iterator[tuple[str, os.stat_result]]:
    """Files under ``root`` in sorted order, with '/'-separated paths; symlinks to directories not followed."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise errors.StorageError(f"{root}: cannot list ({exc.strerror})") from exc
    for entry in entries:
        child = f"{rel}{entry.name}"
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), child + "/")
        elif entry.is_file():
            yield child, entry.stat()


def _copy(src: BinaryIO, sink: BinaryIO, length: int | None) -> int:
    if length is not None and length <= _COPY_BLOCK_BYTES:
        data = src.read(length)
        sink.write(data)
        return len(data)
    written = 0
    while length is None or written < length:
        want = _COPY_BLOCK_BYTES if length is None else min(_COPY_BLOCK_BYTES, length - written)
        data = src.read(want)
        if not data:
            break
        sink.write(data)
        written += len(data)
    return written

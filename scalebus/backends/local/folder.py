"""``FolderStore``: the object-store port over a local folder (``file:///abs/path`` URIs).

The embedded default data lake, and the reference the Azure adapter's contract tests are held to. An object's
etag is ``f"{mtime_ns}-{size}"``: cheap to compute and it changes whenever the file is rewritten.

A job names the paths this store reads and writes, so the store enforces where they may be, whatever the intake
already checked:

* **Confinement.** Every path is resolved to its real path (symlinks followed) and must lie below one of the
  configured ``roots`` (``None``: anywhere, for the CLI run by the user on their own files; ``()``: nowhere) and
  outside every ``reserved`` folder (the worker's work dir and secrets). ``/proc``, ``/dev`` and ``/sys`` are
  never read or written. A symlink in a listed tree that leads out of the roots is refused, not skipped.
* **Only regular files.** Files are opened by their real path with ``O_NOFOLLOW`` (a symlink swapped in after the
  check fails the open) and must be regular files (no devices, FIFOs or sockets).
* **The file read is the file listed.** Its size and ``mtime_ns`` are compared with the listed etag before and
  after the read; a difference is a transient ``SourceChangedError`` (listed again on the next attempt).
* **Writes never leave a temporary file in the folder written to.** A write goes to a temporary file and is
  renamed into place, so readers never see half a file. The temporary file lives in a hidden folder at the top
  of the root (``.scalebus-tmp``, never inside a job's output, which lies strictly below a root) when the root
  is on the same file system, else beside the target under a short hidden name (``.sb-<random>.part``), so a
  target name of any legal length still has a temporary name; listings skip such leftovers. Files are created
  with mode 0666 less the umask, never a source's mode.

Listing one folder level (``list_level``, one ``scandir``) keeps every rule of the recursive listing: both go
through the same per-entry decisions, so a walk of levels sees exactly the files ``list_files`` sees.

Refusals are ``UnsafePathError``: permanent, so the job is dead-lettered with the reason.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from scalebus import errors, uris
from scalebus.backends import base

_SCHEME = "file://"
_COPY_BLOCK_BYTES = 1024 * 1024
SYSTEM_DIRS = ("/proc", "/dev", "/sys")
"""Never read or written, whatever the roots say: pseudo-files of the kernel and devices."""
TEMP_DIR_NAME = ".scalebus-tmp"
"""The hidden folder at the top of a root where writes are prepared."""
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
_TEMP_NAME = re.compile(r"\.sb-[0-9a-f]{16}\.part")
"""The shape of a temporary name (here and in staging): listings skip such files."""


def path_of(uri: str) -> Path:
    """The local path a ``file:///abs/path`` URI names (percent-decoded)."""
    return Path(uris.file_path(uri))


def uri_of(path: Path) -> str:
    """The ``file://`` URI of an absolute local path."""
    return _SCHEME + urllib.parse.quote(str(path))


def _etag(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns}-{st.st_size}"


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class Confinement:
    """Where the store may read and write (module docstring). Paths are kept as real paths."""

    roots: tuple[str, ...] | None = None
    reserved: tuple[str, ...] = ()

    @classmethod
    def of(cls, roots: Sequence[str] | None, reserved: Sequence[str]) -> Confinement:
        real = os.path.realpath
        return cls(None if roots is None else tuple(real(r) for r in roots), tuple(real(r) for r in reserved))

    def resolve(self, path: Path | str, *, shown: str) -> str:
        """The real path of ``path``; ``UnsafePathError`` unless it is allowed (``shown`` names it)."""
        real = os.path.realpath(path)
        reason = self.refusal(real)
        if reason is not None:
            raise errors.UnsafePathError(f"{uris.shown(shown)}: {reason}")
        return real

    def refusal(self, real: str) -> str | None:
        """Why the real path ``real`` may not be touched, or ``None``."""
        if any(_inside(real, system) for system in SYSTEM_DIRS):
            return "system folders (/proc, /dev, /sys) are never read or written"
        if any(_inside(real, folder) for folder in self.reserved):
            return "inside the worker's own folders"
        if self.roots is None:
            return None
        if not self.roots:
            return "local files are not accepted here (storage.local_roots is empty)"
        root = self.root_of(real)
        if root is None:
            return f"resolves to {real!r}, outside storage.local_roots"
        if TEMP_DIR_NAME in Path(real).relative_to(root).parts[:1]:
            return f"{TEMP_DIR_NAME} is reserved for the store's temporary files"
        return None

    def root_of(self, real: str) -> str | None:
        return next((root for root in self.roots or () if _inside(real, root)), None)


class FolderStore:
    """``base.ObjectStore`` and ``base.FolderLister`` over the local file system, confined to ``roots`` and
    outside ``reserved``."""

    _confinement = Confinement()

    def __init__(self, *, roots: Sequence[str] | None = None, reserved: Sequence[str] = ()) -> None:
        self._confinement = Confinement.of(roots, reserved)

    def close(self) -> None:
        """Nothing to release."""

    def list_files(self, uri: str) -> Iterator[base.RemoteObject]:
        real, st = self._stat_listed(uri)
        if not stat.S_ISDIR(st.st_mode):
            _check_regular(st, uri)
            yield base.RemoteObject(uri=uri, rel_path=path_of(uri).name, size=st.st_size, etag=_etag(st))
            return
        prefix = uri.rstrip("/") + "/"
        for rel_path, entry_st in _walk(Path(real), "", self._confinement):
            yield base.RemoteObject(
                uri=prefix + urllib.parse.quote(rel_path),
                rel_path=rel_path,
                size=entry_st.st_size,
                etag=_etag(entry_st),
            )

    def list_level(self, uri: str, rel_prefix: str = "") -> Iterator[base.RemoteObject | base.SubFolder]:
        """One ``scandir`` of folder ``uri``, sorted by name, with the entry rules of ``list_files``. Only at the
        top of a walk (``rel_prefix`` empty) may ``uri`` name a file; a sub-folder that is no longer a folder is
        not found."""
        real, st = self._stat_listed(uri)
        if not stat.S_ISDIR(st.st_mode):
            if rel_prefix:
                raise errors.ObjectNotFoundError(f"{uris.shown(uri)}: no longer a folder")
            _check_regular(st, uri)
            yield base.RemoteObject(uri=uri, rel_path=path_of(uri).name, size=st.st_size, etag=_etag(st))
            return
        folder_uri = uri.rstrip("/") + "/"
        for name, entry_st in _level(Path(real), rel_prefix, self._confinement):
            if entry_st is None:
                yield base.SubFolder(
                    uri=folder_uri + urllib.parse.quote(name) + "/", rel_prefix=f"{rel_prefix}{name}/"
                )
            else:
                yield base.RemoteObject(
                    uri=folder_uri + urllib.parse.quote(name),
                    rel_path=rel_prefix + name,
                    size=entry_st.st_size,
                    etag=_etag(entry_st),
                )

    def _stat_listed(self, uri: str) -> tuple[str, os.stat_result]:
        """The real path of a URI to list (confined) and its ``stat``; ``ObjectNotFoundError`` if nothing is
        there."""
        real = self._confinement.resolve(path_of(uri), shown=uri)
        try:
            return real, os.stat(real)
        except FileNotFoundError:
            raise errors.ObjectNotFoundError(f"{uris.shown(uri)}: not found") from None
        # ENOTDIR (a file where a folder of the path should be) stays a storage failure, not "not found": on
        # local disk it means the lake's own folders changed under the store (an outage, a remount), which a
        # later attempt may not see. (In a blob lake a name below a blob's name is simply not found.)
        except OSError as exc:
            raise errors.StorageError(f"{uris.shown(uri)}: cannot stat ({exc.strerror})") from exc

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        real = self._confinement.resolve(path_of(obj.uri), shown=obj.uri)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise errors.ObjectNotFoundError(f"{uris.shown(obj.uri)}: not found") from None
        except OSError as exc:
            raise _read_error(obj, exc) from exc
        with os.fdopen(fd, "rb", buffering=0) as src:
            try:
                _check_same(os.fstat(fd), obj)
                if offset:
                    src.seek(offset)
                got = _copy(src, sink, length)
                _check_same(os.fstat(fd), obj)
            except OSError as exc:
                raise _read_error(obj, exc) from exc
        return got

    def write_file(self, source: Path, uri: str) -> None:
        try:
            src = source.open("rb", buffering=0)
        except FileNotFoundError:
            raise errors.StorageError(f"{source}: local file not found") from None
        except OSError as exc:
            raise errors.StorageError(f"{source}: cannot read ({exc.strerror})") from exc
        with src:
            self._write_atomically(uri, lambda fh: _copy(src, fh, None))

    def write_bytes(self, data: bytes, uri: str) -> None:
        self._write_atomically(uri, lambda fh: fh.write(data))

    def exists(self, uri: str) -> bool:
        return os.path.isfile(self._confinement.resolve(path_of(uri), shown=uri))

    def _write_atomically(self, uri: str, write: Callable[[BinaryIO], object]) -> None:
        target = self._confinement.resolve(path_of(uri), shown=uri)
        parent = os.path.dirname(target)
        try:
            os.makedirs(parent, exist_ok=True)
            self._confinement.resolve(parent, shown=uri)  # nobody slipped a symlink into the new folders
            tmp = self._temp_path(parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            try:
                with os.fdopen(fd, "wb") as fh:
                    write(fh)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            kind = errors.TransientStorageError if exc.errno in _DISK_ERRNOS else errors.StorageError
            raise kind(f"{uris.shown(uri)}: write failed ({exc.strerror})") from exc

    def _temp_path(self, parent: str) -> str:
        """A fresh temporary path on ``parent``'s file system, outside ``parent`` when a root holds it."""
        name = f".sb-{secrets.token_hex(8)}.part"
        root = self._confinement.root_of(parent)
        if root is not None:
            temp_dir = os.path.join(root, TEMP_DIR_NAME)
            os.makedirs(temp_dir, mode=0o700, exist_ok=True)
            if os.stat(temp_dir).st_dev == os.stat(parent).st_dev:
                return os.path.join(temp_dir, name)
        return os.path.join(parent, name)


def _check_regular(st: os.stat_result, uri: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise errors.UnsafePathError(f"{uris.shown(uri)}: not a regular file (a device, FIFO or socket)")


def _check_same(st: os.stat_result, obj: base.RemoteObject) -> None:
    """The open file is a regular file and, when the listing gave its etag, still the one listed."""
    _check_regular(st, obj.uri)
    if obj.etag and _etag(st) != obj.etag:
        raise errors.SourceChangedError(
            f"{uris.shown(obj.uri)}: changed since it was listed (size and mtime {_etag(st)}, listed {obj.etag})"
        )


def _read_error(obj: base.RemoteObject, exc: OSError) -> errors.StorageError:
    if exc.errno == errno.ELOOP:
        return errors.UnsafePathError(f"{uris.shown(obj.uri)}: became a symlink after it was checked")
    return errors.StorageError(f"{uris.shown(obj.uri)}: read failed ({exc.strerror})")


def _walk(root: Path, rel: str, confinement: Confinement) -> Iterator[tuple[str, os.stat_result]]:
    """Files under ``root`` in sorted order, with '/'-separated paths (the rules of :func:`_level`)."""
    for name, st in _level(root, rel, confinement):
        if st is None:
            yield from _walk(root / name, f"{rel}{name}/", confinement)
        else:
            yield f"{rel}{name}", st


def _level(root: Path, rel: str, confinement: Confinement) -> Iterator[tuple[str, os.stat_result | None]]:
    """The entries directly in ``root`` in sorted order: ``(name, stat)`` for a file, ``(name, None)`` for a
    folder. Symlinks to directories are not followed; a symlink leading out of the confinement is refused (named
    by its path ``rel`` + name); the temporary folder, temporary leftovers, devices, FIFOs and sockets are
    skipped."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise errors.StorageError(f"{root}: cannot list ({exc.strerror})") from exc
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                if entry.name != TEMP_DIR_NAME:
                    yield entry.name, None
                continue
            if _TEMP_NAME.fullmatch(entry.name):  # an interrupted write's leftover, never an object
                continue
            if entry.is_symlink():
                reason = confinement.refusal(os.path.realpath(entry.path))
                if reason is not None:
                    raise errors.UnsafePathError(f"{rel + entry.name!r}: a symlink that {reason}")
            if entry.is_file():
                yield entry.name, entry.stat()
        except OSError as exc:
            raise errors.StorageError(f"{entry.path}: cannot stat ({exc.strerror})") from exc


def _copy(src: BinaryIO, sink: BinaryIO, length: int | None) -> int:
    """Copy from ``src`` into ``sink``; the sink's own failures are the local disk's, not the source's."""
    written = 0
    while length is None or written < length:
        want = _COPY_BLOCK_BYTES if length is None else min(_COPY_BLOCK_BYTES, length - written)
        data = src.read(want)
        if not data:
            break
        _write_sink(sink, data)
        written += len(data)
    return written


def _write_sink(sink: BinaryIO, data: bytes) -> None:
    try:
        sink.write(data)
    except OSError as exc:
        if exc.errno in _DISK_ERRNOS:
            raise errors.LocalDiskError(f"local disk error writing what was read ({exc.strerror})") from exc
        raise errors.StorageError(f"local write failed ({exc.strerror})") from exc

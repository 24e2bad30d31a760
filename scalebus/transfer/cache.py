"""The per-VM input cache: verified input files kept on the scratch disk between jobs, so a later job (or a
redelivery of the same one) that names the same object links it into its input folder instead of downloading it.

It implements :class:`scalebus.transfer.kit.InputCache`: staging asks :meth:`DiskInputCache.place` before it
fetches a file and offers every file it verified to :meth:`DiskInputCache.keep`. The rules, and why:

* **Where.** ``<worker.work_dir>/cache`` (:data:`CACHE_DIR`): on the file system of the job folders, so an entry
  is *hard-linked* into a job (no bytes copied, no extra space while the job holds it) and a kept file is linked
  from the job into the cache. Where a link is refused (another file system, a file system without hard links,
  the link count limit) the bytes are copied instead (``shutil.copyfile``: in-kernel). The folder's name never
  matches a delivery folder's, so the work-dir sweep leaves it alone.
* **Keys.** An entry is named by the SHA-256 of (URI, etag, size) (:func:`entry_name`); the index row repeats the
  three, so a lookup compares them too. An object rewritten between jobs has a new etag and misses; an object
  listed without an etag is never cached (nothing would tell a rewrite). Content is what staging verified (size
  always, Content-MD5 where the store has one) before offering it.
* **Index.** SQLite in WAL mode beside the entries (:data:`INDEX_NAME`): one row per entry with its size, inode,
  ``mtime_ns`` and a use counter (the LRU order: a counter, not a clock, so a clock step never reorders it); the
  bytes held are kept in a one-row table by triggers, so a keep costs no scan. It survives a restart.
* **Atomic insert.** A kept file is linked (or copied) to a temporary name in ``tmp/``, made read-only, renamed
  to its entry name, and only then is its row written; an eviction deletes the row first, then the file. So a
  crash at any point (SIGKILL mid-keep included) leaves at worst a temporary file or an entry file without a row,
  never a row naming a partial file; :meth:`DiskInputCache.open` removes both, and drops rows whose file is gone
  or differs. Every lookup checks the file again before serving it (below).
* **Power loss.** Nothing is fsynced on the download path (an fsync per file would hold each download until its
  bytes are on disk), so after a machine crash a file's tail may never have reached the disk. Each row records
  the boot it was written in (``/proc/sys/kernel/random/boot_id``); a clean :meth:`DiskInputCache.close` calls
  ``sync()`` and marks the rows durable; an open in a later boot drops the rows that were never marked. A process
  crash loses nothing: the page cache survives it.
* **Never stale, never modified.** Entries are mode 0444, and so is the job's hard-linked input (the same
  inode): an analytics that writes its inputs in place must copy them first. Before an entry is served its
  size, inode and ``mtime_ns`` are compared with those recorded when it was kept and its mode must still be
  read-only: any write through a link (also by root, whom 0444 does not stop) changes ``mtime_ns``, so the entry
  is dropped and the object downloaded again. After linking, the placed file is checked once more. Limits: a
  writer that restores ``mtime`` afterwards (``touch -d``, ``os.utime``) defeats the check, and so would a write
  within the same clock tick as the keep (before the analytics has started); while
  several workers share this VM's cache, a root analytics writing its linked input changes the bytes another
  running job reads through its own link (0444 prevents it for the unprivileged ``scalebus`` user the units run
  as; only reflinks would prevent it for root, and the VMs' ext4 has none). The cache never hashes content.
* **Cap.** ``worker.cache_bytes``: after each keep the least recently used entries are evicted until the bytes
  held are under the cap; a file larger than the cap is not kept. Every entry counts its full size, even while
  a job folder still links the same inode and it therefore costs nothing extra: the count is an upper bound of
  the disk the cache uses, reached once the job folders are deleted.
* **Concurrency.** Staging calls in from many threads and several workers may share a VM's work dir: one
  SQLite connection per process behind a thread lock, and every change (insert, drop, evict, clean-up) taken
  under an ``flock`` on :data:`LOCK_NAME` as well as SQLite's own ``BEGIN IMMEDIATE``; lookups only read. A
  copy (across file systems only) holds the lock while it copies.
* **Never in the way.** :meth:`~DiskInputCache.keep` never raises (a full disk, a refused link, a read-only
  folder: it logs and skips) and :meth:`~DiskInputCache.place` returns ``False`` on any trouble: a cache problem
  costs a download, never a job. :func:`open_input_cache` gives ``None`` (run without a cache) when the folder is
  unusable, and starts afresh from a corrupt index.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import sqlite3
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from scalebus import errors
from scalebus.backends import base

log = structlog.get_logger(__name__)

CACHE_DIR = "cache"
"""The cache's folder under ``worker.work_dir``."""
INDEX_NAME = "index.db"
LOCK_NAME = "lock"
OBJECTS_DIR = "objects"
TMP_DIR = "tmp"
READ_ONLY = 0o444
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
_LINK_REFUSED = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP})
"""``link()`` failures that a copy gets round: another file system, no hard links there, too many links."""
_BUSY_TIMEOUT_S = 30.0
_CORRUPT = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    name TEXT PRIMARY KEY,
    uri TEXT NOT NULL,
    etag TEXT NOT NULL,
    size INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    boot_id TEXT NOT NULL,
    durable INTEGER NOT NULL DEFAULT 0,
    used INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_use ON entries (used);
CREATE TABLE IF NOT EXISTS held (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO held VALUES (0, 0);
CREATE TRIGGER IF NOT EXISTS entries_added AFTER INSERT ON entries
    BEGIN UPDATE held SET bytes = bytes + NEW.size; END;
CREATE TRIGGER IF NOT EXISTS entries_removed AFTER DELETE ON entries
    BEGIN UPDATE held SET bytes = bytes - OLD.size; END;
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """One index row: the file's name under ``objects/`` and what it was when it was kept."""

    name: str
    size: int
    inode: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class Usage:
    entries: int
    bytes: int


def entry_name(obj: base.RemoteObject) -> str:
    """The entry's file name: a hash of (URI, etag, size), so any rewrite of the object names another entry."""
    return hashlib.sha256(f"{obj.uri}\n{obj.etag}\n{obj.size}".encode()).hexdigest()


def cacheable(obj: base.RemoteObject, *, cap_bytes: int) -> bool:
    """Whether ``obj`` may be kept: it has an etag (else a rewrite could not be told) and fits under the cap."""
    return bool(obj.etag) and obj.size <= cap_bytes


def mismatch(entry: Entry, st: os.stat_result) -> str | None:
    """Why the file ``st`` describes is not the entry that was kept (``None``: it is)."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size != entry.size:
        return f"size {st.st_size}, kept with {entry.size}"
    if st.st_ino != entry.inode:
        return "replaced since it was kept"
    if st.st_mtime_ns != entry.mtime_ns:
        return "modified since it was kept"
    if st.st_mode & 0o222:
        return "made writable since it was kept"
    return None


def evictions(lru: Iterable[tuple[str, int]], *, held_bytes: int, cap_bytes: int) -> list[str]:
    """The entries to evict, least recently used first (``lru``: name and size in that order), until the bytes
    held are at most ``cap_bytes``."""
    out: list[str] = []
    for name, size in lru:
        if held_bytes <= cap_bytes:
            break
        out.append(name)
        held_bytes -= size
    return out


def open_input_cache(work_dir: str, *, cap_bytes: int) -> DiskInputCache | None:
    """The worker's cache under ``work_dir``; ``None`` when ``cap_bytes`` is 0 or the folder is unusable (the
    worker then downloads everything, as without a cache). A corrupt index is discarded with its entries."""
    if cap_bytes <= 0:
        return None
    root = Path(work_dir).absolute() / CACHE_DIR
    for first in (True, False):
        try:
            return DiskInputCache.open(root, cap_bytes=cap_bytes)
        except sqlite3.Error as exc:
            if not (first and getattr(exc, "sqlite_errorcode", None) in _CORRUPT):
                log.warning("input_cache_unavailable", cache=str(root), error=str(exc))
                return None
            log.warning("input_cache_index_corrupt", cache=str(root), error=str(exc), action="starting afresh")
            shutil.rmtree(root, ignore_errors=True)
        except errors.LocalDiskError as exc:
            log.warning("input_cache_unavailable", cache=str(root), error=str(exc))
            return None
    return None


class DiskInputCache:
    """Input files kept under ``root`` up to ``cap_bytes`` (see the module docstring). Open with :meth:`open`;
    :meth:`close` when the worker ends (it marks the entries durable)."""

    def __init__(self, root: Path, *, cap_bytes: int, conn: sqlite3.Connection, lock_fd: int) -> None:
        self._root = root
        self._cap = cap_bytes
        self._conn = conn
        self._lock_fd = lock_fd
        self._lock = threading.Lock()
        self._boot_id = boot_id()
        self._closed = False

    @classmethod
    def open(cls, root: Path, *, cap_bytes: int) -> DiskInputCache:
        """Open (or create) the cache at ``root`` and clean up what a crash or another boot left behind.
        Raises ``LocalDiskError`` if the folder cannot be used, ``sqlite3.Error`` if the index cannot."""
        try:
            for sub in (OBJECTS_DIR, TMP_DIR):
                (root / sub).mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(root / LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _unusable(root, exc) from exc
        try:
            conn = _connect(root / INDEX_NAME)
        except BaseException:
            os.close(lock_fd)
            raise
        cache = cls(root, cap_bytes=cap_bytes, conn=conn, lock_fd=lock_fd)
        try:
            dropped = cache._recover()
        except BaseException as exc:
            cache._release()
            if isinstance(exc, OSError):
                raise _unusable(root, exc) from exc
            raise
        usage = cache.usage()
        log.info(
            "input_cache_opened",
            cache=str(root),
            entries=usage.entries,
            bytes=usage.bytes,
            cap_bytes=cap_bytes,
            dropped=dropped,
        )
        return cache

    # ------------------------------------------------------------------ the port

    def place(self, obj: base.RemoteObject, target: Path) -> bool:
        """Link (or copy) the kept copy of ``obj`` to ``target``; ``False`` if there is none or it is no longer
        what was kept (then it is dropped, and nothing is at ``target``)."""
        if not cacheable(obj, cap_bytes=self._cap):
            return False
        placed = False
        try:
            entry = self._lookup(obj)
            if entry is None:
                return False
            path = self._path(entry.name)
            problem = _check(entry, path)
            if problem is None:
                placed = True
                problem = _put(path, target, entry)
            if problem is not None:
                self._drop(entry, why=problem)
                return False
            self._touch(entry.name)
        except (OSError, sqlite3.Error) as exc:
            log.warning("input_cache_place_failed", uri=obj.uri, error=str(exc))
            if placed:
                _unlink_quietly(target)
            return False
        log.debug("input_cache_hit", uri=obj.uri, bytes=obj.size)
        return True

    def keep(self, obj: base.RemoteObject, path: Path) -> None:
        """Keep the verified file at ``path`` as ``obj``'s entry (making it read-only); evict to the cap. Never
        raises: what cannot be kept is logged and skipped."""
        if not cacheable(obj, cap_bytes=self._cap):
            return
        try:
            self._keep(obj, path)
        except (OSError, sqlite3.Error) as exc:
            log.warning("input_cache_keep_failed", uri=obj.uri, error=str(exc))

    def usage(self) -> Usage:
        """Entries and bytes held right now."""
        with self._lock:
            (count,) = self._conn.execute("SELECT COUNT(*) FROM entries").fetchone()
            (held,) = self._conn.execute("SELECT bytes FROM held").fetchone()
        return Usage(int(count), int(held))

    def close(self) -> None:
        """Flush the kept files to disk, so they survive a reboot, and release the index; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            with self._changing() as conn:
                pending = conn.execute(
                    "SELECT COUNT(*) FROM entries WHERE durable = 0 AND boot_id = ?", (self._boot_id,)
                ).fetchone()[0]
                if pending:
                    os.sync()  # under the lock: a row added meanwhile would be marked durable unsynced
                    conn.execute("UPDATE entries SET durable = 1 WHERE boot_id = ?", (self._boot_id,))
        except (OSError, sqlite3.Error) as exc:
            log.warning("input_cache_close_failed", error=str(exc))
        finally:
            self._release()

    def _release(self) -> None:
        self._closed = True
        with self._lock:
            self._conn.close()
        os.close(self._lock_fd)

    # ------------------------------------------------------------------ inside

    def _keep(self, obj: base.RemoteObject, path: Path) -> None:
        name = entry_name(obj)
        st = os.stat(path)
        if st.st_size != obj.size:
            log.warning("input_cache_keep_skipped", uri=obj.uri, why=f"size {st.st_size}, listed {obj.size}")
            return
        tmp = self._root / TMP_DIR / f"{name}.{os.getpid()}.{threading.get_ident()}"
        with self._changing() as conn:
            if self._already_kept(conn, name, st):
                return
            try:
                _link_or_copy(path, tmp)
                os.chmod(tmp, READ_ONLY)  # a hard link: the job's input becomes read-only with it
                kept = os.stat(tmp)
                final = self._path(name)
                final.parent.mkdir(exist_ok=True)
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            conn.execute("DELETE FROM entries WHERE name = ?", (name,))
            conn.execute(
                "INSERT INTO entries (name, uri, etag, size, inode, mtime_ns, boot_id, used) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, (SELECT COALESCE(MAX(used), 0) + 1 FROM entries))",
                (name, obj.uri, obj.etag, kept.st_size, kept.st_ino, kept.st_mtime_ns, self._boot_id),
            )
            self._evict(conn)
        log.debug("input_cache_kept", uri=obj.uri, bytes=obj.size)

    def _already_kept(self, conn: sqlite3.Connection, name: str, st: os.stat_result) -> bool:
        """The entry exists and ``path`` is a link to it (placed, then offered again): just mark it used."""
        row = conn.execute("SELECT size, inode, mtime_ns FROM entries WHERE name = ?", (name,)).fetchone()
        if row is None or mismatch(Entry(name, *row), st) is not None:
            return False
        conn.execute("UPDATE entries SET used = (SELECT MAX(used) + 1 FROM entries) WHERE name = ?", (name,))
        return True

    def _lookup(self, obj: base.RemoteObject) -> Entry | None:
        name = entry_name(obj)
        with self._lock:
            row = self._conn.execute(
                "SELECT size, inode, mtime_ns FROM entries WHERE name = ? AND uri = ? AND etag = ? AND size = ?",
                (name, obj.uri, obj.etag, obj.size),
            ).fetchone()
        return None if row is None else Entry(name, *row)

    def _touch(self, name: str) -> None:
        with self._changing() as conn:
            conn.execute("UPDATE entries SET used = (SELECT MAX(used) + 1 FROM entries) WHERE name = ?", (name,))

    def _drop(self, entry: Entry, *, why: str) -> None:
        """Forget an entry that is not what was kept, unless another process replaced it meanwhile."""
        log.warning("input_cache_entry_dropped", entry=entry.name, why=why)
        with self._changing() as conn:
            gone = conn.execute("DELETE FROM entries WHERE name = ? AND inode = ?", (entry.name, entry.inode))
            if gone.rowcount:
                _unlink_quietly(self._path(entry.name))

    def _evict(self, conn: sqlite3.Connection) -> None:
        (held,) = conn.execute("SELECT bytes FROM held").fetchone()
        if held <= self._cap:
            return
        lru = conn.execute("SELECT name, size FROM entries ORDER BY used")
        names = evictions(lru, held_bytes=held, cap_bytes=self._cap)
        lru.close()
        for name in names:
            conn.execute("DELETE FROM entries WHERE name = ?", (name,))
        for name in names:  # rows first: a crash in between leaves files without a row, removed at open
            _unlink_quietly(self._path(name))
        log.debug("input_cache_evicted", entries=len(names), cap_bytes=self._cap)

    def _recover(self) -> int:
        """After a restart: drop rows from another boot never made durable and rows whose file differs; remove
        temporary files and entry files without a row; evict to the cap (it may have shrunk). Returns the rows
        dropped."""
        dropped = 0
        with self._changing() as conn:
            for tmp in (self._root / TMP_DIR).iterdir():  # every insert holds the lock: these are all dead
                _unlink_quietly(tmp)
            rows = conn.execute("SELECT name, size, inode, mtime_ns, boot_id, durable FROM entries").fetchall()
            for name, size, inode, mtime_ns, row_boot, durable in rows:
                if not durable and row_boot != self._boot_id:
                    why: str | None = "kept before a reboot and never flushed to disk"
                else:
                    why = _check(Entry(name, size, inode, mtime_ns), self._path(name))
                if why is None:
                    continue
                log.debug("input_cache_entry_dropped", entry=name, why=why)
                conn.execute("DELETE FROM entries WHERE name = ?", (name,))
                _unlink_quietly(self._path(name))
                dropped += 1
            known = {row[0] for row in conn.execute("SELECT name FROM entries")}
            for path in self._entry_files():
                if path.name not in known:
                    _unlink_quietly(path)
            self._evict(conn)
        return dropped

    def _entry_files(self) -> Iterator[Path]:
        for folder in (self._root / OBJECTS_DIR).iterdir():
            if folder.is_dir() and not folder.is_symlink():
                yield from folder.iterdir()

    def _path(self, name: str) -> Path:
        return self._root / OBJECTS_DIR / name[:2] / name

    @contextlib.contextmanager
    def _changing(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, serialised with this process's threads and with other processes (``flock``)."""
        with self._lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)


def boot_id() -> str:
    """This boot's id (Linux); ``""`` where it cannot be read (then every boot looks the same)."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return ""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


def _check(entry: Entry, path: Path) -> str | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "its file is missing"
    return mismatch(entry, st)


def _unusable(root: Path, exc: OSError) -> errors.LocalDiskError:
    return errors.LocalDiskError(f"{root}: cannot use the input cache folder ({exc.strerror or exc})")


def _put(path: Path, target: Path, entry: Entry) -> str | None:
    """Link (or copy) the entry to ``target`` and check what arrived; why it is not served (``None``: it is).
    Nothing is left at ``target`` when it is not."""
    try:
        _link_or_copy(path, target)
    except FileNotFoundError:
        if path.exists():
            raise  # the target's folder is gone: not the entry's fault
        return "its file is missing"  # evicted by another process meanwhile
    except FileExistsError:
        os.unlink(target)  # a leftover the staging would have overwritten
        _link_or_copy(path, target)
    placed = os.lstat(target)
    problem = _check(entry, path)  # the entry again: it did not change while it was linked or copied
    if problem is None and (not stat.S_ISREG(placed.st_mode) or placed.st_size != entry.size):
        problem = f"placed {placed.st_size} bytes, kept {entry.size}"
    if problem is not None:
        _unlink_quietly(target)
    return problem


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst``; copy it where a link is refused (another file system)."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in _LINK_REFUSED:
            raise
        _copy(src, dst)


def _copy(src: Path, dst: Path) -> None:
    """Copy to a temporary name beside ``dst`` and rename: nobody ever sees half a copy at ``dst``."""
    part = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.copy")
    try:
        shutil.copyfile(src, part)
        os.replace(part, dst)
    except BaseException:
        _unlink_quietly(part)
        raise


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

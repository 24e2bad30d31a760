"""The embedded scale set: worker processes on this machine, with the life cycle of VMSS instances.

A SQLite file (``scale_set.state_path``) holds the instance table and worker heartbeats, so the controller,
the workers (which delete themselves) and ``scalebus status`` all see one truth. Each instance is one
``scalebus worker run`` process, told who it is through ``SCALEBUS_INSTANCE_ID`` — the local stand-in for what
IMDS tells a VM. An instance is *starting* until its worker's first heartbeat, *running* after, *deleting* once
deletion was asked for and the process has not exited yet, and *failed* if its process died without being
deleted (a crash or SIGKILL), which is what a VM that failed provisioning or died looks like to the controller.

Crash-only: an instance is recorded with the process that is starting it (``spawner_pid``) before its worker
exists, and with the worker's pid once started. Every listing judges each row by a live process: a row whose
worker died, or whose spawner died before recording a worker (a controller killed mid-spawn), is *failed* at
once and its heartbeat forgotten, so the policy replaces it without waiting for the heartbeat timeout, and
deleting it removes the row at the next listing. A worker that cannot be started at all (its command missing or
not executable) raises ``ScaleSetError`` and leaves no row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil
import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.local import _sqlite, notices

log = structlog.get_logger(__name__)

INSTANCE_ID_ENV = "SCALEBUS_INSTANCE_ID"
SCALE_SET_ENV = "SCALEBUS_SCALE_SET"
MODEL_ENV = "SCALEBUS_MODEL"
"""The model (image) an instance was created from, as its worker process sees it."""
DEFAULT_MODEL = "local"
"""The pool's model until ``update_model`` names another: the worker command the pool was opened with."""
_KILL_AFTER_S = 30.0
SPAWN_PAUSE_ENV = "SCALEBUS_FAULT_SPAWN_PAUSE_S"
"""A fault hook: seconds to pause between recording an instance and starting its worker, so a test can kill the
spawning process in between. Unset (or not a number) in production: no pause."""
_ADDED_COLUMNS = {"spawner_pid": "INTEGER", "spawner_started": "REAL"}
"""Columns newer than the first schema, added to a pool file made before them."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT UNIQUE NOT NULL,
    deleting_since REAL,
    pid INTEGER,
    pid_started REAL,
    created_at REAL NOT NULL,
    spawner_pid INTEGER,
    spawner_started REAL
);
CREATE TABLE IF NOT EXISTS heartbeats (
    instance_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    job_id TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS fleet_hint (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    idle_grace_s REAL NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS fleet_retire (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    instance_ids TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pool_model (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    image TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS instance_models (
    instance_id TEXT PRIMARY KEY,
    image TEXT NOT NULL
);
"""


def pool_url(state_path: Path) -> str:
    """The pool's identity, as its workers are told it (what a VMSS resource id is on Azure)."""
    return f"local://{state_path}"


class LocalScaleSet:
    """Implements ``base.ScaleSet`` with ``scalebus worker run`` processes (``scale_set.url = "local://"``)."""

    def __init__(self, state_path: Path, *, worker_argv: Sequence[str], worker_env: Mapping[str, str]) -> None:
        self._db = _sqlite.Database(state_path, _SCHEMA)
        _add_missing_columns(self._db)
        self._argv = list(worker_argv)
        self._env = dict(worker_env)
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._board = notices.LocalNoticeBoard(state_path)
        self.url = pool_url(state_path)
        self._closed = False

    def get_capacity(self) -> int:
        return sum(1 for i in self.list_instances() if i.state is not base.InstanceState.DELETING)

    def list_instances(self) -> list[base.Instance]:
        self._reap()
        with self._db.read() as conn:
            rows = conn.execute(
                f"SELECT instance_id, deleting_since, created_at, {_PROCESS_COLUMNS} FROM instances ORDER BY seq"
            ).fetchall()
        dead = [row[0] for row in rows if not _row_alive(*row[3:])]
        if dead:  # a dead process's last heartbeat would count it as serving until the heartbeat timeout
            with self._db.write() as conn:
                conn.executemany("DELETE FROM heartbeats WHERE instance_id = ?", [(iid,) for iid in dead])
        beats = {hb.instance_id for hb in SqliteHeartbeatStore(self._db).read_all()}
        instances = []
        for instance_id, deleting_since, created_at, pid, *_ in rows:
            if deleting_since is not None:
                state = base.InstanceState.DELETING
            elif instance_id in dead:
                state = base.InstanceState.FAILED
            elif instance_id in beats:
                state = base.InstanceState.RUNNING
            else:
                state = base.InstanceState.STARTING
            instances.append(base.Instance(instance_id, state, created_at, name=f"pid {pid}"))
        return self._with_models(instances)

    def set_capacity(self, capacity: int) -> None:
        if capacity < 0:
            raise errors.ScaleSetError(f"capacity must be >= 0, not {capacity}")
        live = [i for i in self.list_instances() if i.state is not base.InstanceState.DELETING]
        if capacity > len(live):
            for _ in range(capacity - len(live)):
                self._spawn()
        elif capacity < len(live):
            # Like VMSS: the scale set, not the caller, picks which instances go (the newest first).
            self.delete_instances([i.instance_id for i in live[capacity:]])

    def delete_instances(self, instance_ids: Sequence[str]) -> None:
        now = time.time()
        with self._db.write() as conn:
            rows = [
                conn.execute(
                    "SELECT pid, pid_started, deleting_since FROM instances WHERE instance_id = ?", (iid,)
                ).fetchone()
                for iid in instance_ids
            ]
            conn.executemany(
                "UPDATE instances SET deleting_since = COALESCE(deleting_since, ?) WHERE instance_id = ?",
                [(now, iid) for iid in instance_ids],
            )
        for iid, row in zip(instance_ids, rows, strict=True):
            if row is not None and row[2] is None:
                log.info("instance_deleting", instance_id=iid)
                _signal(row[0], row[1], signal.SIGTERM)
        self._reap()

    def set_protection(self, instance_id: str, *, protected: bool) -> None:
        """Nothing but the controller scales a local pool in, so there is nothing to protect against."""

    def heartbeats(self) -> SqliteHeartbeatStore:
        return SqliteHeartbeatStore(self._db)

    # -- the model (what ``scalebus rollout`` replaces) ------------------------------------------------------

    def model(self) -> str:
        with self._db.read() as conn:
            row = conn.execute("SELECT image FROM pool_model WHERE id = 1").fetchone()
        return str(row[0]) if row else DEFAULT_MODEL

    def update_model(self, image: str) -> None:
        """New instances are started with ``image`` in their environment (``SCALEBUS_MODEL``); running ones keep
        theirs, as VMs keep the image they booted."""
        if not image.strip():
            raise errors.UserInputError("the new model (image) must not be empty")
        with self._db.write() as conn:
            conn.execute("INSERT OR REPLACE INTO pool_model (id, image) VALUES (1, ?)", (image,))
        log.info("model_updated", image=image)

    def _record_model(self, instance_id: str) -> dict[str, str]:
        """Book the current model for a new instance; returns what its worker's environment gains."""
        image = self.model()
        with self._db.write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO instance_models (instance_id, image) VALUES (?, ?)", (instance_id, image)
            )
        return {MODEL_ENV: image}

    def _with_models(self, instances: list[base.Instance]) -> list[base.Instance]:
        with self._db.read() as conn:
            models = dict(conn.execute("SELECT instance_id, image FROM instance_models").fetchall())
        return [dataclasses.replace(i, model=models.get(i.instance_id, DEFAULT_MODEL)) for i in instances]

    def _spawn(self) -> None:
        me = psutil.Process()
        with self._db.write() as conn:
            # never reuse an id (as VMSS instance ids are not): heartbeats, notices and logs name one machine
            last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'instances'").fetchone()
            seq = (last[0] if last else 0) + 1
            instance_id = f"local-{seq}"
            conn.execute(
                "INSERT INTO instances (seq, instance_id, created_at, spawner_pid, spawner_started) "
                "VALUES (?, ?, ?, ?, ?)",
                (seq, instance_id, time.time(), me.pid, me.create_time()),
            )
        _fault_pause()
        env = {**os.environ, **self._env, INSTANCE_ID_ENV: instance_id, SCALE_SET_ENV: self.url}
        env.update(self._record_model(instance_id))
        try:
            proc = subprocess.Popen(self._argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        except (OSError, ValueError) as exc:
            with self._db.write() as conn:
                conn.execute("DELETE FROM instances WHERE instance_id = ?", (instance_id,))
            log.error("instance_start_failed", instance_id=instance_id, error=str(exc))
            raise errors.ScaleSetError(f"cannot start a worker ({self._argv[0]}): {exc}") from exc
        self._children[proc.pid] = proc
        started = psutil.Process(proc.pid).create_time() if psutil.pid_exists(proc.pid) else time.time()
        with self._db.write() as conn:
            conn.execute(
                "UPDATE instances SET pid = ?, pid_started = ? WHERE instance_id = ?",
                (proc.pid, started, instance_id),
            )
        log.info("instance_started", instance_id=instance_id, pid=proc.pid)

    def _evict_started(self) -> None:
        """The platform's part in a Spot eviction: once an event for pool instances has started (approved, or its
        time came), they stop at once (SIGKILL: a VM does not wait for its processes) and are deleted; the event is
        cleared when none of them is left."""
        with self._db.read() as conn:
            rows = conn.execute("SELECT instance_id, pid, pid_started, deleting_since FROM instances").fetchall()
        instances = {row[0]: row[1:] for row in rows}
        for event_id, names in self._board.started_evictions(now=time.time()):
            targets = [name for name in names if name in instances and instances[name][2] is None]
            if targets:
                now = time.time()
                with self._db.write() as conn:
                    conn.executemany(
                        "UPDATE instances SET deleting_since = ? WHERE instance_id = ?",
                        [(now, target) for target in targets],
                    )
                for target in targets:
                    log.warning("instance_evicted", instance_id=target, event_id=event_id)
                    _signal(instances[target][0], instances[target][1], signal.SIGKILL)
            if not any(name in instances for name in names):
                self._board.clear(event_id)

    def _reap(self) -> None:
        """Act on started evictions; collect exited children; forget deleted instances whose process is gone; kill
        stragglers."""
        self._evict_started()
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]
        now = time.time()
        with self._db.write() as conn:
            rows = conn.execute(
                f"SELECT instance_id, deleting_since, {_PROCESS_COLUMNS} FROM instances "
                "WHERE deleting_since IS NOT NULL"
            ).fetchall()
            for instance_id, since, pid, pid_started, *spawner in rows:
                if not _row_alive(pid, pid_started, *spawner):
                    conn.execute("DELETE FROM instances WHERE instance_id = ?", (instance_id,))
                    conn.execute("DELETE FROM heartbeats WHERE instance_id = ?", (instance_id,))
                    log.info("instance_deleted", instance_id=instance_id)
                elif now - since > _KILL_AFTER_S:
                    _signal(pid, pid_started, signal.SIGKILL)

    def close(self, *, wait_s: float = 10.0) -> None:
        """Release the database after waiting up to ``wait_s`` for the worker processes this handle started to
        exit (they retire on their own once idle); any still running keep running, as VMs outlive the controller
        that sized their scale set. Closing twice does nothing more."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + wait_s
        for proc in self._children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        self._board.close()
        self._db.close()


_PROCESS_COLUMNS = "pid, pid_started, spawner_pid, spawner_started"


def _add_missing_columns(db: _sqlite.Database) -> None:
    with db.write() as conn:
        present = {row[1] for row in conn.execute("PRAGMA table_info(instances)")}
        for column, declaration in _ADDED_COLUMNS.items():
            if column not in present:
                conn.execute(f"ALTER TABLE instances ADD COLUMN {column} {declaration}")


def _fault_pause() -> None:
    try:
        pause = float(os.environ.get(SPAWN_PAUSE_ENV, "0"))
    except ValueError:
        return
    if pause > 0:
        time.sleep(pause)


def _row_alive(
    pid: int | None, started: float | None, spawner_pid: int | None, spawner_started: float | None
) -> bool:
    """A started instance lives while its worker does; one being started, while the process starting it does."""
    if pid is not None:
        return _alive(pid, started)
    return spawner_pid is not None and _alive(spawner_pid, spawner_started)


def _alive(pid: int | None, started: float | None) -> bool:
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        same = started is None or abs(proc.create_time() - started) < 1.0
        return bool(same and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _signal(pid: int | None, started: float | None, sig: signal.Signals) -> None:
    if pid is None or pid == os.getpid() or not _alive(pid, started):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class SqliteHeartbeatStore:
    """Implements ``base.HeartbeatStore`` in the pool's database."""

    def __init__(self, db: _sqlite.Database) -> None:
        self._db = db

    @classmethod
    def open(cls, state_path: Path) -> SqliteHeartbeatStore:
        return cls(_sqlite.Database(state_path, _SCHEMA))

    def beat(self, heartbeat: base.Heartbeat) -> None:
        with self._db.write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO heartbeats (instance_id, state, job_id, at) VALUES (?, ?, ?, ?)",
                (heartbeat.instance_id, heartbeat.state.value, heartbeat.job_id, heartbeat.at),
            )

    def read_all(self) -> list[base.Heartbeat]:
        with self._db.read() as conn:
            rows = conn.execute("SELECT instance_id, state, job_id, at FROM heartbeats").fetchall()
        return [base.Heartbeat(iid, base.WorkerState(state), at, job_id) for iid, state, job_id, at in rows]

    def forget(self, instance_id: str) -> None:
        with self._db.write() as conn:
            conn.execute("DELETE FROM heartbeats WHERE instance_id = ?", (instance_id,))

    def publish_hint(self, hint: base.FleetHint) -> None:
        with self._db.write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO fleet_hint (id, idle_grace_s, at) VALUES (1, ?, ?)",
                (hint.idle_grace_s, hint.at),
            )
            if hint.retire_instance_ids is not None:  # None: keep the list a rollout stored
                conn.execute(
                    "INSERT OR REPLACE INTO fleet_retire (id, instance_ids) VALUES (1, ?)",
                    (json.dumps(list(hint.retire_instance_ids)),),
                )

    def read_hint(self) -> base.FleetHint | None:
        with self._db.read() as conn:
            row = conn.execute("SELECT idle_grace_s, at FROM fleet_hint WHERE id = 1").fetchone()
            retire = conn.execute("SELECT instance_ids FROM fleet_retire WHERE id = 1").fetchone()
        if row is None:
            return None
        ids = tuple(str(i) for i in json.loads(retire[0])) if retire else None
        return base.FleetHint(idle_grace_s=row[0], at=row[1], retire_instance_ids=ids)

    def close(self) -> None:
        self._db.close()


class LocalIdentity:
    """Implements ``base.InstanceIdentity`` from the variables the pool gives each worker process."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def whoami(self) -> base.InstanceInfo:
        instance_id = self._environ.get(INSTANCE_ID_ENV, "")
        if not instance_id:
            raise errors.IdentityError(
                f"not started by a local scale set ({INSTANCE_ID_ENV} is unset); "
                "a worker run by hand cannot self-destroy"
            )
        return base.InstanceInfo(instance_id, self._environ.get(SCALE_SET_ENV, "local://"), name=instance_id)

    def close(self) -> None:
        """Nothing to release: the identity is read from the environment."""

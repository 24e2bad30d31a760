"""Property: no body a producer can send stops the worker or leaves its message unsettled.

Drives the real worker (``Worker.handle``: parse → stage → run → publish → settle) on the embedded SQLite queue and
the confined folder store with generated hostile bodies: random bytes, deep nesting, huge and odd params, NULs,
malformed and foreign URIs, ``file://`` paths outside the roots (system files, the worker's own folders, a
symlink out of the lake), outputs overlapping inputs, and valid jobs among them. After each one the worker is
still handling messages, every message is either dead-lettered or completed (none active, none locked), and
nothing of the worker's own folders reached a published output.
Bounded (40 examples, a few seconds) so it runs in ``make test``.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalebus import jobs
from scalebus.backends import base
from scalebus.backends.local import folder, sqlite_queue
from scalebus.settings import StagingSettings, WorkerSettings
from scalebus.worker import job as worker_job
from scalebus.worker import loop

ANALYTICS = """
import os, pathlib
out = pathlib.Path(os.environ["SCALEBUS_OUTPUT_DIR"])
staged = sorted(p for p in pathlib.Path(os.environ["SCALEBUS_INPUT_DIR"]).rglob("*") if p.is_file())
(out / "all.txt").write_bytes(b"".join(p.read_bytes() for p in staged))  # what it was given, published
"""
SECRET = "hunter2-canary-value"


class Rig:
    """One worker over one queue, a lake root, a results root, a work dir and a secrets folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lake, self.results = root / "lake", root / "results"
        self.work, self.secrets = root / "work", root / "secrets"
        for folder_ in (self.lake / "in" / "sub", self.results, self.secrets):
            folder_.mkdir(parents=True, exist_ok=True)
        (self.lake / "in" / "a.txt").write_text("a")
        (self.lake / "in" / "sub" / "b.txt").write_text("b")
        (self.secrets / "db-password").write_text(SECRET)
        (self.lake / "escape").symlink_to(self.secrets / "db-password")
        (self.lake / "linked").mkdir()
        (self.lake / "linked" / "ok.txt").write_text("ok")
        (self.lake / "linked" / "looks-harmless").symlink_to(self.secrets / "db-password")
        self.queue = sqlite_queue.SqliteJobQueue(
            root / "q.db", queue="jobs", lock_duration_s=30, max_delivery_count=1
        )
        roots, reserved = (str(self.lake), str(self.results)), (str(self.work), str(self.secrets))
        store = folder.FolderStore(roots=roots, reserved=reserved)
        script = root / "analytics.py"
        script.write_text(ANALYTICS)
        self.worker = loop.Worker(
            loop.WorkerPorts(queue=self.queue, resolve=lambda _uri: store),
            instance_id="fuzz",
            settings=WorkerSettings(
                command=[sys.executable, str(script)], work_dir=str(self.work), env_backoff_max_s=0
            ),
            staging_settings=StagingSettings(min_free_bytes=0, max_concurrency=2, processes=1),
            rules=worker_job.JobRules(limits=jobs.Limits(local_roots=roots, reserved=reserved), max_deliveries=1),
        )

    def close(self) -> None:
        self.queue.close()

    def uris(self) -> list[str]:
        """URIs worth trying: inside the roots, outside them, and not URIs at all."""
        lake = self.lake.as_uri()
        return [
            lake + "/in/",
            lake + "/in/a.txt",
            lake + "/escape",
            lake + "/linked/",
            lake + "/missing/",
            lake + "/in/../../secrets/",
            self.secrets.as_uri() + "/db-password",
            self.work.as_uri() + "/x/",
            "file:///proc/self/environ",
            "file:///dev/zero",
            "file:///etc/passwd",
            "file://otherhost/x",
            "file:relative",
            "abfss://fs@acct.dfs.core.windows.net/in/?sig=SECRET",
            "abfss://bad",
            "http://example.com/x",
            "",
            "\x00",
            self.results.as_uri() + "/out/",
        ]


def job_bodies(rig: Rig) -> st.SearchStrategy[bytes]:
    uris = st.sampled_from(rig.uris()) | st.text(max_size=80)
    params = st.dictionaries(
        st.text(max_size=40),
        st.one_of(
            st.text(max_size=60),
            st.text(alphabet="x\x00", min_size=1, max_size=8),
            st.integers(),
            st.floats(allow_nan=True),
            st.booleans(),
            st.none(),
            st.just("v" * 300_000),
            st.lists(st.integers(), max_size=3),
        ),
        max_size=6,
    )
    outputs = st.sampled_from([rig.results.as_uri() + "/out-" + uuid.uuid4().hex[:8] + "/"]) | uris
    job_ids = st.uuids().map(lambda u: f"job-{u.hex[:12]}") | st.text(max_size=20)
    job = st.fixed_dictionaries(
        {
            "job_id": job_ids,
            "inputs": st.lists(st.sampled_from(rig.uris()), min_size=1, max_size=3),
            "output": outputs,
        },
        optional={"params": params, "timeout_s": st.integers(-5, 10**12) | st.text(max_size=5)},
    )
    odd = st.fixed_dictionaries(
        {"job_id": job_ids, "inputs": st.lists(uris, max_size=4), "output": uris},
        optional={"params": params},
    )
    overlapping = st.just(
        {"job_id": "overlap", "inputs": [rig.lake.as_uri() + "/in/"], "output": rig.lake.as_uri() + "/in/out/"}
    )
    valid = st.builds(
        lambda n: {
            "job_id": f"good-{n}",
            "inputs": [rig.lake.as_uri() + "/in/"],
            "output": f"{rig.results.as_uri()}/good-{n}/",
        },
        st.integers(0, 10**9),
    )
    one_input = st.builds(
        lambda uri, n: {"job_id": f"one-{n}", "inputs": [uri], "output": f"{rig.results.as_uri()}/one-{n}/"},
        st.sampled_from(rig.uris()),
        st.integers(0, 10**9),
    )
    nested = st.integers(1, 200_000).map(lambda depth: b"[" * depth + b"]" * depth)
    nested_objects = st.integers(1, 5000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth)
    escaping = st.builds(
        lambda uri, n: {"job_id": f"esc-{n}", "inputs": [uri], "output": f"{rig.results.as_uri()}/esc-{n}/"},
        st.sampled_from([rig.lake.as_uri() + "/escape", rig.lake.as_uri() + "/linked/"]),
        st.integers(0, 10**9),
    )
    as_json = (job | odd | one_input | escaping | overlapping | valid).map(lambda raw: json.dumps(raw).encode())
    hostile = st.one_of(st.binary(max_size=512), nested, nested_objects, st.just(b'{"job_id":"d","job_id":"e"}'))
    return st.one_of(as_json, as_json, as_json, hostile)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with tempfile.TemporaryDirectory(prefix="scalebus-fuzz-") as tmp:
        rig = Rig(Path(tmp))
        yield rig
        rig.close()


def unsettled(db: Path) -> list[tuple[str, object]]:
    """Messages neither dead-lettered nor removed (completed): with a max delivery count of 1 there are none."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT message_id, lock_token FROM messages WHERE dead = 0").fetchall()
    finally:
        conn.close()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_hostile_body_stops_the_worker_or_stays_unsettled(rig: Rig, data: st.DataObject) -> None:
    body = data.draw(job_bodies(rig))
    message_id = uuid.uuid4().hex
    rig.queue.send([base.OutgoingMessage(message_id, body)])
    message = rig.queue.receive(max_wait_s=1)
    assert message is not None and message.message_id == message_id
    settlement = rig.worker.handle(message)  # returns: nothing the body holds escapes
    assert rig.queue.receive(max_wait_s=0) is None  # an abandon on the last delivery is dead-lettered here
    assert unsettled(rig.root / "q.db") == [], settlement
    assert settlement.verdict in (
        worker_job.Verdict.COMPLETE,
        worker_job.Verdict.DEAD_LETTER,
        worker_job.Verdict.ABANDON,
    )
    assert rig.worker.stats.handling_failed == 0
    assert (rig.secrets / "db-password").read_text() == SECRET
    published = [p for p in rig.results.rglob("*") if p.is_file()]
    assert not [p for p in published if SECRET in p.read_text(errors="replace")], "a secret was staged"
    assert sorted(p.name for p in (rig.lake / "in").iterdir()) == ["a.txt", "sub"], "the inputs are untouched"

"""Canary: known secret values planted in every secret source must appear in no log line, dead-letter reason,
``status -o json`` output or published output.

The sources: a secret of the local secrets folder mapped by ``worker.secret_env`` (and a symlink to it planted in
the lake, staged by an analytics that publishes its inputs), a storage connection string in the worker's
environment, a SAS signature in an input URI, a bearer token in a storage error. Jobs that fail
(the analytics prints what it was given and exits 1; a store error; a refused URI) and one that succeeds run
through the real worker; the logs are what ``logs.configure`` renders. An analytics that writes a secret into its
own output publishes it as is (the README says so): this test's analytics never does.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from scalebus import errors, jobs, logs
from scalebus.backends import base
from scalebus.backends.local import folder, sqlite_queue
from scalebus.backends.local import secrets as local_secrets
from scalebus.settings import StagingSettings, WorkerSettings
from scalebus.worker import job as worker_job
from scalebus.worker import loop
from scalebus.worker.secrets import SecretEnv

DB_PASSWORD = "canary-db-pw-7f3a9c1e5b"
ACCOUNT_KEY = "CanaryAccountKey0123456789abcdefABCDEF=="
SAS_SIG = "CanarySasSig9d8c7b6a5f4e3d2c1b0a"
BEARER = "CanaryBearerToken.abcdefghijklmnop"
CANARIES = (DB_PASSWORD, ACCOUNT_KEY, SAS_SIG, BEARER)

ANALYTICS = """
import os, pathlib, sys
job = os.environ["SCALEBUS_JOB_ID"]
out = pathlib.Path(os.environ["SCALEBUS_OUTPUT_DIR"])
if job == "leaky":
    # what it was given, on stderr (the worker quotes the tail in the dead-letter reason)
    print("password=" + os.environ.get("DB_PASSWORD", ""), file=sys.stderr)
    print("key " + os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "").split("AccountKey=")[-1], file=sys.stderr)
    print("raw " + os.environ.get("DB_PASSWORD", ""), file=sys.stderr)
    sys.exit(1)
(out / "result.txt").write_text("ok " + str(len(os.environ.get("DB_PASSWORD", ""))))
staged = sorted(p for p in pathlib.Path(os.environ["SCALEBUS_INPUT_DIR"]).rglob("*") if p.is_file())
(out / "inputs.txt").write_bytes(b"".join(p.read_bytes() for p in staged))  # its inputs, published
print("done")
"""


class GuardedLake(folder.FolderStore):
    """A lake whose ``guarded`` folder answers as a service refusing a token would, quoting the request."""

    def list_files(self, uri: str) -> Iterator[base.RemoteObject]:
        self._guard(uri)
        return super().list_files(uri)

    def list_level(self, uri: str, rel_prefix: str = "") -> Iterator[base.RemoteObject | base.SubFolder]:
        self._guard(uri)
        return super().list_level(uri, rel_prefix)

    @staticmethod
    def _guard(uri: str) -> None:
        if "/guarded" in uri:
            raise errors.AccessDeniedError(
                f"403 AuthorizationFailure for {uri}; request had Authorization: Bearer {BEARER}"
            )


@pytest.fixture
def rendered_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.configure(fmt="json", level="debug", stream=stream)
    yield stream
    structlog.reset_defaults()


def test_no_planted_secret_leaves_the_worker(
    tmp_path: Path, rendered_logs: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake, results, secrets_dir, work = (
        tmp_path / "lake",
        tmp_path / "results",
        tmp_path / "secrets",
        tmp_path / "work",
    )
    (lake / "in").mkdir(parents=True)
    (lake / "in" / "a.txt").write_text("a")
    (lake / "guarded").mkdir()
    (lake / "linked").mkdir()
    (lake / "linked" / "looks-harmless.txt").symlink_to(secrets_dir / "db-password")
    results.mkdir()
    secrets_dir.mkdir()
    (secrets_dir / "db-password").write_text(DB_PASSWORD)
    (secrets_dir / "db-password").chmod(0o600)
    connection_string = (
        f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={ACCOUNT_KEY};EndpointSuffix=core.windows.net"
    )
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection_string)
    script = tmp_path / "analytics.py"
    script.write_text(ANALYTICS)

    queue = sqlite_queue.SqliteJobQueue(
        tmp_path / "queue.db", queue="jobs", lock_duration_s=30, max_delivery_count=1
    )
    roots, reserved = (str(lake), str(results)), (str(work), str(secrets_dir))
    store = GuardedLake(roots=roots, reserved=reserved)
    bodies = {
        "leaky": {"job_id": "leaky", "inputs": [lake.as_uri() + "/in/"], "output": results.as_uri() + "/leaky/"},
        "sas": {
            "job_id": "sas",
            "inputs": [f"{lake.as_uri()}/in/?sv=2024-05-04&se=2030-01-01&sp=r&sig={SAS_SIG}"],
            "output": results.as_uri() + "/sas/",
        },
        "bearer": {
            "job_id": "bearer",
            "inputs": [lake.as_uri() + "/guarded/"],
            "output": results.as_uri() + "/bearer/",
        },
        "linked": {
            "job_id": "linked",
            "inputs": [lake.as_uri() + "/linked/"],
            "output": results.as_uri() + "/linked/",
        },
        "good": {"job_id": "good", "inputs": [lake.as_uri() + "/in/"], "output": results.as_uri() + "/good/"},
    }
    queue.send([base.OutgoingMessage(job_id, json.dumps(body).encode()) for job_id, body in bodies.items()])
    worker = loop.Worker(
        loop.WorkerPorts(
            queue=queue,
            resolve=lambda _uri: store,
            secrets=SecretEnv(
                local_secrets.FolderSecretSource(secrets_dir), {"DB_PASSWORD": "db-password"}, cache_s=60
            ),
        ),
        instance_id="canary",
        settings=WorkerSettings(
            command=[sys.executable, str(script)],
            work_dir=str(work),
            idle_timeout_s=1.0,
            receive_wait_s=0.3,
            heartbeat_interval_s=0.2,
            env_backoff_max_s=0,
        ),
        staging_settings=StagingSettings(min_free_bytes=0, processes=1),
        rules=worker_job.JobRules(limits=jobs.Limits(local_roots=roots, reserved=reserved), max_deliveries=1),
    )
    stats = worker.run()
    dead = {d.message_id: d for d in queue.peek_dead_letters(max_count=10)}
    queue.close()
    assert stats.completed == 1 and set(dead) == {"leaky", "sas", "bearer", "linked"}, rendered_logs.getvalue()[
        -2000:
    ]
    assert (results / "good" / "result.txt").read_text() == f"ok {len(DB_PASSWORD)}", (
        "the analytics had the secret"
    )
    assert "password=" in dead["leaky"].description, "the stderr tail is quoted, masked"
    assert dead["bearer"].reason == "AccessDenied" and "Bearer" in dead["bearer"].description
    assert dead["linked"].reason == "UnsafePath", "a symlink out of the lake is refused, not staged"
    assert "sig=" in dead["sas"].description, "the refused URI is quoted, its signature masked"

    status = _status_json(tmp_path, monkeypatch)
    assert {d["message_id"] for pool in status["pools"] for d in pool["dead_letters"]} == set(dead)
    published = "".join(p.read_text(errors="replace") for p in results.rglob("*") if p.is_file())
    places = {
        "logs": rendered_logs.getvalue(),
        "dead letters": json.dumps([(d.reason, d.description) for d in dead.values()]),
        "status -o json": json.dumps(status),
        "published outputs": published,
    }
    assert places["logs"], "the worker logged"
    leaks = {(where, canary) for where, text in places.items() for canary in CANARIES if canary in text}
    assert leaks == set()


def _status_json(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """``scalebus status -o json`` on the same queue, as a user runs it (its own process, the same environment)."""
    config = root / "scalebus.toml"
    config.write_text(f"""
[queue]
url = "sqlite:///{root}/queue.db?queue=jobs"
[scale_set]
state_path = "{root}/pool.db"
""")
    done = subprocess.run(
        [sys.executable, "-m", "scalebus", "status", "-o", "json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for canary in CANARIES:
        assert canary not in done.stderr
    return dict(json.loads(done.stdout))

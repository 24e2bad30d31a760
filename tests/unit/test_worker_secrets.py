"""Secrets reach the analytics as environment variables, and nowhere else.

The worker runs over the real embedded backends (SQLite queue, folder lake, a real subprocess) with secrets from a
folder or from the Key Vault fake (real ``SecretClient``, a managed-identity token from the IMDS fake). The
analytics writes a hash of ``$API_TOKEN``; the tests check the hash, and that the value is in no log line, no
dead-letter reason and no ``status`` output. Then the settings and the ``scalebus`` command as a user meets them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from scalebus import errors, jobs, logs, settings
from scalebus.backends import base
from scalebus.backends.local import folder, sqlite_queue
from scalebus.backends.local import secrets as local_secrets
from scalebus.settings import StagingSettings, WorkerSettings
from scalebus.worker import loop
from scalebus.worker import secrets as worker_secrets

TOKEN = "tok-7f3a9c1e-do-not-leak"

HASH_PROGRAM = """
import hashlib, os, pathlib
out = pathlib.Path(os.environ["SCALEBUS_OUTPUT_DIR"])
(out / "token.sha256").write_text(hashlib.sha256(os.environ["API_TOKEN"].encode()).hexdigest())
print("hashed")
"""

LEAKY_PROGRAM = """
import os, sys
print("cannot use token " + os.environ["API_TOKEN"], file=sys.stderr)
sys.exit(3)
"""

Put = Callable[[str, str], None]


@pytest.fixture(params=["folder", "keyvault"])
def secret_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[base.SecretSource, Put]]:
    if request.param == "keyvault":
        source, put = request.getfixturevalue("keyvault_secrets_factory")()
        yield source, put
        return
    root = tmp_path / "secrets"
    root.mkdir(mode=0o700)

    def put_file(name: str, value: str) -> None:
        (root / name).touch(mode=0o600)
        (root / name).write_text(value + "\n")

    yield local_secrets.FolderSecretSource(root), put_file


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[sqlite_queue.SqliteJobQueue]:
    q = sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=5, max_delivery_count=2)
    yield q
    q.close()


def _job(tmp_path: Path, job_id: str) -> jobs.Job:
    src = tmp_path / "lake" / "in"
    src.mkdir(parents=True, exist_ok=True)
    (src / "a.txt").write_text("A")
    return jobs.validate(
        {
            "job_id": job_id,
            "inputs": [src.as_uri() + "/"],
            "output": (tmp_path / "lake" / "out" / job_id).as_uri() + "/",
        }
    )


def _worker(
    queue: base.JobQueue, tmp_path: Path, program: str, source: base.SecretSource, mapping: dict[str, str]
) -> loop.Worker:
    script = tmp_path / "analytics.py"
    script.write_text(program)
    store = folder.FolderStore()
    return loop.Worker(
        loop.WorkerPorts(
            queue=queue,
            resolve=lambda _uri: store,
            secrets=worker_secrets.SecretEnv(source, mapping, cache_s=0),
        ),
        instance_id="test-secrets",
        settings=WorkerSettings(
            command=[sys.executable, str(script)],
            work_dir=str(tmp_path / "work"),
            idle_timeout_s=1.0,
            receive_wait_s=0.3,
            secret_env=mapping,
        ),
        staging_settings=StagingSettings(min_free_bytes=0),
    )


def test_analytics_gets_the_secret_in_its_env_and_logs_never_see_it(
    queue: sqlite_queue.SqliteJobQueue,
    tmp_path: Path,
    secret_backend: tuple[base.SecretSource, Put],
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, put = secret_backend
    put("genomics-api-token", TOKEN)
    jobs.JobProducer(queue).submit([_job(tmp_path, "j1")])
    caplog.set_level(logging.DEBUG)  # the SDK's own logging too
    with capture_logs() as logs:
        stats = _worker(queue, tmp_path, HASH_PROGRAM, source, {"API_TOKEN": "genomics-api-token"}).run()
    out = tmp_path / "lake" / "out" / "j1"
    assert stats.completed == 1
    assert (out / "token.sha256").read_text() == hashlib.sha256(TOKEN.encode()).hexdigest()
    assert any(e["event"] == "secrets_resolved" and e["variables"] == ["API_TOKEN"] for e in logs)
    assert TOKEN not in repr(logs)
    assert TOKEN not in caplog.text
    published = "".join(p.read_text() for p in out.rglob("*") if p.is_file())
    assert TOKEN not in published


def test_missing_secret_dead_letters_the_job_naming_the_secret(
    queue: sqlite_queue.SqliteJobQueue, tmp_path: Path, secret_backend: tuple[base.SecretSource, Put]
) -> None:
    source, put = secret_backend
    put("present", TOKEN)
    jobs.JobProducer(queue).submit([_job(tmp_path, "j1")])
    worker = _worker(queue, tmp_path, HASH_PROGRAM, source, {"API_TOKEN": "genomics-api-token", "OK": "present"})
    message = queue.receive(max_wait_s=1)
    assert message is not None
    with capture_logs() as logs:
        worker.handle(message)  # a secret deleted while the fleet runs (the start-up check passed earlier)
    (dead,) = queue.peek_dead_letters(max_count=10)
    assert dead.reason == "SecretNotFound"
    assert "$API_TOKEN" in dead.description and "'genomics-api-token'" in dead.description
    assert worker.stats.dead_lettered == 1
    assert not (tmp_path / "lake" / "out" / "j1").exists(), "nothing ran, nothing published"
    assert TOKEN not in repr(logs) + dead.description


def test_worker_with_a_missing_secret_takes_no_job(
    queue: sqlite_queue.SqliteJobQueue, tmp_path: Path, secret_backend: tuple[base.SecretSource, Put]
) -> None:
    source, _put = secret_backend
    jobs.JobProducer(queue).submit([_job(tmp_path, "j1")])
    worker = _worker(queue, tmp_path, HASH_PROGRAM, source, {"API_TOKEN": "genomics-api-token"})
    with pytest.raises(errors.ConfigError, match=r"worker.secret_env: \$API_TOKEN: .*'genomics-api-token'"):
        worker.run()
    message = queue.receive(max_wait_s=1)
    assert message is not None and message.delivery_count == 1, "the job was never touched"


def test_secret_printed_by_the_analytics_is_masked_in_the_dead_letter(
    queue: sqlite_queue.SqliteJobQueue, tmp_path: Path
) -> None:
    root = tmp_path / "secrets"
    root.mkdir()
    (root / "genomics-api-token").touch(mode=0o600)
    (root / "genomics-api-token").write_text(TOKEN)
    jobs.JobProducer(queue).submit([_job(tmp_path, "j1")])
    source = local_secrets.FolderSecretSource(root)
    with capture_logs() as logs:
        _worker(queue, tmp_path, LEAKY_PROGRAM, source, {"API_TOKEN": "genomics-api-token"}).run()
    (dead,) = queue.peek_dead_letters(max_count=10)
    assert (dead.reason, dead.description) == ("AnalyticsRejected", "cannot use token ***")
    assert TOKEN not in repr(logs)


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("mapping", "problem"),
    [
        ('{"API TOKEN": "x"}', "not a usable variable name"),
        ('{"SCALEBUS_JOB_ID": "x"}', "not a usable variable name"),
        ('{"API_TOKEN": "bad_name"}', "not a Key Vault secret name"),
        ('{"API_TOKEN": ""}', "not a Key Vault secret name"),
    ],
    ids=["space", "reserved", "underscore", "empty"],
)
def test_bad_secret_env_is_a_config_error(mapping: str, problem: str) -> None:
    with pytest.raises(errors.ConfigError, match=problem) as caught:
        settings.load(environ={"SCALEBUS_WORKER__SECRET_ENV": mapping})
    assert caught.value.key == "worker.secret_env"


def test_secret_settings_round_trip_through_toml(tmp_path: Path) -> None:
    cfg = settings.load(
        environ={
            "SCALEBUS_WORKER__SECRET_ENV": '{"API_TOKEN": "genomics-api-token", "DB_PASSWORD": "db-pw"}',
            "SCALEBUS_SECRETS__URL": "https://genomics.vault.azure.net",
        }
    )
    path = tmp_path / "dumped.toml"
    path.write_text(settings.dump_toml(cfg))
    assert settings.load(path, environ={}) == cfg
    assert cfg.worker.secret_env == {"API_TOKEN": "genomics-api-token", "DB_PASSWORD": "db-pw"}


# ------------------------------------------------------------------ the command


def _scalebus(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scalebus", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env},
    )


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "SCALEBUS_QUEUE__URL": f"sqlite:///{tmp_path}/q.db?queue=jobs",
        "SCALEBUS_SCALE_SET__STATE_PATH": f"{tmp_path}/pool.db",
        "SCALEBUS_WORKER__SECRET_ENV": '{"API_TOKEN": "genomics-api-token"}',
        "SCALEBUS_WORKER__SELF_DESTROY": "false",
        "SCALEBUS_WORKER__IDLE_TIMEOUT_S": "1",
        "SCALEBUS_WORKER__RECEIVE_WAIT_S": "0.5",
        "SCALEBUS_LOG__FORMAT": "json",
        "SCALEBUS_STORAGE__LOCAL_ROOTS": json.dumps([str(tmp_path / "lake"), str(tmp_path / "out")]),
        **extra,
    }


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://genomics.vault.azure.net", "config secrets.url: 'http://genomics.vault.azure.net': Key Vault is"),
        ("s3://bucket/secrets", "config secrets.url: 's3://bucket/secrets' is neither local:// nor a Key Vault"),
        ("https://genomics.vault.azure.net/secrets", "config secrets.url: 'https://genomics.vault.azure.net/secr"),
    ],
    ids=["http", "scheme", "path"],
)
def test_bad_secrets_url_is_one_line(tmp_path: Path, url: str, message: str) -> None:
    env = _env(tmp_path, SCALEBUS_SECRETS__URL=url, SCALEBUS_LOG__LEVEL="warning")
    result = _scalebus("worker", "run", cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "https://<vault>.vault.azure.net" in lines[0]


def test_worker_command_passes_local_secrets_and_status_never_shows_them(tmp_path: Path) -> None:
    secrets_dir = tmp_path / ".scalebus" / "secrets"  # the default secrets.url, relative to the working directory
    secrets_dir.mkdir(parents=True)
    (secrets_dir / "genomics-api-token").touch(mode=0o600)
    (secrets_dir / "genomics-api-token").write_text(TOKEN + "\n")
    script = tmp_path / "analytics.py"
    script.write_text(HASH_PROGRAM)
    env = _env(tmp_path, SCALEBUS_WORKER__COMMAND=json.dumps([sys.executable, str(script)]))
    job = _job(tmp_path, "j1")
    submitted = _scalebus(
        "submit", "--job-id", "j1", "-i", job.inputs[0], "--output-uri", job.output, cwd=tmp_path, env=env
    )
    assert submitted.returncode == 0, submitted.stderr
    ran = _scalebus("worker", "run", cwd=tmp_path, env=env)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "lake" / "out" / "j1" / "token.sha256").exists(), ran.stderr
    digest = (tmp_path / "lake" / "out" / "j1" / "token.sha256").read_text()
    assert digest == hashlib.sha256(TOKEN.encode()).hexdigest()
    status = _scalebus("status", "-o", "json", cwd=tmp_path, env=env)
    assert status.returncode == 0, status.stderr
    for text in (ran.stdout, ran.stderr, status.stdout, status.stderr):
        assert TOKEN not in text


def test_a_secret_the_worker_read_is_masked_in_everything_the_process_redacts(tmp_path: Path) -> None:
    root = tmp_path / "secrets"
    root.mkdir(mode=0o700)
    (root / "canary-token").touch(mode=0o600)
    (root / "canary-token").write_text("canary-4f1d9c2b7e\n")
    source = local_secrets.FolderSecretSource(root)
    env = worker_secrets.SecretEnv(source, {"API_TOKEN": "canary-token"}, cache_s=0)
    assert env.resolve() == {"API_TOKEN": "canary-4f1d9c2b7e"}
    assert logs.redact("upload failed for canary-4f1d9c2b7e") == "upload failed for ***"

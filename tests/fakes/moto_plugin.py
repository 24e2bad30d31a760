"""pytest fixtures for an S3-compatible peer: moto in server mode on 127.0.0.1 (``moto[server]``, a dev extra).

``s3_server`` is session-scoped: one ``ThreadedMotoServer`` on a free port, started once and stopped after the
session; tests isolate themselves with unique buckets (:meth:`S3Server.new_bucket`). Our code talks to it with
the real boto3 over a real socket. ``s3_env`` sets static test credentials and keeps the AWS chain from reading
the user's ``~/.aws`` files or probing an instance metadata service. Without moto the S3 tests are skipped.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from scalebus.settings import IngestSettings

REGION = "us-east-1"
_buckets = itertools.count()


@dataclass
class S3Server:
    """A running moto server: its endpoint, and a boto3 client for arranging test data."""

    endpoint_url: str
    _client: Any = field(default=None, repr=False)

    def client(self) -> Any:
        """One shared client (building a boto3 client costs a tenth of a second or more)."""
        if self._client is None:
            self._client = self.client_with_config(None)
        return self._client

    def client_with_config(self, config: Any) -> Any:
        """A boto3 client for arranging data (``config``: a ``botocore.config.Config``, or ``None``)."""
        import boto3

        return boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
        ).client("s3", endpoint_url=self.endpoint_url, config=config)

    def new_bucket(self) -> str:
        """Create a uniquely named bucket (3–63 lowercase characters) and return its name."""
        name = f"t{next(_buckets)}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def settings(self, **overrides: Any) -> IngestSettings:
        """Ingest settings that reach this server (small checkpoints and few attempts keep tests quick)."""
        values: dict[str, Any] = {"endpoint_url": self.endpoint_url, "region": REGION, "max_attempts": 2}
        return IngestSettings(**(values | overrides))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed (pip install -e '.[dev]')")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log on stderr
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    peer = S3Server(endpoint_url=f"http://{host}:{port}")
    yield peer
    if peer._client is not None:
        peer._client.close()
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """The server, with test credentials in the environment and nothing else of the AWS chain in reach."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return s3_server

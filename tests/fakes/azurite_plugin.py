"""pytest fixtures for the Azurite storage emulator (blob endpoint only; see /work/shared/FACTS.md).

``azurite`` is session-scoped: one ``azurite-blob`` process on 127.0.0.1 and a free port, in-memory, started
once and stopped after the session. Tests isolate themselves with unique containers (:meth:`new_container`).
The binary comes from ``SCALEBUS_AZURITE_BIN``, else ``.tools/azurite/node_modules/.bin/azurite-blob`` under the
repository root (``make test`` installs it); without it the Azurite tests are skipped with that reason.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scalebus.backends import base
from scalebus.settings import StorageSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO_ROOT / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, documented by Microsoft; not a secret).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CONNECTION_ENV = "SCALEBUS_TEST_AZURITE_CONNECTION"
_containers = itertools.count()


def azurite_binary() -> Path:
    return Path(os.environ.get("SCALEBUS_AZURITE_BIN") or DEFAULT_BIN)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class AzuriteServer:
    """One running ``azurite-blob``. ``start`` waits until it answers; ``stop`` ends it by PID."""

    binary: Path
    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def blob_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    def connection_string(self, blob_url: str | None = None) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={blob_url or self.blob_url};"
        )

    def start(self, *, timeout_s: float = 30.0) -> None:
        log = (self.workdir / "azurite.log").open("wb")
        self.process = subprocess.Popen(
            [
                str(self.binary),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.port),
                "--inMemoryPersistence",
                "--disableTelemetry",
                "--silent",
                "--loose",
                "--skipApiVersionCheck",
            ],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = (self.workdir / "azurite.log").read_text(errors="replace")
                raise RuntimeError(f"azurite-blob exited with {self.process.returncode}: {output[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.blob_url}?comp=list", timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP status (403 without auth) means it is serving
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"azurite-blob did not answer on port {self.port} within {timeout_s} s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None

    def new_container(self, *, blob_url: str | None = None) -> str:
        """Create a uniquely named container (3–63 lowercase characters) and return its name."""
        from azure.storage.blob import BlobServiceClient

        name = f"t{next(_containers)}-{uuid.uuid4().hex[:12]}"
        with BlobServiceClient.from_connection_string(self.connection_string(blob_url)) as client:
            client.create_container(name)
        return name

    def storage_settings(self, *, account_url: str | None = None) -> StorageSettings:
        """Settings that reach this Azurite (or a proxy in front of it) with the development key."""
        return StorageSettings(account_url=account_url or self.blob_url, connection_string_env=CONNECTION_ENV)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    binary = azurite_binary()
    if not binary.exists():
        pytest.skip(f"Azurite not installed at {binary}: run `make .tools/azurite/node_modules/.bin/azurite-blob`")
    server = AzuriteServer(binary=binary, workdir=tmp_path_factory.mktemp("azurite"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def azurite_env(azurite: AzuriteServer, monkeypatch: pytest.MonkeyPatch) -> AzuriteServer:
    """Azurite with its connection string in the env var ``storage_settings`` names."""
    monkeypatch.setenv(CONNECTION_ENV, azurite.connection_string())
    return azurite


@pytest.fixture
def azurite_store_factory(azurite_env: AzuriteServer) -> Iterator[Callable[[], tuple[base.ObjectStore, str]]]:
    """``factory() -> (AdlsStore, root_uri)``: a fresh container per call, root ``.../lake/``."""
    from scalebus.backends.azure import datalake

    opened: list[datalake.AdlsStore] = []

    def factory() -> tuple[base.ObjectStore, str]:
        container = azurite_env.new_container()
        root = f"abfss://{container}@{ACCOUNT}.dfs.core.windows.net/lake/"
        store = datalake.open_store(root, azurite_env.storage_settings())
        opened.append(store)
        return store, root

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def azurite_sdk_store_factory(azurite_env: AzuriteServer) -> Iterator[Callable[[], tuple[base.ObjectStore, str]]]:
    """Like ``azurite_store_factory`` but without the lean path: listing and reads through the SDK (the fallback
    taken when a proxy is configured)."""
    from scalebus.backends.azure import datalake

    opened: list[datalake.AdlsStore] = []
    settings = azurite_env.storage_settings()

    def factory() -> tuple[base.ObjectStore, str]:
        container = azurite_env.new_container()
        root = f"abfss://{container}@{ACCOUNT}.dfs.core.windows.net/lake/"
        where = datalake.AbfssPath.parse(root)
        store = datalake.AdlsStore(lambda: datalake.service_client(where, settings))
        opened.append(store)
        return store, root

    yield factory
    for store in opened:
        store.close()

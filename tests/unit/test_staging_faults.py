"""The staging engine over Azurite with a fault-injecting proxy in between: retried faults leave byte-identical
files; damage that a retry cannot see (short or corrupt bodies) is caught by the size and Content-MD5 checks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from scalebus import errors
from scalebus.backends.azure import _retry, datalake
from scalebus.settings import StagingSettings
from scalebus.transfer import kit, plan, stage
from tests.fakes.azurite_plugin import ACCOUNT, AzuriteServer
from tests.fakes.fault_proxy import Fault, FaultProxy

pytestmark = pytest.mark.azurite

SETTINGS = StagingSettings(chunk_size_bytes=64 * 1024, max_concurrency=4, min_free_bytes=0)
FILES = {
    "a.fq": os.urandom(5_000),
    "b.fq": os.urandom(7_000),
    "idx/c.fai": b"index\n",
    "big.bam": os.urandom(4 * 64 * 1024 + 99),
}


@pytest.fixture
def proxy(azurite_env: AzuriteServer) -> Iterator[FaultProxy]:
    fault_proxy = FaultProxy(upstream_port=azurite_env.port, retry_after_s=0.1)
    yield fault_proxy
    fault_proxy.close()


@pytest.fixture
def lake(azurite_env: AzuriteServer, proxy: FaultProxy) -> Iterator[tuple[datalake.AdlsStore, str]]:
    """A store reaching Azurite through the proxy, and a source folder holding FILES (uploaded directly)."""
    container = azurite_env.new_container()
    source = f"abfss://{container}@{ACCOUNT}.dfs.core.windows.net/run1"
    direct = datalake.open_store(source, azurite_env.storage_settings())
    for rel, data in FILES.items():
        direct.write_bytes(data, f"{source}/{rel}")
    direct.close()
    store = datalake.open_store(source, azurite_env.storage_settings(account_url=proxy.url))
    yield store, source
    store.close()


def stage_into(store: datalake.AdlsStore, source: str, dest: Path, **overrides: object) -> kit.StageStats:
    return stage.stage_in(lambda _u: store, [source], dest, SETTINGS.model_copy(update=overrides))


def staged(dest: Path) -> dict[str, bytes]:
    root = dest / "run1"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("fault", "path", "times", "policy"),
    [
        (Fault.BUSY, "comp=list", 1, "blob_get"),
        (Fault.BUSY, "a.fq", 2, "blob_get"),
        (Fault.DROP, "b.fq", 1, "blob_get"),
        (Fault.DROP, "big.bam", 2, "blob_get"),
        (Fault.DROP_MID_BODY, "big.bam", 1, "blob_get"),
        (Fault.DROP_MID_BODY, "a.fq", 1, "blob_get"),
        (Fault.SLOW, "big.bam", 3, None),
    ],
    ids=[
        "503-on-list",
        "503-twice-on-file",
        "dropped-before-answer",
        "dropped-chunk-reads",
        "dropped-mid-chunk",
        "dropped-mid-file",
        "slow-bodies",
    ],
)
def test_transient_faults_are_retried_and_the_bytes_are_identical(
    lake: tuple[datalake.AdlsStore, str],
    proxy: FaultProxy,
    tmp_path: Path,
    fault: Fault,
    path: str,
    times: int,
    policy: str | None,
) -> None:
    store, source = lake
    proxy.inject(fault, path_contains=path, times=times)
    before = dict(_retry.RETRY_COUNTS)
    stats = stage_into(store, source, tmp_path / "stage")
    assert [applied[0] for applied in proxy.applied] == [fault] * times
    assert staged(tmp_path / "stage") == FILES
    assert stats.files == len(FILES)
    assert not list((tmp_path / "stage").rglob("*" + plan.PART_SUFFIX))
    retried = {
        name: n - before.get(name, 0) for name, n in _retry.RETRY_COUNTS.items() if n != before.get(name, 0)
    }
    assert retried == ({policy: times} if policy else {})


def test_a_short_body_is_detected(lake: tuple[datalake.AdlsStore, str], proxy: FaultProxy, tmp_path: Path) -> None:
    store, source = lake
    proxy.inject(Fault.SHORT_BODY, path_contains="b.fq", times=10)
    with pytest.raises(errors.IntegrityError, match=r"b\.fq"):
        stage_into(store, source, tmp_path / "stage", max_concurrency=1)
    assert not (tmp_path / "stage" / "run1" / "b.fq").exists()


def test_a_corrupt_body_is_detected_by_content_md5(
    lake: tuple[datalake.AdlsStore, str], proxy: FaultProxy, tmp_path: Path
) -> None:
    store, source = lake
    proxy.inject(Fault.CORRUPT, path_contains="a.fq")
    with pytest.raises(errors.IntegrityError, match=r"a\.fq: Content-MD5 mismatch"):
        stage_into(store, source, tmp_path / "stage", max_concurrency=1)
    assert not (tmp_path / "stage" / "run1" / "a.fq").exists()


def test_a_corrupt_chunk_of_a_large_file_is_detected(
    lake: tuple[datalake.AdlsStore, str], proxy: FaultProxy, tmp_path: Path
) -> None:
    store, source = lake
    proxy.inject(Fault.CORRUPT, path_contains="big.bam")
    with pytest.raises(errors.IntegrityError, match=r"big\.bam: Content-MD5 mismatch"):
        stage_into(store, source, tmp_path / "stage")
    assert not (tmp_path / "stage" / "run1" / "big.bam").exists()


def test_after_a_failure_a_second_run_finishes_the_job(
    lake: tuple[datalake.AdlsStore, str], proxy: FaultProxy, tmp_path: Path
) -> None:
    store, source = lake
    proxy.inject(Fault.CORRUPT, path_contains="idx/c.fai")
    with pytest.raises(errors.IntegrityError):
        stage_into(store, source, tmp_path / "stage", max_concurrency=1)
    stats = stage_into(store, source, tmp_path / "stage", max_concurrency=1)
    assert stats.skipped_files == 3  # a.fq, b.fq, big.bam (listing order) were finished before c.fai
    assert staged(tmp_path / "stage") == FILES


def test_a_file_rewritten_during_staging_is_refused(
    lake: tuple[datalake.AdlsStore, str], azurite_env: AzuriteServer, tmp_path: Path
) -> None:
    store, source = lake
    (obj,) = [o for o in store.list_files(source) if o.rel_path == "a.fq"]
    direct = datalake.open_store(source, azurite_env.storage_settings())
    direct.write_bytes(b"new version", f"{source}/a.fq")
    direct.close()
    with (tmp_path / "sink").open("wb") as sink, pytest.raises(errors.StorageError, match="changed since"):
        store.read_into(obj, sink)


def test_a_missing_container_is_not_found(azurite_env: AzuriteServer) -> None:
    uri = f"abfss://nosuchcontainer@{ACCOUNT}.dfs.core.windows.net/x"
    store = datalake.open_store(uri, azurite_env.storage_settings())
    with pytest.raises(errors.ObjectNotFoundError):
        list(store.list_files(uri))
    store.close()

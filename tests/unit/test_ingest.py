"""``scalebus ingest``: incremental copies from S3 (moto in server mode, real boto3 over a real socket) into the
folder store and ADLS Gen2 (Azurite), crashes and reruns, unsafe keys, error mapping, and the command itself."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.aws import s3
from scalebus.backends.local import folder
from scalebus.ingest import engine, plan
from scalebus.settings import IngestSettings
from scalebus.transfer import kit
from tests.fakes.fault_proxy import Fault, FaultProxy
from tests.fakes.moto_plugin import S3Server

MiB = 1024 * 1024


def put(server: S3Server, bucket: str, key: str, data: bytes, client: Any = None) -> None:
    (client or server.client()).put_object(Bucket=bucket, Key=key, Body=data)


_sources: dict[IngestSettings, s3.S3Source] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_sources() -> Iterator[None]:
    yield
    for source in _sources.values():
        source.close()
    _sources.clear()


def run(
    server: S3Server, src: str, store: base.ObjectStore, dest: str, *, dry_run: bool = False, **overrides: Any
) -> engine.IngestStats:
    """One ingest run; sources are reused per settings (a boto3 client costs a tenth of a second to build)."""
    settings = server.settings(**overrides)
    if settings not in _sources:
        _sources[settings] = s3.open_source(settings)
    return engine.ingest(_sources[settings], src, store, dest, settings, dry_run=dry_run)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _journals_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's ingest journals (kept beside the system temporary directory) in its own folder."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))


@pytest.fixture
def bucket(s3_env: S3Server) -> str:
    return s3_env.new_bucket()


@pytest.fixture
def dest(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "lake" / "landing"
    return path, folder.uri_of(path)


class FailingStore:
    """The destination port, failing every object write after the first ``allowed`` ones: a crash injected at
    our seam. ``manifest_too``: the manifest's writes fail as well (a destination that goes away entirely)."""

    def __init__(self, inner: base.ObjectStore, *, allowed: int, manifest_too: bool = False) -> None:
        self._inner = inner
        self._allowed = allowed
        self._manifest_too = manifest_too
        self.writes = 0

    def _check(self, uri: str) -> None:
        if uri.endswith(plan.MANIFEST_NAME):
            if self._manifest_too and self.writes >= self._allowed:
                raise errors.TransientStorageError(f"{uri}: injected failure of the manifest")
            return
        self.writes += 1
        if self.writes > self._allowed:
            raise errors.TransientStorageError(f"{uri}: injected failure after {self._allowed} writes")

    def list_files(self, uri: str) -> Any:
        return self._inner.list_files(uri)

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        return self._inner.read_into(obj, sink, offset=offset, length=length)

    def write_file(self, source: Path, uri: str) -> None:
        self._check(uri)
        self._inner.write_file(source, uri)

    def write_bytes(self, data: bytes, uri: str) -> None:
        self._check(uri)
        self._inner.write_bytes(data, uri)

    def exists(self, uri: str) -> bool:
        return self._inner.exists(uri)

    def close(self) -> None:
        self._inner.close()


# ------------------------------------------------------------------------------------------ incremental runs


def test_runs_copy_only_what_is_new_or_changed(s3_env: S3Server, bucket: str, dest: tuple[Path, str]) -> None:
    path, uri = dest
    data = {"a.txt": b"alpha", "d/big.bin": os.urandom(2 * MiB), "empty": b"", "d/e/c.fq": b"@r\nACGT\n+\nIIII\n"}
    for rel, body in data.items():
        put(s3_env, bucket, f"in/{rel}", body)
    put(s3_env, bucket, "in/folder-marker/", b"")
    put(s3_env, bucket, "in2/not-me", b"sibling prefix")
    src = f"s3://{bucket}/in"
    store = folder.FolderStore()

    first = run(s3_env, src, store, uri)
    assert (first.copied_files, first.copied_bytes, first.skipped_files) == (4, sum(map(len, data.values())), 0)
    copied = tree(path)
    manifest = plan.parse_manifest(copied.pop(plan.MANIFEST_NAME))
    assert copied == data
    assert set(manifest) == set(data)
    assert manifest["a.txt"].etag == hashlib.md5(b"alpha").hexdigest()
    assert manifest["a.txt"].modified_at is not None

    second = run(s3_env, src, store, uri)
    assert (second.copied_files, second.skipped_files, second.skipped_bytes) == (0, 4, first.copied_bytes)

    put(s3_env, bucket, "in/a.txt", b"alpha, second version")
    put(s3_env, bucket, "in/new/n.txt", b"new")
    s3_env.client().delete_object(Bucket=bucket, Key="in/empty")
    preview = run(s3_env, src, store, uri, dry_run=True)
    assert preview.would_copy == [
        {"path": "a.txt", "size": 21, "reason": "changed"},
        {"path": "new/n.txt", "size": 3, "reason": "new"},
    ]
    assert preview.copied_files == 0 and tree(path)["a.txt"] == b"alpha"  # a dry run copies nothing

    third = run(s3_env, src, store, uri)
    assert (third.copied_files, third.skipped_files, third.deleted_at_source) == (2, 2, 1)
    final = tree(path)
    assert final["a.txt"] == b"alpha, second version"
    assert final["new/n.txt"] == b"new"
    assert final["empty"] == b""  # deleted at the source, never at the destination


def test_an_object_deleted_at_the_destination_is_copied_again(
    s3_env: S3Server, bucket: str, dest: tuple[Path, str]
) -> None:
    path, uri = dest
    put(s3_env, bucket, "in/x", b"x")
    put(s3_env, bucket, "in/y", b"y")
    run(s3_env, f"s3://{bucket}/in", folder.FolderStore(), uri)
    (path / "x").unlink()
    again = run(s3_env, f"s3://{bucket}/in", folder.FolderStore(), uri)
    assert (again.copied_files, again.skipped_files) == (1, 1)
    assert (path / "x").read_bytes() == b"x"


@pytest.mark.parametrize("manifest_too", [False, True], ids=["copy-fails", "destination-gone"])
def test_a_crashed_run_resumes_without_recopying(
    s3_env: S3Server, bucket: str, dest: tuple[Path, str], manifest_too: bool
) -> None:
    path, uri = dest
    for i in range(6):
        put(s3_env, bucket, f"in/f{i}", f"object {i}".encode() * (1 + i))
    src = f"s3://{bucket}/in"
    failing = FailingStore(folder.FolderStore(), allowed=2, manifest_too=manifest_too)
    with pytest.raises(errors.TransientStorageError, match="injected failure"):
        run(s3_env, src, failing, uri, max_concurrency=1, checkpoint_interval_s=0 if manifest_too else 3600)
    if not manifest_too:  # the manifest reached the destination when the run failed
        assert len(plan.parse_manifest((path / plan.MANIFEST_NAME).read_bytes())) == 2
    rerun = run(s3_env, src, folder.FolderStore(), uri)
    assert (rerun.copied_files, rerun.skipped_files) == (4, 2)  # the local journal has both
    assert {rel for rel in tree(path) if rel != plan.MANIFEST_NAME} == {f"f{i}" for i in range(6)}
    assert len(plan.parse_manifest((path / plan.MANIFEST_NAME).read_bytes())) == 6


def test_concurrent_copies_of_large_and_multipart_objects(
    s3_env: S3Server, bucket: str, dest: tuple[Path, str]
) -> None:
    from boto3.s3.transfer import TransferConfig

    path, uri = dest
    big = os.urandom(9 * MiB)
    s3_env.client().upload_fileobj(
        io.BytesIO(big), bucket, "in/multi.bin", Config=TransferConfig(multipart_threshold=5 * MiB)
    )
    singles = {f"s{i}.bin": os.urandom(MiB + i) for i in range(4)}
    for rel, body in singles.items():
        put(s3_env, bucket, f"in/{rel}", body)
    (listed,) = [
        o for o in s3.open_source(s3_env.settings()).list_files(f"s3://{bucket}/in") if o.size == len(big)
    ]
    assert "-" in listed.etag and not s3.md5_etag(listed.etag)
    stats = run(s3_env, f"s3://{bucket}/in/", folder.FolderStore(), uri, max_concurrency=3)
    assert stats.copied_bytes == len(big) + sum(map(len, singles.values()))
    assert (path / "multi.bin").read_bytes() == big
    assert all((path / rel).read_bytes() == body for rel, body in singles.items())


def test_a_single_object_uri_copies_that_object(s3_env: S3Server, bucket: str, dest: tuple[Path, str]) -> None:
    path, uri = dest
    put(s3_env, bucket, "refs/genome.fa", b">chr1\nACGT\n")
    assert run(s3_env, f"s3://{bucket}/refs/genome.fa", folder.FolderStore(), uri).copied_files == 1
    assert (path / "genome.fa").read_bytes() == b">chr1\nACGT\n"


# ------------------------------------------------------------------------------------------ refusals, errors


def test_unsafe_keys_are_refused_with_a_reason_and_the_rest_copied(
    s3_env: S3Server, bucket: str, dest: tuple[Path, str]
) -> None:
    path, uri = dest
    for key in ("in/ok.txt", "in/../escape.txt", "in//abs.txt", "in/zero\u200bwidth", f"in/{plan.MANIFEST_NAME}"):
        put(s3_env, bucket, key, b"data")
    stats = run(s3_env, f"s3://{bucket}/in", folder.FolderStore(), uri)
    assert stats.copied_files == 1
    assert {r["path"]: r["reason"] for r in stats.refused} == {
        "../escape.txt": "has a '..' segment",
        "/abs.txt": "absolute path",
        "zero\u200bwidth": "contains a format character (U+200B)",
        plan.MANIFEST_NAME: "reserved for the ingest manifest",
    }
    assert sorted(p.name for p in path.parent.rglob("*")) == sorted(["landing", "ok.txt", plan.MANIFEST_NAME])


def test_no_such_bucket_is_a_bucket_not_found_error(s3_env: S3Server, dest: tuple[Path, str]) -> None:
    with pytest.raises(errors.BucketNotFoundError, match="no such bucket"):
        run(s3_env, "s3://no-such-bucket-here/in", folder.FolderStore(), dest[1])


def test_an_empty_prefix_is_not_found(s3_env: S3Server, bucket: str, dest: tuple[Path, str]) -> None:
    put(s3_env, bucket, "elsewhere/x", b"x")
    with pytest.raises(errors.ObjectNotFoundError, match="no objects under this prefix"):
        run(s3_env, f"s3://{bucket}/in", folder.FolderStore(), dest[1])


def test_an_unreachable_endpoint_is_transient(s3_env: S3Server, dest: tuple[Path, str]) -> None:
    closed_port = FaultProxy(upstream_port=1)
    closed_port.close()
    with pytest.raises(errors.TransientStorageError, match="connection failed"):
        run(
            s3_env,
            "s3://b/in",
            folder.FolderStore(),
            dest[1],
            endpoint_url=f"http://127.0.0.1:{closed_port.port}",
            max_attempts=1,
        )


@pytest.mark.parametrize(
    ("code", "status", "kind", "message"),
    [
        pytest.param("NoSuchBucket", 404, errors.BucketNotFoundError, "no such bucket", id="no-such-bucket"),
        pytest.param("NoSuchKey", 404, errors.ObjectNotFoundError, "not found", id="no-such-key"),
        pytest.param("AccessDenied", 403, errors.StorageError, "s3:ListBucket on the bucket", id="access-denied"),
        pytest.param("InvalidAccessKeyId", 403, errors.StorageError, "access denied", id="bad-key"),
        pytest.param("PreconditionFailed", 412, errors.StorageError, "changed since it was listed", id="etag"),
        pytest.param("SlowDown", 503, errors.TransientStorageError, "SlowDown", id="slow-down"),
        pytest.param("Throttling", 400, errors.TransientStorageError, "Throttling", id="throttling"),
        pytest.param("InternalError", 500, errors.TransientStorageError, "HTTP 500", id="internal"),
        pytest.param("Weird", 502, errors.TransientStorageError, "HTTP 502", id="bad-gateway"),
        pytest.param("InvalidArgument", 400, errors.StorageError, "InvalidArgument", id="bad-request"),
    ],
)
def test_botocore_errors_map_by_code_and_status(
    code: str, status: int, kind: type[errors.BackendError], message: str
) -> None:
    from botocore.exceptions import ClientError

    exc = ClientError(
        {"Error": {"Code": code, "Message": "secret-ish text"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )
    mapped = s3.to_scalebus(exc, what="get s3://b/k")
    assert type(mapped) is kind
    assert message in str(mapped) and "secret-ish" not in str(mapped)
    assert isinstance(mapped, errors.TransientBackendError) == (kind is errors.TransientStorageError)


# ------------------------------------------------------------------------------------------ faults on the wire


@pytest.fixture
def proxy(s3_env: S3Server) -> Any:
    port = int(s3_env.endpoint_url.rsplit(":", 1)[1])
    fault_proxy = FaultProxy(upstream_port=port)
    yield fault_proxy
    fault_proxy.close()


def test_a_body_cut_off_part_way_resumes_where_it_stopped(
    s3_env: S3Server, bucket: str, dest: tuple[Path, str], proxy: FaultProxy
) -> None:
    path, uri = dest
    body = os.urandom(3 * MiB)
    put(s3_env, bucket, "in/r.fq", body)
    proxy.inject(Fault.DROP_MID_BODY, path_contains="/r.fq")
    proxy.inject(Fault.BUSY, path_contains="list-type=2")
    with structlog.testing.capture_logs() as logs:
        stats = run(
            s3_env, f"s3://{bucket}/in", folder.FolderStore(), uri, endpoint_url=f"http://127.0.0.1:{proxy.port}"
        )
    assert stats.copied_files == 1
    assert (path / "r.fq").read_bytes() == body
    assert {fault for fault, _method, _path in proxy.applied} == {Fault.DROP_MID_BODY, Fault.BUSY}
    assert [entry["at_byte"] for entry in logs if entry["event"] == "s3.get.resume"] == [len(body) // 2]


def test_a_corrupt_body_fails_the_md5_check(
    s3_env: S3Server, bucket: str, dest: tuple[Path, str], proxy: FaultProxy
) -> None:
    from botocore.config import Config

    # Uploaded without a CRC32 checksum, so only the ETag (MD5) can tell.
    plain = s3_env.client_with_config(Config(request_checksum_calculation="when_required"))
    put(s3_env, bucket, "in/c.bin", os.urandom(2 * MiB), client=plain)
    proxy.inject(Fault.CORRUPT, path_contains="/c.bin")
    with pytest.raises(errors.IntegrityError, match="does not match the ETag"):
        run(
            s3_env,
            f"s3://{bucket}/in",
            folder.FolderStore(),
            dest[1],
            endpoint_url=f"http://127.0.0.1:{proxy.port}",
        )
    assert not (dest[0] / "c.bin").exists()


# ------------------------------------------------------------------------------------------ into ADLS Gen2


@pytest.mark.azurite
def test_copies_into_adls_gen2(s3_env: S3Server, bucket: str, azurite_store_factory: Any) -> None:
    store, root = azurite_store_factory()
    data = {"a.txt": b"alpha", "d/big.bin": os.urandom(2 * MiB)}
    for rel, body in data.items():
        put(s3_env, bucket, f"in/{rel}", body)
    dest = root + "landing/"
    with structlog.testing.capture_logs() as logs:
        first = run(s3_env, f"s3://{bucket}/in", store, dest)
    assert first.copied_files == 2
    # Azurite 3.35 does not implement Put Block From URL (501): the run falls back to streaming, once.
    codes = {e["code"] for e in logs if e["event"] == "adls.copy_from_url_unavailable"}
    assert codes == {"APINotImplemented"}
    assert [e["event"] for e in logs].count("ingest.server_side_unavailable") == 1
    landed = {obj.rel_path: obj for obj in store.list_files(dest)}
    assert set(landed) == {*data, plan.MANIFEST_NAME}
    for rel, body in data.items():
        sink = io.BytesIO()
        store.read_into(landed[rel], sink)
        assert sink.getvalue() == body
    put(s3_env, bucket, "in/a.txt", b"alpha 2")
    again = run(s3_env, f"s3://{bucket}/in", store, dest)
    assert (again.copied_files, again.skipped_files) == (1, 1)


# ------------------------------------------------------------------------------------------ the command


def scalebus(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scalebus", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=os.environ | {"TMPDIR": str(cwd)},  # the command's journals in the test's folder
    )


def test_the_command_reports_json_and_fails_in_one_line(
    s3_env: S3Server, bucket: str, dest: tuple[Path, str], tmp_path: Path
) -> None:
    path, uri = dest
    put(s3_env, bucket, "in/a.txt", b"alpha")
    put(s3_env, bucket, "in/../bad", b"x")
    endpoint = ["--endpoint-url", s3_env.endpoint_url]
    done = scalebus("ingest", f"s3://{bucket}/in", uri, *endpoint, "-o", "json", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    stats = json.loads(done.stdout)
    assert (stats["copied_files"], stats["copied_bytes"], stats["skipped_files"]) == (1, 5, 0)
    assert stats["refused"] == [{"path": "../bad", "reason": "has a '..' segment"}]
    assert stats["seconds"] >= 0
    assert done.stderr.strip().splitlines()[-1] == (
        "scalebus: error: UnsafePathError: 1 object(s) refused, the rest copied; "
        "first '../bad': has a '..' segment"
    )
    assert (path / "a.txt").read_bytes() == b"alpha"

    missing = scalebus("ingest", "s3://no-such-bucket-x/in", uri, *endpoint, "--dry-run", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "scalebus: error: list s3://no-such-bucket-x/in: no such bucket (NoSuchBucket); "
        "check the bucket in the URI"
    ]


def test_an_unknown_profile_is_a_config_error(s3_env: S3Server) -> None:
    with pytest.raises(errors.ConfigError, match=r"ingest\.profile: AWS profile 'nope' not found"):
        s3.open_source(s3_env.settings(profile="nope"))


def test_any_store_can_be_the_source(tmp_path: Path, dest: tuple[Path, str]) -> None:
    source_dir = tmp_path / "src"
    (source_dir / "d").mkdir(parents=True)
    (source_dir / "d" / "x").write_bytes(b"x" * (2 * MiB))
    store = folder.FolderStore()
    settings = IngestSettings(scratch_dir=str(tmp_path / "scratch"))
    assert engine.ingest(store, folder.uri_of(source_dir), store, dest[1], settings).copied_files == 1
    assert engine.ingest(store, folder.uri_of(source_dir), store, dest[1], settings).skipped_files == 1
    assert (dest[0] / "d" / "x").read_bytes() == b"x" * (2 * MiB)
    left = [p.name for p in (tmp_path / "scratch").iterdir()]
    assert left == [engine.JOURNAL_FOLDER]  # scratch files are removed; the journal stays


class SlowManifestStore(folder.FolderStore):
    """A destination where uploading the manifest takes 0.1 s (as a million-line manifest takes seconds)."""

    def __init__(self) -> None:
        self.manifest_writes = 0

    def write_file(self, source: Path, uri: str) -> None:
        if uri.endswith(plan.MANIFEST_NAME):
            self.manifest_writes += 1
            time.sleep(0.1)
        super().write_file(source, uri)


class _SlowSource(folder.FolderStore):
    """A source where each read takes 10 ms, so a run lasts long enough for several compactions."""

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        time.sleep(0.01)
        return super().read_into(obj, sink, offset=offset, length=length)


def test_slow_manifest_rewrites_are_spaced_out(tmp_path: Path, dest: tuple[Path, str]) -> None:
    src = tmp_path / "source"
    src.mkdir()
    for i in range(60):
        (src / f"f{i:02d}").write_bytes(b"x" * 100)
    store = SlowManifestStore()
    settings = IngestSettings(max_concurrency=1, checkpoint_interval_s=0.001)
    slow = _SlowSource()
    stats = engine.ingest(slow, folder.uri_of(src), store, dest[1], settings)
    assert stats.copied_files == 60
    # A rewrite every 0.001 s would be one per object; each taking 0.1 s, the next waits 2 s (5 % of the run).
    assert 2 <= store.manifest_writes <= 1 + stats.seconds / 2 + 1
    assert len(plan.parse_manifest((dest[0] / plan.MANIFEST_NAME).read_bytes())) == 60


def test_a_run_that_would_not_fit_in_scratch_is_refused_before_copying(
    tmp_path: Path, dest: tuple[Path, str]
) -> None:
    src = tmp_path / "source"
    src.mkdir()
    (src / "big.bam").write_bytes(os.urandom(2 * engine.IN_MEMORY_BYTES))
    (src / "small.idx").write_bytes(b"i")
    settings = IngestSettings(scratch_dir=str(tmp_path / "scratch"), scratch_min_free_bytes=1 << 62)
    with pytest.raises(errors.ConfigError, match=r"ingest.scratch_dir: .* need 2,097,152 bytes plus") as raised:
        engine.ingest(folder.FolderStore(), folder.uri_of(src), folder.FolderStore(), dest[1], settings)
    message = str(raised.value)
    assert "ingest.scratch_min_free_bytes" in message and "lower ingest.max_concurrency" in message
    assert not dest[0].exists() or list(dest[0].iterdir()) == []


def test_a_bandwidth_cap_books_every_object_and_keeps_the_copies_identical(
    tmp_path: Path, dest: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "source"
    src.mkdir()
    files = {f"f{i}": os.urandom(300_000 + i) for i in range(4)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    booked: list[tuple[float, int]] = []
    take = kit.Throttle.take

    def recording_take(self: kit.Throttle, nbytes: int) -> None:  # our own seam, not an SDK
        booked.append((self.rate_bytes_per_s, nbytes))
        take(self, nbytes)

    monkeypatch.setattr(kit.Throttle, "take", recording_take)
    settings = IngestSettings(bandwidth_cap_bytes_per_s=50_000_000)
    stats = engine.ingest(folder.FolderStore(), folder.uri_of(src), folder.FolderStore(), dest[1], settings)
    assert stats.copied_files == 4
    assert sorted(booked) == [(50_000_000, len(data)) for data in files.values()]
    assert {k: v for k, v in tree(dest[0]).items() if k != plan.MANIFEST_NAME} == files

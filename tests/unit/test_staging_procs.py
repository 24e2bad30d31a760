"""Staging with helper processes (``staging.processes``): the same bytes, manifest and stats as one process,
helpers really download, and a failure or death in any process stops the staging with the right error type."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
import structlog
from structlog.testing import capture_logs

from scalebus import errors, logs
from scalebus.backends import base
from scalebus.backends.local.folder import FolderStore, path_of, uri_of
from scalebus.cli.wiring import StoreResolver
from scalebus.settings import Settings, StagingSettings
from scalebus.transfer import helpers, kit, plan, stage
from tests.fakes.azurite_plugin import ACCOUNT, AzuriteServer
from tests.fakes.fault_proxy import Fault, FaultProxy
from tests.unit.test_staging import write_tree

SETTINGS = StagingSettings(chunk_size_bytes=64 * 1024, max_concurrency=4, min_free_bytes=0, processes=2)
N_SMALL = 300  # five batches of small files, so the helper surely gets some


class FixedResolver:
    """A picklable resolver handing out one store (helpers unpickle their own copy)."""

    def __init__(self, store: base.ObjectStore) -> None:
        self.store = store

    def __call__(self, _uri: str) -> base.ObjectStore:
        return self.store


class PidLoggingStore(FolderStore):
    """Appends ``<pid> <file>`` to a log for every read, to show which process fetched what."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        with self.log.open("a") as fh:
            fh.write(f"{os.getpid()} {obj.rel_path}\n")
        return super().read_into(obj, sink, offset=offset, length=length)


class PoisonStore(FolderStore):
    """Raises ``error`` when reading files named ``poison*``, in whichever process reads them."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        if obj.rel_path.rsplit("/", 1)[-1].startswith("poison"):
            raise self.error
        return super().read_into(obj, sink, offset=offset, length=length)


class HelperKillingStore(FolderStore):
    """In a helper process, the first read ends the process abruptly (as the OOM killer would)."""

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        import multiprocessing

        if multiprocessing.parent_process() is not None:
            os._exit(9)
        return super().read_into(obj, sink, offset=offset, length=length)


class SlowHelperStore(FolderStore):
    """Reads in helper processes take 20 ms each: the staging process runs out of batches long before they end."""

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        import multiprocessing

        if multiprocessing.parent_process() is not None:
            time.sleep(0.02)
        return super().read_into(obj, sink, offset=offset, length=length)


class SlowStore(FolderStore):
    """Every read takes ``delay_s`` (a slow link), so a staging lasts long enough to interrupt."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        time.sleep(self.delay_s)
        return super().read_into(obj, sink, offset=offset, length=length)


class LoggingStore(FolderStore):
    """Logs every read, as an adapter logs a retry, to show what a helper's log lines carry."""

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        structlog.get_logger("test").info("test.read", path=obj.rel_path)
        return super().read_into(obj, sink, offset=offset, length=length)


def make_lake(root: Path, *, n_small: int = N_SMALL) -> dict[str, bytes]:
    files = {f"d{i % 7}/f{i:04d}.idx": os.urandom(100 + i) for i in range(n_small)}
    files["big.bam"] = os.urandom(5 * 64 * 1024 + 7)  # chunked: a batch of its own
    files["empty"] = b""
    return write_tree(root, files)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def manifest_paths(dest: Path) -> list[str]:
    lines = (dest / plan.MANIFEST_NAME).read_text().splitlines()
    return [json.loads(line)["path"] for line in lines]


@pytest.fixture
def lake(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    src = tmp_path / "lake" / "run"
    return src, make_lake(src)


def test_helpers_download_a_share_and_the_result_equals_one_process(
    lake: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    src, files = lake
    reads = tmp_path / "reads.log"
    seen: list[kit.Progress] = []
    stats = stage.stage_in(
        FixedResolver(PidLoggingStore(reads)), [uri_of(src)], tmp_path / "out", SETTINGS, on_progress=seen.append
    )
    assert tree(tmp_path / "out" / "run") == files
    assert sorted(manifest_paths(tmp_path / "out")) == sorted(f"run/{rel}" for rel in files)
    pids = {line.split()[0] for line in reads.read_text().splitlines()}
    assert str(os.getpid()) in pids and len(pids) == 2  # the staging process and one helper both read
    assert (stats.processes, stats.files, stats.bytes) == (2, len(files), sum(map(len, files.values())))
    assert seen[-1].files_done == seen[-1].files_total == len(files)
    assert seen[-1].bytes_done == seen[-1].bytes_total == stats.bytes
    assert stats.cpu_s > 0


def test_helpers_finishing_long_after_the_staging_process_are_waited_for(
    lake: tuple[Path, dict[str, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(helpers, "STOP_GRACE_S", 0.2)  # applies only once a failure stopped the staging
    src, files = lake
    stats = stage.stage_in(FixedResolver(SlowHelperStore()), [uri_of(src)], tmp_path / "out", SETTINGS)
    assert stats.processes == 2
    assert tree(tmp_path / "out" / "run") == files  # the helper's slow files too: the staging waited for them
    assert sorted(manifest_paths(tmp_path / "out")) == sorted(f"run/{rel}" for rel in files)


def test_a_second_run_skips_what_helpers_staged(lake: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    src, files = lake
    resolver = FixedResolver(FolderStore())
    stage.stage_in(resolver, [uri_of(src)], tmp_path / "out", SETTINGS)
    again = stage.stage_in(resolver, [uri_of(src)], tmp_path / "out", SETTINGS)
    assert (again.files, again.skipped_files, again.processes) == (0, len(files), 1)


@pytest.mark.parametrize(
    "error",
    [
        errors.TransientStorageError("poison: 503 ServerBusy", retry_after_s=2.5),
        errors.IntegrityError("poison: Content-MD5 mismatch"),
        errors.ObjectNotFoundError("poison: gone"),
    ],
    ids=["transient", "integrity", "permanent"],
)
def test_a_failure_in_any_process_stops_the_staging_with_its_type(
    error: errors.StorageError, tmp_path: Path
) -> None:
    src = tmp_path / "lake" / "run"
    files = make_lake(src)
    for i in range(0, N_SMALL, 50):  # in several batches: whichever process takes one fails
        (src / f"d{i % 7}" / f"poison{i}").write_bytes(b"x")
    with pytest.raises(type(error)) as raised:
        stage.stage_in(FixedResolver(PoisonStore(error)), [uri_of(src)], tmp_path / "out", SETTINGS)
    assert type(raised.value) is type(error) and str(raised.value) == str(error)
    assert getattr(raised.value, "retry_after_s", None) == getattr(error, "retry_after_s", None)
    recorded = manifest_paths(tmp_path / "out")
    assert not any("poison" in path for path in recorded)
    assert all((tmp_path / "out" / path).is_file() for path in recorded)
    for path in recorded:  # everything recorded is complete and intact
        assert (tmp_path / "out" / path).read_bytes() == files[path.removeprefix("run/")]


def test_a_helper_that_dies_is_an_error_and_a_rerun_finishes(
    lake: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    src, files = lake
    with pytest.raises(errors.StorageError, match=r"ended without reporting \(exit code 9\)"):
        stage.stage_in(FixedResolver(HelperKillingStore()), [uri_of(src)], tmp_path / "out", SETTINGS)
    done_before = len(manifest_paths(tmp_path / "out"))
    again = stage.stage_in(FixedResolver(FolderStore()), [uri_of(src)], tmp_path / "out", SETTINGS)
    assert tree(tmp_path / "out" / "run") == files
    assert again.skipped_files == done_before and again.files + again.skipped_files == len(files)


def test_a_resolver_that_cannot_be_pickled_stages_in_one_process(
    lake: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    src, files = lake
    store = FolderStore()
    with capture_logs() as logs:
        stats = stage.stage_in(lambda _uri: store, [uri_of(src)], tmp_path / "out", SETTINGS)
    assert stats.processes == 1
    assert tree(tmp_path / "out" / "run") == files
    assert any(entry["event"] == "staging.single_process" for entry in logs)


def test_helpers_log_with_the_job_context(
    lake: tuple[Path, dict[str, bytes]], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    src, _files = lake
    logs.configure(fmt="json", level="info")
    try:
        with structlog.contextvars.bound_contextvars(job_id="j-42", message_id="m-7"):
            stage.stage_in(FixedResolver(LoggingStore()), [uri_of(src)], tmp_path / "out", SETTINGS)
    finally:
        structlog.reset_defaults()
    events = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    reads = [event for event in events if event["event"] == "test.read"]
    in_helpers = [event for event in reads if "staging_helper" in event]
    assert in_helpers and len(in_helpers) < len(reads)
    assert all((event["job_id"], event["message_id"]) == ("j-42", "m-7") for event in reads)


@pytest.mark.parametrize(
    ("requested", "cores", "files", "batches", "expected"),
    [
        (0, 16, 1_999, 32, plan.ProcessPlan(1, 1)),
        (0, 16, 8_000, 125, plan.ProcessPlan(1, 16)),
        (0, 2, 1_000_000, 15_625, plan.ProcessPlan(1, 2)),
        (0, 1, 1_000_000, 15_625, plan.ProcessPlan(1, 1)),
        (0, 16, 2_000, 4, plan.ProcessPlan(1, 4)),
        (1, 16, 1_000_000, 15_625, plan.ProcessPlan(1, 1)),
        (4, 2, 10, 1, plan.ProcessPlan(1, 1)),
        (4, 2, 300, 5, plan.ProcessPlan(4, 4)),
        (3, 16, 0, 0, plan.ProcessPlan(1, 1)),
    ],
    ids=[
        "auto-few-files",
        "auto-up-to-cores",
        "auto-two-cores",
        "auto-one-core",
        "auto-up-to-batches",
        "one",
        "asked-one-batch",
        "asked",
        "nothing",
    ],
)
def test_process_plan(requested: int, cores: int, files: int, batches: int, expected: plan.ProcessPlan) -> None:
    assert plan.process_plan(requested, cores=cores, files=files, batches=batches) == expected


@pytest.mark.parametrize(
    ("samples", "processes", "most", "files_left", "expected"),
    [
        ([1.2, 1.1], 1, 2, 10_000, True),
        ([0.9, 0.86], 2, 4, 10_000, True),
        ([1.2], 1, 2, 10_000, False),
        ([0.3, 1.2, 0.84], 1, 2, 10_000, False),
        ([0.07, 0.06], 1, 2, 10_000, False),
        ([1.2, 1.1], 2, 2, 10_000, False),
        ([1.2, 1.1], 1, 2, 1_999, False),
    ],
    ids=["cpu-bound", "cpu-bound-again", "one-sample", "not-every-sample", "on-the-network", "no-room", "few"],
)
def test_add_helper(samples: list[float], processes: int, most: int, files_left: int, expected: bool) -> None:
    decided = plan.should_add_helper(samples, processes=processes, most=most, files_left=files_left)
    assert decided is expected


def test_budgets_are_shared_between_processes() -> None:
    shared = helpers.share_settings(
        StagingSettings(max_concurrency=16, memory_budget_bytes=96 << 20, bandwidth_cap_bytes_per_s=250_000_000), 3
    )
    assert (shared.max_concurrency, shared.memory_budget_bytes) == (6, 32 << 20)
    assert shared.bandwidth_cap_bytes_per_s == 83_333_333
    assert helpers.share_settings(StagingSettings(), 2).bandwidth_cap_bytes_per_s == 0  # no cap stays no cap


HELPER_SCRIPT = """
import sys
from pathlib import Path
from scalebus import logs
from scalebus.settings import StagingSettings
from scalebus.transfer import stage
from tests.unit.test_staging_procs import FixedResolver, SlowStore
logs.configure(fmt="json")
settings = StagingSettings(max_concurrency=2, min_free_bytes=0, processes=2)
stage.stage_in(FixedResolver(SlowStore(0.5)), [sys.argv[1]], Path(sys.argv[2]), settings)
"""


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_helpers_exit_when_the_staging_process_is_killed(
    lake: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    src, _files = lake
    with subprocess.Popen(
        [sys.executable, "-c", HELPER_SCRIPT, uri_of(src), str(tmp_path / "out")],
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    ) as proc:
        pids = started_helper_pids(proc)
        assert pids and all(alive(pid) for pid in pids)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)


def started_helper_pids(proc: subprocess.Popen[str]) -> list[int]:
    assert proc.stderr is not None
    for line in proc.stderr:
        event = json.loads(line)
        if event["event"] == "staging.helper.started":
            return [event["pid"]]
    raise AssertionError(f"no helpers started (exit code {proc.wait()})")


# --------------------------------------------------------------------------------------------- over Azurite


@pytest.fixture
def blob_lake(azurite_env: AzuriteServer) -> Iterator[tuple[str, dict[str, bytes]]]:
    from scalebus.backends.azure import datalake

    container = azurite_env.new_container()
    source = f"abfss://{container}@{ACCOUNT}.dfs.core.windows.net/run"
    files = {f"d{i % 5}/s{i:03d}.fai": os.urandom(50 + i) for i in range(160)}
    files["poison-free/big.bam"] = os.urandom(3 * 64 * 1024 + 5)
    store = datalake.open_store(source, azurite_env.storage_settings())
    kit.run_parallel(
        lambda item: store.write_bytes(item[1], f"{source}/{item[0]}"), list(files.items()), max_workers=8
    )
    store.close()
    yield source, files


@pytest.mark.azurite
def test_helpers_stage_from_azurite_through_faults(
    azurite_env: AzuriteServer, blob_lake: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    source, files = blob_lake
    proxy = FaultProxy(upstream_port=azurite_env.port, retry_after_s=0.1)
    try:
        proxy.inject(Fault.BUSY, path_contains="s010.fai", times=2)
        proxy.inject(Fault.DROP, path_contains="s150.fai", times=1)
        proxy.inject(Fault.DROP_MID_BODY, path_contains="big.bam", times=1)
        resolver = StoreResolver(Settings(storage=azurite_env.storage_settings(account_url=proxy.url)))
        settings = SETTINGS.model_copy(update={"max_concurrency": 8})
        stats = stage.stage_in(resolver, [source], tmp_path / "out", settings)
    finally:
        resolver.close()
        proxy.close()
    assert stats.processes == 2
    assert tree(tmp_path / "out" / "run") == files


@pytest.mark.azurite
def test_a_corrupt_body_seen_by_a_helper_is_an_integrity_error(
    azurite_env: AzuriteServer, blob_lake: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    source, _files = blob_lake
    proxy = FaultProxy(upstream_port=azurite_env.port, retry_after_s=0.1)
    try:
        for i in range(0, 160, 20):  # one in each batch, so whichever process reads one sees it
            proxy.inject(Fault.CORRUPT, path_contains=f"s{i:03d}.fai", times=1)
        resolver = StoreResolver(Settings(storage=azurite_env.storage_settings(account_url=proxy.url)))
        with pytest.raises(errors.IntegrityError, match="Content-MD5 mismatch"):
            stage.stage_in(resolver, [source], tmp_path / "out", SETTINGS)
    finally:
        resolver.close()
        proxy.close()


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "expected"),
    [
        (16, None, 16),
        (16, "max 100000\n", 16),
        (16, "200000 100000\n", 2),
        (16, "150000 100000", 2),
        (16, "50000 100000", 1),
        (2, "800000 100000", 2),
        (4, "garbage", 4),
    ],
    ids=["no-cgroup", "no-quota", "two-cpus", "one-and-a-half", "half", "quota-above-affinity", "unreadable"],
)
def test_usable_cores_follow_affinity_and_cgroup_quota(affinity: int, cpu_max: str | None, expected: int) -> None:
    assert stage.usable_cores(affinity, cpu_max) == expected


# --------------------------------------------------------------------------------------------- cancel


class CancellingStore(FolderStore):
    """Sets ``cancel`` (in the staging process) once ``after`` reads have started; reads in helpers are slow, so
    they are still at work when it happens. Counts reads in a log file shared by every process."""

    def __init__(self, log: Path, after: int) -> None:
        self.log = log
        self.after = after
        self.cancel: threading.Event | None = None  # not sent to helpers

    def __getstate__(self) -> dict[str, object]:
        return {"log": self.log, "after": self.after, "cancel": None}

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        with self.log.open("a") as fh:
            fh.write(obj.rel_path + "\n")
        if self.cancel is None:
            time.sleep(0.05)
        elif len(self.log.read_text().splitlines()) >= self.after:
            self.cancel.set()
        return super().read_into(obj, sink, offset=offset, length=length)


@pytest.mark.parametrize("processes", [1, 2])
def test_cancel_stops_the_staging_and_keeps_what_was_finished(
    lake: tuple[Path, dict[str, bytes]], tmp_path: Path, processes: int
) -> None:
    src, files = lake
    store = CancellingStore(tmp_path / "reads.log", after=40)
    store.cancel = threading.Event()
    settings = SETTINGS.model_copy(update={"processes": processes})
    with pytest.raises(errors.StagingCancelled) as raised:
        stage.stage_in(FixedResolver(store), [uri_of(src)], tmp_path / "out", settings, cancel=store.cancel)
    assert isinstance(raised.value, errors.RetryJob), "the worker gives the job back"
    reads = len((tmp_path / "reads.log").read_text().splitlines())
    assert reads < len(files) // 2, "nothing more is fetched once cancelled"
    recorded = manifest_paths(tmp_path / "out")
    assert all((tmp_path / "out" / p).read_bytes() == files[p.removeprefix("run/")] for p in recorded)
    again = stage.stage_in(FixedResolver(FolderStore()), [uri_of(src)], tmp_path / "out", SETTINGS)
    assert again.skipped_files == len(recorded) and tree(tmp_path / "out" / "run") == files


class TricklingStore(FolderStore):
    """Delivers a file in 1 KiB writes, setting ``cancel`` after the third: a read in flight must stop there."""

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel = cancel
        self.writes = 0

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        whole = path_of(obj.uri).read_bytes()
        data = whole[offset : None if length is None else offset + length]
        for start in range(0, len(data), 1024):
            sink.write(data[start : start + 1024])
            self.writes += 1
            if self.writes == 3:
                self.cancel.set()
        return len(data)


def test_cancel_cuts_a_read_in_flight_at_its_next_write(tmp_path: Path) -> None:
    (tmp_path / "lake").mkdir()
    (tmp_path / "lake" / "big.bin").write_bytes(os.urandom(100 * 1024))
    cancel = threading.Event()
    store = TricklingStore(cancel)
    with pytest.raises(errors.StagingCancelled):
        stage.stage_in(
            lambda _uri: store,
            [uri_of(tmp_path / "lake" / "big.bin")],
            tmp_path / "out",
            SETTINGS.model_copy(update={"processes": 1}),
            cancel=cancel,
        )
    assert store.writes == 3
    assert not (tmp_path / "out" / "big.bin").exists()


# --------------------------------------------------------------------------------------------- auto


class BusyStore(FolderStore):
    """Each read also burns ``cpu_ms`` of CPU holding the GIL (as parsing and bookkeeping do per small file)."""

    def __init__(self, log: Path, cpu_ms: float) -> None:
        self.log = log
        self.cpu_ms = cpu_ms

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        with self.log.open("a") as fh:
            fh.write(f"{os.getpid()}\n")
        until = time.thread_time() + self.cpu_ms / 1000
        while time.thread_time() < until:
            pass
        return super().read_into(obj, sink, offset=offset, length=length)


class WaitingStore(FolderStore):
    """Each read waits 50 ms for the "network" and uses no CPU meanwhile."""

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        time.sleep(0.05)
        return super().read_into(obj, sink, offset=offset, length=length)


@pytest.fixture
def many_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, bytes]]:
    """700 files, the auto rule scaled to match: a sample every 0.2 s, helpers while 200 files are left."""
    monkeypatch.setattr(plan, "CPU_SAMPLE_S", 0.2)
    monkeypatch.setattr(plan, "AUTO_MIN_FILES", 200)
    src = tmp_path / "lake" / "many"
    return src, write_tree(src, {f"d{i % 10}/f{i:04d}.idx": i.to_bytes(4, "big") for i in range(700)})


def test_auto_adds_a_helper_when_the_staging_is_cpu_bound(
    many_files: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    src, files = many_files
    reads = tmp_path / "reads.log"
    settings = SETTINGS.model_copy(update={"processes": 0})
    store = BusyStore(reads, cpu_ms=3.0)
    with capture_logs() as logs:
        stats = stage.stage_in(FixedResolver(store), [uri_of(src)], tmp_path / "out", settings)
    assert stats.processes == 2
    assert any(entry["event"] == "staging.cpu_bound" for entry in logs)
    assert len(set(reads.read_text().split())) == 2, "the helper fetched files too"
    assert tree(tmp_path / "out" / "many") == files


def test_auto_stays_in_one_process_while_waiting_on_the_network(
    many_files: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    src, files = many_files
    settings = SETTINGS.model_copy(update={"processes": 0, "max_concurrency": 16})
    stats = stage.stage_in(FixedResolver(WaitingStore()), [uri_of(src)], tmp_path / "out", settings)
    assert stats.processes == 1 and stats.seconds > 4 * plan.CPU_SAMPLE_S
    assert tree(tmp_path / "out" / "many") == files

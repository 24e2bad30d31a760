"""Staging benchmark: ``scalebus stage`` against azcopy, rclone, the naive SDK loop and ``cp -r``, on Azurite.

Run with ``make bench-staging`` (or ``python bench/staging.py --help``). It starts Azurite (in memory), generates
the data sets there and on local disk (for ``cp -r``), then runs every client as a subprocess, several times,
into a fresh destination, and reads each client's wall time, CPU (user+sys) and peak RSS from ``wait4``.
Prints a Markdown table of medians (and writes JSON with ``--json``).

``scalebus`` is the real command line (``scalebus stage SRC DEST -o json``), start-up included, as a one-shot
user runs it. Its JSON answer also says how long ``stage_in`` itself took and the CPU the process used meanwhile:
that is the row ``scalebus (in a worker)``, what staging costs a worker that is already running (a worker imports
once and stages job after job). Both rows come from the same process runs.

Sets: A = 64 × 16 MiB (single-put blobs, so they carry Content-MD5), B = 20,000 × 4 KiB, S = 5,000 × 4 KiB (small
files at a size Azurite serves without holding its core for minutes), and ``mixed`` = one
large file (2 GiB by default, ``--big-mib``), 8 × 100 MiB and 1,000 files of 1–512 KiB nested 8 deep. Set C is
B's files in a local folder (``file://`` for scalebus, a local path for rclone): no server in the way, so the
client's own CPU per file sets the pace, which is where helper processes (``staging.processes``) matter.

``scalebus`` runs with the default settings (``staging.processes = 0``: helper processes join when one process
is CPU-bound); ``scalebus N proc`` sets ``staging.processes = N``. Peak RSS of a client is the larger of
``wait4``'s (one process) and the highest sum over its process tree sampled every 50 ms (helpers included).

``azcopy`` (10.32, from the npm package ``@azure-tools/azcopy-linux``; ``make bench-staging`` installs it into
``.tools/azcopy``, or point ``SCALEBUS_AZCOPY_BIN`` at a binary) copies ``<container URL>/<set>/*?<container SAS>``
with ``--recursive --from-to BlobLocal`` and its default settings (concurrency from the core count, MD5 checked
where the blob has one); its logs and job plans go to fresh folders of the work dir for every run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MiB = 1024 * 1024
CONNECTION_ENV = "SCALEBUS_BENCH_AZURITE_CONNECTION"
AZCOPY_BIN = REPO / ".tools/azcopy/node_modules/@azure-tools/azcopy-linux/dist/bin/azcopy_linux_amd64"
"""Where ``make bench-staging`` installs azcopy (``SCALEBUS_AZCOPY_BIN`` overrides it)."""


@dataclass(frozen=True)
class DataSet:
    name: str
    files: dict[str, int]  # rel path -> size
    local: bool = False  # read from a local folder, not from Azurite

    @property
    def bytes(self) -> int:
        return sum(self.files.values())


def data_sets(big_mib: int, small_files: int) -> list[DataSet]:
    rng = random.Random(5)
    set_a = DataSet("A", {f"f{i:03d}.bin": 16 * MiB for i in range(64)})
    set_b = DataSet("B", {f"d{i // 1000:02d}/f{i:05d}.dat": 4096 for i in range(small_files)})
    set_s = DataSet("S", {f"d{i // 1000:02d}/f{i:05d}.dat": 4096 for i in range(5000)})
    mixed: dict[str, int] = {"big/huge.bam": big_mib * MiB}
    mixed |= {f"mid/part{i}.bin": 100 * MiB for i in range(8)}
    for i in range(1000):
        depth = "/".join(f"l{j}{rng.randrange(3)}" for j in range(8))
        mixed[f"deep/{depth}/s{i:04d}.idx"] = rng.randrange(1024, 512 * 1024)
    return [set_a, set_b, set_s, DataSet("mixed", mixed), DataSet("C", dict(set_b.files), local=True)]


# --------------------------------------------------------------------------------------------- clients


def client_sdk_sequential(account_url: str, container: str, prefix: str, dest: str) -> None:
    from azure.storage.blob import BlobServiceClient

    client = BlobServiceClient.from_connection_string(os.environ[CONNECTION_ENV])
    cont = client.get_container_client(container)
    for blob in cont.list_blobs(name_starts_with=prefix + "/"):
        target = Path(dest) / prefix / blob.name[len(prefix) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as fh:
            cont.download_blob(blob.name).readinto(fh)


CLIENTS: dict[str, Callable[[str, str, str, str], None]] = {
    "sdk-sequential": client_sdk_sequential,
}
IN_WORKER = " (in a worker)"
"""Suffix of the rows read from ``scalebus stage``'s own stats (``seconds``, ``cpu_s``) rather than from
``wait4``."""


def in_worker(tool: str) -> str:
    return tool + IN_WORKER


# --------------------------------------------------------------------------------------------- harness


@dataclass(frozen=True)
class Run:
    set: str
    tool: str
    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    files: int
    bytes: int


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, float, float, str]:
    """Wall, CPU (user+sys), peak RSS and standard output of one client run, read by GNU ``time`` (``wait4`` in a
    small parent: a child forked from this big harness would inherit its RSS high-water mark). CPU includes
    the client's child processes; RSS is the larger of ``wait4``'s and the sampled sum over the process tree."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        timed = ["/usr/bin/time", "-f", "%e %U %S %M", "-o", out.name, *argv]
        proc = subprocess.Popen(timed, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        sampler = TreeRss(proc.pid)
        stdout, stderr = proc.communicate()
        tree_peak_kib = sampler.stop()
        if proc.returncode != 0:
            err = stderr.decode(errors="replace")
            raise RuntimeError(f"{argv[:3]} failed ({proc.returncode}): {err[-2000:]}")
        wall, user, system, rss_kib = out.read().split()[-4:]
    rss_mib = max(float(rss_kib), tree_peak_kib) / 1024
    return float(wall), float(user) + float(system), rss_mib, stdout.decode()


class TreeRss:
    """Samples the summed VmRSS of every process below ``root`` (not ``root`` itself, GNU ``time``)."""

    def __init__(self, root: int, interval_s: float = 0.05) -> None:
        self._root = root
        self._interval_s = interval_s
        self._peak_kib = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self._peak_kib

    def _run(self) -> None:
        while not self._done.wait(self._interval_s):
            total = sum(_rss_kib(pid) for pid in _descendants(self._root))
            self._peak_kib = max(self._peak_kib, total)


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in _children(stack.pop()):
            found.append(child)
            stack.append(child)
    return found


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    pids: list[int] = []
    for tid in tasks:
        try:
            pids += [int(p) for p in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return pids


def _rss_kib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def tally(root: Path) -> tuple[int, int]:
    files = total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if name.startswith(".scalebus"):
                continue
            files += 1
            total += os.path.getsize(os.path.join(dirpath, name))
    return files, total


def azcopy_binary() -> Path:
    return Path(os.environ.get("SCALEBUS_AZCOPY_BIN") or AZCOPY_BIN)


def container_sas(container: str, *, account: str, account_key: str) -> str:
    """A read + list SAS for the container, valid for a day (what ``azcopy copy`` from Blob needs)."""
    import datetime

    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    return generate_container_sas(
        account,
        container,
        account_key=account_key,
        permission=ContainerSasPermissions(read=True, list=True),
        expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1),
    )


def tool_argv(
    tool: str, ds: DataSet, *, account_url: str, container: str, local_src: Path, dest: Path, sas: str = ""
) -> list[str]:
    if tool == "azcopy":
        source = f"{account_url}/{container}/{ds.name}/*?{sas}"
        return [str(azcopy_binary()), "copy", source, str(dest / ds.name), "--recursive", "--from-to", "BlobLocal"]
    if tool == "cp -r":
        return ["cp", "-r", str(local_src / ds.name), str(dest / ds.name)]
    if tool.startswith("rclone"):
        transfers = tool.rsplit(" ", 1)[-1]
        source = str(local_src / ds.name) if ds.local else f"az:{container}/{ds.name}"
        return ["rclone", "copy", "--transfers", transfers, "--checkers", "16", source, str(dest / ds.name)]
    if tool.startswith("scalebus"):
        source = (
            (local_src / ds.name).as_uri()
            if ds.local
            else f"abfss://{container}@devstoreaccount1.dfs.core.windows.net/{ds.name}"
        )
        return [str(Path(sys.executable).with_name("scalebus")), "stage", source, str(dest), "-o", "json"]
    return [sys.executable, __file__, "client", tool, account_url, container, ds.name, str(dest)]


def tool_env(tool: str, env: dict[str, str], *, workdir: Path) -> dict[str, str]:
    """``scalebus N proc`` runs with ``staging.processes = N``; azcopy with its logs and job plans in fresh
    folders under ``workdir`` (and not in syslog); every other tool with ``env`` as it is."""
    words = tool.split()
    if words[0] == "scalebus" and len(words) == 3 and words[2] == "proc":
        return env | {"SCALEBUS_STAGING__PROCESSES": words[1]}
    if tool == "azcopy":
        shutil.rmtree(workdir / "azcopy", ignore_errors=True)
        logs, plans = workdir / "azcopy" / "logs", workdir / "azcopy" / "plans"
        logs.mkdir(parents=True)
        plans.mkdir()
        return env | {
            "AZCOPY_LOG_LOCATION": str(logs),
            "AZCOPY_JOB_PLAN_LOCATION": str(plans),
            "AZCOPY_DISABLE_SYSLOG": "true",
        }
    return env


def applies(tool: str, ds: DataSet) -> bool:
    """The SDK loop and azcopy (``--from-to BlobLocal``) read only from Azurite; every other tool reads either."""
    return not (ds.local and (tool in CLIENTS or tool == "azcopy"))


def generate(ds: DataSet, *, local_src: Path, container_client: object, upload_threads: int = 16) -> None:
    from azure.storage.blob import ContainerClient

    assert isinstance(container_client, ContainerClient)
    rng = random.Random(ds.name)
    block = rng.randbytes(MiB)

    def make(item: tuple[str, int]) -> None:
        rel, size = item
        path = local_src / ds.name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            remaining = size
            salt = rel.encode()
            fh.write(salt[:remaining])
            remaining -= min(len(salt), remaining)
            while remaining:
                piece = block[: min(MiB, remaining)]
                fh.write(piece)
                remaining -= len(piece)
        if ds.local:
            return
        with path.open("rb") as fh:
            container_client.upload_blob(
                f"{ds.name}/{rel}", fh, length=size, overwrite=True, max_concurrency=4 if size > 64 * MiB else 1
            )

    with ThreadPoolExecutor(upload_threads) as pool:
        list(pool.map(make, ds.files.items()))


def rotated(tools: list[str], rep: int) -> list[str]:
    """The tools in another order each repetition, so that no tool always runs first after generation or right
    after the same other tool (Azurite's speed drifts between runs)."""
    shift = rep % len(tools) if tools else 0
    return tools[shift:] + tools[:shift]


def warm_up(container_client: object, ds: DataSet) -> None:
    """List the set once before timing anything: the first listing after a large upload is slow for everyone."""
    from azure.storage.blob import ContainerClient

    assert isinstance(container_client, ContainerClient)
    started = time.monotonic()
    count = sum(1 for _ in container_client.list_blobs(name_starts_with=ds.name + "/"))
    print(f"# warm-up: listed {count:,} blobs in {time.monotonic() - started:.1f} s", flush=True)


def require_tools(tools: list[str]) -> None:
    """The comparison needs Debian's ``rclone`` and GNU ``time``, and azcopy with Debian's ``libsecret-1-0``; say
    how to get them instead of failing later."""
    needed = {"/usr/bin/time": "time"}
    if any(tool.startswith("rclone") for tool in tools):
        needed["rclone"] = "rclone"
    missing = sorted({package for program, package in needed.items() if shutil.which(program) is None})
    if "azcopy" in tools and not _libsecret_installed():
        missing.append("libsecret-1-0")
    if missing:
        sys.exit(
            f"bench/staging.py: missing {', '.join(missing)}; install with: apt-get install -y {' '.join(missing)}"
        )
    if "azcopy" in tools and not os.access(azcopy_binary(), os.X_OK):
        sys.exit(
            f"bench/staging.py: no azcopy at {azcopy_binary()} (or it is not executable); install it with: make "
            f"{AZCOPY_BIN.relative_to(REPO)} (npm package @azure-tools/azcopy-linux), or set SCALEBUS_AZCOPY_BIN"
        )


def _libsecret_installed() -> bool:
    """Whether the dynamic linker finds ``libsecret-1.so.0``, which azcopy's Linux build links against."""
    import ctypes

    try:
        ctypes.CDLL("libsecret-1.so.0")
    except OSError:
        return False
    return True


def run_once(tool: str, ds: DataSet, argv: list[str], env: dict[str, str], *, dest: Path) -> list[Run]:
    """One timed run into a fresh ``dest``, checked for file count and bytes (two rows for scalebus)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    subprocess.run(["sync"], check=True)
    wall, cpu, rss, out = measure(argv, env)
    files, nbytes = tally(dest)
    if (files, nbytes) != (len(ds.files), ds.bytes):
        raise RuntimeError(
            f"{tool} on {ds.name}: {files} files / {nbytes} bytes, expected {len(ds.files)} / {ds.bytes}"
        )
    runs = [Run(ds.name, tool, wall, cpu, rss, files, nbytes)]
    if tool.startswith("scalebus"):
        stats = json.loads(out)
        runs.append(Run(ds.name, in_worker(tool), stats["seconds"], stats["cpu_s"], rss, files, nbytes))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sets", default="A,B,S,mixed,C")
    parser.add_argument("--tools", default="scalebus,azcopy,rclone 16,rclone 64,sdk-sequential,cp -r")
    parser.add_argument("--big-mib", type=int, default=2048, help="size of the mixed set's large file")
    parser.add_argument("--small-files", type=int, default=20_000, help="files in set B")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    require_tools(args.tools.split(","))

    from azure.storage.blob import BlobServiceClient

    from tests.fakes.azurite_plugin import ACCOUNT, ACCOUNT_KEY, AzuriteServer, azurite_binary

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="scalebus-bench-"))
    (workdir / "azurite").mkdir(parents=True, exist_ok=True)
    server = AzuriteServer(binary=azurite_binary(), workdir=workdir / "azurite")
    server.start()
    env = dict(os.environ)
    env[CONNECTION_ENV] = server.connection_string()
    env |= {
        "RCLONE_CONFIG": "/dev/null",
        "RCLONE_CONFIG_AZ_TYPE": "azureblob",
        "RCLONE_CONFIG_AZ_ACCOUNT": ACCOUNT,
        "RCLONE_CONFIG_AZ_KEY": ACCOUNT_KEY,
        "RCLONE_CONFIG_AZ_USE_EMULATOR": "true",
        "RCLONE_CONFIG_AZ_ENDPOINT": server.blob_url,
        "PYTHONPATH": str(REPO),
        # scalebus stage: default staging settings, reaching Azurite with its key
        "SCALEBUS_STORAGE__ACCOUNT_URL": server.blob_url,
        "SCALEBUS_STORAGE__CONNECTION_STRING_ENV": CONNECTION_ENV,
        "SCALEBUS_STAGING__MIN_FREE_BYTES": "0",
        "SCALEBUS_LOG__LEVEL": "warning",
    }
    tools = args.tools.split(",")
    wanted = set(args.sets.split(","))
    sets = [ds for ds in data_sets(args.big_mib, args.small_files) if ds.name in wanted]
    runs: list[Run] = []
    try:
        service = BlobServiceClient.from_connection_string(
            server.connection_string(), max_single_put_size=64 * MiB, max_block_size=32 * MiB
        )
        container = service.create_container("bench").container_name
        sas = container_sas(container, account=ACCOUNT, account_key=ACCOUNT_KEY)
        local_src = workdir / "src"
        for ds in sets:
            started = time.monotonic()
            generate(ds, local_src=local_src, container_client=service.get_container_client(container))
            print(f"# generated set {ds.name}: {len(ds.files):,} files, {ds.bytes / MiB:,.0f} MiB "
                  f"in {time.monotonic() - started:.0f} s", flush=True)  # fmt: skip
            if not ds.local:
                warm_up(service.get_container_client(container), ds)
            for rep in range(args.reps):
                for tool in rotated([tool for tool in tools if applies(tool, ds)], rep):
                    argv = tool_argv(
                        tool, ds, account_url=server.blob_url, container=container, local_src=local_src,
                        dest=workdir / "dest", sas=sas,
                    )  # fmt: skip
                    tenv = tool_env(tool, env, workdir=workdir)
                    for run in run_once(tool, ds, argv, tenv, dest=workdir / "dest"):
                        runs.append(run)
                        print(f"  {ds.name} rep {rep + 1} {run.tool:22s} {run.wall_s:7.2f} s  "
                              f"cpu {run.cpu_s:6.2f} s  rss {run.peak_rss_mib:6.0f} MiB", flush=True)  # fmt: skip
            shutil.rmtree(workdir / "dest", ignore_errors=True)
    finally:
        server.stop()
    print()
    print(
        table(
            runs,
            sets,
            [name for tool in tools for name in ([tool, in_worker(tool)] if "scalebus" in tool else [tool])],
        )
    )
    print()
    print(ratios(runs, sets, tools))
    if args.json:
        args.json.write_text(json.dumps([asdict(run) for run in runs], indent=1))
    shutil.rmtree(workdir / "src", ignore_errors=True)


def table(runs: list[Run], sets: list[DataSet], tools: list[str]) -> str:
    lines = [
        "| set | tool | wall s | MB/s | files/s | client CPU s | CPU ms/file | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for ds in sets:
        for tool in tools:
            mine = [run for run in runs if run.set == ds.name and run.tool == tool]
            if not mine:
                continue
            wall = statistics.median(run.wall_s for run in mine)
            cpu = statistics.median(run.cpu_s for run in mine)
            rss = statistics.median(run.peak_rss_mib for run in mine)
            lines.append(
                f"| {ds.name} | {tool} | {wall:.2f} | {ds.bytes / 1e6 / wall:,.0f} | {len(ds.files) / wall:,.0f} "
                f"| {cpu:.2f} | {1000 * cpu / len(ds.files):.2f} | {rss:.0f} |"
            )
    return "\n".join(lines)


def ratios(runs: list[Run], sets: list[DataSet], tools: list[str]) -> str:
    """``scalebus`` over each other tool, per set: medians of wall, CPU and peak RSS (below 1: scalebus less)."""
    lines = ["| set | ratio | wall | CPU | peak RSS |", "|---|---|---:|---:|---:|"]
    for ds in sets:
        ours = _medians(runs, ds.name, "scalebus")
        for tool in tools:
            theirs = _medians(runs, ds.name, tool)
            if not ours or not theirs or tool.startswith("scalebus"):
                continue
            cells = " | ".join(f"{a / b:.2f} ×" if b else "—" for a, b in zip(ours, theirs, strict=True))
            lines.append(f"| {ds.name} | scalebus / {tool} | {cells} |")
    return "\n".join(lines)


def _medians(runs: list[Run], set_name: str, tool: str) -> list[float]:
    """Median wall, CPU and peak RSS of a tool's runs on a set (empty if it did not run)."""
    mine = [run for run in runs if run.set == set_name and run.tool == tool]
    if not mine:
        return []
    return [statistics.median(getattr(run, name) for run in mine) for name in ("wall_s", "cpu_s", "peak_rss_mib")]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        CLIENTS[sys.argv[2]](*sys.argv[3:7])
    else:
        main()

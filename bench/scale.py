"""Ingest at scale on a zero-latency synthetic source: only scalebus's own cost counts.

Each case runs in a fresh process (so its peak RSS is its own): ``copy`` ingests N synthetic objects (tiny
bodies) from an in-process source into an in-process destination that keeps only the manifest (a real file);
``noop`` then runs again over the N recorded objects, which the destination lists as present. Reported: wall
time of ``engine.ingest``, CPU of the process meanwhile (the synthetic source and destination included, so an
upper bound of scalebus's own), peak RSS of the process. Writes a table into bench/README.md (``--readme``).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scalebus import errors
from scalebus.backends import base
from scalebus.ingest import engine, plan
from scalebus.settings import IngestSettings

SRC = "synthetic://bucket/run"
DEST = "synthetic://lake/landing"
HEADING = "## Ingest at scale (synthetic source)"


def _obj(prefix: str, i: int) -> base.RemoteObject:
    rel = f"sample_{i % 1000:04d}/lane_{i % 4}/read_{i:08d}.fastq.gz"
    return base.RemoteObject(
        uri=f"{prefix}/{urllib.parse.quote(rel)}",
        rel_path=rel,
        size=100 + i % 7,
        etag=f"{i:032x}",
        modified_at=1.0,
    )


class SyntheticSource:
    """N objects listed from nothing; reads write ``size`` zero bytes."""

    def __init__(self, n: int) -> None:
        self._n = n

    def list_files(self, uri: str) -> Iterator[base.RemoteObject]:
        return (_obj(SRC, i) for i in range(self._n))

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        n = obj.size - offset if length is None else length
        sink.write(bytes(n))
        return n

    def close(self) -> None:
        """Nothing to release."""


class SyntheticLake:
    """A destination that drops object bodies but keeps the manifest as a real file; it lists N objects as
    present when ``populated``."""

    def __init__(self, n: int, manifest: Path, *, populated: bool) -> None:
        self._n = n
        self._manifest = manifest
        self._populated = populated

    def list_files(self, uri: str) -> Iterator[base.RemoteObject]:
        if uri.endswith(plan.MANIFEST_NAME):
            if not self._manifest.exists():
                raise errors.ObjectNotFoundError(uri)
            st = self._manifest.stat()
            yield base.RemoteObject(
                uri=uri, rel_path=plan.MANIFEST_NAME, size=st.st_size, etag=str(st.st_mtime_ns)
            )
            return
        if not self._populated:
            raise errors.ObjectNotFoundError(uri)
        yield from (_obj(DEST, i) for i in range(self._n))

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        with self._manifest.open("rb") as fh:
            fh.seek(offset)
            data = fh.read() if length is None else fh.read(length)
        sink.write(data)
        return len(data)

    def write_file(self, source: Path, uri: str) -> None:
        if uri.endswith(plan.MANIFEST_NAME):
            shutil.copyfile(source, self._manifest)

    def write_bytes(self, data: bytes, uri: str) -> None:
        if uri.endswith(plan.MANIFEST_NAME):
            self._manifest.write_bytes(data)

    def exists(self, uri: str) -> bool:
        return True

    def close(self) -> None:
        """Nothing to release."""


def run_one(n: int, mode: str, workdir: Path) -> dict[str, float]:
    """One measured run in this process."""
    settings = IngestSettings(scratch_dir=str(workdir / "scratch"), max_concurrency=8, checkpoint_interval_s=30)
    lake = SyntheticLake(n, workdir / "manifest.jsonl", populated=mode == "noop")
    cpu0, wall0 = time.process_time(), time.monotonic()
    stats = engine.ingest(SyntheticSource(n), SRC, lake, DEST, settings)
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    expected = (n, 0) if mode == "copy" else (0, n)
    if (stats.copied_files, stats.skipped_files) != expected:
        raise SystemExit(f"{mode} {n}: copied {stats.copied_files}, skipped {stats.skipped_files}")
    rss_mib = _peak_rss_mib()
    cpu1 = time.process_time()
    for _ in SyntheticSource(n).list_files(SRC):
        pass
    if mode == "noop":
        for _ in lake.list_files(DEST):
            pass
    synthetic = time.process_time() - cpu1
    own = cpu - synthetic
    return {
        "files": n,
        "wall_s": wall,
        "cpu_s": cpu,
        "synthetic_cpu_s": synthetic,
        "own_cpu_s": own,
        "cpu_us_per_file": own / n * 1e6,
        "peak_rss_mib": rss_mib,
    }


def _peak_rss_mib() -> float:
    """This process's own peak RSS (``VmHWM``: unlike ``ru_maxrss`` it does not carry over the image of the
    parent this process was forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(n: int, mode: str, workdir: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--one", str(n), "--mode", mode, "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def table(rows: list[tuple[str, dict[str, float]]]) -> str:
    lines = [
        "| run | files | wall s | CPU s | of which synthetic listings | own CPU s | own µs/file | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, r in rows:
        lines.append(
            f"| {mode} | {int(r['files']):,} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['synthetic_cpu_s']:.2f} "
            f"| {r['own_cpu_s']:.2f} | {r['cpu_us_per_file']:.1f} | {r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", default="10000,100000", help="comma-separated object counts")
    parser.add_argument("--million", action="store_true", help="add the 1,000,000-object runs (minutes)")
    parser.add_argument("--readme", action="store_true", help="write the table into bench/README.md")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="copy", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        print(json.dumps(run_one(args.one, args.mode, Path(args.workdir))))
        return
    counts = [int(c) for c in args.files.split(",")] + ([1_000_000] if args.million else [])
    rows: list[tuple[str, dict[str, float]]] = []
    for n in counts:
        with tempfile.TemporaryDirectory(prefix="scalebus-bench-scale-") as tmp:
            for mode in ("copy", "noop"):
                rows.append((mode, measure(n, mode, Path(tmp))))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    if args.readme:
        from bench import _readme

        _readme.write_section(HEADING, section(text))


def section(text: str) -> str:
    return f"""{HEADING}

`bench/scale.py` (`make bench-scale`; `--million` adds the 1M runs) ingests N synthetic objects from a
zero-latency in-process source into an in-process destination (bodies dropped, the manifest kept as a real file),
then runs again over the N recorded objects (**noop**: the destination lists all N as present). Each run is a
fresh process; **CPU s** is the process's during `engine.ingest`, **of which synthetic listings** the cost of
generating the source's (and, for noop, the destination's) listing alone, measured after the run in the same
process; **own** is the difference. RSS is the process's peak (`VmHWM`; the synthetic objects included); logs at
warning level. Defaults: 8 copy threads, checkpoint interval 30 s. Targets for a no-op run at 1M recorded
objects: ≤ 10 s of own work and ≤ 400 MiB.

```
.venv/bin/python bench/scale.py --files 10000,100000 --million --readme
```

{text}

Notes. A no-op run reads the local journal (one batch-parsed JSON line per recorded object into a compact index of
integer fingerprints, ~130 MiB at 1M), lists the destination on the same thread, while the source lists on
another (prefetched up to 100k objects), and plans as the source listing streams in, keeping only what it must
copy. A **copy** run holds every object it will copy (the plan, ~1 KiB each with the synthetic names) and, at its
final compaction, the entries of the log being folded in: its RSS grows with what it copies (the 1M row). Only
bytes are simulated here; no server-side copies (Azurite 3.35 answers Put Block From URL with
`501 APINotImplemented`, so against Azurite every run streams).
"""


if __name__ == "__main__":
    main()

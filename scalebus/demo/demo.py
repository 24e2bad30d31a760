"""The demo: a synthetic genomics data set, one job per sample, the whole system on the embedded default.

``scalebus demo`` (and ``make demo``) calls :func:`prepare` to write a data lake folder of gzipped FASTQ files
and a config, then runs the real controller, which starts real worker processes that stage, run
:mod:`scalebus.demo.fastq_qc`, publish, settle and self-destroy. :func:`summarize` reads the outcome back
from the queues and the published outputs, not from anything the processes claim.

With ``pools=2`` the config has two ``[[pools]]``, run by the one controller: ``short`` (two thirds of the
samples, half the reads each: quick jobs) and ``long`` (the other third, twice the reads), each with its own queue,
local scale set and half the workers. The work adds up to that of one pool, so the demo takes about as long.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from scalebus import jobs, settings
from scalebus.backends import base

_READ_LENGTHS = (150, 150, 150, 150, 148, 145, 140, 135, 120, 100)
_BASES = b"ACGT"
_QUALITY = b"#+5:?@AAABCDEFFGGHHIIIIII"
SAMPLE_PREFIX = "S"
BROKEN_JOB_ID = "S-broken-missing-input"


POOL_NAMES = ("short", "long")
"""The pools of a two-pool demo: quick jobs and long ones."""


@dataclass(frozen=True, slots=True)
class DemoPlan:
    root: Path
    lake: Path
    results: Path
    config: Path
    pools: dict[str, tuple[jobs.Job, ...]]
    """Each pool's jobs, by pool name (``default`` alone in a one-pool demo)."""
    input_files: int
    input_bytes: int

    @property
    def jobs(self) -> tuple[jobs.Job, ...]:
        return tuple(job for pool_jobs in self.pools.values() for job in pool_jobs)


@dataclass(frozen=True, slots=True)
class PoolSummary:
    submitted: int
    ok: int
    dead_lettered: int
    peak_workers: int


@dataclass(frozen=True, slots=True)
class Summary:
    submitted: int
    ok: int
    failed: int
    dead_lettered: int
    dead_letter_reasons: dict[str, str]
    peak_workers: int
    wall_s: float
    bytes_staged: int
    staging_s: float
    results: str
    pools: dict[str, PoolSummary]

    @property
    def staging_mb_per_s(self) -> float:
        return self.bytes_staged / 1e6 / self.staging_s if self.staging_s else 0.0


def _table(alphabet: bytes) -> bytes:
    return bytes(alphabet[i % len(alphabet)] for i in range(256))


def fastq_bytes(rng: random.Random, *, reads: int, name: str) -> bytes:
    """Random reads with a realistic shape: mixed lengths, qualities skewed high."""
    longest = max(_READ_LENGTHS)
    seq = rng.randbytes(reads * longest).translate(_table(_BASES))
    qual = rng.randbytes(reads * longest).translate(_table(_QUALITY))
    lengths = rng.choices(_READ_LENGTHS, k=reads)
    out = []
    for i, length in enumerate(lengths):
        start = i * longest
        out.append(
            b"@%s.%d\n%s\n+\n%s\n" % (name.encode(), i, seq[start : start + length], qual[start : start + length])
        )
    return b"".join(out)


def prepare(
    root: Path,
    *,
    user: settings.Settings,
    samples: int,
    reads_per_file: int,
    max_workers: int,
    seed: int = 7,
    pools: int = 1,
) -> DemoPlan:
    """Write the data lake, the config (``user`` adapted by :func:`demo_settings`) and the job lists under
    ``root`` (emptied first); ``pools=2`` splits the samples into short and long jobs (see the module)."""
    root = root.resolve()
    shutil.rmtree(root, ignore_errors=True)
    lake, results = root / "lake", root / "results"
    rng = random.Random(seed)
    count, total = 0, 0
    split = _split(samples, reads_per_file, pools=pools)
    by_pool: dict[str, tuple[jobs.Job, ...]] = {}
    number = 0
    for name, (pool_samples, reads) in split.items():
        job_list = []
        for _ in range(pool_samples):
            number += 1
            sample = f"{SAMPLE_PREFIX}{number:02d}"
            folder = lake / "samples" / sample
            folder.mkdir(parents=True)
            for read in ("R1", "R2"):
                path = folder / f"{sample}_{read}.fastq.gz"
                path.write_bytes(gzip.compress(fastq_bytes(rng, reads=reads, name=sample), compresslevel=1))
                count, total = count + 1, total + path.stat().st_size
            job_list.append(
                jobs.Job(
                    job_id=sample,
                    inputs=[folder.as_uri() + "/"],
                    output=(results / sample).as_uri() + "/",
                    params={"phred_offset": "33"},
                )
            )
        by_pool[name] = tuple(job_list)
    first = next(iter(by_pool))
    broken = jobs.Job(
        job_id=BROKEN_JOB_ID,
        inputs=[(lake / "samples" / "does-not-exist").as_uri() + "/"],
        output=(results / BROKEN_JOB_ID).as_uri() + "/",
    )
    by_pool[first] = (*by_pool[first], broken)
    config = root / "scalebus.toml"
    config.write_text(settings.dump_toml(demo_settings(user, root, max_workers=max_workers, pools=pools)))
    return DemoPlan(root, lake, results, config, by_pool, count, total)


def _split(samples: int, reads: int, *, pools: int) -> dict[str, tuple[int, int]]:
    """Samples and reads per file of each pool: all of them in ``default``, or short and long jobs."""
    if pools == 1:
        return {settings.DEFAULT_POOL: (samples, reads)}
    long = max(1, samples // 3)
    return {"short": (max(1, samples - long), max(10, reads // 2)), "long": (long, reads * 2)}


def demo_settings(user: settings.Settings, root: Path, *, max_workers: int, pools: int = 1) -> settings.Settings:
    """``user`` (the user's --config and SCALEBUS_* variables) with what the demo needs: everything under ``root``,
    the local pool, short idle and poll times so it finishes in seconds, and an exit once drained; with
    ``pools=2``, the ``short`` and ``long`` pools sharing ``max_workers`` (each at least one)."""

    def section(name: str, **changes: object) -> BaseModel:
        current: BaseModel = getattr(user, name)
        return current.model_copy(update=changes)

    top = user.model_copy(
        update={
            "queue": section(
                "queue", url=f"sqlite:///{root}/queue.db?queue=jobs", lock_duration_s=30.0, max_delivery_count=3
            ),
            "scale_set": section("scale_set", url="local://", state_path=str(root / "pool.db")),
            "controller": section(
                "controller", max_instances=max_workers, poll_interval_s=1.0, exit_when_drained=True
            ),
            "worker": section(
                "worker",
                work_dir=str(root / "work"),
                idle_timeout_s=3.0,
                retire_wait_s=2.0,
                receive_wait_s=1.0,
                heartbeat_interval_s=1.0,
            ),
            "staging": section("staging", max_concurrency=8),
            "storage": section(
                "storage", local_roots=[str((root / "lake").resolve()), str((root / "results").resolve())]
            ),
            "pools": (),
        }
    )
    if pools == 1:
        return top
    shares = {"short": max(1, (max_workers + 1) // 2), "long": max(1, max_workers // 2)}
    return top.model_copy(
        update={
            "pools": tuple(
                settings.PoolSettings(
                    name=name,
                    queue=top.queue.model_copy(update={"url": f"sqlite:///{root}/queue.db?queue={name}"}),
                    scale_set=top.scale_set.model_copy(update={"state_path": str(root / f"pool-{name}.db")}),
                    controller=top.controller.model_copy(update={"max_instances": shares[name]}),
                    worker=top.worker.model_copy(update={"work_dir": str(root / f"work-{name}")}),
                )
                for name in POOL_NAMES
            )
        }
    )


def summarize(
    plan: DemoPlan, *, queues: dict[str, base.JobQueue], peak_workers: dict[str, int], wall_s: float
) -> Summary:
    """The outcome, read from each pool's queue (its dead letters) and the published outputs."""
    dead: dict[str, str] = {}
    by_pool: dict[str, PoolSummary] = {}
    ok, staged, staging_s = 0, 0, 0.0
    for name, pool_jobs in plan.pools.items():
        pool_dead = {
            d.message_id: f"{d.reason}: {d.description}" for d in queues[name].peek_dead_letters(max_count=1000)
        }
        dead |= pool_dead
        pool_ok = 0
        for job in pool_jobs:
            out = plan.results / job.job_id
            if not (out / "_SUCCESS").exists():
                continue
            pool_ok += 1
            report = json.loads((out / "_scalebus_job.json").read_text())
            staged += int(report["bytes_staged"])
            staging_s += float(report["staging_seconds"])
        ok += pool_ok
        by_pool[name] = PoolSummary(len(pool_jobs), pool_ok, len(pool_dead), peak_workers.get(name, 0))
    return Summary(
        submitted=len(plan.jobs),
        ok=ok,
        failed=len(plan.jobs) - ok - len(dead),
        dead_lettered=len(dead),
        dead_letter_reasons=dead,
        peak_workers=sum(peak_workers.values()),
        wall_s=wall_s,
        bytes_staged=staged,
        staging_s=staging_s,
        results=str(plan.results),
        pools=by_pool,
    )

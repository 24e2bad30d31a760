"""The demo: a synthetic genomics data set, one job per sample, the whole system on the embedded default.

``scalebus demo`` (and ``make demo``) calls :func:`prepare` to write a data lake folder of gzipped FASTQ files
and a config, then runs the real controller, which starts real worker processes that stage, run
:mod:`scalebus.demo.fastq_qc`, publish, settle and self-destroy. :func:`summarize` reads the outcome back
from the queue and the published outputs, not from anything the processes claim.
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


@dataclass(frozen=True, slots=True)
class DemoPlan:
    root: Path
    lake: Path
    results: Path
    config: Path
    jobs: tuple[jobs.Job, ...]
    input_files: int
    input_bytes: int


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
    root: Path, *, user: settings.Settings, samples: int, reads_per_file: int, max_workers: int, seed: int = 7
) -> DemoPlan:
    """Write the data lake, the config (``user`` adapted by :func:`demo_settings`) and the job list under
    ``root`` (emptied first)."""
    root = root.resolve()
    shutil.rmtree(root, ignore_errors=True)
    lake, results = root / "lake", root / "results"
    rng = random.Random(seed)
    count, total = 0, 0
    job_list = []
    for n in range(1, samples + 1):
        sample = f"{SAMPLE_PREFIX}{n:02d}"
        folder = lake / "samples" / sample
        folder.mkdir(parents=True)
        for read in ("R1", "R2"):
            path = folder / f"{sample}_{read}.fastq.gz"
            path.write_bytes(gzip.compress(fastq_bytes(rng, reads=reads_per_file, name=sample), compresslevel=1))
            count, total = count + 1, total + path.stat().st_size
        job_list.append(
            jobs.Job(
                job_id=sample,
                inputs=[folder.as_uri() + "/"],
                output=(results / sample).as_uri() + "/",
                params={"phred_offset": "33"},
            )
        )
    job_list.append(
        jobs.Job(
            job_id=BROKEN_JOB_ID,
            inputs=[(lake / "samples" / "does-not-exist").as_uri() + "/"],
            output=(results / BROKEN_JOB_ID).as_uri() + "/",
        )
    )
    config = root / "scalebus.toml"
    config.write_text(settings.dump_toml(demo_settings(user, root, max_workers=max_workers)))
    return DemoPlan(root, lake, results, config, tuple(job_list), count, total)


def demo_settings(user: settings.Settings, root: Path, *, max_workers: int) -> settings.Settings:
    """``user`` (the user's --config and SCALEBUS_* variables) with what the demo needs: everything under ``root``,
    the local pool, short idle and poll times so it finishes in seconds, and an exit once drained."""

    def section(name: str, **changes: object) -> BaseModel:
        current: BaseModel = getattr(user, name)
        return current.model_copy(update=changes)

    return user.model_copy(
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
        }
    )


def summarize(plan: DemoPlan, *, queue: base.JobQueue, peak_workers: int, wall_s: float) -> Summary:
    dead = {d.message_id: f"{d.reason}: {d.description}" for d in queue.peek_dead_letters(max_count=1000)}
    ok, staged, staging_s = 0, 0, 0.0
    for job in plan.jobs:
        out = plan.results / job.job_id
        if not (out / "_SUCCESS").exists():
            continue
        ok += 1
        report = json.loads((out / "_scalebus_job.json").read_text())
        staged += int(report["bytes_staged"])
        staging_s += float(report["staging_seconds"])
    return Summary(
        submitted=len(plan.jobs),
        ok=ok,
        failed=len(plan.jobs) - ok - len(dead),
        dead_lettered=len(dead),
        dead_letter_reasons=dead,
        peak_workers=peak_workers,
        wall_s=wall_s,
        bytes_staged=staged,
        staging_s=staging_s,
        results=str(plan.results),
    )

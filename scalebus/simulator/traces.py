"""Job traces for the simulator: the built-in scenarios and CSV files (``arrival_s,run_s,input_bytes``).

A trace is the work (job arrivals) plus the world it runs in (fleet bounds, VM price, Spot evictions). Built-in
traces are generated from a seed so every seed is a different but reproducible day; a CSV trace is the same on
every seed (only boot times, metric lags and evictions vary). Reading a CSV file is this module's only I/O.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scalebus import errors

HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class Job:
    arrival_s: float
    run_s: float
    input_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Trace:
    name: str
    jobs: tuple[Job, ...]
    max_instances: int = 50
    price_per_vm_hour: float = 0.40
    """On-demand price of one worker VM (a D4s-class machine), USD."""
    evictions_s: tuple[float, ...] = ()
    """Times at which one Spot VM (picked at random) gets its 30 s eviction notice."""
    description: str = ""


def _lognormal(rng: random.Random, median: float, sigma: float) -> float:
    return median * math.exp(rng.gauss(0.0, sigma))


def burst500(seed: int) -> Trace:
    rng = random.Random(f"burst500/{seed}")
    jobs = tuple(
        Job(60.0 + rng.uniform(0, 10), _lognormal(rng, 240, 0.5), int(rng.uniform(1, 3) * 1e9)) for _ in range(500)
    )
    return Trace("burst500", jobs, description="500 jobs in 10 s, run ~4 min, 1–3 GB input each, max 50 VMs")


def bursts24h(seed: int) -> Trace:
    rng = random.Random(f"bursts24h/{seed}")
    jobs: list[Job] = []
    for hour in range(24):
        start = hour * HOUR + rng.uniform(0, 0.5 * HOUR)
        for _ in range(rng.randint(10, 120)):
            jobs.append(Job(start + rng.uniform(0, 60), _lognormal(rng, 180, 0.6), int(rng.uniform(0.2, 2) * 1e9)))
    return Trace(
        "bursts24h",
        tuple(sorted(jobs, key=lambda job: job.arrival_s)),
        description="24 h, one burst of 10–120 jobs per hour, run ~3 min, max 50 VMs",
    )


def diurnal(seed: int) -> Trace:
    rng = random.Random(f"diurnal/{seed}")
    peak_per_s = 80.0 / HOUR
    jobs: list[Job] = []
    t = 0.0
    while True:  # thinning: a Poisson process whose rate follows the day
        t += rng.expovariate(peak_per_s)
        if t >= 24 * HOUR:
            break
        rate = 0.5 * (1 - math.cos(2 * math.pi * t / (24 * HOUR)))
        if rng.random() < 0.05 + 0.95 * rate:
            jobs.append(Job(t, _lognormal(rng, 300, 0.5), int(rng.uniform(0.5, 2) * 1e9)))
    return Trace("diurnal", tuple(jobs), description="24 h Poisson, 4–80 jobs/h peaking at noon, run ~5 min")


def trickle(seed: int) -> Trace:
    rng = random.Random(f"trickle/{seed}")
    jobs = tuple(
        Job(n * 900.0 + rng.uniform(-60, 60) + 60, _lognormal(rng, 120, 0.3), int(2e8)) for n in range(96)
    )
    return Trace("trickle", jobs, max_instances=10, description="24 h, one job every 15 min (±1 min), run ~2 min")


def spot_storm(seed: int) -> Trace:
    rng = random.Random(f"spot-storm/{seed}")
    jobs = tuple(
        sorted(
            (Job(rng.uniform(0, 1800), _lognormal(rng, 600, 0.4), int(1e9)) for _ in range(300)),
            key=lambda job: job.arrival_s,
        )
    )
    evictions: list[float] = []
    t = 0.0
    while t < 4 * HOUR:
        storm = 1200 <= t < 2400
        t += rng.expovariate(1 / 20 if storm else 1 / 600)
        evictions.append(t)
    return Trace(
        "spot-storm",
        jobs,
        max_instances=150,
        price_per_vm_hour=0.08,
        evictions_s=tuple(evictions),
        description="300 jobs over 30 min on Spot VMs, run ~10 min, an eviction every 20 s from minute 20 to 40",
    )


BUILTIN: dict[str, Callable[[int], Trace]] = {
    "burst500": burst500,
    "bursts24h": bursts24h,
    "diurnal": diurnal,
    "trickle": trickle,
    "spot-storm": spot_storm,
}


def load(spec: str) -> Callable[[int], Trace]:
    """``builtin:NAME`` (or a bare built-in name) or a CSV path; returns a trace per seed."""
    name = spec.removeprefix("builtin:")
    if name in BUILTIN:
        return BUILTIN[name]
    if spec.startswith("builtin:"):
        raise errors.UserInputError(f"unknown trace {spec!r}: choose one of {', '.join(BUILTIN)} or a CSV file")
    trace = read_csv(Path(spec))
    return lambda _seed: trace


def read_csv(path: Path) -> Trace:
    """Columns ``arrival_s, run_s`` and optionally ``input_bytes``, with a header row."""
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise errors.UserInputError(
            f"cannot read trace {path} ({exc.strerror}): pass a readable CSV file"
        ) from None
    jobs = []
    for line, row in enumerate(rows, start=2):
        try:
            jobs.append(Job(float(row["arrival_s"]), float(row["run_s"]), int(float(row.get("input_bytes") or 0))))
        except (KeyError, TypeError, ValueError):
            raise errors.UserInputError(
                f"{path}:{line}: expected numeric arrival_s, run_s[, input_bytes]: fix the row or the header"
            ) from None
    if not jobs:
        raise errors.UserInputError(f"{path} has no jobs: add rows under the header arrival_s,run_s,input_bytes")
    return Trace(path.stem, tuple(sorted(jobs, key=lambda job: job.arrival_s)), description=f"CSV {path}")

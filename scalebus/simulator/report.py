"""Running the simulator: the policy registry, seeded runs, and the report over seeds (mean ± 95 % CI, a plot).

``model.py`` is the world and its engine, ``baselines.py`` the peers' models, ``ports.py`` scalebus's own
controller step behind simulated ports; this module puts them together for ``scalebus simulate`` and
``bench/policy.py``. Its only I/O is :func:`draw_plot` (matplotlib, imported lazily).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from scalebus import errors
from scalebus.simulator import baselines, ports, traces
from scalebus.simulator.model import HOUR, Autoscaler, RunMetrics, Simulation, World

# ------------------------------------------------------------------------------------------------ reports

METRICS = tuple(f.name for f in fields(RunMetrics))


@dataclass(frozen=True, slots=True)
class Estimate:
    mean: float
    ci95: float
    """Half-width of the 95 % confidence interval of the mean (Student t over seeds)."""

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "–"
        digits = 0 if abs(self.mean) >= 100 else 1 if abs(self.mean) >= 10 else 2
        return f"{self.mean:.{digits}f} ± {self.ci95:.{digits}f}"


def estimate(values: Sequence[float]) -> Estimate:
    clean = [value for value in values if not math.isnan(value)]
    if not clean:
        return Estimate(math.nan, math.nan)
    mean = statistics.fmean(clean)
    if len(clean) < 2:
        return Estimate(mean, 0.0)
    return Estimate(mean, _t975(len(clean) - 1) * statistics.stdev(clean) / math.sqrt(len(clean)))


def _t975(df: int) -> float:
    """Student t 97.5 % quantile (Cornish-Fisher expansion around the normal's 1.96; < 0.5 % off for df ≥ 3)."""
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True, slots=True)
class PolicyResult:
    trace: str
    policy: str
    runs: tuple[RunMetrics, ...]
    summary: dict[str, Estimate]

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace": self.trace,
            "policy": self.policy,
            "seeds": len(self.runs),
            "metrics": {name: {"mean": est.mean, "ci95": est.ci95} for name, est in self.summary.items()},
        }


TABLE_COLUMNS = (
    ("reaction_s", "reaction s"),
    ("wait_p50_s", "wait p50 s"),
    ("wait_p95_s", "wait p95 s"),
    ("makespan_s", "makespan s"),
    ("jobs_done", "jobs done"),
    ("vm_hours", "VM-h"),
    ("idle_h", "idle VM-h"),
    ("booting_h", "booting VM-h"),
    ("busy_killed", "busy killed"),
    ("duplicates", "duplicates"),
    ("arm_writes", "ARM writes"),
    ("arm_429", "429s"),
    ("cost_usd", "cost $"),
)


@dataclass(frozen=True, slots=True)
class SimulationReport:
    trace: str
    seeds: int
    results: tuple[PolicyResult, ...]
    plot: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace": self.trace,
            "seeds": self.seeds,
            "plot": str(self.plot) if self.plot else None,
            "results": [result.to_dict() for result in self.results],
        }

    def rows(self) -> list[dict[str, str]]:
        """One row per policy, columns in display order, ``mean ± 95 % CI`` over seeds."""
        return [
            {"trace": result.trace, "policy": result.policy}
            | {label: str(result.summary[name]) for name, label in TABLE_COLUMNS}
            for result in self.results
        ]

    def result(self, policy: str) -> PolicyResult:
        for result in self.results:
            if result.policy == policy:
                return result
        raise KeyError(policy)


# ------------------------------------------------------------------------------------------------ entry point

POLICIES = (
    "scalebus",
    "scalebus-monitor",
    "keda",
    "keda-mc1",
    "keda-scaledjob",
    "azure-autoscale",
    "batch",
    "oracle",
)


def make_autoscaler(name: str, trace: traces.Trace, world: World) -> Autoscaler:
    factories: dict[str, Callable[[], Autoscaler]] = {
        "scalebus": lambda: ports.ScalebusAutoscaler(trace, world, monitor=False),
        "scalebus-monitor": lambda: ports.ScalebusAutoscaler(trace, world, monitor=True),
        "keda": lambda: baselines.KedaAutoscaler(trace),
        "keda-mc1": lambda: baselines.KedaAutoscaler(trace, message_count=1),
        "keda-scaledjob": lambda: baselines.KedaScaledJobAutoscaler(trace),
        "azure-autoscale": lambda: baselines.AzureAutoscaler(trace),
        "batch": lambda: baselines.BatchAutoscaler(trace),
        "oracle": lambda: baselines.OracleAutoscaler(trace, world),
    }
    if name not in factories:
        raise errors.UserInputError(f"unknown policy {name!r}: choose from {', '.join(POLICIES)}")
    return factories[name]()


def run_once(
    trace: traces.Trace, policy: str, *, seed: int, world: World | None = None, record: bool = False
) -> tuple[RunMetrics, list[tuple[float, int, int, int]]]:
    """One seeded run; returns its metrics and (with ``record``) the (t, waiting, VMs, busy) timeline."""
    world = world or World()
    sim = Simulation(trace, make_autoscaler(policy, trace, world), seed=seed, world=world, record=record)
    return sim.run(), sim.timeline.points


def run_simulation(
    trace: str,
    policies: Sequence[str],
    seeds: int,
    plot: Path | None = None,
    *,
    world: World | None = None,
    max_instances: int | None = None,
) -> SimulationReport:
    """Replay ``trace`` (``builtin:NAME``, a built-in name, or a CSV path) through each policy on seeds 0..n-1.

    ``max_instances`` overrides the trace's fleet cap, for every policy alike.
    """
    if seeds < 1:
        raise errors.UserInputError("--seeds must be at least 1")
    if max_instances is not None and max_instances < 1:
        raise errors.UserInputError("--max-instances must be at least 1")
    for name in policies:
        if name not in POLICIES:
            raise errors.UserInputError(f"unknown policy {name!r}: choose from {', '.join(POLICIES)}")
    make_trace = traces.load(trace)
    per_seed = [make_trace(seed) for seed in range(seeds)]
    if max_instances is not None:
        per_seed = [replace(seeded, max_instances=max_instances) for seeded in per_seed]
    results = []
    timelines: dict[str, list[tuple[float, int, int, int]]] = {}
    for name in policies:
        runs = []
        for seed, seeded in enumerate(per_seed):
            metrics, timeline = run_once(
                seeded, name, seed=seed, world=world, record=plot is not None and seed == 0
            )
            runs.append(metrics)
            if timeline:
                timelines[name] = timeline
        summary = {metric: estimate([float(getattr(run, metric)) for run in runs]) for metric in METRICS}
        results.append(PolicyResult(per_seed[0].name, name, tuple(runs), summary))
    if plot is not None:
        draw_plot(plot, per_seed[0].name, timelines)
    return SimulationReport(per_seed[0].name, seeds, tuple(results), plot)


def draw_plot(path: Path, trace: str, timelines: dict[str, list[tuple[float, int, int, int]]]) -> None:
    """Queue depth, VMs and busy VMs over time, one panel per policy (seed 0), as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise errors.UserInputError("plotting needs matplotlib: pip install 'scalebus[plot]'") from None
    fig, axes = plt.subplots(len(timelines), 1, figsize=(11, 2.4 * len(timelines)), sharex=True, squeeze=False)
    for ax, (name, timeline) in zip(axes[:, 0], timelines.items(), strict=True):
        hours = [point[0] / HOUR for point in timeline]
        ax.step(hours, [point[1] for point in timeline], where="post", label="waiting jobs", color="tab:red")
        ax.step(hours, [point[2] for point in timeline], where="post", label="VMs", color="tab:blue")
        ax.step(hours, [point[3] for point in timeline], where="post", label="busy VMs", color="tab:green")
        ax.set_title(f"{trace} — {name}", fontsize=9, loc="left")
        ax.set_ylabel("count")
        ax.set_yscale("symlog", linthresh=10)
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("hours")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise errors.UserInputError(f"cannot write plot {path} ({exc.strerror}): choose a writable path") from None
    finally:
        plt.close(fig)


__all__ = [
    "METRICS",
    "POLICIES",
    "Estimate",
    "PolicyResult",
    "SimulationReport",
    "World",
    "draw_plot",
    "estimate",
    "make_autoscaler",
    "run_once",
    "run_simulation",
]

"""The two-pool demo's plan and config: short and long jobs, each pool its own queue, scale set and share of the
workers, the work adding up to that of the one-pool demo. (``tests/e2e/test_demo.py`` runs the demo itself.)"""

from __future__ import annotations

from pathlib import Path

from scalebus import settings
from scalebus.demo import demo


def test_the_two_pool_demo_splits_samples_into_short_and_long_jobs(tmp_path: Path) -> None:
    user = settings.load(environ={})
    plan = demo.prepare(tmp_path / "d", user=user, samples=6, reads_per_file=100, max_workers=3, pools=2)
    assert list(plan.pools) == ["short", "long"]
    short, long = plan.pools["short"], plan.pools["long"]
    assert [job.job_id for job in short] == ["S01", "S02", "S03", "S04", demo.BROKEN_JOB_ID]
    assert [job.job_id for job in long] == ["S05", "S06"]
    short_size = (plan.lake / "samples" / "S01" / "S01_R1.fastq.gz").stat().st_size
    long_size = (plan.lake / "samples" / "S05" / "S05_R1.fastq.gz").stat().st_size
    assert long_size > 3 * short_size, "long jobs read four times as many reads"

    cfg = settings.load(plan.config, environ={})
    assert cfg.pool_names() == ("short", "long")
    short_cfg, long_cfg = cfg.for_pool("short"), cfg.for_pool("long")
    assert short_cfg.queue.url.endswith("queue.db?queue=short") and long_cfg.queue.url.endswith("queue=long")
    assert short_cfg.scale_set.state_path != long_cfg.scale_set.state_path
    assert (short_cfg.controller.max_instances, long_cfg.controller.max_instances) == (2, 1)
    assert short_cfg.controller.exit_when_drained and long_cfg.controller.exit_when_drained


def test_the_one_pool_demo_keeps_its_config_without_pools(tmp_path: Path) -> None:
    user = settings.load(environ={})
    plan = demo.prepare(tmp_path / "d", user=user, samples=2, reads_per_file=50, max_workers=2)
    assert list(plan.pools) == [settings.DEFAULT_POOL] and len(plan.jobs) == 3
    assert settings.load(plan.config, environ={}).pools == ()

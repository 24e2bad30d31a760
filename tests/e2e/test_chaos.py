"""The bounded chaos run in the suite: 30 jobs, a few worker SIGKILLs, a short lake outage, a frozen publisher and
a controller killed mid-spawn, all on real processes. ``make chaos`` runs the long version (tests/e2e/_chaos.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e._chaos import Chaos

pytestmark = pytest.mark.slow


@pytest.mark.timeout(150)
def test_chaos_loses_nothing_commits_once_and_leaves_nothing(tmp_path: Path) -> None:
    chaos = Chaos(tmp_path, jobs=30, kills=4, outage_s=4.0, seed=13, max_instances=4)
    try:
        figures = chaos.run(deadline_s=110.0)
    finally:
        chaos.close()
    assert figures.problems == [], figures
    assert figures.committed == 30 and figures.dead_lettered == 0
    assert figures.worker_kills >= 1 and figures.outage_s == 4.0
    assert figures.frozen_publishers == 1 and figures.controllers_killed_mid_spawn == 1
    assert figures.analytics_runs >= 30

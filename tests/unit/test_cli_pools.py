"""The commands that serve one pool of several: ``worker run --pool`` (or ``SCALEBUS_POOL``) picks it; naming
none, or one the config does not have, is a mistake (one line, exit 2) before anything is opened."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TWO_POOLS = """
[[pools]]
name = "short"
[pools.queue]
url = "sqlite:///{root}/queue.db?queue=short"
[pools.scale_set]
state_path = "{root}/short.db"

[[pools]]
name = "long"
[pools.queue]
url = "sqlite:///{root}/queue.db?queue=long"
[pools.scale_set]
state_path = "{root}/long.db"
"""


def scalebus(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "SCALEBUS_POOL"}
    return subprocess.run(
        [sys.executable, "-m", "scalebus", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        pytest.param([], {}, "this config has several pools — name one with --pool (short, long)", id="none"),
        pytest.param(["--pool", "medium"], {}, "no pool named 'medium'", id="unknown-flag"),
        pytest.param([], {"SCALEBUS_POOL": "medium"}, "no pool named 'medium'", id="unknown-env"),
    ],
)
def test_a_worker_must_name_one_of_the_pools(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    config = tmp_path / "pools.toml"
    config.write_text(TWO_POOLS.format(root=tmp_path))
    result = scalebus("worker", "run", "--config", str(config), *args, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "queue.db").exists(), "refused before any queue was opened"


def test_submit_goes_to_the_named_pool_and_refuses_to_guess(tmp_path: Path) -> None:
    import json

    config = tmp_path / "pools.toml"
    config.write_text(TWO_POOLS.format(root=tmp_path))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a")
    job = ["--job-id", "j1", "--input", (tmp_path / "in").as_uri(), "--output-uri", (tmp_path / "out").as_uri()]
    env = {"SCALEBUS_STORAGE__LOCAL_ROOTS": json.dumps([str(tmp_path)])}
    guessed = scalebus("submit", "--config", str(config), *job, cwd=tmp_path, env=env)
    assert guessed.returncode == 2 and "several pools" in guessed.stderr, guessed.stderr
    sent = scalebus("submit", "--config", str(config), "--pool", "long", "-o", "json", *job, cwd=tmp_path, env=env)
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["queue"] == "long"
    status = scalebus("status", "--config", str(config), "-o", "json", cwd=tmp_path, env=env)
    assert status.returncode == 0, status.stderr
    depth = {p["pool"]: p["depth"]["active"] for p in json.loads(status.stdout)["pools"]}
    assert depth == {"short": 0, "long": 1}

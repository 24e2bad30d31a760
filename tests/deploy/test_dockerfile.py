"""The container image recipe: an init, a health check, pinned dependencies, a drain-aware stop."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy import _tools

DOCKERFILE = (_tools.DOCKER / "Dockerfile").read_text()
CONSTRAINTS = _tools.DEPLOY / "constraints.txt"


def instruction(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in DOCKERFILE.splitlines() if line.startswith(name + " ")]


def pins() -> dict[str, str]:
    found = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            found[canonicalize_name(name)] = version
    return found


def test_image_runs_under_an_init_and_has_a_health_check() -> None:
    (entrypoint,) = instruction("ENTRYPOINT")
    assert json.loads(entrypoint)[:2] == ["/usr/bin/tini", "--"]
    assert "-g" not in json.loads(entrypoint)  # SIGTERM to scalebus alone: the analytics keeps running
    assert "tini" in DOCKERFILE.split("FROM ${BASE}\n")[-1]
    assert instruction("HEALTHCHECK")
    assert instruction("STOPSIGNAL") == ["SIGTERM"]
    assert re.search(r"--stop-timeout (\d+)", DOCKERFILE)


def test_image_installs_from_the_constraints_file() -> None:
    assert "COPY deploy/constraints.txt" in DOCKERFILE
    assert "--constraint constraints.txt" in DOCKERFILE


def test_constraints_pin_every_runtime_dependency_within_its_range() -> None:
    pinned = pins()
    project = tomllib.loads((_tools.ROOT / "pyproject.toml").read_text())["project"]
    for raw in project["dependencies"]:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        assert name in pinned, f"{name} is not in deploy/constraints.txt (run deploy/freeze_constraints.py)"
        assert req.specifier.contains(pinned[name]), f"{name}=={pinned[name]} is outside {req.specifier}"
    dev_only = {"pytest", "mypy", "ruff", "hypothesis", "moto", "checkov", "boto3", "matplotlib"}
    assert not dev_only & set(pinned)


def run_healthcheck() -> int:
    script = _tools.DOCKER / "healthcheck.py"
    return subprocess.run([sys.executable, str(script)], timeout=30, check=False).returncode


def test_health_check_sees_a_live_scalebus_process(tmp_path: Path) -> None:
    stand_in = tmp_path / "bin" / "scalebus"
    stand_in.parent.mkdir()
    stand_in.symlink_to(shutil.which("sleep") or "/bin/sleep")
    proc = subprocess.Popen([str(stand_in), "30"])
    try:
        assert run_healthcheck() == 0
        proc.send_signal(signal.SIGSTOP)  # a stopped process is not healthy
        time.sleep(0.2)
        assert run_healthcheck() == 1 or _another_scalebus_runs()
    finally:
        proc.kill()
        proc.wait()


def _another_scalebus_runs() -> bool:
    """On a shared machine a real scalebus may be running; the stopped-process case then proves nothing."""
    for pid in Path("/proc").iterdir():
        try:
            if pid.name.isdigit() and b"/scalebus" in (pid / "cmdline").read_bytes():
                return True
        except OSError:
            continue  # the process ended while we looked
    return False

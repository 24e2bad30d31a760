"""The systemd units pass ``systemd-analyze verify`` and reach their hardening targets.

``verify`` refuses a unit whose ExecStart binary does not exist. The units name the node image's paths
(/opt/scalebus/venv/bin/scalebus), so each test builds a stand-in root: the host's own unit directory (for
multi-user.target, network-online.target, cloud-init.service...), our units in etc/systemd/system, and an
executable stand-in at every path an Exec*= line names. ``--root`` makes systemd resolve all of it inside
that tree, so the units are checked unchanged, with the paths they will have on the VM.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from scalebus import settings
from tests.deploy import _tools

UNITS = sorted(p.name for p in _tools.DOCKER.glob("scalebus-*.service"))
HOST_UNITS = Path("/usr/lib/systemd/system")
MAX_EXPOSURE = {
    "scalebus-controller.service": 4.0,
    "scalebus-selfdestroy.service": 4.0,
    "scalebus-worker.service": 2.0,
}
"""The controller's target is 4 (OK); the worker's sandbox also holds the analytics, and reaches 1.2 today."""
DRAIN_MARGIN_S = 60


def analyze() -> str:
    return _tools.validator("systemd-analyze", install_hint="apt-get install systemd")


def exec_paths(unit_text: str) -> set[str]:
    paths = set()
    for match in re.finditer(r"^Exec\w+=([-+@:!]*)(\S+)", unit_text, re.MULTILINE):
        paths.add(match.group(2))
    return paths


def directives(name: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (_tools.DOCKER / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.fixture
def stand_in_root(tmp_path: Path) -> Path:
    if not HOST_UNITS.is_dir():
        _tools.missing(f"{HOST_UNITS} is missing (apt-get install systemd)")
    shutil.copytree(HOST_UNITS, tmp_path / "usr/lib/systemd/system", symlinks=True)
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in UNITS:
        text = (_tools.DOCKER / name).read_text()
        (units / name).write_text(text)
        for path in exec_paths(text):
            binary = tmp_path / path.lstrip("/")
            binary.parent.mkdir(parents=True, exist_ok=True)
            binary.write_text("#!/bin/sh\nexit 0\n")
            binary.chmod(0o755)
    return tmp_path


def verify(root: Path, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze(), "verify", f"--root={root}", name], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("name", UNITS)
def test_unit_passes_verify(name: str, stand_in_root: Path) -> None:
    result = verify(stand_in_root, name)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_verify_fails_when_the_binary_is_missing(stand_in_root: Path) -> None:
    (stand_in_root / "opt/scalebus/venv/bin/scalebus").unlink()
    result = verify(stand_in_root, "scalebus-worker.service")
    assert result.returncode != 0
    assert "not executable" in result.stderr


@pytest.mark.parametrize("name", UNITS)
def test_unit_exposure_is_within_its_target(name: str, stand_in_root: Path) -> None:
    result = subprocess.run(
        [analyze(), "security", "--offline=true", f"--root={stand_in_root}", name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE[name]


def test_worker_stop_drains_instead_of_killing_the_analytics() -> None:
    worker = directives("scalebus-worker.service")
    assert worker["KillMode"] == ["mixed"]
    assert worker["KillSignal"] == ["SIGTERM"]
    default_drain = settings.WorkerSettings().drain_timeout_s
    assert int(worker["TimeoutStopSec"][0]) == default_drain + DRAIN_MARGIN_S
    assert worker["RequiresMountsFor"] == ["/mnt/scratch"]
    assert worker["StateDirectory"] == ["scalebus-worker"]
    assert worker["OnFailure"] == ["scalebus-selfdestroy.service"]


def test_stop_timeout_formula_matches_the_template() -> None:
    (vmss,) = [r for r in _tools.template()["resources"] if r["type"].endswith("/virtualMachineScaleSets")]
    custom_data = vmss["properties"]["virtualMachineProfile"]["osProfile"]["customData"]
    assert f"'@@STOP_TIMEOUT_S@@', string(add(parameters('drainTimeoutSeconds'), {DRAIN_MARGIN_S}))" in custom_data


@pytest.mark.parametrize("name", UNITS)
def test_a_config_error_is_not_retried(name: str) -> None:
    assert directives(name)["RestartPreventExitStatus"] == ["2"]


def test_controller_creates_its_own_directories() -> None:
    controller = directives("scalebus-controller.service")
    assert controller["StateDirectory"] == ["scalebus-controller"]
    assert controller["WorkingDirectory"] == ["/var/lib/scalebus-controller"]

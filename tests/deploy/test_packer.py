"""The node image recipe passes ``packer validate`` (packer 1.6.6 from Debian, offline)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.deploy import _tools

RECIPE = _tools.DEPLOY / "packer" / "scalebus-node.pkr.hcl"


def packer(*args: str, cwd: Path = _tools.ROOT) -> subprocess.CompletedProcess[str]:
    binary = _tools.validator("packer", install_hint="apt-get install packer")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


def test_recipe_passes_syntax_validation() -> None:
    result = packer("validate", "-syntax-only", str(RECIPE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_syntax_validation_can_fail(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pkr.hcl"
    broken.write_text(RECIPE.read_text().replace("build {", "build {{", 1))
    assert packer("validate", "-syntax-only", str(broken)).returncode != 0


def full_validate(recipe: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``packer validate`` with every variable set: it also checks arguments and that each file exists."""
    wheel = tmp_path / "scalebus-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    analytics = tmp_path / "analytics" / "bin"
    analytics.mkdir(parents=True)
    variables = {
        "subscription_id": "0000",
        "resource_group": "rg",
        "wheel": str(wheel),
        "analytics_dir": str(analytics.parent),
    }
    args = [arg for name, value in variables.items() for arg in ("-var", f"{name}={value}")]
    return packer("validate", *args, str(recipe))


def test_recipe_passes_full_validation_offline(tmp_path: Path) -> None:
    result = full_validate(RECIPE, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_full_validation_catches_an_unknown_argument(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pkr.hcl"
    broken.write_text(RECIPE.read_text().replace("image_offer ", "image_offerx ", 1))
    result = full_validate(broken, tmp_path)
    assert result.returncode != 0
    assert "image_offerx" in result.stdout + result.stderr


def test_recipe_bakes_the_wheel_units_and_analytics() -> None:
    text = RECIPE.read_text()
    for needed in (
        "--constraint /tmp/scalebus/constraints.txt",
        "docker/scalebus-worker.service",
        "docker/scalebus-controller.service",
        "docker/scalebus-selfdestroy.service",
        "/opt/analytics",
        'image_offer                       = "debian-12"',
        "cloud-init clean",
    ):
        assert needed in text

"""Import direction for third-party SDKs: only backends/azure imports azure.* ; only backends/aws imports
boto3/botocore; tenacity only in backends/azure/_retry.py; the pure modules import no I/O backends.

The layers between our own packages (and the absence of import cycles) are import-linter contracts in
pyproject.toml, checked by ``lint-imports`` in ``make lint``; the last test here runs them too, so a plain
``pytest`` cannot pass with a broken layer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "scalebus"
PURE = (
    "controller/policy.py",
    "transfer/plan.py",
    "transfer/paths.py",
    "ingest/plan.py",
    "jobs.py",
    "uris.py",
    "redact.py",
    "errors.py",
)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_azure_and_tenacity_stay_at_the_edge(path: Path) -> None:
    rel = path.relative_to(PACKAGE).as_posix()
    imported = _imports(path)
    if not rel.startswith("backends/azure/"):
        assert not any(name == "azure" or name.startswith("azure.") for name in imported), rel
    if not rel.startswith("backends/aws/"):
        assert not any(name.partition(".")[0] in ("boto3", "botocore") for name in imported), rel
    if rel != "backends/azure/_retry.py":
        assert not any(name == "tenacity" or name.startswith("tenacity.") for name in imported), rel


@pytest.mark.parametrize("rel", PURE)
def test_pure_modules_do_no_io(rel: str) -> None:
    imported = _imports(PACKAGE / rel)
    forbidden = {"subprocess", "socket", "sqlite3", "scalebus.backends.local", "scalebus.backends.azure", "time"}
    forbidden |= {"scalebus.backends.aws", "scalebus.backends.aws.s3"}
    assert not imported & forbidden, f"{rel} imports {imported & forbidden}"


def test_every_module_says_why_it_exists() -> None:
    missing = [str(p.relative_to(PACKAGE)) for p in MODULES if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []


def test_layer_contracts_hold() -> None:
    """``lint-imports`` over pyproject.toml's contracts: layers, the protected backends, no cycles."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout

"""The Service Bus test broker reuses the SDK's private AMQP codec, so the suite runs only on the SDK series the
broker was written against, while users may install any compatible release. These checks say which is which."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from tests.fakes.servicebus_amqp import SDK_SERIES

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _series(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def test_installed_sdk_is_the_series_the_test_broker_was_written_against() -> None:
    installed = importlib.metadata.version("azure-servicebus")
    assert _series(installed) == SDK_SERIES, (
        f"azure-servicebus {installed} is installed, but tests/fakes/servicebus_amqp.py imports the private "
        f"azure.servicebus._pyamqp codec of {SDK_SERIES[0]}.{SDK_SERIES[1]}.x; install the dev extra "
        "(pip install -e '.[dev]') or port the broker to the new codec and move SDK_SERIES and the dev pin"
    )


def test_production_takes_the_compatible_range_and_only_the_dev_extra_pins_the_series() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    runtime = [d.replace(" ", "") for d in project["dependencies"] if d.startswith("azure-servicebus")]
    dev = [d.replace(" ", "") for d in project["optional-dependencies"]["dev"] if d.startswith("azure-servicebus")]
    major, minor = SDK_SERIES
    assert runtime == [f"azure-servicebus>={major}.{minor},<{major + 1}"]
    assert dev == [f"azure-servicebus~={major}.{minor}.0"]

"""Suite-wide options and the plugin files that start the test peers (each owned by its backend)."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fakes.servicebus_plugin",
    "tests.fakes.compute_plugin",
    "tests.fakes.azurite_plugin",
    "tests.fakes.keyvault_plugin",
    "tests.fakes.moto_plugin",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--azure-live",
        action="store_true",
        default=False,
        help="run tests against real Azure (credentials from SCALEBUS_LIVE_* environment variables)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--azure-live"):
        return
    skip = pytest.mark.skip(reason="real Azure: pass --azure-live and set SCALEBUS_LIVE_* variables")
    for item in items:
        if "azure_live" in item.keywords:
            item.add_marker(skip)

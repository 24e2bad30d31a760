"""What the deployment tests share: the repository paths, finding a validator, rendering a cloud-init.

A validator that is not installed skips its test with the reason, except where ``CI_REQUIRE_VALIDATORS=1``
(``.ci/run`` sets it after installing them): there a missing validator fails the test, so CI cannot pass by
skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DEPLOY = ROOT / "deploy"
TEMPLATE = DEPLOY / "azuredeploy.json"
PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")

_RG = "/subscriptions/0000/resourceGroups/rg/providers"
SAMPLE_VALUES = {
    "QUEUE_URL": "servicebus://scalebus-sb-abc.servicebus.windows.net/jobs",
    "DEPTH_SOURCE": "admin",
    "NAMESPACE_RESOURCE_ID": f"{_RG}/Microsoft.ServiceBus/namespaces/scalebus-sb-abc",
    "SCALE_SET_ID": f"{_RG}/Microsoft.Compute/virtualMachineScaleSets/scalebus-workers",
    "STORAGE_ACCOUNT_URL": "https://scalebusabc.blob.core.windows.net",
    "KEY_VAULT_URL": "https://scalebus-kv-abc.vault.azure.net",
    "WORKER_COMMAND": '["/opt/analytics/bin/run-sample","--threads","4"]',
    "DRAIN_TIMEOUT_S": "300",
    "STOP_TIMEOUT_S": "360",
    "MAX_INSTANCES": "10",
    "CLIENT_ID": "11111111-2222-3333-4444-555555555555",
}
"""One value per placeholder, shaped as the template's expressions produce them (``string()`` of an array is
its JSON text)."""


def validator(name: str, *, install_hint: str) -> str:
    """The path of a validator on PATH, or skip (fail under ``CI_REQUIRE_VALIDATORS=1``)."""
    found = shutil.which(name)
    if found:
        return found
    return missing(f"{name} is not installed ({install_hint})")


def missing(reason: str) -> str:
    if os.environ.get("CI_REQUIRE_VALIDATORS") == "1":
        pytest.fail(f"{reason}; CI_REQUIRE_VALIDATORS=1 requires every validator")
    pytest.skip(reason)


def render(text: str, values: dict[str, str] | None = None) -> str:
    """``text`` with every ``@@NAME@@`` replaced, as the template's replace() chain does."""
    values = SAMPLE_VALUES if values is None else values
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def template() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(TEMPLATE.read_text())
    return loaded

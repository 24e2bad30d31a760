"""``scalebus config from-deployment``: the template's outputs in, a config ``settings.load`` accepts out.

The sample outputs are made from ``deploy/azuredeploy.json``'s own ``outputs`` section (each ARM expression
replaced by a value of the kind Azure would return), so a template output renamed or reshaped fails here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from scalebus import errors, settings
from scalebus.cli import config as config_cmd

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "azuredeploy.json"
SUB = "00000000-0000-0000-0000-0000000000aa"
RG = "/subscriptions/" + SUB + "/resourceGroups/scalebus-demo"
VARIABLES = {
    "queueUrl": "servicebus://sb-scalebus-x1.servicebus.windows.net/jobs",
    "storageAccountUrl": "https://stscalebusx1.blob.core.windows.net",
    "keyVaultUrl": "https://kv-scalebus-x1.vault.azure.net",
    "heartbeatContainer": "scalebus-heartbeats",
    "controllerVmName": "scalebus-controller",
}


def _evaluate(expression: Any, template: dict[str, Any]) -> Any:
    """A value Azure would put where the template has ``expression`` (only the shapes its outputs use)."""
    if isinstance(expression, dict):
        return {key: _evaluate(value, template) for key, value in expression.items()}
    if not (isinstance(expression, str) and expression.startswith("[")):
        return expression
    if found := re.fullmatch(r"\[parameters\('(\w+)'\)\]", expression):
        default = template["parameters"][found.group(1)].get("defaultValue")
        return "westeurope" if isinstance(default, str) and default.startswith("[") else default
    if found := re.fullmatch(r"\[variables\('(\w+)'\)\]", expression):
        return VARIABLES[found.group(1)]
    if found := re.fullmatch(r"\[resourceId\('([\w.]+)/(\w+)', .*\)\]", expression):
        return f"{RG}/providers/{found.group(1)}/{found.group(2)}/scalebus-x1"
    if expression.startswith("[format('abfss://"):
        return "abfss://input@stscalebusx1.dfs.core.windows.net"
    if ".clientId]" in expression:
        return "11111111-2222-3333-4444-555555555555"
    raise AssertionError(f"the sample does not know how to evaluate {expression}")


@pytest.fixture
def outputs() -> dict[str, Any]:
    """What ``az deployment group show --query properties.outputs -o json`` prints after a deployment."""
    template = json.loads(TEMPLATE.read_text())
    return {
        name: {"type": spec["type"].capitalize(), "value": _evaluate(spec["value"], template)}
        for name, spec in template["outputs"].items()
    }


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scalebus", "config", "from-deployment", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("SCALEBUS_")},
    )


def test_writes_a_complete_toml_config_that_settings_load_reads(tmp_path: Path, outputs: dict[str, Any]) -> None:
    (tmp_path / "outputs.json").write_text(json.dumps(outputs))
    result = _cli("outputs.json", "--out", "scalebus.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    loaded = settings.load(tmp_path / "scalebus.toml", environ={})
    wanted = outputs["scalebusConfig"]["value"]
    assert loaded.queue.url == outputs["queueUrl"]["value"] == wanted["queue"]["url"]
    assert loaded.queue.depth_source == outputs["depthSource"]["value"]
    assert loaded.queue.namespace_resource_id == outputs["namespaceResourceId"]["value"]
    assert loaded.scale_set.url == outputs["scaleSetResourceId"]["value"]
    assert loaded.storage.account_url == outputs["storageAccountUrl"]["value"]
    assert loaded.secrets.url == outputs["keyVaultUrl"]["value"]
    assert loaded.controller.max_instances == wanted["controller"]["max_instances"]
    assert loaded.worker.command == wanted["worker"]["command"]
    assert loaded.worker.drain_timeout_s == wanted["worker"]["drain_timeout_s"]
    text = (tmp_path / "scalebus.toml").read_text()
    sections = [s for s in settings.Settings.model_fields if s != "pools"]  # [[pools]] only when there are pools
    assert all(f"[{section}]" in text for section in sections), "every section written"


def test_json_output_is_the_same_tree(outputs: dict[str, Any]) -> None:
    cfg = config_cmd.config_from_outputs(outputs, source="outputs.json")
    assert (
        settings.Settings.model_validate(json.loads(config_cmd.render(cfg, config_cmd.ConfigFormat.JSON))) == cfg
    )
    toml_text = config_cmd.render(cfg, config_cmd.ConfigFormat.TOML)
    assert settings.Settings.model_validate(tomllib.loads(toml_text)) == cfg


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(lambda o: {"properties": {"outputs": o}}, id="whole-deployment"),
        pytest.param(lambda o: o["scalebusConfig"]["value"], id="config-object-alone"),
    ],
)
def test_accepts_the_other_shapes_az_prints(outputs: dict[str, Any], shape: Any) -> None:
    cfg = config_cmd.config_from_outputs(shape(outputs), source="x.json")
    assert cfg.scale_set.url == outputs["scaleSetResourceId"]["value"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param("{not json", "is not JSON", id="not-json"),
        pytest.param('{"queueUrl": {"type": "String", "value": "x"}}', "holds no scalebusConfig", id="no-config"),
        pytest.param("[1, 2]", "holds no scalebusConfig", id="a-list"),
        pytest.param(
            '{"scalebusConfig": {"type": "Object", "value": {"queue": {"colour": "red"}}}}',
            "scalebusConfig.queue.colour",
            id="unknown-key",
        ),
    ],
)
def test_a_wrong_file_is_one_line_and_exit_2(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "outputs.json").write_text(content)
    result = _cli("outputs.json", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""


def test_a_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(errors.UserInputError, match="does not exist"):
        config_cmd.from_deployment_cmd(tmp_path / "nope.json")


def test_a_deployed_fleet_refuses_file_uris(outputs: dict[str, Any]) -> None:
    cfg = config_cmd.config_from_outputs(outputs, source="outputs.json")
    assert list(cfg.storage.local_roots) == [], "file:// is for the embedded default, never an Azure fleet"

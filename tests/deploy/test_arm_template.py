"""deploy/azuredeploy.json: valid by Azure's deployment template schema, and saying what scalebus needs.

The schema files under schemas/ are trimmed copies of Azure/azure-resource-manager-schemas (MIT; see
schemas/vendor.py). Resource types the template never uses (the Logic and SendGrid entries that
deploymentTemplate.json names directly) resolve to schemas that match nothing.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import referencing
from referencing.jsonschema import DRAFT4

from scalebus import settings
from tests.deploy import _tools

SCHEMAS = Path(__file__).parent / "schemas"
BASE = "https://schema.management.azure.com/schemas/"
UNUSED_TYPES = ("Microsoft.Logic.json", "Sendgrid.Email.json")

API_VERSIONS = {
    "Microsoft.ServiceBus/namespaces": "2021-11-01",
    "Microsoft.ServiceBus/namespaces/queues": "2021-11-01",
    "Microsoft.Storage/storageAccounts": "2023-05-01",
    "Microsoft.Storage/storageAccounts/blobServices": "2023-05-01",
    "Microsoft.Storage/storageAccounts/blobServices/containers": "2023-05-01",
    "Microsoft.KeyVault/vaults": "2023-07-01",
    "Microsoft.ManagedIdentity/userAssignedIdentities": "2023-01-31",
    "Microsoft.Authorization/roleDefinitions": "2022-04-01",
    "Microsoft.Authorization/roleAssignments": "2022-04-01",
    "Microsoft.Authorization/locks": "2020-05-01",
    "Microsoft.Compute/virtualMachineScaleSets": "2024-07-01",
    "Microsoft.Compute/virtualMachines": "2024-07-01",
    "Microsoft.Network/networkSecurityGroups": "2023-11-01",
    "Microsoft.Network/publicIPAddresses": "2023-11-01",
    "Microsoft.Network/natGateways": "2023-11-01",
    "Microsoft.Network/virtualNetworks": "2023-11-01",
    "Microsoft.Network/networkInterfaces": "2023-11-01",
}
"""Each is a stable version in Azure/azure-rest-api-specs
(``specification/<service>/resource-manager/<namespace>/stable/<version>``)."""

BUILT_IN_ROLES = {
    "serviceBusDataOwner": "090c5cfd-751d-490a-894a-3ce6f1109419",
    "serviceBusDataReceiver": "4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0",
    "serviceBusDataSender": "69a216fc-b8fb-44d8-bc22-1f3c2cd27a39",
    "storageBlobDataReader": "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1",
    "storageBlobDataContributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
    "keyVaultSecretsUser": "4633458b-17de-408a-b874-0445c86b69e6",
    "keyVaultSecretsOfficer": "b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
}
"""From Azure's built-in roles reference (learn.microsoft.com/azure/role-based-access-control/built-in-roles:
the Integration, Storage and Security pages; Key Vault's RBAC guide lists the same ids)."""

EXPECTED_ASSIGNMENTS = {
    ("controller", "customRoles.controller", None),
    ("controller", "builtInRoles.serviceBusDataOwner", "queueScope"),
    ("controller", "builtInRoles.storageBlobDataContributor", "heartbeatScope"),
    ("worker", "customRoles.worker", None),
    ("worker", "builtInRoles.serviceBusDataReceiver", "queueScope"),
    ("worker", "builtInRoles.storageBlobDataReader", "inputScope"),
    ("worker", "builtInRoles.storageBlobDataContributor", "outputScope"),
    ("worker", "builtInRoles.storageBlobDataContributor", "heartbeatScope"),
    ("worker", "builtInRoles.keyVaultSecretsUser", "vaultScope"),
    ("operator", "builtInRoles.serviceBusDataSender", "queueScope"),
    ("operator", "builtInRoles.storageBlobDataContributor", "inputScope"),
    ("operator", "builtInRoles.storageBlobDataReader", "outputScope"),
    ("operator", "builtInRoles.keyVaultSecretsOfficer", "vaultScope"),
}
"""Who gets which role where (the table in docs/azure-quickstart.md); None is the resource group."""

OUTPUTS = {
    "queueUrl",
    "queueName",
    "namespaceResourceId",
    "depthSource",
    "scaleSetResourceId",
    "orchestrationMode",
    "storageAccountUrl",
    "inputFilesystemUri",
    "outputFilesystemUri",
    "heartbeatContainer",
    "keyVaultUrl",
    "controllerIdentityClientId",
    "workerIdentityClientId",
    "controllerVmName",
    "scalebusConfig",
}

CONFIG_STEP = "scalebus config from-deployment outputs.json --out scalebus.toml"
"""The quickstart's config step: the deployment's outputs to a complete TOML config."""


@cache
def validator() -> jsonschema.Draft4Validator:
    resources = [
        (BASE + str(p.relative_to(SCHEMAS)), referencing.Resource(json.loads(p.read_text()), DRAFT4))
        for p in SCHEMAS.rglob("*.json")
    ]

    def unused(uri: str) -> referencing.Resource[Any]:
        if not uri.endswith(UNUSED_TYPES):
            raise referencing.exceptions.NoSuchResource(uri)
        never = {"not": {}}
        return referencing.Resource({"resourceDefinitions": _AnyName(never)}, DRAFT4)

    registry: referencing.Registry[Any] = referencing.Registry(retrieve=unused).with_resources(resources)
    schema = json.loads((SCHEMAS / "2019-04-01/deploymentTemplate.json").read_text())
    return jsonschema.Draft4Validator(schema, registry=registry)


class _AnyName(dict[str, Any]):
    """A mapping that answers every key with the same value (every unused resource type matches nothing)."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self._value = value

    def __getitem__(self, key: str) -> Any:
        return self._value

    def __contains__(self, key: object) -> bool:
        return True

    def get(self, key: str, default: Any = None) -> Any:
        return self._value


def resources(kind: str) -> list[dict[str, Any]]:
    return [r for r in _tools.template()["resources"] if r["type"] == kind]


def test_template_passes_the_deployment_template_schema() -> None:
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator().iter_errors(_tools.template())]
    assert not errors


def test_the_schema_refuses_an_api_version_that_does_not_exist() -> None:
    broken = copy.deepcopy(_tools.template())
    queue = next(r for r in broken["resources"] if r["type"] == "Microsoft.ServiceBus/namespaces/queues")
    queue["apiVersion"] = "2099-01-01"
    assert not validator().is_valid(broken)


def test_every_resource_uses_a_known_stable_api_version() -> None:
    found = {(r["type"], r["apiVersion"]) for r in _tools.template()["resources"]}
    assert found == set(API_VERSIONS.items())


def test_embedded_cloud_inits_are_the_files() -> None:
    variables = _tools.template()["variables"]
    for name, path in (
        ("workerCloudInit", "cloud-init.yaml"),
        ("controllerCloudInit", "cloud-init-controller.yaml"),
    ):
        assert variables[name] == (_tools.DOCKER / path).read_text(), "run python3 deploy/embed_cloud_init.py"


def custom_data(kind: str) -> str:
    """The customData expression of the one resource of ``kind`` (reference() may not sit in variables)."""
    (res,) = resources(kind)
    profile = res["properties"].get("virtualMachineProfile", res["properties"])
    data: str = profile["osProfile"]["customData"]
    return data


@pytest.mark.parametrize(
    ("kind", "source"),
    [
        ("Microsoft.Compute/virtualMachineScaleSets", "workerCloudInit"),
        ("Microsoft.Compute/virtualMachines", "controllerCloudInit"),
    ],
)
def test_every_placeholder_is_filled(kind: str, source: str) -> None:
    data = custom_data(kind)
    assert data.startswith("[base64(replace(") and f"variables('{source}')" in data
    wanted = set(_tools.PLACEHOLDER.findall(_tools.template()["variables"][source]))
    filled = set(re.findall(r"'@@([A-Z_]+)@@'", data))
    assert wanted == filled
    assert wanted <= set(_tools.SAMPLE_VALUES)


def test_queue_has_duplicate_detection_lock_and_delivery_count() -> None:
    (queue,) = resources("Microsoft.ServiceBus/namespaces/queues")
    props = queue["properties"]
    assert props["requiresDuplicateDetection"] is True
    assert props["lockDuration"] == "[parameters('lockDuration')]"
    assert props["maxDeliveryCount"] == "[parameters('maxDeliveryCount')]"
    (namespace,) = resources("Microsoft.ServiceBus/namespaces")
    assert namespace["sku"]["name"] in {"Standard", "Premium"}  # Basic has no duplicate detection


def test_storage_has_hierarchical_namespace_and_the_heartbeat_container() -> None:
    (account,) = resources("Microsoft.Storage/storageAccounts")
    assert account["properties"]["isHnsEnabled"] is True
    containers = {r["name"] for r in resources("Microsoft.Storage/storageAccounts/blobServices/containers")}
    assert containers == {"[variables('inputPath')]", "[variables('outputPath')]", "[variables('heartbeatPath')]"}
    from scalebus.backends.azure import heartbeats

    assert _tools.template()["variables"]["heartbeatContainer"] == heartbeats.CONTAINER


def test_key_vault_is_in_rbac_mode() -> None:
    (vault,) = resources("Microsoft.KeyVault/vaults")
    assert vault["properties"]["enableRbacAuthorization"] is True


def test_scale_set_starts_empty_with_scheduled_events_and_options() -> None:
    (vmss,) = resources("Microsoft.Compute/virtualMachineScaleSets")
    params = _tools.template()["parameters"]
    props, profile = vmss["properties"], vmss["properties"]["virtualMachineProfile"]
    assert vmss["sku"]["capacity"] == 0
    assert params["orchestrationMode"]["defaultValue"] == "Flexible"
    assert props["overprovision"] == "[if(variables('isFlexible'), json('null'), false())]"
    assert profile["evictionPolicy"] == "[if(parameters('useSpot'), 'Delete', json('null'))]"
    assert profile["priority"] == "[if(parameters('useSpot'), 'Spot', 'Regular')]"
    assert profile["scheduledEventsProfile"]["terminateNotificationProfile"]["enable"] is True
    assert profile["storageProfile"]["imageReference"] == {"id": "[parameters('nodeImageId')]"}
    assert props["upgradePolicy"] == {"mode": "Manual"}


def test_outputs_hold_what_the_config_needs() -> None:
    outputs = _tools.template()["outputs"]
    assert set(outputs) == OUTPUTS
    sections = outputs["scalebusConfig"]["value"]
    for section, keys in sections.items():
        model = settings.Settings.model_fields[section].annotation
        assert model is not None
        assert set(keys) <= set(model.model_fields), section


def test_config_step_turns_the_outputs_into_a_loadable_config(tmp_path: Path) -> None:
    sample = {
        "queue": {
            "url": _tools.SAMPLE_VALUES["QUEUE_URL"],
            "depth_source": "admin",
            "namespace_resource_id": "/x",
        },
        "scale_set": {"url": _tools.SAMPLE_VALUES["SCALE_SET_ID"]},
        "storage": {"account_url": _tools.SAMPLE_VALUES["STORAGE_ACCOUNT_URL"]},
        "secrets": {"url": _tools.SAMPLE_VALUES["KEY_VAULT_URL"]},
        "controller": {"max_instances": 10},
        "worker": {
            "command": ["/opt/a b/run", 'say "hi"'],
            "work_dir": "/mnt/scratch/scalebus",
            "drain_timeout_s": 300,
        },
    }
    assert set(sample) == set(_tools.template()["outputs"]["scalebusConfig"]["value"])
    outputs = json.dumps({"scalebusConfig": {"type": "Object", "value": sample}})
    (tmp_path / "outputs.json").write_text(outputs)
    subprocess.run(
        [sys.executable, "-m", "scalebus", *CONFIG_STEP.split()[1:]], cwd=tmp_path, capture_output=True, check=True
    )
    cfg = settings.load(tmp_path / "scalebus.toml", environ={})
    assert cfg.worker.command == ["/opt/a b/run", 'say "hi"']
    assert cfg.controller.max_instances == 10
    assert CONFIG_STEP in (_tools.ROOT / "docs/azure-quickstart.md").read_text()


def test_assignments_are_the_expected_ones() -> None:
    found = set()
    for res in resources("Microsoft.Authorization/roleAssignments"):
        who = res["metadata"]["scalebus"].split(":")[0]
        role = re.search(r"variables\('(\w+)'\)\.(\w+)", res["properties"]["roleDefinitionId"])
        assert role
        scope = re.fullmatch(r"\[variables\('(\w+)'\)\]", res.get("scope", "[variables('')]"))
        found.add((who, f"{role.group(1)}.{role.group(2)}", (scope.group(1) if scope else None) or None))
    assert found == EXPECTED_ASSIGNMENTS


def test_built_in_role_ids_are_azures() -> None:
    roles = _tools.template()["variables"]["builtInRoles"]
    assert {k: re.search(r"'([0-9a-f-]{36})'", v).group(1) for k, v in roles.items()} == BUILT_IN_ROLES  # type: ignore[union-attr]


@pytest.mark.parametrize("who", ["controller", "worker"])
def test_custom_role_definitions_match_docker_roles(who: str) -> None:
    spec = json.loads((_tools.DOCKER / "roles" / f"scalebus-{who}.json").read_text())
    (definition,) = [r for r in resources("Microsoft.Authorization/roleDefinitions") if who in r["name"]]
    (perms,) = definition["properties"]["permissions"]
    assert perms["actions"] == spec["Actions"]
    assert perms["notActions"] == spec["NotActions"]
    assert perms["dataActions"] == spec["DataActions"]
    assert perms["notDataActions"] == spec["NotDataActions"]
    assert definition["properties"]["assignableScopes"] == ["[resourceGroup().id]"]
    assert definition["properties"]["type"] == "CustomRole"


ASSIGNABLE_SCOPE = re.compile(
    r"/|/providers/Microsoft\.Management/managementGroups/[^/]+|/subscriptions/[^/]+(/resourceGroups/[^/]+)?"
)


@pytest.mark.parametrize("path", sorted((_tools.DOCKER / "roles").glob("*.json")), ids=lambda p: p.stem)
def test_role_files_are_valid_by_azures_rules(path: Path) -> None:
    """AssignableScopes: management groups, subscriptions or resource groups only, never a resource."""
    role = json.loads(path.read_text())
    assert role["IsCustom"] is True
    assert role["AssignableScopes"]
    for scope in role["AssignableScopes"]:
        assert ASSIGNABLE_SCOPE.fullmatch(scope), scope
    for action in role["Actions"]:
        assert re.fullmatch(r"Microsoft\.\w+(/[\w*]+)+", action), action
    assert len(role["Actions"]) == len(set(role["Actions"]))


def test_worker_role_lets_flexible_self_destroy_list_and_delete_at_resource_group_scope() -> None:
    role = json.loads((_tools.DOCKER / "roles" / "scalebus-worker.json").read_text())
    assert {"Microsoft.Compute/virtualMachines/read", "Microsoft.Compute/virtualMachines/delete"} <= set(
        role["Actions"]
    )
    assert all(re.fullmatch(r"/subscriptions/[^/]+/resourceGroups/[^/]+", s) for s in role["AssignableScopes"])
    (assignment,) = [
        r
        for r in resources("Microsoft.Authorization/roleAssignments")
        if r["metadata"]["scalebus"].startswith("worker: custom")
    ]
    assert "scope" not in assignment  # the deployment's resource group, where Flexible VMs live


def test_controller_vm_is_locked_against_the_workers_delete_right() -> None:
    (lock,) = resources("Microsoft.Authorization/locks")
    assert lock["properties"]["level"] == "CanNotDelete"
    assert "virtualMachines" in lock["scope"]

"""Azure role-based access control as the fakes apply it: role definitions, assignments at a scope, and checks.

Each fake request carries a bearer token; the token *is* the principal here (one identity per token). A principal
holds role assignments, each a role definition at a scope; a request for ``action`` on ``scope`` is allowed when
some assignment's scope is ``scope`` or one of its ancestors and the role grants the action (``Actions`` minus
``NotActions``, or ``DataActions`` minus ``NotDataActions`` for data-plane calls). Wildcards (``*``) match as in
role definitions, and action names compare case-insensitively. Followed: "Understand Azure role definitions"
(https://learn.microsoft.com/en-us/azure/role-based-access-control/role-definitions: Actions, NotActions,
DataActions, wildcards, AssignableScopes) and "Understand scope for Azure RBAC"
(https://learn.microsoft.com/en-us/azure/role-based-access-control/scope-overview: a role assigned at a parent
scope is inherited by child scopes, never the other way round).

Custom roles are read from the repository's ``docker/roles/*.json`` at test time, so the tests run under exactly
what ships; they are assigned at their first ``AssignableScopes`` entry with the placeholders filled in (that is
the scope the deployment assigns them at). Built-in roles the README names are copied below, with the action
lists of "Azure built-in roles" (https://learn.microsoft.com/en-us/azure/role-based-access-control/built-in-roles,
the *Security*, *Storage*, *Integration* and *Monitor* pages). Every check is recorded, so a test can list the
granted actions no code path used.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import threading
from pathlib import Path
from typing import Any

ROLES_DIR = Path(__file__).resolve().parents[2] / "docker" / "roles"


@dataclasses.dataclass(frozen=True)
class RoleDefinition:
    name: str
    actions: tuple[str, ...] = ()
    not_actions: tuple[str, ...] = ()
    data_actions: tuple[str, ...] = ()
    not_data_actions: tuple[str, ...] = ()
    assignable_scopes: tuple[str, ...] = ()

    def grants(self, action: str, *, data: bool) -> bool:
        allowed, denied = (self.data_actions, self.not_data_actions) if data else (self.actions, self.not_actions)
        return _matches_any(action, allowed) and not _matches_any(action, denied)


def _matches_any(action: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(action.lower(), p.lower()) for p in patterns)


def load_custom_role(path: Path) -> RoleDefinition:
    """A custom role definition file as ``az role definition create --role-definition @file`` takes it."""
    doc: dict[str, Any] = json.loads(path.read_text())
    return RoleDefinition(
        name=str(doc["Name"]),
        actions=tuple(doc.get("Actions") or ()),
        not_actions=tuple(doc.get("NotActions") or ()),
        data_actions=tuple(doc.get("DataActions") or ()),
        not_data_actions=tuple(doc.get("NotDataActions") or ()),
        assignable_scopes=tuple(doc.get("AssignableScopes") or ()),
    )


def shipped_role(stem: str) -> RoleDefinition:
    """``docker/roles/<stem>.json``, e.g. ``shipped_role("scalebus-worker")``."""
    return load_custom_role(ROLES_DIR / f"{stem}.json")


def fill_scope(template: str, *, subscription: str, resource_group: str, scale_set: str = "") -> str:
    """An ``AssignableScopes`` entry of a shipped role with its placeholders replaced."""
    return (
        template.replace("SUBSCRIPTION_ID", subscription)
        .replace("RESOURCE_GROUP", resource_group)
        .replace("SCALE_SET", scale_set)
        .rstrip("/")
    )


# Copied from the built-in roles page (see the module docstring); only the roles the README names.
BUILT_IN: dict[str, RoleDefinition] = {
    "Key Vault Secrets User": RoleDefinition(
        "Key Vault Secrets User",
        data_actions=(
            "Microsoft.KeyVault/vaults/secrets/getSecret/action",
            "Microsoft.KeyVault/vaults/secrets/readMetadata/action",
        ),
    ),
    "Storage Blob Data Reader": RoleDefinition(
        "Storage Blob Data Reader",
        actions=(
            "Microsoft.Storage/storageAccounts/blobServices/containers/read",
            "Microsoft.Storage/storageAccounts/blobServices/generateUserDelegationKey/action",
        ),
        data_actions=("Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read",),
    ),
    "Storage Blob Data Contributor": RoleDefinition(
        "Storage Blob Data Contributor",
        actions=(
            "Microsoft.Storage/storageAccounts/blobServices/containers/delete",
            "Microsoft.Storage/storageAccounts/blobServices/containers/read",
            "Microsoft.Storage/storageAccounts/blobServices/containers/write",
            "Microsoft.Storage/storageAccounts/blobServices/generateUserDelegationKey/action",
        ),
        data_actions=(
            "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/delete",
            "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read",
            "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/write",
            "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/move/action",
            "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/add/action",
        ),
    ),
    "Azure Service Bus Data Receiver": RoleDefinition(
        "Azure Service Bus Data Receiver",
        actions=(
            "Microsoft.ServiceBus/*/queues/read",
            "Microsoft.ServiceBus/*/topics/read",
            "Microsoft.ServiceBus/*/topics/subscriptions/read",
        ),
        data_actions=("Microsoft.ServiceBus/*/receive/action",),
    ),
    "Azure Service Bus Data Sender": RoleDefinition(
        "Azure Service Bus Data Sender",
        actions=(
            "Microsoft.ServiceBus/*/queues/read",
            "Microsoft.ServiceBus/*/topics/read",
            "Microsoft.ServiceBus/*/topics/subscriptions/read",
        ),
        data_actions=("Microsoft.ServiceBus/*/send/action",),
    ),
    "Monitoring Reader": RoleDefinition(
        "Monitoring Reader",
        actions=("*/read", "Microsoft.OperationalInsights/workspaces/search/action", "Microsoft.Support/*"),
    ),
}


@dataclasses.dataclass(frozen=True)
class Assignment:
    principal: str
    role: RoleDefinition
    scope: str


def scope_covers(assigned: str, requested: str) -> bool:
    """An assignment at ``assigned`` applies at ``requested`` (the same scope or a child of it). A ``*`` segment
    in ``assigned`` stands for "every resource of that type" (one assignment per scale set, in one line)."""
    a = assigned.strip("/").lower().split("/")
    r = requested.strip("/").lower().split("/")
    return len(r) >= len(a) and all(x in ("*", y) for x, y in zip(a, r, strict=False))


class AccessPolicy:
    """The role assignments one fake enforces, and a record of what was asked."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._assignments: list[Assignment] = []
        self._used: set[tuple[str, str]] = set()
        self.denied: list[tuple[str, str, str]] = []
        """(principal, action, scope) of every refused request, in order."""

    def assign(self, principal: str, role: RoleDefinition, scope: str) -> None:
        with self._lock:
            self._assignments.append(Assignment(principal, role, scope))

    def clear(self) -> None:
        with self._lock:
            self._assignments.clear()
            self._used.clear()
            self.denied.clear()

    def allows(self, principal: str, action: str, scope: str, *, data: bool = False) -> bool:
        with self._lock:
            self._used.add((principal, action.lower()))
            granted = any(
                a.principal == principal and scope_covers(a.scope, scope) and a.role.grants(action, data=data)
                for a in self._assignments
            )
            if not granted:
                self.denied.append((principal, action, scope))
            return granted

    def note(self, principal: str, action: str) -> None:
        """Record an action that was needed but is not checked by this fake (see the caller for why)."""
        with self._lock:
            self._used.add((principal, action.lower()))

    def used_actions(self, principal: str | None = None) -> set[str]:
        """Actions (lower case) requested so far, by one principal or by anyone."""
        with self._lock:
            return {a for p, a in self._used if principal is None or p == principal}


def arm_denial(principal: str, action: str, scope: str) -> tuple[int, dict[str, str], Any]:
    """ARM's 403 for a missing permission: the ``{"error": {"code", "message"}}`` envelope of the ARM RPC
    (https://github.com/Azure/azure-resource-manager-rpc/blob/master/v1.0/common-api-details.md, "Error Response
    Content") with code ``AuthorizationFailed`` and the message "Troubleshoot Azure RBAC" quotes
    (https://learn.microsoft.com/en-us/azure/role-based-access-control/troubleshooting)."""
    message = (
        f"The client '{principal}' with object id '{principal}' does not have authorization to perform action "
        f"'{action}' over scope '{scope}' or the scope is invalid. If access was recently granted, please refresh "
        "your credentials."
    )
    return 403, {"x-ms-failure-cause": "gateway"}, {"error": {"code": "AuthorizationFailed", "message": message}}

"""``BlobLease``: the controllers' lease as an Azure blob lease on one blob in the heartbeat container.

Blob Storage arbitrates: Lease Blob's *acquire* succeeds for one client while the blob is unleased (never leased,
released, or its lease ran out) and answers 409 to everyone else; a lease lasts 15 to 60 seconds, or forever,
and is kept by *renew* with its lease id (https://learn.microsoft.com/rest/api/storageservices/lease-blob).
An infinite lease would never pass to a standby after a crash, so only 15–60 s are accepted.

The fencing token is a generation counter in the blob's metadata (``generation``, with ``holder``): right after
acquiring, the new holder reads it and writes it back one higher, with its lease id as the condition, so only the
holder of a live lease can raise it, and a holder whose lease was taken in between fails that write (412) and
reports no grant. Until that write lands, :meth:`BlobLease.holder` still names the previous holder.
"""

from __future__ import annotations

import contextlib
import urllib.parse
import uuid
from typing import Any

import structlog
from azure.core import exceptions as core_exc
from azure.storage.blob import BlobClient, BlobLeaseClient, ContainerClient

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import _errors, _retry, datalake, heartbeats
from scalebus.settings import ScaleSetSettings, StorageSettings

log = structlog.get_logger(__name__)

LEASE_BLOB = "_controller-lease"
"""The leased blob's name under the fleet's heartbeat prefix (no ``.json``: no heartbeat can have it)."""
MIN_DURATION_S = 15
MAX_DURATION_S = 60
_LOST_STATUSES = frozenset({409, 412})
"""Lease Blob answers 409 (LeaseIdMismatchWithLeaseOperation, LeaseNotPresentWithLeaseOperation) and a write
conditioned on a lease that is gone 412 (LeaseIdMismatchWithBlobOperation, LeaseLost)."""
LEASE = _errors.ErrorKinds(errors.LeaseError, errors.TransientLeaseError, errors.LeaseError)


class BlobLease:
    """Implements ``base.Lease`` with a blob lease. ``owner`` is the account client to close with it."""

    def __init__(self, container: ContainerClient, *, name: str, duration_s: float, owner: Any = None) -> None:
        if not MIN_DURATION_S <= duration_s <= MAX_DURATION_S or duration_s != int(duration_s):
            raise errors.ConfigError(
                "controller.lease_s",
                f"{duration_s:g} s is not a blob lease duration",
                f"give whole seconds from {MIN_DURATION_S} to {MAX_DURATION_S}",
            )
        self._container = container
        self._blob: BlobClient = container.get_blob_client(name)
        self._duration_s = int(duration_s)
        self._owner = owner

    @property
    def duration_s(self) -> float:
        return float(self._duration_s)

    def acquire(self, holder: str) -> base.LeaseGrant | None:
        self._ensure_blob()
        lease = BlobLeaseClient(self._blob, lease_id=str(uuid.uuid4()))
        try:
            _call("acquire controller lease", lambda: lease.acquire(lease_duration=self._duration_s))
        except errors.LeaseLostError:
            return None  # 409 LeaseAlreadyPresent: someone holds it
        try:
            token = self._next_generation(holder, lease.id)
        except errors.LeaseLostError:
            return None  # it ran out and was taken before the generation was raised
        log.info("lease_acquired", blob=self._blob.blob_name, holder=holder, token=token)
        return base.LeaseGrant(holder=holder, token=token, key=lease.id)

    def renew(self, grant: base.LeaseGrant) -> base.LeaseGrant:
        lease = BlobLeaseClient(self._blob, lease_id=grant.key)
        _call("renew controller lease", lease.renew)
        return grant

    def release(self, grant: base.LeaseGrant) -> None:
        lease = BlobLeaseClient(self._blob, lease_id=grant.key)
        with contextlib.suppress(errors.LeaseLostError):  # someone else's now: nothing of ours to give up
            _call("release controller lease", lease.release)

    def holder(self) -> base.LeaseHolder | None:
        try:
            props = _call("read controller lease", self._blob.get_blob_properties)
        except errors.LeaseError as exc:
            if isinstance(exc.__cause__, core_exc.ResourceNotFoundError):
                return None  # never acquired
            raise
        if props.lease.state != "leased":
            return None
        metadata = props.metadata or {}
        return base.LeaseHolder(
            holder=urllib.parse.unquote(metadata.get("holder", "")), token=int(metadata.get("generation", "0"))
        )

    def close(self) -> None:
        """Release the account client's connections; closing twice does nothing more."""
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.close()
        self._container.close()

    def _next_generation(self, holder: str, lease_id: str) -> int:
        props = _call("read lease generation", lambda: self._blob.get_blob_properties(lease=lease_id))
        token = int((props.metadata or {}).get("generation", "0")) + 1
        metadata = {"generation": str(token), "holder": urllib.parse.quote(holder, safe="")}
        _call("raise lease generation", lambda: self._blob.set_blob_metadata(metadata, lease=lease_id))
        return token

    def _ensure_blob(self) -> None:
        """The leased blob exists (an empty block blob); the first controller creates it and its container."""
        try:
            _call("create controller lease blob", lambda: self._blob.upload_blob(b"", overwrite=False))
        except errors.LeaseLostError:
            return  # 409 BlobAlreadyExists (or leased): it is there
        except errors.LeaseError as exc:
            if not isinstance(exc.__cause__, core_exc.ResourceNotFoundError):
                raise
            with contextlib.suppress(errors.LeaseLostError):  # 409: another controller created it first
                _call("create heartbeat container", self._container.create_container)
            self._ensure_blob()


def _call(what: str, fn: Any) -> Any:
    """One SDK call, retried while transient; a lease conflict becomes ``LeaseLostError``."""

    @_retry.retry_data_plane
    def attempt() -> Any:
        try:
            with _errors.translated(LEASE, what=what):
                return fn()
        except errors.LeaseError as exc:
            status = getattr(exc.__cause__, "status_code", None)
            if status in _LOST_STATUSES:
                raise errors.LeaseLostError(f"{what}: HTTP {status}") from exc.__cause__
            raise

    return attempt()


def open_lease(storage: StorageSettings, scale_set: ScaleSetSettings, *, duration_s: float) -> BlobLease:
    """The fleet's controller lease: blob :data:`LEASE_BLOB` under the fleet's prefix in the heartbeat container,
    the account, container and prefix :func:`~scalebus.backends.azure.heartbeats.open_heartbeats` uses."""
    if not storage.account_url:
        raise errors.ConfigError(
            "storage.account_url",
            "the controllers' lease of a VM scale set fleet needs a storage account",
            "set storage.account_url to the blob endpoint (https://<account>.blob.core.windows.net), or "
            "controller.lease_s = 0 for a single controller",
        )
    host = urllib.parse.urlsplit(storage.account_url).netloc or "account"
    scale_set_name = scale_set.url.rstrip("/").rsplit("/", 1)[-1] or "default"
    uri = f"abfss://{heartbeats.CONTAINER}@{host}/{scale_set_name}/"
    return open_lease_at(uri, storage, duration_s=duration_s)


def open_lease_at(uri: str, storage: StorageSettings, *, duration_s: float) -> BlobLease:
    """A lease under an ``abfss://<container>@<account>.dfs.core.windows.net/<prefix>`` URI."""
    where = datalake.AbfssPath.parse(uri)
    client = datalake.service_client(where, storage)
    prefix = where.path.rstrip("/") + "/" if where.path else ""
    container = client.get_container_client(where.filesystem)
    return BlobLease(container, name=f"{prefix}{LEASE_BLOB}", duration_s=duration_s, owner=client)

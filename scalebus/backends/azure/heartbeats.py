"""``BlobHeartbeatStore``: worker heartbeats as one small JSON blob per instance.

Each worker overwrites ``<prefix><instance id>.json``. The state is also written as blob metadata, so the
controller reads the whole fleet with one listing (``include=metadata``) instead of one GET per instance.
The controller's hint to the fleet (:class:`~scalebus.backends.base.FleetHint`) is one more small blob,
``<prefix>_fleet-hint`` (no ``.json`` suffix, so no instance's heartbeat can have its name), which the listing
skips; workers read it with one GET.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import structlog
from azure.storage.blob import ContainerClient, ContentSettings

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import _errors, _retry, datalake
from scalebus.settings import ScaleSetSettings, StorageSettings

log = structlog.get_logger(__name__)

CONTAINER = "scalebus-heartbeats"
"""Where :func:`open_heartbeats` keeps heartbeats (one prefix per scale set)."""
HINT_BLOB = "_fleet-hint"
"""The fleet hint's name under the prefix."""


class BlobHeartbeatStore:
    """``base.HeartbeatStore`` over one container and name prefix.

    ``owner`` is the account client the container client came from: the container client shares its transport
    and closing it releases nothing, so ``close`` closes the owner.
    """

    def __init__(self, container: ContainerClient, *, prefix: str = "", owner: Any = None) -> None:
        self._container = container
        self._prefix = prefix
        self._owner = owner

    def close(self) -> None:
        """Release the account client's connections; closing twice does nothing more."""
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.close()
        self._container.close()

    def beat(self, heartbeat: base.Heartbeat) -> None:
        self._upload(
            f"heartbeat {heartbeat.instance_id}",
            self._name(heartbeat.instance_id),
            _heartbeat_body(heartbeat),
            _heartbeat_metadata(heartbeat),
        )

    def publish_hint(self, hint: base.FleetHint) -> None:
        retire = hint.retire_instance_ids
        if retire is None:  # keep a rollout's list (one landing between this read and write is lost: rerun it)
            stored = self.read_hint()
            retire = stored.retire_instance_ids if stored is not None else None
        doc: dict[str, object] = {"idle_grace_s": hint.idle_grace_s, "at": hint.at}
        if retire is not None:
            doc["retire_instance_ids"] = list(retire)
        self._upload("fleet hint", self._hint_name, json.dumps(doc).encode(), {})

    def read_hint(self) -> base.FleetHint | None:
        blob = self._container.get_blob_client(self._hint_name)

        @_retry.retry_data_plane
        def download() -> bytes | None:
            try:
                with _errors.translated(_errors.STORAGE, what="read fleet hint"):
                    data: bytes = blob.download_blob().readall()
                    return data
            except errors.ObjectNotFoundError:
                return None  # no controller has published yet

        data = download()
        if data is None:
            return None
        try:
            raw = json.loads(data)
            retire = raw.get("retire_instance_ids")
            return base.FleetHint(
                idle_grace_s=float(raw["idle_grace_s"]),
                at=float(raw["at"]),
                retire_instance_ids=tuple(str(i) for i in retire) if isinstance(retire, list) else None,
            )
        except (ValueError, KeyError, TypeError):
            log.warning("fleet_hint.unreadable", blob=self._hint_name)
            return None

    def _upload(self, what: str, name: str, body: bytes, metadata: dict[str, str]) -> None:
        blob = self._container.get_blob_client(name)

        @_retry.retry_data_plane
        def upload() -> None:
            with _errors.translated(_errors.STORAGE, what=what):
                blob.upload_blob(
                    body,
                    overwrite=True,
                    metadata=metadata,
                    content_settings=ContentSettings(content_type="application/json"),
                )

        try:
            upload()
        except errors.ObjectNotFoundError:  # the first writer of a fleet creates the container
            self._create_container()
            upload()

    def read_all(self) -> list[base.Heartbeat]:
        @_retry.retry_data_plane
        def listing() -> list[Any]:
            try:
                with _errors.translated(_errors.STORAGE, what="list heartbeats"):
                    return list(
                        self._container.list_blobs(name_starts_with=self._prefix or None, include=["metadata"])
                    )
            except errors.ObjectNotFoundError:
                return []  # no worker has reported yet

        beats: list[base.Heartbeat] = []
        for blob in listing():
            if blob.name == self._hint_name:
                continue
            beat = _from_metadata(blob.metadata or {})
            if beat is None:
                log.warning("heartbeat.unreadable", blob=blob.name)
                continue
            beats.append(beat)
        return beats

    def forget(self, instance_id: str) -> None:
        blob = self._container.get_blob_client(self._name(instance_id))

        @_retry.retry_data_plane
        def delete() -> None:
            try:
                with _errors.translated(_errors.STORAGE, what=f"forget heartbeat {instance_id}"):
                    blob.delete_blob()
            except errors.ObjectNotFoundError:
                pass  # already gone: forgetting twice is fine

        delete()

    def _name(self, instance_id: str) -> str:
        return f"{self._prefix}{urllib.parse.quote(instance_id, safe='')}.json"

    @property
    def _hint_name(self) -> str:
        return f"{self._prefix}{HINT_BLOB}"

    def _create_container(self) -> None:
        try:
            with _errors.translated(_errors.STORAGE, what="create heartbeat container"):
                self._container.create_container()
        except errors.StorageError as exc:
            cause = exc.__cause__
            if getattr(cause, "status_code", None) != 409:  # 409: someone else created it first
                raise


def _heartbeat_body(heartbeat: base.Heartbeat) -> bytes:
    body = {
        "instance_id": heartbeat.instance_id,
        "state": heartbeat.state.value,
        "at": heartbeat.at,
        "job_id": heartbeat.job_id,
    }
    return json.dumps(body).encode()


def _heartbeat_metadata(heartbeat: base.Heartbeat) -> dict[str, str]:
    metadata = {
        "instance_id": urllib.parse.quote(heartbeat.instance_id, safe=""),
        "state": heartbeat.state.value,
        "at": repr(heartbeat.at),
    }
    if heartbeat.job_id:  # the service drops empty metadata values
        metadata["job_id"] = urllib.parse.quote(heartbeat.job_id, safe="")
    return metadata


def _from_metadata(metadata: dict[str, str]) -> base.Heartbeat | None:
    try:
        job_id = urllib.parse.unquote(metadata.get("job_id") or "")
        return base.Heartbeat(
            instance_id=urllib.parse.unquote(metadata["instance_id"]),
            state=base.WorkerState(metadata["state"]),
            at=float(metadata["at"]),
            job_id=job_id or None,
        )
    except (KeyError, ValueError):
        return None


def open_heartbeat_store(uri: str, settings: StorageSettings) -> BlobHeartbeatStore:
    """Heartbeats under an ``abfss://<container>@<account>.dfs.core.windows.net/<prefix>`` URI."""
    where = datalake.AbfssPath.parse(uri)
    client = datalake.service_client(where, settings)
    prefix = where.path.rstrip("/") + "/" if where.path else ""
    return BlobHeartbeatStore(client.get_container_client(where.filesystem), prefix=prefix, owner=client)


def open_heartbeats(storage: StorageSettings, scale_set: ScaleSetSettings) -> BlobHeartbeatStore:
    """The fleet's heartbeats: container :data:`CONTAINER` of the account ``storage.account_url`` names, one
    prefix per scale set (its name, the last segment of ``scale_set.url``)."""
    if not storage.account_url:
        raise errors.ConfigError(
            "storage.account_url",
            "heartbeats of a VM scale set fleet need a storage account",
            "set storage.account_url to the blob endpoint (https://<account>.blob.core.windows.net)",
        )
    host = urllib.parse.urlsplit(storage.account_url).netloc or "account"
    scale_set_name = scale_set.url.rstrip("/").rsplit("/", 1)[-1] or "default"
    uri = f"abfss://{CONTAINER}@{host}/{scale_set_name}/"
    return open_heartbeat_store(uri, storage)

"""``AdlsStore``: the object-store port over ADLS Gen2 (``abfss://<filesystem>@<account>.dfs.core.windows.net/<path>``).

Everything goes through the *blob* endpoint of the account (``azure-storage-blob``): on hierarchical-namespace
accounts it lists and reads the same paths as the DFS endpoint, and it is the only endpoint Azurite has (no DFS:
Azure/Azurite#409). Directory marker blobs (metadata ``hdi_isfolder=true``) are skipped. A file system is a
container; a path is a blob name.

Reads take the lean path of :mod:`scalebus.backends.azure._blobget` (one keep-alive connection per thread, the
body streamed through a fixed 1 MiB buffer, so one GET per file whatever its size), authenticated with the same
credential as the SDK client. Only when that path cannot be used (a proxy set in the environment) do reads go
through the SDK, which buffers at most :data:`GET_BYTES` per GET. Reads are conditional on the listed etag, so a
file rewritten during staging fails loudly instead of mixing versions. Listing and writes stay on the SDK.

Retries: the SDK's own retry policy is turned off (it would multiply with ours and ignores ``Retry-After``);
every SDK call is wrapped in ``_errors.translated`` and ``_retry.retry_data_plane`` (lean reads:
``_retry.retry_blob_get``). A download retried after a partial write rewinds its sink to where it started.
Secrets (SAS tokens, account keys, connection strings) are never logged: error messages carry the blob path,
not the URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import structlog
from azure.core import MatchConditions
from azure.storage.blob import BlobServiceClient, ContainerClient, ContentSettings

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import _blobget, _errors, _retry
from scalebus.settings import StorageSettings

log = structlog.get_logger(__name__)

SCHEME = "abfss"
GET_BYTES = 4 * 1024 * 1024
"""Largest single GET (first and later chunks): the memory one download in flight holds."""
PUT_BLOCK_BYTES = 4 * 1024 * 1024
"""Uploads above this go as blocks of this size."""
_LIST_PAGE = 5000
_FOLDER_MARKER = "hdi_isfolder"


@dataclass(frozen=True, slots=True)
class AbfssPath:
    """A parsed ``abfss://`` URI: ``filesystem`` (container), ``account``, ``host`` and blob-name ``path``."""

    filesystem: str
    account: str
    host: str
    path: str

    @classmethod
    def parse(cls, uri: str) -> AbfssPath:
        parts = urllib.parse.urlsplit(uri)
        filesystem, at, host = parts.netloc.partition("@")
        if parts.scheme != SCHEME or not at or not filesystem or "." not in host:
            raise errors.StorageError(
                f"{uri!r}: not an ADLS Gen2 URI (abfss://<filesystem>@<account>.dfs.core.windows.net/<path>)"
            )
        path = urllib.parse.unquote(parts.path).lstrip("/")
        return cls(filesystem=filesystem, account=host.split(".", 1)[0], host=host, path=path)

    @property
    def blob_endpoint(self) -> str:
        """``https://<account>.blob.<suffix>`` for the DFS host in the URI (also sovereign clouds)."""
        return "https://" + self.host.replace(".dfs.", ".blob.", 1)


def open_store(uri: str, settings: StorageSettings) -> AdlsStore:
    """The store for the account an ``abfss://`` URI names, authenticated as ``settings`` say."""
    client, auth = _connect(AbfssPath.parse(uri), settings)
    reader: _blobget.BlobReader | None = None
    endpoint = client.primary_endpoint.split("?", 1)[0]
    if auth is not None and not _blobget.proxy_configured(endpoint):
        reader = _blobget.BlobReader(endpoint, auth, ca_file=settings.connection_verify)
    return AdlsStore(client, reader=reader)


def service_client(where: AbfssPath, settings: StorageSettings) -> BlobServiceClient:
    """A blob client for the account: connection string / SAS from the named env var, else DefaultAzureCredential.

    ``settings.account_url`` (Azurite, proxies, sovereign clouds) overrides the endpoint in every case.
    """
    return _connect(where, settings)[0]


def _connect(where: AbfssPath, settings: StorageSettings) -> tuple[BlobServiceClient, _blobget.Auth | None]:
    """The SDK client, and its credential in the form the lean read path uses (None: reads stay on the SDK)."""
    options: dict[str, Any] = {
        "retry_total": 0,
        "max_single_get_size": GET_BYTES,
        "max_chunk_get_size": GET_BYTES,
        "max_single_put_size": PUT_BLOCK_BYTES,
        "max_block_size": PUT_BLOCK_BYTES,
    }
    if settings.connection_verify:
        options["connection_verify"] = settings.connection_verify
    account_url = settings.account_url.rstrip("/") or where.blob_endpoint
    if not settings.connection_string_env:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
        client = BlobServiceClient(account_url, credential=credential, **options)
        return client, _blobget.BearerAuth(credential)
    secret = os.environ.get(settings.connection_string_env, "").strip()
    if not secret:
        raise errors.ConfigError(
            "storage.connection_string_env",
            f"environment variable {settings.connection_string_env} is unset or empty",
            "export the connection string or SAS token there, or clear the setting to use managed identity",
        )
    fields = _connection_string_fields(secret)
    if not fields:  # a bare SAS token
        sas = secret.lstrip("?")
        return BlobServiceClient(account_url, credential=sas, **options), _blobget.SasAuth(sas)
    auth: _blobget.Auth | None = None
    if "SharedAccessSignature" in fields:
        auth = _blobget.SasAuth(fields["SharedAccessSignature"])
    elif "AccountName" in fields and "AccountKey" in fields:
        with contextlib.suppress(ValueError):
            auth = _blobget.SharedKeyAuth.from_base64(fields["AccountName"], fields["AccountKey"])
    if not settings.account_url:
        with _errors.translated(_errors.STORAGE, what="storage connection string"):
            try:
                return BlobServiceClient.from_connection_string(secret, **options), auth
            except ValueError:
                raise errors.ConfigError(
                    "storage.connection_string_env",
                    f"the value of {settings.connection_string_env} is not a valid connection string",
                    "copy it again from the portal (Access keys) or use a SAS token",
                ) from None
    if "SharedAccessSignature" in fields:
        return BlobServiceClient(account_url, credential=fields["SharedAccessSignature"], **options), auth
    if "AccountName" in fields and "AccountKey" in fields:
        key = {"account_name": fields["AccountName"], "account_key": fields["AccountKey"]}
        return BlobServiceClient(account_url, credential=key, **options), auth
    raise errors.ConfigError(
        "storage.connection_string_env",
        f"the connection string in {settings.connection_string_env} has no AccountKey or SharedAccessSignature",
        "use a connection string with a key or SAS, or a bare SAS token",
    )


def _connection_string_fields(secret: str) -> dict[str, str]:
    if "=" not in secret or ";" not in secret or secret.startswith(("?", "sv=", "se=", "sp=", "sig=")):
        return {}
    fields: dict[str, str] = {}
    for part in secret.split(";"):
        key, eq, value = part.partition("=")
        if eq:
            fields[key.strip()] = value.strip()
    return fields


class _CountingSink:
    """Counts what reaches the sink: the SDK reports the size it expected, not what the body held."""

    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink
        self.count = 0

    def write(self, data: bytes) -> int:
        self._sink.write(data)
        self.count += len(data)
        return len(data)

    def seekable(self) -> bool:
        return False


class AdlsStore:
    """``base.ObjectStore`` over one storage account's blob endpoint; reads go through ``reader`` when given."""

    def __init__(self, client: BlobServiceClient, *, reader: _blobget.BlobReader | None = None) -> None:
        self._client = client
        self._reader = reader

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._client.close()

    # ------------------------------------------------------------------------------------------ list

    def list_files(self, uri: str) -> Iterator[base.RemoteObject]:
        where = AbfssPath.parse(uri)
        prefix = where.path.rstrip("/")
        container = self._client.get_container_client(where.filesystem)
        base_uri = uri.rstrip("/") + "/"
        exact: base.RemoteObject | None = None
        found = False
        for blob in _list_blobs(container, prefix, what=f"list {where.filesystem}/{prefix}"):
            name: str = blob.name
            if (blob.metadata or {}).get(_FOLDER_MARKER) == "true":
                continue
            if prefix and name == prefix:
                exact = _remote(blob, uri=uri, rel_path=name.rsplit("/", 1)[-1])
                continue
            if prefix and not name.startswith(prefix + "/"):
                continue  # a sibling sharing the prefix ("data2" when listing "data")
            rel = name[len(prefix) + 1 :] if prefix else name
            found = True
            yield _remote(blob, uri=base_uri + urllib.parse.quote(rel), rel_path=rel)
        if not found:
            if exact is None:
                raise errors.ObjectNotFoundError(f"{uri}: not found")
            yield exact

    # ------------------------------------------------------------------------------------------ read

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        where = AbfssPath.parse(obj.uri)
        what = f"download {where.filesystem}/{where.path}"
        try:
            if self._reader is not None:
                return self._reader.read_into(
                    where.filesystem, where.path, sink, offset=offset, length=length, etag=obj.etag, what=what
                )
            return self._read_with_sdk(where, obj, sink, offset=offset, length=length, what=what)
        except errors.StorageError as exc:
            if getattr(exc.__cause__, "status_code", None) != 412:
                raise
            if not self.exists(obj.uri):  # Azurite answers a conditional GET of a missing blob with 412
                raise errors.ObjectNotFoundError(f"{what}: not found") from exc
            raise errors.StorageError(f"{what}: changed since it was listed (etag no longer matches)") from exc

    def _read_with_sdk(
        self,
        where: AbfssPath,
        obj: base.RemoteObject,
        sink: BinaryIO,
        *,
        offset: int,
        length: int | None,
        what: str,
    ) -> int:
        """Reads when the lean path cannot be used (a proxy in the environment, an unparsed credential)."""
        blob = self._client.get_blob_client(where.filesystem, where.path)
        try:
            start: int | None = sink.tell() if sink.seekable() else None
        except (AttributeError, OSError):
            start = None
        attempts = 0

        @_retry.retry_data_plane
        def download() -> int:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                if start is None:
                    raise errors.StorageError(f"{what}: failed part-way into a sink that cannot rewind")
                sink.seek(start)
            counting = _CountingSink(sink)
            with _errors.translated(_errors.STORAGE, what=what):
                stream = blob.download_blob(
                    offset=offset if (offset or length is not None) else None,
                    length=length,
                    max_concurrency=1,
                    etag=obj.etag,
                    match_condition=MatchConditions.IfNotModified,
                )
                stream.readinto(counting)  # type: ignore[arg-type]
            return counting.count

        got: int = download()
        return got

    # ------------------------------------------------------------------------------------------ write

    def write_file(self, source: Path, uri: str) -> None:
        where = AbfssPath.parse(uri)
        blob = self._client.get_blob_client(where.filesystem, where.path)
        what = f"upload {where.filesystem}/{where.path}"
        try:
            with source.open("rb") as fh:
                digest = hashlib.file_digest(fh, lambda: hashlib.md5(usedforsecurity=False)).digest()
            size = source.stat().st_size
        except OSError as exc:
            raise errors.StorageError(f"{source}: cannot read ({exc.strerror})") from exc

        @_retry.retry_data_plane
        def upload() -> None:
            with source.open("rb") as fh, _errors.translated(_errors.STORAGE, what=what):
                blob.upload_blob(
                    fh,
                    length=size,
                    overwrite=True,
                    max_concurrency=2,
                    content_settings=ContentSettings(content_md5=bytearray(digest)),
                )

        upload()

    def write_bytes(self, data: bytes, uri: str) -> None:
        where = AbfssPath.parse(uri)
        blob = self._client.get_blob_client(where.filesystem, where.path)
        digest = hashlib.md5(data, usedforsecurity=False).digest()

        @_retry.retry_data_plane
        def upload() -> None:
            with _errors.translated(_errors.STORAGE, what=f"upload {where.filesystem}/{where.path}"):
                blob.upload_blob(
                    data, overwrite=True, content_settings=ContentSettings(content_md5=bytearray(digest))
                )

        upload()

    def exists(self, uri: str) -> bool:
        where = AbfssPath.parse(uri)
        if not where.path:
            return False
        blob = self._client.get_blob_client(where.filesystem, where.path)

        @_retry.retry_data_plane
        def properties() -> bool:
            try:
                with _errors.translated(_errors.STORAGE, what=f"properties {where.filesystem}/{where.path}"):
                    props = blob.get_blob_properties()
            except errors.ObjectNotFoundError:
                return False
            return (props.metadata or {}).get(_FOLDER_MARKER) != "true"

        found: bool = properties()
        return found


def _list_blobs(container: ContainerClient, prefix: str, *, what: str) -> Iterator[Any]:
    """Every blob under ``prefix``, page by page; a page that fails transiently is fetched again."""
    token: str | None = None

    @_retry.retry_data_plane
    def page(continuation: str | None) -> tuple[list[Any], str | None]:
        with _errors.translated(_errors.STORAGE, what=what):
            pages: Any = container.list_blobs(
                name_starts_with=prefix or None, include=["metadata"], results_per_page=_LIST_PAGE
            ).by_page(continuation_token=continuation)
            items = list(next(pages))
            return items, pages.continuation_token

    while True:
        items, token = page(token)
        yield from items
        if not token:
            return


def _remote(blob: Any, *, uri: str, rel_path: str) -> base.RemoteObject:
    md5 = blob.content_settings.content_md5 if blob.content_settings else None
    return base.RemoteObject(
        uri=uri,
        rel_path=rel_path,
        size=int(blob.size),
        etag=str(blob.etag),
        content_md5=bytes(md5) if md5 else None,
    )

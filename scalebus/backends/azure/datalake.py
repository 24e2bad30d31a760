"""``AdlsStore``: the object-store port over ADLS Gen2 (``abfss://<filesystem>@<account>.dfs.core.windows.net/<path>``).

Everything goes through the *blob* endpoint of the account (``azure-storage-blob``): on hierarchical-namespace
accounts it lists and reads the same paths as the DFS endpoint, and it is the only endpoint Azurite has (no DFS:
Azure/Azurite#409). Directory marker blobs (metadata ``hdi_isfolder=true``) are skipped. A file system is a
container; a path is a blob name. Besides the flat recursive listing, :meth:`AdlsStore.list_level` lists one
folder level (List Blobs with ``delimiter=/``; sub-folders come back as ``BlobPrefix`` entries), so a staging can
list many folders at once instead of walking a million names through one serial chain of pages.

Listing and reads take the lean path of :mod:`scalebus.backends.azure._blobget` (List Blobs parsed for the few
fields staging needs; one keep-alive connection per thread, the body streamed through a fixed 1 MiB buffer, so one
GET per file whatever its size), authenticated with the same credential as the SDK client. Only when that path
cannot be used (a proxy set in the environment) do listing and reads go through the SDK, which buffers at most
:data:`GET_BYTES` per GET. Reads are conditional on the listed etag, so a file rewritten during staging fails
loudly instead of mixing versions. Writes and existence checks stay on the SDK.

The SDK client is built on first use: a one-shot ``scalebus stage`` authenticated by key or SAS never imports
``azure.storage.blob`` (a fifth of a second of start-up, measured with ``-X importtime``).

Server-side copies (:meth:`AdlsStore.copy_from_url`, used by ingest from S3) have the service read the source
through a URL (Put Block From URL); Azurite 3.35 does not implement it (``501 APINotImplemented``), so the caller
streams instead.

Retries: the SDK's own retry policy is turned off (it would multiply with ours and ignores ``Retry-After``);
every SDK call is wrapped in ``_errors.translated`` and ``_retry.retry_data_plane`` (lean reads:
``_retry.retry_blob_get``). A download retried after a partial write rewinds its sink to where it started.
Secrets (SAS tokens, account keys, connection strings) are never logged: error messages carry the blob path,
not the URL.
"""

from __future__ import annotations

import base64
import contextlib
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import structlog

from scalebus import checksums, errors, uris
from scalebus.backends import base
from scalebus.backends.azure import _blobget, _errors, _retry
from scalebus.settings import StorageSettings

if TYPE_CHECKING:
    from azure.storage.blob import BlobServiceClient, ContainerClient

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
        filesystem, host, path = uris.split_abfss(uri)
        return cls(filesystem=filesystem, account=host.split(".", 1)[0], host=host, path=path)

    @property
    def blob_endpoint(self) -> str:
        """``https://<account>.blob.<suffix>`` for the DFS host in the URI (also sovereign clouds)."""
        return "https://" + self.host.replace(".dfs.", ".blob.", 1)


@dataclass(frozen=True, slots=True)
class _Account:
    """How to reach an account: its blob endpoint, the credential as the lean path uses it (None: the lean path
    cannot), and how to build the SDK client (called once, on first use)."""

    endpoint: str
    auth: _blobget.Auth | None
    make_client: Callable[[], BlobServiceClient]


def open_store(uri: str, settings: StorageSettings) -> AdlsStore:
    """The store for the account an ``abfss://`` URI names, authenticated as ``settings`` say."""
    account = _connect(AbfssPath.parse(uri), settings)
    reader: _blobget.BlobReader | None = None
    if account.auth is not None and not _blobget.proxy_configured(account.endpoint):
        reader = _blobget.BlobReader(account.endpoint, account.auth, ca_file=settings.connection_verify)
    return AdlsStore(account.make_client, reader=reader)


def service_client(where: AbfssPath, settings: StorageSettings) -> BlobServiceClient:
    """A blob client for the account: connection string / SAS from the named env var, else DefaultAzureCredential.

    ``settings.account_url`` (Azurite, proxies, sovereign clouds) overrides the endpoint in every case.
    """
    return _connect(where, settings).make_client()


def _connect(where: AbfssPath, settings: StorageSettings) -> _Account:
    """Endpoint, lean-path credential and SDK client factory for the account, as ``settings`` say."""
    account_url = settings.account_url.rstrip("/") or where.blob_endpoint
    if not settings.connection_string_env:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
        return _Account(
            account_url, _blobget.BearerAuth(credential), _client_factory(account_url, credential, settings)
        )
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
        return _Account(account_url, _blobget.SasAuth(sas), _client_factory(account_url, sas, settings))
    auth: _blobget.Auth | None = None
    if "SharedAccessSignature" in fields:
        auth = _blobget.SasAuth(fields["SharedAccessSignature"])
    elif "AccountName" in fields and "AccountKey" in fields:
        with contextlib.suppress(ValueError):
            auth = _blobget.SharedKeyAuth.from_base64(fields["AccountName"], fields["AccountKey"])
    if not settings.account_url:
        return _from_connection_string(secret, fields, auth, settings)
    if "SharedAccessSignature" in fields:
        return _Account(account_url, auth, _client_factory(account_url, fields["SharedAccessSignature"], settings))
    if "AccountName" in fields and "AccountKey" in fields:
        key = {"account_name": fields["AccountName"], "account_key": fields["AccountKey"]}
        return _Account(account_url, auth, _client_factory(account_url, key, settings))
    raise errors.ConfigError(
        "storage.connection_string_env",
        f"the connection string in {settings.connection_string_env} has no AccountKey or SharedAccessSignature",
        "use a connection string with a key or SAS, or a bare SAS token",
    )


def _sdk_options(settings: StorageSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "retry_total": 0,
        "max_single_get_size": GET_BYTES,
        "max_chunk_get_size": GET_BYTES,
        "max_single_put_size": PUT_BLOCK_BYTES,
        "max_block_size": PUT_BLOCK_BYTES,
    }
    if settings.connection_verify:
        options["connection_verify"] = settings.connection_verify
    return options


def _client_factory(
    account_url: str, credential: Any, settings: StorageSettings
) -> Callable[[], BlobServiceClient]:
    def make() -> BlobServiceClient:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient(account_url, credential=credential, **_sdk_options(settings))

    return make


def _from_connection_string(
    secret: str, fields: dict[str, str], auth: _blobget.Auth | None, settings: StorageSettings
) -> _Account:
    """The account a full connection string names. When the lean path has all it needs the SDK waits for first
    use; otherwise the SDK parses (and so validates) the string now."""

    def make() -> BlobServiceClient:
        from azure.storage.blob import BlobServiceClient

        with _errors.translated(_errors.STORAGE, what="storage connection string"):
            try:
                return BlobServiceClient.from_connection_string(secret, **_sdk_options(settings))
            except ValueError:
                raise errors.ConfigError(
                    "storage.connection_string_env",
                    f"the value of {settings.connection_string_env} is not a valid connection string",
                    "copy it again from the portal (Access keys) or use a SAS token",
                ) from None

    endpoint = _blob_endpoint(fields)
    if endpoint is None or auth is None:
        client = make()
        return _Account(client.primary_endpoint.split("?", 1)[0], auth, lambda: client)
    return _Account(endpoint, auth, make)


def _blob_endpoint(fields: dict[str, str]) -> str | None:
    """The blob endpoint a connection string names (``BlobEndpoint``, else account and suffix), as the SDK does."""
    if fields.get("BlobEndpoint"):
        return fields["BlobEndpoint"].rstrip("/")
    if fields.get("AccountName") and "UseDevelopmentStorage" not in fields:
        protocol = fields.get("DefaultEndpointsProtocol") or "https"
        suffix = fields.get("EndpointSuffix") or "core.windows.net"
        return f"{protocol}://{fields['AccountName']}.blob.{suffix}"
    return None


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
    """``base.ObjectStore`` and ``base.FolderLister`` over one storage account's blob endpoint; listing and reads
    go through ``reader`` when given. ``make_client`` builds the SDK client, once, when something first needs
    it."""

    def __init__(
        self, make_client: Callable[[], BlobServiceClient], *, reader: _blobget.BlobReader | None = None
    ) -> None:
        self._make_client = make_client
        self._sdk: BlobServiceClient | None = None
        self._sdk_lock = threading.Lock()
        self._reader = reader

    @property
    def _client(self) -> BlobServiceClient:
        with self._sdk_lock:
            if self._sdk is None:
                self._sdk = self._make_client()
            return self._sdk

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        with self._sdk_lock:
            if self._sdk is not None:
                self._sdk.close()

    # ------------------------------------------------------------------------------------------ list

    def list_files(self, uri: str) -> Iterator[base.RemoteObject]:
        where = AbfssPath.parse(uri)
        prefix = where.path.rstrip("/")
        base_uri = uri.rstrip("/") + "/"
        exact: base.RemoteObject | None = None
        found = False
        for blob in self._listed(where.filesystem, prefix):
            name = blob.name
            if blob.is_folder:
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

    def list_level(self, uri: str, rel_prefix: str = "") -> Iterator[base.RemoteObject | base.SubFolder]:
        """One folder level, page by page: List Blobs with ``prefix=<folder>/`` and ``delimiter=/`` (REST "List
        Blobs", https://learn.microsoft.com/rest/api/storageservices/list-blobs: names going on past the
        delimiter come back once as a ``BlobPrefix``; ``NextMarker`` continues). A trailing ``/`` on ``uri`` is
        its folder's, not part of a name, so a folder of an empty name (``a//b``) keeps its own. Markers are
        skipped as in ``list_files``, but count as something there: a sub-folder holding only empty directories
        lists as empty, not as missing. Only at the top of a walk (``rel_prefix`` empty) may ``uri`` name a
        file; a folder with anything below it wins over a blob of the same name, as in ``list_files``."""
        where = AbfssPath.parse(uri)
        folder = where.path[:-1] if where.path.endswith("/") else where.path
        prefix = folder + "/" if folder else ""
        folder_uri = uri if uri.endswith("/") else uri + "/"
        anything = False
        for page in self._pages(where.filesystem, prefix, delimiter="/"):
            anything = anything or bool(page.blobs or page.prefixes)
            yield from level_entries(page, prefix=prefix, folder_uri=folder_uri, rel_prefix=rel_prefix)
        if anything:
            return
        exact = self._exact_blob(where.filesystem, folder) if folder and not rel_prefix else None
        if exact is None:
            raise errors.ObjectNotFoundError(f"{uri}: not found")
        yield _remote(exact, uri=uri, rel_path=folder.rsplit("/", 1)[-1])

    def _exact_blob(self, filesystem: str, name: str) -> _blobget.ListedBlob | None:
        """The file blob named ``name``, if there is one: the first name listed under prefix ``name``, since a
        name sorts before every longer name it begins."""
        first = next(self._pages(filesystem, name, max_results=1), None)
        blob = first.blobs[0] if first is not None and first.blobs else None
        return blob if blob is not None and blob.name == name and not blob.is_folder else None

    def _listed(self, filesystem: str, prefix: str) -> Iterator[_blobget.ListedBlob]:
        for page in self._pages(filesystem, prefix):
            yield from page.blobs

    def _pages(
        self, filesystem: str, prefix: str, *, delimiter: str = "", max_results: int | None = None
    ) -> Iterator[_blobget.BlobPage]:
        """List Blobs pages under ``prefix`` (flat, or one level with ``delimiter``), each fetched when the
        previous one has been consumed."""
        what = f"list {filesystem}/{prefix}"
        per_page = max_results or _LIST_PAGE
        if self._reader is None:
            container = self._client.get_container_client(filesystem)
            yield from _sdk_pages(container, prefix, delimiter=delimiter, max_results=per_page, what=what)
            return
        marker = ""
        while True:
            page = self._reader.list_page(
                filesystem, prefix, marker, max_results=per_page, delimiter=delimiter, what=what
            )
            yield page
            marker = page.next_marker
            if not marker:
                return

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
        from azure.core import MatchConditions

        blob = self._client.get_blob_client(where.filesystem, where.path)
        start = _blobget.rewind_point(sink)
        attempts = 0

        @_retry.retry_data_plane
        def download() -> int:
            nonlocal attempts
            attempts += 1
            _blobget.rewind_for_retry(sink, start, attempt=attempts, what=what)
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
        from azure.storage.blob import ContentSettings

        where = AbfssPath.parse(uri)
        blob = self._client.get_blob_client(where.filesystem, where.path)
        what = f"upload {where.filesystem}/{where.path}"
        try:
            digest = checksums.file_md5(source)
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
        from azure.storage.blob import ContentSettings

        where = AbfssPath.parse(uri)
        blob = self._client.get_blob_client(where.filesystem, where.path)
        digest = checksums.bytes_md5(data)

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

    # ------------------------------------------------------------------------------------------ copy from URL

    def copy_from_url(self, url: str, uri: str, *, size: int, content_md5: bytes | None) -> bool:
        """Have the service read ``size`` bytes from ``url`` into ``uri`` (Put Block From URL, then Put Block
        List): the bytes never pass through this machine. With ``content_md5`` the object goes as one block whose
        MD5 the service checks as it reads (``IntegrityError`` when it differs). ``False`` when the service
        cannot (not implemented, as in Azurite, or it cannot reach the URL): nothing was committed."""
        from azure.storage.blob import BlobBlock, ContentSettings

        where = AbfssPath.parse(uri)
        blob = self._client.get_blob_client(where.filesystem, where.path)
        what = f"copy from URL to {where.filesystem}/{where.path}"
        blocks = from_url_blocks(size, block_bytes=size if content_md5 is not None else FROM_URL_BLOCK_BYTES)
        try:
            for block_id, offset, length in blocks:
                _stage_from_url(blob, block_id, url, offset, length, content_md5=content_md5, what=what)
        except errors.StorageError as exc:
            code = str(getattr(exc.__cause__, "error_code", None) or "")
            if getattr(exc.__cause__, "status_code", None) == 501 or code in _FROM_URL_UNAVAILABLE:
                log.info("adls.copy_from_url_unavailable", blob=f"{where.filesystem}/{where.path}", code=code)
                return False
            if code == "Md5Mismatch":
                raise errors.IntegrityError(f"{what}: the source's bytes do not match its MD5") from exc
            raise
        settings = ContentSettings(content_md5=bytearray(content_md5)) if content_md5 is not None else None

        @_retry.retry_data_plane
        def commit() -> None:
            with _errors.translated(_errors.STORAGE, what=what):
                blob.commit_block_list(
                    [BlobBlock(block_id) for block_id, _, _ in blocks], content_settings=settings
                )

        commit()
        return True


def level_entries(
    page: _blobget.BlobPage, *, prefix: str, folder_uri: str, rel_prefix: str
) -> Iterator[base.RemoteObject | base.SubFolder]:
    """The files and sub-folders of one List Blobs page of folder ``prefix`` (listed with ``delimiter=/``),
    markers skipped; names are relative to ``prefix``, URIs to ``folder_uri`` (which ends in ``/``)."""
    for blob in page.blobs:
        if blob.is_folder or not blob.name.startswith(prefix):
            continue
        rel = blob.name[len(prefix) :]
        yield _remote(blob, uri=folder_uri + urllib.parse.quote(rel), rel_path=rel_prefix + rel)
    for name in page.prefixes:
        if not name.startswith(prefix) or len(name) <= len(prefix):
            continue
        rel = name[len(prefix) :]
        yield base.SubFolder(uri=folder_uri + urllib.parse.quote(rel), rel_prefix=rel_prefix + rel)


def _sdk_pages(
    container: ContainerClient, prefix: str, *, delimiter: str, max_results: int, what: str
) -> Iterator[_blobget.BlobPage]:
    """List Blobs pages under ``prefix`` through the SDK (``walk_blobs`` for one level); a page failing
    transiently is fetched again."""
    from azure.storage.blob import BlobPrefix

    token: str | None = None

    @_retry.retry_data_plane
    def page(continuation: str | None) -> tuple[list[Any], str | None]:
        with _errors.translated(_errors.STORAGE, what=what):
            options: dict[str, Any] = {"include": ["metadata"], "results_per_page": max_results}
            listing: Any = (
                container.walk_blobs(prefix or None, delimiter=delimiter, **options)
                if delimiter
                else container.list_blobs(prefix or None, **options)
            )
            pages: Any = listing.by_page(continuation_token=continuation)
            items = list(next(pages))
            return items, pages.continuation_token

    while True:
        items, token = page(token)
        prefixes = tuple(str(item.name) for item in items if isinstance(item, BlobPrefix))
        blobs = [_listed_blob(item) for item in items if not isinstance(item, BlobPrefix)]
        yield _blobget.BlobPage(blobs, token or "", prefixes)
        if not token:
            return


def _listed_blob(blob: Any) -> _blobget.ListedBlob:
    md5 = blob.content_settings.content_md5 if blob.content_settings else None
    return _blobget.ListedBlob(
        name=blob.name,
        size=int(blob.size),
        etag=str(blob.etag),
        content_md5=bytes(md5) if md5 else None,
        is_folder=(blob.metadata or {}).get(_FOLDER_MARKER) == "true",
    )


FROM_URL_BLOCK_BYTES = 100 * 1024 * 1024
"""Block size of server-side copies: the largest block Put Block From URL takes in every service version
(https://learn.microsoft.com/rest/api/storageservices/put-block-from-url)."""
_FROM_URL_UNAVAILABLE = frozenset({"APINotImplemented", "NotImplemented", "CannotVerifyCopySource"})
"""Error codes meaning the service will not copy from this URL (Azurite; a source it cannot reach)."""


def from_url_blocks(size: int, *, block_bytes: int) -> list[tuple[str, int, int]]:
    """``(block id, offset, length)`` covering ``size`` bytes in blocks of at most ``block_bytes`` (ids of equal
    length, as Put Block requires)."""
    step = max(1, block_bytes)
    return [
        (base64.b64encode(f"{i:08d}".encode()).decode(), offset, min(step, size - offset))
        for i, offset in enumerate(range(0, size, step))
    ]


def _stage_from_url(
    blob: Any, block_id: str, url: str, offset: int, length: int, *, content_md5: bytes | None, what: str
) -> None:
    @_retry.retry_data_plane
    def stage() -> None:
        with _errors.translated(_errors.STORAGE, what=what):
            blob.stage_block_from_url(
                block_id,
                url,
                source_offset=offset,
                source_length=length,
                source_content_md5=bytearray(content_md5) if content_md5 is not None else None,
            )

    stage()


def _remote(blob: _blobget.ListedBlob, *, uri: str, rel_path: str) -> base.RemoteObject:
    return base.RemoteObject(
        uri=uri, rel_path=rel_path, size=blob.size, etag=blob.etag, content_md5=blob.content_md5
    )

"""The lean blob path: the Shared Key signer, SAS and bearer auth, error mapping, List Blobs parsing, and its
behaviour against Azurite (which checks Shared Key signatures and SAS the way the service does)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import _blobget, _retry, datalake
from tests.fakes.azurite_plugin import ACCOUNT, ACCOUNT_KEY, AzuriteServer

# ------------------------------------------------------------------------------------------------ signer


def test_string_to_sign_follows_the_documented_layout() -> None:
    """The Blob service layout from "Authorize with Shared Key": verb, eleven standard headers (a zero
    Content-Length signs as empty), the x-ms- headers lower-cased and sorted, then the canonical resource with
    query parameters as sorted ``name:value`` lines (names lower-cased, values decoded)."""
    headers = {
        "X-MS-Version": "2021-08-06",
        "x-ms-date": "Fri, 26 Jun 2015 23:39:12 GMT",
        "x-ms-range": "bytes=0-99",
        "If-Match": '"0x8D1"',
        "Content-Length": "0",
        "Accept": "ignored",
    }
    query = {"restype": "container", "Comp": "metadata", "prefix": "a%2Fb"}
    assert _blobget.string_to_sign("get", "/myaccount/mycontainer", query, headers, "myaccount") == (
        "GET\n"
        "\n\n\n\n\n\n\n"  # Content-Encoding, -Language, -Length (0: empty), -MD5, -Type, Date, If-Modified-Since
        '"0x8D1"\n'  # If-Match
        "\n\n\n"  # If-None-Match, If-Unmodified-Since, Range
        "x-ms-date:Fri, 26 Jun 2015 23:39:12 GMT\n"
        "x-ms-range:bytes=0-99\n"
        "x-ms-version:2021-08-06\n"
        "/myaccount/myaccount/mycontainer\n"
        "comp:metadata\n"
        "prefix:a/b\n"
        "restype:container"
    )


def test_shared_key_header_is_the_hmac_of_the_string_to_sign() -> None:
    auth = _blobget.SharedKeyAuth.from_base64(ACCOUNT, ACCOUNT_KEY)
    headers = {"x-ms-date": "Wed, 25 Nov 2026 10:00:00 GMT", "x-ms-version": "2021-08-06"}
    assert auth.authorize("GET", "/devstoreaccount1/c/b", headers, {}) == ""
    expected = hmac.new(
        base64.b64decode(ACCOUNT_KEY),
        _blobget.string_to_sign("GET", "/devstoreaccount1/c/b", {}, headers, ACCOUNT).encode(),
        hashlib.sha256,
    ).digest()
    assert headers["Authorization"] == f"SharedKey {ACCOUNT}:{base64.b64encode(expected).decode()}"


# ------------------------------------------------------------------------------------------------ bearer


@dataclass
class Token:
    token: str
    expires_on: int


class CountingCredential:
    """A credential as azure-identity shapes it: ``get_token(scope) -> (token, expires_on)``."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str) -> Token:
        self.scopes.append(scopes)
        return Token(f"token-{len(self.scopes)}", expires_on=1_000 * len(self.scopes) + 1_000)


def test_bearer_token_is_reused_until_near_expiry() -> None:
    now = [0.0]
    credential = CountingCredential()
    auth = _blobget.BearerAuth(credential, clock=lambda: now[0])
    seen = []
    for t in (0.0, 500.0, 699.0, 701.0, 702.0):  # token-1 expires at 2000; refreshed 300 s before
        now[0] = t + 1_000
        headers: dict[str, str] = {}
        assert auth.authorize("GET", "/c/b", headers, {}) == ""
        seen.append(headers["Authorization"])
    assert seen == ["Bearer token-1"] * 3 + ["Bearer token-2"] * 2
    assert credential.scopes == [("https://storage.azure.com/.default",)] * 2


def test_a_credential_that_fails_is_a_storage_error() -> None:
    class Broken:
        def get_token(self, *scopes: str) -> Token:
            raise RuntimeError("no identity here")

    with pytest.raises(errors.StorageError, match="cannot get a storage token"):
        _blobget.BearerAuth(Broken()).authorize("GET", "/c/b", {}, {})


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("status", "headers", "kind", "retry_after_s"),
    [
        (503, {"x-ms-error-code": "ServerBusy", "retry-after": "2"}, errors.TransientStorageError, 2.0),
        (503, {"x-ms-retry-after-ms": "250", "retry-after": "1"}, errors.TransientStorageError, 0.25),
        (500, {}, errors.TransientStorageError, None),
        (404, {"x-ms-error-code": "BlobNotFound"}, errors.ObjectNotFoundError, None),
        (403, {"x-ms-error-code": "AuthenticationFailed"}, errors.StorageError, None),
        (412, {"x-ms-error-code": "ConditionNotMet"}, errors.StorageError, None),
    ],
    ids=["503-retry-after", "503-retry-after-ms", "500", "404", "403", "412"],
)
def test_http_errors_map_to_storage_errors(
    status: int, headers: dict[str, str], kind: type[errors.StorageError], retry_after_s: float | None
) -> None:
    error = _blobget._status_error(status, "Reason", _blobget._Headers(headers), what="download c/b")
    assert type(error) is kind
    assert getattr(error, "retry_after_s", None) == retry_after_s
    assert isinstance(error.__cause__, _blobget.BlobStatusError)
    assert error.__cause__.status_code == status


def test_the_lean_path_is_off_when_a_proxy_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert not _blobget.proxy_configured("https://acc.blob.core.windows.net")
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert _blobget.proxy_configured("https://acc.blob.core.windows.net")
    monkeypatch.setenv("no_proxy", ".core.windows.net")
    assert not _blobget.proxy_configured("https://acc.blob.core.windows.net")


# ------------------------------------------------------------------------------------------------ Azurite

pytest_azurite = pytest.mark.azurite
NAME = "dir with space/ü+%.bin"
DATA = os.urandom(300_000)


@dataclass
class Blob:
    container: str
    etag: str


@pytest.fixture
def blob(azurite_env: AzuriteServer) -> Blob:
    from azure.storage.blob import BlobServiceClient

    container = azurite_env.new_container()
    with BlobServiceClient.from_connection_string(azurite_env.connection_string()) as client:
        props = client.get_blob_client(container, NAME).upload_blob(DATA)
    return Blob(container, str(props["etag"]))


@pytest.fixture
def reader_for(azurite_env: AzuriteServer) -> Iterator[type[_blobget.BlobReader]]:
    opened: list[_blobget.BlobReader] = []

    class Reader(_blobget.BlobReader):
        def __init__(self, endpoint: str, auth: _blobget.Auth, *, ca_file: str = "") -> None:
            super().__init__(endpoint, auth, ca_file=ca_file)
            opened.append(self)

    yield Reader
    for reader in opened:
        reader.close()


def read(reader: _blobget.BlobReader, blob: Blob, sink: BinaryIO | None = None, **kwargs: int | None) -> bytes:
    sink = sink or io.BytesIO()
    offset = kwargs.pop("offset", None) or 0
    got = reader.read_into(blob.container, NAME, sink, offset=offset, etag=blob.etag, what="t", **kwargs)
    assert isinstance(sink, io.BytesIO)
    assert got == len(sink.getvalue())
    return sink.getvalue()


@pytest_azurite
def test_azurite_accepts_the_shared_key_signature(
    azurite_env: AzuriteServer, blob: Blob, reader_for: type[_blobget.BlobReader]
) -> None:
    reader = reader_for(azurite_env.blob_url, _blobget.SharedKeyAuth.from_base64(ACCOUNT, ACCOUNT_KEY))
    assert read(reader, blob, length=None) == DATA
    assert read(reader, blob, offset=123_456, length=1000) == DATA[123_456:124_456]
    assert read(reader, blob, offset=299_000, length=None) == DATA[299_000:]


@pytest_azurite
def test_a_wrong_key_is_refused_and_not_retried(
    azurite_env: AzuriteServer, blob: Blob, reader_for: type[_blobget.BlobReader]
) -> None:
    wrong = base64.b64encode(b"not the key" * 6).decode()
    reader = reader_for(azurite_env.blob_url, _blobget.SharedKeyAuth.from_base64(ACCOUNT, wrong))
    before = _retry.RETRY_COUNTS.get("blob_get", 0)
    with pytest.raises(errors.StorageError, match="authentication failed"):
        read(reader, blob, length=None)
    assert _retry.RETRY_COUNTS.get("blob_get", 0) == before


@pytest_azurite
def test_azurite_accepts_a_sas(
    azurite_env: AzuriteServer, blob: Blob, reader_for: type[_blobget.BlobReader]
) -> None:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    sas = generate_container_sas(
        ACCOUNT,
        blob.container,
        account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(read=True),
        expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1),
    )
    reader = reader_for(azurite_env.blob_url, _blobget.SasAuth("?" + sas))
    assert read(reader, blob, offset=10, length=20) == DATA[10:30]


@pytest_azurite
def test_a_changed_etag_is_refused(
    azurite_env: AzuriteServer, blob: Blob, reader_for: type[_blobget.BlobReader]
) -> None:
    reader = reader_for(azurite_env.blob_url, _blobget.SharedKeyAuth.from_base64(ACCOUNT, ACCOUNT_KEY))
    stale = Blob(blob.container, '"0x8DEADBEEF"')
    with pytest.raises(errors.StorageError) as caught:
        read(reader, stale, length=None)
    assert getattr(caught.value.__cause__, "status_code", None) == 412
    assert read(reader, blob, length=10) == DATA[:10]  # the connection is still usable after an error answer


@pytest_azurite
def test_a_failing_sink_is_not_retried_as_a_network_error(
    azurite_env: AzuriteServer, blob: Blob, reader_for: type[_blobget.BlobReader]
) -> None:
    class FullDisk(io.BytesIO):
        def write(self, data: object) -> int:
            raise OSError(28, "No space left on device")

    reader = reader_for(azurite_env.blob_url, _blobget.SharedKeyAuth.from_base64(ACCOUNT, ACCOUNT_KEY))
    before = _retry.RETRY_COUNTS.get("blob_get", 0)
    with pytest.raises(OSError, match="No space left"):
        reader.read_into(blob.container, NAME, FullDisk(), offset=0, length=None, etag=blob.etag, what="t")
    assert _retry.RETRY_COUNTS.get("blob_get", 0) == before
    assert read(reader, blob, length=5) == DATA[:5]


@pytest_azurite
def test_without_a_reader_the_store_reads_through_the_sdk(azurite_env: AzuriteServer, blob: Blob) -> None:
    """The fallback (a proxy in the environment): same results, same change detection."""
    uri = f"abfss://{blob.container}@{ACCOUNT}.dfs.core.windows.net/{NAME}"
    settings = azurite_env.storage_settings()
    store = datalake.AdlsStore(lambda: datalake.service_client(datalake.AbfssPath.parse(uri), settings))
    try:
        (obj,) = store.list_files(uri)
        sink = io.BytesIO()
        assert store.read_into(obj, sink, offset=100, length=50) == 50
        assert sink.getvalue() == DATA[100:150]
        with pytest.raises(errors.StorageError, match="changed since"):
            store.read_into(base.RemoteObject(obj.uri, obj.rel_path, obj.size, '"0x8DEADBEEF"'), io.BytesIO())
    finally:
        store.close()


LISTED = {
    "lake/a.txt": b"alpha",
    "lake/sub dir/b%25.bin": b"b" * 1000,
    "lake/sub dir/\u00e9t\u00e9 & <x>.txt": b"unicode and XML metacharacters",
    "lake/deep/1/2/3/c": b"",
    "lakeside/not-under-lake": b"sibling",
}


@pytest.fixture
def listed_container(azurite_env: AzuriteServer) -> str:
    from azure.storage.blob import BlobServiceClient

    container = azurite_env.new_container()
    with BlobServiceClient.from_connection_string(azurite_env.connection_string()) as client:
        for name, data in LISTED.items():
            client.get_blob_client(container, name).upload_blob(data)
        client.get_blob_client(container, "lake/sub dir").upload_blob(b"", metadata={"hdi_isfolder": "true"})
    return container


def sdk_listing(azurite_env: AzuriteServer, container: str, prefix: str) -> list[_blobget.ListedBlob]:
    from azure.storage.blob import BlobServiceClient

    with BlobServiceClient.from_connection_string(azurite_env.connection_string()) as client:
        return [
            _blobget.ListedBlob(
                name=blob.name,
                size=blob.size,
                etag=str(blob.etag),
                content_md5=bytes(blob.content_settings.content_md5 or b"") or None,
                is_folder=(blob.metadata or {}).get("hdi_isfolder") == "true",
            )
            for blob in client.get_container_client(container).list_blobs(
                name_starts_with=prefix, include=["metadata"]
            )
        ]


@pytest_azurite
@pytest.mark.parametrize("page_size", [2, 5000], ids=["paged", "one-page"])
def test_the_lean_listing_matches_the_sdks(
    azurite_env: AzuriteServer, listed_container: str, reader_for: type[_blobget.BlobReader], page_size: int
) -> None:
    reader = reader_for(azurite_env.blob_url, _blobget.SharedKeyAuth.from_base64(ACCOUNT, ACCOUNT_KEY))
    lean: list[_blobget.ListedBlob] = []
    marker, pages = "", 0
    while True:
        page = reader.list_page(listed_container, "lake", marker, max_results=page_size, what="t")
        lean += page.blobs
        pages += 1
        marker = page.next_marker
        if not marker:
            break
    expected = sdk_listing(azurite_env, listed_container, "lake")
    assert lean == expected
    assert pages == (3 if page_size == 2 else 1)
    assert {blob.name for blob in lean} == set(LISTED) | {"lake/sub dir"}
    assert [blob.name for blob in lean if blob.is_folder] == ["lake/sub dir"]
    assert next(b for b in lean if b.name == "lake/a.txt").content_md5 == hashlib.md5(b"alpha").digest()


@pytest_azurite
def test_a_listing_through_a_sas_is_signed_with_its_own_query(
    azurite_env: AzuriteServer, listed_container: str, reader_for: type[_blobget.BlobReader]
) -> None:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    sas = generate_container_sas(
        ACCOUNT,
        listed_container,
        account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(read=True, list=True),
        expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1),
    )
    reader = reader_for(azurite_env.blob_url, _blobget.SasAuth(sas))
    page = reader.list_page(listed_container, "lake/sub dir/", "", max_results=10, what="t")
    assert sorted(blob.name for blob in page.blobs) == sorted(n for n in LISTED if n.startswith("lake/sub dir/"))


@pytest_azurite
def test_a_listing_with_a_wrong_key_is_refused(
    azurite_env: AzuriteServer, listed_container: str, reader_for: type[_blobget.BlobReader]
) -> None:
    wrong = base64.b64encode(b"not the key" * 6).decode()
    reader = reader_for(azurite_env.blob_url, _blobget.SharedKeyAuth.from_base64(ACCOUNT, wrong))
    with pytest.raises(errors.StorageError, match="authentication failed"):
        reader.list_page(listed_container, "lake", "", max_results=10, what="t")


def test_a_listing_that_is_not_xml_is_a_storage_error() -> None:
    with pytest.raises(errors.StorageError, match="not valid XML"):
        _blobget.parse_blob_page(b"<html>proxy error", what="list c/p")


def test_encoded_names_are_decoded() -> None:
    body = (
        b'<?xml version="1.0" encoding="utf-8"?><EnumerationResults><Blobs><Blob>'
        b'<Name Encoded="true">a%EF%BF%BEb</Name><Properties><Content-Length>3</Content-Length>'
        b"<Etag>0x1</Etag><Content-MD5 /></Properties></Blob></Blobs><NextMarker /></EnumerationResults>"
    )
    page = _blobget.parse_blob_page(body, what="t")
    assert page == _blobget.BlobPage([_blobget.ListedBlob("a\ufffeb", 3, "0x1", None, False)], "")

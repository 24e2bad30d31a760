"""One folder level of ADLS Gen2 through List Blobs with a delimiter: the page parser, the pure split of a page
into files and sub-folders, and the shapes only a blob namespace has (a blob and a folder of the same name,
directory markers, names with empty segments), against Azurite on the lean path and through the SDK."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import _blobget, datalake
from tests.contract.test_store_levels_contract import walk
from tests.fakes.azurite_plugin import ACCOUNT, ACCOUNT_KEY, AzuriteServer

pytest_azurite = pytest.mark.azurite
MARKER = {"hdi_isfolder": "true"}


# ------------------------------------------------------------------------------------------------ pure


def test_blob_prefixes_are_parsed_and_encoded_names_decoded() -> None:
    """The ``Blobs/BlobPrefix/Name`` entries of a delimited List Blobs answer (REST "List Blobs",
    https://learn.microsoft.com/rest/api/storageservices/list-blobs), an ``Encoded`` name percent-decoded."""
    body = (
        b'<?xml version="1.0" encoding="utf-8"?><EnumerationResults><Prefix>p/</Prefix><Delimiter>/</Delimiter>'
        b"<Blobs><Blob><Name>p/f</Name><Properties><Content-Length>2</Content-Length><Etag>0x1</Etag>"
        b"</Properties></Blob><BlobPrefix><Name>p/a b/</Name></BlobPrefix>"
        b'<BlobPrefix><Name Encoded="true">p/x%EF%BF%BEy/</Name></BlobPrefix></Blobs>'
        b"<NextMarker>next-page</NextMarker></EnumerationResults>"
    )
    page = _blobget.parse_blob_page(body, what="t")
    assert page.prefixes == ("p/a b/", "p/x\ufffey/")
    assert page.blobs == [_blobget.ListedBlob("p/f", 2, "0x1", None, False)]
    assert page.next_marker == "next-page"


def test_a_blob_prefix_without_a_name_is_a_storage_error() -> None:
    body = b"<EnumerationResults><Blobs><BlobPrefix /></Blobs></EnumerationResults>"
    with pytest.raises(errors.StorageError, match="prefix has no Name"):
        _blobget.parse_blob_page(body, what="t")


def blob(name: str, size: int = 1, *, folder: bool = False) -> _blobget.ListedBlob:
    return _blobget.ListedBlob(name, size, f"0x{len(name)}", None, folder)


def test_a_page_splits_into_files_and_sub_folders_without_markers() -> None:
    page = _blobget.BlobPage(
        [blob("lake/d/f%.txt"), blob("lake/d/e", 0, folder=True), blob("lake/d/", 0)],
        "",
        ("lake/d/e/", "lake/d/sp ace/"),
    )
    entries = list(
        datalake.level_entries(page, prefix="lake/d/", folder_uri="abfss://c@a.dfs.x/lake/d/", rel_prefix="d/")
    )
    assert entries == [
        base.RemoteObject("abfss://c@a.dfs.x/lake/d/f%25.txt", "d/f%.txt", 1, "0x13"),
        base.RemoteObject("abfss://c@a.dfs.x/lake/d/", "d/", 0, "0x7"),  # a "d/" blob, as list_files yields it
        base.SubFolder("abfss://c@a.dfs.x/lake/d/e/", "d/e/"),
        base.SubFolder("abfss://c@a.dfs.x/lake/d/sp%20ace/", "d/sp ace/"),
    ]


# ------------------------------------------------------------------------------------------------ Azurite


StoreMaker = Callable[[str], datalake.AdlsStore]


@pytest.fixture(params=["lean", "sdk", "lean-sas"])
def make_store(request: pytest.FixtureRequest, azurite_env: AzuriteServer) -> Iterator[StoreMaker]:
    """``make(container) -> AdlsStore`` on the lean path (Shared Key, or a container SAS) or through the SDK."""
    opened: list[datalake.AdlsStore] = []
    settings = azurite_env.storage_settings()

    def make(container: str) -> datalake.AdlsStore:
        root = f"abfss://{container}@{ACCOUNT}.dfs.core.windows.net/"
        where = datalake.AbfssPath.parse(root)
        client = lambda: datalake.service_client(where, settings)  # noqa: E731
        if request.param == "lean":
            store = datalake.open_store(root, settings)
        elif request.param == "sdk":
            store = datalake.AdlsStore(client)
        else:
            reader = _blobget.BlobReader(azurite_env.blob_url, _blobget.SasAuth(container_sas(container)))
            store = datalake.AdlsStore(client, reader=reader)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def container_sas(container: str) -> str:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    return generate_container_sas(
        ACCOUNT,
        container,
        account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(read=True, list=True),
        expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1),
    )


def upload(azurite: AzuriteServer, blobs: dict[str, bytes | None]) -> tuple[str, str]:
    """A new container holding ``blobs`` (``None``: an HNS directory marker); returns it and its root URI."""
    from azure.storage.blob import BlobServiceClient

    container = azurite.new_container()
    with BlobServiceClient.from_connection_string(azurite.connection_string()) as client:
        for name, data in blobs.items():
            metadata = MARKER if data is None else None
            client.get_blob_client(container, name).upload_blob(data or b"", metadata=metadata)
    return container, f"abfss://{container}@{ACCOUNT}.dfs.core.windows.net/"


def compared(objects: list[base.RemoteObject]) -> list[tuple[str, str, int, str, bytes | None]]:
    return sorted((o.rel_path, o.uri, o.size, o.etag, o.content_md5) for o in objects)


@pytest_azurite
def test_a_folder_wins_over_a_blob_of_the_same_name(azurite_env: AzuriteServer, make_store: StoreMaker) -> None:
    container, root = upload(azurite_env, {"a/b": b"file", "a/b/c": b"cc", "a/b2": b"x"})
    store = make_store(container)
    assert [(e.rel_path, e.size) for e in store.list_level(root + "a/b") if isinstance(e, base.RemoteObject)] == [
        ("c", 2)
    ]
    assert [o.rel_path for o in store.list_files(root + "a/b")] == ["c"]
    assert compared(walk(store, root + "a")) == compared(list(store.list_files(root + "a")))


@pytest_azurite
def test_directory_markers_are_skipped_but_an_empty_sub_folder_is_no_error(
    azurite_env: AzuriteServer, make_store: StoreMaker
) -> None:
    """HNS accounts list each directory as a zero-length blob with ``hdi_isfolder=true``
    (https://learn.microsoft.com/azure/storage/blobs/data-lake-storage-namespace)."""
    container, root = upload(
        azurite_env,
        {"h": None, "h/file": b"f", "h/sub": None, "h/sub/deep": None, "h/empty": None, "h/zero": b""},
    )
    store = make_store(container)
    top = list(store.list_level(root + "h"))
    assert [(type(e).__name__, getattr(e, "rel_path", None) or getattr(e, "rel_prefix", "")) for e in top] == [
        ("RemoteObject", "file"),
        ("RemoteObject", "zero"),
        ("SubFolder", "sub/"),
    ]
    assert list(store.list_level(root + "h/sub/", "sub/")) == []
    assert compared(walk(store, root + "h")) == compared(list(store.list_files(root + "h")))
    with pytest.raises(errors.ObjectNotFoundError):  # an empty directory, as list_files says
        list(store.list_level(root + "h/empty"))
    with pytest.raises(errors.ObjectNotFoundError):
        list(store.list_files(root + "h/empty"))


@pytest_azurite
def test_names_only_a_blob_namespace_has_walk_as_they_list(
    azurite_env: AzuriteServer, make_store: StoreMaker
) -> None:
    """Empty segments (``x//y``), a ``dir/`` blob some tools leave as a folder, a trailing-space segment."""
    names = {"t/x//y": b"1", "t/x/": b"", "t/x/z": b"22", "t//lead": b"3", "t/sp /q": b"4", "t/x///w": b"5"}
    container, root = upload(azurite_env, dict(names))
    store = make_store(container)
    listed = list(store.list_files(root + "t"))
    assert len(listed) == len(names)
    assert compared(walk(store, root + "t")) == compared(listed)


@pytest_azurite
def test_a_level_is_listed_page_by_page_as_it_is_consumed(
    azurite_env: AzuriteServer, make_store: StoreMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next page is asked for only when the previous one has been consumed: blobs deleted after the first
    entry arrived are not listed."""
    from azure.storage.blob import BlobServiceClient

    names = [f"p/f{i}" for i in range(6)]
    container, root = upload(azurite_env, dict.fromkeys(names, b"x"))
    store = make_store(container)
    monkeypatch.setattr(datalake, "_LIST_PAGE", 2)
    assert len(list(store.list_level(root + "p"))) == 6
    entries = store.list_level(root + "p")
    first = next(entries)
    with BlobServiceClient.from_connection_string(azurite_env.connection_string()) as client:
        for name in names[2:]:
            client.get_blob_client(container, name).delete_blob()
    assert [first.rel_path, *(e.rel_path for e in entries if isinstance(e, base.RemoteObject))] == ["f0", "f1"]

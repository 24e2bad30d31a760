"""The download plan: layout, chunks, resume decisions and path safety, with plain values."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalebus import errors
from scalebus.backends import base
from scalebus.transfer import plan

CHUNK = 4


def obj(source: str, rel: str, size: int = 1, etag: str = "e1") -> base.RemoteObject:
    return base.RemoteObject(uri=f"{source.rstrip('/')}/{rel}", rel_path=rel, size=size, etag=etag)


def file_obj(uri: str, size: int = 1) -> base.RemoteObject:
    return base.RemoteObject(uri=uri, rel_path=posixpath.basename(uri), size=size, etag="e1")


def make(*listings: plan.Listing, present: dict[str, plan.ManifestEntry] | None = None) -> plan.DownloadPlan:
    return plan.plan_download(listings, present=present or {}, chunk_size_bytes=CHUNK)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, ()),
        (1, (plan.Chunk(0, 1),)),
        (4, (plan.Chunk(0, 4),)),
        (5, (plan.Chunk(0, 4), plan.Chunk(4, 1))),
        (12, (plan.Chunk(0, 4), plan.Chunk(4, 4), plan.Chunk(8, 4))),
    ],
    ids=["empty", "tiny", "exactly-one-chunk", "one-byte-over", "three-chunks"],
)
def test_split_chunks(size: int, expected: tuple[plan.Chunk, ...]) -> None:
    assert plan.split_chunks(size, CHUNK) == expected


@pytest.mark.parametrize(
    ("source", "rels", "expected"),
    [
        ("file:///lake/run1", ["a.fq", "sub/b.fq"], ["run1/a.fq", "run1/sub/b.fq"]),
        ("file:///lake/run1/", ["a.fq"], ["run1/a.fq"]),
        ("abfss://fs@acct.dfs.core.windows.net/x/run%202", ["a"], ["run 2/a"]),
        ("abfss://fs@acct.dfs.core.windows.net/", ["a", "d/b"], ["fs/a", "fs/d/b"]),
    ],
    ids=["folder", "folder-trailing-slash", "percent-encoded-name", "filesystem-root"],
)
def test_folder_source_lands_under_its_base_name(source: str, rels: list[str], expected: list[str]) -> None:
    result = make(plan.Listing(source, [obj(source, rel) for rel in rels]))
    assert [task.rel_dest for task in result.fetch] == expected


def test_file_source_lands_at_the_top() -> None:
    uri = "abfss://fs@acct.dfs.core.windows.net/refs/genome.fa"
    result = make(plan.Listing(uri, [file_obj(uri)]))
    assert [task.rel_dest for task in result.fetch] == ["genome.fa"]
    assert result.directories == ()


def test_folder_holding_a_single_file_still_uses_its_folder_name() -> None:
    source = "file:///lake/one"
    result = make(plan.Listing(source, [obj(source, "only.txt")]))
    assert [task.rel_dest for task in result.fetch] == ["one/only.txt"]


def test_directories_are_listed_parents_first_once() -> None:
    source = "file:///lake/d"
    result = make(plan.Listing(source, [obj(source, "a/b/c.txt"), obj(source, "a/b/d.txt"), obj(source, "e.txt")]))
    assert result.directories == ("d", "d/a", "d/a/b")


def test_large_files_are_split_small_ones_are_not() -> None:
    source = "file:///lake/d"
    result = make(plan.Listing(source, [obj(source, "small", size=3), obj(source, "large", size=10)]))
    assert [len(task.chunks) for task in result.fetch] == [1, 3]
    assert result.fetch_bytes == 13


@pytest.mark.parametrize(
    ("entry", "skipped"),
    [
        (plan.ManifestEntry("d/a", "e1", 5), True),
        (plan.ManifestEntry("d/a", "e2", 5), False),
        (plan.ManifestEntry("d/a", "e1", 6), False),
        (plan.ManifestEntry("d/other", "e1", 5), False),
    ],
    ids=["same-etag-and-size", "etag-changed", "size-changed", "other-file"],
)
def test_resume_skips_only_identical_files(entry: plan.ManifestEntry, skipped: bool) -> None:
    source = "file:///lake/d"
    result = make(plan.Listing(source, [obj(source, "a", size=5)]), present={entry.rel_path: entry})
    assert (len(result.skip), len(result.fetch)) == ((1, 0) if skipped else (0, 1))
    assert result.skip_bytes == (5 if skipped else 0)


def test_directories_only_for_files_still_to_fetch() -> None:
    source = "file:///lake/d"
    present = {"d/x/a": plan.ManifestEntry("d/x/a", "e1", 1)}
    result = make(plan.Listing(source, [obj(source, "x/a"), obj(source, "y/b")]), present=present)
    assert result.directories == ("d", "d/y")


@pytest.mark.parametrize(
    ("rel", "reason"),
    [
        ("", "empty path"),
        ("../etc/passwd", "'..' segment"),
        ("a/../../b", "'..' segment"),
        ("a/./b", "'.' segment"),
        ("/etc/passwd", "absolute path"),
        ("a//b", "empty segment"),
        ("a/", "empty segment"),
        ("a\\..\\b", "backslash"),
        ("a\x00b", "NUL"),
        ("a\x1b[31mb", "control character"),
        ("a\u202etxt.exe", "format character"),
        ("a\u200db", "format character"),
        ("a\u2028b", "line separator"),
        ("e\u0301.txt", "not in Unicode NFC"),
        ("x" * 256, "longer than 255 bytes"),
        ("é" * 128, "longer than 255 bytes"),
    ],
    ids=[
        "empty",
        "dotdot",
        "dotdot-inside",
        "dot",
        "absolute",
        "double-slash",
        "trailing-slash",
        "backslash",
        "nul",
        "escape-sequence",
        "bidi-override",
        "zero-width-joiner",
        "line-separator",
        "nfd",
        "long-ascii-name",
        "long-utf8-name",
    ],
)
def test_unsafe_names_are_rejected_with_the_path_and_reason(rel: str, reason: str) -> None:
    source = "file:///lake/d"
    with pytest.raises(errors.UnsafePathError, match=reason) as caught:
        make(plan.Listing(source, [obj(source, rel)]))
    assert repr(rel) in str(caught.value)


@pytest.mark.parametrize(
    "rel",
    ["A.txt", "é.txt", "with space.fq", "日本/データ.bin", "..hidden", "a..b", "-dash", ".part"],
    ids=["upper", "nfc-accent", "space", "cjk", "leading-dots", "inner-dots", "dash", "part-alone"],
)
def test_ordinary_names_are_accepted(rel: str) -> None:
    source = "file:///lake/d"
    assert [task.rel_dest for task in make(plan.Listing(source, [obj(source, rel)])).fetch] == [f"d/{rel}"]


def test_names_differing_only_in_case_stay_two_files() -> None:
    source = "file:///lake/d"
    result = make(plan.Listing(source, [obj(source, "A.txt"), obj(source, "a.txt")]))
    assert [task.rel_dest for task in result.fetch] == ["d/A.txt", "d/a.txt"]


def test_two_sources_mapping_to_one_path_collide() -> None:
    first, second = "file:///lake1/reads", "file:///lake2/reads"
    with pytest.raises(errors.UnsafePathError, match="both") as caught:
        make(plan.Listing(first, [obj(first, "a")]), plan.Listing(second, [obj(second, "a")]))
    assert "lake1" in str(caught.value) and "lake2" in str(caught.value)


def test_a_path_that_is_both_file_and_directory_collides() -> None:
    first, second = "file:///x/d", "file:///y/d"
    with pytest.raises(errors.UnsafePathError, match="directory"):
        make(plan.Listing(first, [obj(first, "f")]), plan.Listing(second, [file_obj(second)]))
    with pytest.raises(errors.UnsafePathError, match="directory"):
        make(plan.Listing(first, [obj(first, "f/g")]), plan.Listing("file:///z/d", [obj("file:///z/d", "f")]))


def test_a_name_with_the_shape_of_a_temporary_name_is_refused() -> None:
    source = "file:///lake/d"
    taken = plan.temp_name("x")
    assert make(plan.Listing(source, [obj(source, "x"), obj(source, "x.part")])).fetch
    with pytest.raises(errors.UnsafePathError, match="temporary download name"):
        make(plan.Listing(source, [obj(source, "x"), obj(source, taken)]))


@pytest.mark.parametrize("length", [1, 250, 251, 255])
def test_temporary_names_fit_name_max_whatever_the_name(length: int) -> None:
    name = "é" * (length // 2) + "a" * (length % 2)
    assert len(name.encode()) == length
    temp = plan.temp_name(f"dir/{name}")
    assert temp.startswith("dir/") and len(temp.removeprefix("dir/").encode()) <= 32
    assert plan.is_temp_name(temp.removeprefix("dir/")) and temp != plan.temp_name(f"dir/{name}x")


def test_the_manifest_name_is_reserved() -> None:
    uri = f"file:///lake/{plan.MANIFEST_NAME}"
    with pytest.raises(errors.UnsafePathError, match="reserved"):
        make(plan.Listing(uri, [file_obj(uri)]))


def test_a_root_without_a_name_is_rejected() -> None:
    with pytest.raises(errors.UnsafePathError, match="no folder name"):
        make(plan.Listing("file:///", [obj("file:///", "a")]))


_PATH_CHARS = st.sampled_from(["a", "b", "/", ".", "..", "\\", "\x00", "\n", "é", "e\u0301", "\u202e", " ", "~"])


@given(st.lists(st.lists(_PATH_CHARS, max_size=12).map("".join), min_size=1, max_size=5))
def test_no_planned_path_escapes_the_stage_dir(rels: list[str]) -> None:
    source = "file:///lake/d"
    objects = [obj(source, rel) for rel in rels]
    try:
        result = make(plan.Listing(source, objects))
    except errors.UnsafePathError:
        return
    stage = "/stage"
    for task in result.fetch + result.skip:
        joined = posixpath.join(stage, task.rel_dest)
        assert posixpath.normpath(joined) == joined
        assert joined.startswith(stage + "/")
        assert "\\" not in task.rel_dest and "\x00" not in task.rel_dest
    for directory in result.directories:
        assert posixpath.normpath(posixpath.join(stage, directory)).startswith(stage + "/")


def task(rel: str, size: int, *, chunks: int = 1) -> plan.FileTask:
    pieces = tuple(plan.Chunk(i, 1) for i in range(chunks)) if size else ()
    return plan.FileTask(obj=obj("file:///s", rel, size), rel_dest=rel, source=0, chunks=pieces)


def test_batches_group_small_files_by_count_and_bytes_and_keep_split_files_alone() -> None:
    tasks = [task("a", 10), task("b", 10), task("c", 10), task("big", 100, chunks=3), task("d", 50), task("e", 0)]
    batches = plan.batch_tasks(tasks, max_files=2, max_bytes=60)
    assert [[t.rel_dest for t in batch] for batch in batches] == [["a", "b"], ["big"], ["c", "d"], ["e"]]


@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(1, 3)), max_size=60),
    st.integers(1, 8),
    st.integers(1, 500),
)
def test_batches_hand_out_every_file_once_in_order(sizes: list[tuple[int, int]], files: int, nbytes: int) -> None:
    tasks = [task(f"f{i}", size, chunks=chunks) for i, (size, chunks) in enumerate(sizes)]
    batches = plan.batch_tasks(tasks, max_files=files, max_bytes=nbytes)
    assert sorted((t for batch in batches for t in batch), key=lambda t: int(t.rel_dest[1:])) == tasks
    for batch in batches:
        assert batch and len(batch) <= files
        split = [t for t in batch if len(t.chunks) > 1]
        assert not split or len(batch) == 1
        assert len(batch) == 1 or sum(t.size for t in batch[:-1]) < nbytes

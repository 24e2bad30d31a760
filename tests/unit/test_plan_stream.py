"""The streaming planner: pages in, tasks out, every rule checked across pages, with plain values."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalebus import errors
from scalebus.backends import base
from scalebus.transfer import plan

SOURCE = "file:///lake/d"


def obj(rel: str, size: int = 1, etag: str = "e1", source: str = SOURCE) -> base.RemoteObject:
    return base.RemoteObject(uri=f"{source}/{rel}", rel_path=rel, size=size, etag=etag)


def planner(*sources: str, **kwargs: object) -> plan.StreamPlanner:
    return plan.StreamPlanner(sources or (SOURCE,), chunk_size_bytes=4, **kwargs)  # type: ignore[arg-type]


_RELS = st.lists(
    st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map("/".join), max_size=12, unique=True
)


@given(_RELS, st.integers(1, 5))
def test_pages_plan_exactly_what_the_whole_listing_plans(rels: list[str], page: int) -> None:
    objects = [obj(rel, size=len(rel)) for rel in rels]
    try:
        whole = plan.plan_download([plan.Listing(SOURCE, objects)], present={}, chunk_size_bytes=4)
    except errors.UnsafePathError:
        with pytest.raises(errors.UnsafePathError):
            streamed = planner()
            for start in range(0, len(objects), page):
                streamed.feed(0, objects[start : start + page])
        return
    streamed = planner()
    fetch: list[plan.FileTask] = []
    directories: list[str] = []
    for start in range(0, len(objects), page):
        step = streamed.feed(0, objects[start : start + page])
        fetch += step.fetch
        directories += step.directories
    assert fetch == list(whole.fetch)
    assert directories == list(whole.directories)
    assert (streamed.fetch_files, streamed.fetch_bytes) == (len(whole.fetch), whole.fetch_bytes)


@pytest.mark.parametrize(
    ("first", "second", "reason"),
    [
        ("x/a", "x/a", "both"),
        ("x/a", "x/a/b", "needs it as a directory"),
        ("x/a/b", "x/a", "is a file but other files need it as a directory"),
        ("x", plan.temp_name("x"), "temporary download name"),
    ],
    ids=["same-path", "file-then-directory", "directory-then-file", "temporary-name"],
)
def test_a_rule_broken_on_a_later_page_fails_there(first: str, second: str, reason: str) -> None:
    streamed = planner()
    assert [task.rel_dest for task in streamed.feed(0, [obj(first)]).fetch] == [f"d/{first}"]
    with pytest.raises(errors.UnsafePathError, match=reason):
        streamed.feed(0, [obj(second)])


def test_a_collision_between_sources_names_the_earlier_source() -> None:
    first, second = "file:///lake1/reads", "file:///lake2/reads"
    streamed = planner(first, second)
    streamed.feed(0, [obj("a", source=first)])
    with pytest.raises(errors.UnsafePathError, match="both") as caught:
        streamed.feed(1, [obj("a", source=second)])
    assert "lake1" in str(caught.value) and "lake2/reads/a" in str(caught.value)


def test_the_manifest_name_is_reserved_for_a_file_source() -> None:
    uri = f"file:///lake/{plan.MANIFEST_NAME}"
    with pytest.raises(errors.UnsafePathError, match="reserved"):
        planner(uri).feed(0, [base.RemoteObject(uri=uri, rel_path=plan.MANIFEST_NAME, size=1, etag="e")])


def test_the_disk_budget_is_a_running_total() -> None:
    disk = plan.DiskBudget("/stage", free=100, min_free=40)
    streamed = planner(disk=disk)
    assert len(streamed.feed(0, [obj("a", size=30)]).fetch) == 1
    assert len(streamed.feed(0, [obj("b", size=30)]).fetch) == 1
    with pytest.raises(errors.LocalDiskError, match=r"staging needs 61 bytes plus 40 .* only 100 bytes"):
        streamed.feed(0, [obj("c", size=1)])


def test_skipped_files_use_no_disk_budget() -> None:
    present = plan.ManifestIndex.of([plan.ManifestEntry("d/a", "e1", 90)])
    streamed = planner(present=present, disk=plan.DiskBudget("/stage", free=100, min_free=0))
    step = streamed.feed(0, [obj("a", size=90), obj("b", size=10)])
    assert [task.rel_dest for task in step.fetch] == ["d/b"]
    assert (streamed.skip_files, streamed.skip_bytes) == (1, 90)


def test_the_disk_is_asked_only_about_files_matching_the_manifest() -> None:
    present = plan.ManifestIndex.of([plan.ManifestEntry("d/a", "e1", 1), plan.ManifestEntry("d/b", "e1", 1)])
    asked: list[tuple[str, int]] = []

    def is_staged(rel: str, size: int) -> bool:
        asked.append((rel, size))
        return rel != "d/b"  # deleted locally since

    step = planner(present=present, is_staged=is_staged).feed(
        0, [obj("a"), obj("b"), obj("c"), obj("a2", etag="x")]
    )
    assert asked == [("d/a", 1), ("d/b", 1)]
    assert [task.rel_dest for task in step.fetch] == ["d/b", "d/c", "d/a2"]


def test_the_last_manifest_entry_for_a_path_wins() -> None:
    index = plan.ManifestIndex.of([plan.ManifestEntry("p", "e1", 1), plan.ManifestEntry("p", "e2", 1)])
    assert index.matches("p", "e2", 1) and not index.matches("p", "e1", 1) and not index.matches("q", "e2", 1)
    assert len(index) == 1


def test_chunks_grow_with_the_bytes_listed_so_far() -> None:
    streamed = planner(spread_units=2)
    first = streamed.feed(0, [obj("a", size=8)])  # 8 bytes listed: chunks of max(4, 8 / 2)
    second = streamed.feed(0, [obj("b", size=16)])  # 24 listed: chunks of 12
    assert [len(task.chunks) for task in first.fetch + second.fetch] == [2, 2]
    assert second.fetch[0].chunks[0].length == 12


def test_directories_are_handed_out_once_across_pages() -> None:
    streamed = planner()
    assert streamed.feed(0, [obj("x/y/a")]).directories == ["d", "d/x", "d/x/y"]
    assert streamed.feed(0, [obj("x/y/b"), obj("x/z/c")]).directories == ["d/x/z"]


def test_collisions_are_found_for_files_the_manifest_knows_too() -> None:
    known = [plan.ManifestEntry("d/a", "e1", 1)]
    streamed = planner(present=plan.ManifestIndex.of(known))
    assert streamed.feed(0, [obj("a")]).fetch == [] and streamed.skip_files == 1
    with pytest.raises(errors.UnsafePathError, match="both"):
        streamed.feed(0, [obj("a")])
    streamed = planner(present=plan.ManifestIndex.of(known))
    streamed.feed(0, [obj("a")])
    with pytest.raises(errors.UnsafePathError, match="needs it as a directory"):
        streamed.feed(0, [obj("a/b")])


SMALL, LARGE = 4096, plan.SMALL_UNIT_BYTES * 2


@pytest.mark.parametrize(
    ("count", "cpu_cores", "units", "unit_bytes", "expected"),
    [
        (plan.ThreadCount(16), 1.0, 1000, SMALL, plan.ThreadCount(8, tried_from=16, rate_before=2000.0)),
        (plan.ThreadCount(8, tried_from=16, rate_before=2000.0), 1.0, 1000, SMALL, plan.ThreadCount(4, 8, 2000.0)),
        (
            plan.ThreadCount(8, tried_from=16, rate_before=2000.0),
            1.0,
            700,
            SMALL,
            plan.ThreadCount(16, hold=plan.THREADS_HOLD_WINDOWS),
        ),
        (plan.ThreadCount(16, hold=9), 1.0, 1000, SMALL, plan.ThreadCount(16, hold=8)),
        (plan.ThreadCount(1), 1.0, 1000, SMALL, plan.ThreadCount(1)),
        (plan.ThreadCount(2), 0.2, 100, SMALL, plan.ThreadCount(4)),
        (plan.ThreadCount(16), 0.2, 100, SMALL, plan.ThreadCount(16)),
        (plan.ThreadCount(4), 0.7, 100, SMALL, plan.ThreadCount(4)),
        (plan.ThreadCount(2), 1.5, 100, LARGE, plan.ThreadCount(16)),
        (plan.ThreadCount(4), 1.0, 0, SMALL, plan.ThreadCount(4)),
    ],
    ids=[
        "cpu-bound-halves",
        "kept-up-halves-again",
        "slower-goes-back-and-holds",
        "holding",
        "one-is-the-least",
        "waiting-doubles",
        "most-is-the-most",
        "in-between-stays",
        "large-units-get-all",
        "nothing-finished",
    ],
)
def test_the_thread_count_follows_the_source(
    count: plan.ThreadCount, cpu_cores: float, units: int, unit_bytes: int, expected: plan.ThreadCount
) -> None:
    got = plan.next_threads(
        count, most=16, cpu_cores=cpu_cores, units=units, nbytes=units * unit_bytes, seconds=0.5
    )
    assert got == expected

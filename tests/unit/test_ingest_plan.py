"""The ingest plan (pure): copy / skip / refuse / deleted-at-source, and the manifest format."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalebus.backends import base
from scalebus.ingest import engine, plan
from scalebus.transfer import paths


def obj(rel_path: str, etag: str = "e1", size: int = 10) -> base.RemoteObject:
    return base.RemoteObject(uri=f"s3://b/p/{rel_path}", rel_path=rel_path, size=size, etag=etag, modified_at=1.0)


def entry(rel_path: str, etag: str = "e1", size: int = 10) -> plan.CopiedEntry:
    return plan.CopiedEntry(rel_path, etag, size)


def decide(
    listing: list[base.RemoteObject], *, copied: dict[str, plan.CopiedEntry], present: dict[str, int] | None
) -> plan.IngestPlan:
    index = plan.index_of(copied.values(), present=None if present is None else present.items())
    return plan.plan_ingest(iter(listing), index=index)


@pytest.mark.parametrize(
    ("recorded", "present", "expected"),
    [
        pytest.param(None, {}, "new", id="never-copied"),
        pytest.param(entry("a"), {"a": 10}, "skip", id="same-etag-and-size"),
        pytest.param(entry("a", etag="e0"), {"a": 10}, "changed", id="new-etag"),
        pytest.param(entry("a", size=9), {"a": 10}, "changed", id="new-size"),
        pytest.param(entry("a"), {}, "missing", id="deleted-at-destination"),
        pytest.param(entry("a"), {"a": 3}, "missing", id="altered-at-destination"),
        pytest.param(entry("a"), None, "skip", id="destination-not-checked"),
    ],
)
def test_decision_for_one_object(
    recorded: plan.CopiedEntry | None, present: dict[str, int] | None, expected: str
) -> None:
    copied = {"a": recorded} if recorded else {}
    result = decide([obj("a")], copied=copied, present=present)
    if expected == "skip":
        assert (result.skip_files, result.skip_bytes, result.copy) == (1, 10, ())
    else:
        assert result.copy == (plan.CopyTask(obj("a"), expected),)
        assert result.skip_files == 0


@pytest.mark.parametrize(
    ("rel_path", "reason"),
    [
        pytest.param("../escape", "has a '..' segment", id="dotdot"),
        pytest.param("a/../../b", "has a '..' segment", id="dotdot-inside"),
        pytest.param("/etc/passwd", "absolute path", id="absolute"),
        pytest.param("a//b", "has an empty segment", id="empty-segment"),
        pytest.param("./a", "has a '.' segment", id="dot"),
        pytest.param("a\\b", "contains a backslash", id="backslash"),
        pytest.param("bad\u202ename", "contains a format character (U+202E)", id="bidi-override"),
        pytest.param("zero\u200bwidth", "contains a format character (U+200B)", id="zero-width"),
        pytest.param("line\nbreak", "contains a control character (U+000A)", id="newline"),
        pytest.param("cafe\u0301", "not in Unicode NFC (normalising could merge it with another name)", id="nfd"),
        pytest.param(plan.MANIFEST_NAME, "reserved for the ingest manifest", id="manifest-name"),
    ],
)
def test_unsafe_names_are_refused_with_a_reason(rel_path: str, reason: str) -> None:
    result = decide([obj(rel_path), obj("fine.txt")], copied={}, present={})
    assert result.refused == (plan.Refusal(rel_path, reason),)
    assert [task.obj.rel_path for task in result.copy] == ["fine.txt"]


def test_an_object_that_is_also_a_folder_is_refused_and_its_children_copied() -> None:
    result = decide([obj("d"), obj("d/e"), obj("d/f/g")], copied={}, present={})
    assert [r.rel_path for r in result.refused] == ["d"]
    assert "folder" in result.refused[0].reason
    assert [task.obj.rel_path for task in result.copy] == ["d/e", "d/f/g"]


def test_recorded_objects_no_longer_listed_are_reported_not_deleted() -> None:
    copied = {"a": entry("a"), "gone": entry("gone"), "also/gone": entry("also/gone")}
    result = decide([obj("a")], copied=copied, present={"a": 10, "gone": 10})
    assert result.deleted_at_source == 2
    assert (result.skip_files, result.copy) == (1, ())


def test_manifest_round_trip_and_bad_lines() -> None:
    entries = {"a": plan.CopiedEntry("a", "e1", 10, 1.5, 2.5), "ü/b c": plan.CopiedEntry("ü/b c", "x-2", 0)}
    data = plan.render_manifest(entries.values(), source="s3://b/p", now=3.0)
    header = data.splitlines()[0]
    assert b'"schema": 2' in header and b'"source": "s3://b/p"' in header
    assert plan.parse_manifest(data) == entries
    damaged = data + b'{"path": "x", "etag": "e"}\nnot json\n[1, 2]\n{"path": "y", "etag": "e", "size": "NaN?"}\n'
    assert plan.parse_manifest(damaged) == entries


_segment = st.one_of(
    st.sampled_from(["..", ".", "", "a", "b", "c.txt", "\u202e", "x\u200b", "cafe\u0301", plan.MANIFEST_NAME]),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=4),
)
_paths = st.lists(_segment, min_size=1, max_size=4).map("/".join) | st.sampled_from(["/abs", "a\\b"])
_objects = st.lists(st.tuples(_paths, st.sampled_from(["e1", "e2"]), st.integers(0, 3)), max_size=12)


@given(listed=_objects, recorded=_objects)
def test_every_object_is_decided_once_and_nothing_escapes(
    listed: list[tuple[str, str, int]], recorded: list[tuple[str, str, int]]
) -> None:
    listing = list({path: obj(path, etag, size) for path, etag, size in listed}.values())
    copied = {path: entry(path, etag, size) for path, etag, size in recorded}
    present = {path: size for path, _etag, size in recorded}
    result = decide(listing, copied=copied, present=present)
    refused = [r.rel_path for r in result.refused]
    assert len(result.copy) + result.skip_files + len(refused) == len(listing)
    assert {t.obj.rel_path for t in result.copy}.isdisjoint(refused)
    for path in [t.obj.rel_path for t in result.copy]:
        landed = posixpath.normpath(posixpath.join("/dest", path))
        assert landed.startswith("/dest/") and landed != "/dest/" + plan.MANIFEST_NAME
        assert landed == "/dest/" + path  # nothing is rewritten on the way
    # Applying the plan (record every copy) makes the next plan copy nothing.
    after = copied | {t.obj.rel_path: entry(t.obj.rel_path, t.obj.etag, t.obj.size) for t in result.copy}
    present_after = present | {t.obj.rel_path: t.obj.size for t in result.copy}
    again = decide(listing, copied=after, present=present_after)
    assert again.copy == ()
    assert again.skip_files == len(listing) - len(refused)


@pytest.mark.parametrize(
    ("interval_s", "last_save_s", "expected"),
    [(30.0, 0.1, 30.0), (30.0, 1.5, 30.0), (30.0, 3.0, 60.0), (0.0, 0.0, 0.0), (0.0, 0.5, 0.0)],
    ids=["fast-rewrite", "at-the-share", "slow-rewrite-waits-longer", "every-object", "every-object-even-if-slow"],
)
def test_checkpoints_are_spaced_to_bound_their_share_of_the_run(
    interval_s: float, last_save_s: float, expected: float
) -> None:
    assert engine.checkpoint_interval(interval_s, last_save_s) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("sizes", "concurrency", "expected"),
    [
        ([], 8, 0),
        ([10, 20, 30], 8, 0),  # all in memory
        ([10, 200, 300, 150], 2, 500),
        ([200, 300, 150], 8, 650),
    ],
    ids=["nothing", "small-only", "largest-two", "fewer-than-concurrency"],
)
def test_scratch_needed_is_the_largest_in_transit(sizes: list[int], concurrency: int, expected: int) -> None:
    assert plan.scratch_needed(sizes, concurrency=concurrency, in_memory_bytes=100) == expected


def test_an_object_listed_twice_is_refused_the_second_time() -> None:
    result = decide([obj("a"), obj("a"), obj("n"), obj("n")], copied={"a": entry("a")}, present={"a": 10})
    assert [(r.rel_path, r.reason) for r in result.refused] == [("a", "listed twice"), ("n", "listed twice")]
    assert (result.skip_files, [t.obj.rel_path for t in result.copy]) == (1, ["n"])


def test_a_recorded_object_that_became_a_folder_is_refused_not_skipped() -> None:
    result = decide([obj("d"), obj("d/e")], copied={"d": entry("d")}, present={"d": 10})
    assert [r.rel_path for r in result.refused] == ["d"]
    assert (result.skip_files, result.skip_bytes, [t.obj.rel_path for t in result.copy]) == (0, 0, ["d/e"])


def test_the_last_line_per_path_wins() -> None:
    lines = [
        plan.header_line(source="s3://b/p", generation="g1", lineage=["g0"], now=1.0),
        entry("a", etag="old").line(),
        "torn {",
        entry("a", etag="new").line(),
    ]
    assert [e.etag for e in plan.parse_lines(lines)] == ["old", "new"]
    assert plan.parse_manifest("\n".join(lines).encode()) == {"a": entry("a", etag="new")}
    assert plan.parse_header(lines[0])["lineage"] == ["g0"]


_ascii_paths = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), min_size=0, max_size=12)


@given(rel_path=_ascii_paths | _paths)
def test_the_fast_path_check_agrees_with_staging_rules(rel_path: str) -> None:
    if plan._plainly_safe(rel_path):
        assert paths.unsafe_reason(rel_path) is None
    assert plan.name_refusal(rel_path) == (
        paths.unsafe_reason(rel_path)
        or ("reserved for the ingest manifest" if rel_path == plan.MANIFEST_NAME else None)
    )


def test_loading_lines_in_batches_skips_damaged_ones_and_keeps_the_last() -> None:
    lines = [entry("a", etag="old").line(), "{torn", entry("a", etag="new").line(), entry("b").line() + "\n"]
    index = plan.ManifestIndex()
    index.load(lines)
    fresh = plan.index_of([entry("a", etag="new"), entry("b")], present=None)
    assert len(index) == 2
    for name in ("a", "b"):
        index.mark_present(name, 10)
    result = plan.plan_ingest([obj("a", etag="new"), obj("b")], index=index)
    assert (result.skip_files, result.copy) == (2, ())
    assert len(fresh) == 2

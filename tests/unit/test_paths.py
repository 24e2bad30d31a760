"""Path safety's fast path for ASCII names judges every name exactly as the full Unicode check does."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalebus.transfer import paths

_PIECES = st.sampled_from(
    [
        "a",
        "Z",
        "0",
        "/",
        ".",
        "..",
        "\\",
        "\x00",
        "\x1f",
        "\x7f",
        "\n",
        " ",
        "~",
        "-",
        "é",
        "e\u0301",
        "\u202e",
        "x" * 200,
    ]
)


@given(st.lists(_PIECES, max_size=14).map("".join))
def test_the_fast_path_agrees_with_the_full_check(rel: str) -> None:
    assert paths.unsafe_reason(rel) == paths._full_check(rel)


@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=40))
def test_the_fast_path_agrees_on_any_ascii_text(rel: str) -> None:
    assert paths.unsafe_reason(rel) == paths._full_check(rel)


@pytest.mark.parametrize(
    ("rel", "reason"),
    [
        ("", "empty path"),
        ("/a", "absolute path"),
        ("a/", "has an empty segment"),
        ("a//b", "has an empty segment"),
        (".", "has a '.' segment"),
        ("a/..", "has a '..' segment"),
        ("a\\b", "contains a backslash"),
        ("a\x7fb", "contains a control character (U+007F)"),
        ("a/" + "x" * 256, "a segment is longer than 255 bytes"),
    ],
    ids=["empty", "absolute", "trailing-slash", "double-slash", "dot", "dotdot", "backslash", "delete", "long"],
)
def test_ascii_names_the_fast_path_cannot_clear_get_their_reason(rel: str, reason: str) -> None:
    assert paths.unsafe_reason(rel) == reason


@pytest.mark.parametrize("rel", [".hidden/a", "a/.git/b", "a..b", "x" * 255, "a/" + "y" * 255, "run 1/r_1.fq.gz"])
def test_ascii_names_every_rule_accepts_pass(rel: str) -> None:
    assert paths.unsafe_reason(rel) is None

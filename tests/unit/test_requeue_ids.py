"""The id a requeued dead letter travels under (``base.requeued_message_id``): pure, so a plain table."""

from __future__ import annotations

import pytest

from scalebus.backends import base


@pytest.mark.parametrize(
    ("message_id", "sequence_number", "expected"),
    [
        ("S01", 12, "S01+r12"),
        ("S01+r12", 40, "S01+r40"),
        ("a+b", 7, "a+b+r7"),
        ("", 3, "+r3"),
        ("x" * 128, 123456, "x" * 120 + "+r123456"),
    ],
    ids=["job-id", "requeued-before", "plus-not-a-mark", "no-id", "longest-job-id"],
)
def test_requeued_message_id(message_id: str, sequence_number: int, expected: str) -> None:
    assert base.requeued_message_id(message_id, sequence_number) == expected
    assert len(expected) <= base.MAX_MESSAGE_ID_CHARS

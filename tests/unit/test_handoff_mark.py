"""The request's whole size, read from its length prefix as the worker's parser reads it:
what the lobby waits for (up to HANDOFF_BYTES) before a worker takes the connection."""

from __future__ import annotations

import pytest

from qmqpd.lobby import PREFIX_PEEK, request_total


@pytest.mark.parametrize(("head", "wanted"), [
    (b"1", None),  # the prefix is not complete: wait for more
    (b"123456789", None),
    (b"25:", 3 + 25 + 1),  # the whole request: prefix, body, closing comma
    (b"0:,", 3),
    (b"25:8:message,", 29),
    (b"999999:", 7 + 999999 + 1),  # a long one (the lobby waits for HANDOFF_BYTES of it)
    (b"0000000000000025:", 16 + 1 + 25 + 1),  # leading zeros: the worker reads them too
    (b"9999999999:", 0),  # over the worker's length cap: it answers at once
    (b"12345678901", 0),  # over the cap already: not a QMQP length, the worker answers
    (b"x", 0),
    (b":", 0),
    (b"12a", 0),
    (b"\r\n\r\n\x00\r\nQUIT\n", 0),  # a PROXY v2 header where none is expected
])
def test_the_mark_follows_the_length_prefix(head: bytes, wanted: int | None) -> None:
    assert request_total(head) == wanted


def test_a_long_prefix_of_leading_zeros_is_read_whole() -> None:
    """The worker's parser takes up to OUTER_PREFIX_MAX digits: so does the peek."""
    head = b"0" * 60 + b"25:" + b"x" * 26
    assert len(head) <= PREFIX_PEEK and request_total(head[:PREFIX_PEEK]) == 60 + 3 + 25 + 1

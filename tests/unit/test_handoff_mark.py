"""How much of a request the master wants in the socket before a worker takes it."""

from __future__ import annotations

import pytest

from qmqpd.lobby import HANDOFF_BYTES, request_size


@pytest.mark.parametrize(("head", "wanted"), [
    (b"1", None),  # the prefix is not complete: wait for more
    (b"123456789", None),
    (b"25:", 3 + 25 + 1),  # the whole request: prefix, body, closing comma
    (b"0:,", 3),
    (b"25:8:message,", 29),
    (b"999999:", HANDOFF_BYTES),  # a long one: its first HANDOFF_BYTES
    (b"0000000000000025:", 16 + 1 + 25 + 1),  # leading zeros: the worker reads them too
    (b"9999999999:", 0),  # over the worker's length cap: it answers at once
    (b"12345678901", 0),  # over the cap already: not a QMQP length, the worker answers
    (b"x", 0),
    (b":", 0),
    (b"12a", 0),
    (b"\r\n\r\n\x00\r\nQUIT\n", 0),  # a PROXY v2 header where none is expected
])
def test_the_mark_follows_the_length_prefix(head: bytes, wanted: int | None) -> None:
    assert request_size(head) == wanted


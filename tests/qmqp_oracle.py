"""An independent reading of QMQP requests and of the Received line, for checking qmqpd.

Written from the QMQP description in the qmail-queue reference (qmail-qmqpd's rules), not
from qmqpd's own reader, so a test can compare what the server queued with what the
request meant. Nothing here imports qmqpd.

A request is one outer netstring holding: the message, the sender, then recipients until
the outer length is used up, each an inner netstring; then the outer comma. Bytes after
that comma are ignored. A length is one or more decimal digits; a length that is already
above 200,000,000 when another digit comes is too large; at most 100 bytes of outer prefix
are read. An address of 1000 bytes or more, or one holding a NUL, is refused with D.
qmqpd also refuses an empty recipient list with D (qmail answers K and drops it later).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

DIGIT_CAP = 200_000_000
OUTER_PREFIX_MAX = 100
ADDRESS_LIMIT = 1000  # an address this long or longer is refused

# What a request is, as the protocol defines it.
ACCEPT = "accept"  # complete and acceptable: the server must answer K and queue it
BAD_ADDRESS = "bad_address"  # complete, but an address is too long or holds a NUL: D
NO_RECIPIENTS = "no_recipients"  # complete, acceptable addresses, no recipient: D in qmqpd
MALFORMED = "malformed"  # a rule broken before the end: never queued
TRUNCATED = "truncated"  # the bytes end before the request does: never queued


@dataclass(frozen=True)
class Parsed:
    verdict: str
    message: bytes = b""
    sender: bytes = b""
    recipients: tuple[bytes, ...] = ()
    why: str = ""


class _Stop(Exception):
    def __init__(self, verdict: str, why: str) -> None:
        super().__init__(why)
        self.verdict = verdict
        self.why = why


class _Reader:
    """A cursor over the request bytes with the outer byte budget."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0
        self.budget: int | None = None  # None until the outer length is known

    def take(self, count: int) -> bytes:
        if self.budget is not None:
            if count > self.budget:
                # Malformed whatever follows: no bytes can make this request whole.
                raise _Stop(MALFORMED, "inner data overruns the outer length")
            self.budget -= count
        if self.at + count > len(self.data):
            raise _Stop(TRUNCATED, "ends early")
        chunk = self.data[self.at:self.at + count]
        self.at += count
        return chunk

    def length(self, max_prefix: int | None = None) -> int:
        value = 0
        digits = 0
        while True:
            byte = self.take(1)[0]
            if byte == 0x3A:
                if digits == 0:
                    raise _Stop(MALFORMED, "empty length")
                return value
            if not 0x30 <= byte <= 0x39:
                raise _Stop(MALFORMED, "non-digit in length")
            if value > DIGIT_CAP:
                raise _Stop(MALFORMED, "length too large")
            value = value * 10 + byte - 0x30
            digits += 1
            if max_prefix is not None and digits >= max_prefix:
                raise _Stop(MALFORMED, "outer length prefix too long")

    def comma(self, what: str) -> None:
        if self.take(1) != b",":
            raise _Stop(MALFORMED, f"no comma after {what}")

    def netstring(self, what: str) -> bytes:
        data = self.take(self.length())
        self.comma(what)
        return data


def parse_request(data: bytes) -> Parsed:
    """What the request bytes mean by the protocol's rules."""
    reader = _Reader(data)
    try:
        reader.budget = reader.length(OUTER_PREFIX_MAX)
        message = reader.netstring("message")
        addresses = [reader.netstring("sender")]
        while reader.budget:
            addresses.append(reader.netstring("recipient"))
        reader.budget = None
        reader.comma("request")
    except _Stop as stop:
        return Parsed(stop.verdict, why=stop.why)
    sender, *recipients = addresses
    if any(len(a) >= ADDRESS_LIMIT or b"\0" in a for a in addresses):
        verdict = BAD_ADDRESS
    elif not recipients:
        verdict = NO_RECIPIENTS
    else:
        verdict = ACCEPT
    return Parsed(verdict, message, sender, tuple(recipients))


_REPLY = re.compile(rb"\A(\d+):(.*),\Z", re.S)


def answer_class(reply: bytes) -> str:
    """K, Z or D for one well-formed answer netstring; none for no bytes; else garbled."""
    if not reply:
        return "none"
    match = _REPLY.match(reply)
    if not match or int(match[1]) != len(match[2]) or match[2][:1] not in (b"K", b"Z", b"D"):
        return "garbled"
    return match[2][:1].decode()


# -- the Received line qmail-qmqpd prepends ------------------------------------------------

_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.@%+/=:-[]")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def safe(text: str) -> bytes:
    return bytes(ch if ch in _SAFE else ord("?") for ch in text.encode())


def rfc822_date(when: float) -> bytes:
    tm = time.gmtime(when)
    return (f"{tm.tm_mday} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} -0000").encode()


def received_lines(remote_ip: str, local_host: str, started: float, ended: float) -> set[bytes]:
    """Every Received line the server may have written for a request sent in that window
    (no reverse DNS and no ident: the remote host is 'unknown')."""
    return {b"Received: from unknown (" + safe(remote_ip) + b")\n  by " + safe(local_host)
            + b" with QMQP; " + rfc822_date(second) + b"\n"
            for second in range(int(started) - 1, int(ended) + 2)}


def split_received(stored: bytes) -> tuple[bytes, bytes]:
    """(the two-line Received header, the rest) of a stored message; ValueError if absent."""
    if not stored.startswith(b"Received: from "):
        raise ValueError("the stored message does not start with a Received line")
    first = stored.index(b"\n") + 1
    if not stored.startswith(b"  by ", first):
        raise ValueError("the Received line has no second line")
    second = stored.index(b"\n", first) + 1
    return stored[:second], stored[second:]


def encode(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def build_request(message: bytes, sender: bytes, recipients: list[bytes] | tuple[bytes, ...],
                  trailer: bytes = b"") -> bytes:
    inner = encode(message) + encode(sender) + b"".join(encode(r) for r in recipients)
    return encode(inner) + trailer

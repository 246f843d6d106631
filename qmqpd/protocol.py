"""One QMQP request -> Message; qmail-qmqpd's Received line; Reply -> netstring.

Parsing follows qmail-qmqpd (digits-only lengths, a budget from the outer length, a comma
after every piece, addresses under 1000 bytes without NUL), with the safety additions of
qmqpd: a size limit, per-read and per-session timeouts, a minimum transfer rate (in the
reader), a bounded envelope and recipient count parsed in linear time, and a short ``D``
reason for malformed input instead of a silent close.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable
from typing import BinaryIO

from qmqpd.errors import QmqpdError, exit_for_status
from qmqpd.message import Client, Message, MessageData, Reply
from qmqpd.netstring import (
    OUTER_PREFIX_MAX,
    Budget,
    FdSource,
    NetstringError,
    encode,
    expect_comma,
    read_length,
)

# Messages up to this size are kept in memory; larger ones go to an unlinked spool file.
MEMORY_THRESHOLD = 1 << 20
# qmail-qmqpd keeps addresses in a 1000-byte buffer: 999 bytes is the longest accepted.
ADDRESS_MAX = 999
# Sender plus recipients, bytes on the wire: bounds what one request can make us hold.
ENVELOPE_MAX = 16 << 20
# Recipients are parsed in bulk over regions of at most this many buffered bytes; a region
# that is not plain `len:address,` netstrings is parsed one netstring at a time instead.
REGION = 8192
# The canonical decimal length of every acceptable address (index = length).
_LENGTHS = tuple(b"%d" % n for n in range(ADDRESS_MAX + 1))
# Every byte but the two netstring separators (bytes.translate deletes these).
_NOT_SEPARATORS = bytes(range(256)).translate(None, b":,")

_SAFE = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.@%+/=:-[]"
)
# A health check's probe: an empty message, an empty sender, no recipients (`6:0:,0:,,`,
# what packaging/haproxy/qmqpd.cfg sends). No mail client sends it (there is nobody to
# deliver to), so its answer is counted and logged as a health check, not a session.
PROBE = b"6:0:,0:,,"
_PROBE_OUTER = 6
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class Refused(QmqpdError):
    """The request is answered before it is complete (too big, no space, ...).

    ``unread`` is how many bytes the client announced but has not sent yet: they are
    drained (bounded) after the answer so the client really receives it.
    """

    def __init__(self, reply: Reply, unread: int, probe: bool = False) -> None:
        super().__init__(reply.line)
        self.reply = reply
        self.unread = unread
        self.probe = probe  # the request is a health check's PROBE
        self.exit_code = exit_for_status(reply.status)


class BadEnvelope(QmqpdError):
    """The request was read completely but cannot be accepted; answer with ``reply``."""

    def __init__(self, reply: Reply, probe: bool = False) -> None:
        super().__init__(reply.line)
        self.reply = reply
        self.probe = probe  # the request is a health check's PROBE
        self.exit_code = exit_for_status(reply.status)


def safe_field(value: str) -> bytes:
    """qmail's received.c filter: anything outside its safe set becomes '?'."""
    raw = value.encode("utf-8", "replace")
    return bytes(ch if ch in _SAFE else 0x3F for ch in raw)


def date822(when: float) -> bytes:
    tm = time.gmtime(when)
    return b"%d %s %d %02d:%02d:%02d -0000" % (
        tm.tm_mday,
        _MONTHS[tm.tm_mon - 1].encode(),
        tm.tm_year,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
    )


def received_line(client: Client, when: float) -> bytes:
    """The two-line Received header exactly as qmail-qmqpd writes it."""
    host = safe_field(client.remote_host or "unknown")
    info = safe_field(client.remote_info) + b"@" if client.remote_info else b""
    ip = safe_field(client.remote_ip or "unknown")
    local = safe_field(client.local_host or client.local_ip or "unknown")
    return b"Received: from %s (%s%s)\n  by %s with QMQP; %s\n" % (
        host,
        info,
        ip,
        local,
        date822(when),
    )


def _read_address(budget: Budget) -> tuple[bytes, bool]:
    """One envelope address netstring; returns (address, acceptable)."""
    length = read_length(budget.read_byte)
    if length > ADDRESS_MAX:
        budget.skip(length)  # read and dropped, as qmail-qmqpd does
        expect_comma(budget.read_byte)
        return b"", False
    address = budget.read_exact(length)
    expect_comma(budget.read_byte)
    return address, b"\0" not in address


def _plain_recipients(region: bytes) -> list[bytes] | None:
    """The addresses of ``region`` if it is only plain netstrings, else None.

    Plain means ``<len>:<address>,`` repeated, the length in canonical decimal, and the
    address of at most ADDRESS_MAX bytes without ``:``, ``,`` or NUL. Then splitting at
    every separator yields length/address pairs, and these checks prove that a netstring
    parser would read exactly the same addresses: the separators alternate ``:`` ``,``
    and every length equals its address's length. Anything else (a comma inside an
    address, a leading zero, an oversized or NUL address) goes the careful way.
    """
    if b"\0" in region:
        return None
    tokens = region.replace(b":", b",").split(b",")
    addresses = tokens[1::2]
    if region.translate(None, _NOT_SEPARATORS) != b":," * len(addresses):
        return None
    try:
        lengths = list(map(_LENGTHS.__getitem__, map(len, addresses)))
    except IndexError:  # an address longer than ADDRESS_MAX
        return None
    return addresses if tokens[0:-1:2] == lengths else None


def _read_recipients(budget: Budget, limit: int, envelope_start: int) -> tuple[list[bytes], bool]:
    """Recipients up to the end of the budget; linear work per byte, bounded count.

    Raises Refused once the envelope exceeds ENVELOPE_MAX or ``limit`` recipients (0 = no
    limit): the client is answered and the rest drained.
    """
    recipients: list[bytes] = []
    good = True
    careful_until = budget.remaining  # bytes left when the careful parse may stop
    while budget.remaining > 0:
        if envelope_start - budget.remaining > ENVELOPE_MAX:
            raise Refused(Reply.named("too_big"), budget.remaining)
        if limit and len(recipients) > limit:
            raise Refused(Reply.named("too_many_recipients", limit=limit), budget.remaining)
        if budget.remaining <= careful_until:
            region = budget.peek(REGION)
            end = region.rfind(b",") + 1
            plain = _plain_recipients(region[:end]) if end else None
            if plain is not None:
                budget.consume(end)
                recipients += plain
                continue
            # Not plain: parse this region one netstring at a time, then try again.
            careful_until = budget.remaining - max(end, 1)
        recipient, ok = _read_address(budget)
        good = good and ok
        recipients.append(recipient)
    if limit and len(recipients) > limit:
        raise Refused(Reply.named("too_many_recipients", limit=limit), 0)
    return recipients, good


def _read_body(budget: Budget, length: int, spool_dir: str | None) -> MessageData:
    if length <= MEMORY_THRESHOLD:
        return MessageData(data=budget.read_exact(length))
    import tempfile  # large messages only: about 3 ms of a session's start-up otherwise

    # Unlinked at once, so a crash leaves no debris; closed by MessageData.close().
    spool: BinaryIO = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115
    try:
        budget.copy_exact(length, spool)
        spool.flush()
    except BaseException:
        spool.close()
        raise
    return MessageData(spool=spool)


def read_request(
    source: FdSource,
    databytes: int,
    received: bytes,
    spool_dir: str | None = None,
    before_body: Callable[[int], Reply | None] | None = None,
    max_recipients: int = 0,
) -> Message:
    """Read one whole request (``max_recipients`` 0 = no limit).

    Raises NetstringError (malformed), EarlyEOF, IdleTimeout, Refused (answer now, then
    drain) or BadEnvelope (answer after a complete read); the PROBE is always one of the
    last two, with `probe` set.
    """
    outer = read_length(source.read_byte, OUTER_PREFIX_MAX)
    budget = Budget(source, outer)
    if databytes and outer > databytes + ENVELOPE_MAX:
        raise Refused(Reply.named("too_big"), outer)
    length = read_length(budget.read_byte)
    if databytes and length > databytes:
        raise Refused(Reply.named("too_big"), budget.remaining)
    # An empty message in a 6-byte request leaves room for an empty sender only: the PROBE.
    probe = outer == _PROBE_OUTER and length == 0
    if before_body is not None:
        refusal = before_body(length)
        if refusal is not None:  # a probe answered so: the node cannot take mail
            raise Refused(refusal, budget.remaining, probe)
    data = _read_body(budget, length, spool_dir)
    try:
        expect_comma(budget.read_byte)
        envelope_start = budget.remaining
        sender, good = _read_address(budget)
        recipients, ok = _read_recipients(budget, max_recipients, envelope_start)
        good = good and ok
        if source.read_byte() != 0x2C:
            raise NetstringError("missing comma after request")
    except BaseException:
        data.close()
        raise
    if not good:
        data.close()
        raise BadEnvelope(Reply.named("bad_address"))
    if not recipients:
        data.close()
        raise BadEnvelope(Reply.named("no_recipients"), probe)
    return Message(sender=sender, recipients=recipients, data=data, received=received)


def protocol_error(error: NetstringError) -> Reply:
    return Reply.named("protocol", reason=error.reason)


def encode_reply(reply: Reply) -> bytes:
    return encode(reply.line.encode("utf-8", "replace"))


def write_reply(fd: int, reply: Reply, timeout: float) -> bool:
    """Send the answer; False when the peer is gone or does not read within timeout."""
    data = encode_reply(reply)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while data:
        if not poller.poll(timeout * 1000):
            return False
        try:
            written = os.write(fd, data)
        except OSError:
            return False
        data = data[written:]
    return True

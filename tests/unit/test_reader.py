"""The session reader: bulk recipient parsing equals a netstring parse, MAXRECIPIENTS, the
minimum transfer rate, and an envelope writer that is linear in the recipient count."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmqpd.message import Reply
from qmqpd.netstring import FdSource, IdleTimeout, NetstringError, TooSlow, encode
from qmqpd.protocol import REGION, BadEnvelope, Refused, _plain_recipients, read_request
from qmqpd.queue import EXIT_ENVELOPE, EXIT_TOO_LONG, QueueError, envelope_bytes

RECEIVED = b"Received: test\n"


def request(recipients: list[bytes], sender: bytes = b"s@example.org") -> bytes:
    inner = encode(b"Subject: x\n\nbody\n") + encode(sender)
    return encode(inner + b"".join(encode(r) for r in recipients))


class Peer:
    """The far end of a socketpair, written from a thread (so big inputs never block)."""

    def __init__(self, chunks: list[bytes], close: bool = True) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.thread = threading.Thread(target=self._write, args=(chunks, close), daemon=True)
        self.thread.start()

    def _write(self, chunks: list[bytes], close: bool) -> None:
        try:
            for chunk in chunks:
                self.theirs.sendall(chunk)
            if close:
                self.theirs.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()
        self.thread.join(5)


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for peer in started:
        peer.close()


def parse(peers: list[Peer], chunks: list[bytes], **kw: object):
    peer = Peer(chunks)
    peers.append(peer)
    source = FdSource(peer.ours.fileno(), 5.0, time.monotonic() + 30)
    return read_request(source, 0, RECEIVED, **kw)  # type: ignore[arg-type]


def reference_recipients(envelope: bytes) -> list[bytes]:
    """An independent netstring splitter (the slow obvious way)."""
    out = []
    while envelope:
        head, colon, rest = envelope.partition(b":")
        assert colon and head.isdigit()
        size = int(head)
        assert rest[size : size + 1] == b","
        out.append(rest[:size])
        envelope = rest[size + 1 :]
    return out


# -- the bulk path -------------------------------------------------------------------------

def test_plain_region_is_parsed_in_bulk() -> None:
    region = b"1:a,3:b@c,0:,11:x@example.o,"
    assert _plain_recipients(region) == [b"a", b"b@c", b"", b"x@example.o"]


@pytest.mark.parametrize(
    "region",
    [
        b"1,a:1:a,",  # separators out of order, yet the lengths would match
        b"3:a:b,",  # a colon inside an address
        b"3:a,b,",  # a comma inside an address
        b"01:a,",  # a leading zero
        b"2:a,",  # wrong length
        b"1:\0,",  # NUL
        b"1000:" + b"x" * 1000 + b",",  # longer than an address may be
        b"x:a,",
    ],
)
def test_irregular_regions_are_left_to_the_careful_parse(region: bytes) -> None:
    assert _plain_recipients(region) is None


addresses = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"a", b"", b"a:b", b"a,b", b",", b":", b"1:a,", b"x\0y"]),
    st.binary(min_size=995, max_size=1005),
)


@settings(max_examples=80, deadline=None)
@given(recipients=st.lists(addresses, min_size=1, max_size=60),
       cuts=st.lists(st.integers(min_value=1, max_value=5000), max_size=8))
def test_bulk_parse_equals_a_netstring_parse(recipients: list[bytes], cuts: list[int]) -> None:
    data = request(recipients)
    chunks, position = [], 0
    for cut in sorted(cuts):
        if position < cut < len(data):
            chunks.append(data[position:cut])
            position = cut
    chunks.append(data[position:])
    peer = Peer(chunks)
    try:
        source = FdSource(peer.ours.fileno(), 5.0, time.monotonic() + 30)
        acceptable = all(len(r) <= 999 and b"\0" not in r for r in recipients)
        if acceptable:
            message = read_request(source, 0, RECEIVED)
            assert message.recipients == recipients
            message.close()
        else:
            with pytest.raises(BadEnvelope):
                read_request(source, 0, RECEIVED)
    finally:
        peer.close()


def test_many_regions_of_one_byte_recipients(peers: list[Peer]) -> None:
    recipients = [bytes([97 + i % 26]) for i in range(50_000)]  # about 25 regions
    recipients[30_000] = b"odd,one"  # the careful parse in the middle, bulk again after
    message = parse(peers, [request(recipients)])
    assert message.recipients == recipients
    assert len(b"".join(encode(r) for r in recipients)) > 20 * REGION


def test_malformed_recipient_after_plain_ones_is_a_protocol_error(peers: list[Peer]) -> None:
    inner = encode(b"x") + encode(b"s") + b"1:a," * 5000 + b"1:b;"
    with pytest.raises(NetstringError, match="missing comma"):
        parse(peers, [encode(inner)])


# -- MAXRECIPIENTS -------------------------------------------------------------------------

def test_recipients_up_to_the_limit_are_accepted(peers: list[Peer]) -> None:
    recipients = [b"r%d@example.org" % i for i in range(1000)]
    assert parse(peers, [request(recipients)], max_recipients=1000).recipients == recipients


@pytest.mark.parametrize("count", [11, 1001, 40_000])
def test_more_recipients_than_the_limit_get_d(peers: list[Peer], count: int) -> None:
    limit = 10 if count == 11 else 1000
    data = request([b"r@example.org"] * count)
    with pytest.raises(Refused) as info:
        parse(peers, [data], max_recipients=limit)
    assert info.value.reply == Reply.named("too_many_recipients", limit=limit)
    assert info.value.reply.line == (
        f"Dtoo many recipients: at most {limit} per message (#5.5.3)")
    assert info.value.unread < len(data)  # the rest is drained, not parsed


def test_zero_means_no_recipient_limit(peers: list[Peer]) -> None:
    assert len(parse(peers, [request([b"a"] * 200_000)], max_recipients=0).recipients) == 200_000


# -- minimum transfer rate -----------------------------------------------------------------

class Clock:
    """A monotonic clock the test moves: the rate rule is decided without waiting for it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def peer_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Our end and the client's end of a socketpair, written by the test itself."""
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_slow_sender_is_cut_once_its_bytes_stop_covering_the_rate(peer_pair) -> None:
    ours, theirs = peer_pair
    clock = Clock()
    source = FdSource(ours.fileno(), 30.0, clock() + 60, min_rate=100, grace=1, clock=clock)
    theirs.sendall(b"x" * 100)
    assert source.read_exact(100) == b"x" * 100  # within the grace
    clock.now = 1001.9  # past the grace, but 100 bytes at 100 bytes/s bought 1 s more
    theirs.sendall(b"y" * 50)
    assert source.read_exact(50) == b"y" * 50
    assert source.rate_deadline() == 1000 + 1 + 150 / 100
    clock.now = 1002.6  # 0.1 s after what 150 bytes bought: cut, though bytes are waiting
    theirs.sendall(b"z" * 1000)
    with pytest.raises(TooSlow, match=r"150 bytes in 3s, below 100 bytes/s after 1s") as info:
        source.read_byte()
    assert isinstance(info.value, IdleTimeout)  # callers that only know timeouts still stop


def test_fast_sender_with_a_stall_keeps_its_credit(peer_pair) -> None:
    """20 KB at once buys 20 KB / 10 KB/s = 2 s more beyond the grace: a 1.5 s stall is fine."""
    ours, theirs = peer_pair
    clock = Clock()
    data = request([b"r@example.org"] * 1400)
    source = FdSource(ours.fileno(), 30.0, clock() + 60, min_rate=10_000, grace=0.2,
                      clock=clock)
    theirs.sendall(data[:20000])
    assert source.read_exact(20000) == data[:20000]
    clock.now += 1.5 + 0.2  # the grace and a 1.5 s stall
    theirs.sendall(data[20000:])
    theirs.shutdown(socket.SHUT_WR)
    assert source.read_exact(len(data) - 20000) == data[20000:]


def test_a_refused_slow_sender_is_not_drained_past_its_rate(peer_pair) -> None:
    """After an early answer the rest is drained, but no longer than the rate rule allows."""
    ours, theirs = peer_pair
    clock = Clock()
    source = FdSource(ours.fileno(), 30.0, clock() + 60, min_rate=100, grace=1, clock=clock)
    theirs.sendall(request([b"r@example.org"]))
    read_request(source, 0, RECEIVED).close()
    read = source.received
    theirs.sendall(b"x" * 10)
    clock.now = source.rate_deadline() - 0.5  # still covered: drained
    source.drain(10, 20.0)
    assert source.received == read + 10
    theirs.sendall(b"y" * 10)
    clock.now = source.rate_deadline() + 0.1  # past what its bytes bought: not read at all
    source.drain(1 << 20, 20.0)
    assert source.received == read + 10


def test_no_minimum_rate_waits_for_the_idle_timeout(peers: list[Peer]) -> None:
    peer = Peer([b"100:5:hel"], close=False)
    peers.append(peer)
    source = FdSource(peer.ours.fileno(), 0.5, time.monotonic() + 60, min_rate=0, grace=0)
    with pytest.raises(IdleTimeout, match="idle") as info:
        read_request(source, 0, RECEIVED)
    assert not isinstance(info.value, TooSlow)


# -- the envelope writer -------------------------------------------------------------------

def test_envelope_bytes_of_many_recipients() -> None:
    recipients = [b"r%d" % i for i in range(10_000)]
    expected = b"u1\0p2\0Fs\0" + b"".join(b"T" + r + b"\0" for r in recipients)
    assert envelope_bytes(b"s", recipients, 1, 2) == expected


def test_envelope_nul_in_a_late_recipient_is_refused() -> None:
    recipients = [b"a"] * 9000 + [b"b\0c"]
    with pytest.raises(QueueError) as info:
        envelope_bytes(b"s", recipients, 1, 2)
    assert info.value.exit_code == EXIT_ENVELOPE


def test_envelope_long_address_is_refused() -> None:
    with pytest.raises(QueueError) as info:
        envelope_bytes(b"s", [b"a"] * 5000 + [b"x" * 1003], 1, 2)
    assert info.value.exit_code == EXIT_TOO_LONG

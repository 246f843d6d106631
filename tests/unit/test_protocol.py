"""netstring + protocol: every malformed input gets its documented outcome; random splits of
valid requests parse identically."""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmqpd.message import Client, Reply
from qmqpd.netstring import (
    EarlyEOF,
    FdSource,
    IdleTimeout,
    NetstringError,
    encode,
)
from qmqpd.protocol import (
    MEMORY_THRESHOLD,
    BadEnvelope,
    Refused,
    date822,
    encode_reply,
    protocol_error,
    read_request,
    received_line,
    safe_field,
)

RECEIVED = b"Received: test\n"
_PEERS: list[socket.socket] = []


def request(message: bytes, sender: bytes, recipients: list[bytes]) -> bytes:
    inner = encode(message) + encode(sender) + b"".join(encode(r) for r in recipients)
    return encode(inner)


def feed(chunks: list[bytes], close: bool = True, pause: float = 0.0) -> socket.socket:
    """A socket whose peer writes the chunks (from a thread, so big inputs never block)."""
    ours, theirs = socket.socketpair()

    def writer() -> None:
        try:
            for chunk in chunks:
                theirs.sendall(chunk)
                if pause:
                    time.sleep(pause)
            if close:
                theirs.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    _PEERS.append(theirs)  # the peer stays open until the test module ends
    return ours


def parse(chunks: list[bytes], databytes: int = 0, timeout: float = 5.0, **kw):
    sock = feed(chunks)
    peer = _PEERS.pop()  # read to the end here: the peer can go with it (hypothesis runs
    try:                 # this hundreds of times; kept, their descriptors pile up)
        source = FdSource(sock.fileno(), timeout, time.monotonic() + 30)
        return read_request(source, databytes, RECEIVED, **kw)
    finally:
        sock.close()
        peer.close()


def test_valid_request_parses() -> None:
    msg = parse([request(b"Subject: x\n\nbody\n", b"a@example.org", [b"b@x.org", b"c@y.org"])])
    assert msg.sender == b"a@example.org"
    assert msg.recipients == [b"b@x.org", b"c@y.org"]
    assert b"".join(msg.final_chunks()) == RECEIVED + b"Subject: x\n\nbody\n"
    assert msg.data.in_memory


def test_empty_sender_is_a_bounce_and_allowed() -> None:
    assert parse([request(b"x\n", b"", [b"b@x.org"])]).sender == b""


def test_bytes_after_outer_comma_are_ignored() -> None:
    msg = parse([request(b"x\n", b"a@b", [b"c@d"]) + b"trailing garbage"])
    assert msg.recipients == [b"c@d"]


def test_large_message_is_spooled_not_in_memory(tmp_path) -> None:
    body = os.urandom(MEMORY_THRESHOLD + 12345)
    msg = parse([request(body, b"a@b", [b"c@d"])], spool_dir=str(tmp_path))
    assert not msg.data.in_memory
    assert msg.data.size == len(body)
    assert b"".join(msg.data.chunks()) == body
    assert os.listdir(tmp_path) == []  # the spool file is unlinked


MALFORMED = [
    (b"abc:", "bad netstring length"),
    (b"12x:", "bad netstring length"),
    (b":", "empty netstring length"),
    (b"-5:", "bad netstring length"),
    (b"9" * 101 + b":", "netstring length too large"),
    (b"0" * 100 + b"5:", "netstring length prefix too long"),
    (b"30000000000:", "netstring length too large"),
    (b"10:1:x,1:a,0:,", "request longer than its outer length"),
    (b"20:1:x;1:a,1:b,", "missing comma after netstring"),
    (encode(b"1:x,1:a,1:b,")[:-1] + b";", "missing comma after request"),
    (b"13:1:x,1:a,3:bcd,,", "request longer than its outer length"),
    (b"12:1:x,1a,1:b,", "bad netstring length"),
]


@pytest.mark.parametrize(("data", "reason"), MALFORMED)
def test_malformed_input_is_a_protocol_error(data: bytes, reason: str) -> None:
    with pytest.raises(NetstringError) as info:
        parse([data])
    assert not isinstance(info.value, EarlyEOF)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "data",
    [b"", b"12", b"12:1:x,", request(b"x", b"a", [b"b"])[:-1], b"100:" + b"5:hello,"],
)
def test_early_eof(data: bytes) -> None:
    with pytest.raises(EarlyEOF):
        parse([data])


def test_idle_timeout() -> None:
    sock = feed([b"100:5:hel"], close=False)
    source = FdSource(sock.fileno(), 0.2, time.monotonic() + 30)
    started = time.monotonic()
    with pytest.raises(IdleTimeout):
        read_request(source, 0, RECEIVED)
    assert time.monotonic() - started < 5
    sock.close()


def test_session_deadline_beats_a_trickling_client() -> None:
    data = request(b"x" * 200, b"a", [b"b"])
    sock = feed([data[i : i + 1] for i in range(len(data))], close=False, pause=0.05)
    source = FdSource(sock.fileno(), 5.0, time.monotonic() + 0.5)
    with pytest.raises(IdleTimeout, match="session limit"):
        read_request(source, 0, RECEIVED)
    sock.close()


def test_too_big_is_refused_before_the_body() -> None:
    with pytest.raises(Refused) as info:
        parse([request(b"x" * 1000, b"a", [b"b"])], databytes=999)
    assert info.value.reply == Reply("D", "message too big (#5.3.4)")
    assert info.value.unread > 1000


def test_databytes_exactly_is_accepted() -> None:
    assert parse([request(b"x" * 999, b"a", [b"b"])], databytes=999).data.size == 999


def test_before_body_can_refuse() -> None:
    refusal = Reply.named("disk_full")
    with pytest.raises(Refused) as info:
        parse([request(b"hello", b"a", [b"b"])], before_body=lambda n: refusal)
    assert info.value.reply is refusal


@pytest.mark.parametrize(
    ("sender", "recipients"),
    [
        (b"a" * 1000, [b"b"]),
        (b"a", [b"ok", b"c" * 1000]),
        (b"a\0b", [b"b"]),
        (b"a", [b"b\0"]),
    ],
)
def test_bad_addresses(sender: bytes, recipients: list[bytes]) -> None:
    with pytest.raises(BadEnvelope) as info:
        parse([request(b"x", sender, recipients)])
    assert info.value.reply.line == "Dsorry, I can't accept addresses like that (#5.1.3)"


def test_999_byte_address_is_accepted() -> None:
    assert parse([request(b"x", b"a" * 999, [b"r" * 999])]).sender == b"a" * 999


def test_no_recipients_is_refused() -> None:
    with pytest.raises(BadEnvelope) as info:
        parse([request(b"x", b"a", [])])
    assert info.value.reply.status == "D"


message_bytes = st.binary(max_size=3000)
address = st.binary(max_size=60).filter(lambda a: b"\0" not in a)


@settings(max_examples=60, deadline=None)
@given(
    message=message_bytes,
    sender=address,
    recipients=st.lists(address, min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
)
def test_random_splits_parse_identically(message, sender, recipients, cuts) -> None:
    data = request(message, sender, recipients)
    points = sorted({c for c in cuts if 0 < c < len(data)})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    msg = parse(chunks)
    assert (msg.data.bytes(), msg.sender, msg.recipients) == (message, sender, recipients)


def whole_outer(data: bytes) -> bool:
    """data holds a complete outer netstring (digits, colon, that many bytes, one more)."""
    head = re.match(rb"(\d+):", data)
    return head is not None and len(data) >= head.end() + int(head.group(1)) + 1


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200) | st.builds(request, message_bytes, address,
                                           st.lists(address, max_size=3)),
       st.sampled_from([0, 20]), st.sampled_from([0, 2]))
def test_arbitrary_bytes_never_crash(data: bytes, databytes: int, most: int) -> None:
    """Anything a client sends ends in a message or one of the documented outcomes, each
    only where it belongs; an escaping exception of any other kind fails the test."""
    try:
        msg = parse([data], databytes, max_recipients=most)
    except EarlyEOF:
        assert not whole_outer(data)  # the peer closed before its outer netstring ended
    except NetstringError as error:  # malformed: a short, printable D reason
        assert 0 < len(error.reason) <= 80 and error.reason.isascii()
        assert error.reason.isprintable()
        assert protocol_error(error).status == "D"
    except Refused as refusal:  # only a configured limit refuses before the end
        assert databytes or most
        assert refusal.reply.status == "D" and refusal.unread >= 0
    except BadEnvelope as bad:  # read whole, then refused
        assert whole_outer(data)
        assert bad.reply in (Reply.named("bad_address"), Reply.named("no_recipients"))
    else:
        assert whole_outer(data)
        assert msg.recipients and (not most or len(msg.recipients) <= most)
        assert not databytes or msg.data.size <= databytes
        assert all(b"\0" not in a for a in [msg.sender, *msg.recipients])
        msg.data.close()


def test_received_line_matches_qmail_form() -> None:
    client = Client(remote_ip="10.1.2.3", local_ip="10.0.0.1", remote_host="relay.example.org")
    when = 1795913427  # 2026-11-28 00:50:27 UTC
    assert received_line(client, when) == (
        b"Received: from relay.example.org (10.1.2.3)\n"
        b"  by 10.0.0.1 with QMQP; " + date822(when) + b"\n"
    )
    assert date822(when) == time.strftime("%-d %b %Y %H:%M:%S -0000", time.gmtime(when)).encode()


def test_received_line_defaults_and_sanitising() -> None:
    client = Client(remote_ip="1.2.3.4", remote_info="ev il", local_host="mx<1>.example",
                    local_ip="5.6.7.8")
    line = received_line(client, 0)
    assert line.startswith(
        b"Received: from unknown (ev?il@1.2.3.4)\n  by mx?1?.example with QMQP; "
    )
    assert line.endswith(b"1 Jan 1970 00:00:00 -0000\n")
    assert safe_field("a_b#c[d]é") == b"a?b?c[d]??"


def test_reply_is_one_netstring() -> None:
    assert encode_reply(Reply.ok(1795913427, 6877)) == b"22:Kok 1795913427 qp 6877,"

"""PROXY protocol v1/v2 headers: parsing, budgets, split arrivals, trusted sources, and
reading a header off a real loopback TCP connection without taking the client's bytes."""

from __future__ import annotations

import ipaddress
import itertools
import select
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmqpd import config as config_mod
from qmqpd.proxy import (
    DEFAULT_BUDGET,
    NEED_MORE,
    V1_MAX,
    V2_FIXED,
    V2_SIGNATURE,
    HeaderReader,
    Policy,
    ProxyError,
    ProxyHeader,
    parse,
    parse_networks,
)

QMQP_REQUEST = b"20:4:body,4:from,4:rcpt,,"


def v2(command: int = 1, family: int = 1, transport: int = 1, block: bytes = b"",
       declared: int | None = None, version: int = 2) -> bytes:
    length = len(block) if declared is None else declared
    return (V2_SIGNATURE + bytes([version << 4 | command, family << 4 | transport])
            + struct.pack(">H", length) + block)


def v2_inet(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    block = (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
             + struct.pack(">HH", sport, dport) + tlvs)
    return v2(family=1, block=block)


def v2_inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    block = (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
             + struct.pack(">HH", sport, dport))
    return v2(family=2, block=block)


# ---- v1 -------------------------------------------------------------------------------
def test_v1_tcp4() -> None:
    line = b"PROXY TCP4 192.0.2.7 127.0.0.11 40123 628\r\n"
    header = parse(line + QMQP_REQUEST, "v1")
    assert header == ProxyHeader(1, "proxy", "tcp4", ("192.0.2.7", 40123),
                                 ("127.0.0.11", 628), len(line))


def test_v1_tcp6_is_normalised() -> None:
    line = b"PROXY TCP6 2001:DB8:0:0::1 ::1 65535 0\r\n"
    header = parse(line, "any")
    assert isinstance(header, ProxyHeader)
    assert header.family == "tcp6"
    assert header.source == ("2001:db8::1", 65535)
    assert header.destination == ("::1", 0)


@pytest.mark.parametrize("address", [
    "fe80::1%eth0", "fe80::1%1", "::ffff:192.0.2.1", "::192.0.2.1", "64:ff9b::192.0.2.33",
    "2001:db8::1%25",
])
def test_v1_ipv6_outside_the_spec_is_refused(address: str) -> None:
    """Hex groups and one `::` only: Python would take a scope and a dotted tail."""
    line = f"PROXY TCP6 {address} ::1 40000 628\r\n".encode()
    with pytest.raises(ProxyError, match="not an IPv6 address in hex groups"):
        parse(line, "v1")
    with pytest.raises(ProxyError, match="not an IPv6 address in hex groups"):
        parse(f"PROXY TCP6 ::1 {address} 40000 628\r\n".encode(), "v1")


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses(v=6))
def test_v1_ipv6_in_hex_groups_is_taken_and_a_dotted_tail_is_not(
        address: ipaddress.IPv6Address) -> None:
    for text in (address.compressed, address.exploded, address.exploded.upper()):
        header = parse(f"PROXY TCP6 {text} ::1 1 2\r\n".encode(), "v1")
        assert isinstance(header, ProxyHeader) and header.source == (str(address), 1)
    dotted = f"{address.exploded[:30]}{ipaddress.IPv4Address(address.packed[-4:])}"
    assert ipaddress.IPv6Address(dotted) == address  # the same address, written otherwise
    with pytest.raises(ProxyError):
        parse(f"PROXY TCP6 {dotted} ::1 1 2\r\n".encode(), "v1")


def test_v1_ipv4_with_leading_zeros_is_refused() -> None:
    with pytest.raises(ProxyError, match="not an IP address"):
        parse(b"PROXY TCP4 192.0.2.010 127.0.0.1 1 2\r\n", "v1")


def test_v1_unknown_keeps_the_real_endpoints() -> None:
    line = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
    header = parse(line + b"rest", "v1")
    assert isinstance(header, ProxyHeader)
    assert (header.family, header.source, header.length) == ("unknown", None, len(line))
    policy = Policy("v1", parse_networks(["10.0.0.10"]))
    assert policy.client_of(header, ("10.0.0.10", 5000)) == ("10.0.0.10", 5000)


def test_v1_longest_line_is_accepted_and_one_more_byte_is_not() -> None:
    src = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    longest_tcp6 = f"PROXY TCP6 {src} {src} 65535 65535\r\n".encode()
    assert isinstance(parse(longest_tcp6, "v1"), ProxyHeader)
    # The spec's worst case is an UNKNOWN line of 107 bytes, CRLF included.
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX - 16) + b"\r\n"
    assert len(line) == V1_MAX
    assert isinstance(parse(line, "v1"), ProxyHeader)
    with pytest.raises(ProxyError, match="longer than 107"):
        parse(line[:-2] + b"x\r\n", "v1")
    with pytest.raises(ProxyError, match="longer than 107"):
        parse(b"PROXY UNKNOWN " + b"x" * 200, "v1")


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.7 127.0.0.11 40123\r\n",  # a field missing
    b"PROXY TCP4 192.0.2.7  127.0.0.11 40123 628\r\n",  # two blanks
    b"PROXY TCP4 ::1 127.0.0.11 40123 628\r\n",  # v6 address in TCP4
    b"PROXY TCP6 192.0.2.7 ::1 40123 628\r\n",  # v4 address in TCP6
    b"PROXY TCP4 192.0.2.7 127.0.0.11 65536 628\r\n",  # port too big
    b"PROXY TCP4 192.0.2.7 127.0.0.11 0628 628\r\n",  # leading zero
    b"PROXY TCP4 192.0.2.7 127.0.0.11 -1 628\r\n",
    b"PROXY TCP4 192.0.2.300 127.0.0.11 1 628\r\n",
    b"PROXY UDP4 192.0.2.7 127.0.0.11 1 628\r\n",
    b"PROXY TCP4 192.0.2.7 127.0.0.11 1 628\n",  # bare LF
    b"PROXY TCP4 192.0.2.7\x00 127.0.0.11 1 628\r\n",
    b"PROXY TCP4 192.0.2.7\r127.0.0.11 1 628\r\n",
])
def test_v1_malformed_lines_are_refused(line: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(line, "v1")


# ---- v2 -------------------------------------------------------------------------------
def test_v2_tcp4_with_tlvs_skipped() -> None:
    tlvs = bytes([0x05, 0, 4]) + b"uid1" + bytes([0x04, 0, 0])  # UNIQUE_ID, NOOP
    data = v2_inet("198.51.100.9", "127.0.0.12", 1234, 628, tlvs)
    header = parse(data + QMQP_REQUEST, "v2")
    assert header == ProxyHeader(2, "proxy", "tcp4", ("198.51.100.9", 1234),
                                 ("127.0.0.12", 628), len(data))


def test_v2_tcp6() -> None:
    data = v2_inet6("2001:db8::42", "::1", 40000, 628)
    header = parse(data, "any")
    assert isinstance(header, ProxyHeader)
    assert (header.family, header.source, header.destination) == (
        "tcp6", ("2001:db8::42", 40000), ("::1", 628))
    assert header.length == 16 + 36


def test_v2_local_is_the_proxy_itself_whatever_the_block_says() -> None:
    data = v2(command=0, family=0, transport=0, block=b"")
    header = parse(data + QMQP_REQUEST, "v2")
    assert header == ProxyHeader(2, "local", "unspec", None, None, 16)
    odd = v2(command=0, family=1, transport=2, block=b"\x01\x02")  # ignored for LOCAL
    assert parse(odd, "v2") == ProxyHeader(2, "local", "unspec", None, None, 18)
    policy = Policy("v2", parse_networks(["10.0.0.10"]))
    assert policy.client_of(parse(data, "v2"), ("10.0.0.10", 9)) == ("10.0.0.10", 9)


def test_v2_unspec_and_unix_families_keep_the_real_endpoints() -> None:
    unspec = parse(v2(command=1, family=0, transport=0), "v2")
    unix = parse(v2(command=1, family=3, transport=1, block=bytes(216)), "v2")
    assert isinstance(unspec, ProxyHeader) and isinstance(unix, ProxyHeader)
    assert (unspec.family, unspec.source) == ("unspec", None)
    assert (unix.family, unix.source) == ("unix", None)


@pytest.mark.parametrize("family", [1, 2, 3])
def test_v2_unspecified_transport_keeps_the_real_endpoints(family: int) -> None:
    """0x10, 0x20, 0x30: an address family with transport UNSPEC; the spec: "the receiver
    should ignore address information" (it used to be read as the client)."""
    addresses = v2_inet("192.0.2.7", "127.0.0.1", 40000, 628)[V2_FIXED:]
    for block in (addresses, b"", bytes(3)):  # whatever follows, however short
        header = parse(v2(command=1, family=family, transport=0, block=block), "v2")
        assert isinstance(header, ProxyHeader)
        assert (header.family, header.source, header.destination) == ("unspec", None, None)
        assert header.length == V2_FIXED + len(block)
        assert Policy("v2", parse_networks(["10.0.0.10"])).client_of(
            header, ("10.0.0.10", 9)) == ("10.0.0.10", 9)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 1), st.integers(0, 255), st.binary(max_size=220))
def test_v2_every_family_byte_as_the_spec_says(command: int, byte: int, block: bytes) -> None:
    """Defined families 0-3 and transports 0-2 only; addresses read for TCP over IPv4 and
    IPv6 only (0x11, 0x21), ignored for LOCAL, UNSPEC and unix; datagrams refused."""
    data = V2_SIGNATURE + bytes([0x20 | command, byte]) + struct.pack(">H", len(block)) + block
    family, transport = byte >> 4, byte & 0x0F
    try:
        header = parse(data, "v2")
    except ProxyError:
        assert (family > 3 or transport > 2
                or (command == 1 and transport == 2)
                or (command == 1 and transport == 1 and len(block) < (12, 36, 216)[family - 1]
                    if family else False))
        return
    assert isinstance(header, ProxyHeader) and header.length == len(data)
    if command == 1 and byte in (0x11, 0x21):
        assert header.source is not None and header.family == ("tcp4", "tcp6")[family - 1]
    else:
        assert header.source is None and header.destination is None


@pytest.mark.parametrize("data, reason", [
    (v2(version=1, block=bytes(12)), "version 1"),
    (v2(command=2, block=bytes(12)), "unknown command"),
    (v2(family=4, block=bytes(12)), "unknown family"),
    (v2(transport=3, block=bytes(12)), "unknown family"),
    (v2(family=1, transport=2, block=bytes(12)), "datagram"),
    (v2(family=1, block=bytes(11)), "too short"),
    (v2(family=2, block=bytes(35)), "too short"),
    (v2(family=3, block=bytes(100)), "too short"),
])
def test_v2_malformed_headers_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyError, match=reason):
        parse(data, "v2")


def test_v2_block_over_the_budget_is_refused_before_it_arrives() -> None:
    head = v2(family=1, block=b"", declared=0xFFFF)
    with pytest.raises(ProxyError, match="over the budget"):
        parse(head, "v2")  # only the 16 fixed bytes: no need to wait for 64 KiB
    within = v2_inet("192.0.2.1", "192.0.2.2", 1, 2, tlvs=bytes([0x04, 0, 200]) + bytes(200))
    assert isinstance(parse(within, "v2"), ProxyHeader)
    with pytest.raises(ProxyError, match="over the budget"):
        parse(within, "v2", budget=100)


# ---- modes, garbage, truncation -------------------------------------------------------
def test_mode_limits_the_version() -> None:
    one = b"PROXY TCP4 192.0.2.7 127.0.0.11 1 2\r\n"
    two = v2_inet("192.0.2.7", "127.0.0.11", 1, 2)
    with pytest.raises(ProxyError, match="v2 header"):
        parse(one, "v2")
    with pytest.raises(ProxyError, match="v1 line"):
        parse(two, "v1")
    assert isinstance(parse(one, "any"), ProxyHeader)
    assert isinstance(parse(two, "any"), ProxyHeader)
    with pytest.raises(ValueError):
        parse(one, "off")


@pytest.mark.parametrize("data", [QMQP_REQUEST, b"GET / HTTP/1.0\r\n", b"\x00" * 20,
                                  b"proxy TCP4", b"\r\n\r\n\x00\r\nQUIT!"])
def test_garbage_is_refused_at_the_first_wrong_byte(data: bytes) -> None:
    with pytest.raises(ProxyError, match="does not start with"):
        parse(data, "any")


@pytest.mark.parametrize("complete", [
    b"PROXY TCP4 192.0.2.7 127.0.0.11 40123 628\r\n",
    v2_inet("192.0.2.7", "127.0.0.11", 40123, 628),
    v2_inet6("2001:db8::1", "::1", 1, 2),
])
def test_every_truncation_needs_more(complete: bytes) -> None:
    for size in range(len(complete)):
        assert parse(complete[:size], "any") is NEED_MORE, size


def _chunks(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(points):
        yield data[start:end]


headers = st.one_of(
    st.builds(lambda a, b, p, q: f"PROXY TCP4 {a} {b} {p} {q}\r\n".encode(),
              st.ip_addresses(v=4), st.ip_addresses(v=4), st.integers(0, 65535),
              st.integers(0, 65535)),
    st.builds(lambda a, b, p, q: f"PROXY TCP6 {a} {b} {p} {q}\r\n".encode(),
              st.ip_addresses(v=6), st.ip_addresses(v=6), st.integers(0, 65535),
              st.integers(0, 65535)),
    st.builds(lambda a, b, p, q: v2_inet(str(a), str(b), p, q), st.ip_addresses(v=4),
              st.ip_addresses(v=4), st.integers(0, 65535), st.integers(0, 65535)),
    st.builds(lambda a, b, p, q: v2_inet6(str(a), str(b), p, q), st.ip_addresses(v=6),
              st.ip_addresses(v=6), st.integers(0, 65535), st.integers(0, 65535)),
)


@settings(max_examples=200, deadline=None)
@given(headers, st.lists(st.integers(0, 200), max_size=8), st.binary(max_size=40))
def test_split_arrivals_give_the_same_header(data: bytes, cuts: list[int],
                                             rest: bytes) -> None:
    """Byte by byte or in any pieces: NEED_MORE until complete, then the same header,
    whose length never reaches into the client's own bytes."""
    whole = parse(data + rest, "any")
    assert isinstance(whole, ProxyHeader) and whole.length == len(data)
    received = b""
    for chunk in _chunks(data, cuts):
        received += chunk
        result = parse(received, "any")
        if len(received) < len(data):
            assert result is NEED_MORE
    assert parse(received, "any") == whole
    for size in range(len(data)):  # byte by byte
        assert parse(data[:size], "any") is NEED_MORE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_need_more_or_proxy_error(data: bytes) -> None:
    try:
        result = parse(data, "any")
    except ProxyError:
        return
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= max(len(data), 0) and result.length <= DEFAULT_BUDGET


# ---- the policy -----------------------------------------------------------------------
def test_trusted_sources_by_address_and_prefix() -> None:
    policy = Policy("v2", parse_networks(["10.0.0.10", "10.1.0.0/16", "2001:db8::/32"]))
    assert policy.trusts("10.0.0.10")
    assert policy.trusts("::ffff:10.0.0.10")  # v4-mapped, as a dual-stack socket shows it
    assert policy.trusts("10.1.200.3")
    assert policy.trusts("2001:db8:1::5")
    assert not policy.trusts("10.0.0.11")
    assert not policy.trusts("10.2.0.1")
    assert not policy.trusts("not an ip")
    policy.check_source("10.1.0.1")
    with pytest.raises(ProxyError, match="not in PROXY_TRUSTED"):
        policy.check_source("127.0.0.2")
    Policy().check_source("127.0.0.2")  # off: nobody needs to be trusted


def test_a_claimed_client_replaces_the_proxy_address() -> None:
    policy = Policy("any", parse_networks(["10.0.0.10"]))
    header = parse(b"PROXY TCP4 127.0.0.2 127.0.0.11 5555 628\r\n", "any")
    assert isinstance(header, ProxyHeader)
    assert policy.client_of(header, ("10.0.0.10", 40000)) == ("127.0.0.2", 5555)


def test_policy_needs_trusted_sources_when_on() -> None:
    with pytest.raises(ValueError, match="PROXY_TRUSTED is empty"):
        Policy("v1")
    with pytest.raises(ValueError, match="allowed"):
        Policy("v3", parse_networks(["10.0.0.1"]))
    with pytest.raises(ValueError, match="not an IP address"):
        parse_networks(["127.0.0.300"])


def test_policy_from_the_settings() -> None:
    cfg = config_mod.load(environ={"PROXY_PROTOCOL": "v2",
                                   "PROXY_TRUSTED": "192.0.2.10, 10.0.0.0/8",
                                   "PROXY_TIMEOUT": "4.5"})
    policy = Policy.from_config(cfg)
    assert (policy.mode, policy.timeout) == ("v2", 4.5)
    assert policy.trusts("10.9.9.9") and not policy.trusts("11.0.0.1")
    with pytest.raises(config_mod.ConfigError, match="PROXY_TRUSTED"):
        config_mod.load(environ={"PROXY_TRUSTED": "10.0.0.0/33"})
    with pytest.raises(config_mod.ConfigError, match=r"PROXY_TIMEOUT.*seconds 3-60"):
        config_mod.load(environ={"PROXY_TIMEOUT": "2.9"})  # the protocol asks for 3 s
    assert config_mod.load(environ={"PROXY_TIMEOUT": "3"}).proxy_timeout == 3
    with pytest.raises(config_mod.ConfigError, match="PROXY_PROTOCOL"):
        config_mod.load(environ={"PROXY_PROTOCOL": "v3"})
    off = Policy.from_config(config_mod.load(environ={}))
    assert not off.enabled


@pytest.mark.parametrize("entry, why", [
    ("127.0.0.10", "loopback"), ("127.0.0.0/8", "loopback"), ("127.255.0.0/16", "loopback"),
    ("::1", "loopback"), ("::ffff:127.0.0.10", "loopback"), ("0.0.0.0/0", "wider than /8"),
    ("::/0", "wider than /16"), ("10.0.0.0/7", "wider than /8"), ("64.0.0.0/2", "wider than /8"),
    ("fc00::/7", "wider than /16"), ("2000::/3", "wider than /16"),
])
def test_trust_that_others_could_borrow_is_refused(entry: str, why: str) -> None:
    """Loopback (any local user can bind it) or wider than one operator's network: refused
    unless PROXY_TRUSTED_UNSAFE, which each start and reload then logs."""
    trusted = parse_networks(["192.0.2.10", entry])
    with pytest.raises(ValueError, match=f"{why}.*PROXY_TRUSTED_UNSAFE"):
        Policy("v2", trusted)
    accepted = Policy("v2", trusted, unsafe_allowed=True)
    assert accepted.trusts("192.0.2.10")
    assert [why in warning for warning in accepted.warnings()] == [True]
    Policy("off", trusted)  # not in use: nothing to refuse


@pytest.mark.parametrize("entry", ["10.0.0.0/8", "192.0.2.10", "172.16.0.0/12", "::2",
                                   "2001:db8::/16", "fd12:3456:789a::/48", "::ffff:10.0.0.1"])
def test_trust_in_one_network_is_accepted(entry: str) -> None:
    policy = Policy("any", parse_networks([entry]))
    assert policy.warnings() == []


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_ipv4_refusals_follow_the_two_rules(address: int, prefix: int) -> None:
    net = ipaddress.IPv4Network((address, prefix), strict=False)
    loopback = net.overlaps(ipaddress.IPv4Network("127.0.0.0/8"))
    try:
        Policy("v1", (net,))
    except ValueError:
        assert prefix < 8 or loopback
    else:
        assert prefix >= 8 and not loopback


def test_the_settings_name_the_refused_entry_and_the_override() -> None:
    unsafe = {"PROXY_PROTOCOL": "v2", "PROXY_TRUSTED": "127.0.0.10"}
    with pytest.raises(config_mod.ConfigError,
                       match=r"^PROXY_TRUSTED \(proxy_trusted\) from environment: 127\.0\.0\.10/32 "
                             r"is a loopback address") as refused:
        Policy.from_config(config_mod.load(environ=unsafe))
    assert refused.value.setting == "PROXY_TRUSTED"
    policy = Policy.from_config(config_mod.load(environ={**unsafe,
                                                         "PROXY_TRUSTED_UNSAFE": "yes"}))
    assert policy.trusts("127.0.0.10") and len(policy.warnings()) == 1


# ---- reading from a real connection ---------------------------------------------------
@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client end, server end) of a loopback TCP connection; the server end non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    server.setblocking(False)
    yield client, server
    client.close()
    server.close()


def readable(sock: socket.socket, seconds: float) -> bool:
    """poll, not select: a long suite's descriptors may be numbered past select's 1024."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(seconds * 1000))


def _read_when_ready(reader: HeaderReader, server: socket.socket) -> ProxyHeader | None:
    readable(server, 5)
    return reader.read(server)


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 127.0.0.2 127.0.0.11 5555 628\r\n",
    v2_inet("127.0.0.2", "127.0.0.11", 5555, 628),
])
def test_reader_takes_the_header_and_leaves_the_request(
        connection: tuple[socket.socket, socket.socket], header: bytes) -> None:
    client, server = connection
    client.sendall(header + QMQP_REQUEST)  # one segment, as HAProxy sends it
    reader = HeaderReader("any")
    result = _read_when_ready(reader, server)
    assert isinstance(result, ProxyHeader) and result.source == ("127.0.0.2", 5555)
    server.setblocking(True)
    server.settimeout(5)
    assert server.recv(1000) == QMQP_REQUEST


def test_reader_over_pieces_consumes_what_it_saw(
        connection: tuple[socket.socket, socket.socket]) -> None:
    client, server = connection
    header = v2_inet6("2001:db8::7", "::1", 4242, 628)
    reader = HeaderReader("v2")
    client.sendall(header[:5])
    assert _read_when_ready(reader, server) is None
    # The 5 bytes were taken: nothing left to make select() spin.
    assert not readable(server, 0.05)
    client.sendall(header[5:20])
    assert _read_when_ready(reader, server) is None
    client.sendall(header[20:] + QMQP_REQUEST)
    result = _read_when_ready(reader, server)
    assert isinstance(result, ProxyHeader) and result.source == ("2001:db8::7", 4242)
    server.setblocking(True)
    server.settimeout(5)
    assert server.recv(1000) == QMQP_REQUEST


def test_reader_refuses_garbage_and_early_close(
        connection: tuple[socket.socket, socket.socket]) -> None:
    client, server = connection
    client.sendall(b"PROXY TCP4 1.2")
    reader = HeaderReader("v1")
    assert _read_when_ready(reader, server) is None
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(ProxyError, match="before a complete PROXY header"):
        _read_when_ready(reader, server)
    with pytest.raises(ProxyError, match="does not start with"):
        HeaderReader("v1").read(_sent(QMQP_REQUEST))


def _sent(data: bytes) -> socket.socket:
    """A server end that has data waiting (the client end is closed after sending)."""
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname()) as client:
        client.sendall(data)
        server, _ = listener.accept()
    readable(server, 5)
    server.setblocking(False)
    return server

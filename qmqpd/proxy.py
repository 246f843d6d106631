"""The PROXY protocol (HAProxy's v1 text line and v2 binary header), read before anything else.

Behind a load balancer every connection comes from the balancer; the PROXY header it sends
first names the real client. The master reads that header, from trusted sources only and
with a byte budget, before rules and limits, so everything downstream sees the real client.

- `parse(buffer, mode)` looks at the bytes received so far: a complete `ProxyHeader` (its
  `length` is what it consumed), `NEED_MORE`, or `ProxyError` (garbage, oversized, a
  version the mode does not allow). It keeps no state, so bytes may arrive in any pieces.
- `HeaderReader` reads a header off a non-blocking socket without taking a byte of the
  client's own data: it peeks (MSG_PEEK), parses, and then receives exactly the header. An
  incomplete header is all header, so the bytes peeked so far are consumed as well and the
  socket is not reported readable again for data already seen.
- `Policy` is the setting side: PROXY_PROTOCOL (off, v1, v2, any), PROXY_TRUSTED
  (addresses and CIDR prefixes) and PROXY_TIMEOUT; `client_of` turns a header and the real
  peer into the address rules and limits must see. A header makes its sender speak for
  any client (its rules, keys and limits), so PROXY_TRUSTED may name neither loopback
  addresses (any local user can bind one as a source address) nor prefixes wider than
  any one operator's network (IPv4 /8, IPv6 /16) unless PROXY_TRUSTED_UNSAFE says so,
  and then `warnings()` says so at every start and reload.

`LOCAL` (v2, HAProxy's health checks with check-send-proxy) and `UNKNOWN` (v1), or in v2 an
unspecified family or transport (0x00, 0x01, 0x10, 0x20: "the receiver should ignore
address information") or the unix family mean "use the real connection endpoints", as the
spec says; families and transports the spec does not define are refused. A v1 address is
what the spec allows and no more: IPv4 as four decimal numbers without leading zeros,
IPv6 as hex groups with at most one `::` (no `%scope`, no dotted IPv4 tail).
Standard library only (and the shared config leaf, for the settings' errors).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from qmqpd.address import parse_ip
from qmqpd.errors import PermanentError

MODES = ("off", "v1", "v2", "any")
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, address block length
# The v2 address block with TLVs: the addresses need at most 216 bytes (unix); HAProxy's
# own TLVs (ALPN, authority, unique id, SSL facts, netns) fit well within this budget.
DEFAULT_BUDGET = V2_FIXED + 1024
_V2_ADDRESS_SIZES = {1: 12, 2: 36, 3: 216}  # INET, INET6, UNIX
_V2_INET = struct.Struct(">4s4sHH")
_V2_INET6 = struct.Struct(">16s16sHH")


class ProxyError(PermanentError):
    """The connection did not start with an acceptable PROXY header; the text says why."""


class NeedMore:
    """The bytes so far are a valid beginning of a header: wait for more."""

    _instance: NeedMore | None = None

    def __new__(cls) -> NeedMore:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = NeedMore()


@dataclass(frozen=True)
class ProxyHeader:
    """One parsed header. `source`/`destination` are None when the real connection
    endpoints stand (LOCAL, UNKNOWN, unspecified or unix family)."""

    version: int  # 1 or 2
    command: str  # "proxy" or "local"
    family: str  # "tcp4", "tcp6", "unknown" (v1); v2 also "unspec", "unix"
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int  # bytes of the connection the header takes

    @property
    def own(self) -> bool:
        """The proxy speaks for itself, not for a client: v2 LOCAL, v1 UNKNOWN (what
        HAProxy sends on its health checks' connections with check-send-proxy)."""
        return self.command == "local" or self.family == "unknown"


def parse(buffer: bytes | bytearray | memoryview, mode: str = "any",
          budget: int = DEFAULT_BUDGET) -> ProxyHeader | NeedMore:
    """The header at the start of buffer, NEED_MORE, or ProxyError.

    mode is v1, v2 or any; budget bounds a v2 header (16 bytes + address block + TLVs)."""
    data = bytes(buffer[: max(V1_MAX, budget)])
    if mode not in ("v1", "v2", "any"):
        raise ValueError(f"PROXY protocol mode {mode!r} reads no header")
    if not data:
        return NEED_MORE
    if mode != "v2" and _is_prefix(data, V1_PREFIX):
        return _parse_v1(data)
    if mode != "v1" and _is_prefix(data, V2_SIGNATURE):
        return _parse_v2(data, budget)
    wanted = {"v1": "a PROXY v1 line", "v2": "a PROXY v2 header",
              "any": "a PROXY v1 or v2 header"}[mode]
    raise ProxyError(f"the connection does not start with {wanted}")


def _is_prefix(data: bytes, signature: bytes) -> bool:
    """data begins with signature, or is a beginning of it."""
    size = min(len(data), len(signature))
    return data[:size] == signature[:size]


# ---- v1 -------------------------------------------------------------------------------
def _parse_v1(data: bytes) -> ProxyHeader | NeedMore:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        seen = data[:V1_MAX]
        seen = seen[:-1] if seen.endswith(b"\r") else seen  # its LF may be on the way
        if any(not 0x20 <= byte < 0x7F for byte in seen):
            raise ProxyError("PROXY v1 line holds a byte that is not printable ASCII")
        if len(data) >= V1_MAX:
            raise ProxyError(f"PROXY v1 line longer than {V1_MAX} bytes")
        return NEED_MORE
    line = data[:end]
    length = end + 2
    if any(not 0x20 <= byte < 0x7F for byte in line):
        raise ProxyError("PROXY v1 line holds a byte that is not printable ASCII")
    fields = line.decode("ascii").split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        # The rest of an UNKNOWN line is to be ignored, whatever it says.
        return ProxyHeader(1, "proxy", "unknown", None, None, length)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyError("PROXY v1 line is not `PROXY TCP4|TCP6 src dst sport dport` "
                         "nor `PROXY UNKNOWN`")
    _, proto, src, dst, sport, dport = fields
    version = 4 if proto == "TCP4" else 6
    source = (_v1_address(src, version), _v1_port(sport))
    destination = (_v1_address(dst, version), _v1_port(dport))
    return ProxyHeader(1, "proxy", proto.lower(), source, destination, length)


_V6_CHARACTERS = frozenset("0123456789abcdefABCDEF:")


def _v1_address(text: str, version: int) -> str:
    if version == 6 and not set(text) <= _V6_CHARACTERS:
        # ipaddress would take `fe80::1%eth0` and `::ffff:192.0.2.1`; the spec does not
        raise ProxyError(f"PROXY v1 address {text!r} is not an IPv6 address in hex groups")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(f"PROXY v1 address {text!r} is not an IP address") from None
    if address.version != version:
        raise ProxyError(f"PROXY v1 address {text!r} is not an IPv{version} address")
    return str(address)


def _v1_port(text: str) -> int:
    if not (text.isdigit() and text.isascii() and len(text) <= 5) or (
            len(text) > 1 and text.startswith("0")) or int(text) > 65535:
        raise ProxyError(f"PROXY v1 port {text!r} is not a port number")
    return int(text)


# ---- v2 -------------------------------------------------------------------------------
def _parse_v2(data: bytes, budget: int) -> ProxyHeader | NeedMore:
    if len(data) < V2_FIXED:
        return NEED_MORE
    version, command = data[12] >> 4, data[12] & 0x0F
    family, transport = data[13] >> 4, data[13] & 0x0F
    (block,) = struct.unpack_from(">H", data, 14)
    if version != 2:
        raise ProxyError(f"PROXY v2 header with version {version}")
    if command not in (0, 1):
        raise ProxyError(f"PROXY v2 header with unknown command {command}")
    if family > 3 or transport > 2:
        raise ProxyError(f"PROXY v2 header with unknown family {family} or transport "
                         f"{transport}")
    length = V2_FIXED + block
    if length > budget:
        raise ProxyError(f"PROXY v2 header of {length} bytes is over the budget of {budget}")
    addressed = command == 1 and transport != 0  # else the addresses are to be ignored
    if addressed and family in _V2_ADDRESS_SIZES and block < _V2_ADDRESS_SIZES[family]:
        raise ProxyError(f"PROXY v2 address block of {block} bytes is too short for its family")
    if len(data) < length:
        return NEED_MORE
    if command == 0:  # LOCAL: the proxy speaking for itself; whatever follows is ignored
        return ProxyHeader(2, "local", "unspec", None, None, length)
    if transport == 2:
        raise ProxyError("PROXY v2 header for a datagram transport on a stream connection")
    if transport == 0:  # UNSPEC: "the receiver should ignore address information"
        return ProxyHeader(2, "proxy", "unspec", None, None, length)
    if family == 1:
        src, dst, sport, dport = _V2_INET.unpack_from(data, V2_FIXED)
        return ProxyHeader(2, "proxy", "tcp4", (str(ipaddress.IPv4Address(src)), sport),
                           (str(ipaddress.IPv4Address(dst)), dport), length)
    if family == 2:
        src, dst, sport, dport = _V2_INET6.unpack_from(data, V2_FIXED)
        return ProxyHeader(2, "proxy", "tcp6", (str(ipaddress.IPv6Address(src)), sport),
                           (str(ipaddress.IPv6Address(dst)), dport), length)
    return ProxyHeader(2, "proxy", "unix" if family == 3 else "unspec", None, None, length)


# ---- reading it off a socket ----------------------------------------------------------
class HeaderReader:
    """One connection's header, read without taking any of the client's own bytes.

    `read(sock)` on a non-blocking socket that select() called readable: the header, None
    (wait for more), or ProxyError (also for a connection closed before the header)."""

    def __init__(self, mode: str = "any", budget: int = DEFAULT_BUDGET) -> None:
        self.mode = mode
        self.budget = budget
        self.buffer = bytearray()

    def read(self, sock: socket.socket) -> ProxyHeader | None:
        room = max(V1_MAX, self.budget) - len(self.buffer)
        try:
            peeked = sock.recv(room, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        if not peeked:
            raise ProxyError("connection closed before a complete PROXY header"
                             if self.buffer else "connection closed without a PROXY header")
        result = parse(self.buffer + peeked, self.mode, self.budget)
        if isinstance(result, NeedMore):
            self.buffer += _recv_exactly(sock, len(peeked))
            return None
        _recv_exactly(sock, result.length - len(self.buffer))
        self.buffer.clear()
        return result


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Take bytes already peeked: they are in the socket's buffer, so this does not wait."""
    data = bytearray()
    while len(data) < size:
        block = sock.recv(size - len(data))
        if not block:
            raise ProxyError("connection closed while its PROXY header was read")
        data += block
    return bytes(data)


# ---- the settings side ----------------------------------------------------------------
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Any local user can send from these: Linux lets every process bind any 127/8 address.
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"),
            ipaddress.ip_network("::ffff:127.0.0.0/104"))
# Wider than this is wider than one operator's network: IPv4 /8 is the largest block one
# organisation holds (10.0.0.0/8, the old class A); IPv6 /16 is wider than any ISP's
# allocation (RIRs hand out /19 to /32; fc00::/7, every site's unique-local addresses,
# is wider still). 0.0.0.0/0 and ::/0 trust every peer.
WIDEST_PREFIX = {4: 8, 6: 16}


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """PROXY_TRUSTED items: addresses or CIDR prefixes; ValueError names a bad one."""
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR prefix") from None
    return tuple(out)


def unsafe_entries(trusted: Iterable[Network]) -> list[str]:
    """Why each PROXY_TRUSTED entry lets the wrong peers speak for any client; [] = none."""
    found = []
    for net in trusted:
        if net.prefixlen < WIDEST_PREFIX[net.version]:
            found.append(f"{net} is wider than /{WIDEST_PREFIX[net.version]}: every host in "
                         "it could send a header naming any client")
        elif any(net.version == loop.version and net.overlaps(loop)  # type: ignore[arg-type]
                 for loop in LOOPBACK):
            found.append(f"{net} is a loopback address: any local user can bind it as a "
                         "source address and send a header naming any client")
    return found


@dataclass(frozen=True)
class Policy:
    """PROXY_PROTOCOL, PROXY_TRUSTED and PROXY_TIMEOUT, checked together."""

    mode: str = "off"
    trusted: tuple[Network, ...] = ()
    timeout: float = 3.0
    budget: int = DEFAULT_BUDGET
    unsafe_allowed: bool = False  # PROXY_TRUSTED_UNSAFE

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"PROXY_PROTOCOL {self.mode!r}: allowed: {', '.join(MODES)}")
        if self.mode != "off" and not self.trusted:
            raise ValueError(f"PROXY_PROTOCOL is {self.mode} but PROXY_TRUSTED is empty: "
                             "name the load balancers' addresses")
        unsafe = unsafe_entries(self.trusted) if self.enabled else []
        if unsafe and not self.unsafe_allowed:
            raise ValueError(f"{unsafe[0]}; trust only balancers on other hosts (one on "
                             "this host: PROXY_SOCKET), or set PROXY_TRUSTED_UNSAFE to "
                             "accept the risk")

    @classmethod
    def from_config(cls, config: Any) -> Policy:
        """From a Config (proxy_protocol, proxy_trusted, proxy_timeout,
        proxy_trusted_unsafe); ConfigError names PROXY_TRUSTED and where it came from."""
        from qmqpd.config import problem

        try:
            return cls(config.proxy_protocol, parse_networks(config.proxy_trusted),
                       float(config.proxy_timeout),
                       unsafe_allowed=bool(config.proxy_trusted_unsafe))
        except ValueError as error:
            raise problem("PROXY_TRUSTED", config.source("PROXY_TRUSTED"), str(error)) from None

    def warnings(self) -> list[str]:
        """What an accepted PROXY_TRUSTED_UNSAFE lets through, for the log of each start."""
        if not self.enabled:
            return []
        return [f"PROXY_TRUSTED_UNSAFE accepts it: {reason}"
                for reason in unsafe_entries(self.trusted)]

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def trusts(self, ip: str) -> bool:
        address = parse_ip(ip)
        return address is not None and any(address in net for net in self.trusted)

    def check_source(self, peer_ip: str) -> None:
        """ProxyError unless a header may come from peer_ip; with the protocol on, every
        connection must come through a trusted proxy (a direct client could claim any
        address, and a proxy's client could send a header of its own)."""
        if self.enabled and not self.trusts(peer_ip):
            raise ProxyError(f"connection from {peer_ip}, not in PROXY_TRUSTED")

    def reader(self) -> HeaderReader:
        return HeaderReader(self.mode, self.budget)

    def client_of(self, header: ProxyHeader, peer: tuple[str, int]) -> tuple[str, int]:
        """The (ip, port) that rules, limits and the session must see."""
        if header.source is None:
            return peer
        return header.source
